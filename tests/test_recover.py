"""LoRA recovery after pruning (moreau_pruner.recover.train, ``moreau-recover``)."""
from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="the optional extra 'recover' (peft) is part of the test set-up")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from moreau_pruner import PruneConfig, prune_model  # noqa: E402
from moreau_pruner.io import pruned as mio
from moreau_pruner.recover.train import (  # noqa: E402
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    RecoverConfig,
    RecoveryData,
    alpaca_prompt,
    load_recovery_data,
    recover,
)
from moreau_pruner.cli.recover import main  # noqa: E402

from _tiny import word_tokenizer  # noqa: E402

WORDS = ("the a of to and in is it for on with as by at from this that be are was or not an if then "
         "else return def class import value list dict key print loop while true false none self "
         "function module object string number").split()
TEMPLATE_WORDS = "Below is an instruction that describes a task Write response appropriately completes request".split()
TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(900))


def _tokenizer():
    return word_tokenizer(WORDS + TEMPLATE_WORDS + ["###", "Instruction", "Response", "Input", ":", "."])


def _tiny_pruned(kind="llama", seed=0):
    """A 3-layer model pruned to different per-layer widths by this package's own pruner."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=True)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    else:
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, **common))
    prune_model(model, None, method="magnitude", prune=PruneConfig(ratio=0.5, attn_layers="0:2", mlp_layers="1:3"),
                progress=False)
    return model.eval(), tok


def _save_tiny(tmp_path, kind="llama", name="pruned"):
    model, tok = _tiny_pruned(kind)
    return mio.save_pruned(model, tmp_path / name, tokenizer=tok), model, tok


def _text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXT[i : i + 200] for i in range(0, len(TEXT), 200)), encoding="utf-8")
    return path


IDS = torch.tensor([[1, 5, 17, 33, 40, 8, 21, 42], [1, 7, 7, 3, 12, 50, 11, 30]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _quick(**kw):
    base = dict(cutoff_len=32, batch_size=4, eval_seq_len=16, eval_windows=2, save_every=2)
    base.update(kw)
    return RecoverConfig(**base)


# --------------------------------------------------------------------------- data


def test_alpaca_rows_mask_the_prompt(tmp_path):
    tok = _tokenizer()
    rows = [{"instruction": "print the value", "input": "a list", "output": "return the list"},
            {"instruction": "loop while true", "input": "", "output": "break it"},
            {"instruction": "", "output": "no instruction: skipped"},
            {"text": "not an alpaca row"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    data = load_recovery_data(path, tok, cutoff_len=256)
    assert data.kind == "alpaca" and len(data.examples) == 2 and data.skipped == 2
    assert data.heldout_source == "pydoc"  # instruction data: the LM quality is measured on pydoc
    for (ids, labels), row in zip(data.examples, rows):
        prompt = alpaca_prompt(row["instruction"], row["input"] or None)
        n_prompt = len(tok(prompt)["input_ids"])
        response = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ids) == len(labels) == n_prompt + len(response)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == response == ids[n_prompt:]
    assert "### Input:" not in alpaca_prompt("x") and alpaca_prompt("x") == ALPACA_PROMPT_NO_INPUT.format(instruction="x")
    # a cutoff inside the prompt leaves nothing to learn: the row is unusable
    with pytest.raises(ValueError, match="no usable rows"):
        load_recovery_data(path, tok, cutoff_len=5)


def test_text_sources_train_on_the_calibration_side_only(tmp_path):
    from moreau_pruner import data as mdata

    tok = _tokenizer()
    txt = _text_file(tmp_path)
    data = load_recovery_data(txt, tok, cutoff_len=32)
    assert data.kind == "text" and data.heldout == mdata.heldout_text(txt)
    trained = [t for ids, _ in data.examples for t in ids]
    assert trained == mdata.tokenize_text(tok, mdata.calibration_text(txt)).tolist()
    assert all(ids == labels and len(ids) <= 32 for ids, labels in data.examples)

    rows = [{"text": TEXT[i : i + 300]} for i in range(0, 3000, 300)] + [{"text": ""}, {"other": 1}]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    data = load_recovery_data(jl, tok, cutoff_len=32)
    assert data.kind == "text" and data.skipped == 2 and data.n_rows == 12
    held_docs = data.heldout.split("\n\n")
    assert held_docs and all(d in [r.get("text") for r in rows] for d in held_docs)

    pydoc = load_recovery_data("pydoc", tok, cutoff_len=256)
    assert pydoc.heldout == mdata.heldout_text("pydoc") and pydoc.heldout_source == "pydoc"


@pytest.mark.parametrize("content,suffix", [("", ".txt"), ("  \n", ".txt"), ("", ".jsonl"), ("[]", ".json"),
                                            ('{"text": ""}\n{"foo": "bar"}\n', ".jsonl"),
                                            ('[{"instruction": "x", "output": ""}]', ".json")])
def test_unusable_data_is_refused_before_any_output(tmp_path, content, suffix):
    model_dir, _, _ = _save_tiny(tmp_path)
    data = tmp_path / f"bad{suffix}"
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pruned", data.name])
    with pytest.raises(ValueError, match="no usable rows|is empty"):
        load_recovery_data(data, _tokenizer())


# --------------------------------------------------------------------------- training


def test_peft_wraps_every_pruned_linear_and_loss_decreases_on_a_fixed_batch():
    model, tok = _tiny_pruned("mistral")
    widths = mio.layer_widths(model)
    assert len(set(widths["layer_intermediate_size"])) > 1  # the layers really differ
    text = " ".join(WORDS[:20]) + " "
    batch = [tok(text * 2)["input_ids"][:16], tok(text * 3)["input_ids"][5:21]]
    data = RecoveryData([(ids, list(ids)) for ids in batch], "text", "fixed batch")
    seen = {}

    def callback(step, loss):
        seen[step] = loss

    import moreau_pruner.recover.tuning as R

    wrapped = {}
    real_wrap = R.wrap

    def spy(m, cfg):
        pm = real_wrap(m, cfg)
        from peft.tuners.lora import LoraLayer

        for name, mod in pm.named_modules():
            if isinstance(mod, LoraLayer):
                wrapped[name] = (mod.in_features, mod.out_features, mod.lora_A["default"].weight.shape)
        return pm

    R.wrap = spy
    try:
        res = recover(model, tok, data, _quick(lr=1e-2, max_steps=25, batch_size=2, dropout=0.0, eval_windows=0),
                      progress=False, callback=callback)
    finally:
        R.wrap = real_wrap
    # every projection of every (differently pruned) layer got its own correctly shaped adapter
    assert len(wrapped) == 3 * 7
    for layer in range(3):
        h, m = widths["layer_num_attention_heads"][layer] * 16, widths["layer_intermediate_size"][layer]
        q = wrapped[next(k for k in wrapped if f"layers.{layer}.self_attn.q_proj" in k)]
        down = wrapped[next(k for k in wrapped if f"layers.{layer}.mlp.down_proj" in k)]
        assert q[:2] == (64, h) and down[:2] == (m, 64) and tuple(down[2]) == (8, m)
    losses = res.report["losses"]
    assert len(losses) == 25 and sorted(seen) == list(range(1, 26))
    assert losses[-1] < 0.8 * losses[0]
    assert mio.layer_widths(res.model) == widths  # merged back into the pruned shapes


def test_resume_after_interruption_gives_the_same_adapter(tmp_path):
    txt = _text_file(tmp_path)
    cfg = _quick(max_steps=6, lr=5e-3)  # dropout stays on: the RNG state must be restored too

    model, tok = _tiny_pruned()
    straight = recover(model, tok, txt, cfg, out=tmp_path / "straight", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    model, tok = _tiny_pruned()
    out = tmp_path / "resumed"
    with pytest.raises(Killed):  # planned longer: the length of a run may change when it is resumed
        recover(model, tok, txt, replace(cfg, max_steps=8), out=out, progress=False, callback=kill_at_5)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000004"]  # keep_checkpoints=1: step 2's was removed
    assert not (out / "config.json").exists()

    model, tok = _tiny_pruned()
    # other settings do not resume silently
    with pytest.raises(ValueError, match="other settings.*lr"):
        recover(model, tok, txt, _quick(max_steps=6, lr=1e-3), out=out, progress=False)
    model, tok = _tiny_pruned()
    resumed = recover(model, tok, txt, cfg, out=out, resume="always", progress=False)
    assert resumed.report["resumed_from_step"] == 4
    assert resumed.report["losses"] == straight.report["losses"]
    assert straight.adapter_state.keys() == resumed.adapter_state.keys()
    for k in straight.adapter_state:
        assert torch.equal(straight.adapter_state[k], resumed.adapter_state[k]), k
    assert torch.equal(_logits(straight.model), _logits(resumed.model))
    assert not (out / "checkpoints").exists()  # the finished run's checkpoints are gone


def test_cli_output_reloads_with_identical_logits_through_both_loaders(tmp_path):
    model_dir, _, tok = _save_tiny(tmp_path, "mistral")
    before, _ = mio.load_pruned(model_dir)
    txt = _text_file(tmp_path)
    out = tmp_path / "recovered"
    rc = main(["--model", str(model_dir), "--data", str(txt), "--out", str(out), "--max-steps", "4",
               "--cutoff-len", "32", "--batch-size", "4", "--lr", "1e-2", "--eval-seq-lens", "16",
               "--eval-windows", "2", "--quiet", "--json", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((out / "recovery.json").read_text())
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["steps"] == 4 and len(report["losses"]) == 4
    assert report["ppl_before"]["n_windows"] == 2 and report["ppl_after"]["ppl"] > 0
    assert report["config"]["rank"] == 8 and report["config"]["alpha"] == 16 and report["dtype"] == "float32"
    info = json.loads((out / "pruning_info.json").read_text())
    assert info["recovery"]["steps"] == 4
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()

    loaded, tok2 = mio.load_pruned(out)
    assert tok2 is not None and mio.layer_widths(loaded) == mio.layer_widths(before)
    ref = _logits(loaded)
    assert not torch.allclose(ref, _logits(before))  # the adapter changed the model
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(_logits(remote), ref)

    # the adapter alone, merged into the original pruned model, gives the same model again
    again = tmp_path / "again"
    assert main(["--model", str(model_dir), "--adapter", str(out / "adapter"), "--data", str(txt),
                 "--out", str(again), "--max-steps", "0", "--cutoff-len", "32", "--eval-windows", "0",
                 "--quiet"]) == 0
    merged_again, _ = mio.load_pruned(again)
    assert torch.allclose(_logits(merged_again), ref, atol=1e-5, rtol=1e-5)

    # a finished output is not overwritten by accident
    assert main(["--model", str(model_dir), "--data", str(txt), "--out", str(out), "--quiet"]) == 2


def test_adapter_of_another_model_is_refused(tmp_path):
    # an adapter trained on a differently pruned model (other layer widths)
    other, other_tok = _tiny_pruned("llama")
    txt = _text_file(tmp_path)
    recover(other, other_tok, txt, _quick(max_steps=1, eval_windows=0), out=tmp_path / "other", progress=False)
    model_dir, _, _ = _save_tiny(tmp_path, "mistral")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not fit this model.*other shapes"):
        model, tok = mio.load_pruned(model_dir)
        recover(model, tok, txt, _quick(max_steps=0, eval_windows=0), out=out,
                adapter=tmp_path / "other" / "adapter", progress=False)
    assert not out.exists()
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path / "other" / "adapter"), "--data", str(txt),
                 "--out", str(out), "--quiet", "--cutoff-len", "32", "--eval-windows", "0"]) == 2
    assert not out.exists()
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path), "--data", str(txt),
                 "--out", str(out), "--quiet"]) == 2  # not an adapter directory
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "moreau_pruner.recover", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for needle in ("--model", "--data", "--out", "--max-steps", "--resume", "--adapter", "examples:", "alpha 16"):
        assert needle in proc.stdout


def test_missing_peft_names_the_extra(monkeypatch, tmp_path):
    from moreau_pruner.recover import lora

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(lora.MissingExtraError, match=r"moreau-kernels\[recover\]"):
        lora.peft_module()
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path), "--data", "pydoc", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def _render_quality():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "render_quality.py"
    spec = importlib.util.spec_from_file_location("render_quality_for_recover", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_report_renders_recovery_records(tmp_path):
    rq = _render_quality()
    rec = {"model": "tiny", "command": "moreau-recover ...", "device": "2-core CPU", "date": "2026-01-01",
           "data": {"source": "pydoc"}, "steps": 10, "losses": [4.0] * 5 + [3.0] * 5, "train_time_s": 60.0,
           "config": {"batch_size": 2, "cutoff_len": 64, "rank": 8, "alpha": 16.0, "lr": 3e-4},
           "ppl_before": {"ppl": 41.0, "n_windows": 4, "seq_len": 128},
           "ppl_after": {"ppl": 30.0, "n_windows": 4, "seq_len": 128}}
    (tmp_path / "recovery").mkdir()
    (tmp_path / "recovery" / "tiny.json").write_text(json.dumps(rec))
    text = rq.render(tmp_path / "quality", tmp_path / "Q.md", plots=False)
    assert "## Recovery (LoRA after pruning)" in text
    assert "| tiny | pydoc | 10 | 2 x 64 | 8 / 16 / 0.0003 | 4.000 → 3.000 | 41.00 → 30.00 | – | 4 x 128 | 1.0 |" in text

    # the committed quality report carries the section of every committed recovery record
    committed = rq.ROOT / "results" / "recovery"
    section = "\n".join(rq.recovery_markdown(committed))
    if section:
        assert section in (rq.ROOT / "results" / "QUALITY.md").read_text()


def test_cli_speaks_the_shared_option_vocabulary(tmp_path, capsys):
    from moreau_pruner.cli.recover import build_parser

    p = build_parser()
    args = p.parse_args(["--model", "m", "--data", "pydoc", "--out", "o", "--eval-seq-len", "64"])
    assert args.eval_seq_len == 64  # the old spelling, with a note
    assert "--eval-seq-len is deprecated; use --eval-seq-lens" in capsys.readouterr().err
    assert p.parse_args(["--model", "m", "--data", "pydoc", "--out", "o", "--eval-seq-lens", "32"]).eval_seq_len == 32
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--data", "pydoc", "--out", "o", "--eval-seq-lens", "32,64"])
    assert "one window length" in capsys.readouterr().err
    for opt in ("--json", "--quiet", "--device", "--dtype", "--seed", "--overwrite"):
        assert opt in p.format_help()
    # bad input is one line and status 2, before any model is loaded
    assert main(["--model", "m", "--data", "pydoc", "--out", str(tmp_path / "o"), "--device", "tpu"]) == 2
    assert "moreau-recover: error: --device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
