"""Thread counts: chosen at compile time, recorded in the metadata, honoured by every run.

Whether a count is honoured is observed, never timed: a parallel TIR kernel in which every element records
the id of the OS thread that computed it, run in the same thread as the model, counts the threads TVM's
pool really used. Runs happen in subprocesses: TVM keeps one pool per thread, for the life of the process.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import compiler
from compiler.runtime import resolve_num_threads
from tests.fixtures import MODELS

CORES = os.cpu_count() or 1
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="needs a host with at least 2 cores")

PRELUDE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tvm
    from tvm import te
    import compiler

    def parallel_kernel():
        x = te.compute((64,), lambda i: tvm.tirx.call_extern("int32", "gettid") + i * 0, name="x")
        sch = tvm.s_tir.Schedule(te.create_prim_func([x]))
        sch.parallel(sch.get_loops(sch.get_sblock("x"))[0])
        kernel, out = tvm.compile(sch.mod, target="llvm"), tvm.runtime.tensor(np.zeros(64, "int32"))
        def threads_used():
            kernel(out)
            return len(set(out.numpy().tolist()))
        return threads_used

    threads_used = parallel_kernel()
    images = np.zeros((4, 1, 8, 8), np.float32)
    seen = {}

    def observe(tag):
        seen[tag] = {"used": threads_used(), "pool": tvm.get_global_func("runtime.NumThreads")(),
                     "cpus": len(os.sched_getaffinity(0))}
""")


def run_script(body: str, *args, env_threads: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(seen))\n"
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return {"seen": json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.fixture
def no_env_threads(monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)


@pytest.fixture(scope="module")
def mlp_model():
    return MODELS["mlp"](np.random.default_rng(0))


def test_compile_records_the_chosen_thread_count(digits_builds, mlp_model):
    native, _ = digits_builds["native"]
    assert native.metadata.target.num_threads == CORES  # all of this host's cores by default
    assert native.metadata.target.tvm["num-cores"] == CORES
    xeon, _ = digits_builds["cascadelake"]
    assert xeon.metadata.target.num_threads is None and "num-cores" not in xeon.metadata.target.tvm
    one = compiler.compile(mlp_model, target="native", num_threads=1)
    assert one.metadata.target.num_threads == 1 and one.metadata.target.tvm["num-cores"] == 1
    four = compiler.compile(mlp_model, target="llvm -mcpu=cascadelake -num-cores=4")
    assert four.metadata.target.num_threads == 4


def test_the_count_comes_from_the_argument_then_the_environment_then_the_metadata(monkeypatch, no_env_threads):
    assert resolve_num_threads(None, None) == CORES
    assert resolve_num_threads(None, 1) == 1
    assert resolve_num_threads(None, 10_000) == CORES  # the compile-time count is capped at this host's cores
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert resolve_num_threads(None, CORES) == 1
    assert resolve_num_threads(CORES, 1) == CORES


def test_load_takes_the_count_from_the_artifact_unless_told(digits_builds, monkeypatch, no_env_threads):
    _, path = digits_builds["native"]
    assert compiler.load(path).num_threads == CORES
    assert compiler.load(path, num_threads=1).num_threads == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert compiler.load(path).num_threads == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "two"])
def test_bad_thread_counts_are_clear_errors(digits_builds, mlp_model, bad):
    _, path = digits_builds["native"]
    with pytest.raises(compiler.QuantvmError, match=r"num_threads must be a whole number of threads >= 1"):
        compiler.load(path, num_threads=bad)
    with pytest.raises(compiler.QuantvmError, match=r"num_threads must be a whole number"):
        compiler.compile(mlp_model, target="native", num_threads=bad)


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_bad_environment_variable_is_named(digits_builds, monkeypatch, value):
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    with pytest.raises(compiler.QuantvmError, match=f"TVM_NUM_THREADS must be a whole number .* got '{value}'"):
        compiler.load(digits_builds["native"][1])


@needs_two_cores
@pytest.mark.parametrize("asked, env", [(1, "2"), (2, "1")])
def test_an_explicit_count_is_honoured_over_the_environment(digits_builds, asked, env):
    _, path = digits_builds["native"]
    result = run_script("""
        model = compiler.load(sys.argv[1], num_threads=int(sys.argv[2]))
        model(images)
        observe("run")
    """, path, asked, env_threads=env)
    assert result["seen"]["run"] == {"used": asked, "pool": asked, "cpus": CORES}


@needs_two_cores
def test_the_count_changes_run_by_run_in_both_directions(digits_builds, tmp_path):
    onnx_path = tmp_path / "mlp.onnx"
    onnx.save(MODELS["mlp"](np.random.default_rng(0)), onnx_path)
    _, artifact = digits_builds["native"]
    result = run_script("""
        two = compiler.compile(sys.argv[1], target="native", num_threads=2)
        one = compiler.load(sys.argv[2], num_threads=1)
        batch = np.zeros((4, 32), np.float32)
        two(batch); observe("compiled, 2")
        one(images); observe("loaded, 1")
        two(batch); observe("compiled again, 2")
    """, onnx_path, artifact)
    assert [step["used"] for step in result["seen"].values()] == [2, 1, 2]


@needs_two_cores
def test_the_environment_count_is_used_when_none_is_given(digits_builds):
    _, path = digits_builds["native"]
    result = run_script("""
        compiler.load(sys.argv[1])(images)
        observe("run")
    """, path, env_threads="1")
    assert result["seen"]["run"]["used"] == 1


@needs_two_cores
def test_a_pool_started_before_quantvm_cannot_grow_and_says_so(digits_builds):
    """TVM sized this thread's pool when another kernel ran first (TVM_NUM_THREADS=1 here, and pinned the
    thread to one core): quantvm warns that it cannot get 2 threads, and still unpins the thread."""
    _, path = digits_builds["native"]
    result = run_script("""
        observe("before")
        compiler.load(sys.argv[1], num_threads=2)(images)
        observe("after")
    """, path, env_threads="1")
    assert result["seen"]["before"] == {"used": 1, "pool": 1, "cpus": 1}
    assert result["seen"]["after"] == {"used": 1, "pool": 1, "cpus": CORES}
    assert "cannot grow: running on 1, not 2" in result["stderr"]
