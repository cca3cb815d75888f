"""Modeling code for a structurally pruned LLaMA-family causal LM.

Written into a saved directory by ``moreau_pruner.io.pruned.save_pruned``. The decoder layers of a
pruned model have different widths: layer ``l`` keeps ``layer_num_attention_heads[l]`` query
heads, ``layer_num_key_value_heads[l]`` key/value heads and ``layer_intermediate_size[l]`` MLP
channels (head_dim and hidden_size are unchanged). This file builds the stock transformers model
and then replaces each layer's linears by ones of the recorded widths, so that
``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` loads the weights.

Self-contained: it imports only torch and transformers. The three lines marked
``moreau:...`` are rewritten for the base architecture (Llama, Mistral, Qwen2) when saving.
"""

from torch import nn

from transformers import LlamaConfig as _BaseConfig  # moreau:base-config
from transformers import LlamaForCausalLM as _BaseForCausalLM  # moreau:base-model

PRUNED_MODEL_TYPE = "pruned_llama"  # moreau:model-type

PER_LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def _per_layer_widths(config):
    """Returns the three per-layer width lists of ``config``, checked."""
    n_layers = config.num_hidden_layers
    lists = []
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if value is None:
            raise ValueError(f"pruned model config has no '{key}' (per-layer widths are required)")
        value = list(value)
        if len(value) != n_layers:
            raise ValueError(f"config '{key}' has {len(value)} entries but num_hidden_layers is {n_layers}")
        for layer, width in enumerate(value):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"config '{key}'[{layer}] = {width!r} is not a positive integer")
        lists.append(value)
    heads, kv_heads, intermediate = lists
    for layer, (h, h_kv) in enumerate(zip(heads, kv_heads)):
        if h % h_kv != 0:
            raise ValueError(
                f"layer {layer}: {h} query heads is not a multiple of {h_kv} key/value heads"
            )
    return heads, kv_heads, intermediate


def _linear_like(old, in_features, out_features):
    """``old`` if it already has the shape, else a new nn.Linear on the same device/dtype."""
    if old.in_features == in_features and old.out_features == out_features:
        return old
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def resize_pruned_layers(model, config=None):
    """Gives every decoder layer of ``model`` the per-layer widths recorded in ``config``.

    Replaces q/k/v/o and gate/up/down by nn.Linear of the recorded shapes (keeping a bias
    exactly where the base layer has one) and sets ``self_attn.num_key_value_groups``. New
    linears are created on the device and dtype of the ones they replace (the meta device
    under ``from_pretrained``); their values are meant to be overwritten by loaded weights.
    """
    config = model.config if config is None else config
    heads, kv_heads, intermediate = _per_layer_widths(config)
    layers = model.model.layers
    if len(layers) != len(heads):
        raise ValueError(f"model has {len(layers)} decoder layers but the config lists {len(heads)}")
    hidden = config.hidden_size
    for layer, block in enumerate(layers):
        attn, mlp = block.self_attn, block.mlp
        d = attn.head_dim
        h, h_kv, inter = heads[layer], kv_heads[layer], intermediate[layer]
        attn.q_proj = _linear_like(attn.q_proj, hidden, h * d)
        attn.k_proj = _linear_like(attn.k_proj, hidden, h_kv * d)
        attn.v_proj = _linear_like(attn.v_proj, hidden, h_kv * d)
        attn.o_proj = _linear_like(attn.o_proj, h * d, hidden)
        attn.num_key_value_groups = h // h_kv
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, h)
        for name in ("num_key_value_heads",):
            if hasattr(attn, name):
                setattr(attn, name, h_kv)
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, inter)
        mlp.down_proj = _linear_like(mlp.down_proj, inter, hidden)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    return model


class PrunedConfig(_BaseConfig):
    """The base config plus per-layer widths (``layer_num_attention_heads``, ...)."""

    model_type = PRUNED_MODEL_TYPE
    base_model_type = _BaseConfig.model_type  # what the layers are (a class attribute, not saved)


class PrunedForCausalLM(_BaseForCausalLM):
    """The base causal LM with per-layer attention heads and MLP widths."""

    config_class = PrunedConfig

    def __init__(self, config):
        super().__init__(config)
        resize_pruned_layers(self, config)


__all__ = ["PrunedConfig", "PrunedForCausalLM", "resize_pruned_layers", "PER_LAYER_KEYS"]
