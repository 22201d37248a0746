"""Argument checks shared by every public constructor and function (pure Python, no torch).

Each check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of
range, and its message names the argument, the value given and what is allowed::

    lr=-0.1 is invalid: expected a finite number > 0

Checks run once, where a value enters the library (a constructor, a public function, a
Trainer's ``setup``), never on the per-step path.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = [
    "check_array",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_number",
    "check_numbers",
    "check_optional",
    "fail",
]


def fail(name: str, value: Any, expected: str, error: type = ValueError) -> None:
    """Raise ``error`` saying ``name=value is invalid: expected ...``."""
    raise error(f"{name}={value!r} is invalid: expected {expected}")


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _within(lo: float, hi: float, low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> bool:
    """Whether the values from ``lo`` to ``hi`` lie within the bounds."""
    if low is not None and (lo < low or (low_open and lo == low)):
        return False
    return not (high is not None and (hi > high or (high_open and hi == high)))


def _as_real(value: Any) -> Optional[float]:
    """The value as a float if it is one real number (a 0-d tensor or numpy scalar too), else None."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    return None


def check_number(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    nan_ok: bool = False,
) -> float:
    """A real number (not a bool) in the given range; returns it as a ``float``.

    ``finite=False`` also accepts inf (when in range); ``nan_ok=True`` accepts NaN, for an
    argument where NaN means "not known yet".

    Examples:
        >>> check_number("lr", 0.1, low=0, low_open=True)
        0.1
        >>> check_number("lr", -1.0, low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: lr=-1.0 is invalid: expected a finite number > 0
    """
    kind = type(value)  # the common case first: no isinstance chain, no message built
    x = float(value) if kind is float or kind is int else _as_real(value)
    if x is not None:
        if x != x:  # NaN
            if nan_ok:
                return x
        elif (not finite or x - x == 0) and _within(x, x, low, high, low_open, high_open):  # x - x: NaN for inf
            return x
    bounds = _range_text(low, high, low_open, high_open)
    expected = ("a finite number" if finite else "a number (inf allowed)") + (f" {bounds}" if bounds else "")
    if nan_ok:
        expected += " or NaN (not known yet)"
    fail(name, value, expected, TypeError if x is None else ValueError)
    raise AssertionError  # unreachable: fail raises


def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """A whole number (an ``int``, not a bool, or an integral float) in ``[low, high]``.

    Examples:
        >>> check_int("k", 2, low=2)
        2
    """
    if type(value) is int and (low is None or value >= low) and (high is None or value <= high):
        return value  # the common case: no message built
    bounds = _range_text(low, high, False, False)
    expected = "a whole number" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, value, expected, TypeError)
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(float(value)) and float(value).is_integer()):
            fail(name, value, expected)
    x = int(value)
    if (low is not None and x < low) or (high is not None and x > high):
        fail(name, value, expected)
    return x


def check_numbers(
    name: str, values: Any, *, min_len: int = 1, length: Optional[int] = None, **bounds: Any
) -> list[float]:
    """A sequence of numbers, each as :func:`check_number` with ``bounds``; returns a list.

    Examples:
        >>> check_numbers("batch_sizes", [32, 64], low=0, low_open=True)
        [32.0, 64.0]
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) and not hasattr(values, "tolist"):
        fail(name, values, "a sequence of numbers", TypeError)
    items = values.reshape(-1).tolist() if hasattr(values, "reshape") and hasattr(values, "tolist") else list(values)
    if length is not None and len(items) != length:
        fail(name, values, f"{length} numbers, got {len(items)}")
    if len(items) < min_len:
        fail(name, values, f"at least {min_len} number{'s' if min_len > 1 else ''}")
    return [check_number(f"{name}[{i}]", v, **bounds) for i, v in enumerate(items)]


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0, 1 or a string).

    Examples:
        >>> check_bool("per_layer", "no")
        Traceback (most recent call last):
        ...
        TypeError: per_layer='no' is invalid: expected True or False
    """
    if not isinstance(value, bool):
        fail(name, value, "True or False", TypeError)
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``.

    Examples:
        >>> check_choice("rule", "adam", ("sgd", "adam"))
        'adam'
    """
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """A callable (a function, a class, an object with ``__call__``)."""
    if not callable(value):
        fail(name, value, "a callable", TypeError)
    return value


def check_optional(check: Callable[..., Any], name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``None``, or what ``check(name, value, ...)`` accepts."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_array(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    min_numel: int = 0,
    ndim: Optional[int] = None,
    finite: bool = True,
) -> Any:
    """A number, or a tensor (or numpy array) of numbers each in the given range; returns it.

    Values are checked where that costs no device synchronization: a Python number, or an array
    in host memory. An array on an accelerator is checked for its shape only (a check of its
    values would stall the device on a hot path). ``finite=False`` lets NaN and inf through
    (for inputs whose non-finite values a running statistic refuses and counts by itself).

    Examples:
        >>> import torch
        >>> check_array("batch", torch.tensor([16.0, -4.0]), low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: batch=tensor([16., -4.]) is invalid: expected finite numbers > 0
    """
    if _as_real(value) is not None:
        if ndim not in (None, 0) or min_numel > 1:
            fail(name, value, f"an array of {ndim}-d" if ndim else f"at least {min_numel} numbers", TypeError)
        if not finite and not math.isfinite(float(value)):
            return value
        return check_number(name, value, low=low, high=high, low_open=low_open, high_open=high_open)
    if isinstance(value, (str, bytes)) or not (hasattr(value, "shape") and hasattr(value, "dtype")):
        fail(name, value, "a number or a tensor of numbers", TypeError)
    if ndim is not None and len(value.shape) != ndim:
        fail(name, value, f"a {ndim}-d tensor, got shape {tuple(value.shape)}")
    numel = 1
    for n in value.shape:
        numel *= int(n)
    if numel < min_numel:
        fail(name, value, f"at least {min_numel} numbers, got {numel}")
    if "bool" in str(value.dtype) or "complex" in str(value.dtype):
        fail(name, value, "real numbers", TypeError)
    device = getattr(value, "device", "cpu")
    if numel == 0 or getattr(device, "type", device) != "cpu":
        return value
    flat = value.reshape(-1)
    bounds = _range_text(low, high, low_open, high_open)
    expected = "finite numbers" + (f" {bounds}" if bounds else "")
    if not finite:
        if low is None and high is None:
            return value
        flat = flat[(flat == flat) & (flat != math.inf) & (flat != -math.inf)]
        if flat.shape[0] == 0:
            return value
    lo, hi = float(flat.min()), float(flat.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or bool((flat != flat).any()):
        fail(name, value, expected)
    if not _within(lo, hi, low, high, low_open, high_open):
        fail(name, value, expected)
    return value
