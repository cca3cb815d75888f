"""Bad input to the three CLIs and the loaders: one clear error, before any long work, nothing left on disk,
the input untouched; and never a model with random or dropped weights."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moreau_pruner import load_pruned
from moreau_pruner.model.loading import load_model

from _tiny import word_tokenizer
from golden import WORDS, model_dir, text_file as golden_text, tiny_model


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


# ----------------------------------------------------------------------------- the three CLIs, bad input
ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "zeroshot"
BASE = {
    "moreau-prune": ["--model", "{model}", "--calib-file", "{text}", "--eval-file", "{text}", "--num-examples", "4",
                     "--seq-len", "16", "--eval-seq-lens", "16", "--eval-tokens", "96", "--iters", "2",
                     "--avg-last", "1", "--quiet", "--generate", "", "--out", "{tmp}/out"],
    "moreau-recover": ["--model", "{model}", "--data", "{text}", "--out", "{tmp}/out", "--max-steps", "2",
                       "--batch-size", "2", "--cutoff-len", "16", "--eval-seq-lens", "16", "--eval-windows", "2",
                       "--quiet"],
    "moreau-eval": ["--model", "{model}", "--tasks", "moreau_tiny_facts", "--include-path", str(TASK_DIR),
                    "--quiet", "--no-update-info"],
}


def _main(prog):
    from moreau_pruner.cli import eval as eval_cli, prune, recover

    return {"moreau-prune": prune.main, "moreau-recover": recover.main, "moreau-eval": eval_cli.main}[prog]


def _argv(prog, extra, **values):
    """BASE[prog] with ``extra`` appended; an option given in ``extra`` replaces its BASE value, and
    ``extra`` entries ("--opt", "<drop>") drop an option of BASE."""
    base, extra = list(BASE[prog]), list(extra)
    i = 0
    while i < len(extra):
        if extra[i] in base and extra[i].startswith("--") and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            j = base.index(extra[i])
            if extra[i + 1] == "<drop>":
                del base[j:j + 2]
            else:
                base[j + 1] = extra[i + 1]
            del extra[i:i + 2]
        else:
            i += 1
    return [a.format(**values) for a in base + extra]


def _tree(root: Path) -> dict:
    """Every path under ``root`` with its content's hash (``dir`` for directories)."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _expect_one_line_error(prog, argv, pattern, root, capsys):
    """``prog argv`` exits 2 with one ``PROG: error:`` line matching ``pattern``, no traceback, and leaves
    everything under ``root`` (the input model included) as it was."""
    capsys.readouterr()
    before = _tree(root)
    rc = _main(prog)(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert _tree(root) == before
    return lines[0]


def _symlink_to_model(tmp, model):
    (tmp / "link").symlink_to(model, target_is_directory=True)


def _a_file(tmp, model):
    (tmp / "afile").write_text("not a directory\n")


OUT_CASES = [
    # id, program, options, the error's pattern, set-up
    ("prune-out-is-model", "moreau-prune", ["--out", "{model}", "--overwrite"], r"is the input model.*destroy", None),
    ("prune-out-symlink-to-model", "moreau-prune", ["--out", "{tmp}/link", "--overwrite"], r"is the input model",
     _symlink_to_model),
    ("prune-out-dotdot-model", "moreau-prune", ["--out", "{model}/../model-llama", "--overwrite"],
     r"is the input model", None),
    ("prune-out-holds-model", "moreau-prune", ["--out", "{tmp}", "--overwrite"], r"holds the input model", None),
    ("prune-out-inside-model", "moreau-prune", ["--out", "{model}/pruned"], r"is inside the input model", None),
    ("recover-out-inside-model", "moreau-recover", ["--out", "{tmp}/link/sub/../rec"], r"is inside the input model",
     _symlink_to_model),
    ("recover-out-is-model", "moreau-recover", ["--out", "{model}", "--overwrite"], r"is the input model", None),
    ("recover-out-symlink-to-model", "moreau-recover", ["--out", "{tmp}/link/.", "--overwrite"],
     r"is the input model", _symlink_to_model),
    ("prune-out-empty", "moreau-prune", ["--out", ""], r"--out is empty", None),
    ("recover-out-empty", "moreau-recover", ["--out", ""], r"--out is empty", None),
    ("prune-overwrite-without-out", "moreau-prune", ["--out", "<drop>", "--overwrite"], r"no --out was given", None),
    ("prune-out-is-a-file", "moreau-prune", ["--out", "{tmp}/afile"], r"is an existing file", _a_file),
    ("recover-out-is-a-file", "moreau-recover", ["--out", "{tmp}/afile"], r"is an existing file", _a_file),
    ("prune-out-under-a-file", "moreau-prune", ["--out", "{tmp}/afile/sub"], r"afile is a file, not a directory",
     _a_file),
    ("prune-out-unwritable", "moreau-prune", ["--out", "/proc/moreau-out"], r"cannot write in /proc", None),
    ("recover-out-unwritable", "moreau-recover", ["--out", "/proc/moreau-out"], r"cannot write in /proc", None),
    ("prune-json-missing-dir", "moreau-prune", ["--json", "{tmp}/nodir/r.json"], r"nodir does not exist", None),
    ("recover-json-missing-dir", "moreau-recover", ["--json", "{tmp}/nodir/r.json"], r"nodir does not exist", None),
    ("eval-json-missing-dir", "moreau-eval", ["--json", "{tmp}/nodir/r.json"], r"nodir does not exist", None),
    ("prune-json-empty", "moreau-prune", ["--json", ""], r"--json is empty", None),
    ("eval-json-is-a-dir", "moreau-eval", ["--json", "{tmp}"], r"is a directory", None),
    ("eval-json-unwritable", "moreau-eval", ["--json", "/proc/r.json"], r"cannot write in /proc", None),
]


@pytest.mark.parametrize("prog,extra,pattern,setup", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_a_bad_out_or_json_is_one_line_before_any_work(tmp_path, capsys, prog, extra, pattern, setup):
    if prog == "moreau-recover":
        pytest.importorskip("peft")
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    if setup is not None:
        setup(tmp_path, model)
    _expect_one_line_error(prog, _argv(prog, extra, model=model, text=text, tmp=tmp_path), pattern, tmp_path, capsys)


def test_too_little_free_space_is_an_error_before_the_work(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from moreau_pruner.io import target

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(target.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 4096, 4096))
    monkeypatch.setattr("moreau_pruner.pipeline.resolve_target",  # the long work must not start
                        lambda *a: pytest.fail("pruning started with too little space"))
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    line = _expect_one_line_error("moreau-prune", _argv("moreau-prune", [], model=model, text=text, tmp=tmp_path),
                                  r"the output needs about 0\.\d MB but .* has 0\.0 MB free", tmp_path, capsys)
    assert "/out" in line


def test_a_save_that_fails_keeps_the_report_and_says_why(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    argv = _argv("moreau-prune", ["--json", "{tmp}/r.json"], model=model, text=text, tmp=tmp_path)
    rc = _main("moreau-prune")(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"saving --out .*/out failed: .*No space left on device \(the model needs about 0\.\d MB\); "
                     r"nothing was written there, the report was written to .*r\.json", err), err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ----------------------------------------------------------------------------- bad or hostile model directories
def _bad_copy(tmp, model):
    return _copy(model, tmp / "bad")


def _six_layers(tmp, model):
    _edit_config(_bad_copy(tmp, model), num_hidden_layers=6)


def _widths_disagree(tmp, model):
    _edit_config(_bad_copy(tmp, model), intermediate_size=44)


def _pruned_lacking_layers(tmp, model):
    from moreau_pruner import PruneConfig, prune_model, save_pruned

    pruned = tiny_model("llama")
    prune_model(pruned, None, method="magnitude", prune=PruneConfig(ratio=0.3), progress=False)
    _edit_weights(save_pruned(pruned, tmp / "bad", tokenizer=word_tokenizer(WORDS)), _drop_layers(1, 2))


def _planted_code(model_type):
    def setup(tmp, model):
        d = _bad_copy(tmp, model)
        (d / "modeling_evil.py").write_text(f"open({str(tmp / 'ran')!r}, 'w').write('planted code ran')\n")
        _edit_config(d, model_type=model_type, architectures=["EvilForCausalLM"],
                     auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                               "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    return setup


def _index_to(shard):
    def setup(tmp, model):
        d = _bad_copy(tmp, model)
        outside = tmp / "outside.safetensors"
        (d / "model.safetensors").rename(outside)
        names = list(load_file(outside))
        target = str(outside) if shard == "absolute" else shard
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in names}}))
    return setup


def _weights_bytes(cut):
    def setup(tmp, model):
        w = _bad_copy(tmp, model) / "model.safetensors"
        data = w.read_bytes()
        w.write_bytes(b"not a safetensors file at all" * 4 if cut == "garbage" else data[:len(data) - cut])
    return setup


def _incomplete_save(tmp, model):
    from moreau_pruner import save_pruned

    d = save_pruned(tiny_model("llama"), tmp / "bad", tokenizer=word_tokenizer(WORDS), extra={"run": 1})
    (d / "tokenizer.json").unlink()  # (a file of the save lost, e.g. by a partial copy)


def _no_weights(tmp, model):
    (_bad_copy(tmp, model) / "model.safetensors").unlink()


def _corrupt_config(tmp, model):
    (_bad_copy(tmp, model) / "config.json").write_text('{"model_type": "llama", "hidden_size": 48,')


def _small_vocab(tmp, model):
    d = tmp / "bad"
    tiny_model("llama", vocab_size=20).save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)  # more than 20 tokens


MODEL_CASES = [
    # id, programs, extra options, the error's pattern, set-up of {tmp}/bad
    ("more-layers-than-weights", ("prune", "recover", "eval"), [],
     r"missing from the weights \(they would be random\): model\.layers\.\{4,5\}\.", _six_layers),
    ("config-widths-disagree", ("prune", "recover", "eval"), [],
     r"another shape than config\.json gives: model\.layers\.\{0,1,2,3\}\.mlp\.down_proj", _widths_disagree),
    ("pruned-directory-lacking-layers", ("prune", "recover", "eval"), [],
     r"missing from the weights.*model\.layers\.\{1,2\}\.", _pruned_lacking_layers),
    ("custom-code-unknown-type", ("prune", "recover", "eval"), [], r"own model code.*never runs code",
     _planted_code("evil")),
    ("custom-code-stock-type", ("prune",), [], r"own model code.*trust_remote_code=False", _planted_code("llama")),
    ("index-shard-through-dotdot", ("prune", "recover", "eval"), [], r"shard '\.\./outside\.safetensors', outside",
     _index_to("../outside.safetensors")),
    ("index-shard-absolute", ("prune",), [], r"outside.safetensors', outside .*refused", _index_to("absolute")),
    ("truncated-safetensors", ("prune", "recover", "eval"), [], r"model\.safetensors is not a readable safetensors "
     r"file \(truncated or corrupt\?\): .*incomplete metadata", _weights_bytes(100)),
    ("garbage-safetensors", ("prune",), [], r"not a readable safetensors file", _weights_bytes("garbage")),
    ("no-weights", ("prune", "recover", "eval"), [], r"bad holds no weights", _no_weights),
    ("incomplete-save", ("prune", "recover", "eval"), [], r"bad is incomplete: 1 of the files its save wrote are "
     r"not there \(tokenizer\.json\)", _incomplete_save),
    ("corrupt-config", ("prune", "recover", "eval"), [], r"bad/config\.json is not valid JSON", _corrupt_config),
    ("token-ids-beyond-vocab", ("prune",), ["--no-eval"], r"calibration text has token ids up to \d+, but the model "
     r"embeds only 20 tokens", _small_vocab),
    ("tokenizer-beyond-vocab", ("eval",), [], r"the tokenizer has \d+ tokens but the model embeds only 20",
     _small_vocab),
]
MODEL_RUNS = [(f"{c[0]}-{p}", f"moreau-{p}", *c[2:]) for c in MODEL_CASES for p in c[1]]


@pytest.mark.parametrize("prog,extra,pattern,setup", [c[1:] for c in MODEL_RUNS], ids=[c[0] for c in MODEL_RUNS])
def test_a_bad_model_directory_is_one_line(tmp_path, capsys, prog, extra, pattern, setup):
    if prog == "moreau-recover":
        pytest.importorskip("peft")
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    setup(tmp_path, model)
    argv = _argv(prog, ["--model", "{tmp}/bad", *extra], model=model, text=text, tmp=tmp_path)
    _expect_one_line_error(prog, argv, pattern, tmp_path, capsys)
    assert not (tmp_path / "ran").exists()  # no planted code ran


def test_the_sharded_loader_refuses_custom_code_and_shards_outside(tmp_path):
    from moreau_pruner.distributed.loading import SafetensorsRows, load_sharded

    model = model_dir(tmp_path, "llama")
    _planted_code("evil")(tmp_path, model)
    with pytest.raises(ValueError, match="never runs code"):
        load_sharded(tmp_path / "bad", "float32", None)  # refused before any rank work
    shutil.rmtree(tmp_path / "bad")
    _index_to("../outside.safetensors")(tmp_path, model)
    with pytest.raises(ValueError, match="outside"):
        SafetensorsRows(tmp_path / "bad")
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- recovery's own failures
def test_a_recovery_save_that_fails_keeps_the_report_and_says_why(tmp_path, capsys, monkeypatch):
    import errno

    pytest.importorskip("peft")
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    argv = _argv("moreau-recover", ["--json", "{tmp}/r.json"], model=model, text=text, tmp=tmp_path)
    rc = _main("moreau-recover")(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(r"moreau-recover: error: saving --out .*/out failed: .*No space left on device \(the model "
                     r"needs about 0\.\d MB\); nothing was written there, the report was written to .*r\.json", err), err
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["losses"]) == 2 and report["steps"] == 2
    assert not (tmp_path / "out" / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_non_finite_training_loss_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    from moreau_pruner.recover import loop

    real, calls = loop.lm_loss_sum, []

    def diverging(*a, **k):  # the loss of step 3 overflows
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "lm_loss_sum", diverging)
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    argv = _argv("moreau-recover", ["--max-steps", "4", "--save-every", "1"], model=model, text=text, tmp=tmp_path)
    rc = _main("moreau-recover")(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moreau-recover: error: ")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert re.search(r"the training loss is nan at step 3 of recovery: lower the learning rate \(--lr, now 0\.0001\)",
                     lines[0]), lines[0]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (tmp_path / "out" / "config.json").exists()


# ----------------------------------------------------------------------------- under torchrun (gloo, 2 ranks)
# Faults injected into every process of the job (torchrun's ranks cannot be monkeypatched from here).
INJECT = """\
import os
fault = os.environ.get("MOREAU_TEST_FAULT")
if fault == "no-space":
    import collections, shutil
    usage = collections.namedtuple("usage", "total used free")
    shutil.disk_usage = lambda path: usage(10**6, 10**6 - 4096, 4096)
elif fault == "save-enospc":
    import errno, safetensors.torch
    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    safetensors.torch.save_file = full_disk
elif fault == "rank1-dies" and os.environ.get("RANK") == "1":
    os._exit(3)
"""

TORCHRUN_CASES = [
    # id, options, the error's pattern, set-up of {tmp}/bad, injected fault
    ("out-unwritable", ["--out", "/proc/moreau-out"], r"--out /proc/moreau-out: cannot write in /proc", None, None),
    ("more-layers-than-weights", ["--model", "{tmp}/bad"], r"model\.layers\.(\{4,5\}|4)\.", _six_layers, None),
    ("too-little-space", [], r"the output needs about 0\.\d MB but .* has 0\.0 MB free", None, "no-space"),
    ("save-fails", ["--json", "{tmp}/r.json"], r"saving --out .*/out failed: .*No space left on device \(the model "
     r"needs about 0\.\d MB\); nothing was written there, the report was written to .*r\.json", None, "save-enospc"),
]


def _launch(tmp_path, extra, setup, fault, launcher):
    """Run moreau-prune's bad-input options on 2 gloo ranks, launched by torchrun or by moreau-prune
    itself (--nproc-per-node); (completed process, tree before)."""
    import os
    import socket
    import subprocess
    import sys

    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    if setup is not None:
        setup(tmp_path, model)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOREAU_TEST_FAULT": fault or "",
           "PYTHONPATH": os.pathsep.join([str(inject), str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = _argv("moreau-prune", ["--backend", "reference", *extra], model=model, text=text, tmp=tmp_path)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "moreau_pruner.cli", "--distributed", "fsdp", "--device", "cpu", *argv]
    else:
        cmd = [sys.executable, "-m", "moreau_pruner.cli", "--distributed", "fsdp", "--nproc-per-node", "2",
               "--device", "cpu", *argv]
    before = _tree(tmp_path)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300), before


@pytest.mark.parametrize("extra,pattern,setup,fault", [c[1:] for c in TORCHRUN_CASES],
                         ids=[c[0] for c in TORCHRUN_CASES])
def test_a_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path, extra, pattern, setup, fault):
    proc, before = _launch(tmp_path, extra, setup, fault, "torchrun")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moreau-prune: error: ")]
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]  # rank 0's line; rank 1 is quiet
    assert re.search(pattern, lines[0]), lines[0]
    after = _tree(tmp_path)
    if fault == "save-enospc":  # the report is kept
        assert json.loads((tmp_path / "r.json").read_text())["params_after"] > 0
        del after["r.json"]
    assert after == before


LAUNCH_CASES = [c for c in TORCHRUN_CASES if c[0] in ("out-unwritable", "more-layers-than-weights")] + [
    ("rank-dies", [], r"rank 1 of 2 failed \(exit status 3\); its output is above", None, "rank1-dies")]


@pytest.mark.parametrize("extra,pattern,setup,fault", [c[1:] for c in LAUNCH_CASES], ids=[c[0] for c in LAUNCH_CASES])
def test_a_failed_launch_of_its_own_ranks_is_one_line(tmp_path, extra, pattern, setup, fault):
    """moreau-prune --nproc-per-node: the same one line as under torchrun, and none of torchrun's
    ChildFailedError traceback and failure table; exit 2 for a user error, 1 for a rank that died."""
    proc, before = _launch(tmp_path, extra, setup, fault, "moreau-prune")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moreau-prune: error: ")]
    assert proc.returncode == (1 if fault == "rank1-dies" else 2), proc.stderr[-3000:]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert _tree(tmp_path) == before


def test_a_recovery_adapter_write_that_fails_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    pytest.importorskip("peft")
    from moreau_pruner.recover import tuning

    def full_disk(self, directory):
        Path(directory).mkdir()
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tuning.LoraTuning, "save_side", full_disk)
    model, text = model_dir(tmp_path, "llama"), golden_text(tmp_path)
    rc = _main("moreau-recover")(_argv("moreau-recover", [], model=model, text=text, tmp=tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moreau-recover: error: ")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert re.search(r"saving --out .*/out failed while writing the LoRA adapter: .*No space left on device; nothing "
                     r"was written there", lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
