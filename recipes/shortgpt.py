"""ShortGPT baseline: remove the n lowest-Block-Influence layers in one shot, then recover with the same budget,
LoRA and distillation as recipes/iterabre.py, so the two compare fairly.

    accelerate launch recipes/shortgpt.py --config recipes/configs/shortgpt_smollm2.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iterabre import main  # noqa: E402

from hf_prune.methods.shortgpt import ShortGPT  # noqa: E402

if __name__ == "__main__":
    main("shortgpt", ShortGPT)
