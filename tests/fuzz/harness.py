"""Run seeded mutants through worker processes and count the outcomes.

Good outcomes: `accepted` (compiled, ran, and matched onnxruntime where onnxruntime takes the mutant too)
and `clean_error` (a one-line QuantvmError naming the file, node or input). Everything else is a bug:
crash (the worker died: segfault, LLVM abort), hang (past the timeout), traceback, internal_error,
leftover (files left in the output folder), unnamed (an error naming nothing), mismatch, run_failed,
and worker_error (the harness itself failed on the case).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.models import REPO, FuzzModel
from tests.fuzz.mutate import MUTATIONS, mutate

GOOD = ("accepted", "clean_error")
BAD = ("crash", "hang", "traceback", "internal_error", "leftover", "unnamed", "mismatch", "run_failed",
       "worker_error")


@dataclass(frozen=True)
class Case:
    model: FuzzModel
    mutation: str  # "none": the model as it is
    seed: int

    def __str__(self):
        return f"{self.model.name}/{self.mutation}/seed={self.seed}"


def cases(models: list[FuzzModel], count: int, seed: int = 0) -> list[Case]:
    """`count` cases: each model unmutated once, then models and mutations in turn, each with its own seed."""
    out = [Case(m, "none", seed) for m in models][:count]
    for i in range(count - len(out)):
        model = models[i % len(models)]
        mutation = MUTATIONS[(i // len(models)) % len(MUTATIONS)]
        out.append(Case(model, mutation, seed * 1_000_003 + i))
    return out


class Worker:
    """One `tests.fuzz.worker` process; started again after a crash or a hang."""

    def __init__(self, log):
        self.log, self.proc = log, None

    def _start(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "TVM_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        if self._answer(300) is None:
            raise RuntimeError(f"the fuzz worker did not start (see {self.log.name})")

    def _answer(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else None
        return json.loads(line) if line else None

    def run(self, request: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        started = time.monotonic()
        answer = self._answer(timeout)
        if answer is not None:
            return answer
        try:  # no answer: an end of file (the worker died) or the timeout (it hangs)
            code = self.proc.wait(timeout=max(0.0, 5 - (time.monotonic() - started - timeout)))
        except subprocess.TimeoutExpired:
            self.stop()
            return {"outcome": "hang", "message": f"no answer in {timeout:.0f} s"}
        self.proc = None
        return {"outcome": "crash", "message": f"worker exited with {code}"}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _outcome(answer: dict, path: Path, case: Case) -> tuple[str, str]:
    """The case's outcome: the worse of its API and CLI outcomes (or the worker's crash/hang)."""
    if "outcome" in answer:
        return answer["outcome"], answer["message"]
    for side in ("api", "cli"):
        result = answer[side]
        if result["outcome"] not in GOOD:
            return result["outcome"], f"{side}: {result}"
        if result["outcome"] == "clean_error":
            names = [path.name, *case.model.input_shapes]
            if not any(name in result["message"] for name in names):
                return "unnamed", f"{side}: {result['message']}"
        check = result.get("check", "match")
        if check.startswith(("mismatch", "run_failed")):
            return check.split(":")[0], f"{side}: {check}"
    if answer["api"]["outcome"] != answer["cli"]["outcome"]:
        return "traceback", f"API and CLI disagree: {answer}"
    return answer["api"]["outcome"], answer["api"].get("message", answer["api"].get("check", ""))


def run(case_list: list[Case], timeout: float = 180, log=print, cli: str = "always") -> dict:
    """Run every case (`cli`: "always" also compiles accepted mutants through the CLI, "rejected" exports
    them from the compile() result instead); return {"counts": Counter of outcomes, "bad": [(case, outcome, message)], ...}."""
    counts, bad, checks = Counter(), [], Counter()
    work = Path(tempfile.mkdtemp(prefix="quantvm-fuzz-"))
    started = time.perf_counter()
    data_cache: dict = {}
    with open(work / "worker.log", "w") as worker_log:
        worker = Worker(worker_log)
        try:
            for i, case in enumerate(case_list):
                if case.model.name not in data_cache:
                    data_cache[case.model.name] = case.model.data()
                original = data_cache[case.model.name]
                data, what = (original, "unmutated") if case.mutation == "none" else \
                    mutate(original, case.mutation, case.seed)
                path = work / f"{case.model.name}-{case.mutation}-{case.seed}.onnx"
                path.write_bytes(data)
                out_dir = work / "out"
                out_dir.mkdir(exist_ok=True)
                answer = worker.run({"path": str(path), "input_shapes": case.model.input_shapes,
                                     "out_dir": str(out_dir), "cli": cli}, timeout)
                outcome, message = _outcome(answer, path, case)
                counts[outcome] += 1
                if outcome == "accepted":
                    checks[answer["api"]["check"].split(":")[0]] += 1
                if outcome in BAD:
                    bad.append((str(case), what, outcome, message))
                    path.rename(work / f"bad-{path.name}")  # kept to look at; the case replays from its seed
                else:
                    path.unlink()
                shutil.rmtree(out_dir, ignore_errors=True)
                log(f"[{i + 1}/{len(case_list)}] {case} ({what}): {outcome}: {message[:160]}")
        finally:
            worker.stop()
    if not bad:
        shutil.rmtree(work, ignore_errors=True)
    return {"counts": counts, "checks": checks, "bad": bad, "seconds": time.perf_counter() - started,
            "work": str(work)}


def table(result: dict, case_list: list[Case]) -> str:
    """The outcome counts, overall and per model."""
    per_model = Counter(c.model.name for c in case_list)
    lines = [f"{len(case_list)} cases over {len(per_model)} models in {result['seconds']:.0f} s"]
    for outcome in GOOD + BAD:
        lines.append(f"  {outcome:15} {result['counts'].get(outcome, 0):5}")
    lines.append("  accepted runs vs onnxruntime: " +
                 ", ".join(f"{k} {v}" for k, v in sorted(result["checks"].items())) if result["checks"] else
                 "  accepted runs vs onnxruntime: none")
    lines.append("  per model: " + ", ".join(f"{k} {v}" for k, v in per_model.items()))
    for case, what, outcome, message in result["bad"]:
        lines.append(f"BAD {outcome}: {case} ({what}): {message}")
    return "\n".join(lines)
