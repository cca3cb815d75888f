"""Test set-up shared by every test module.

Triton kernels are tested on CPU through the interpreter when the machine has no GPU; the
variable must be set before triton is first imported, so it happens here, before torch.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, visibly, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
