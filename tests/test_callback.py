"""PruneCallback + prune_and_train inside Trainer / SFTTrainer, the KD loss, resuming, and a 2-process DDP run."""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, get_scheduler

from hf_prune.callbacks import PruneCallback, PruneSchedule, load_for_resume, prune_and_train
from hf_prune.callbacks.prune import _raw_optimizer
from hf_prune.data import blocks_dataset
from hf_prune.distill import DistillationLoss, kd_token_losses
from hf_prune.methods.shortgpt import ShortGPT

HERE = Path(__file__).parent
VOCAB = 300


def _blocks(n: int = 12, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        optim="adamw_torch",
    )
    base.update(kw)
    return TrainingArguments(**base)


def _records(history: list[dict]) -> list[dict]:
    return [h for h in history if "prune/stage" in h]


class Probe(TrainerCallback):
    """Watches every train() call: the optimizer it starts with and what the first step does to the weights."""

    def __init__(self):
        self.trainer = None
        self.begins: list[dict] = []
        self.refs: dict[str, weakref.ref] = {}
        self._snapshot = None

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        raw = _raw_optimizer(t.optimizer)
        trainable = [p for p in t.model.parameters() if p.requires_grad]
        if not self.refs:  # the model as it is before any pruning stage
            self.refs = {n: weakref.ref(p) for n, p in t.model.named_parameters()}
        self.begins.append({
            "step": state.global_step,
            "optimizer": (type(raw), {k: raw.defaults.get(k) for k in ("fused", "foreach", "lr", "weight_decay")}),
            "in_optimizer": {id(p) for g in raw.param_groups for p in g["params"]},
            "trainable": {id(p) for p in trainable},
            "trainable_names": {n for n, p in t.model.named_parameters() if p.requires_grad},
            "state_steps": [float(raw.state[p]["step"]) for p in trainable if p in raw.state],
            "frozen": {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad},
            "checkpointing": [bool(getattr(layer, "gradient_checkpointing", False))
                              for layer in t.model.get_base_model().model.layers] if hasattr(t.model, "get_base_model")
            else [bool(getattr(layer, "gradient_checkpointing", False)) for layer in t.model.model.layers],
        })
        self._snapshot = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, **kwargs):
        if self._snapshot is None:
            return
        t, info = self.trainer, self.begins[-1]
        named = dict(t.model.named_parameters())
        info["changed"] = {n for n, before in self._snapshot.items() if not torch.equal(before, named[n].detach())}
        info["unchanged_frozen"] = all(torch.equal(v, named[n].detach()) for n, v in info["frozen"].items())
        raw = _raw_optimizer(t.optimizer)
        info["state_shapes_ok"] = all(
            v.shape == p.shape for p, st in raw.state.items() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
        )
        self._snapshot = None


def _train_full(out: Path, optim: str):
    model = tiny_model("llama", num_hidden_layers=5).train()
    blocks = _blocks()
    probe = Probe()
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=2, at_start=False))
    # 12 blocks / batch 4 = 3 steps per epoch, 2 epochs: stages after steps 2 and 4 (both mid-epoch), checkpoint at 5
    trainer = Trainer(model=model, args=_args(out, optim=optim, save_strategy="steps", save_steps=5),
                      train_dataset=blocks_dataset(blocks), callbacks=[cb, probe])
    probe.trainer = trainer
    prune_and_train(trainer)
    return trainer, probe


@pytest.fixture(scope="module", params=["adamw_torch", "adamw_torch_fused"])
def full_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    trainer, probe = _train_full(out, request.param)
    return out, trainer, probe


def test_rebuilt_optimizer_trains_the_pruned_model(full_run):
    out, trainer, probe = full_run
    recs = _records(trainer.state.log_history)
    assert [r["prune/stage"] for r in recs] == [1, 2] and [r["step"] for r in recs] == [2, 4]
    assert trainer.model.config.num_hidden_layers == len(trainer.model.model.layers) == 3
    assert len(probe.begins) == 3  # one train() call per recovery stage
    first = probe.begins[0]
    for info in probe.begins[1:]:
        assert info["optimizer"] == first["optimizer"]  # same class, same fused / foreach choice
        assert info["in_optimizer"] == info["trainable"]  # exactly the pruned model's parameters
        # Adam state of every surviving parameter was carried over, not reset
        assert len(info["state_steps"]) == len(info["trainable"])
        assert all(s == info["step"] for s in info["state_steps"])
        assert info["changed"] == info["trainable_names"]  # every weight moved at the next step
        assert info["state_shapes_ok"]
    assert [r["prune/optimizer_states_kept"] for r in recs] == [len(b["trainable"]) for b in probe.begins[1:]]
    # no reference to a removed parameter survives anywhere (optimizer, scheduler, accelerate, DDP wrapper)
    removed = [i for r in recs for i in json.loads(r["prune/removed_original_layers"])]
    assert len(removed) == 2
    gc.collect()
    dead = [n for n, ref in probe.refs.items() if any(n.startswith(f"model.layers.{i}.") for i in removed)]
    assert dead and all(probe.refs[n]() is None for n in dead)
    alive = [n for n in probe.refs if n.startswith("model.layers.") and n not in dead]
    assert alive and all(probe.refs[n]() is not None for n in alive)


def test_training_continues_at_the_schedule_position(full_run):
    out, trainer, probe = full_run
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5, 6]  # loss logged before and after every stage
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=trainer.args.learning_rate)
    sched = get_scheduler(trainer.args.lr_scheduler_type, ref_opt, num_warmup_steps=0, num_training_steps=6)
    want = []
    for _ in range(6):
        want.append(sched.get_last_lr()[0])
        ref_opt.step()
        sched.step()
    assert [h["learning_rate"] for h in logs] == pytest.approx(want, rel=1e-9)
    assert [round(h["epoch"], 6) for h in logs] == [round(s / 3, 6) for s in range(1, 7)]


def test_resume_from_a_checkpoint_written_after_pruning(full_run, tmp_path):
    out, trainer, probe = full_run
    ckpt = out / "checkpoint-5"
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "prune-stage-2" / "prune_plan.json").is_file()
    model = load_for_resume(ckpt)
    assert model.config.num_hidden_layers == 3
    blocks = _blocks()
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=2, at_start=False))
    resumed = Trainer(model=model, args=_args(out, optim=trainer.args.optim), train_dataset=blocks_dataset(blocks),
                      callbacks=[cb])
    prune_and_train(resumed, resume_from_checkpoint=str(ckpt))
    assert cb.stages_done == 2 and resumed.state.global_step == 6
    assert len(_records(resumed.state.log_history)) == 2  # no stage repeated
    assert any(h.get("step") == 6 and "loss" in h for h in resumed.state.log_history)
    # same data position, optimizer state and schedule: step 6 gives the uninterrupted run's weights
    original = trainer.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, original[name], msg=name)
    # the final save is the surgery's format: plain from_pretrained, same logits
    resumed.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    resumed.model.eval()
    ids = blocks[:2]
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - resumed.model(input_ids=ids.to(resumed.model.device)).logits).abs()
    assert reloaded.config.num_hidden_layers == 3 and float(diff.max()) <= 1e-5


class StageProbe(TrainerCallback):
    """After each pruning stage (seen in the logs), checks the next optimizer step against the rebuilt optimizer."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.pending, self.checks = trainer_ref, None, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "prune/stage" in logs:
            t = self.trainer_ref()
            self.pending = {n: p.detach().clone() for n, p in t.model.named_parameters()}
            self.pending_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.pending is None or state.global_step <= self.pending_step:  # the step that pruned
            return
        t = self.trainer_ref()
        raw = _raw_optimizer(t.optimizer)
        params = list(t.model.parameters())
        self.checks.append({
            "step": state.global_step,
            "all_in_optimizer": {id(p) for g in raw.param_groups for p in g["params"]} == {id(p) for p in params},
            "all_changed": all(not torch.equal(self.pending[n], p.detach()) for n, p in t.model.named_parameters()),
            "state_shapes_ok": all(v.shape == p.shape for p, st in raw.state.items() for v in st.values()
                                   if torch.is_tensor(v) and v.dim() > 0) and len(raw.state) == len(params),
        })
        self.pending = None


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_plain_train_call_prunes_inside_the_loop(tmp_path, optim):
    """DESIGN.md's story: trainer.add_callback(PruneCallback(...)); trainer.train() -- one process, full fine-tuning."""
    blocks = _blocks()
    trainer = Trainer(model=tiny_model("llama", num_hidden_layers=5).train(),
                      args=_args(tmp_path, optim=optim, lr_scheduler_type="linear", save_strategy="steps",
                                 save_steps=5), train_dataset=blocks_dataset(blocks))
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=2, at_start=False))
    probe = StageProbe(weakref.ref(trainer))
    trainer.add_callback(cb)
    trainer.add_callback(probe)
    trainer.train()
    assert trainer.model.config.num_hidden_layers == 3 and len(trainer.model.model.layers) == 3
    recs = _records(trainer.state.log_history)
    assert [r["step"] for r in recs] == [2, 4] and [r["prune/num_layers"] for r in recs] == [4, 3]
    assert [c["step"] for c in probe.checks] == [3, 5]
    assert all(c["all_in_optimizer"] and c["all_changed"] and c["state_shapes_ok"] for c in probe.checks)
    # the linear schedule continued where it was: lr = lr0 * (1 - (step - 1) / max_steps) at every logged step
    lrs = [(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) == 6
    for step, lr in lrs:
        assert lr == pytest.approx(1e-3 * (1 - (step - 1) / 6), rel=1e-6)
    # the step-5 checkpoint holds the pruned model and the final save reloads with the same logits
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-5").config.num_hidden_layers == 3
    trainer.save_model(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=blocks[:2]).logits,
                                   trainer.model.eval()(input_ids=blocks[:2]).logits)


def test_plain_train_call_is_refused_where_the_loop_cannot_be_rebuilt(tmp_path):
    from peft import LoraConfig, get_peft_model

    blocks = _blocks(4)
    model = get_peft_model(tiny_model("llama").train(),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    cb = PruneCallback(ShortGPT(n_remove=1, progress=False), calibration=blocks)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=blocks_dataset(blocks), callbacks=[cb])
    with pytest.raises(RuntimeError, match="PEFT model.*prune_and_train"):
        trainer.train()


def test_lora_is_merged_pruned_and_reattached(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    blocks = _blocks(8)
    model = get_peft_model(tiny_model("llama", num_hidden_layers=4).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    probe = Probe()
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(epochs=[0, 1]))
    trainer = Trainer(model=model, args=_args(tmp_path, learning_rate=1e-2, activation_checkpointing=True),
                      train_dataset=blocks_dataset(blocks), callbacks=[cb, probe])
    probe.trainer = trainer
    prune_and_train(trainer)
    assert isinstance(trainer.model, PeftModel) and trainer.model is not model
    assert trainer.model.get_base_model().config.num_hidden_layers == 2
    recs = _records(trainer.state.log_history)
    assert [r["step"] for r in recs] == [0, 2]
    for info in probe.begins:
        assert info["trainable_names"] and all("lora_" in n for n in info["trainable_names"])
        assert info["in_optimizer"] == info["trainable"]
        assert info["unchanged_frozen"]  # the merged base stays frozen
        assert info["checkpointing"] and all(info["checkpointing"])  # re-enabled on the pruned, re-wrapped model
        # the fresh adapter trains at the next step (lora_A gets no gradient while lora_B is still zero)
        assert {n for n in info["trainable_names"] if "lora_B" in n} <= info["changed"]
    stage2 = tmp_path / "prune-stage-2"
    assert (stage2 / "base_model" / "config.json").is_file() and (stage2 / "adapter_config.json").is_file()
    reloaded = load_for_resume(stage2).eval()
    assert isinstance(reloaded, PeftModel)
    # the stage checkpoint holds the fresh adapter (lora_B = 0) on the merged, pruned base it names
    base_only = AutoModelForCausalLM.from_pretrained(str(stage2 / "base_model")).eval()
    ids = blocks[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, base_only(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_sft_trainer_with_distillation(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    blocks = _blocks(8)
    student = tiny_model("llama", num_hidden_layers=4).train()
    kd = DistillationLoss(copy.deepcopy(student), temperature=2.0, alpha=0.5)
    cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_epochs=1), distillation=kd)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                     max_length=32, packing=False, optim="adamw_torch")
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": blocks.tolist()})
    trainer = SFTTrainer(model=student, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
    prune_and_train(trainer)
    assert trainer.compute_loss_func is kd
    assert trainer.model.config.num_hidden_layers == 2
    hist = trainer.state.log_history
    recs = _records(hist)
    assert [r["step"] for r in recs] == [0, 2]
    losses = [h for h in hist if "loss" in h]
    assert [h["step"] for h in losses] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in losses)


# ----- knowledge distillation -----------------------------------------------------------------------------------


def test_kd_loss_equals_hand_computed_kl():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = _blocks(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    T, alpha = 2.0, 0.7
    kd = DistillationLoss(teacher, temperature=T, alpha=alpha, student=student)
    out = student(input_ids=ids, attention_mask=mask)
    got = kd(out, labels)
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits
    zs = out.logits.detach()
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] == -100:
                continue
            ps, pt = torch.softmax(zs[b, t].double() / T, -1), torch.softmax(zt[b, t].double() / T, -1)
            kl_sum += float((pt * (pt.log() - ps.log())).sum()) * T * T
            ce_sum += float(-torch.log_softmax(zs[b, t].double(), -1)[labels[b, t + 1]])
            n += 1
    assert n == 8
    assert got.item() == pytest.approx((alpha * kl_sum + (1 - alpha) * ce_sum) / n, rel=1e-5)
    # the Trainer's num_items_in_batch (tokens of the whole accumulated batch) is the divisor when given
    student(input_ids=ids, attention_mask=mask)
    assert kd(out, labels, num_items_in_batch=torch.tensor(20)).item() == pytest.approx(
        (alpha * kl_sum + (1 - alpha) * ce_sum) / 20, rel=1e-5)
    assert float(kd_token_losses(zs[0, :1], zs[0, :1], T).abs().max()) < 1e-6


def test_kd_loss_needs_attached_inputs_and_valid_settings():
    teacher = tiny_model("llama")
    kd = DistillationLoss(teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(RuntimeError, match="attach"):
        kd(type("O", (), {"logits": torch.zeros(1, 3, 5)})(), None)
    with pytest.raises(ValueError, match="temperature=0"):
        DistillationLoss(teacher, temperature=0)
    with pytest.raises(ValueError, match="alpha=1.5"):
        DistillationLoss(teacher, alpha=1.5)


def test_kd_through_trainer_is_zero_against_an_identical_teacher(tmp_path):
    student = tiny_model("llama").train()
    kd = DistillationLoss(copy.deepcopy(student), temperature=2.0).attach(student)
    blocks = _blocks(4)
    trainer = Trainer(model=student, args=_args(tmp_path, num_train_epochs=1, learning_rate=1e-2),
                      train_dataset=blocks_dataset(blocks), compute_loss_func=kd)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and abs(losses[0]) < 1e-6  # teacher ran on exactly the student's batch


# ----- schedule ----------------------------------------------------------------------------------------------------


def test_schedule_validation_and_boundaries():
    assert PruneSchedule().every_n_epochs == 1 and PruneSchedule().prunes_at_start
    s = PruneSchedule(epochs=[2, 0])
    assert s.epochs == [0, 2] and s.prunes_at_start and s.before_epoch(2) and not s.before_epoch(1)
    s = PruneSchedule(every_n_steps=5, at_start=False)
    assert not s.prunes_at_start and s.at_step(10) and not s.at_step(7) and not s.before_epoch(1)
    with pytest.raises(ValueError, match="one of"):
        PruneSchedule(epochs=[1], every_n_steps=3)
    with pytest.raises(ValueError, match="every_n_steps=0"):
        PruneSchedule(every_n_steps=0)
    with pytest.raises(ValueError, match="epochs="):
        PruneSchedule(epochs=[-1])


def test_callback_rejects_a_user_optimizer(tmp_path):
    model = tiny_model("llama")
    blocks = _blocks(4)
    opt = torch.optim.AdamW(model.parameters())
    cb = PruneCallback(ShortGPT(n_remove=1, progress=False), calibration=blocks)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=blocks_dataset(blocks), callbacks=[cb],
                      optimizers=(opt, None))
    with pytest.raises(ValueError, match="optim"):
        prune_and_train(trainer)


# ----- DDP ---------------------------------------------------------------------------------------------------------


def test_ddp_two_ranks_stay_identical(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)
           + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           str(HERE / "ddp_prune_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["num_layers"] == ranks[1]["num_layers"] == 3
    assert ranks[0]["widths"] == ranks[1]["widths"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # bit-identical
    for r in ranks:
        recs = [h for h in r["log_history"] if "prune/stage" in h]
        assert [h["prune/stage"] for h in recs] == [1, 2]
        for rec in recs:  # training went on after every stage
            assert any("loss" in h and h["step"] > rec["step"] for h in r["log_history"])
        assert r["ddp_wrapped_trainings"] == 3


def test_callback_exports_composed_plan_and_pushes(tmp_path, monkeypatch):
    """PruneCallback(push_to_hub=...): after the last stage the merged LoRA model is saved locally with a plan in
    original indices and a card, then uploaded byte-identical to the (loopback) Hub; the token is written nowhere."""
    from fake_hub import FakeHub
    from peft import LoraConfig, get_peft_model

    from hf_prune import PrunePlan
    from hf_prune.export import load_metadata

    token = "hf_callbackSECRETtoken123"
    blocks = _blocks(8)
    model = get_peft_model(tiny_model("llama", num_hidden_layers=5).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "export"
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                           schedule=PruneSchedule(epochs=[0, 1]), export_dir=out, push_to_hub="me/tiny-2",
                           metadata={"base_model": "org/tiny"})
        trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=blocks_dataset(blocks),
                          processing_class=tiny_tokenizer(), callbacks=[cb])
        prune_and_train(trainer)
        remote = hub.files("me/tiny-2")
    plan = PrunePlan.load(out / "prune_plan.json")
    assert sorted(plan.drop_layers) == sorted(set(range(5)) - set(cb.kept_original)) and len(plan.drop_layers) == 2
    assert len(plan.provenance["stages"]) == 2
    meta = load_metadata(out)
    assert meta.before.num_layers == 5 and meta.after.num_layers == 3 and meta.method == "shortgpt"
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny" in card and "removed" in card
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert remote == local
    assert all(token.encode() not in data for data in local.values())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=blocks[:2]).logits, trainer.model.eval()(input_ids=blocks[:2]).logits)


def test_plain_train_call_prunes_before_each_epoch_with_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    blocks = _blocks()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                     optim="adamw_torch", dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    trainer = SFTTrainer(model=tiny_model("llama", num_hidden_layers=4).train(), args=args,
                         train_dataset=blocks_dataset(blocks), processing_class=tiny_tokenizer())
    trainer.add_callback(PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4]))
    trainer.train()
    recs = _records(trainer.state.log_history)
    assert [r["step"] for r in recs] == [0, 3] and trainer.model.config.num_hidden_layers == 2
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_slicing_through_the_callback_rotates_and_slices_then_trains_and_reloads(tmp_path):
    """SliceGPT as a PruneCallback stage: the rotation happens in plan() (on every rank), apply_slicing cuts the
    shapes, the rebuilt optimizer trains the sliced weights, and the saved model reloads with the same logits."""
    from hf_prune.methods import get
    from hf_prune.rotation import slot_widths

    blocks = _blocks()
    model = tiny_model("llama", num_hidden_layers=3).train()
    cb = PruneCallback(get("slicegpt", slicing=0.25, protect_early="none", progress=False), calibration=blocks[:8],
                       schedule=PruneSchedule(epochs=[0]))
    trainer = Trainer(model=model, args=_args(tmp_path, num_train_epochs=1), train_dataset=blocks_dataset(blocks),
                      callbacks=[cb])
    prune_and_train(trainer)
    assert slot_widths(trainer.model) == [48] * 7  # 64 * 0.75, every slot
    assert _records(trainer.state.log_history)[0]["prune/num_parameters"] < sum(
        p.numel() for p in tiny_model("llama", num_hidden_layers=3).parameters())
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    trainer.save_model(tmp_path / "sliced")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=blocks[:2]).logits,
                                   trainer.model.eval()(input_ids=blocks[:2]).logits, atol=1e-5, rtol=1e-5)


def test_llm_surgeon_shots_get_their_weight_update_inside_plain_train(tmp_path):
    from hf_prune.methods import LLMSurgeon
    from hf_prune.surgery import attach_weight_update, weight_update_of

    class Counting(LLMSurgeon):
        updates = 0
        fractions: list = []

        def plan(self, model, batches, stage=0):
            plan = super().plan(model, batches, stage)
            Counting.fractions.append(plan.provenance["removed_fraction"])
            update = weight_update_of(plan)
            assert update is not None  # the weight update travels with the plan

            def counted(m):
                Counting.updates += 1
                update(m)

            attach_weight_update(plan, counted)
            return plan

    from hf_prune.kfac import decoder_linears

    def prunable(m) -> tuple[int, int]:  # (parameters, zeros) of the decoder's linear layers
        ws = [lin.weight for lin in decoder_linears(m).values()]
        return sum(w.numel() for w in ws), sum(int((w == 0).sum()) for w in ws)

    blocks = _blocks()
    model = tiny_model("llama", num_hidden_layers=3).train()
    dense = sum(p.numel() for p in model.parameters())
    n0, _ = prunable(model)
    method = Counting(target=0.3, target_of="linears", shots=2, mode="structured", verbose=False,
                      compute_dtype="float64")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=blocks_dataset(blocks))
    trainer.add_callback(PruneCallback(method, calibration=blocks[:4], schedule=PruneSchedule(every_n_epochs=1),
                                       export_dir=tmp_path / "export", compact_zeros=True))
    trainer.train()
    recs = _records(trainer.state.log_history)
    assert [r["step"] for r in recs] == [0, 3] and Counting.updates == 2
    compacted = sum(p.numel() for p in trainer.model.parameters())  # the export compacted trainer.model
    assert compacted < recs[-1]["prune/num_parameters"] <= dense
    from hf_prune.modeling.modeling_hf_prune import CompactLinear

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert any(isinstance(m, CompactLinear) for m in exported.modules())
    assert sum(p.numel() for p in exported.parameters()) == compacted
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=blocks[:2]).logits,
                                   trainer.model.eval()(input_ids=blocks[:2]).logits)
    # each shot removes or zeroes its share of the decoder's linear parameters (linear schedule: 15%, then 30%)
    assert Counting.fractions == [pytest.approx(0.15, abs=0.02), pytest.approx(0.30, abs=0.02)]
    # training after the last shot moved every weight; the end of train() wrote back the zeros surgery kept
    n, z = prunable(trainer.model)
    assert z > 0 and (n0 - n + z) / n0 == pytest.approx(Counting.fractions[-1], abs=1e-9)


def test_llm_surgeon_run_resumes_with_its_reference_count_and_zero_pattern(tmp_path):
    """A resumed run gets the method's state from the stage checkpoint: the dense reference count (which a fresh
    LLMSurgeon would not know at shot 2) and the zero pattern of shot 1, which training had filled."""
    from hf_prune.kfac import decoder_linears
    from hf_prune.methods import LLMSurgeon

    def prunable(m) -> tuple[int, int]:
        ws = [lin.weight for lin in decoder_linears(m).values()]
        return sum(w.numel() for w in ws), sum(int((w == 0).sum()) for w in ws)

    blocks = _blocks()
    model = tiny_model("llama", num_hidden_layers=3).train()
    n0, _ = prunable(model)

    def trainer_for(m, method):
        cb = PruneCallback(method, calibration=blocks[:4], schedule=PruneSchedule(every_n_epochs=1))
        return cb, Trainer(model=m, args=_args(tmp_path, save_strategy="steps", save_steps=1),
                           train_dataset=blocks_dataset(blocks), callbacks=[cb])

    first = LLMSurgeon(target=0.3, target_of="linears", shots=2, verbose=False, compute_dtype="float64")
    _, trainer = trainer_for(model, first)
    prune_and_train(trainer)
    recs = _records(trainer.state.log_history)
    assert [r["step"] for r in recs] == [0, 3]
    assert (tmp_path / "prune-stage-1" / "prune_method_state.pt").is_file()
    ckpt = tmp_path / "checkpoint-2"  # after shot 1 and two training steps: shot 1's zeros are filled
    state = torch.load(tmp_path / "prune-stage-1" / "prune_method_state.pt", weights_only=True)
    shot1_zero_rows = sum(int(p["rows"].sum()) for p in state["zero_patterns"].values())
    resumed_model = load_for_resume(ckpt)
    zero_rows_now = sum(int((lin.weight == 0).all(1).sum()) for lin in decoder_linears(resumed_model).values())
    assert shot1_zero_rows > 0 and zero_rows_now < shot1_zero_rows  # training filled some of shot 1's zeros
    fresh = LLMSurgeon(target=0.3, target_of="linears", shots=2, verbose=False, compute_dtype="float64")
    cb, resumed = trainer_for(resumed_model, fresh)
    prune_and_train(resumed, resume_from_checkpoint=str(ckpt))
    assert cb.stages_done == 2 and fresh.reference_numel == first.reference_numel
    n, z = prunable(resumed.model)
    shot2 = fresh.zero_patterns is not None and _records(resumed.state.log_history)[-1]
    assert shot2 and (n0 - n + z) / n0 == pytest.approx(0.3, abs=0.02)
    n1, z1 = prunable(trainer.model)
    assert n0 - n + z == n0 - n1 + z1  # the same count as the uninterrupted run
    original = trainer.model.state_dict()  # and the same model: shot 2 saw shot 1's zeros written back
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, original[name], msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# schedules that cannot hold the method's stages, and runs that end with fewer stages
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["prune_and_train", "train"])
@pytest.mark.parametrize("stages,schedule", [
    (1, PruneSchedule(every_n_steps=100, at_start=False)),  # never fires in 6 steps: 0 of 1
    (3, PruneSchedule(epochs=[0])),                           # one boundary for three stages
])
def test_impossible_schedule_is_refused_before_any_work(tmp_path, driver, stages, schedule):
    from hf_prune.methods import ShortGPT

    model = tiny_model("llama", num_hidden_layers=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = _blocks()
    cb = PruneCallback(ShortGPT(n_remove=stages, per_stage=1, progress=False), calibration=blocks[:4],
                       schedule=schedule)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=blocks_dataset(blocks), callbacks=[cb])
    with pytest.raises(ValueError, match=f"needs {stages} more pruning stage"):
        prune_and_train(trainer) if driver == "prune_and_train" else trainer.train()
    assert cb.stages_done == 0 and trainer.state.global_step == 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fewer_stages_than_configured_is_reported_and_strict_raises(tmp_path, caplog):
    from hf_prune.methods import ShortGPT

    blocks = _blocks()

    class StopAfterFirstStep(TrainerCallback):  # an early stop (e.g. EarlyStoppingCallback) before stage 2 is due
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    def run(strict: bool):
        model = tiny_model("llama", num_hidden_layers=4).train()
        cb = PruneCallback(ShortGPT(n_remove=2, per_stage=1, progress=False), calibration=blocks[:4],
                           schedule=PruneSchedule(every_n_epochs=1), strict=strict)  # the schedule holds both
        trainer = Trainer(model=model, args=_args(tmp_path / str(strict)), train_dataset=blocks_dataset(blocks),
                          callbacks=[cb, StopAfterFirstStep()])
        return cb, trainer

    cb, trainer = run(False)
    with caplog.at_level("WARNING"):
        prune_and_train(trainer)
    assert cb.stages_done == 1 and "1 of 2 pruning stages" in caplog.text
    assert trainer.state.prune_stages_missing == 1
    assert any(h.get("prune/stages_missing") == 1 for h in trainer.state.log_history)
    cb, trainer = run(True)
    with pytest.raises(RuntimeError, match="1 of 2 pruning stages"):
        prune_and_train(trainer)
