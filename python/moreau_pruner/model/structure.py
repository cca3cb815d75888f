"""LLaMA-family structure: the prunable units, found from the model's modules and config.

No autograd-graph tracing (SPEC §4): the q/k/v/o and gate/up/down linears are found by name in
each decoder layer, and the head counts are read off their shapes, so an already pruned model
(different widths per layer) is described correctly too.

Attention units (SPEC §4): with H query heads, H_kv key/value heads and n_rep = H // H_kv,
query head h uses KV head h // n_rep (HF ``repeat_kv``). A ``kv-group`` unit is KV head k with
query heads k*n_rep .. k*n_rep + n_rep - 1; a ``query-heads`` unit is one query head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
GRANULARITIES = ("kv-group", "query-heads")


class UnsupportedArchitecture(ValueError):
    """The model is not a LLaMA-family causal LM this package knows how to prune."""


@dataclass
class LayerStructure:
    index: int
    layer: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    head_dim: int

    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def intermediate_size(self) -> int:
        return self.gate.out_features

    @property
    def n_attention_units(self) -> int:
        """Number of KV groups (the ``kv-group`` attention units)."""
        return self.n_kv_heads

    def attention_params(self) -> list[nn.Parameter]:
        return [p for m in (self.q, self.k, self.v, self.o) for p in m.parameters()]

    def mlp_params(self) -> list[nn.Parameter]:
        return [p for m in (self.gate, self.up, self.down) for p in m.parameters()]

    def attention_unit_map(self):
        """(param, axis, kv-group index of each row/column/element) for the attention tensors."""
        d, n_rep = self.head_dim, self.n_rep
        dev = self.q.weight.device
        q_unit = torch.arange(self.q.out_features, device=dev) // d // n_rep
        kv_unit = torch.arange(self.k.out_features, device=dev) // d
        out = [(self.q.weight, 0, q_unit), (self.k.weight, 0, kv_unit), (self.v.weight, 0, kv_unit),
               (self.o.weight, 1, q_unit)]
        for lin, unit in ((self.q, q_unit), (self.k, kv_unit), (self.v, kv_unit)):
            if lin.bias is not None:
                out.append((lin.bias, 0, unit))
        return out

    def mlp_unit_map(self):
        """(param, axis, channel index) for the MLP tensors."""
        ch = torch.arange(self.intermediate_size, device=self.gate.weight.device)
        out = [(self.gate.weight, 0, ch), (self.up.weight, 0, ch), (self.down.weight, 1, ch)]
        for lin in (self.gate, self.up):
            if lin.bias is not None:
                out.append((lin.bias, 0, ch))
        return out


@dataclass
class ModelStructure:
    model: nn.Module
    model_type: str
    layers: list[LayerStructure]
    hidden_size: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def projection_names(self, layers: set[int] | None = None) -> list[str]:
        """Names of the q/k/v/o and gate/up/down weights of ``layers`` (None: all), layer by layer."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(lin.weight)] for ls in self.layers if layers is None or ls.index in layers
                for lin in (ls.q, ls.k, ls.v, ls.o, ls.gate, ls.up, ls.down)]

    def widths(self) -> list[dict]:
        return [{"layer": ls.index, "num_attention_heads": ls.n_heads, "num_key_value_heads": ls.n_kv_heads,
                 "intermediate_size": ls.intermediate_size} for ls in self.layers]


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (``model.model.layers``) of a LLaMA-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no model.layers ModuleList; expected a LLaMA-family *ForCausalLM "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    return layers


def discover(model: nn.Module) -> ModelStructure:
    """Describe a LLaMA / Mistral / Qwen2 causal LM's prunable units, or raise UnsupportedArchitecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base_type = getattr(config, "base_model_type", None) or model_type  # pruned checkpoints
    if base_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {type(model).__name__} (model_type={model_type!r}); supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA 1/2/3, Mistral, Qwen2-style biases)")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    out = []
    for i, layer in enumerate(find_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            mods = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            mods += [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        except AttributeError as e:
            raise UnsupportedArchitecture(f"layer {i} lacks the LLaMA attention/MLP linears: {e}") from None
        if not all(isinstance(m, nn.Linear) for m in mods):
            raise UnsupportedArchitecture(f"layer {i}: expected nn.Linear projections, got "
                                          f"{[type(m).__name__ for m in mods]} (quantized models are not supported)")
        ls = LayerStructure(i, layer, *mods, head_dim=getattr(attn, "head_dim", head_dim))
        if ls.q.out_features % ls.head_dim or ls.k.out_features % ls.head_dim or ls.n_heads % max(ls.n_kv_heads, 1):
            raise UnsupportedArchitecture(
                f"layer {i}: q/k widths {ls.q.out_features}/{ls.k.out_features} are not whole heads of {ls.head_dim} "
                f"with a whole number of query heads per KV head")
        out.append(ls)
    return ModelStructure(model, base_type, out, hidden, head_dim)


def parse_layer_range(spec, num_layers: int, what: str = "layer range") -> tuple[int, int]:
    """'4:28' / (4, 28) / '4:' / ':28' / a name → (start, end), end exclusive, checked against the
    model. An empty START is 0 and an empty END the model's depth (as in a Python slice). Names:
    'all' (every layer), 'published' or None (the published range scaled to the model,
    :func:`default_layer_range`), 'published-to-end' (its start, through the last layer)."""
    named = spec.strip().lower() if isinstance(spec, str) else None
    if spec is None or named == "published":
        return default_layer_range(num_layers)
    if named == "all":
        return 0, num_layers
    if named == "published-to-end":
        return default_layer_range(num_layers)[0], num_layers
    if isinstance(spec, str):
        parts = spec.replace("-", ":").split(":")
        if len(parts) != 2:
            raise ValueError(f"{what} must look like START:END (end exclusive), 'all', 'published' or "
                             f"'published-to-end', got {spec!r}")
        try:
            start = int(parts[0]) if parts[0].strip() else 0
            end = int(parts[1]) if parts[1].strip() else num_layers
        except ValueError:
            raise ValueError(f"{what} must look like START:END with integers, got {spec!r}") from None
    else:
        start, end = spec
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"{what} {start}:{end} is outside the model's layers 0:{num_layers} (end exclusive)")
    return start, end


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """The published LLaMA-7B choice (layers 4..29 of 32) scaled to the model's depth."""
    start = round(num_layers * 4 / 32)
    end = round(num_layers * 30 / 32)
    return (start, end) if end > start else (0, num_layers)
