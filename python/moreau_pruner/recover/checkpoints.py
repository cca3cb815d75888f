"""Checkpoints of a recovery run under ``OUT/checkpoints/step-NNNNNNN``: the trained weights (the LoRA
adapter, or every weight of a fully fine-tuned model) as safetensors, the AdamW state, the RNG states and
the step reached, written atomically every ``save_every`` steps, so a killed run continues to the same
final weights as an uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..io.staging import clean_stale, fsync_dir, fsync_tree, staging_path


__all__ = ["CHECKPOINTS_DIR", "check_fit", "checkpoint_dirs", "mismatch", "prepare_out", "read_checkpoint",
           "read_checkpoint_state", "rng_state", "set_rng_state", "write_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
_STATE_FILE = "state.json"
_TRAINER_FILE = "trainer_state.pt"


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
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


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(out: Path, step: int, tensors: dict[str, torch.Tensor], weights_file: str, optimizer,
                     state: dict, keep: int) -> Path:
    """Writes the checkpoint of ``step`` (``tensors`` as ``weights_file``, the optimizer and RNG states,
    ``state`` as JSON) and removes all but the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    clean_stale(final, every_name=True)  # what killed runs left in OUT/checkpoints
    tmp = staging_path(final)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / weights_file), metadata={"format": "pt"})
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / _TRAINER_FILE)
        (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"checkpoint {path} is unreadable ({exc}); remove it or pass overwrite=True (--overwrite)")


def read_checkpoint_state(path: Path) -> dict:
    """The JSON state of a checkpoint (step, losses, fingerprint of the run's settings)."""
    try:
        return json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def read_checkpoint(path: Path, weights_file: str) -> tuple[dict, dict]:
    """``(tensors, trainer state)`` of a checkpoint whose weights are ``weights_file``."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / weights_file))
        trainer = torch.load(path / _TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    return tensors, trainer


def check_fit(expected: dict[str, tuple], state: dict[str, torch.Tensor], what: str) -> None:
    """Raises ValueError unless ``state`` has exactly the tensor names of ``expected`` with those shapes."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), expected[k]) for k in sorted(expected) if k in state
             and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        details = []
        if wrong:
            k, got, want = wrong[0]
            details.append(f"{len(wrong)} tensors have other shapes (e.g. {k}: {got} in the {what.split()[0]}, "
                           f"{want} here)")
        if missing:
            details.append(f"{len(missing)} tensors this model needs are absent (e.g. {missing[0]})")
        if extra:
            details.append(f"{len(extra)} tensors match no module here (e.g. {extra[0]})")
        raise ValueError(f"{what} does not fit this model (was it trained on another model or "
                         f"another pruning?): {'; '.join(details)}")


def mismatch(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def prepare_out(out: Path, overwrite: bool, resume: str) -> list[tuple[int, Path]]:
    """Checks ``out`` before anything is written; returns its checkpoints (to resume from)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    checkpoints = checkpoint_dirs(out) if out.is_dir() else []
    if overwrite:
        return []
    if resume == "always" and not checkpoints:
        raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINTS_DIR} holds no checkpoint")
    if resume == "never" and checkpoints:
        raise FileExistsError(f"{out} holds checkpoints of an earlier run; resume it or pass overwrite=True")
    # (a checkpoints folder without a step, e.g. holding only the generated recovery text, is resumable)
    if out.is_dir() and any(p.name != CHECKPOINTS_DIR for p in out.iterdir()) and not checkpoints:
        raise FileExistsError(f"output {out} exists and is not empty (and holds no checkpoint to resume); "
                              "pass overwrite=True (--overwrite) to replace it")
    return checkpoints
