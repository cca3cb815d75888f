"""MoreauPruner for LLaMA-family models: Moreau-envelope importance and structural pruning.

The pipeline (:mod:`moreau_pruner.pipeline`) and where each stage lives:

* load: :func:`load_model` (``model.loading``): the embedded SmolLM2, GGUF files, HF and pruned directories.
* resolve: :func:`resolve_target` (``prune.target``): heads, KV groups and MLP channels (``model.structure``)
  and the layer ranges of a :class:`PruneConfig`, once.
* estimate: :func:`estimate` (``estimate``): the Moreau gradient estimate Ĝ (SPEC §2/§3) with a memory
  strategy (reference, lean, regen; fsdp on FSDP2 shards).
* score: :func:`compute_scores` (``score.registry``): unit scores by method (:data:`METHODS`).
* plan and apply: :func:`prune_structure` (``prune.plan``, ``prune.apply``): local, global or uniform.
* one call: :func:`prune_model` (``pipeline``): all of the above, with per-layer allocation
  (``prune.allocation``), iterative rounds and the policy-gradient search (:class:`PolicyConfig`);
  :func:`unstructured_prune` (``unstructured``) zeroes single weights instead.
* compensate: ``prune_model(..., compensate=CompensateConfig())`` refits the weights that stay
  (``prune.compensate``: closed-form least squares on calibration activations, SPEC §11).
* evaluate: :func:`evaluate_perplexity` (``evaluate.perplexity``); zero-shot tasks in ``evaluate.zeroshot``.
* save: :func:`save_pruned` / :func:`load_pruned` (``io.pruned``), :func:`save_uniform` (``io.stock``).
* recover: ``recover`` with a :class:`RecoverConfig` (LoRA fine-tuning).
"""
from .estimate import EstimatorError, MoreauConfig, MoreauResult, estimate
from .evaluate.perplexity import evaluate_perplexity
from .io.pruned import load_pruned, save_pruned
from .io.stock import save_uniform
from .model.loading import load_model
from .model.structure import UnsupportedArchitecture, discover
from .pipeline import prune_model
from .prune.apply import PruneResult, prune_structure
from .prune.compensate import CompensateConfig
from .prune.config import PruneConfig
from .prune.plan import count_parameters, ratio_for_params
from .prune.policy import PolicyConfig
from .prune.target import PruneTarget, resolve_target
from .recover.train import RecoverConfig
from .score.methods import METHODS
from .score.registry import compute_scores
from .unstructured.prune import unstructured_prune

__all__ = [
    "METHODS", "CompensateConfig", "EstimatorError", "MoreauConfig", "MoreauResult", "PolicyConfig", "PruneConfig", "PruneResult",
    "PruneTarget", "RecoverConfig", "UnsupportedArchitecture", "compute_scores", "count_parameters", "discover",
    "estimate", "evaluate_perplexity", "load_model", "load_pruned", "prune_model", "prune_structure",
    "ratio_for_params", "resolve_target", "save_pruned", "save_uniform", "unstructured_prune",
]
__version__ = "0.1.0"
