"""Model cards for pruned models, rendered from what was recorded: `hf_prune.json`, `prune_plan.json`, `config.json`.

The card is a `huggingface_hub.ModelCard` built from the `hf_prune.model_cards` template:

- metadata: `base_model`, `base_model_relation: finetune` only when recovery training happened (the Hub has no
  "pruned" relation; a one-shot prune leaves it unset), `tags` (the method, "pruned", "hf-prune"), the base model's
  licence, `datasets` (Hub ids of the calibration/recovery data), and the evaluation of the final stage as
  `model-index`;
- body: the removed layers and a per-layer widths table, a PNG of the widths (matplotlib, written next to the card),
  parameter count and size before/after, calibration and recovery data with token counts, all recorded evaluations,
  how to load the model (plain `from_pretrained`, or hf_prune / `trust_remote_code` for Pruned* model types), and
  the recipe and command.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .plan import PLAN_FILENAME, PrunePlan
from .record import (
    CARD_FILENAME,
    METADATA_FILENAME,
    CardExistsError,
    EvalRecord,
    ExportMetadata,
    is_own_file,
    load_metadata,
    record_written,
    redact,
    strict_json,
    write_atomic,
)

__all__ = [
    "PICTURE_FILENAME",
    "CardExistsError",
    "basis_choice",
    "basis_choice_section",
    "card_data",
    "check_card",
    "hub_license",
    "is_sliced",
    "layer_rows",
    "GGUF_PER_LAYER_FAMILIES",
    "GGUF_UNIFORM_FAMILIES",
    "llama_cpp_instructions",
    "load_instructions",
    "needs_custom_code",
    "plot_layers",
    "render_card",
    "residual_widths",
    "write_card",
]

logger = logging.getLogger(__name__)

PICTURE_FILENAME = "hf_prune_layers.png"

# Licence ids the Hub knows that base models commonly carry; anything else is reported as "other".
_KNOWN_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m",
    "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
    "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "unlicense", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "llama4", "gemma", "other", "unknown",
}


def hub_license(text: str | None) -> str | None:
    """The Hub licence id for a recorded licence string ('Apache-2.0 (...)' -> 'apache-2.0'); None if unknown."""
    if not text or not text.strip():
        return None
    word = text.strip().split()[0].strip("(),;").lower()
    return word if word in _KNOWN_LICENSES else "other"


# --------------------------------------------------------------------------------------------------------------------
# Per-layer widths
# --------------------------------------------------------------------------------------------------------------------


def _layer_map(meta: ExportMetadata, plan: PrunePlan | None) -> tuple[int, list[int]] | None:
    """(number of original layers, original index of each saved layer), or None when the record is inconsistent."""
    after = meta.after
    if after is None or after.layer_widths is None:
        return None
    drop = set(plan.drop_layers) if plan is not None else set()
    n_orig = meta.before.num_layers if meta.before and meta.before.num_layers else len(after.layer_widths) + len(drop)
    kept = [i for i in range(n_orig) if i not in drop]
    if len(kept) != len(after.layer_widths):
        return None
    return n_orig, kept


def _change(before: int | None, after: int | None) -> str:
    if after is None:
        return "removed"
    if before is None or before == after:
        return str(after)
    return f"{before} → {after}"


def residual_widths(meta: ExportMetadata, config: dict[str, Any] | None = None) -> list[int] | None:
    """A sliced model's residual-stream width per slot (2L + 1: attention input and MLP input of every layer, then
    the final residual), from the record or config.json's `residual_dims`; None for an unsliced model."""
    dims = meta.after.residual_widths if meta.after and meta.after.residual_widths else None
    if dims is None and config:
        dims = config.get("residual_dims")
    n = meta.after.num_layers if meta.after and meta.after.num_layers else None
    if not dims or (n is not None and len(dims) != 2 * n + 1):
        return None
    return [int(d) for d in dims]


def basis_choice(plan: PrunePlan | None) -> dict[str, Any] | None:
    """The evidence of a `basis="auto"` slicing run (`provenance["basis_choice"]` of the plan, or of the last stage
    that has one when stages were composed), or None when the basis was fixed or the plan is missing."""
    if plan is None:
        return None
    prov = plan.provenance or {}
    stages = list(prov.get("stages") or []) if prov.get("composed") else [prov]
    found = [st["basis_choice"] for st in stages if isinstance(st, dict) and isinstance(st.get("basis_choice"), dict)]
    return found[-1] if found else None


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def basis_choice_section(choice: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's account of a `basis="auto"` choice: a sentence (chosen basis and head, criterion, held-out tokens,
    dense perplexity) and one row per candidate (held-out perplexity, parameters, seconds, or why it was refused)."""
    if not choice or not isinstance(choice.get("candidates"), list):
        return None
    chosen = choice.get("chosen") or {}
    rows = []
    for c in choice["candidates"]:
        if not isinstance(c, dict):
            continue
        refused = c.get("skipped")
        rows.append({"basis": c.get("basis", "?"), "head": c.get("head", "?"),
                     "ppl": "refused" if refused else _num(c.get("held_out_ppl"), ".2f"),
                     "parameters": _num(c.get("parameters"), ","), "seconds": _num(c.get("seconds"), ".1f"),
                     "note": "; ".join(x for x in (c.get("schedule"), "**chosen**" if c.get("chosen") else None,
                                                   str(refused).split(";")[0][:160] if refused else None) if x)})
    held = choice.get("held_out_tokens")
    text = (f'The slicing basis was chosen by measurement (`basis="auto"`): every candidate was built on '
            f"{choice.get('build_batches', '?')} calibration batches and scored on "
            f"{choice.get('held_out_batches', '?')} held-out batch(es)"
            + (f" ({held:,} tokens)" if isinstance(held, int) else "")
            + ("; the kept basis was then rebuilt from every calibration batch"
               if any(isinstance(c, dict) and c.get("rebuilt_on_all_batches") for c in choice["candidates"]) else "")
            + f"; the rule: {choice.get('criterion', 'not recorded')}. Chosen: basis `{chosen.get('basis', '?')}`, "
              f"head `{chosen.get('head', '?')}`. The dense model's held-out perplexity is "
              f"{_num(choice.get('dense_held_out_ppl'), '.2f')}.")
    return {"text": text, "rows": rows}


def _full_width(meta: ExportMetadata, config: dict[str, Any] | None) -> int | None:
    for stats in (meta.before, meta.after):
        if stats is not None and stats.hidden_size:
            return stats.hidden_size
    return (config or {}).get("hidden_size")


def layer_rows(meta: ExportMetadata, plan: PrunePlan | None, config: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """One row per original layer: index, status ('kept', 'narrowed', 'sliced', 'removed') and widths before → after;
    a sliced model's rows also give the residual width entering the layer's attention and its MLP ('residual')."""
    mapping = _layer_map(meta, plan)
    after = meta.after.layer_widths if meta.after else None
    if after is None:
        return []
    dims = residual_widths(meta, config)
    full = _full_width(meta, config)

    def residual(saved_index: int) -> str | None:
        if dims is None:
            return None
        a, m = dims[2 * saved_index], dims[2 * saved_index + 1]
        return f"{full} → {a} / {m}" if full else f"{a} / {m}"

    if mapping is None:  # the plan does not describe the whole history: report the saved layers as they are
        return [{"index": f"{i} (saved)", "status": "sliced" if dims else "kept", "heads": w[0], "kv_heads": w[1],
                 "mlp": w[2], "residual": residual(i)} for i, w in enumerate(after)]
    n_orig, kept = mapping
    before = meta.before.layer_widths if meta.before and meta.before.layer_widths else None
    if before is not None and len(before) != n_orig:
        before = None
    by_orig = {i: (j, w) for j, (i, w) in enumerate(zip(kept, after))}
    rows = []
    for i in range(n_orig):
        b = before[i] if before else [None, None, None]
        if i not in by_orig:
            rows.append({"index": i, "status": "**removed**", "heads": _change(b[0], None),
                         "kv_heads": _change(b[1], None), "mlp": _change(b[2], None),
                         "residual": "removed" if dims else None})
            continue
        j, a = by_orig[i]
        narrowed = before is not None and list(a) != list(b)
        status = "sliced" if dims else "kept"
        if narrowed:
            status = "sliced, narrowed" if dims else "narrowed"
        rows.append({"index": i, "status": status, "heads": _change(b[0], a[0]), "kv_heads": _change(b[1], a[1]),
                     "mlp": _change(b[2], a[2]), "residual": residual(j)})
    return rows


def _plot_residual(ax, dims: list[int], kept: list[int], full: int | None, removed: list[int]) -> None:
    """A sliced model's residual width per layer: into the attention (blue) and into the MLP (orange), with the
    unsliced width as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    attn = [dims[2 * j] for j in range(len(kept))]
    mlp = [dims[2 * j + 1] for j in range(len(kept))]
    ax.bar([i - 0.2 for i in kept], attn, color="#3b75af", width=0.4, zorder=2)
    ax.bar([i + 0.2 for i in kept], mlp, color="#e5a33d", width=0.4, zorder=2)
    for i in removed:
        ax.axvspan(i - 0.45, i + 0.45, color="#d9534f", alpha=0.3, linewidth=0, zorder=1)
    top = max(dims + [full or 0, 1])
    if full:
        ax.axhline(full, color="0.35", linewidth=0.8, linestyle="--", zorder=3)
    ax.set_ylabel("residual width")
    ax.set_ylim(0, top * 1.05)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.spines[["top", "right"]].set_visible(False)


def plot_layers(meta: ExportMetadata, plan: PrunePlan | None, path: str | os.PathLike,
                config: dict[str, Any] | None = None) -> Path | None:
    """Draw query heads, kv heads and MLP channels per original layer (before as outline, after filled, removed
    layers marked) into the PNG `path`; for a sliced model also the residual-stream width entering each layer's
    attention and MLP. Returns None, with a warning, when matplotlib is missing or nothing is known about the
    layers."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn("matplotlib is not installed: the model card will have no per-layer picture "
                      "(pip install matplotlib)", stacklevel=2)
        return None
    mapping = _layer_map(meta, plan)
    if mapping is None:
        logger.warning("the per-layer widths do not match the plan; the card gets no per-layer picture")
        return None
    n_orig, kept = mapping
    after = dict(zip(kept, meta.after.layer_widths))
    before = meta.before.layer_widths if meta.before and meta.before.layer_widths else None
    if before is not None and len(before) != n_orig:
        before = None
    removed = [i for i in range(n_orig) if i not in after]
    dims = residual_widths(meta, config)
    titles = ("query heads", "kv heads", "MLP channels")
    n_panels = 4 if dims else 3
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(6.0, 0.28 * n_orig + 2), 1.95 * n_panels), sharex=True)
    xs = list(range(n_orig))
    if dims:  # a sliced model: the residual widths, what slicing changed, come first
        _plot_residual(axes[0], dims, kept, _full_width(meta, config), removed)
    for k, (ax, title) in enumerate(zip(axes[1:] if dims else axes, titles)):
        ax.bar(kept, [after[i][k] for i in kept], color="#3b75af", width=0.8, zorder=2)
        if before is not None:  # outline on top, so a narrowed layer shows what it lost
            ax.bar(xs, [w[k] for w in before], color="none", edgecolor="0.35", linewidth=0.8, width=0.8, zorder=3)
        top = max([w[k] for w in (before or [])] + [after[i][k] for i in kept] + [1])
        for i in removed:
            ax.axvspan(i - 0.45, i + 0.45, color="#d9534f", alpha=0.3, linewidth=0, zorder=1)
        ax.set_ylabel(title)
        ax.set_ylim(0, top * 1.05)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xlabel("decoder layer (original index)")
    axes[-1].set_xticks(xs[:: max(1, n_orig // 30)])

    handles = [Patch(facecolor="#3b75af", label="after, residual into attention" if dims else "after")]
    if dims:
        handles.append(Patch(facecolor="#e5a33d", label="residual into MLP"))
    if before is not None:
        handles.append(Patch(facecolor="none", edgecolor="0.35", label="before"))
    if removed:
        handles.append(Patch(facecolor="#d9534f", alpha=0.3, label="removed layer"))
    title = meta.model_name or "pruned model"
    if meta.before and meta.after:
        title += f": {_short(meta.before.num_parameters)} → {_short(meta.after.num_parameters)} parameters"
    fig.suptitle(title, fontsize=10, x=0.02, y=0.995, ha="left", va="top")
    top = 1 - 0.42 / fig.get_figheight()  # the title, then the legend under it, then the panels
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.99, top + 0.01), ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top - 0.2 / fig.get_figheight()))
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Card pieces
# --------------------------------------------------------------------------------------------------------------------


def _short(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _pct(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "—"
    return f"{100.0 * (after - before) / before:+.1f}%"


def _size_rows(meta: ExportMetadata) -> list[dict[str, str]]:
    b, a = meta.before, meta.after
    rows = []

    def cell(stats, attr, fmt):
        v = getattr(stats, attr) if stats is not None else None
        return fmt(v) if v is not None else "—"

    for name, attr, fmt in (("parameters", "num_parameters", lambda v: f"{v:,} ({_short(v)})"),
                            ("size in memory", "size_bytes", _bytes),
                            ("decoder layers", "num_layers", str)):
        rows.append({"name": name, "before": cell(b, attr, fmt), "after": cell(a, attr, fmt),
                     "change": _pct(getattr(b, attr, None) if b else None, getattr(a, attr, None) if a else None)})
    dtype = (a.dtype if a else None) or (b.dtype if b else None)
    if dtype:
        rows[1]["name"] = f"size in memory ({dtype})"
    return rows


def _zeros_line(meta: ExportMetadata) -> str | None:
    """What the card says about zero weights kept in place, or None when there are (almost) none."""
    a = meta.after
    zeros = a.zero_parameters if a else None
    if not zeros or not a.num_parameters:
        return None
    total = sum(zeros.values())
    before = meta.before.zero_parameters if meta.before and meta.before.zero_parameters else {}
    if total - sum(before.values()) < 1e-3 * a.num_parameters:
        return None
    parts = ", ".join(f"{k} {v:,}" for k, v in zeros.items() if v)
    return (f"{total:,} parameters ({100.0 * total / a.num_parameters:.1f}% of the pruned model) are zeros kept in "
            f"place: pruned structures that surgery could not remove (for example query/key rows inside a head, "
            f"residual-stream columns, 2:4 or unstructured sparsity). They are counted in the sizes above. Whole zero "
            f"rows and columns can be dropped from storage with `hf_prune.compact_zeros`; scattered zeros need a "
            f"sparse kernel or format. By matrix: {parts}.")


def _data_line(rec, none_text: str) -> str:
    if rec is None:
        return none_text
    parts = [f"`{rec.hub_id}`" if rec.hub_id else rec.name]
    if rec.hub_id and rec.name and rec.name != rec.hub_id:
        parts[0] += f" ({rec.name})"
    counts = []
    if rec.tokens is not None:
        counts.append(f"{rec.tokens:,} tokens")
    if rec.samples is not None:
        counts.append(f"{rec.samples:,} sequences" + (f" of {rec.seq_len} tokens" if rec.seq_len else ""))
    if rec.steps is not None:
        counts.append(f"{rec.steps:,} optimizer steps")
    line = parts[0] + (f": {', '.join(counts)}" if counts else "")
    if rec.description:
        line += f". {rec.description}"
    return line


def _fmt_value(e: EvalRecord) -> str:
    if e.value is None:
        return "not finite (recorded as null)"
    if not e.is_finite:
        return f"{float(e.value)} (not finite)"
    v = float(e.value)
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _final_stage(evals: list[EvalRecord]) -> str | None:
    stages = [e.stage for e in evals if e.stage != "base"]
    return stages[-1] if stages else None


def _eval_rows(evals: list[EvalRecord]) -> list[dict[str, str]]:
    rows = []
    for e in evals:
        size = f"{e.examples:,} examples" if e.examples is not None else (f"{e.tokens:,} tokens" if e.tokens else "—")
        if e.dataset_split:
            size += f" ({e.dataset_split})"
        rows.append({"stage": e.stage, "task": e.dataset_name or e.task, "metric": e.metric,
                     "value": _fmt_value(e), "size": size, "source": e.source or "—"})
    return rows


def card_data(meta: ExportMetadata, plan: PrunePlan | None = None):
    """The card's YAML metadata as a `huggingface_hub.ModelCardData`."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = [t for t in (meta.method, "pruned", "structured-pruning", "hf-prune") if t]
    if plan is not None and plan.drop_layers:
        tags.append("layer-pruning")
    datasets = [r.hub_id for r in (meta.calibration, meta.recovery) if r is not None and r.hub_id]
    recovered = meta.recovery is not None and bool(meta.recovery.tokens or meta.recovery.steps)
    final = _final_stage(meta.evaluations)
    latest: dict[tuple[str, str], EvalRecord] = {}
    for e in meta.evaluations:
        if e.stage == final:
            latest[(e.task, e.metric)] = e  # the last measurement of a (task, metric) in the final stage wins
    # model-index holds numbers only: a value that was not finite is reported in the card's table, not here
    latest = {k: e for k, e in latest.items() if e.is_finite}
    eval_results = [
        EvalResult(task_type=e.task_type, dataset_type=e.dataset_type or e.task, dataset_name=e.dataset_name or e.task,
                   dataset_split=e.dataset_split, metric_type=e.metric, metric_value=round(float(e.value), 6),
                   metric_name=f"{e.metric} (lm-eval)" if (e.source or "").startswith("lm-eval") else e.metric)
        for e in latest.values()
    ]
    kwargs: dict[str, Any] = {}
    if meta.base_model and recovered:
        kwargs["base_model_relation"] = "finetune"
    return ModelCardData(
        base_model=meta.base_model,
        license=hub_license(meta.base_model_license),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        model_name=meta.model_name or "pruned-model",
        eval_results=eval_results or None,
        **kwargs,
    )


def needs_custom_code(config: dict[str, Any]) -> bool:
    """True when config.json names a model type transformers does not ship (hf_prune's Pruned*/Sliced* classes)."""
    return str(config.get("model_type", "")).startswith(("pruned_", "sliced_")) or bool(config.get("auto_map"))


def is_sliced(config: dict[str, Any]) -> bool:
    """True for a residual-stream-sliced model (SliceGPT, Dynamic Slicing)."""
    return str(config.get("model_type", "")).startswith("sliced_") or bool(config.get("residual_dims"))


def load_instructions(config: dict[str, Any], repo_id: str | None = None) -> str:
    """Markdown that says how to load the model: plain `from_pretrained` for standard configs, hf_prune or
    `trust_remote_code=True` for Pruned*/Sliced* model types."""
    where = repo_id or "path/to/this/folder"
    if not needs_custom_code(config):
        return (
            f"The saved config is the standard `{config.get('model_type', 'transformers')}` config with the new "
            "sizes, so the model loads with plain transformers (no hf_prune needed) and works wherever the base "
            "architecture does:\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```'
        )
    why = ("The residual stream has its own width at every layer (sliced), with shortcut matrices between widths"
           if is_sliced(config) else "The layers have different widths")
    if is_sliced(config):
        engines = "Engines that only know the standard architectures (vLLM, llama.cpp) cannot load this sliced layout."
    elif llama_cpp_instructions(config) is not None:
        engines = ("vLLM cannot load this layout (its per-layer DeciLM loader varies kv heads and MLP widths, not "
                   "query heads); llama.cpp can, after conversion (below).")
    else:
        engines = ("vLLM and llama.cpp cannot load this layout (llama.cpp's only architecture with per-layer widths, "
                   "`deci`, has no place for this family's extra norms).")
    return (
        f"{why}, which no standard config can describe: the model type is "
        f"`{config.get('model_type')}`. Load it with hf_prune installed (importing it registers the classes with "
        "transformers):\n\n"
        "```python\nimport hf_prune  # pip install hf-prune\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n```\n\n'
        "or without hf_prune, using the configuration and modeling files stored next to the weights (`auto_map`):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)\n```\n\n'
        f"{engines}"
    )


# the families `hf-prune gguf` writes (hf_prune.gguf: a uniform result as the family's own llama.cpp architecture, a
# per-layer one as `deci`); kept here as data so that rendering a card never imports the GGUF writer
GGUF_UNIFORM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2")
# measured: `pip install llama-cpp-python==0.3.36` from the sdist on this project's 2-core CPU machine
LLAMA_CPP_BUILD_MINUTES = 4


def llama_cpp_instructions(config: dict[str, Any], repo_id: str | None = None) -> str | None:
    """Markdown for running the export in llama.cpp through `hf-prune gguf`, for the layouts it writes (uniform
    llama/mistral/qwen2/qwen3, per-layer llama/mistral/qwen2); None for others (sliced models, per-layer Qwen3 and
    Gemma-3, which no llama.cpp architecture runs, are said so in the loading section)."""
    model_type = str(config.get("model_type", ""))
    per_layer = model_type.startswith("pruned_")
    family = str(config.get("base_model_type") or model_type.removeprefix("pruned_"))
    if is_sliced(config) or family not in (GGUF_PER_LAYER_FAMILIES if per_layer else GGUF_UNIFORM_FAMILIES):
        return None
    folder = repo_id.split("/")[-1] if repo_id else "path/to/this/folder"
    fetch = f"hf download {repo_id} --local-dir {folder}\n" if repo_id else ""
    compact = " --expand-compact" if any(config.get("layer_compact_linears") or []) else ""
    what = ("llama.cpp runs models whose layers have different widths through its `deci` architecture (per-layer "
            "query heads, kv heads and feed-forward lengths)" if per_layer else
            f"llama.cpp runs this model as its own `{'llama' if family == 'mistral' else family}` architecture")
    text = (f"{what}. Install hf-prune with llama.cpp support (`llama-cpp-python`, which compiles llama.cpp: about "
            f"{LLAMA_CPP_BUILD_MINUTES} minutes on 2 CPU cores), convert this folder to GGUF and run it:\n\n"
            f"```bash\npip install \"hf-prune[gguf]\"\n{fetch}hf-prune gguf {folder} -o model.gguf{compact}\n```\n\n"
            "```python\nfrom llama_cpp import Llama\n\n"
            'llm = Llama(model_path="model.gguf", n_ctx=2048)\n'
            'print(llm("The capital of France is", max_tokens=32)["choices"][0]["text"])\n```\n\n'
            "or with llama.cpp's own command line, where it is installed: `llama-cli -m model.gguf`. "
            "`hf-prune gguf --dtype` picks the storage (f16 by default; f32, bf16, q8_0).")
    if compact:
        text += ("\n\nSome projections are stored without their zero rows and columns; llama.cpp multiplies dense "
                 "matrices only, so `--expand-compact` writes them dense again (exact, without the saving).")
    return text


def _summary(meta: ExportMetadata, plan: PrunePlan | None, dims: list[int] | None = None,
             full: int | None = None) -> str:
    base = f"[{meta.base_model}](https://huggingface.co/{meta.base_model})" if meta.base_model else "a model"
    what = []
    if plan is not None and plan.drop_layers:
        n = meta.before.num_layers if meta.before and meta.before.num_layers else None
        what.append(f"{len(plan.drop_layers)}{f' of {n}' if n else ''} decoder layers removed")
    if plan is not None and (plan.heads or plan.kv_heads or plan.mlp_channels):
        what.append("attention heads or MLP channels removed")
    if dims:
        what.append(f"its residual stream sliced{f' from {full}' if full else ''} to {min(dims)}–{max(dims)} "
                    "dimensions (a width per layer)")
    text = f"This model is {base} with {' and '.join(what) if what else 'its structure pruned'}"
    if meta.method:
        text += f" by the `{meta.method}` method"
    text += " of hf-prune"
    if meta.recovery is not None and (meta.recovery.tokens or meta.recovery.steps):
        text += ", followed by recovery training"
    text += "."
    if meta.before and meta.after:
        text += (f" It has {meta.after.num_parameters:,} parameters instead of {meta.before.num_parameters:,} "
                 f"({_pct(meta.before.num_parameters, meta.after.num_parameters)}).")
    return text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def render_card(folder: str | os.PathLike, repo_id: str | None = None, picture: str | None = PICTURE_FILENAME):
    """The `ModelCard` for an export folder, from its hf_prune.json, prune_plan.json and config.json.
    `picture` is the file name of the per-layer PNG to embed (None: no picture)."""
    from huggingface_hub import ModelCard

    from .model_cards import template

    folder = Path(folder)
    meta = load_metadata(folder)
    plan = PrunePlan.load(folder / PLAN_FILENAME) if (folder / PLAN_FILENAME).is_file() else None
    config = _read_json(folder / "config.json")
    dims = residual_widths(meta, config)
    full = _full_width(meta, config)
    rows = layer_rows(meta, plan, config)
    narrowed = sum(1 for row in rows if "narrowed" in row["status"])
    kept_widths = {tuple(w) for w in meta.after.layer_widths} if meta.after and meta.after.layer_widths else set()
    same_widths = None
    if rows and not narrowed and not dims and len(kept_widths) == 1 and meta.before and meta.before.layer_widths:
        q, kv, mlp = next(iter(kept_widths))
        same_widths = f"{q} query heads, {kv} kv heads and {mlp} MLP channels"
        rows = []  # depth-only pruning: the table would repeat the same widths for every layer
    sliced = None
    if dims:
        span = f"{min(dims)} dimensions everywhere" if min(dims) == max(dims) else (
            f"{min(dims)} to {max(dims)} dimensions; the final residual keeps {dims[-1]}")
        sliced = (f"The residual stream was sliced: rotated, then cut from {full or 'its full width'} to a width per "
                  f"layer ({span}). The table and the picture give, for every layer, the width entering its "
                  "attention / its MLP; where the width or the basis changes between two points, a shortcut matrix "
                  "carries the stream across. Query heads, kv heads and MLP channels keep their counts; their "
                  "projections read and write the narrower stream.")
    r = {
        "title": redact(meta.model_name or folder.resolve().name),
        "summary": _summary(meta, plan, dims, full),
        "removed_layers": sorted(plan.drop_layers) if plan else [],
        "width_changes": narrowed,
        "same_widths": same_widths,
        "sliced": sliced,
        "basis_choice": basis_choice_section(basis_choice(plan)) if dims else None,
        "picture": picture,
        "layer_rows": rows,
        "size_rows": _size_rows(meta),
        "disk": (f"{_bytes(meta.after.disk_bytes)}" if meta.after and meta.after.disk_bytes else None),
        "zeros": _zeros_line(meta),
        "method": meta.method,
        "method_config": strict_json(meta.method_config, what="method_config") if meta.method_config else None,
        "calibration": _data_line(meta.calibration, "not recorded (or none used)."),
        "recovery": _data_line(meta.recovery, "none: this is a one-shot prune without training."),
        "eval_rows": _eval_rows(meta.evaluations),
        "final_stage": _final_stage(meta.evaluations),
        "load": load_instructions(config, repo_id),
        "llama_cpp": llama_cpp_instructions(config, repo_id),
        "command": redact(meta.command),
        "recipe": redact(meta.recipe.strip()) if meta.recipe else None,
        "notes": meta.notes,
        "licence": (f"The base model's licence applies: {meta.base_model_license}."
                    if meta.base_model_license else "The base model's licence was not recorded; check it before use."),
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())) or "not recorded",
    }
    return ModelCard.from_template(card_data(meta, plan), template_str=template(), r=r)


def check_card(folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise CardExistsError when writing the card of `folder` would replace a README.md (or per-layer picture) that
    hf-prune did not write or that was edited since, unless `overwrite`. Cheap: run it before any work."""
    folder = Path(folder)
    if overwrite:
        return
    for name in (CARD_FILENAME, PICTURE_FILENAME):
        path = folder / name
        if (path.exists() or path.is_symlink()) and not is_own_file(folder, name):
            raise CardExistsError(
                f"{path} was not written by hf-prune, or was edited since hf-prune wrote it; it is kept as it is. "
                "Pass --overwrite-card (overwrite=True in Python) to replace it with the generated card, or move it "
                "away first")


def write_card(folder: str | os.PathLike, repo_id: str | None = None, *, overwrite: bool = False) -> Path:
    """Render the card of an export folder into README.md (and the per-layer PNG next to it). Returns the README
    path. Both files are replaced atomically, and only when hf-prune wrote them and nobody edited them since (the
    folder's marker says so) or with `overwrite=True`; otherwise CardExistsError is raised and nothing is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {str(folder)!r} does not exist")
    check_card(folder, overwrite=overwrite)
    meta = load_metadata(folder)
    if not (folder / METADATA_FILENAME).is_file():
        logger.warning("%s has no %s: the card will only describe the saved config", folder, METADATA_FILENAME)
    plan = PrunePlan.load(folder / PLAN_FILENAME) if (folder / PLAN_FILENAME).is_file() else None
    config = _read_json(folder / "config.json")
    card = render_card(folder, repo_id=repo_id, picture=PICTURE_FILENAME)  # render first: a failure writes nothing
    picture = None
    fd, tmp_png = tempfile.mkstemp(prefix=f".{PICTURE_FILENAME}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if plot_layers(meta, plan, tmp_png, config) is not None:
            os.chmod(tmp_png, 0o644)
            os.replace(tmp_png, folder / PICTURE_FILENAME)
            picture = PICTURE_FILENAME
    finally:
        if os.path.exists(tmp_png):
            os.unlink(tmp_png)
    if picture is None:
        card = render_card(folder, repo_id=repo_id, picture=None)
    path = folder / CARD_FILENAME
    write_atomic(path, str(card).encode("utf-8"))
    record_written(folder, [CARD_FILENAME] + ([PICTURE_FILENAME] if picture else []))
    return path
