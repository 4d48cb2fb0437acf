"""GGUF export: what the writer puts in the file (read back with gguf's reader), what it refuses, and, where
llama-cpp-python is installed, llama.cpp itself loading each file and agreeing with transformers on the same tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from hf_prune import PrunePlan, apply, compact_zeros
from hf_prune.cli import main
from hf_prune.gguf import choose_architecture, llama3_rope_factors, permute_for_ggml_rope, pre_tokenizer_name, to_gguf

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason='llama_cpp is not importable: pip install "hf-prune[gguf]" (builds llama.cpp, ~4 min '
                              "on 2 cores) to check the files with llama.cpp itself")

# weights larger than the default 0.02 so that logits have clear top-1 margins
INIT = {"initializer_range": 0.3}
IDS = [1, 5, 17, 42, 9, 100, 33, 7, 250, 64, 11, 90, 31, 8, 77, 150, 201, 12, 3, 60, 44, 120, 300, 18]

# per-layer widths: layer 0 keeps 2 of 4 query heads (one kv group) and 100 of 128 channels; layer 2 keeps 37
PER_LAYER = PrunePlan(heads={0: [2, 3]}, mlp_channels={0: list(range(100)), 2: list(range(0, 111, 3))})
DROPPED = PrunePlan(drop_layers=[1, 2])
# one kv group in every layer and 96 channels everywhere: uniform, the family's own architecture
UNIFORM = PrunePlan(kv_heads={i: [1] for i in range(4)}, mlp_channels={i: list(range(96)) for i in range(4)})


def _model(model_type: str = "llama", plan: PrunePlan | None = None, **overrides):
    model = tiny_model(model_type, **{**INIT, **overrides})
    if plan is not None:
        apply(model, plan)
    return model


def _export(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}, reader


# --------------------------------------------------------------------------------------------------------------------
# The writer, checked without llama.cpp
# --------------------------------------------------------------------------------------------------------------------


def test_per_layer_result_is_deci_with_per_layer_arrays(tmp_path):
    model = _model("llama", PER_LAYER)
    path = to_gguf(_export(model, tmp_path / "m"), tmp_path / "m.gguf", dtype="f32", pad_ffn_to=1)
    fields, reader = _fields(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [2, 4, 4, 4]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 2, 2]
    assert fields["deci.feed_forward_length"] == [100, 128, 37, 128]
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == (64, 32) and shapes["blk.0.attn_k.weight"] == (64, 16)
    assert shapes["blk.2.ffn_down.weight"] == (37, 64) and shapes["blk.2.ffn_up.weight"] == (64, 37)
    assert "output.weight" not in shapes or not model.config.tie_word_embeddings


def test_uniform_results_use_the_family_architecture(tmp_path):
    cases = {"llama": ("llama", None), "mistral": ("llama", UNIFORM), "qwen2": ("qwen2", DROPPED),
             "qwen3": ("qwen3", DROPPED)}
    for family, (arch, plan) in cases.items():
        assert choose_architecture(_model(family, plan)).name == arch, family
    assert choose_architecture(_model("qwen2", PER_LAYER)).name == "deci"
    # llama.cpp's qwen2 loader needs query width == hidden_size: fewer query heads in every layer go to deci
    assert choose_architecture(_model("qwen2", UNIFORM)).name == "deci"
    assert choose_architecture(_model("qwen2", DROPPED)).name == "qwen2"
    assert choose_architecture(_model("mistral", PER_LAYER)).name == "deci"


def test_tokenizer_and_chat_template_go_into_the_file(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = _model("llama", DROPPED)
    path = to_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tok)
    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert f["tokenizer.ggml.tokens"][tok.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.token_type"][tok.bos_token_id] == gguf.TokenType.CONTROL
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert len(f["tokenizer.ggml.merges"]) > 0


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    sequence = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": sequence}) == "smollm"
    odd = {"type": "Whitespace"}
    assert pre_tokenizer_name({"pre_tokenizer": odd}) == "default"


def test_permutation_turns_rotate_half_into_interleaved_rope():
    """RoPE on HF's rows (rotate-half pairs i, i + d/2) equals GGML's interleaved RoPE (pairs 2i, 2i+1) on the
    permuted rows, for every head."""
    torch.manual_seed(0)
    n_heads, d, pos = 3, 8, 5.0
    w, x = torch.randn(n_heads * d, 6), torch.randn(6)
    theta = pos / 10000 ** (torch.arange(0, d, 2).float() / d)
    cos, sin = theta.cos(), theta.sin()
    q = (w @ x).view(n_heads, d)
    a, b = q[:, : d // 2], q[:, d // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)
    p = (permute_for_ggml_rope(w, n_heads) @ x).view(n_heads, d // 2, 2)
    ggml = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], dim=-1)
    ggml = ggml.view(n_heads, d)
    # the same values, each head's interleaved pairs holding HF's (i, i + d/2) pairs
    assert torch.allclose(ggml.view(n_heads, d // 2, 2).transpose(1, 2).reshape(n_heads, d), hf, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        permute_for_ggml_rope(w, 5)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=rope, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
    factors = llama3_rope_factors(rope, 128)
    assert torch.allclose(base / factors, scaled, rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0


def test_q8_0_keeps_norms_f32_and_falls_back_to_f16_for_odd_rows(tmp_path):
    model = _model("llama", PER_LAYER)
    path = to_gguf(model, tmp_path / "m.gguf", dtype="q8_0", tokenizer=tiny_tokenizer(), pad_ffn_to=1)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert types["blk.1.ffn_up.weight"] == Q.Q8_0  # rows of 64 values
    assert types["blk.2.ffn_down.weight"] == Q.F16  # rows of 37 values
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 100 values


def test_tensor_data_is_cache_line_aligned_whatever_the_header_length(tmp_path):
    # llama.cpp multiplies the mapped file in place: at GGUF's default 32-byte alignment a header of the wrong length
    # left every f32 tensor at 32 mod 64 and f32 decode ~25% slower (benchmarks/results/serving.md)
    model, tok = _model("llama"), tiny_tokenizer()
    for n in range(1, 66, 8):  # the file's name goes into the header: lengths 1..65 shift it by 64 bytes
        model.config._name_or_path = "m" * n
        reader = gguf.GGUFReader(to_gguf(model, tmp_path / f"{n}.gguf", dtype="f32", tokenizer=tok))
        assert reader.fields["general.alignment"].contents() == 64
        assert {int(t.data_offset) % 64 for t in reader.tensors} == {0}, n


def test_mlp_widths_are_padded_with_zero_channels(tmp_path):
    model = _model("llama", PER_LAYER)
    path = to_gguf(model, tmp_path / "m.gguf", dtype="q8_0", tokenizer=tiny_tokenizer())  # pad_ffn_to=32
    fields, reader = _fields(path)
    assert fields["deci.feed_forward_length"] == [128, 128, 64, 128]
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert all(t.tensor_type == Q.Q8_0 for t in reader.tensors if len(t.shape) == 2)  # every row fits q8_0 now
    down = gguf.quants.dequantize(tensors["blk.2.ffn_down.weight"].data, Q.Q8_0)  # (hidden, 64) in HF orientation
    up = gguf.quants.dequantize(tensors["blk.2.ffn_up.weight"].data, Q.Q8_0)  # (64, hidden)
    assert down.shape == (64, 64) and up.shape == (64, 64)
    assert not down[:, 37:].any() and not up[37:].any() and down[:, :37].any()
    with pytest.raises(ValueError, match="pad_ffn_to=0 is not valid"):
        to_gguf(model, tmp_path / "z.gguf", tokenizer=tiny_tokenizer(), pad_ffn_to=0)


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
    from hf_prune.modeling.configuration_hf_prune_sliced import SlicedLlamaConfig

    sliced = tmp_path / "sliced"
    SlicedLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=320, residual_dims=[48] * 5).save_pretrained(sliced)
    with pytest.raises(ValueError, match="shortcut matri"):
        to_gguf(sliced, tmp_path / "s.gguf")
    with pytest.raises(ValueError, match="q/k RMSNorm"):
        to_gguf(_model("qwen3", PER_LAYER), tmp_path / "q3.gguf", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="sandwich norms"):
        to_gguf(_model("gemma3_text", DROPPED), tmp_path / "g.gguf", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="dtype='q4_0' is not valid"):
        to_gguf(_model(), tmp_path / "x.gguf", dtype="q4_0", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="pass the tokenizer"):
        to_gguf(_model(), tmp_path / "x.gguf")
    broken = _model()
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight has non-finite values"):
        to_gguf(broken, tmp_path / "nan.gguf", tokenizer=tiny_tokenizer())
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def _compacted():
    model = _model("llama", DROPPED)
    # zero query rows inside a head and some down-projection columns: only compaction removes them
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3:8] = 0
        model.model.layers[1].mlp.down_proj.weight[:, :40] = 0
    assert compact_zeros(model)["linears"] >= 2
    return model


def test_compact_linears_are_refused_or_written_dense(tmp_path):
    model = _compacted()
    with pytest.raises(ValueError, match="dense matrices only"):
        to_gguf(model, tmp_path / "c.gguf", tokenizer=tiny_tokenizer())
    path = to_gguf(model, tmp_path / "c.gguf", dtype="f32", tokenizer=tiny_tokenizer(), expand_compact=True)
    reader = gguf.GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert tuple(int(x) for x in q.shape) == (64, 64)
    assert (np.abs(q.data).sum(axis=1) == 0).sum() == 5  # the five zero rows are back (permuted, still zero)


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    folder = _export(_model("llama", PER_LAYER), tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["gguf", str(folder), "-o", str(out), "--dtype", "f32"]) == 0
    first = out.read_bytes()
    assert main(["gguf", str(folder), "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_gguf(folder, out)
    assert main(["gguf", str(folder), "-o", str(out), "--overwrite", "--dtype", "bf16"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16


# --------------------------------------------------------------------------------------------------------------------
# llama.cpp itself
# --------------------------------------------------------------------------------------------------------------------


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            inp = torch.tensor([[nxt]])
    return out


F32 = 0  # GGML_TYPE_F32: llama.cpp's default f16 KV cache alone moves these logits by ~0.03


def _llama_cpp(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, n_batch=64, verbose=False,
                           type_k=F32, type_v=F32)


def _cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


CASES = {
    "dense": ("llama", None, {}),
    "layers_removed": ("llama", DROPPED, {}),
    "heads_and_channels_per_layer": ("llama", PER_LAYER, {}),
    "mistral_per_layer": ("mistral", PER_LAYER, {}),
    "qwen2_per_layer_biases": ("qwen2", PER_LAYER, {}),
    "qwen2_layers_removed": ("qwen2", DROPPED, {}),
    "qwen2_uniform_heads_removed": ("qwen2", UNIFORM, {}),
    "qwen3_layers_removed": ("qwen3", DROPPED, {}),
    "heads_and_channels_unpadded": ("llama", PER_LAYER, {"pad_ffn_to": 1}),
    "untied_llama3_rope": ("llama", PER_LAYER, {"tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


@needs_llama_cpp
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_agrees_with_transformers(case, tmp_path):
    family, plan, overrides = CASES[case]
    overrides = dict(overrides)
    pad = overrides.pop("pad_ffn_to", 32)
    model = _model(family, plan, **overrides)
    path = to_gguf(_export(model, tmp_path / "m"), tmp_path / "m.gguf", dtype="f32", pad_ffn_to=pad)
    llm = _llama_cpp(path)
    ref, got = _hf_logits(model, IDS), _cpp_logits(llm, IDS)
    assert got.shape == ref.shape
    diff = np.abs(got - ref).max()
    assert diff < 1e-3, f"max |logit difference| {diff}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert _cpp_greedy(llm, IDS[:8], 32) == _hf_greedy(model, IDS[:8], 32)


@needs_llama_cpp
def test_llama_cpp_runs_compacted_zeros_written_dense(tmp_path):
    model = _compacted()
    path = to_gguf(model, tmp_path / "c.gguf", dtype="f32", tokenizer=tiny_tokenizer(), expand_compact=True)
    ref, got = _hf_logits(model, IDS), _cpp_logits(_llama_cpp(path), IDS)
    assert np.abs(got - ref).max() < 1e-3 and (got.argmax(-1) == ref.argmax(-1)).all()


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_runs_reduced_precision(dtype, tmp_path):
    # the default initializer: with large random weights a 4-layer net amplifies q8_0 rounding beyond any bound
    model = _model("llama", PER_LAYER, initializer_range=0.02)
    path = to_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer=tiny_tokenizer())
    ref, got = _hf_logits(model, IDS), _cpp_logits(_llama_cpp(path), IDS)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_transformers(tmp_path):
    tok = tiny_tokenizer()
    path = to_gguf(_model("llama", DROPPED), tmp_path / "m.gguf", dtype="f32", tokenizer=tok)
    llm = _llama_cpp(path)
    text = "The quick brown fox jumps over the lazy dog. Numbers like 42 appear in text"
    assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    assert json.dumps(llm.metadata.get("general.architecture")) == '"llama"'


@needs_llama_cpp
def test_the_cards_llama_cpp_lines_run_as_written(tmp_path, monkeypatch):
    from hf_prune.export import save

    out = save(_model("llama", PER_LAYER), tiny_tokenizer(), tmp_path / "tiny", plan=PER_LAYER, repo_id="me/tiny")
    section = (out / "README.md").read_text().split("## Run it in llama.cpp", 1)[1].split("\n## ", 1)[0]
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    convert = [line for line in bash if line.startswith("hf-prune gguf ")]
    assert convert == ["hf-prune gguf tiny -o model.gguf"]
    monkeypatch.chdir(tmp_path)  # the folder the card's `hf download` line would have made
    assert main(convert[0].split()[1:]) == 0
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["general.architecture"].contents() == "deci"
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = []
    real_print = print
    # stdout only: llama-cpp-python prints llama.cpp's log to stderr through print(..., file=sys.stderr)
    monkeypatch.setattr("builtins.print", lambda *a, **k: real_print(*a, **k) if "file" in k else printed.append(a))
    exec(compile(code, "model card", "exec"), {})
    assert len(printed) == 1 and isinstance(printed[0][0], str)


def test_vllm_benchmark_says_why_it_cannot_run_and_writes_nothing(tmp_path, capsys):
    import importlib.util as iu

    spec = iu.spec_from_file_location("serving_vllm", Path(__file__).parents[1] / "benchmarks" / "serving_vllm.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if bench.unavailable() is None:
        pytest.skip("vllm and a CUDA device are present: the benchmark runs for real (benchmarks/serving_vllm.py)")
    out = tmp_path / "serving_vllm.json"
    assert bench.main(["--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not run:" in err and ("vllm is not installed" in err or "no CUDA device" in err)
    assert not out.exists() and not out.with_suffix(".md").exists() and not (tmp_path / "work").exists()
