"""Argument checks for values that may be a number, a list of numbers or a tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_array, fail

__all__ = ["checked_tensor"]


def checked_tensor(name: str, value: Any, **bounds: Any) -> Tensor:
    """``value`` (a number, a list of numbers or a tensor) as a float64 tensor, checked by
    :func:`~lightning_gradnoise._validate.check_array` with ``bounds``.

    Examples:
        >>> checked_tensor("batch", [16, 64], low=0, low_open=True)
        tensor([16., 64.], dtype=torch.float64)
    """
    if isinstance(value, (list, tuple)):
        try:
            value = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            fail(name, value, "a number, a list of numbers or a tensor", TypeError)
    check_array(name, value, **bounds)
    return torch.as_tensor(value, dtype=torch.float64)
