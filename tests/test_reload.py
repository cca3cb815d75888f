"""Every directory this package writes reads back through ``load_pruned`` (and so moreau-recover, moreau-eval
and re-pruning with ``moreau-prune --model DIR``), and the stock export works on the transformers range we
support."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moreau_pruner import MoreauConfig, PruneConfig, load_pruned, prune_model, save_pruned, save_uniform
from moreau_pruner.cli.prune import main as prune_main
from moreau_pruner.io.stock import stock_config

from _engines import cache_dir
from _tiny import word_tokenizer
from golden import WORDS, model_dir, text_file, tiny_model

X = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
#: the transformers versions the package supports (pyproject.toml, scripts/setup.sh): the newest is the one
#: installed, the oldest is checked in a second interpreter (scripts/setup.sh installs it apart)
TRANSFORMERS_FLOOR = "5.17.0"


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def pruned(kind, uniform, **overrides):
    model = tiny_model(kind, **overrides)
    prune_model(model, X, "moreau", PruneConfig(ratio=0.3, scope="global" if not uniform else "local",
                                                 granularity="query-heads", uniform=uniform),
                moreau=MoreauConfig(iters=2), progress=False)
    return model


def test_load_pruned_reads_every_directory_we_write(tmp_path):
    tok = word_tokenizer(WORDS)
    per_layer = pruned("qwen2", uniform=False)
    widths = {len({b.self_attn.q_proj.out_features for b in per_layer.model.layers}),
              len({b.mlp.gate_proj.out_features for b in per_layer.model.layers})}
    assert widths != {1}, "global pruning should leave layers of different widths"
    uniform = pruned("llama", uniform=True)
    dense = tiny_model("mistral")
    save_pruned(per_layer, tmp_path / "per-layer", tokenizer=tok)
    save_uniform(uniform, tmp_path / "uniform", tokenizer=tok)
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    for name, source, cls in (("per-layer", per_layer, "PrunedForCausalLM"), ("uniform", uniform, "LlamaForCausalLM"),
                              ("dense", dense, "MistralForCausalLM")):
        model, tokenizer = load_pruned(tmp_path / name)
        assert type(model).__name__ == cls, name
        assert torch.equal(logits(model), logits(source)), name
        assert tokenizer is not None and tokenizer("the value")["input_ids"] == tok("the value")["input_ids"]


def test_load_pruned_reads_a_recovered_directory(tmp_path):
    pytest.importorskip("peft", reason="moreau-recover needs peft (the 'recover' extra)")
    from moreau_pruner.cli.recover import main as recover_main

    rc = recover_main(["--model", str(model_dir(tmp_path, "llama")), "--data", str(text_file(tmp_path)),
                       "--out", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "2", "--cutoff-len", "16",
                       "--eval-seq-lens", "16", "--eval-windows", "2", "--quiet"])
    assert rc == 0
    model, tok = load_pruned(tmp_path / "r")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "r", trust_remote_code=True).eval()
    assert torch.equal(logits(model), logits(remote)) and tok is not None


def _prune(root, model, out, *flags):
    text = text_file(root)
    rep = Path(str(out) + ".json")
    args = ["--model", str(model), "--calib-file", str(text), "--eval-file", str(text), "--num-examples", "4",
            "--seq-len", "16", "--eval-seq-lens", "16", "--eval-tokens", "96", "--iters", "2", "--avg-last", "1",
            "--quiet", "--generate", "the value", "--out", str(out), "--json", str(rep), *flags]
    assert prune_main(args) == 0
    return json.loads(rep.read_text())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_repruning_a_pruned_directory_counts_from_the_original(tmp_path, kind, capsys):
    first = _prune(tmp_path, model_dir(tmp_path, kind), tmp_path / "p1", "--ratio", "0.3")
    assert "params_original" not in first  # a dense model: nothing records an earlier size
    second = _prune(tmp_path, tmp_path / "p1", tmp_path / "p2", "--ratio", "0.3")
    assert second["params_before"] == first["params_after"] > second["params_after"]
    assert second["params_original"] == first["params_before"]
    assert second["kept_fraction_original"] == pytest.approx(second["params_after"] / first["params_before"])
    third = _prune(tmp_path, tmp_path / "p2", tmp_path / "p3", "--ratio", "0.2", "--uniform")
    assert third["params_original"] == first["params_before"]  # carried through a re-pruned directory
    assert json.loads((tmp_path / "p3" / "config.json").read_text())["model_type"] == kind  # stock
    assert "from the original" in capsys.readouterr().out
    model, _ = load_pruned(tmp_path / "p3")
    assert sum(p.numel() for p in model.parameters()) == third["params_after"]


def _llama_128(**extra):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                        **extra)).eval()


def test_uniform_llama_whose_heads_do_not_divide_hidden_is_written_as_mistral(tmp_path):
    """transformers >= 5.4 refuses such a LlamaConfig; the identical Mistral model (sliding window
    null) is written instead and reloads with the same logits, llama3 rope scaling included."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = _llama_128(rope_parameters=rope)
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    prune_model(model, x, "moreau", PruneConfig(ratio=0.25, granularity="query-heads", uniform=True),
                moreau=MoreauConfig(iters=2), progress=False)
    assert {b.self_attn.q_proj.out_features // 16 for b in model.model.layers} == {6}
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        LlamaConfig(hidden_size=128, num_attention_heads=6, head_dim=16)  # why: this transformers refuses it
    save_uniform(model, tmp_path / "u")
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["sliding_window"]) == ("mistral", ["MistralForCausalLM"], None)
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["head_dim"] == 16
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    assert torch.equal(logits(back, x), logits(model, x))


def test_uniform_llama_with_biases_whose_heads_do_not_divide_hidden_is_refused(tmp_path):
    model = _llama_128(attention_bias=True)
    prune_model(model, X, "moreau", PruneConfig(ratio=0.25, granularity="query-heads", uniform=True),
                moreau=MoreauConfig(iters=2), progress=False)
    with pytest.raises(ValueError, match="attention_bias cannot be expressed by the Mistral config"):
        stock_config(model)
    save_pruned(model, tmp_path / "p")  # the per-layer form takes it


def test_cli_uniform_query_heads_on_a_128_hidden_llama(tmp_path):
    """The reported case: 8 query heads in 2 KV groups, pruned to 6, --uniform."""
    d = tmp_path / "llama128"
    _llama_128().save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)
    rep = _prune(tmp_path, d, tmp_path / "u", "--uniform", "--granularity", "query-heads", "--ratio", "0.25")
    assert {layer["num_attention_heads"] for layer in rep["layers"]} == {6}
    assert json.loads((tmp_path / "u" / "config.json").read_text())["model_type"] == "mistral"


def _floor_dir() -> Path:
    d = cache_dir() / f"transformers-{TRANSFORMERS_FLOOR}"
    if not (d / "transformers" / "__init__.py").is_file():
        pytest.skip(f"needs transformers {TRANSFORMERS_FLOOR} installed apart in {d} (scripts/setup.sh does it)")
    return d


CHECK = textwrap.dedent("""
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM
    from moreau_pruner import save_uniform, load_pruned
    want, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
    assert transformers.__version__ == want, transformers.__version__
    model, _ = load_pruned(src)                       # our stock directory, read by this transformers
    save_uniform(model, out)                          # and written again by it
    x = torch.load(src + "/x.pt")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        print(json.dumps({"type": type(back).__name__,
                          "same": bool(torch.equal(back(x).logits, torch.load(src + "/logits.pt")))}))
""")


def test_stock_export_on_the_oldest_supported_transformers(tmp_path):
    """The export of a Llama whose heads do not divide hidden_size, read and rewritten by transformers
    5.17 (the floor of the supported range; the newest runs every other test)."""
    floor = _floor_dir()
    model = _llama_128()
    prune_model(model, X, "moreau", PruneConfig(ratio=0.25, granularity="query-heads", uniform=True),
                moreau=MoreauConfig(iters=2), progress=False)
    src = save_uniform(model, tmp_path / "u")
    torch.save(X, src / "x.pt")
    torch.save(logits(model), src / "logits.pt")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(floor), str(root / "python"), str(root)]))
    res = subprocess.run([sys.executable, "-c", CHECK, TRANSFORMERS_FLOOR, str(src), str(tmp_path / "again")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"type": "MistralForCausalLM", "same": True}


def test_supported_transformers_range_is_the_same_everywhere_and_installed():
    import tomllib

    import transformers
    from packaging.specifiers import SpecifierSet

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if d.startswith("transformers")).removeprefix("transformers"))
    setup = (root / "scripts" / "setup.sh").read_text()
    assert SpecifierSet(re.search(r'TRANSFORMERS_SPEC="transformers([^"]+)"', setup).group(1)) == spec
    assert f"TRANSFORMERS_FLOOR={TRANSFORMERS_FLOOR}" in setup
    assert TRANSFORMERS_FLOOR in spec and transformers.__version__ in spec
    assert not any(v in spec for v in ("5.3.0", "6.0.0"))
