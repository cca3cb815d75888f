"""GGUF export: a directory this package wrote, as one GGUF file that llama.cpp runs.

llama.cpp (and what is built on it: llama-cpp-python, ollama, LM Studio) reads GGUF. A uniformly
pruned (or unpruned) model is written as the ``llama`` architecture, or ``qwen2`` for a Qwen2 whose
query heads still fill ``hidden_size`` (llama.cpp's ``qwen2`` graph sizes ``attn_q`` as
``hidden_size x hidden_size``, so a Qwen2 with fewer heads goes to ``llama``, whose graph takes q/k/v
biases too). A model whose layers have different widths is written as ``deci`` (the Nemotron-NAS
architecture): its ``head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer arrays
and llama.cpp builds every layer with its own ``n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)``.

What is written:

- the weights, q/k rows reordered for the ``llama``/``deci`` rotary layout (GGML's "normal" mode
  rotates adjacent pairs, transformers rotates the two halves of a head), as ``--outtype`` says:
  ``f32``, ``f16``, ``bf16`` or ``q8_0`` (1-D tensors, i.e. norms and biases, stay F32; a matrix whose
  rows are not whole blocks of 32 stays F16 under ``q8_0``);
- the hyper-parameters (``key_length``/``value_length`` = ``head_dim``, since pruned heads no longer
  fill ``hidden_size``), and rotary scaling as a ``rope_freqs`` tensor for the ``linear`` and
  ``llama3`` rope types;
- the tokenizer: a byte-level BPE ``tokenizer.json`` (GPT-2 style: SmolLM2, Llama 3, Qwen2) as
  ``tokenizer.ggml.model`` ``gpt2`` with the llama.cpp pre-tokenizer whose split rules are the ones in
  ``tokenizer.json``, the merges, special token ids, ``add_bos``/``add_eos`` and the chat template.

What GGUF or llama.cpp cannot express is refused before anything is written, with the limit named
(another activation than SiLU, other rope types, an active sliding window, a tokenizer that is not
byte-level BPE). The file is written to a temporary sibling and renamed into place; on any error
nothing is left behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .staging import clean_stale, fsync_dir, fsync_file, staging_path

__all__ = ["OUTTYPES", "GGUFExport", "plan_gguf", "export_gguf", "pre_tokenizer_name"]

#: --outtype -> (numpy/GGML storage of matrices, GGUF general.file_type name)
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
ROPE_TYPES = ("default", "linear", "llama3")  # what a rope_freqs tensor (or nothing) reproduces exactly
Q8_BLOCK = 32

# The split rules of the byte-level BPE pre-tokenizers llama.cpp implements, as tokenizer.json writes
# them; llama.cpp's names for them (src/llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
#: pre-tokenizer name -> whether llama.cpp then skips the merges of words already in the vocabulary
_IGNORE_MERGES = {"gpt-2": False, "smollm": False, "llama-bpe": True, "qwen2": False}


@dataclass
class GGUFExport:
    """What :func:`export_gguf` writes (or wrote), decided before any byte is written."""

    arch: str
    outtype: str
    n_layers: int
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    head_dim: int
    tokenizer_pre: str
    n_vocab: int
    tensors: int = 0
    f16_fallback: list[str] = field(default_factory=list)  # q8_0 matrices kept F16 (rows not whole blocks)
    path: str | None = None

    @property
    def per_layer(self) -> bool:
        return self.arch == "deci"


def _ones(values) -> bool:
    return len(set(values)) == 1


def _rope_factors(model, head_dim: int) -> tuple[float, torch.Tensor | None]:
    """(rope_theta, per-frequency divisors or None) for the model's rotary embedding; refuses the
    rope types a GGUF ``rope_freqs`` tensor cannot reproduce."""
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    rope = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", params.get("rope_type", "default"))
    if theta is None or rope is None:
        raise ValueError("cannot export to GGUF: the model has no rotary embedding with a rope_theta")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"cannot export to GGUF: rope type {rope_type!r} is not written (supported: "
                         f"{', '.join(ROPE_TYPES)}); llama.cpp's fixed per-frequency factors cannot reproduce it")
    if float(getattr(rope, "attention_scaling", 1.0)) != 1.0:
        raise ValueError(f"cannot export to GGUF: rope type {rope_type!r} scales attention by "
                         f"{rope.attention_scaling}, which the llama/deci graphs do not")
    if rope_type == "default":
        return float(theta), None
    inv = rope.inv_freq.detach().to("cpu", torch.float64)
    base = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if inv.shape != base.shape:
        raise ValueError(f"cannot export to GGUF: the rotary embedding covers {2 * inv.numel()} of "
                         f"{head_dim} head dimensions (partial rotary is not written)")
    return float(theta), (base / inv).to(torch.float32)


def _check_model(model) -> None:
    cfg = model.config
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"cannot export to GGUF: MLP activation {act!r}; the llama/deci/qwen2 graphs use SiLU")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True)  # Qwen2 keeps a window it does not use
    context = getattr(cfg, "max_position_embeddings", None)
    if window is not None and uses_window and context is not None and window < context:
        raise ValueError(f"cannot export to GGUF: the model attends to a sliding window of {window} tokens "
                         f"within its {context}-token context; llama.cpp's llama/deci graphs attend to the "
                         "whole context, so the results would differ past the window")


def _architecture(base_arch: str, heads: list[int], kv: list[int], ff: list[int], head_dim: int,
                  hidden: int) -> str:
    if not (_ones(heads) and _ones(kv) and _ones(ff)):
        return "deci"
    if base_arch == "Qwen2ForCausalLM" and heads[0] * head_dim == hidden:
        return "qwen2"
    return "llama"


# --------------------------------------------------------------------------- tokenizer


def _is_byte_level(p, use_regex: bool) -> bool:
    return (isinstance(p, dict) and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex
            and not p.get("add_prefix_space", False))


def pre_tokenizer_name(pre) -> str | None:
    """llama.cpp's name for a ``tokenizer.json`` ``pre_tokenizer`` (a dict), or None when llama.cpp
    has no pre-tokenizer that splits text the same way."""
    if _is_byte_level(pre, True):
        return "gpt-2"
    if not (isinstance(pre, dict) and pre.get("type") == "Sequence"):
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    first, second = steps
    if (first.get("type") == "Digits" and first.get("individual_digits") is True
            and _is_byte_level(second, True)):
        return "smollm"
    if first.get("type") == "Split" and _is_byte_level(second, False):
        pattern = first.get("pattern") or {}
        if first.get("behavior") == "Isolated" and not first.get("invert", False) and "Regex" in pattern:
            return _SPLIT_PRE.get(pattern["Regex"])
    return None


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool = False
    add_eos: bool = False


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether the transformers tokenizer puts BOS first / EOS last when encoding text (what
    llama.cpp's ``add_bos_token`` / ``add_eos_token`` must say, whatever the files spell)."""
    if tokenizer is None:
        return False, False
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    head = len(full) > len(plain) and bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain
    tail = len(full) > len(plain) and eos is not None and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return bool(head), bool(tail)


def _read_vocab(directory: Path, n_vocab: int) -> _Vocab:
    """The token list, token types and pre-tokenizer name from ``directory/tokenizer.json``."""
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"cannot export to GGUF: {directory} has no tokenizer.json (llama.cpp tokenizes text "
                         "itself, so the GGUF file must carry the tokenizer)")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"cannot export to GGUF: {path.name} holds a {kind or 'unknown'} tokenizer"
            f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; the GGUF export "
            "writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3 and Qwen2 use)")
    if tj.get("normalizer") is not None:
        raise ValueError(f"cannot export to GGUF: {path.name} normalizes text first "
                         f"({tj['normalizer'].get('type')}); llama.cpp's BPE tokenizer does not")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise ValueError(f"cannot export to GGUF: llama.cpp has no pre-tokenizer that splits text like this "
                         f"tokenizer.json ({json.dumps(tj.get('pre_tokenizer'))[:300]}); supported: GPT-2 byte-level, "
                         "SmolLM (digits, then byte-level), Llama 3 and Qwen2 split patterns")
    if bool(model.get("ignore_merges", False)) != _IGNORE_MERGES[pre]:
        raise ValueError(f"cannot export to GGUF: tokenizer.json has ignore_merges={model.get('ignore_merges')} but "
                         f"llama.cpp's {pre!r} pre-tokenizer implies {_IGNORE_MERGES[pre]}")
    by_id: dict[int, str] = {}
    for text, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = text
    special: dict[int, bool] = {}
    for added in tj.get("added_tokens") or []:
        i = int(added["id"])
        by_id[i] = added["content"]
        special[i] = bool(added.get("special"))
    if not by_id:
        raise ValueError(f"cannot export to GGUF: {path} has an empty vocabulary")
    top = max(by_id)
    if top >= n_vocab:
        raise ValueError(f"cannot export to GGUF: the tokenizer has token id {top} but the embedding has only "
                         f"{n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return _Vocab(tokens, [int(t) for t in types], pre)


# --------------------------------------------------------------------------- tensors


def _rotary_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (or biases) of ``n_head`` heads reordered from transformers' half-split rotary layout
    to GGML's adjacent-pair one: row ``2i + h`` of a head is row ``h * head_dim / 2 + i``."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(model, arch: str, heads: list[int], kv: list[int], tied: bool, rope_freqs):
    """(GGUF name, float32 tensor) pairs in the order llama.cpp's converter writes them."""
    state = model.state_dict()
    permute = arch in ("llama", "deci")
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    if rope_freqs is not None:
        out.append(("rope_freqs.weight", rope_freqs))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for il in range(len(heads)):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = state.get(f"model.layers.{il}.{hf}.{kind}")
                if t is None:
                    continue
                if permute and gg == "attn_q":
                    t = _rotary_rows(t, heads[il])
                elif permute and gg == "attn_k":
                    t = _rotary_rows(t, kv[il])
                out.append((f"blk.{il}.{gg}.{kind}", t))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not tied:
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _stored(name: str, t: torch.Tensor, outtype: str, fallback: list[str]):
    """(numpy array, raw GGML type or None) for one tensor under ``outtype``."""
    import gguf
    import numpy as np

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, None
    if outtype == "f16":
        return a.astype(np.float16), None
    if outtype == "bf16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if a.shape[-1] % Q8_BLOCK:
        fallback.append(name)
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# --------------------------------------------------------------------------- export


def plan_gguf(model, directory: Path, outtype: str = "f16", tokenizer=None):
    """Checks that ``model`` (loaded from ``directory``) and its tokenizer fit GGUF; returns
    ``(GGUFExport, vocab, rope_theta, rope_freqs)``. Raises ValueError naming what does not fit."""
    from .pruned import _base_architecture, layer_widths

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    _check_model(model)
    widths = layer_widths(model)
    heads, kv, ff = (widths["layer_num_attention_heads"], widths["layer_num_key_value_heads"],
                     widths["layer_intermediate_size"])
    dims = {block.self_attn.head_dim for block in model.model.layers}
    if len(dims) != 1:
        raise ValueError(f"cannot export to GGUF: the layers have different head sizes {sorted(dims)}")
    head_dim = dims.pop()
    cfg = model.config
    arch = _architecture(_base_architecture(model), heads, kv, ff, head_dim, cfg.hidden_size)
    theta, rope_freqs = _rope_factors(model, head_dim)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = _read_vocab(directory, n_vocab)
    vocab.add_bos, vocab.add_eos = _adds_special(tokenizer)
    plan = GGUFExport(arch, outtype, len(heads), heads, kv, ff, head_dim, vocab.pre, n_vocab)
    return plan, vocab, theta, rope_freqs


def _write(writer, model, directory: Path, plan: GGUFExport, vocab: _Vocab, theta: float, rope_freqs) -> None:
    import gguf

    cfg = model.config
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(directory.name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(plan.n_layers)
    if plan.per_layer:
        writer.add_feed_forward_length(plan.feed_forward_length)
        writer.add_head_count(plan.head_count)
        writer.add_head_count_kv(plan.head_count_kv)
    else:
        writer.add_feed_forward_length(plan.feed_forward_length[0])
        writer.add_head_count(plan.head_count[0])
        writer.add_head_count_kv(plan.head_count_kv[0])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(plan.n_vocab)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, OUTTYPES[plan.outtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=plan.n_vocab)
    if not special.merges:
        raise ValueError(f"cannot export to GGUF: {directory / 'tokenizer.json'} has no BPE merges")
    special.add_special_token.update(bos=vocab.add_bos, eos=vocab.add_eos)
    special.add_to_gguf(writer, quiet=True)

    for name, t in _gguf_tensors(model, plan.arch, plan.head_count, plan.head_count_kv, tied, rope_freqs):
        data, raw = _stored(name, t, plan.outtype, plan.f16_fallback)
        writer.add_tensor(name, data, raw_dtype=raw)
        plan.tensors += 1


def export_gguf(directory: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                overwrite: bool = False) -> GGUFExport:
    """Writes the model in ``directory`` (per-layer, ``--uniform``, recovered or dense; anything
    :func:`moreau_pruner.io.pruned.load_pruned` reads) to the GGUF file ``out``.

    ``outtype``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices. Everything is checked
    before writing; the file is written to a temporary sibling and renamed into place, so an error
    leaves nothing behind and an existing ``out`` is replaced only with ``overwrite=True``. Returns
    what was written (:class:`GGUFExport`)."""
    import gguf

    from .pruned import load_pruned

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    directory = Path(directory).expanduser()
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give the GGUF file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory of {out} does not exist")
    model, tokenizer = load_pruned(directory, dtype=torch.float32)
    plan, vocab, theta, rope_freqs = plan_gguf(model, directory, outtype, tokenizer)

    clean_stale(out)
    tmp = staging_path(out)
    writer = gguf.GGUFWriter(tmp, plan.arch)
    try:
        _write(writer, model, directory, plan, vocab, theta, rope_freqs)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    plan.path = str(out)
    return plan
