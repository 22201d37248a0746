"""Bias-corrected exponential moving averages that refuse non-finite input."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_number

__all__ = ["BiasCorrectedEMA"]


class BiasCorrectedEMA:
    r"""An exponential moving average with Adam-style bias correction.

    .. math::
        s_t = \beta s_{t-1} + (1 - \beta) x_t, \qquad \hat{s}_t = \frac{s_t}{1 - \beta^t}

    The average of a tensor of any shape (a scalar, or one value per layer) is kept in float64.
    An update whose input holds a non-finite value is refused whole and counted, so a single
    overflowing step never poisons the average.

    Args:
        decay: :math:`\beta` in ``[0, 1)``. ``0`` keeps only the last value.

    Examples:
        >>> ema = BiasCorrectedEMA(0.9)
        >>> ema.update(torch.tensor(2.0))
        True
        >>> float(ema.compute())
        2.0
    """

    def __init__(self, decay: float) -> None:
        self.decay = check_number("decay", decay, low=0, high=1, high_open=True)
        self.count = 0
        self.rejected = 0
        self._sum: Tensor | float | None = None  # a Python float while only update_float has fed it

    def _tensor_sum(self) -> Tensor | None:
        """The sum as a tensor, kept as one from now on (for the tensor updates)."""
        if isinstance(self._sum, float):
            self._sum = torch.tensor(self._sum, dtype=torch.float64)
        return self._sum

    def update_float(self, value: float) -> bool:
        """:meth:`update` for one Python number, in plain float arithmetic: no tensor is made, so
        a statistic fed once per step costs microseconds, and it gives the same bits as
        :meth:`update_many` of a one-element tensor. Only for an average of scalars."""
        value = check_number("value", value, finite=False, nan_ok=True)
        if not math.isfinite(value):
            self.rejected += 1
            return False
        if isinstance(self._sum, Tensor):
            if self._sum.dim() != 0:
                raise ValueError(f"value: a number, but this average holds a tensor of shape {tuple(self._sum.shape)}")
            self._sum = float(self._sum)
        # s d + (1 - d) x, in the order update_many computes one row
        self._sum = (0.0 if self._sum is None else self._sum) * self.decay + (1.0 - self.decay) * value
        self.count += 1
        return True

    def update(self, value: Tensor, checked: bool = False) -> bool:
        """Fold ``value`` in; return ``False`` (and change nothing) if it is not finite.

        ``checked=True`` skips the finiteness test (and its device sync) for a caller that made it."""
        value = torch.as_tensor(value).detach().to(torch.float64)
        if not checked and not bool(torch.isfinite(value).all()):
            self.rejected += 1
            return False
        self._tensor_sum()
        if self._sum is None:
            self._sum = torch.zeros_like(value)
        self._sum.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        self.count += 1
        return True

    def update_many(self, values: Tensor) -> int:
        r"""Fold in a sequence of values at once (``values[0]`` first), as that many :meth:`update`
        calls would; rows with a non-finite entry are refused and counted. Returns rows folded.

        .. math:: s \leftarrow \beta^n s + (1-\beta) \sum_{i=1}^{n} \beta^{n-i} x_i
        """
        values = torch.as_tensor(values).detach().to(torch.float64)
        if values.shape[0] == 0:
            return 0
        finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(1)
        good = values[finite]
        n = good.shape[0]
        self.rejected += values.shape[0] - n
        if n == 0:
            return 0
        self._tensor_sum()
        if self._sum is None:
            self._sum = torch.zeros_like(good[0])
        powers = torch.arange(n - 1, -1, -1, dtype=torch.float64, device=good.device)
        weights = (1.0 - self.decay) * torch.pow(torch.tensor(self.decay, dtype=torch.float64), powers)
        self._sum = self._sum * self.decay**n + (weights.view(-1, *([1] * (good.dim() - 1))) * good).sum(0)
        self.count += n
        return n

    def compute(self) -> Tensor:
        """The bias-corrected average; NaN before the first update."""
        if self._sum is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.as_tensor(self._sum, dtype=torch.float64) / (1.0 - self.decay**self.count)

    def reset(self) -> None:
        self.count = 0
        self.rejected = 0
        self._sum = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "count": self.count,
            "rejected": self.rejected,
            "sum": None if self._sum is None else torch.as_tensor(self._sum, dtype=torch.float64).clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.count = int(state["count"])
        self.rejected = int(state["rejected"])
        s = state["sum"]
        self._sum = None if s is None else torch.as_tensor(s, dtype=torch.float64).clone()
