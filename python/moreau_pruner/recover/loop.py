"""The recovery run (:func:`recover`): LoRA fine-tuning of a pruned model, then merging and saving.

Training is deterministic given ``seed``: the batches follow :func:`.dataset.batch_indices`, and a
checkpoint (:mod:`.checkpoints`) written every ``save_every`` steps under ``OUT/checkpoints`` lets a
killed run continue to the same final adapter as an uninterrupted one. At the end the adapter is
merged (peft ``merge_and_unload``), the model is saved with :func:`moreau_pruner.io.pruned.save_pruned`
to ``OUT`` (reloadable with ``load_pruned`` or ``from_pretrained(OUT, trust_remote_code=True)``),
the adapter alone goes to ``OUT/adapter`` (peft ``save_pretrained``) and the run's record
(losses, perplexity before/after, steps, time) to ``OUT/recovery.json``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import CHECKPOINTS_DIR, mismatch, prepare_out, read_checkpoint, set_rng_state, write_checkpoint
from .config import RecoverConfig
from .dataset import RecoveryData, batch_indices, collate, load_recovery_data, n_labelled
from .lora import adapter_tensors, load_adapter_weights, make_lora_config, read_adapter_dir, wrap
from .losses import lm_loss_sum

__all__ = ["ADAPTER_DIR", "REPORT_FILE", "RecoverResult", "recover"]

ADAPTER_DIR = "adapter"
REPORT_FILE = "recovery.json"


@dataclass
class RecoverResult:
    """What :func:`recover` did. ``model`` is the merged model (a plain transformers model)."""

    model: object
    report: dict
    out: Path | None = None
    adapter_state: dict = field(default_factory=dict, repr=False)


def _param_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _lr_at(cfg: RecoverConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _ppl(model, tokenizer, text, cfg: RecoverConfig, progress: bool):
    from ..evaluate.perplexity import evaluate_perplexity

    if text is None or cfg.eval_windows == 0:
        return None
    r = evaluate_perplexity(model, tokenizer, text, seq_len=cfg.eval_seq_len, batch_size=4,
                            max_windows=cfg.eval_windows, progress=progress)
    return r.as_dict()


def recover(
    model,
    tokenizer,
    data: RecoveryData | str | os.PathLike,
    config: RecoverConfig | None = None,
    out: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    resume: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    extra_info: dict | None = None,
) -> RecoverResult:
    """LoRA-fine-tunes ``model`` on ``data``, merges the adapter and (with ``out``) saves everything.

    ``data``: a :class:`RecoveryData` or a source for :func:`load_recovery_data`. ``adapter``: a
    peft adapter directory to start from (its LoRA settings replace ``config``'s); with
    ``max_steps=0`` it is only merged. ``resume``: ``"auto"`` (continue from the newest checkpoint
    under ``out`` when there is one), ``"always"`` (there must be one) or ``"never"``.
    ``overwrite``: replace an existing ``out`` and ignore its checkpoints. ``callback(step, loss)``
    runs after every optimizer step (``step`` counts from 1). ``extra_info`` is saved in the
    output's ``pruning_info.json`` (with the recovery summary under ``"recovery"``).

    Every input is checked before anything is written. ``model`` is modified in place (LoRA layers
    are inserted, then merged away); the merged model is ``result.model``.
    """
    t_start = time.perf_counter()
    cfg = (config or RecoverConfig()).validate()
    if resume not in ("auto", "always", "never"):
        raise ValueError(f"resume must be 'auto', 'always' or 'never', got {resume!r}")
    if not isinstance(data, RecoveryData):
        data = load_recovery_data(data, tokenizer, cfg.cutoff_len)
    if not data.examples:
        raise ValueError(f"recovery data {data.source!r} has no examples")
    out_path = Path(out).expanduser().absolute() if out is not None else None
    checkpoints = prepare_out(out_path, overwrite, resume) if out_path is not None else []
    if out_path is None and resume == "always":
        raise ValueError("resume='always' needs an output directory holding checkpoints")

    dtype = cfg.resolved_dtype()
    device = torch.device(cfg.device)
    model.to(device)
    if _param_dtype(model) != dtype:  # (a model loaded in ``dtype`` keeps its fp32 rotary buffers)
        model.to(dtype)
    model.config.use_cache = False

    adapter_cfg = adapter_state = None
    if adapter is not None:
        adapter_cfg, adapter_state = read_adapter_dir(Path(adapter))
        cfg = replace(cfg, rank=adapter_cfg.r, alpha=adapter_cfg.lora_alpha, dropout=adapter_cfg.lora_dropout,
                      target_modules=tuple(sorted(adapter_cfg.target_modules)))
    fingerprint = {"config": cfg.training_fingerprint(), "data": data.fingerprint(),
                   "adapter": None if adapter is None else os.fspath(Path(adapter).expanduser().absolute())}

    resume_from = None
    if checkpoints:
        step_found, path = checkpoints[-1]
        saved_state, saved_adapter, saved_trainer = read_checkpoint(path)
        diff = mismatch(saved_state["fingerprint"]["config"], fingerprint["config"])
        if saved_state["fingerprint"]["data"] != fingerprint["data"]:
            diff.append("the training data differs")
        if diff:
            raise ValueError(f"checkpoint {path} was made with other settings ({'; '.join(diff)}); use the same "
                             "settings to resume, or pass overwrite=True (--overwrite) to start over")
        resume_from = (step_found, path, saved_state, saved_adapter, saved_trainer)

    ppl_before = None
    if resume_from is not None:
        ppl_before = resume_from[2].get("ppl_before")
    else:
        ppl_before = _ppl(model, tokenizer, data.heldout, cfg, progress)

    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    lora_config = adapter_cfg if adapter_cfg is not None else make_lora_config(cfg)
    lora_config.inference_mode = False
    peft_model = wrap(model, lora_config)
    if adapter_state is not None:
        load_adapter_weights(peft_model, adapter_state, str(adapter))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    n = len(data.examples)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    losses: list[float] = []
    start_step = 0
    train_time = 0.0
    if resume_from is not None:
        step_found, path, saved_state, saved_adapter, saved_trainer = resume_from
        load_adapter_weights(peft_model, saved_adapter, f"checkpoint {path}")
        optimizer.load_state_dict(saved_trainer["optimizer"])
        set_rng_state(saved_trainer["rng"])
        start_step = int(saved_state["step"])
        if start_step > total_steps:
            raise ValueError(f"checkpoint {path} is at step {start_step}, past the {total_steps} steps asked for")
        losses = list(saved_state["losses"])
        train_time = float(saved_state.get("train_time_s", 0.0))
    else:
        torch.manual_seed(cfg.seed + 1)  # LoRA dropout stream

    if overwrite and out_path is not None:  # checkpoints of the replaced run must not mix with this run's
        shutil.rmtree(out_path / CHECKPOINTS_DIR, ignore_errors=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    micro = cfg.micro_batch_size or cfg.batch_size
    from tqdm.auto import tqdm

    peft_model.train()
    t_train = time.perf_counter()
    with tqdm(total=total_steps, initial=start_step, desc="recover", unit="step", disable=not progress) as bar:
        for step in range(start_step, total_steps):
            batch = [data.examples[i] for i in batch_indices(n, cfg.batch_size, cfg.seed, step)]
            n_tokens = n_labelled(batch)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for first in range(0, len(batch), micro):
                ids, labels, mask = collate(batch[first : first + micro], pad_id, device)
                loss = lm_loss_sum(peft_model, ids, labels, mask) / max(n_tokens, 1)
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise FloatingPointError(f"recovery: the training loss is {total} at step {step + 1}; "
                                         "lower the learning rate or use float32")
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
            done = step + 1
            if out_path is not None and (done % cfg.save_every == 0 and done < total_steps):
                state = {"step": done, "losses": losses, "ppl_before": ppl_before, "fingerprint": fingerprint,
                         "train_time_s": train_time + time.perf_counter() - t_train}
                write_checkpoint(out_path, done, peft_model, optimizer, state, cfg.keep_checkpoints)
            if callback is not None:
                callback(done, total)
    train_time += time.perf_counter() - t_train

    final_adapter = adapter_tensors(peft_model)
    adapter_tmp = None
    if out_path is not None:  # the adapter alone, written before merging
        out_path.parent.mkdir(parents=True, exist_ok=True)
        adapter_tmp = out_path.parent / f".{out_path.name}.adapter-{uuid.uuid4().hex[:8]}"
        peft_model.save_pretrained(str(adapter_tmp))
    try:
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged.config.use_cache = True
        ppl_after = _ppl(merged, tokenizer, data.heldout, cfg, progress)
        report = {
            "data": {"source": data.source, "kind": data.kind, "rows": data.n_rows, "skipped_rows": data.skipped,
                     "examples": n, "heldout_source": data.heldout_source},
            "config": {**asdict(cfg), "target_modules": list(cfg.target_modules)},
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "adapter_in": fingerprint["adapter"],
            "trainable_parameters": n_trainable,
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "epochs": total_steps / steps_per_epoch,
            "resumed_from_step": None if resume_from is None else resume_from[0],
            "losses": losses,
            "ppl_before": ppl_before,
            "ppl_after": ppl_after,
            "train_time_s": round(train_time, 3),
            "total_time_s": None,
        }
        if out_path is not None:
            _finish_output(out_path, merged, tokenizer, adapter_tmp, report, extra_info, t_start)
        report["total_time_s"] = round(time.perf_counter() - t_start, 3)
    finally:
        if adapter_tmp is not None:
            shutil.rmtree(adapter_tmp, ignore_errors=True)
    return RecoverResult(merged, report, out_path, final_adapter)


def _finish_output(out: Path, merged, tokenizer, adapter_tmp: Path, report: dict, extra_info, t_start) -> None:
    """Writes the merged model, the adapter and the report to a sibling directory, then swaps it in."""
    from ..io.pruned import save_pruned

    info = dict(extra_info or {})
    info["recovery"] = {k: report[k] for k in ("steps", "ppl_before", "ppl_after", "trainable_parameters")}
    info["recovery"]["data"] = report["data"]["source"]
    staged = out.parent / f".{out.name}.final-{uuid.uuid4().hex[:8]}"
    try:
        save_pruned(merged, staged, tokenizer=tokenizer, extra=info)
        os.replace(adapter_tmp, staged / ADAPTER_DIR)
        report["total_time_s"] = round(time.perf_counter() - t_start, 3)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(staged, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the checkpoints of the finished run
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
