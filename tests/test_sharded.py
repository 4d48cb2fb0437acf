"""Pruning FSDP2-sharded runs between training stages (hf_prune.sharded, PruneCallback.prune_sharded_model).

The 2-rank runs use torchrun with gloo on the CPU and a hand-written training loop (the Trainer refuses FSDP without
CUDA); they drive the same `prune_sharded_model` the Trainer route calls. The Trainer + accelerate FSDP2 route itself
is the `gpu` test at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model
from transformers import Trainer, TrainingArguments

from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train
from hf_prune.callbacks.prune import DEEPSPEED_REFUSAL, sharding_problem
from hf_prune.data import blocks_dataset
from hf_prune.methods.llm_surgeon import LLMSurgeon
from hf_prune.methods.pip import PIP
from hf_prune.methods.shortgpt import ShortGPT
from hf_prune.sharded import (carry_state_by_name, gather_to_main, is_fsdp2, is_layerwise, optimizer_gather_problem,
                              prune_sharded, scoring_memory)

HERE = Path(__file__).parent
REPO = HERE.parent


# ----- 2 ranks, gloo, hand-written loop ------------------------------------------------------------------------------


def _torchrun(out: Path, *script_args: str, nproc: int = 2, expect_failure: bool = False) -> str:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(HERE / "fsdp2_prune_script.py"), str(out), *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if expect_failure:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _ranks(out: Path, mode: str, n: int = 2) -> list[dict]:
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def shortgpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_shortgpt")
    _torchrun(out, "train")
    _torchrun(out, "resume")
    return _ranks(out, "train"), _ranks(out, "resume")


def _same_on_both_ranks(ranks: list[dict]) -> None:
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["shapes"] == ranks[1]["shapes"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # bit-identical full weights


def _keeps_training(r: dict) -> None:
    after = r["losses_after"]
    assert after[-1] < after[0] and min(after[1:]) < after[0], after  # loss decreases after the stage


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_layer_removal_same_architecture_and_weights_on_both_ranks(shortgpt_run):
    train, _ = shortgpt_run
    _same_on_both_ranks(train)
    for r in train:
        assert r["sharded_class"].startswith("FSDP")  # trained sharded after the stage too
        assert r["num_layers"] == 2 and len(r["kept_original"]) == 2 and r["stages_done"] == 1
        assert not any(k.startswith(f"model.layers.{i}.") for k in r["shapes"] for i in (2, 3))
        assert r["record"]["prune/stage"] == 1
        assert r["gathered_sha256"] == r["weights_sha256"] and r["gathered_class"] == "LlamaForCausalLM"
        assert json.loads(r["record"]["prune/kept_original_layers"]) == r["kept_original"]
        for step in ("gather_weights", "gather_optimizer_state", "score_whole_model", "pruned_model"):
            assert r["record"][f"prune/memory_gib/{step}"] > 0  # stated before the step ran, on every rank
        assert r["record"]["prune/memory_gib/pruned_model"] < r["record"]["prune/memory_gib/gather_weights"]
        _keeps_training(r)


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_carries_the_optimizer_state_of_every_surviving_parameter(shortgpt_run):
    train, _ = shortgpt_run
    for r in train:
        # every parameter of the pruned model survived unchanged: all of them get their old state, bit for bit
        # (renamed: the layers after a removed one moved down)
        assert r["optimizer_states_loaded"] == r["optimizer_params"] == r["record"]["prune/optimizer_states_kept"]
        assert r["carried_state"] == {"equal": r["optimizer_params"], "differ": 0}


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_resume_from_a_post_pruning_checkpoint(shortgpt_run):
    train, resumed = shortgpt_run
    _same_on_both_ranks([{**r, "world_size": 2} for r in resumed])
    for t, r in zip(train, resumed):
        assert r["num_layers"] == t["num_layers"]
        assert r["optimizer_states_loaded"] == t["optimizer_params"]
        assert r["losses_after"] == t["losses_after"][-len(r["losses_after"]):]  # the same steps, bit for bit
        assert r["weights_sha256"] == t["weights_sha256"]


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("method", ["pip"])
def test_fsdp2_width_pruning_rebuilds_per_layer_widths_on_every_rank(tmp_path, method):
    _torchrun(tmp_path, "train", "--method", method)
    ranks = _ranks(tmp_path, "train")
    _same_on_both_ranks(ranks)
    for r in ranks:
        assert r["sharded_class"] == "FSDPPrunedLlamaForCausalLM"  # rebuilt from the pruned config on rank 1 too
        widths = [w[2] for w in r["widths"]]
        assert len(set(widths)) > 1 and max(widths) == 128  # per-layer MLP widths; first and last layer kept
        dropped = r["record"]["prune/optimizer_states_dropped"]
        assert dropped > 0 and r["optimizer_states_loaded"] == r["optimizer_params"] - dropped
        assert r["carried_state"] == {"equal": r["optimizer_states_loaded"], "differ": 0}
        _keeps_training(r)


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_lora_is_merged_pruned_and_reattached(tmp_path):
    _torchrun(tmp_path, "train", "--lora")
    ranks = _ranks(tmp_path, "train")
    _same_on_both_ranks(ranks)
    for r in ranks:
        assert r["sharded_class"] == "FSDPPeftModelForCausalLM" and r["num_layers"] == 2
        assert any("lora_A" in k for k in r["shapes"])
        assert r["gathered_class"] == "LlamaForCausalLM"  # gathered with the adapter merged
        assert r["gathered_sha256"] == ranks[0]["gathered_sha256"]
        assert r["optimizer_states_loaded"] == 0  # the adapter is new after the merge
        assert r["record"]["prune/optimizer_states_dropped"] > 0  # and the old adapter's state is said to be dropped
        _keeps_training(r)


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_scoring_error_on_the_main_process_is_raised_on_every_rank(tmp_path):
    log = _torchrun(tmp_path, "train", "--method", "failing", expect_failure=True)  # finishes: no rank hangs
    assert "[rank0]: ValueError: PIP with perturbation='chars' needs the tokenizer" in log
    assert "[rank1]: RuntimeError: pruning failed on the main process: ValueError: PIP with perturbation" in log
    assert not list(tmp_path.glob("train_rank*.json"))


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_optimizer_state_that_does_not_fit_the_host_is_dropped_with_the_reason(tmp_path):
    _torchrun(tmp_path, "train", "--host-bytes", "1")
    ranks = _ranks(tmp_path, "train")
    _same_on_both_ranks(ranks)
    for r in ranks:
        assert r["optimizer_states_loaded"] == 0 and r["record"]["prune/optimizer_states_kept"] == 0
        assert "GiB free" in r["record"]["prune/optimizer_state_dropped_because"]
        assert "prune/memory_gib/gather_optimizer_state" not in r["record"]
        _keeps_training(r)


def test_optimizer_gather_problem_names_the_sizes():
    assert optimizer_gather_problem(8, 4, 12) is None
    msg = optimizer_gather_problem(8 * 2**30, 4 * 2**30, 10 * 2**30)
    assert "8.00 GiB" in msg and "4.00 GiB" in msg and "10.00 GiB free" in msg


# ----- one process ---------------------------------------------------------------------------------------------------


def test_carry_state_by_name_follows_renamed_survivors_and_drops_the_rest():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    names = {p: n for n, p in model.named_parameters()}
    state = {n: {"step": torch.tensor(3.0), "exp_avg": torch.full(p.shape, float(i))}
             for i, (n, p) in enumerate(model.named_parameters())}
    pruned = nn.Sequential(model[1], nn.Linear(4, 2))  # layer 0 removed (1 -> 0), layer 2 cut (a new module)
    carried, dropped = carry_state_by_name(names, state, pruned)
    assert sorted(carried) == ["0.bias", "0.weight"]
    assert torch.equal(carried["0.weight"]["exp_avg"], state["1.weight"]["exp_avg"])
    assert sum(dropped.values()) == 4  # the states of layer 0 (removed) and layer 2 (replaced by a cut one)


def test_tied_weights_are_counted_once_in_the_stated_memory():
    model = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=True)
    cb = PruneCallback(ShortGPT(n_remove=1, per_stage=1, progress=False),
                       calibration=torch.randint(4, 300, (4, 16), generator=torch.Generator().manual_seed(0)))
    _, record = cb.prune_sharded_model(model)
    weights = sum(p.numel() * 4 for p in model.parameters()) / 2**30  # parameters() yields the tied tensor once
    embedding = model.model.embed_tokens.weight.numel() * 4 / 2**30
    assert abs(record["prune/memory_gib/pruned_model"] - weights) < 2e-6 < embedding


def test_layerwise_scoring_needs_less_on_the_device_than_the_whole_model():
    model = tiny_model("llama", num_hidden_layers=4)
    batches = [{"input_ids": torch.randint(4, 300, (2, 16))}]
    assert is_layerwise(ShortGPT()) and not is_layerwise(PIP())
    on_device = scoring_memory(model, ShortGPT(), batches, torch.device("cuda"))  # nothing is allocated
    whole = scoring_memory(model, PIP(), batches, torch.device("cuda"))
    assert on_device.step == "score_layerwise" and on_device.where == "cuda"
    assert whole.step == "score_whole_model" and "host" in whole.where
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert layer < on_device.nbytes < whole.nbytes
    assert "GiB" in on_device.message()


def test_unsharded_single_process_stage_goes_through_the_same_function():
    model = tiny_model("llama", num_hidden_layers=4)
    assert not is_fsdp2(model)
    cb = PruneCallback(ShortGPT(n_remove=1, per_stage=1, progress=False),
                       calibration=torch.randint(4, 300, (4, 16), generator=torch.Generator().manual_seed(0)))
    stage, record = cb.prune_sharded_model(model)
    assert stage.model is model and model.config.num_hidden_layers == 3
    assert record["prune/stage"] == 1 and cb.stages_done == 1
    assert gather_to_main(model).model is model


def test_an_error_while_scoring_is_raised_not_swallowed():
    model = tiny_model("llama", num_hidden_layers=2)

    def fail(gathered):
        raise ValueError("bad calibration")

    with pytest.raises(ValueError, match="bad calibration"):
        prune_sharded(model, None, fail)


def _plugin(**kw):
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    base = dict(fsdp_version=2, state_dict_type=StateDictType.FULL_STATE_DICT, cpu_ram_efficient_loading=True)
    base.update(kw)
    return SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True, model=torch.nn.Linear(2, 2),
                           accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**base))))


def test_fsdp2_settings_that_cannot_be_pruned_are_refused_with_the_reason():
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    assert sharding_problem(_plugin(), ShortGPT()) is None
    assert "fsdp_version=1" in sharding_problem(_plugin(fsdp_version=1), ShortGPT())
    msg = sharding_problem(_plugin(state_dict_type=StateDictType.SHARDED_STATE_DICT), ShortGPT())
    assert "SHARDED_STATE_DICT" in msg and "FULL_STATE_DICT" in msg
    assert "finalize" in sharding_problem(_plugin(), LLMSurgeon())
    assert "--kd_alpha 0" in sharding_problem(_plugin(), ShortGPT(), distillation=object())


def test_deepspeed_is_refused_with_the_reason(tmp_path):
    blocks = torch.randint(4, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", optim="adamw_torch")
    cb = PruneCallback(ShortGPT(n_remove=1, progress=False), calibration=blocks[:4],
                       schedule=PruneSchedule(every_n_steps=1))
    trainer = Trainer(model=tiny_model("llama").train(), args=args, train_dataset=blocks_dataset(blocks),
                      callbacks=[cb])
    trainer.is_deepspeed_enabled = True  # what accelerate's DeepSpeed plugin sets
    with pytest.raises(ValueError, match="ZeRO keeps the optimizer state") as info:
        prune_and_train(trainer)
    assert str(info.value).endswith(DEEPSPEED_REFUSAL)
    assert trainer.model.config.num_hidden_layers == 4  # refused before any weight moved


def test_the_fsdp2_accelerate_config_gives_a_plugin_the_callback_accepts(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "recipes" / "configs" / "accelerate_fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "recipes/shortgpt.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)  # the environment `accelerate launch` gives every process
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    fake = _plugin()
    fake.accelerator.state.fsdp_plugin = plugin
    # the recipes evaluate the dense model on every rank: every rank must load the weights
    assert plugin.fsdp_version == 2 and not plugin.cpu_ram_efficient_loading
    assert sharding_problem(fake, ShortGPT()) is None


# ----- GPU: the Trainer + accelerate FSDP2 route ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow  # torchrun
def test_trainer_fsdp2_prunes_between_stages_and_resumes(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the Trainer applies FSDP only to CUDA devices (on the CPU it refuses or ignores it)")
    nproc = min(2, torch.cuda.device_count())
    _torchrun(tmp_path, "trainer", nproc=nproc)
    ranks = _ranks(tmp_path, "trainer", nproc)
    for r in ranks:
        assert r["sharded_class"].startswith("FSDP") and r["num_layers"] == 3
        assert r["weights_sha256"] == ranks[0]["weights_sha256"]
        recs = [h for h in r["log_history"] if "prune/stage" in h]
        assert [h["prune/stage"] for h in recs] == [1, 2]
        for rec in recs:
            assert rec["prune/optimizer_states_kept"] > 0
            assert any("loss" in h and h["step"] > rec["step"] for h in r["log_history"])
    _torchrun(tmp_path, "trainer_resume", nproc=nproc)
    for r in _ranks(tmp_path, "trainer_resume", nproc):
        assert r["num_layers"] == 3 and r["weights_sha256"] == _ranks(tmp_path, "trainer_resume", nproc)[0][
            "weights_sha256"]
