"""LAMB and LARS, the layer-wise trust-ratio optimizers torch does not ship."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_number, check_numbers
from lightning_gradnoise.optim._checks import check_lr, check_params
from torch.optim import Optimizer

__all__ = ["LAMB", "LARS", "call_closure"]


def call_closure(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """Evaluate an optimizer closure with gradients enabled, as torch's optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _trust_ratio(weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    """``|w| / |u|``, and 1 where either norm is zero (a fresh zero-initialized layer, a zero update)."""
    ok = (weight_norm > 0) & (update_norm > 0)
    return torch.where(ok, weight_norm / torch.where(ok, update_norm, torch.ones_like(update_norm)), torch.ones_like(weight_norm))


class LAMB(Optimizer):
    r"""LAMB (You et al. 2020, *Large Batch Optimization for Deep Learning*, Alg. 2).

    .. math::
        m_t = \beta_1 m + (1-\beta_1) g,\quad v_t = \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda w,\quad
        w \leftarrow w - \eta\, \frac{\phi(|w|)}{|u|}\, u

    per parameter tensor, with :math:`\phi` the identity clipped to ``[0, trust_clip]`` when
    ``trust_clip`` is set, and the ratio taken as 1 when :math:`|w|` or :math:`|u|` is zero.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = LAMB([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1.0, 0.0]); opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: Optional[float] = None,
    ) -> None:
        params = check_params(params)
        lr = check_lr(lr)
        betas = tuple(check_numbers("betas", betas, length=2, low=0, high=1, high_open=True))
        eps = check_number("eps", eps, low=0, low_open=True)
        weight_decay = check_number("weight_decay", weight_decay, low=0)
        if trust_clip is not None:
            trust_clip = check_number("trust_clip", trust_clip, low=0, low_open=True)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_clip=trust_clip))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = call_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            # multi-tensor (foreach) kernels across the group's tensors; the trust ratio per tensor
            ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            steps = [float(st["step"]) for st in states]
            update = torch._foreach_div(ms, [1 - b1**t for t in steps])
            denom = torch._foreach_div(vs, [1 - b2**t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_div_(update, denom)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(params))
            if group["trust_clip"] is not None:
                w_norm = w_norm.clamp(max=group["trust_clip"])
            ratio = _trust_ratio(w_norm, torch.stack(torch._foreach_norm(update)))
            torch._foreach_mul_(update, list(ratio.unbind()))
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss


class LARS(Optimizer):
    r"""LARS (You et al. 2017, *Large Batch Training of Convolutional Networks*, Alg. 1).

    .. math::
        \lambda^l = \eta\,\frac{|w^l|}{|g^l| + \beta |w^l|},\quad
        v \leftarrow m v + \gamma\,\lambda^l (g^l + \beta w^l),\quad w \leftarrow w - v

    with global learning rate :math:`\gamma` (``lr``), trust coefficient :math:`\eta`, weight
    decay :math:`\beta`, momentum :math:`m`; the local rate is 1 where :math:`|w|` or
    :math:`|g|` is zero.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = LARS([w], lr=1.0, momentum=0.9)
        >>> w.grad = torch.tensor([1.0, -1.0, 0.0]); opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
    ) -> None:
        params = check_params(params)
        lr = check_lr(lr)
        momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        weight_decay = check_number("weight_decay", weight_decay, low=0)
        trust_coefficient = check_number("trust_coefficient", trust_coefficient, low=0, low_open=True)
        eps = check_number("eps", eps, low=0)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = call_closure(closure)
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            denom = g_norm + wd * w_norm + group["eps"]
            ok = (w_norm > 0) & (g_norm > 0)
            local = torch.where(ok, eta * w_norm / torch.where(ok, denom, torch.ones_like(denom)), torch.ones_like(w_norm))
            steps = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)
            torch._foreach_mul_(steps, list((local * group["lr"]).unbind()))
            if group["momentum"]:
                bufs = []
                for p, d in zip(params, steps):
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = d.clone()
                        bufs.append(None)
                    else:
                        bufs.append(state["momentum_buffer"])
                live = [(b, d) for b, d in zip(bufs, steps) if b is not None]
                if live:
                    torch._foreach_mul_([b for b, _ in live], group["momentum"])
                    torch._foreach_add_([b for b, _ in live], [d for _, d in live])
                steps = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_sub_(params, steps)
        return loss
