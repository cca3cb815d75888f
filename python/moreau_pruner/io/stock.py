"""Stock-format export: a uniformly pruned model saved so that any Llama/Mistral/Qwen2 reader loads it.

A model pruned with ``PruneConfig(uniform=True)`` (``moreau-prune --uniform``) has the same number
of query heads, key/value heads and MLP channels in every layer. Those widths fit the stock
``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size`` and an explicit ``head_dim``, since the heads no
longer fill ``hidden_size``), so :func:`save_uniform` writes a plain Hugging Face directory (a Llama
whose query heads no longer divide ``hidden_size`` is written as the identical Mistral model, since
transformers >= 5.4 refuses such a ``LlamaConfig``):

- ``model.safetensors``: the tensors under the stock names (a tied ``lm_head.weight`` is stored
  once, as ``model.embed_tokens.weight``, as transformers itself does);
- ``config.json``: the stock config with the new widths, stock ``model_type`` and
  ``architectures``, no ``auto_map`` and no ``quantization_config`` (GGUF-loaded models);
- ``generation_config.json``, the tokenizer files and ``pruning_info.json`` when present/given.

It loads with ``AutoModelForCausalLM.from_pretrained(dir)`` (no ``trust_remote_code``), which is
what vLLM, SGLang, TensorRT-LLM and llama.cpp's ``convert_hf_to_gguf.py`` read. Models with
per-layer widths go through :func:`moreau_pruner.io.pruned.save_pruned` instead; :func:`save_uniform`
refuses them and says so.

Only tensors are written (no ``save_pretrained`` of the model), so models loaded from GGUF, which
transformers refuses to save, export too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import json_default, staged_directory
from .pruned import (BASE_ARCH_KEY, CONFIG_FILE, PER_LAYER_KEYS, PRUNING_INFO_FILE, STOCK_MODEL_TYPES,
                     SUPPORTED_ARCHITECTURES, WEIGHTS_FILE, _base_architecture, _dtype_name, _model_dtype,
                     info_text, layer_widths, tensors_to_save, write_extras)

__all__ = ["STOCK_MODEL_TYPES", "uniform_widths", "stock_config", "save_uniform"]

# keys a pruned or GGUF-loaded config carries that a stock config must not
_DROP_KEYS = ("quantization_config", "auto_map", "architectures", "model_type", "transformers_version",
              "_name_or_path", "base_model_type", BASE_ARCH_KEY, *PER_LAYER_KEYS)


def uniform_widths(model) -> dict[str, int]:
    """``{"num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim"}`` shared by
    every layer; ValueError naming the layers that differ when the widths are per-layer."""
    widths = layer_widths(model)  # checks each layer's shapes
    dims = [block.self_attn.head_dim for block in model.model.layers]
    rows = list(zip(widths["layer_num_attention_heads"], widths["layer_num_key_value_heads"],
                    widths["layer_intermediate_size"], dims))
    if not rows:
        raise ValueError("the model has no decoder layers")
    first = rows[0]
    differ = [i for i, r in enumerate(rows) if r != first]
    if differ:
        shown = ", ".join(f"layer {i}: {rows[i][0]} heads/{rows[i][1]} KV heads/{rows[i][2]} MLP channels"
                          for i in differ[:3])
        raise ValueError(
            f"a stock config needs the same widths in every layer; layer 0 has {first[0]} heads/{first[1]} KV "
            f"heads/{first[2]} MLP channels but {len(differ)} layer(s) differ ({shown}{', ...' if len(differ) > 3 else ''}). "
            "Prune with --uniform (PruneConfig(uniform=True)), or save per-layer widths with "
            "moreau_pruner.save_pruned (trust_remote_code loaders only)")
    heads, kv_heads, inter, head_dim = first
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": inter,
            "head_dim": head_dim}


def _tied(model) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    shared = head is not None and head.weight is emb.weight
    return bool(getattr(model.config, "tie_word_embeddings", False)) and shared


def _llama_as_mistral(d: dict) -> dict:
    """A Llama config dict rewritten as the computationally identical Mistral config.

    transformers >= 5.4 refuses a ``LlamaConfig`` whose ``hidden_size`` is not a multiple of
    ``num_attention_heads`` even with an explicit ``head_dim`` (a Llama pruned from 32 to 24 query
    heads, say), while ``MistralConfig`` accepts it. A Mistral model with ``sliding_window`` null is
    the Llama forward pass (RMSNorm, rotary embedding with the same ``rope_parameters``, grouped
    attention over ``head_dim``, SiLU-gated MLP), and every stock reader that knows Llama knows
    Mistral (vLLM and llama.cpp's converter run it through their Llama code). The Llama-only
    options Mistral cannot express are refused here."""
    extra = [k for k in ("attention_bias", "mlp_bias") if d.get(k)]
    if extra:
        raise ValueError(
            f"cannot write a stock config: this Llama has {d['num_attention_heads']} query heads, which do not "
            f"divide hidden_size {d['hidden_size']} (transformers >= 5.4 refuses that LlamaConfig), and its "
            f"{' and '.join(extra)} cannot be expressed by the Mistral config used instead. Save the per-layer "
            "form (moreau_pruner.save_pruned, i.e. moreau-prune without --uniform) or keep a number of query "
            "heads that divides hidden_size")
    out = {k: v for k, v in d.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    out["sliding_window"] = None
    return out


def stock_config(model):
    """The stock ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` describing ``model``.

    A Llama whose query heads no longer divide ``hidden_size`` is described by a ``MistralConfig``
    with ``sliding_window`` null (see :func:`_llama_as_mistral`); every other model keeps its own
    stock type."""
    import transformers

    base_arch = _base_architecture(model)
    d = model.config.to_dict()
    for key in _DROP_KEYS:
        d.pop(key, None)
    d.update(uniform_widths(model))
    if base_arch == "LlamaForCausalLM" and d["hidden_size"] % d["num_attention_heads"]:
        d, base_arch = _llama_as_mistral(d), "MistralForCausalLM"
    config_cls = getattr(transformers, SUPPORTED_ARCHITECTURES[base_arch][0])
    d["architectures"] = [base_arch]
    d["tie_word_embeddings"] = _tied(model)
    d["dtype"] = _dtype_name(_model_dtype(model))
    cfg = config_cls.from_dict(d)
    if cfg.model_type != STOCK_MODEL_TYPES[base_arch]:  # a broken transformers install, not user input
        raise RuntimeError(f"{config_cls.__name__} has model_type {cfg.model_type!r}")
    return cfg


def _stock_tensors(model, cfg) -> dict[str, torch.Tensor]:
    """The tensors a fresh stock model of ``cfg`` expects, taken from ``model`` and checked by shape."""
    import transformers

    model_cls = getattr(transformers, cfg.architectures[0])
    with torch.device("meta"):
        reference = model_cls(cfg)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return tensors_to_save(model, expected, "the stock architecture", "the stock config gives")


def save_uniform(model, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Saves a uniformly pruned (or unpruned) Llama/Mistral/Qwen2 causal LM as a stock directory.

    Everything is checked first (same widths in every layer, tensor shapes against the stock
    architecture, JSON-able ``extra``), then written to a temporary sibling directory that is
    renamed into place; on any error nothing is left behind and an existing ``out_dir`` is kept.
    A non-empty ``out_dir`` is replaced only with ``overwrite=True``. Returns the directory.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict (saved as {PRUNING_INFO_FILE}), got {type(extra).__name__}")

    cfg = stock_config(model)
    tensors = _stock_tensors(model, cfg)
    config_json = json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=json_default) + "\n"
    info_json = info_text(extra)

    from safetensors.torch import save_file
    from transformers import AutoConfig

    with staged_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config_json, encoding="utf-8")
        back = AutoConfig.from_pretrained(str(tmp))  # what a stock reader will see
        for key in ("model_type", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
                    "sliding_window"):
            if getattr(back, key, None) != getattr(cfg, key, None):
                raise RuntimeError(f"{CONFIG_FILE} reads back {key}={getattr(back, key)!r}, "
                                   f"expected {getattr(cfg, key)!r}")
        write_extras(tmp, model, tokenizer, info_json)
    return out_dir
