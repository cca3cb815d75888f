"""Saving and reloading structurally pruned LLaMA-family models (SPEC §6).

A pruned model is a stock transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` whose decoder layers have different widths (query heads, key/value heads
and MLP channels per layer). Stock configs cannot express that, so a saved directory holds:

- ``model.safetensors``: the state-dict tensors only (no pickled modules, no estimator state;
  a tied ``lm_head.weight`` is stored once, as ``model.embed_tokens.weight``);
- ``config.json``: the base config (without ``quantization_config``) plus the per-layer lists
  ``layer_num_attention_heads``, ``layer_num_key_value_heads``, ``layer_intermediate_size``,
  ``model_type`` ``pruned_<base>`` and an ``auto_map`` pointing at
- ``modeling_pruned.py``: written from ``templates/modeling_pruned.py``, so that
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works (it runs the directory's
  Python: only for a directory one wrote oneself; ``load_pruned`` runs none);
- the tokenizer files, ``generation_config.json`` and ``pruning_info.json`` when given/present.

``load_pruned`` reloads such a directory without ``trust_remote_code`` by rendering the same
template inside this package. It reads every directory this package writes: the per-layer form
above (also what ``moreau-recover`` writes), and stock Llama/Mistral/Qwen2 directories (what
``save_uniform`` / ``moreau-prune --uniform`` writes, and a dense Hugging Face checkpoint), which
load as the stock transformers class.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..model.checks import check_stock_config, check_weights, load_checked
from .atomic import json_default, staged_directory
from .staging import check_complete

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "STOCK_MODEL_TYPES",
    "MODELING_FILE",
    "WEIGHTS_FILE",
    "PRUNING_INFO_FILE",
    "layer_widths",
    "pruned_config_dict",
    "save_pruned",
    "load_pruned",
    "original_size",
    "info_text",
    "tensors_to_save",
    "render_modeling_file",
    "template_module",
]

#: base causal-LM class name -> (config class name, model_type written for the pruned model)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("LlamaConfig", "pruned_llama"),
    "MistralForCausalLM": ("MistralConfig", "pruned_mistral"),
    "Qwen2ForCausalLM": ("Qwen2Config", "pruned_qwen2"),
}

#: base causal-LM class name -> the model_type of its stock (unpruned or uniformly pruned) config
STOCK_MODEL_TYPES: dict[str, str] = {arch: mt.removeprefix("pruned_") for arch, (_, mt) in SUPPORTED_ARCHITECTURES.items()}

MODELING_FILE = "modeling_pruned.py"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PRUNING_INFO_FILE = "pruning_info.json"
PER_LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
BASE_ARCH_KEY = "pruned_base_architecture"

_TEMPLATE_NAME = "modeling_pruned.py"
_MARKERS = ("moreau:base-config", "moreau:base-model", "moreau:model-type")


# --------------------------------------------------------------------------- template


def _template_source() -> str:
    return (resources.files("moreau_pruner.io") / "templates" / _TEMPLATE_NAME).read_text(encoding="utf-8")


def _check_architecture(base_arch: str) -> tuple[str, str]:
    try:
        return SUPPORTED_ARCHITECTURES[base_arch]
    except KeyError:
        raise ValueError(
            f"unsupported base architecture {base_arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


def render_modeling_file(base_arch: str) -> str:
    """The modeling file's source for base class ``base_arch`` (e.g. ``"Qwen2ForCausalLM"``)."""
    config_name, model_type = _check_architecture(base_arch)
    wanted = {
        "moreau:base-config": f"from transformers import {config_name} as _BaseConfig  # moreau:base-config",
        "moreau:base-model": f"from transformers import {base_arch} as _BaseForCausalLM  # moreau:base-model",
        "moreau:model-type": f'PRUNED_MODEL_TYPE = "{model_type}"  # moreau:model-type',
    }
    seen = dict.fromkeys(_MARKERS, 0)
    out = []
    for line in _template_source().splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        for marker in _MARKERS:
            if stripped.endswith("# " + marker):
                seen[marker] += 1
                line = wanted[marker] + line[len(stripped):]
                break
        out.append(line)
    bad = [m for m, n in seen.items() if n != 1]
    if bad:  # a broken package install, not user input
        raise RuntimeError(f"template {_TEMPLATE_NAME} must mark each of {bad} exactly once")
    return "".join(out)


_MODULES: dict[str, Any] = {}


def template_module(base_arch: str):
    """The rendered template for ``base_arch``, imported as a module (cached per architecture).

    It provides ``PrunedConfig``, ``PrunedForCausalLM`` and ``resize_pruned_layers``.
    """
    if base_arch in _MODULES:
        return _MODULES[base_arch]
    _, model_type = _check_architecture(base_arch)
    name = f"moreau_pruner._rendered_{model_type}"
    source = render_modeling_file(base_arch)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"<moreau_pruner/templates/{_TEMPLATE_NAME} for {base_arch}>"
    sys.modules[name] = module
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _MODULES[base_arch] = module
    return module


# --------------------------------------------------------------------------- reading a model


def _base_architecture(model) -> str:
    import transformers

    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_ARCHITECTURES and getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    raise TypeError(
        f"save_pruned supports {', '.join(SUPPORTED_ARCHITECTURES)} (or subclasses); got {type(model).__name__}"
    )


def layer_widths(model) -> dict[str, list[int]]:
    """Per-layer widths read off the module shapes, checked for consistency.

    Returns ``{"layer_num_attention_heads": [...], "layer_num_key_value_heads": [...],
    "layer_intermediate_size": [...]}``. Raises ValueError naming the layer and module when the
    shapes do not describe a valid pruned layer.
    """
    try:
        layers = model.model.layers
    except AttributeError:
        raise TypeError(f"{type(model).__name__} has no model.layers (not a LLaMA-family causal LM)") from None
    hidden = model.config.hidden_size
    heads, kv_heads, inter = [], [], []
    for i, block in enumerate(layers):
        attn, mlp = block.self_attn, block.mlp
        d = attn.head_dim
        where = f"model.layers.{i}"
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        for name, lin in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("gate_proj", gate), ("up_proj", up)):
            if lin.in_features != hidden:
                raise ValueError(f"{where}: {name} has {lin.in_features} input features, hidden_size is {hidden}")
        for name, lin in (("o_proj", o), ("down_proj", down)):
            if lin.out_features != hidden:
                raise ValueError(f"{where}: {name} has {lin.out_features} output features, hidden_size is {hidden}")
        if q.out_features % d or k.out_features % d:
            raise ValueError(
                f"{where}: q_proj/k_proj widths {q.out_features}/{k.out_features} are not multiples of head_dim {d}"
            )
        if v.out_features != k.out_features:
            raise ValueError(f"{where}: v_proj has {v.out_features} rows but k_proj has {k.out_features}")
        if o.in_features != q.out_features:
            raise ValueError(f"{where}: o_proj has {o.in_features} input columns but q_proj has {q.out_features} rows")
        if up.out_features != gate.out_features or down.in_features != gate.out_features:
            raise ValueError(
                f"{where}: MLP widths disagree (gate_proj {gate.out_features}, up_proj {up.out_features}, "
                f"down_proj in {down.in_features})"
            )
        h, h_kv, m = q.out_features // d, k.out_features // d, gate.out_features
        if h < 1 or h_kv < 1 or m < 1:
            raise ValueError(f"{where}: a pruned layer needs at least one head and one MLP channel ({h}/{h_kv}/{m})")
        if h % h_kv:
            raise ValueError(f"{where}: {h} query heads is not a multiple of {h_kv} key/value heads")
        groups = getattr(attn, "num_key_value_groups", h // h_kv)
        if groups != h // h_kv:
            raise ValueError(
                f"{where}: self_attn.num_key_value_groups is {groups} but the shapes give {h} query heads "
                f"/ {h_kv} key/value heads = {h // h_kv}"
            )
        heads.append(h)
        kv_heads.append(h_kv)
        inter.append(m)
    return {
        "layer_num_attention_heads": heads,
        "layer_num_key_value_heads": kv_heads,
        "layer_intermediate_size": inter,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _pruned_config_dict(model, base_arch: str, widths: dict[str, list[int]], tied: bool) -> dict:
    _, model_type = SUPPORTED_ARCHITECTURES[base_arch]
    d = model.config.to_dict()
    d.pop("quantization_config", None)
    d.pop("auto_map", None)
    d.update(widths)
    d["model_type"] = model_type
    d["architectures"] = ["PrunedForCausalLM"]
    d["auto_map"] = {
        "AutoConfig": f"{Path(MODELING_FILE).stem}.PrunedConfig",
        "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.PrunedForCausalLM",
    }
    d[BASE_ARCH_KEY] = base_arch
    d["tie_word_embeddings"] = tied
    d["dtype"] = _dtype_name(_model_dtype(model))
    return d


def _weights_to_save(model, template, cfg, tied: bool) -> dict[str, torch.Tensor]:
    """The state-dict tensors a fresh pruned model of ``cfg`` expects, taken from ``model``."""
    with torch.device("meta"):
        reference = template.PrunedForCausalLM(cfg)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)
    return tensors_to_save(model, expected, "the pruned architecture", "the recorded widths give")


def info_text(extra: dict | None) -> str | None:
    """``extra`` as the text of :data:`PRUNING_INFO_FILE` (None: no file), or a ValueError saying why it
    cannot be written, before anything on disk changes."""
    if extra is None:
        return None
    try:
        return json.dumps(extra, indent=2, default=json_default) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra cannot be written as {PRUNING_INFO_FILE}: {e}") from e


def tensors_to_save(model, expected: dict, architecture: str, shapes_from: str) -> dict[str, torch.Tensor]:
    """``model``'s tensors named in ``expected`` {name: shape}, checked and made ready for safetensors:
    on the CPU, contiguous, no two sharing memory. ``architecture`` and ``shapes_from`` word the errors."""
    state = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"model is missing tensors {architecture} needs: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, shape in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {key} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device (no data to save)")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key} has shape {tuple(t.shape)}, {shapes_from} {tuple(shape)}")
        # detach() gives a plain tensor: attributes an estimator attached to the Parameter stay behind.
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()  # safetensors refuses tensors that share memory
            storages.add(ptr)
        out[key] = t
    return out


def pruned_config_dict(model) -> dict:
    """The ``config.json`` contents :func:`save_pruned` writes for ``model`` (base config, per-layer
    widths, ``auto_map``), for savers that write the weights themselves (llm-compressor's
    ``save_pretrained``); ValueError/TypeError as :func:`save_pruned` for a model it cannot describe."""
    base_arch = _base_architecture(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None and head.weight is emb.weight
    return _pruned_config_dict(model, base_arch, layer_widths(model), tied)


# --------------------------------------------------------------------------- save


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_pruned(
    model,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a (structurally pruned) LLaMA/Mistral/Qwen2 causal LM to ``out_dir``.

    Writes ``model.safetensors``, ``config.json`` (base config + per-layer widths + auto_map),
    ``modeling_pruned.py``, ``generation_config.json`` (if the model has one), the tokenizer (if
    given) and ``extra`` as ``pruning_info.json`` (if given). Everything is written to a
    temporary sibling directory first and renamed into place at the end; on any error the
    temporary directory is removed and an existing ``out_dir`` is left as it was. An existing
    non-empty ``out_dir`` is replaced only with ``overwrite=True``. Returns the directory.

    Works for models loaded from GGUF (which transformers' save_pretrained refuses): only the
    tensors are saved and ``quantization_config`` is dropped from the config.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict (saved as {PRUNING_INFO_FILE}), got {type(extra).__name__}")

    # Everything that can fail on bad input is checked before touching the file system.
    base_arch = _base_architecture(model)
    widths = layer_widths(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    shared = head is not None and head.weight is emb.weight
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and shared
    template = template_module(base_arch)
    config_dict = _pruned_config_dict(model, base_arch, widths, tied)
    cfg = template.PrunedConfig.from_dict(dict(config_dict))
    try:
        config_json = json.dumps(config_dict, indent=2, sort_keys=True, default=json_default) + "\n"
    except TypeError as e:
        raise ValueError(f"the model config cannot be written as JSON: {e}") from e
    info_json = info_text(extra)
    tensors = _weights_to_save(model, template, cfg, tied)

    from safetensors.torch import save_file

    with staged_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config_json, encoding="utf-8")
        (tmp / MODELING_FILE).write_text(render_modeling_file(base_arch), encoding="utf-8")
        write_extras(tmp, model, tokenizer, info_json)
    return out_dir


def write_extras(directory: Path, model, tokenizer=None, info_json: str | None = None) -> None:
    """The files every saved directory has next to its weights and config: generation_config.json
    (when the model generates), the tokenizer (when given) and pruning_info.json (when given)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if info_json is not None:
        (directory / PRUNING_INFO_FILE).write_text(info_json, encoding="utf-8")


# --------------------------------------------------------------------------- load


def read_config(directory: Path) -> dict:
    """``directory/config.json`` as a dict, with errors naming the file."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (not a saved model directory)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return d


def is_per_layer(d: dict, path: Path) -> bool:
    """Whether config dict ``d`` (read from ``path``) has the per-layer widths of :func:`save_pruned`,
    checked; False for a stock config without any of them."""
    present = [k for k in PER_LAYER_KEYS if k in d]
    if not present:
        return False
    missing = [k for k in PER_LAYER_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path} has per-layer widths {', '.join(present)} but not {', '.join(missing)}")
    n = d.get("num_hidden_layers")
    for k in PER_LAYER_KEYS:
        v = d[k]
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            raise ValueError(f"{path}: '{k}' must be a list of positive integers")
        if len(v) != n:
            raise ValueError(f"{path}: '{k}' has {len(v)} entries but num_hidden_layers is {n}")
    return True


def stock_architecture(d: dict, path: Path) -> str:
    """The causal-LM class (e.g. ``"MistralForCausalLM"``) of a stock config dict, by its model_type."""
    by_type = {mt: arch for arch, mt in STOCK_MODEL_TYPES.items()}
    arch = by_type.get(d.get("model_type"))
    if arch is None:
        raise ValueError(
            f"{path}: model_type {d.get('model_type')!r} is neither a pruned directory (no per-layer widths) nor "
            f"a stock {'/'.join(by_type)} model")
    return arch


def _base_arch_of(d: dict, path: Path) -> str:
    base = d.get(BASE_ARCH_KEY)
    if base is None:
        by_type = {mt: arch for arch, (_, mt) in SUPPORTED_ARCHITECTURES.items()}
        base = by_type.get(d.get("model_type"))
    if base not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unknown base architecture ({BASE_ARCH_KEY}={d.get(BASE_ARCH_KEY)!r}, "
            f"model_type={d.get('model_type')!r})"
        )
    return base


def load_pruned(
    directory: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Loads a directory written by :func:`save_pruned` without ``trust_remote_code``, or a stock
    Llama/Mistral/Qwen2 directory (:func:`moreau_pruner.io.stock.save_uniform`'s output, a dense
    Hugging Face checkpoint) as its stock transformers class.

    Returns ``(model, tokenizer)``; the tokenizer is None when the directory has none. Loading is
    quiet: no "run the custom code?" prompt, no config-type warning (see ``_load_tokenizer``). ``dtype``
    None keeps the saved dtype. The model is moved to ``device`` and put in eval mode.
    ``attn_implementation`` ("sdpa", "eager", ...) is passed to transformers; None = its default.

    An incomplete directory is refused (:func:`moreau_pruner.io.staging.check_complete`): one whose
    completion marker lists files that are not there, or the unfinished copy of an interrupted save.
    Directories of older versions (no marker; e.g. pruning_info.json and whole weights) load as before.
    """
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"pruned model directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    check_complete(directory)
    d = read_config(directory)
    per_layer = is_per_layer(d, directory / CONFIG_FILE)
    base_arch = _base_arch_of(d, directory / CONFIG_FILE) if per_layer else stock_architecture(d, directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if per_layer and not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (the pruned model's weights)")
    if not per_layer:
        check_stock_config(d, directory / CONFIG_FILE)
    check_weights(directory)
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (use e.g. 'float32', 'bfloat16' or a torch.dtype)")
        dtype = resolved

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    kwargs["dtype"] = "auto" if dtype is None else dtype
    if per_layer:
        template = template_module(base_arch)
        model = load_checked(template.PrunedForCausalLM.from_pretrained, directory,
                             config=template.PrunedConfig.from_dict(d), **kwargs)
    else:  # a stock directory: --uniform output or a dense checkpoint
        import transformers

        model = load_checked(getattr(transformers, base_arch).from_pretrained, directory, local_files_only=True,
                             **kwargs)
    model.to(device)
    model.eval()

    return model, _load_tokenizer(directory)


def original_size(model_spec, params_after: int) -> dict:
    """``{"params_original": N, "kept_fraction_original": params_after / N}`` when ``model_spec`` is a
    directory whose ``pruning_info.json`` records the size of the model it was first pruned from
    (``params_original`` of a re-pruned model, else ``params_before``; recovery keeps the file), so
    that re-pruning reports against the original model; ``{}`` when nothing says it."""
    if model_spec is None:
        return {}
    path = Path(model_spec).expanduser() / PRUNING_INFO_FILE
    if not path.is_file():
        return {}
    try:  # the file is a record, not an input: an unreadable one (as moreau-recover treats it) says nothing
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(info, dict):
        return {}
    n = info.get("params_original", info.get("params_before"))
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return {}
    return {"params_original": n, "kept_fraction_original": params_after / n}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory`` (None when there is none), loaded by its own class.

    ``AutoTokenizer`` is not used: it reads ``config.json``, finds our ``auto_map`` and then asks
    on the terminal whether to run the directory's code (and, declined, warns that a
    ``pruned_*`` config instantiates a model of type ``""``). The class named in
    ``tokenizer_config.json`` is resolved by name instead; without one (or with a name this
    transformers does not know) a ``tokenizer.json`` is read by the generic fast tokenizer.
    """
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config_path = directory / "tokenizer_config.json"
    class_name = None
    if config_path.is_file():
        try:
            tok_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        if isinstance(tok_config, dict):
            class_name = tok_config.get("tokenizer_class")
    cls = None
    if isinstance(class_name, str) and class_name:
        cls = tokenizer_class_from_name(class_name)
        if cls is None and class_name.endswith("Fast"):  # transformers 5 dropped most *Fast names
            cls = tokenizer_class_from_name(class_name.removesuffix("Fast"))
    if cls is None:
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(
                f"{directory}: cannot load the tokenizer: tokenizer_config.json names "
                f"{class_name!r}, which this transformers does not provide, and there is no tokenizer.json"
            )
        cls = PreTrainedTokenizerFast
    return cls.from_pretrained(str(directory), local_files_only=True)
