"""Tuning: MetaSchedule through a real RPC tracker and server on 127.0.0.1, databases that compile() applies,
resumed runs, and databases or trackers that do not fit, refused with the address, key or target named."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import compiler
from compiler.errors import TargetError, TuningError
from compiler.remote import RPCAddress, count_servers
from targets import NAMED_TARGETS, missing_features, resolve_target
from tests import fixtures
from tests.test_kernels import assembly_by_kernel

KEY = "quantvm-test"
TRIALS = 16


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """A TVM RPC tracker and one server registered with it under KEY, as on a fleet: yields the port."""
    port = _free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                   "--port", str(port), "--port-end", str(port + 1)], **quiet)]
    try:
        processes.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                           "--tracker", f"127.0.0.1:{port}", "--key", KEY], **quiet))
        deadline = time.monotonic() + 90
        while True:
            try:
                if count_servers(RPCAddress("127.0.0.1", port, KEY)):
                    break
            except TuningError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)
        yield port
    finally:
        import psutil

        # the server's own worker processes too: terminated, it leaves them running
        everything = [child for p in processes for child in psutil.Process(p.pid).children(recursive=True)]
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        for child in everything:
            with contextlib.suppress(psutil.Error):
                child.kill()


@pytest.fixture(scope="module")
def block_model():
    return fixtures.resnet_bottleneck_block(np.random.default_rng(6))


@pytest.fixture(scope="module")
def tuned_through_rpc(tracker, block_model, tmp_path_factory):
    """The block model tuned for this host through the tracker: (database folder, summary, progress lines)."""
    db = tmp_path_factory.mktemp("tuning") / "db"
    lines = []
    summary = compiler.tune(block_model, target="native", trials=TRIALS, work_dir=db,
                            rpc=f"127.0.0.1:{tracker}:{KEY}", progress=lines.append)
    return db, summary, lines


def _code_by_kernel(executable) -> dict[str, str]:
    """Each kernel's assembly without the local label numbers, which shift with the code before it."""
    return {name: re.sub(r"\.L\w+", ".L", asm) for name, asm in assembly_by_kernel(executable).items()}


def _lines(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _records(db) -> list:
    """The records of MetaSchedule's JSON database in `db`: [workload position, [trace, run_secs, ...]]."""
    return _lines(db / "database_tuning_record.json")


def test_tuning_through_the_tracker_writes_a_database(tuned_through_rpc):
    db, summary, lines = tuned_through_rpc
    manifest = json.loads((db / "quantvm_tuning.json").read_text())
    assert manifest["target"]["mcpu"] == resolve_target("native").mcpu
    assert [m["precision"] for m in manifest["models"]] == ["fp32"]
    convs = [t for t in summary.tasks if "conv2d" in t.name]
    assert len(convs) == len(summary.tasks) >= 5 and all("layout" in name for name in summary.skipped)
    # the search: one record per kernel's default, then the searched candidates
    assert len(_records(db / "search")) >= len(summary.tasks) + TRIALS // 2
    assert sum(t.trials for t in summary.tasks) >= TRIALS // 2
    # applied: per kernel its chosen schedule, and its default when that was beaten
    assert len(summary.tasks) <= len(_records(db)) <= 2 * len(summary.tasks)
    assert all(t.best_seconds <= t.default_seconds for t in summary.tasks)
    assert any("trials" in line and "best" in line for line in lines)


def _make_a_searched_tiling_the_fastest(db) -> None:
    """Put a searched tiling into the applied records as one kernel's fastest, whatever this noisy host
    measured: the test is of applying, not of the search's luck. A kernel's first applied record with the
    largest time is its default (a searched one is only applied when faster)."""
    applied, searched = _records(db), _records(db / "search")
    # the same kernel sits at different positions in the two databases; its workload line is the same
    position = {json.dumps(w): i for i, w in enumerate(_lines(db / "database_workload.json"))}
    moved = [position[json.dumps(w)] for w in _lines(db / "search" / "database_workload.json")]
    default = {}
    for workload, record in applied:
        if workload not in default or record[1] > default[workload][1]:
            default[workload] = record
    fastest = min(min(record[1]) for _, record in applied)
    workload, record = next((moved[w], r) for w, r in searched if r[0][1] != default[moved[w]][0][1])
    record[1] = [fastest / 10]
    (db / "database_tuning_record.json").write_text("".join(json.dumps(row) + "\n" for row in
                                                            [*applied, [workload, record]]))


def test_compile_applies_the_database_and_still_matches_onnxruntime(tuned_through_rpc, block_model, tracker):
    db, _, _ = tuned_through_rpc
    _make_a_searched_tiling_the_fastest(db)
    summary = compiler.tune(block_model, target="native", trials=0, work_dir=db, rpc=f"127.0.0.1:{tracker}:{KEY}")
    tuned = compiler.compile(block_model, target="native", tuning_db=db)
    default = compiler.compile(block_model, target="native")
    assert tuned.report.tuning["tuned_kernels"] == sorted(t.name for t in summary.tasks)
    assert set(tuned.report.schedules.applied) == set(summary.skipped)
    # a kernel whose best is not its default tiling runs other code than the default build's; the rest the same
    tuned_asm, default_asm = _code_by_kernel(tuned.executable), _code_by_kernel(default.executable)
    assert any(not t.best_is_default for t in summary.tasks)
    assert all((tuned_asm[t.name] == default_asm[t.name]) == t.best_is_default for t in summary.tasks)
    feeds = fixtures.random_inputs(block_model, np.random.default_rng(7))
    np.testing.assert_allclose(tuned.run(**feeds)[0], fixtures.onnxruntime_outputs(block_model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_a_second_run_continues_from_the_database(tuned_through_rpc, block_model, tracker):
    db, first, _ = tuned_through_rpc
    before = _records(db / "search")
    lines = []
    second = compiler.tune(block_model, target="native", trials=8, work_dir=db, rpc=f"127.0.0.1:{tracker}:{KEY}",
                           progress=lines.append)
    after = _records(db / "search")
    assert len(after) > len(before) and all(record in after for record in before)
    assert not any("default schedule" in line for line in lines)  # the defaults were measured by the first run
    assert any("side by side" in line for line in lines)  # the searched kernels' finalists were timed again
    assert all(t.default_seconds and t.best_seconds <= t.default_seconds for t in second.tasks)
    assert len(json.loads((db / "quantvm_tuning.json").read_text())["models"]) == 1


def test_int8_kernels_stay_tensorized_when_tuned(tmp_path, rng):
    model = fixtures.resnet_bottleneck_block(rng)
    calib = [fixtures.random_inputs(model, rng)["data"] for _ in range(2)]
    db = tmp_path / "db"
    before = {p.pid for p in _worker_processes()}  # (an RPC server fixture's, in this process)
    summary = compiler.tune(model, target="native", trials=8, work_dir=db, calib=calib, calib_mode="naive")
    assert summary.tasks
    # the runner's waiting worker is ended too: none that tune() started outlives it
    assert not [p for p in _worker_processes() if p.pid not in before]
    searched = _records(db / "search")
    assert len(searched) > len(summary.tasks)
    assert all("quantvm_dot_" in json.dumps(record) for record in searched + _records(db))  # all: the intrinsic
    built = compiler.compile(model, target="native", calib=calib, calib_mode="naive", tuning_db=db)
    assert built.report.tuning["tuned_kernels"]
    assert built.report.quantization.output_error["cosine"] > 0.99


def _worker_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "tvm.exec.popen_worker" in p.cmdline()]


def test_an_unreachable_tracker_is_an_error_naming_it_in_bounded_time(tmp_path, block_model):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TuningError, match=f"127.0.0.1:{port}"):
        compiler.tune(block_model, target="native", trials=4, work_dir=tmp_path / "db", rpc=f"127.0.0.1:{port}:{KEY}")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "db").exists()


def test_a_peer_that_never_answers_is_not_waited_for_forever(tmp_path, block_model):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TuningError, match=f"127.0.0.1:{port} does not answer as an RPC tracker"):
            compiler.tune(block_model, target="native", trials=4, work_dir=tmp_path / "db",
                          rpc=f"127.0.0.1:{port}:{KEY}")
        assert time.monotonic() - started < 30


def test_no_server_for_the_key_is_an_error_naming_the_keys_there(tracker, tmp_path, block_model):
    with pytest.raises(TuningError, match=f"no server for key 'xeon-missing'.*keys there: {KEY}"):
        compiler.tune(block_model, target="native", trials=4, work_dir=tmp_path / "db",
                      rpc=f"127.0.0.1:{tracker}:xeon-missing")


@pytest.mark.parametrize("rpc", ["localhost", "localhost:90x:key", "host:9190", ":9190:key"])
def test_a_malformed_rpc_address_is_an_error(rpc, tmp_path, block_model):
    with pytest.raises(TuningError, match="expected TRACKER_HOST:PORT:KEY"):
        compiler.tune(block_model, target="native", trials=4, work_dir=tmp_path / "db", rpc=rpc)


def test_remote_tuning_needs_the_servers_thread_count(tracker, tmp_path, block_model):
    with pytest.raises(TuningError, match="thread count"):
        compiler.tune(block_model, target="cascadelake", trials=4, work_dir=tmp_path / "db",
                      rpc=f"127.0.0.1:{tracker}:{KEY}")


def test_local_tuning_for_a_cpu_this_host_lacks_points_to_rpc(tmp_path, block_model):
    foreign = next((name for name in NAMED_TARGETS
                    if missing_features(resolve_target(name).required_features)), None)
    if foreign is None:
        pytest.skip("this host runs every named target")
    with pytest.raises(TuningError, match="cannot be measured on this host.*rpc="):
        compiler.tune(block_model, target=foreign, trials=4, work_dir=tmp_path / "db")


@pytest.fixture(scope="module")
def avx2_database(block_model, tmp_path_factory):
    """A database of the block model's defaults measured for target avx2 (no search)."""
    db = tmp_path_factory.mktemp("avx2") / "db"
    compiler.tune(block_model, target="avx2", trials=0, work_dir=db)
    return db


def test_a_database_from_another_target_is_refused(avx2_database, block_model):
    with pytest.raises(TargetError, match="tuned for target 'avx2' .*not for 'skylake-avx512'"):
        compiler.compile(block_model, target="skylake-avx512", tuning_db=avx2_database)
    with pytest.raises(TargetError, match="one folder per target"):
        compiler.tune(block_model, target="native", trials=0, work_dir=avx2_database)


def test_a_database_from_another_model_is_refused(avx2_database, rng):
    other = fixtures.depthwise_separable_block(rng)
    with pytest.raises(TuningError, match="none of its kernels are in it"):
        compiler.compile(other, target="avx2", tuning_db=avx2_database)


def test_a_database_for_the_same_model_at_another_precision_is_refused(avx2_database, block_model, rng):
    calib = [fixtures.random_inputs(block_model, rng)["data"]]
    with pytest.raises(TuningError, match=r"\(fp32, data \[1, 16, 12, 12\]\), not for .*\(int8"):
        compiler.compile(block_model, target="avx2", calib=calib, calib_mode="naive", tuning_db=avx2_database)


def test_a_folder_that_is_not_a_database_is_refused(tmp_path, block_model):
    with pytest.raises(TuningError, match="not a quantvm tuning database"):
        compiler.compile(block_model, target="avx2", tuning_db=tmp_path)
    with pytest.raises(TuningError, match="no such directory"):
        compiler.compile(block_model, target="avx2", tuning_db=tmp_path / "missing")


def test_a_model_with_nothing_to_tune_gets_a_database_that_applies(tmp_path):
    g = fixtures.GraphBuilder(np.random.default_rng(8))
    model = g.model("relu", {"data": (1, 8, 4, 4)}, [g.op("Relu", ["data"], "relu")])
    summary = compiler.tune(model, target="native", trials=4, work_dir=tmp_path / "db")
    assert summary.tasks == [] and summary.skipped
    built = compiler.compile(model, target="native", tuning_db=tmp_path / "db")
    assert built.report.tuning["tuned_kernels"] == []
    data = np.random.default_rng(9).standard_normal((1, 8, 4, 4)).astype("float32")
    np.testing.assert_array_equal(built.run(data)[0], np.maximum(data, 0))
