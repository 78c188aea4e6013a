"""`quantvm profile`: where a compiled model's time goes, per fused group of ONNX nodes.

TVM 0.27's Relax VM has no profiler of its own; its instrument hook (`VirtualMachine.set_instrument`) is
called before and after every call the VM makes, kernels and runtime builtins alike. Each call is timed
between the two (wall clock: a kernel's parallel threads count once). The instrument's own cost falls
mostly outside that window, and the runs are also timed without it, so the profile states its total
against the model's measured latency.

A call's group is the set of ONNX nodes its kernel came from (the artifact metadata's `kernels` table,
compiler.kernel_origins); calls from the same nodes (an op lowered to two kernels) add up in one group.
A kernel no node reached (a layout transform, an int8 quantize) is a group of its own, as are the VM's
builtins (memory allocation, shape checks), which are part of the model's time too. Per call, the time is
the median over the runs; groups are sorted by time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from compiler.errors import InputError

RUNTIME_PREFIXES = ("vm.builtin.", "vm.", "runtime.")


@dataclass
class ProfileGroup:
    """One fused group: its kernels, the ONNX nodes they came from, and its time per run."""

    kernels: list[str]
    nodes: list[str]  # ONNX node names, [] where unknown
    ops: list[str]  # their op types
    calls: int  # kernel calls per run
    time_ms: float  # per run: the sum over its calls of each call's median
    share: float = 0.0  # of the profile's total
    kind: str = "kernel"  # kernel | runtime (the VM's builtins)

    @property
    def label(self) -> str:
        if self.nodes:
            return ", ".join(self.nodes)
        return "(VM runtime)" if self.kind == "runtime" else "(no ONNX node known)"

    def to_json(self) -> dict:
        return {"kernels": list(self.kernels), "nodes": list(self.nodes), "ops": list(self.ops), "calls": self.calls,
                "time_ms": self.time_ms, "share": self.share, "kind": self.kind}


@dataclass
class Profile:
    artifact: str
    num_threads: int
    repeat: int
    groups: list[ProfileGroup]
    total_ms: float  # the profile's total: every call's median, summed
    latency_ms: float  # the model's median latency, timed without the instrument
    has_origins: bool  # the artifact records its kernels' ONNX nodes
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """The profile's total over the measured latency."""
        return self.total_ms / self.latency_ms if self.latency_ms else float("nan")

    @property
    def named_share(self) -> float:
        """The share of the total spent in groups that name their ONNX nodes."""
        return sum(g.share for g in self.groups if g.nodes)

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "num_threads": self.num_threads, "repeat": self.repeat,
                "total_ms": self.total_ms, "latency_ms": self.latency_ms, "ratio": self.ratio,
                "named_share": self.named_share, "has_origins": self.has_origins,
                "groups": [g.to_json() for g in self.groups], **self.extra}


def profile(path, inputs: dict | None = None, num_threads: int | None = None, repeat: int = 10,
            warmup: int = 2, block_seconds: float = 0.2, model=None) -> Profile:
    """Profile the artifact at `path`: `repeat` instrumented runs (after `warmup`), each call timed; between
    them, blocks of runs (of about `block_seconds`, after one untimed run) timed whole without the instrument through `load().run`,
    for the latency (the median over the blocks of a block's time per run). `inputs` by name; the missing
    ones random, as `quantvm bench` makes them. `model`: the artifact already loaded (`load(path)`), so that
    its file is read and checked once."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from compiler.bench import random_feeds
    from compiler.runtime import load, use_threads

    if repeat < 1:
        raise InputError(f"repeat must be >= 1, got {repeat}")
    model = model or load(path, num_threads)  # checks the digest and the host first
    feeds = {**random_feeds([s for s in model.inputs if s.name not in (inputs or {})]), **(inputs or {})}
    arrays = model.bind_inputs(**feeds)  # checked by name, shape and dtype, as run() checks them
    use_threads(model.num_threads)
    vm = VirtualMachine(model.module, tvm.cpu())
    main = vm["main"]
    args = [tvm.runtime.tensor(a) for a in arrays]
    started = time.perf_counter()
    for _ in range(warmup):
        model.run(*arrays)
        main(*args)
    per_run = (time.perf_counter() - started) / max(warmup, 1) / 2
    block = max(1, min(100, round(block_seconds / max(per_run, 1e-6))))
    timer, latencies = _CallTimer(), []
    for _ in range(repeat):  # interleaved, so that both see the same machine load
        model.run(*arrays)  # untimed: the first run after the instrumented one (another VM) refills the caches
        started = time.perf_counter()
        for _ in range(block):
            model.run(*arrays)
        latencies.append((time.perf_counter() - started) / block)
        vm.set_instrument(timer)
        timer.start_run()
        main(*args)
        vm.set_instrument(None)
    table = model.metadata.kernels or {}
    groups, total = _groups(timer.runs, table)
    return Profile(str(path), model.num_threads, repeat, groups, total, statistics.median(latencies) * 1e3,
                   bool(table), {"runs_per_block": block})


class _CallTimer:
    """The VM instrument: each run's calls in order, (function name, seconds)."""

    def __init__(self):
        self.runs: list[list[tuple[str, float]]] = []
        self._started: list[float] = []

    def start_run(self):
        self.runs.append([])
        self._started.clear()

    def __call__(self, func, name, before, ret, *args):
        if before:
            self._started.append(time.perf_counter())
        else:
            ended = time.perf_counter()
            if self._started:
                self.runs[-1].append((str(name), ended - self._started.pop()))
        return 0  # VMInstrumentReturnKind.NO_OP


def _is_runtime(name: str) -> bool:
    return name.startswith(RUNTIME_PREFIXES)


def _groups(runs: list[list[tuple[str, float]]], table: dict) -> tuple[list[ProfileGroup], float]:
    """Per call position, the median over the runs; calls grouped by their ONNX nodes."""
    first = runs[0]
    same = [r for r in runs if [n for n, _ in r] == [n for n, _ in first]]  # the VM runs the same calls each time
    medians = [(name, statistics.median(r[i][1] for r in same) * 1e3) for i, (name, _) in enumerate(first)]
    nth: dict = {}
    groups: dict = {}
    for name, ms in medians:
        index = nth[name] = nth.get(name, -1) + 1
        if _is_runtime(name):
            key, nodes, ops, kind = ("runtime", name), [], [], "runtime"
        else:
            nodes, ops = _origin(table.get(name), index)
            key, kind = (("nodes", tuple(nodes)) if nodes else ("kernel", name)), "kernel"
        group = groups.get(key)
        if group is None:
            group = groups[key] = ProfileGroup([], nodes, ops, 0, 0.0, kind=kind)
        if name not in group.kernels:
            group.kernels.append(name)
        group.calls += 1
        group.time_ms += ms
    total = sum(g.time_ms for g in groups.values())
    for group in groups.values():
        group.share = group.time_ms / total if total else 0.0
    return sorted(groups.values(), key=lambda g: -g.time_ms), total


def _origin(entry: dict | None, index: int) -> tuple[list, list]:
    """The nodes and op types of the `index`-th call of a kernel, from its `kernels` table entry."""
    if not entry:
        return [], []
    calls = entry.get("calls")
    if calls and index < len(calls):
        entry = calls[index]
    return list(entry.get("nodes", [])), list(entry.get("ops", []))


def format_profile(result: Profile, top: int | None = None) -> str:
    """The table `quantvm profile` prints."""
    lines = [f"{result.artifact}: {result.repeat} run(s) on {result.num_threads} thread(s); per call the median",
             f"{'time ms':>9} {'share':>6} {'cum':>6} {'calls':>5}  group (ONNX nodes)  <- kernels"]
    cumulative = 0.0
    shown = result.groups if top is None else result.groups[:top]
    for group in shown:
        cumulative += group.share
        ops = f" [{', '.join(dict.fromkeys(group.ops))}]" if group.ops else ""
        lines.append(f"{group.time_ms:9.3f} {group.share:6.1%} {cumulative:6.1%} {group.calls:5}  "
                     f"{_shorten(group.label, 60)}{ops}  <- {_shorten(', '.join(group.kernels), 60)}")
    if len(shown) < len(result.groups):
        rest = result.groups[len(shown):]
        lines.append(f"{sum(g.time_ms for g in rest):9.3f} {sum(g.share for g in rest):6.1%} {'':6} "
                     f"{sum(g.calls for g in rest):5}  ({len(rest)} more group(s); --top 0 shows all)")
    lines.append(f"total {result.total_ms:.3f} ms in kernels and VM calls; measured latency {result.latency_ms:.3f} ms "
                 f"(median, uninstrumented): {result.ratio:.0%} of it")
    if result.has_origins:
        lines.append(f"{result.named_share:.0%} of the time is in groups with known ONNX nodes")
    else:
        lines.append("this artifact records no kernel origins (compiled by an older quantvm): kernels only")
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else f"{text[:width // 2 - 2]}...{text[-(width - width // 2 - 1):]}"
