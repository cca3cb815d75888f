"""MoreauPruner for LLaMA-family models: Moreau-envelope importance and structural pruning.

The pieces, each usable on its own:

* :func:`moreau_estimate` (``estimator``): the Moreau gradient estimate Ĝ (SPEC §2/§3).
* :func:`discover` (``structure``): heads, KV groups and MLP channels of a LLaMA/Mistral/Qwen2 model.
* :func:`model_scores` (``importance``): per-unit scores from Ĝ, the gradient or the weights.
* :func:`prune_structure` (``prune``): local or global structural pruning from the scores.
* :func:`prune_model` (``pruner``): all of the above in one call; ``compensate=CompensateConfig()``
  refits the weights that stay (``compensate``: closed-form least squares on calibration activations).
* :func:`estimate` (``lean``): the estimate on the lean path (no gradient buffer), with memory planning.
* :func:`unstructured_prune` (``unstructured``), :func:`taylor_scores` (``taylor``, LLM-Pruner's
  variants), :func:`allocate` (``allocation``: OWL, AlphaPruning, FARMS per-layer ratios).
* :func:`save_pruned` / :func:`load_pruned` (``io``): reloadable safetensors directories.
* :func:`save_uniform` (``export``): a uniformly pruned model as a stock Llama/Mistral/Qwen2 directory.
"""
from .prune.allocation import allocate
from .estimate.estimator import EstimatorError, MoreauConfig, MoreauResult, gradient, moreau_estimate
from .score.importance import HEAD_SCORES, METHODS, REDUCTIONS, LayerScores, model_scores
from .prune.plan import PruneConfig, PruneReport, count_parameters, prune_structure, ratio_for_params
from .prune.pruner import PruneResult, compute_scores, prune_model
from .prune.compensate import CompensateConfig
from .io.pruned import load_pruned, save_pruned
from .io.stock import save_uniform
from .estimate.lean import estimate, plan_memory
from .model.structure import ModelStructure, UnsupportedArchitecture, discover
from .score.taylor import taylor_scores
from .unstructured.prune import unstructured_prune

__all__ = [
    "CompensateConfig", "EstimatorError", "HEAD_SCORES", "LayerScores", "METHODS", "ModelStructure", "MoreauConfig", "MoreauResult",
    "PruneConfig", "PruneReport", "PruneResult", "REDUCTIONS", "UnsupportedArchitecture", "compute_scores",
    "count_parameters", "discover", "gradient", "model_scores", "moreau_estimate", "prune_model", "prune_structure",
    "ratio_for_params", "allocate",
    "estimate", "plan_memory", "load_pruned", "save_pruned", "save_uniform", "taylor_scores", "unstructured_prune",
]
__version__ = "0.1.0"
