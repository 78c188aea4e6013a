"""`quantvm bench`: time quantvm builds against each other and onnxruntime, interleaved, in one process.

Speed is only judged here, as ratios measured in one run on the same inputs and thread count: the machines
are noisy, so the contenders take turns round by round instead of running one after another.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.errors import QuantvmError
from compiler.int8_options import QuantizationOptions
from compiler.peers import (PEERS, Contender, onnxruntime_contender, onnxruntime_int8_contender,
                            openvino_contenders, peer_version)

# (contender, baseline) pairs whose speedup is reported: quantvm against onnxruntime at the same precision,
# int8 against fp32, fused against unfused, tuned against untuned.
RATIOS = (("quantvm fp32", "onnxruntime fp32"), ("quantvm int8", "onnxruntime int8"),
          ("quantvm int8", "quantvm fp32"), ("quantvm fp32", "quantvm fp32 --no-fuse"),
          ("quantvm fp32 tuned", "quantvm fp32"), ("quantvm int8 tuned", "quantvm int8"),
          ("quantvm fp32 tuned", "onnxruntime fp32"), ("quantvm int8 tuned", "onnxruntime int8"),
          ("quantvm fp32", "openvino fp32"), ("quantvm int8", "openvino int8"),
          ("quantvm-run fp32", "quantvm fp32"), ("quantvm-run int8", "quantvm int8"))
COMPARE = ("onnxruntime", "openvino", "none")


@dataclass(frozen=True)
class Settings:
    """What every batch size of one bench run shares."""

    target: str = "native"
    rounds: int = 10
    compare: str = "onnxruntime"  # "openvino": onnxruntime and OpenVINO; "none": quantvm alone
    compare_unfused: bool = False
    calib: dict | None = None  # calibration arrays by input name: enables the int8 contenders
    quantization: QuantizationOptions | None = None  # the int8 contenders' options (None: the defaults)
    threads: int = 1
    tuning_db: str | None = None  # also time the builds this database was tuned for, with its kernels
    runner: bool = False  # also time the C++ runner (quantvm-run, as `quantvm bundle` builds it) on the builds


# Both runtimes keep their worker threads spinning for a while after a call; a contender timed straight after
# another one shares the cores with those spinning threads (up to 3x slower for ResNet-50, 20-40x for a
# sub-millisecond model). Each contender first runs untimed for SETTLE_SECONDS, then timed for BLOCK_SECONDS.
SETTLE_SECONDS = 0.05
BLOCK_SECONDS = 0.05


def interleave(contenders: list[Contender], feeds: dict, rounds: int, warmup: int = 1) -> None:
    """Round by round, each contender runs a block: untimed calls for at least SETTLE_SECONDS (at least
    one), so that the previous contender's threads have stopped spinning, then timed calls for at least
    BLOCK_SECONDS (at least one), each call's time recorded. Each round starts one contender later, so that
    none always runs straight after the same one."""
    for _ in range(warmup):
        for c in contenders:
            c.run(feeds)
    for turn in range(rounds):
        first = turn % len(contenders)
        for c in contenders[first:] + contenders[:first]:
            if c.block is not None:
                c.seconds.extend(c.block(feeds, SETTLE_SECONDS, BLOCK_SECONDS))
                continue
            _calls_for(c, feeds, SETTLE_SECONDS)
            c.seconds.extend(_calls_for(c, feeds, BLOCK_SECONDS))


def _calls_for(contender: Contender, feeds: dict, seconds: float) -> list[float]:
    """Run `contender` until `seconds` have passed (at least once); the time of each call."""
    times: list[float] = []
    total = 0.0
    while not times or total < seconds:  # a running total: no pause between calls of a fast model
        start = time.perf_counter()
        contender.run(feeds)
        times.append(time.perf_counter() - start)
        total += times[-1]
    return times


def batch_input_shapes(proto, input_shapes: dict | None, batch: int | None) -> dict | None:
    """`input_shapes` with dim 0 of every input set to `batch` (None: unchanged). An input not in
    `input_shapes` takes the model's declared shape; one whose other dims are dynamic is left for the
    importer to name, and a scalar input has no batch dimension to set."""
    from compiler.frontend import graph_inputs

    if batch is None:
        return input_shapes
    shapes = dict(input_shapes or {})
    for value in graph_inputs(proto):
        dims = shapes.get(value.name)
        if dims is None:
            declared = value.type.tensor_type.shape.dim
            dims = [d.dim_value if d.HasField("dim_value") else None for d in declared]
            if None in dims[1:]:
                continue
        if len(dims):
            shapes[value.name] = (batch, *dims[1:])
    return shapes


def random_feeds(specs) -> dict:
    """The same random inputs for every contender (seeded: the same across runs too). Integer and boolean
    inputs (token ids, token types, attention masks) are all ones: a valid index and an unmasked position
    in any model, where random values could index out of bounds."""
    rng = np.random.default_rng(0)
    return {s.name: (rng.standard_normal(s.shape) if np.issubdtype(np.dtype(s.dtype), np.floating)
                     else np.ones(s.shape)).astype(s.dtype) for s in specs}


def quantvm_contenders(model_path, shapes: dict | None, settings: Settings) -> tuple[object, list[Contender]]:
    """quantvm's fp32 build (returned too: its inputs are the bench's), int8 and unfused builds on request."""
    from compiler.build import compile

    def build(**options):
        return compile(model_path, target=settings.target, input_shapes=shapes, num_threads=settings.threads,
                       **options)

    int8_options = {"calib": [settings.calib], "quantization": settings.quantization}
    fused = build()
    contenders = [Contender("quantvm fp32", lambda f: fused.run(**f), model=fused)]
    if settings.calib is not None:
        int8 = build(**int8_options)
        contenders.insert(0, Contender("quantvm int8", lambda f: int8.run(**f), model=int8))
    if settings.compare_unfused:
        unfused = build(fuse=False)
        contenders.append(Contender("quantvm fp32 --no-fuse", lambda f: unfused.run(**f)))
    if settings.tuning_db is not None:
        contenders = tuned_contenders(build, int8_options if settings.calib is not None else None,
                                      settings.tuning_db) + contenders
    return fused, contenders


def tuned_contenders(build, int8_options: dict | None, tuning_db) -> list[Contender]:
    """The builds (fp32, int8) with `tuning_db`'s kernels, for each precision it was tuned for at these
    shapes; an error when it holds neither."""
    from compiler.errors import TuningError

    contenders, refusals = [], []
    for precision, options in (("int8", int8_options), ("fp32", {})):
        if options is None:
            continue
        try:
            tuned = build(tuning_db=tuning_db, **options)
        except TuningError as err:
            refusals.append(str(err))
            continue
        contenders.append(Contender(f"quantvm {precision} tuned", lambda f, model=tuned: model.run(**f)))
    if not contenders:
        raise TuningError(refusals[0])
    return contenders


def runner_contenders(contenders: list[Contender], work: Path, threads: int) -> list[Contender]:
    """The C++ runner on each build of `contenders` ("quantvm fp32", "quantvm int8"): `quantvm bundle` of its
    artifact into `work`, timed by the runner itself (`quantvm-run --repeat`), one process per block."""
    from compiler.bundle import bundle

    runners = []
    for c in contenders:
        if c.model is None or c.name not in ("quantvm fp32", "quantvm int8"):
            continue
        precision = c.name.split()[-1]
        artifact = c.model.export(work / f"model_{precision}.so")
        folder = work / f"bundle_{precision}"
        bundle(artifact, folder)
        runners.append(_runner_contender(f"quantvm-run {precision}", folder / "quantvm-run", folder / artifact.name,
                                         work / f"inputs_{precision}", threads))
    return runners


def _runner_contender(name: str, runner: Path, artifact: Path, input_dir: Path, threads: int) -> Contender:
    estimate = [None]  # seconds per call, from the previous block

    def block(feeds, settle_seconds, block_seconds):
        if not input_dir.exists():
            input_dir.mkdir()
            for i, (key, value) in enumerate(feeds.items()):
                np.save(input_dir / f"{i}.npy", np.ascontiguousarray(value))
        per_call = estimate[0]
        warmup = 1 if per_call is None else max(1, math.ceil(settle_seconds / per_call))
        repeat = 1 if per_call is None else max(1, math.ceil(block_seconds / per_call))
        command = [str(runner), str(artifact), "--repeat", str(repeat), "--warmup", str(warmup),
                   "--threads", str(threads)]
        for i, key in enumerate(feeds):
            command += ["--input", f"{key}={input_dir / f'{i}.npy'}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise QuantvmError(f"{name}: {result.stderr.strip() or f'exit status {result.returncode}'}")
        times = [t / 1e3 for t in json.loads(result.stdout.strip().splitlines()[-1])["times_ms"]]
        estimate[0] = float(np.median(times))
        return times

    return Contender(name, lambda feeds: block(feeds, 0.0, 0.0), block=block)


def peer_contenders(model_path, proto, fused, settings: Settings) -> list[Contender]:
    """The peers (compiler.peers) on the same model; their int8 calibrated on the same batches as quantvm's."""
    from compiler.calib_data import model_batches

    if settings.compare == "none":
        return []
    batches = None
    if settings.calib is not None:
        limit = settings.quantization.num_calib_batches if settings.quantization is not None else None
        batches = list(model_batches([settings.calib], fused.inputs, limit))
    contenders = []
    if batches is not None:
        contenders.append(onnxruntime_int8_contender(model_path, proto, batches, settings.threads))
    contenders.append(onnxruntime_contender(proto.SerializeToString(), settings.threads))
    if settings.compare == "openvino":
        contenders += openvino_contenders(model_path, proto, batches, settings.threads)
    return [c for c in contenders if c is not None]


def speedups(rows: list[dict]) -> list[dict]:
    """How many times faster each RATIOS contender is than its baseline: baseline median / its median."""
    median = {row["name"]: row["median_ms"] for row in rows}
    return [{"contender": mine, "baseline": theirs, "speedup": median[theirs] / median[mine]}
            for mine, theirs in RATIOS if mine in median and theirs in median]


def bench_batch(model_path, proto, shapes: dict | None, settings: Settings) -> dict:
    """Compile and time every contender at one set of input shapes; one section of the results."""
    fused, contenders = quantvm_contenders(model_path, shapes, settings)
    with tempfile.TemporaryDirectory(prefix="quantvm-bench-") as work:
        if settings.runner:
            contenders += runner_contenders(contenders, Path(work), settings.threads)
        contenders += peer_contenders(model_path, proto, fused, settings)
        interleave(contenders, random_feeds(fused.inputs), settings.rounds)
    first = fused.inputs[0].shape
    batch = first[0] if first else 1
    rows = [c.summary(batch) for c in contenders]
    for row in rows:
        row["speedup_of_first_row"] = row["median_ms"] / rows[0]["median_ms"]
    return {"batch": batch, "inputs": [s.to_json() for s in fused.inputs], "target": fused.target,
            "mcpu": fused.metadata.target.mcpu, "rows": rows, "ratios": speedups(rows),
            "fusion": fused.report.fusion, "kernels": fused.report.kernels}


def bench(model_path, target: str = "native", input_shapes: dict | None = None, batches=(None,), rounds: int = 10,
          compare: str = "onnxruntime", compare_unfused: bool = False, calib: dict | None = None,
          quantization: QuantizationOptions | None = None, threads: int | None = None,
          command: str | None = None, tuning_db=None, runner: bool = False) -> dict:
    """Time quantvm's builds (fp32; int8 when `calib` is given; unfused on request) and onnxruntime's
    (unless `compare` is "none") on the same random inputs and thread count, interleaved, once per batch
    size in `batches` (None: the shapes as given). `threads`: None is $TVM_NUM_THREADS, else all cores.
    `tuning_db`: also time the builds with the kernels of this database (see `tune()`). `runner`: also time
    the C++ runner, quantvm-run, on quantvm's fp32 (and int8) build, in its own process (see `runner_contenders`)."""
    import tvm

    from compiler.build import quantvm_version
    from compiler.frontend import read_onnx
    from compiler.runtime import host_cores, resolve_num_threads, use_threads
    from targets import host_model_name

    if compare not in COMPARE:
        raise ValueError(f"compare must be one of {', '.join(COMPARE)}, got {compare!r}")
    if compare == "openvino" and peer_version("openvino") is None:
        raise ValueError("--compare openvino: openvino is not installed (pip install '.[peers]' in quantvm's "
                         "checkout, or openvino and nncf)")
    if compare != "none" and peer_version("onnxruntime") is None:
        import warnings

        warnings.warn("onnxruntime is not installed: timing quantvm alone (install quantvm's bench extra, "
                      "pip install '.[bench]' in its checkout, or onnxruntime and sympy)", stacklevel=2)
    threads = resolve_num_threads(threads)
    use_threads(threads)  # before onnxruntime starts its threads, which inherit this thread's CPU affinity
    settings = Settings(target, rounds, compare, compare_unfused, calib, quantization, threads, tuning_db, runner)
    proto, source, _ = read_onnx(model_path)
    sections = [bench_batch(model_path, proto, batch_input_shapes(proto, input_shapes, b), settings) for b in batches]
    return {"command": command, "model": source, "target": sections[0]["target"], "threads": threads,
            "rounds": rounds, "compare": compare, "host": host_model_name(), "cores": host_cores(),
            "versions": {"quantvm": quantvm_version(), "tvm": tvm.__version__,
                         **{peer: peer_version(peer) for peer in PEERS if compare in (peer, "openvino")},
                         "nncf": peer_version("nncf") if compare == "openvino" else None},
            "batches": sections}


def format_table(result: dict) -> str:
    """The command, the conditions, then per batch size a table of the contenders and the speedups."""
    versions = ", ".join(f"{name} {v}" for name, v in result["versions"].items() if v)
    lines = [result["command"]] if result.get("command") else []
    lines += [f"{result['model']}: {result['threads']} thread(s) for every contender, {result['rounds']} "
              "interleaved rounds, the same random inputs",
              f"host {result['host']} ({result['cores']} cores); {versions}",
              "speedup A vs B: how many times faster A runs than B (B's median latency / A's)"]
    for section in result["batches"]:
        lines += [""] + format_section(section)
    return "\n".join(lines)


def format_section(section: dict) -> list[str]:
    inputs = ", ".join(f"{spec['name']} {spec['shape']}" for spec in section["inputs"])
    lines = [f"batch {section['batch']} ({inputs}) on {section['target']} (mcpu {section['mcpu']}); "
             f"quantvm fp32 build: {section['kernels']} kernels",
             f"{'':24}{'items/s':>12}{'median ms':>12}{'p90 ms':>12}"]
    for row in section["rows"]:
        lines.append(f"{row['name']:24}{row['throughput']:12.1f}{row['median_ms']:12.3f}{row['p90_ms']:12.3f}")
    for ratio in section["ratios"]:
        # three significant digits: a far slower build reads 0.004x, not 0.00x
        lines.append(f"speedup {ratio['contender']} vs {ratio['baseline']}: {ratio['speedup']:.3g}x")
    return lines


def bench_concurrency(model_path, concurrency: int, target: str = "native", input_shapes: dict | None = None,
                      batches=(None,), rounds: int = 10, calib: dict | None = None,
                      quantization: QuantizationOptions | None = None, command: str | None = None) -> dict:
    """Time `concurrency` Python threads sharing one quantvm model (fp32; int8 when `calib` is given)
    against one thread, each run on 1 TVM thread: what a server sharing a model across request threads
    gets from more threads. Once per batch size in `batches`, in rounds of one block each (see
    `time_block`), alternating which block goes first."""
    import tvm

    from compiler.build import compile, quantvm_version
    from compiler.frontend import read_onnx
    from compiler.runtime import host_cores
    from targets import host_model_name

    if concurrency < 2:
        raise ValueError(f"concurrency must be at least 2 threads to compare with 1, got {concurrency}")
    proto, source, _ = read_onnx(model_path)
    int8 = {"calib": [calib], "quantization": quantization} if calib else {}
    sections = []
    for batch in batches:
        model = compile(model_path, target=target, input_shapes=batch_input_shapes(proto, input_shapes, batch),
                        num_threads=1, **int8)
        sections.append(concurrency_section(model, concurrency, rounds))
    return {"command": command, "model": source, "mode": "concurrency", "concurrency": concurrency,
            "precision": "int8" if calib else "fp32", "target": sections[0]["target"], "rounds": rounds,
            "host": host_model_name(), "cores": host_cores(),
            "versions": {"quantvm": quantvm_version(), "tvm": tvm.__version__}, "batches": sections}


def concurrency_section(model, concurrency: int, rounds: int, block_seconds: float = 0.2) -> dict:
    """Rounds of: one thread runs concurrency x `calls` times, and `concurrency` threads run `calls` times
    each, on the same model and inputs; `calls` makes the single thread's block last ~`block_seconds`."""
    feeds = random_feeds(model.inputs)

    def run():
        model.run(**feeds)

    run()
    start = time.perf_counter()
    run()
    calls = max(5, math.ceil(block_seconds / (concurrency * (time.perf_counter() - start))))
    first = model.inputs[0].shape
    batch = first[0] if first else 1
    seconds = {1: [], concurrency: []}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:  # threads kept: each makes its VM and pool once
        for turn in range(rounds):
            order = [1, concurrency] if turn % 2 == 0 else [concurrency, 1]
            for threads in order:
                seconds[threads].append(time_block(pool, run, threads, concurrency * calls // threads))
    runs = concurrency * calls  # per block, for both
    rows = [{"threads": threads, "runs_per_block": runs, "median_block_s": float(np.median(times)),
             "throughput": runs * batch / float(np.median(times))} for threads, times in seconds.items()]
    return {"batch": batch, "inputs": [s.to_json() for s in model.inputs], "target": model.target,
            "mcpu": model.metadata.target.mcpu, "rows": rows,
            "speedup": rows[1]["throughput"] / rows[0]["throughput"]}


def time_block(pool: ThreadPoolExecutor, run, threads: int, calls: int) -> float:
    """Seconds for `threads` threads of `pool` to call `run` `calls` times each, all starting together
    after one untimed call each (which also gives a new thread its VM and TVM pool)."""
    ready = threading.Barrier(threads + 1)

    def work():
        try:
            run()
        except BaseException:
            ready.abort()  # release the others and the timer: the error is raised below
            raise
        ready.wait()
        for _ in range(calls):
            run()

    futures = [pool.submit(work) for _ in range(threads)]
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        errors = [f.exception() for f in futures]
        raise next(e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError))
    start = time.perf_counter()
    for future in futures:
        future.result()
    return time.perf_counter() - start


def format_concurrency(result: dict) -> str:
    """The command, the conditions, then per batch size both throughputs and their ratio."""
    n = result["concurrency"]
    versions = ", ".join(f"{name} {v}" for name, v in result["versions"].items() if v)
    lines = [result["command"]] if result.get("command") else []
    lines += [f"{result['model']}: quantvm {result['precision']}, {n} Python threads sharing one model against "
              f"1 thread, 1 TVM thread per run, {result['rounds']} rounds of one block each, alternating which "
              "goes first",
              f"host {result['host']} ({result['cores']} cores); {versions}"]
    for section in result["batches"]:
        inputs = ", ".join(f"{spec['name']} {spec['shape']}" for spec in section["inputs"])
        lines += ["", f"batch {section['batch']} ({inputs}) on {section['target']} (mcpu {section['mcpu']}); "
                      f"{section['rows'][0]['runs_per_block']} runs per block",
                  f"{'':24}{'items/s':>12}{'median block s':>16}"]
        for row in section["rows"]:
            label = f"{row['threads']} thread(s)"
            lines.append(f"{label:24}{row['throughput']:12.1f}{row['median_block_s']:16.3f}")
        lines.append(f"speedup {n} threads vs 1 thread: {section['speedup']:.3g}x")
    return "\n".join(lines)
