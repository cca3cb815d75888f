"""The pruning target: a model's structure and a :class:`~.config.PruneConfig`, resolved once.

``resolve_target(model, cfg)`` discovers the prunable units (heads, KV groups, MLP channels),
parses the layer ranges against the model's depth and checks that uniform pruning can be done
on this model; every later stage (scoring, allocation, planning, the policy search, applying)
receives the :class:`PruneTarget` instead of re-deriving any of it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..model.structure import ModelStructure, discover
from .config import PruneConfig

@dataclass(frozen=True)
class PruneTarget:
    """What one pruning pass acts on (the structure is that of the model now)."""

    structure: ModelStructure
    config: PruneConfig
    attn_range: range
    mlp_range: range

    @property
    def layers(self) -> set[int]:
        """Decoder layers with something to prune (attention or MLP)."""
        return set(self.attn_range) | set(self.mlp_range)

    @property
    def scored_names(self) -> list[str]:
        """Names of the projection weights of the pruned layers: what the importance reads, so the
        only parameters whose estimate must be kept."""
        return self.structure.projection_names(self.layers)

    def with_config(self, cfg: PruneConfig) -> "PruneTarget":
        """The same structure and ranges under another config (another ratio, per-layer ratios, scope)."""
        return replace(self, config=cfg)

    def rediscover(self) -> "PruneTarget":
        """The target of the model as it is now (after a pruning pass changed its widths)."""
        return PruneTarget(discover(self.structure.model), self.config, self.attn_range, self.mlp_range)


def check_uniform_structure(structure: ModelStructure) -> None:
    """Uniform pruning starts from a model whose layers all have the same widths."""
    widths = {(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]) for w in structure.widths()}
    dims = {ls.head_dim for ls in structure.layers}
    if len(widths) > 1 or len(dims) > 1:
        seen = ", ".join(f"{h} heads/{kv} KV heads/{m} MLP channels" for h, kv, m in sorted(widths))
        raise ValueError(f"uniform pruning needs a model whose layers all have the same widths; this one has "
                         f"{seen} (an already per-layer pruned model cannot be made stock by pruning more)")


def resolve_target(model: nn.Module | ModelStructure, cfg: PruneConfig | None = None) -> PruneTarget:
    """Discover ``model``'s units and resolve ``cfg``'s layer ranges against it (ValueError or
    :class:`~moreau_pruner.model.structure.UnsupportedArchitecture` naming the problem)."""
    structure = model if isinstance(model, ModelStructure) else discover(model)
    cfg = cfg or PruneConfig()
    attn, mlp = cfg.layer_ranges(structure.num_layers)
    if cfg.uniform:
        check_uniform_structure(structure)
    return PruneTarget(structure, cfg, attn, mlp)


def as_target(obj: PruneTarget | nn.Module | ModelStructure, cfg: PruneConfig | None = None) -> PruneTarget:
    """``obj`` itself when it is a :class:`PruneTarget` (resolved already), else
    ``resolve_target(obj, cfg)``: the public stage functions take either."""
    if isinstance(obj, PruneTarget):
        if cfg is not None and cfg is not obj.config:
            raise ValueError("pass either a resolved PruneTarget or a model/structure with a PruneConfig, not both")
        return obj
    return resolve_target(obj, cfg)
