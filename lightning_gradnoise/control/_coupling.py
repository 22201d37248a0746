"""What the line search needs to know of the optimizer's own step: how much of the current
gradient's noise the step carries (:func:`noise_coupling`) and how much longer momentum will make
it (:func:`step_growth`), for ``torch.optim`` SGD, Adam and AdamW."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_int, fail

__all__ = ["LINE_SEARCH_OPTIMIZERS", "noise_coupling", "step_growth"]

LINE_SEARCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def _kind(optimizer: Any) -> str | None:
    """The most derived ``torch.optim`` class among :data:`LINE_SEARCH_OPTIMIZERS` (AdamW may
    derive from Adam); ``None`` for others and for the VR variants, whose step differs."""
    if type(optimizer).__name__.lower().startswith("vr"):
        return None
    for cls in type(optimizer).__mro__:
        if cls.__name__ in LINE_SEARCH_OPTIMIZERS and cls.__module__.startswith("torch.optim"):
            return cls.__name__
    return None


def noise_coupling(optimizer: Any, params: Sequence[Tensor]) -> list[Union[float, Tensor]]:
    r""":math:`J = \partial\Delta/\partial\hat g`, elementwise, of the step the optimizer just took,
    one entry per parameter of ``params``: how much of the current gradient's noise the step carries.

    - SGD: :math:`\eta` (times :math:`1 - \text{dampening}` with a momentum buffer, and
      :math:`1 + \mu` with Nesterov).
    - Adam, AdamW: the derivative of :math:`\eta\,\hat m_t/(\sqrt{\hat v_t} + \epsilon)` in
      :math:`\hat g_t`, through both moments (a tensor in the parameter's precision, float32 at
      least):
      :math:`\frac{\eta}{\sqrt{\hat v_t}+\epsilon}\big(\frac{1-\beta_1}{1-\beta_1^t} -
      \frac{\hat m_t(1-\beta_2)\hat g_t}{(1-\beta_2^t)(\sqrt{\hat v_t}+\epsilon)\sqrt{\hat v_t}}\big)`.

    Call it after ``optimizer.step()``. Raises ``ValueError`` for other optimizers.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> noise_coupling(opt, [w])
        [0.1]
    """
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        fail("optimizer", optimizer, "a torch optimizer (with param_groups and state)", TypeError)
    if isinstance(params, (str, bytes, Tensor)) or not hasattr(params, "__iter__") or not all(isinstance(p, Tensor) for p in params):
        fail("params", params, "a sequence of tensors", TypeError)
    kind = _kind(optimizer)
    if kind is None:
        raise ValueError(
            f"optimizer={type(optimizer).__name__}: the line-search learning-rate rule knows the step of "
            f"{', '.join(LINE_SEARCH_OPTIMIZERS)} (torch.optim); use LRAdapter(rule='gr_t') for this one"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: list[Union[float, Tensor]] = []
    for p in params:
        group = group_of.get(id(p))
        if group is None:
            out.append(0.0)
            continue
        if group.get("maximize"):
            raise ValueError(f"optimizer={type(optimizer).__name__} with maximize=True: the line-search rule minimizes")
        lr = float(group["lr"])
        state = optimizer.state.get(p, {})
        if kind == "SGD":
            mom = float(group.get("momentum", 0.0))
            j = lr
            if mom and state.get("momentum_buffer") is not None and int(state.get("_steps", 2)) > 1:
                j *= 1.0 - float(group.get("dampening", 0.0))
            if group.get("nesterov") and mom:
                j *= 1.0 + mom
            out.append(j)
            continue
        if "exp_avg_sq" not in state or p.grad is None:
            out.append(0.0)
            continue
        beta1, beta2 = group["betas"]
        t = float(state["step"])
        b1, b2 = 1.0 - beta1**t, 1.0 - beta2**t
        # in the parameter's precision (float32 at least): a float64 copy of every moment, every
        # step, cost a quarter of a step on the LM benchmark; the sums over J are taken in float64
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        v = state["exp_avg_sq"].to(work)
        v_used = state["max_exp_avg_sq"].to(work) if group.get("amsgrad") else v
        root = (v_used / b2).sqrt_()
        denom = root + float(group["eps"])
        g = p.grad.to(work)
        if group.get("weight_decay") and kind == "Adam":  # Adam's L2 term is part of the gradient it sees
            g = g + float(group["weight_decay"]) * p.detach().to(work)
        # d/dg of m_hat / (sqrt(v_hat) + eps): the first moment's share, less the second moment's
        # (through v_hat, where it is the one used: not where amsgrad's max holds an older value)
        through_v = (state["exp_avg"].to(work) * g).mul_((1.0 - beta2) / (b1 * b2)).div_(denom).div_(root.clamp_min(torch.finfo(work).tiny))
        if group.get("amsgrad"):
            through_v = torch.where(v_used == v, through_v, torch.zeros_like(through_v))
        out.append(through_v.neg_().add_((1.0 - beta1) / b1).mul_(lr).div_(denom))
    return out


def step_growth(optimizer: Any, steps: int) -> float:
    r"""How many times longer the optimizer's step will be, at the same gradient, once its momentum
    has built up, after ``steps`` optimizer steps (the one just taken included).

    ``torch.optim.SGD``'s momentum buffer starts at the first gradient and then sums
    :math:`\mu^k (1 - \text{dampening})` times the later ones, so at a constant gradient its step
    grows from :math:`\eta g` to :math:`\eta g (1 - \text{dampening})/(1 - \mu)` (ten times, at
    :math:`\mu = 0.9`) over a few times :math:`1/(1-\mu)` steps:
    :math:`f = u_\infty/u_t` with :math:`u_t = \mu^{t-1} + (1-\text{dampening})(1-\mu^{t-1})/(1-\mu)`
    (Nesterov: :math:`1 + \mu u_t`). Adam and AdamW correct their moments' bias, so their step
    does not grow: 1. Several parameter groups: the mean over their elements.

    Raises ``ValueError`` for optimizers :func:`noise_coupling` does not know.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> round(step_growth(opt, 1), 3), round(step_growth(opt, 20), 3), step_growth(opt, 10**6)
        (10.0, 1.138, 1.0)
    """
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        fail("optimizer", optimizer, "a torch optimizer (with param_groups and state)", TypeError)
    steps = check_int("steps", steps, low=1)
    kind = _kind(optimizer)
    if kind is None:
        noise_coupling(optimizer, [])  # raises, naming the optimizers it knows
    if kind != "SGD":
        return 1.0
    total = weight = 0.0
    for group in optimizer.param_groups:
        n = float(sum(p.numel() for p in group["params"]))
        mu, damp = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
        f = 1.0
        if mu > 0.0:
            late = mu ** (steps - 1)
            built, steady = late + (1.0 - damp) * (1.0 - late) / (1.0 - mu), (1.0 - damp) / (1.0 - mu)
            if group.get("nesterov"):
                built, steady = 1.0 + mu * built, 1.0 + mu * steady
            f = max(steady / built, 1.0) if built > 0 else 1.0
        total, weight = total + f * n, weight + n
    return total / weight if weight > 0 else 1.0
