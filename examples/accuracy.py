"""quantvm's int8 accuracy on real models and real data, next to onnxruntime's and OpenVINO NNCF's int8.

    python examples/accuracy.py [models...] [--option key=value ...] [--only RUNNER ...] [--json FILE]

Models are examples/fetch_models.py's (fetched on first use); data is examples/real_data.py's. Every runner sees the
same inputs and the same calibration batches (crops or sentences distinct from the evaluation ones):

- classifiers: top-1 agreement with fp32 on the photo crops, SQNR (dB) of the probe output (the logits, or the
  pooled features where the model exposes them) on those crops, and a linear probe: logistic regression fitted
  on fp32 outputs of a labelled set's train half, scored on its test half with fp32 and with int8 outputs;
- encoders: cosine of each sentence's embedding (the attention-masked mean of the last hidden state, as
  sentence-transformers defines it) to fp32's: mean and min; and its SQNR.

`--option key=value` is passed to compiler.compile() as it is (the value read as a Python literal, else a string),
so new compile() keywords need no change here. fp32 and peer outputs are cached beside the models, keyed by model
file, data and library versions: a rerun with other quantvm options (`--only quantvm`) runs quantvm alone.
OpenVINO and NNCF run in their own venv (examples/nncf_peer.py; $QUANTVM_NNCF_PYTHON, default
/tmp/nncf-venv/bin/python).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the examples import each other, whatever the working directory

import fetch_models  # noqa: E402
import real_data  # noqa: E402
from fetch_models import MODELS, ImageInput, ModelSpec  # noqa: E402

CACHE_VERSION = 1  # bump when a cached runner's computation changes
RUNNERS = ("fp32", "quantvm", "ort_static", "ort_dynamic", "nncf")
NNCF_PYTHON = os.environ.get("QUANTVM_NNCF_PYTHON", "/tmp/nncf-venv/bin/python")

Feed = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]  # output name -> (samples, values): a vector a sample


@dataclasses.dataclass
class Data:
    calib: list[Feed]
    eval: list[Feed]  # photo crops or sentences
    probe: list[Feed]  # labelled images (classifiers only)
    probe_labels: np.ndarray
    probe_train: np.ndarray  # bool: the probe's training half

    @property
    def samples(self) -> list[Feed]:
        return self.eval + self.probe

    def key(self) -> str:
        digest = hashlib.sha256()
        for feed in self.calib + self.samples:
            for name, array in sorted(feed.items()):
                digest.update(name.encode() + str(array.dtype).encode() + array.tobytes())
        digest.update(self.probe_labels.tobytes() + self.probe_train.tobytes())
        return digest.hexdigest()[:16]


@dataclasses.dataclass
class Row:
    model: str
    runner: str
    top1: str = ""  # "agreeing/total"
    top1_pct: float | None = None
    sqnr_db: float | None = None
    probe_acc: float | None = None  # percent, with this runner's outputs
    probe_drop: float | None = None  # points below fp32's
    cos_mean: float | None = None
    cos_min: float | None = None
    note: str = ""


# --- data -----------------------------------------------------------------------------------------------------------

def load_data(spec: ModelSpec, num_calib: int, num_sentences: int, probe: str) -> Data:
    if isinstance(spec.input, ImageInput):
        pixels, labels = real_data.PROBES[probe]()
        return Data(_image_feeds(spec.input, real_data.photo_crops("calib")[:num_calib]),
                    _image_feeds(spec.input, real_data.photo_crops("eval")), _image_feeds(spec.input, pixels),
                    labels, _train_half(labels))
    texts = real_data.sentences()
    if len(texts) < num_calib + num_sentences:
        raise SystemExit(f"only {len(texts)} distinct sentences; ask for fewer")
    tokenizer = fetch_models.extra_path(spec.name, "tokenizer.json")
    feeds = real_data.text_feeds(texts[:num_calib + num_sentences], tokenizer, spec.input.names, spec.input.seq_len)
    return Data(feeds[:num_calib], feeds[num_calib:], [], np.zeros(0, int), np.zeros(0, bool))


def _image_feeds(s: ImageInput, pixels: np.ndarray) -> list[Feed]:
    return real_data.image_feeds(pixels, s.name, s.layout, s.channels, s.mean, s.std)


def _train_half(labels: np.ndarray) -> np.ndarray:
    """A stratified half of the labelled set, always the same."""
    from sklearn.model_selection import train_test_split

    train, _ = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=0)
    mask = np.zeros(len(labels), bool)
    mask[train] = True
    return mask


# --- runners: each returns the raw outputs of every sample, in model output order -------------------------------------

def run_onnx(path: Path, samples: list[Feed]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, s) for s in samples]


def run_fp32(path: Path, spec: ModelSpec, data: Data, options: dict) -> tuple[list, str]:
    return run_onnx(path, data.samples), ""


def run_quantvm(path: Path, spec: ModelSpec, data: Data, options: dict) -> tuple[list, str]:
    import compiler

    start = time.perf_counter()
    model = compiler.compile(str(path), target="native", calib=data.calib, input_shapes=spec.input_shapes, **options)
    seconds = time.perf_counter() - start
    quant = model.metadata.quantization
    note = (f"compile {seconds:.0f} s, {quant.calib_mode}, int8 {sum(quant.int8_ops.values())}"
            f" / fp32 {sum(quant.fp32_ops.values())} ops")
    return [model.run(**s) for s in data.samples], note


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[Feed]):
        self._left = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._left, None)


def run_ort_static(path: Path, spec: ModelSpec, data: Data, options: dict) -> tuple[list, str]:
    """QDQ, MinMax, per-channel s8 weights, u8 activations (onnxruntime's advice for x86)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(path), str(out), _Batches(data.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return run_onnx(out, data.samples), "QDQ u8/s8, MinMax, per-channel"


def run_ort_dynamic(path: Path, spec: ModelSpec, data: Data, options: dict) -> tuple[list, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        return run_onnx(out, data.samples), "dynamic, s8 weights"


def run_nncf(path: Path, spec: ModelSpec, data: Data, options: dict) -> tuple[list, str]:
    if not Path(NNCF_PYTHON).exists():
        raise RuntimeError(f"no NNCF venv at {NNCF_PYTHON} (see examples/nncf_peer.py)")
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "data.npz", Path(tmp) / "out.npz"
        names = list(data.calib[0])
        np.savez(inputs, **{f"calib__{n}": np.stack([s[n] for s in data.calib]) for n in names},
                 **{f"eval__{n}": np.stack([s[n] for s in data.samples]) for n in names})
        flags = ["--transformer"] if spec.kind == "encoder" else []
        subprocess.run([NNCF_PYTHON, str(HERE / "nncf_peer.py"), str(path), str(inputs), str(outputs), *flags],
                       check=True, stdout=sys.stderr)
        result = np.load(outputs)
        stacked = [result[f"out{k}"] for k in range(len(spec.outputs))]
        return [[o[i] for o in stacked] for i in range(len(data.samples))], str(result["versions"])


RUN = {"fp32": run_fp32, "quantvm": run_quantvm, "ort_static": run_ort_static, "ort_dynamic": run_ort_dynamic,
       "nncf": run_nncf}


def outputs_of(runner: str, path: Path, spec: ModelSpec, data: Data, options: dict,
               refresh: bool) -> tuple[Outputs, str]:
    """A runner's per-sample vectors; all but quantvm's come from (and go to) the cache."""
    if runner == "quantvm":
        raw, note = run_quantvm(path, spec, data, options)
        return vectors(spec, data, raw), note
    cache = fetch_models.cache_dir() / "accuracy" / f"{spec.name}-{runner}-{_cache_key(runner, path, data)}.npz"
    if cache.exists() and not refresh:
        stored = np.load(cache)
        return {k: stored[k] for k in stored.files if k != "__note"}, str(stored["__note"])
    raw, note = RUN[runner](path, spec, data, options)
    result = vectors(spec, data, raw)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fetch_models.write_atomic(cache, lambda tmp: _save_npz(tmp, result, note))
    return result, note


def _save_npz(path: Path, arrays: Outputs, note: str) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez(f, __note=np.array(note), **arrays)


def _cache_key(runner: str, path: Path, data: Data) -> str:
    import onnxruntime

    versions = f"v{CACHE_VERSION} onnxruntime {onnxruntime.__version__} {NNCF_PYTHON if runner == 'nncf' else ''}"
    digest = hashlib.sha256(path.read_bytes() + data.key().encode() + versions.encode())
    return digest.hexdigest()[:16]


def vectors(spec: ModelSpec, data: Data, raw: list[list[np.ndarray]]) -> Outputs:
    """Raw outputs -> one vector a sample: the sentence embedding for encoders, each output flattened for
    classifiers."""
    if spec.kind == "encoder":
        masks = [s["attention_mask"][0].astype(np.float64)[:, None] for s in data.samples]
        return {"embedding": np.stack([(o[0][0] * m).sum(0) / m.sum() for o, m in zip(raw, masks)])}
    return {name: np.stack([np.asarray(o[k]).reshape(-1) for o in raw]) for k, name in enumerate(spec.outputs)}


# --- metrics --------------------------------------------------------------------------------------------------------

def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - other) ** 2)
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def fit_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(features[train], labels[train])


def probe_output(spec: ModelSpec) -> str:
    """What SQNR and the linear probe read: the pooled features where the model outputs them, else the logits."""
    return spec.outputs[-1]


def compare(spec: ModelSpec, data: Data, runner: str, ref: Outputs, got: Outputs, probe) -> Row:
    row = Row(spec.name, runner)
    n = len(data.eval)
    if spec.kind == "encoder":
        a, b = ref["embedding"], got["embedding"]
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        row.cos_mean, row.cos_min, row.sqnr_db = float(cos.mean()), float(cos.min()), sqnr_db(a, b)
        return row
    agree = int(np.sum(ref["logits"][:n].argmax(1) == got["logits"][:n].argmax(1)))
    row.top1, row.top1_pct = f"{agree}/{n}", 100.0 * agree / n
    vector = probe_output(spec)
    row.sqnr_db = sqnr_db(ref[vector][:n], got[vector][:n])
    test = ~data.probe_train
    accuracy = lambda out: 100.0 * probe.score(out[vector][n:][test], data.probe_labels[test])  # noqa: E731
    row.probe_acc = accuracy(got)
    row.probe_drop = accuracy(ref) - row.probe_acc
    return row


# --- driver ---------------------------------------------------------------------------------------------------------

def evaluate(name: str, runners: list[str], options: dict, args) -> list[Row]:
    spec = MODELS[name]
    path = fetch_models.fetch(name)
    data = load_data(spec, args.calib_batches, args.sentences, args.probe)
    ref, _ = outputs_of("fp32", path, spec, data, options, args.refresh)
    probe = fit_probe(ref[probe_output(spec)][len(data.eval):], data.probe_labels, data.probe_train) \
        if spec.kind == "classifier" else None
    rows = [compare(spec, data, "fp32", ref, ref, probe)]
    rows[0].sqnr_db = None  # (infinite: fp32 against itself)
    for runner in runners:
        if runner == "fp32" or (runner == "ort_dynamic" and spec.kind != "encoder"):
            continue  # dynamic quantization is onnxruntime's advice for transformers, not for CNNs
        label = runner if runner != "quantvm" or not options else \
            "quantvm " + ", ".join(f"{k}={v!r}" for k, v in options.items())
        print(f"{name}: {label} ...", file=sys.stderr, flush=True)
        try:
            got, note = outputs_of(runner, path, spec, data, options, args.refresh)
            row = compare(spec, data, label, ref, got, probe)
            row.note = note
        except Exception as err:  # noqa: BLE001 (one runner failing must not hide the others' numbers)
            traceback.print_exc()
            row = Row(name, label, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        rows.append(row)
    return rows


def markdown(rows: list[Row]) -> str:
    def num(value, digits=1):
        return "" if value is None else ("inf" if math.isinf(value) else f"{value:.{digits}f}")

    lines = ["| model | runner | top-1 = fp32 | SQNR dB | probe acc % | probe drop pt | cos mean | cos min | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r.top1} ({r.top1_pct:.0f}%)" if r.top1 else ""
        lines.append(f"| {r.model} | {r.runner} | {top1} | {num(r.sqnr_db)} | {num(r.probe_acc)} | "
                     f"{num(r.probe_drop)} | {num(r.cos_mean, 4)} | {num(r.cos_min, 4)} | {r.note} |")
    return "\n".join(lines)


def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option wants key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value  # a bare word: a string


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--option", type=parse_option, action="append", default=[],
                        help="a compile() keyword for quantvm, e.g. calib_mode=naive or num_calib_batches=16")
    parser.add_argument("--only", action="append", choices=RUNNERS, help="run these (fp32 always: the reference)")
    parser.add_argument("--calib-batches", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences for encoders")
    parser.add_argument("--probe", choices=sorted(real_data.PROBES), default="digits")
    parser.add_argument("--refresh", action="store_true", help="recompute cached fp32 and peer outputs")
    parser.add_argument("--json", type=Path, help="write the rows and settings here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    options = dict(args.option)
    rows = [row for name in (args.models or list(MODELS)) for row in evaluate(name, args.only or list(RUNNERS),
                                                                                options, args)]
    print(markdown(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "option")}
        payload = {"options": {k: repr(v) for k, v in options.items()}, "settings": settings,
                   "rows": [dataclasses.asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
