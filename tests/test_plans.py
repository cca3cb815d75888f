"""Memory plans for the sizes people prune: FSDP2 per-rank arithmetic, meta-device tracked steps, CLI."""
import json

import pytest
import torch

from moreau_pruner.estimate import MoreauConfig
from moreau_pruner.estimate.memory import GiB, plan_memory
from moreau_pruner.estimate.plans import (Option, candidate_options, layer_score, main, plan_rank, plan_scenario,
                                          tracked_step)
from moreau_pruner.model.meta import SHAPES, meta_model
from moreau_pruner.model.structure import default_layer_range

SHORT_7B = dict(SHAPES["llama-7b"], num_hidden_layers=8)


def test_fsdp_rank_plan_shards_state_and_splits_rows():
    m = meta_model(dict(SHAPES["llama-3-70b"], num_hidden_layers=4))
    P = sum(p.numel() for p in m.parameters())
    one = plan_rank(m, 10, 64, Option(2), None)
    two = plan_rank(m, 10, 64, Option(4), None)
    assert one.items["weights (local shard)"] == 2 * -(-P // 2)
    assert one.items["delta (fp32, local shard)"] == 4 * -(-P // 2)
    assert two.items["delta (fp32, local shard)"] == 4 * -(-P // 4)
    # the batch is split: 5 rows per rank at 2 ranks, 3 at 4
    assert two.items["activations (this rank's rows)"] < one.items["activations (this rank's rows)"]
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    assert one.items["unsharded decoder layers in flight (current + prefetch)"] == 2 * 2 * layer
    off = plan_rank(m, 10, 64, Option(2, offload=True), None)
    assert "delta (fp32, local shard)" not in off.items and off.host_items["delta (fp32, local shard)"] > 0
    assert off.total < one.total and off.host_per_node == sum(off.host_items.values()) * 2


def test_standard_scenarios_choose_a_configuration_that_fits():
    seven = plan_scenario("llama-7b", 1)
    assert seven["chosen"] is not None and seven["chosen"].fits
    assert [p.option for p in seven["plans"]] == candidate_options(1)
    seventy = plan_scenario("llama-3-70b", 8)
    plain = seventy["plans"][0]
    assert not plain.fits  # 70B state (bf16 weights, fp32 δ/acc) does not fit 8 GPUs without offload
    assert seventy["chosen"] is not None and seventy["chosen"].option.offload
    assert plan_scenario("llama-3-70b", 16)["chosen"].option == Option(16)
    assert default_layer_range(32) == (4, 30) and default_layer_range(80) == (10, 75)


@pytest.mark.parametrize("path,ckpt", [("regen", False), ("lean", False), ("regen", True)])
def test_plan_matches_tracked_step_on_meta(path, ckpt):
    """The single-GPU plan (an upper bound) within 10 % above the tensors one step creates."""
    m = meta_model(SHORT_7B, torch.bfloat16)
    tr = tracked_step(m, (10, 64), path=path, gradient_checkpointing=ckpt)
    plan = plan_memory(m, (10, 64), None, path, "cpu", gradient_checkpointing=ckpt, fused=True)
    assert tr.baseline_bytes == sum(p.numel() * 2 for p in m.parameters()) + sum(
        b.numel() * b.element_size() for b in m.buffers())
    assert 1.0 <= plan.total / tr.peak_bytes <= 1.1, (plan.total / GiB, tr.peak_bytes / GiB, tr.summary())
    for p in m.parameters():  # nothing left behind
        assert p.grad is None and p.requires_grad
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_regen_step_holds_less_than_lean_on_meta():
    m = meta_model(SHORT_7B, torch.bfloat16)
    lean = tracked_step(m, (2, 64), path="lean").peak_bytes
    regen = tracked_step(m, (2, 64), path="regen").peak_bytes
    linear = sum(mod.weight.numel() * 2 for mod in m.modules() if type(mod) is torch.nn.Linear)
    assert lean - regen > 0.8 * linear


def test_cli(tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert main(["--shape", "llama-3-70b", "--gpus", "16", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["scenarios"][0]["chosen"] == "16 GPUs, FSDP2"
    assert "FITS" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--shape", "llama-7b"])  # --gpus missing
    with pytest.raises(SystemExit):
        main(["--tokens", "8", "--seq", "64"])


@pytest.mark.parametrize("path,ckpt,shape,score,peak", [
    ("regen", False, (10, 64), None, 20342308608),
    ("lean", False, (10, 64), None, 24025956104),
    ("regen", True, (10, 64), None, 19183591692),
    ("lean", False, (2, 64), None, 23074596616),
    ("regen", False, (2, 64), None, 19328034560),
    ("lean", True, (10, 64), (1, 7), 20278026504),
])
def test_tracked_step_runs_the_estimate_loop_and_keeps_its_figures(monkeypatch, path, ckpt, shape, score, peak):
    """The tracked step is the estimate loop itself (one step, one backward) and its peak is, byte for
    byte, what the step assembled by hand from the strategies' pieces measured before the loop was
    shared (recorded with the same shapes)."""
    from moreau_pruner.estimate import loop

    calls = []
    real = loop._run

    def spy(model, batch, cfg, strategy, *a):
        calls.append((cfg.iters, cfg.n_samples, cfg.micro_batch_size, strategy.name, tuple(batch.shape)))
        return real(model, batch, cfg, strategy, *a)

    monkeypatch.setattr(loop, "_run", spy)
    m = meta_model(SHORT_7B, torch.bfloat16)
    tr = tracked_step(m, shape, MoreauConfig(iters=7, n_samples=2, micro_batch_size=1, mode="paper"), path,
                      layer_score(*score) if score else None, ckpt)
    assert calls == [(1, 1, None, path, shape)]
    assert tr.peak_bytes == peak
    assert tr.baseline_bytes == 3762430208


def test_cli_plan_per_path(capsys):
    """--plan (the one-model, per-path planner) and its options; the options of one mode are refused in the other."""
    assert main(["--plan", "smollm2-135m", "--tokens", "128", "--seq", "64", "--score", "2-5", "--device", "cpu",
                 "--budget-gib", "1", "--checkpointing", "--micro-batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("path on cpu") == 3 and "does NOT fit in 1 GiB" in out and "CUDA context" not in out
    for bad in (["--plan", "llama-7b", "--gpus", "1"], ["--plan", "llama-7b", "--track"], ["--device", "cpu"],
                ["--checkpointing"], ["--plan", "llama-7b", "--score", "3-40"], ["--score", "some"]):
        with pytest.raises(SystemExit):
            main(bad)
