"""Bad input to the three CLIs and the loaders: one clear error, before any long work, nothing left on disk,
the input untouched; and never a model with random or dropped weights."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moreau_pruner import load_pruned
from moreau_pruner.model.loading import load_model

from _tiny import word_tokenizer
from golden import WORDS, model_dir, tiny_model


def _edit_config(directory: Path, **changes) -> Path:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _edit_weights(directory: Path, edit) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _drop_layers(*layers):
    def edit(tensors):
        for k in [k for k in tensors if any(k.startswith(f"model.layers.{i}.") for i in layers)]:
            del tensors[k]
    return edit


# ----------------------------------------------------------------------------- a silently wrong model
def test_a_config_with_more_layers_than_the_weights_is_an_error_naming_them(tmp_path):
    d = _edit_config(_copy(model_dir(tmp_path, "llama"), tmp_path / "six"), num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"missing from the weights.*model\.layers\.\{4,5\}\.mlp\.down_proj\.weight"):
        load_model(d)
    with pytest.raises(ValueError, match=r"model\.layers\.\{4,5\}"):  # the stock path of load_pruned too
        load_pruned(d)


def test_mis_shaped_and_unexpected_tensors_are_errors_naming_them(tmp_path):
    wide = _edit_config(_copy(model_dir(tmp_path, "mistral"), tmp_path / "wide"), intermediate_size=44)
    with pytest.raises(ValueError, match=r"another shape.*model\.layers\.\{0,1,2,3\}\.mlp\.down_proj\.weight.*"
                                         r"\(48, 40\) in the weights, \(48, 44\) by the config"):
        load_model(wide)
    extra = _edit_weights(_copy(model_dir(tmp_path, "mistral"), tmp_path / "extra"),
                          lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"not in the model config\.json describes: model\.layers\.\{9\}\.mlp"):
        load_model(extra)


def test_a_pruned_directory_lacking_layers_is_an_error(tmp_path):
    from moreau_pruner import PruneConfig, prune_model, save_pruned

    model = tiny_model("qwen2")
    prune_model(model, None, method="magnitude", prune=PruneConfig(ratio=0.3), progress=False)
    d = save_pruned(model, tmp_path / "p", tokenizer=word_tokenizer(WORDS))
    load_pruned(d)  # whole, it loads
    _edit_weights(d, _drop_layers(1, 2))
    for load in (load_pruned, load_model):
        with pytest.raises(ValueError, match=r"missing from the weights.*model\.layers\.\{1,2\}\.self_attn"):
            load(d)
