"""Many Python threads running models at once: one model shared, several models, and no growth over time.

Threads that shared one Relax VM crashed the process (SIGSEGV in StorageObj::AllocTensor), so every run
with threads happens in a subprocess: a crash fails the test instead of killing pytest. Each thread runs its
own inputs, so outputs handed to the wrong thread would not match the serial runs.
"""

import itertools
import json
import shlex
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import compiler
from compiler.bench import time_block
from tests.fixtures import MODELS

ROOT = Path(__file__).resolve().parents[1]

# run_threads(models, threads, runs): each thread runs every model `runs` times on its own inputs, all
# threads starting together (their first runs too: CompiledModel makes its Predictor lazily); then every
# output is compared with the same model run serially, in the main thread, afterwards.
PRELUDE = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    import compiler

    def inputs_for(model, seed):
        rng = np.random.default_rng(seed)
        return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in model.inputs}

    def run_threads(models, threads, runs):
        feeds = [[inputs_for(m, 1000 * t + i) for i, m in enumerate(models)] for t in range(threads)]
        outputs = [[[] for _ in models] for _ in range(threads)]
        start = threading.Barrier(threads)

        def work(t):
            start.wait()
            for _ in range(runs):
                for i, model in enumerate(models):
                    outputs[t][i].append(model.run(**feeds[t][i]))

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        serial = [[m.run(**feeds[t][i]) for i, m in enumerate(models)] for t in range(threads)]
        mismatches = sum(not all(np.array_equal(a, b) for a, b in zip(got, serial[t][i]))
                         for t in range(threads) for i in range(len(models)) for got in outputs[t][i])
        firsts = [serial[t][0][0] for t in range(threads)]
        return {"runs": sum(len(o) for per_thread in outputs for o in per_thread), "mismatches": mismatches,
                "distinct_outputs": len({f.tobytes() for f in firsts})}
""")


def run_script(body: str, *args, timeout: float = 600) -> dict:
    """Run PRELUDE + `body` in a fresh interpreter; return the JSON it prints last. A crash fails here."""
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, f"exit status {done.returncode} (negative: killed by that signal)\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_threads_sharing_a_loaded_model_match_serial_runs(digits_builds):
    _, path = digits_builds["native"]
    result = run_script("""
        model = compiler.load(sys.argv[1], num_threads=1)
        print(json.dumps(run_threads([model], threads=8, runs=50)))
    """, path)
    assert result == {"runs": 8 * 50, "mismatches": 0, "distinct_outputs": 8}


def test_threads_sharing_a_compiled_model_match_serial_runs(demo_model_path):
    """Its first runs race too: the threads start together on a model that has not run yet."""
    result = run_script("""
        import compiler.build
        made = []

        class CountedPredictor(compiler.build.Predictor):
            def __init__(self, *args, **kwargs):
                made.append(threading.get_ident())
                super().__init__(*args, **kwargs)

        compiler.build.Predictor = CountedPredictor
        model = compiler.compile(sys.argv[1], target="native", input_shapes={"image": (4, 1, 8, 8)}, num_threads=1)
        result = run_threads([model], threads=8, runs=50)
        print(json.dumps({**result, "predictors_made": len(made)}))
    """, demo_model_path)
    assert result == {"runs": 8 * 50, "mismatches": 0, "distinct_outputs": 8, "predictors_made": 1}


@pytest.fixture(scope="module")
def several_artifacts(tmp_path_factory, digits_builds):
    """Exported models of different shapes and kernels: the digits CNN, an MLP, a ResNet bottleneck."""
    folder = tmp_path_factory.mktemp("several")
    paths = [digits_builds["native"][1]]
    for name in ("mlp", "resnet_bottleneck"):
        model = compiler.compile(MODELS[name](np.random.default_rng(0)), target="native", num_threads=1)
        paths.append(model.export(folder / f"{name}.so"))
    return paths


def test_several_models_run_concurrently_in_one_process(several_artifacts):
    result = run_script("""
        models = [compiler.load(path, num_threads=1) for path in sys.argv[1:]]
        print(json.dumps(run_threads(models, threads=6, runs=20)))
    """, *several_artifacts)
    assert result == {"runs": 6 * 20 * 3, "mismatches": 0, "distinct_outputs": 6}


def test_ten_thousand_runs_do_not_grow_memory(digits_builds):
    """10,000 runs over 4 threads (each with its own VM); resident memory measured after a warm-up."""
    _, path = digits_builds["native"]
    result = run_script("""
        import os

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        model = compiler.load(sys.argv[1], num_threads=1)
        feeds = inputs_for(model, 0)
        warm = threading.Barrier(5)

        def work():
            for _ in range(200):
                model.run(**feeds)
            warm.wait()  # every thread warmed up: the main thread measures
            warm.wait()  # measured: go on
            for _ in range(2500):
                model.run(**feeds)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        warm.wait()
        before = rss()
        warm.wait()
        for thread in threads:
            thread.join()
        print(json.dumps({"before": before, "after": rss()}))
    """, path)
    assert result["after"] <= 1.05 * result["before"], f"resident memory grew: {result}"


def test_a_failing_run_in_a_timed_block_raises_its_error_instead_of_hanging():
    calls = itertools.count()

    def run():
        if next(calls) == 1:  # one thread's untimed first call
            raise ValueError("broken model")

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert time_block(pool, lambda: None, 3, 4) >= 0
        with pytest.raises(ValueError, match="broken model"):
            time_block(pool, run, 3, 4)


def test_bench_concurrency_prints_both_throughputs_and_the_ratio(tmp_path, demo_model_path):
    argv = ["bench", str(demo_model_path), "--batch", "2", "--concurrency", "3", "--rounds", "2",
            "--json", str(tmp_path / "c.json")]
    done = subprocess.run([sys.executable, "-m", "compiler", *argv], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == shlex.join(["quantvm", *argv])
    assert "3 Python threads sharing one model against 1 thread, 1 TVM thread per run, 2 rounds" in lines[1]
    assert [line.split()[:2] for line in lines if "thread(s)" in line] == [["1", "thread(s)"], ["3", "thread(s)"]]
    assert lines[-1].startswith("speedup 3 threads vs 1 thread: ") and lines[-1].endswith("x")
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["mode"] == "concurrency" and result["concurrency"] == 3 and result["command"] == lines[0]
    section = result["batches"][0]
    assert section["batch"] == 2 and [row["threads"] for row in section["rows"]] == [1, 3]
    assert all(row["throughput"] > 0 for row in section["rows"])
    assert section["speedup"] == pytest.approx(section["rows"][1]["throughput"] / section["rows"][0]["throughput"])


@pytest.mark.parametrize("extra, words", [(["--concurrency", "1"], "at least 2 threads"),
                                          (["--concurrency", "2", "--threads", "2"], "drop --threads")])
def test_bench_concurrency_refuses_what_it_cannot_honour(demo_model_path, extra, words):
    done = subprocess.run([sys.executable, "-m", "compiler", "bench", str(demo_model_path), *extra],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and words in done.stderr
