"""Run by tests/test_callback.py under `torchrun --nproc_per_node 2` (CPU, gloo): two ShortGPT stages inside a
DDP Trainer; each rank writes what it ended with to <out>/rank<r>.json."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from tiny import tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train
from hf_prune.data import blocks_dataset
from hf_prune.methods.shortgpt import ShortGPT
from hf_prune.surgery import layer_widths


class WrapperProbe(TrainerCallback):
    """Counts train() calls whose DDP wrapper wraps the current (pruned) model."""

    def __init__(self):
        self.trainer = None
        self.wrapped = 0
        self.wrappers: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        w = self.trainer.model_wrapped
        if isinstance(w, torch.nn.parallel.DistributedDataParallel) and w.module is self.trainer.model:
            self.wrapped += 1
            self.wrappers.add(id(w))


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=5).train()
    blocks = torch.randint(4, 300, (16, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, num_train_epochs=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch",
        ddp_find_unused_parameters=False, ddp_backend="gloo",
    )
    probe = WrapperProbe()
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=2, at_start=False))
    trainer = Trainer(model=model, args=args, train_dataset=blocks_dataset(blocks), callbacks=[cb, probe])
    probe.trainer = trainer
    prune_and_train(trainer)
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", 0))
    result = {
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "num_layers": trainer.model.config.num_hidden_layers,
        "widths": layer_widths(trainer.model),
        "weights_sha256": digest.hexdigest(),
        "log_history": trainer.state.log_history,
        "ddp_wrapped_trainings": probe.wrapped if len(probe.wrappers) == probe.wrapped else -1,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
