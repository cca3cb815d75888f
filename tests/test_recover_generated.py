"""Recovery on teacher-generated text (data-free distillation), the cosine learning-rate schedule and several
out-of-domain texts: moreau-recover --data generated, --lr-schedule, --ood-data A,B."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from moreau_pruner.recover import RecoverConfig, load_recovery_data, recover
from moreau_pruner.recover import generate as mgen
from moreau_pruner.recover.generate import GENERATED_FILE, GenerationSettings, read_generated, sample_sequences
from moreau_pruner.recover.loop import _lr_at

from test_distill import _bench_module, _cli, _fake_record, _logits, _pair, _quick, _refused, _saved_pair, _text_file


def _no_sampling(*args, **kwargs):
    raise AssertionError("the teacher sampled again although stored samples with these settings exist")


# --------------------------------------------------------------------------- the learning-rate schedule


def test_lr_at_constant_and_cosine():
    const = RecoverConfig(lr=1e-3, warmup_steps=2).validate()
    assert [_lr_at(const, s, 10) for s in range(4)] == [5e-4, 1e-3, 1e-3, 1e-3]
    assert _lr_at(const, 9, 10) == 1e-3 == _lr_at(const, 99, 10)

    cos = replace(const, lr_schedule="cosine").validate()
    lrs = [_lr_at(cos, s, 10) for s in range(10)]
    assert lrs[:3] == [5e-4, 1e-3, 1e-3]  # the warm-up, then the cosine starts at lr
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then it only decreases
    # step s after the warm-up: lr * (1 + cos(pi * (s - 2) / 8)) / 2; the middle is lr / 2, the end 0
    assert lrs[6] == pytest.approx(5e-4) and lrs[9] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    assert _lr_at(cos, 10, 10) == pytest.approx(0.0, abs=1e-12)

    floor = replace(cos, min_lr=1e-4).validate()
    assert _lr_at(floor, 6, 10) == pytest.approx((1e-3 + 1e-4) / 2)
    assert _lr_at(floor, 10, 10) == pytest.approx(1e-4)
    assert _lr_at(replace(cos, warmup_steps=0), 0, 1) == 1e-3  # a one-step run: lr


def test_schedule_settings_are_checked_and_only_cosine_enters_the_report():
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine"):
        RecoverConfig(lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="min_lr is where the cosine schedule ends"):
        RecoverConfig(min_lr=1e-5).validate()
    with pytest.raises(ValueError, match=r"min_lr must be a number in \[0, lr=0.0001\)"):
        RecoverConfig(lr_schedule="cosine", min_lr=1e-3).validate()
    plain = RecoverConfig()
    assert "lr_schedule" not in plain.as_report() and "min_lr" not in plain.as_report()
    assert not {"max_steps", "epochs"} & set(plain.training_fingerprint())  # resumable to another length
    cos = RecoverConfig(lr_schedule="cosine", max_steps=10)
    assert cos.as_report()["lr_schedule"] == "cosine"
    assert cos.training_fingerprint()["max_steps"] == 10  # the decay depends on the length
    assert not set(("generate_samples", "generate_temperature", "generate_batch_size")) & set(cos.as_report())


def test_training_follows_the_cosine_schedule(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    teacher, student, tok = _pair()
    cfg = _quick(max_steps=5, lr=2e-3, warmup_steps=1, lr_schedule="cosine", min_lr=1e-4)
    recover(student, tok, _text_file(tmp_path), cfg, progress=False, teacher=teacher)
    assert seen == pytest.approx([_lr_at(cfg, s, 5) for s in range(5)])
    assert seen[0] == pytest.approx(2e-3) and seen[1] == pytest.approx(2e-3) and seen[-1] < seen[1] / 2


# --------------------------------------------------------------------------- sampling the teacher


def test_samples_start_from_bos_and_depend_only_on_the_settings():
    teacher, _, tok = _pair()
    s = GenerationSettings(samples=5, length=12, seed=3, batch_size=2)
    a = sample_sequences(teacher, 1, s, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long and (a[:, 0] == 1).all()
    assert torch.equal(a, sample_sequences(teacher, 1, s, progress=False))
    assert not torch.equal(a, sample_sequences(teacher, 1, replace(s, seed=4), progress=False))
    teacher.train()
    sample_sequences(teacher, 1, replace(s, samples=2), progress=False)  # sampled in eval mode, without gradients
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    assert mgen.start_token(tok, teacher) == tok.bos_token_id == 1


def test_a_cold_sample_is_the_greedy_continuation_computed_without_the_cache():
    teacher, _, _ = _pair()
    got = sample_sequences(teacher, 1, GenerationSettings(samples=2, length=10, temperature=1e-4), progress=False)
    ids = torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(9):
            nxt = teacher(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(got, ids.expand(2, -1))


def test_samples_follow_the_teachers_distribution():
    """A teacher whose next token is ``3`` with probability 0.9 and ``4`` with 0.1 (a bias on its head):
    about a tenth of the sampled tokens are 4, and none at a cold temperature."""
    teacher, _, _ = _pair()
    head = teacher.get_output_embeddings()
    teacher.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        teacher.lm_head.weight.zero_()
        teacher.lm_head.bias.fill_(-1e4)
        teacher.lm_head.bias[3], teacher.lm_head.bias[4] = math.log(0.9), math.log(0.1)
    ids = sample_sequences(teacher, 1, GenerationSettings(samples=40, length=51, batch_size=16), progress=False)
    body = ids[:, 1:]
    assert set(body.unique().tolist()) == {3, 4}
    assert (body == 4).float().mean().item() == pytest.approx(0.1, abs=0.02)  # 2000 draws: sd 0.007
    cold = sample_sequences(teacher, 1, GenerationSettings(samples=4, length=20, temperature=0.05), progress=False)
    assert (cold[:, 1:] == 3).all()


def test_generated_data_holds_out_the_last_fifth_and_fingerprints_its_settings(tmp_path, monkeypatch):
    teacher, _, tok = _pair()
    with pytest.raises(ValueError, match="sampled from the dense teacher: pass teacher="):
        load_recovery_data("generated", tok, 16)
    with pytest.raises(ValueError, match="only apply to 'generated' recovery data"):
        load_recovery_data("pydoc", tok, 16, teacher=teacher)
    gen = GenerationSettings(samples=10, batch_size=4)
    d = load_recovery_data("generated", tok, 16, teacher=teacher, generation=gen)
    assert d.kind == "generated" and d.source == d.heldout_source == "generated" and d.n_rows == 10
    assert d.generated.shape == (10, 16) and len(d.examples) == 8
    assert [ids for ids, _ in d.examples] == d.generated[:8].tolist()
    assert all(ids == labels for ids, labels in d.examples)
    assert d.heldout == d.generated[8:].flatten().tolist()  # the held-out samples, as token ids
    assert d.generation == {"samples": 10, "length": 16, "temperature": 1.0, "seed": 0, "batch_size": 4,
                            "teacher": "model object"}
    assert d.fingerprint()["generation"] == d.generation
    other = load_recovery_data("generated", tok, 16, teacher=teacher, generation=replace(gen, temperature=0.7))
    assert other.fingerprint()["generation"]["temperature"] == 0.7
    assert other.fingerprint()["sha256"] != d.fingerprint()["sha256"]
    assert "generation" not in load_recovery_data(_text_file(tmp_path), tok, 16).fingerprint()

    # stored samples with the same settings are taken instead of sampling; other settings sample again
    mgen.save_generated(tmp_path / "store", d.generated, GenerationSettings(**d.generation))
    monkeypatch.setattr(mgen, "sample_sequences", _no_sampling)
    again = load_recovery_data("generated", tok, 16, teacher=teacher, generation=gen, reuse_dir=tmp_path / "store")
    assert again.examples == d.examples and again.heldout == d.heldout
    assert d.generation_time_s > 0 and again.generation_time_s is None  # stored: no time spent sampling
    with pytest.raises(AssertionError, match="sampled again"):
        load_recovery_data("generated", tok, 16, teacher=teacher, generation=replace(gen, seed=1),
                           reuse_dir=tmp_path / "store")
    assert read_generated(tmp_path / "store", replace(GenerationSettings(**d.generation), batch_size=5)) is None
    assert read_generated(tmp_path / "nothing", GenerationSettings(**d.generation)) is None


# --------------------------------------------------------------------------- recovery on generated text


def test_resume_on_generated_text_equals_an_uninterrupted_run_and_trains_on_the_stored_samples(tmp_path,
                                                                                                 monkeypatch):
    cfg = _quick(max_steps=6, lr=5e-3, tuning="full", generate_samples=12, generate_batch_size=5,
                 lr_schedule="cosine")
    teacher, student, tok = _pair()
    straight = recover(student, tok, "generated", cfg, out=tmp_path / "straight", progress=False, teacher=teacher)
    assert straight.report["data"]["kind"] == "generated" and straight.report["data"]["examples"] == 10
    assert straight.report["data"]["generation"]["samples"] == 12
    assert straight.report["data"]["generation_time_s"] > 0
    assert straight.report["config"]["lr_schedule"] == "cosine"

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    teacher, student, tok = _pair()
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        recover(student, tok, "generated", cfg, out=out, progress=False, callback=kill_at_5, teacher=teacher)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [GENERATED_FILE, "step-0000004"]
    teacher, student, tok = _pair()
    with pytest.raises(ValueError, match="other settings.*max_steps"):  # a cosine run resumes to its own length
        recover(student, tok, "generated", replace(cfg, max_steps=8), out=out, progress=False, teacher=teacher)
    teacher, student, tok = _pair()
    with pytest.raises(ValueError, match="other settings.*the training data differs"):
        recover(student, tok, "generated", replace(cfg, generate_temperature=0.5), out=out, progress=False,
                teacher=teacher)
    monkeypatch.setattr(mgen, "sample_sequences", _no_sampling)  # the samples come from OUT/checkpoints
    teacher, student, tok = _pair()
    resumed = recover(student, tok, "generated", cfg, out=out, resume="always", progress=False, teacher=teacher)
    assert resumed.report["resumed_from_step"] == 4
    assert resumed.report["losses"] == straight.report["losses"]
    assert resumed.report["ppl_after"] == straight.report["ppl_after"]
    assert torch.equal(_logits(straight.model), _logits(resumed.model))
    assert not (out / "checkpoints").exists()
    # the output keeps what the model was trained on
    assert torch.equal(read_generated(out, GenerationSettings(**resumed.report["data"]["generation"])),
                       read_generated(tmp_path / "straight",
                                      GenerationSettings(**straight.report["data"]["generation"])))


def test_library_refuses_generated_text_without_distillation_and_generation_settings_without_it(tmp_path):
    teacher, student, tok = _pair()
    with pytest.raises(ValueError, match="sampled from the dense teacher: set distill=True"):
        recover(student, tok, "generated", _quick(max_steps=1, distill=False), progress=False)
    with pytest.raises(ValueError, match="generate_samples only apply to teacher-generated recovery data"):
        recover(student, tok, _text_file(tmp_path), _quick(max_steps=1, generate_samples=8), progress=False,
                teacher=teacher)


def test_cli_generated_text_with_two_out_of_domain_texts(tmp_path):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    other = _text_file(tmp_path, "other.txt")
    out = tmp_path / "rec"
    assert _cli("--model", pruned_dir, "--data", "generated", "--distill", "--out", out, "--max-steps", "2",
                "--generate-samples", "10", "--generate-batch-size", "3", "--ood-data", f"fortunes,{other}") == 0
    r = json.loads((out / "recovery.json").read_text())
    assert r["data"]["source"] == "generated" and r["data"]["heldout_source"] == "generated"
    assert r["data"]["generation"]["samples"] == 10 and r["data"]["generation"]["teacher"] == str(dense_dir)
    assert r["data"]["ood_source"] == "fortunes" and r["ppl_ood_after"]["ppl"] > 0
    extra = r["more_ood"][str(other)]
    assert extra["ppl_before"]["ppl"] > 0 and extra["teacher_ppl"]["ppl"] > 0
    want = (extra["ppl_before"]["ppl"] - extra["ppl_after"]["ppl"]) / (extra["ppl_before"]["ppl"]
                                                                       - extra["teacher_ppl"]["ppl"])
    assert extra["gap_closed"] == pytest.approx(want)
    assert (out / GENERATED_FILE).is_file()
    assert json.loads((out / "pruning_info.json").read_text())["recovery"]["data"] == "generated"


def test_cli_refuses_generated_text_without_distill_before_any_output(tmp_path, capsys):
    dense_dir, pruned_dir = _saved_pair(tmp_path)
    out = tmp_path / "out"
    for flags, match in [
        (("--data", "generated"), "--data generated is text the dense teacher samples: add --distill"),
        (("--data", str(_text_file(tmp_path)), "--generate-samples", "8"), "--generate-samples only apply to --data"),
        (("--data", "generated", "--distill", "--generate-samples", "1"), "generate_samples must be an int >= 2"),
        (("--data", "generated", "--distill", "--generate-temperature", "0"), "generate_temperature must be"),
        (("--data", "pydoc", "--min-lr", "1e-5"), "min_lr is where the cosine schedule ends"),
        (("--data", "pydoc", "--ood-data", ","), "names no text"),
        (("--data", "pydoc", "--ood-data", "fortunes,fortunes"), "is given twice"),
    ]:
        _refused(capsys, tmp_path, out, "--model", pruned_dir, *flags, match=match)


# --------------------------------------------------------------------------- the benchmark


def test_benchmark_names_generated_and_cosine_runs_apart_and_passes_them_through():
    rd = _bench_module("recovery_distill")
    base = ["--pruned", "/p", "--run", "full-kd:2e-4"]
    assert rd.run_name(rd.parse(base), "full-kd", "2e-4", 0) == "final-full-kd-lr2e-4-s0"
    args = rd.parse([*base, "--data", "generated", "--lr-schedule", "cosine", "--pilot"])
    assert rd.run_name(args, "full-kd", "2e-4", 0) == "pilot-full-kd-generated-cosine-lr2e-4-s0"
    with pytest.raises(SystemExit):
        rd.parse(["--pruned", "/p", "--run", "lora-lm:1e-3", "--data", "generated"])  # no teacher, no samples
    with pytest.raises(SystemExit):
        rd.parse([*base, "--generate-samples", "64"])  # pydoc is not sampled


def test_benchmark_tables_show_the_text_the_schedule_and_the_own_held_out_side(tmp_path):
    rq = _bench_module("render_quality")
    ppl = lambda x: {"ppl": x, "n_windows": 16, "seq_len": 128}  # noqa: E731
    (tmp_path / "pydoc.json").write_text(json.dumps(_fake_record("full-kd", 0, 90.0)))  # closes 0.25 of fortunes
    gen = _fake_record("full-kd", 0, 80.0)  # closes (100 - 80) / 40 = 0.5 of the fortunes gap
    gen.update(name="gen", data="generated", ood_data="fortunes,pydoc", lr_schedule="cosine")
    gen["report"].update(ppl_before=ppl(12.0), ppl_after=ppl(11.0), teacher={"ppl": ppl(10.0), "ppl_ood": ppl(60.0)},
                         data={"heldout_source": "generated", "ood_source": "fortunes",
                               "generation": {"samples": 8, "length": 128}}, total_time_s=400.0,
                         more_ood={"pydoc": {"ppl_before": ppl(30.0), "ppl_after": ppl(28.0),
                                             "teacher_ppl": ppl(25.0)}})
    gen["wall_s"] = 1000.0
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    text = "\n".join(rq.distill_markdown(tmp_path))
    assert "| recovery | text | schedule | lr | steps | seeds | pydoc PPL pruned → recovered | fortunes PPL " \
           "pruned → recovered | fortunes gap closed | pydoc gap closed | own held-out PPL pruned → recovered |" in text
    assert "| dense (the teacher) | – | – | – | – | – | 25.00 | 60.00 | – | – | – |" in text
    assert "| full fine-tuning, distillation | pydoc | constant | 0.001 | 300 | 0 | 30.00 → 20.00 (n=1) | " \
           "100.00 → 90.00 (n=1) | 0.250 (n=1) | 2.000 (n=1) | – |" in text
    assert "| full fine-tuning, distillation | teacher-generated | cosine | 0.001 | 300 | 0 | 30.00 → 28.00 (n=1) | " \
           "100.00 → 80.00 (n=1) | 0.500 (n=1) | 0.400 (n=1) | 12.00 → 11.00 (n=1) (dense 10.00) |" in text
    assert "(teacher-generated, cosine, lr 0.001, 300 steps), closing 50.0% of the fortunes" in text
    assert "— met." in text and "each row's recovery text (pydoc: its calibration side; teacher-generated:" in text
    assert "wall time before training, loading the models included" in text
    assert "gen: 600 s for 8 x 128 tokens (load 5.0)" in text
    gen["generated_from"] = "/w/other/generated.safetensors"  # reused samples: nothing sampled, no cost line
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    assert "Sampling the teacher's text" not in "\n".join(rq.distill_markdown(tmp_path))


def test_benchmark_hands_a_run_the_samples_of_an_earlier_run_with_the_same_seed_and_length(tmp_path):
    rd = _bench_module("recovery_distill")
    work = tmp_path / "work"
    ids = torch.arange(2 * 16).reshape(2, 16)
    mgen.save_generated(work / "pilot-a", ids, GenerationSettings(samples=2, length=16, seed=0))
    args = rd.parse(["--pruned", "/p", "--run", "full-kd:1e-4", "--data", "generated", "--cutoff-len", "16",
                     "--work", str(work)])
    out = work / "pilot-b"
    got = rd._seed_generated(args, out, 0)
    assert got["file"] == str(work / "pilot-a" / GENERATED_FILE) and got["settings"]["seed"] == 0
    assert torch.equal(read_generated(out / "checkpoints", GenerationSettings(samples=2, length=16, seed=0)), ids)
    assert rd._seed_generated(args, work / "pilot-c", 1) is None  # another seed: the run samples its own
    assert rd._seed_generated(rd.parse([*["--pruned", "/p", "--run", "full-kd:1e-4", "--data", "generated"],
                                        "--work", str(work)]), work / "pilot-d", 0) is None  # another length
