r"""Per-example squared gradient norms from each layer's input and output gradient.

For a layer :math:`y_t = W x_t` applied at positions :math:`t` of example :math:`i`, the example's
weight gradient is :math:`G_i = \sum_t \delta_{it} x_{it}^\top` (:math:`\delta = \partial L/\partial y`),
so its squared norm needs no per-example gradient at all (Goodfellow 2015; the "ghost norm" for
sequences):

.. math:: |G_i|^2 = \sum_{t,s} (\delta_{it}\cdot\delta_{is})(x_{it}\cdot x_{is})

which costs :math:`T^2(d_\text{in}+d_\text{out})` per example against :math:`T d_\text{in} d_\text{out}`
for forming :math:`G_i`; the cheaper is chosen per layer from the shapes. Embeddings compare token
ids (rows of repeated tokens add up; ``padding_idx`` gets no gradient), convolutions unfold their
input, LayerNorm and RMSNorm form their small per-example gradients. A parameter used more than
once in a step (tied embeddings, a module called twice) gets the cross terms of its uses, so its
per-example gradient is the sum of all uses before the norm.

The layer's input is the tensor autograd keeps anyway; the output gradient is read in a backward
hook on the layer's output. No second backward, no copy of a gradient, no host sync.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradnoise._validate import check_int, check_number, fail

__all__ = ["PerExampleCollector", "SUPPORTED_MODULES", "uncovered_parameters"]

SUPPORTED_MODULES: tuple[type, ...] = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Conv1d, nn.Conv2d)
"""Module types whose own parameters get per-example norms."""


class _Factored(NamedTuple):
    """Per-example gradient :math:`G_i = \\sum_t L_{it}^\\top R_{it}` (``L``: [B, T, out], ``R``: [B, T, in])."""

    left: Tensor
    right: Tensor


class _OneHot(NamedTuple):
    """An embedding's gradient: rows ``ids`` [B, T] of ``right`` [B, T, D] added up."""

    ids: Tensor
    right: Tensor


_Rep = Any  # _Factored | _OneHot | Tensor (dense [B, n])


def _gram(a: Tensor) -> Tensor:
    return a @ a.transpose(1, 2)


def _sq_norm(rep: _Rep) -> Tensor:
    """Each example's squared Frobenius norm of one use's gradient, ``[B]`` float32+."""
    if isinstance(rep, _OneHot):
        same = rep.ids[:, :, None] == rep.ids[:, None, :]
        return (_gram(rep.right) * same).sum((1, 2))
    if isinstance(rep, _Factored):
        left, right = rep.left, rep.right
        t, d_out, d_in = left.shape[1], left.shape[2], right.shape[2]
        if t == 1:
            return left.square().sum((1, 2)) * right.square().sum((1, 2))
        if t * (d_out + d_in) <= d_out * d_in:  # the ghost norm
            return (_gram(left) * _gram(right)).sum((1, 2))
        return (left.transpose(1, 2) @ right).square().sum((1, 2))
    return rep.square().sum(1)


def _inner(a: _Rep, b: _Rep) -> Tensor:
    r"""Each example's :math:`\langle G_a, G_b\rangle` of two uses of one parameter, ``[B]``."""
    if isinstance(b, _OneHot) and not isinstance(a, _OneHot):
        a, b = b, a
    if isinstance(a, _OneHot):
        if isinstance(b, _OneHot):
            same = a.ids[:, :, None] == b.ids[:, None, :]
            return ((a.right @ b.right.transpose(1, 2)) * same).sum((1, 2))
        if isinstance(b, _Factored):  # e.g. a tied output head: G_b = sum_s L_s^T R_s, rows of L index tokens
            picked = torch.gather(b.left, 2, a.ids[:, None, :].expand(-1, b.left.shape[1], -1))  # [B, S, T]: L_s[id_t]
            return (picked * (b.right @ a.right.transpose(1, 2))).sum((1, 2))
        return (_dense_onehot(a, b.shape[1]) * b).sum(1)
    if isinstance(a, _Factored) and isinstance(b, _Factored):
        return ((a.left @ b.left.transpose(1, 2)) * (a.right @ b.right.transpose(1, 2))).sum((1, 2))
    return (_dense(a) * _dense(b)).sum(1)


def _dense(rep: _Rep) -> Tensor:
    if isinstance(rep, _Factored):
        return (rep.left.transpose(1, 2) @ rep.right).flatten(1)
    return rep


def _dense_onehot(rep: _OneHot, n: int) -> Tensor:
    d = rep.right.shape[2]
    out = rep.right.new_zeros(rep.right.shape[0], n // d, d)
    out.scatter_add_(1, rep.ids[..., None].expand(-1, -1, d), rep.right)
    return out.flatten(1)


def _positions(x: Tensor) -> Tensor:
    """``[B, ..., d]`` as ``[B, T, d]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _conv_reps(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[list[_Factored], Tensor]:
    """A Conv1d / Conv2d's weight gradient per example as one factored form per group, and its
    bias gradient ``[B, out]``."""
    two_d = isinstance(module, nn.Conv2d)
    if not two_d:  # as a 2-D convolution of height 1
        x, grad = x.unsqueeze(2), grad.unsqueeze(2)
    kernel = module.kernel_size if two_d else (1, module.kernel_size[0])
    stride = module.stride if two_d else (1, module.stride[0])
    dilation = module.dilation if two_d else (1, module.dilation[0])
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x if two_d else x.squeeze(2), pad, mode=module.padding_mode)
        x = x if two_d else x.unsqueeze(2)
        padding: tuple[int, int] = (0, 0)
    elif isinstance(module.padding, str):
        if module.padding == "same":  # torch pads the odd extra element on the right
            pads: list[int] = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = (0, 0)
    else:
        padding = module.padding if two_d else (0, module.padding[0])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    out = grad.flatten(2)  # [B, out, L]
    g = module.groups
    reps = [
        _Factored(o.transpose(1, 2), c.transpose(1, 2))
        for o, c in zip(out.chunk(g, 1), cols.chunk(g, 1))
    ]
    return reps, out.sum(2)


class PerExampleCollector:
    r"""Each example's squared gradient norm per parameter tensor, summed over the examples of a
    step: :math:`\sum_i |g_{i,p}|^2`, the :math:`S_\text{small}` of groups of one example.

    An *example* is a slice along the first dimension of each layer's input. Its gradient is the
    batch size times its contribution to a mean-reduced loss (``scale`` from :meth:`begin_group`
    undoes accumulation and AMP): for a loss averaged over a batch's tokens, that is the gradient
    of the example's own mean over its tokens when every example has as many tokens.

    Covers the parameters of :data:`SUPPORTED_MODULES`; :func:`uncovered_parameters` lists the
    others, which this collector leaves out.

    Args:
        module: the model.
        params: restrict to these ``(name, parameter)`` pairs (default: every covered parameter
            that requires grad).

    Examples:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> col = PerExampleCollector(model).attach()
        >>> col.begin_group(scale=1.0, size=8)
        >>> model(torch.randn(8, 3)).square().mean().backward()
        >>> col.end_group()
        >>> sums, k, inv, batch = col.local_sums()
        >>> sums.shape, k, batch
        (torch.Size([4]), 8, 8.0)
    """

    mode = "per_example"
    elementwise = False
    enabled = True
    """While ``False``, forward passes are not hooked (e.g. steps that are not measured)."""

    def __init__(self, module: nn.Module, params: Any = None) -> None:
        if not isinstance(module, nn.Module):
            fail("module", module, "a torch.nn.Module", TypeError)
        pairs = list(module.named_parameters()) if params is None else list(params)
        wanted = {id(p) for _, p in pairs if p.requires_grad}
        # (module, attribute) of every use of a tracked parameter: sharded training (FSDP2) swaps
        # the parameter objects during forward, so uses are found by name, not by identity
        slots: dict[int, int] = {}
        self._slots: dict[tuple[int, str], int] = {}
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        by_id = {id(p): name for name, p in pairs}
        for m in module.modules():
            if not isinstance(m, SUPPORTED_MODULES):
                continue
            for attr, p in m.named_parameters(recurse=False):
                if id(p) not in wanted:
                    continue
                if id(p) not in slots:
                    slots[id(p)] = len(self.params)
                    self.params.append(p)
                    self.names.append(by_id[id(p)])
                self._slots[(id(m), attr)] = slots[id(p)]
        if not self.params:
            raise ValueError(f"module={type(module).__name__}(...) has no trainable parameter in a supported layer ({', '.join(t.__name__ for t in SUPPORTED_MODULES)})")
        order = {id(p): i for i, (_, p) in enumerate(pairs)}  # the model's own order
        perm = sorted(range(len(self.params)), key=lambda i: order[id(self.params[i])])
        where = {old: new for new, old in enumerate(perm)}
        self.params = [self.params[i] for i in perm]
        self.names = [self.names[i] for i in perm]
        self._slots = {key: where[i] for key, i in self._slots.items()}
        self.module = module
        self._device = self.params[0].device
        self._handles: list[Any] = []
        self._scale: float | None = None
        self._size: int | None = None
        self._batch: int | None = None
        self._examples = 0
        self._micro = 0
        self._sums = torch.zeros(len(self.params), dtype=torch.float64, device=self._device)
        self._uses: dict[int, int] = {}  # forward uses per parameter in the open group
        self._pending: dict[int, list[_Rep]] = {}  # representations of multi-use parameters

    # -- life cycle ---------------------------------------------------------------------------
    def attach(self) -> "PerExampleCollector":
        if not self._handles:
            for m in self.module.modules():
                if any((id(m), attr) in self._slots for attr, _ in m.named_parameters(recurse=False)):
                    self._handles.append(m.register_forward_hook(self._on_forward))
        return self

    def detach(self) -> None:
        self.cancel_group()
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_elementwise(self, enabled: bool) -> None:
        if enabled:
            raise ValueError("per-example capture keeps no elementwise moments: GSNR and the VR optimizers need k >= 2 "
                             "gradient groups (accumulation micro-batches or devices)")

    def set_mode(self, mode: str) -> None:
        if mode != self.mode:
            raise ValueError(f"a per-example collector cannot change to mode {mode!r}")

    # -- groups -------------------------------------------------------------------------------
    def begin_group(self, scale: float = 1.0, size: int | None = None, loss: Tensor | None = None) -> None:
        if self._scale is not None:
            raise RuntimeError("begin_group() called twice without end_group()")
        check_number("scale", scale, low=0, low_open=True)
        if size is not None:
            check_int("size", size, low=1)
        # (the forward ran before: its uses of each parameter are counted already)
        self._scale, self._size, self._batch = float(scale), size, None

    def end_group(self) -> None:
        if self._scale is None:
            raise RuntimeError("end_group() called without begin_group()")
        for i, reps in self._pending.items():  # parameters with several uses: all of them now
            total = sum(_sq_norm(r) for r in reps)
            for a in range(len(reps)):
                for b in range(a + 1, len(reps)):
                    total = total + 2 * _inner(reps[a], reps[b])
            self._add(i, total)
        if self.enabled:  # (a step that is not measured counts no examples)
            self._micro += 1
            self._examples += self._batch or self._size or 0
        self._scale, self._uses, self._pending = None, {}, {}

    def cancel_group(self) -> None:
        self._scale, self._uses, self._pending = None, {}, {}
        self._batch = None

    def reset(self) -> None:
        self.cancel_group()
        self._sums = torch.zeros_like(self._sums)
        self._examples = 0
        self._micro = 0

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        # A forward comes before its group begins (Lightning: training_step, then
        # on_before_backward): hook every forward that builds a graph; the backward hook reads
        # the group's scale
        if not self.enabled or not isinstance(output, Tensor) or not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return
        # a pre-hook on the node that produced the output sees the gradient of this very output,
        # even if it is later modified in place (a tensor hook would then never fire); the input
        # is the tensor autograd keeps anyway
        target, shape = output, None
        base = output._base
        if base is not None and base.grad_fn is not None and base.numel() == output.numel():
            # a reshaped output (Linear on [B, T, d]): an in-place op on the view re-bases it and
            # bypasses the view's node, so hook the base's producer and reshape its gradient
            target, shape = base, output.shape
        node, nr = target.grad_fn, target.output_nr
        if node is None:
            output.register_hook(partial(self._on_output_grad, module, args[0].detach()))
        else:
            node.register_prehook(partial(self._on_node, module, args[0].detach(), nr, shape))
        for attr, _ in module.named_parameters(recurse=False):
            i = self._slots.get((id(module), attr))
            if i is not None:
                self._uses[i] = self._uses.get(i, 0) + 1

    def _on_node(self, module: nn.Module, x: Tensor, nr: int, shape: Any, grad_outputs: tuple) -> None:
        grad = grad_outputs[nr]
        if grad is not None:
            self._on_output_grad(module, x, grad if shape is None else grad.reshape(shape))

    def _on_output_grad(self, module: nn.Module, x: Tensor, grad: Tensor) -> None:
        if self._scale is None:
            return
        grad = grad.detach()
        if self._batch is None:
            self._batch = grad.shape[0]
        for attr, rep in self._reps(module, x, grad):
            i = self._slots.get((id(module), attr))
            if i is None:
                continue
            if self._uses.get(i, 1) > 1:
                self._pending.setdefault(i, []).append(rep)
            else:
                self._add(i, _sq_norm(rep))

    def _add(self, index: int, per_example: Tensor) -> None:
        # the example's own gradient: B times its part of the mean loss, times the group's scale
        factor = (self._scale or 1.0) * per_example.shape[0]
        self._sums[index] += per_example.sum(dtype=torch.float64) * factor * factor

    def _reps(self, module: nn.Module, x: Tensor, grad: Tensor) -> list[tuple[str, _Rep]]:
        dtype = torch.promote_types(grad.dtype, torch.float32)
        grad = grad.to(dtype)
        out: list[tuple[str, _Rep]] = []
        if isinstance(module, nn.Linear):
            g = _positions(grad)
            out.append(("weight", _Factored(g, _positions(x.to(dtype)))))
            if module.bias is not None:
                out.append(("bias", g.sum(1)))
        elif isinstance(module, nn.Embedding):
            ids = x.reshape(x.shape[0], -1)
            g = _positions(grad)
            if module.padding_idx is not None:  # the padding row gets no gradient
                g = g * (ids != module.padding_idx)[..., None]
            out.append(("weight", _OneHot(ids, g)))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            xf = x.to(dtype)
            shape = tuple(module.normalized_shape)
            if isinstance(module, nn.LayerNorm):  # the fused kernels: several times faster than var()
                normed = F.layer_norm(xf, shape, eps=module.eps)
            else:
                normed = F.rms_norm(xf, shape, eps=module.eps)
            n = 1
            for s in module.normalized_shape:
                n *= s
            if module.weight is not None:
                out.append(("weight", (grad * normed).reshape(grad.shape[0], -1, n).sum(1)))
            if getattr(module, "bias", None) is not None:
                out.append(("bias", grad.reshape(grad.shape[0], -1, n).sum(1)))
        else:  # Conv1d, Conv2d
            reps, bias_grad = _conv_reps(module, x.to(dtype), grad)
            out.append(("weight", reps[0] if len(reps) == 1 else torch.cat([_dense(r) for r in reps], 1)))
            if module.bias is not None:
                out.append(("bias", bias_grad))
        return out

    # -- results ------------------------------------------------------------------------------
    @property
    def group_open(self) -> bool:
        return self._scale is not None

    @property
    def num_groups(self) -> int:
        return self._examples

    @property
    def micro_batches(self) -> int:
        return self._micro

    @property
    def group_sizes(self) -> list[int | None]:
        return [1] * self._examples

    def raw_norms(self) -> None:
        return None

    def local_sums(self) -> tuple[Tensor, int, float, float]:
        r"""This process's :math:`\sum_i |g_i|^2` per tensor (float64), its number of examples,
        :math:`\sum_i 1/1` and :math:`\sum_i 1`."""
        return self._sums.clone(), self._examples, float(self._examples), float(self._examples)


def uncovered_parameters(module: nn.Module) -> list[tuple[str, int]]:
    """The trainable parameters per-example capture cannot see (held by other module types),
    with their numbers of elements."""
    if not isinstance(module, nn.Module):
        fail("module", module, "a torch.nn.Module", TypeError)
    covered = {id(p) for m in module.modules() if isinstance(m, SUPPORTED_MODULES) for p in m.parameters(recurse=False)}
    return [(name, p.numel()) for name, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
