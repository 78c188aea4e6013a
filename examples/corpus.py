"""The corpus of real architectures: export them to ONNX (in a scratch torch venv), then compile each with
quantvm for this host, fp32 and int8, check them against onnxruntime, and optionally time them.

    python examples/corpus.py export [--models a,b]        # venv + ONNX files into the cache
    python examples/corpus.py run [--models a,b] [--int8] [--bench [--fp32-only]] [--out results.json] [--force]
    python examples/corpus.py                              # export, then run --int8

The venv is $QUANTVM_CORPUS_VENV (default ~/.cache/quantvm/corpus-venv), the ONNX cache $QUANTVM_CORPUS
(default ~/.cache/quantvm/corpus). `run` uses this interpreter (quantvm's venv, with its bench extra).
Results are written to the JSON after every model; a rerun skips models already there unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # quantvm's checkout, for `compiler` when run as a script

CACHE = Path(os.environ.get("QUANTVM_CORPUS", Path.home() / ".cache/quantvm/corpus"))
VENV = Path(os.environ.get("QUANTVM_CORPUS_VENV", Path.home() / ".cache/quantvm/corpus-venv"))
# pip on this machine takes these two from local disk; other torch versions download several GB
VENV_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "onnx", "onnxscript", "transformers"]
FP32_MAX_RELATIVE_ERROR = 1e-4
CALIB_BATCHES = 4


# --- export -------------------------------------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch, torchvision, transformers, onnx, onnxscript"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {' '.join(VENV_PACKAGES)} into {venv} (several GB, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    return python


def export(models: str | None) -> int:
    python = ensure_venv(VENV)
    command = [str(python), str(HERE / "corpus_export.py"), str(CACHE)] + (["--models", models] if models else [])
    return subprocess.run(command).returncode


# --- run ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One model's row: what it is, whether fp32 and int8 compiled and matched, how fast."""

    name: str
    family: str = ""
    exporter: str = ""
    opset: int = 0
    ops: int = 0
    fp32_compile_s: float | None = None
    fp32_rel_error: float | None = None
    fp32_ok: bool = False
    fp32_error: str | None = None
    kernels: int | None = None  # of the fp32 build
    layout_transforms: int | None = None
    layout_fallbacks: int | None = None  # ops left NCHW (report.layout["fallbacks"])
    int8_compile_s: float | None = None
    int8_cosine: float | None = None
    int8_sqnr_db: float | None = None
    int8_ok: bool | None = None  # None: not asked
    int8_error: str | None = None
    peer_int8_cosine: dict = field(default_factory=dict)  # with --bench: "onnxruntime int8" -> its cosine
    bench: dict = field(default_factory=dict)  # "quantvm fp32 vs onnxruntime fp32" -> speedup, medians in ms
    bench_error: str | None = None


# int8's cosine to onnxruntime's fp32 output, at least; or, when the peers' int8 was measured (--bench), at
# least the best peer's: random weights calibrated on random data can leave every int8 short of this (SSDlite:
# quantvm 0.936, onnxruntime 0.919, OpenVINO 0.918).
INT8_MIN_COSINE = 0.95


def feeds_for(specs: list[dict], rng) -> dict[str, np.ndarray]:
    """Random inputs at the exported shapes: normal floats, token ids, masks of ones, token types of zeros."""
    feeds = {}
    for spec in specs:
        shape, dtype = spec["shape"], np.dtype(spec["dtype"])
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in spec["name"]:
            feeds[spec["name"]] = np.ones(shape, dtype)
        elif "type" in spec["name"]:
            feeds[spec["name"]] = np.zeros(shape, dtype)
        else:
            feeds[spec["name"]] = rng.integers(0, 1000, shape).astype(dtype)
    return feeds


def error_text(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:400] if text else ''}"


def relative_error(got, want) -> float:
    return max(float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-12)) for g, w in zip(got, want))


def cosine_and_sqnr(got, want) -> tuple[float, float]:
    from compiler.quantization import output_error

    error = output_error(np.concatenate([w.ravel() for w in want]), np.concatenate([g.ravel() for g in got]))
    return error["cosine"], error["sqnr_db"]


def onnxruntime_run(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_model(path: Path, info: dict, int8: bool, bench: bool, threads: int) -> Result:
    import compiler

    result = Result(info["name"], info["family"], info["exporter"], info["opset"], info["ops"])
    rng = np.random.default_rng(0)
    feeds = feeds_for(info["inputs"], rng)
    calib = [feeds_for(info["inputs"], rng) for _ in range(CALIB_BATCHES)]
    want = onnxruntime_run(path, feeds)
    fp32 = int8_model = None
    try:
        fp32 = compiler.compile(str(path), target="native", num_threads=threads)
        result.fp32_compile_s = round(fp32.compile_seconds, 1)
        result.fp32_rel_error = relative_error(fp32.run(**feeds), want)
        result.fp32_ok = result.fp32_rel_error <= FP32_MAX_RELATIVE_ERROR
        result.kernels, result.layout_transforms = fp32.report.kernels, fp32.report.layout_transforms
        result.layout_fallbacks = len((fp32.report.layout or {}).get("fallbacks", []))
    except Exception as err:  # noqa: BLE001 (every failure is a row of the table)
        result.fp32_error = error_text(err)
        traceback.print_exc(limit=2)
    if int8:
        try:
            int8_model = compiler.compile(str(path), target="native", num_threads=threads, calib=calib,
                                          bias_correction=None)
            result.int8_compile_s = round(int8_model.compile_seconds, 1)
            result.int8_cosine, result.int8_sqnr_db = cosine_and_sqnr(int8_model.run(**feeds), want)
            result.int8_ok = result.int8_cosine >= INT8_MIN_COSINE
        except Exception as err:  # noqa: BLE001
            result.int8_ok, result.int8_error = False, error_text(err)
            traceback.print_exc(limit=2)
    if bench and fp32 is not None:
        try:
            result.bench, result.peer_int8_cosine = time_contenders(path, fp32, int8_model, calib, feeds, want,
                                                                    threads)
            if result.int8_cosine is not None and result.peer_int8_cosine:  # as close as the best peer's int8
                result.int8_ok = result.int8_ok or result.int8_cosine >= max(result.peer_int8_cosine.values())
        except Exception as err:  # noqa: BLE001
            result.bench_error = error_text(err)
            traceback.print_exc(limit=2)
    return result


def time_contenders(path: Path, fp32, int8_model, calib, feeds, want, threads: int) -> tuple[dict, dict]:
    """compiler/bench.py's interleaved timing of quantvm against its peers (compiler/peers.py): onnxruntime
    fp32 and int8 (static QDQ for CNNs, dynamic otherwise), and OpenVINO (+ NNCF int8) when it imports.
    Also the peers' int8 cosine to onnxruntime's fp32 on the same inputs and calibration, beside quantvm's:
    with random weights and random calibration data, what int8 can reach is the peers' measure too."""
    import onnx

    from compiler.bench import interleave, speedups
    from compiler.peers import Contender, onnxruntime_contender, onnxruntime_int8_contender, openvino_contenders

    proto = onnx.load(str(path))
    contenders = [Contender("quantvm fp32", lambda f: fp32.run(**f)), onnxruntime_contender(path.read_bytes(), threads)]
    if int8_model is not None:
        contenders += [Contender("quantvm int8", lambda f: int8_model.run(**f)),
                       onnxruntime_int8_contender(path, proto, calib, threads)]
    contenders += openvino_contenders(path, proto, calib if int8_model is not None else None, threads)
    contenders = [c for c in contenders if c is not None]
    peer_cosine = {c.name: round(cosine_and_sqnr(output_list(c.run(feeds)), want)[0], 4)
                   for c in contenders if c.name.endswith("int8") and not c.name.startswith("quantvm")}
    interleave(contenders, feeds, rounds=10)
    rows = [c.summary(1) for c in contenders]
    timing = {"median_ms": {row["name"]: round(row["median_ms"], 3) for row in rows},
              "speedup": {f"{r['contender']} vs {r['baseline']}": round(r["speedup"], 3) for r in speedups(rows)}}
    return timing, peer_cosine


def output_list(outputs) -> list:
    """A runtime's outputs as a list: OpenVINO returns them keyed by port."""
    return list(outputs.values()) if hasattr(outputs, "values") else list(outputs)


def cached_models(names: str | None) -> list[dict]:
    infos = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    if names:
        wanted = names.split(",")
        missing = set(wanted) - {i["name"] for i in infos}
        if missing:
            raise SystemExit(f"not in {CACHE}: {', '.join(sorted(missing))} (run `corpus.py export` first)")
        by_name = {i["name"]: i for i in infos}
        infos = [by_name[n] for n in wanted]  # in the order asked
    return infos


def run(args) -> int:
    from compiler.runtime import resolve_num_threads, use_threads

    threads = resolve_num_threads(args.threads)
    use_threads(threads)  # before onnxruntime starts its threads (see compiler/bench.py)
    out = Path(args.out)
    done = {r["name"]: r for r in json.loads(out.read_text())["models"]} if out.exists() else {}
    for info in cached_models(args.models):
        if info["name"] in done and not args.force:
            continue
        print(f"--- {info['name']} ({info['ops']} ops, opset {info['opset']}, {info['exporter']})", flush=True)
        started = time.perf_counter()
        int8 = (args.int8 or args.bench) and not args.fp32_only
        result = run_model(CACHE / f"{info['name']}.onnx", info, int8, args.bench, threads)
        print(f"    {time.perf_counter() - started:.0f} s: fp32 ok={result.fp32_ok} int8 ok={result.int8_ok}",
              flush=True)
        done[info["name"]] = asdict(result)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"threads": threads, "models": list(done.values())}, indent=1))
        os.replace(tmp, out)  # after every model: an interrupted run keeps what it measured
    print(markdown([done[n] for n in sorted(done)]))
    return 0 if all(r["fp32_ok"] and r["int8_ok"] is not False for r in done.values()) else 1


def markdown(rows: list[dict]) -> str:
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    def ratio(row, key):
        return num(row["bench"].get("speedup", {}).get(key), ".2f")

    lines = ["| model | ops / opset / exporter | fp32 ok (max rel err) | int8 ok (cosine, SQNR dB) | compile s fp32 / int8 "
             "| kernels / layout transforms / ops left NCHW | fp32 × ort | int8 × ort int8 | fp32 × OpenVINO "
             "| int8 × OpenVINO int8 | int8 cosine onnxruntime / OpenVINO | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32 = f"{'yes' if r['fp32_ok'] else 'NO'} ({num(r['fp32_rel_error'], '.1e')})"
        int8 = "" if r["int8_ok"] is None else \
            f"{'yes' if r['int8_ok'] else 'NO'} ({num(r['int8_cosine'], '.4f')}, {num(r['int8_sqnr_db'], '.1f')})"
        error = "; ".join(f"{k}: {r[k]}" for k in ("fp32_error", "int8_error", "bench_error") if r[k])
        cosines = r.get("peer_int8_cosine") or {}
        peers = " / ".join(num(cosines.get(name), ".4f") for name in ("onnxruntime int8", "openvino int8"))
        lines.append(f"| {r['name']} | {r['ops']} / {r['opset']} / {r['exporter']} | {fp32} | {int8} "
                     f"| {num(r['fp32_compile_s'], '.1f')} / {num(r['int8_compile_s'], '.1f')} "
                     f"| {num(r.get('kernels'), 'd')} / {num(r.get('layout_transforms'), 'd')} "
                     f"/ {num(r.get('layout_fallbacks'), 'd')} "
                     f"| {ratio(r, 'quantvm fp32 vs onnxruntime fp32')} | {ratio(r, 'quantvm int8 vs onnxruntime int8')} "
                     f"| {ratio(r, 'quantvm fp32 vs openvino fp32')} | {ratio(r, 'quantvm int8 vs openvino int8')} "
                     f"| {peers} | {error.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    exp = sub.add_parser("export", help="make the venv and export the models into the cache")
    exp.add_argument("--models")
    run_parser = sub.add_parser("run", help="compile, check and (with --bench) time the cached models")
    run_parser.add_argument("--models")
    run_parser.add_argument("--int8", action="store_true", help="also compile int8 (calibrated on random batches)")
    run_parser.add_argument("--bench", action="store_true",
                            help="time against onnxruntime (and OpenVINO when installed); implies --int8")
    run_parser.add_argument("--fp32-only", action="store_true", help="no int8 builds: compile and time fp32 only")
    run_parser.add_argument("--out", default="corpus_results.json")
    run_parser.add_argument("--force", action="store_true", help="redo models already in --out")
    run_parser.add_argument("--threads", type=int, default=None, help="default: $TVM_NUM_THREADS, else all cores")
    args = parser.parse_args(argv)
    if args.command == "export":
        return export(args.models)
    if args.command == "run":
        return run(args)
    status = export(None)
    return run(run_parser.parse_args(["--int8"])) or status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
