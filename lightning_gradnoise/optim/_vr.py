r"""The GSNR gradient transformation of VRGD and the VR optimizers built from it.

VRGD (``papers/vrgd-gsnr-large-batch.md``), Alg. 1, 3, 5 and Eq. 2, 7-10. With ``k >= 2`` groups
(devices x micro-batches), the step's mean gradient :math:`g` and the elementwise
:math:`\sum_j g_j^2`:

.. math::
    \sigma^2 = \tfrac1k \textstyle\sum_j g_j^2 - g^2,\quad r = g^2/\sigma^2,\quad
    r \leftarrow \mathrm{clamp}(r / \mathrm{mean}_\text{layer}(r), \gamma, 1)

then, with GSNR momentum (:math:`\beta_3`, Alg. 3 and 5),
:math:`p_t = \beta_3 p_{t-1} + (1-\beta_3) r`, :math:`\hat p_t = p_t/(1-\beta_3^t)`,
:math:`g \leftarrow \hat p_t\, g`; without it (VR-SGD, Alg. 1) :math:`g \leftarrow r\, g`. The
scaled gradient then goes to the unchanged base update. With :math:`\gamma = 1` the factor is
1 everywhere and the base optimizer is reproduced exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradnoise._validate import check_callable, check_choice, check_number, check_optional, fail
from lightning_gradnoise.optim._checks import check_lr, check_params
from lightning_gradnoise.optim._lamb_lars import call_closure
from lightning_gradnoise.stats import gsnr_scale_many

__all__ = ["GSNRScaling", "vr_optimizer_class", "MomentSource"]

MomentSource = Callable[[], Optional[tuple[Sequence[Tensor], int]]]


class GSNRScaling:
    r"""The VRGD gradient transformation on its own: scales each gradient element by its
    normalized, clamped GSNR (optionally its bias-corrected EMA), in place.

    Args:
        gamma: lower clamp :math:`\gamma` in ``(0, 1]`` (0.1 in the paper).
        beta3: GSNR momentum in ``[0, 1)``, or ``None`` for none (VR-SGD).
        normalizer: what each layer's ratios are divided by: ``"auto"`` (the layer mean, as in
            VRGD, from 8 groups; the median below, where the mean is set by a few elements:
            :func:`~lightning_gradnoise.stats.gsnr_scale_many`), ``"mean"`` or ``"median"``.

    Examples:
        >>> g = [torch.tensor([1.0, 0.1, 0.5])]; sq = [torch.tensor([2.5, 0.5, 0.5])]   # k = 2
        >>> GSNRScaling(gamma=0.1, beta3=None, normalizer="mean").apply(g, sq, k=2, state=[{}])
        >>> g[0]   # GSNR 4 and 0.04 (mean 2.02: factors 1 and 0.1); no noise on the third: 1
        tensor([1.0000, 0.0100, 0.5000])
    """

    def __init__(self, gamma: float = 0.1, beta3: Optional[float] = 0.9, normalizer: str = "auto") -> None:
        self.gamma = check_number("gamma", gamma, low=0, low_open=True, high=1)
        self.beta3 = check_optional(check_number, "beta3", beta3, low=0, high=1, high_open=True)
        self.normalizer = check_choice("normalizer", normalizer, ("auto", "mean", "median"))

    def apply(self, grads: Sequence[Tensor], sq_sums: Sequence[Tensor], k: int, state: Sequence[dict]) -> None:
        """Scale ``grads`` in place (each tensor is one layer for the normalization)."""
        if k < 2:
            raise ValueError(f"k={k!r}: GSNR needs at least 2 groups (devices x accumulation micro-batches)")
        grads, sq_sums = list(grads), list(sq_sums)
        if not grads:
            return
        factors = gsnr_scale_many(grads, sq_sums, k, self.gamma, self.normalizer)
        if self.beta3 is not None and self.gamma < 1.0:  # gamma = 1: every factor is exactly 1
            for st, r in zip(state, factors):
                if "gsnr_avg" not in st:
                    st["gsnr_avg"] = torch.zeros_like(r)
                    st["gsnr_step"] = 0
                st["gsnr_step"] += 1
            avgs = [st["gsnr_avg"] for st in state]
            torch._foreach_lerp_(avgs, factors, 1.0 - self.beta3)
            factors = torch._foreach_div(avgs, [1.0 - self.beta3 ** st["gsnr_step"] for st in state])
        torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors, grads)])


_NO_SOURCE = (
    "{name} needs the elementwise second moments of k >= 2 gradient groups for each step. Provide them "
    "with optimizer.set_moments(sq_sums, k) before step(), or pass moment_source=..., or in Lightning add "
    "the VRMoments callback (it reads them from accumulation micro-batches on one device, or from "
    "strategy='gnddp' across devices)."
)


def vr_optimizer_class(base: type[Optimizer], name: str, beta3_default: Optional[float]) -> type[Optimizer]:
    """A VR variant of ``base``: GSNR scaling of ``.grad`` (one transformation), then ``base.step``.

    Args:
        base: a ``torch.optim.Optimizer`` subclass.
        name: the new class's name.
        beta3_default: the default GSNR momentum in ``[0, 1)``, or ``None`` for none (VR-SGD).
    """
    if not (isinstance(base, type) and issubclass(base, Optimizer)):
        fail("base", base, "a torch.optim.Optimizer subclass", TypeError)
    if not isinstance(name, str) or not name.isidentifier():
        fail("name", name, "a class name (a Python identifier)", TypeError if not isinstance(name, str) else ValueError)
    check_optional(check_number, "beta3_default", beta3_default, low=0, high=1, high_open=True)

    class VR(base):  # type: ignore[misc, valid-type]
        def __init__(self, params, *args: Any, gamma: float = 0.1, beta3: Optional[float] = beta3_default,
                     moment_source: Optional[MomentSource] = None, normalizer: str = "auto", **kwargs: Any) -> None:
            params = check_params(params)
            if "lr" in kwargs or args:
                check_lr(kwargs["lr"] if "lr" in kwargs else args[0])
            check_optional(check_callable, "moment_source", moment_source)
            self.scaling = GSNRScaling(gamma, beta3, normalizer)
            super().__init__(params, *args, **kwargs)
            for group in self.param_groups:
                group.setdefault("gamma", gamma)
                group.setdefault("beta3", beta3)
                group.setdefault("normalizer", normalizer)
            self.moment_source = moment_source
            self._moments: Optional[tuple[Sequence[Tensor], int]] = None
            self._skip = False
            self.skipped_steps = 0
            """Steps skipped whole (:meth:`skip_step`), e.g. for non-finite gradients."""
            # kept apart from self.state: base optimizers initialize a parameter's state when empty
            self.gsnr_state: dict[int, dict[str, Any]] = {}

        def state_dict(self) -> dict[str, Any]:
            sd = super().state_dict()
            sd["gsnr"] = {i: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()} for i, st in self.gsnr_state.items()}
            return sd

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            state_dict = dict(state_dict)
            gsnr_state = state_dict.pop("gsnr", {})
            super().load_state_dict(state_dict)
            params = self.params_in_order()
            self.gsnr_state = {
                int(i): {k: (v.to(params[int(i)].device).clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
                for i, st in gsnr_state.items()
            }

        def params_in_order(self) -> list[Tensor]:
            """The order ``set_moments`` expects: every parameter of every group, in turn."""
            return [p for group in self.param_groups for p in group["params"]]

        def set_moments(self, sq_sums: Sequence[Tensor], k: int) -> None:
            r"""This step's :math:`\sum_j g_j^2` per parameter (:meth:`params_in_order`) and ``k``."""
            if isinstance(k, bool) or not isinstance(k, int):
                fail("k", k, "a whole number >= 2 (gradient groups)", TypeError)
            if k < 2:
                raise ValueError(f"k={k!r} is invalid: GSNR needs at least 2 gradient groups. " + _NO_SOURCE.format(name=name))
            if isinstance(sq_sums, (Tensor, str, bytes)) or not isinstance(sq_sums, Sequence):
                fail("sq_sums", sq_sums, "a list of tensors, one per parameter", TypeError)
            params = self.params_in_order()
            if len(sq_sums) != len(params):
                fail("sq_sums", f"<{len(sq_sums)} tensors>", f"one tensor per parameter ({len(params)}, in params_in_order())")
            for i, (s, p) in enumerate(zip(sq_sums, params)):
                if not isinstance(s, Tensor) or s.shape != p.shape:
                    fail(f"sq_sums[{i}]", s if not isinstance(s, Tensor) else f"<tensor of shape {tuple(s.shape)}>",
                         f"a tensor of the parameter's shape {tuple(p.shape)}", TypeError if not isinstance(s, Tensor) else ValueError)
            self._moments = (list(sq_sums), k)

        def skip_step(self) -> None:
            """Make the next :meth:`step` change nothing (counted in ``skipped_steps``): for a step
            whose gradients or moments are not finite, as the monitor skips it."""
            self._skip = True

        @torch.no_grad()
        def step(self, closure: Optional[Callable[[], float]] = None):
            loss = call_closure(closure)
            if self._skip:
                self._skip, self._moments = False, None
                self.skipped_steps += 1
                return loss
            moments = self._moments if self._moments is not None else (self.moment_source() if self.moment_source else None)
            self._moments = None
            if moments is None:
                raise RuntimeError(_NO_SOURCE.format(name=name))
            sq_sums, k = moments
            params = self.params_in_order()
            if len(sq_sums) != len(params):
                raise ValueError(f"got moments for {len(sq_sums)} tensors, the optimizer has {len(params)}")
            index = 0
            for group in self.param_groups:
                todo: list[tuple[Tensor, Tensor, dict]] = []
                for p in group["params"]:
                    i, index = index, index + 1
                    if p.grad is not None:
                        todo.append((p.grad, sq_sums[i], self.gsnr_state.setdefault(i, {})))
                if todo:
                    grads, sums, states = zip(*todo)
                    GSNRScaling(group["gamma"], group["beta3"], group.get("normalizer", "auto")).apply(grads, sums, k, states)
            super().step()
            return loss

    VR.__name__ = VR.__qualname__ = name
    VR.__doc__ = f"{name}: VRGD's GSNR scaling of each gradient element, then :class:`{base.__module__}.{base.__name__}`.\n\n" + (__doc__ or "")
    return VR
