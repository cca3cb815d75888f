"""Settings of a recovery run (:class:`RecoverConfig`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["DEFAULT_TARGET_MODULES", "RecoverConfig"]

#: every attention and MLP projection of a LLaMA-family decoder layer
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RecoverConfig:
    """LoRA recovery settings; the defaults are LLM-Pruner's / MoreauPruner's recovery stage.

    ``batch_size`` examples make one optimizer step, run ``micro_batch_size`` at a time (the loss is
    the mean over every labelled token of the whole batch, so micro-batching does not change it).
    ``max_steps`` (if set) replaces ``epochs`` as the length of the run. The learning rate rises
    linearly over ``warmup_steps`` and then stays at ``lr``. ``dtype`` None: bfloat16 on a GPU,
    float32 on a CPU. ``eval_windows`` windows of ``eval_seq_len`` tokens of held-out text are
    scored before and after (None: all of the held-out text; 0: no evaluation).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 1e-4
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
    cutoff_len: int = 256
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 1
    eval_seq_len: int = 128
    eval_windows: int | None = 32
    device: str = "cpu"
    dtype: str | None = None

    def validate(self) -> "RecoverConfig":
        def positive_int(name, minimum=1, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        for name in ("rank", "epochs", "batch_size", "save_every", "keep_checkpoints"):
            positive_int(name)
        positive_int("micro_batch_size", allow_none=True)
        positive_int("max_steps", minimum=0, allow_none=True)
        positive_int("warmup_steps", minimum=0)
        positive_int("cutoff_len", minimum=2)
        positive_int("eval_seq_len", minimum=2)
        positive_int("eval_windows", minimum=0, allow_none=True)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.dtype is not None:
            from ..model.loading import parse_dtype

            parse_dtype(self.dtype)
        return self

    def resolved_dtype(self) -> torch.dtype:
        from ..model.loading import parse_dtype

        if self.dtype is not None:
            return parse_dtype(self.dtype)
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32

    def training_fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed. The length of the run
        (``epochs``, ``max_steps``) is not among them: the data order and the learning rate of a step
        do not depend on it, so a run can be resumed to stop earlier or go on longer."""
        skip = {"save_every", "keep_checkpoints", "eval_seq_len", "eval_windows", "device", "epochs", "max_steps"}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["target_modules"] = list(self.target_modules)
        d["dtype"] = str(self.resolved_dtype()).removeprefix("torch.")
        return d
