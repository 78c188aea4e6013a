"""Where tuning measures: this host, or the servers behind a TVM RPC tracker (a Xeon fleet).

Kernels are always built here (cross-compiled for the target); only running them happens on the servers.
Every way to reach a tracker is checked up front, in bounded time, with errors that name the address
and the key: MetaSchedule's own runner would otherwise wait a minute per attempt, or fail each trial.
"""

from __future__ import annotations

import functools
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import TuningError
from compiler.runtime import host_cores, use_threads

CONNECT_TIMEOUT = 10.0  # seconds to reach the tracker and hear back from it
BUILD_TIMEOUT = 300.0  # a builder worker's first build imports TVM: the default 30 s is too short
RUN_TIMEOUT = 120.0  # one candidate's measurement, upload included
REPEATS = 20


def evaluator_config():
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    # REPEATS single runs per candidate, of which fastest_run keeps the fastest; before each, every argument
    # but the first (the activations, which the kernel before leaves in cache) is flushed from the CPU's
    # caches, as a model's weights are when it runs (timed hot, a kernel runs faster than in the model)
    return EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=0, enable_cpu_cache_flush=True)


def fastest_run(runner):
    """`runner` reporting only the fastest of each candidate's timings. A shared host only ever slows a run
    down, so the minimum is the kernel's own speed; the mean MetaSchedule ranks by would let one disturbed
    timing sink a good kernel, or the default schedule measured once, and pick noise."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    def fastest(future):
        result = future.result()
        if result.error_msg or not result.run_secs:
            return result
        return RunnerResult([min(float(s) for s in result.run_secs)], None)

    @derived_object
    class FastestRun(PyRunner):
        def run(self, runner_inputs):
            return [RunnerFuture(future.done, functools.partial(fastest, future))
                    for future in runner.run(runner_inputs)]

    return FastestRun()


@dataclass(frozen=True)
class RPCAddress:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> "RPCAddress":
        host, _, rest = str(text).partition(":")
        port, _, key = rest.partition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or not key:
            raise TuningError(f"rpc {text!r}: expected TRACKER_HOST:PORT:KEY, e.g. 10.0.0.5:9190:cascadelake")
        return cls(host, int(port), key)

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Measurement:
    """A MetaSchedule builder and runner, and a way to time a few kernels with them outside a search."""
    builder: object
    runner: object
    where: str
    workers: object = None  # the runner whose pool of worker processes close() ends

    def close(self) -> None:
        """End the runner's worker processes (a LocalRunner keeps one waiting for the next batch)."""
        pool = getattr(self.workers, "pool", None)
        if pool is not None:
            pool.shutdown()

    def measure(self, mods: list, target, rounds: int = 1) -> list[tuple[list | None, str | None]]:
        """(run seconds, None) or (None, error) for each scheduled kernel module in `mods`; with `rounds`,
        the kernels take turns that many times (one time per round), so that they share the host's moods."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.builder import BuilderInput
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        builds = self.builder.build([BuilderInput(mod, target) for mod in mods])
        results: list = [None] * len(mods)
        inputs, positions = [], []
        for i, (mod, built) in enumerate(zip(mods, builds)):
            if built.error_msg:
                results[i] = (None, f"building it failed: {_gist(built.error_msg)}")
            else:
                inputs.append(RunnerInput(built.artifact_path, "cpu", ArgInfo.from_prim_func(mod["main"])))
                positions.append(i)
        times: dict[int, list] = {i: [] for i in positions}
        try:
            for i, future in zip(positions * rounds, self.runner.run(inputs * rounds)):
                ran = future.result()
                if ran.error_msg:
                    results[i] = (None, f"running it on {self.where} failed: {_gist(ran.error_msg)}")
                else:
                    times[i].extend(float(s) for s in ran.run_secs)
        finally:
            for built in builds:
                if built.artifact_path:
                    shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
        return [result or (times[i], None) for i, result in enumerate(results)]


def local_measurement(spec) -> Measurement:
    """Build and run on this host, which must be able to run the target's code."""
    from tvm.s_tir.meta_schedule.runner import LocalRunner

    from targets import missing_features

    missing = missing_features(spec.required_features)
    if missing:
        raise TuningError(f"target {spec.name!r} cannot be measured on this host: it lacks {' '.join(missing)}; "
                          "measure on servers that have them, through an RPC tracker (rpc='HOST:PORT:KEY')")
    # The runner's worker process would run kernels on TVM's default pool, half the logical CPUs: kernels
    # built for every core would be timed on one of two here, and tiles picked for the wrong machine.
    threads = functools.partial(use_threads, spec.num_cores or host_cores())
    runner = LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=evaluator_config(),
                         initializer=worker_initializer(threads))
    return Measurement(_builder(), fastest_run(runner), "this host", runner)


def rpc_measurement(address: RPCAddress, spec) -> Measurement:
    """Build here, run on the tracker's servers registered under `address.key`, as many at once as there
    are. The servers' thread count must be known (it is compiled into the kernels)."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    if spec.num_cores is None:
        raise TuningError(f"tuning for {spec.name!r} on remote servers needs their thread count: pass "
                          "num_threads (--threads N), or -num-cores=N in the target")
    servers = count_servers(address)
    config = RPCConfig(tracker_host=address.host, tracker_port=address.port, tracker_key=address.key,
                       session_priority=1, session_timeout_sec=int(RUN_TIMEOUT))
    runner = RPCRunner(config, evaluator_config(), max_workers=servers, initializer=worker_initializer())
    return Measurement(_builder(), fastest_run(runner),
                       f"the {address.key!r} servers of tracker {address.tracker}", runner)


def _builder():
    """MetaSchedule's builder: a fresh pool of worker processes per batch, each spared the stock intrinsics."""
    from tvm.s_tir.meta_schedule.builder import LocalBuilder

    from targets.tuning import stock_intrinsics_stub

    return LocalBuilder(timeout_sec=BUILD_TIMEOUT, initializer=worker_initializer(stock_intrinsics_stub()))


def worker_initializer(then=None):
    """The initializer of MetaSchedule's worker processes: they ignore SIGINT (Ctrl-C at a terminal reaches the
    whole process group, and each worker would print its own traceback); the process that started them ends
    them. Nested, the function is pickled by value into the workers; it returns None (see stock_intrinsics_stub)."""

    def initialize() -> None:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if then is not None:
            then()

    return initialize


def count_servers(address: RPCAddress) -> int:
    """How many servers the tracker has for the key; an error when the tracker cannot be reached or answers
    nothing within CONNECT_TIMEOUT, or has no server for the key (naming the keys it has)."""
    try:
        socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise TuningError(f"cannot reach the RPC tracker at {address.tracker}: {err.strerror or err} (start one with "
                          f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {address.port}`)") from None
    summary = _tracker_summary(address)
    keys = [item["key"].partition(":")[2] for item in summary.get("server_info", [])]
    count = keys.count(address.key)
    if count == 0:
        listed = ", ".join(sorted(set(keys))) or "none"
        raise TuningError(f"the RPC tracker at {address.tracker} has no server for key {address.key!r} (keys "
                          f"there: {listed}); start one on each server with `python -m tvm.exec.rpc_server "
                          f"--tracker={address.tracker} --key={address.key}`")
    return count


def _tracker_summary(address: RPCAddress) -> dict:
    """The tracker's summary, asked from a daemon thread: TVM's client retries and blocks on a peer that
    accepts the connection but never answers, and the wait must stay bounded."""
    from tvm import rpc

    answer: dict = {}

    def ask():
        try:
            answer["summary"] = rpc.connect_tracker(address.host, address.port).summary()
        except Exception as err:  # noqa: BLE001 - reported below with the address
            answer["error"] = err

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT)
    if "summary" in answer:
        return answer["summary"]
    why = _gist(str(answer["error"])) if "error" in answer else f"no answer within {CONNECT_TIMEOUT:.0f} s"
    raise TuningError(f"{address.tracker} does not answer as an RPC tracker ({why})")


def _gist(text) -> str:
    """The last non-empty line: for a traceback, the error itself."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
