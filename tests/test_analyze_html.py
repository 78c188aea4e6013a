"""The HTML page of `quantvm analyze`: self-contained, escaped, one mark per layer and series, worst first;
and, where a headless browser is installed, a screenshot that is not blank."""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest

from compiler.analysis_html import render_html
from compiler.sensitivity import LayerSensitivity, SensitivityReport

NASTY = 'conv</text><script>alert("x")</script>&"'
SERIES = ("s-input", "s-int8", "s-gain")


def _report(count: int = 7, seed: int = 3) -> SensitivityReport:
    rng = np.random.default_rng(seed)
    layers = [
        LayerSensitivity(
            name=f"/backbone/stage{i // 4}/block{i % 4}/conv/Conv",
            op="conv2d" if i % 3 else "dense",
            dtype="uint8" if i % 2 else "int8",
            input_sqnr_db=float(rng.uniform(15, 45)),
            only_int8_sqnr_db=float(rng.uniform(20, 55)),
            only_fp32_gain_db=float(rng.uniform(-0.5, 6)),
        )
        for i in range(count)
    ]
    # an exact layer (infinite SQNR and gain), one with undefined figures, and a name meant to break out
    layers[1] = LayerSensitivity("exact_pool", "avg_pool", "int8", math.inf, math.inf, math.inf)
    layers[2] = LayerSensitivity("undefined", "matmul", "int8", math.nan, 30.0, math.nan)
    layers[3].name = "<script>&\"" + NASTY
    return SensitivityReport(
        model='models/<b>net</b>&"x".onnx',
        calib_mode="kl",
        bias_correction=None,
        batches=8,
        all_int8_sqnr_db=24.37,
        all_int8_cosine=0.99812,
        layers=layers,
    )


class _Page(HTMLParser):
    """What the tests look at: tags, the text, the plot's marks and the table rows."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.marks, self.rows = [], [], [], []
        self.svgs = 0
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        self.svgs += tag == "svg"
        if tag == "rect" and "mark" in classes:
            self.marks.append(classes)
        if tag == "tr" and "layer" in classes:
            self._row = []
            self.rows.append(self._row)

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_page_structure_escaping_and_order():
    report = _report()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    parsed = _parse(page)

    # one plot, one mark per layer per series, exact and undefined figures drawn as such
    assert parsed.svgs == 1
    for series in SERIES:
        assert sum(series in classes for classes in parsed.marks) == len(report.layers)
    assert sum("exact" in classes for classes in parsed.marks) == 3
    assert sum("na" in classes for classes in parsed.marks) == 2

    # every name is there as text, and only as text
    text = "".join(parsed.text)
    for layer in report.layers:
        assert layer.name in text
    assert report.model in text
    assert not any(tag == "script" for tag, _ in parsed.tags)
    assert not any(tag == "b" for tag, _ in parsed.tags)
    assert "<script>" not in page

    # self-contained: nothing to fetch
    assert not any(tag in ("link", "iframe", "img", "object", "embed") for tag, _ in parsed.tags)
    for _, attrs in parsed.tags:
        for key in ("src", "href", "xlink:href"):
            assert key not in attrs, attrs
    assert "http://" not in page and "https://" not in page and "url(" not in page

    # the table: worst first, figures to one decimal, exact and n/a spelt out
    expected = report.worst_first()
    assert [row[2] for row in parsed.rows] == [layer.name for layer in expected]
    first = parsed.rows[0]
    assert first[2] == "exact_pool" and first[-3:] == ["exact", "exact", "exact"]
    undefined = next(row for row in parsed.rows if row[2] == "undefined")
    assert undefined[-3:] == ["n/a", "30.0", "n/a"]
    assert parsed.rows[-1][2] == "undefined"  # an unknown gain sorts last
    some = next(row for row in parsed.rows if row[2] == expected[-2].name)
    assert some[-1] == f"{expected[-2].only_fp32_gain_db:.1f}"


def test_deterministic_and_json_nulls():
    """Same report, same bytes; None (a JSON round trip of an exact layer) is drawn as exact, not a crash."""
    assert render_html(_report()) == render_html(_report())
    report = _report()
    report.layers[0].input_sqnr_db = None
    report.layers[0].only_fp32_gain_db = None
    report.all_int8_sqnr_db = None
    parsed = _parse(render_html(report))
    assert sum("exact" in classes for classes in parsed.marks) == 5


@pytest.mark.parametrize("count", [5, 200])
def test_sizes(count):
    parsed = _parse(render_html(_report(count)))
    assert len(parsed.rows) == count
    assert len(parsed.marks) == 3 * count


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_pixels(path) -> np.ndarray:
    """The pixels of an 8-bit RGB(A), non-interlaced PNG (what Chromium writes), decoded with zlib and numpy."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.uint8)
    prev = out[0] * 0
    for y in range(height):
        out[y] = prev = _unfilter(raw[y, 0], raw[y, 1:], prev, bpp)
    return out.reshape(height, width, bpp)


def _unfilter(kind: int, row: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one row's PNG filter: None, Sub and Up in numpy; Average and Paeth, which chain along the row,
    in plain ints (numpy scalars would be ten times slower)."""
    if kind == 0:
        return row
    if kind == 1:
        return np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:
        return row + prev
    out, up = bytearray(row.tobytes()), prev.tobytes()
    for x in range(len(out)):
        a, b, c = (out[x - bpp], up[x], up[x - bpp]) if x >= bpp else (0, up[x], 0)
        if kind == 3:
            pred = (a + b) >> 1
        else:
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out[x] = (out[x] + pred) & 0xFF
    return np.frombuffer(bytes(out), np.uint8)


def test_screenshot_not_blank(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser (chromium, chromium-browser or google-chrome) installed")
    page = tmp_path / "analyze.html"
    page.write_text(render_html(_report(40)), encoding="utf-8")
    png = tmp_path / "analyze.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}", "--window-size=1200,900", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 1000
    pixels = _png_pixels(png)
    assert pixels.shape[:2] == (900, 1200)
    flat = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 10  # text and three bar colours, not one flat colour
    for colour in ((0x00, 0x72, 0xB2), (0xD5, 0x5E, 0x00), (0x00, 0x9E, 0x73)):  # each series' bars are drawn
        assert (flat == colour).all(axis=1).any(), colour
