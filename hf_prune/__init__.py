"""hf-prune: structured pruning of LLMs inside the Hugging Face stack.

Importing the package registers the pruned config/model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained` loads every format hf-prune writes.
"""

from . import modeling  # noqa: F401  (registers Auto classes)
from .arch import SUPPORTED_MODEL_TYPES, get_adapter
from .plan import PlanError, PrunePlan
from .surgery import apply, compact_zeros, predicted_num_parameters

__version__ = "0.1.0"

__all__ = ["SUPPORTED_MODEL_TYPES", "PlanError", "PrunePlan", "apply", "compact_zeros", "get_adapter", "predicted_num_parameters"]
