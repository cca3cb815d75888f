"""Activation checkpointing of a Hugging Face model for the duration of an estimate.

Checkpointing keeps each decoder layer's input and recomputes the layer in the backward, so the
activations of a forward/backward shrink to one layer's plus the layer inputs (the memory plan's
``gradient_checkpointing=True``). The lean and regen strategies offer it; the reference one runs
the model in eval mode, where HF layers do not checkpoint.
"""
from __future__ import annotations

import contextlib
import warnings

from torch import nn


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Enable HF activation checkpointing (non-reentrant) for the block; restore it afterwards.

    HF layers checkpoint only in training mode, so the checkpointed layers (and only they, not
    their sub-modules: no dropout is switched on) get ``training=True``; the caller's
    ``model.train(was_training)`` resets the flags.
    """
    if not enabled:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable",
                                                                               None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing=True needs a Hugging Face model that supports it; "
                         f"{type(model).__name__} does not")
    was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    had_input_hook = hasattr(model, "_require_grads_hook")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
        yield
    finally:
        if not was_on:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                disable()
            if not had_input_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
