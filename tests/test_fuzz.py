"""Mutated real ONNX models through compile() and the CLI: every outcome is a compile or a clean error.

The fast subset (CI) mutates the digits CNN and two fixture models. The long run adds the real PaddleOCR
models (fetched once with pip, see tests/fuzz/models.py): QUANTVM_FUZZ=long pytest -s tests/test_fuzz.py,
or `python -m tests.fuzz --cases 600` for the per-case log and the count table.
"""

import os

import pytest

from tests.fuzz.harness import cases, run, table
from tests.fuzz.models import DIGITS, available
from tests.fuzz.mutate import MUTATIONS, mutate

LONG = os.environ.get("QUANTVM_FUZZ") == "long"
FAST_CASES = 30


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutations_replay_from_their_seed(mutation):
    data = DIGITS.data()
    first, what = mutate(data, mutation, 7)
    assert (first, what) == mutate(data, mutation, 7)
    assert first != data, what


def test_fuzzed_models_compile_or_fail_cleanly():
    case_list = cases(available(real=LONG), 600 if LONG else FAST_CASES, seed=0)
    result = run(case_list, timeout=300 if LONG else 120, cli="rejected" if LONG else "always", log=lambda _: None)
    report = table(result, case_list)
    print(report)
    assert not result["bad"], report
    assert result["counts"]["accepted"] and result["counts"]["clean_error"], report
