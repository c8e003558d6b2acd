"""Knowledge distillation as a callback: a LightningModule's training loss learns from a teacher's soft targets.

For compressed students (a pruned or fake-quantized copy of the teacher) the teacher's probabilities carry
what the labels do not: which wrong classes are close.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_hybridcomp._validation import expect_ratio, is_number

__all__ = ["KnowledgeDistillation", "soft_target_loss"]


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Hinton's soft-target loss: :math:`T^2 \, \mathrm{KL}(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T))`.

    Averaged over the batch. The :math:`T^2` keeps its gradients on the scale of the hard-label loss's
    whatever the temperature (Hinton et al., 2015).

    Example::

        >>> s = torch.tensor([[2.0, 0.0]])
        >>> round(float(soft_target_loss(s, s, temperature=4.0)), 6)  # identical logits: nothing to learn
        0.0
        >>> float(soft_target_loss(s, torch.tensor([[0.0, 2.0]]), temperature=1.0)) > 0
        True
    """
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class _Call(NamedTuple):
    """One forward call of the student: its input tensor and all its arguments."""

    inputs: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def forward_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The input tensor of a forward call: its first positional argument, or its one tensor keyword argument.

    Example::

        >>> x = torch.zeros(2, 3)
        >>> forward_input((x,), {}) is x, forward_input((), {"image": x, "mask": None}) is x
        (True, True)
        >>> forward_input((), {"a": x, "b": x}) is None
        True
    """
    if args:
        return args[0] if isinstance(args[0], Tensor) else None
    tensors = [value for value in kwargs.values() if isinstance(value, Tensor)]
    return tensors[0] if len(tensors) == 1 else None


class KnowledgeDistillation(Callback):
    """Trains any LightningModule on ``(1 - alpha) * its loss + alpha * soft_target_loss`` from a teacher.

    The student's logits are what the module's ``forward`` returns inside ``training_step`` (the usual
    ``self(x)``); the teacher, frozen in eval mode, sees the same inputs. The module's code does not
    change: for the duration of ``fit`` the callback wraps its ``training_step`` and mixes the soft-target
    loss into the loss it returns (a tensor, or a dict's ``"loss"``), so gradient accumulation, mixed
    precision and DDP treat the sum as they treat the module's own loss. Goes with ``StructuredPruning``
    and ``QuantizationAwareTraining`` (their student changes shape or turns fake-quant; the teacher does
    not). Logs ``distillation/soft_target_loss``. Holds no state: a resumed fit distills the same way.

    Args:
        teacher: the teacher: an artifact file (``.pt2``, :func:`~lightning_hybridcomp.artifacts.save_artifact`;
            the pipeline's ``baseline/model.pt2``), loaded now, or an ``nn.Module`` (frozen and put in eval mode
            at the start of ``fit``).
        alpha: weight of the soft-target loss, in ``(0, 1]``.
        temperature: softmax temperature of both distributions, > 0 (2-4 is usual; 1 is plain probabilities).

    Raises:
        ValueError: for ``alpha`` outside ``(0, 1]``, a non-positive ``temperature``, or an artifact that does
            not load (:func:`~lightning_hybridcomp.artifacts.load_artifact` says why); at the first training
            step, when ``training_step`` calls no ``forward`` or the teacher's logits have another shape.
        TypeError: if ``teacher`` is neither a path nor an ``nn.Module``.
        RuntimeError: at the start of ``fit``, for a module with manual optimization (its loss is not returned).

    Example::

        >>> teacher = nn.Linear(4, 3)
        >>> cb = KnowledgeDistillation(teacher, alpha=0.7, temperature=4.0)
        >>> cb.alpha, cb.temperature
        (0.7, 4.0)
    """

    def __init__(
        self, teacher: str | os.PathLike[str] | nn.Module, alpha: float = 0.5, temperature: float = 4.0
    ) -> None:
        expect_ratio(alpha, "alpha", hint="1 trains on the teacher's soft targets alone.")
        if not is_number(temperature) or temperature <= 0:
            raise ValueError(f"Expected `temperature` to be a positive number, got {temperature!r}.")
        if isinstance(teacher, (str, os.PathLike)):
            from lightning_hybridcomp.artifacts import load_artifact

            self.teacher: nn.Module = load_artifact(Path(teacher)).module
        elif isinstance(teacher, nn.Module):
            self.teacher = teacher
        else:
            raise TypeError(
                f"Expected `teacher` to be an artifact path (.pt2) or an nn.Module, got {type(teacher).__name__}."
            )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self._captured: list[tuple[_Call, Tensor]] | None = None
        self._hook: RemovableHandle | None = None
        self._wrapped: pl.LightningModule | None = None

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_automatic_optimization(pl_module)  # before training, as far as it is known here

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_automatic_optimization(pl_module)  # again: the module's own `setup` may have switched it
        self.teacher.to(pl_module.device)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._install(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()  # a failed fit leaves the module's own training_step too

    # ------------------------------------------------------------------ wrapping training_step

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._captured = []
            try:
                out = original(*args, **kwargs)
            finally:
                captured, self._captured = self._captured, None
            return self._mix(pl_module, out, captured)

        # An instance attribute: Lightning (and DDP's wrapper) look `training_step` up on the module.
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._hook = pl_module.register_forward_hook(self._capture, with_kwargs=True)
        self._wrapped = pl_module

    def _uninstall(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._captured is None or not isinstance(output, Tensor):
            return
        inputs = forward_input(args, kwargs)
        if inputs is not None:
            self._captured.append((_Call(inputs, args, kwargs), output))

    def _teacher_logits(self, call: _Call) -> Any:
        """The teacher called as the student's forward was, when its forward takes those arguments (a copy of
        the student's module), else on the input tensor alone (a network or a ``.pt2`` program)."""
        try:
            inspect.signature(self.teacher.forward).bind(*call.args, **call.kwargs)
        except (TypeError, ValueError):
            return self.teacher(call.inputs)
        return self.teacher(*call.args, **call.kwargs)

    def _mix(self, pl_module: pl.LightningModule, out: Any, captured: list[tuple[_Call, Tensor]]) -> Any:
        loss = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(loss, Tensor):
            return out  # a skipped step (None): nothing to mix into
        if not captured:
            raise ValueError(
                f"KnowledgeDistillation: {type(pl_module).__name__}.training_step called no forward of the"
                " module with one input tensor (positional, or a single tensor keyword such as"
                " `self(image=x)`) that returned a tensor, so there are no student logits to distill into;"
                " compute the logits with `self(x)`."
            )
        terms = []
        for call, student in captured:
            with torch.no_grad():
                teacher = self._teacher_logits(call)
            if not isinstance(teacher, Tensor) or teacher.shape != student.shape:
                got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
                raise ValueError(
                    f"KnowledgeDistillation: expected the teacher's logits to have the student's shape"
                    f" {tuple(student.shape)}, got {got}."
                )
            terms.append(soft_target_loss(student, teacher, self.temperature))
        soft = torch.stack(terms).mean()
        pl_module.log(
            "distillation/soft_target_loss", soft.detach(), on_step=False, on_epoch=True, sync_dist=True
        )
        mixed = (1 - self.alpha) * loss + self.alpha * soft.to(loss.dtype)
        return {**out, "loss": mixed} if isinstance(out, dict) else mixed


def _check_automatic_optimization(pl_module: pl.LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise ValueError(
            "KnowledgeDistillation mixes its loss into the loss `training_step` returns, which manual"
            " optimization does not use; add `soft_target_loss(student_logits, teacher_logits, T)` to"
            " your own loss instead."
        )
