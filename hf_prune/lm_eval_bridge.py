"""Run EleutherAI's lm-evaluation-harness on an in-memory model, with task files generated on the fly.

    results = lm_eval(model, tokenizer, ["social_iqa.json", "my_task.yaml", "arc_easy"], limit=500)
    results["social_iqa"]["acc"], results["social_iqa"]["acc_norm"]

A task is one of:

- a BIG-bench-style JSON file (``{"examples": [{"input": ..., "target_scores": {choice: score}}]}``, e.g.
  ``../shared/data/mc/*.json``): converted to JSONL plus an lm-eval YAML task (``output_type: multiple_choice``) in a
  temporary directory. The context is built as `hf_prune.evaluate.multiple_choice` builds it (``task_prefix +
  example_input_prefix + input + example_output_prefix``, trailing spaces removed) and every choice with the highest
  target score counts as correct;
- an lm-eval YAML task file (its directory is added to the task search path);
- the name of a task lm-eval ships (needs its dataset, so the network or a populated datasets cache).

Scoring is lm-eval's: the log-likelihood of ``" " + choice`` given the context, ``acc`` = argmax is correct,
``acc_norm`` = argmax of log-likelihood divided by the choice's length in characters. For contexts that are
non-empty and do not end in whitespace this is exactly what `hf_prune.evaluate.multiple_choice` computes; for an
empty context lm-eval scores ``" " + choice`` after the prefix token, and for a context ending in a newline it moves
the newline into the scored continuation, where `multiple_choice` scores ``choice`` alone.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .arch import unwrap_model

__all__ = ["lm_eval", "bigbench_to_lm_eval"]

logger = logging.getLogger(__name__)

_TASK_PREFIX = "hfp_"


def _task_name(path: Path) -> str:
    return _TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_").lower()


def bigbench_to_lm_eval(json_path: str | Path, out_dir: str | Path, name: str | None = None) -> str:
    """Write `<name>.jsonl` and `<name>.yaml` (an lm-eval multiple-choice task) for a BIG-bench-style JSON task into
    `out_dir`; return the task name (default ``hfp_<file stem>``).

    Each JSONL row is ``{"context", "choices", "gold"}`` with `gold` the indices of the choices with the highest
    target score (lm-eval counts a prediction in that list as correct)."""
    from .data import load_mc_task, mc_context

    json_path, out_dir = Path(json_path), Path(out_dir)
    task = load_mc_task(json_path)
    name = name or _task_name(json_path)
    rows = []
    for ex in task["examples"]:
        choices = [str(c) for c in ex["target_scores"]]
        scores = [float(v) for v in ex["target_scores"].values()]
        best = max(scores)
        rows.append({"context": mc_context(task, ex), "choices": choices,
                     "gold": [i for i, s in enumerate(scores) if s == best]})
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "datasets_cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        # column names, not Jinja templates: the text is used as it is, braces included
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": str(json_path)},
    }
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return name


def _yaml_task_name(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        # lm-eval YAML may use tags such as !function; read only the `task:` key
        for line in f:
            m = re.match(r"^task:\s*['\"]?([^'\"#\s]+)", line)
            if m:
                return m.group(1)
    raise ValueError(f"{path} has no top-level 'task:' key; it is not an lm-eval task file")


def _metrics(raw: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


def lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Path | Sequence[str | Path],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory `model` with lm-eval's `simple_evaluate` (zero-shot by default) on `tasks`.

    Returns ``{task: {"acc": ..., "acc_norm": ..., "n": examples, ...}}`` keyed by the JSON/YAML file stem or the
    lm-eval task name; stderr entries appear when `bootstrap_iters` > 0. `limit` keeps the first `limit` examples
    of each task. The model's train/eval mode is restored afterwards.
    """
    try:
        import lm_eval as lm_eval_lib
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("hf_prune.evaluate.lm_eval needs lm-evaluation-harness: pip install 'lm_eval>=0.4.13'") from e
    if isinstance(tasks, (str, Path)):
        tasks = [tasks]
    if not tasks:
        raise ValueError("tasks is empty; pass BIG-bench JSON files, lm-eval YAML files or lm-eval task names")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} is not valid; it must be >= 1 or None")
    model = unwrap_model(model)
    with tempfile.TemporaryDirectory(prefix="hf_prune_lm_eval-") as tmp:
        names: dict[str, str] = {}  # lm-eval task name -> key in the result
        include: list[str] = [tmp]
        builtin = False
        for t in tasks:
            p = Path(t)
            if p.is_file() and p.suffix == ".json":
                name = bigbench_to_lm_eval(p, tmp)
                names[name] = p.stem
            elif p.is_file() and p.suffix in (".yaml", ".yml"):
                include.append(str(p.parent.resolve()))
                name = _yaml_task_name(p)
                names[name] = name
            elif isinstance(t, str) and not p.exists() and re.fullmatch(r"[\w.\-*]+", t):
                names[t] = t
                builtin = True
            else:
                raise ValueError(f"task {str(t)!r} is not a BIG-bench .json file, an lm-eval .yaml file or an "
                                 "lm-eval task name")
        manager = TaskManager(include_path=include, include_defaults=builtin)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` for the built-in names")
        was_training = model.training  # HFLM puts the model in eval mode
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            out = lm_eval_lib.simple_evaluate(
                model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
                log_samples=False, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for name, key in names.items():
        metrics = _metrics(out["results"].get(name, {}))
        n = (out.get("n-samples") or {}).get(name, {})
        if isinstance(n, dict) and "effective" in n:
            metrics["n"] = int(n["effective"])
        results[key] = metrics
    return results
