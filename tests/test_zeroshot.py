"""Zero-shot evaluation with lm-evaluation-harness (moreau_pruner.evaluate.zeroshot, ``moreau-eval``).

Everything runs offline on the shipped local task tests/data/zeroshot/moreau_tiny_facts.yaml
(32 four-way completions). The tiny model is trained for a moment on the gold completions, so the
dense model is far above chance (a wrongly aligned continuation would score at chance); every
accuracy lm-eval reports is checked against log-likelihoods computed here by hand.
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import PruneConfig, prune_model
from moreau_pruner.evaluate import zeroshot
from moreau_pruner.io.pruned import load_pruned, save_pruned

from _tiny import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "zeroshot"
TASK = "moreau_tiny_facts"
ROWS = [json.loads(line) for line in (TASK_DIR / "tiny_facts.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: extra threads only wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """The task YAML names its data file relative to the repository root, as lm-eval reads it."""
    monkeypatch.chdir(ROOT)


def _tokenizer():
    words = sorted({w for r in ROWS for t in (r["context"], *r["choices"]) for w in re.findall(r"\w+|[^\w\s]+", t)})
    return word_tokenizer(words)


def _trained_model(tok, steps=60, seed=0):
    """A 2-layer GQA Llama fitted to "context gold" for a few steps (dense accuracy ~1)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    seqs = [tok(f"{r['context']} {r['choices'][r['label']]}")["input_ids"] for r in ROWS]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def dense(tok):
    return _trained_model(tok)


def _pruned_copy(model, tok, ratio=0.5):
    import copy

    pruned = copy.deepcopy(model)
    batch = torch.tensor([tok(f"{r['context']} {r['choices'][r['label']]}")["input_ids"][:4] for r in ROWS[:8]])
    prune_model(pruned, batch, "taylor", PruneConfig(ratio=ratio, attn_layers="0:2", mlp_layers="0:2",
                                                      granularity="query-heads"), progress=False)
    return pruned.eval()


def hand_loglikelihoods(model, tok, context, choices):
    """sum log p(choice tokens | context) for each choice, written out without lm-eval."""
    ctx = tok(context)["input_ids"]
    out = []
    for choice in choices:
        full = tok(context + " " + choice)["input_ids"]
        assert full[:len(ctx)] == ctx
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
        out.append(sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full))))
    return out


def hand_accuracy(model, tok, rows=ROWS):
    """(acc, acc_norm, per-document log-likelihoods) by argmax over the choices."""
    acc = norm = 0
    lls = []
    for r in rows:
        ll = hand_loglikelihoods(model, tok, r["context"], r["choices"])
        lls.append(ll)
        acc += max(range(len(ll)), key=ll.__getitem__) == r["label"]
        per_char = [v / len(c) for v, c in zip(ll, r["choices"])]
        norm += max(range(len(ll)), key=per_char.__getitem__) == r["label"]
    return acc / len(rows), norm / len(rows), lls


# --------------------------------------------------------------------------- accuracy = hand computation


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_accuracy_is_the_hand_computed_loglikelihood_comparison(dense, tok, which):
    model = dense if which == "dense" else _pruned_copy(dense, tok)
    want_acc, want_norm, want_lls = hand_accuracy(model, tok)
    got = zeroshot.evaluate_zero_shot(model, tok, TASK, include_path=TASK_DIR, log_samples=True, batch_size=4)
    entry = got["tasks"][TASK]
    assert entry["n"] == len(ROWS) and entry["num_fewshot"] == 0
    samples = sorted(got["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["target"] for s in samples] == [r["label"] for r in ROWS]
    for s, want in zip(samples, want_lls):
        assert s["loglikelihoods"] == pytest.approx(want, abs=1e-4)
    assert entry["acc"] == pytest.approx(want_acc, abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(want_norm, abs=1e-12)
    p = want_acc
    assert entry["acc_stderr"] == pytest.approx((p * (1 - p) / (len(ROWS) - 1)) ** 0.5, rel=1e-9)
    if which == "dense":
        assert entry["acc"] >= 0.9  # trained on the gold completions: the path scores the right tokens
    assert got["settings"]["include_path"] == [str(TASK_DIR)]


@pytest.mark.slow
def test_smollm2_matches_hand_computation(smollm2_shared):
    """The real model and its BPE tokenizer (the space before a choice joins the choice's token)."""
    model, tok = smollm2_shared
    got = zeroshot.evaluate_zero_shot(model, tok, TASK, include_path=TASK_DIR, limit=8, log_samples=True)
    want_acc, want_norm, want_lls = hand_accuracy(model, tok, ROWS[:8])
    samples = sorted(got["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(8))
    for s, want in zip(samples, want_lls):
        assert s["loglikelihoods"] == pytest.approx(want, abs=1e-3)
    entry = got["tasks"][TASK]
    assert (entry["acc"], entry["acc_norm"], entry["n"]) == (want_acc, want_norm, 8)
    assert got["settings"]["limit"] == 8


# --------------------------------------------------------------------------- the CLI, dense vs pruned


def test_cli_dense_vs_pruned_end_to_end(tmp_path, dense, tok, capsys):
    from moreau_pruner.cli.eval import main

    dense_dir = tmp_path / "dense"
    dense.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    pruned = _pruned_copy(dense, tok)
    pruned_dir = save_pruned(pruned, tmp_path / "pruned", tokenizer=tok, extra={"method": "taylor", "ratio": 0.5})

    reports = {}
    for name, d in (("dense", dense_dir), ("pruned", pruned_dir)):
        out = tmp_path / f"{name}.json"
        rc = main(["--model", str(d), "--tasks", TASK, "--include-path", str(TASK_DIR), "--eval-batch-size", "4",
                   "--json", str(out)])
        assert rc == 0
        printed = capsys.readouterr().out
        assert TASK in printed and "acc_norm" in printed
        reports[name] = json.loads(out.read_text())
        assert reports[name]["model"] == str(d.resolve())

    # the pruned directory's model, reloaded, is what was evaluated
    reloaded, _ = load_pruned(pruned_dir)
    want_acc, want_norm, _ = hand_accuracy(reloaded, tok)
    got = reports["pruned"]["tasks"][TASK]
    assert (got["acc"], got["acc_norm"]) == (pytest.approx(want_acc), pytest.approx(want_norm))
    assert reports["pruned"]["params"] < reports["dense"]["params"]
    assert reports["dense"]["tasks"][TASK]["acc"] == pytest.approx(hand_accuracy(dense, tok)[0])

    info = json.loads((pruned_dir / "pruning_info.json").read_text())
    assert info["method"] == "taylor"  # what was there stays
    assert info["zero_shot"][TASK]["acc"] == got["acc"]
    assert info["zero_shot"][TASK]["settings"]["num_fewshot"] == 0
    assert not (dense_dir / "pruning_info.json").exists()  # a dense HF directory gets none
    assert sorted(p.name for p in pruned_dir.iterdir() if p.name.startswith(".")) == []


def test_pruning_info_merge_keeps_other_tasks(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "pruning_info.json").write_text(json.dumps({"ratio": 0.2, "zero_shot": {"piqa": {"acc": 0.6}}}))
    path = zeroshot.write_into_pruning_info(d, {"tasks": {"boolq": {"acc": 0.5}}, "settings": {"limit": None}})
    info = json.loads(path.read_text())
    assert info == {"ratio": 0.2, "zero_shot": {"piqa": {"acc": 0.6},
                                                "boolq": {"acc": 0.5, "settings": {"limit": None}}}}
    assert zeroshot.write_into_pruning_info(tmp_path, {"tasks": {}}) is None  # no pruning_info.json: nothing
    (d / "pruning_info.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        zeroshot.write_into_pruning_info(d, {"tasks": {"boolq": {"acc": 0.5}}})
    assert (d / "pruning_info.json").read_text() == "{broken"
    assert [p.name for p in d.iterdir()] == ["pruning_info.json"]


# --------------------------------------------------------------------------- bad input


# Telling an unknown name from a real one, and reaching a hub task at all, needs lm-eval's index
# of its ~15k built-in task YAMLs: ~15 s to build (once per process), hence "slow".


@pytest.mark.slow
def test_unknown_task_is_a_clear_error(tmp_path, capsys, tok, dense):
    from moreau_pruner.cli.eval import main

    d = tmp_path / "m"
    save_pruned(_pruned_copy(dense, tok), d, tokenizer=tok, extra={"ratio": 0.5})
    before = (d / "pruning_info.json").read_text()
    out = tmp_path / "r.json"
    rc = main(["--model", str(d), "--tasks", f"{TASK[:-1]},piqa", "--include-path", str(TASK_DIR),
               "--output", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"unknown task '{TASK[:-1]}'" in err and f"did you mean {TASK}" in err
    assert "piqa" not in err.split("Known tasks")[0]  # a real task is not reported as unknown
    assert "Traceback" not in err
    assert not out.exists() and (d / "pruning_info.json").read_text() == before
    with pytest.raises(zeroshot.UnknownTaskError, match="unknown task 'no_such_task_xyz'"):
        zeroshot.evaluate_zero_shot(torch.nn.Linear(1, 1), tok, "no_such_task_xyz")


@pytest.mark.slow
def test_paper_task_without_its_dataset_names_the_task(monkeypatch, tmp_path, tok, dense):
    """Offline, with an empty datasets cache: BoolQ cannot load, and the error says so."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert zeroshot.parse_tasks("paper") == list(zeroshot.PAPER_TASKS)
    with pytest.raises(zeroshot.TaskDataUnavailable) as info:
        zeroshot.evaluate_zero_shot(dense, tok, "paper")
    msg = str(info.value)
    assert msg.startswith("task 'boolq':") and "--allow-download" in msg and "not in the local" in msg


def test_missing_lm_eval_says_how_to_install(monkeypatch, capsys):
    from moreau_pruner.cli.eval import main

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install moreau-kernels[eval]")):
        zeroshot.require_lm_eval()
    assert main(["--tasks", TASK, "--include-path", str(TASK_DIR)]) == 2
    assert "pip install moreau-kernels[eval]" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys, tok):
    from moreau_pruner.cli.eval import main

    with pytest.raises(ValueError, match="no task names"):
        zeroshot.parse_tasks(" , ")
    assert zeroshot.parse_tasks("piqa, paper,piqa") == ["piqa", *[t for t in zeroshot.PAPER_TASKS if t != "piqa"]]
    for argv, phrase in ((["--limit", "0"], "--limit"), (["--limit", "1.5"], "--limit"),
                         (["--eval-batch-size", "0"], "--eval-batch-size"),
                         (["--batch-size", "0"], "--eval-batch-size"), (["--num-fewshot", "-1"], "integer >= 0")):
        with pytest.raises(SystemExit):
            main(["--tasks", TASK, *argv])
        assert phrase in capsys.readouterr().err
    assert main(["--tasks", TASK, "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_fewshot"):
        zeroshot.evaluate_zero_shot(None, tok, TASK, num_fewshot=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        zeroshot.evaluate_zero_shot(None, None, TASK)


def test_hub_offline_sets_and_restores(monkeypatch):
    import os

    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with zeroshot.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
