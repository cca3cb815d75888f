"""Memory plans for the sizes people prune: FSDP2 per-rank arithmetic, meta-device tracked steps, CLI."""
import json

import pytest
import torch

from moreau_pruner.estimate.lean import GiB, plan_memory
from moreau_pruner.estimate.plans import (Option, PLAN_SHAPES, candidate_options, main, meta_model, plan_rank,
                                 plan_scenario, published_layers, tracked_step)

SHORT_7B = dict(PLAN_SHAPES["llama-7b"], num_hidden_layers=8)


def test_fsdp_rank_plan_shards_state_and_splits_rows():
    m = meta_model(dict(PLAN_SHAPES["llama-3-70b"], num_hidden_layers=4))
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
    assert published_layers(32) == (4, 30) and published_layers(80) == (10, 75)


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
