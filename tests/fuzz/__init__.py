"""Fuzzing quantvm's compiler with mutated real ONNX models: see harness.py; `python -m tests.fuzz --help`."""
