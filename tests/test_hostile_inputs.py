"""Hostile inputs: every bad value is refused before any weight moves, with an error that names it.

Each case asserts the error type, that the message names the bad value (and what is valid where there is a range),
and that the model (its state_dict, bit for bit) and every file under the test's folder are unchanged afterwards.
Classes: plan files (strict schema, strict JSON), plans bound to their model (applied twice, another model),
non-finite values (a model with NaN weights), calibration batches for every method, option types, BOS tokenization,
and runs that would remove less than asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny import SENTENCES, _tokenizer_json, tiny_model, tiny_tokenizer

import hf_prune
from hf_prune import methods
from hf_prune.arch import get_adapter
from hf_prune.checks import (
    NonFiniteError,
    check_batches,
    check_fraction,
    check_int_option,
    require_finite,
)
from hf_prune.data import adds_bos, batches as make_batches, token_blocks, tokenize_stream
from hf_prune.evaluate import mc_requests, perplexity
from hf_prune.plan import PLAN_FILENAME, PlanError, PrunePlan, architecture_of

VOCAB = 320  # tiny_tokenizer's vocabulary (tests/tiny.py)

# ----- helpers --------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN == NaN)."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def unchanged(model: torch.nn.Module | None, folder: Path):
    """Assert, after the block, that `model`'s state_dict and every file under `folder` are as before it."""
    (folder / "user_notes.txt").write_text("a file hf-prune did not write")
    before_files = _files(folder)
    before = {k: (type(v), _bits(v).clone(), v.shape) for k, v in model.state_dict().items()} if model else {}
    cls = type(model)
    yield
    assert _files(folder) == before_files, "files on disk changed"
    if model is not None:
        assert type(model) is cls, f"the model's class changed to {type(model).__name__}"
        after = model.state_dict()
        assert set(after) == set(before), "parameters were added or removed"
        for k, (_, bits, shape) in before.items():
            assert after[k].shape == shape and torch.equal(_bits(after[k]), bits), f"{k} changed"


def _batches(n: int = 2, t: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return make_batches(torch.randint(4, VOCAB, (2 * n, t), generator=g), 2)


def _nan_model(layer: int = 2) -> torch.nn.Module:
    model = tiny_model("llama")
    with torch.no_grad():
        get_adapter(model).mlp(layer).down_proj.weight[0, 0] = float("nan")
    return model


def _bos_tokenizer():
    """The tiny BPE with a post-processor that puts <s> in front of every text (as Llama's and Gemma's do)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)


def _no_bos_token_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="</s>")


# ----- 1. plan files: strict schema, the file and the field named -------------------------------------------------------

PLAN_FILES = {
    "drop_layers as a string": ('{"drop_layers": "12"}', ["drop_layers", "'12'"]),
    "a float layer index": ('{"drop_layers": [1.7]}', ["drop_layers[0]", "1.7"]),
    "a bool layer index": ('{"drop_layers": [true]}', ["drop_layers[0]", "True"]),
    "an integral float index": ('{"mlp_channels": {"0": [0, 2.0]}}', ["mlp_channels['0'][1]", "2.0"]),
    "head list as a string": ('{"heads": {"0": "01"}}', ["heads['0']", "'01'"]),
    "a layer key that is no number": ('{"kv_heads": {"x": [0]}}', ["kv_heads", "'x'"]),
    "a table that is a list": ('{"heads": [[0, 1]]}', ["heads", "list"]),
    "an unknown field": ('{"drop_layer": [1]}', ["drop_layer", "valid fields"]),
    "truncated JSON": ('{"drop_layers": [1, 2', ["not valid JSON", "truncated"]),
    "a list at the top": ("[1, 2]", ["JSON object", "list"]),
    "NaN in the provenance": ('{"provenance": {"score": NaN}}', ["NaN"]),
    "architecture with a string count": (
        '{"architecture": {"model_type": "llama", "num_layers": "4", "hidden_size": 64, "vocab_size": 320, '
        '"layers": [], "residual_dims": null}}', ["architecture.num_layers", "'4'"]),
    "architecture with an unknown key": (
        '{"architecture": {"model_type": "llama", "num_layers": 0, "hidden_size": 64, "vocab_size": 320, '
        '"layers": [], "residual_dims": null, "depth": 3}}', ["architecture", "'depth'"]),
    "provenance that is a string": ('{"provenance": "shortgpt"}', ["provenance", "'shortgpt'"]),
}


@pytest.mark.parametrize("case", sorted(PLAN_FILES))
def test_plan_file_with_a_bad_field_is_refused_naming_file_and_field(case, tmp_path):
    text, fragments = PLAN_FILES[case]
    path = tmp_path / "run" / PLAN_FILENAME
    path.parent.mkdir()
    path.write_text(text)
    model = tiny_model("llama")
    with unchanged(model, tmp_path), pytest.raises(PlanError) as err:
        hf_prune.apply(model, PrunePlan.load(path.parent))
    msg = str(err.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"drop_layers": [True]}, "True"),
    ({"drop_layers": "3"}, "'3'"),
    ({"heads": {1: [0.5]}}, "0.5"),
])
def test_plan_constructor_is_as_strict_as_the_file(kwargs, fragment, tmp_path):
    model = tiny_model("llama")
    with unchanged(model, tmp_path), pytest.raises(PlanError, match=re.escape(fragment)):
        hf_prune.apply(model, PrunePlan(**kwargs))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_plan_with_non_finite_provenance_is_not_written(value, tmp_path):
    plan = PrunePlan(drop_layers=[1], provenance={"method": "x", "scores": [0.5, value]})
    with unchanged(None, tmp_path), pytest.raises(PlanError) as err:
        plan.save(tmp_path)
    assert "provenance.scores[1]" in str(err.value) and str(value) in str(err.value)


def test_plan_round_trips_as_strict_json():
    model = tiny_model("llama")
    plan = PrunePlan(drop_layers=[3], heads={1: [0, 1]}, provenance={"score": 0.25},
                     architecture=architecture_of(model))
    text = plan.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert PrunePlan.from_json(text) == plan


# ----- 2. plans bound to their model ------------------------------------------------------------------------------------


def test_a_plan_applied_twice_is_refused(tmp_path):
    model = tiny_model("llama")
    plan = methods.get("shortgpt", n_remove=1, progress=False).plan(model, _batches())
    assert plan.architecture == architecture_of(tiny_model("llama"))
    hf_prune.apply(model, plan)
    with unchanged(model, tmp_path), pytest.raises(PlanError) as err:
        hf_prune.apply(model, plan)
    assert "4 layers, model has 3" in str(err.value) and "applied already" in str(err.value)


def test_a_saved_plan_applied_to_another_family_is_refused(tmp_path):
    plan = PrunePlan(drop_layers=[0], architecture=architecture_of(tiny_model("llama")))
    plan.save(tmp_path)
    other = tiny_model("qwen2")
    with unchanged(other, tmp_path), pytest.raises(PlanError) as err:
        hf_prune.apply(other, PrunePlan.load(tmp_path))
    assert "'llama'" in str(err.value) and "'qwen2'" in str(err.value)


def test_a_plan_for_other_widths_is_refused_naming_the_layer(tmp_path):
    plan = PrunePlan(mlp_channels={0: [0, 1]}, architecture=architecture_of(tiny_model("llama")))
    narrower = tiny_model("llama", intermediate_size=96)
    with unchanged(narrower, tmp_path), pytest.raises(PlanError) as err:
        hf_prune.apply(narrower, plan)
    assert "layer 0" in str(err.value) and "(4, 2, 128)" in str(err.value) and "(4, 2, 96)" in str(err.value)


def test_a_composed_plan_keeps_the_first_architecture(tmp_path):
    model = tiny_model("llama")
    first = PrunePlan(drop_layers=[0], architecture=architecture_of(model))
    second = PrunePlan(drop_layers=[0], architecture={**architecture_of(model), "num_layers": 3,
                                                      "layers": architecture_of(model)["layers"][:3]})
    both = first.then(second)
    assert both.architecture == first.architecture
    hf_prune.apply(model, first)
    with unchanged(model, tmp_path), pytest.raises(PlanError, match="4 layers, model has 3"):
        hf_prune.apply(model, both)


def test_a_hand_written_plan_without_architecture_still_applies():
    model = tiny_model("llama")
    hf_prune.apply(model, PrunePlan.from_json('{"drop_layers": [1]}'))
    assert get_adapter(model).num_layers == 3


# ----- 3. non-finite values stop the run naming method, stage and layer ---------------------------------------------------

NAN_METHODS = {
    "shortgpt": ({"n_remove": 1, "progress": False}, ["shortgpt", "stage 0", "layer 2"]),
    "iterabre": ({"n_remove": 1}, ["iterabre", "stage 0", "layer 2"]),
    "slicegpt": ({"slicing": 0.25, "progress": False}, ["slicegpt", "stage 0", "layer 2", "layers.2.mlp.down_proj"]),
    "magnitude": ({"target": 0.1, "steps": 1, "progress": False}, ["magnitude", "layer 2"]),
    "llm_pruner": ({"target": 0.1, "skip_first_layers": 1, "progress": False, "memory_budget_gb": 4.0},
                   ["taylor", "calibration loss"]),
}


@pytest.mark.parametrize("name", sorted(NAN_METHODS))
def test_nan_weights_stop_every_scorer(name, tmp_path):
    kwargs, fragments = NAN_METHODS[name]
    model = _nan_model(layer=2)
    with unchanged(model, tmp_path), pytest.raises(NonFiniteError) as err:
        methods.get(name, **kwargs).plan(model, _batches())
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_nan_weights_stop_kfac_and_perplexity(tmp_path):
    from hf_prune.kfac import collect_lm_kfac

    model = _nan_model(layer=1)
    with unchanged(model, tmp_path), pytest.raises(NonFiniteError, match="calibration loss"):
        collect_lm_kfac(model, _batches(), progress=False, log=lambda s: None)
    with unchanged(model, tmp_path), pytest.raises(NonFiniteError, match="nan"):
        perplexity(model, tiny_tokenizer(), SENTENCES, window=16)


@pytest.mark.parametrize("value, fragment", [
    (float("nan"), "nan"), (float("inf"), "inf"), ([0.1, float("nan")], "entries [1]"),
    (torch.tensor([1.0, float("-inf")]), "1 of 2 values are inf"),
])
def test_require_finite_names_method_stage_layer(value, fragment):
    with pytest.raises(NonFiniteError) as err:
        require_finite(value, method="m", stage=3, layer=7, what="the score")
    msg = str(err.value)
    assert "m: the score" in msg and "stage 3" in msg and "layer 7" in msg and fragment in msg
    require_finite(torch.ones(3), method="m", stage=0, layer=0, what="ok")  # finite values pass


# ----- 4. calibration batches, for every method ----------------------------------------------------------------------

METHODS = {  # options for the tiny model; every registered method is tested, with its defaults where not listed
    "shortgpt": {"n_remove": 1, "progress": False},
    "iterabre": {"n_remove": 1},
    "slicegpt": {"slicing": 0.25, "progress": False},
    "dynamic_slicing": {"slicing": 0.25, "progress": False},
    "llm_pruner": {"target": 0.1, "progress": False},
    "pip": {"target": 0.1, "steps": 1, "perturbation": "embedding", "progress": False},
    "magnitude": {"target": 0.1, "steps": 1, "progress": False},
    "llm_surgeon": {},
}


def _ids(*shape, lo=4, hi=VOCAB):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(1))


BAD_BATCHES = {
    "a raw tensor": (lambda: _ids(4, 12), TypeError, ["torch.Tensor of shape (4, 12)", "hf_prune.data.batches"]),
    "one batch dict": (lambda: {"input_ids": _ids(2, 12)}, TypeError, ["single batch dict", "[batch]"]),
    "empty": (lambda: [], ValueError, ["empty"]),
    "all padding": (lambda: [{"input_ids": _ids(2, 12), "attention_mask": torch.zeros(2, 12, dtype=torch.long)}],
                    ValueError, ["no real token", "all padding"]),
    "an id past the vocabulary": (lambda: [{"input_ids": torch.cat([_ids(2, 11), torch.full((2, 1), VOCAB)], 1)}],
                                  ValueError, [f"token id {VOCAB}", f"0..{VOCAB - 1}"]),
    "a negative id": (lambda: [{"input_ids": torch.cat([_ids(2, 11), torch.full((2, 1), -1)], 1)}],
                      ValueError, ["token id -1", f"0..{VOCAB - 1}"]),
    "float ids": (lambda: [{"input_ids": _ids(2, 12).float()}], TypeError, ["torch.float32", "integer"]),
    "1-D ids": (lambda: [{"input_ids": _ids(12)}], ValueError, ["shape (12,)", "2-D"]),
    "a mask of another shape": (lambda: [{"input_ids": _ids(2, 12), "attention_mask": torch.ones(2, 11,
                                                                                                  dtype=torch.long)}],
                                ValueError, ["(2, 11)", "(2, 12)"]),
    "a mask holding 2": (lambda: [{"input_ids": _ids(2, 12), "attention_mask": torch.full((2, 12), 2)}],
                         ValueError, ["[2]", "only 0"]),
    "no input_ids": (lambda: [{"ids": _ids(2, 12)}], ValueError, ["no 'input_ids'", "['ids']"]),
}

BATCH_CASES = [(m, b) for m in methods.available() for b in sorted(BAD_BATCHES)]


@pytest.mark.parametrize("name, case", BATCH_CASES)
def test_bad_calibration_batches_are_refused_by_every_method(name, case, tmp_path):
    make, error, fragments = BAD_BATCHES[case]
    model = tiny_model("llama")
    method = methods.get(name, **METHODS.get(name, {}))
    if case == "empty" and not method.needs_calibration:  # data-free (magnitude): no batches is valid input
        method.plan(model, make())
        return
    with unchanged(model, tmp_path), pytest.raises(error) as err:
        method.plan(model, make())
    msg = str(err.value)
    assert name in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_check_batches_returns_a_list_from_a_generator():
    model = tiny_model("llama")
    out = check_batches((b for b in _batches()), model, method="m")
    assert isinstance(out, list) and len(out) == 2
    assert check_batches([], model, method="m", required=False) == []


@pytest.mark.parametrize("batches, fragment", [([], "empty"), ([{"input_ids": _ids(1, 8),
                                                                "attention_mask": torch.zeros(1, 8)}], "dtype")])
def test_iterabre_scores_refuse_empty_calibration_without_zero_division(batches, fragment):
    from hf_prune.methods.iterabre import layer_removal_scores

    with pytest.raises((ValueError, TypeError), match=fragment):
        layer_removal_scores(tiny_model("llama"), batches, progress=False)


# ----- 5. option types and impossible targets -----------------------------------------------------------------------

BAD_OPTIONS = [
    ("shortgpt", {"n_remove": True}, TypeError, "n_remove=True"),
    ("shortgpt", {"n_remove": 1.7}, TypeError, "n_remove=1.7"),
    ("shortgpt", {"n_remove": "abc"}, TypeError, "n_remove='abc'"),
    ("shortgpt", {"n_remove": 0}, ValueError, "n_remove=0"),
    ("shortgpt", {"n_remove": 4, "per_stage": 2.5}, TypeError, "per_stage=2.5"),
    ("iterabre", {"n_remove": False}, TypeError, "n_remove=False"),
    ("iterabre", {"kd_alpha": 1.5}, ValueError, "kd_alpha=1.5"),
    ("iterabre", {"lora_r": 2.5}, TypeError, "lora_r=2.5"),
    ("iterabre", {"similarity": "dot"}, ValueError, "similarity='dot'"),
    ("iterabre", {"protect_first": -1}, ValueError, "protect_first=-1"),
    ("slicegpt", {"slicing": "0.2"}, TypeError, "slicing='0.2'"),
    ("slicegpt", {"slicing": float("nan")}, ValueError, "slicing=nan"),
    ("slicegpt", {"round_to": True}, TypeError, "round_to=True"),
    ("slicegpt", {"damping": -1.0}, ValueError, "damping=-1.0"),
    ("dynamic_slicing", {"base_slicing": True}, TypeError, "base_slicing=True"),
]


@pytest.mark.parametrize("name, kwargs, error, fragment", BAD_OPTIONS)
def test_bad_option_types_and_values_are_refused(name, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        methods.get(name, **kwargs)


@pytest.mark.parametrize("name, kwargs, fragment", [
    ("shortgpt", {"n_remove": 4}, "n_remove=4"),
    ("shortgpt", {"n_remove": 5, "per_stage": 1}, "n_remove=5"),
    ("iterabre", {"n_remove": 4}, "n_remove=4"),
    ("iterabre", {"n_remove": 2, "protect_first": 2, "protect_last": 1}, "1 removable"),
])
def test_removing_every_layer_is_refused_before_any_work(name, kwargs, fragment, tmp_path):
    model = tiny_model("llama")  # 4 layers
    with unchanged(model, tmp_path), pytest.raises(ValueError, match=re.escape(fragment)):
        methods.get(name, **kwargs).plan(model, _batches())


@pytest.mark.parametrize("value, kwargs, error, fragment", [
    (True, {}, TypeError, "boolean"), (2.5, {}, TypeError, "whole number"), ("3", {}, TypeError, "str"),
    (0, {"minimum": 1}, ValueError, ">= 1"), (9, {"minimum": 1, "maximum": 8}, ValueError, "1..8"),
])
def test_check_int_option(value, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        check_int_option("k", value, **kwargs)
    assert check_int_option("k", 3.0) == 3 and check_int_option("k", torch.tensor(3)) == 3


@pytest.mark.parametrize("value, error", [(True, TypeError), ("0.1", TypeError), (1.0, ValueError),
                                          (float("inf"), ValueError)])
def test_check_fraction(value, error):
    with pytest.raises(error, match=re.escape(f"f={value!r}")):
        check_fraction("f", value, lo=0.0, hi=1.0)
    assert check_fraction("f", 0, lo=0.0, hi=1.0) == 0.0


# ----- 6. BOS where the tokenizer adds one ----------------------------------------------------------------------------


def test_blocks_start_with_bos_when_the_tokenizer_adds_one():
    tok = _bos_tokenizer()
    assert adds_bos(tok) and not adds_bos(tiny_tokenizer())
    blocks = token_blocks(tok, SENTENCES * 10, n_samples=5, seq_len=12, seed=0)
    assert blocks.shape == (5, 12) and (blocks[:, 0] == tok.bos_token_id).all()
    stream = tokenize_stream(tok, SENTENCES * 10).tolist()
    for row in blocks[:, 1:].tolist():  # the rest is a contiguous window of the stream
        assert any(stream[i : i + 11] == row for i in range(len(stream) - 10))


def test_blocks_without_bos_are_plain_windows_as_before():
    tok = tiny_tokenizer()
    blocks = token_blocks(tok, SENTENCES * 10, n_samples=5, seq_len=12, seed=0)
    stream = tokenize_stream(tok, SENTENCES * 10)
    starts = torch.randint(0, stream.numel() - 12, (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks, torch.stack([stream[s : s + 12] for s in starts.tolist()]))
    assert (blocks[:, 0] != tok.bos_token_id).any()


def test_perplexity_windows_start_with_bos_when_the_tokenizer_adds_one():
    tok, model = _bos_tokenizer(), tiny_model("llama")
    stream = tokenize_stream(tok, SENTENCES[:2])
    bos = torch.tensor([tok.bos_token_id])
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in stream.split(15):  # windows of 16: BOS + 15 stream tokens, every stream token predicted
            x = torch.cat([bos, chunk])[None]
            nll += model(x, labels=x).loss.item() * chunk.numel()
            count += chunk.numel()
    out = perplexity(model, tok, SENTENCES[:2], window=16)
    assert out["bos"] is True and out["tokens"] == count == stream.numel() and stream.numel() > 32
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert perplexity(model, tiny_tokenizer(), SENTENCES[:2], window=16)["bos"] is False


def test_multiple_choice_contexts_start_with_bos_when_the_tokenizer_adds_one():
    ctx, cont = mc_requests(_bos_tokenizer(), "The quick brown fox", "jumps")
    plain_ctx, plain_cont = mc_requests(tiny_tokenizer(), "The quick brown fox", "jumps")
    assert ctx == [_bos_tokenizer().bos_token_id] + plain_ctx and cont == plain_cont


@pytest.mark.parametrize("bos, error, fragment", [(True, ValueError, "no bos_token_id"),
                                                   ("yes", TypeError, "bos='yes'")])
def test_token_blocks_bad_bos_option(bos, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        token_blocks(_no_bos_token_tokenizer(), SENTENCES * 10, n_samples=2, seq_len=8, bos=bos)


# ----- 7. a run that would remove less than asked ---------------------------------------------------------------------


def test_one_kv_head_says_attention_cannot_be_pruned():
    from hf_prune.methods.importance import check_removable

    ad = get_adapter(tiny_model("llama", num_key_value_heads=1))
    with pytest.raises(ValueError, match=re.escape("one kv head")) as err:
        check_removable(ad, [1, 2], "kv", attention=True, mlp=True, method="llm_pruner")
    assert "head_grouping='query'" in str(err.value) and "allow_partial=True" in str(err.value)
    causes = check_removable(ad, [1, 2], "kv", attention=True, mlp=True, allow_partial=True)
    assert len(causes) == 1 and "one kv head" in causes[0]
    with pytest.raises(ValueError, match="one kv head"):  # nothing else to prune: refused even with allow_partial
        check_removable(ad, [1, 2], "kv", attention=True, mlp=False, allow_partial=True)
    assert check_removable(ad, [1, 2], "query", attention=True, mlp=False) == []
    assert check_removable(get_adapter(tiny_model("llama")), [1, 2], "kv") == []


def test_a_slicing_plan_records_the_width_it_was_made_for(tmp_path):
    model = tiny_model("llama")
    plan = methods.get("slicegpt", slicing=0.25, progress=False).plan(model, _batches())
    assert plan.architecture is not None and plan.architecture["residual_dims"] is None  # made for full width
    hf_prune.apply(model, plan)
    with unchanged(model, tmp_path), pytest.raises(PlanError) as err:
        plan.check_architecture(model)
    assert "residual widths full" in str(err.value) and "48" in str(err.value)


@pytest.mark.parametrize("where", [(0, 0), (37, 5), (99, 6)])
def test_all_finite_finds_a_bad_value_in_any_block(monkeypatch, where):
    """all_finite checks a big tensor in row blocks (FINITE_CHUNK elements); a NaN or inf in any block, of a
    contiguous tensor or of a transposed view, is found."""
    import hf_prune.checks as checks

    monkeypatch.setattr(checks, "FINITE_CHUNK", 64)  # blocks of 9 rows of 7
    x = torch.randn(100, 7)
    assert checks.all_finite(x) and checks.all_finite(x.t())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[where] = bad
        assert not checks.all_finite(y) and not checks.all_finite(y.t())
