"""moreau-prune: the --device check (a clear error instead of a traceback) and the default / --published presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moreau_pruner.cli import options
from moreau_pruner.cli import prune as cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["--device", "cuda", "--iters", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moreau-prune: error: --device cuda:")
    assert "CPU-only build" in err or "no CUDA device is visible" in err
    assert "Traceback" not in err


def test_device_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="not a device name"):
        options.check_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda"):
        options.check_device("meta")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="CPU-only build"):
        options.check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert options.check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="1 CUDA device"):
        options.check_device("cuda:3")
    assert options.check_device("cpu") == torch.device("cpu")


def _resolved(argv):
    return cli.apply_preset(cli.build_parser().parse_args(argv))


def test_defaults_are_the_measured_preset_and_published_is_one_flag_away():
    a = _resolved([])
    assert {k: getattr(a, k) for k in cli.DEFAULTS} == cli.DEFAULTS
    b = _resolved(["--published"])
    assert {k: getattr(b, k) for k in cli.PUBLISHED} == cli.PUBLISHED
    assert (b.method, b.mode, b.granularity, b.ratio, b.scope, b.rounds) == ("moreau", "reference", "kv-group", 0.2,
                                                                             "local", 1)
    assert b.attn_layers is None and b.mlp_layers is None  # the published range, scaled to the model
    assert cli.DEFAULTS != cli.PUBLISHED


def test_given_flags_override_either_preset():
    for preset in ([], ["--published"]):
        a = _resolved(preset + ["--mode", "paper", "--granularity", "query-heads", "--ratio", "0.3", "--rounds", "2"])
        assert (a.mode, a.granularity, a.ratio, a.rounds) == ("paper", "query-heads", 0.3, 2)
        # --mlp-layers follows a given --attn-layers, as before
        a = _resolved(preset + ["--attn-layers", "2:5"])
        assert a.attn_layers == "2:5" and a.mlp_layers is None
        a = _resolved(preset + ["--uniform"])  # uniform prunes every layer: no preset range
        assert a.attn_layers is None and a.mlp_layers is None
    a = _resolved(["--published"])
    assert cli.apply_preset(a) is a and a.mode == "reference"  # idempotent
    helptext = cli.build_parser().format_help()
    assert "--published" in helptext and "--published: reference" in helptext and "--published: kv-group" in helptext


@pytest.mark.parametrize("module,prog", [("prune", "moreau-prune"), ("eval", "moreau-eval"),
                                         ("recover", "moreau-recover"), ("export", "moreau-export")])
def test_every_cli_module_runs_with_python_m(module, prog):
    """``python -m moreau_pruner.cli.<name>`` is the command (not a silent no-op)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "python"), str(root),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", f"moreau_pruner.cli.{module}", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog}"), proc.stdout[:200]
