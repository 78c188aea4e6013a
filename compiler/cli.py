"""The `quantvm` command: compile, tune, run, inspect, bench, demo. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from compiler.errors import InputError, QuantvmError
from compiler.int8_options import add_cli_arguments, from_cli
from compiler.metadata import ArtifactMetadata, TensorSpec
from compiler.report import CompileReport
from compiler.tuner import DEFAULT_TRIALS, INTERRUPTED
from relay_passes.patterns import RULE_NAMES
from targets import NAMED_TARGETS


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... (e.g. data=1,3,224,224), got {text!r}")
    return name, shape


def _count_arg(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return count


def _whole_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _batch_list_arg(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1 separated by commas (e.g. 1,8), got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    targets = ", ".join(NAMED_TARGETS)
    parser = argparse.ArgumentParser(prog="quantvm", description="Compile ONNX models into fast x86 shared libraries.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile an ONNX model into one .so", description=(
        "Compile an ONNX model for a target and export it as one self-contained .so."))
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("-t", "--target", default="cascadelake",
                   help=f"target name ({targets}) or 'llvm -mcpu=CPU' (default: cascadelake)")
    p.add_argument("-o", "--output", required=True, help="the .so to write")
    p.add_argument("--report", metavar="FILE.json", help="write the compile report (fusion, unfused_ops) as JSON")
    p.add_argument("--tuning-db", metavar="DIR", help="apply the kernels tuned into DIR by 'quantvm tune'")
    _add_build_options(p)

    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule, here or on RPC servers", description=(
        "Tune the kernels of a model, as 'quantvm compile' with the same options builds them, with MetaSchedule; "
        "measure on this host, or on the servers behind a TVM RPC tracker (--rpc). Records go to a database "
        "directory that 'quantvm compile --tuning-db DIR' applies; running again on it continues the search."))
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("-t", "--target", default="cascadelake",
                   help=f"target name ({targets}) or 'llvm -mcpu=CPU' (default: cascadelake)")
    p.add_argument("--db", required=True, metavar="DIR", help="the tuning database directory (created if missing)")
    p.add_argument("--trials", type=_whole_arg, default=DEFAULT_TRIALS, metavar="N",
                   help=f"measurements in all, beyond one of each kernel's default schedule (default {DEFAULT_TRIALS})")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY",
                   help="measure on the servers registered with this key at this RPC tracker (default: this host)")
    p.add_argument("--threads", type=_count_arg, metavar="N",
                   help="threads the kernels are built for (default: all cores for native; needed with --rpc "
                        "unless the target says -num-cores)")
    p.add_argument("--json", metavar="FILE", help="also write the per-kernel results as JSON")
    _add_build_options(p)

    p = sub.add_parser("run", help="run a compiled .so on .npy inputs", description=(
        "Run a compiled artifact. Only run artifacts you trust: loading one runs its code."))
    p.add_argument("artifact", help="the .so written by 'quantvm compile'")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input (repeatable); a single-input model also takes a bare FILE.npy")
    p.add_argument("--output", help="write the outputs to this .npz (by output name)")

    p = sub.add_parser("profile", help="time each kernel of a compiled .so, grouped by ONNX nodes", description=(
        "Run a compiled artifact with every VM call timed; print per fused group (the ONNX nodes it came from) "
        "its time and share, slowest first, and the total against the model's measured latency. Only profile "
        "artifacts you trust: loading one runs its code."))
    p.add_argument("artifact", help="the .so written by 'quantvm compile'")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input (repeatable); the others are random (default: all random)")
    p.add_argument("--threads", type=_count_arg, metavar="N",
                   help="threads (default: TVM_NUM_THREADS, else the count compiled for, else all cores)")
    p.add_argument("--repeat", type=_count_arg, default=10, metavar="N",
                   help="timed runs; each call's median is reported (default 10)")
    p.add_argument("--top", type=_whole_arg, default=25, metavar="N", help="groups shown (default 25; 0: all)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")

    p = sub.add_parser("inspect", help="check an artifact's digest, print its metadata; runs nothing", description=(
        "Check that a compiled artifact matches the SHA-256 digest it records (refusing a damaged or modified "
        "file), then print its metadata. Reads the file only; runs none of its code."))
    p.add_argument("artifact")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    shown.add_argument("--verify", action="store_true",
                       help="print only the digest check's verdict (exit status 1 if the file fails it)")

    p = sub.add_parser("bench", help="time quantvm against onnxruntime (and its own unfused build)", description=(
        "Time quantvm's build and onnxruntime (and with --no-fuse also quantvm's unfused build) on the same "
        "random inputs and thread count, interleaved round by round in one process, at each batch size; "
        "print throughput, median and p90 latency and the speedups."))
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("-t", "--target", default="native", help="a target this host can run (default: native)")
    p.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME=D0,D1,...")
    p.add_argument("--batch", type=_batch_list_arg, metavar="N,...",
                   help="batch sizes to time, e.g. 1,8: dim 0 of every input (overrides --input-shape's)")
    p.add_argument("--compare", default="onnxruntime", choices=["onnxruntime", "openvino", "none"],
                   help="time onnxruntime too (default); openvino: onnxruntime and OpenVINO (int8: NNCF's defaults); "
                        "none: quantvm alone")
    p.add_argument("--threads", type=_count_arg, metavar="N",
                   help="threads for every contender (default: TVM_NUM_THREADS if set, else all cores)")
    p.add_argument("--rounds", type=_count_arg, default=10, help="timed rounds per contender (default 10)")
    p.add_argument("--no-fuse", action="store_true", help="also time the unfused build: the fusion speedup")
    p.add_argument("--int8", action="store_true", help="also time quantvm's and onnxruntime's INT8 (needs --calib)")
    p.add_argument("--runner", action="store_true",
                   help="also time the C++ runner (quantvm-run from 'quantvm bundle', its own process) on the builds")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="also time quantvm's builds with the kernels tuned into DIR (the precisions tuned there)")
    p.add_argument("--concurrency", type=_count_arg, metavar="N",
                   help="instead, time N Python threads sharing one quantvm model against 1 thread, each run on "
                        "1 TVM thread (quantvm alone; with --int8, its int8 build)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_int8_options(p)

    p = sub.add_parser("analyze", help="per-layer INT8 sensitivity: JSON, and an HTML page with a plot", description=(
        "Calibrate a model as 'quantvm compile' would, then measure per int8 layer: the SQNR of its quantized "
        "input, the model output's SQNR with only that layer in int8, and the gain with only that layer in "
        "fp32. Prints JSON (or writes it with --json); --html writes a self-contained page."))
    p.add_argument("model", help="the ONNX model file")
    _add_input_shape(p)
    p.add_argument("--threads", type=_count_arg, metavar="N", help="threads for the host builds (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="write the JSON here instead of printing it")
    p.add_argument("--html", metavar="FILE.html", help="also write the report as one self-contained HTML page")
    _add_int8_options(p)

    p = sub.add_parser("bundle", help="one folder that runs an artifact without Python (C API, runner, runtime)",
                       description=(
        "Write a self-contained folder: the artifact, the TVM runtime libraries, quantvm.h and libquantvm.so (the "
        "C API) and the quantvm-run runner, both built with the system C++ compiler ($CXX, else c++), and a "
        "README. Only load artifacts you trust: loading one runs its code."))
    p.add_argument("artifact", help="the .so written by 'quantvm compile'")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")

    p = sub.add_parser("capi-flags", help="print the flags that build a C/C++ program against quantvm.h",
                       description=(
        "Print compiler and linker flags for a program using quantvm's C API with the installed TVM runtime, e.g. "
        "cc main.c $(quantvm capi-flags). libquantvm.so is built on first use into $QUANTVM_CACHE_DIR (else "
        "~/.cache/quantvm/capi)."))
    from compiler.capi.flags import add_arguments
    add_arguments(p)

    p = sub.add_parser("demo", help="compile and check the built-in digits model", description=(
        "Compile the built-in digits CNN for this host and for cascadelake, run the host build on its "
        "held-out data and check it against the ONNX reference."))
    p.add_argument("--keep", metavar="DIR", help="keep the exported .so files in DIR")
    return parser


def _add_build_options(p) -> None:
    """What decides the kernels of a build: input shapes, fusion, INT8 (compile and tune take the same)."""
    _add_input_shape(p)
    fusion = p.add_mutually_exclusive_group()
    fusion.add_argument("--no-fuse", action="store_true", help="apply no fusion rule (one kernel per op)")
    fusion.add_argument("--fuse-rules", metavar="RULE,...",
                        help=f"apply only these fusion rules ({', '.join(RULE_NAMES)})")
    p.add_argument("--no-winograd", action="store_true",
                   help="keep every fp32 3x3 conv direct (Winograd's transformed weights are up to 4x larger)")
    _add_int8_options(p)


def _add_input_shape(p) -> None:
    p.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME=D0,D1,...",
                   help="fix an input's shape (repeatable), e.g. data=1,3,224,224")


def _add_int8_options(p) -> None:
    """--calib, --eval-data and every INT8 option (compile, tune, bench and analyze take the same)."""
    int8 = p.add_argument_group("INT8 (post-training quantization)")
    int8.add_argument("--calib", metavar="DATA.npz",
                      help="calibration data: one array per input name, samples on axis 0; enables INT8")
    int8.add_argument("--eval-data", metavar="DATA.npz",
                      help="held-out data for --max-drop (default: the calibration data)")
    add_cli_arguments(int8)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"quantvm: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["quantvm", *argv])  # as typed: bench prints it, to paste beside its results
    warnings.showwarning = _one_line_warning
    _sigints.clear()
    with _sigint_recorded():
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            return _interrupted()
        except QuantvmError as err:
            return _interrupted() if _sigints else _fail(args, err)
        except Exception as err:  # an unexpected failure still gets one line unless --verbose
            return _interrupted() if _sigints else _fail(args, err, unexpected=True)


@contextlib.contextmanager
def _sigint_recorded():
    """While a command runs, SIGINT is recorded (and raised as usual). The caller's handler is restored after,
    so that main() called in-process (tests, scripts) leaves the process as it found it; after an interrupt
    it is not: a second Ctrl-C while the process exits must not print a traceback."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if not _sigints:
            signal.signal(signal.SIGINT, previous)


_sigints: list = []  # a KeyboardInterrupt raised in a callback from TVM's C++ comes out of it as another error


def _on_sigint(signum, frame):
    _sigints.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    """Ctrl-C: end the worker processes TVM started (MetaSchedule's builders and runners would run on to the
    end of their build or measurement), then one line. A second Ctrl-C must not cut that short with a
    traceback."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigints.append(signal.SIGINT)  # (tune() takes the first Ctrl-C itself): _sigint_recorded keeps SIG_IGN
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    print(INTERRUPTED, file=sys.stderr)
    return 130


def _fail(args, err: BaseException, unexpected=False) -> int:
    if args.verbose:
        import traceback

        traceback.print_exception(err)
    kind = f"internal error ({type(err).__name__}): " if unexpected else ""
    message = " ".join(str(err).split()) or type(err).__name__
    hint = "" if args.verbose else " (run with --verbose for details)" if unexpected else ""
    print(f"quantvm: error: {kind}{message}{hint}", file=sys.stderr)
    return 1


def cmd_compile(args) -> int:
    from compiler import compile

    fuse = False if args.no_fuse else args.fuse_rules.split(",") if args.fuse_rules else True
    model = compile(args.model, target=args.target, input_shapes=dict(args.input_shape) or None, fuse=fuse,
                    tuning_db=args.tuning_db, winograd=not args.no_winograd, **_int8_options(args))
    path = model.export(args.output)
    target = model.metadata.target
    print(f"compiled {args.model} for {target.name} (mcpu {target.mcpu}) "
          f"in {model.compile_seconds:.1f} s -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(format_report(model.report))
    if args.report:
        from compiler.atomic import atomic_path

        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(model.report.to_json(), indent=2, sort_keys=True) + "\n")
    return 0


def _csv(text):
    return [part for part in (text or "").split(",") if part]


def _read_npz(path, flag: str = "--calib") -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, AttributeError) as err:
        raise InputError(f"{flag} {path}: cannot read it as an .npz of arrays ({err})") from err


def _int8_options(args) -> dict:
    """compile()'s INT8 keywords from the command line: the data, and the options as one object."""
    options = from_cli(args)
    data = {"calib": _read_npz(args.calib, "--calib") if args.calib else None,
            "eval_data": _read_npz(args.eval_data, "--eval-data") if args.eval_data else None}
    if data["calib"] is None and options.calib_mode != "none":
        return {}
    return {**data, "quantization": options}


def format_report(report: CompileReport) -> str:
    lines = [f"kernels: {report.kernels}"]
    matched = {rule: n for rule, n in report.fusion.items() if n}
    lines.append("fused:   " + (", ".join(f"{rule} x{n}" for rule, n in matched.items()) if matched else "nothing"))
    unfused = report.unfused_ops
    lines.append("unfused: " + (", ".join(f"{op} x{n}" for op, n in unfused.items()) if unfused else "nothing"))
    for refusal in report.rejected:
        lines.append(f"not fused by {refusal['rule']} at {refusal['at']}: {refusal['reason']}")
    tuning = report.tuning
    if tuning:
        lines.append(f"tuned:   {len(tuning['tuned_kernels'])} kernel(s) from {tuning['database']}, "
                     f"{len(tuning['default_kernels'])} with the default schedule")
    quant = report.quantization
    if quant:
        calibration = f", {report.calibration_seconds:.1f} s" if report.calibration_seconds is not None else ""
        lines.append(f"int8:    {quant.int8_ops} ({quant.calib_mode} calibration{calibration}); "
                     f"fp32: {quant.fp32_ops or 'nothing'}")
        if quant.output_error is not None:
            err = quant.output_error
            lines.append(f"output vs fp32 on a calibration batch: SQNR {err['sqnr_db']:.1f} dB, cosine {err['cosine']:.5f}")
        lines.append("layers (worst first): name, dtype, threshold, SQNR of its quantized input")
        for row in quant.layers:
            if row["threshold"] is None:
                lines.append(f"  {row['name']:30} {row['dtype']:6} range computed at run time")
                continue
            lo, hi = row["threshold"]
            lines.append(f"  {row['name']:30} {row['dtype']:6} [{lo:.4g}, {hi:.4g}]  {row['sqnr_db']:.1f} dB")
        for name, why in quant.fp32_layers.items():
            lines.append(f"  {name:30} fp32   ({why})")
    return "\n".join(lines)


def _read_inputs(specs: list[TensorSpec], pairs) -> dict:
    inputs = {}
    for pair in pairs:
        name, sep, file = pair.rpartition("=")
        if not sep:
            if len(specs) != 1:
                raise InputError(f"--input {pair!r}: the model has {len(specs)} inputs; name it as NAME=FILE.npy "
                                 f"(inputs: {', '.join(s.name for s in specs)})")
            name, file = specs[0].name, pair
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"--input {pair!r}: cannot read {file} as a .npy array ({err})") from err
    return inputs


def cmd_run(args) -> int:
    from compiler import load

    model = load(args.artifact)
    outputs = model.run(**_read_inputs(model.inputs, args.input))
    names = [spec.name for spec in model.outputs]
    if args.output:
        from compiler.atomic import atomic_path

        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **dict(zip(names, outputs)))
        print(f"wrote {len(outputs)} output(s) to {args.output}")
    for name, value in zip(names, outputs):
        flat = value.ravel()
        preview = np.array2string(flat[:8], precision=4, separator=", ")
        print(f"{name}: shape {list(value.shape)} {value.dtype} {preview}{' ...' if flat.size > 8 else ''}")
    return 0


def cmd_profile(args) -> int:
    from compiler.profile import format_profile, profile
    from compiler.runtime import load

    model = load(args.artifact, args.threads)  # a missing or foreign file: ArtifactError naming it, before any input
    result = profile(args.artifact, _read_inputs(model.inputs, args.input), repeat=args.repeat, model=model)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_profile(result, args.top or None))
    return 0


def format_metadata(meta: ArtifactMetadata) -> str:
    target, model = meta.target, meta.model
    lines = [
        f"quantvm artifact (format {meta.format_version}), quantvm {meta.quantvm_version}, TVM {meta.tvm_version}",
        f"target:   {target.name} (mcpu {target.mcpu})",
        f"features: {' '.join(target.required_features)}",
        f"model:    {model.source} (opset {model.opset}, sha256 {model.sha256[:16]})",
        f"precision: {meta.precision}",
    ]
    for kind, specs in (("input", meta.inputs), ("output", meta.outputs)):
        for spec in specs:
            bound = spec.index_bound
            indices = f", indices in [{-bound.extent}, {bound.extent - 1}] ({bound.node})" if bound else ""
            lines.append(f"{kind + ':':9} {spec.name} {list(spec.shape)} {spec.dtype}{indices}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from compiler.artifact import read_metadata

    meta = read_metadata(args.artifact)  # refuses, with ArtifactError, a file that fails its digest
    verdict = f"integrity: sha256 {meta.artifact_sha256} verified"
    if args.json:
        print(json.dumps(meta.to_json(), indent=2, sort_keys=True))
    else:
        print(verdict if args.verify else f"{format_metadata(meta)}\n{verdict}")
    return 0


def cmd_bundle(args) -> int:
    from compiler.bundle import bundle, format_bundle

    print(format_bundle(bundle(args.artifact, args.output, force=args.force)))
    return 0


def cmd_capi_flags(args) -> int:
    from compiler.capi.flags import flags

    print(flags(args))
    return 0


def cmd_demo(args) -> int:
    from compiler.demo import run_demo

    started = time.perf_counter()
    ok = run_demo(Path(args.keep) if args.keep else None)
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def cmd_tune(args) -> int:
    from compiler.tuner import tune

    fuse = False if args.no_fuse else args.fuse_rules.split(",") if args.fuse_rules else True
    int8 = _int8_options(args)
    calib = int8.pop("calib", None)

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    summary = tune(args.model, target=args.target, trials=args.trials, work_dir=args.db, rpc=args.rpc, calib=calib,
                   num_threads=args.threads, progress=progress, input_shapes=dict(args.input_shape) or None,
                   fuse=fuse, winograd=not args.no_winograd, **int8)
    print(format_tuning(summary.to_json()))
    if args.json:
        from compiler.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return 0


def format_tuning(summary: dict) -> str:
    """Per tuned kernel: calls per run, trials so far, the times of its default and applied schedules (timed
    side by side); then the whole model's kernel time, default against applied (each time x its calls)."""
    lines = [f"{summary['database']}: tuned for {summary['target']}; this run measured {summary['measured']} "
             f"candidate(s) of a budget of {summary['trials']} (a search stops early where it runs out of new "
             f"tilings), {summary['seconds']:.0f} s",
             f"{'kernel':72}{'calls':>6}{'trials':>7}{'default ms':>12}{'applied ms':>12}"]
    default_total = best_total = 0.0
    for task in summary["tasks"]:
        default, best = task["default_ms"], task["best_ms"]
        lines.append(f"{_shorten(task['name'], 71):72}{task['calls']:6}{task['trials']:7}"
                     f"{_ms_text(default):>12}{_ms_text(best):>12}")
        if default is not None and best is not None:
            default_total += default * task["calls"]
            best_total += best * task["calls"]
    if best_total:
        lines.append(f"kernel time of the tuned kernels: default {default_total:.4g} ms, applied {best_total:.4g} ms "
                     f"({default_total / best_total:.3g}x)")
    reasons: dict = {}
    for why in summary["skipped"].values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, count in reasons.items():
        lines.append(f"not tuned: {count} kernel(s), {why}")
    return "\n".join(lines)


def _shorten(name: str, width: int) -> str:
    """Kernel names differ at their ends (..._quantize7): keep both ends."""
    return name if len(name) <= width else f"{name[:width // 2 - 2]}...{name[-(width - width // 2 - 1):]}"


def _ms_text(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def cmd_bench(args) -> int:
    from compiler.bench import bench, format_table

    if args.int8 and not args.calib:
        raise InputError("--int8 needs --calib DATA.npz (calibration data for both quantvm and onnxruntime)")
    calib = _read_npz(args.calib) if args.int8 else None
    if args.concurrency is not None:
        result = _bench_concurrency(args, calib)
    else:
        result = bench(args.model, target=args.target, input_shapes=dict(args.input_shape) or None,
                       batches=args.batch or (None,), rounds=args.rounds, compare=args.compare,
                       compare_unfused=args.no_fuse, calib=calib, quantization=from_cli(args),
                       threads=args.threads, command=args.command_line, tuning_db=args.tuning_db,
                       runner=args.runner)
        print(format_table(result))
    if args.json:
        from compiler.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _bench_concurrency(args, calib) -> dict:
    from compiler.bench import bench_concurrency, format_concurrency

    if args.concurrency < 2:
        raise InputError(f"--concurrency needs at least 2 threads to compare with 1, got {args.concurrency}")
    unused = [flag for flag, given in (("--threads", args.threads), ("--no-fuse", args.no_fuse),
                                       ("--tuning-db", args.tuning_db), ("--runner", args.runner)) if given]
    if unused:
        raise InputError(f"--concurrency runs every call on 1 TVM thread, fused and untuned: drop {', '.join(unused)}")
    result = bench_concurrency(args.model, args.concurrency, target=args.target,
                               input_shapes=dict(args.input_shape) or None, batches=args.batch or (None,),
                               rounds=args.rounds, calib=calib, quantization=from_cli(args),
                               command=args.command_line)
    print(format_concurrency(result))
    return result


def cmd_analyze(args) -> int:
    from compiler.analysis_html import render_html
    from compiler.atomic import atomic_path
    from compiler.sensitivity import analyze

    if not args.calib:
        raise InputError("analyze needs --calib DATA.npz (the data the layers are calibrated and measured on)")
    report = analyze(args.model, input_shapes=dict(args.input_shape) or None, num_threads=args.threads,
                     **_int8_options(args))
    text = json.dumps(report.to_json(), indent=2) + "\n"
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(text)
    else:
        print(text, end="")
    if args.html:
        with atomic_path(args.html) as tmp:
            tmp.write_text(render_html(report), encoding="utf-8")
    return 0


COMMANDS = {"analyze": cmd_analyze, "bench": cmd_bench, "bundle": cmd_bundle, "capi-flags": cmd_capi_flags,
            "compile": cmd_compile, "demo": cmd_demo, "inspect": cmd_inspect, "profile": cmd_profile, "run": cmd_run,
            "tune": cmd_tune}

if __name__ == "__main__":
    sys.exit(main())
