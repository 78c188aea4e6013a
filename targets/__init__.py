"""The only package that knows about instruction sets: named targets, their CPU features, the host."""

from targets.host import host_flags, host_model_name, missing_features
from targets.registry import NAMED_TARGETS, TargetSpec, host_cpu, resolve_target

__all__ = ["NAMED_TARGETS", "TargetSpec", "host_cpu", "host_flags", "host_model_name", "missing_features",
           "resolve_target"]
