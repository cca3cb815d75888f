"""MoreauPruningModifier in llm-compressor recipes, end to end on tiny random models (no hub):
the same kept units as prune_model on the same tokens, checkpoints that reload, a quantization or
Wanda modifier after ours, and clear errors for bad recipes."""
import copy
import json

import pytest
import torch

pytest.importorskip("llmcompressor", reason="needs llm-compressor (scripts/setup.sh installs it with --no-deps)")

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.core import active_session  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from moreau_pruner import MoreauConfig, PruneConfig, load_pruned, prune_model  # noqa: E402
from moreau_pruner.integrations.llmcompressor import MoreauPruningModifier, calibration_batch, target_layers  # noqa: E402

from _tiny import word_tokenizer  # noqa: E402
from golden import WORDS, model_dir  # noqa: E402

BATCH = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
#: the recipe's options and the same options for prune_model
OPTIONS = dict(ratio=0.5, attn_layers="0:4", granularity="kv-group", mode="reference", iters=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models saved once: oneshot reads the checkpoint's config.json (config._name_or_path)."""
    root = tmp_path_factory.mktemp("models")
    return lambda kind: model_dir(root, kind)


def tiny_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prune_config(**over) -> PruneConfig:
    return PruneConfig(ratio=0.5, attn_layers="0:4", mlp_layers="0:4", granularity="kv-group", **over)


def loader(batch=BATCH, batch_size=2):
    return DataLoader([{"input_ids": row} for row in batch], batch_size=batch_size)


def recipe_file(tmp_path, extra: str = "", **fields) -> str:
    lines = "".join(f"      {k}: {json.dumps(v)}\n" for k, v in fields.items())
    text = f"pruning_stage:\n  pruning_modifiers:\n    MoreauPruningModifier:\n{lines}{extra}"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def run_oneshot(model, recipe, out=None, **kw):
    kw.setdefault("dataset", loader())
    kw.setdefault("tie_word_embeddings", True)  # oneshot's default: keep a tied head tied
    return oneshot(model=model, processor=word_tokenizer(WORDS), recipe=recipe, output_dir=out, **kw)


def our_modifier():
    return next(m for m in active_session().lifecycle.recipe.modifiers if isinstance(m, MoreauPruningModifier))


KEPT = ("kept_kv_groups", "kept_query_heads", "kept_channels")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_recipe_keeps_prune_models_units_and_reloads(tmp_path, saved, kind):
    model = tiny_model(saved(kind))
    want = copy.deepcopy(model)
    ref = prune_model(want, BATCH, "moreau", prune_config(), moreau=MoreauConfig(mode="reference", iters=2),
                      progress=False)
    out = tmp_path / "out"
    pruned = run_oneshot(model, recipe_file(tmp_path, **OPTIONS), out)
    got = our_modifier().report
    assert [[row[k] for k in KEPT] for row in got["layers"]] == [[row[k] for k in KEPT] for row in ref.report.layers]
    assert got["params_after"] == ref.report.params_after < ref.report.params_before
    for (name, a), (_, b) in zip(pruned.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    info = json.loads((out / "pruning_info.json").read_text())
    assert info["layers"][0]["kept_channels"] == ref.report.layers[0]["kept_channels"]
    back, _ = load_pruned(out)
    with torch.no_grad():
        assert torch.equal(back(BATCH).logits, want(BATCH).logits)
    assert (out / "modeling_pruned.py").is_file()


def test_recipe_compensates_like_prune_model_and_reloads(tmp_path, saved):
    """compensate: true in a recipe: prune_model's units and compensated weights on the same calibration
    tokens (the layers' fit on llm-compressor's batch), a checkpoint that reloads with those logits; a bad
    compensation field fails when the recipe is parsed, and compensation without data is refused."""
    from moreau_pruner.prune.compensate import CompensateConfig

    model = tiny_model(saved("llama"))
    want = copy.deepcopy(model)
    ref = prune_model(want, BATCH, "moreau", prune_config(), moreau=MoreauConfig(mode="reference", iters=2),
                      progress=False, compensate=CompensateConfig(damping=0.2))
    out = tmp_path / "out"
    run_oneshot(model, recipe_file(tmp_path, **OPTIONS, compensate=True, compensate_damping=0.2), out)
    got = our_modifier().report
    assert [[row[k] for k in KEPT] for row in got["layers"]] == [[row[k] for k in KEPT] for row in ref.report.layers]
    assert got["compensation"]["damping"] == 0.2 and got["compensation"]["tokens"] == BATCH.numel()
    back, _ = load_pruned(out)
    plain = tiny_model(saved("llama"))
    prune_model(plain, BATCH, "moreau", prune_config(), moreau=MoreauConfig(mode="reference", iters=2), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(back(BATCH).logits, want(BATCH).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(back(BATCH).logits, plain(BATCH).logits)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        MoreauPruningModifier(compensate=True, compensate_damping=-1)
    with pytest.raises(ValueError, match="with compensate needs calibration data"):
        run_oneshot(tiny_model(saved("llama")), recipe_file(tmp_path, **{**OPTIONS, "method": "magnitude"},
                                                             compensate=True), dataset=None)


#: weight-only int8 per output channel after ours, the head left in full precision
INT8 = ("  quantization_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n"
        "        group_0:\n          targets: [Linear]\n"
        "          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}\n")


@pytest.mark.parametrize("untied", ["config", "oneshot"])
def test_untied_llama_keeps_prune_models_units_and_reloads(tmp_path, untied):
    """A Llama whose head is its own matrix (tie_word_embeddings=False in its config), or a tied one that
    oneshot unties (tie_word_embeddings=False): the units prune_model keeps, and a checkpoint that reloads
    with the same logits (our per-layer config follows llm-compressor's re-tying at save)."""
    from golden import tiny_model as random_model

    d = tmp_path / "llama-untied"
    random_model("llama", tie_word_embeddings=untied != "config").save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)
    model = tiny_model(d)
    want = copy.deepcopy(model)
    if untied == "oneshot":
        want.config.tie_word_embeddings = False
        want.lm_head.weight = torch.nn.Parameter(want.model.embed_tokens.weight.detach().clone())
    ref = prune_model(want, BATCH, "moreau", prune_config(), moreau=MoreauConfig(mode="reference", iters=2),
                      progress=False)
    out = tmp_path / "out"
    pruned = run_oneshot(model, recipe_file(tmp_path, **OPTIONS), out, tie_word_embeddings=False)
    got = our_modifier().report
    assert [[row[k] for k in KEPT] for row in got["layers"]] == [[row[k] for k in KEPT] for row in ref.report.layers]
    # llm-compressor's save re-ties a head that still equals the embedding (the one oneshot untied): one table
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (untied == "oneshot")
    back, _ = load_pruned(out)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == (untied == "oneshot")
    with torch.no_grad():
        assert torch.equal(back(BATCH).logits, want(BATCH).logits)


def test_uniform_recipe_then_quantization_writes_a_stock_quantized_checkpoint(tmp_path, saved):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    model = run_oneshot(tiny_model(saved("mistral")), recipe_file(tmp_path, INT8, uniform=True, **OPTIONS), out)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "mistral" and "quantization_config" in cfg.to_dict()
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (3, 1, 20)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = back(BATCH).logits, model(BATCH).logits
    assert a.shape == b.shape and torch.isfinite(a).all()
    # weight-only int8 of the pruned weights, nothing else: close to the in-memory model
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_per_layer_recipe_then_quantization_reloads_with_load_pruned(tmp_path, saved):
    """Not uniform: our per-layer config with llm-compressor's quantization_config, the packed int8 weights
    of compressed-tensors; load_pruned decompresses them and gives the in-memory model's logits exactly."""
    from safetensors import safe_open

    out = tmp_path / "out"
    model = run_oneshot(tiny_model(saved("mistral")), recipe_file(tmp_path, INT8, **OPTIONS), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "pruned_mistral" and cfg["layer_num_key_value_heads"] == [1, 1, 1, 1]
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(out / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.gate_proj.weight_packed")
        assert packed.dtype == torch.int32 and "model.layers.0.mlp.gate_proj.weight" not in f.keys()
    back, _ = load_pruned(out)
    with torch.no_grad():
        assert torch.equal(back(BATCH).logits, model(BATCH).logits)
    # read after a forward: right after loading, compressed-tensors had not yet put the .weight attribute back
    assert back.model.layers[0].mlp.gate_proj.weight.shape == (20, 48)


def test_wanda_after_ours_sparsifies_the_pruned_model(tmp_path, saved):
    extra = "  wanda_modifiers:\n    WandaPruningModifier:\n      sparsity: 0.5\n      targets: ['re:.*mlp.*proj']\n"
    model = run_oneshot(tiny_model(saved("qwen2")), recipe_file(tmp_path, extra, **OPTIONS))
    down = model.model.layers[1].mlp.down_proj.weight
    assert down.shape == (48, 20)  # pruned by ours, then sparsified by Wanda
    assert (down == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_bad_recipes_fail_clearly_before_any_work(tmp_path, saved):
    with pytest.raises(ValueError, match="ratio must be in"):
        MoreauPruningModifier(ratio=1.5)
    with pytest.raises(ValueError, match="(?i)extra inputs are not permitted"):
        MoreauPruningModifier(ratio=0.2, sparsity=0.5)
    with pytest.raises(ValueError, match="not both"):
        MoreauPruningModifier(targets="LlamaDecoderLayer", attn_layers="0:2")
    with pytest.raises(ValueError, match="ignore is empty"):
        MoreauPruningModifier(ignore=[])
    with pytest.raises(ValueError, match="granularity must be one of"):
        MoreauPruningModifier(granularity="neurons")
    with pytest.raises(ValueError, match="method must be one of"):
        MoreauPruningModifier(method="obs")
    with pytest.raises(ValueError, match="ratio must be in"):
        run_oneshot(tiny_model(saved("llama")), recipe_file(tmp_path, ratio=1.5))


def test_unprunable_model_and_missing_data_fail_clearly(tmp_path, saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    before = copy.deepcopy(gpt2.state_dict())
    with pytest.raises(ValueError, match="(?i)gpt2"):
        run_oneshot(gpt2, recipe_file(tmp_path, **OPTIONS))
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())
    with pytest.raises(ValueError, match="needs calibration data"):
        run_oneshot(tiny_model(saved("llama")), recipe_file(tmp_path, **OPTIONS), dataset=None)


def test_calibration_batch_drops_padding_and_refuses_ragged_rows():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    full = calibration_batch([{"input_ids": ids[1:], "attention_mask": torch.ones(1, 4)}, (ids[1:],)])
    assert full.tolist() == [[8, 9, 10, 11], [8, 9, 10, 11]]
    padded = calibration_batch([{"input_ids": ids[:1], "attention_mask": torch.tensor([[1, 1, 1, 0]])}])
    assert padded.tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError, match="different lengths"):
        calibration_batch([{"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}])
    with pytest.raises(ValueError, match="no batches"):
        calibration_batch([])


ALL = (range(4), range(4))


@pytest.mark.parametrize("targets,ignore,default,want", [
    (["LlamaDecoderLayer"], None, None, ((0, 4), (0, 4))),
    ("re:.*layers\\.[12]$", None, None, ((1, 3), (1, 3))),
    (["re:.*self_attn$", "re:.*mlp$"], ["re:.*layers\\.3\\.mlp\\.down_proj"], None, ((0, 4), (0, 3))),
    (["re:model\\.layers"], ["lm_head", "re:model\\.layers\\.0\\.", "model.layers.3.input_layernorm"], None,
     ((1, 4), (1, 4))),
    (None, ["lm_head", "re:.*layers\\.3\\.self_attn"], ALL, ((0, 3), (0, 4))),
    (None, ["re:.*layers\\.0\\."], (range(0, 2), range(0, 3)), ((1, 2), (1, 3))),
])
def test_targets_and_ignore_select_layer_ranges(targets, ignore, default, want):
    from golden import tiny_model as random_model

    targets = [targets] if isinstance(targets, str) else targets
    assert target_layers(random_model("llama"), targets, ignore, default) == want


@pytest.mark.parametrize("targets,ignore,error", [
    (["Linear"], None, "matches 'model.layers.0.self_attn.q_proj', which is not a decoder layer"),
    (["re:.*q_proj"], None, "not a decoder layer, attention or MLP module"),
    (["LlamaForCausalLM"], None, "matches 'the whole model'"),
    (["MistralDecoderLayer"], None, "matches no module"),
    (["re:.*self_attn$"], None, "select mlp in layers none"),
    (["LlamaDecoderLayer"], ["re:.*layers\\.1\\."], r"select attention in layers \[0, 2, 3\]"),
    (["LlamaDecoderLayer"], ["LlamaForCausalLM"], "layers none"),
])
def test_targets_that_name_no_layer_range_are_refused(targets, ignore, error):
    from golden import tiny_model as random_model

    with pytest.raises(ValueError, match=error):
        target_layers(random_model("llama"), targets, ignore, ALL)


def test_recipe_targets_and_ignore_prune_the_layers_they_name(tmp_path, saved):
    """targets: decoder layers, ignore: layer 0 and the head (llm-compressor's usual ignore): the same units
    as prune_model on layers 1:4, and layer 0 untouched."""
    model = tiny_model(saved("llama"))
    want = copy.deepcopy(model)
    ref = prune_model(want, BATCH, "moreau", PruneConfig(ratio=0.5, attn_layers="1:4", mlp_layers="1:4",
                                                         granularity="kv-group"),
                      moreau=MoreauConfig(mode="reference", iters=2), progress=False)
    options = {k: v for k, v in OPTIONS.items() if k != "attn_layers"}
    pruned = run_oneshot(model, recipe_file(tmp_path, targets=["LlamaDecoderLayer"],
                                            ignore=["lm_head", "re:model\\.layers\\.0\\."], **options))
    got = our_modifier().report
    assert [[row[k] for k in KEPT] for row in got["layers"]] == [[row[k] for k in KEPT] for row in ref.report.layers]
    for (name, a), (_, b) in zip(pruned.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
    with pytest.raises(ValueError, match="not a decoder layer"):
        run_oneshot(tiny_model(saved("llama")), recipe_file(tmp_path, targets=["Linear"], **options))
