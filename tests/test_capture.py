"""The moment collector on its own: plain PyTorch, no Lightning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradnoise.capture import GradientMomentCollector, GradNoiseTracker


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.used = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)

    def forward(self, x):
        return self.used(torch.relu(self.body(x)))


def test_unused_parameter_counts_as_zero_and_shared_weight_once() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    col = GradientMomentCollector(model).attach()
    for _ in range(2):
        col.begin_group(size=5)
        model(torch.randn(5, 3)).sum().backward()
        col.end_group()
    sq = col.group_sq_norms()
    names = col.names
    unused = [i for i, n in enumerate(names) if n.startswith("unused")]
    assert sq.shape == (2, 6) and bool((sq[:, unused] == 0).all()) and bool((sq[:, :4] > 0).all())

    # a weight used twice in one graph: the hook sees the summed gradient once
    lin = nn.Linear(3, 3, bias=False)
    c2 = GradientMomentCollector(lin).attach()
    x = torch.randn(2, 3)
    c2.begin_group()
    lin(lin(x)).sum().backward()
    c2.end_group()
    assert float(c2.group_sq_norms()[0, 0]) == pytest.approx(float(lin.weight.grad.square().sum()), rel=1e-6)


def test_final_mode_reads_grad_at_the_end_of_backward_like_the_hooks() -> None:
    # one group per step from zeroed gradients: the end-of-backward read equals the per-tensor
    # hooks, unused tensors count as zero, and the elementwise squares agree too
    torch.manual_seed(3)
    model = TwoHeads()
    got = {}
    for mode in ("hooks", "final"):
        col = GradientMomentCollector(model, elementwise=True, mode=mode).attach()
        rows = []
        for step in range(3):
            model.zero_grad(set_to_none=True)
            x = torch.randn(6, 3, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean() * 2.0
            col.begin_group(scale=0.5, size=6, loss=loss)
            loss.backward()
            col.end_group()
            rows.append(col.group_sq_norms())
            squares = [t.clone() for t in col.elementwise_sq_sum()]
            col.reset()
        got[mode] = (torch.cat(rows), squares)
        col.detach()
    assert torch.equal(got["hooks"][0], got["final"][0])
    unused = [i for i, n in enumerate(col.names) if n.startswith("unused")]
    assert bool((got["final"][0][:, unused] == 0).all()) and bool((got["final"][0][:, :4] > 0).all())
    # against .grad itself, descaled: |0.5 * grad|^2
    want = torch.stack([(0.5 * p.grad).square().sum() if p.grad is not None else torch.tensor(0.0) for p in model.parameters()])
    assert torch.allclose(got["final"][0][-1].float(), want, rtol=1e-6)
    for a, b in zip(*(got[m][1] for m in ("hooks", "final"))):
        assert torch.equal(a, b)


def test_final_mode_needs_the_loss() -> None:
    model = nn.Linear(2, 1)
    col = GradientMomentCollector(model, mode="final").attach()
    with pytest.raises(ValueError, match="needs the group's loss"):
        col.begin_group()
    with pytest.raises(ValueError, match="needs the group's loss"):
        col.begin_group(loss=torch.ones(()))  # does not require grad
    loss = model(torch.ones(1, 2)).sum()
    col.begin_group(loss=loss)
    loss.backward()
    col.end_group()
    assert col.num_groups == 1 and float(col.group_sq_norms().sum()) == pytest.approx(
        sum(float(p.grad.square().sum()) for p in model.parameters()), rel=1e-6
    )
    # a second backward through the same loss: the squares of the first read are already summed
    col.reset()
    col.set_elementwise(True)
    loss = model(torch.ones(1, 2)).sum()
    col.begin_group(loss=loss)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per group"):
        loss.backward()


def test_scale_undoes_loss_scaling_exactly_in_float64() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 2).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    norms = []
    for loss_scale in (1.0, 1024.0):
        model.zero_grad()
        with GradientMomentCollector(model, elementwise=True) as col:
            col.begin_group(scale=1.0 / loss_scale, size=8)
            (model(x).square().mean() * loss_scale).backward()
            col.end_group()
            norms.append((col.group_sq_norms(), [t.clone() for t in col.elementwise_sq_sum()]))
    assert torch.allclose(norms[0][0], norms[1][0], rtol=1e-12)
    for a, b in zip(norms[0][1], norms[1][1]):
        assert torch.allclose(a, b, rtol=1e-12)


def test_detached_or_idle_collector_records_nothing() -> None:
    model = nn.Linear(2, 1)
    col = GradientMomentCollector(model).attach()
    model(torch.ones(1, 2)).sum().backward()  # no open group
    assert col.num_groups == 0
    col.detach()
    col.begin_group()
    model(torch.ones(1, 2)).sum().backward()
    col.end_group()
    assert bool((col.group_sq_norms() == 0).all())


def test_misuse_is_reported() -> None:
    col = GradientMomentCollector(nn.Linear(2, 1))
    with pytest.raises(RuntimeError, match="without begin_group"):
        col.end_group()
    col.begin_group()
    with pytest.raises(RuntimeError, match="twice"):
        col.begin_group()
    with pytest.raises(RuntimeError, match="elementwise=True"):
        col.elementwise_sq_sum()
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        GradientMomentCollector(frozen)


def test_tracker_without_lightning_matches_direct_formula() -> None:
    # accumulate 3 micro-batches by hand, as a plain PyTorch loop would
    torch.manual_seed(2)
    model = nn.Linear(3, 1)
    tracker = GradNoiseTracker(model, statistics=("b_simple", "gr_s"), ema_decay=0.0).attach()
    xs = torch.randn(3, 7, 3)
    tracker.begin_step()
    model.zero_grad()
    group_grads = []
    for xb in xs:
        tracker.begin_group(scale=3.0, size=7)
        (model(xb).square().mean() / 3).backward()
        tracker.end_group()
    for xb in xs:  # the reference: each group's gradient separately
        g = torch.autograd.grad(model(xb).square().mean(), list(model.parameters()))
        group_grads.append(torch.cat([t.flatten() for t in g]))
    out = tracker.finish_step(loss_divisor=3, summarize=True)
    G = torch.stack(group_grads).double()
    s_small, s_big = float(G.square().sum(1).mean()), float(G.mean(0).square().sum())
    b, B = 7, 21
    tr = (s_small - s_big) / (1 / b - 1 / B)
    g2 = (B * s_big - b * s_small) / (B - b)
    assert out["trace_cov"] == pytest.approx(tr, rel=1e-5)
    assert out["grad_sq"] == pytest.approx(g2, rel=1e-5)
    assert out["batch_size"] == 21


@pytest.mark.parametrize("start", ["none", "zeros", "partial"])
def test_swap_mode_equals_hooks_and_leaves_grad_bit_identical(start: str) -> None:
    """Swap capture (set .grad aside, read it, add it back) against per-tensor hooks and against
    no capture at all, with an unused head, grads that start as None, zeros or a mix, and a
    group in which one more tensor gets no gradient."""
    torch.manual_seed(3)
    batches = [torch.randn(5, 3) for _ in range(4)]
    results = {}
    for mode in ("none", "hooks", "swap"):
        model = TwoHeads()
        model.load_state_dict(_seeded_state())
        if start == "zeros":
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        elif start == "partial":
            model.body.weight.grad = torch.ones_like(model.body.weight)
        col = None if mode == "none" else GradientMomentCollector(model, elementwise=True, mode=mode).attach()
        for j, xb in enumerate(batches):
            if col is not None:
                col.begin_group(scale=2.0, size=5)
            out = model(xb) if j != 2 else model.body(xb).sum(1, keepdim=True)  # group 2: only `body`
            (out.square().mean() / 4).backward()
            if col is not None:
                col.end_group()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        stats = None if col is None else (col.group_sq_norms(), [t.clone() for t in col.elementwise_sq_sum()])
        results[mode] = (grads, stats)
    for mode in ("hooks", "swap"):
        for a, b in zip(results["none"][0], results[mode][0]):
            assert (a is None and b is None) or torch.equal(a, b)
    sq_h, el_h = results["hooks"][1]
    sq_s, el_s = results["swap"][1]
    assert torch.allclose(sq_h, sq_s, rtol=1e-6, atol=0)
    assert bool((sq_s[2, 2:] == 0).all()) and bool((sq_s[:, 4:] == 0).all())
    for a, b in zip(el_h, el_s):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


def _seeded_state() -> dict:
    torch.manual_seed(11)
    return TwoHeads().state_dict()


def test_cancelled_swap_group_keeps_gradients_and_drops_its_norms() -> None:
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    col = GradientMomentCollector(model, mode="swap").attach()
    col.begin_group(size=4)
    model(torch.randn(4, 3)).sum().backward()
    col.end_group()
    first = col.group_sq_norms().clone()
    col.begin_group(size=4)
    model(torch.randn(4, 3)).sum().backward()
    col.cancel_group()
    assert col.num_groups == 1 and torch.equal(col.group_sq_norms(), first)
    assert col.raw_norms() is not None and len(col.raw_norms()[0]) == 2


def test_comm_state_rejects_a_bad_pack_limit() -> None:
    from lightning_gradnoise.capture import GradNoiseCommState

    with pytest.raises(ValueError, match="pack_limit=-1"):
        GradNoiseCommState(pack_limit=-1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pending_steps_saved_with_explicit_weights_resume_to_the_same_values(reduction: str) -> None:
    # Checkpoints written before pending steps kept their counts hold the weights a and c of
    # noise_scale_from_moments instead; loading them must fold to the same statistics.
    def run(tracker: GradNoiseTracker, model: nn.Module, seed: int, summarize: bool) -> dict | None:
        gen = torch.Generator().manual_seed(seed)
        model.zero_grad()
        tracker.begin_step()
        for size in (3, 5, 8):  # unequal groups: a summed loss weights them differently
            xb = torch.randn(size, 3, generator=gen)
            loss = model(xb).square().sum() if reduction == "sum" else model(xb).square().mean() / 3
            tracker.begin_group(scale=1.0 if reduction == "sum" else 3.0, size=size)
            loss.backward()
            tracker.end_group()
        return tracker.finish_step(loss_divisor=1.0 if reduction == "sum" else 3.0, loss_reduction=reduction, summarize=summarize)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    first = GradNoiseTracker(model, statistics=("b_simple",)).attach()
    for seed in range(4):
        run(first, model, seed, summarize=False)
    state = first.state_dict()
    first.detach()
    old = dict(state, pending=[])
    for entry in state["pending"]:
        k, inv, batch = entry["counts"].tolist()
        a = inv / k
        c = 1.0 / batch if reduction == "sum" else inv / k**2
        old["pending"].append({key: v for key, v in entry.items() if key not in ("counts", "summed_loss")} | {"a": a, "c": c, "counts": None})
    results = []
    for saved in (state, old):
        tracker = GradNoiseTracker(model, statistics=("b_simple",)).attach()
        tracker.load_state_dict(saved)
        results.append(run(tracker, model, 99, summarize=True))
        tracker.detach()
    # (after five steps of three small groups B_simple may not be determined yet: NaN in both)
    for key in ("b_simple", "grad_sq", "trace_cov", "trace_cov_lo", "trace_cov_hi"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-12, nan_ok=True), key
    assert math.isfinite(results[0]["trace_cov"])
    assert results[0]["batch_size"] == results[1]["batch_size"] == 16
