"""The only package that knows about instruction sets: named targets, their CPU features, the host,
blocked layouts, kernels, tensor intrinsics and the schedules that use them.

The names below are imported on first use, so that `targets.host` (what the light loader needs to refuse
an artifact this CPU cannot run) is importable without TVM's scheduling modules.
"""

import importlib

_EXPORTS = {
    "host_flags": "targets.host", "host_model_name": "targets.host", "missing_features": "targets.host",
    "block_channels": "targets.layout",
    "NAMED_TARGETS": "targets.registry", "TargetSpec": "targets.registry", "host_cpu": "targets.registry",
    "resolve_target": "targets.registry",
    "ScheduleLog": "targets.schedules", "schedule_pass": "targets.schedules",
    "legalize_overrides": "targets.legalize",
}

__all__ = ["NAMED_TARGETS", "ScheduleLog", "TargetSpec", "block_channels", "host_cpu", "host_flags",
           "host_model_name", "legalize_overrides", "missing_features", "resolve_target", "schedule_pass"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'targets' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
