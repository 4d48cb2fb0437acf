"""Save a pruned model with the record of what was done, and push it to the Hugging Face Hub.

    meta = ExportMetadata(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_license="apache-2.0",
                          method="shortgpt", before=ModelStats.of(model))      # record "before" before pruning
    apply(model, plan)
    save(model, tokenizer, "out", plan=plan, metadata=meta)                    # weights, plan, hf_prune.json, card
    push("out", "me/smollm2-pruned", private=True)

`save` writes into a temporary sibling directory and renames it into place, so a reader never sees a half-written
folder and an existing folder is replaced only once the new one is complete. hf-prune never deletes or overwrites what
it did not write: `save` records a fingerprint of every file it writes (`.hf_prune_export.json`) and replaces an
existing folder only when it is such an export, unchanged, or when `overwrite=True`; never the model's own folder.
Call `check_output_dir(out, model_path=...)` before loading a model to fail before any work is done.

`push` never modifies the local files other than writing a missing model card; a failed upload leaves the folder as
it was and running `push` again finishes the upload. The token is passed to `huggingface_hub` only; it is never
written to a file, card or log. The records (`ExportMetadata`, ...) live in `hf_prune.record` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .record import (
    CARD_FILENAME,
    FORMAT_VERSION,
    MARKER_FILENAME,
    METADATA_FILENAME,
    CardExistsError,
    DataRecord,
    EvalRecord,
    ExportMetadata,
    ModelStats,
    OutputExistsError,
    OutputIsModelError,
    as_metadata,
    check_output_dir,
    load_metadata,
    record_written,
    redact,
    versions,
)

if TYPE_CHECKING:
    from torch import nn

    from .plan import PrunePlan

__all__ = [
    "CARD_FILENAME",
    "FORMAT_VERSION",
    "MARKER_FILENAME",
    "METADATA_FILENAME",
    "CardExistsError",
    "DataRecord",
    "EvalRecord",
    "ExportMetadata",
    "ModelStats",
    "OutputExistsError",
    "OutputIsModelError",
    "PushError",
    "as_metadata",
    "check_output_dir",
    "load_metadata",
    "measure",
    "push",
    "redact",
    "save",
    "to_gguf",
    "versions",
]

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".hf_prune_tmp-"
_as_metadata = as_metadata  # old private name, kept until callbacks/prune.py uses `as_metadata`


class PushError(RuntimeError):
    """An upload to the Hub failed; the local folder is intact and the push can be run again."""


# --------------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_directory(target: Path, check: Callable[[], object]) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; on success run `check` again (the folder may have changed while
    the model was written) and rename the sibling to `target`, replacing an existing folder only then. On failure
    the temporary folder is removed and `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model should be readable like any other folder
    try:
        yield tmp
        check()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _readable_files(folder: Path) -> None:
    """Give every file the permissions the umask allows (some writers create 0600 files via mkstemp)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _source_folder(model: nn.Module) -> str | None:
    """The local folder `model` was loaded from (`name_or_path`), or None (a Hub id, or built in memory)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name.strip() and os.path.isdir(name) else None


def save(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    plan: PrunePlan | None = None,
    metadata: ExportMetadata | dict[str, Any] | None = None,
    *,
    card: bool = True,
    repo_id: str | None = None,
    overwrite: bool = False,
    model_path: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (save_pretrained), `tokenizer`, `plan` (prune_plan.json), `hf_prune.json` and the model card
    (README.md + the per-layer picture) into `folder`, atomically, with the marker that lists every file written.

    An existing `folder` is replaced only when it is an earlier hf-prune export that nobody changed, or with
    `overwrite=True`; never when it is, contains or lies inside the folder the model was loaded from (`model_path`,
    default the model's `name_or_path`). See `check_output_dir`, which callers run before loading anything.
    `metadata.after` and `metadata.versions` are measured here; record `metadata.before = ModelStats.of(model)`
    before pruning to get before/after numbers in the card. `repo_id` only fills the card's loading snippet.
    In a distributed run call this on the main process only.
    """
    from .arch import unwrap_model

    model = unwrap_model(model)
    folder = Path(folder)
    model_path = model_path if model_path is not None else _source_folder(model)
    check_output_dir(folder, model_path=model_path, overwrite=overwrite)
    meta = as_metadata(metadata)
    meta.after = ModelStats.of(model)
    meta.versions = {**meta.versions, **versions()}
    if plan is not None and meta.method is None and isinstance(plan.provenance.get("method"), str):
        meta.method = plan.provenance["method"]
    if meta.model_name is None:
        meta.model_name = folder.resolve().name
    with _atomic_directory(folder, lambda: check_output_dir(folder, model_path=model_path, overwrite=overwrite)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp)
        meta.after.disk_bytes = _weight_bytes(tmp)
        (tmp / METADATA_FILENAME).write_text(meta.to_json(), encoding="utf-8")  # strict JSON, every string redacted
        if card:
            from .cards import write_card

            write_card(tmp, repo_id=repo_id)
        _readable_files(tmp)
        record_written(tmp, _all_files(tmp))  # last: the marker fingerprints the files as they are
    logger.info("saved %s (%d parameters)", folder, meta.after.num_parameters)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------------


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    render_card: bool = False,
    overwrite_card: bool = False,
):
    """Upload an export folder to the Hub repo `repo_id`: create the repo (`exist_ok`), create the branch
    `revision` if it is not main, upload the folder in one `upload_folder` call. Returns the `CommitInfo`.

    The card (README.md) is rendered first if the folder has none, or with `render_card=True` (its loading
    snippet then names `repo_id`); a README.md hf-prune did not write, or one edited by hand, is kept and
    `render_card=True` raises CardExistsError before anything is uploaded, unless `overwrite_card=True`. `private` applies when the repo is created. `token` defaults to the logged-in
    token / HF_TOKEN; it is handed to huggingface_hub only. `endpoint` overrides HF_ENDPOINT (tests, mirrors).
    A failure raises PushError; nothing local is changed, and calling push again completes the upload.
    """
    from huggingface_hub import HfApi

    from . import __version__
    from .cards import write_card

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {str(folder)!r} does not exist; create it with hf_prune.export.save")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; it is not a saved model folder")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*|[A-Za-z0-9][\w.-]*", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a valid repo id; use 'namespace/name' (letters, digits, - _ .)")
    if render_card or not (folder / CARD_FILENAME).is_file():
        write_card(folder, repo_id=repo_id, overwrite=overwrite_card)
    if commit_message is None:
        meta = load_metadata(folder)
        what = f" ({meta.method})" if meta.method else ""
        commit_message = f"Upload {meta.model_name or folder.name}{what} with hf-prune"
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub's import
    api = HfApi(endpoint=endpoint, token=token, library_name="hf_prune", library_version=__version__)
    branch = revision if revision not in (None, "main") else None
    logger.info("pushing %s to %s%s", folder, repo_id, f"@{branch}" if branch else "")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=commit_message,
            create_pr=create_pr,
            ignore_patterns=[f"{_TMP_PREFIX}*", f"**/{_TMP_PREFIX}*", "*.tmp"],
        )
    except Exception as e:  # noqa: BLE001 - re-raised with what to do next
        detail = redact(f"{type(e).__name__}: {e}", token)
        raise PushError(
            f"pushing {str(folder)!r} to {repo_id!r}{f' (branch {branch!r})' if branch else ''} failed: {detail}. "
            "The local folder is unchanged; run the push again to complete the upload."
        ) from e
    logger.info("pushed %s to %s: %s", folder, repo_id, getattr(info, "commit_url", info))
    return info


# --------------------------------------------------------------------------------------------------------------------
# Measure: evaluation numbers as records for the card
# --------------------------------------------------------------------------------------------------------------------


_MAX_CHARS_PER_TOKEN = 32  # far above any tokenizer's average, so cutting there never changes the first tokens


def _text_head(text: Any, max_tokens: int | None) -> Any:
    """The documents joined as tokenize_stream joins them, cut to `max_tokens * 32` characters: tokenizing a long
    corpus (megabytes) to keep its first few thousand tokens is wasted work. Unchanged when `max_tokens` is None."""
    if max_tokens is None:
        return text
    from .data import DOC_SEPARATOR, as_texts

    joined = DOC_SEPARATOR.join(d for d in as_texts(text) if d)
    return joined[: max_tokens * _MAX_CHARS_PER_TOKEN]


def measure(
    model: nn.Module,
    tokenizer: Any,
    *,
    stage: str,
    perplexity: dict[str, Any] | None = None,
    window: int = 512,
    max_tokens: int | None = None,
    mc_tasks: list[str | os.PathLike] | tuple = (),
    mc_limit: int | None = None,
    lm_eval_tasks: list[str | os.PathLike] | tuple = (),
    lm_eval_limit: int | None = None,
    batch_size: int = 8,
    step: int | None = None,
) -> list[EvalRecord]:
    """Evaluate `model` and return EvalRecords tagged with `stage`.

    `perplexity` maps a name to a text (or list of documents) scored by `hf_prune.evaluate.perplexity` over
    non-overlapping windows of `window` tokens; `mc_tasks` are BIG-bench-style JSON files scored by
    `hf_prune.evaluate.multiple_choice` (acc, acc_norm); `lm_eval_tasks` go through lm-eval
    (`hf_prune.lm_eval_bridge.lm_eval`), their records named '<task> (lm-eval)'.
    """
    from . import evaluate

    records: list[EvalRecord] = []
    for name, text in (perplexity or {}).items():
        text = _text_head(text, max_tokens)
        r = evaluate.perplexity(model, tokenizer, text, window=window, batch_size=batch_size, max_tokens=max_tokens)
        records.append(EvalRecord(task=name, metric="perplexity", value=float(r["perplexity"]), stage=stage,
                                  dataset_name=name, dataset_type=name, tokens=int(r["tokens"]), step=step,
                                  source=f"hf_prune.evaluate.perplexity, window {window}"))
    for path in mc_tasks:
        name = Path(path).stem
        r = evaluate.multiple_choice(model, tokenizer, path, limit=mc_limit, batch_size=batch_size)
        for metric in ("acc", "acc_norm"):
            records.append(EvalRecord(task=name, metric=metric, value=float(r[metric]), stage=stage, dataset_name=name,
                                      dataset_type=name, examples=int(r["n"]), step=step,
                                      source="hf_prune.evaluate.multiple_choice, zero-shot"))
    if lm_eval_tasks:
        import importlib.metadata

        from .lm_eval_bridge import lm_eval

        version = importlib.metadata.version("lm_eval")
        results = lm_eval(model, tokenizer, list(lm_eval_tasks), limit=lm_eval_limit, batch_size=batch_size)
        for name, metrics in results.items():
            for metric in ("acc", "acc_norm", "perplexity", "word_perplexity"):
                if metric in metrics:
                    records.append(EvalRecord(task=f"{name} (lm-eval)", metric=metric, value=metrics[metric],
                                              stage=stage, dataset_name=name, dataset_type=name,
                                              examples=int(metrics["n"]) if "n" in metrics else None, step=step,
                                              source=f"lm-eval {version}, zero-shot"))
    return records


def to_gguf(folder_or_model: Any, path: str | os.PathLike, dtype: str = "f16", **kwargs: Any) -> Path:
    """Write an export (folder or in-memory model) as a GGUF file for llama.cpp: `hf_prune.gguf.to_gguf`."""
    from .gguf import to_gguf as write_gguf

    return write_gguf(folder_or_model, path, dtype=dtype, **kwargs)
