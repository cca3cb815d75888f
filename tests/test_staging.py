"""Interrupted saves: what a kill at each point of a save leaves, how the next run cleans it up or puts the
old copy back, the completion marker every loader checks, and the fsyncs before and after the rename."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moreau_pruner import load_pruned
from moreau_pruner.cli import options as opt
from moreau_pruner.io.staging import COMPLETE_FILE, check_complete, clean_stale, staging_path
from moreau_pruner.model.loading import load_model

from _tiny import word_tokenizer
from golden import WORDS, tiny_model

HERE = Path(__file__).resolve().parent

# A writer that dies (os._exit, as a kill would: no except/finally runs) at an injected point.
KILLED = r"""
import os, sys
sys.path[:0] = [{tests!r}]
point, out, root = sys.argv[1], sys.argv[2], sys.argv[3]
import moreau_pruner.io.atomic as atomic
import moreau_pruner.io.pruned as mio
from _tiny import word_tokenizer
from golden import WORDS, text_file, tiny_model

def die(*a, **k):
    os._exit(17)

if point == "during-save":  # the weights and config.json are written, the tokenizer is not
    mio.write_extras = die
elif point == "between-renames":  # the old OUT moved aside, the new one not yet renamed in
    real = os.replace
    os.replace = lambda src, dst: die() if ".tmp-" in os.path.basename(src) else real(src, dst)
elif point == "recover-final-save":  # the merged model is staged, recovery.json is being written
    atomic.write_json = die
if point == "recover-final-save":
    from moreau_pruner.recover import RecoverConfig, recover
    cfg = RecoverConfig(max_steps=1, batch_size=2, cutoff_len=16, eval_windows=0, save_every=10)
    recover(tiny_model("llama"), word_tokenizer(WORDS), str(text_file(__import__("pathlib").Path(root))), cfg,
            out=out, progress=False)
else:
    mio.save_pruned(tiny_model("llama", seed=1), out, tokenizer=word_tokenizer(WORDS), overwrite=True)
os._exit(0)
"""


def _killed(tmp_path, point, out):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), point, str(out), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 17, r.stderr  # it died at the injected point


def _leftovers(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _first_save(tmp_path):
    from moreau_pruner import save_pruned

    out = save_pruned(tiny_model("llama"), tmp_path / "out", tokenizer=word_tokenizer(WORDS), extra={"run": 1})
    return out, _files(out)


def test_a_kill_during_save_keeps_the_old_output_and_the_next_run_removes_the_left_over(tmp_path, capsys):
    out, before = _first_save(tmp_path)
    _killed(tmp_path, "during-save", out)
    assert _files(out) == before
    (left,) = _leftovers(out)
    assert left.startswith(".out.tmp-") and not (tmp_path / left / COMPLETE_FILE).exists()
    for load in (load_pruned, load_model):  # the half-written copy is never taken for a model
        with pytest.raises(ValueError, match=r"unfinished copy of an interrupted save"):
            load(tmp_path / left)
    opt.check_out_target(str(out), True)  # the next run that writes OUT, before its work
    assert _leftovers(out) == [] and _files(out) == before


def test_a_kill_between_the_renames_restores_the_old_output_on_the_next_run(tmp_path, capsys):
    out, before = _first_save(tmp_path)
    _killed(tmp_path, "between-renames", out)
    assert not out.exists()
    assert [n.split("-")[0] for n in _leftovers(out)] == [".out.old", ".out.tmp"]
    capsys.readouterr()
    opt.check_out_target(str(out), True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"out was missing after an interrupted save; its previous copy was put back",
                                       err[0]), err
    assert _files(out) == before and _leftovers(out) == []
    load_pruned(out)


def test_a_kill_in_recovery_final_save_leaves_nothing_a_loader_takes(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "rec"
    _killed(tmp_path, "recover-final-save", out)
    (left,) = _leftovers(out)
    staged = tmp_path / left
    assert left.startswith(".rec.tmp-") and (staged / "adapter").is_dir() and not (staged / "recovery.json").exists()
    with pytest.raises(ValueError, match="unfinished copy"):
        load_pruned(staged)
    from moreau_pruner import save_pruned

    save_pruned(tiny_model("llama"), out)  # any later save of OUT cleans up first
    assert _leftovers(out) == []


def test_left_overs_of_live_or_unknown_writers_are_never_touched(tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = staging_path(out)  # this process: alive
    host = f".out.tmp-{'f' * 6}-{dead_pid}-0123abcd"  # another host: its processes cannot be seen
    legacy = ".out.tmp-89abcdef"  # an older version's name: no writer recorded
    stale = staging_path(out).name.replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    other = staging_path(tmp_path / "other").name.replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    for name in (mine.name, host, legacy, stale, other):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    capsys.readouterr()
    clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, host, legacy, other])
    err = capsys.readouterr().err
    assert "1 left-over(s) of an interrupted save by an older version (.out.tmp-89abcdef)" in err
    clean_stale(tmp_path / "x", every_name=True)  # (what OUT/checkpoints gets: every dead writer's entry)
    assert not (tmp_path / other).exists()


# ----------------------------------------------------------------------------- the completion marker
def test_every_save_ends_with_the_marker_and_loaders_refuse_a_directory_missing_a_listed_file(tmp_path):
    from moreau_pruner import save_pruned
    from moreau_pruner.cli import export

    out = save_pruned(tiny_model("qwen2"), tmp_path / "p", tokenizer=word_tokenizer(WORDS), extra={"a": 1})
    listed = json.loads((out / COMPLETE_FILE).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != COMPLETE_FILE)
    (out / "tokenizer.json").unlink()
    for load in (load_pruned, load_model):
        with pytest.raises(FileNotFoundError, match=r"p is incomplete: 1 of the files its save wrote are not there "
                                                    r"\(tokenizer\.json\)"):
            load(out)
    assert export.main([str(out), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert not (tmp_path / "m.gguf").exists()


def test_outputs_of_older_versions_without_the_marker_still_load(tmp_path):
    from moreau_pruner import save_pruned

    out = save_pruned(tiny_model("mistral"), tmp_path / "old", tokenizer=word_tokenizer(WORDS), extra={"a": 1})
    (out / COMPLETE_FILE).unlink()  # as an older version wrote it: pruning_info.json and whole weights
    check_complete(out)
    load_pruned(out)
    load_model(out)
    (out / COMPLETE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"moreau_complete\.json is unreadable"):
        load_pruned(out)


def test_a_uniform_export_with_the_marker_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from moreau_pruner.io.stock import save_uniform

    out = save_uniform(tiny_model("llama"), tmp_path / "u")
    assert (out / COMPLETE_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(out)  # a stock reader ignores the marker


# ----------------------------------------------------------------------------- fsync
def test_the_staged_files_and_directory_are_flushed_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    from moreau_pruner import save_pruned

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = save_pruned(tiny_model("llama"), tmp_path / "out", tokenizer=word_tokenizer(WORDS))
    (rename,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out)]
    staged = events[rename][1]
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for p in out.iterdir():
        assert os.path.join(staged, p.name) in synced_before, p.name
    assert staged in synced_before
    assert ("fsync", str(tmp_path)) in events[rename + 1:]

