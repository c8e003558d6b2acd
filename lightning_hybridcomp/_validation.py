"""Argument checks with one message pattern: ``Expected `name` to be <what>, got <value>.<hint>``.

Every user-facing constructor validates eagerly with these, so that the same mistake reads the same way
wherever it is made (``ValueError`` for a value out of range, ``TypeError`` for a wrong kind of object).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

__all__ = [
    "expect_bool",
    "expect_choice",
    "expect_classes",
    "expect_int",
    "expect_names",
    "expect_ratio",
    "expect_shape",
    "is_int",
    "is_number",
]


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> TypeGuard[int]:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _hinted(hint: str) -> str:
    return f" {hint}" if hint else ""


def expect_int(value: Any, name: str, *, low: int = 0, optional: bool = False, hint: str = "") -> None:
    """An integer ``>= low`` (or ``None`` when ``optional``).

    Example::

        >>> expect_int(-1, "start_epoch")
        Traceback (most recent call last):
        ...
        ValueError: Expected `start_epoch` to be a non-negative integer, got -1.
    """
    if value is None and optional:
        return
    if not is_int(value) or value < low:
        what = ("a non-negative integer" if low == 0 else f"an integer >= {low}") + (
            " or None" if optional else ""
        )
        raise ValueError(f"Expected `{name}` to be {what}, got {value!r}.{_hinted(hint)}")


def expect_ratio(
    value: Any,
    name: str,
    *,
    closed_low: bool = False,
    closed_high: bool = True,
    optional: bool = False,
    hint: str = "",
) -> None:
    """A float in the unit interval, ``(0, 1]`` by default; the bounds' openness is set per argument."""
    if value is None and optional:
        return
    low_ok = is_number(value) and (value >= 0.0 if closed_low else value > 0.0)
    high_ok = is_number(value) and (value <= 1.0 if closed_high else value < 1.0)
    if not (low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"Expected `{name}` to be a float in {interval}, got {value!r}.{_hinted(hint)}")


def expect_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, got {value!r}.")


def expect_choice(value: Any, name: str, choices: Sequence[str], *, hint: str = "") -> str:
    """One of ``choices``, case-insensitive; returns it in lower case.

    Example::

        >>> expect_choice("L2", "importance", ["l1", "l2"])
        'l2'
    """
    if not isinstance(value, str):
        raise TypeError(
            f"Expected `{name}` to be a string, got {type(value).__name__}. Valid options: {tuple(choices)}."
        )
    key = value.lower()
    if key not in choices:
        raise ValueError(f"Expected `{name}` to be one of {tuple(choices)}, got {value!r}.{_hinted(hint)}")
    return key


def expect_classes(value: Any, name: str) -> list[int]:
    """A non-empty list of distinct class indices (integers ``>= 0``); returns a copy.

    Example::

        >>> expect_classes([3, 3], "classes")
        Traceback (most recent call last):
        ...
        ValueError: Expected `classes` to be a non-empty list of distinct class indices (integers >= 0), got [3, 3].
    """
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not value
        or any(not is_int(c) or c < 0 for c in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(
            f"Expected `{name}` to be a non-empty list of distinct class indices (integers >= 0), got {value!r}."
        )
    return [int(c) for c in value]


def expect_shape(value: Any, name: str, *, example: str = "[1, 3, 32, 32]") -> list[int] | None:
    """``None`` or a non-empty list of positive integers with the batch dimension first; returns a copy."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(is_int(s) and s > 0 for s in value):
        raise ValueError(
            f"Expected `{name}` to be a list of positive integers including the batch dimension (e.g."
            f" {example}), got {value!r}."
        )
    return [int(s) for s in value]


def expect_names(value: Any, name: str, *, example: str) -> list[str]:
    """``None`` or a list of fully qualified module names / glob patterns; returns a list."""
    if isinstance(value, str):
        raise TypeError(
            f"Expected `{name}` to be a list of fully qualified names or glob patterns, got the string"
            f" {value!r}; write [{value!r}]."
        )
    names = list(value or [])
    bad = [item for item in names if not isinstance(item, str)]
    if bad:
        raise TypeError(
            f"Expected `{name}` to be a list of fully qualified names or glob patterns (str), got"
            f" {type(bad[0]).__name__}. Write e.g. {example} instead of module objects."
        )
    return names
