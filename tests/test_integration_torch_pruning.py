"""MoreauImportance / TaylorImportance in Torch-Pruning's MetaPruner on tiny random models (no hub):
the MLP channels prune_model keeps, and a clear refusal of attention heads."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning", reason="needs Torch-Pruning (scripts/setup.sh installs it)")

from moreau_pruner import MoreauConfig, PruneConfig, prune_model  # noqa: E402
from moreau_pruner.integrations.torch_pruning import (MoreauImportance, TaylorImportance,  # noqa: E402
                                                      attention_modules)

from golden import tiny_model  # noqa: E402

BATCH = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
CONFIG = MoreauConfig(mode="reference", iters=2)


def meta_prune(model, importance, ratio=0.25):
    """MLP channels only: attention, embeddings, the head and down_proj (hidden size) are not roots."""
    ignored = [model.lm_head, model.model.embed_tokens, *attention_modules(model),
               *(layer.mlp.down_proj for layer in model.model.layers)]
    pruner = tp.pruner.MetaPruner(model, example_inputs=BATCH, importance=importance, pruning_ratio=ratio,
                                  ignored_layers=ignored, root_module_types=[nn.Linear],
                                  output_transform=lambda out: out.logits)
    pruner.step()
    return model


def every_mlp(ratio=0.25) -> PruneConfig:
    """Every layer's MLP (and the last layer's attention, which the comparison ignores: the scores come
    from the dense model either way)."""
    return PruneConfig(ratio=ratio, attn_layers="3:4", mlp_layers="0:4")


@pytest.mark.parametrize("kind,method", [("llama", "moreau"), ("qwen2", "moreau"), ("mistral", "taylor")])
def test_metapruner_keeps_the_mlp_channels_prune_model_keeps(kind, method):
    model = tiny_model(kind)
    want = copy.deepcopy(model)
    prune_model(want, BATCH, method, every_mlp(), moreau=CONFIG, progress=False)
    imp = MoreauImportance(model, BATCH, CONFIG) if method == "moreau" else TaylorImportance(model, BATCH)
    meta_prune(model, imp)
    for a, b in zip(model.model.layers, want.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(a.mlp, name).weight, getattr(b.mlp, name).weight), name
    if method == "moreau":
        assert imp.result is not None and imp.result.grads


def test_moreau_and_taylor_choose_differently():
    """The two importances are not the same score under another name."""
    a, b = tiny_model("llama"), tiny_model("llama")
    meta_prune(a, MoreauImportance(a, BATCH, MoreauConfig(mode="paper", iters=4, std=0.5)), ratio=0.5)
    meta_prune(b, TaylorImportance(b, BATCH), ratio=0.5)
    assert any(not torch.equal(x.mlp.gate_proj.weight, y.mlp.gate_proj.weight)
               for x, y in zip(a.model.layers, b.model.layers))


def test_attention_heads_are_refused_with_the_reason():
    model = tiny_model("mistral")
    imp = MoreauImportance(model, BATCH, CONFIG)
    attn = model.model.layers[0].self_attn
    heads = [(SimpleNamespace(target=SimpleNamespace(module=attn.k_proj), handler=tp.prune_linear_out_channels),
              list(range(16)))]
    with pytest.raises(ValueError, match="grouped-query heads .* ignores the q/o weights"):
        imp(heads)
    o_cols = [(SimpleNamespace(target=SimpleNamespace(module=attn.o_proj), handler=tp.prune_linear_in_channels),
               list(range(48)))]
    with pytest.raises(ValueError, match="prune attention with moreau_pruner.prune_model"):
        imp(o_cols)
    assert imp.result is None  # refused before any estimate


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="(?i)gpt2"):
        MoreauImportance(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)), BATCH)
