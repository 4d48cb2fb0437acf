"""The Trainer face of hf-prune (installed as `hf_prune.callbacks`): prune between recovery stages of a
`transformers.Trainer` or `trl.SFTTrainer`, rebuild what pruning invalidates, resume pruned checkpoints."""

from .eval import EvalCallback, EvalConfig
from .prune import STAGE_PREFIX, PruneCallback, PruneSchedule, carry_optimizer_state, load_for_resume, prune_and_train

__all__ = ["EvalCallback", "EvalConfig", "STAGE_PREFIX", "PruneCallback", "PruneSchedule", "carry_optimizer_state", "load_for_resume",
           "prune_and_train"]
