r"""Steps, examples and time per batch size from a measured noise scale (McCandlish Eq. 2.11):
pure Python, no torch, so that ``gradnoise plan`` starts fast."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from lightning_gradnoise._validate import check_callable, check_number, check_numbers, check_optional

__all__ = ["plan_batch_sizes"]


def plan_batch_sizes(
    b_noise: float,
    batch_sizes: Sequence[float],
    reference: Optional[tuple[float, float]] = None,
    seconds_per_step: Optional[Callable[[float], float]] = None,
) -> list[dict[str, float]]:
    r"""Predicted steps, examples and time per candidate batch size, from a measured
    :math:`B_\text{noise}` (e.g. B_simple from a run's logs).

    .. math:: S = S_\min (1 + B_\text{noise}/B), \qquad E = B S

    Args:
        b_noise: the noise scale, > 0.
        batch_sizes: candidates, each > 0.
        reference: ``(batch, steps)`` of a run that reached the target, both > 0; it fixes
            :math:`S_\min = S_\text{ref} / (1 + B_\text{noise}/B_\text{ref})`. Without it steps are
            in units of :math:`S_\min`.
        seconds_per_step: ``batch -> seconds``; adds a ``time`` column.

    Examples:
        >>> [row["steps"] for row in plan_batch_sizes(100.0, [50, 100, 400])]
        [3.0, 2.0, 1.25]
    """
    b_noise = check_number("b_noise", b_noise, low=0, low_open=True)
    sizes = check_numbers("batch_sizes", batch_sizes, low=0, low_open=True)
    if reference is not None:
        ref_batch, ref_steps = check_numbers("reference", reference, length=2, low=0, low_open=True)
    check_optional(check_callable, "seconds_per_step", seconds_per_step)
    s_min = 1.0 if reference is None else ref_steps / (1.0 + b_noise / ref_batch)
    rows = []
    for b in sizes:
        steps = s_min * (1.0 + b_noise / b)
        row = {"batch": b, "steps": steps, "examples": steps * b, "steps/S_min": steps / s_min,
               "examples/E_min": (steps * b) / (s_min * b_noise)}
        if seconds_per_step is not None:
            row["time"] = steps * float(seconds_per_step(b))
        rows.append(row)
    return rows
