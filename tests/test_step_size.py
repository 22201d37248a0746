"""The line-search learning-rate rule: its statistic against closed forms, its parts, and the rule on
the noisy quadratic model against the best constant learning rate."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from helpers import LinRegTruth
from lightning_gradnoise.capture import StepProbe
from lightning_gradnoise.control import StepSizeController, noise_coupling, step_growth
from lightning_gradnoise.nqm import NQM
from lightning_gradnoise.stats import LossTrend, StepSizeRatio, fieller_interval, ratio_interval


@pytest.mark.parametrize("batch", [4, 32])
def test_the_ratio_at_a_frozen_point_is_the_greedy_step_of_mccandlish(batch: int) -> None:
    # linear regression, x ~ N(0, I): H = I, G = delta, tr(H Sigma) = tr(Sigma); the loss along the step
    # is least at eps_opt = |G|^2 / (G'HG + tr(H Sigma)/B) (McCandlish Eq. 2.6), i.e. r = eps_opt / lr
    truth = LinRegTruth(d=8, seed=1)
    w0 = truth.w0.double()
    eps_opt = truth.grad_sq / (truth.grad_sq + truth.trace_cov / batch)
    lr = 0.8 * eps_opt  # a step long enough for its curvature to show over the noise
    ratio = StepSizeRatio(decay=0.9995)
    g = torch.Generator().manual_seed(0)
    n = 6000
    x = torch.randn(n, batch, truth.d, generator=g, dtype=torch.float64)
    y = x @ truth.w_star.double() + truth.noise_std * torch.randn(n, batch, generator=g, dtype=torch.float64)
    grads = torch.einsum("nbd,nb->nd", x, x @ w0 - y) / batch
    steps = lr * grads
    x2 = torch.randn(n, batch, truth.d, generator=g, dtype=torch.float64)
    y2 = x2 @ truth.w_star.double() + truth.noise_std * torch.randn(n, batch, generator=g, dtype=torch.float64)
    after = torch.einsum("nbd,nb->nd", x2, torch.einsum("nbd,nd->nb", x2, w0 - steps) - y2) / batch  # at w0 - step
    assert ratio.update_many((steps * grads).sum(1), (steps * after).sum(1), torch.full((n,), lr * truth.trace_cov / batch)) == n
    reading = ratio.reading(0.99)
    assert reading["lr_ratio"] * lr == pytest.approx(eps_opt, rel=0.06)
    assert reading["lr_ratio_lo"] * lr < eps_opt < reading["lr_ratio_hi"] * lr


def test_ratio_interval_on_each_branch() -> None:
    args = (10.0, 2.0, 1.0, 0.01, 0.05)
    lo, hi = ratio_interval(*args, 2.0)
    want = fieller_interval(*(torch.tensor(a) for a in args), 2.0)
    assert (lo, hi) == pytest.approx((float(want[0]), float(want[1])))
    # the numerator resolved, the denominator not: the step is far too short, [rho+, inf)
    num, den, v_num, v_den, cov, t = 10.0, 0.1, 1.0, 1.0, 0.0, 2.0
    lo, hi = ratio_interval(num, den, v_num, v_den, cov, t)
    assert hi == math.inf and lo > 0
    a, b, c = den * den - t * t * v_den, den * num - t * t * cov, num * num - t * t * v_num
    assert a * lo * lo - 2 * b * lo + c == pytest.approx(0.0, abs=1e-9)  # on the set's boundary
    assert ratio_interval(10.0, -2.0, 1.0, 0.01, 0.0, 2.0) == (math.inf, math.inf)  # no minimum along the step
    assert ratio_interval(0.1, 0.1, 1.0, 1.0, 0.0, 2.0) == (-math.inf, math.inf)  # nothing resolved


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
], ids=["sgd", "momentum-dampening", "nesterov", "adam", "adamw-amsgrad"])
def test_noise_coupling_is_the_derivative_of_the_step_in_the_current_gradient(make) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = make([w])
    for _ in range(3):  # some state first
        w.grad = torch.randn(6, dtype=torch.float64)
        opt.step()
    grad = torch.randn(6, dtype=torch.float64)

    def step_with(g: torch.Tensor) -> torch.Tensor:
        w2 = nn.Parameter(w.detach().clone())
        opt2 = make([w2])
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        w2.grad = g.clone()
        opt2.step()
        return w.detach() - w2.detach(), opt2, w2

    base, opt_after, w_after = step_with(grad)
    (coupling,) = noise_coupling(opt_after, [w_after])
    coupling = torch.as_tensor(coupling, dtype=torch.float64).expand(6)
    eps = 1e-6
    for i in range(6):
        bumped = grad.clone()
        bumped[i] += eps
        derivative = (step_with(bumped)[0][i] - base[i]) / eps
        # Adam's v depends on g at order 1 - beta2: left out of J
        assert float(coupling[i]) == pytest.approx(float(derivative), rel=0.05)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
], ids=["adam", "adamw-amsgrad"])
def test_adams_coupling_in_float32_matches_float64(make) -> None:
    # float32 parameters get J in float32 (no float64 copy of the moments every step): the same
    # J as the float64 computation of the same state, to float32's precision
    torch.manual_seed(0)
    w64 = nn.Parameter(torch.randn(1000, dtype=torch.float64))
    w32 = nn.Parameter(w64.detach().float())
    opt64, opt32 = make([w64]), make([w32])
    for _ in range(5):
        grad = torch.randn(1000, dtype=torch.float64) * torch.logspace(-4, 1, 1000, dtype=torch.float64)
        w64.grad, w32.grad = grad.clone(), grad.float()
        opt64.step()
        opt32.step()
    (j64,), (j32,) = noise_coupling(opt64, [w64]), noise_coupling(opt32, [w32])
    assert j64.dtype == torch.float64 and j32.dtype == torch.float32
    assert torch.allclose(j32.double(), j64, rtol=1e-4, atol=1e-5 * float(j64.abs().max()))  # J crosses zero in places
    assert float((w32.grad.square() * j32).sum(dtype=torch.float64)) == pytest.approx(float((w64.grad.square() * j64).sum()), rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.5),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.1),
], ids=["sgd", "momentum", "dampening", "nesterov", "adam"])
def test_step_growth_is_how_much_longer_the_step_gets_at_a_constant_gradient(make) -> None:
    # a linear loss: the same gradient at every step; the step at t against the step long after
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = make([w])
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    steps = []
    for _ in range(400):
        before = w.detach().clone()
        opt.zero_grad()
        (w @ g).backward()
        opt.step()
        steps.append(float((w.detach() - before).norm()))
    for t in (1, 2, 5, 20):
        assert step_growth(opt, t) == pytest.approx(steps[-1] / steps[t - 1], rel=1e-9)


def test_a_pair_counted_at_its_grown_step_reads_the_ratio_of_that_step() -> None:
    # c scales with the step's length, d with its square: r of a step f times longer is r / f
    pairs = [(2.0, 1.0, 0.1), (2.2, 1.1, 0.1), (1.8, 0.8, 0.1), (2.1, 1.0, 0.1)]
    plain, grown, many = StepSizeRatio(), StepSizeRatio(), StepSizeRatio()
    for own, nxt, noise in pairs:
        plain.update(own, nxt, noise)
        grown.update(own, nxt, noise, growth=4.0)
    assert grown.reading()["lr_ratio"] == pytest.approx(plain.reading()["lr_ratio"] / 4.0)
    columns = [torch.tensor(col, dtype=torch.float64) for col in zip(*pairs)]
    many.update_many(*columns, growth=torch.full((4,), 4.0, dtype=torch.float64))
    assert many.reading() == pytest.approx(grown.reading())
    with pytest.raises(ValueError, match="growth"):
        grown.update(1.0, 0.5, 0.0, growth=0.5)


def test_the_loss_slope_over_the_last_steps_sees_a_rise_the_whole_window_hides() -> None:
    trend = LossTrend()
    for step in range(30):
        trend.update(step, 3.0 - 0.1 * step if step < 20 else 1.0 + 0.05 * (step - 20) + 0.01 * (-1) ** step)
    assert trend.slope_interval()[1] < 0  # the whole window still falls
    lo, hi = trend.slope_interval(last=10)
    assert 0 < lo < 0.05 < hi


def test_noise_coupling_refuses_optimizers_whose_step_it_does_not_know() -> None:
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="rule='gr_t'"):
        noise_coupling(torch.optim.RMSprop(p, lr=0.1), p)


def test_the_probe_measures_the_step_against_the_gradients_around_it() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    probe = StepProbe(lin)
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    prev_step = None
    for t in range(3):
        opt.zero_grad()
        lin(x[t]).square().sum().backward()
        grad = flat(p.grad for p in lin.parameters())
        following = probe.before_step()
        if prev_step is None:
            assert following is None
        else:
            assert following == pytest.approx(float(prev_step @ grad), rel=1e-12)
        before = flat(p.detach().clone() for p in lin.parameters())
        opt.step()
        step = before - flat(p.detach() for p in lin.parameters())
        own, jg2, g2 = probe.after_step(noise_coupling(opt, probe.params))
        assert own == pytest.approx(float(step @ grad), rel=1e-12)
        assert g2 == pytest.approx(float(grad @ grad), rel=1e-12)
        assert jg2 == pytest.approx(0.1 * float(grad @ grad), rel=1e-12)
        prev_step = step
    # a step that does not move anything (a skipped step) is not a step
    probe.before_step()
    assert probe.after_step(0.1) is None


def test_the_rule_lowers_only_once_the_loss_stops_falling_and_remembers_an_overshoot() -> None:
    c = StepSizeController(first_steps=0, step_factor=1.5)
    low = (0.2, 0.5)
    held = c.decide(0.35, low, scale=1.0, step=10, pairs=10, loss_slope=(-0.3, -0.1))
    assert not held.changed and "still falls" in held.reason
    # an unresolved slope whose fit still falls is not a plateau either
    assert not c.decide(0.35, low, scale=1.0, step=10, pairs=10, loss_slope=(-0.3, 0.1)).changed
    # a step much too short is never lowered, plateau or not
    assert not c.decide(5.0, (1.5, 9.0), scale=1.0, step=10, pairs=10, loss_slope=(-0.1, 0.3)).changed
    assert c.decide(0.35, low, scale=1.0, step=10, pairs=10, loss_slope=(-0.1, 0.3)).value == 0.5  # at most halved
    assert c.decide(0.9, (0.6, 1.3), scale=0.5, step=12, pairs=10, loss_slope=(-0.1, 0.3)).value == pytest.approx(0.5 / math.sqrt(2))  # at least by 1/sqrt(2)
    assert not c.decide(5.0, (3.0, 9.0), scale=0.5, step=15, pairs=15).changed  # tested every 10 pairs only
    assert not c.decide(5.0, (3.0, 9.0), scale=0.5, step=15, pairs=5).changed  # too few pairs
    # raise 1.5x, find it overshoots: the raised rate becomes a ceiling
    assert c.decide(5.0, (3.0, 9.0), scale=0.5, step=20, pairs=10).value == pytest.approx(0.75)
    assert c.decide(0.3, low, scale=0.75, step=30, pairs=10, loss_slope=(-0.1, 0.3)).value == pytest.approx(0.375)
    assert c.ceiling == pytest.approx(0.75)
    assert c.decide(5.0, (3.0, 9.0), scale=0.5, step=40, pairs=10).value == pytest.approx(0.75 / math.sqrt(1.5))
    assert not StepSizeController().decide(5.0, (3.0, 9.0), scale=1.0, step=10, pairs=10).changed  # none before step 20
    assert c.last_action == "raise"


def test_a_rising_loss_lowers_the_rate_whatever_r_reads_and_caps_a_raise() -> None:
    c = StepSizeController()  # first_steps 20: r is not read before, the loss is
    assert c.last_action == "none"
    flat = c.decide(0.6, (0.5, 0.7), scale=1.0, step=10, pairs=10, recent_slope=(-0.02, 0.05))
    assert not flat.changed and c.last_action == "none"  # untested before step 20: not settled either
    rising = c.decide(0.6, (0.5, 0.7), scale=1.0, step=10, pairs=10, recent_slope=(0.01, 0.08))
    assert rising.changed and rising.value == 0.5 and "interval 0.01 to 0.08" in rising.reason and c.last_action == "lower"
    assert c.ceiling == math.inf  # not after a raise: a false alarm must not cap the rate for good
    # too late for the last-10-steps test (pairs > 20), but the loss since the change rises too
    assert not c.decide(0.6, (0.5, 0.7), scale=0.5, step=40, pairs=30, recent_slope=(0.01, 0.08)).changed
    assert c.decide(0.6, (0.5, 0.7), scale=0.5, step=40, pairs=30, loss_slope=(0.001, 0.002)).value == 0.25
    # raised, and the loss rises: the raised rate becomes a ceiling
    up = c.decide(6.0, (5.0, 9.0), scale=0.25, step=50, pairs=10, recent_slope=(-0.1, -0.01))
    assert up.changed and up.value == 0.5
    assert c.decide(0.6, (0.5, 0.7), scale=0.5, step=60, pairs=10, recent_slope=(0.01, 0.08)).value == 0.25
    assert c.ceiling == 0.5
    held = c.decide(0.9, (0.6, 1.3), scale=0.25, step=70, pairs=10, loss_slope=(-0.1, -0.05))
    assert not held.changed and c.last_action == "hold"
    restored = StepSizeController()
    restored.load_state_dict(c.state_dict())
    assert (restored.ceiling, restored.last_action, restored.last_change) == (c.ceiling, c.last_action, c.last_change)


def test_a_loss_back_above_where_the_run_started_lowers_the_rate_from_the_first_test() -> None:
    c = StepSizeController()
    # a start that falls 0.05 a step with noise 0.01: L_0 = 2.3 on the fitted line, not the first (noisy) loss
    g = torch.Generator().manual_seed(0)
    first = [2.3 - 0.05 * i + 0.01 * float(torch.randn(1, generator=g)) for i in range(10)]
    limit = c.loss_limit(first)
    residuals = [v - (2.3 - 0.05 * i) for i, v in enumerate(first)]
    assert 2.3 * 1.1 < limit < 2.3 * 1.1 + 5 * 0.03 and max(residuals) < 0.03
    assert math.isnan(c.loss_limit([2.3, math.nan, 2.2])) and c.loss_limit([2.3, math.nan, 2.2, 2.1]) > 2.5
    assert StepSizeController(rise_limit=math.inf).loss_limit(first) == math.inf  # the test turned off
    # step 10, before r is read (step 20): a peak above the limit lowers, one below does not
    assert not c.decide(0.6, (0.5, 0.7), scale=1.0, step=10, pairs=10, peak_loss=limit - 0.01, loss_limit=limit).changed
    down = c.decide(0.6, (0.5, 0.7), scale=1.0, step=10, pairs=10, peak_loss=4.1, loss_limit=limit)
    assert down.changed and down.value == 0.5 and "diverges" in down.reason and f"{limit:.4g}" in down.reason
    assert c.ceiling == math.inf and c.last_action == "lower"
    # whatever r reads: even a step that looks too short
    assert c.decide(8.0, (4.0, 20.0), scale=0.5, step=30, pairs=10, peak_loss=4.1, loss_limit=limit).value == 0.25
    assert c.decide(8.0, (4.0, 20.0), scale=0.25, step=40, pairs=10, peak_loss=4.1, loss_limit=math.nan).value == 0.5  # no limit yet


def test_the_divergence_test_never_fires_on_the_noisy_quadratic_from_a_slow_start(monkeypatch) -> None:
    # NQM at B = 16 from 10x below its best rate: the batch loss's noise is about 20% of the loss, and a
    # limit without its noise term (or with three times a 10-loss estimate of it) fired there by chance
    h = 1.0 / torch.arange(1, 101, dtype=torch.float64)
    fired = {"decide": [], "diverged": []}

    def watch(name):
        original = getattr(StepSizeController, name)

        def watching(self, *args, **kwargs):
            decision = original(self, *args, **kwargs)
            fired[name].append("diverges" in decision.reason)
            return decision

        monkeypatch.setattr(StepSizeController, name, watching)

    watch("decide")
    watch("diverged")
    for seed in range(5):
        _nqm_with_the_rule(h, h.clone(), 16, 0.0188, 0.02, seed)
    assert len(fired["decide"]) > 100 and len(fired["diverged"]) > 1000  # tested at every step
    assert not any(fired["decide"]) and not any(fired["diverged"])


def _nqm_with_the_rule(h: torch.Tensor, c: torch.Tensor, batch: int, lr: float, target: float, seed: int) -> tuple[int, float]:
    """SGD on a noisy quadratic (2 gradient groups per step, the loss of each batch observed) with
    the line-search rule as LRAdapter runs it: tr(Sigma) from an EMA of the groups' spread, J = lr.
    Returns the steps to the target and the learning rate then."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(h.numel(), generator=g, dtype=torch.float64)
    rule, ratio, trend = StepSizeController(), StepSizeRatio(0.9), LossTrend(window=200)
    scale, pending, prev, trace_ema, weight, first, limit = 1.0, None, None, 0.0, 0.0, [], math.nan
    for step in range(5000):
        loss = float(0.5 * (h * theta * theta).sum())
        if loss <= target:
            return step, lr * scale
        noise = torch.randn(2, h.numel(), generator=g, dtype=torch.float64) * (c * 2 / batch).sqrt()
        grads = h * theta + noise
        ghat = grads.mean(0)
        # tr(Sigma) as the monitor estimates it: from the two groups, a bias-corrected EMA (decay 0.95)
        trace_ema = 0.95 * trace_ema + 0.05 * float((grads[0] - grads[1]).square().sum()) * (batch // 2) / 2
        weight = 0.95 * weight + 0.05
        if prev is not None and pending is not None:
            ratio.update(pending[0], float(prev @ ghat), pending[1])
        trend.update(step, loss + float(noise.mean(0) @ theta))
        if len(first) < rule.min_pairs:
            first.append(trend.losses[-1])
            limit = rule.loss_limit(first) if len(first) == rule.min_pairs else math.nan
        eta = lr * scale
        prev = eta * ghat
        pending = (float(prev @ ghat), eta * trace_ema / weight / batch)
        theta = theta - prev
        if not math.isnan(limit):  # after every step, as LRAdapter tests it
            decision = rule.diverged(trend.losses[-1], limit, scale, step, len(trend.losses))
            if decision.changed:
                scale, pending = decision.value, None
                ratio.reset()
                trend.reset()
                continue
        if ratio.count < rule.min_pairs or ratio.count % rule.min_pairs:
            continue
        r = ratio.reading()
        interval = (r["lr_ratio_lo"], r["lr_ratio_hi"])
        slope = trend.slope_interval() if len(trend.losses) >= 2 * rule.min_pairs else None
        recent = trend.slope_interval(last=rule.min_pairs)
        peak = max(trend.losses[-rule.min_pairs:])
        decision = rule.decide(r["lr_ratio"], interval, scale, step, ratio.count, slope, recent, peak, limit)
        if decision.changed:
            scale = decision.value
            ratio.reset()
            trend.reset()
            pending = None
    return 5000, lr * scale


@pytest.mark.parametrize(("batch", "target"), [(16, 0.02), (64, 0.01)])
@pytest.mark.parametrize("start", [0.1, 3.0])
def test_on_the_noisy_quadratic_the_rule_settles_near_the_best_constant_rate(batch: int, target: float, start: float) -> None:
    # NQM Sec. 3 with h_i = 1/i, C = H (100 dimensions); the best constant rate by golden-section search
    # on the exact expected risk. From 10x too small and 3x too large, the rate the rule holds when the
    # target is reached is within x1.5 of it (median of 5 seeds), and it takes no more steps
    h = 1.0 / torch.arange(1, 101, dtype=torch.float64)
    model = NQM(h=h, c=h.clone())
    steps, best = (float(v) for v in model.best_lr(torch.tensor([float(batch)]), target=target))
    runs = [_nqm_with_the_rule(h, h.clone(), batch, best * start, target, seed) for seed in range(5)]
    settled = statistics.median(lr for _, lr in runs)
    assert best / 1.5 <= settled <= best * 1.5 * (1 + 1e-9), (settled / best, runs)
    assert statistics.median(s for s, _ in runs) <= steps


def test_the_early_rise_test_is_skipped_after_a_change_that_did_not_raise_the_rate() -> None:
    c = StepSizeController(early_rise=False)  # as after a batch change that lowered the rate
    rising = (0.01, 0.08)
    assert not c.decide(0.6, (0.5, 0.7), scale=1.0, step=30, pairs=10, recent_slope=rising).changed
    assert c.decide(0.6, (0.5, 0.7), scale=1.0, step=40, pairs=20, recent_slope=rising).reason.endswith("keep the rate")
    # the slope since the change is still tested, and a change of rate tests its first steps again
    down = c.decide(0.6, (0.5, 0.7), scale=1.0, step=50, pairs=30, loss_slope=(0.001, 0.002))
    assert down.changed and down.value == 0.5 and c.early_rise
    assert c.decide(0.6, (0.5, 0.7), scale=0.5, step=60, pairs=10, recent_slope=rising).value == 0.25
    c.early_rise = False
    restored = StepSizeController()
    restored.load_state_dict(c.state_dict())
    assert restored.early_rise is False
    with pytest.raises(ValueError, match="early_rise"):
        StepSizeController(early_rise=1)


def test_a_batch_change_tests_the_loss_rise_only_when_it_raised_the_rate() -> None:
    from lightning_gradnoise import BatchSizeAdapter, LRAdapter

    lra = LRAdapter()
    lra._batch_changed()  # no BatchSizeAdapter: whatever changed the batch may have raised the rate
    assert lra.controller.early_rise
    lra.batch_adapter = BatchSizeAdapter()
    for scale, tested in ((0.5, False), (0.5, False), (1.0, True), (0.7, False), (2.0, True)):
        lra.controller.last_action = "hold"
        lra.batch_adapter.lr_scale = scale
        lra._batch_changed()
        assert lra.controller.early_rise is tested and lra.controller.last_action == "none", scale
    assert lra.state_dict()["batch_lr"] == 2.0


def test_the_divergence_test_after_every_step_waits_min_pairs_steps_at_a_rate() -> None:
    c = StepSizeController()
    assert not c.diverged(2.4, 2.5, scale=1.0, step=12, steps=12).changed  # below the limit
    assert not c.diverged(math.nan, 2.5, scale=1.0, step=12, steps=12).changed  # a NaN loss never fires
    assert not c.diverged(4.0, math.inf, scale=1.0, step=12, steps=12).changed  # rise_limit=inf: no limit
    assert not c.diverged(4.0, 2.5, scale=1.0, step=9, steps=9).changed  # fewer than min_pairs steps at the rate
    down = c.diverged(4.0, 2.5, scale=1.0, step=12, steps=10)
    assert down.changed and down.value == 0.5 and "diverges" in down.reason and c.last_change == 12
    # the lowered rate gets min_pairs steps to bring the loss back below the limit
    assert not c.diverged(3.0, 2.5, scale=0.5, step=15, steps=3).changed
    assert c.diverged(math.inf, 2.5, scale=0.5, step=22, steps=10).value == 0.25
