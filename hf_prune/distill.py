"""Knowledge distillation from a frozen teacher, as a loss that plugs into `transformers.Trainer` unchanged.

Loss per predicted token t (positions whose shifted label is not `ignore_index`, or, without labels, whose next
token is real according to the attention mask), with temperature T (Hinton et al., 2015):

    KD_t = T^2 * KL( softmax(z_teacher[t] / T) || softmax(z_student[t] / T) )
    CE_t = -log softmax(z_student[t])[label_{t+1}]
    loss = (alpha * sum_t KD_t + (1 - alpha) * sum_t CE_t) / N

N is `num_items_in_batch` when the Trainer passes it (tokens over the whole accumulated batch, so gradient
accumulation and `average_tokens_across_devices` scale exactly as for the Trainer's own causal-LM loss), else the
number of predicted tokens in this batch.

How it plugs in without forking the Trainer: `Trainer(compute_loss_func=...)` is called as
`compute_loss_func(outputs, labels, num_items_in_batch=...)` and never sees the model inputs the teacher needs.
`attach(student)` therefore registers a forward pre-hook on the student's decoder backbone (the module that the
causal LM, a PEFT wrapper and DDP all call with `input_ids`/`attention_mask`/`position_ids`); the hook keeps a
reference to the latest inputs, and the loss runs the teacher on them. The backbone survives layer surgery and PEFT
merge/re-wrap, so one attachment lasts for a whole pruning run.

    kd = DistillationLoss(teacher, temperature=2.0, alpha=0.5).attach(student)
    trainer = Trainer(model=student, args=args, train_dataset=ds, compute_loss_func=kd)

The teacher is frozen (requires_grad False), kept in eval mode, moved to the student's device on `attach`, and run
under `torch.no_grad()`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .arch import get_adapter

__all__ = ["DistillationLoss", "kd_token_losses"]

TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids")


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) for each row of (N, vocab) logits, in float32."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * (t * t)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits


class DistillationLoss:
    """Trainer-compatible KD loss: `loss = (alpha * T^2 KL(teacher || student) + (1 - alpha) * CE) / N`.

    Args:
        teacher: the frozen reference model (e.g. a copy of the model before pruning). Same vocabulary as the student.
        temperature: softmax temperature T (> 0); the KL term is scaled by T^2.
        alpha: weight of the KD term in [0, 1]; 1 = pure distillation, 0 = plain cross-entropy.
        student: attach to this model right away (else call `attach` before training).
        ignore_index: label value of positions that are not predicted (padding, prompt tokens).
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 1.0,
        student: nn.Module | None = None,
        ignore_index: int = -100,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not valid; use a positive number (2.0 is common)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not valid; use a weight in [0, 1] (1 = pure distillation)")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ignore_index = ignore_index
        self._inputs: dict[str, torch.Tensor] | None = None
        self._handle = None
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if student is not None:
            self.attach(student)

    # ----- wiring ------------------------------------------------------------------------------------------------
    def attach(self, student: nn.Module) -> "DistillationLoss":
        """Capture the student's inputs on every forward and move the teacher to the student's device."""
        self.detach()
        backbone = get_adapter(student).backbone
        self._handle = backbone.register_forward_pre_hook(self._capture, with_kwargs=True)
        device = get_adapter(student).embed_tokens.weight.device
        self.teacher.to(device)
        return self

    def detach(self) -> None:
        """Remove the input hook (the loss can no longer be computed until `attach` is called again)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._inputs = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = {k: kwargs[k] for k in TEACHER_INPUTS if kwargs.get(k) is not None}
        if "input_ids" not in inputs and args and isinstance(args[0], torch.Tensor):
            inputs["input_ids"] = args[0]
        self._inputs = inputs

    # ----- the loss ----------------------------------------------------------------------------------------------
    def _teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.teacher.eval()
        with torch.no_grad():
            return _logits(self.teacher(**inputs, use_cache=False))

    def predicted_mask(self, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       shape: torch.Size) -> torch.Tensor:
        """(batch, tokens - 1) bool: which positions' next token is predicted."""
        if labels is not None:
            return labels[:, 1:] != self.ignore_index
        if attention_mask is not None:
            m = attention_mask.bool()
            return m[:, 1:] & m[:, :-1]
        return torch.ones(shape[0], shape[1] - 1, dtype=torch.bool)

    def __call__(self, outputs: Any, labels: torch.Tensor | None = None,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError(
                "DistillationLoss has not seen the student's inputs: call `.attach(student)` (or pass student=) "
                "before training, so the teacher can be run on the same batch"
            )
        inputs, self._inputs = self._inputs, None
        student = _logits(outputs)
        ids = inputs.get("input_ids")
        if ids is None:
            raise RuntimeError("DistillationLoss needs input_ids; the student was called with inputs_embeds only")
        if tuple(ids.shape) != tuple(student.shape[:2]):
            raise RuntimeError(
                f"captured input_ids {tuple(ids.shape)} do not match the student's logits {tuple(student.shape[:2])}: "
                "the loss must be called right after the student's forward on the same batch"
            )
        valid = self.predicted_mask(labels, inputs.get("attention_mask"), student.shape).to(student.device)
        s = student[:, :-1][valid]
        total = student.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            t = self._teacher_logits(inputs)
            if t.shape[-1] != student.shape[-1]:
                raise ValueError(f"teacher vocabulary {t.shape[-1]} differs from the student's {student.shape[-1]}")
            total = total + self.alpha * kd_token_losses(s, t[:, :-1][valid].to(s.device), self.temperature).sum()
        if self.alpha < 1:
            if labels is None:
                raise ValueError(f"alpha={self.alpha} mixes in cross-entropy, which needs labels; none were given")
            target = labels[:, 1:][valid].to(s.device)
            total = total + (1 - self.alpha) * F.cross_entropy(s.float(), target, reduction="sum")
        if num_items_in_batch is None:
            denom = valid.sum().clamp_min(1)
        else:
            denom = torch.as_tensor(num_items_in_batch, device=total.device).clamp_min(1)
        return total / denom
