"""Nothing lost, nothing silent: hostile output paths, hand-edited cards, non-finite numbers and tokens in odd places.

Each case asserts the error type (or, through the CLI, the exit status and message), that the message names the bad
value, and that every file on disk is unchanged byte for byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny import SENTENCES, tiny_model, tiny_tokenizer

from hf_prune import PrunePlan, apply
from hf_prune.cli import main
from hf_prune.export import (
    CardExistsError,
    DataRecord,
    ExportMetadata,
    ModelStats,
    OutputExistsError,
    OutputIsModelError,
    check_output_dir,
    load_metadata,
    save,
)

TOKEN = "hf_fakeSafetyToken0123456789abcd"
PLAN = PrunePlan(drop_layers=[1], provenance={"method": "manual"})


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _strict_loads(text: str):
    def refuse(constant: str):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my own notes, not hf-prune's")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return path


def _pruned():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    meta = ExportMetadata(base_model="tiny-org/tiny-llama", base_model_license="mit", method="manual",
                          before=ModelStats.of(model), calibration=DataRecord(name="sentences", tokens=64))
    apply(model, PLAN)
    return model, tok, meta


@pytest.fixture
def export_dir(tmp_path) -> Path:
    model, tok, meta = _pruned()
    return save(model, tok, tmp_path / "export", plan=PLAN, metadata=meta)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    (d / "README.md").write_text("# my model\n\nThe owner's card.\n")
    return d


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("\n\n".join(SENTENCES * 6))
    return path


def _prune_argv(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--method", "shortgpt", "--set", "n_remove=1", "--set", "progress=false", "--model",
            str(model_dir), "--corpus", str(corpus), "--n-samples", "4", "--seq-len", "16", "--batch-size", "2",
            "-o", str(out), *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: output checks must come before."""
    from transformers import AutoModelForCausalLM

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)


# --------------------------------------------------------------------------------------------------------------------
# output folders: the Python API
# --------------------------------------------------------------------------------------------------------------------


def test_save_refuses_a_folder_with_user_files(tmp_path):
    out = _user_folder(tmp_path / "mine")
    before = _tree(out)
    model, tok, meta = _pruned()
    with pytest.raises(OutputExistsError) as exc:
        save(model, tok, out, plan=PLAN, metadata=meta)
    msg = str(exc.value)
    assert str(out) in msg and "notes.txt" in msg and "sub/data.bin" in msg and "--overwrite" in msg
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "a refused save left temporary files"


def test_overwrite_replaces_a_user_folder(tmp_path):
    out = _user_folder(tmp_path / "mine")
    model, tok, meta = _pruned()
    save(model, tok, out, plan=PLAN, metadata=meta, overwrite=True)
    files = _tree(out)
    assert "notes.txt" not in files and "config.json" in files and ".hf_prune_export.json" in files
    assert check_output_dir(out) == out  # now an unchanged hf-prune export: replaceable without overwrite


def test_an_earlier_export_is_replaced(export_dir):
    model, tok, meta = _pruned()
    meta.notes = "the second export"
    save(model, tok, export_dir, plan=PLAN, metadata=meta)
    assert load_metadata(export_dir).notes == "the second export"


@pytest.mark.parametrize("change", ["added file", "edited card", "retrained weights"])
def test_an_earlier_export_changed_by_the_user_is_refused(export_dir, change):
    if change == "added file":
        (export_dir / "train_log.txt").write_text("loss 1.2")
        name = "train_log.txt"
    elif change == "edited card":
        (export_dir / "README.md").write_text((export_dir / "README.md").read_text() + "\nMy own evaluation.\n")
        name = "README.md"
    else:
        data = bytearray((export_dir / "model.safetensors").read_bytes())
        data[-1] ^= 0x01  # same size, one bit of the last weight changed
        (export_dir / "model.safetensors").write_bytes(bytes(data))
        name = "model.safetensors"
    before = _tree(export_dir)
    model, tok, meta = _pruned()
    with pytest.raises(OutputExistsError, match=name) as exc:
        save(model, tok, export_dir, plan=PLAN, metadata=meta)
    assert str(export_dir) in str(exc.value)
    assert _tree(export_dir) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_save_never_writes_into_the_model_folder(tmp_path, where):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "outer" / "model"
    tiny_model("llama").save_pretrained(model_dir)
    (model_dir / "README.md").write_text("the owner's card")
    before = _tree(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # save reads the model's own folder from name_or_path
    apply(model, PLAN)
    out = {"same": model_dir, "inside": model_dir / "pruned", "contains": tmp_path / "outer"}[where]
    with pytest.raises(OutputIsModelError) as exc:
        save(model, tiny_tokenizer(), out, plan=PLAN, overwrite=True)
    assert str(out) in str(exc.value) and "choose another folder" in str(exc.value)
    assert _tree(tmp_path) == before and not (model_dir / "pruned").exists()


def test_check_output_dir_accepts_new_and_empty_folders_and_refuses_files_and_links(tmp_path):
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for bad in ("file", "link"):
        with pytest.raises(OutputExistsError, match=bad):
            check_output_dir(tmp_path / bad, overwrite=True)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------------------------
# output folders: `hf-prune prune`, checked before the model is loaded
# --------------------------------------------------------------------------------------------------------------------


def test_prune_refuses_a_user_folder_before_loading_the_model(model_dir, corpus, tmp_path, no_model_loading,
                                                              capsys):
    out = _user_folder(tmp_path / "mine")
    before = _tree(tmp_path)
    code = main(_prune_argv(model_dir, corpus, out))
    err = capsys.readouterr().err
    assert code in (1, 2) and str(out) in err and "--overwrite" in err, err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("inside", [False, True])
def test_prune_refuses_the_model_folder_even_with_overwrite(model_dir, corpus, tmp_path, no_model_loading, capsys,
                                                            inside):
    out = model_dir / "pruned" if inside else model_dir
    before = _tree(tmp_path)
    code = main(_prune_argv(model_dir, corpus, out, "--overwrite"))
    err = capsys.readouterr().err
    assert code in (1, 2) and str(out) in err and "model folder" in err, err
    assert _tree(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------------
# cards: `hf-prune card` and `hf-prune eval --record` keep a README.md hf-prune did not write
# --------------------------------------------------------------------------------------------------------------------


def test_card_keeps_a_hand_edited_card_and_replaces_it_on_request(export_dir, capsys):
    edited = (export_dir / "README.md").read_text().replace("## Size", "## Size (checked by hand)")
    (export_dir / "README.md").write_text(edited)
    before = _tree(export_dir)
    assert main(["card", str(export_dir)]) == 2
    err = capsys.readouterr().err
    assert str(export_dir / "README.md") in err and "--overwrite-card" in err
    assert _tree(export_dir) == before
    with pytest.raises(CardExistsError, match="README.md"):
        from hf_prune.cards import write_card

        write_card(export_dir)
    assert _tree(export_dir) == before
    assert main(["card", str(export_dir), "--overwrite-card"]) == 0
    assert "(checked by hand)" not in (export_dir / "README.md").read_text()
    assert main(["card", str(export_dir)]) == 0  # hf-prune's own card again: re-rendered without asking


def test_card_keeps_the_readme_of_a_plain_model_folder(model_dir, capsys):
    before = _tree(model_dir)
    assert main(["card", str(model_dir)]) == 2
    assert "README.md" in capsys.readouterr().err
    assert _tree(model_dir) == before


def test_eval_record_keeps_a_hand_edited_card(export_dir, corpus, capsys):
    (export_dir / "README.md").write_text("# My card\n\nWritten by hand.\n")
    card = (export_dir / "README.md").read_bytes()
    code = main(["eval", str(export_dir), "--text", str(corpus), "--window", "16", "--max-tokens", "64", "--record"])
    captured = capsys.readouterr()
    assert code == 0
    assert "NOT re-rendered" in captured.err and "--overwrite-card" in captured.err
    assert (export_dir / "README.md").read_bytes() == card
    assert [e.metric for e in load_metadata(export_dir).evaluations] == ["perplexity"]


def test_push_render_card_refuses_a_hand_edited_card_before_uploading(export_dir, capsys):
    (export_dir / "README.md").write_text("# My card\n")
    before = _tree(export_dir)
    code = main(["push", str(export_dir), "--repo-id", "me/tiny", "--render-card", "--endpoint",
                 "http://127.0.0.1:9"])  # nothing listens there: reaching the upload would fail differently
    err = capsys.readouterr().err
    assert code == 2 and "nothing was uploaded" in err and "README.md" in err
    assert _tree(export_dir) == before


# --------------------------------------------------------------------------------------------------------------------
# strict JSON
# --------------------------------------------------------------------------------------------------------------------


def test_nan_evaluation_gives_strict_json_and_no_nan_in_the_card(export_dir, corpus, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    from hf_prune import evaluate

    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: {"perplexity": float("nan"), "tokens": 48})
    code = main(["eval", str(export_dir), "--text", str(corpus), "--window", "16", "--record", "--stage", "broken"])
    out, err = capsys.readouterr()
    assert code == 0
    printed = _strict_loads(out)
    assert printed[0]["value"] is None and "nan" in printed[0]["note"]
    assert "sentences perplexity is nan" in err
    for name in ("hf_prune.json", ".hf_prune_export.json"):
        _strict_loads((export_dir / name).read_text())
    rec = load_metadata(export_dir).evaluations[-1]
    assert rec.value is None and "nan" in rec.note
    text = (export_dir / "README.md").read_text()
    assert ".nan" not in text and "NaN" not in text and "not finite" in text
    assert ModelCard(text).data.eval_results is None  # the only final-stage number was not finite
    assert check_output_dir(export_dir) == export_dir  # what eval --record rewrote is still known as hf-prune's


def test_non_finite_numbers_elsewhere_are_refused_naming_the_field(tmp_path):
    model, tok, meta = _pruned()
    meta.method_config = {"target": math.inf}
    with pytest.raises(ValueError, match=r"method_config\.target=inf"):
        save(model, tok, tmp_path / "out", plan=PLAN, metadata=meta)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [TOKEN, "plainSecretWithoutPrefix42"])
def test_token_in_any_field_never_reaches_a_file(tmp_path, monkeypatch, token):
    monkeypatch.setenv("HF_TOKEN", token)
    model, tok, meta = _pruned()
    meta.model_name = token
    meta.command = f"hf-prune prune --method manual --name {token} --base-model-id x-{token}"
    meta.notes = f"pushed with {token}"
    out = save(model, tok, tmp_path / "out", plan=PLAN, metadata=meta)
    for name, data in _tree(out).items():
        assert token.encode() not in data, f"{name} contains the token"
    assert load_metadata(out).command == "hf-prune prune --method manual --name *** --base-model-id x-***"


def test_token_passed_as_name_is_redacted_by_prune(model_dir, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "pruned"
    assert main(_prune_argv(model_dir, corpus, out, "--name", TOKEN)) == 0
    capsys.readouterr()
    for name, data in _tree(out).items():
        assert TOKEN.encode() not in data, f"{name} contains the token"
    assert "--name ***" in load_metadata(out).command
