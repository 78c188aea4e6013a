"""Graph-to-graph passes over TVM Relax (the folder keeps the design card's name; Relay left TVM in 0.20)."""

from relay_passes.pipeline import build_pipeline, prepare_graph

__all__ = ["build_pipeline", "prepare_graph"]
