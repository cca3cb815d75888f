"""Recovery text written by the teacher itself (data-free distillation, as LLM-QAT does).

Text from one corpus moves the student toward the teacher on that kind of text only. Sequences the
dense teacher samples from its own distribution cover what it knows in general, so distilling on them
recovers general quality rather than adapting to a domain. :func:`sample_sequences` draws ``samples``
sequences of ``length`` tokens: each starts from the start token (the tokenizer's BOS, else the model's
``bos_token_id``, else EOS) and continues by sampling the teacher's next-token distribution at
``temperature`` (no top-k/top-p cut: the plain distribution at temperature 1), in batches, without
gradients, in the teacher's dtype, from a generator seeded by ``seed``. A fixed share of the samples
(the last ones) is held out as the in-domain evaluation text.

A run stores its samples in ``OUT/checkpoints/generated.safetensors`` (:func:`save_generated`) with
their settings, so that a resumed run trains on exactly the same tokens instead of sampling again
(:func:`read_generated` gives them back when the settings agree); the finished output keeps them in
``OUT/generated.safetensors``.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["GENERATED", "GENERATED_FILE", "GenerationSettings", "read_generated", "sample_sequences",
           "save_generated", "start_token"]

#: the recovery data source name of teacher-generated text
GENERATED = "generated"
#: where a run keeps its generated token ids (under OUT/checkpoints)
GENERATED_FILE = "generated.safetensors"


@dataclass(frozen=True)
class GenerationSettings:
    """What the teacher samples: ``samples`` sequences of ``length`` tokens (the start token included) at
    ``temperature``, ``batch_size`` sequences at a time, from a generator seeded by ``seed``; ``teacher``
    names the model that sampled (recorded, and compared when stored samples are reused)."""

    samples: int = 256
    length: int = 256
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    teacher: str = ""

    def validate(self) -> "GenerationSettings":
        for name, minimum in (("samples", 2), ("length", 2), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"generation {name} must be an int >= {minimum}, got {v!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"generation temperature must be a positive finite number, got {t!r}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def start_token(tokenizer, model) -> int:
    """The token every sample starts from: the tokenizer's BOS, else the model's ``bos_token_id``, else EOS."""
    for owner, attr in ((tokenizer, "bos_token_id"), (getattr(model, "config", None), "bos_token_id"),
                        (tokenizer, "eos_token_id"), (getattr(model, "config", None), "eos_token_id")):
        v = getattr(owner, attr, None) if owner is not None else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise ValueError("the teacher's tokenizer and config name no BOS or EOS token to start the generated samples from")


@torch.no_grad()
def sample_sequences(model, start_id: int, settings: GenerationSettings, progress: bool = True) -> torch.Tensor:
    """``[samples, length]`` token ids (int64, on the CPU) sampled from ``model`` (see the module doc)."""
    from tqdm.auto import tqdm

    s = settings.validate()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(s.seed)
    out = torch.empty(s.samples, s.length, dtype=torch.long)
    # (the key/value cache is ``cache`` in newer transformers, ``past_key_values`` before)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=s.samples, desc="generate", unit="sample", disable=not progress) as bar:
            for first in range(0, s.samples, s.batch_size):
                b = min(s.batch_size, s.samples - first)
                ids = torch.full((b, 1), int(start_id), dtype=torch.long, device=device)
                seq, past = [ids], None
                for _ in range(s.length - 1):
                    o = model(input_ids=ids, use_cache=True, **{cache_arg: past})
                    past = getattr(o, cache_arg)
                    probs = torch.softmax(o.logits[:, -1, :].float() / s.temperature, dim=-1)
                    ids = torch.multinomial(probs, 1, generator=gen)
                    seq.append(ids)
                out[first : first + b] = torch.cat(seq, dim=1).cpu()
                del past
                bar.update(b)
    finally:
        model.train(was_training)
    return out


def save_generated(directory: Path, ids: torch.Tensor, settings: GenerationSettings) -> Path:
    """Writes ``ids`` and their settings to ``directory/generated.safetensors`` atomically."""
    from safetensors.torch import save_file

    from ..io.staging import fsync_dir, staging_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / GENERATED_FILE
    tmp = staging_path(final)
    try:
        save_file({"input_ids": ids.contiguous()}, str(tmp), metadata={"settings": json.dumps(settings.as_dict())})
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return final


def read_generated(directory: Path | None, settings: GenerationSettings) -> torch.Tensor | None:
    """The ids stored in ``directory`` by a run with these ``settings`` (None: none stored, or other settings,
    or unreadable: the caller samples again)."""
    from safetensors import safe_open

    if directory is None:
        return None
    path = Path(directory) / GENERATED_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = json.loads((f.metadata() or {}).get("settings", "null"))
            ids = f.get_tensor("input_ids")
    except Exception:
        return None
    if stored != settings.as_dict() or tuple(ids.shape) != (settings.samples, settings.length):
        return None
    return ids
