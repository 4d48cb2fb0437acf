"""SliceGPT / Dynamic Slicing: rotation invariance, exact slicing, schedules, sliced model classes and reloading."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_prune  # noqa: F401  (registers the Auto classes)
from hf_prune.calibration import LayerwiseRunner, covariance, mean_cosine
from hf_prune.methods import available, get
from hf_prune.methods.slicegpt import dynamic_slice_fractions, widths_from_fractions
from hf_prune.modeling import SLICED_MODELS
from hf_prune.rotation import (
    NotRotationInvariantError,
    make_rotation_invariant,
    num_slots,
    random_orthogonal,
    rotate,
    slot_widths,
)
from hf_prune.surgery import apply_slicing, sliced_num_parameters
from tiny import TINY_MODEL_TYPES, tiny_model

FAMILIES = TINY_MODEL_TYPES  # llama, mistral, qwen2, qwen3, gemma3_text


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the spinning threads cost several times
    the work itself; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(model_type: str, tied: bool = True, seed: int = 0) -> nn.Module:
    """A tiny model with non-trivial norm scales and logits of order 1-10 (so a 1e-4 tolerance means something)."""
    m = tiny_model(model_type, seed=seed, initializer_range=0.15, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _inputs(vocab: int, seed: int = 0, b: int = 3, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding: the real tokens of row 0 do not see it
    return ids, mask


def _batches(ids: torch.Tensor, mask: torch.Tensor, size: int = 2) -> list[dict]:
    return [{"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size]} for i in range(0, len(ids), size)]


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out * mask[..., None]  # padded positions are not compared


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----- rotation invariance -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_rotation_invariant_form_and_random_rotations_keep_logits(model_type, tied):
    model = _model(model_type, tied=tied)
    ids, mask = _inputs(model.config.vocab_size)
    ref = _logits(model, ids, mask)
    assert ref.abs().max() > 1.0  # the tolerance below is small relative to the logits

    make_rotation_invariant(model)
    assert isinstance(model, SLICED_MODELS[model_type])
    assert model.config.tie_word_embeddings == tied and model.config.head_projection == tied
    residual_norm_weights = [
        n for n, _ in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"
    ]
    assert residual_norm_weights == []  # every norm on the residual stream is scale-free (q/k norms stay)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4

    hidden = model.config.hidden_size
    rotate(model, random_orthogonal(hidden, seed=1))  # one rotation of the whole residual stream
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4

    for s in range(num_slots(model)):  # a different rotation per slot: every residual add gets a shortcut matrix
        rotate(model, random_orthogonal(hidden, seed=10 + s), [s])
    assert all(model.config.attn_shortcuts) and all(model.config.mlp_shortcuts)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4


def test_bf16_weights_rotate_in_float32_to_the_same_bf16_values_as_in_float64(monkeypatch):
    """bf16 weights are rotated in float32 (half the float64 cost at 8B width); stored back in bf16 they must be the
    float64 result's bf16 values, up to a rounding tie."""
    import hf_prune.rotation as rotation

    assert rotation._work_dtype(torch.bfloat16) == torch.float32
    assert rotation._work_dtype(torch.float32) == torch.float64
    ref = make_rotation_invariant(_model("llama")).to(torch.bfloat16)
    fast = copy.deepcopy(ref)
    Q = random_orthogonal(ref.config.hidden_size, seed=3)
    rotate(fast, Q)
    monkeypatch.setattr(rotation, "_work_dtype", lambda dtype: torch.float64)
    rotate(ref, Q)
    pairs = list(zip(fast.named_parameters(), ref.named_parameters()))
    assert pairs
    for (name, a), (_, b) in pairs:
        assert a.dtype == torch.bfloat16, name
        a, b = a.float(), b.float()
        off = a != b
        # a rounding tie moves a value by one bf16 step (2^-8 relative), and rarely; a value near zero, where the step
        # is tiny, by float32's error of the products (~1e-7 of the matrix's scale)
        assert ((a - b).abs() <= b.abs() * 2**-7 + b.abs().max() * 2**-20)[off].all(), name
        assert off.float().mean() <= 0.01, (name, off.float().mean().item())


def test_untying_a_tied_head_keeps_logits():
    model = _model("llama", tied=True)
    ids, mask = _inputs(model.config.vocab_size)
    ref = _logits(model, ids, mask)
    make_rotation_invariant(model, tie_head=False)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    rotate(model, random_orthogonal(model.config.hidden_size, seed=3))
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4


def test_rotation_refuses_layernorm_and_bad_rotations():
    model = _model("llama")
    model.model.layers[1].input_layernorm.bias = nn.Parameter(torch.zeros(model.config.hidden_size))
    with pytest.raises(NotRotationInvariantError, match="centred"):
        make_rotation_invariant(model)
    with pytest.raises(NotRotationInvariantError, match="make_rotation_invariant"):
        rotate(_model("llama"), torch.eye(64))
    untied = _model("llama", tied=False)
    with pytest.raises(NotRotationInvariantError, match="tie_head=True"):
        make_rotation_invariant(untied, tie_head=True)
    m = make_rotation_invariant(_model("llama"))
    with pytest.raises(ValueError, match="slots"):
        rotate(m, torch.eye(64), [99])
    with pytest.raises(ValueError, match="square"):
        rotate(m, torch.eye(64)[:, :32])


# ----- the calibration runner ----------------------------------------------------------------------------------------
def test_layerwise_runner_reproduces_the_models_hidden_states():
    model = _model("qwen2")
    ids, mask = _inputs(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    runner = LayerwiseRunner(model, _batches(ids, mask), progress=False)
    for i in runner.layer_indices():
        assert _max_diff(torch.cat(runner.hidden) * mask[..., None], ref[i] * mask[..., None]) <= 1e-5
        runner.advance(runner.run_layer(i))


def test_covariance_and_cosine_ignore_padding():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y = x.clone()
    y[0, 3:] = 1e6  # garbage at padded positions
    assert torch.allclose(covariance([x], [mask]), covariance([y], [mask]))
    real = torch.cat([x[0, :3], x[1]])
    assert torch.allclose(covariance([x], [mask]), real.T @ real)
    assert mean_cosine([x], [x], [mask]) == pytest.approx(1.0)
    assert mean_cosine([x], [y], [mask]) == pytest.approx(1.0)


# ----- slicing ------------------------------------------------------------------------------------------------------
def _low_rank_stream(model: nn.Module, rank: int, seed: int = 0) -> None:
    """Make every write into the residual stream (embedding, o_proj, down_proj) lie in one rank-r subspace: slicing
    the PCA-rotated stream to r or more dims then loses nothing."""
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(hidden, rank, generator=g))[0]
    P = U @ U.T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ P)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(P @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(P @ layer.mlp.down_proj.weight)


@pytest.mark.parametrize(
    "model_type,method,options",
    [
        ("llama", "slicegpt", dict(basis="sublayer")),
        ("llama", "slicegpt", dict(basis="layer", head="untied")),
        ("qwen2", "slicegpt", dict(basis="global")),
        ("mistral", "dynamic_slicing", dict(basis="sublayer", base_slicing=0.2, max_slicing=0.7)),
        ("qwen3", "dynamic_slicing", dict(basis="layer", base_slicing=0.1, max_slicing=0.7)),
    ],
)
def test_slicing_a_low_rank_stream_is_exact(model_type, method, options):
    model = _model(model_type, tied=True)
    _low_rank_stream(model, rank=16)
    ids, mask = _inputs(model.config.vocab_size, b=4)
    ref = _logits(model, ids, mask)
    plan = get(method, slicing=0.5, embedding_basis="embedding", progress=False, **options).plan(
        model, _batches(ids, mask)
    )
    dims = plan.residual_widths["residual_dims"]
    assert min(dims) >= 16 and min(dims) < 64 and all(d % 8 == 0 for d in dims)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4  # rotated, not yet sliced
    apply_slicing(model, plan)
    assert slot_widths(model) == dims
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4


def _zero_dropped_dims(model: nn.Module, dims: list[int]) -> list:
    """Hooks that zero every residual dim a sliced model drops, on the full-width rotated model."""
    from hf_prune.rotation import shortcuts, slot_writers

    def cut(d):
        def hook(module, args, out):
            out = out.clone()
            out[..., d:] = 0
            return out

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(cut(dims[0]))]
    for s in range(1, len(dims)):
        for w in slot_writers(model, s):
            handles.append(w.register_forward_hook(cut(dims[s])))
    for layer, attr, _, dst in shortcuts(model):
        handles.append(getattr(layer, attr).register_forward_hook(cut(dims[dst])))
    if model.config.head_projection:
        handles.append(model.model.norm.proj.register_forward_hook(cut(dims[0])))
    return handles


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_sliced_model_equals_the_full_width_model_with_dropped_dims_zeroed(model_type):
    model = _model(model_type)
    ids, mask = _inputs(model.config.vocab_size, b=4)
    plan = get("dynamic_slicing", slicing=0.3, base_slicing=0.1, basis="sublayer", progress=False).plan(
        model, _batches(ids, mask)
    )
    dims = plan.residual_widths["residual_dims"]
    handles = _zero_dropped_dims(model, dims)
    simulated = _logits(model, ids, mask)
    for h in handles:
        h.remove()
    apply_slicing(model, plan)
    assert _max_diff(_logits(model, ids, mask), simulated) <= 1e-4


def test_padding_does_not_change_the_plan():
    ids, mask = _inputs(320, seed=5, b=4)
    models = []
    for pad_seed in (1, 2):
        garbage = ids.clone()
        garbage[mask == 0] = torch.randint(4, 320, (int((mask == 0).sum()),),
                                           generator=torch.Generator().manual_seed(pad_seed))
        model = _model("llama")
        plan = get("dynamic_slicing", slicing=0.3, progress=False).plan(model, _batches(garbage, mask))
        models.append((model, plan))
    (m1, p1), (m2, p2) = models
    assert p1.residual_widths == p2.residual_widths
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n


def test_widths_and_dynamic_schedule():
    assert widths_from_fractions([0.25, 0.2, 0.3], 576, 8) == [432, 456, 400]
    assert widths_from_fractions([0.25], 576, 1) == [432]
    lr = [0.5, 0.9, 0.7, 0.95, 0.6]
    fs = dynamic_slice_fractions(lr, target=0.3, base=0.1)
    assert sum(fs) / len(fs) == pytest.approx(0.3)
    assert min(fs) == pytest.approx(0.1) and fs.index(min(fs)) == lr.index(min(lr))
    assert sorted(range(5), key=lambda i: fs[i]) == sorted(range(5), key=lambda i: lr[i])
    assert dynamic_slice_fractions(lr, target=0.3, base=0.3) == pytest.approx([0.3] * 5)
    capped = dynamic_slice_fractions([0.0, 0.2, 0.4, 1.0], target=0.3, base=0.1, max_fraction=0.5)
    assert max(capped) == pytest.approx(0.5) and sum(capped) / 4 == pytest.approx(0.3)
    with pytest.raises(ValueError, match="out of reach"):
        dynamic_slice_fractions([0.0, 0.0, 0.0, 1.0], target=0.3, base=0.1, max_fraction=0.5)
    with pytest.raises(ValueError, match="base_slicing"):
        dynamic_slice_fractions(lr, target=0.2, base=0.3)


def test_dynamic_slicing_slices_redundant_layers_more():
    model = _model("llama")
    ids, mask = _inputs(model.config.vocab_size, b=4)
    plan = get("dynamic_slicing", slicing=0.3, base_slicing=0.1, round_to=1, progress=False).plan(
        model, _batches(ids, mask)
    )
    lr = plan.provenance["layer_redundancy"]
    widths = plan.residual_widths["residual_dims"][1:-1:2]  # MLP input of every layer: d_i
    assert len(lr) == len(widths) == 4
    assert widths[lr.index(max(lr))] == min(widths) and widths[lr.index(min(lr))] == max(widths)
    assert plan.provenance["average_slicing"] == pytest.approx(0.3, abs=1 / 64)
    dims = plan.residual_widths["residual_dims"]
    assert dims[0] == dims[-1] == int(64 * 0.7)  # the vocabulary matrices get the target width, as when constant


def test_options_are_validated_with_the_valid_values():
    assert {"slicegpt", "dynamic_slicing"} <= set(available())
    with pytest.raises(ValueError, match="sublayer"):
        get("slicegpt", basis="per_head")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        get("slicegpt", slicing=1.5)
    with pytest.raises(ValueError, match="base_slicing"):
        get("dynamic_slicing", slicing=0.2, base_slicing=0.3)
    m = make_rotation_invariant(_model("llama"))
    with pytest.raises(ValueError, match="residual slots"):
        apply_slicing(m, [32] * 3)
    with pytest.raises(ValueError, match="between 1 and the current width"):
        apply_slicing(m, [80] * num_slots(m))


def test_tied_head_keeps_the_sliced_model_smaller_than_dense():
    dense = _model("llama")
    ids, mask = _inputs(dense.config.vocab_size)
    n_dense = sum(p.numel() for p in dense.parameters())
    counts = {}
    for head in ("tied", "untied"):
        m = copy.deepcopy(dense)
        plan = get("slicegpt", slicing=0.25, head=head, basis="sublayer", progress=False).plan(m, _batches(ids, mask))
        apply_slicing(m, plan)
        counts[head] = sliced_num_parameters(m)
    assert counts["tied"]["total"] < n_dense
    # untying adds a vocab x d head and drops the d x d head projection
    vocab, d = dense.config.vocab_size, 48
    assert counts["untied"]["total"] - counts["tied"]["total"] == vocab * d - d * d
    assert counts["tied"]["untied_head"] == 0 and counts["untied"]["untied_head"] == vocab * d
    assert counts["tied"]["shortcuts"] == counts["untied"]["shortcuts"] > 0


# ----- saving and loading ---------------------------------------------------------------------------------------------
def _sliced(model_type: str, method: str, tied: bool, seed: int = 0):
    model = _model(model_type, tied=tied, seed=seed)
    ids, mask = _inputs(model.config.vocab_size, b=4)
    options = dict(base_slicing=0.1) if method == "dynamic_slicing" else {}
    plan = get(method, slicing=0.3, progress=False, **options).plan(model, _batches(ids, mask))
    apply_slicing(model, plan)
    return model, ids, mask


@pytest.mark.parametrize(
    "model_type,method,tied",
    [
        ("llama", "slicegpt", True),
        ("llama", "dynamic_slicing", False),
        ("mistral", "dynamic_slicing", True),
        ("qwen2", "slicegpt", False),
        ("qwen3", "dynamic_slicing", True),
        ("gemma3_text", "dynamic_slicing", True),
    ],
)
def test_save_and_from_pretrained_reproduce_logits_and_generation(tmp_path, model_type, method, tied):
    model, ids, mask = _sliced(model_type, method, tied)
    if method == "dynamic_slicing":
        assert len(set(model.config.residual_dims)) > 1
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"configuration_hf_prune_sliced.py", "modeling_hf_prune_sliced.py", "config.json"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    assert loaded.config.residual_dims == model.config.residual_dims
    assert _max_diff(_logits(loaded, ids, mask), _logits(model, ids, mask)) <= 1e-5
    prompt = ids[:1, :6]
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert loaded.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False).tolist() == expected.tolist()


# The child hides hf_prune even where it is installed: `-I` drops PYTHONPATH, the user site and the working directory
# from sys.path; an editable install (setuptools) adds a meta-path finder whose repr names "__editable__" and/or a
# sys.path entry holding hf_prune/, both removed before anything is imported. The assertion proves it worked.
_CHILD = textwrap.dedent(
    """
    import importlib, importlib.util, os, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (type(f).__module__ + repr(f)).lower()]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p
                   and not os.path.isfile(os.path.join(p or os.getcwd(), "hf_prune", "__init__.py"))]
    importlib.invalidate_caches()
    assert importlib.util.find_spec("hf_prune") is None, "hf_prune is importable in the child process"
    import torch
    from transformers import AutoModelForCausalLM
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        data = torch.load(os.path.join(path, "inputs.pt"))
        with torch.no_grad():
            logits = model(input_ids=data["ids"], attention_mask=data["mask"]).logits
        gen = model.generate(data["ids"][:1, :6], max_new_tokens=8, do_sample=False)
        torch.save({"logits": logits, "gen": gen, "module": type(model).__module__}, os.path.join(path, "out.pt"))
    assert not any(k.split(".")[0] == "hf_prune" for k in sys.modules), "remote code imported hf_prune"
    """
)


def test_trust_remote_code_loads_constant_and_dynamic_slices_without_hf_prune(tmp_path):
    cases = {}
    for name, (model_type, method, tied) in {
        "constant": ("llama", "slicegpt", True),
        "dynamic": ("qwen2", "dynamic_slicing", False),
    }.items():
        model, ids, mask = _sliced(model_type, method, tied)
        path = tmp_path / name
        model.save_pretrained(path)
        torch.save({"ids": ids, "mask": mask}, path / "inputs.pt")
        cases[name] = (model, ids, mask, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, *(str(c[3]) for c in cases.values())],
        cwd="/tmp", env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model, ids, mask, path in cases.values():
        out = torch.load(path / "out.pt")
        assert out["module"].startswith("transformers_modules.")
        assert _max_diff(out["logits"] * mask[..., None], _logits(model, ids, mask)) <= 1e-5
        expected = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
        assert out["gen"].tolist() == expected.tolist()


def test_auto_basis_keeps_the_global_basis_that_passes_and_rebuilds_it_on_every_batch():
    """basis='auto' builds the global basis on 3 of 4 batches, scores it on the held-out one (the figure is that
    build's loss there), and, since it passes, rebuilds it from all 4: the model equals a fixed global run on all
    batches; no copy, no other candidate; the evidence is in the provenance (strict JSON)."""
    import json

    from hf_prune.methods.slicegpt import calibration_loss

    model = _model("llama")
    ids, mask = _inputs(model.config.vocab_size, b=8)
    batches = _batches(ids, mask)  # 4 batches: 3 to build, 1 held out
    on_build, on_all = copy.deepcopy(model), copy.deepcopy(model)
    plan = get("slicegpt", slicing=0.3, protect_early="none", progress=False).plan(model, batches)
    choice = plan.provenance["basis_choice"]
    json.dumps(plan.provenance, allow_nan=False)
    assert (choice["build_batches"], choice["held_out_batches"]) == (3, 1)
    [row] = choice["candidates"]
    assert row["basis"] == "global" and row["chosen"] and row["rebuilt_on_all_batches"]
    assert choice["chosen"] == {"basis": "global", "head": "tied"} and plan.residual_widths["basis"] == "global"
    assert plan.provenance["calibration_check"]["held_out"] is True
    fixed = dict(basis="global", max_ppl_ratio=0, progress=False)
    p_build = get("slicegpt", slicing=0.3, **fixed).plan(on_build, batches[:3])
    apply_slicing(on_build, p_build)
    nll, _ = calibration_loss(on_build, batches[3:])
    assert nll == pytest.approx(row["held_out_nll"], rel=1e-5)  # the score is the build-batches basis's
    p_all = get("slicegpt", slicing=0.3, **fixed).plan(on_all, batches)
    assert p_all.residual_widths == plan.residual_widths
    apply_slicing(model, plan)
    apply_slicing(on_all, p_all)
    assert sum(p.numel() for p in model.parameters()) == row["parameters"]
    ref = _logits(on_all, ids, mask)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4 * max(1.0, ref.abs().max().item())
    assert _max_diff(_logits(on_build, ids, mask), ref) > 1e-3  # the rebuild changed the model: the test can fail


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_auto_basis_scores_schedules_that_keep_the_first_layers_whole_at_no_more_parameters(model_type):
    """protect_early='auto': next to one width everywhere, the global basis is scored with the first L/6 and L/3
    layers (here 1) at full width and the later ones narrower, never more parameters than the uniform plan; each
    figure is that schedule's held-out loss on the build-batches basis; the lowest wins (uniform unless better by
    auto_tolerance) and the rebuild on every batch keeps the chosen per-layer fractions."""
    from hf_prune.methods.slicegpt import calibration_loss
    from hf_prune.surgery import masked_slicing

    model = _model(model_type)
    ids, mask = _inputs(model.config.vocab_size, b=8)
    batches = _batches(ids, mask)
    twin, on_all = copy.deepcopy(model), copy.deepcopy(model)
    plan = get("slicegpt", slicing=0.3, progress=False).plan(model, batches)
    rows = plan.provenance["basis_choice"]["candidates"]
    uniform, scheduled = rows[0], rows[1:]
    assert "schedule" not in uniform and scheduled and all(r["schedule"].startswith("first 1 layers") for r in scheduled)
    fixed = get("slicegpt", slicing=0.3, basis="global", max_ppl_ratio=0, progress=False)
    p_build = fixed.plan(twin, batches[:3])
    for r in scheduled:
        assert r["parameters"] <= uniform["parameters"]
        assert r["layer_slicing"][0] == 0.0 and r["layer_slicing"][-1] > 0.3
        dims = fixed.residual_dims(r["layer_slicing"], model.config.hidden_size)
        with masked_slicing(twin, dims):
            nll, _ = calibration_loss(twin, batches[3:])
        assert nll == pytest.approx(r["held_out_nll"], rel=1e-5)
    best = min(scheduled, key=lambda r: r["held_out_nll"])
    keep = best if best["held_out_nll"] < uniform["held_out_nll"] - math.log1p(0.01) else uniform
    assert [r for r in rows if r.get("chosen")] == [keep]
    assert plan.residual_widths["layer_slicing"] == keep.get("layer_slicing", [0.3] * model.config.num_hidden_layers)
    del p_build
    final = get("slicegpt", slicing=0.3, basis="global", max_ppl_ratio=0, progress=False)
    final._fractions = keep.get("layer_slicing")
    p_all = final.plan(on_all, batches)
    assert p_all.residual_widths == plan.residual_widths
    apply_slicing(model, plan)
    apply_slicing(on_all, p_all)
    assert sum(p.numel() for p in model.parameters()) == keep["parameters"]
    ref = _logits(on_all, ids, mask)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4 * max(1.0, ref.abs().max().item())


def test_auto_basis_escalates_to_the_shortcut_bases_when_the_global_one_fails(monkeypatch):
    """When the global basis fails its held-out check, 'layer', 'sublayer' and the best with an untied head are
    built on copies and scored; the lowest held-out loss among those not larger than dense is kept (the smallest
    within auto_tolerance) and the returned model is exactly the winner's run."""
    from hf_prune.methods.slicegpt import SliceGPT, calibration_loss

    monkeypatch.setattr(SliceGPT, "_global_passes", lambda self, nll, dense: False)
    model = _model("llama")
    dense = sum(p.numel() for p in model.parameters())
    ids, mask = _inputs(model.config.vocab_size, b=8)
    batches = _batches(ids, mask)
    twin = copy.deepcopy(model)
    plan = get("slicegpt", slicing=0.3, max_ppl_ratio=0, progress=False).plan(model, batches)
    choice = plan.provenance["basis_choice"]
    assert {r["basis"] for r in choice["candidates"]} == {"global", "layer", "sublayer"}
    assert any(r["head"] == "untied" for r in choice["candidates"]) == (choice["candidates"][-1]["head"] == "untied")
    scored = [r for r in choice["candidates"] if r.get("held_out_nll") is not None]
    low = min(r["held_out_nll"] for r in scored)
    best = min((r for r in scored if r["held_out_nll"] <= low + math.log1p(0.01)), key=lambda r: r["parameters"])
    assert choice["chosen"] == {"basis": best["basis"], "head": best["head"]} and best["chosen"]
    assert all(r["parameters"] <= dense for r in scored)
    # the same basis and head run alone on the build batches gives the same model
    alone = get("slicegpt", slicing=0.3, basis=best["basis"], head=best["head"], max_ppl_ratio=0, progress=False)
    plan2 = alone.plan(twin, batches[:3])
    assert plan2.residual_widths == plan.residual_widths
    apply_slicing(model, plan)
    apply_slicing(twin, plan2)
    assert sum(p.numel() for p in model.parameters()) == best["parameters"] <= dense
    assert _max_diff(_logits(model, ids, mask), _logits(twin, ids, mask)) <= 1e-4
    nll, _ = calibration_loss(model, batches[3:])
    assert nll == pytest.approx(best["held_out_nll"], rel=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_predicted_sizes_are_exact(model_type):
    from hf_prune.methods.slicegpt import predicted_sizes

    for basis in ("global", "layer", "sublayer"):
        model = make_rotation_invariant(_model(model_type))
        ids, mask = _inputs(model.config.vocab_size, b=4)
        dims = [40] + [48, 48, 32, 32, 56, 56, 40] + [40]
        sizes = predicted_sizes(model, dims)
        plan = get("slicegpt", slicing=0.3, basis=basis, max_ppl_ratio=0, progress=False)
        plan.plan(model, _batches(ids, mask))  # rotates (adds the basis' shortcut matrices)
        apply_slicing(model, dims)
        assert sum(p.numel() for p in model.parameters()) == sizes[basis], basis


def test_a_plan_larger_than_dense_is_refused_with_the_figures():
    """Light slicing with shortcut matrices (and Gemma 3's post-norm projections) would grow the model: refused
    before any rotation; basis='auto' never builds such a candidate."""
    from hf_prune.methods.slicegpt import SlicedLargerThanDenseError

    model = _model("llama")
    ids, mask = _inputs(model.config.vocab_size, b=4)
    ref = _logits(model, ids, mask)
    with pytest.raises(SlicedLargerThanDenseError, match=r"basis='sublayer' would leave [\d,]+ parameters, more than "
                       r"the dense model's [\d,]+.*shortcut matrices"):
        get("slicegpt", slicing=0.05, basis="sublayer", progress=False).plan(model, _batches(ids, mask))
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4  # nothing rotated; the same function
    gemma = _model("gemma3_text")
    with pytest.raises(SlicedLargerThanDenseError, match="post-sublayer norm"):
        get("slicegpt", slicing=0.05, basis="global", progress=False).plan(gemma, _batches(ids, mask))
    with pytest.raises(SlicedLargerThanDenseError, match="no basis gives a model"):
        get("slicegpt", slicing=0.05, progress=False).plan(_model("gemma3_text"), _batches(ids, mask))


def _trained(steps: int = 60) -> tuple[nn.Module, list[dict]]:
    """A tiny llama trained to predict a fixed token pattern: dense perplexity near 1 on it."""
    model = _model("llama")
    model.train()
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(4, model.config.vocab_size, (16,), generator=g)
    ids = pattern.repeat(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, [{"input_ids": ids[i : i + 2]} for i in range(0, 8, 2)]


def test_a_run_whose_calibration_perplexity_explodes_stops_with_the_figure():
    from hf_prune.methods.slicegpt import SlicingDegradedError

    model, batches = _trained()
    with pytest.raises(SlicingDegradedError, match=r"perplexity on \d+ its own calibration tokens is .* dense .*"
                       r"above max_ppl_ratio=10"):
        get("slicegpt", slicing=0.9, basis="global", progress=False).plan(model, batches)
    model, batches = _trained()
    ref = _logits(model, batches[0]["input_ids"], torch.ones_like(batches[0]["input_ids"]))
    with pytest.raises(SlicingDegradedError, match="held-out calibration tokens.*candidates: global/tied"):
        get("slicegpt", slicing=0.9, max_ppl_ratio=1.5, progress=False).plan(model, batches)
    # basis='auto' may leave the model rotated when it stops, never changed: the same function
    assert _max_diff(_logits(model, batches[0]["input_ids"], torch.ones_like(batches[0]["input_ids"])), ref) <= 1e-4
    plan = get("slicegpt", slicing=0.9, basis="global", max_ppl_ratio=0, progress=False).plan(_trained()[0], batches)
    assert plan.provenance["calibration_check"] is None  # 0 skips the check
    with pytest.raises(ValueError, match="max_ppl_ratio"):
        get("slicegpt", max_ppl_ratio=0.5)


def test_dynamic_slicing_defaults_are_not_constant_and_a_constant_schedule_says_so():
    model = _model("llama")
    ids, mask = _inputs(model.config.vocab_size, b=4)
    method = get("dynamic_slicing", slicing=0.1, basis="global", progress=False)
    assert method.base_fraction == pytest.approx(0.1 / 3)
    plan = method.plan(model, _batches(ids, mask))
    assert len(set(plan.residual_widths["layer_slicing"])) > 1
    assert plan.provenance["schedule_note"].startswith("per-layer slicing")
    with pytest.warns(UserWarning, match="constant schedule: base_slicing=0.1 equals slicing=0.1"):
        plan = get("dynamic_slicing", slicing=0.1, base_slicing=0.1, basis="global", progress=False).plan(
            _model("llama"), _batches(ids, mask))
    assert plan.provenance["schedule_note"].startswith("constant schedule")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_global_basis_model_saves_and_reloads(tmp_path, model_type):
    """The global basis (what basis='auto' picks at light slicing) has no shortcut matrices; it reloads exactly."""
    from hf_prune.surgery import apply_slicing, sliced_num_parameters

    model = _model(model_type)
    ids, mask = _inputs(model.config.vocab_size, b=4)
    plan = get("slicegpt", slicing=0.05, basis="auto", progress=False).plan(model, _batches(ids, mask))
    assert plan.residual_widths["basis"] == "global"
    apply_slicing(model, plan)
    assert sliced_num_parameters(model)["shortcuts"] == 0
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _max_diff(_logits(loaded, ids, mask), _logits(model, ids, mask)) <= 1e-5
