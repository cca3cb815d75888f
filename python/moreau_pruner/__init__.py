"""MoreauPruner for LLaMA-family models: Moreau-envelope importance and structural pruning.

The pieces, each usable on its own:

* :func:`moreau_estimate` (``estimator``): the Moreau gradient estimate Ĝ (SPEC §2/§3).
* :func:`discover` (``structure``): heads, KV groups and MLP channels of a LLaMA/Mistral/Qwen2 model.
* :func:`model_scores` (``importance``): per-unit scores from Ĝ, the gradient or the weights.
* :func:`prune_structure` (``prune``): local or global structural pruning from the scores.
* :func:`prune_model` (``pruner``): all of the above in one call.
"""
from .estimator import EstimatorError, MoreauConfig, MoreauResult, gradient, moreau_estimate
from .importance import METHODS, REDUCTIONS, LayerScores, model_scores
from .prune import PruneConfig, PruneReport, count_parameters, prune_structure
from .pruner import PruneResult, compute_scores, prune_model
from .structure import ModelStructure, UnsupportedArchitecture, discover

__all__ = [
    "EstimatorError", "LayerScores", "METHODS", "ModelStructure", "MoreauConfig", "MoreauResult", "PruneConfig",
    "PruneReport", "PruneResult", "REDUCTIONS", "UnsupportedArchitecture", "compute_scores", "count_parameters",
    "discover", "gradient", "model_scores", "moreau_estimate", "prune_model", "prune_structure",
]
__version__ = "0.1.0"
