"""The long fuzz run: `python -m tests.fuzz --cases 600` prints each case and the outcome table."""

import argparse
import sys

from tests.fuzz import harness
from tests.fuzz.models import available


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=180, help="seconds per case before it counts as a hang")
    parser.add_argument("--no-real", action="store_true", help="only the models in the repo (no download)")
    parser.add_argument("--cli", choices=["always", "rejected"], default="always",
                        help="rejected: accepted mutants are exported from compile() rather than compiled again "
                             "by the CLI (halves the time of a run on large models)")
    parser.add_argument("--models", help="comma-separated model names to keep")
    args = parser.parse_args()
    models = available(real=not args.no_real)
    if args.models:
        models = [m for m in models if m.name in args.models.split(",")]
    case_list = harness.cases(models, args.cases, args.seed)
    result = harness.run(case_list, args.timeout, cli=args.cli, log=lambda line: print(line, flush=True))
    print(harness.table(result, case_list))
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
