"""Run by tests/test_sharded.py under `torchrun --nproc_per_node 2` (CPU, gloo): a tiny Llama sharded with FSDP2's
`fully_shard`, trained by a hand-written loop, pruned between two training stages by
`PruneCallback.prune_sharded_model` (the function the Trainer route under accelerate's FSDP2 plugin calls), re-sharded
with `hf_prune.sharded.shard_pruned`, its surviving optimizer state loaded with `load_optimizer_state`, trained on.

    fsdp2_prune_script.py OUT train [--lora] [--method pip] [--host-bytes N]
        train 4 steps, prune (ShortGPT: two layers; PIP: MLP channels, widths per layer), train 6 steps, writing a
        post-pruning checkpoint OUT/ckpt after the 3rd of them; --host-bytes: the main host's memory for the gather
        (too little drops the optimizer state)
    fsdp2_prune_script.py OUT resume
        load OUT/ckpt, re-shard, train the last 3 steps again
    fsdp2_prune_script.py OUT trainer        (needs CUDA: the Trainer refuses FSDP on the CPU)
        Trainer + accelerate's FSDP2 plugin + PruneCallback(ShortGPT, two stages) through prune_and_train
    fsdp2_prune_script.py OUT trainer_resume (needs CUDA) a fresh Trainer resumed from OUT/trainer/prune-stage-1

Each rank writes what it ended with to OUT/<mode>_rank<r>.json (losses, architecture, sha256 of the full weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from tiny import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from hf_prune.callbacks import PruneCallback, load_for_resume
from hf_prune.methods.pip import PIP
from hf_prune.methods.shortgpt import ShortGPT
from hf_prune.sharded import gather_full_model, gather_to_main, load_optimizer_state, shard_model, shard_pruned
from hf_prune.surgery import layer_widths

LR = 3e-3
BEFORE, AFTER, CKPT_AT = 4, 6, 3  # training steps before the stage, after it, and where the checkpoint is taken


def batches(rank: int) -> list[torch.Tensor]:
    """Two global batches of 4 rows (the same on every rank); each rank trains on its 2 rows."""
    data = torch.randint(4, 300, (8, 16), generator=torch.Generator().manual_seed(1))
    return [data[4 * b + 2 * rank: 4 * b + 2 * rank + 2] for b in range(2)]


def train(model, opt, rank: int, steps: int) -> list[float]:
    losses = []
    mine = batches(rank)
    for step in range(steps):
        ids = mine[step % len(mine)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


def full_weights_sha(model) -> tuple[str, dict]:
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # full tensors on every rank
    digest = hashlib.sha256()
    for name, tensor in sorted(sd.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest(), {k: list(v.shape) for k, v in sd.items()}


def full_optimizer_state(model, opt) -> dict[str, dict]:
    """The optimizer state by parameter name, full tensors on every rank."""
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))["state"]


def compare_carried(before: dict[str, dict], after: dict[str, dict], kept_original: list[int]) -> dict[str, int]:
    """Carried states equal, bit for bit, to the state of the same parameter before the stage (layer i now is
    layer kept_original[i] before)."""
    def old_name(name: str) -> str:
        parts = name.split(".")
        if "layers" in parts:
            k = parts.index("layers") + 1
            parts[k] = str(kept_original[int(parts[k])])
        return ".".join(parts)

    equal = differ = 0
    for name, st in after.items():
        old = before[old_name(name)]
        same = all(torch.equal(v, old[k]) for k, v in st.items() if torch.is_tensor(v))
        equal, differ = equal + same, differ + (not same)
    return {"equal": equal, "differ": differ}


def save_checkpoint(model, opt, path: str, step: int) -> None:
    """A post-pruning checkpoint of the sharded run: the gathered model (safetensors + config) and its optimizer
    state by parameter name, written by the main process."""
    gathered = gather_to_main(model, opt)
    if dist.get_rank() == 0:
        gathered.model.save_pretrained(path)
        torch.save({"step": step, "optimizer": gathered.optimizer_state}, os.path.join(path, "sharded_optimizer.pt"))
    dist.barrier()


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=True)


def run_train(out: str, rank: int, lora: bool, method: str, host_bytes: int | None) -> dict:
    model = tiny_model("llama", num_hidden_layers=4).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    shard_model(model)
    opt = make_optimizer(model)
    before = train(model, opt, rank, BEFORE)
    calibration = torch.randint(4, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    pruner = {"shortgpt": lambda: ShortGPT(n_remove=2, per_stage=2, progress=False),
              "pip": lambda: PIP(target=0.25, steps=1, perturbation="embedding", progress=False),
              # scoring fails on the main process (no tokenizer for character perturbations): every rank must raise
              "failing": lambda: PIP(target=0.25, steps=1, perturbation="chars", progress=False)}[method]()
    cb = PruneCallback(pruner, calibration=calibration)
    state_before = full_optimizer_state(model, opt)
    stage, record = cb.prune_sharded_model(model, opt, max_host_bytes=host_bytes)
    del model, opt
    model = stage.model
    if stage.peft_config is not None:
        from peft import get_peft_model

        torch.manual_seed(1)  # the same fresh adapter on every rank
        model = get_peft_model(model, stage.peft_config)
    model = shard_pruned(model)
    opt = make_optimizer(model)
    loaded = load_optimizer_state(model, opt, stage.optimizer_state)
    # (with nothing loaded, reading the state would make torch initialise it with a zero step: skip the comparison)
    carried = compare_carried(state_before, full_optimizer_state(model, opt), cb.kept_original) if loaded else None
    after = train(model, opt, rank, CKPT_AT)
    save_checkpoint(model, opt, os.path.join(out, "ckpt"), BEFORE + CKPT_AT)
    after += train(model, opt, rank, AFTER - CKPT_AT)
    sha, shapes = full_weights_sha(model)
    plain = gather_full_model(model)  # what a recipe evaluates and exports on every rank (LoRA merged)
    digest = hashlib.sha256()
    for name, tensor in sorted(plain.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "gathered_sha256": digest.hexdigest(), "gathered_class": type(plain).__name__,
        "losses_before": before, "losses_after": after, "record": record, "optimizer_states_loaded": loaded,
        "carried_state": carried, "optimizer_params": sum(len(g["params"]) for g in opt.param_groups),
        "num_layers": base.config.num_hidden_layers, "widths": layer_widths(base), "weights_sha256": sha,
        "shapes": shapes, "kept_original": cb.kept_original, "stages_done": cb.stages_done,
        "sharded_class": type(model).__name__,
    }


def run_resume(out: str, rank: int) -> dict:
    ckpt = os.path.join(out, "ckpt")
    model = load_for_resume(ckpt).train()  # the pruned architecture, from the checkpoint's config
    model = shard_pruned(model)
    opt = make_optimizer(model)
    saved = torch.load(os.path.join(ckpt, "sharded_optimizer.pt"), weights_only=False) if rank == 0 else None
    loaded = load_optimizer_state(model, opt, saved["optimizer"] if saved else None)
    losses = train(model, opt, rank, AFTER - CKPT_AT)  # the same batches as the uninterrupted run after its checkpoint
    sha, shapes = full_weights_sha(model)
    return {"losses_after": losses, "optimizer_states_loaded": loaded, "weights_sha256": sha, "shapes": shapes,
            "num_layers": model.config.num_hidden_layers}


def _trainer(out: str, model):
    from transformers import Trainer, TrainingArguments

    from hf_prune.callbacks import PruneSchedule
    from hf_prune.data import blocks_dataset

    blocks = torch.randint(4, 300, (16, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=2, num_train_epochs=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        optim="adamw_torch", fsdp="full_shard",
        fsdp_config={"version": 2, "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT",
                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=2, at_start=False))
    return Trainer(model=model, args=args, train_dataset=blocks_dataset(blocks), callbacks=[cb])


def run_trainer(out: str, rank: int, resume: bool) -> dict:
    from hf_prune.callbacks import prune_and_train

    stage_dir = os.path.join(out, "trainer", "prune-stage-1")
    model = load_for_resume(stage_dir) if resume else tiny_model("llama", num_hidden_layers=5)
    trainer = _trainer(out, model.train())
    prune_and_train(trainer, resume_from_checkpoint=stage_dir if resume else None)
    sha, shapes = full_weights_sha(trainer.model)
    return {"num_layers": unwrap(trainer.model).config.num_hidden_layers, "weights_sha256": sha, "shapes": shapes,
            "log_history": trainer.state.log_history, "sharded_class": type(trainer.model).__name__}


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def main(out: str, mode: str, lora: bool, method: str, host_bytes: int | None) -> None:
    torch.set_num_threads(1)
    if mode.startswith("trainer"):  # the Trainer (accelerate) starts the process group itself, on the GPUs
        result = run_trainer(out, int(os.environ["RANK"]), resume=mode == "trainer_resume")
        with open(os.path.join(out, f"{mode}_rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(result, f)
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = run_train(out, rank, lora, method, host_bytes) if mode == "train" else run_resume(out, rank)
    result["world_size"] = dist.get_world_size()
    with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    flags = sys.argv[3:]
    main(sys.argv[1], sys.argv[2], "--lora" in flags, flags[flags.index("--method") + 1] if "--method" in flags
         else "shortgpt", int(flags[flags.index("--host-bytes") + 1]) if "--host-bytes" in flags else None)
