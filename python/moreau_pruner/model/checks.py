"""Checks around transformers' loading, so that a model directory loads whole or not at all.

``from_pretrained`` of transformers fills a tensor the checkpoint lacks with random values, drops a
tensor the model has no place for and, asked to, re-initialises a tensor of another shape; each time
it only prints a table. :func:`load_checked` turns any of the three into one error that names the
tensors, so a ``config.json`` that says more layers than the weights hold is never pruned, trained or
evaluated as if it were the model. The other checks refuse, before transformers reads anything, what a
directory must not hold (its own model code, shards outside itself, unreadable weights), and token ids
the model has no embedding for.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

__all__ = ["check_loading", "check_safetensors", "check_stock_config", "check_token_ids", "check_tokenizer_fits", "check_weights",
           "load_checked", "loading_problems", "shard_names", "tensor_names"]


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
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its table of the same problems: the error below says them once
    try:
        model, info = from_pretrained(str(directory), output_loading_info=True, ignore_mismatched_sizes=True,
                                      **kwargs)
    finally:
        logging.set_verbosity(level)
    check_loading(directory, info)
    return model


def check_loading(directory: Path, info: dict) -> None:
    """A ValueError naming every missing, unexpected or mis-shaped tensor of ``info`` (as
    ``output_loading_info`` gives it) read from ``directory``; nothing when there is none."""
    problems = loading_problems(info)
    if problems:
        raise ValueError(f"{directory}: the weights do not fit config.json: tensors " + "; tensors ".join(problems))


# ----------------------------------------------------------------------------- what a directory may hold
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names, each checked to lie inside its directory
    (an absolute path or one through ``..`` is refused: a directory must not read files outside itself)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e!r}") from None
    for name in names:
        if (not isinstance(name, str) or not name or os.path.isabs(name)
                or os.path.normpath(name).split(os.sep)[0] == ".."):
            raise ValueError(f"{index}: weight_map names the shard {name!r}, outside {index.parent}; refused "
                             "(every shard must be a file inside the model directory)")
    return names


def check_safetensors(path: Path) -> None:
    """A ValueError naming ``path`` unless its header reads and covers the file (not truncated, not garbage)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_weights(directory: Path, required: bool = True) -> list[Path]:
    """The safetensors files of ``directory`` (one file or the shards of an index), each checked; a
    FileNotFoundError when there are none (``required``) and no PyTorch weights either."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = [directory / name for name in shard_names(index)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(absent[:5])}")
    elif (directory / SAFETENSORS_FILE).is_file():
        files = [directory / SAFETENSORS_FILE]
    else:
        if required and not any((directory / f).is_file() for f in TORCH_WEIGHTS):
            raise FileNotFoundError(f"{directory} holds no weights ({SAFETENSORS_FILE} or {INDEX_FILE}): "
                                    "not a whole model directory")
        return []
    for f in files:
        check_safetensors(f)
    return files


def check_stock_config(cfg: dict, cfg_file: Path) -> None:
    """A ValueError unless ``cfg`` (read from ``cfg_file``) is an architecture transformers itself provides:
    a directory that asks for its own model code (``auto_map``) is refused, since running it would run
    whatever Python the directory holds (what ``trust_remote_code=True`` allows; we always pass False)."""
    from transformers import CONFIG_MAPPING

    auto_map = cfg.get("auto_map")
    if isinstance(auto_map, dict) and any(k.startswith("AutoModel") for k in auto_map):
        raise ValueError(f"{cfg_file} asks for the directory's own model code (auto_map "
                         f"{sorted(auto_map)}); moreau-pruner never runs code from a model directory "
                         "(trust_remote_code=False): give a stock Llama, Mistral or Qwen2 directory")
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not an architecture this transformers "
                         "provides, and moreau-pruner never runs code from a model directory")


# ----------------------------------------------------------------------------- token ids
def embedding_rows(model) -> int:
    return model.get_input_embeddings().num_embeddings


def check_token_ids(model, ids, what: str) -> None:
    """A ValueError when a token id of ``ids`` (``what``: where they came from) has no row in ``model``'s
    embedding."""
    n = embedding_rows(model)
    if ids is not None and ids.numel() and (int(ids.max()) >= n or int(ids.min()) < 0):
        raise ValueError(f"{what} has token ids up to {int(ids.max())}, but the model embeds only {n} tokens "
                         f"(0 .. {n - 1}): the tokenizer does not belong to this model")


def check_tokenizer_fits(model, tokenizer) -> None:
    """A ValueError when ``tokenizer`` can give ids the model has no embedding for."""
    n, size = embedding_rows(model), len(tokenizer)
    if size > n:
        raise ValueError(f"the tokenizer has {size} tokens but the model embeds only {n}: ids {n} and above "
                         "would fail; the tokenizer does not belong to this model")
