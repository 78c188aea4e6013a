"""Real data that needs no network at run time: photos bundled with scikit-image and scikit-learn, labelled digit and
face images bundled with them, and sentences from the Python standard library's docstrings.

Everything is deterministic: the same crops, splits and sentences on every run (the sentences follow the Python
version's docstrings).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import numpy as np

SIZE = 224

# real photographs only (no synthetic test patterns); skimage's cat() is chelsea() again
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                   "camera", "coins", "clock", "moon", "grass", "gravel", "brick", "page", "text", "cell")

# (side as a fraction of the short side, centre y, centre x as fractions, mirrored): evaluation and calibration
# crops differ, so calibration never sees an evaluation input
EVAL_CROPS = ((1.0, 0.5, 0.5, False), (0.6, 0.3, 0.3, False), (0.6, 0.7, 0.7, False))
CALIB_CROPS = ((0.7, 0.35, 0.65, True), (0.7, 0.65, 0.35, True))


def photos() -> list[tuple[str, np.ndarray]]:
    """The bundled photographs as (name, HxWx3 uint8 RGB): 17 from scikit-image, china and flower from
    scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    found = [(name, _rgb(getattr(data, name)())) for name in _SKIMAGE_PHOTOS]
    sample = load_sample_images()
    found += [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images)]
    return found


def photo_crops(split: str) -> np.ndarray:
    """(N, 224, 224, 3) uint8 RGB crops of every photo: split "eval" (3 a photo) or "calib" (2 a photo)."""
    crops = {"eval": EVAL_CROPS, "calib": CALIB_CROPS}[split]
    return np.stack([_crop(img, *c) for _, img in photos() for c in crops])


def digits(count: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (8x8, 10 classes), the first `count`, as dark ink on white 224x224 RGB."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images[:count] / 16.0
    pixels = np.stack([_resize(255 * (1 - i)[..., None].repeat(3, -1), SIZE) for i in ink])
    return pixels, bunch.target[:count]


def faces() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset: 100 faces (label 1) and 100 non-faces (label 0), 25x25 grey, as 224x224 RGB."""
    from skimage import data

    images = data.lfw_subset()
    pixels = np.stack([_resize(255 * i[..., None].repeat(3, -1), SIZE) for i in images])
    return pixels, np.repeat([1, 0], len(images) // 2)


PROBES = {"digits": digits, "faces": faces}


def image_feeds(pixels: np.ndarray, name: str, layout: str, channels: str, mean, std) -> list[dict[str, np.ndarray]]:
    """One feed dict a sample (batch 1), normalised as the model expects: (pixel - mean) / std."""
    x = pixels.astype(np.float32)
    if channels == "BGR":
        x = x[..., ::-1]
    x = (x - np.float32(mean)) / np.float32(std)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return [{name: np.ascontiguousarray(s[None])} for s in x]


# --- sentences ------------------------------------------------------------------------------------------------------

# a fixed list: importing every stdlib module would open windows (turtle), print (this) or start a browser
_MODULES = ("abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "codecs",
            "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
            "decimal", "difflib", "dis", "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib",
            "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
            "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox",
            "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib",
            "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
            "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
            "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
            "types", "typing", "unicodedata", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
            "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib")


def sentences(max_words: int = 40) -> list[str]:
    """Distinct first sentences of the docstrings of the public functions and classes of ~100 stdlib modules
    (at most `max_words` words, at least 4), in a fixed shuffled order."""
    seen: dict[str, None] = {}
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member)
                                            or inspect.isbuiltin(member)):
                continue
            text = _first_sentence(inspect.getdoc(member) or "", max_words)
            if text:
                seen.setdefault(text)
    found = list(seen)
    np.random.default_rng(0).shuffle(found)
    return found


def _first_sentence(doc: str, max_words: int) -> str | None:
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    if "(" in paragraph.split(" ", 1)[0]:  # a builtin's signature line ("len(obj, /)"), not prose
        return None
    sentence = re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:max_words]) if len(words) >= 4 else None


def text_feeds(texts: list[str], tokenizer_json: Path, names: tuple[str, ...], seq_len: int) -> list[dict]:
    """Token ids, attention mask and token types (int64, (1, seq_len) each, padded with [PAD]) a sentence, from the
    model's own tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding(length=seq_len)
    feeds = []
    for encoding in tokenizer.encode_batch(texts):
        arrays = (encoding.ids, encoding.attention_mask, encoding.type_ids)
        feeds.append({n: np.asarray(a, np.int64)[None] for n, a in zip(names, arrays)})
    return feeds


# --- pixels ---------------------------------------------------------------------------------------------------------

def _rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None].repeat(3, -1)
    return img[..., :3].astype(np.uint8)


def _crop(img: np.ndarray, side: float, cy: float, cx: float, mirror: bool) -> np.ndarray:
    h, w = img.shape[:2]
    s = int(min(h, w) * side)
    top = int(np.clip(cy * h - s / 2, 0, h - s))
    left = int(np.clip(cx * w - s / 2, 0, w - s))
    patch = img[top:top + s, left:left + s]
    return _resize(patch[:, ::-1] if mirror else patch, SIZE)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    out = resize(img.astype(np.float32) / 255, (size, size), anti_aliasing=True, order=1)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
