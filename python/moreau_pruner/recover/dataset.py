"""Recovery data: tokenised training examples, the held-out text, and the order of the batches.

* a named offline corpus (``pydoc``, ``fortunes``) or a UTF-8 ``.txt`` file: its calibration
  side (:func:`moreau_pruner.data.calibration_text`) is tokenised once and cut into blocks of
  ``cutoff_len`` tokens; the held-out side is never trained on and serves for the perplexity;
* a ``.jsonl`` / ``.json`` file of ``{"text": ...}`` rows: the rows are documents, split into
  training and held-out documents the same way (:func:`moreau_pruner.data.split_documents`);
* ``generated``: sequences the dense teacher samples from its own distribution (:mod:`.generate`;
  needs the teacher); the last ``heldout_fraction`` of the samples is held out and scored;
* a ``.jsonl`` / ``.json`` file of Alpaca rows (``instruction``, optional ``input``, ``output``):
  each row becomes LLM-Pruner's (alpaca-lora's) prompt followed by the response and EOS, and the
  loss is taken on the response only (prompt tokens are labelled -100). The held-out perplexity is
  then measured on pydoc's held-out text unless another ``eval_data`` is given.

Epoch ``e`` visits the examples in the order of ``torch.randperm(n, generator=seed + e)``
(:func:`batch_indices`), so the batch of a step depends only on the seed and the step.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .generate import GENERATED

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "IGNORE_INDEX", "RecoveryData", "alpaca_prompt",
           "batch_indices", "collate", "load_recovery_data", "n_labelled"]

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
IGNORE_INDEX = -100


@dataclass
class RecoveryData:
    """Tokenised training examples plus the held-out text for perplexity.

    ``examples``: list of ``(input_ids, labels)`` pairs of equal-length int lists (labels -100
    where no loss is taken). ``kind``: ``"text"``, ``"alpaca"`` or ``"generated"``. ``heldout``: text
    never trained on, or its token ids (generated samples; None: no held-out text for this source).
    ``skipped``: rows that could not be used.
    ``ood``: held-out text of another source (``ood_source``), scored too so that adaptation to the
    recovery text and recovered general quality can be told apart (None: not scored). ``more_ood``:
    further ``(source, held-out text)`` pairs scored the same way. ``generated``: the teacher's samples
    (``[samples, length]`` ids, the held-out ones included), ``generation`` their settings (dict) and
    ``generation_time_s`` the seconds sampling them took (None: stored samples were taken).
    """

    examples: list[tuple[list[int], list[int]]]
    kind: str
    source: str
    heldout: str | None = None
    heldout_source: str | None = None
    skipped: int = 0
    n_rows: int = 0
    ood: str | None = None
    ood_source: str | None = None
    more_ood: tuple = ()
    generated: torch.Tensor | None = None
    generation: dict | None = None
    generation_time_s: float | None = None

    def fingerprint(self) -> dict:
        import hashlib
        from array import array

        h = hashlib.sha256()
        for ids, labels in self.examples:
            h.update(array("q", ids).tobytes())
            h.update(array("q", labels).tobytes())
        out = {"kind": self.kind, "n_examples": len(self.examples), "sha256": h.hexdigest()}
        if self.generation is not None:
            out["generation"] = dict(self.generation)
        return out


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
    ood_source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    teacher=None,
    generation=None,
    reuse_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> RecoveryData:
    """Tokenised recovery data from ``source`` (see the module doc for the accepted forms).

    ``eval_source``: where the held-out perplexity text comes from instead (a corpus name or text
    file, its held-out side). ``ood_source``: a corpus name or text file of other text whose held-out
    side is scored as the out-of-domain perplexity (it must differ from ``source``), or a list of them
    (the first is the out-of-domain text of the report, the others go to ``more_ood``). Raises
    ValueError naming the file when it holds no usable row.

    ``source="generated"``: the ``teacher`` (a model, or a :class:`.teacher.Teacher`) samples the text
    with ``generation`` (a :class:`.generate.GenerationSettings`; its ``length`` becomes ``cutoff_len``);
    samples stored by an earlier run with the same settings in ``reuse_dir`` are taken instead.
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
    generated = generation_dict = seconds = None
    if name == GENERATED:
        generated, gen, seconds = _generate(tokenizer, cutoff_len, teacher, generation, reuse_dir, progress)
        examples, heldout = _split_samples(generated, heldout_fraction)
        kind, n_rows, generation_dict = "generated", generated.shape[0], gen.as_dict()
    elif teacher is not None or generation is not None:
        raise ValueError(f"a teacher and generation settings only apply to {GENERATED!r} recovery data, not {name!r}")
    elif name in mdata.CORPORA or path.suffix not in (".json", ".jsonl"):
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
    scored = []
    for other in _sources(ood_source):
        if _same_source(other, name):
            raise ValueError(f"the out-of-domain text {other!r} is the recovery data itself; choose another "
                             f"source ({' or '.join(c for c in mdata.CORPORA if c != name)}, or a text file)")
        if other in (s for s, _ in scored):
            raise ValueError(f"the out-of-domain text {other!r} is given twice")
        scored.append((other, mdata.heldout_text(other, heldout_fraction)))
    ood, ood_source = scored[0][1] if scored else None, scored[0][0] if scored else None
    return RecoveryData(examples, kind, name, heldout, heldout_source, skipped, n_rows, ood, ood_source,
                        tuple(scored[1:]), generated, generation_dict, seconds)


def _sources(spec) -> list[str]:
    """``ood_source`` as a list of source names (None: none)."""
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        return [os.fspath(spec)]
    return [os.fspath(s) for s in spec]


def _generate(tokenizer, cutoff_len: int, teacher, generation, reuse_dir, progress: bool):
    """The teacher's samples ``[samples, cutoff_len]``, their settings and the seconds sampling took (stored
    samples, taken when their settings agree: None)."""
    from dataclasses import replace

    from .generate import GenerationSettings, read_generated, sample_sequences, start_token
    from .teacher import Teacher

    if teacher is None:
        raise ValueError(f"{GENERATED!r} recovery data is sampled from the dense teacher: pass teacher= (with "
                         "moreau-recover: --distill)")
    source = "model object"
    if isinstance(teacher, Teacher):
        teacher, source = teacher.model, teacher.source
    gen = generation if generation is not None else GenerationSettings()
    if not isinstance(gen, GenerationSettings):
        raise TypeError(f"generation must be a GenerationSettings, got {type(gen).__name__}")
    gen = replace(gen, length=cutoff_len, teacher=gen.teacher or source).validate()
    ids, seconds = read_generated(reuse_dir, gen), None
    if ids is None:
        t0 = time.perf_counter()
        ids = sample_sequences(teacher, start_token(tokenizer, teacher), gen, progress=progress)
        seconds = round(time.perf_counter() - t0, 3)
    return ids, gen, seconds


def _split_samples(ids: torch.Tensor, heldout_fraction: float):
    """Training examples (every token labelled) and held-out token ids: the last ``heldout_fraction`` of
    the samples (at least one, never all) are held out."""
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    n = ids.shape[0]
    held = min(max(1, round(n * heldout_fraction)), n - 1)
    rows = ids.tolist()
    examples = [(r, list(r)) for r in rows[: n - held]]
    heldout = [t for r in rows[n - held :] for t in r]
    return examples, heldout


def _same_source(a: str, b: str) -> bool:
    from .. import data as mdata

    if a in mdata.CORPORA or b in mdata.CORPORA:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step ``step`` (0-based): epochs are cut into ceil(n/batch) steps."""
    per_epoch = math.ceil(n / batch_size)
    epoch, b = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch)[b * batch_size : (b + 1) * batch_size]


def collate(examples, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def n_labelled(examples) -> int:
    return sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in examples)

