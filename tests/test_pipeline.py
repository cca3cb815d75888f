"""End to end on tiny random models: prune with our pruner, save, reload by both routes; the CLI."""
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from moreau_pruner import MoreauConfig, PruneConfig, prune_model
from moreau_pruner.cli.prune import main
from moreau_pruner.io.pruned import load_pruned, save_pruned

from _tiny import word_tokenizer

WORDS = ("the a of is to and in it that for on with as be by this are an or at from statement expression value "
         "object function name class return if else python module type list string number").split()


def tok():
    return word_tokenizer(WORDS)


def tiny(kind, tied=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=tied)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    return cls[1](cls[0](**kw)).eval()


X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,tied,granularity", [("llama", True, "kv-group"), ("mistral", False, "query-heads"),
                                                   ("qwen2", True, "query-heads"), ("qwen2", False, "kv-group")])
def test_prune_save_reload_identical_logits(tmp_path, kind, tied, granularity):
    m = tiny(kind, tied)
    res = prune_model(m, X, "moreau", PruneConfig(ratio=0.5, attn_layers="0:3", mlp_layers="1:3",
                                                  granularity=granularity), moreau=MoreauConfig(iters=2), progress=False)
    assert res.report.params_after < res.report.params_before
    with torch.no_grad():
        want = m(X).logits
    out = save_pruned(m, tmp_path / "pruned", extra=res.report.as_dict())
    a, _ = load_pruned(out)
    b = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(a(X).logits, want)
        assert torch.equal(b(X).logits, want)
    assert json.loads((out / "pruning_info.json").read_text())["params_after"] == res.report.params_after


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", tied=True).save_pretrained(d)
    tok().save_pretrained(d)
    return d


def cli(model_dir, tmp_path, *extra):
    return main(["--model", str(model_dir), "--iters", "2", "--num-examples", "2", "--seq-len", "16",
                 "--eval-seq-lens", "16,32", "--eval-tokens", "128", "--attn-layers", "0:3", "--quiet",
                 "--generate", "the value", *extra])


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(model_dir, tmp_path, "--ratio", "0.5", "--granularity", "query-heads", "--out", str(out), "--json",
             str(tmp_path / "r.json"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "parameters" in text and "PPL @16 tokens" in text and "Moreau l2 per step" in text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["params_after"] < rep["params_before"] and set(rep["ppl_pruned"]) == {"16", "32"}
    assert len(rep["moreau"]["log"]) == 2
    assert json.loads((out / "pruning_info.json").read_text())["params_after"] == rep["params_after"]
    a, tok = load_pruned(out)
    b = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(a(X).logits, b(X).logits)
    assert sum(p.numel() for p in a.parameters()) == rep["params_after"]
    assert tok is not None


def test_cli_taylor_global_no_eval(model_dir, tmp_path, capsys):
    rc = cli(model_dir, tmp_path, "--method", "taylor", "--scope", "global", "--no-eval", "--ratio", "0.3")
    assert rc == 0, capsys.readouterr().err


def test_cli_rounds(model_dir, tmp_path, capsys):
    common = ("--method", "taylor", "--no-eval", "--ratio", "0.5", "--granularity", "query-heads")
    assert cli(model_dir, tmp_path, *common, "--json", str(tmp_path / "one.json")) == 0
    rc = cli(model_dir, tmp_path, *common, "--rounds", "3", "--json", str(tmp_path / "three.json"))
    text = capsys.readouterr().out
    assert rc == 0 and "3 rounds" in text
    one, three = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "three.json"))
    assert (one["rounds"], three["rounds"]) == (1, 3)
    assert three["params_after"] == one["params_after"] < one["params_before"]


def test_cli_second_order_taylor_with_alpha_allocation(model_dir, tmp_path, capsys):
    rc = cli(model_dir, tmp_path, "--method", "taylor", "--taylor-variant", "param_mix", "--allocation", "alpha",
             "--no-eval", "--ratio", "0.4", "--json", str(tmp_path / "r.json"))
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    ratios = rep["allocation"]["ratios"]
    assert len(set(ratios.values())) > 1 and [l["ratio"] for l in rep["layers"]] == [ratios[k] for k in ratios]


@pytest.mark.parametrize("flag,sequential", [([], True), (["--one-pass-activations"], False)])
def test_cli_unstructured_nm(model_dir, tmp_path, capsys, flag, sequential):
    rc = cli(model_dir, tmp_path, "--unstructured", "--nm", "2:4", "--method", "wanda", "--json",
             str(tmp_path / "r.json"), *flag)
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["unstructured"]["sequential"] is sequential
    assert rep["params_after"] == rep["params_before"]
    assert rep["unstructured"]["overall"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("flags,half", [(["--dtype", "float16"], "fp32-accumulate"),
                                        (["--dtype", "float16", "--half-gemm", "native"], "native"),
                                        (["--dtype", "bfloat16"], "native"), ([], None)])
def test_cli_half_precision_products(model_dir, tmp_path, capsys, flags, half, monkeypatch):
    """fp16 on a CPU runs its matrix products with fp32 accumulation unless told otherwise."""
    from moreau_pruner.model import precision

    seen = []
    real = precision._Fp32AccumulateGemms.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(precision._Fp32AccumulateGemms, "__torch_function__", spy)
    rc = cli(model_dir, tmp_path, "--json", str(tmp_path / "r.json"), *flags)
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["half_gemm"] == half
    assert bool(seen) == (half == "fp32-accumulate")
    assert all(v > 0 for v in rep["ppl_pruned"].values())


@pytest.mark.parametrize("flag,path", [([], "lean"), (["--estimator-path", "reference"], "reference"),
                                       (["--estimator-path", "regen"], "regen")])
def test_cli_estimator_path(model_dir, tmp_path, capsys, flag, path):
    """The lean path runs by default when it applies; the plain loop or the regen path on request."""
    rc = cli(model_dir, tmp_path, "--no-eval", "--json", str(tmp_path / "r.json"), *flag)
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["estimator_path"] == path


@pytest.mark.parametrize("args,msg", [(["--ratio", "1.5"], "ratio"), (["--attn-layers", "0:99"], "outside"),
                                      (["--lr", "-1"], "lr"), (["--eval-seq-lens", "x"], "eval-seq-lens"),
                                      (["--backend", "cuda"], "cuda"), (["--method", "wanda"], "--unstructured"),
                                      (["--unstructured", "--nm", "4:2"], "N < M"), (["--rounds", "0"], "--rounds"),
                                      (["--unstructured", "--rounds", "2"], "--rounds")])
def test_cli_bad_input_clear_error_no_output(model_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    rc = cli(model_dir, tmp_path, "--out", str(out), *args)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_cli_missing_model_and_existing_out(tmp_path, model_dir, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert cli(model_dir, tmp_path, "--out", str(out)) == 2
    assert "exists" in capsys.readouterr().err and (out / "x").read_text() == "keep me"


def test_cli_unsupported_architecture(tmp_path, capsys):
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(d)
    tok().save_pretrained(d)
    rc = main(["--model", str(d), "--quiet", "--no-eval", "--num-examples", "2", "--seq-len", "8", "--iters", "1"])
    assert rc == 2 and "unsupported architecture" in capsys.readouterr().err


def test_cli_help_teaches():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_cli_published_preset_end_to_end(model_dir, tmp_path, capsys):
    """--published runs the reference update on KV groups; the default runs the measured preset."""
    common = ("--no-eval", "--ratio", "0.5")
    assert cli(model_dir, tmp_path, *common, "--published", "--json", str(tmp_path / "pub.json")) == 0
    assert cli(model_dir, tmp_path, *common, "--json", str(tmp_path / "def.json")) == 0
    pub, new = (json.loads((tmp_path / f).read_text()) for f in ("pub.json", "def.json"))
    assert (pub["settings"]["mode"], pub["granularity"], pub["settings"]["published"]) == ("reference", "kv-group", True)
    from moreau_pruner.cli.prune import DEFAULTS

    assert new["settings"]["published"] is False
    assert {k: new["settings"][k] for k in ("method", "mode", "granularity", "scope", "rounds")} == \
        {k: DEFAULTS[k] for k in ("method", "mode", "granularity", "scope", "rounds")}
    assert new["granularity"] == DEFAULTS["granularity"]
