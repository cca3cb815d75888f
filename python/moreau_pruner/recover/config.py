"""Settings of a recovery run (:class:`RecoverConfig`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["DEFAULT_TARGET_MODULES", "DISTILL_FIELDS", "GENERATE_FIELDS", "LR_SCHEDULES", "RecoverConfig", "TUNINGS"]

#: every attention and MLP projection of a LLaMA-family decoder layer
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: what is trained: LoRA adapters merged at the end, or every weight of the pruned model
TUNINGS = ("lora", "full")
#: the settings that only distillation reads
DISTILL_FIELDS = ("distill_temperature", "distill_top_k", "lm_weight", "teacher_dtype")
#: the settings a plain LoRA run with the LM loss leaves out of its report and checkpoint fingerprint,
#: so that it records exactly what it recorded before distillation and full fine-tuning existed
_NOT_PLAIN_LORA = ("tuning", "distill", *DISTILL_FIELDS)
#: the learning rate after the warm-up: constant, or a cosine decay to ``min_lr`` at the end of the run
LR_SCHEDULES = ("constant", "cosine")
#: the settings of teacher-generated recovery text (``data="generated"``); the report and the checkpoint
#: fingerprint carry them with the data (:attr:`RecoveryData.generation`), not among the training settings
GENERATE_FIELDS = ("generate_samples", "generate_temperature", "generate_batch_size")


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery settings; the defaults are LLM-Pruner's / MoreauPruner's recovery stage (LoRA, LM loss).

    ``batch_size`` examples make one optimizer step, run ``micro_batch_size`` at a time (the loss is
    the mean over every labelled token of the whole batch, so micro-batching does not change it).
    ``max_steps`` (if set) replaces ``epochs`` as the length of the run. The learning rate rises
    linearly over ``warmup_steps`` and then stays at ``lr`` (``lr_schedule="constant"``) or follows a
    half cosine from ``lr`` down to ``min_lr``, reached at the end of the run (``"cosine"``; the decay
    then depends on the length of the run, so a cosine run resumes only to the same length). ``dtype`` None: bfloat16 on a GPU,
    float32 on a CPU. ``eval_windows`` windows of ``eval_seq_len`` tokens of held-out text are
    scored before and after (None: all of the held-out text; 0: no evaluation).

    ``tuning``: ``"lora"`` (adapters on ``target_modules``, merged at the end) or ``"full"`` (every
    weight of the pruned model is trained; with a 16-bit ``dtype`` the weights are kept in float32
    and the forward runs under autocast, and the saved model is in ``dtype``).

    ``distill``: the loss is the KL divergence from the dense teacher's next-token distribution to the
    student's, ``KL(p_teacher || p_student)`` at every labelled position, both at temperature
    ``distill_temperature`` and multiplied by its square (so the gradient's scale does not depend on
    it), mixed with the LM loss as ``(1 - lm_weight) * T² * KL + lm_weight * CE``. This direction
    (the forward KL of Hinton et al.'s distillation) makes the student cover every continuation the
    teacher gives mass to, which is what perplexity on any text rewards; the reverse KL
    (mode-seeking, MiniLLM) suits generation but lets the student drop the teacher's rarer tokens.
    ``distill_top_k``: compare the distributions on the teacher's ``k`` most likely tokens plus one
    bin holding the rest of the mass (an exact KL of the coarsened distributions, equal to the full
    KL when ``k`` covers the vocabulary); None compares all tokens. ``teacher_dtype``: the teacher's
    weights (None: the student's ``dtype``; never wider than it).

    ``generate_samples``, ``generate_temperature``, ``generate_batch_size``: with teacher-generated
    recovery text (``data="generated"``, :mod:`.generate`), how many sequences of ``cutoff_len`` tokens the
    teacher samples, at which temperature, how many at a time; seeded by ``seed``.
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
    tuning: str = "lora"
    distill: bool = False
    distill_temperature: float = 1.0
    distill_top_k: int | None = None
    lm_weight: float = 0.0
    teacher_dtype: str | None = None
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    generate_samples: int = 256
    generate_temperature: float = 1.0
    generate_batch_size: int = 16

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
        if self.tuning not in TUNINGS:
            raise ValueError(f"tuning must be one of {', '.join(TUNINGS)}, got {self.tuning!r}")
        self._validate_distill()
        self._validate_schedule()
        positive_int("generate_samples", minimum=2)
        positive_int("generate_batch_size")
        t = self.generate_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"generate_temperature must be a positive finite number, got {t!r}")
        return self

    def _validate_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        m = self.min_lr
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and 0 <= m < self.lr):
            raise ValueError(f"min_lr must be a number in [0, lr={self.lr:g}), got {m!r}")
        if self.lr_schedule == "constant" and m != 0:
            raise ValueError("min_lr is where the cosine schedule ends: set lr_schedule='cosine' (--lr-schedule "
                             "cosine) or leave min_lr at 0")

    def generation(self, teacher: str = ""):
        """The :class:`.generate.GenerationSettings` of teacher-generated recovery text under these settings."""
        from .generate import GenerationSettings

        return GenerationSettings(samples=self.generate_samples, length=self.cutoff_len,
                                  temperature=self.generate_temperature, seed=self.seed,
                                  batch_size=self.generate_batch_size, teacher=teacher)

    def _validate_distill(self) -> None:
        if not isinstance(self.distill, bool):
            raise ValueError(f"distill must be True or False, got {self.distill!r}")
        if not self.distill:
            changed = [f.name for f in fields(self) if f.name in DISTILL_FIELDS and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to distillation: set distill=True (--distill) "
                                 "or leave them at their defaults")
            return
        t = self.distill_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"distill_temperature must be a positive finite number, got {t!r}")
        w = self.lm_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0.0 <= w < 1.0):
            raise ValueError(f"lm_weight (the LM loss's share of the distillation loss) must be in [0, 1), "
                             f"got {w!r}; 1 would leave no distillation: drop distill instead")
        k = self.distill_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"distill_top_k must be an int >= 1 or None (every token), got {k!r}")
        teacher = self.resolved_teacher_dtype()
        student = self.resolved_dtype()
        if teacher.itemsize > student.itemsize:
            raise ValueError(f"teacher_dtype {self.teacher_dtype} is wider than the student's "
                             f"{str(student).removeprefix('torch.')}: the teacher runs in the student's dtype or lower")

    def resolved_dtype(self) -> torch.dtype:
        from ..model.loading import parse_dtype

        if self.dtype is not None:
            return parse_dtype(self.dtype)
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32

    def resolved_teacher_dtype(self) -> torch.dtype:
        from ..model.loading import parse_dtype

        return parse_dtype(self.teacher_dtype) if self.teacher_dtype is not None else self.resolved_dtype()

    @property
    def plain_lora(self) -> bool:
        """LoRA with the LM loss: the recipe of LLM-Pruner and MoreauPruner."""
        return self.tuning == "lora" and not self.distill

    def as_report(self) -> dict:
        """The settings as the run's report records them (a plain LoRA run: without the distillation
        and tuning fields, as before they existed)."""
        d = {**asdict(self), "target_modules": list(self.target_modules)}
        leave = set(GENERATE_FIELDS) | (set(_NOT_PLAIN_LORA) if self.plain_lora else set())
        if self.lr_schedule == "constant":  # (as before schedules existed)
            leave |= {"lr_schedule", "min_lr"}
        return {k: v for k, v in d.items() if k not in leave}

    def training_fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed. The length of the run
        (``epochs``, ``max_steps``) is not among them: the data order and the learning rate of a step
        do not depend on it, so a run can be resumed to stop earlier or go on longer; with the cosine
        schedule they are, since the learning rate of a step depends on where the run ends."""
        skip = {"save_every", "keep_checkpoints", "eval_seq_len", "eval_windows", "device"}
        if self.lr_schedule == "constant":
            skip |= {"epochs", "max_steps"}
        d = {k: v for k, v in self.as_report().items() if k not in skip}
        d["dtype"] = str(self.resolved_dtype()).removeprefix("torch.")
        if self.distill:
            d["teacher_dtype"] = str(self.resolved_teacher_dtype()).removeprefix("torch.")
        return d
