"""Small models for the export and engine tests: the shapes of tests/golden.py with a real byte-level BPE
vocabulary (SmolLM2's, cut to its first 1024 tokens by the ``small_tokenizer_dir`` fixture, or whole),
stock (uniform) or with per-layer widths, saved next to that tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from golden import tiny_model

VOCAB = 1024  # the small_tokenizer_dir fixture's; SmolLM2's whole vocabulary is 49152
#: per-layer widths (query heads, KV heads, MLP channels) of four layers, per kind; heads divide by KV heads
PER_LAYER = {
    "llama": ([6, 4, 2, 6], [2, 2, 1, 2], [40, 24, 13, 32]),
    "mistral": ([6, 3, 2, 4], [2, 1, 2, 2], [17, 40, 8, 24]),
    "qwen2": ([6, 3, 4, 2], [3, 3, 2, 1], [40, 20, 30, 9]),
}


def sharpen(model):
    """Scales q/k so that attention is far from uniform (rotary or head-order mistakes then change the
    logits) and gives norms and biases values away from their initial ones."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.model.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj):
                lin.weight.mul_(10)
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.add_(0.2 * torch.randn(norm.weight.shape, generator=g))
    return model.eval()


def stock_model(kind: str, seed: int = 0, **overrides):
    """golden's ``kind`` model with a ``VOCAB``-token vocabulary (uniform widths, a stock transformers class)."""
    overrides.setdefault("vocab_size", VOCAB)
    return sharpen(tiny_model(kind, seed, **overrides))


def per_layer_model(kind: str, seed: int = 0, widths=None, **overrides):
    """A model of ``kind`` whose layers have the widths ``PER_LAYER[kind]`` (or ``widths``), as pruning
    with per-layer allocation leaves it: the package's pruned class, random weights."""
    from moreau_pruner.io.pruned import template_module

    overrides.setdefault("vocab_size", VOCAB)
    stock = tiny_model(kind, seed, **overrides)
    heads, kv, ff = widths or PER_LAYER[kind]
    d = stock.config.to_dict()
    d.update(layer_num_attention_heads=heads, layer_num_key_value_heads=kv, layer_intermediate_size=ff)
    template = template_module(type(stock).__name__)
    torch.manual_seed(seed + 1)
    model = template.PrunedForCausalLM(template.PrunedConfig.from_dict(d))
    if kind == "qwen2":
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.v_proj.bias.normal_()
    return sharpen(model)


def save(model, directory, tokenizer_dir, uniform: bool | None = None):
    """Saves ``model`` with the tokenizer in ``tokenizer_dir``: stock (``save_uniform``) when its widths are uniform,
    else per-layer (``save_pruned``); ``uniform`` forces the choice."""
    from transformers import PreTrainedTokenizerFast

    from moreau_pruner import save_pruned, save_uniform

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    if uniform is None:
        uniform = type(model).__name__ != "PrunedForCausalLM"
    (save_uniform if uniform else save_pruned)(model, directory, tokenizer=tok)
    return directory


def token_ids(n: int = 24, seed: int = 7) -> list[int]:
    """``n`` token ids spread over the vocabulary (ordinary tokens, no special ones)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, VOCAB, (n,), generator=g).tolist()


def cache_dir() -> Path:
    """Where scripts/setup.sh keeps what the engine tests need (llama.cpp's converter, transformers' floor)."""
    return Path(os.environ.get("MOREAU_CACHE_DIR", Path.home() / ".cache" / "moreau-kernels"))
