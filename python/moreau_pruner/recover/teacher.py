"""The dense teacher of distillation recovery: which model it is, loading it frozen, and checking that it
speaks the student's vocabulary.

Which model (:func:`resolve_teacher`): the one given (a dense model directory, a ``.gguf`` file, or
``"embedded"`` for the packaged SmolLM2-135M-Instruct); else the one the pruned directory's
``pruning_info.json`` names as the model it was pruned from (``moreau-prune`` writes it as ``"model"``:
a path, or ``"embedded SmolLM2-135M-Instruct"``; a recovered directory keeps it). Without either the
teacher is unknown and that is an error, raised before any model is loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["EMBEDDED", "Teacher", "check_teacher", "freeze", "load_teacher", "resolve_teacher"]

#: the teacher spec of the packaged SmolLM2-135M-Instruct
EMBEDDED = "embedded"
#: how moreau-prune names the packaged model in pruning_info.json
_EMBEDDED_NAME = "embedded SmolLM2-135M-Instruct"
_PRUNING_INFO = "pruning_info.json"


@dataclass
class Teacher:
    """A frozen teacher: the model (eval mode, no parameter requires grad), its tokenizer (None when
    unknown) and where it came from."""

    model: torch.nn.Module
    tokenizer: object | None
    source: str

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)


def resolve_teacher(model_path: str | os.PathLike | None, teacher: str | os.PathLike | None = None) -> str:
    """The teacher of the pruned model at ``model_path``: ``"embedded"`` or an existing path.

    ``teacher`` (given) wins; else the model ``model_path/pruning_info.json`` names. Raises
    FileNotFoundError when the named model does not exist here and ValueError when none is known.
    """
    if teacher is not None:
        spec = os.fspath(teacher)
        if spec == EMBEDDED:
            return EMBEDDED
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"teacher {spec!r} does not exist (give a dense model directory, a .gguf file "
                                    f"or {EMBEDDED!r} for the packaged SmolLM2-135M-Instruct)")
        return os.fspath(path.absolute())
    if model_path is None:
        raise ValueError("no teacher known: give the dense model (a model directory, a .gguf file or "
                         f"{EMBEDDED!r}) or the pruned directory whose {_PRUNING_INFO} names it")
    info_file = Path(model_path).expanduser() / _PRUNING_INFO
    named = None
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{info_file} is unreadable ({exc}); pass the dense model as the teacher "
                             "(--teacher PATH)") from None
        named = info.get("model") if isinstance(info, dict) else None
    if not isinstance(named, str) or not named:
        raise ValueError(f"no teacher known for {os.fspath(model_path)}: distillation needs the dense model, and "
                         f"{'its ' + _PRUNING_INFO + ' names none' if info_file.is_file() else 'it has no ' + _PRUNING_INFO} "
                         f"(moreau-prune --out writes one); pass it with --teacher PATH (a dense model directory, "
                         f"a .gguf file, or {EMBEDDED!r})")
    if named in (_EMBEDDED_NAME, EMBEDDED):
        return EMBEDDED
    path = Path(named).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{info_file} names {named!r} as the dense model, which does not exist here"
                                f"{' (a path relative to where moreau-prune ran)' if not path.is_absolute() else ''}; "
                                "pass the teacher with --teacher PATH")
    return os.fspath(path.absolute())


def load_teacher(spec: str, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Teacher:
    """Loads the teacher ``spec`` (see :func:`resolve_teacher`) frozen, in ``dtype``, on ``device``."""
    from ..model.loading import load_model

    model, tokenizer = load_model(None if spec == EMBEDDED else spec, dtype=dtype or "float32", device=str(device))
    return Teacher(freeze(model), tokenizer, spec)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (in place)."""
    model.requires_grad_(False)
    model.eval()
    return model


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_teacher(teacher: Teacher, student, student_tokenizer=None) -> None:
    """Raises ValueError when the teacher cannot teach ``student``: it is the same object, it predicts
    another number of tokens, or its tokenizer maps tokens to other ids than the student's."""
    if teacher.model is student:
        raise ValueError("the teacher is the student itself; distillation needs the dense model as a separate "
                         "model object")
    t_vocab, s_vocab = _vocab_size(teacher.model), _vocab_size(student)
    if t_vocab != s_vocab:
        raise ValueError(f"the teacher {teacher.source} predicts {t_vocab} tokens and the student {s_vocab}: "
                         "distillation compares the two distributions token by token, so both need one vocabulary "
                         "(is the teacher another model family?)")
    if teacher.tokenizer is None or student_tokenizer is None:
        return
    t_ids, s_ids = teacher.tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_ids != s_ids:
        differing = sorted(set(t_ids.items()) ^ set(s_ids.items()), key=lambda kv: (kv[1], kv[0]))
        token = differing[0][0]
        raise ValueError(f"the teacher {teacher.source} has another tokenizer than the student ({len(t_ids)} and "
                         f"{len(s_ids)} entries; e.g. {token!r} is id {t_ids.get(token)} in the teacher's and "
                         f"{s_ids.get(token)} in the student's): distillation needs the same token ids")
