"""``MoreauPruningModifier``: Moreau structured pruning as a step of an llm-compressor recipe.

Importing this module registers the class under the name ``MoreauPruningModifier``, so a recipe can
name it (llm-compressor has no plugin discovery: import the module before the recipe is parsed)::

    import moreau_pruner.integrations.llmcompressor
    from llmcompressor import oneshot

    oneshot(model=model, dataset=calibration, recipe="recipe.yaml", output_dir="out")

    # recipe.yaml
    pruning_stage:
      pruning_modifiers:
        MoreauPruningModifier:
          ratio: 0.25
          granularity: kv-group

The fields are ``moreau-prune``'s options (same names with underscores, same defaults; ``published:
true`` selects its ``--published`` settings). The work is done when the modifier is initialized,
before the modifiers after it in the recipe are: it gathers the calibration batches of
llm-compressor's loader (``state.data.calib``), runs the pipeline's :func:`~moreau_pruner.pipeline.prune_model`
on the whole model with gradients enabled (llm-compressor calibrates under ``torch.no_grad()``, layer by
layer; the Moreau estimate needs its own forward and backward passes), and the model is pruned by our
planner in place. So a quantization or Wanda modifier that follows sees the pruned shapes.

Saving: llm-compressor's ``save_pretrained`` rewrites ``config.json`` from the original checkpoint's
(``config._name_or_path``), which would restore the unpruned widths. When finalized the modifier
clears that path and wraps the save so that a ``uniform: true`` model gets a stock config (loads with
``AutoModelForCausalLM``, and in vLLM) and any other gets the per-layer format of
:func:`moreau_pruner.io.pruned.save_pruned` (``config.json`` with per-layer widths, with the
``quantization_config`` a later modifier added, and ``modeling_pruned.py``; loads with
:func:`moreau_pruner.load_pruned` or ``trust_remote_code=True``); both get ``pruning_info.json``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import wraps
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

try:
    from compressed_tensors.utils.match import is_match
    from llmcompressor.core import State
    from llmcompressor.modifiers import Modifier
    from llmcompressor.modifiers.factory import ModifierFactory
    from pydantic import PrivateAttr, model_validator
except ImportError as e:  # the optional extra is missing
    raise ImportError(
        "moreau_pruner.integrations.llmcompressor needs llm-compressor: pip install --no-deps "
        "llmcompressor==0.14.0.1 compressed-tensors==0.19.0 && pip install 'moreau-kernels[llmcompressor]' "
        f"(scripts/setup.sh does this; {e})") from e

import moreau_kernels as mk

from ..cli.prune import apply_preset
from ..estimate.config import MoreauConfig
from ..io.atomic import json_default
from ..io.pruned import BASE_ARCH_KEY, CONFIG_FILE, MODELING_FILE, PRUNING_INFO_FILE, pruned_config_dict, render_modeling_file
from ..model.structure import discover, find_layers
from ..pipeline import prune_model
from ..prune import rules
from ..prune.compensate import CompensateConfig
from ..prune.config import PruneConfig
from ..prune.target import resolve_target
from ..score import methods
from ..score.registry import ScoringOptions

__all__ = ["MoreauPruningModifier", "calibration_batch", "target_layers"]

NAME = "MoreauPruningModifier"


class MoreauPruningModifier(Modifier):
    """Structured Moreau pruning (heads / KV groups and MLP channels) in an llm-compressor recipe.

    The fields mirror ``moreau-prune``; those left unset take its defaults (or, with
    ``published: true``, MoreauPruner's published settings). Layer ranges are ``"start:end"``, a pair
    or a name (``all``, ``published``, ``published-to-end``). ``targets``/``ignore`` take llm-compressor's
    module patterns instead (``re:`` regexes and class names, see :func:`target_layers`) where they name
    a set of decoder layers. ``report_path``: also write the pruning report (kept units per layer) to this
    JSON file.

    ``compensate: true`` refits the weights that stay so every pruned layer reproduces its dense output
    on the calibration tokens (``compensate_mode``, ``compensate_damping`` as in ``moreau-prune``). It is
    off by default here, unlike in ``moreau-prune``: here it fits llm-compressor's calibration set, whose
    size the recipe's user chooses, and fitted on a few hundred tokens it overfits them (held-out
    perplexity got worse on SmolLM2); give it thousands (``num_calibration_samples`` x
    ``max_seq_length`` of 8k tokens or more).
    """

    # The modifier reads llm-compressor's calibration loader itself when it is initialized, so it
    # needs no calibration pass of the pipeline (the sequential pipeline would trace the model and
    # run it layer by layer for nothing).
    requires_calibration_data: bool = False

    published: bool = False
    method: str | None = None
    ratio: float | None = None
    attn_layers: str | tuple[int, int] | None = None
    mlp_layers: str | tuple[int, int] | None = None
    scope: str | None = None
    granularity: str | None = None
    round_to: int | None = None
    uniform: bool = False
    allocation: str = "uniform"
    rounds: int | None = None
    reduction: str = ScoringOptions.reduction
    vectorize: bool = False
    head_score: str = ScoringOptions.head_score
    taylor_variant: str = ScoringOptions.taylor_variant
    # the Moreau estimate
    mode: str | None = None
    std: float = MoreauConfig.std
    lamb: float = MoreauConfig.lamb
    prox_lr: float = MoreauConfig.lr
    soft: float = MoreauConfig.soft
    iters: int = MoreauConfig.iters
    avg_last: int = MoreauConfig.avg_last
    threshold_group: str = MoreauConfig.group  # moreau-prune --group (``group`` is the recipe group here)
    noise_samples: int = MoreauConfig.n_samples
    noise: str = MoreauConfig.noise
    backend: str = "auto"
    micro_batch_size: int | None = None
    estimator_path: str = ScoringOptions.estimator_path
    gradient_checkpointing: bool = False
    memory_check: bool = True
    seed: int = 0
    report_path: str | None = None
    targets: str | list[str] | None = None
    ignore: str | list[str] | None = None
    compensate: bool = False
    compensate_mode: str = CompensateConfig.mode
    compensate_damping: float = CompensateConfig.damping

    _prune: Any = PrivateAttr(default=None)
    _moreau: Any = PrivateAttr(default=None)
    _options: Any = PrivateAttr(default=None)
    _result: Any = PrivateAttr(default=None)
    _compensate: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self) -> "MoreauPruningModifier":
        """Fill the unset options with moreau-prune's preset and check every value and combination
        (a bad recipe fails when it is parsed, before the model is touched)."""
        if self.targets is not None and (self.attn_layers is not None or self.mlp_layers is not None):
            raise ValueError("give the layers to prune either as targets (llm-compressor module patterns) or as "
                             "attn_layers/mlp_layers, not both")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, [value])
            elif value is not None and not value:
                raise ValueError(f"{name} is empty: leave it out or name modules")
        args = apply_preset(SimpleNamespace(**{k: getattr(self, k) for k in (
            "published", "method", "mode", "granularity", "attn_layers", "mlp_layers", "ratio", "scope", "rounds",
            "uniform")}))
        for k, v in vars(args).items():
            object.__setattr__(self, k, v)  # no re-validation
        methods.get(self.method)
        rules.check(rules.Request(self.method, allocation=self.allocation, rounds=self.rounds, uniform=self.uniform,
                                  scope=self.scope, round_to=self.round_to, noise=self.noise))
        self._prune = PruneConfig(ratio=self.ratio, attn_layers=self.attn_layers,
                                  mlp_layers=self.mlp_layers or self.attn_layers, scope=self.scope,
                                  granularity=self.granularity, round_to=self.round_to, uniform=self.uniform)
        self._moreau = MoreauConfig(mode=self.mode, std=self.std, lamb=self.lamb, lr=self.prox_lr, soft=self.soft,
                                    iters=self.iters, avg_last=self.avg_last, group=self.threshold_group,
                                    n_samples=self.noise_samples, noise=self.noise, seed=self.seed,
                                    micro_batch_size=self.micro_batch_size)
        self._options = ScoringOptions(self.reduction, self.vectorize, self.head_score, self.taylor_variant, self.seed,
                                       self.micro_batch_size, self.estimator_path, self.gradient_checkpointing,
                                       self.memory_check)
        if self.compensate:
            self._compensate = CompensateConfig(mode=self.compensate_mode, damping=self.compensate_damping,
                                                micro_batch_size=self.micro_batch_size).validate()
        if self.backend not in mk.BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {('auto',) + mk.BACKENDS}, got {self.backend!r}")
        if self.report_path is not None and not str(self.report_path).endswith(".json"):
            raise ValueError(f"report_path must end with .json, got {self.report_path!r}")
        return self

    @property
    def report(self) -> dict | None:
        """The pruning report (parameters before/after, widths and kept units per layer) once pruned."""
        return None if self._result is None else self._result.report.as_dict()

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        structure = discover(model)  # UnsupportedArchitecture (a ValueError) names what we can prune
        if self.targets is not None or self.ignore is not None:
            attn, mlp = target_layers(model, self.targets, self.ignore, self._prune.layer_ranges(structure.num_layers))
            self._prune = replace(self._prune, attn_layers=attn, mlp_layers=mlp)
        resolve_target(structure, self._prune)  # layer ranges against the model's depth, before any work
        batch = None
        if methods.get(self.method).needs_batch or self.compensate:
            if state.data is None or state.data.calib is None:
                why = f"with method {self.method!r}" if methods.get(self.method).needs_batch else "with compensate"
                raise ValueError(f"{NAME} {why} needs calibration data: pass dataset=... "
                                 "(and num_calibration_samples/max_seq_length) to oneshot")
            batch = calibration_batch(state.data.calib, next(model.parameters()).device)
        with mk.use_backend(self.backend), torch.enable_grad():
            self._result = prune_model(model, batch, self.method, self._prune, moreau=self._moreau,
                                       reduction=self.reduction, vectorize=self.vectorize, seed=self.seed,
                                       micro_batch_size=self.micro_batch_size, progress=False,
                                       allocation=self.allocation, rounds=self.rounds,
                                       taylor_variant=self.taylor_variant, estimator_path=self.estimator_path,
                                       gradient_checkpointing=self.gradient_checkpointing,
                                       check_memory=self.memory_check, head_score=self.head_score,
                                       compensate=self._compensate)
        if self.report_path is not None:
            Path(self.report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.report_path).write_text(json.dumps(self.report, indent=2, default=json_default) + "\n")
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        model = state.model
        # llm-compressor's save rewrites config.json from the checkpoint at _name_or_path (unpruned widths)
        model.config._name_or_path = ""
        if not getattr(model.save_pretrained, "_moreau", False):
            model.save_pretrained = _saving_pruned(model.save_pretrained, model, self.uniform, self.report)
        return True


def target_layers(model: torch.nn.Module, targets: list[str] | None, ignore: list[str] | None,
                  default: tuple[range, range]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The attention and MLP layer ranges ``(start, end)`` that llm-compressor's ``targets``/``ignore``
    select, matched as llm-compressor matches them (``compressed_tensors``' ``is_match``: ``re:`` + a regex
    applied with ``re.match`` to module names, an exact name, or a class name such as ``LlamaDecoderLayer``).

    A target must name whole pruning blocks: decoder layers (attention and MLP; their list
    ``model.layers`` is all of them), attention modules (``self_attn``) or MLP modules; what a matched block contains is covered by it, and a target that
    matches any other module (one projection, ``Linear``, the head) or none is refused, because the units
    are heads and channels that span a block's projections. Without ``targets`` the ``default`` ranges
    (``attn_layers``/``mlp_layers`` or the preset) are the start. ``ignore`` then leaves out every block
    it names, contains or lies inside (``re:model\\.layers\\.0\\.`` leaves layer 0 whole; ignoring one
    projection leaves its whole block); modules outside the blocks (embeddings, ``lm_head``, norms) are
    never pruned, so ignoring them changes nothing. The attention and the MLP layers left must each be
    one non-empty contiguous range (the pruner's ``attn_layers``/``mlp_layers``); a ValueError says what
    was selected otherwise.
    """
    structure = discover(model)
    blocks: dict[str, tuple[str, int]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for ls in structure.layers:
        blocks[names[id(ls.layer)]] = ("layer", ls.index)
        blocks[names[id(ls.attn)]] = ("attention", ls.index)
        blocks[names[id(ls.mlp)]] = ("mlp", ls.index)
    container = names[id(find_layers(model))]  # the ModuleList of decoder layers: all of them
    modules = list(model.named_modules())
    selected = {"attention": set(), "mlp": set()}

    def parts(kind: str) -> tuple[str, ...]:
        return ("attention", "mlp") if kind == "layer" else (kind,)

    if targets is None:
        selected = {"attention": set(default[0]), "mlp": set(default[1])}
    for target in targets or ():
        hits = [n for n, m in modules if is_match(n, m, target)]
        if not hits:
            raise ValueError(f"targets entry {target!r} matches no module of the model")
        chosen = [n for n in hits if n in blocks or n == container]
        for n in hits:
            if n not in chosen and not any(n.startswith(c + ".") for c in chosen):
                raise ValueError(
                    f"targets entry {target!r} matches {n or 'the whole model'!r}, which is not a decoder layer, "
                    "attention or MLP module: Moreau pruning removes heads and channels across all of a block's "
                    "projections, so targets must name whole blocks (e.g. 'LlamaDecoderLayer', "
                    r"'re:.*layers\.(1|2)$', 're:.*self_attn$', 're:.*mlp$')")
        for n in chosen:
            for kind, index in [blocks[n]] if n in blocks else [("layer", ls.index) for ls in structure.layers]:
                for part in parts(kind):
                    selected[part].add(index)
    for target in ignore or ():
        for n, m in modules:
            if not is_match(n, m, target):
                continue
            for block, (kind, index) in blocks.items():
                inside = n.startswith(block + ".") and kind != "layer"  # a layer's norms are not pruned
                if n == block or n == "" or block.startswith(n + ".") or inside:
                    for part in parts(kind):
                        selected[part].discard(index)
    ranges = []
    for part in ("attention", "mlp"):
        layers = sorted(selected[part])
        if not layers or layers != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(
                f"targets/ignore select {part} in layers {layers or 'none'}; MoreauPruningModifier prunes the "
                "attention and the MLP of one contiguous, non-empty range of layers each (attn_layers, mlp_layers): "
                "select whole decoder layers or both blocks of a contiguous range")
        ranges.append((layers[0], layers[-1] + 1))
    return ranges[0], ranges[1]


def calibration_batch(loader, device: torch.device | str = "cpu") -> torch.LongTensor:
    """The token rows of llm-compressor's calibration loader as one batch [n, seq] on ``device``.

    Each item is a dict with ``input_ids`` (and ``attention_mask``: padding is dropped), a tensor,
    or a tuple/list whose first element is the ids. The rows must have the same length once padding
    is dropped (pack or truncate the dataset to one length, e.g. ``max_seq_length``); a ValueError
    says which lengths were found otherwise.
    """
    rows: list[torch.Tensor] = []
    for item in loader:
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"calibration batches need 'input_ids'; got keys {sorted(item)}")
            ids, mask = item["input_ids"], item.get("attention_mask")
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            ids, mask = item[0], None
        elif isinstance(item, torch.Tensor):
            ids, mask = item, None
        else:
            raise ValueError(f"calibration batches must be dicts with 'input_ids' or tensors; got {type(item).__name__}")
        ids = torch.as_tensor(ids)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        mask = None if mask is None else torch.as_tensor(mask).reshape(ids.shape).bool()
        for i in range(ids.shape[0]):
            rows.append(ids[i] if mask is None else ids[i][mask[i]])
    if not rows:
        raise ValueError("the calibration loader gave no batches")
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(f"the calibration samples have {len(lengths)} different lengths without padding "
                         f"({lengths[0]} to {lengths[-1]} tokens); the Moreau estimate needs rows of one length: "
                         "give oneshot samples of at least max_seq_length tokens, or pack them")
    if lengths[0] < 2:
        raise ValueError("the calibration samples need at least 2 tokens each (the loss predicts the next token)")
    return torch.stack(rows).long().to(device)


def _saving_pruned(save, model, uniform: bool, report: dict | None):
    """llm-compressor's ``save_pretrained`` followed by what makes the directory describe the pruned
    model: the per-layer config and modeling file (unless ``uniform``: the stock config transformers
    wrote is right then) and the pruning report."""

    @wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        if not uniform:
            pruned_config_dict(model)  # refuses a model it cannot describe, before anything is written
        save(save_directory, *args, **kwargs)
        out = Path(save_directory)
        if not uniform:
            # described after the save: llm-compressor re-ties a head equal to the embedding (one that oneshot
            # untied) and sets tie_word_embeddings while saving, and writes the one table
            config = pruned_config_dict(model)
            written = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
            if "quantization_config" in written:  # added by a quantization modifier of the recipe
                config["quantization_config"] = written["quantization_config"]
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=json_default) + "\n",
                                           encoding="utf-8")
            (out / MODELING_FILE).write_text(render_modeling_file(config[BASE_ARCH_KEY]), encoding="utf-8")
        if report is not None:
            (out / PRUNING_INFO_FILE).write_text(json.dumps(report, indent=2, default=json_default) + "\n",
                                                 encoding="utf-8")

    save_pretrained._overridden = True  # llm-compressor must not wrap it again
    save_pretrained._moreau = True
    return save_pretrained


ModifierFactory.register(NAME, MoreauPruningModifier)
