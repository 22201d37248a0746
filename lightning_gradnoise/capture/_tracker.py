"""From captured moments to the logged statistics, one optimizer step at a time (no Lightning)."""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradnoise._validate import check_bool, check_choice, check_number, fail
from lightning_gradnoise.capture._collector import GradientMomentCollector, NamedParams, SharedCapture, size_sums
from lightning_gradnoise.capture._comm import ReducedMoments
from lightning_gradnoise.capture._dist import WorldSize
from lightning_gradnoise.capture._per_example import PerExampleCollector
from lightning_gradnoise.stats import (
    GradientNoiseScale,
    GSNRStatistic,
    TemporalRedundancy,
    gr_s,
    noise_scale_from_moments,
)

__all__ = ["STATISTICS", "CAPTURES", "GradNoiseTracker", "needs_groups", "parse_statistics"]

STATISTICS = ("b_simple", "gr_s", "gr_t", "gsnr")
CAPTURES = ("groups", "per_example")
"""What can be measured; ``gr_s`` implies ``b_simple`` (it is computed from it)."""


class _Pending(NamedTuple):
    r"""One step not yet folded into the EMAs, as captured: no device sync, no collective and no
    float64 work per step, and each step's 0-d norms are stacked only when many steps are folded
    at once (on a small model a per-step stack is a large part of the cost).

    ``norms``: each group's per-tensor norms, group-major, each group weighted by ``scales`` (the
    collector's raw form), or ``None`` when ``sq`` holds :math:`\sum_j |g_j|^2` per tensor
    already. ``big``: the step gradient's per-tensor norms. ``k``: the number of groups over all
    processes. ``counts``: :math:`[k, \sum_j 1/b_j, \sum_j b_j]` over the groups that ``sq`` or
    ``norms`` sum, from which the fold computes the weights of :func:`noise_scale_from_moments`
    (``summed_loss``: a sum-reduced loss). ``local``: the sums and counts are this process's own,
    to be summed over processes (in one all-reduce for all pending steps) before they are folded.
    A resumed run's entries hold the same values stacked into tensors."""

    norms: list[Tensor] | Tensor | None
    sq: Tensor | None
    big: list[Tensor] | Tensor
    k: int
    scales: tuple[float, ...]
    counts: Tensor | tuple[float, float, float]
    summed_loss: bool = False
    local: bool = False


def _stack(parts: list[list[Tensor] | Tensor]) -> Tensor:
    """Lists of 0-d tensors (or 1-D tensors of a resumed run) of equal length as rows, in one stack."""
    if all(isinstance(p, Tensor) for p in parts):
        return torch.stack(parts)  # type: ignore[arg-type]
    flat = [t for p in parts for t in (p if isinstance(p, list) else p.unbind())]
    return torch.stack(flat).view(len(parts), -1)


def _saved_entry(entry: _Pending) -> dict[str, Any]:
    assert not entry.local, "reduce pending steps over processes before saving them"

    def cpu(x: list[Tensor] | Tensor | None) -> Tensor | None:
        return None if x is None else (torch.stack(x) if isinstance(x, list) else x).cpu().clone()

    counts = entry.counts if isinstance(entry.counts, Tensor) else torch.tensor(entry.counts, dtype=torch.float64)
    return entry._replace(norms=cpu(entry.norms), sq=cpu(entry.sq), big=cpu(entry.big), counts=cpu(counts))._asdict()


def _loaded_entry(state: dict[str, Any], device: torch.device) -> _Pending:
    state = dict(state)
    if "a" in state:  # saved with the weights instead of the counts: recover the counts
        a, c, k = float(state.pop("a")), float(state.pop("c")), state["k"]
        if state.get("counts") is None:
            inv = c * k * k  # mean-reduced loss: c = sum(1/b) / k^2
            # summed loss: c = 1 / B and a = sum(1/b) / k
            summed = k >= 2 and math.isfinite(a) and not math.isclose(a * k, inv, rel_tol=1e-9)
            state["counts"] = torch.tensor([k, a * k if summed else inv, 1.0 / c if summed else float("nan")], dtype=torch.float64)
            state["summed_loss"] = summed
    moved = {key: (v.to(device) if isinstance(v, Tensor) else v) for key, v in state.items()}
    return _Pending(**{**moved, "scales": tuple(state["scales"])})


def _gr_s_reading(reading: dict[str, Tensor], batch: float) -> dict[str, Tensor]:
    """GR_S with its interval from B_simple's (GR_S = (1 + B_simple)/(B + B_simple) rises with
    B_simple at any batch B > 1), NaN wherever B_simple is not determined."""
    if not batch > 0:  # no samples in the step: nothing to compare against
        nan = torch.full_like(reading["b_simple"], math.nan)
        return {"gr_s": nan, "gr_s_lo": nan.clone(), "gr_s_hi": nan.clone()}
    return {f"gr_s{end}": gr_s(reading[f"b_simple{end}"], batch) for end in ("", "_lo", "_hi")}


def needs_groups(statistics: str | Iterable[str]) -> bool:
    """Whether a selection needs at least two gradient groups per step (all but ``gr_t`` do)."""
    return bool(parse_statistics(statistics) & {"b_simple", "gr_s", "gsnr"})


def _local(t: Tensor) -> Tensor:
    """A sharded (DTensor) gradient's local shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def parse_statistics(statistics: str | Iterable[str]) -> frozenset[str]:
    """Validate a selection of :data:`STATISTICS` (``"all"`` selects every one)."""
    expected = f"one or more of {STATISTICS}, or 'all'"
    if isinstance(statistics, str):
        chosen = set(STATISTICS) if statistics == "all" else {statistics}
    elif isinstance(statistics, Iterable) and all(isinstance(s, str) for s in statistics):
        chosen = set(statistics)
    else:
        fail("statistics", statistics, expected, TypeError)
    unknown = chosen - set(STATISTICS)
    if unknown or not chosen:
        raise ValueError(f"statistics={statistics!r} is invalid: choose one or more of {STATISTICS} or 'all'")
    if "gr_s" in chosen:
        chosen.add("b_simple")
    return frozenset(chosen)


class GradNoiseTracker:
    r"""Gradient-noise statistics of a model, step by step, in plain PyTorch.

    Per optimizer step: one :meth:`begin_group` / :meth:`end_group` pair around each backward
    (micro-batch), then :meth:`finish_step` once ``.grad`` holds the step's gradient. Under
    ``torch.distributed`` no step communicates: each process keeps its own per-group sums, and
    the steps since the last fold are summed over processes in one small all-reduce of
    ``steps x (P + 3)`` float64 values (``P`` parameter tensors) when they are folded into the
    statistics (on a summarized step, or every ``max_pending`` steps). Elementwise moments
    (GSNR) add one parameter-sized all-reduce, only on steps where a summary is asked for, unless
    :func:`gradnoise_comm_hook` carried them in DDP's own.

    Args:
        params: a module or ``(name, parameter)`` pairs.
        statistics: a selection of :data:`STATISTICS`.
        ema_decay: decay of the EMAs of :math:`|G|^2` and :math:`\mathrm{tr}\,\Sigma`.
        gr_t_beta: :math:`\beta` of :math:`GR_T`'s EMAs (0.9 in GR-Gauge).
        mode: how the collector sees each group's gradient (:class:`GradientMomentCollector`):
            ``"hooks"`` (anywhere, DDP included) or ``"swap"`` (cheaper; not under DDP).
        level: the two-sided level of the intervals in the summaries (``b_simple_lo`` and
            ``b_simple_hi``, ...), 0.9 by default.
        capture: ``"groups"`` (each backward is a group: micro-batches, devices) or
            ``"per_example"`` (each example is a group of one, from its per-example gradient
            norm: :class:`PerExampleCollector`; needs ``params`` to be the module, covers
            :data:`SUPPORTED_MODULES`' parameters, and measures no GSNR).

    Examples:
        >>> model = torch.nn.Linear(4, 1)
        >>> tracker = GradNoiseTracker(model, statistics=("b_simple", "gr_s")).attach()
        >>> for step in range(3):
        ...     model.zero_grad()
        ...     tracker.begin_step()
        ...     for xb in torch.randn(2, 16, 4).unbind(0):
        ...         tracker.begin_group(scale=2.0, size=16)
        ...         (model(xb).square().mean() / 2).backward()
        ...         tracker.end_group()
        ...     summary = tracker.finish_step(loss_divisor=2.0, summarize=True)   # the loss was divided by 2
        >>> [key for key in ("b_simple", "b_simple_lo", "b_simple_hi", "gr_s", "gr_s_lo", "gr_s_hi") if key in summary]
        ['b_simple', 'b_simple_lo', 'b_simple_hi', 'gr_s', 'gr_s_lo', 'gr_s_hi']
    """

    def __init__(
        self,
        params: NamedParams,
        statistics: str | Iterable[str] = ("b_simple", "gr_s", "gsnr"),
        ema_decay: float = 0.95,
        gr_t_beta: float = 0.9,
        mode: str = "hooks",
        level: float = 0.9,
        capture: str = "groups",
    ) -> None:
        self.statistics = parse_statistics(statistics)
        self.capture = check_choice("capture", capture, CAPTURES)
        self.level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        ema_decay = check_number("ema_decay", ema_decay, low=0, high=1, high_open=True)
        gr_t_beta = check_number("gr_t_beta", gr_t_beta, low=0, low_open=True, high=1, high_open=True)
        self.collector: Any
        self.coverage: float | None = None
        """Per example: the fraction of trainable parameters covered (logged as ``coverage``)."""
        if self.capture == "per_example":
            if not isinstance(params, nn.Module):
                fail("params", params, "a module (per-example capture hooks its layers)", TypeError)
            if "gsnr" in self.statistics:
                raise ValueError("statistics includes 'gsnr', which per-example capture cannot measure: GSNR and the VR "
                                 "optimizers need k >= 2 gradient groups (accumulation micro-batches or devices)")
            self.collector = PerExampleCollector(params)
            trainable = sum(p.numel() for p in params.parameters() if p.requires_grad)
            self.coverage = sum(p.numel() for p in self.collector.params) / trainable
        else:
            self.collector = GradientMomentCollector(params, mode=mode)
        self.noise_scale = GradientNoiseScale(ema_decay)
        self.temporal = TemporalRedundancy(gr_t_beta)
        self.gsnr = GSNRStatistic(ema_decay)
        self.moments_only = False
        """Keep the elementwise moments for a VR optimizer (``last_elementwise``) and measure no GSNR."""
        self._histograms = False  # set by a consumer that logs them
        self.skipped_steps = 0
        self.steps = 0
        self.histograms: dict[str, Tensor] = {}
        self.max_pending = 256
        self._pending: list[_Pending] = []
        self.last_elementwise: tuple[list[Tensor], int] | None = None
        """The last summarized step's global elementwise moments and group count (GSNR)."""
        self._world_size = WorldSize()
        self._group: Any = None
        self._batch = float("nan")  # the last folded step's global batch
        self.last_collective_bytes = 0
        """Bytes this process sent in collectives of its own during the last step."""

    @property
    def names(self) -> list[str]:
        return self.collector.names

    def attach(self) -> "GradNoiseTracker":
        """Start capturing. A second tracker of the same model's parameters in ``mode="swap"``
        reads the first one's capture (:class:`SharedCapture`): one capture per micro-batch,
        whatever the number of consumers."""
        col = self.collector
        if isinstance(col, GradientMomentCollector) and col.mode == "swap" and not col._attached:
            leader = col.leader()
            if leader is not None:
                self.collector = SharedCapture(leader)
                return self
        self.collector.attach()
        return self

    def detach(self) -> None:
        self.collector.detach()

    # -- per step -----------------------------------------------------------------------------
    def skip_step(self) -> None:
        """Drop the step being measured, counted in ``skipped_steps`` (e.g. one with an empty
        micro-batch, which has no mean gradient): nothing of it is folded in."""
        self.collector.reset()
        self.skipped_steps += 1
        self.last_elementwise = None

    def begin_step(self, elementwise: bool = False) -> None:
        """Start a step; ``elementwise`` captures the moments GSNR needs (only if selected)."""
        self.collector.reset()
        self.collector.set_elementwise(elementwise and "gsnr" in self.statistics)

    def begin_group(self, scale: float = 1.0, size: int | None = None, loss: Tensor | None = None) -> None:
        self.collector.begin_group(scale, size, loss)

    def end_group(self) -> None:
        self.collector.end_group()

    def finish_step(
        self,
        loss_divisor: float = 1.0,
        loss_reduction: str = "mean",
        summarize: bool = False,
        per_layer: bool = False,
        process_group: Any = None,
        reduced: ReducedMoments | None = None,
    ) -> dict[str, float] | None:
        """Fold the step into the running statistics, once ``.grad`` holds the step's gradient.

        Args:
            loss_divisor: what each micro-batch loss was divided by before backward (Lightning
                divides by ``accumulate_grad_batches``).
            loss_reduction: ``"mean"`` if each micro-batch loss averages over its samples (the
                step's gradient then weights groups equally), ``"sum"`` if it sums (the step's
                gradient is the sample-weighted mean).
            summarize: return the current values (otherwise ``None``).
            per_layer: add ``layer/<name>/<statistic>`` entries to the summary.
            process_group: for ``torch.distributed``; ``None`` is the default group. Under DDP,
                ``.grad`` is the average over ranks.
            reduced: the step's elementwise moments as :func:`gradnoise_comm_hook` reduced them
                inside DDP's all-reduce (``GradNoiseCommState.take()``); then they need no
                collective here.

        Returns:
            ``None``, or a dict of floats, identical on every rank. A step whose gradients are
            not finite is skipped whole (``skipped_steps`` grows) and nothing is folded in.
            Under ``torch.distributed`` every process must make the same calls: a summarized
            step runs a collective.
        """
        check_number("loss_divisor", loss_divisor, low=0, low_open=True)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        check_bool("summarize", summarize)
        check_bool("per_layer", per_layer)
        col = self.collector
        world = self._world_size(process_group)
        self._group = process_group
        self.last_collective_bytes = 0
        raw = col.raw_norms()
        if raw is not None:
            sums = None
            k_local = col.num_groups
            inv_size_sum, batch = size_sums(col.group_sizes)
        else:  # a group still open (a backward without end_group): counted in
            sums, k_local, inv_size_sum, batch = col.local_sums()
        per_example = self.capture == "per_example"
        k = world * k_local
        local_batch = batch
        if world > 1 and loss_reduction == "sum":
            # the step's gradient is the sample-weighted mean: its scale needs the global batch
            # now (one small all-reduce and a sync per step, for summed losses only)
            total_batch = torch.tensor([batch], dtype=torch.float64, device=col.params[0].device)
            dist.all_reduce(total_batch, group=process_group)
            batch = float(total_batch)
        # .grad = (1 / (world * divisor)) * sum over groups of g_j (mean) or of b_j g_j (sum)
        micro = world * col.micro_batches if per_example else k  # the backward passes that made .grad
        total = micro if loss_reduction == "mean" else batch
        factor = world * loss_divisor / total if total > 0 else 1.0
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in col.params]
        if factor != 1.0:
            grads = torch._foreach_mul(grads, factor)
        big = list(torch._foreach_norm(grads))
        if world > 1 and any(p.grad is not None and hasattr(p.grad, "to_local") for p in col.params):
            # sharded gradients (FSDP2): each process holds its own shard of the reduced gradient,
            # so |g|^2 per tensor is the sum over processes of their shards' squared norms (an
            # all-reduce of one number per tensor, queued without waiting on the host)
            sq = torch.stack(big).to(torch.float64).square_()
            dist.all_reduce(sq, group=process_group)
            self.last_collective_bytes += sq.numel() * sq.element_size()
            big = list(sq.sqrt_().unbind())
        norms, scales = raw if raw is not None else (None, [1.0])
        # Under torch.distributed, this process's sums and counts are summed over processes when
        # folded: one small collective per fold (logged steps) instead of one per step. Every
        # process runs the same number of backward passes per step, so k is known (and checked
        # when folded).
        # per example, processes may hold different numbers of examples: k comes from the fold's sums
        entry = _Pending(norms, sums, big, -1 if per_example else k, tuple(scales), (float(k_local), inv_size_sum, local_batch),
                         loss_reduction == "sum", local=world > 1)
        self._pending.append(entry)
        if not entry.local:  # one process: the step's batch is known here (else the fold sums it)
            self._batch = batch
        finite = None
        if "gr_t" in self.statistics or summarize:
            # under DDP only the reduced gradient, the same on every process, decides (a local
            # non-finite gradient makes it non-finite too): every process takes the same branch
            parts = torch.stack(big if entry.local or norms is None else list(norms) + big)
            finite = bool(torch.isfinite(parts).all()) and (entry.local or sums is None or bool(torch.isfinite(sums).all()))  # a sync
        if "gr_t" in self.statistics and finite:
            self.temporal.update(grads, checked=True)
        if len(self._pending) >= self.max_pending:
            self._fold()
        if not summarize:
            return None
        self._fold()
        self.last_elementwise = None
        if finite and col.elementwise and k >= 2:
            if reduced is not None and reduced.elementwise is not None:  # summed in DDP's all-reduce
                self.last_elementwise = (list(reduced.elementwise), k)
            elif self.moments_only:  # a VR optimizer's moments, as sums of squares
                sq_sum = col.elementwise_sq_sum()
                if world > 1:
                    sq_sum = self._all_reduce(sq_sum, process_group)
                self.last_elementwise = (sq_sum, k)
            elif world == 1:
                self.last_elementwise = (col.elementwise_sq_sum(), k)
            if not self.moments_only:
                self._gsnr(grads, k, world, loss_reduction == "sum", process_group)
        if entry.local:  # the global batch, summed over processes by the fold
            batch = self._batch
        return self._summary(batch, per_layer)

    def summarize(self, per_layer: bool = False) -> dict[str, float]:
        """The current values without a new step: the pending steps are folded in first (e.g. at
        the end of a run, so that its last steps are reported). Under ``torch.distributed`` a
        collective, like a summarized :meth:`finish_step`. GSNR is not included (it needs a
        step's elementwise moments)."""
        self._fold()
        return self._summary(self._batch, per_layer)

    def _group_sums(self, pending: list[_Pending], sums: Tensor) -> None:
        r"""Write :math:`\sum_j |g_j|^2` per tensor of each step into ``sums`` (``[steps, tensors]``,
        float64)."""
        device = sums.device
        given = [i for i, e in enumerate(pending) if e.norms is None]
        if given:
            sums[torch.tensor(given, device=device)] = torch.stack([pending[i].sq.to(device) for i in given]).to(torch.float64)  # type: ignore[union-attr]
        # steps with the same number of captured groups in one pass
        by_groups: dict[int, list[int]] = {}
        for i, entry in enumerate(pending):
            if entry.norms is not None:
                by_groups.setdefault(len(entry.scales), []).append(i)
        for groups, idx in by_groups.items():
            rows = _stack([pending[i].norms for i in idx]).to(device=device, dtype=torch.float64).view(len(idx), groups, -1).square_()  # type: ignore[misc]
            scales = torch.tensor([pending[i].scales for i in idx], dtype=torch.float64, device=device).square_()
            sums[torch.tensor(idx, device=device)] = (rows * scales[:, :, None]).sum(1)

    def _rows(self, pending: list[_Pending]) -> Tensor:
        r"""Each step's :math:`\sum_j |g_j|^2` per tensor and its counts, ``[steps, P + 3]`` in
        float64, summed over processes where they are still local (in one all-reduce)."""
        device = self.collector.params[0].device
        rows = torch.empty(len(pending), len(self.names) + 3, dtype=torch.float64, device=device)
        self._group_sums(pending, rows[:, :-3])
        stacked = [i for i, e in enumerate(pending) if isinstance(e.counts, Tensor)]
        if stacked:
            rows[torch.tensor(stacked, device=device), -3:] = torch.stack([pending[i].counts.to(device) for i in stacked]).to(torch.float64)  # type: ignore[union-attr]
        if len(stacked) < len(pending):
            taken = [i for i, e in enumerate(pending) if not isinstance(e.counts, Tensor)]
            rows[torch.tensor(taken, device=device), -3:] = torch.tensor([pending[i].counts for i in taken], dtype=torch.float64, device=device)
        local = [i for i, e in enumerate(pending) if e.local]
        if local:
            at = None if len(local) == len(pending) else torch.tensor(local, device=device)
            part = rows if at is None else rows[at]
            dist.all_reduce(part, group=self._group)
            self.last_collective_bytes += part.numel() * part.element_size()
            if at is not None:
                rows[at] = part
            self._batch = float(part[-1, -1])  # the last step's global batch (a sync, once per fold)
        return rows

    def reduce_pending(self) -> None:
        """Sum the pending steps' per-process moments over processes, in one all-reduce.

        Called by :meth:`state_dict` (a fold does the same on its own); under
        ``torch.distributed`` every process must call it at the same point (Lightning saves
        checkpoints on every process)."""
        if not any(e.local for e in self._pending):
            return
        rows = self._rows(self._pending)
        self._pending = [
            e._replace(norms=None, sq=row[:-3], scales=(1.0,), counts=row[-3:], local=False) for e, row in zip(self._pending, rows)
        ]

    def _fold(self) -> None:
        """Count the pending steps, turn them into unbiased estimates, fold those into the EMAs."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device = self.collector.params[0].device
        rows = self._rows(pending)
        sums, (rk, inv, total) = rows[:, :-3], rows[:, -3:].unbind(1)
        given = torch.tensor([e.k for e in pending], dtype=torch.float64, device=device)
        k = torch.where(given < 0, rk.round(), given)
        if not torch.equal(rk.round(), k):
            raise RuntimeError(
                "processes disagree on the number of gradient groups per step: every process must run "
                "the same number of backward passes (micro-batches) per optimizer step"
            )
        summed_loss = torch.tensor([e.summed_loss for e in pending], device=device)
        # the weights of tr(Sigma) in E[S_small] and E[S_big] (noise_scale_from_moments)
        a = torch.where(k >= 2, inv / k, torch.nan)
        c = torch.where(summed_loss, 1.0 / total, inv / k.clamp_min(1) ** 2)
        big = _stack([e.big for e in pending]).to(device=device, dtype=torch.float64).square_()
        finite = torch.isfinite(sums).all(1) & torch.isfinite(big).all(1)
        if "b_simple" in self.statistics:
            # a group without a size (an empty micro-batch on some process) leaves the step's
            # weights undefined on every process alike (they are summed over processes first):
            # the step is skipped and counted, the same on every rank
            finite &= (k < 2) | (torch.isfinite(a) & torch.isfinite(c))
        self.skipped_steps += int((~finite).sum())
        self.steps += int(finite.sum())
        if "b_simple" in self.statistics:
            usable = finite & (k >= 2) & torch.isfinite(a) & torch.isfinite(c)
            est = noise_scale_from_moments(sums[usable] / k[usable, None], big[usable], a[usable, None], c[usable, None])
            self.noise_scale.update_many(est.grad_sq, est.trace_cov)

    def _all_reduce(self, tensors: list[Tensor], process_group: Any) -> list[Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=process_group)
        self.last_collective_bytes += flat.numel() * flat.element_size()
        return [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]

    def _gsnr(self, grads: Sequence[Tensor], k: int, world: int, summed_loss: bool, process_group: Any) -> bool:
        """Fold the step's elementwise moments into the GSNR statistic. Under torch.distributed
        the processes' centred sums are combined about the reduced mean gradient ``c`` (Chan et
        al.: :math:`M_2 = \sum_r M_{2,r} + k_r (\bar g_r - c)^2 - k (\bar g - c)^2`), in one
        parameter-sized all-reduce."""
        col = self.collector
        means, m2s, k_local = col.elementwise_moments()
        inv, _ = size_sums(col.group_sizes)
        if world > 1:
            centres = [g.to(m.dtype) for g, m in zip(grads, means)]
            offsets = torch._foreach_sub(means, centres)
            parts = torch._foreach_addcmul(m2s, offsets, offsets, value=float(k_local))
            extra = [torch.tensor([inv], dtype=parts[0].dtype, device=parts[0].device)]
            if summed_loss:  # .grad is the sample-weighted mean, not the groups' mean: carry the offset
                extra += list(torch._foreach_mul(offsets, float(k_local)))
            reduced = self._all_reduce(list(parts) + extra, process_group)
            m2s, inv = reduced[: len(parts)], float(reduced[len(parts)])
            if summed_loss:
                shift = torch._foreach_div(reduced[len(parts) + 1 :], float(k))
                means = torch._foreach_add(centres, shift)
                m2s = torch._foreach_addcmul(m2s, shift, shift, value=-float(k))
            else:
                means = centres
        if not (math.isfinite(inv) and inv > 0):  # a group without a size: no per-sample variance
            return False
        folded = self.gsnr.update(means, m2s, k, inv_size_sum=inv)
        if folded and self._histograms:
            self.histograms = {name: r[~torch.isnan(r)].flatten().cpu() for name, r in zip(self.names, self.gsnr.ratios())}
        return folded

    def _summary(self, batch: float, per_layer: bool) -> dict[str, float]:
        out: dict[str, float] = {"batch_size": batch, "skipped_steps": float(self.skipped_steps)}
        if self.coverage is not None:
            out["coverage"] = self.coverage
        layers: dict[str, Tensor] = {}
        if "b_simple" in self.statistics and self.noise_scale.grad_sq.count:
            for scope, values in (("total", self.noise_scale.reading(self.level)),
                                  ("layer", self.noise_scale.reading(self.level, total=False) if per_layer else {})):
                if "gr_s" in self.statistics and values:
                    values.update(_gr_s_reading(values, batch))
                if scope == "total":
                    out.update({key: float(value) for key, value in values.items()})
                else:
                    layers.update(values)
        if "gr_t" in self.statistics and self.temporal.count:
            reading = self.temporal.reading(self.level)
            for key in ("gr_t", "gr_t_lo", "gr_t_hi"):
                out[key] = float(reading[key])
                layers[key] = reading[f"layer_{key}"]
        if "gsnr" in self.statistics and self.gsnr.count and not self.moments_only:
            reading = self.gsnr.reading(self.level)
            for key in ("gsnr", "gsnr_lo", "gsnr_hi"):
                out[key] = float(reading[key])
                if f"layer_{key}" in reading:
                    layers[key] = reading[f"layer_{key}"]
        if per_layer:
            for stat, values in layers.items():
                for name, value in zip(self.names, values.tolist()):
                    out[f"layer/{name}/{stat}"] = value
        return out

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The statistics' state. Under ``torch.distributed``, a collective: call it on every
        process (as Lightning does), since pending steps are first summed over processes."""
        # Pending steps are saved as they are (not folded) so that a resumed run folds at the
        # same steps as an uninterrupted one and logs bit-identical values.
        self.reduce_pending()
        return {
            "pending": [_saved_entry(e) for e in self._pending],
            "names": list(self.names),
            "noise_scale": self.noise_scale.state_dict(),
            "temporal": self.temporal.state_dict(),
            "gsnr": self.gsnr.state_dict(),
            "skipped_steps": self.skipped_steps,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("the checkpoint's gradient-noise state is for other parameters: " f"{state['names'][:3]}...")
        self.noise_scale.load_state_dict(state["noise_scale"])
        self.temporal.load_state_dict(state["temporal"], device=self.collector.params[0].device)
        if "gsnr" in state:  # (absent from checkpoints saved before the GSNR was smoothed)
            self.gsnr.load_state_dict(state["gsnr"], device=self.collector.params[0].device)
        self.skipped_steps = int(state["skipped_steps"])
        device = self.collector.params[0].device
        self._pending = [_loaded_entry(e, device) for e in state.get("pending", [])]
        self.steps = int(state["steps"])
