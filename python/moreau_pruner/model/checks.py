"""Checks around transformers' loading, so that a model directory loads whole or not at all.

``from_pretrained`` of transformers fills a tensor the checkpoint lacks with random values, drops a
tensor the model has no place for and, asked to, re-initialises a tensor of another shape; each time
it only prints a table. :func:`load_checked` turns any of the three into one error that names the
tensors, so a ``config.json`` that says more layers than the weights hold is never pruned, trained or
evaluated as if it were the model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

__all__ = ["load_checked", "loading_problems", "tensor_names"]


def tensor_names(names, limit: int = 6) -> str:
    """Tensor names, short: the layer index folded (``model.layers.{4,5}.mlp.up_proj.weight``), at most
    ``limit`` patterns, then how many there are in all."""
    groups: dict[str, list[int]] = {}
    for name in sorted(names):
        m = re.search(r"\.(\d+)\.", name)
        key = name if m is None else name[:m.start()] + ".{}." + name[m.end():]
        groups.setdefault(key, [])
        if m is not None:
            groups[key].append(int(m.group(1)))
    shown = [k.replace("{}", "{" + ",".join(map(str, sorted(set(ix)))) + "}") if ix else k
             for k, ix in list(groups.items())[:limit]]
    more = f", ... ({len(names)} tensors in all)" if len(groups) > limit else ""
    return ", ".join(shown) + more


def loading_problems(info: dict) -> list[str]:
    """What transformers' ``output_loading_info`` says is wrong, one phrase per kind (empty: nothing)."""
    problems = []
    missing = list(info.get("missing_keys") or ())
    if missing:
        problems.append(f"missing from the weights (they would be random): {tensor_names(missing)}")
    unexpected = list(info.get("unexpected_keys") or ())
    if unexpected:
        problems.append(f"in the weights but not in the model config.json describes: {tensor_names(unexpected)}")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        name, saved, wanted = mismatched[0]
        problems.append(f"of another shape than config.json gives: {tensor_names([m[0] for m in mismatched])} "
                        f"(e.g. {name}: {tuple(saved)} in the weights, {tuple(wanted)} by the config)")
    problems.extend(str(e) for e in info.get("error_msgs") or ())
    return problems


def load_checked(from_pretrained: Callable, directory: Path, **kwargs):
    """``from_pretrained(directory, **kwargs)`` that raises ValueError naming every missing, unexpected or
    mis-shaped tensor instead of returning a model with random or dropped weights."""
    model, info = from_pretrained(str(directory), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = loading_problems(info)
    if problems:
        raise ValueError(f"{directory}: the weights do not fit config.json: tensors " + "; tensors ".join(problems))
    return model
