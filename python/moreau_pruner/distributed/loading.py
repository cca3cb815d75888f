"""Models sharded over FSDP2 ranks: built on ``meta``, filled with each rank's rows, gathered at the end.

* **Model.** Built from its config with parameters on the ``meta`` device (buffers such as the
  rotary frequencies are real), ``fully_shard`` on every decoder layer and on the root with
  ``MixedPrecisionPolicy(reduce_dtype=float32)``, then ``to_empty`` and filled with this rank's rows
  only. From a Hugging Face safetensors directory each rank reads just its rows
  (``safe_open(...).get_slice``); a ``.gguf`` file (the embedded SmolLM2) or a pruned directory is
  loaded whole on the CPU of every rank first (their loaders cannot read slices), then sliced.
* **Save.** The full state dict is gathered to rank 0's CPU
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and loaded into a plain model,
  so rank 0 needs host memory for the whole model at the end (not for the estimate).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..estimate.params import unique_named_parameters
from ..estimate.strategies.fsdp import shard_range
from ..io.pruned import read_config
from ..io.staging import check_complete
from ..model.checks import check_loading, check_stock_config, check_weights
from ..model.loading import embedded_model_path, load_model, parse_dtype
from ..model.meta import meta_model
from ..model.structure import find_layers
from .context import Context


def fully_shard_model(model: nn.Module, ctx: Context) -> nn.Module:
    """FSDP2 on every decoder layer and the root, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in find_layers(model):
        fully_shard(layer, mesh=ctx.mesh, mp_policy=mp)
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    return model


def materialize(model: nn.Module, ctx: Context, rows_of: Callable[[str, int, int], torch.Tensor]) -> None:
    """``to_empty`` on this rank's device, then fill every local shard with ``rows_of(name, start,
    stop)`` and put the real buffers back."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=ctx.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in unique_named_parameters(model):
            local = p.to_local()
            start, stop = shard_range(p.shape[0], ctx.world, ctx.rank)
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: FSDP2 gave rank {ctx.rank} {local.shape[0]} rows, expected {stop - start}")
            if stop > start:
                local.copy_(rows_of(name, start, stop))


class SafetensorsRows:
    """Read row slices of named tensors from a safetensors checkpoint (one file or an index)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = check_weights(directory)  # shards inside the directory, headers readable
        if not files:
            raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json")
        self._files = {}
        self._where = {}
        for path in files:
            h = safe_open(str(path), framework="pt", device="cpu")
            self._files[path.name] = h
            for k in h.keys():
                self._where[k] = path.name

    def check_fits(self, model: nn.Module, directory: Path) -> None:
        """A ValueError naming the tensors ``model`` (a meta model of config.json) needs that the checkpoint
        lacks, those it holds that the model has no place for, and those of another shape, before any rank
        reads a row (the check one process gets from :func:`moreau_pruner.model.checks.load_checked`)."""
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        have = {k: tuple(self._files[f].get_slice(k).get_shape()) for k, f in self._where.items()}
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
        check_loading(directory, {
            "missing_keys": [n for n, _ in unique_named_parameters(model) if n not in have],
            "unexpected_keys": [k for k in have if k not in expected and not any(p.search(k) for p in ignored)],
            "mismatched_keys": [(k, have[k], expected[k]) for k in have if k in expected and have[k] != expected[k]]})

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return self._files[f].get_slice(name)[start:stop]


@dataclass
class ShardedModel:
    """An FSDP2-sharded model, its tokenizer and how to build its plain twin on rank 0."""

    model: nn.Module
    tokenizer: object
    factory: Callable[[], nn.Module]
    dtype: torch.dtype
    sliced_loading: bool


def load_sharded(spec, dtype, ctx: Context) -> ShardedModel:
    """Load ``spec`` (as :func:`moreau_pruner.model.loading.load_model` understands it) sharded over ranks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) or torch.float32
    path = embedded_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a .gguf file or a local model directory)")
    if path.is_dir():
        check_complete(path)
    cfg = read_config(path) if path.is_dir() else {}
    if cfg and "layer_intermediate_size" not in cfg:
        check_stock_config(cfg, path / "config.json")
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        reader = SafetensorsRows(path)

        def factory():
            return AutoModelForCausalLM.from_config(config)

        meta = meta_model(factory, torch_dtype, real_buffers=True)
        reader.check_fits(meta, path)
        model = fully_shard_model(meta, ctx)
        materialize(model, ctx, lambda n, a, b: reader(n, a, b).to(torch_dtype))
        return ShardedModel(model, tok, factory, torch_dtype, True)
    full, tok = load_model(spec, torch_dtype, "cpu")  # every rank reads the whole file (no sliced reader)
    cls, config = type(full), full.config

    def factory():
        return cls(config)

    state = dict(unique_named_parameters(full))
    model = fully_shard_model(meta_model(factory, torch_dtype, real_buffers=True), ctx)
    materialize(model, ctx, lambda n, a, b: state[n].detach()[a:b])
    del state, full
    return ShardedModel(model, tok, factory, torch_dtype, False)


def gather_to_rank0(sm: ShardedModel, ctx: Context) -> nn.Module | None:
    """Collective: rank 0 gets a plain (unsharded, CPU) model with the full weights, others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(sm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    plain = meta_model(sm.factory, sm.dtype, real_buffers=True)
    buffers = {n: b.detach().clone() for n, b in plain.named_buffers()}
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    still_meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if unexpected or still_meta:
        raise RuntimeError(f"gathered state dict does not fit the model: missing {still_meta[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    with torch.no_grad():
        for n, b in plain.named_buffers():
            b.copy_(buffers[n])
    return plain.eval()
