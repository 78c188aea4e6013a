"""Faults during long work, for real: `quantvm tune` killed (SIGKILL) or interrupted (SIGINT) mid-search,
`tune()` interrupted in a process that goes on, `quantvm compile --calib` interrupted mid-calibration, and new tuning databases that appear whole or not
at all. Each run is a subprocess signalled once its progress output shows it is where the test wants it."""

import json
import os
import pty
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import psutil
import pytest

import compiler
from compiler.errors import TuningError
from compiler.tuning_db import MANIFEST, SEARCH, create_database, tuning_run
from targets import resolve_target
from tests import fixtures

SEARCHING = "trials, "  # in the progress line printed after each measured batch of the search


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    """One conv kernel with enough tilings for a search of a few batches."""
    g = fixtures.GraphBuilder(np.random.default_rng(3))
    y = g.conv("data", "conv", 16, 32, k=3, bias=True)
    model = g.model("conv", {"data": (1, 16, 14, 14)}, [g.op("Relu", [y], "relu")])
    path = tmp_path_factory.mktemp("model") / "conv.onnx"
    onnx.save(model, path)
    return model, path


def _start(*args, stderr=subprocess.PIPE, command=("-m", "compiler")):
    """`quantvm ARGS` (or python COMMAND ARGS) in its own process group (as a shell runs a command)."""
    return subprocess.Popen([sys.executable, *command, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, start_new_session=True)


def _interrupt(process, whole_group=False, twice=False) -> tuple:
    """SIGINT to the process (or its group; `twice`: again while it stops), then its stdout and remaining
    stderr; a stop must not wait for the batch at hand to end."""
    sent = time.monotonic()
    for _ in range(2 if twice else 1):
        (os.killpg if whole_group else os.kill)(process.pid, signal.SIGINT)
        time.sleep(0.05)
    out, rest = process.communicate(timeout=60)
    seconds = time.monotonic() - sent
    print(f"SIGINT to exit: {seconds:.2f} s")
    assert seconds < 30, rest
    return out, rest


def _wait_for(process, text: str, timeout: float = 240) -> list:
    """Its stderr lines up to the first holding `text`."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {''.join(lines)}"
    pytest.fail(f"the run ended before printing {text!r}: {''.join(lines)}")


def _group_ends(pgid: int, timeout: float = 10) -> bool:
    """Whether every process of the group (the run's workers too) is gone within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter():
            with_group = None
            try:
                with_group = os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
            except (OSError, psutil.Error):
                pass
            if with_group:
                alive.append(p)
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _check_json(db) -> dict:
    """Every JSON file of the database parses, the MetaSchedule ones line by line: {path: lines}."""
    lines = {}
    for path in sorted(db.rglob("*.json")):
        if path.name == MANIFEST:
            json.loads(path.read_text())
        else:
            text = path.read_text()
            assert not text or text.endswith("\n"), f"{path} ends in a torn line"
            lines[path] = [json.loads(line) for line in text.splitlines()]
    return lines


def _leftovers(folder) -> list:
    return sorted(str(p) for p in folder.rglob(".*"))


def test_a_killed_search_leaves_a_database_that_compiles_and_resumes(conv_model, tmp_path):
    model, path = conv_model
    db = tmp_path / "db"
    compiler.tune(model, target="native", trials=0, work_dir=db)  # the defaults, selected
    before = _check_json(db)[db / SEARCH / "database_tuning_record.json"]

    run = _start("tune", path, "-t", "native", "--db", db, "--trials", 64)
    _wait_for(run, SEARCHING)
    os.killpg(run.pid, signal.SIGKILL)  # the run and its workers, as the OOM killer or a lost job would
    run.communicate()
    assert _group_ends(run.pid)

    searched = _check_json(db)[db / SEARCH / "database_tuning_record.json"]
    assert len(searched) > len(before) and all(record in searched for record in before)  # the batch was saved
    built = compiler.compile(model, target="native", tuning_db=db)
    assert built.report.tuning["tuned_kernels"]
    feeds = fixtures.random_inputs(model, np.random.default_rng(4))
    np.testing.assert_allclose(built.run(**feeds)[0], fixtures.onnxruntime_outputs(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)

    compiler.tune(model, target="native", trials=8, work_dir=db)
    resumed = _check_json(db)[db / SEARCH / "database_tuning_record.json"]
    assert len(resumed) > len(searched) and all(record in resumed for record in searched)
    assert _leftovers(db) == []  # the killed run's scratch files are gone


@pytest.mark.parametrize("whole_group, twice", [(False, False), (True, False), (True, True)],
                         ids=["process", "terminal", "terminal-twice"])
def test_ctrl_c_during_the_search_exits_130_and_leaves_a_valid_database(conv_model, tmp_path, whole_group, twice):
    """SIGINT to the process alone, or to its whole group (as Ctrl-C at a terminal does, workers included),
    or twice (the second while it stops)."""
    _, path = conv_model
    db = tmp_path / "db"
    run = _start("tune", path, "-t", "native", "--db", db, "--trials", 64)
    _wait_for(run, SEARCHING)
    _, rest = _interrupt(run, whole_group, twice)
    assert run.returncode == 130
    assert rest == "quantvm: interrupted\n"
    assert _group_ends(run.pid)  # no worker outlives it
    assert _check_json(db)[db / SEARCH / "database_tuning_record.json"]
    assert _leftovers(db) == []


CALLER = """
import sys

import psutil

import compiler

try:
    compiler.tune(sys.argv[1], target="native", trials=64, work_dir=sys.argv[2],
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
except KeyboardInterrupt:
    alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    print(f"caught KeyboardInterrupt; {len(alive)} worker(s) left")
print("going on")
"""


def test_ctrl_c_stops_tune_called_in_a_process_which_goes_on(conv_model, tmp_path):
    """tune() in a notebook or a server: Ctrl-C raises a plain KeyboardInterrupt there, with its workers
    gone, and the process goes on."""
    _, path = conv_model
    db = tmp_path / "db"
    (tmp_path / "caller.py").write_text(CALLER)
    run = _start(path, db, command=[tmp_path / "caller.py"])
    _wait_for(run, SEARCHING)
    out, rest = _interrupt(run)
    assert run.returncode == 0, rest
    assert out == "caught KeyboardInterrupt; 0 worker(s) left\ngoing on\n"
    assert "Traceback" not in rest
    assert _group_ends(run.pid)
    assert _check_json(db)[db / SEARCH / "database_tuning_record.json"]
    assert _leftovers(db) == []


def test_ctrl_c_during_calibration_exits_130_and_writes_nothing(conv_model, tmp_path):
    _, path = conv_model
    data = np.random.default_rng(5).standard_normal((3000, 1, 16, 14, 14)).astype("float32")
    np.savez(tmp_path / "calib.npz", data=data.reshape(3000, 16, 14, 14))
    out = tmp_path / "out"
    out.mkdir()
    terminal, stderr = pty.openpty()  # the calibration's progress counter only shows on a terminal
    try:
        run = _start("compile", path, "-t", "native", "-o", out / "conv.so", "--calib", tmp_path / "calib.npz",
                     "--calib-mode", "naive", stderr=stderr)
        os.close(stderr)
        seen, deadline = b"", time.monotonic() + 240
        while b"batch 3" not in seen:
            assert time.monotonic() < deadline and run.poll() is None, seen.decode(errors="replace")
            seen += os.read(terminal, 4096)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
        rest = b""
        with pytest.raises(OSError):  # EIO once the process is gone and all is read
            while True:
                rest += os.read(terminal, 4096)
    finally:
        os.close(terminal)
    assert run.returncode == 130
    assert rest.decode().replace("\r\n", "\n").split("\n")[-2:] == ["quantvm: interrupted", ""]
    assert "Traceback" not in rest.decode()
    assert list(out.iterdir()) == []
    assert _group_ends(run.pid)


def test_a_new_database_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    spec = resolve_target("native")
    # built beside its path and renamed onto it: a failure part way leaves neither it nor the scratch
    import compiler.tuning_db as tuning_db

    def fail(folder, manifest):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(tuning_db, "write_manifest", fail)
        with pytest.raises(TuningError, match="cannot create tuning database .*No space left"):
            create_database(tmp_path / "db", spec)
    assert list(tmp_path.iterdir()) == []
    # made whole: a manifest and an empty selection, readable by MetaSchedule; an empty folder will do too
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "db", tmp_path / "empty"):
        create_database(folder, spec)
        assert sorted(p.name for p in folder.iterdir()) == [
            "database_tuning_record.json", "database_workload.json", MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "empty"]


def test_a_folder_holding_other_files_is_not_made_a_database(conv_model, tmp_path):
    model, _ = conv_model
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TuningError, match="holds other files"):
        compiler.tune(model, target="native", trials=0, work_dir=tmp_path)


def test_one_run_at_a_time_and_leftovers_removed(tmp_path):
    db = tmp_path / "db"
    create_database(db, resolve_target("native"))
    (db / ".search.x1y2.tmp").mkdir()  # as a killed run leaves them
    (db / ".database_workload.json.abc.tmp").write_text('[1, "torn')
    with tuning_run(db):
        assert _leftovers(db) == []
        with pytest.raises(TuningError, match="being tuned by another run"):
            with tuning_run(db):
                pass
    with tuning_run(db):  # released
        pass
