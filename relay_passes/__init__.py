"""Graph-to-graph passes over TVM Relax (the folder keeps the design card's name; Relay left TVM in 0.20)."""

from relay_passes.fuse import FusionReport, fuse, select_rules
from relay_passes.patterns import RULE_NAMES, RULES
from relay_passes.pipeline import PIPELINE, GraphBuild, count_kernels, prepare_graph, run_phases

__all__ = ["PIPELINE", "RULES", "RULE_NAMES", "FusionReport", "GraphBuild", "count_kernels", "fuse",
           "prepare_graph", "run_phases", "select_rules"]
