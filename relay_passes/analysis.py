"""Small questions about a Relax function that several passes ask."""

from __future__ import annotations

from tvm import relax


def use_counts(func: relax.Function) -> dict:
    """{var: how many times it is read}; a function output counts one read more (the caller's)."""
    uses = {}
    for block in func.body.blocks:
        for var, users in relax.analysis.udchain(block).items():
            uses[var] = len(users) + (0 if isinstance(var, relax.DataflowVar) else 1)
    return uses


class SingleUse:
    """Is the value bound to a var read exactly once? (Names repeat in Relax: match vars by identity.)"""

    def __init__(self, func: relax.Function):
        self.var_of = [(value, var) for var, value in relax.analysis.get_var2val(func).items()]
        self.uses = use_counts(func)

    def __call__(self, value) -> bool:
        var = next((v for val, v in self.var_of if val.same_as(value)), None)
        return var is not None and self.uses.get(var, 2) == 1
