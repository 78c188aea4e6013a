"""Graph-to-graph passes over TVM Relax (the folder keeps the design card's name; Relay left TVM in 0.20)."""

from relay_passes.fuse import FusionReport, fuse, select_rules
from relay_passes.patterns import RULE_NAMES, RULES
from relay_passes.pipeline import build_pipeline, count_kernels, lower_to_kernels, prepare_graph

__all__ = ["RULES", "RULE_NAMES", "FusionReport", "build_pipeline", "count_kernels", "fuse", "lower_to_kernels",
           "prepare_graph", "select_rules"]
