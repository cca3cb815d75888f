"""Recovering a pruned model's quality with a short LoRA fine-tune (``moreau-recover``).

The recipe of LLM-Pruner and MoreauPruner's recovery stage: LoRA adapters (rank 8, alpha 16,
dropout 0.05) on every attention and MLP projection (q/k/v/o, gate/up/down), AdamW at lr 1e-4,
2 epochs over sequences cut off at 256 tokens; then the adapter is merged into the weights. The
adapters come from ``peft`` (the optional extra ``recover``); peft wraps each ``nn.Linear`` with
its own shape, so the per-layer widths of a pruned model need nothing special.

Data (:func:`load_recovery_data`):

* a named offline corpus (``pydoc``, ``fortunes``) or a UTF-8 ``.txt`` file: its calibration
  side (:func:`moreau_pruner.data.calibration_text`) is tokenised once and cut into blocks of
  ``cutoff_len`` tokens; the held-out side is never trained on and serves for the perplexity;
* a ``.jsonl`` / ``.json`` file of ``{"text": ...}`` rows: the rows are documents, split into
  training and held-out documents the same way (:func:`moreau_pruner.data.split_documents`);
* a ``.jsonl`` / ``.json`` file of Alpaca rows (``instruction``, optional ``input``, ``output``):
  each row becomes LLM-Pruner's (alpaca-lora's) prompt followed by the response and EOS, and the
  loss is taken on the response only (prompt tokens are labelled -100). The held-out perplexity is
  then measured on pydoc's held-out text unless another ``eval_data`` is given.

Training is deterministic given ``seed``: epoch ``e`` visits the examples in the order of
``torch.randperm(n, generator=seed + e)``, and a checkpoint (adapter weights, AdamW state, RNG
states and the step reached) written every ``save_every`` steps under ``OUT/checkpoints`` lets a
killed run continue to the same final adapter as an uninterrupted one. At the end the adapter is
merged (peft ``merge_and_unload``), the model is saved with :func:`moreau_pruner.io.pruned.save_pruned`
to ``OUT`` (reloadable with ``load_pruned`` or ``from_pretrained(OUT, trust_remote_code=True)``),
the adapter alone goes to ``OUT/adapter`` (peft ``save_pretrained``) and the run's record
(losses, perplexity before/after, steps, time) to ``OUT/recovery.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "DEFAULT_TARGET_MODULES",
    "RecoverConfig",
    "RecoveryData",
    "RecoverResult",
    "alpaca_prompt",
    "load_recovery_data",
    "recover",
    "main",
]

#: every attention and MLP projection of a LLaMA-family decoder layer
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: LLM-Pruner's instruction prompt (alpaca-lora's "alpaca" template), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
REPORT_FILE = "recovery.json"
_STATE_FILE = "state.json"
_TRAINER_FILE = "trainer_state.pt"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
IGNORE_INDEX = -100


class MissingExtraError(ImportError):
    """The optional extra ``recover`` (peft) is not installed."""


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise MissingExtraError(
            "LoRA recovery needs peft, the optional extra 'recover': pip install 'moreau-kernels[recover]' "
            "(or pip install peft)"
        ) from exc
    return peft


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- data


@dataclass
class RecoveryData:
    """Tokenised training examples plus the held-out text for perplexity.

    ``examples``: list of ``(input_ids, labels)`` pairs of equal-length int lists (labels -100
    where no loss is taken). ``kind``: ``"text"`` or ``"alpaca"``. ``heldout``: text never trained
    on (None: no held-out text for this source). ``skipped``: rows that could not be used.
    """

    examples: list[tuple[list[int], list[int]]]
    kind: str
    source: str
    heldout: str | None = None
    heldout_source: str | None = None
    skipped: int = 0
    n_rows: int = 0

    def fingerprint(self) -> dict:
        import hashlib
        from array import array

        h = hashlib.sha256()
        for ids, labels in self.examples:
            h.update(array("q", ids).tobytes())
            h.update(array("q", labels).tobytes())
        return {"kind": self.kind, "n_examples": len(self.examples), "sha256": h.hexdigest()}


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Pruner's prompt for an instruction (and its optional input); the response follows it."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _read_rows(path: Path) -> list:
    """Rows of a .jsonl file (one JSON value a line) or a .json file (a list, or {"data": [...]})."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {str(path)!r} is not valid UTF-8: {exc}") from exc
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line: {exc.msg}") from None
        return rows
    try:
        value = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got a {type(value).__name__}")
    return value


def _nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_alpaca(row) -> bool:
    return isinstance(row, dict) and "instruction" in row and "output" in row


def _token_ids(tokenizer, text: str, special: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=special, return_attention_mask=False, truncation=False, verbose=False)
    return list(out["input_ids"])


def _alpaca_example(tokenizer, row: dict, cutoff_len: int):
    """(input_ids, labels) of one Alpaca row, or None when no response token survives the cutoff.

    The prompt and the response are tokenised separately (the prompt with the tokenizer's special
    tokens, the response without) so that the prompt/response boundary is exact; EOS ends the
    response. Prompt tokens get label -100.
    """
    prompt = alpaca_prompt(row["instruction"], row.get("input") or None)
    prompt_ids = _token_ids(tokenizer, prompt, True)
    response_ids = _token_ids(tokenizer, row["output"], False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response_ids.append(int(eos))
    ids = (prompt_ids + response_ids)[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        return None  # the prompt alone fills the cutoff: nothing to learn from this row
    return ids, labels


def _text_blocks(tokenizer, text: str, cutoff_len: int) -> list[tuple[list[int], list[int]]]:
    """The text tokenised once and cut into blocks of ``cutoff_len`` tokens (a last shorter block
    is kept when it has at least 2 tokens); every token is labelled."""
    from ..data import tokenize_text

    ids = tokenize_text(tokenizer, text).tolist()
    blocks = []
    for start in range(0, len(ids), cutoff_len):
        block = ids[start : start + cutoff_len]
        if len(block) >= 2:
            blocks.append((block, list(block)))
    return blocks


def load_recovery_data(
    source: str | os.PathLike,
    tokenizer,
    cutoff_len: int = 256,
    heldout_fraction: float = 0.2,
    eval_source: str | os.PathLike | None = None,
) -> RecoveryData:
    """Tokenised recovery data from ``source`` (see the module doc for the accepted forms).

    ``eval_source``: where the held-out perplexity text comes from instead (a corpus name or text
    file, its held-out side). Raises ValueError naming the file when it holds no usable row.
    """
    from .. import data as mdata

    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ValueError(f"cutoff_len must be an int >= 2, got {cutoff_len!r}")
    name = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(name, str) or not name:
        raise TypeError(f"recovery data must be a corpus name or a file path, got {source!r}")
    path = Path(name).expanduser()
    heldout = None
    skipped = 0
    if name in mdata.CORPORA or path.suffix not in (".json", ".jsonl"):
        if name not in mdata.CORPORA:
            if not path.exists():
                raise FileNotFoundError(
                    f"recovery data {name!r} is neither a known corpus ({', '.join(mdata.CORPORA)}) nor an existing file"
                )
            if path.is_dir():
                raise IsADirectoryError(f"recovery data {name!r} is a directory, expected a .txt/.jsonl/.json file")
            raw = path.read_text(encoding="utf-8", errors="replace")
            if not raw.strip():
                raise ValueError(f"recovery data file {name!r} is empty: no text to train on")
        train_text = mdata.calibration_text(name if name in mdata.CORPORA else path, heldout_fraction)
        heldout = mdata.heldout_text(name if name in mdata.CORPORA else path, heldout_fraction)
        examples = _text_blocks(tokenizer, train_text, cutoff_len)
        kind, n_rows = "text", 1
    else:
        if not path.is_file():
            raise FileNotFoundError(f"recovery data file {name!r} does not exist")
        rows = _read_rows(path)
        n_rows = len(rows)
        if rows and any(_is_alpaca(r) for r in rows):
            kind = "alpaca"
            examples = []
            for r in rows:
                if not (_is_alpaca(r) and _nonempty_str(r["instruction"]) and _nonempty_str(r["output"])
                        and (r.get("input") is None or isinstance(r.get("input"), str))):
                    skipped += 1
                    continue
                ex = _alpaca_example(tokenizer, r, cutoff_len)
                if ex is None:
                    skipped += 1
                else:
                    examples.append(ex)
        else:
            kind = "text"
            docs = [r["text"] for r in rows if isinstance(r, dict) and _nonempty_str(r.get("text"))]
            skipped = n_rows - len(docs)
            examples = []
            if len(docs) >= 2:
                train_docs, held_docs = mdata.split_documents(docs, heldout_fraction)
                heldout = "\n\n".join(held_docs)
            elif docs:
                train_text, heldout = mdata.split_text(docs[0], heldout_fraction)
                train_docs = [train_text]
            else:
                train_docs = []
            for doc in train_docs:
                examples.extend(_text_blocks(tokenizer, doc, cutoff_len))
    if not examples:
        what = {"alpaca": "Alpaca rows with a non-empty instruction and output that fit the cutoff",
                "text": "rows with a non-empty \"text\" string"}[kind]
        raise ValueError(
            f"recovery data {name!r} has no usable rows ({n_rows} rows read, {skipped} skipped): expected "
            f"{what} (text files: non-empty text; .jsonl/.json: {{\"text\": ...}} or "
            f"{{\"instruction\", \"input\", \"output\"}} rows)"
        )
    heldout_source = name if heldout is not None else None
    if eval_source is not None:
        heldout, heldout_source = mdata.heldout_text(eval_source, heldout_fraction), os.fspath(eval_source)
    elif heldout is None:  # instruction data: measure the language-model quality on pydoc
        heldout, heldout_source = mdata.heldout_text("pydoc", heldout_fraction), "pydoc"
    return RecoveryData(examples, kind, name, heldout, heldout_source, skipped, n_rows)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step ``step`` (0-based): epochs are cut into ceil(n/batch) steps."""
    per_epoch = math.ceil(n / batch_size)
    epoch, b = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch)[b * batch_size : (b + 1) * batch_size]


def _collate(examples, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _n_labelled(examples) -> int:
    return sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in examples)


def _sum_loss(model, ids, labels, mask) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropy at every labelled position (fp32)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# --------------------------------------------------------------------------- adapters


def _lora_config(cfg: RecoverConfig):
    peft = _peft()
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _wrap(model, lora_config):
    """``model`` with LoRA adapters; every targeted linear of every layer must be wrapped."""
    peft = _peft()
    targets = set(lora_config.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(targets - present)
    if missing:
        raise ValueError(f"target modules {missing} do not exist in {type(model).__name__} "
                         f"(LLaMA-family names: {', '.join(DEFAULT_TARGET_MODULES)})")
    peft_model = peft.get_peft_model(model, lora_config)
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():  # a LoraLayer's own child is named base_layer
        if name.rsplit(".", 1)[-1] in targets and not isinstance(module, LoraLayer):
            raise RuntimeError(f"peft did not wrap {name} ({type(module).__name__})")
    return peft_model


def _adapter_state(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def _load_adapter_weights(peft_model, state: dict[str, torch.Tensor], where: str) -> None:
    """Loads adapter tensors into ``peft_model`` after checking every name and shape."""
    from peft import set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in _adapter_state(peft_model).items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), expected[k]) for k in sorted(expected) if k in state
             and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        details = []
        if wrong:
            k, got, want = wrong[0]
            details.append(f"{len(wrong)} tensors have other shapes (e.g. {k}: {got} in the adapter, {want} here)")
        if missing:
            details.append(f"{len(missing)} tensors this model needs are absent (e.g. {missing[0]})")
        if extra:
            details.append(f"{len(extra)} tensors match no module here (e.g. {extra[0]})")
        raise ValueError(f"adapter {where} does not fit this model (was it trained on another model or "
                         f"another pruning?): {'; '.join(details)}")
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter {where}: peft did not use {len(unexpected)} tensors (e.g. {unexpected[0]})")


def _read_adapter_dir(directory: Path):
    """(LoraConfig, tensors) of a directory written by peft ``save_pretrained``."""
    peft = _peft()
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    cfg_file = directory / "adapter_config.json"
    weights = directory / _ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a peft adapter directory (needs adapter_config.json and "
                                f"{_ADAPTER_WEIGHTS})")
    try:
        lora_config = peft.LoraConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise ValueError(f"{cfg_file} is not a LoRA adapter config: {exc}") from exc
    from safetensors.torch import load_file

    return lora_config, load_file(str(weights))


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / _STATE_FILE).is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    pass
    return sorted(found)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_checkpoint(out: Path, step: int, peft_model, optimizer, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(_adapter_state(peft_model), str(tmp / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / _TRAINER_FILE)
        (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
        adapter = load_file(str(path / _ADAPTER_WEIGHTS))
        trainer = torch.load(path / _TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); remove it or pass overwrite=True") from exc
    return state, adapter, trainer


def _mismatch(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


# --------------------------------------------------------------------------- the run


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


def _prepare_out(out: Path, overwrite: bool, resume: str) -> list[tuple[int, Path]]:
    """Checks ``out`` before anything is written; returns its checkpoints (to resume from)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    checkpoints = _checkpoint_dirs(out) if out.is_dir() else []
    if overwrite:
        return []
    if resume == "always" and not checkpoints:
        raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINTS_DIR} holds no checkpoint")
    if resume == "never" and checkpoints:
        raise FileExistsError(f"{out} holds checkpoints of an earlier run; resume it or pass overwrite=True")
    if out.is_dir() and any(out.iterdir()) and not checkpoints:
        raise FileExistsError(f"output {out} exists and is not empty (and holds no checkpoint to resume); "
                              "pass overwrite=True (--overwrite) to replace it")
    return checkpoints


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
    checkpoints = _prepare_out(out_path, overwrite, resume) if out_path is not None else []
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
        adapter_cfg, adapter_state = _read_adapter_dir(Path(adapter))
        cfg = replace(cfg, rank=adapter_cfg.r, alpha=adapter_cfg.lora_alpha, dropout=adapter_cfg.lora_dropout,
                      target_modules=tuple(sorted(adapter_cfg.target_modules)))
    fingerprint = {"config": cfg.training_fingerprint(), "data": data.fingerprint(),
                   "adapter": None if adapter is None else os.fspath(Path(adapter).expanduser().absolute())}

    resume_from = None
    if checkpoints:
        step_found, path = checkpoints[-1]
        saved_state, saved_adapter, saved_trainer = _read_checkpoint(path)
        diff = _mismatch(saved_state["fingerprint"]["config"], fingerprint["config"])
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
    lora_config = adapter_cfg if adapter_cfg is not None else _lora_config(cfg)
    lora_config.inference_mode = False
    peft_model = _wrap(model, lora_config)
    if adapter_state is not None:
        _load_adapter_weights(peft_model, adapter_state, str(adapter))
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
        _load_adapter_weights(peft_model, saved_adapter, f"checkpoint {path}")
        optimizer.load_state_dict(saved_trainer["optimizer"])
        _set_rng_state(saved_trainer["rng"])
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
            batch = [data.examples[i] for i in _batch_indices(n, cfg.batch_size, cfg.seed, step)]
            n_tokens = _n_labelled(batch)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for first in range(0, len(batch), micro):
                ids, labels, mask = _collate(batch[first : first + micro], pad_id, device)
                loss = _sum_loss(peft_model, ids, labels, mask) / max(n_tokens, 1)
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
                _write_checkpoint(out_path, done, peft_model, optimizer, state, cfg.keep_checkpoints)
            if callback is not None:
                callback(done, total)
    train_time += time.perf_counter() - t_train

    adapter_tensors = _adapter_state(peft_model)
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
    return RecoverResult(merged, report, out_path, adapter_tensors)


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


# --------------------------------------------------------------------------- command line

DESCRIPTION = """\
Recover a pruned model's quality with a short LoRA fine-tune (LLM-Pruner / MoreauPruner's recovery
stage), then merge the adapter and save the model in the same reloadable format.

LoRA (peft) goes on q/k/v/o and gate/up/down of every layer, whatever each layer's pruned width.
Defaults: rank 8, alpha 16, dropout 0.05, AdamW lr 1e-4, 2 epochs, sequences cut off at 256 tokens,
bfloat16 on a GPU and float32 on a CPU. Held-out perplexity is measured before and after.

--data takes a corpus name (pydoc, fortunes: their calibration side; the held-out side is never
trained on), a .txt file, a .jsonl/.json file of {"text": ...} rows, or Alpaca-style
{"instruction", "input", "output"} rows (LLM-Pruner's prompt; loss on the response only).

OUT receives the merged model (moreau_pruner.load_pruned(OUT) or
AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)), OUT/adapter (the LoRA adapter
alone, peft format) and OUT/recovery.json (losses, perplexity before/after, steps, time). While the
run goes, checkpoints land in OUT/checkpoints; run the same command again to continue a killed run."""

EPILOG = """\
examples:
  moreau-recover --model pruned-smollm2 --data pydoc --out recovered --max-steps 300
  moreau-recover --model pruned-llama --data alpaca_data_cleaned.json --out llama-rec --device cuda
  moreau-recover --model pruned --data notes.jsonl --out rec --rank 16 --alpha 32 --epochs 1
  moreau-recover --model pruned --data pydoc --out rec --resume          # continue a killed run
  moreau-recover --model pruned --adapter rec/adapter --data pydoc --out merged --max-steps 0
"""


def build_parser() -> argparse.ArgumentParser:
    d = RecoverConfig()
    p = argparse.ArgumentParser(prog="moreau-recover", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, help="a pruned directory (moreau-prune --out), a local HF model "
                                                  "directory or a .gguf file")
    g.add_argument("--data", required=True, help="pydoc, fortunes, or a .txt / .jsonl / .json file")
    g.add_argument("--out", required=True, help="output directory (merged model, adapter/, recovery.json)")
    g.add_argument("--adapter", metavar="DIR", help="start from this peft LoRA adapter (its rank/alpha/targets "
                                                    "apply); with --max-steps 0 it is only merged")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT, ignoring its checkpoints")
    g.add_argument("--resume", action="store_true", help="require a checkpoint in OUT/checkpoints and continue "
                                                         "from it (without this flag a checkpoint is resumed "
                                                         "automatically when there is one)")
    g = p.add_argument_group("LoRA and training")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout})")
    g.add_argument("--target-modules", default=",".join(d.target_modules),
                   help="comma-separated module names to adapt (default: all seven projections)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run (replaces --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per optimizer step (default {d.batch_size})")
    g.add_argument("--micro-batch-size", type=int, help="examples per forward/backward (default: --batch-size)")
    g.add_argument("--cutoff-len", type=int, default=d.cutoff_len,
                   help=f"tokens per example; text is cut into blocks of this length (default {d.cutoff_len})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping norm, 0 = none (default {d.max_grad_norm})")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of LoRA init, data order and dropout")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"write a checkpoint every N steps (default {d.save_every})")
    g.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="training dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    g = p.add_argument_group("held-out perplexity")
    g.add_argument("--eval-data", help="text source whose held-out side is scored (default: the --data source's "
                                       "own held-out side; pydoc for instruction data)")
    g.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len, help="tokens per window (default 128)")
    g.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"windows scored, 0 = no evaluation, -1 = all of the held-out text (default {d.eval_windows})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = RecoverConfig(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        save_every=args.save_every, eval_seq_len=args.eval_seq_len,
        eval_windows=None if args.eval_windows == -1 else args.eval_windows, device=args.device, dtype=args.dtype,
    )
    try:
        cfg.validate()
        _peft()
        out = Path(args.out).expanduser().absolute()
        _prepare_out(out, args.overwrite, "always" if args.resume else "auto")
        if args.adapter is not None:
            _read_adapter_dir(Path(args.adapter))
        from ..model.loading import load_model

        model, tokenizer = load_model(args.model, dtype=cfg.resolved_dtype(), device=cfg.device)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; recovery needs one to read the data")
        data = load_recovery_data(args.data, tokenizer, cfg.cutoff_len, eval_source=args.eval_data)
        info = {}
        src_info = Path(args.model) / "pruning_info.json"
        if src_info.is_file():
            try:
                info = json.loads(src_info.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                info = {}
        info = info if isinstance(info, dict) else {"pruning_info": info}
        info["recovered_from"] = os.fspath(Path(args.model).expanduser().absolute())
        if not args.quiet:
            print(f"recovery data: {data.source} ({data.kind}, {len(data.examples)} examples, "
                  f"{data.skipped} rows skipped); held-out text: {data.heldout_source}", file=sys.stderr)
        result = recover(model, tokenizer, data, cfg, out=out, adapter=args.adapter,
                         resume="always" if args.resume else "auto", overwrite=args.overwrite,
                         progress=not args.quiet, extra_info=info)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            MissingExtraError) as exc:
        print(f"moreau-recover: error: {exc}", file=sys.stderr)
        return 2
    r = result.report

    def fmt(p):
        return "n/a" if p is None else f"{p['ppl']:.3f}"

    print(f"steps {r['steps']}  loss {r['losses'][0] if r['losses'] else float('nan'):.4f} -> "
          f"{r['losses'][-1] if r['losses'] else float('nan'):.4f}  held-out ppl {fmt(r['ppl_before'])} -> "
          f"{fmt(r['ppl_after'])}  ({r['total_time_s']:.1f} s)")
    print(f"saved {result.out} (adapter in {result.out / ADAPTER_DIR}, report {result.out / REPORT_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
