"""`tune()`: MetaSchedule over the kernels of a model exactly as `compile()` builds them (fused, in blocked
layouts, quantized), measured on this host or on servers behind TVM's RPC tracker. The result is a
database directory that `compile(..., tuning_db=DIR)` applies.

Each kernel's default schedule is measured first and the search starts from it. At the end, the default
and the search's best few are timed again side by side, and only what beats the default there is applied:
on a shared host, times from different minutes do not compare. A second `tune()` on the same directory
continues: the search's records are kept, and it starts from the best of them.

A run killed at any moment leaves a valid database that the next run resumes (tuning_db writes only by
rename). Ctrl-C while it measures stops it within about a second, with its workers, and raises
KeyboardInterrupt; the database keeps every batch measured before (_ctrl_c_stops says how).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import TuningError
from compiler.remote import Measurement, RPCAddress, local_measurement, rpc_measurement
from compiler.tuning_db import (add_model, create_database, model_entry, search_records,
                                tuning_manifest, tuning_run, write_selection)

DEFAULT_TRIALS = 1000
TRIALS_PER_ITERATION = 32
RECORDS_READ = 256  # a kernel's best records looked through for its finalists
FINALISTS = 3  # a kernel's fastest distinct schedules in the search, timed again beside its default
ROUNDS = 3
MARGIN = 0.02  # how much faster than the default a finalist must time to replace it: less is within noise
INTERRUPTED = "quantvm: interrupted"


@dataclass
class TaskState:
    """One kernel being tuned: its best time so far, against its default schedule's."""
    name: str
    weight: int
    default_seconds: float | None = None
    best_seconds: float | None = None
    trials: int = 0
    default_tiles: list = field(default_factory=list)
    best_is_default: bool = True  # no candidate measured faster than the default schedule

    def to_json(self) -> dict:
        return {"name": self.name, "calls": self.weight, "trials": self.trials,
                "default_ms": _ms(self.default_seconds), "best_ms": _ms(self.best_seconds),
                "best_is_default": self.best_is_default}


@dataclass
class TuningSummary:
    database: str
    target: str
    trials: int
    seconds: float
    tasks: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # kernel -> why it was not tuned

    def to_json(self) -> dict:
        return {"database": self.database, "target": self.target, "trials": self.trials,
                "measured": sum(t.trials for t in self.tasks), "seconds": self.seconds,
                "tasks": [t.to_json() for t in self.tasks], "skipped": self.skipped}


def tune(model, target="cascadelake", trials: int = DEFAULT_TRIALS, work_dir="quantvm_tuning", rpc: str | None = None,
         calib=None, num_threads: int | None = None, progress=None, **compile_options) -> TuningSummary:
    """Tune the kernels of `model` built for `target` with MetaSchedule; write the records to `work_dir`.

    `trials`: measurements in all (MetaSchedule's global budget), spread over the kernels by the gradient
    task scheduler, beyond one measurement of each kernel's default schedule. `rpc`: "host:port:key" of a
    TVM RPC tracker and the key its servers registered with; None measures on this host, which must then
    be able to run `target`. `calib` and `compile_options` (input_shapes, fuse, calib_mode, ...) are as
    for `compile()`: tuning an int8 build needs the calibration data it will be compiled with. `progress`:
    a callable given one line of text per measured batch (None: silent).
    """
    from compiler.build import target_with_threads
    from targets import resolve_target
    from targets.tuning import without_stock_intrinsics

    started = time.perf_counter()
    if not isinstance(trials, int) or trials < 0:
        raise TuningError(f"trials must be a whole number >= 0, got {trials!r}")
    spec = target_with_threads(resolve_target(target), num_threads)
    measurement = rpc_measurement(RPCAddress.parse(rpc), spec) if rpc else local_measurement(spec)
    folder = Path(work_dir)
    manifest = tuning_manifest(folder, spec)  # checked first: calibrating and lowering can take minutes
    prepared, tasks, skipped = _extract(model, spec, calib, num_threads, compile_options)
    if manifest is None:
        manifest = create_database(folder, spec)
    summary = TuningSummary(str(folder), spec.name, trials, 0.0,
                            [TaskState(t.task_name, t.weight) for t, _ in tasks], skipped)
    say = progress or (lambda line: None)
    with tuning_run(folder):
        try:
            if tasks:
                with without_stock_intrinsics():
                    _search(tasks, spec, folder, trials, measurement, summary, say)
        finally:
            measurement.close()  # no worker process outlives tune()
        add_model(folder, manifest, model_entry(prepared.imported, "int8" if prepared.quantization else "fp32"))
    summary.seconds = time.perf_counter() - started
    return summary


def _extract(model, spec, calib, num_threads, compile_options):
    """The model's kernels as compile() lowers them, as MetaSchedule tasks with their traced default
    schedules; kernels whose schedule has nothing to search (elementwise, layout edges, pooling) or that no
    rule schedules are left out, with the reason."""
    from tvm.s_tir import meta_schedule as ms

    from compiler.build import prepare_model
    from compiler.int8_options import QuantizationOptions
    from targets.tuning import default_schedule

    graph = {k: compile_options.pop(k, default) for k, default in
             (("input_shapes", None), ("constant_inputs", None), ("fuse", True), ("eval_data", None),
                              ("quantization", None), ("example_inputs", None), ("winograd", True))}
    # the rest are compile()'s INT8 keywords
    options = QuantizationOptions.from_keywords(graph["quantization"], **compile_options)
    prepared = prepare_model(model, graph["input_shapes"], graph["constant_inputs"], graph["fuse"], calib, options,
                             num_threads, graph["eval_data"], spec=spec, example_inputs=graph["example_inputs"],
                             winograd=graph["winograd"])
    # the kernels as compile() schedules them: MetaSchedule searches from there
    lowered = prepared.run(start="layout", stop="kernels").mod
    tvm_target = spec.tvm_target()
    tasks, skipped = [], {}
    for task in ms.relax_integration.extract_tasks(lowered, tvm_target):
        sch, reason = default_schedule(task.dispatched[0], spec)
        if sch is not None:
            tasks.append((task, sch))
        else:
            skipped[task.task_name] = reason
    return prepared, tasks, skipped


def _search(tasks_and_defaults, spec, folder: Path, trials: int, measurement: Measurement, summary: TuningSummary,
            say):
    states = summary.tasks
    with _ctrl_c_stops() as interrupted, search_records(folder) as (database, save):
        measured = _measure_defaults(tasks_and_defaults, spec, database, measurement, states, say)
        save()
        tasks = [task for task, _ in tasks_and_defaults]
        if trials > 0:
            _evolve(tasks, spec, trials, measurement, database, save, states, say, interrupted)
        if not interrupted.is_set():  # else _ctrl_c_stops raises KeyboardInterrupt on the way out
            retimed = [pair for pair, state in zip(tasks_and_defaults, states)
                       if state.trials or state.name in measured]
            _select(retimed, spec, folder, database, measurement, {s.name: s for s in states}, say)
    _read_selection(tasks_and_defaults, folder, states)


def _evolve(tasks, spec, trials: int, measurement: Measurement, database, save, states, say, interrupted):
    from tvm.s_tir import meta_schedule as ms

    from targets.tuning import design_space

    contexts = [ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=design_space(spec),
                               search_strategy=_stoppable(search_strategy(), interrupted), task_name=task.task_name,
                               num_threads=spec.num_cores or 1).clone() for task in tasks]
    # the default callbacks add each batch to `database`; then ours saves it into the folder
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [
        _progress_callback(states, trials, save, say, interrupted)]
    ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=None,
                  max_trials_global=trials, num_trials_per_iter=min(TRIALS_PER_ITERATION, trials),
                  builder=measurement.builder, runner=measurement.runner, database=database,
                  cost_model=ms.cost_model.XGBModel(num_tuning_cores=spec.num_cores or 1),
                  measure_callbacks=callbacks, task_scheduler="gradient")


@contextlib.contextmanager
def _ctrl_c_stops():
    """Ctrl-C while tune() measures stops it, then raises KeyboardInterrupt. Raised in a callback from
    MetaSchedule's C++ search loop, a KeyboardInterrupt does not come out cleanly (here: std::terminate, a
    segfault, or a bare RuntimeError), so SIGINT only sets the event yielded. From then on TVM's worker
    processes are killed as they appear (a pool whose worker died starts another for the batch's next
    candidate), so the batch at hand ends at once with errors; the search then proposes nothing more
    (_stoppable), tune_tasks returns normally, and the KeyboardInterrupt is raised here, in plain Python.
    A second Ctrl-C while stopping is ignored: the stop takes about a second, and ending the process
    instead would end the notebook or server that called tune()."""
    interrupted, finished = threading.Event(), threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield interrupted
        return

    def reap():
        while not finished.wait(0.05):
            if interrupted.is_set():
                _kill_workers()

    reaper = threading.Thread(target=reap, name="quantvm-reaper", daemon=True)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    reaper.start()
    try:
        yield interrupted
    except Exception:
        if not interrupted.is_set():
            raise
        # else a measurement failed because its workers were killed (a default schedule's, a finalist's)
    finally:
        finished.set()
        reaper.join()
        signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        _kill_workers()  # the runner's idle one too: none outlives tune()
        raise KeyboardInterrupt


def _kill_workers():
    """Kill TVM's worker processes among ours (its popen pools': MetaSchedule's builders and runners), with
    what they started; other children of the caller's are left alone."""
    import psutil

    killed = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "tvm.exec.popen_worker" in child.cmdline():
                for process in [*child.children(recursive=True), child]:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                        killed.append(process)
    psutil.wait_procs(killed, timeout=5)  # a kill is not instant: gone before tune() returns or raises


def _stoppable(strategy, interrupted):
    """`strategy`, proposing no more candidates once `interrupted` is set: MetaSchedule then ends each task
    as when its search space runs out. (Ending the tasks with task_scheduler.terminate_task from the measure
    callback fails a check in the C++ loop when the callback runs in the loop's final join: InternalError
    "Check failed: (!task->is_terminated)".)"""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Stoppable(ms.search_strategy.PySearchStrategy):
        def _initialize_with_tune_context(self, context):
            strategy._initialize_with_tune_context(context)

        def pre_tuning(self, *args):
            strategy.pre_tuning(*args)

        def post_tuning(self):
            strategy.post_tuning()

        def generate_measure_candidates(self):
            return None if interrupted.is_set() else strategy.generate_measure_candidates()

        def notify_runner_results(self, candidates, results):
            strategy.notify_runner_results(candidates, results)

        def clone(self):
            return _stoppable(strategy.clone(), interrupted)

    return Stoppable()


def search_strategy():
    """Evolution over the tile decisions. A kernel has tens of tilings, not MetaSchedule's usual millions of
    schedules: a population of 512 only replays the same few traces for minutes per round."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16, genetic_num_iters=2)


def _measure_defaults(tasks_and_defaults, spec, database, measurement: Measurement, states, say) -> set:
    """Measure the default schedule of every kernel the database has no record for, and store it; return
    their names."""
    from targets.tuning import tile_decisions

    todo = []
    for (task, sch), state in zip(tasks_and_defaults, states):
        mod = task.dispatched[0]
        state.default_tiles = tile_decisions(sch.trace)
        records = database.get_top_k(database.commit_workload(mod), RECORDS_READ) if database.has_workload(mod) else []
        if records:  # searched before: the default's time, for the progress lines, if among the records read
            state.default_seconds = next((_seconds(r.run_secs) for r in records
                                          if tile_decisions(r.trace) == state.default_tiles), None)
        else:
            todo.append((task, state, sch))
    if todo:
        say(f"measuring the default schedule of {len(todo)} kernel(s)")
    results = measurement.measure([sch.mod for _, _, sch in todo], spec.tvm_target()) if todo else []
    for (task, state, sch), (run_secs, error) in zip(todo, results):
        if error:
            raise TuningError(f"measuring kernel {task.task_name} failed: {error}")
        database.commit_tuning_record(_record(sch, database.commit_workload(task.dispatched[0]), run_secs, task))
        state.default_seconds = state.best_seconds = _seconds(run_secs)
    return {state.name for _, state, _ in todo}


def _select(tasks_and_defaults, spec, folder: Path, database, measurement: Measurement, states: dict, say):
    """Time each kernel's default schedule and its search's FINALISTS side by side, in ROUNDS turns, and make
    the fastest the kernel's applied record. The search's own times come from other minutes of a
    shared host (a default's from the start of the run), and its best is the luckiest of hundreds: ranked
    on them, a tuned build came out slower than the default one. A finalist replaces the default only when
    it is faster by MARGIN."""
    from tvm import s_tir

    from targets.tuning import tile_decisions

    if not tasks_and_defaults:
        return
    entries = []
    for task, default in tasks_and_defaults:
        mod = task.dispatched[0]
        schedules, seen = [default], [tile_decisions(default.trace)]
        for record in database.get_top_k(database.commit_workload(mod), RECORDS_READ):
            if len(schedules) > FINALISTS:
                break
            if tile_decisions(record.trace) not in seen:
                sch = s_tir.Schedule(mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
                schedules.append(sch)
                seen.append(tile_decisions(record.trace))
        entries.append((task, schedules))
    count = sum(len(schedules) for _, schedules in entries)
    say(f"timing {count} finalist schedule(s) of {len(entries)} kernel(s) side by side, {ROUNDS} rounds")
    results = iter(measurement.measure([sch.mod for _, schedules in entries for sch in schedules],
                                       spec.tvm_target(), rounds=ROUNDS))
    selection = {}
    for task, schedules in entries:
        outcomes = [next(results) for _ in schedules]
        if outcomes[0][1]:
            raise TuningError(f"timing the default schedule of kernel {task.task_name} failed: {outcomes[0][1]}")
        timed = [(min(run_secs), sch) for sch, (run_secs, _) in zip(schedules, outcomes) if run_secs]
        default = timed[0]
        best = min(timed, key=lambda pair: pair[0] if pair is default else pair[0] / (1 - MARGIN))
        states[task.task_name].default_seconds = default[0]
        # the chosen schedule, and the default beside a finalist that beat it: the database's fastest
        # record is what builds apply, so a finalist that timed faster by less than MARGIN is left out
        workload = database.commit_workload(task.dispatched[0])
        selection[task.dispatched[0]] = [_record(sch, workload, [seconds], task)
                                         for seconds, sch in dict.fromkeys([best, default])]
    write_selection(folder, selection)


def _read_selection(tasks_and_defaults, folder: Path, states):
    """Each kernel's applied schedule as the folder's selection has it: its time and its default's."""
    from tvm.s_tir import meta_schedule as ms

    from targets.tuning import tile_decisions

    selected = ms.database.JSONDatabase(work_dir=str(folder))
    for (task, _), state in zip(tasks_and_defaults, states):
        mod = task.dispatched[0]
        records = selected.get_top_k(selected.commit_workload(mod), RECORDS_READ) if selected.has_workload(mod) else []
        if not records:
            continue
        state.best_seconds = _seconds(records[0].run_secs)
        state.best_is_default = tile_decisions(records[0].trace) == state.default_tiles
        state.default_seconds = next((_seconds(r.run_secs) for r in records
                                      if tile_decisions(r.trace) == state.default_tiles), state.default_seconds)


def _record(sch, workload, run_secs, task):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.TuningRecord(sch.trace, workload, run_secs, task.target,
                                    ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]))


def _progress_callback(states, trials: int, save, say, interrupted):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            super().__init__()
            self.measured = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if interrupted.is_set():
                # not saved: MetaSchedule records the candidates whose workers were killed as failures
                return
            save()
            if not runner_results:
                return
            state = states[task_id]
            state.trials += len(runner_results)
            self.measured += len(runner_results)
            times = [_seconds(r.run_secs) for r in runner_results if r.run_secs and not r.error_msg]
            if times and (state.best_seconds is None or min(times) < state.best_seconds):
                state.best_seconds = min(times)
            done = sum(1 for s in states if s.trials)
            default = f" (default {_ms(state.default_seconds):.4g} ms)" if state.default_seconds else ""
            best = f"best {_ms(state.best_seconds):.4g} ms{default}" if state.best_seconds else "no valid candidate yet"
            say(f"[{self.measured}/{trials} trials, {done}/{len(states)} kernels searched] "
                f"{state.name}: {state.trials} trials, {best}")

    return Progress()


def _seconds(run_secs) -> float:
    values = [float(v) for v in run_secs]
    return sum(values) / len(values)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
