"""EvalCallback: evaluate between pruning stages inside a Trainer run, log the numbers, keep them for the card.

    cb = EvalCallback(EvalConfig(perplexity_files=["wiki_en.txt"], mc_tasks=["social_iqa.json"], mc_limit=500),
                      tokenizer=tokenizer)
    trainer = Trainer(..., callbacks=[prune_callback, cb])
    cb.bind(trainer)                 # optional: log through trainer.log (reporters see the numbers)
    trainer.train()
    meta.evaluations += cb.records   # -> hf_prune.export.save(..., metadata=meta) puts them in the card

When it evaluates: at the start of training ("base"), whenever the model's structure changed since the last
evaluation (a pruning stage happened: "stage k: pruned"), and at the end of training ("stage k: recovered", or
"trained" when nothing was pruned). A structure change is detected from the parameter shapes, so the callback works
with any pruning callback, in any order, and with pruning done between `train()` calls.

Every process evaluates (the same numbers on each; required when the model is sharded); only the main process logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import TrainerCallback

from hf_prune.arch import unwrap_model
from hf_prune.export import EvalRecord, ExportMetadata, measure

__all__ = ["EvalCallback", "EvalConfig"]

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What EvalCallback measures and when."""

    perplexity_files: list[str] = field(default_factory=list, metadata={
        "help": "Text files (.txt, or .jsonl with a 'text' field) scored for perplexity, one result per file."})
    perplexity_window: int = field(default=512, metadata={"help": "Tokens per non-overlapping perplexity window."})
    perplexity_max_tokens: int | None = field(default=None, metadata={
        "help": "Score only the first N tokens of each perplexity text (None: all)."})
    mc_tasks: list[str] = field(default_factory=list, metadata={
        "help": "BIG-bench-style multiple-choice JSON files scored with hf_prune.evaluate.multiple_choice."})
    mc_limit: int | None = field(default=None, metadata={"help": "First N examples of each multiple-choice task."})
    lm_eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "Tasks for lm-eval: BIG-bench JSON files, lm-eval YAML files or lm-eval task names."})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "First N examples of each lm-eval task."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass during evaluation."})
    at_train_begin: bool = field(default=True, metadata={"help": "Evaluate when training starts."})
    after_prune: bool = field(default=True, metadata={"help": "Evaluate as soon as a structure change is seen."})
    at_train_end: bool = field(default=True, metadata={"help": "Evaluate when training ends."})
    prefix: str = field(default="eval", metadata={"help": "Prefix of the logged keys: '<prefix>/<task>/<metric>'."})


def _signature(model: nn.Module) -> tuple:
    return tuple(tuple(p.shape) for p in unwrap_model(model).parameters())


class EvalCallback(TrainerCallback):
    """Evaluates perplexity / multiple choice / lm-eval tasks between pruning stages (see the module docstring)."""

    def __init__(self, config: EvalConfig | None = None, *, tokenizer: Any = None,
                 perplexity_texts: dict[str, Any] | None = None, trainer: Any = None, **config_kwargs: Any):
        if config is not None and config_kwargs:
            raise ValueError(f"pass either config or keyword options, not both (got {sorted(config_kwargs)})")
        self.config = config or EvalConfig(**config_kwargs)
        if self.config.perplexity_window < 2:
            raise ValueError(f"perplexity_window={self.config.perplexity_window} is not valid; it must be >= 2")
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.records: list[EvalRecord] = []
        self._texts: dict[str, Any] = dict(perplexity_texts or {})
        if self.config.perplexity_files:
            from pathlib import Path

            from hf_prune.data import read_texts

            for f in self.config.perplexity_files:
                self._texts[Path(f).stem] = read_texts(f)
        if not (self._texts or self.config.mc_tasks or self.config.lm_eval_tasks):
            raise ValueError("EvalCallback has nothing to measure: give perplexity_files/perplexity_texts, mc_tasks "
                             "or lm_eval_tasks")
        self._last_signature: tuple | None = None
        self._last_step: int | None = None
        self._stage = 0

    def bind(self, trainer: Any) -> "EvalCallback":
        """Log through `trainer.log` (so reporters such as TensorBoard see the numbers)."""
        self.trainer = trainer
        return self

    # ---- the measurement ------------------------------------------------------------------------------------------
    def _evaluate(self, label: str, args, state, model: nn.Module | None, tokenizer: Any) -> None:
        if model is None:
            return
        tok = self.tokenizer or tokenizer
        if tok is None:
            raise ValueError("EvalCallback needs a tokenizer: pass tokenizer=... or give the Trainer a "
                             "processing_class")
        model = unwrap_model(model)
        c = self.config
        records = measure(model, tok, stage=label, perplexity=self._texts, window=c.perplexity_window,
                          max_tokens=c.perplexity_max_tokens, mc_tasks=c.mc_tasks, mc_limit=c.mc_limit,
                          lm_eval_tasks=c.lm_eval_tasks, lm_eval_limit=c.lm_eval_limit, batch_size=c.batch_size,
                          step=state.global_step)
        self.records.extend(records)
        self._last_signature = _signature(model)
        self._last_step = state.global_step
        logs = {f"{c.prefix}/{r.task}/{r.metric}": r.value for r in records}
        logs[f"{c.prefix}/stage"] = float(self._stage)
        logs[f"{c.prefix}/num_parameters"] = float(sum(p.numel() for p in model.parameters()))
        if state.is_world_process_zero:
            logger.info("evaluation at step %d (%s): %s", state.global_step, label,
                        ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step, "epoch": state.epoch})

    def _check_change(self, args, state, model, tokenizer) -> None:
        if model is None or self._last_signature is None or not self.config.after_prune:
            return
        if _signature(model) != self._last_signature:
            self._stage += 1
            self._evaluate(f"stage {self._stage}: pruned", args, state, model, tokenizer)

    # ---- Trainer events -------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            return
        if self._last_signature is None:
            if self.config.at_train_begin:
                self._evaluate("base", args, state, model, processing_class)
            else:
                self._last_signature = _signature(model)
        else:  # a later train() call (prune between train() calls): evaluate if the structure changed
            self._check_change(args, state, model, processing_class)

    def on_epoch_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._check_change(args, state, model, processing_class)

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._check_change(args, state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._check_change(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._check_change(args, state, model, processing_class)
        if not self.config.at_train_end or model is None or state.global_step == self._last_step:
            return  # nothing trained since the last evaluation
        self._evaluate(f"stage {self._stage}: recovered" if self._stage else "trained", args, state, model,
                       processing_class)

    # ---- for the card ---------------------------------------------------------------------------------------------
    def add_to(self, metadata: ExportMetadata) -> ExportMetadata:
        """Append the recorded evaluations to `metadata` (for hf_prune.export.save) and return it."""
        metadata.evaluations.extend(self.records)
        return metadata
