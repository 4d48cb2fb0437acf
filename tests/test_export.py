"""Export: atomic save with plan, metadata and card; the card's metadata; pushes against a loopback fake Hub;
the lm-eval bridge and the EvalCallback."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, validate_card_metadata
from tiny import tiny_model, tiny_tokenizer

from hf_prune import PrunePlan, apply
from hf_prune.export import (
    DataRecord,
    ExportMetadata,
    ModelStats,
    PushError,
    load_metadata,
    push,
    save,
)

TOKEN = "hf_fakeSecretToken0123456789"
IDS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250, 64, 11, 2, 90, 31, 8, 77, 150]])

# layer 1 removed, layer 2 keeps one kv group, layer 3 loses half its MLP channels: per-layer widths differ
HETERO = PrunePlan(drop_layers=[1], kv_heads={2: [1]}, mlp_channels={3: list(range(64))},
                   provenance={"method": "manual"})
DEPTH_ONLY = PrunePlan(drop_layers=[0, 2], provenance={"method": "manual"})


def _pruned(plan: PrunePlan, recovery: bool = False):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    meta = ExportMetadata(
        base_model="tiny-org/tiny-llama", base_model_license="Apache-2.0", method="manual",
        method_config={"rule": "test"}, before=ModelStats.of(model),
        calibration=DataRecord(name="test sentences", tokens=512, samples=4, seq_len=128),
        command=f"hf-prune prune --method manual --token {TOKEN}",
    )
    meta.add_evaluation(task="toy", metric="perplexity", value=300.0, stage="base", tokens=100)
    apply(model, plan)
    meta.add_evaluation(task="toy", metric="perplexity", value=400.0, stage="pruned", tokens=100)
    if recovery:
        meta.recovery = DataRecord(name="more sentences", tokens=2048, steps=10)
        meta.add_evaluation(task="toy", metric="perplexity", value=350.0, stage="recovered", tokens=100)
    return model, tok, meta


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digest(folder: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in _tree(folder).items()}


# --------------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------------


def test_save_writes_model_plan_metadata_card_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, meta = _pruned(HETERO)
    with torch.no_grad():
        ref = model(IDS).logits
    out = save(model, tok, tmp_path / "out", plan=HETERO, metadata=meta)
    names = set(_tree(out))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "prune_plan.json", "hf_prune.json", "README.md",
              "hf_prune_layers.png"):
        assert f in names, f"{f} missing from {sorted(names)}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories were left behind"

    rec = load_metadata(out)
    assert rec.after.num_parameters == sum(p.numel() for p in model.parameters())
    assert rec.before.num_parameters > rec.after.num_parameters
    assert rec.before.layer_widths == [[4, 2, 128]] * 4
    assert rec.after.layer_widths == [[4, 2, 128], [2, 1, 128], [4, 2, 64]]
    assert rec.after.disk_bytes == (out / "model.safetensors").stat().st_size
    assert set(rec.versions) >= {"hf_prune", "transformers", "torch", "huggingface_hub"}
    assert PrunePlan.load(out).to_dict() == HETERO.to_dict()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (loaded(IDS).logits - ref).abs().max().item() <= 1e-5
    assert AutoTokenizer.from_pretrained(out)("a test")["input_ids"] == tok("a test")["input_ids"]


def test_card_reports_zeros_kept_in_place_by_matrix(tmp_path):
    model, tok, meta = _pruned(DEPTH_ONLY)
    out = save(model, tok, tmp_path / "dense-widths", plan=DEPTH_ONLY, metadata=meta)
    assert "zeros kept in place" not in (out / "README.md").read_text()  # a random model has no zero weights
    with torch.no_grad():  # what LLM Surgeon leaves: query rows inside heads and residual-stream columns at zero
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:8] = 0
            layer.mlp.up_proj.weight[:, :4] = 0
    out = save(model, tok, tmp_path / "zeros", plan=DEPTH_ONLY, metadata=meta)
    rec = load_metadata(out)
    q, up = 8 * 64, 128 * 4
    assert rec.after.zero_parameters["q_proj"] == 2 * q and rec.after.zero_parameters["up_proj"] == 2 * up
    assert rec.after.zero_parameters["down_proj"] == 0 and rec.before.zero_parameters["q_proj"] == 0
    card = (out / "README.md").read_text()
    assert f"{2 * (q + up):,} parameters" in card and "zeros kept in place" in card
    assert f"q_proj {2 * q:,}, up_proj {2 * up:,}." in card


def test_save_does_not_change_the_callers_metadata(tmp_path):
    model, tok, meta = _pruned(DEPTH_ONLY)
    save(model, tok, tmp_path / "out", plan=DEPTH_ONLY, metadata=meta)
    assert meta.after is None and meta.versions == {}


def test_save_replaces_an_earlier_export_only_when_complete(tmp_path, monkeypatch):
    model, tok, meta = _pruned(DEPTH_ONLY)
    out = save(model, tok, tmp_path / "out", plan=DEPTH_ONLY, metadata=meta)
    earlier = _tree(out)
    assert ".hf_prune_export.json" in earlier

    def broken(*a, **k):
        raise OSError("disk full while writing the tokenizer")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save(model, tok, out, plan=HETERO, metadata=meta)
    assert _tree(out) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a failed save left temporary files"

    monkeypatch.undo()
    save(model, tok, out, plan=DEPTH_ONLY, metadata={**meta.to_dict(), "notes": "second export"})
    assert load_metadata(out).notes == "second export" and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_refuses_a_file_as_folder(tmp_path):
    from hf_prune.export import OutputExistsError

    model, tok, meta = _pruned(DEPTH_ONLY)
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputExistsError, match="is not a folder"):
        save(model, tok, target, plan=DEPTH_ONLY, metadata=meta)
    assert target.read_text() == "x"


# --------------------------------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------------------------------


def test_card_metadata_parses_back_one_shot(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData

    model, tok, meta = _pruned(HETERO)
    out = save(model, tok, tmp_path / "out", plan=HETERO, metadata=meta)
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.base_model == "tiny-org/tiny-llama"
    assert data.get("base_model_relation") is None  # one-shot: the Hub has no "pruned" relation
    assert data.license == "apache-2.0"
    assert {"manual", "pruned", "hf-prune"} <= set(data.tags)
    # model-index holds the final stage only
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("perplexity", 400.0)]
    text = card.text
    assert "![Per-layer widths" in text and "hf_prune_layers.png" in text
    assert "trust_remote_code=True" in text and "import hf_prune" in text  # Pruned* model type
    assert "| 1 | **removed** |" in text and "2 → 1" in text and "128 → 64" in text
    assert f"{meta.before.num_parameters:,}" in text and "512 tokens" in text
    assert "hf-prune prune --method manual" in text
    assert validate_card_metadata(str(card)) == ([], [])


def test_card_with_recovery_says_finetune_and_plain_loading(tmp_path):
    from huggingface_hub import ModelCard

    model, tok, meta = _pruned(DEPTH_ONLY, recovery=True)
    out = save(model, tok, tmp_path / "out", plan=DEPTH_ONLY, metadata=meta)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model_relation == "finetune"
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("perplexity", 350.0)]
    assert "trust_remote_code" not in card.text and "AutoModelForCausalLM.from_pretrained" in card.text
    assert "2,048 tokens" in card.text and "10 optimizer steps" in card.text
    # depth-only: no per-layer table repeating the same widths, one sentence instead
    assert "keeps its widths: 4 query heads, 2 kv heads and 128 MLP channels" in card.text
    assert "| layer (original) |" not in card.text and "0, 2." in card.text


def test_card_of_a_sliced_model_describes_the_slicing(tmp_path):
    from huggingface_hub import ModelCard

    from hf_prune.methods import get

    model, tok = tiny_model("llama"), tiny_tokenizer()
    meta = ExportMetadata(method="dynamic_slicing", before=ModelStats.of(model))
    ids = torch.randint(4, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = get("dynamic_slicing", slicing=0.3, base_slicing=0.1, progress=False).plan(
        model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    apply(model, plan)
    dims = model.config.residual_dims
    assert len(set(dims)) > 1
    out = save(model, tok, tmp_path / "out", plan=plan, metadata=meta)
    assert load_metadata(out).after.residual_widths == dims
    text = ModelCard.load(out / "README.md").text
    assert "keeps its widths" not in text
    assert "residual stream sliced from 64" in text and "The residual stream was sliced" in text
    assert "| layer (original) | status | residual width (into attention / MLP) |" in text
    for i in range(4):
        assert f"| {i} | sliced | 64 → {dims[2 * i]} / {dims[2 * i + 1]} | 4 | 2 | 128 |" in text
    assert "cannot load this sliced layout" in text and "## Run it in llama.cpp" not in text


def test_card_says_how_to_run_a_per_layer_export_in_llama_cpp(tmp_path):
    model, tok, meta = _pruned(HETERO)
    out = save(model, tok, tmp_path / "out", plan=HETERO, metadata=meta, repo_id="me/tiny-het")
    text = (out / "README.md").read_text()
    section = text.split("## Run it in llama.cpp", 1)[1].split("\n## ", 1)[0]
    assert "`deci`" in section
    assert "vLLM cannot load this layout (its per-layer DeciLM loader varies kv heads and MLP widths, not query " \
           "heads); llama.cpp can" in text
    assert 'pip install "hf-prune[gguf]"\nhf download me/tiny-het --local-dir tiny-het\n' \
           "hf-prune gguf tiny-het -o model.gguf\n```" in section
    assert "about 4 minutes on 2 CPU cores" in section
    assert 'llm = Llama(model_path="model.gguf", n_ctx=2048)' in section and "`llama-cli -m model.gguf`" in section
    # the Python lines run as written: they are valid Python that builds a Llama from the converted file
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "card", "exec")


def test_card_has_no_llama_cpp_section_for_layouts_llama_cpp_cannot_run():
    from hf_prune.cards import llama_cpp_instructions, load_instructions

    per_layer_qwen3 = {"model_type": "pruned_qwen3", "base_model_type": "qwen3", "auto_map": {"x": "y"}}
    assert llama_cpp_instructions(per_layer_qwen3) is None
    assert "vLLM and llama.cpp cannot load this layout" in load_instructions(per_layer_qwen3)
    assert llama_cpp_instructions({"model_type": "sliced_llama", "residual_dims": [8, 8, 8]}) is None
    assert llama_cpp_instructions({"model_type": "gemma3_text"}) is None
    uniform = llama_cpp_instructions({"model_type": "mistral"})
    assert "own `llama` architecture" in uniform and "hf-prune gguf path/to/this/folder -o model.gguf" in uniform
    compact = {"model_type": "pruned_llama", "base_model_type": "llama", "layer_compact_linears": [{}, {"q_proj": [1]}]}
    assert "-o model.gguf --expand-compact" in llama_cpp_instructions(compact)


def test_large_files_are_fingerprinted_by_size_head_and_tail(tmp_path):
    from hf_prune.record import fingerprint, foreign_files, record_written

    big = tmp_path / "model.safetensors"
    big.write_bytes(bytes(9 << 20))
    record_written(tmp_path, ["model.safetensors"])
    assert fingerprint(big).startswith("sha256-ends:") and foreign_files(tmp_path) == []
    with open(big, "r+b") as f:
        f.seek((9 << 20) - 1)
        f.write(b"\x01")  # a rewrite that keeps the size changes the tail
    assert foreign_files(tmp_path) == ["model.safetensors"]


def test_card_validates_against_the_fake_hub_and_bad_metadata_is_rejected(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants

    model, tok, meta = _pruned(HETERO)
    out = save(model, tok, tmp_path / "out", plan=HETERO, metadata=meta)
    card = ModelCard.load(out / "README.md")
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        card.validate()
        assert ("POST", "/api/validate-yaml", 200) in hub.requests
        bad = ModelCard(str(card).replace("license: apache-2.0", "license: not-a-licence"))
        with pytest.raises(ValueError, match="not-a-licence"):
            bad.validate()
        bad = ModelCard(str(card).replace("pipeline_tag: text-generation", "base_model_relation: pruned"))
        with pytest.raises(ValueError, match="base_model_relation"):
            bad.validate()


def test_token_never_reaches_a_saved_file(tmp_path):
    model, tok, meta = _pruned(HETERO)
    meta.recipe = f"hub_token: {TOKEN}\nlearning_rate: 1e-4\n"
    out = save(model, tok, tmp_path / "out", plan=HETERO, metadata=meta)
    for name, data in _tree(out).items():
        assert TOKEN.encode() not in data, f"{name} contains the token"
    assert "--token ***" in load_metadata(out).command


def test_picture_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **k)

    model, tok, meta = _pruned(DEPTH_ONLY)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib"):
        out = save(model, tok, tmp_path / "out", plan=DEPTH_ONLY, metadata=meta)
    assert not (out / "hf_prune_layers.png").exists()
    assert "hf_prune_layers.png" not in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# push against the loopback fake Hub
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def export_dir(tmp_path):
    model, tok, meta = _pruned(HETERO)
    return save(model, tok, tmp_path / "tiny-pruned", plan=HETERO, metadata=meta)


def _assert_no_token(folder: Path, *texts: str) -> None:
    for name, data in _tree(folder).items():
        assert TOKEN.encode() not in data, f"{name} contains the token"
    for t in texts:
        assert TOKEN not in t


def test_push_uploads_byte_identical_files(export_dir, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    local = _tree(export_dir)
    with FakeHub() as hub:
        info = push(export_dir, "me/tiny-pruned", private=True, token=TOKEN, endpoint=hub.endpoint)
        remote = hub.files("me/tiny-pruned")
        assert hub.repos["me/tiny-pruned"].private
        assert hub.tokens_seen == {TOKEN}  # it was sent...
        assert info.commit_url.startswith(hub.endpoint)
    assert remote == local
    out, err = capfd.readouterr()
    _assert_no_token(export_dir, caplog.text, out, err)  # ...and written nowhere


def test_failed_upload_leaves_the_folder_and_a_retry_completes_it(export_dir, monkeypatch, caplog, capfd):
    from huggingface_hub import constants

    # the single-commit path (no Xet pipeline) sends the commit once, without retrying on HTTP 500
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    caplog.set_level(logging.DEBUG)
    before = _digest(export_dir)
    with FakeHub(fail_commits={1}) as hub:
        with pytest.raises(PushError, match="run the push again"):
            push(export_dir, "me/tiny-pruned", token=TOKEN, endpoint=hub.endpoint)
        assert ("POST", "/api/models/me/tiny-pruned/commit/main", 500) in hub.requests
        assert hub.files("me/tiny-pruned") == {}  # the repo was created, nothing was committed
        assert _digest(export_dir) == before
        push(export_dir, "me/tiny-pruned", token=TOKEN, endpoint=hub.endpoint)
        remote = hub.files("me/tiny-pruned")
    assert remote == _tree(export_dir)
    assert _digest(export_dir) == before
    out, err = capfd.readouterr()
    _assert_no_token(export_dir, caplog.text, out, err)


def test_push_to_a_branch(export_dir):
    with FakeHub() as hub:
        push(export_dir, "me/tiny-pruned", revision="pruned-v1", token=TOKEN, endpoint=hub.endpoint)
        assert hub.files("me/tiny-pruned", "main") == {}
        assert hub.files("me/tiny-pruned", "pruned-v1") == _tree(export_dir)


def test_push_renders_a_missing_card_with_the_repo_id(export_dir):
    (export_dir / "README.md").unlink()
    (export_dir / "hf_prune_layers.png").unlink()
    with FakeHub() as hub:
        push(export_dir, "me/tiny-pruned", token=TOKEN, endpoint=hub.endpoint)
        remote = hub.files("me/tiny-pruned")
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in remote["README.md"].decode()
    assert remote["hf_prune_layers.png"] == (export_dir / "hf_prune_layers.png").read_bytes()


def test_push_errors_name_the_bad_value(tmp_path, export_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        push(tmp_path / "nowhere", "me/x", token=TOKEN)
    with pytest.raises(ValueError, match="'not a repo'"):
        push(export_dir, "not a repo", token=TOKEN)


def test_push_rejects_invalid_card_before_uploading(export_dir):
    readme = export_dir / "README.md"
    readme.write_text(readme.read_text().replace("license: apache-2.0", "license: 12"))
    with FakeHub() as hub:
        with pytest.raises(PushError, match="license"):
            push(export_dir, "me/tiny-pruned", token=TOKEN, endpoint=hub.endpoint)
        assert hub.commit_requests == 0


def test_measure_cuts_long_texts_without_changing_the_perplexity():
    from hf_prune.evaluate import perplexity
    from hf_prune.export import measure
    from tiny import SENTENCES

    model, tok = tiny_model("llama"), tiny_tokenizer()
    docs = SENTENCES * 40
    rec = measure(model, tok, stage="base", perplexity={"toy": docs}, window=32, max_tokens=100)
    ref = perplexity(model, tok, docs, window=32, max_tokens=100)
    assert rec[0].tokens == ref["tokens"] == 100 - 4  # 4 windows of <= 32 tokens each predict all but their first
    assert rec[0].value == ref["perplexity"]


# --------------------------------------------------------------------------------------------------------------------
# lm-eval bridge
# --------------------------------------------------------------------------------------------------------------------


def _toy_task(path: Path, n: int = 12) -> Path:
    """A BIG-bench-style task with 3-4 choices; some examples have two correct choices; inputs end in a word or in
    a space (removed from the context by both scorers)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while the model predicts next words".split()
    examples = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 7))) + (" " if i % 3 == 0 else "")
        k = rng.randint(3, 4)
        scores = {" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + f" {j}": 0 for j in range(k)}
        keys = list(scores)
        scores[keys[rng.randrange(k)]] = 1
        if i % 4 == 0:
            scores[keys[0]] = 1
        examples.append({"input": text, "target_scores": scores})
    path.write_text(json.dumps({"name": "toy", "task_prefix": "Pick: ", "examples": examples}))
    return path


def test_lm_eval_bridge_equals_multiple_choice(tmp_path):
    from hf_prune.evaluate import multiple_choice
    from hf_prune.lm_eval_bridge import lm_eval

    task = _toy_task(tmp_path / "toy_task.json")
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    apply(model, HETERO)  # the bridge evaluates the in-memory pruned model
    model.train()
    res = lm_eval(model, tok, [task], limit=10, batch_size=4)
    assert model.training, "the model's training mode was not restored"
    ours = multiple_choice(model, tok, task, limit=10, batch_size=4)
    assert res["toy_task"]["n"] == ours["n"] == 10
    assert res["toy_task"]["acc"] == ours["acc"]
    assert res["toy_task"]["acc_norm"] == ours["acc_norm"]


def test_lm_eval_bridge_names_bad_tasks(tmp_path):
    from hf_prune.lm_eval_bridge import lm_eval

    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        lm_eval(model, tok, [str(tmp_path / "no_such_task_xyz.json")])


# --------------------------------------------------------------------------------------------------------------------
# EvalCallback
# --------------------------------------------------------------------------------------------------------------------


def _state(step: int = 0):
    from transformers import TrainerState

    s = TrainerState()
    s.global_step, s.epoch = step, 0.0
    return s


def test_eval_callback_records_base_pruned_and_recovered(tmp_path):
    from transformers import TrainerControl, TrainingArguments

    from hf_prune.callbacks.eval import EvalCallback

    model, tok = tiny_model("llama"), tiny_tokenizer()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
    cb = EvalCallback(tokenizer=tok, perplexity_texts={"toy": text}, perplexity_window=64)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    state = _state()
    cb.on_train_begin(args, state, control, model=model)
    cb.on_step_end(args, state, control, model=model)  # nothing changed: no evaluation
    apply(model, DEPTH_ONLY)
    state.global_step = 3
    cb.on_epoch_end(args, state, control, model=model)
    state.global_step = 6
    cb.on_train_end(args, state, control, model=model)
    assert [(r.stage, r.step) for r in cb.records] == [("base", 0), ("stage 1: pruned", 3),
                                                       ("stage 1: recovered", 6)]
    assert cb.records[0].value != cb.records[1].value  # removing two of four layers changes the perplexity
    logged = [h for h in state.log_history if "eval/toy/perplexity" in h]
    assert [h["eval/stage"] for h in logged] == [0.0, 1.0, 1.0]

    meta = cb.add_to(ExportMetadata(base_model="tiny-org/tiny-llama"))
    out = save(model, tok, tmp_path / "out", plan=DEPTH_ONLY, metadata=meta)
    text = (out / "README.md").read_text()
    assert "| stage 1: pruned | toy | perplexity |" in text
    assert 'reports the stage "stage 1: recovered"' in text


def test_eval_callback_logs_through_a_real_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_prune.callbacks.eval import EvalCallback
    from hf_prune.data import blocks_dataset

    torch.manual_seed(0)
    model, tok = tiny_model("llama").train(), tiny_tokenizer()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
    cb = EvalCallback(tokenizer=tok, perplexity_texts={"toy": text}, perplexity_window=64)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                             optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=blocks_dataset(torch.randint(4, 300, (8, 16))),
                      callbacks=[cb])
    cb.bind(trainer)
    trainer.train()
    assert [r.stage for r in cb.records] == ["base", "trained"]
    logged = [h for h in trainer.state.log_history if "eval/toy/perplexity" in h]
    assert [h["step"] for h in logged] == [0, 2]
    assert logged[0]["eval/toy/perplexity"] != logged[1]["eval/toy/perplexity"]  # two training steps happened


def test_eval_callback_needs_something_to_measure():
    from hf_prune.callbacks.eval import EvalCallback

    with pytest.raises(ValueError, match="nothing to measure"):
        EvalCallback()
