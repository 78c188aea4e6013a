"""The only package that knows about instruction sets: named targets, their CPU features, the host,
blocked layouts, kernels, tensor intrinsics and the schedules that use them."""

from targets.host import host_flags, host_model_name, missing_features
from targets.layout import block_channels
from targets.registry import NAMED_TARGETS, TargetSpec, host_cpu, resolve_target
from targets.schedules import ScheduleLog, schedule_pass
from targets.legalize import legalize_overrides

__all__ = ["NAMED_TARGETS", "ScheduleLog", "TargetSpec", "block_channels", "host_cpu", "host_flags",
           "host_model_name", "legalize_overrides", "missing_features", "resolve_target", "schedule_pass"]
