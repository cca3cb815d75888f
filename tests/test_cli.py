"""moreau-prune's --device check: a clear error instead of a traceback."""
from __future__ import annotations

import pytest
import torch

from moreau_pruner import cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["--device", "cuda", "--iters", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moreau-prune: error: --device cuda:")
    assert "CPU-only build" in err or "no CUDA device is visible" in err
    assert "Traceback" not in err


def test_device_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="not a device name"):
        cli.check_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda"):
        cli.check_device("meta")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="CPU-only build"):
        cli.check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="1 CUDA device"):
        cli.check_device("cuda:3")
    assert cli.check_device("cpu") == torch.device("cpu")
