"""Perplexity on held-out text and a greedy generation check.

Perplexity follows the protocol of the pruning papers (LLM-Pruner's ``PPLMetric``, MoreauPruner):
the held-out text is tokenised once, cut into non-overlapping windows of ``seq_len`` tokens (the
tail shorter than a window is dropped), each window is run through the model on its own (no
context carried between windows), and every window predicts its tokens 2..seq_len from the ones
before.  The perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens
of all windows, i.e. ``exp(sum NLL / (n_windows * (seq_len - 1)))``.  Log-softmax is computed in
fp32 whatever the model's dtype, the NLL sum is accumulated in fp64, and the model runs under
``torch.no_grad()`` in eval mode (its previous train/eval mode is restored afterwards).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data import tokenize_text

__all__ = ["PerplexityResult", "evaluate_perplexity", "perplexity", "generate_text"]


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`evaluate_perplexity`."""

    ppl: float  #: exp(mean_nll)
    mean_nll: float  #: mean negative log-likelihood per predicted token, in nats
    n_windows: int  #: windows evaluated
    n_predicted: int  #: predicted tokens, n_windows * (seq_len - 1)
    seq_len: int  #: tokens per window
    n_tokens: int  #: tokens in the whole tokenised text (before windowing / max_windows)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model output of type {type(output).__name__} has no logits tensor; expected a "
            "causal LM returning .logits"
        )
    return logits


def _forward_params(model):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return {}


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _no_cache_kwargs(model) -> dict:
    """``use_cache=False`` where the model's forward takes it (HF models), nothing otherwise."""
    params = _forward_params(model)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if "use_cache" in params or takes_kwargs else {}


def _cache_of(output):
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def _as_ids(tokenizer, text_or_ids) -> torch.Tensor:
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate perplexity on text; pass token ids otherwise")
        return tokenize_text(tokenizer, text_or_ids)
    if isinstance(text_or_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in text_or_ids):
            raise TypeError("a list of token ids must hold ints only")
        return torch.tensor(text_or_ids, dtype=torch.long)
    if isinstance(text_or_ids, torch.Tensor):
        if text_or_ids.is_floating_point() or text_or_ids.is_complex() or text_or_ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {text_or_ids.dtype}")
        if text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
            text_or_ids = text_or_ids[0]
        if text_or_ids.dim() != 1:
            raise ValueError(
                f"token ids must have shape [L] or [1, L], got {tuple(text_or_ids.shape)}"
            )
        return text_or_ids.long()
    raise TypeError(
        f"text_or_ids must be a str, a list of ints or an integer tensor, got {type(text_or_ids).__name__}"
    )


def evaluate_perplexity(
    model,
    tokenizer,
    text_or_ids,
    seq_len: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    device=None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity with its details (see the module doc for the protocol).

    ``text_or_ids``: held-out text (tokenised with ``tokenizer``, special tokens added once at the
    start as LLM-Pruner does) or token ids (list, [L] or [1, L] tensor; ``tokenizer`` may then be
    None).  ``seq_len``: window length (the papers' setting is 128; 1024 is also reported).
    ``batch_size``: windows per forward pass.  ``max_windows``: evaluate only the first that many
    windows (None: all).  ``device``: where the ids go (default: the model's first parameter's
    device).  ``progress``: show a tqdm bar.

    Raises ``ValueError`` when the text is shorter than one window, and ``FloatingPointError``
    naming the window when the model yields NaN or infinite log-probabilities (or the mean NLL is
    too large for ``exp``).
    """
    seq_len = _check_int("seq_len", seq_len, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    if max_windows is not None:
        max_windows = _check_int("max_windows", max_windows, 1)
    ids = _as_ids(tokenizer, text_or_ids)
    n_tokens = ids.numel()
    if n_tokens:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (isinstance(vocab, int) and hi >= vocab):
            raise ValueError(
                f"token ids span [{lo}, {hi}], outside the model's vocabulary [0, {vocab}); "
                "was the text tokenised with this model's tokenizer?"
            )
    n_windows = n_tokens // seq_len
    if n_windows == 0:
        raise ValueError(
            f"evaluation text too short: {n_tokens} tokens, fewer than one window of "
            f"seq_len={seq_len}"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    device = torch.device(device) if device is not None else _model_device(model)

    from tqdm.auto import tqdm

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    extra = _no_cache_kwargs(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad(), tqdm(
            total=n_windows, desc=f"perplexity@{seq_len}", unit="window", disable=not progress
        ) as bar:
            for first in range(0, n_windows, batch_size):
                batch = windows[first : first + batch_size].to(device)
                logits = _logits_of(model(input_ids=batch, **extra))
                if logits.shape[:2] != batch.shape:
                    raise ValueError(
                        f"model returned logits of shape {tuple(logits.shape)} for input "
                        f"{tuple(batch.shape)}; expected [batch, seq_len, vocab]"
                    )
                for row in range(batch.shape[0]):
                    # one window at a time keeps the fp32 copy of the logits small
                    nll = F.cross_entropy(
                        logits[row, :-1].float(), batch[row, 1:], reduction="none"
                    )
                    if not torch.isfinite(nll).all():
                        kind = "NaN" if torch.isnan(nll).any() else "infinite"
                        w = first + row
                        raise FloatingPointError(
                            f"perplexity: {kind} negative log-likelihood in window {w} (tokens "
                            f"{w * seq_len}..{(w + 1) * seq_len - 1}); the model's logits "
                            f"({logits.dtype}) are not finite there"
                        )
                    nll_sum += nll.double().sum().cpu()
                bar.update(batch.shape[0])
    finally:
        if hasattr(model, "train"):
            model.train(was_training)

    n_predicted = n_windows * (seq_len - 1)
    mean_nll = float(nll_sum) / n_predicted
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        ppl = math.inf
    if not math.isfinite(ppl):
        raise FloatingPointError(
            f"perplexity is infinite: mean NLL {mean_nll:.1f} nats/token overflows exp()"
        )
    return PerplexityResult(
        ppl=ppl,
        mean_nll=mean_nll,
        n_windows=n_windows,
        n_predicted=n_predicted,
        seq_len=seq_len,
        n_tokens=n_tokens,
    )


def perplexity(
    model,
    tokenizer,
    text_or_ids,
    seq_len: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    device=None,
    progress: bool = True,
) -> float:
    """``exp`` of the mean token NLL over non-overlapping ``seq_len`` windows; see
    :func:`evaluate_perplexity` for the arguments and errors."""
    return evaluate_perplexity(
        model,
        tokenizer,
        text_or_ids,
        seq_len=seq_len,
        batch_size=batch_size,
        max_windows=max_windows,
        device=device,
        progress=progress,
    ).ppl


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    device=None,
    stop_at_eos: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` (the new text only, special tokens skipped).

    A plain argmax loop over the model with its KV cache, in eval mode and without gradients, so
    it does not depend on the model's generation config (no sampling, temperature or repetition
    penalty).  Stops after ``max_new_tokens`` tokens or, with ``stop_at_eos``, at the tokenizer's
    EOS token.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    device = torch.device(device) if device is not None else _model_device(model)
    ids = tokenize_text(tokenizer, prompt).to(device)[None, :]
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None

    cache_kw = _cache_kwarg(model)
    was_training = getattr(model, "training", False)
    model.eval()
    new_tokens: list[int] = []
    try:
        with torch.no_grad():
            past = None
            step_input = ids
            for _ in range(max_new_tokens):
                out = model(input_ids=step_input, use_cache=True, **{cache_kw: past})
                past = _cache_of(out)
                logits = _logits_of(out)[:, -1].float()
                if not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"generate_text: the model's logits are not finite at new token "
                        f"{len(new_tokens)}"
                    )
                token = int(logits.argmax(dim=-1)[0])
                new_tokens.append(token)
                if eos is not None and token == eos:
                    break
                if past is None:  # model without a cache: feed the whole sequence again
                    ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
                    step_input = ids
                else:
                    step_input = ids.new_tensor([[token]])
    finally:
        model.train(was_training)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
