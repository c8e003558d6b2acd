"""The argument checks of ``MoELightningModule``: each bad value gets a message naming it, before anything is built."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_hybridcomp._validation import expect_classes, expect_int, is_int, is_number
from lightning_hybridcomp.moe.experts import EXPERT_FORMATS

__all__ = [
    "ASSIGNMENT_TARGETS",
    "check_expert_classes",
    "check_expert_count",
    "check_moe_arguments",
    "check_top_k",
]

ASSIGNMENT_TARGETS = ("hard", "soft", "oracle", "classes")


def check_expert_count(value: Any, name: str, num_experts: int | None) -> None:
    """An integer in ``[1, num_experts]`` (``>= 1`` while the number of experts is not known)."""
    if num_experts is None:
        expect_int(value, name, low=1)
    elif not is_int(value) or not 1 <= value <= num_experts:
        raise ValueError(f"Expected `{name}` to be an integer in [1, {num_experts}], got {value!r}.")


def check_top_k(top_k: Any, eval_top_k: Any, num_experts: int | None) -> None:
    """``top_k`` and (unless ``None``) ``eval_top_k`` within ``[1, num_experts]``."""
    check_expert_count(top_k, "top_k", num_experts)
    if eval_top_k is not None:
        check_expert_count(eval_top_k, "eval_top_k", num_experts)


def check_expert_classes(
    expert_classes: Any, assignment_target: Any, num_experts: int | None, num_classes: int | None = None
) -> list[list[int]] | None:
    """``expert_classes`` as lists of class indices, one per expert (``None`` stays ``None``).

    Given exactly when ``assignment_target="classes"``; its length is checked once the number of experts is
    known, its indices once the number of classes is.
    """
    if assignment_target != "classes":
        if expert_classes is not None:
            raise ValueError(
                "Expected `expert_classes` only with assignment_target='classes', which routes each sample to"
                f" the experts of its class; got assignment_target={assignment_target!r}."
            )
        return None
    if (
        expert_classes is None
        or isinstance(expert_classes, (str, bytes))
        or not isinstance(expert_classes, Sequence)
    ):
        raise ValueError(
            "Expected `expert_classes` with assignment_target='classes': one list of class indices per expert"
            f" (the classes it specialises in, e.g. its data emphasis), got {expert_classes!r}."
        )
    classes = [expect_classes(c, f"expert_classes[{i}]") for i, c in enumerate(expert_classes)]
    if num_experts is not None and len(classes) != num_experts:
        raise ValueError(
            f"Expected `expert_classes` to hold one list per expert ({num_experts}), got {len(classes)}."
        )
    if num_classes is not None:
        outside = sorted({c for group in classes for c in group if c >= num_classes})
        if outside:
            raise ValueError(
                f"Expected `expert_classes` to name classes below {num_classes} (the experts' class count),"
                f" got {outside}."
            )
    return classes


def check_moe_arguments(
    experts: Any,
    *,
    top_k: Any,
    eval_top_k: Any,
    coefficients: Mapping[str, Any],
    learning_rate: Any,
    expert_learning_rate: Any,
    capacity_factor: Any,
    input_shape: Any,
    assignment_target: Any = "hard",
    expert_classes: Any = None,
) -> int | None:
    """Check the constructor's plain arguments; returns the number of experts (``None`` without experts).

    Raises:
        TypeError: if ``experts`` is not a list.
        ValueError: naming the first argument out of range.
    """
    if experts is not None and (
        isinstance(experts, (str, os.PathLike, nn.Module)) or not isinstance(experts, Sequence)
    ):
        raise TypeError(
            f"Expected `experts` to be a list of experts ({EXPERT_FORMATS}), got {type(experts).__name__}."
        )
    if experts is not None and len(experts) < 2:
        raise ValueError(
            f"Expected `experts` to hold at least two experts, got {len(experts)}. A single model needs no gate."
        )
    num_experts = None if experts is None else len(experts)
    check_top_k(top_k, eval_top_k, num_experts)
    for name, value in coefficients.items():
        if not is_number(value) or not value >= 0 or math.isinf(value):
            raise ValueError(f"Expected `{name}` to be a non-negative finite float, got {value!r}.")
    if not (is_number(learning_rate) and learning_rate > 0):
        raise ValueError(f"Expected `learning_rate` to be a positive float, got {learning_rate!r}.")
    if expert_learning_rate is not None and not (
        is_number(expert_learning_rate) and expert_learning_rate > 0
    ):
        raise ValueError(
            "Expected `expert_learning_rate` to be a positive float or None (a tenth of `learning_rate`),"
            f" got {expert_learning_rate!r}."
        )
    if capacity_factor is not None and not (is_number(capacity_factor) and capacity_factor > 0):
        raise ValueError(
            f"Expected `capacity_factor` to be a positive float or None (no limit), got {capacity_factor!r}."
        )
    if input_shape is not None and (
        not isinstance(input_shape, Sequence)
        or not input_shape
        or not all(is_int(s) and s > 0 for s in input_shape)
    ):
        raise ValueError(
            "Expected `input_shape` to be a list of positive integers without the batch dimension, e.g."
            f" [1, 16, 16], got {input_shape!r}."
        )
    if not isinstance(assignment_target, str) or assignment_target not in ASSIGNMENT_TARGETS:
        raise ValueError(
            f"Expected `assignment_target` to be one of {ASSIGNMENT_TARGETS}, got {assignment_target!r}."
        )
    check_expert_classes(expert_classes, assignment_target, num_experts)
    return num_experts
