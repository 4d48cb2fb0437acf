"""The `hf-prune` command: help, errors that name the bad value, prune / eval / card on tiny models, and push (in a
subprocess with HF_ENDPOINT pointing at the loopback fake Hub)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from tiny import SENTENCES, tiny_model, tiny_tokenizer

from hf_prune import PrunePlan, apply
from hf_prune.cli import main
from hf_prune.export import DataRecord, ExportMetadata, ModelStats, load_metadata, save

TOKEN = "hf_fakeCliToken9876543210"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    path.write_text("\n\n".join(SENTENCES * 6))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def export_dir(tmp_path) -> Path:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    plan = PrunePlan(drop_layers=[2], heads={0: [0, 1]}, provenance={"method": "manual"})
    meta = ExportMetadata(base_model="tiny-org/tiny-llama", base_model_license="mit", method="manual",
                          before=ModelStats.of(model), calibration=DataRecord(name="sentences", tokens=256))
    apply(model, plan)
    return save(model, tok, tmp_path / "tiny-pruned", plan=plan, metadata=meta)


def _mc_task(path: Path) -> Path:
    examples = [{"input": f"The {w} jumps over the", "target_scores": {"lazy dog": 1, "quick fox": 0, "word": 0}}
                for w in ("fox", "model", "dog", "cat")]
    path.write_text(json.dumps({"examples": examples}))
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# help and errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["prune"], ["eval"], ["card"], ["push"], ["methods"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-prune {' '.join(command)}".rstrip())


def test_runs_as_module_and_console_script():
    r = subprocess.run([sys.executable, "-m", "hf_prune.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "prune" in r.stdout and "push" in r.stdout
    exe = shutil.which("hf-prune")
    if exe is None:
        pytest.skip("the hf-prune console script is not installed in this environment (pip install -e .)")
    r = subprocess.run([exe, "push", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--repo-id" in r.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["card", "/no/such/folder"], "/no/such/folder"),
        (["frobnicate"], "frobnicate"),
        (["prune", "--method", "no_such_method", "-o", "OUT"], "no_such_method"),
        (["prune", "--method", "shortgpt", "--set", "n_remove", "-o", "OUT"], "'n_remove' is not KEY=VALUE"),
        (["prune", "--method", "shortgpt", "--set", "bogus=1", "-o", "OUT"], "'bogus'"),
        (["prune", "--method", "shortgpt", "--set", "n_remove=two", "-o", "OUT"], "n_remove='two'"),
        (["prune", "--method", "shortgpt", "--n_remove", "true", "-o", "OUT"], "n_remove='true'"),
        (["prune", "--method", "shortgpt", "--n_remove", "1.7", "-o", "OUT"], "n_remove='1.7'"),
        (["prune", "--method", "pip", "--n_remove", "2", "-o", "OUT"], "has no option 'n_remove'"),
        (["prune", "--method", "pip", "--set", "tokenizer=gpt2", "-o", "OUT"], "'tokenizer'"),
        (["prune", "--method", "shortgpt", "--model", "/no/such/model", "-o", "OUT"], "/no/such/model"),
        (["prune", "--method", "shortgpt", "--n-samples", "0", "-o", "OUT"], "0 is not valid"),
        (["prune", "--method", "shortgpt", "--dtype", "int3", "-o", "OUT"], "'int3'"),
        (["push", "EXPORT"], "--repo-id"),
        (["eval", "EXPORT", "--mc", "/no/task.json"], "/no/task.json"),
        (["eval", "EXPORT"], "nothing to evaluate"),
    ],
)
def test_errors_name_the_bad_value(argv, expected, export_dir, tmp_path, capsys):
    argv = [str(export_dir) if a == "EXPORT" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# prune, eval, card
# --------------------------------------------------------------------------------------------------------------------


def test_prune_writes_an_export_folder(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--method", "shortgpt", "--set", "n_remove=1", "--set", "progress=false",
                 "--model", str(model_dir), "--corpus", str(corpus), "--n-samples", "4", "--seq-len", "16",
                 "--batch-size", "2", "-o", str(out), "--base-model-id", "tiny-org/tiny-llama", "--license", "mit",
                 "--text", str(corpus), "--window", "16", "--max-tokens", "200"])
    assert code == 0
    assert f"saved {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["model_type"] == "llama"
    plan = PrunePlan.load(out)
    assert len(plan.drop_layers) == 1 and plan.provenance["method"] == "shortgpt"
    meta = load_metadata(out)
    assert meta.method == "shortgpt" and meta.method_config["n_remove"] == 1
    assert (meta.calibration.name, meta.calibration.tokens, meta.calibration.samples) == ("sentences.txt", 64, 4)
    assert meta.before.num_layers == 4 and meta.after.num_layers == 3
    assert [(e.stage, e.metric) for e in meta.evaluations] == [("base", "perplexity"), ("pruned", "perplexity")]
    assert meta.evaluations[0].tokens == meta.evaluations[1].tokens > 0
    assert meta.command.startswith("hf-prune prune --method shortgpt")
    readme = (out / "README.md").read_text()
    assert "license: mit" in readme and "- shortgpt" in readme and "base_model: tiny-org/tiny-llama" in readme


def test_card_command_renders_readme_and_picture(export_dir, capsys):
    (export_dir / "README.md").unlink()
    (export_dir / "hf_prune_layers.png").unlink()
    assert main(["card", str(export_dir), "--repo-id", "me/tiny-pruned"]) == 0
    text = (export_dir / "README.md").read_text()
    assert 'from_pretrained("me/tiny-pruned"' in text
    assert (export_dir / "hf_prune_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(export_dir / "README.md")


def test_eval_command_prints_and_records(export_dir, corpus, tmp_path, capsys):
    task = _mc_task(tmp_path / "toy_mc.json")
    code = main(["eval", str(export_dir), "--text", str(corpus), "--window", "16", "--max-tokens", "200",
                 "--mc", str(task), "--stage", "checked by test", "--record"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert {(r["task"], r["metric"]) for r in printed} == {("sentences", "perplexity"), ("toy_mc", "acc"),
                                                           ("toy_mc", "acc_norm")}
    meta = load_metadata(export_dir)
    assert [e.stage for e in meta.evaluations] == ["checked by test"] * 3
    assert meta.evaluations[1].examples == 4
    assert "| checked by test | sentences | perplexity |" in (export_dir / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# push, in a subprocess whose HF_ENDPOINT is the fake Hub
# --------------------------------------------------------------------------------------------------------------------


def test_push_command_with_env_endpoint_and_token(export_dir):
    """The ordinary user path: HF_ENDPOINT and HF_TOKEN in the environment of a fresh `python -m hf_prune.cli`."""
    local = _tree(export_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    with FakeHub() as hub:
        endpoint = hub.endpoint
        env.update({"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"})
        r = subprocess.run([sys.executable, "-m", "hf_prune.cli", "-v", "push", str(export_dir), "--repo-id",
                            "me/tiny-pruned", "--private"], env=env, capture_output=True, text=True, cwd=REPO,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        assert hub.files("me/tiny-pruned") == local
        assert hub.repos["me/tiny-pruned"].private and hub.tokens_seen == {TOKEN}
    assert r.stdout.strip().startswith(f"{endpoint}/me/tiny-pruned/commit/")
    assert TOKEN not in r.stdout + r.stderr
    assert _tree(export_dir) == local
    assert not any(TOKEN.encode() in data for data in local.values())


def test_push_command_to_a_branch_and_after_a_failure(export_dir, monkeypatch, caplog, capfd):
    from huggingface_hub import constants

    caplog.set_level(logging.DEBUG)
    local = _tree(export_dir)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # single-commit path: no automatic retry of a 500
    with FakeHub(fail_commits={1}) as hub:
        argv = ["push", str(export_dir), "--repo-id", "me/tiny-pruned", "--revision", "v2", "--token", TOKEN,
                "--endpoint", hub.endpoint]
        assert main(argv) == 1
        out, err = capfd.readouterr()
        assert "500" in err and "run the push again" in err
        assert hub.files("me/tiny-pruned", "v2") == {} and _tree(export_dir) == local
        assert main(argv) == 0
        assert hub.files("me/tiny-pruned", "v2") == local and hub.files("me/tiny-pruned", "main") == {}
    out2, err2 = capfd.readouterr()
    for text in (out, err, out2, err2, caplog.text):
        assert TOKEN not in text


# every method with its defaults (only layer counts scaled to the 4-layer tiny model), all stages back to back
@pytest.mark.parametrize("method,options", [
    ("shortgpt", ["--n_remove", "2"]), ("iterabre", ["--n_remove", "2", "--total_tokens", "64"]),
    ("slicegpt", []), ("dynamic_slicing", []), ("pip", []), ("llm_pruner", ["--skip_first_layers", "1"]), ("magnitude", []),
    ("llm_surgeon", ["--verbose", "false"]), ("angular_block", ["--n_remove", "2"]),
])
def test_prune_runs_every_method_with_its_defaults(method, options, model_dir, corpus, tmp_path):
    """Every method, multi-stage ones included, runs through the one stage runner (plan, the plan's weight update,
    surgery, finalize) and gives a saved model whose perplexity is the one recorded, not a model pruned without
    the method's weight change (LLM Surgeon's update, SliceGPT's rotation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.evaluate import perplexity

    out = tmp_path / method
    assert main(["prune", "--method", method, *options, "--model", str(model_dir), "--corpus", str(corpus),
                 "--n-samples", "4", "--seq-len", "16", "--batch-size", "2", "-o", str(out),
                 "--text", str(corpus), "--window", "16", "--max-tokens", "200"]) == 0
    meta = load_metadata(out)
    assert meta.after.num_parameters < meta.before.num_parameters
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ppl = perplexity(loaded, AutoTokenizer.from_pretrained(out), [corpus.read_text()], window=16, max_tokens=200)
    recorded = [e for e in meta.evaluations if e.stage == "pruned"][0].value
    assert ppl["perplexity"] == pytest.approx(recorded, rel=1e-4)
