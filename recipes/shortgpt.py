"""ShortGPT baseline: remove the n lowest-Block-Influence layers in one shot, then recover with the same budget,
LoRA and distillation as recipes/iterabre.py, so the two compare fairly.

    accelerate launch recipes/shortgpt.py --config recipes/configs/shortgpt_smollm2.yaml
    python recipes/shortgpt.py --n_remove 2 --recovery_tokens 8192 --output_dir runs/try

The flags are recipes/iterabre.py's with ShortGPT's fields (`n_remove`, `per_stage`) as the method's, and
`recovery_tokens` as the budget. Writes what recipes/iterabre.py writes: `<output_dir>/model` (an hf-prune export),
`train_log.json` and `eval.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import iterabre  # noqa: E402

from hf_prune.methods.shortgpt import ShortGPT  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """recipes/iterabre.py's `main` with ShortGPT as the method; returns the report written to eval.json."""
    return iterabre.main("shortgpt", ShortGPT, argv)


if __name__ == "__main__":
    main()
