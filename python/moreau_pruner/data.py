"""Calibration data and held-out evaluation text.

Offline corpora (nothing is downloaded):

``"pydoc"``
    The English reference text shipped with CPython in ``pydoc_data.topics`` (~465k characters,
    79 topics).  Always present.  Documents are the topics, in sorted key order.
``"fortunes"``
    Debian's ``fortunes`` package (``apt-get install fortunes``), the files under
    ``/usr/share/games/fortunes`` in sorted file-name order, each split into its fortunes at the
    ``%`` separator lines (~15k fortunes, ~2.5M characters).  Terminal overstriking (underline /
    bold written with backspaces) is rendered to the visible letters.  Raises :class:`CorpusNotAvailableError` naming the apt package when absent.
``"mixed"``
    A mixture (:data:`MIXTURES`) of the two, for calibration on more than one kind of text: its
    calibration side holds the calibration sides of pydoc and fortunes in equal measure (fortunes,
    about five times larger, thinned to every k-th calibration fortune, k the ratio of their
    character counts rounded, so the fortunes used come from every file), interleaved at document
    level in a fixed order: the next document always comes from the corpus with fewer characters
    so far.  Its held-out side is the union of their held-out sides, interleaved the same way (not
    thinned).  No held-out document of either corpus is on its calibration side, so evaluating on
    the held-out pydoc or fortunes text after calibrating on ``mixed`` is still held out.
    :func:`split_corpus` gives the two sides as document lists.

Any other ``source`` given to :func:`load_text`, :func:`calibration_text` or
:func:`heldout_text` is read as a UTF-8 text file.

Calibration / held-out split
----------------------------
For a named corpus the split is made over whole documents, never inside one
(:func:`split_documents`): documents are visited in their fixed order and each goes to the
held-out side when that brings the held-out share of characters seen so far closer to
``heldout_fraction`` (default 0.2), otherwise to the calibration side.  The held-out documents are
thus spread over the whole corpus, and the held-out share ends up close to the target (pydoc:
26 of its 78 distinct topics, 20.0 % of the characters; fortunes: 20.0 %).  For a text file,
which has no document structure we can rely on, the split is contiguous (:func:`split_text`): the first ``1 - heldout_fraction`` of
the characters are calibration text and the rest is held out, the cut moved back to the previous
line break (or whitespace) so that no word or line is cut.  Either way the two sides never share a
document or a character.  To use a whole file for one purpose (``--calib-file`` / ``--eval-file``)
call :func:`load_text` instead.

Calibration batches follow LLM-Pruner's ``get_examples``: random windows of ``seq_len`` tokens
from tokenised text; the published MoreauPruner / LLM-Pruner setting is 10 samples x 64 tokens.

Public datasets (WikiText-2, PTB, C4, BookCorpus) load through the optional ``datasets`` package
with :func:`load_hf_dataset`, joined into one string the way LLM-Pruner and the pruning papers do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "CORPORA",
    "MIXTURES",
    "HF_DATASETS",
    "CorpusNotAvailableError",
    "FORTUNES_DIR",
    "corpus_available",
    "corpus_documents",
    "load_text",
    "split_documents",
    "split_corpus",
    "split_text",
    "calibration_text",
    "heldout_text",
    "tokenize_text",
    "calibration_batch",
    "load_hf_dataset",
]

#: Mixtures of the offline corpora: name -> the corpora whose calibration sides it interleaves.
MIXTURES = {"mixed": ("pydoc", "fortunes")}

#: Names of the offline corpora (and mixtures) understood by :func:`load_text`.
CORPORA = ("pydoc", "fortunes", *MIXTURES)

#: Where Debian's ``fortunes`` package installs its text files.
FORTUNES_DIR = Path("/usr/share/games/fortunes")

_DOC_SEPARATOR = "\n\n"


class CorpusNotAvailableError(RuntimeError):
    """A named offline corpus is not installed on this machine."""


# --------------------------------------------------------------------------------------------
# Offline corpora
# --------------------------------------------------------------------------------------------
def _pydoc_documents() -> list[str]:
    try:
        from pydoc_data import topics
    except ImportError as exc:  # pragma: no cover - part of every CPython install
        raise CorpusNotAvailableError(
            "corpus 'pydoc' needs the standard-library module pydoc_data.topics, which this "
            "Python installation lacks"
        ) from exc
    return [topics.topics[key] for key in sorted(topics.topics)]


def _resolve_overstrike(line: str) -> str:
    """Render terminal overstriking: ``_\bx`` / ``___\b\b\bxyz`` (underline) and ``x\bx``
    (bold) become the visible letters."""
    cells: list[str] = []
    pos = 0
    for ch in line:
        if ch == "\x08":
            pos = max(0, pos - 1)
            continue
        if pos < len(cells):
            if cells[pos] in ("_", " "):
                cells[pos] = ch
            # otherwise keep the letter already there ("_" or the same letter struck again)
        else:
            cells.append(ch)
        pos += 1
    return "".join(cells)


def _fortune_files(directory: str | os.PathLike | None = None) -> list[Path]:
    directory = Path(FORTUNES_DIR if directory is None else directory)
    files = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            # skip the strfile indices (*.dat), the *.u8 symlinks and sub-folders (e.g. off/)
            if path.suffix == ".dat" or path.is_symlink() or not path.is_file():
                continue
            files.append(path)
    return files


def _fortune_documents(directory: str | os.PathLike | None = None) -> list[str]:
    files = _fortune_files(directory)
    if not files:
        directory = FORTUNES_DIR if directory is None else directory
        raise CorpusNotAvailableError(
            f"corpus 'fortunes' not found: no fortune files under {directory}; install the Debian "
            "package with `apt-get install fortunes`, or use the 'pydoc' corpus or a text file"
        )
    docs: list[str] = []
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        raw = raw.replace("\r\n", "\n")
        if "\x08" in raw:
            raw = "\n".join(_resolve_overstrike(line) for line in raw.split("\n"))
        for entry in re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE):
            entry = entry.strip("\n")
            if entry.strip():
                docs.append(entry)
    return docs


def _unique(docs: list[str]) -> list[str]:
    return list(dict.fromkeys(docs))


def corpus_available(name: str) -> bool:
    """Whether a named offline corpus (or every part of a mixture) is installed here (pydoc always is)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return all(part != "fortunes" or bool(_fortune_files()) for part in MIXTURES.get(name, (name,)))


def corpus_documents(name: str) -> list[str]:
    """The distinct documents of a named offline corpus (``"pydoc"``, ``"fortunes"`` or a mixture).

    Fixed order; repeated documents (pydoc's ``if`` and ``else`` topics share one text, fortunes
    repeat across files) are kept once, at their first place, so that a split cannot put the
    same text on both sides.  A mixture's documents are its calibration side followed by its
    held-out side (:func:`split_corpus`, which is how a mixture is split, not :func:`split_documents`).
    """
    if name == "pydoc":
        return _unique(_pydoc_documents())
    if name == "fortunes":
        return _unique(_fortune_documents())
    if name in MIXTURES:
        calib, heldout = split_corpus(name)
        return calib + heldout
    raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")


def _read_text_file(source: str | os.PathLike) -> str:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"text source {str(source)!r} is neither a known corpus ({', '.join(CORPORA)}) "
            "nor an existing file"
        )
    if path.is_dir():
        raise IsADirectoryError(f"text source {str(path)!r} is a directory, expected a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8: {exc}") from exc
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def _is_corpus(source) -> bool:
    return isinstance(source, str) and source in CORPORA


def load_text(source: str | os.PathLike) -> str:
    """The whole text of a named offline corpus (documents joined by a blank line) or a UTF-8 file.

    A source that names a corpus wins over a file of the same name in the working directory.
    """
    if _is_corpus(source):
        return _DOC_SEPARATOR.join(corpus_documents(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"text source must be a corpus name or a path, got {type(source).__name__}")
    return _read_text_file(source)


# --------------------------------------------------------------------------------------------
# Calibration / held-out split
# --------------------------------------------------------------------------------------------
def _check_fraction(heldout_fraction: float) -> float:
    fraction = float(heldout_fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    return fraction


def split_documents(
    docs: Sequence[str], heldout_fraction: float = 0.2
) -> tuple[list[str], list[str]]:
    """Split documents into (calibration, held-out) lists, interleaved, by character share.

    Each document, in order, goes to the held-out side when that brings the held-out share of the
    characters seen so far closer to ``heldout_fraction``; ties go to calibration.  A document
    equal to an earlier one goes to the same side as that one.  Deterministic; documents are never
    cut, so the two sides share no document.
    """
    fraction = _check_fraction(heldout_fraction)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    calib: list[str] = []
    heldout: list[str] = []
    held_chars = 0
    seen_chars = 0
    side_of: dict[str, bool] = {}  # document -> held out?
    for doc in docs:
        n = len(doc)
        seen_chars += n
        if doc in side_of:
            held = side_of[doc]
        elif seen_chars == 0:
            held = False
        else:
            held = abs((held_chars + n) / seen_chars - fraction) < abs(
                held_chars / seen_chars - fraction
            )
        side_of[doc] = held
        if held:
            heldout.append(doc)
            held_chars += n
        else:
            calib.append(doc)
    if not heldout or not calib:
        raise ValueError(
            f"splitting {len(docs)} documents at heldout_fraction={fraction} left one side empty"
        )
    return calib, heldout


def split_text(text: str, heldout_fraction: float = 0.2) -> tuple[str, str]:
    """Split ``text`` contiguously: (first ``1 - heldout_fraction``, the rest).

    The cut is moved back to the last line break before it (or, failing that, the last
    whitespace), so no line or word is cut; the two parts concatenate back to ``text``.
    """
    fraction = _check_fraction(heldout_fraction)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if len(text.strip()) < 2:
        raise ValueError("text is too short to split into calibration and held-out parts")
    cut = int(round(len(text) * (1.0 - fraction)))
    cut = min(max(cut, 1), len(text) - 1)
    lo = max(1, cut // 2)  # do not move the cut back by more than half of the calibration part
    for boundary in ("\n", " "):
        pos = text.rfind(boundary, lo, cut)
        if pos > 0:
            cut = pos + 1
            break
    calib, heldout = text[:cut], text[cut:]
    if not calib.strip() or not heldout.strip():
        raise ValueError(
            f"splitting {len(text)} characters at heldout_fraction={fraction} left one side blank"
        )
    return calib, heldout


def _interleave(parts: Sequence[Sequence[str]]) -> list[str]:
    """The documents of ``parts`` in one list, each part's order kept: the next document always comes
    from the part with the fewest characters taken so far (ties: the earlier part); a part that runs
    out leaves the rest to the others."""
    taken = [0] * len(parts)
    pos = [0] * len(parts)
    out: list[str] = []
    while True:
        open_parts = [i for i, p in enumerate(parts) if pos[i] < len(p)]
        if not open_parts:
            return out
        i = min(open_parts, key=lambda j: (taken[j], j))
        doc = parts[i][pos[i]]
        out.append(doc)
        taken[i] += len(doc)
        pos[i] += 1


def split_corpus(name: str, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(calibration, held-out) documents of a named corpus: :func:`split_documents` of its documents, or,
    for a mixture (:data:`MIXTURES`), its members' calibration sides in equal measure and their held-out
    sides whole, each interleaved (module doc).  A mixture's calibration side leaves out any document that
    is on a member's held-out side (one text in two corpora)."""
    if name not in MIXTURES:
        if not _is_corpus(name):
            raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
        return split_documents(corpus_documents(name), heldout_fraction)
    sides = [split_corpus(member, heldout_fraction) for member in MIXTURES[name]]
    held_parts = [held for _, held in sides]
    held_set = {doc for part in held_parts for doc in part}
    calib_parts = [[doc for doc in calib if doc not in held_set] for calib, _ in sides]
    smallest = min(sum(map(len, part)) for part in calib_parts)
    calib_parts = [part[::max(1, round(sum(map(len, part)) / smallest))] for part in calib_parts]
    return _unique(_interleave(calib_parts)), _unique(_interleave(held_parts))


def _split_source(source, heldout_fraction: float) -> tuple[str, str]:
    if _is_corpus(source):
        calib, heldout = split_corpus(source, heldout_fraction)
        return _DOC_SEPARATOR.join(calib), _DOC_SEPARATOR.join(heldout)
    return split_text(load_text(source), heldout_fraction)


def calibration_text(source: str | os.PathLike = "pydoc", heldout_fraction: float = 0.2) -> str:
    """Calibration side of ``source`` (see the module doc for how each kind of source is split)."""
    return _split_source(source, heldout_fraction)[0]


def heldout_text(source: str | os.PathLike = "pydoc", heldout_fraction: float = 0.2) -> str:
    """Held-out side of ``source``, disjoint from :func:`calibration_text` for the same arguments."""
    return _split_source(source, heldout_fraction)[1]


# --------------------------------------------------------------------------------------------
# Tokenisation and calibration batches
# --------------------------------------------------------------------------------------------
def tokenize_text(tokenizer, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """Tokenise one long text into a 1-D LongTensor of ids (no truncation, no length warning).

    ``add_special_tokens=True`` (the default) matches LLM-Pruner, which tokenises the joined text
    once, so a BOS token (for tokenizers that add one) appears only at the very start.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty")
    encoded = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_attention_mask=False,
        truncation=False,
        verbose=False,
    )
    return torch.as_tensor(encoded["input_ids"], dtype=torch.long).reshape(-1)


def calibration_batch(
    tokenizer,
    text: str | torch.Tensor,
    n_samples: int = 10,
    seq_len: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``text``: LongTensor [n, seq_len].

    ``text`` is tokenised once (or given as ids, 1-D or [1, L]).  Windows do not overlap: the
    token stream, shifted by a random offset, is cut into ``L // seq_len`` aligned slots and
    ``n_samples`` distinct slots are drawn at random, kept in the order drawn.  The draw uses
    its own ``torch.Generator`` seeded with ``seed``, so the batch depends only on (text,
    tokenizer, n_samples, seq_len, seed) and not on global RNG state.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if isinstance(text, torch.Tensor):
        if text.dtype not in (torch.int64, torch.int32) or text.dim() not in (1, 2) or (
            text.dim() == 2 and text.shape[0] != 1
        ):
            raise ValueError(
                f"token ids must be an integer tensor of shape [L] or [1, L], got "
                f"{tuple(text.shape)} {text.dtype}"
            )
        ids = text.reshape(-1).long()
    else:
        ids = tokenize_text(tokenizer, text)
    n_tokens = ids.numel()
    needed = n_samples * seq_len
    if n_tokens < needed:
        raise ValueError(
            f"calibration text too short: it has {n_tokens} tokens but n_samples={n_samples} "
            f"windows of seq_len={seq_len} need {needed} non-overlapping tokens; give a longer "
            "text or ask for fewer/shorter samples"
        )
    gen = torch.Generator().manual_seed(int(seed))
    n_slots = n_tokens // seq_len
    slack = n_tokens - n_slots * seq_len
    offset = int(torch.randint(0, slack + 1, (1,), generator=gen))
    slots = torch.randperm(n_slots, generator=gen)[:n_samples]
    starts = offset + slots * seq_len
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return ids[index].contiguous()


# --------------------------------------------------------------------------------------------
# Public datasets through `datasets`
# --------------------------------------------------------------------------------------------
#: Accepted names -> (hub path, hub config, text column, joiner, default max documents).
HF_DATASETS = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "\n\n", None),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", " ", None),
    "c4": ("allenai/c4", None, "text", " ", 1100),
    "bookcorpus": ("bookcorpus/bookcorpus", None, "text", " ", 50_000),
}
_ALIASES = {
    "wikitext": "wikitext",
    "wikitext2": "wikitext",
    "wikitext-2": "wikitext",
    "wikitext-2-raw-v1": "wikitext",
    "salesforce/wikitext": "wikitext",
    "ptb": "ptb",
    "ptb_text_only": "ptb",
    "ptb-text-only/ptb_text_only": "ptb",
    "penn_treebank": "ptb",
    "c4": "c4",
    "allenai/c4": "c4",
    "bookcorpus": "bookcorpus",
    "bookcorpus/bookcorpus": "bookcorpus",
}
# The C4 validation shard the pruning papers (SparseGPT, Wanda, LLM-Pruner) evaluate on.
_C4_SHARDS = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}
_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}


def _builder_for(files: list[str]) -> str:
    builders = set()
    for f in files:
        name = str(f).lower()
        for comp in (".gz", ".bz2", ".xz", ".zst", ".zip"):
            if name.endswith(comp):
                name = name[: -len(comp)]
        builder = _BUILDERS.get(Path(name).suffix)
        if builder is None:
            raise ValueError(
                f"cannot tell the format of data file {str(f)!r}; use one of "
                f"{', '.join(sorted(_BUILDERS))} (optionally compressed)"
            )
        builders.add(builder)
    if len(builders) != 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; give files of one format")
    return builders.pop()


def load_hf_dataset(
    name: str,
    split: str,
    data_files=None,
    *,
    max_documents: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Text of a public dataset, joined into one string as LLM-Pruner and the papers do.

    ``name`` (case-insensitive): ``"wikitext"`` / ``"wikitext2"`` / ``"wikitext-2-raw-v1"``
    (WikiText-2 raw, column ``text``, joined with ``"\\n\\n"``), ``"ptb"`` / ``"ptb_text_only"``
    (Penn Treebank, column ``sentence``, joined with ``" "``), ``"c4"`` / ``"allenai/c4"`` (the
    first English shard of the split, column ``text``, the first 1100 documents joined with
    ``" "``, as SparseGPT / Wanda / LLM-Pruner use for validation), ``"bookcorpus"`` (column
    ``text``, the first 50 000 sentences joined with ``" "``; the whole set is ~5 GB of text).

    ``split``: ``"train"``, ``"validation"`` or ``"test"`` (whatever the dataset has).

    ``data_files``: load local files in the same layout instead of the hub (no network): a path,
    a list of paths, or a ``{split: path(s)}`` dict, in parquet, json/jsonl, csv, arrow or text
    format (by extension, optionally ``.gz``).  With a path or list the files are taken to be
    ``split``.

    ``max_documents`` caps the number of rows joined (default: the per-dataset convention above,
    all rows for WikiText-2 and PTB).  ``cache_dir`` is passed to ``datasets.load_dataset``.

    Needs the optional ``datasets`` package (``pip install datasets``); the hub path needs network.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(
            f"unknown dataset {name!r}; known: wikitext (wikitext-2-raw-v1), ptb "
            "(ptb_text_only), c4 (allenai/c4), bookcorpus"
        )
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str such as 'test', got {split!r}")
    if max_documents is not None and (
        isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1
    ):
        raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "load_hf_dataset needs the optional 'datasets' package: pip install datasets "
            "(or use the offline corpora 'pydoc' / 'fortunes' or a text file)"
        ) from exc

    hub_path, config, column, joiner, default_max = HF_DATASETS[key]
    if max_documents is None:
        max_documents = default_max
    kwargs = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)

    if data_files is not None:
        if isinstance(data_files, dict):
            if split not in data_files:
                raise ValueError(
                    f"split {split!r} not in data_files (has {sorted(data_files)})"
                )
            files_by_split = {
                s: [str(f) for f in (v if isinstance(v, (list, tuple)) else [v])]
                for s, v in data_files.items()
            }
        elif isinstance(data_files, (str, os.PathLike)):
            files_by_split = {split: [str(data_files)]}
        elif isinstance(data_files, (list, tuple)) and data_files:
            files_by_split = {split: [str(f) for f in data_files]}
        else:
            raise TypeError(
                "data_files must be a path, a non-empty list of paths or a {split: paths} dict"
            )
        for files in files_by_split.values():
            for f in files:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"data file {f!r} does not exist")
        builder = _builder_for([f for fs in files_by_split.values() for f in fs])
        ds = datasets.load_dataset(builder, data_files=files_by_split, split=split, **kwargs)
    else:
        if key == "c4":
            if split not in _C4_SHARDS:
                raise ValueError(f"c4 split must be one of {sorted(_C4_SHARDS)}, got {split!r}")
            args, kw = (hub_path,), dict(data_files={split: _C4_SHARDS[split]}, split=split)
        else:
            args, kw = (hub_path, config), dict(split=split)
        try:
            ds = datasets.load_dataset(*args, **kw, **kwargs)
        except Exception as exc:
            raise RuntimeError(
                f"loading {name!r} ({hub_path}) through datasets {datasets.__version__} failed: "
                f"{exc}. Without network, or when the hub copy is a legacy script dataset, "
                "download its parquet/json files and pass them as data_files=..."
            ) from exc

    if column not in ds.column_names:
        raise ValueError(
            f"dataset {name!r} is expected to have a {column!r} column, found {ds.column_names}"
        )
    if max_documents is not None and len(ds) > max_documents:
        ds = ds.select(range(max_documents))
    rows = [str(r) if r is not None else "" for r in ds[column]]
    if not rows:
        raise ValueError(f"dataset {name!r} split {split!r} has no rows")
    return joiner.join(rows)
