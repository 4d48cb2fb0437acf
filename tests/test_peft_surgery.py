"""Surgery on PEFT models: LoRA adapters are pruned with the base weights (equal to "merge, then prune"), and what
cannot be pruned exactly is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners import lora  # noqa: E402

from hf_prune import PrunePlan, apply, predicted_num_parameters  # noqa: E402
from hf_prune.surgery import attach_weight_update, compact_zeros, weight_update_of  # noqa: E402
from hf_prune.surgery.peft import PeftSurgeryError, is_peft_model  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250, 64, 11, 2, 90, 31, 8, 77, 150] * 2])
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# drop a layer, a kv group with its query heads, query heads inside groups, MLP channels (widths differ per layer)
HETERO = PrunePlan(drop_layers=[1], kv_heads={2: [1]}, heads={3: [0, 2]},
                   mlp_channels={0: list(range(0, 128, 2)), 3: list(range(100))})
UNIFORM = PrunePlan(drop_layers=[0, 2], mlp_channels={1: list(range(96)), 3: list(range(32, 128))})
PLANS = {"hetero": HETERO, "uniform": UNIFORM}


def lora_model(model_type: str = "llama", seed: int = 0, **lora_kwargs) -> PeftModel:
    """A tiny model with LoRA on every projection and random (non-zero) lora_B, so the adapter changes the logits."""
    base = tiny_model(model_type, seed=seed)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=PROJECTIONS)
    kwargs.update(lora_kwargs)
    pm = get_peft_model(base, LoraConfig(**kwargs))
    randomize_adapters(pm, seed)
    return pm.eval()


def randomize_adapters(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model) -> dict:
    """Everything a refusal must leave as it was: every tensor, every module's type, every shape."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "config": model.config.to_dict() if hasattr(model.config, "to_dict") else None,
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["config"] == before["config"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def merge_then_prune(pm: PeftModel, plan: PrunePlan) -> torch.Tensor:
    merged = copy.deepcopy(pm).merge_and_unload()
    return logits(apply(merged, copy.deepcopy(plan)))


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_pruned_lora_model_equals_merge_then_prune(model_type, plan_name):
    plan = PLANS[plan_name]
    pm = lora_model(model_type)
    base_only = logits(apply(tiny_model(model_type), copy.deepcopy(plan)))  # the same base, without the adapter
    scalings = {n: dict(m.scaling) for n, m in pm.named_modules() if isinstance(m, lora.Linear)}
    ref = merge_then_prune(pm, plan)
    n_expected = predicted_num_parameters(pm, plan)
    apply(pm, copy.deepcopy(plan))
    out = logits(pm)
    assert (out - ref).abs().max().item() <= 1e-5
    # the adapter matters: ignoring it (what surgery did before) is far off, so the check above can fail
    assert (base_only - ref).abs().max().item() > 1e-2
    assert sum(p.numel() for p in pm.parameters()) == n_expected
    n_lora = 0
    for name, m in pm.named_modules():
        if isinstance(m, lora.Linear):
            n_lora += 1
            w = m.base_layer.weight
            assert (m.out_features, m.in_features) == tuple(w.shape)
            assert m.lora_A["default"].in_features == m.in_features
            assert m.lora_B["default"].out_features == m.out_features
            assert m.lora_dropout["default"].p == 0.1
    assert n_lora == 7 * (4 - len(plan.drop_layers))
    # scaling and dropout untouched on every surviving adapter
    assert all(dict(m.scaling) == {"default": 2.0} for m in pm.modules() if isinstance(m, lora.Linear))
    assert len(scalings) == 28


def test_pruned_lora_model_trains_merges_and_saves(tmp_path):
    pm = lora_model("llama")
    apply(pm, copy.deepcopy(HETERO))
    pruned = logits(pm)
    # merge_and_unload of the pruned PeftModel gives the same function
    assert (logits(copy.deepcopy(pm).merge_and_unload()) - pruned).abs().max().item() <= 1e-5
    # the adapter saves and loads back onto the pruned base (adapter removed) with the same logits
    pm.save_pretrained(tmp_path / "adapter")
    bare = copy.deepcopy(pm).unload()
    assert not is_peft_model(bare)
    reloaded = PeftModel.from_pretrained(bare, tmp_path / "adapter").eval()
    assert (logits(reloaded) - pruned).abs().max().item() <= 1e-5
    # a training step: only adapter weights get gradients and change, and the loss (dropout off) goes down
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=1e-2)
    with torch.no_grad():
        loss_before = pm(input_ids=IDS, labels=IDS).loss.item()
    pm.train()
    opt.zero_grad()
    pm(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    pm.eval()
    with torch.no_grad():
        loss_after = pm(input_ids=IDS, labels=IDS).loss.item()
    assert loss_after < loss_before
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_injected_lora_layers_and_lora_bias_are_pruned():
    base = tiny_model("qwen2")
    # lora_bias needs a base bias to merge into: qwen2's q/k/v projections have one
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    model = inject_adapter_in_model(cfg, base)
    randomize_adapters(model, 3)
    model.eval()
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].bias is not None
    # reference: merge by hand (W + s * B A, b + s * b_B), then prune
    merged = copy.deepcopy(model)
    for parent in list(merged.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, lora.Linear):
                child.merge()
                setattr(parent, child_name, child.base_layer)
    ref = logits(apply(merged, copy.deepcopy(HETERO)))
    unmerged_base = tiny_model("qwen2")
    assert (logits(apply(unmerged_base, copy.deepcopy(HETERO))) - ref).abs().max().item() > 1e-2
    apply(model, copy.deepcopy(HETERO))
    assert (logits(model) - ref).abs().max().item() <= 1e-5


def test_layers_to_transform_follow_dropped_layers(tmp_path):
    pm = lora_model("llama", layers_to_transform=[1, 3])
    ref = merge_then_prune(pm, PrunePlan(drop_layers=[1], mlp_channels={3: list(range(64))}))
    apply(pm, PrunePlan(drop_layers=[1], mlp_channels={3: list(range(64))}))
    assert pm.peft_config["default"].layers_to_transform == [2]  # old layer 3 is now layer 2
    assert (logits(pm) - ref).abs().max().item() <= 1e-5
    pm.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(pm).unload(), tmp_path / "adapter").eval()
    assert (logits(reloaded) - logits(pm)).abs().max().item() <= 1e-5


def lora_with(config) -> PeftModel:
    return get_peft_model(tiny_model("llama"), config).eval()


def with_weight_update() -> PrunePlan:
    plan = copy.deepcopy(HETERO)
    attach_weight_update(plan, lambda m: None)
    return plan


REFUSALS = {
    "slicing": (lambda: lora_model(), lambda: PrunePlan(residual_widths={"residual_dims": [48] * 9}),
                "merge_and_unload"),
    "weight update": (lambda: lora_model(), with_weight_update, "merge_and_unload"),
    "dora": (lambda: lora_with(LoraConfig(r=4, target_modules=PROJECTIONS, use_dora=True)), lambda: HETERO,
             "DoRA"),
    "ia3 on a pruned projection": (
        lambda: lora_with(IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
        lambda: HETERO, "merge_and_unload"),
    "prefix tuning": (lambda: lora_with(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
                      lambda: HETERO, "PREFIX_TUNING"),
    "every targeted layer dropped": (lambda: lora_model(layers_to_transform=[1]), lambda: HETERO,
                                     "layers_to_transform"),
    "regex naming layers": (lambda: lora_model(target_modules=r".*layers\.[0-3]\.self_attn\.q_proj"),
                            lambda: HETERO, "target_modules"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_model_and_adapter_unchanged(case):
    make_model, make_plan, words = REFUSALS[case]
    pm = make_model()
    before = snapshot(pm)
    out_before = logits(pm)
    with pytest.raises(PeftSurgeryError) as e:
        apply(pm, make_plan())
    assert words in str(e.value)
    assert_unchanged(pm, before)
    assert torch.equal(logits(pm), out_before)


def test_refused_weight_update_stays_with_the_plan_for_the_merged_model():
    pm = lora_model()
    plan = copy.deepcopy(HETERO)
    calls = []
    attach_weight_update(plan, calls.append)
    with pytest.raises(PeftSurgeryError, match="merge_and_unload"):
        apply(pm, plan)
    assert calls == [] and weight_update_of(plan) is not None
    merged = pm.merge_and_unload()
    apply(merged, plan)
    assert calls == [merged] and weight_update_of(plan) is None


def test_compact_zeros_refuses_a_peft_model():
    pm = lora_model()
    with torch.no_grad():
        pm.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight[:40] = 0
    before = snapshot(pm)
    with pytest.raises(PeftSurgeryError, match="merge_and_unload"):
        compact_zeros(pm)
    assert_unchanged(pm, before)


def test_ia3_on_projections_the_plan_keeps_is_fine():
    # IA3 on q_proj only; a plan that cuts MLP channels and drops a layer leaves every q_proj's shape as it is
    pm = lora_with(IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_" in name:
                p.uniform_(0.5, 1.5)
    plan = PrunePlan(drop_layers=[2], mlp_channels={0: list(range(64))})
    ref = merge_then_prune(pm, plan)
    apply(pm, copy.deepcopy(plan))
    assert (logits(pm) - ref).abs().max().item() <= 1e-5


def test_plain_models_do_not_count_as_peft():
    assert not is_peft_model(tiny_model("llama"))


def test_the_runner_refuses_weight_changing_methods_on_a_peft_model_before_scoring():
    """SliceGPT rotates and LLM Surgeon updates weights inside the stage: the runner refuses a PEFT model before any
    scoring, and nothing changes."""
    from peft import LoraConfig, get_peft_model

    import hf_prune
    from hf_prune.methods import get
    from hf_prune.surgery.peft import PeftSurgeryError

    for name in ("slicegpt", "llm_surgeon"):
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(PeftSurgeryError, match="merge_and_unload"):
            hf_prune.prune(model, get(name), [{"input_ids": torch.randint(0, 100, (2, 8))}])
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
