r"""Learning rate and steps against batch size: McCandlish et al. (2018) and the Adam "surge"
(Li et al., *Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling*).

- SGD (McCandlish Eq. 2.7): :math:`\epsilon_\text{opt}(B) = \epsilon_\max / (1 + B_\text{noise}/B)`.
- Adam-style (Surge Eq. 2): :math:`\epsilon_\text{opt}(B) = \epsilon_\max / \big(\tfrac12(\sqrt{B_\text{noise}/B} + \sqrt{B/B_\text{noise}})\big)`, peak at :math:`B = B_\text{noise}`.
- Trade-off (McCandlish Eq. 2.11, Surge Eq. 20): :math:`(S/S_\min - 1)(E/E_\min - 1) = 1`,
  :math:`B_\text{crit} = E_\min / S_\min`; from runs, :math:`1/S = -B_\text{noise}/E + 1/S_\min`
  (Surge Eq. 22), a straight-line fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_choice, check_number, fail
from lightning_gradnoise.stats._checks import checked_tensor

__all__ = [
    "RULES",
    "eps_opt_sgd",
    "eps_opt_adam",
    "eps_opt",
    "lr_scale_factor",
    "TradeoffFit",
    "fit_b_noise",
    "fit_eps_max",
    "steps_for_examples",
]

RULES = ("sgd", "adam")


def _t(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _positive(name: str, x) -> Tensor:
    return checked_tensor(name, x, low=0, low_open=True)


def eps_opt_sgd(batch, b_noise, eps_max=1.0) -> Tensor:
    r""":math:`\epsilon_\max / (1 + B_\text{noise}/B)` (McCandlish Eq. 2.7): rises monotonically.

    Examples:
        >>> float(eps_opt_sgd(100.0, 100.0, eps_max=0.2))
        0.1
    """
    return _positive("eps_max", eps_max) / (1.0 + _positive("b_noise", b_noise) / _positive("batch", batch))


def eps_opt_adam(batch, b_noise, eps_max=1.0) -> Tensor:
    r""":math:`\epsilon_\max / \big(\tfrac12(\sqrt{B_\text{noise}/B} + \sqrt{B/B_\text{noise}})\big)`
    (Surge Eq. 2): peaks at :math:`B = B_\text{noise}`, square-root scaling below it (Eq. 4).

    Examples:
        >>> float(eps_opt_adam(100.0, 100.0, eps_max=0.2))
        0.2
    """
    r = _positive("b_noise", b_noise) / _positive("batch", batch)
    return _positive("eps_max", eps_max) / (0.5 * (r.sqrt() + r.rsqrt()))


def eps_opt(rule: str, batch, b_noise, eps_max=1.0) -> Tensor:
    """The optimal learning rate under ``rule`` (``"sgd"`` or ``"adam"``)."""
    check_choice("rule", rule, RULES)
    if rule == "sgd":
        return eps_opt_sgd(batch, b_noise, eps_max)
    if rule == "adam":
        return eps_opt_adam(batch, b_noise, eps_max)
    raise ValueError(f"rule={rule!r} is invalid: expected one of {RULES}")


def lr_scale_factor(rule: str, old_batch, new_batch, b_noise) -> Tensor:
    """Multiply the learning rate by this when the batch goes from ``old_batch`` to ``new_batch``
    at a fixed :math:`B_\\text{noise}`: :math:`\\epsilon_\\text{opt}(B_2)/\\epsilon_\\text{opt}(B_1)`.

    Examples:
        >>> round(float(lr_scale_factor("adam", 16, 64, 1e6)), 3)   # B << B_noise: square root
        2.0
    """
    old, new = _positive("old_batch", old_batch), _positive("new_batch", new_batch)
    return eps_opt(rule, new, b_noise) / eps_opt(rule, old, b_noise)


@dataclass
class TradeoffFit:
    """A fit of Surge Eq. 22 to runs: :math:`1/S = -B_\\text{noise}/E + 1/S_\\min`."""

    b_noise: float
    s_min: float
    e_min: float
    r2: float

    def __post_init__(self) -> None:
        for name in ("b_noise", "s_min", "e_min"):
            setattr(self, name, check_number(name, getattr(self, name), low=0, low_open=True))
        self.r2 = check_number("r2", self.r2, high=1)

    @property
    def b_crit(self) -> float:
        """:math:`E_\\min / S_\\min` (Surge Eq. 21), equal to the fitted :math:`B_\\text{noise}`."""
        return self.e_min / self.s_min

    def steps(self, batch) -> Tensor:
        """Predicted steps at batch ``B``: :math:`S_\\min (1 + B_\\text{noise}/B)`."""
        return self.s_min * (1.0 + self.b_noise / _t(batch))

    def examples(self, batch) -> Tensor:
        """Predicted examples at batch ``B``: :math:`E_\\min (1 + B/B_\\text{noise})`."""
        return self.e_min * (1.0 + _t(batch) / self.b_noise)


def fit_b_noise(steps: Sequence[float], examples: Sequence[float]) -> TradeoffFit:
    """Least-squares line through ``(1/E, 1/S)`` of runs at several batch sizes (Surge Eq. 22).

    Args:
        steps: steps each run needed to reach the target.
        examples: examples each run used (steps x batch size).

    Examples:
        >>> b = torch.tensor([8.0, 32, 128, 512]); s = 1000 * (1 + 100 / b)
        >>> fit = fit_b_noise(s, s * b)
        >>> round(fit.b_noise), round(fit.s_min)
        (100, 1000)
    """
    s = _positive("steps", steps).reshape(-1)
    e = _positive("examples", examples).reshape(-1)
    if s.numel() < 2:
        fail("steps", steps, "at least 2 runs")
    if e.numel() != s.numel():
        fail("examples", examples, f"one value per run, as many as steps ({s.numel()})")
    x, y = 1.0 / e, 1.0 / s
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    intercept = ym - slope * xm
    if not intercept > 0 or not slope < 0:
        raise ValueError(
            f"the runs do not show a steps/examples trade-off (slope {float(slope):.3g}, intercept "
            f"{float(intercept):.3g}): include batch sizes on both sides of the critical batch size"
        )
    pred = intercept + slope * x
    r2 = 1.0 - float(((y - pred) ** 2).sum() / ((y - ym) ** 2).sum().clamp_min(1e-300))
    s_min = 1.0 / float(intercept)
    b_noise = -float(slope)
    return TradeoffFit(b_noise=b_noise, s_min=s_min, e_min=b_noise * s_min, r2=r2)


def fit_eps_max(rule: str, lrs: Sequence[float], batches: Sequence[float], b_noise: float) -> float:
    r""":math:`\epsilon_\max` from the best learning rate of runs at several batch sizes: the mean of
    :math:`\epsilon_\text{opt} \cdot \tfrac12(\sqrt{B_\text{noise}/B} + \sqrt{B/B_\text{noise}})`
    (Adam, Surge Eq. 23) or :math:`\epsilon_\text{opt}(1 + B_\text{noise}/B)` (SGD, Eq. 24 with
    :math:`\alpha = 1`)."""
    check_choice("rule", rule, RULES)
    lrs_t, b = _positive("lrs", lrs).reshape(-1), _positive("batches", batches).reshape(-1)
    if lrs_t.numel() != b.numel() or b.numel() == 0:
        raise ValueError(f"lrs={lrs!r}, batches={batches!r} are invalid: expected one learning rate per batch size, at least one")
    return float((lrs_t / eps_opt(rule, b, b_noise)).mean())


def steps_for_examples(examples, s_min: float, e_min: float) -> Tensor:
    """Steps on the trade-off curve :math:`(S/S_\\min - 1)(E/E_\\min - 1) = 1` (Eq. 2.11), for
    ``examples`` above ``e_min`` (no run reaches the target with fewer)."""
    s_min = check_number("s_min", s_min, low=0, low_open=True)
    e_min = check_number("e_min", e_min, low=0, low_open=True)
    e = checked_tensor("examples", examples, low=e_min, low_open=True)
    return s_min * (1.0 + 1.0 / (e / e_min - 1.0))
