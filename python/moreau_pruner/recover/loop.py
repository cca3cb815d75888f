"""The recovery run (:func:`recover`): fine-tuning a pruned model, then evaluating and saving it.

What is trained is a :mod:`.tuning` (LoRA adapters merged at the end, or every weight); the loss of a
micro-batch is the LM loss or distillation from the dense teacher (:class:`_Objective`, :mod:`.losses`).
Training is deterministic given ``seed``: the batches follow :func:`.dataset.batch_indices`, and a
checkpoint (:mod:`.checkpoints`) written every ``save_every`` steps under ``OUT/checkpoints`` lets a
killed run continue to the same final weights as an uninterrupted one. At the end the model is saved
with :func:`moreau_pruner.io.pruned.save_pruned` to ``OUT`` (reloadable with ``load_pruned``, which runs no
code from the directory), a LoRA adapter alone goes to ``OUT/adapter`` (peft
``save_pretrained``) and the run's record (losses, perplexity before/after, steps, time) to
``OUT/recovery.json``; teacher-generated recovery text (:mod:`.generate`) stays in
``OUT/generated.safetensors``.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..io.staging import staging_path
from ..io.target import OutputError, keep_report, model_bytes
from .checkpoints import (CHECKPOINTS_DIR, mismatch, prepare_out, read_checkpoint, read_checkpoint_state,
                          set_rng_state, write_checkpoint)
from .config import GENERATE_FIELDS, RecoverConfig
from .dataset import RecoveryData, batch_indices, collate, load_recovery_data, n_labelled
from .generate import GENERATED, GenerationSettings, save_generated
from .losses import distillation_kl_sum, lm_loss_sum, mix, teacher_targets
from .teacher import Teacher, check_teacher, freeze, load_teacher, resolve_teacher
from .tuning import make_tuning

__all__ = ["ADAPTER_DIR", "REPORT_FILE", "RecoverResult", "recover"]

ADAPTER_DIR = "adapter"
REPORT_FILE = "recovery.json"


@dataclass
class RecoverResult:
    """What :func:`recover` did. ``model`` is the trained plain model (LoRA merged away);
    ``adapter_state`` the LoRA adapter's tensors (empty for full fine-tuning)."""

    model: object
    report: dict
    out: Path | None = None
    adapter_state: dict = field(default_factory=dict, repr=False)


def _param_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _lr_at(cfg: RecoverConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``total_steps``: a linear warm-up
    to ``lr`` over ``warmup_steps``, then ``lr`` (constant) or a half cosine from ``lr`` at the first step
    after the warm-up to ``min_lr`` at the end of the run (cosine)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _ppl(model, tokenizer, text, cfg: RecoverConfig, progress: bool):
    from ..evaluate.perplexity import evaluate_perplexity

    if text is None or cfg.eval_windows == 0:
        return None
    r = evaluate_perplexity(model, tokenizer, text, seq_len=cfg.eval_seq_len, batch_size=4,
                            max_windows=cfg.eval_windows, progress=progress)
    return r.as_dict()


def _teacher_for(cfg: RecoverConfig, teacher, student, tokenizer) -> Teacher | None:
    """The frozen teacher on the training device in the teacher dtype, checked against the student."""
    if not cfg.distill:
        if teacher is not None:
            raise ValueError("a teacher was given but distill is off; set distill=True (--distill) to use it")
        return None
    if teacher is None:
        raise ValueError("distillation needs a teacher: pass teacher= (the dense model: a model object, a model "
                         "directory, a .gguf file or 'embedded'; moreau-recover finds it in the pruned directory's "
                         "pruning_info.json or takes --teacher PATH)")
    dtype, device = cfg.resolved_teacher_dtype(), torch.device(cfg.device)
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(resolve_teacher(None, teacher), dtype, device)
    elif isinstance(teacher, torch.nn.Module):
        teacher = Teacher(teacher, None, f"{type(teacher).__name__} object")
    elif not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be a Teacher, a model, or a path to one, got {type(teacher).__name__}")
    check_teacher(teacher, student, tokenizer)
    freeze(teacher.model)
    teacher.model.to(device)
    if teacher.dtype != dtype:
        teacher.model.to(dtype)
    return teacher


class _Objective:
    """The loss of one micro-batch, divided by the labelled tokens of its whole optimizer batch: the LM
    loss, or ``(1 - lm_weight) * T² * KL(teacher || student) + lm_weight * LM loss`` with a teacher.
    Returns ``(loss, kl, lm)``; ``kl`` and ``lm`` (floats) only with a teacher."""

    def __init__(self, cfg: RecoverConfig, teacher: Teacher | None, autocast):
        self.cfg, self.teacher, self.autocast = cfg, teacher, autocast

    def __call__(self, model, ids, labels, mask, n_tokens: int):
        denom = max(n_tokens, 1)
        if self.teacher is None:
            with self.autocast():
                loss = lm_loss_sum(model, ids, labels, mask) / denom
            return loss, None, None
        cfg = self.cfg
        with torch.no_grad():
            t_logits = self.teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = teacher_targets(t_logits, labels, cfg.distill_temperature, cfg.distill_top_k)
            del t_logits  # only the targets of the labelled positions stay while the student runs
        with self.autocast():
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kl = distillation_kl_sum(s_logits, targets, labels)
        loss, kl, ce = mix(kl, s_logits, labels, cfg.distill_temperature, cfg.lm_weight)
        return loss / denom, float(kl.detach()) / denom, float(ce.detach()) / denom


@dataclass
class _History:
    """Where training stands: the step reached, the loss of every step run (with distillation its KL and LM
    parts too) and the seconds spent training."""

    step: int = 0
    losses: list = field(default_factory=list)
    parts: dict = field(default_factory=lambda: {"kl": [], "lm": []})
    train_time: float = 0.0


@dataclass
class _Run:
    """What one optimizer step needs."""

    cfg: RecoverConfig
    data: RecoveryData
    module: torch.nn.Module
    trainable: list
    optimizer: torch.optim.Optimizer
    objective: _Objective
    device: torch.device
    pad_id: int
    total_steps: int


def _restore(resume_from, tuning, optimizer, total_steps: int) -> _History:
    """Loads the checkpoint's weights, optimizer and RNG states; returns its history."""
    _, path, saved_state = resume_from
    saved_tensors, saved_trainer = read_checkpoint(path, tuning.weights_file)
    tuning.load(saved_tensors, f"checkpoint {path}")
    optimizer.load_state_dict(saved_trainer["optimizer"])
    set_rng_state(saved_trainer["rng"])
    history = _History(step=int(saved_state["step"]), losses=list(saved_state["losses"]),
                       train_time=float(saved_state.get("train_time_s", 0.0)))
    if history.step > total_steps:
        raise ValueError(f"checkpoint {path} is at step {history.step}, past the {total_steps} steps asked for")
    history.parts = {k: list(v) for k, v in saved_state.get("loss_parts", history.parts).items()}
    return history


def _step(run: _Run, step: int) -> tuple[float, float, float]:
    """One optimizer step; returns its loss and (with a teacher) the KL and LM parts."""
    cfg, data = run.cfg, run.data
    batch = [data.examples[i] for i in batch_indices(len(data.examples), cfg.batch_size, cfg.seed, step)]
    n_tokens = n_labelled(batch)
    for g in run.optimizer.param_groups:
        g["lr"] = _lr_at(cfg, step, run.total_steps)
    run.optimizer.zero_grad(set_to_none=True)
    total, kl_total, lm_total = 0.0, 0.0, 0.0
    micro = cfg.micro_batch_size or cfg.batch_size
    for first in range(0, len(batch), micro):
        ids, labels, mask = collate(batch[first : first + micro], run.pad_id, run.device)
        loss, kl, lm = run.objective(run.module, ids, labels, mask, n_tokens)
        loss.backward()
        total += float(loss.detach())
        if kl is not None:
            kl_total += kl
            lm_total += lm
    if not math.isfinite(total):
        raise FloatingPointError(f"the training loss is {total} at step {step + 1} of recovery: lower the "
                                 f"learning rate (--lr, now {cfg.lr:g}) or train in float32 (the checkpoints of "
                                 "earlier steps are kept)")
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    run.optimizer.step()
    return total, kl_total, lm_total


def _train(run: _Run, total_steps: int, history: _History, save, callback, progress: bool) -> None:
    """Runs the steps from ``history.step`` to ``total_steps``, recording each; ``save(step)`` writes a
    checkpoint every ``save_every`` steps (not after the last)."""
    from tqdm.auto import tqdm

    distill = run.objective.teacher is not None
    run.module.train()
    t_train, time_before = time.perf_counter(), history.train_time
    with tqdm(total=total_steps, initial=history.step, desc="recover", unit="step", disable=not progress) as bar:
        for step in range(history.step, total_steps):
            total, kl, lm = _step(run, step)
            history.losses.append(total)
            if distill:
                history.parts["kl"].append(kl)
                history.parts["lm"].append(lm)
                bar.set_postfix(loss=f"{total:.4f}", kl=f"{kl:.4f}")
            else:
                bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
            history.step = done = step + 1
            history.train_time = time_before + time.perf_counter() - t_train
            if save is not None and (done % run.cfg.save_every == 0 and done < total_steps):
                save(done)
            if callback is not None:
                callback(done, total)
    history.train_time = time_before + time.perf_counter() - t_train


def _gap_closed(before, after, reference):
    """The share of the perplexity gap to the teacher that recovery closed: (before - after) / (before - teacher)."""
    if not (before and after and reference) or before["ppl"] == reference["ppl"]:
        return None
    return (before["ppl"] - after["ppl"]) / (before["ppl"] - reference["ppl"])


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
    teacher=None,
    report_path: str | os.PathLike | None = None,
) -> RecoverResult:
    """Fine-tunes ``model`` on ``data`` (LoRA or every weight, LM loss or distillation; see
    :class:`RecoverConfig`) and (with ``out``) saves the result.

    ``data``: a :class:`RecoveryData` or a source for :func:`load_recovery_data`. ``adapter``: a
    peft adapter directory to start from (LoRA only; its LoRA settings replace ``config``'s); with
    ``max_steps=0`` it is only merged. ``resume``: ``"auto"`` (continue from the newest checkpoint
    under ``out`` when there is one), ``"always"`` (there must be one) or ``"never"``.
    ``overwrite``: replace an existing ``out`` and ignore its checkpoints. ``callback(step, loss)``
    runs after every optimizer step (``step`` counts from 1). ``extra_info`` is saved in the
    output's ``pruning_info.json`` (with the recovery summary under ``"recovery"``). ``teacher``
    (with ``config.distill``): the dense model, as a :class:`.teacher.Teacher`, a model object, a model
    directory, a ``.gguf`` file or ``"embedded"``; it is frozen (eval mode, no gradients) and moved to
    the training device and ``config.teacher_dtype`` in place, and its perplexity is measured too.
    When saving to ``out`` fails for want of space or permission, the report is kept (written to
    ``report_path``, else printed on stdout as JSON) and an :class:`~moreau_pruner.io.target.OutputError`
    says so and how much space the model needs. A non-finite training loss stops the run with a
    FloatingPointError naming the step; the checkpoints of the steps before it stay under ``out``.

    Every input is checked before anything is written. ``model`` is modified in place (LoRA layers
    are inserted, then merged away); the trained model is ``result.model``.
    """
    t_start = time.perf_counter()
    cfg = (config or RecoverConfig()).validate()
    if resume not in ("auto", "always", "never"):
        raise ValueError(f"resume must be 'auto', 'always' or 'never', got {resume!r}")
    generated = isinstance(data, str) and data == GENERATED
    if generated and not cfg.distill:
        raise ValueError(f"{GENERATED!r} recovery data is sampled from the dense teacher: set distill=True "
                         "(--distill) and give the teacher")
    if not generated and not isinstance(data, RecoveryData):
        data = load_recovery_data(data, tokenizer, cfg.cutoff_len)
    if not generated and not data.examples:
        raise ValueError(f"recovery data {data.source!r} has no examples")
    _check_generation_settings(cfg, GENERATED if generated else data)
    out_path = Path(out).expanduser().absolute() if out is not None else None
    checkpoints = prepare_out(out_path, overwrite, resume) if out_path is not None else []
    if out_path is None and resume == "always":
        raise ValueError("resume='always' needs an output directory holding checkpoints")
    teacher = _teacher_for(cfg, teacher, model, tokenizer)
    if generated:
        reuse = out_path / CHECKPOINTS_DIR if out_path is not None and not overwrite else None
        data = load_recovery_data(GENERATED, tokenizer, cfg.cutoff_len, teacher=teacher,
                                  generation=cfg.generation(teacher.source), reuse_dir=reuse, progress=progress)
    tuning = make_tuning(cfg, adapter)
    cfg = tuning.settle(cfg)

    dtype = cfg.resolved_dtype()
    device = torch.device(cfg.device)
    model.to(device)
    if _param_dtype(model) != dtype:  # (a model loaded in ``dtype`` keeps its fp32 rotary buffers)
        model.to(dtype)
    model.config.use_cache = False

    fingerprint = {"config": cfg.training_fingerprint(), "data": data.fingerprint(),
                   "adapter": None if adapter is None else os.fspath(Path(adapter).expanduser().absolute())}
    if teacher is not None:
        fingerprint["teacher"] = teacher.source
    resume_from = _resume_point(checkpoints, fingerprint)

    if resume_from is not None:
        before = {"ppl_before": resume_from[2].get("ppl_before"), **resume_from[2].get("evaluations", {})}
    else:
        before = _evaluate_before(model, tokenizer, data, teacher, cfg, progress)

    module = tuning.prepare(model, cfg)
    trainable = tuning.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.examples)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    history = _History()
    if resume_from is not None:
        history = _restore(resume_from, tuning, optimizer, total_steps)
    else:
        torch.manual_seed(cfg.seed + 1)  # LoRA dropout stream
    if overwrite and out_path is not None:  # checkpoints of the replaced run must not mix with this run's
        shutil.rmtree(out_path / CHECKPOINTS_DIR, ignore_errors=True)
    if out_path is not None and data.generated is not None:  # a resumed run trains on these very samples
        save_generated(out_path / CHECKPOINTS_DIR, data.generated, GenerationSettings(**data.generation))

    def save(done: int) -> None:
        state = {"step": done, "losses": history.losses, "ppl_before": before["ppl_before"],
                 "evaluations": {k: v for k, v in before.items() if k != "ppl_before"},
                 "fingerprint": fingerprint, "train_time_s": history.train_time}
        if teacher is not None:
            state["loss_parts"] = history.parts
        write_checkpoint(out_path, done, tuning.tensors(), tuning.weights_file, optimizer, state, cfg.keep_checkpoints)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    run = _Run(cfg, data, module, trainable, optimizer, _Objective(cfg, teacher, tuning.autocast), device, pad_id,
               total_steps)
    _train(run, total_steps, history, save if out_path is not None else None, callback, progress)

    final_adapter = tuning.tensors() if tuning.kind == "lora" else {}
    side_tmp = None
    if out_path is not None and tuning.kind == "lora":  # the adapter alone, written before merging
        out_path.parent.mkdir(parents=True, exist_ok=True)
        side_tmp = staging_path(out_path, "adapter")
        try:
            tuning.save_side(side_tmp)
        except OSError as e:
            shutil.rmtree(side_tmp, ignore_errors=True)
            raise OutputError(f"saving --out {out_path} failed while writing the LoRA adapter: {e}; nothing was "
                              "written there") from e
    try:
        trained = tuning.finish()
        trained.eval()
        trained.config.use_cache = True
        report = {
            "data": {"source": data.source, "kind": data.kind, "rows": data.n_rows, "skipped_rows": data.skipped,
                     "examples": n, "heldout_source": data.heldout_source},
            "config": cfg.as_report(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "adapter_in": fingerprint["adapter"],
            "trainable_parameters": sum(p.numel() for p in trainable),
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "epochs": total_steps / steps_per_epoch,
            "resumed_from_step": None if resume_from is None else resume_from[0],
            "losses": history.losses,
            "ppl_before": before["ppl_before"],
            "ppl_after": _ppl(trained, tokenizer, data.heldout, cfg, progress),
            "train_time_s": round(history.train_time, 3),
            "total_time_s": None,
        }
        _report_extras(report, before, trained, tokenizer, data, teacher, history.parts, cfg, progress)
        if out_path is not None:
            with keep_report(report, out_path, report_path, model_bytes(trained)):
                _finish_output(out_path, trained, tokenizer, side_tmp, report, extra_info, t_start, data)
        else:  # (with an output, the time up to the report written, as saved)
            report["total_time_s"] = round(time.perf_counter() - t_start, 3)
    finally:
        if side_tmp is not None:
            shutil.rmtree(side_tmp, ignore_errors=True)
    return RecoverResult(trained, report, out_path, final_adapter)


def _check_generation_settings(cfg: RecoverConfig, data) -> None:
    """Raises ValueError when generation settings were changed for recovery data that is not generated."""
    if data == GENERATED or (isinstance(data, RecoveryData) and data.generation is not None):
        return
    default = RecoverConfig()
    changed = [k for k in GENERATE_FIELDS if getattr(cfg, k) != getattr(default, k)]
    if changed:
        raise ValueError(f"{', '.join(changed)} only apply to teacher-generated recovery data "
                         f"(data={GENERATED!r}, --data {GENERATED}); {data.source!r} is not generated")


def _resume_point(checkpoints: list[tuple[int, Path]], fingerprint: dict):
    """``(step, path, state)`` of the newest checkpoint, after checking it was made with these settings."""
    if not checkpoints:
        return None
    step_found, path = checkpoints[-1]
    saved_state = read_checkpoint_state(path)
    saved = saved_state.get("fingerprint", {})
    diff = mismatch(saved.get("config", {}), fingerprint["config"])
    if saved.get("data") != fingerprint["data"]:
        diff.append("the training data differs")
    if saved.get("teacher") != fingerprint.get("teacher"):
        diff.append(f"teacher: {saved.get('teacher')!r} in the checkpoint, {fingerprint.get('teacher')!r} now")
    if diff:
        raise ValueError(f"checkpoint {path} was made with other settings ({'; '.join(diff)}); use the same "
                         "settings to resume, or pass overwrite=True (--overwrite) to start over")
    return step_found, path, saved_state


def _evaluate_before(model, tokenizer, data: RecoveryData, teacher: Teacher | None, cfg: RecoverConfig,
                     progress: bool) -> dict:
    """The perplexities measured before training: the student's on the held-out (and out-of-domain)
    text, and the teacher's on the same windows."""
    before = {"ppl_before": _ppl(model, tokenizer, data.heldout, cfg, progress)}
    if data.ood is not None:
        before["ppl_ood_before"] = _ppl(model, tokenizer, data.ood, cfg, progress)
    if teacher is not None:
        before["teacher_ppl"] = _ppl(teacher.model, tokenizer, data.heldout, cfg, progress)
        if data.ood is not None:
            before["teacher_ppl_ood"] = _ppl(teacher.model, tokenizer, data.ood, cfg, progress)
    if data.more_ood:
        before["more_ood"] = {
            source: {"ppl_before": _ppl(model, tokenizer, text, cfg, progress),
                     "teacher_ppl": None if teacher is None else _ppl(teacher.model, tokenizer, text, cfg, progress)}
            for source, text in data.more_ood}
    return before


def _report_extras(report: dict, before: dict, trained, tokenizer, data: RecoveryData, teacher: Teacher | None,
                   parts: dict, cfg: RecoverConfig, progress: bool) -> None:
    """The report's out-of-domain perplexity and distillation entries (absent from a run without them)."""
    if data.ood is not None:
        report["data"]["ood_source"] = data.ood_source
        report["ppl_ood_before"] = before.get("ppl_ood_before")
        report["ppl_ood_after"] = _ppl(trained, tokenizer, data.ood, cfg, progress)
    if data.more_ood:  # further out-of-domain texts: source -> before, after, teacher and gap closed
        report["more_ood"] = {}
        for source, text in data.more_ood:
            b = before["more_ood"][source]
            after = _ppl(trained, tokenizer, text, cfg, progress)
            report["more_ood"][source] = {"ppl_before": b["ppl_before"], "ppl_after": after,
                                          "teacher_ppl": b["teacher_ppl"],
                                          "gap_closed": _gap_closed(b["ppl_before"], after, b["teacher_ppl"])}
    if data.generation is not None:  # (moreau-recover samples before recover() starts total_time_s's clock)
        report["data"]["generation"] = data.generation
        report["data"]["generation_time_s"] = data.generation_time_s
    if teacher is None:
        return
    report["teacher"] = {"source": teacher.source, "dtype": str(teacher.dtype).removeprefix("torch."),
                         "parameters": sum(p.numel() for p in teacher.model.parameters()),
                         "ppl": before.get("teacher_ppl"), "ppl_ood": before.get("teacher_ppl_ood")}
    report["loss_parts"] = {"kl": parts["kl"], "lm": parts["lm"]}
    report["gap_closed"] = {
        "heldout": _gap_closed(report["ppl_before"], report["ppl_after"], before.get("teacher_ppl")),
        "ood": _gap_closed(report.get("ppl_ood_before"), report.get("ppl_ood_after"), before.get("teacher_ppl_ood")),
    }


def _finish_output(out: Path, trained, tokenizer, adapter_tmp: Path | None, report: dict, extra_info,
                   t_start, data: RecoveryData) -> None:
    """Writes the trained model, the adapter (LoRA), the teacher's samples (generated recovery text) and the
    report to a sibling directory, then swaps it in."""
    from ..io.atomic import staged_directory, write_json
    from ..io.pruned import save_pruned

    info = dict(extra_info or {})
    info["recovery"] = {k: report[k] for k in ("steps", "ppl_before", "ppl_after", "trainable_parameters")}
    info["recovery"]["data"] = report["data"]["source"]
    for key in ("ppl_ood_before", "ppl_ood_after", "teacher"):
        if key in report:
            info["recovery"][key] = report[key]
    for key in ("tuning", "distill"):  # (in the report's settings unless the run was plain LoRA)
        if key in report["config"]:
            info["recovery"][key] = report["config"][key]
    with staged_directory(out) as staged:  # the checkpoints of the finished run go with the old OUT
        save_pruned(trained, staged, tokenizer=tokenizer, extra=info)
        if adapter_tmp is not None:
            os.replace(adapter_tmp, staged / ADAPTER_DIR)
        if data.generated is not None:  # what the model was trained on (and held out), with its settings
            save_generated(staged, data.generated, GenerationSettings(**data.generation))
        report["total_time_s"] = round(time.perf_counter() - t_start, 3)
        write_json(staged / REPORT_FILE, report)
