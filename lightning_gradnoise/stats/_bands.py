r"""The ideal ranges of GR-Gauge (App. E) and the batch sizes they imply: pure Python, no torch,
so that ``gradnoise plan`` starts fast."""

from __future__ import annotations

from typing import Sequence

from lightning_gradnoise._validate import check_number, check_numbers

__all__ = ["GR_S_BAND", "GR_T_TARGET", "batch_range_for_gr_s", "check_band"]

GR_S_BAND = (0.5, 0.65)
"""The ideal :math:`GR_S` band (GR-Gauge App. E): :math:`B` between about :math:`\\mu/2` and :math:`\\mu`."""
GR_T_TARGET = 20.0
"""The ideal :math:`GR_T` (GR-Gauge App. E: Eq. 19 at :math:`B=\\mu, \\eta = 1/(2\\bar\\lambda), \\beta=0.9`)."""


def check_band(band: Sequence[float], name: str = "band") -> tuple[float, float]:
    """Validate a ``(low, high)`` band of :math:`GR_S` values: ``0 < low < high < 1``."""
    low, high = check_numbers(name, band, length=2, low=0, low_open=True, high=1, high_open=True)
    if not low < high:
        raise ValueError(f"{name}={tuple(band)!r} is invalid: expected 0 < low < high < 1")
    return low, high


def batch_range_for_gr_s(b_simple: float, band: Sequence[float] = GR_S_BAND) -> tuple[float, float]:
    r"""The global batch sizes whose :math:`GR_S` lies in ``band`` (Lemma 2 inverted), for a
    measured :math:`B_\text{simple} > 0` (at 0 there is no noise to size a batch by).

    .. math:: B = \frac{1 + \mu}{GR_S} - \mu

    Returns ``(B_low, B_high)``: ``B_low`` gives the band's upper end, ``B_high`` its lower end
    (:math:`GR_S` falls as :math:`B` grows, Theorem 2).

    Examples:
        >>> lo, hi = batch_range_for_gr_s(1000.0)
        >>> round(lo), round(hi)
        (540, 1002)
    """
    mu = check_number("b_simple", b_simple, low=0, low_open=True)
    low, high = check_band(band)
    return (1.0 + mu) / high - mu, (1.0 + mu) / low - mu
