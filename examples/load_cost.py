"""What a process that only loads and runs an artifact costs: import time, load time, peak RSS, modules.

    python examples/load_cost.py MODEL.so [--runs 5] [TREE[+runtime] ...]

Each measurement is a fresh Python process that imports `compiler.load`, loads MODEL.so and runs it once on
zeros; medians over `--runs` processes. TREE (default: this checkout) is put first on PYTHONPATH, so an older
checkout (a `git worktree`) can be measured against this one; `+runtime` sets TVM_USE_RUNTIME_LIB=1 (TVM's
runtime library instead of its compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r'''
import json, resource, sys, time
started = time.perf_counter()
from compiler import load
imported = time.perf_counter()
import numpy as np
model = load(sys.argv[1])
loaded = time.perf_counter()
model.run(**{s.name: np.zeros(s.shape, s.dtype) for s in model.inputs})
ran = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "first_run_s": ran - loaded,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "modules": len(sys.modules), "onnx": "onnx" in sys.modules,
                  "relay_passes": "relay_passes" in sys.modules}))
'''


def measure(artifact: str, tree: str, runtime_only: bool, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    env.pop("TVM_USE_RUNTIME_LIB", None)
    if runtime_only:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    rows = [json.loads(subprocess.run([sys.executable, "-c", PROBE, artifact], env=env, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(runs)]
    return {key: statistics.median(r[key] for r in rows) if isinstance(rows[0][key], float) else rows[0][key]
            for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("trees", nargs="*", default=[str(Path(__file__).resolve().parents[1])])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for spec in args.trees:
        tree, _, flag = spec.partition("+")
        print(spec, json.dumps(measure(args.artifact, tree, flag == "runtime", args.runs)))


if __name__ == "__main__":
    main()
