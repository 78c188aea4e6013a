"""The HTML page of `quantvm analyze`: one self-contained file (inline CSS and SVG, no script, no URL).

The plot is a horizontal bar chart with one row per layer in graph order, so it grows in height and stays
readable from a handful of layers to a few hundred. Two panels, as the figures have different ranges:
the SQNRs (input, output with only this layer int8) on the left, the gain with only this layer fp32 on the
right. An exact layer (infinite SQNR, or None after a JSON round trip) is drawn to an "exact" column past
the last tick. Every name comes from a user's ONNX file, so every name is escaped.
"""

from __future__ import annotations

import dataclasses
import html
import math

from compiler.sensitivity import LayerSensitivity, SensitivityReport

# (field, css class, colour, legend): Okabe-Ito colours, which colour-blind readers can tell apart
SQNR_SERIES = (
    ("input_sqnr_db", "s-input", "#0072B2", "input SQNR"),
    ("only_int8_sqnr_db", "s-int8", "#D55E00", "output SQNR, only this layer int8"),
)
GAIN_SERIES = (("only_fp32_gain_db", "s-gain", "#009E73", "output SQNR gain, only this layer fp32"),)

NAME_CHARS = 38  # a longer name is cut in the middle on the plot (full name on hover and in the table)
LABEL_W = 330  # room for the row number and NAME_CHARS of 12px monospace
SQNR_W, GAIN_W, GAP = 440, 240, 40
EXACT_W = 44  # the "exact" column at the right of each panel, clear of the last tick label
ROW_H, BAR_H = 20, 7
TOP, BOTTOM, MARGIN = 96, 44, 12
WHOLE_MODEL_LINE = 'stroke="#222" stroke-width="1.5" stroke-dasharray="6 3"'
FONT = "font-family:ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace"

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI','DejaVu Sans',sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .6em;word-break:break-all}
h2{font-size:1.15em;margin:1.6em 0 .5em}
p.note{color:#555;max-width:60em}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.25em 1.2em;margin:0}
dl.summary dt{color:#555}
dl.summary dd{margin:0;font-variant-numeric:tabular-nums}
svg{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-family:ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace;word-break:break-all}
"""


def render_html(report: SensitivityReport) -> str:
    """The whole page for `report`; the same report always gives the same text."""
    report = _normalised(report)
    title = f"INT8 sensitivity: {report.model}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{CSS}</style></head>",
            "<body>",
            f"<h1>{_esc(title)}</h1>",
            _summary(report),
            "<h2>Per-layer error, in graph order</h2>",
            '<p class="note">Higher SQNR is better. A large gain means the model gains much when that layer '
            "alone stays fp32: it is the first to keep out of int8. Hover a row for its exact figures.</p>",
            _plot(report),
            "<h2>Layers, worst first</h2>",
            _table(report),
            "</body>",
            "</html>",
            "",
        ]
    )


def _normalised(report: SensitivityReport) -> SensitivityReport:
    """None (how JSON stores a non-finite figure, in practice an exact layer) becomes inf, so sorting and
    drawing only meet floats."""

    def fix(value):
        return math.inf if value is None else value

    layers = [
        dataclasses.replace(
            layer,
            input_sqnr_db=fix(layer.input_sqnr_db),
            only_int8_sqnr_db=fix(layer.only_int8_sqnr_db),
            only_fp32_gain_db=fix(layer.only_fp32_gain_db),
        )
        for layer in report.layers
    ]
    return dataclasses.replace(
        report,
        all_int8_sqnr_db=fix(report.all_int8_sqnr_db),
        all_int8_cosine=fix(report.all_int8_cosine),
        layers=layers,
    )


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _summary(report: SensitivityReport) -> str:
    rows = [
        ("model", report.model),
        ("calibration", report.calib_mode),
        ("bias correction", report.bias_correction or "off"),
        ("batches measured", report.batches),
        ("layers", len(report.layers)),
        ("whole model int8: output SQNR", f"{_fmt(report.all_int8_sqnr_db)} dB"),
        ("whole model int8: output cosine", _fmt(report.all_int8_cosine, 5)),
    ]
    items = "".join(f"<dt>{_esc(key)}</dt><dd>{_esc(value)}</dd>" for key, value in rows)
    return f'<dl class="summary">{items}</dl>'


def _table(report: SensitivityReport) -> str:
    graph_index = {id(layer): i for i, layer in enumerate(report.layers, 1)}
    head = (
        "<tr><th>rank</th><th>#</th><th>layer</th><th>op</th><th>input type</th><th>input SQNR (dB)</th>"
        "<th>only this int8: SQNR (dB)</th><th>only this fp32: gain (dB)</th></tr>"
    )
    rows = []
    for rank, layer in enumerate(report.worst_first(), 1):
        cells = [f'<td class="num">{rank}</td>', f'<td class="num">{graph_index[id(layer)]}</td>']
        cells.append(f'<td class="name">{_esc(layer.name)}</td>')
        cells += [f"<td>{_esc(layer.op)}</td>", f"<td>{_esc(layer.dtype)}</td>"]
        cells += [f'<td class="num">{_fmt(v)}</td>' for v in _figures(layer)]
        rows.append(f'<tr class="layer">{"".join(cells)}</tr>')
    return f'<table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _figures(layer: LayerSensitivity) -> tuple[float, float, float]:
    return layer.input_sqnr_db, layer.only_int8_sqnr_db, layer.only_fp32_gain_db


# ---- the plot ----


@dataclasses.dataclass
class _Scale:
    """Maps dB to x in one panel: [lo, hi] fills it but for the exact column at its right."""

    lo: float
    hi: float
    step: float
    x0: float
    width: float

    def x(self, value: float) -> float:
        if math.isinf(value):
            return self.x0 + self.width if value > 0 else self.x0
        span = self.width - EXACT_W
        return self.x0 + span * (min(max(value, self.lo), self.hi) - self.lo) / (self.hi - self.lo)

    def ticks(self) -> list[float]:
        # whole multiples of the step, so that the zero tick is exactly 0
        return [k * self.step for k in range(round(self.lo / self.step), round(self.hi / self.step) + 1)]


def _scale(values: list[float], x0: float, width: float, intervals: int) -> _Scale:
    """About `intervals` round steps (1, 2 or 5 times a power of ten) spanning 0 and every finite value."""
    finite = [v for v in values if math.isfinite(v)] + [0.0]
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-9:
        hi = lo + 10.0
    raw = (hi - lo) / intervals
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return _Scale(math.floor(lo / step) * step, math.ceil(hi / step) * step, step, x0, width)


def _plot(report: SensitivityReport) -> str:
    layers = report.layers
    height = TOP + ROW_H * len(layers) + BOTTOM
    width = MARGIN + LABEL_W + SQNR_W + GAP + GAIN_W + MARGIN
    sqnr_x0 = MARGIN + LABEL_W
    sqnr_values = [getattr(layer, field) for layer in layers for field, *_ in SQNR_SERIES] + [report.all_int8_sqnr_db]
    sqnr = _scale(sqnr_values, sqnr_x0, SQNR_W, 7)
    gain = _scale([layer.only_fp32_gain_db for layer in layers], sqnr_x0 + SQNR_W + GAP, GAIN_W, 4)
    y_end = TOP + ROW_H * len(layers)
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="per-layer INT8 error" style="{FONT};font-size:12px">',
        _legend(report.all_int8_sqnr_db),
        _stripes(len(layers), width),
        _axis(sqnr, "SQNR (dB)", y_end),
        _axis(gain, "gain (dB)", y_end),
    ]
    if math.isfinite(report.all_int8_sqnr_db):  # the whole int8 model, for comparison with each row
        x = sqnr.x(report.all_int8_sqnr_db)
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{y_end}" {WHOLE_MODEL_LINE}>'
            f"<title>whole model int8: {_fmt(report.all_int8_sqnr_db)} dB</title></line>"
        )
    for i, layer in enumerate(layers):
        parts.append(_row(i, layer, sqnr, gain))
    parts.append("</svg>")
    return "\n".join(parts)


def _legend(all_int8_sqnr_db: float) -> str:
    parts = ['<g class="legend">']
    for i, (_, _, colour, label) in enumerate(SQNR_SERIES + GAIN_SERIES):  # two columns
        x, y = MARGIN + (i % 2) * 380, 14 + (i // 2) * 18
        parts.append(f'<rect x="{x}" y="{y}" width="14" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 20}" y="{y + 9}">{_esc(label)} (dB)</text>')
    x, y = MARGIN + 380, 32
    parts.append(f'<line x1="{x}" y1="{y + 5}" x2="{x + 14}" y2="{y + 5}" {WHOLE_MODEL_LINE}/>')
    parts.append(f'<text x="{x + 20}" y="{y + 9}">whole model int8 ({_fmt(all_int8_sqnr_db)} dB)</text>')
    x, y = MARGIN + 760, 14
    parts.append(f'<rect x="{x}" y="{y}" width="14" height="10" fill="#888" fill-opacity="0.45" stroke="#888"/>')
    parts.append(f'<text x="{x + 20}" y="{y + 9}">exact (no error): drawn to "exact"</text>')
    parts.append("</g>")
    return "".join(parts)


def _stripes(count: int, width: int) -> str:
    """A light band under every other row, so the eye can follow a row from its name to its bars."""
    return "".join(
        f'<rect x="{MARGIN}" y="{TOP + i * ROW_H}" width="{width - 2 * MARGIN}" height="{ROW_H}" fill="#f4f4f4"/>'
        for i in range(1, count, 2)
    )


def _axis(scale: _Scale, title: str, y_end: float) -> str:
    """Grid lines with tick labels above and below the rows (a long plot is read from either end)."""
    parts = []
    for tick in scale.ticks():
        x = scale.x(tick)
        colour = "#666" if tick == 0 else "#d0d0d0"
        parts.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{y_end + 4}" stroke="{colour}"/>')
        label = f"{tick:g}"
        parts.append(f'<text x="{x:.1f}" y="{TOP - 8}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{x:.1f}" y="{y_end + 17}" text-anchor="middle">{label}</text>')
    edge = scale.x0 + scale.width - EXACT_W
    dotted = 'stroke="#bbb" stroke-dasharray="2 2"'
    parts.append(f'<line x1="{edge:.1f}" y1="{TOP - 4}" x2="{edge:.1f}" y2="{y_end + 4}" {dotted}/>')
    for y in (TOP - 8, y_end + 17):  # right-aligned, away from the last tick's label
        parts.append(f'<text x="{scale.x0 + scale.width}" y="{y}" text-anchor="end" font-size="10">exact</text>')
    middle = scale.x0 + (scale.width - EXACT_W) / 2
    parts.append(f'<text x="{middle:.1f}" y="{TOP - 26}" text-anchor="middle" font-weight="bold">{title}</text>')
    parts.append(f'<text x="{middle:.1f}" y="{y_end + 34}" text-anchor="middle" font-weight="bold">{title}</text>')
    return "".join(parts)


def _row(i: int, layer: LayerSensitivity, sqnr: _Scale, gain: _Scale) -> str:
    top = TOP + i * ROW_H
    hover = (
        f"#{i + 1} {layer.name} ({layer.op}, {layer.dtype} input)\n"
        + "\n".join(f"{label}: {_fmt(getattr(layer, field))} dB" for field, _, _, label in SQNR_SERIES + GAIN_SERIES)
    )
    parts = [f'<g class="row"><title>{_esc(hover)}</title>']
    parts.append(f'<text x="{MARGIN + 4}" y="{top + 14}" fill="#888">{i + 1}</text>')
    parts.append(f'<text class="name" x="{MARGIN + 40}" y="{top + 14}">{_esc(_short(layer.name))}</text>')
    for k, (field, cls, colour, _) in enumerate(SQNR_SERIES):
        parts.append(_bar(sqnr, getattr(layer, field), top + 3 + k * (BAR_H + 1), BAR_H, cls, colour))
    field, cls, colour, _ = GAIN_SERIES[0]
    parts.append(_bar(gain, getattr(layer, field), top + ROW_H / 2 - BAR_H / 2 - 1, BAR_H + 2, cls, colour))
    parts.append("</g>")
    return "".join(parts)


def _bar(scale: _Scale, value: float, y: float, height: float, cls: str, colour: str) -> str:
    """One mark: a bar from 0 to the value; an exact value reaches the exact column, pale; n/a is a tick
    at 0 with a label, so every layer keeps one mark per series."""
    zero = scale.x(0.0)
    if math.isnan(value):
        return (
            f'<rect class="mark {cls} na" x="{zero - 1:.1f}" y="{y:.1f}" width="2" height="{height}" fill="{colour}"/>'
            f'<text x="{zero + 4:.1f}" y="{y + height:.1f}" font-size="9" fill="{colour}">n/a</text>'
        )
    end = scale.x(value)
    left, right = min(zero, end), max(zero, end)
    style = f'fill="{colour}"'
    if math.isinf(value):
        cls += " exact"
        style = f'fill="{colour}" fill-opacity="0.35" stroke="{colour}"'
    return f'<rect class="mark {cls}" x="{left:.1f}" y="{y:.1f}" width="{right - left:.1f}" height="{height}" {style}/>'


def _short(name: str) -> str:
    """A long ONNX name cut in its middle: both its start (the block) and end (the op) tell which layer."""
    if len(name) <= NAME_CHARS:
        return name
    keep = NAME_CHARS - 1
    return name[: keep // 2] + "\u2026" + name[-(keep - keep // 2) :]
