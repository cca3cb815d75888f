"""Models whose parameters live on the ``meta`` device: shapes and dtypes without memory.

Memory planning builds LLaMA-shaped models of the sizes people prune (:data:`SHAPES`) this way,
and the FSDP2 loader builds each rank's model skeleton before filling in only its rows.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

#: LLaMA-family shapes (Hugging Face config fields) for memory planning
SHAPES = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}


@contextlib.contextmanager
def params_on_meta():
    """Construct modules with their parameters on ``meta`` (buffers stay real). A parameter that is
    already on meta is registered as is, so tied weights stay tied."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_model(spec: str | dict | Callable[[], nn.Module], dtype: torch.dtype = torch.bfloat16,
               attn_implementation: str = "sdpa", real_buffers: bool = False) -> nn.Module:
    """A model with its parameters on ``meta`` in ``dtype``, in eval mode.

    ``spec``: a name of :data:`SHAPES` or a LLaMA config dict (a ``LlamaForCausalLM`` with
    ``attn_implementation``), or a factory ``() -> nn.Module``. ``real_buffers=False`` (planning):
    everything, buffers included, is built on ``meta`` and cast to ``dtype``; ``real_buffers=True``
    (a skeleton to fill with real weights): buffers such as the rotary frequencies are computed for
    real and keep their dtype.
    """
    if callable(spec):
        factory = spec
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        if isinstance(spec, str):
            if spec not in SHAPES:
                raise ValueError(f"unknown shape {spec!r}; choose one of {', '.join(SHAPES)}")
            spec = SHAPES[spec]
        cfg = LlamaConfig(**spec)
        cfg._attn_implementation = attn_implementation

        def factory():
            return LlamaForCausalLM(cfg)
    if not real_buffers:
        with torch.device("meta"):
            model = factory()
        return model.to(dtype).eval()
    with params_on_meta():
        model = factory()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()
