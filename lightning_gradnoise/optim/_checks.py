"""Argument checks shared by the optimizers of this package."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from lightning_gradnoise._validate import check_number, fail

__all__ = ["check_lr", "check_params"]


def check_params(params: Any) -> list[Any]:
    """A non-empty iterable of tensors or of parameter-group dicts, as a list."""
    if params is None or isinstance(params, (Tensor, str, bytes, dict)) or not isinstance(params, Iterable):
        fail("params", params, "an iterable of tensors or of parameter-group dicts", TypeError)
    params = list(params)
    if not params:
        fail("params", params, "at least one parameter (is every parameter frozen?)")
    for i, p in enumerate(params):
        if not isinstance(p, (Tensor, dict)):
            fail(f"params[{i}]", p, "a tensor or a parameter-group dict", TypeError)
    return params


def check_lr(lr: Any) -> float:
    """A finite learning rate >= 0 (torch's own optimizers accept inf and NaN)."""
    return check_number("lr", lr, low=0)
