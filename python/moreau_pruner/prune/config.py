"""What to prune (SPEC §5): the ratio, the layer ranges, the scope, the attention unit, rounding and
uniform widths. The values are checked once, when a :class:`PruneConfig` is made; the layer ranges,
which need the model's depth, are resolved once by :func:`moreau_pruner.prune.target.resolve_target`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.structure import GRANULARITIES, parse_layer_range

SCOPES = ("local", "global")


@dataclass
class PruneConfig:
    """ratio r: fraction removed from each pruned layer's units (local) or from all of them
    (global). Layer ranges are ``(start, end)`` or ``"start:end"``, end exclusive, or a name
    (``all``, ``published``, ``published-to-end``); None: the published choice scaled to the model
    (LLaMA-7B: 4:30 of 32).

    ``uniform``: the same widths in every layer, so the result has a stock config (see
    :mod:`moreau_pruner.prune.plan`); it prunes all layers by the local rule at one ratio.
    """

    ratio: float = 0.2
    attn_layers: tuple[int, int] | str | None = None
    mlp_layers: tuple[int, int] | str | None = None
    scope: str = "local"
    granularity: str = "kv-group"
    round_to: int | None = None
    layer_ratios: dict[int, float] | None = None  # per-layer r (local scope), e.g. from allocation.allocate
    uniform: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {self.round_to}")
        if self.layer_ratios:
            if self.scope != "local":
                raise ValueError("per-layer ratios apply to local pruning (scope='local')")
            for layer, r in self.layer_ratios.items():
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"layer {layer}: ratio must be in [0, 1), got {r}")
        if self.uniform:
            if self.scope != "local":
                raise ValueError("uniform pruning keeps the same unit counts in every layer (the local rule); "
                                 f"scope {self.scope!r} varies them per layer: use scope='local'")
            if self.layer_ratios:
                raise ValueError("uniform pruning uses one ratio for every layer; per-layer ratios (an allocation "
                                 "such as owl/alpha/farms) would give layers different widths")

    def ratio_of(self, layer: int) -> float:
        return (self.layer_ratios or {}).get(layer, self.ratio)

    def layer_ranges(self, num_layers: int) -> tuple[range, range]:
        """The attention and MLP layer ranges for a model of ``num_layers`` decoder layers (a
        ValueError names a range outside the model). Uniform pruning prunes every layer, so a range
        that would leave some layers at full width is refused."""
        if not self.uniform:
            a = parse_layer_range(self.attn_layers, num_layers, "attention layer range")
            m = parse_layer_range(self.mlp_layers, num_layers, "MLP layer range")
            return range(*a), range(*m)
        for spec, what in ((self.attn_layers, "attention layer range"), (self.mlp_layers, "MLP layer range")):
            if spec is None:
                continue
            start, end = parse_layer_range(spec, num_layers, what)
            if (start, end) != (0, num_layers):
                raise ValueError(f"uniform pruning prunes all {num_layers} layers so that every layer has the "
                                 f"same width; the {what} {start}:{end} would leave the other layers at full width "
                                 f"(give 0:{num_layers} or no range)")
        return range(num_layers), range(num_layers)
