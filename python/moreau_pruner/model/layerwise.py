"""Layer by layer through the decoder stack, as SparseGPT's and Wanda's calibration loops go.

The calibration batch enters the first decoder layer (:func:`decoder_inputs` runs the model up to
there and keeps what that layer receives: the hidden states and the other arguments, such as the
rotary embeddings and the causal mask, one entry per micro-batch). :func:`walk_layers` then hands
each layer in turn to a ``visit`` function, which may run it on those inputs (with hooks, to
measure what its linears see) and change its weights, and only then runs the layer, as ``visit``
left it, to make the next layer's inputs. So every layer is measured on what the already changed
(pruned, compensated) layers before it produce, and only one layer's work is in flight at a time:
the memory is the hidden states of the batch plus one layer's activations.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the hook that captures the first decoder layer's inputs: the rest of the model need not run."""


@torch.no_grad()
def decoder_inputs(model: nn.Module, first_layer: nn.Module, batch: torch.Tensor, micro_batch_size: int) -> list:
    """[(hidden_states, other args, kwargs)] entering ``first_layer``, one entry per micro-batch
    of ``micro_batch_size`` rows of ``batch`` (the forward stops there: the rest of the model does
    not run)."""
    captured = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.detach(), rest, kw))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, batch.shape[0], micro_batch_size):
            try:
                model(input_ids=batch[start:start + micro_batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer outputs for one :func:`decoder_inputs` entry."""
    out = layer(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_states(layer: nn.Module, states: list) -> None:
    """Run ``layer`` on every micro-batch of ``states`` for what its hooks see (outputs dropped)."""
    for hidden, rest, kw in states:
        run_layer(layer, hidden, rest, kw)


@torch.no_grad()
def walk_layers(model: nn.Module, batch: torch.Tensor, structure, visit: Callable, micro_batch_size: int | None = None,
                last: int | None = None) -> None:
    """For each decoder layer of ``structure`` in order: ``visit(layer_structure, states)``, then the
    layer as ``visit`` left it turns ``states`` into the next layer's inputs (module docstring).
    ``states`` are :func:`decoder_inputs`' entries for the rows of ``batch`` in micro-batches of
    ``micro_batch_size`` (default: all at once). ``last``: the index of the last layer to visit
    (default: every layer); the walk stops there. The model runs in eval mode, its mode restored
    afterwards."""
    n = batch.shape[0]
    mbs = micro_batch_size or n
    layers = [ls for ls in structure.layers if last is None or ls.index <= last]
    was_training = model.training
    model.eval()
    try:
        states = decoder_inputs(model, structure.layers[0].layer, batch, mbs)
        for ls in layers:
            visit(ls, states)
            if ls is not layers[-1]:  # the changed layer's outputs feed the next one
                states = [(run_layer(ls.layer, hidden, rest, kw), rest, kw) for hidden, rest, kw in states]
    finally:
        model.train(was_training)
