"""The runnable recipes (recipes/<name>.py) end to end on a tiny random model: each `main(argv)` runs in-process with
tiny calibration, a few recovery steps (or none) and a short perplexity evaluation, and what it writes is checked:
the pruned model reloads with `AutoModelForCausalLM.from_pretrained` (hf_prune imported), is smaller than the dense
one and computes the perplexity the recipe reported; the plan file and the results JSON are there and agree."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny import SENTENCES, tiny_model, tiny_tokenizer

import hf_prune
from hf_prune.plan import PLAN_FILENAME, PrunePlan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EVAL_ARGS = {"eval_window": 32, "eval_max_tokens": 128}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama (4 layers) saved with its tokenizer, and small calibration / evaluation text files."""
    root = tmp_path_factory.mktemp("recipes")
    model, tok = tiny_model("llama", num_hidden_layers=4), tiny_tokenizer()
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    (root / "train.txt").write_text("\n\n".join(SENTENCES * 30))
    (root / "eval.txt").write_text("\n\n".join(reversed(SENTENCES * 3)))
    return {"root": root, "dense": root / "dense", "params": sum(p.numel() for p in model.parameters())}


def load_recipe(name: str, monkeypatch):
    """recipes/<name>.py as a fresh module (the recipe puts its folder on sys.path; restored afterwards)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}_under_test", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def argv(env, out: Path, config: str | None = None, **flags) -> list[str]:
    """Tiny-run flags; with `config`, after `--config recipes/configs/<config>_smollm2.yaml` (the flags override it)."""
    head = ["--config", str(RECIPES / "configs" / f"{config}_smollm2.yaml")] if config else []
    args = {
        "model_name_or_path": env["dense"], "dataset_name": env["root"] / "train.txt",
        "eval_text": env["root"] / "eval.txt", **EVAL_ARGS, "calibration_samples": 4, "calibration_seq_len": 16,
        "recovery_seq_len": 16, "per_device_train_batch_size": 4, "num_train_epochs": 1, "learning_rate": 1e-3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": "true", "disable_tqdm": "true", "seed": 0,
        "output_dir": out, **flags,
    }
    return head + [s for k, v in args.items() for s in (f"--{k}", str(v))]


def check_model(env, model_dir: Path, evaluation: dict) -> torch.nn.Module:
    """The saved model reloads, is smaller than the dense one, and gives the reported parameters and perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.evaluate import perplexity

    assert hf_prune.__version__  # registers the pruned (and sliced) model classes
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = sum(p.numel() for p in loaded.parameters())
    assert n < env["params"]
    assert n == evaluation["params"]
    text = (env["root"] / "eval.txt").read_text()
    ppl = perplexity(loaded, tok, [text], window=EVAL_ARGS["eval_window"], max_tokens=EVAL_ARGS["eval_max_tokens"])
    reported = evaluation["perplexity"]
    assert reported["tokens"] == ppl["tokens"] > 0
    assert math.isfinite(reported["perplexity"])
    assert ppl["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-4)
    return loaded


def plan_matches(env, plan: PrunePlan, loaded: torch.nn.Module, compacted: int = 0) -> None:
    """Applying the saved (composed) plan to the dense model gives the saved model's architecture (with
    `compacted` parameters fewer when the recipe ran compact_zeros afterwards)."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(env["dense"], dtype=torch.float32)
    hf_prune.apply(dense, plan)
    assert hf_prune.surgery.layer_widths(dense) == hf_prune.surgery.layer_widths(loaded)
    assert sum(p.numel() for p in dense.parameters()) - compacted == sum(p.numel() for p in loaded.parameters())


def assert_export(folder: Path, method: str) -> None:
    """The recipe wrote what `hf-prune prune` writes: weights, plan, hf_prune.json (with the method) and a card."""
    from hf_prune.export import load_metadata

    for name in ("config.json", PLAN_FILENAME, "hf_prune.json", "README.md"):
        assert (folder / name).is_file(), name
    meta = load_metadata(folder)
    assert meta.method == method and meta.method_config["method"] == method
    assert meta.before is not None and meta.after.num_parameters < meta.before.num_parameters


def recovery_steps(log: list[dict]) -> int:
    return sum(1 for h in log if "loss" in h)


def test_iterabre_removes_a_layer_per_stage_with_recovery_between(env, tmp_path, monkeypatch):
    out = tmp_path / "iterabre"
    # 128 tokens = 8 blocks of 16 = 2 steps of 4: stage 1 before step 1, stage 2 after it; LoRA + distillation
    report = load_recipe("iterabre", monkeypatch).main(argv=argv(env, out, "iterabre", n_remove=2, total_tokens=128))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["pruned_recovered"] == report["pruned_recovered"] and "dense" in saved
    assert saved["dense"]["params"] == env["params"]
    log = json.loads((out / "train_log.json").read_text())
    assert [h["prune/stage"] for h in log if "prune/stage" in h] == [1, 2]
    assert recovery_steps(log) == 2
    assert_export(out / "model", "iterabre")
    plan = PrunePlan.load(out / "model" / PLAN_FILENAME)
    assert len(plan.drop_layers) == 2 and plan.to_dict() == saved["plan"]
    assert [len(s["removed_original_layers"]) for s in plan.provenance["stages"]] == [1, 1]
    loaded = check_model(env, out / "model", saved["pruned_recovered"])
    assert loaded.config.num_hidden_layers == 2
    plan_matches(env, plan, loaded)


def test_shortgpt_removes_layers_in_one_shot_then_recovers(env, tmp_path, monkeypatch):
    out = tmp_path / "shortgpt"
    report = load_recipe("shortgpt", monkeypatch).main(
        argv(env, out, "shortgpt", n_remove=1, recovery_tokens=64, kd_alpha=0, eval_dense="false"))
    saved = json.loads((out / "eval.json").read_text())
    assert "dense" not in saved and saved["method"]["n_remove"] == 1
    assert saved["recovery_tokens"] == report["recovery_tokens"] == 64
    assert recovery_steps(json.loads((out / "train_log.json").read_text())) == 1
    plan = PrunePlan.load(out / "model" / PLAN_FILENAME)
    assert len(plan.drop_layers) == 1
    loaded = check_model(env, out / "model", saved["pruned_recovered"])
    assert loaded.config.num_hidden_layers == 3


def test_dynamic_slicing_slices_and_recovers_with_lora(env, tmp_path, monkeypatch):
    out = tmp_path / "dynamic_slicing"
    report = load_recipe("dynamic_slicing", monkeypatch).main(argv(
        env, out, "dynamic_slicing", slicing=0.25, base_slicing=0.1, basis="layer", calibration_batch_size=4, recovery_tokens=64,
        lora_r=4))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["sliced"] == report["sliced"] and saved["dense"]["params"] == env["params"]
    assert recovery_steps(json.loads((out / "train_log.json").read_text())) == 1
    assert_export(out / "model", "dynamic_slicing")
    plan = PrunePlan.load(out / "model" / PLAN_FILENAME)
    dims = plan.residual_widths["residual_dims"]
    assert len(dims) == 2 * 4 + 1 and max(dims) < 64 and dims == saved["plan"]["residual_widths"]["residual_dims"]
    loaded = check_model(env, out / "model", saved["sliced"])
    assert saved["sliced_parameters"]["total"] == saved["sliced"]["params"]
    assert list(loaded.config.residual_dims) == dims


def test_pip_prunes_heads_and_channels_in_steps_and_saves_the_composed_plan(env, tmp_path, monkeypatch):
    out = tmp_path / "pip"
    report = load_recipe("pip", monkeypatch).main(argv(
        env, out, "pip", steps=2, target=0.2, kd_alpha=0, recovery_tokens=128, eval_dense="false"))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["pruned_recovered"] == report["pruned_recovered"]
    log = json.loads((out / "train_log.json").read_text())
    assert [h["prune/stage"] for h in log if "prune/stage" in h] == [1, 2] and recovery_steps(log) == 2
    assert_export(out / "model", "pip")
    plan = PrunePlan.load(out / "model" / PLAN_FILENAME)
    assert plan.heads or plan.mlp_channels  # the widths, not only dropped layers
    loaded = check_model(env, out / "model", saved["pruned_recovered"])
    plan_matches(env, plan, loaded)


@pytest.mark.parametrize("recovery_tokens", [0, 128])
def test_llm_surgeon_prunes_in_shots_with_or_without_recovery(env, tmp_path, monkeypatch, recovery_tokens):
    out = tmp_path / "llm_surgeon"
    report = load_recipe("llm_surgeon", monkeypatch).main(argv(
        env, out, "llm_surgeon", target=0.3, shots=2, calibration_batch_size=2, recovery_tokens=recovery_tokens, lora_r=4,
        damping_g=0.5, eval_dense="false"))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["pruned"] == report["pruned"]
    assert_export(out / "model", "llm_surgeon")
    cfg = saved["plans"][0]["provenance"]["config"]
    assert (cfg["damping_g"], cfg["damping_a"]) == (0.5, 1.0)  # the flag, and the SmolLM2 config's value
    assert len(saved["plans"]) == 2  # every shot
    if recovery_tokens:  # 8 blocks = 2 steps: shot 1 before step 1, shot 2 after it
        log = json.loads((out / "train_log.json").read_text())
        assert [h["prune/stage"] for h in log if "prune/stage" in h] == [1, 2]
        assert recovery_steps(log) == 2
    else:
        assert not (out / "train_log.json").exists()
    plan = PrunePlan.load(out / "model" / PLAN_FILENAME)
    assert plan.heads or plan.mlp_channels or plan.drop_layers
    loaded = check_model(env, out / "model", saved["pruned"])
    removed = saved["compact_zeros"]["parameters_removed"]  # structured mode compacts the zeros by default
    assert removed > 0 and saved["compact_zeros"]["linears"] > 0
    plan_matches(env, plan, loaded, compacted=removed)
    # removed or zero: what the last shot reported, recovery training included (its merge filled the zeros)
    from transformers import AutoModelForCausalLM

    def prunable(m):
        ws = [p for n, p in m.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
        return sum(w.numel() for w in ws), sum(int((w == 0).sum()) for w in ws)

    n0, _ = prunable(AutoModelForCausalLM.from_pretrained(env["dense"]))
    n, z = prunable(loaded)
    assert (n0 - n + z) / n0 == pytest.approx(saved["plans"][-1]["provenance"]["removed_fraction"], abs=1e-9)


def test_llm_surgeon_two_four_with_recovery_keeps_the_pattern_exact(env, tmp_path, monkeypatch):
    """LoRA recovery between 2:4 shots: every merge fills the zeros, the method writes them back."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s24"
    load_recipe("llm_surgeon", monkeypatch).main(argv(
        env, out, "llm_surgeon", mode="2:4", target=0.5, shots=2, criterion="kobd", recovery_tokens=128, lora_r=4,
        eval_dense="false"))
    assert recovery_steps(json.loads((out / "train_log.json").read_text())) == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert ((p.reshape(p.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name


def test_unknown_flags_are_refused_before_the_model_loads(env, tmp_path, monkeypatch):
    recipe = load_recipe("dynamic_slicing", monkeypatch)
    with pytest.raises(ValueError, match="no_such_flag"):
        recipe.main(argv(env, tmp_path / "x", "dynamic_slicing", model_name_or_path=tmp_path / "missing",
                         no_such_flag=1))


def test_llm_surgeon_recovery_under_torchrun_two_ranks(env, tmp_path):
    """Two processes (gloo): each computes every shot's curvature and update itself; the ranks' architectures and
    weights agree after each shot (the callback compares them) and the run saves the pruned model once."""
    import os
    import socket
    import subprocess

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(RECIPES / "llm_surgeon.py")] + argv(
        env, out, "llm_surgeon", target=0.3, shots=2, calibration_batch_size=2, recovery_tokens=128, lora_r=4,
        per_device_train_batch_size=2, eval_dense="false")
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "ranks disagree" not in log and "weights differ across ranks" not in log
    saved = json.loads((out / "eval.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    assert [h["prune/stage"] for h in log if "prune/stage" in h] == [1, 2]
    assert recovery_steps(log) == 2  # 8 blocks / (2 ranks x 2 rows) per epoch
    loaded = check_model(env, out / "model", saved["pruned"])
    plan_matches(env, PrunePlan.load(out / "model" / PLAN_FILENAME), loaded,
                 compacted=saved["compact_zeros"]["parameters_removed"])
