"""Streamed scoring: a model built on the meta device with its layers read from the checkpoint one at a time gives
the same scores as the model in memory; perplexity reads only the head of a long text."""

from __future__ import annotations

import pytest
import torch
from tiny import SENTENCES, tiny_model, tiny_tokenizer

from hf_prune.calibration import CheckpointWeights, LayerwiseRunner, streamed_model
from hf_prune.data import tokenize_stream
from hf_prune.evaluate import stream_head
from hf_prune.methods.angular_block import angular_distances
from hf_prune.methods.iterabre import layer_removal_scores
from hf_prune.methods.shortgpt import block_influence


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.randint(4, 300, (1, 9), generator=g)}]


@pytest.fixture(params=["llama", "gemma3_text"])
def saved(request, tmp_path):
    model = tiny_model(request.param, num_hidden_layers=4)
    model.save_pretrained(tmp_path)
    return model.eval(), tmp_path


def test_streamed_scores_equal_the_in_memory_ones(saved):
    model, path = saved
    streamed = streamed_model(path, dtype=torch.float32)
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())
    batches = _batches()
    assert block_influence(streamed, batches, progress=False) == block_influence(model, batches, progress=False)
    assert angular_distances(streamed, batches, 2, "all", progress=False) == \
        angular_distances(model, batches, 2, "all", progress=False)
    assert layer_removal_scores(streamed, batches, progress=False) == \
        layer_removal_scores(model, batches, progress=False)
    # every layer went back to the meta device after its turn: nothing stays resident
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())
    assert streamed.model.embed_tokens.weight.device.type == "meta"


def test_streamed_layer_holds_the_checkpoint_tensors(saved):
    model, path = saved
    streamed = streamed_model(path, dtype=torch.float32)
    runner = LayerwiseRunner(streamed, _batches(), progress=False)
    with runner.on_device(2) as layer:
        for (name, p), (_, q) in zip(layer.named_parameters(), model.model.layers[2].named_parameters()):
            assert p.device.type == "cpu" and torch.equal(p, q), name


def test_missing_tensor_and_missing_checkpoint_are_named(saved, tmp_path_factory):
    model, path = saved
    weights = CheckpointWeights(path)
    with pytest.raises(KeyError, match="model.layers.9"):
        weights.load(model.model.layers[0], "model.layers.9", "cpu")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CheckpointWeights(empty)


def test_meta_layers_without_a_checkpoint_are_refused(saved):
    model, path = saved
    streamed = streamed_model(path, dtype=torch.float32)
    del streamed.hf_prune_weights
    with pytest.raises(RuntimeError, match="meta device"):
        block_influence(streamed, _batches(), progress=False)


def test_stream_head_equals_the_head_of_the_whole_stream():
    tok = tiny_tokenizer()
    text = "\n".join(SENTENCES * 400)
    full = tokenize_stream(tok, text)
    for n in (1, 50, 3000, full.numel()):
        assert torch.equal(stream_head(tok, text, n), full[:n])
    assert torch.equal(stream_head(tok, text, None), full)
