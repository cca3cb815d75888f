"""Distillation recovery and full fine-tuning (``moreau-recover --distill``, ``--tuning full``)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moreau_pruner import PruneConfig, prune_model
from moreau_pruner.io import pruned as mio
from moreau_pruner.cli.recover import main
from moreau_pruner.recover import RecoverConfig, RecoveryData, load_recovery_data, recover
from moreau_pruner.recover.losses import distillation_loss, teacher_targets
from moreau_pruner.recover.teacher import EMBEDDED, Teacher, freeze, resolve_teacher
from moreau_pruner.recover.tuning import FullTuning

from _tiny import word_tokenizer

WORDS = ("the a of to and in is it for on with as by at from this that be are was or not an if then "
         "else return def class import value list dict key print loop while true false none self").split()
TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(900))
OTHER_TEXT = " ".join(WORDS[(i * 5 + 3) % len(WORDS)] for i in range(600))
IDS = torch.tensor([[1, 5, 17, 33, 40, 8, 21, 30], [1, 7, 7, 3, 12, 35, 11, 30]])


def _tokenizer(words=WORDS):
    return word_tokenizer(words)


def _dense(seed=0, vocab=None):
    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


def _pair(seed=0):
    """(dense teacher, the same model pruned by this package's pruner, tokenizer)."""
    teacher, tok = _dense(seed)
    student, _ = _dense(seed)
    prune_model(student, None, method="magnitude", prune=PruneConfig(ratio=0.5, attn_layers="0:2", mlp_layers="1:3"),
                progress=False)
    return teacher, student.eval(), tok


def _saved_pair(tmp_path, info=True):
    """A saved dense directory and a saved pruned directory whose pruning_info.json names it."""
    teacher, student, tok = _pair()
    dense_dir = tmp_path / "dense"
    teacher.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    pruned_dir = mio.save_pruned(student, tmp_path / "pruned", tokenizer=tok,
                                 extra={"model": str(dense_dir), "method": "magnitude"} if info else None)
    return dense_dir, pruned_dir


def _text_file(tmp_path, name="corpus.txt", text=TEXT):
    path = tmp_path / name
    path.write_text("\n".join(text[i : i + 200] for i in range(0, len(text), 200)), encoding="utf-8")
    return path


def _quick(**kw):
    base = dict(cutoff_len=32, batch_size=4, eval_seq_len=16, eval_windows=2, save_every=2, distill=True)
    base.update(kw)
    return RecoverConfig(**base)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _cli(*args):
    return main([*map(str, args), "--quiet", "--cutoff-len", "32", "--eval-seq-len", "16", "--eval-windows", "2"])


# --------------------------------------------------------------------------- the loss, by hand


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


STUDENT = [[[0.3, -1.2, 2.0, 0.1, -0.4], [1.5, 0.2, -0.7, 0.9, 0.0], [-2.0, 0.4, 0.4, 1.1, -0.3],
            [0.0, 0.0, 0.5, -0.5, 1.0]]]
TEACHER = [[[1.0, -0.5, 1.5, 0.0, -1.0], [0.2, 0.8, -0.1, 1.7, -0.6], [-1.0, 1.2, 0.3, 0.0, 0.9],
            [2.0, -1.0, 0.0, 0.3, 0.1]]]
LABELS = [[4, 2, -100, 3]]  # position t predicts labels[t + 1]: positions 0 and 2 count, 1 does not


def _by_hand(temperature, lm_weight, top_k=None):
    kl_sum = ce_sum = 0.0
    for t in range(3):
        target = LABELS[0][t + 1]
        if target == -100:
            continue
        p = _softmax([x / temperature for x in TEACHER[0][t]])
        q = _softmax([x / temperature for x in STUDENT[0][t]])
        if top_k is None:
            kl_sum += sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))
        else:
            top = sorted(range(5), key=lambda v: -p[v])[:top_k]
            p_rest, q_rest = 1 - sum(p[v] for v in top), 1 - sum(q[v] for v in top)
            kl_sum += sum(p[v] * math.log(p[v] / q[v]) for v in top) + p_rest * math.log(p_rest / q_rest)
        ce_sum += -math.log(_softmax(STUDENT[0][t])[target])
    return (1 - lm_weight) * temperature ** 2 * kl_sum + lm_weight * ce_sum, kl_sum, ce_sum


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("lm_weight", [0.0, 0.3])
@pytest.mark.parametrize("top_k", [None, 2, 4])
def test_loss_equals_the_kl_computed_by_hand(temperature, lm_weight, top_k):
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    loss, kl, ce = distillation_loss(student, torch.tensor(TEACHER), torch.tensor(LABELS), temperature, top_k,
                                     lm_weight)
    want, want_kl, want_ce = _by_hand(temperature, lm_weight, top_k)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert kl.item() == pytest.approx(want_kl, rel=1e-5) and ce.item() == pytest.approx(want_ce, rel=1e-5)
    if top_k is None:  # d loss / d student logit = (1 - w) T (q_T - p_T) + w (softmax - onehot)
        loss.backward()
        for t in (0, 2):
            p = _softmax([x / temperature for x in TEACHER[0][t]])
            q = _softmax([x / temperature for x in STUDENT[0][t]])
            s = _softmax(STUDENT[0][t])
            onehot = [float(v == LABELS[0][t + 1]) for v in range(5)]
            want_grad = [(1 - lm_weight) * temperature * (qv - pv) + lm_weight * (sv - ov)
                         for qv, pv, sv, ov in zip(q, p, s, onehot)]
            assert student.grad[0, t].tolist() == pytest.approx(want_grad, rel=1e-4, abs=1e-6)
        assert student.grad[0, 1].abs().max() == 0 and student.grad[0, 3].abs().max() == 0  # unlabelled


def test_top_k_keeps_only_k_teacher_values_and_one_rest_bin():
    targets = teacher_targets(torch.tensor(TEACHER), torch.tensor(LABELS), 1.0, top_k=2)
    assert targets.log_probs.shape == (2, 2) and targets.index.shape == (2, 2) and targets.log_rest.shape == (2,)
    mass = targets.log_probs.exp().sum(-1) + targets.log_rest.exp()
    assert torch.allclose(mass, torch.ones(2))
    full = teacher_targets(torch.tensor(TEACHER), torch.tensor(LABELS), 1.0, top_k=5)  # k covers the vocabulary
    assert full.index is None and full.log_probs.shape == (2, 5)


# --------------------------------------------------------------------------- training


def test_teacher_stays_frozen_and_distillation_pulls_the_student_towards_it():
    teacher, student, tok = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    text = " ".join(WORDS[:20]) + " "
    batch = [tok(text * 2)["input_ids"][:16], tok(text * 3)["input_ids"][5:21]]
    data = RecoveryData([(ids, list(ids)) for ids in batch], "text", "fixed batch")

    def kl_to_teacher(model):
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=IDS).logits, -1)
            q = torch.log_softmax(model(input_ids=IDS).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    kl_start = kl_to_teacher(student)
    res = recover(student, tok, data, _quick(lr=1e-2, max_steps=12, batch_size=2, dropout=0.0, eval_windows=0),
                  progress=False, teacher=teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    kl = res.report["loss_parts"]["kl"]
    assert len(kl) == 12 and kl[-1] < 0.7 * kl[0]
    assert res.report["losses"] == pytest.approx(kl)  # T = 1, lm_weight 0: the loss is the KL
    assert kl_to_teacher(res.model) < 0.9 * kl_start  # on other tokens too
    assert res.report["teacher"]["source"] == "LlamaForCausalLM object"


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_resume_with_distillation_equals_an_uninterrupted_run(tmp_path, tuning):
    txt = _text_file(tmp_path)
    cfg = _quick(max_steps=6, lr=5e-3, tuning=tuning, distill_temperature=2.0, lm_weight=0.25,
                 distill_top_k=8 if tuning == "lora" else None)

    teacher, student, tok = _pair()
    straight = recover(student, tok, txt, cfg, out=tmp_path / "straight", progress=False, teacher=teacher)

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    teacher, student, tok = _pair()
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        recover(student, tok, txt, cfg, out=out, progress=False, callback=kill_at_5, teacher=teacher)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004"]
    teacher, student, tok = _pair()
    with pytest.raises(ValueError, match="other settings.*distill_temperature"):
        recover(student, tok, txt, replace(cfg, distill_temperature=1.0), out=out, progress=False, teacher=teacher)
    teacher, student, tok = _pair()
    resumed = recover(student, tok, txt, cfg, out=out, resume="always", progress=False, teacher=teacher)
    assert resumed.report["resumed_from_step"] == 4
    assert resumed.report["losses"] == straight.report["losses"]
    assert resumed.report["loss_parts"] == straight.report["loss_parts"]
    assert resumed.report["teacher"] == straight.report["teacher"]
    assert torch.equal(_logits(straight.model), _logits(resumed.model))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not (out / "checkpoints").exists()


def test_full_finetuning_saves_a_model_that_reloads_with_identical_logits(tmp_path):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    before, _ = mio.load_pruned(pruned_dir)
    out = tmp_path / "full"
    txt = _text_file(tmp_path)
    assert _cli("--model", pruned_dir, "--data", txt, "--out", out, "--distill", "--tuning", "full",
                "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--save-every", "2") == 0
    report = json.loads((out / "recovery.json").read_text())
    n_params = sum(p.numel() for p in before.parameters())
    assert report["trainable_parameters"] == n_params and report["config"]["tuning"] == "full"
    assert report["teacher"]["source"] == str(dense_dir)
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    info = json.loads((out / "pruning_info.json").read_text())
    assert info["model"] == str(dense_dir) and info["recovery"]["tuning"] == "full" and info["recovery"]["distill"]

    loaded, tok = mio.load_pruned(out)
    assert mio.layer_widths(loaded) == mio.layer_widths(before)
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert len(changed) == len(before.state_dict())  # every weight was trained
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(_logits(remote), _logits(loaded))

    # the library result is the saved model
    teacher, student, tok = _pair()
    res = recover(student, tok, txt, _quick(tuning="full", max_steps=2, eval_windows=0), progress=False,
                  teacher=teacher, out=tmp_path / "lib")
    again, _ = mio.load_pruned(tmp_path / "lib")
    assert torch.equal(_logits(again), _logits(res.model)) and res.adapter_state == {}


def test_full_tuning_in_bfloat16_trains_float32_weights_and_saves_bfloat16(tmp_path):
    teacher, student, tok = _pair()
    seen = []

    def callback(step, loss):
        seen.append({p.dtype for p in student.parameters()})

    res = recover(student, tok, _text_file(tmp_path), _quick(tuning="full", dtype="bfloat16", max_steps=2,
                                                             eval_windows=0, lr=1e-3),
                  progress=False, teacher=teacher, callback=callback)
    assert seen == [{torch.float32}] * 2  # AdamW updates float32 weights (bf16 ones would drop small steps)
    assert {p.dtype for p in res.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # the student's dtype
    assert all(math.isfinite(x) for x in res.report["losses"])
    tuning = FullTuning()
    tuning.prepare(_dense()[0], _quick(tuning="full", dtype="bfloat16"))
    with tuning.autocast():
        assert tuning.model(input_ids=IDS).logits.dtype == torch.bfloat16


# --------------------------------------------------------------------------- report


def test_report_has_out_of_domain_and_teacher_perplexity(tmp_path):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    txt, other = _text_file(tmp_path), _text_file(tmp_path, "other.txt", OTHER_TEXT)
    out = tmp_path / "rec"
    assert _cli("--model", pruned_dir, "--data", txt, "--out", out, "--distill", "--ood-data", other,
                "--max-steps", "2", "--lr", "1e-3") == 0
    r = json.loads((out / "recovery.json").read_text())
    assert r["data"]["ood_source"] == str(other) and r["data"]["heldout_source"] == str(txt)
    for key in ("ppl_before", "ppl_after", "ppl_ood_before", "ppl_ood_after"):
        assert r[key]["ppl"] > 0 and r[key]["n_windows"] == 2, key
    assert r["ppl_ood_before"]["ppl"] != r["ppl_before"]["ppl"]  # other text, other windows
    assert r["teacher"]["ppl"]["ppl"] > 0 and r["teacher"]["ppl_ood"]["ppl"] > 0
    want = (r["ppl_ood_before"]["ppl"] - r["ppl_ood_after"]["ppl"]) / (r["ppl_ood_before"]["ppl"]
                                                                       - r["teacher"]["ppl_ood"]["ppl"])
    assert r["gap_closed"]["ood"] == pytest.approx(want)
    assert len(r["loss_parts"]["kl"]) == len(r["loss_parts"]["lm"]) == 2
    assert r["config"]["distill"] is True and r["config"]["distill_temperature"] == 1.0

    # a plain LoRA run: the out-of-domain perplexity when asked for, and no distillation entries
    out2 = tmp_path / "lora"
    assert _cli("--model", pruned_dir, "--data", txt, "--out", out2, "--ood-data", other, "--max-steps", "1") == 0
    r2 = json.loads((out2 / "recovery.json").read_text())
    assert r2["ppl_ood_before"]["ppl"] == pytest.approx(r["ppl_ood_before"]["ppl"])
    assert not {"teacher", "loss_parts", "gap_closed"} & set(r2) and "distill" not in r2["config"]


def test_ood_default_with_distill_is_fortunes_unless_training_on_it(tmp_path):
    from moreau_pruner.cli.recover import _ood_source, build_parser

    p = build_parser()
    base = ["--model", "m", "--out", "o"]
    assert _ood_source(p.parse_args([*base, "--data", "pydoc", "--distill"])) == "fortunes"
    assert _ood_source(p.parse_args([*base, "--data", "fortunes", "--distill"])) == "pydoc"
    assert _ood_source(p.parse_args([*base, "--data", "pydoc"])) is None
    assert _ood_source(p.parse_args([*base, "--data", "pydoc", "--distill", "--ood-data", "none"])) is None
    tok = _tokenizer()
    txt = _text_file(tmp_path)
    with pytest.raises(ValueError, match="is the recovery data itself"):
        load_recovery_data(txt, tok, 32, ood_source=str(txt))
    with pytest.raises(ValueError, match="is the recovery data itself"):
        load_recovery_data("pydoc", tok, 32, ood_source="pydoc")


# --------------------------------------------------------------------------- the teacher and bad input


def test_teacher_comes_from_pruning_info_or_the_flag(tmp_path):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    assert resolve_teacher(pruned_dir) == str(dense_dir)
    assert resolve_teacher(pruned_dir, EMBEDDED) == EMBEDDED
    assert resolve_teacher(tmp_path / "nowhere", dense_dir) == str(dense_dir)
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "pruning_info.json").write_text(json.dumps({"model": "embedded SmolLM2-135M-Instruct"}))
    assert resolve_teacher(emb) == EMBEDDED
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "pruning_info.json").write_text(json.dumps({"model": str(tmp_path / "deleted-dense")}))
    with pytest.raises(FileNotFoundError, match="names .*deleted-dense.* does not exist here.*--teacher"):
        resolve_teacher(gone)
    with pytest.raises(ValueError, match="no teacher known.*has no pruning_info.json.*--teacher"):
        resolve_teacher(tmp_path / "nowhere")


def _refused(capsys, tmp_path, out, *args, match):
    capsys.readouterr()
    assert _cli(*args, "--out", out, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.split("\n") if line.startswith("moreau-recover: error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_clear_errors_before_any_output(tmp_path, capsys):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    _, bare_dir = _saved_pair(tmp_path / "bare", info=False)
    txt = _text_file(tmp_path)
    out = tmp_path / "out"
    common = ("--model", pruned_dir, "--data", txt)
    _refused(capsys, tmp_path, out, "--model", bare_dir, "--data", txt, "--distill", match="no teacher known")
    for flags, match in [
        (("--distill", "--distill-temperature", "0"), "distill_temperature must be a positive finite number"),
        (("--distill", "--distill-temperature", "-1"), "distill_temperature must be"),
        (("--distill", "--distill-temperature", "nan"), "distill_temperature must be"),
        (("--distill", "--lm-weight", "1"), r"lm_weight .* must be in \[0, 1\)"),
        (("--distill", "--lm-weight", "-0.1"), r"lm_weight .* must be in \[0, 1\)"),
        (("--distill", "--distill-top-k", "0"), "distill_top_k must be an int >= 1"),
        (("--lm-weight", "0.5"), "only apply to distillation"),
        (("--distill-temperature", "2"), "only apply to distillation"),
        (("--teacher", str(dense_dir)), "add --distill"),
        (("--distill", "--teacher", str(tmp_path / "missing")), "teacher .*missing.* does not exist"),
        (("--distill", "--dtype", "bfloat16", "--teacher-dtype", "float32"), "wider than the student's bfloat16"),
        (("--tuning", "full", "--adapter", str(tmp_path)), "does not apply to --tuning full"),
        (("--ood-data", str(txt)), "is the recovery data itself"),
    ]:
        _refused(capsys, tmp_path, out, *common, *flags, match=match)

    # a teacher with another vocabulary, and one with the same size but other token ids
    big, tok = _dense(vocab=len(_tokenizer()) + 3)
    big.save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    _refused(capsys, tmp_path, out, *common, "--distill", "--teacher", tmp_path / "big",
             match=r"predicts 4\d tokens and the student 4\d.*one vocabulary")
    shuffled, _ = _dense()
    shuffled.save_pretrained(tmp_path / "shuffled")
    _tokenizer(list(reversed(WORDS))).save_pretrained(tmp_path / "shuffled")
    _refused(capsys, tmp_path, out, *common, "--distill", "--teacher", tmp_path / "shuffled",
             match="another tokenizer than the student.*same token ids")

    teacher, student, tok = _pair()
    with pytest.raises(ValueError, match="distillation needs a teacher"):
        recover(student, tok, txt, _quick(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="distill is off"):
        recover(student, tok, txt, _quick(max_steps=1, distill=False), progress=False, teacher=teacher)
    with pytest.raises(ValueError, match="the teacher is the student itself"):
        recover(student, tok, txt, _quick(max_steps=1), progress=False, teacher=student)
    with pytest.raises(ValueError, match="tuning must be one of lora, full"):
        recover(student, tok, txt, _quick(max_steps=1, tuning="partial"), progress=False, teacher=teacher)
    assert isinstance(freeze(teacher), LlamaForCausalLM) and Teacher(teacher, None, "x").dtype == torch.float32


# --------------------------------------------------------------------------- the benchmark's tables


def _bench_module(name):
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"{name}_for_distill", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_record(config, seed, ood_after, tag="final", heldout_after=20.0, steps=300):
    ppl = lambda x: {"ppl": x, "n_windows": 64, "seq_len": 128}  # noqa: E731
    report = {"ppl_before": ppl(30.0), "ppl_after": ppl(heldout_after), "ppl_ood_before": ppl(100.0),
              "ppl_ood_after": ppl(ood_after)}
    if config != "lora-lm":
        report["teacher"] = {"ppl": ppl(25.0), "ppl_ood": ppl(60.0)}
    return {"name": f"{tag}-{config}-s{seed}", "tag": tag, "config": config, "lr": 1e-3, "seed": seed, "steps": steps,
            "batch_size": 2, "cutoff_len": 128, "data": "pydoc", "ood_data": "fortunes",
            "prune_command": "moreau-prune --out P", "command": "moreau-recover ...", "device_name": "a CPU",
            "loadavg": {"mean": 5.0}, "seconds_per_step": 10.0, "flops_per_step": 2e11,
            "gpu_estimate": {"seconds_per_step": 5e-4, "utilisation": 0.4, "peak_flops": 989e12}, "report": report}


def test_benchmark_tables_say_whether_the_target_is_met(tmp_path):
    rq = _bench_module("render_quality")
    for seed, (lm, kd, full) in enumerate([(98.0, 90.0, 85.0), (96.0, 88.0, 87.0)]):
        for config, ood in (("lora-lm", lm), ("lora-kd", kd), ("full-kd", full)):
            (tmp_path / f"{config}-{seed}.json").write_text(json.dumps(_fake_record(config, seed, ood)))
    (tmp_path / "pilot.json").write_text(json.dumps(_fake_record("lora-kd", 0, 95.0, tag="pilot")))
    text = "\n".join(rq.distill_markdown(tmp_path))
    # full-kd: gaps (100 - 85) / 40 and (100 - 87) / 40: 0.35 on average, above a third
    assert "| full fine-tuning, distillation | pydoc | constant | 0.001 | 300 | 0, 1 | 30.00 → 20.00 ± 0.00 (n=2) | 100.00 → 86.00 ± 1.41 " \
           "(n=2) | 0.350 ± 0.035 (n=2) | 2.000 ± 0.000 (n=2) |" in text
    assert "| dense (the teacher) | – | – | – | – | – | 25.00 | 60.00 |" in text
    assert "(pydoc, lr 0.001, 300 steps), closing 35.0% of the fortunes perplexity gap" in text and "— met." in text
    assert "Pilot (300 steps" in text and "only" not in text
    (tmp_path / "full-kd-0.json").unlink()
    (tmp_path / "full-kd-1.json").unlink()
    assert "LoRA, distillation (pydoc, lr 0.001, 300 steps), closing 27.5%" in "\n".join(rq.distill_markdown(tmp_path))
    assert "not met" in "\n".join(rq.distill_markdown(tmp_path))


def test_benchmark_tables_keep_budgets_apart(tmp_path):
    rq = _bench_module("render_quality")
    # one configuration at a longer budget: its own row, and the best line says the others did not run there
    for seed, ood in enumerate([84.0, 86.0]):
        (tmp_path / f"long-{seed}.json").write_text(json.dumps(_fake_record("full-kd", seed, ood, steps=600)))
    (tmp_path / "short.json").write_text(json.dumps(_fake_record("full-kd", 0, 98.0, steps=300)))
    text = "\n".join(rq.distill_markdown(tmp_path))
    assert "| full fine-tuning, distillation | pydoc | constant | 0.001 | 300 | 0 |" in text
    assert "| full fine-tuning, distillation | pydoc | constant | 0.001 | 600 | 0, 1 |" in text
    assert "for every row, trained for the steps of each row (300, 600) of 2 x 128 tokens" in text
    assert "(pydoc, lr 0.001, 600 steps), closing 37.5%" in text and "— met." in text
    assert "At 600 steps only full fine-tuning, distillation ran" in text


def test_benchmark_refuses_a_record_made_with_another_budget(tmp_path):
    rd = _bench_module("recovery_distill")
    rec = _fake_record("full-kd", 0, 90.0, tag="pilot", steps=50)
    rec.update(pruned="/p")
    rec["report"]["config"] = {"eval_windows": 16}
    (tmp_path / "pilot-full-kd-lr1e-3-s0.json").write_text(json.dumps(rec))
    argv = ["--pilot", "--pruned", "/p", "--run", "full-kd:1e-3", "--results", str(tmp_path), "--steps"]
    rd.check_recorded(rd.parse([*argv, "50", "--eval-windows", "16"]), tmp_path)  # the same run: counts as done
    with pytest.raises(SystemExit, match="steps 50 recorded, 150 asked"):
        rd.check_recorded(rd.parse([*argv, "150", "--eval-windows", "16"]), tmp_path)
    with pytest.raises(SystemExit, match="eval_windows 16 recorded, 64 asked"):
        rd.check_recorded(rd.parse([*argv, "50"]), tmp_path)


def test_step_flops_count_the_teacher_and_the_weight_gradients():
    rd = _bench_module("recovery_distill")
    assert rd.step_flops("lora-lm", 100, None, 10) == 4 * 100 * 10
    assert rd.step_flops("lora-kd", 100, 120, 10) == 4 * 100 * 10 + 2 * 120 * 10
    assert rd.step_flops("full-kd", 100, 120, 10) == 6 * 100 * 10 + 2 * 120 * 10


def test_committed_quality_report_carries_the_distillation_section():
    rq = _bench_module("render_quality")
    section = "\n".join(rq.distill_markdown(rq.ROOT / "results" / "recovery" / "distill"))
    if section:
        assert section in (rq.ROOT / "results" / "QUALITY.md").read_text()
        assert section in (rq.ROOT / "results" / "recovery" / "README.md").read_text()
