"""Iterative pruning (``rounds`` K > 1): the final size of one-shot pruning reached in K rounds.

Local scope: round k removes its share of each layer's final count (:func:`share`, the nearest
integer to n·k/K, minus what the earlier rounds removed). Global scope: round k removes the weights
that bring the total to k/K of the one-shot removal. :func:`combine_reports` turns the rounds'
reports into one, with kept indices that refer to the original model.
"""
from __future__ import annotations

from .apply import PruneReport
from .compensate import merge_reports
from .config import PruneConfig


def share(n: int, k: int, rounds: int) -> int:
    """Units removed after round k of ``rounds`` when n go in all: the nearest integer to n·k/K."""
    return (2 * n * k + rounds) // (2 * rounds)


def removed_units(reports: list[PruneReport], layer: int, granularity: str) -> tuple[int, int]:
    """(attention units, MLP channels) the earlier rounds removed from ``layer``."""
    attn = mlp = 0
    for rep in reports:
        entry = rep.layers[layer]
        per_group = entry["removed_heads"] // max(entry["num_key_value_heads"], 1)
        attn += entry["removed_kv_heads"] if granularity == "kv-group" else per_group
        mlp += entry["removed_channels"]
    return attn, mlp


def compose(outer: list | None, inner: list | None) -> list | None:
    """Indices kept by two successive selections, as indices of the first one's input."""
    if outer is None or inner is None:
        return inner if outer is None else outer
    return [outer[i] for i in inner]


def combine_reports(reports: list[PruneReport], cfg: PruneConfig, before: int, after: int,
                     rounds: int) -> PruneReport:
    """One report for all rounds: widths of the last, removals and kept indices against the first."""
    first = reports[0]
    layers = []
    for entries in zip(*(r.layers for r in reports)):
        a, z = entries[0], entries[-1]
        kv, q, mlp = a["kept_kv_groups"], a["kept_query_heads"], a["kept_channels"]
        for e in entries[1:]:
            kv = compose(kv, e["kept_kv_groups"])
            mlp = compose(mlp, e["kept_channels"])
            if q is not None and e["kept_query_heads"] is not None:
                q = [compose(g, h) for g, h in zip(q, e["kept_query_heads"])]
            elif q is None:
                q = e["kept_query_heads"]
        heads0 = a["num_attention_heads"] + a["removed_heads"]
        kv0 = a["num_key_value_heads"] + a["removed_kv_heads"]
        inter0 = a["intermediate_size"] + a["removed_channels"]
        layers.append({**z, "ratio": cfg.ratio_of(z["layer"]), "removed_heads": heads0 - z["num_attention_heads"],
                       "removed_kv_heads": kv0 - z["num_key_value_heads"],
                       "removed_channels": inter0 - z["intermediate_size"],
                       "kept_kv_groups": kv, "kept_query_heads": q, "kept_channels": mlp})
    return PruneReport(before, after, cfg.ratio, cfg.scope, cfg.granularity, first.attn_layers, first.mlp_layers,
                       layers, rounds=rounds, uniform=first.uniform,
                       compensation=merge_reports([r.compensation for r in reports]))
