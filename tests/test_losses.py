"""Chunked next-token losses (hf_prune.losses) and their users: same numbers and gradients as the full logits, never
more than one chunk of logits at a time, no LM head at all where only hidden states are needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import SENTENCES, tiny_model, tiny_tokenizer

from hf_prune.arch import get_adapter
from hf_prune.evaluate import multiple_choice, perplexity
from hf_prune.kfac import collect_lm_kfac, next_token_loss
from hf_prune.losses import (
    SoftcappedHead,
    chunked_causal_lm_loss,
    chunked_kl_divergence,
    output_head,
    sample_labels,
)
from hf_prune.methods import get
from hf_prune.methods.importance import compute_importance, estimate_gradient_memory

TEXT = " ".join(SENTENCES) * 4
MC = [
    {"input": "The quick brown fox ", "target_scores": {"jumps over the lazy dog.": 1, "is": 0, "sat on a mat": 0}},
    {"input": "In the beginning was the", "target_scores": {"word": 1, "model, and the dog and the fox": 0}},
    {"input": "", "target_scores": {"Pruning": 1, "dogs and cats": 0}},
]


def _batches(seed=0, rows=2, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 6 :] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _hidden(model, ids, mask=None):
    return get_adapter(model).backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


class _RowCounter:
    """Forward hook on the LM head: number of calls and the most rows (tokens) one call saw."""

    def __init__(self, module):
        self.calls, self.max_rows = 0, 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.max_rows = max(self.max_rows, output.reshape(-1, output.shape[-1]).shape[0])

    def remove(self):
        self.handle.remove()


# ----- the loss itself ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1024, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_gradients_equal_the_full_logits_loss(chunk, reduction):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, 4:7] = -100
    labels[2, -1] = -100

    full = F.cross_entropy(head(hidden[:, :-1]).float().reshape(-1, 50), labels[:, 1:].reshape(-1),
                           reduction=reduction)
    full = full.view(3, 10) if reduction == "none" else full
    ref_grads = torch.autograd.grad(full.sum(), [hidden, head.weight, head.bias])
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=chunk, reduction=reduction)
    grads = torch.autograd.grad(got.sum(), [hidden, head.weight, head.bias])
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_recomputes_one_chunk_at_a_time():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(2, 33, 8, requires_grad=True)
    labels = torch.randint(0, 40, (2, 33))
    counter = _RowCounter(head)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=10)
        forward_calls = counter.calls
        loss.backward()
    finally:
        counter.remove()
    assert forward_calls == 7  # 64 predicted tokens in chunks of 10
    assert counter.calls == 14  # the backward recomputes each chunk's logits once
    assert counter.max_rows == 10
    assert max(saved) < 64 * 40  # nothing of the size of all tokens' logits is kept for the backward pass


def test_model_loss_and_softcapping():
    for model in (tiny_model("llama"), tiny_model("gemma3_text", final_logit_softcapping=3.0)):
        ids = _batches()[0]["input_ids"]
        head = output_head(model)
        if model.config.model_type == "gemma3_text":
            assert isinstance(head, SoftcappedHead) and head.cap == 3.0
        else:
            assert head is get_adapter(model).lm_head
        with torch.no_grad():
            ref = model(input_ids=ids, labels=ids).loss
            got = chunked_causal_lm_loss(_hidden(model, ids), head, ids, chunk_tokens=5)
            torch.testing.assert_close(head(_hidden(model, ids)), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_no_counted_token_and_bad_options():
    head = torch.nn.Linear(4, 9)
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    labels = torch.full((1, 5), -100)
    assert chunked_causal_lm_loss(hidden, head, labels, reduction="sum").item() == 0.0
    chunked_causal_lm_loss(hidden, head, labels, reduction="sum").backward()  # connected, zero gradient
    assert torch.count_nonzero(hidden.grad) == 0
    with pytest.raises(ValueError, match="reduction='avg'"):
        chunked_causal_lm_loss(hidden, head, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="do not line up"):
        chunked_causal_lm_loss(hidden, head, labels[:, :3])


def test_sampled_labels_are_seeded_and_follow_the_model():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 30)
    hidden = torch.randn(2, 9, 6)
    a = sample_labels(hidden, head, generator=torch.Generator().manual_seed(1), chunk_tokens=4)
    b = sample_labels(hidden, head, generator=torch.Generator().manual_seed(1), chunk_tokens=4)
    assert a.shape == (2, 9) and (a[:, 0] == -100).all() and torch.equal(a, b)
    assert ((a[:, 1:] >= 0) & (a[:, 1:] < 30)).all()
    sharp = torch.nn.Linear(6, 30)
    with torch.no_grad():
        sharp.weight.mul_(1e4)
    s = sample_labels(hidden, sharp, generator=torch.Generator().manual_seed(2), chunk_tokens=5)
    assert torch.equal(s[:, 1:], sharp(hidden[:, :-1]).argmax(-1))  # a near one-hot distribution gives its mode


@pytest.mark.parametrize("chunk", [3, None])
def test_kl_equals_the_full_formula(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20)
    ref, out = torch.randn(2, 7, 8), torch.randn(2, 7, 8, requires_grad=True)
    lq, lp = F.log_softmax(head(ref), -1), F.log_softmax(head(out), -1)
    full = (lq.exp() * (lq - lp)).sum(-1)
    got = chunked_kl_divergence(ref, out, head, chunk_tokens=chunk)
    torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)
    g_full, = torch.autograd.grad(full.sum(), out)
    g_got, = torch.autograd.grad(got.sum(), out)
    torch.testing.assert_close(g_got, g_full, atol=1e-6, rtol=1e-5)


# ----- evaluation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_perplexity_is_the_same_with_and_without_chunks(model_type):
    tok = tiny_tokenizer()
    model = tiny_model(model_type, final_logit_softcapping=2.0) if model_type == "gemma3_text" else tiny_model()
    full = perplexity(model, tok, TEXT, window=32, batch_size=3, max_tokens=150, chunk_tokens=None)
    counter = _RowCounter(get_adapter(model).lm_head)
    try:
        chunked = perplexity(model, tok, TEXT, window=32, batch_size=3, max_tokens=150, chunk_tokens=8)
    finally:
        counter.remove()
    assert chunked["tokens"] == full["tokens"]
    assert chunked["nll"] == pytest.approx(full["nll"], rel=1e-5, abs=1e-6)
    assert counter.max_rows == 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_multiple_choice_is_the_same_with_and_without_chunks(side):
    tok, model = tiny_tokenizer(), tiny_model("qwen2")
    full = multiple_choice(model, tok, MC, batch_size=3, padding_side=side, return_loglikelihoods=True,
                           chunk_tokens=None)
    counter = _RowCounter(get_adapter(model).lm_head)
    try:
        chunked = multiple_choice(model, tok, MC, batch_size=3, padding_side=side, return_loglikelihoods=True,
                                  chunk_tokens=2)
    finally:
        counter.remove()
    for a, b in zip(chunked["loglikelihoods"], full["loglikelihoods"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert (chunked["acc"], chunked["acc_norm"]) == (full["acc"], full["acc_norm"])
    assert counter.max_rows == 2  # only continuation tokens reach the head


# ----- gradient passes ------------------------------------------------------------------------------------------------


def test_taylor_importance_and_memory_estimate_with_chunks():
    model = tiny_model("llama", num_hidden_layers=3)
    b = _batches(1)
    full = compute_importance(model, b, [0, 2], "taylor", progress=False, chunk_tokens=None)
    counter = _RowCounter(get_adapter(model).lm_head)
    try:
        chunked = compute_importance(model, b, [0, 2], "taylor", progress=False, chunk_tokens=5)
    finally:
        counter.remove()
    assert counter.max_rows == 5
    for a, c in zip(full, chunked):
        for what in ("query_heads", "kv_heads", "mlp_channels"):
            torch.testing.assert_close(getattr(c, what), getattr(a, what), atol=1e-6, rtol=1e-5)
    big = estimate_gradient_memory(model, 8, 2048, chunk_tokens=None)
    small = estimate_gradient_memory(model, 8, 2048, chunk_tokens=1024)
    assert big.logits == 16 * small.logits


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_kfac_factors_with_chunks(fisher):
    model = tiny_model("llama", num_hidden_layers=2)
    b = _batches(2)
    quiet = {"progress": False, "log": lambda s: None}
    full = collect_lm_kfac(model, b, fisher=fisher, seed=3, chunk_tokens=None, **quiet)
    chunked = collect_lm_kfac(model, b, fisher=fisher, seed=3, chunk_tokens=6, **quiet)
    again = collect_lm_kfac(model, b, fisher=fisher, seed=3, chunk_tokens=6, **quiet)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(chunked[name].G, again[name].G)
    if fisher == "empirical":
        for n in full:
            torch.testing.assert_close(chunked[n].G, full[n].G, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(chunked[n].A, full[n].A, atol=1e-6, rtol=1e-5)


def test_kfac_loss_from_hidden_states_equals_the_logits_loss():
    from hf_prune.kfac import hidden_next_token_loss

    model = tiny_model("llama", num_hidden_layers=2)
    batch = _batches(3)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = next_token_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        got = hidden_next_token_loss(_hidden(model, ids, mask), output_head(model), ids, mask, chunk_tokens=4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----- scoring from hidden states: no LM head at all ------------------------------------------------------------------


@pytest.mark.parametrize("name, options", [("shortgpt", {"n_remove": 1, "progress": False}),
                                           ("angular_block", {"n_remove": 1, "progress": False}),
                                           ("iterabre", {"n_remove": 1}),
                                           ("iterabre", {"n_remove": 1, "similarity": "kl"})])
def test_hidden_state_scoring_never_calls_the_lm_head(name, options):
    model = tiny_model("llama", num_hidden_layers=4)
    counter = _RowCounter(get_adapter(model).lm_head)
    try:
        get(name, **options).plan(model, _batches())
    finally:
        counter.remove()
    if options.get("similarity") == "kl":
        assert counter.calls > 0  # the KL option needs logits: made chunk by chunk
    else:
        assert counter.calls == 0


def test_large_vocabularies_get_smaller_chunks_within_the_logits_budget(monkeypatch):
    """With a budget of 3 tokens' fp32 logits per call, chunk_tokens=8 is cut to 3: more calls, each within the
    budget, the same loss as the full logits."""
    import hf_prune.losses as losses

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    monkeypatch.setattr(losses, "LOGITS_BUDGET_BYTES", 3 * 50 * 4)
    rows = []
    handle = head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        got = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=8, reduction="sum")
        sample_labels(hidden, head, chunk_tokens=8)
    finally:
        handle.remove()
    assert rows[:6] == [3, 3, 3, 3, 3, 1] and max(rows) == 3  # 16 predicted tokens, then 16 sampled ones
    full = F.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert losses.chunk_rows(head, 100, None) == 100 and losses.chunk_rows(lambda x: x, 100, 8) == 8
