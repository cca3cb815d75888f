"""What a whole run is asked to do (:class:`PruneJob`, checked by whoever builds it) and the data it
reads: the calibration batch and the held-out tokens, and how half-precision products run."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from . import data
from .estimate.config import MoreauConfig
from .prune import rules
from .prune.compensate import CompensateConfig
from .prune.config import PruneConfig
from .prune.policy import PolicyConfig
from .score.registry import ScoringOptions


@dataclass(frozen=True)
class DataSettings:
    """Calibration and evaluation data of a run."""

    calib: str = "pydoc"  # a named corpus or a text file; its held-out side is the evaluation text
    calib_file: str | None = None  # use this whole file for calibration
    eval_file: str | None = None  # use this whole file for evaluation
    num_examples: int = 10
    seq_len: int = 64
    seed: int = 0
    eval_seq_lens: tuple[int, ...] = (128, 1024)  # empty: no evaluation
    eval_tokens: int = 8192  # first N held-out tokens per window length (0: all)
    generate: str | None = "The Python interpreter"  # prompt of the greedy sample ('' or None: none)


@dataclass(frozen=True)
class UnstructuredSettings:
    """Unstructured / N:M pruning (zeroing single weights)."""

    nm: tuple[int, int] | None = None
    keep_low_ratio: float = 0.0
    one_pass_activations: bool = False
    allocation: str = "uniform"  # a layer allocator, "trim", or "<layer>+trim"


@dataclass
class PruneJob:
    """Everything a run needs, checked by whoever builds it (the CLI: :mod:`moreau_pruner.cli.prune`)."""

    model: str | None = None  # a .gguf file, a model directory; None: the embedded SmolLM2
    dtype: str = "float32"
    device: str = "cpu"
    half_gemm: str = "auto"  # bf16/fp16 products: auto, native or fp32-accumulate
    backend: str = "auto"
    method: str = "moreau"
    prune: PruneConfig = field(default_factory=PruneConfig)
    moreau: MoreauConfig = field(default_factory=MoreauConfig)
    options: ScoringOptions = field(default_factory=ScoringOptions)
    policy: PolicyConfig | None = None
    allocation: str = "uniform"
    rounds: int = 1
    unstructured: UnstructuredSettings | None = None
    data: DataSettings = field(default_factory=DataSettings)
    out: str | None = None
    overwrite: bool = False
    json: str | None = None
    distributed: str | None = None  # "fsdp": FSDP2 over the ranks of a torchrun job
    progress: bool = True
    settings: dict = field(default_factory=dict)  # how the run was asked for (the report records it)
    compensate: CompensateConfig | None = None  # weight compensation of the pruned layers (SPEC §11)
    compensate_batch: tuple[int, int] | None = None  # its own windows (at most examples, seq_len); None: the scoring batch
    compensate_calib: str | None = None  # the text of those windows (a corpus or a text file); None: data.calib's

    def request(self) -> rules.Request:
        """The job's choices, for :func:`moreau_pruner.prune.rules.check`."""
        us = self.unstructured
        return rules.Request(self.method, unstructured=us is not None,
                             nm=f"{us.nm[0]}:{us.nm[1]}" if us is not None and us.nm else None,
                             allocation=us.allocation if us is not None else self.allocation, rounds=self.rounds,
                             uniform=self.prune.uniform, scope=self.prune.scope, round_to=self.prune.round_to,
                             noise=self.moreau.noise, distributed=self.distributed is not None)


def calibration_text(settings: DataSettings) -> str:
    """The text calibration windows are drawn from: ``calib_file`` whole, else the calibration side of
    the named corpus."""
    return data.load_text(settings.calib_file) if settings.calib_file else data.calibration_text(settings.calib)


def calibrate(tokenizer, settings: DataSettings, device: str | torch.device = "cpu") -> torch.Tensor:
    """The calibration batch [num_examples, seq_len] on ``device``."""
    return data.calibration_batch(tokenizer, calibration_text(settings), settings.num_examples, settings.seq_len,
                                  settings.seed).to(device)


def compensation_batch(tokenizer, job: PruneJob, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """The calibration windows weight compensation fits (``job.compensate_batch``: at most ``examples``
    windows of ``seq_len`` tokens, fewer when the text holds fewer, seed ``job.data.seed``) from the
    calibration side of ``job.compensate_calib`` (a named corpus or a text file), else from the scoring
    calibration text; None when it uses the scoring batch or is off. A ValueError when the text has
    not one window."""
    if job.compensate is None or job.compensate_batch is None:
        return None
    examples, seq_len = job.compensate_batch
    source = job.compensate_calib
    text = calibration_text(job.data) if source is None else data.calibration_text(source)
    ids = data.tokenize_text(tokenizer, text)
    windows = min(examples, ids.numel() // seq_len)
    if windows < 1:
        raise ValueError(f"the compensation text ({source or 'the calibration text'}) has {ids.numel()} tokens, "
                         f"fewer than one window of {seq_len} (--compensate-seq-len)")
    return data.calibration_batch(tokenizer, ids, windows, seq_len, job.data.seed).to(device)


def evaluation_ids(tokenizer, settings: DataSettings) -> torch.Tensor | None:
    """The held-out token ids the perplexity is measured on (None when nothing is evaluated)."""
    if not settings.eval_seq_lens:
        return None
    eval_text = data.load_text(settings.eval_file) if settings.eval_file else data.heldout_text(settings.calib)
    return data.tokenize_text(tokenizer, eval_text)


def half_gemm_mode(job: PruneJob) -> str | None:
    """How half-precision matrix products run (None for fp32); see :mod:`moreau_pruner.model.precision`."""
    from .model.precision import slow_half_gemm

    if job.dtype == "float32":
        return None
    if job.half_gemm == "auto":
        return "fp32-accumulate" if slow_half_gemm(getattr(torch, job.dtype), job.device) else "native"
    return job.half_gemm


def half_gemm_context(dtype: str, mode: str | None):
    from .model.precision import fp32_accumulate_gemms

    if mode == "fp32-accumulate":
        return fp32_accumulate_gemms((getattr(torch, dtype),))
    return contextlib.nullcontext()
