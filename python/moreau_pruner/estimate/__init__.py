"""The Moreau estimate (SPEC §2/§3): one loop (:mod:`.loop`) with memory strategies
(:mod:`.strategies`), the plain gradients (:mod:`.gradients`), memory plans (:mod:`.memory`,
:mod:`.plans`) and the live-tensor tracker (:mod:`.memtrack`)."""
from .config import EstimatorError, MoreauConfig, MoreauResult
from .gradients import fisher_diagonal, gradient, per_sample_gradient_sum
from .loop import estimate
from .memory import MemoryPlan, MemoryPlanError, check_fits, plan_memory
from .runner import Runner, lm_loss
from .strategies import FsdpStrategy, Lean, Reference, Regen, Strategy

__all__ = ["EstimatorError", "FsdpStrategy", "Lean", "MemoryPlan", "MemoryPlanError", "MoreauConfig", "MoreauResult",
           "Reference", "Regen", "Runner", "Strategy", "check_fits", "estimate", "fisher_diagonal", "gradient",
           "lm_loss", "per_sample_gradient_sum", "plan_memory"]
