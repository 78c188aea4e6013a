"""A long-lived fuzz worker: reads one case a line (JSON) on stdin, answers one JSON line per case.

Each mutant goes to `compiler.compile()` and to the CLI's `main(["compile", ...])` in this process
(importing TVM costs seconds, so one process serves many cases); the parent restarts the worker when a
mutant kills it. Stray output of TVM's C++ side goes to stderr, never into the answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _random_inputs(specs, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        dtype = np.dtype(s.dtype)
        if dtype.kind == "f":
            feeds[s.name] = rng.standard_normal(s.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[s.name] = rng.random(s.shape) < 0.5
        else:
            feeds[s.name] = rng.integers(0, 3, s.shape).astype(dtype)
    return feeds


def _against_onnxruntime(model, path: str) -> str:
    """accepted-run outcome: match, mismatch, run_failed; ort_rejects where onnxruntime refuses the mutant,
    ort_nonfinite where its output holds NaN or Inf: the mutant overflows float32 (a flipped exponent bit
    makes a weight 1e37), where results depend on the order of the sums, and where quantvm's ReLU and Clip
    turn a NaN into a number (max/min instructions) while onnxruntime keeps it. Counted apart, not matched."""
    feeds = _random_inputs(model.inputs)
    try:
        ours = model.run(**feeds)
    except Exception as err:  # noqa: BLE001
        return f"run_failed: {type(err).__name__}: {_one_line(err)}"
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ref = session.run(None, feeds)
    except Exception:  # noqa: BLE001 (onnxruntime refusing a mutant is not our outcome)
        return "ort_rejects"
    if len(ref) != len(ours):
        return f"mismatch: {len(ours)} outputs, onnxruntime gives {len(ref)}"
    if any(np.asarray(b).dtype.kind in "fc" and not np.isfinite(b).all() for b in ref):
        return "ort_nonfinite"
    for i, (a, b) in enumerate(zip(ours, ref)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"mismatch: output {i} shape {a.shape}, onnxruntime {b.shape}"
        if a.dtype.kind in "fc":
            scale = float(np.nanmax(np.abs(b))) if b.size and np.isfinite(b).any() else 1.0
            if not np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0), equal_nan=True):
                return f"mismatch: output {i} max abs diff {float(np.nanmax(np.abs(a - b))):.3g}"
        elif not np.array_equal(a, b):
            return f"mismatch: output {i} differs"
    return "match"


def run_api(path: str, shapes: dict, out_dir: str | None = None) -> dict:
    """compile() the mutant; if it compiles, run it against onnxruntime and (given `out_dir`) export it as the
    CLI does after compiling, checking the folder holds the .so and nothing else."""
    import compiler

    try:
        model = compiler.compile(path, target="native", input_shapes=shapes or None)
    except compiler.QuantvmError as err:
        return {"outcome": "clean_error", "message": _one_line(err), "type": type(err).__name__}
    except Exception as err:  # noqa: BLE001 (the thing the fuzzer looks for)
        import traceback

        where = traceback.extract_tb(err.__traceback__)[-1]
        return {"outcome": "internal_error", "type": type(err).__name__, "message": _one_line(err),
                "where": f"{where.filename}:{where.lineno}"}
    result = {"outcome": "accepted", "check": _against_onnxruntime(model, path)}
    if out_dir is not None:
        try:
            model.export(Path(out_dir) / "out.so")
        except compiler.QuantvmError as err:
            result = {"outcome": "clean_error", "message": _one_line(err), "type": type(err).__name__}
        left = sorted(os.listdir(out_dir))
        if left != (["out.so"] if result["outcome"] == "accepted" else []):
            result = {"outcome": "leftover", "files": left}
    return result


def run_cli(path: str, shapes: dict, out_dir: str) -> dict:
    from compiler.cli import main

    argv = ["compile", path, "-t", "native", "-o", str(Path(out_dir) / "out.so")]
    for name, dims in (shapes or {}).items():
        argv += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except BaseException as exc:  # noqa: BLE001 (escaping main() is a traceback for a user)
        return {"outcome": "traceback", "type": type(exc).__name__, "message": _one_line(exc)}
    lines = [line for line in err.getvalue().splitlines() if not line.startswith("quantvm: warning:")]
    left = sorted(os.listdir(out_dir))
    if rc == 0:
        return {"outcome": "accepted" if left == ["out.so"] else "leftover", "files": left}
    if left:
        return {"outcome": "leftover", "files": left, "message": _one_line(err.getvalue())}
    if any("Traceback" in line for line in lines) or len(lines) != 1 or not lines[0].startswith("quantvm: error: "):
        return {"outcome": "traceback", "message": _one_line(err.getvalue())}
    if lines[0].startswith("quantvm: error: internal error"):
        return {"outcome": "internal_error", "message": lines[0]}
    return {"outcome": "clean_error", "message": lines[0]}


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # TVM's C++ prints and Python prints alike go to stderr from here on
    import compiler.cli  # noqa: F401 (import TVM once, before the first case)

    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        case = json.loads(line)
        try:
            result = _run_case(case)
        except Exception as err:  # noqa: BLE001 (the harness's own failure, told apart from the compiler's)
            result = {"outcome": "worker_error", "message": f"{type(err).__name__}: {_one_line(err)}"}
        answers.write(json.dumps(result) + "\n")
        answers.flush()


def _run_case(case: dict) -> dict:
    # With cli="rejected", an accepted mutant is exported from the compile() result (what the CLI does
    # next) instead of compiled a second time: compiles of real models cost tens of seconds.
    full = case.get("cli", "always") == "always"
    api = run_api(case["path"], case["input_shapes"], None if full else case["out_dir"])
    if full or api["outcome"] != "accepted":
        for name in os.listdir(case["out_dir"]):
            os.unlink(os.path.join(case["out_dir"], name))
        cli = run_cli(case["path"], case["input_shapes"], case["out_dir"])
    else:
        cli = {"outcome": "accepted", "check": "match", "exported": True}
    return {"api": api, "cli": cli}


if __name__ == "__main__":
    main()
