"""Tests for moreau_pruner.data: offline corpora, splits, calibration batches, dataset loaders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moreau_pruner import data

from _tiny import word_tokenizer as _word_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def pydoc_split():
    return data.calibration_text("pydoc"), data.heldout_text("pydoc")


# ------------------------------------------------------------------ corpora and load_text
def test_pydoc_corpus_deterministic_and_complete():
    from pydoc_data import topics

    docs = data.corpus_documents("pydoc")
    expected = list(dict.fromkeys(topics.topics[k] for k in sorted(topics.topics)))
    assert docs == expected and len(set(docs)) == len(docs)
    text = data.load_text("pydoc")
    assert text == data.load_text("pydoc")
    assert len(text) > 400_000
    assert text.startswith(docs[0]) and text.endswith(docs[-1])


def test_load_text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first line\nsecond line\n", encoding="utf-8")
    assert data.load_text(p) == "first line\nsecond line\n"
    assert data.load_text(str(p)) == "first line\nsecond line\n"


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known corpus"):
        data.load_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="pydoc"):
        data.load_text("wikipedia")
    with pytest.raises(IsADirectoryError):
        data.load_text(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.load_text(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_text(binary)
    with pytest.raises(TypeError):
        data.load_text(42)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.corpus_documents("nope")


def test_fortunes_parsing_and_missing(tmp_path, monkeypatch):
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "b-jokes").write_text("Second file joke.\n%\n", encoding="utf-8")
    # overstrike: "_\bx" underlines x, "B\bB" emboldens B
    (d / "a-jokes").write_text(
        "One\n%\n_\bu_\bn_\bd_\be_\br B\bBold *___\b\b\bbig*\n%\n\n%\nThree\nlines\n", encoding="utf-8"
    )
    (d / "a-jokes.dat").write_bytes(b"\x00\x01binary index")
    (d / "a-jokes.u8").symlink_to(d / "a-jokes")
    docs = data._fortune_documents(d)
    assert docs == ["One", "under Bold *big*", "Three\nlines", "Second file joke."]
    with pytest.raises(data.CorpusNotAvailableError, match="apt-get install fortunes"):
        data._fortune_documents(tmp_path / "nowhere")
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "nowhere")
    with pytest.raises(data.CorpusNotAvailableError, match="fortunes"):
        data.load_text("fortunes")


@pytest.mark.skipif(not data.FORTUNES_DIR.is_dir(), reason="Debian package 'fortunes' not installed")
def test_fortunes_corpus_installed():
    docs = data.corpus_documents("fortunes")
    assert len(docs) > 1000
    assert all("\x08" not in d and d.strip() for d in docs[:2000])
    calib, held = data.split_documents(docs)
    assert len(calib) + len(held) == len(docs)
    assert abs(sum(map(len, held)) / sum(map(len, docs)) - 0.2) < 0.01


# ------------------------------------------------------------------ splits
def test_pydoc_split_disjoint_and_balanced(pydoc_split):
    calib, held = pydoc_split
    docs = data.corpus_documents("pydoc")
    c_docs, h_docs = data.split_documents(docs)
    assert calib == "\n\n".join(c_docs) and held == "\n\n".join(h_docs)
    assert sorted(c_docs + h_docs) == sorted(docs)
    assert not set(c_docs) & set(h_docs)
    share = sum(map(len, h_docs)) / sum(map(len, docs))
    assert 0.18 < share < 0.22
    # held-out topics are spread over the corpus, not one contiguous block
    held_idx = [i for i, d in enumerate(docs) if d in set(h_docs)]
    assert held_idx[0] < len(docs) // 4 and held_idx[-1] > 3 * len(docs) // 4
    assert len(held_idx) < held_idx[-1] - held_idx[0] + 1


def test_split_documents_fraction_and_errors():
    docs = [f"doc{i} " + "x" * (10 + 7 * (i % 5)) for i in range(100)]
    for fraction in (0.1, 0.3, 0.5):
        c, h = data.split_documents(docs, fraction)
        share = sum(map(len, h)) / sum(map(len, docs))
        assert abs(share - fraction) < 0.02
        assert len(c) + len(h) == 100 and not set(c) & set(h)
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_documents(docs, 0.0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_documents(docs, 1.0)
    # a repeated document stays on the side of its first occurrence
    rep = ["alpha " * 5, "beta " * 5, "gamma " * 5] * 10
    c, h = data.split_documents(rep, 0.3)
    assert h and c and not set(c) & set(h)
    with pytest.raises(ValueError, match="at least 2"):
        data.split_documents(["only"], 0.2)


def test_split_text_contiguous_on_line_boundary(tmp_path):
    text = "".join(f"line number {i} with some words\n" for i in range(50))
    calib, held = data.split_text(text, 0.2)
    assert calib + held == text
    assert calib.endswith("\n")
    assert 0.15 < len(held) / len(text) < 0.25
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    assert data.calibration_text(p) == calib and data.heldout_text(p) == held
    # no line break: falls back to a space, never cuts a word
    words = " ".join(f"w{i}" for i in range(200))
    c2, h2 = data.split_text(words, 0.25)
    assert c2 + h2 == words and c2.endswith(" ") and not h2.startswith(" ")
    with pytest.raises(ValueError, match="too short"):
        data.split_text("a", 0.2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_text(text, 1.5)


# ------------------------------------------------------------------ the mixed corpus
def test_interleave_keeps_each_order_and_levels_the_characters():
    a = ["aaaa", "aa", "a"]
    b = ["b", "b", "bbbbbb", "b"]
    # next from the part with fewer characters so far (ties: the first part); an exhausted part drops out
    assert data._interleave([a, b]) == ["aaaa", "b", "b", "bbbbbb", "aa", "a", "b"]
    assert data._interleave([[], b]) == b


def test_mixed_corpus_planted(monkeypatch):
    """A planted pair of corpora: the larger member's calibration side is thinned to every k-th document, the two
    sides interleave, the held-out side is both held-out sides whole, and a text that one corpus holds out never
    reaches the mixture's calibration side through the other."""
    pydoc = [f"topic {i} " + "p" * 400 for i in range(30)]
    p_calib, p_held = data.split_documents(pydoc)
    fortunes = [f"fortune {i} " + "f" * 90 for i in range(600)] + [p_held[0]]  # one text in both corpora
    monkeypatch.setattr(data, "_pydoc_documents", lambda: pydoc)
    monkeypatch.setattr(data, "_fortune_documents", lambda: fortunes)
    f_calib, f_held = data.split_documents(fortunes)
    assert p_held[0] in f_calib  # the trap: calibration side in fortunes, held out in pydoc
    calib, held = data.split_corpus("mixed")
    assert set(held) == set(p_held) | set(f_held) and len(held) == len(set(held))
    assert not set(calib) & set(held)
    assert [d for d in calib if d in set(p_calib)] == p_calib  # all of pydoc's calibration side, in order
    used = [d for d in calib if d not in set(p_calib)]
    k = round(sum(map(len, [d for d in f_calib if d != p_held[0]])) / sum(map(len, p_calib)))
    assert k > 1 and used == [d for d in f_calib if d != p_held[0]][::k]
    share = sum(map(len, used)) / sum(map(len, calib))
    assert 0.4 < share < 0.6
    # interleaved, not one block after the other
    first_f = next(i for i, d in enumerate(calib) if d in set(used))
    last_p = max(i for i, d in enumerate(calib) if d in set(p_calib))
    assert first_f < last_p
    assert data.calibration_text("mixed") == "\n\n".join(calib)
    assert data.heldout_text("mixed") == "\n\n".join(held)
    assert data.corpus_documents("mixed") == calib + held
    with pytest.raises(ValueError, match="unknown corpus"):
        data.split_corpus("nope")


@pytest.mark.skipif(not data.FORTUNES_DIR.is_dir(), reason="Debian package 'fortunes' not installed")
def test_mixed_corpus_never_calibrates_on_the_evaluation_text():
    """Calibrating on 'mixed' and evaluating on the held-out pydoc or fortunes text is still held out: no held-out
    document of either is on the mixture's calibration side, not even inside a longer document."""
    calib, held = data.split_corpus("mixed")
    assert (calib, held) == data.split_corpus("mixed")  # a fixed order
    p_calib, p_held = data.split_corpus("pydoc")
    f_calib, f_held = data.split_corpus("fortunes")
    assert not set(calib) & (set(p_held) | set(f_held))
    assert set(held) == set(p_held) | set(f_held)
    assert set(calib) <= set(p_calib) | set(f_calib) and set(p_calib) <= set(calib)
    text = data.calibration_text("mixed")
    assert not [d for d in p_held + f_held if len(d) > 200 and d in text]
    pydoc_chars = sum(len(d) for d in calib if d in set(p_calib))
    assert 0.4 < pydoc_chars / sum(map(len, calib)) < 0.6
    # the fortunes used come from the whole corpus (every file), not from its first files
    used = [i for i, d in enumerate(f_calib) if d in set(calib)]
    assert used[0] < len(f_calib) // 10 and used[-1] > 9 * len(f_calib) // 10


# ------------------------------------------------------------------ calibration batches
@pytest.fixture(scope="module")
def calib_tokenizer(pydoc_split):
    words = sorted(set(pydoc_split[0].split()))[:2000]
    return _word_tokenizer(words)


def test_calibration_batch_shape_deterministic_and_seeded(pydoc_split, calib_tokenizer):
    text = pydoc_split[0]
    b0 = data.calibration_batch(calib_tokenizer, text, n_samples=10, seq_len=64, seed=0)
    assert b0.shape == (10, 64) and b0.dtype == torch.long
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(b0, data.calibration_batch(calib_tokenizer, text, 10, 64, seed=0))
    b1 = data.calibration_batch(calib_tokenizer, text, 10, 64, seed=1)
    assert not torch.equal(b0, b1)
    # each row is a contiguous window of the tokenised text, and windows do not overlap
    ids = data.tokenize_text(calib_tokenizer, text)
    starts = []
    for row in b0:
        matches = (ids.unfold(0, 64, 1) == row).all(dim=1).nonzero().flatten().tolist()
        assert matches, "row is not a window of the tokenised text"
        starts.append(matches[0])
    starts.sort()
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))


def test_calibration_batch_from_ids_and_errors(calib_tokenizer):
    ids = torch.arange(100)
    b = data.calibration_batch(None, ids, n_samples=3, seq_len=30, seed=5)
    assert b.shape == (3, 30)
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(3, 29, dtype=torch.long))
    assert len({int(r[0]) // 30 for r in b}) == 3 or len({int(r[0]) for r in b}) == 3
    # exactly enough tokens: the windows tile the text
    full = data.calibration_batch(None, ids, n_samples=4, seq_len=25, seed=2)
    assert sorted(full.flatten().tolist()) == list(range(100))
    with pytest.raises(ValueError, match="too short.*101 tokens|101 tokens"):
        data.calibration_batch(None, torch.arange(101), n_samples=2, seq_len=64)
    with pytest.raises(ValueError, match="too short"):
        data.calibration_batch(calib_tokenizer, "the a of is", n_samples=1, seq_len=64)
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_batch(None, ids, n_samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_batch(None, ids, n_samples=1, seq_len=1)
    with pytest.raises(ValueError, match="integer tensor"):
        data.calibration_batch(None, ids.float(), n_samples=1, seq_len=8)


# ------------------------------------------------------------------ datasets loaders (local files)
needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="optional package 'datasets' not installed"
)


def _rows(path, column):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[column] for line in f if line.strip()]


@needs_datasets
def test_load_wikitext_local_json_and_parquet(tmp_path):
    rows = _rows(DATA / "wikitext2_tiny.jsonl", "text")
    text = data.load_hf_dataset(
        "wikitext-2-raw-v1", "test", data_files=DATA / "wikitext2_tiny.jsonl", cache_dir=tmp_path / "c"
    )
    assert text == "\n\n".join(rows)
    assert " = Tiny Harbour Lighthouse = " in text

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), tmp_path / "test-00000-of-00001.parquet")
    text_pq = data.load_hf_dataset(
        "wikitext",
        "test",
        data_files={"test": str(tmp_path / "test-00000-of-00001.parquet")},
        cache_dir=tmp_path / "c",
    )
    assert text_pq == text


@needs_datasets
def test_load_ptb_and_c4_local(tmp_path):
    sentences = _rows(DATA / "ptb_tiny.jsonl", "sentence")
    text = data.load_hf_dataset(
        "ptb_text_only", "validation", data_files=[DATA / "ptb_tiny.jsonl"], cache_dir=tmp_path
    )
    assert text == " ".join(sentences)
    docs = _rows(DATA / "c4_tiny.json", "text")
    c4 = data.load_hf_dataset("allenai/c4", "validation", data_files=DATA / "c4_tiny.json", cache_dir=tmp_path)
    assert c4 == " ".join(docs)
    c4_two = data.load_hf_dataset(
        "c4", "validation", data_files=DATA / "c4_tiny.json", max_documents=2, cache_dir=tmp_path
    )
    assert c4_two == " ".join(docs[:2])


@needs_datasets
def test_load_hf_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_hf_dataset("imagenet", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_hf_dataset("wikitext", "test", data_files=tmp_path / "nope.parquet")
    odd = tmp_path / "x.docx"
    odd.write_text("hi")
    with pytest.raises(ValueError, match="format"):
        data.load_hf_dataset("wikitext", "test", data_files=odd)
    with pytest.raises(ValueError, match="split 'test' not in data_files"):
        data.load_hf_dataset("wikitext", "test", data_files={"train": DATA / "wikitext2_tiny.jsonl"})
    # a file in the wrong layout: PTB has no 'text' column but a 'sentence' one
    with pytest.raises(ValueError, match="'text' column"):
        data.load_hf_dataset("wikitext", "test", data_files=DATA / "ptb_tiny.jsonl", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_documents"):
        data.load_hf_dataset("c4", "validation", data_files=DATA / "c4_tiny.json", max_documents=0)


def test_load_hf_dataset_without_datasets_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_hf_dataset("wikitext", "test", data_files=DATA / "wikitext2_tiny.jsonl")


@needs_datasets
def test_hub_arguments_and_failure_message(monkeypatch):
    import datasets as hf

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "ptb-text-only/ptb_text_only":
            return hf.Dataset.from_dict({"sentence": ["a b", "c d"]})
        if args[0] == "bookcorpus/bookcorpus":
            raise ConnectionError("no network")
        return hf.Dataset.from_dict({"text": [f"doc {i}" for i in range(1500)]})

    monkeypatch.setattr(hf, "load_dataset", fake_load_dataset)
    assert data.load_hf_dataset("wikitext2", "test") == "\n\n".join(f"doc {i}" for i in range(1500))
    assert calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert data.load_hf_dataset("ptb", "validation") == "a b c d"
    c4 = data.load_hf_dataset("c4", "validation")
    assert c4 == " ".join(f"doc {i}" for i in range(1100))  # the papers' first 1100 documents
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    with pytest.raises(ValueError, match="c4 split"):
        data.load_hf_dataset("c4", "test")
    with pytest.raises(RuntimeError, match="no network.*data_files"):
        data.load_hf_dataset("bookcorpus", "train")
