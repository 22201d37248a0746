"""Several consumers of one model's gradients on one device with accumulation: each measures
what it would alone, from one capture per micro-batch (the first sets .grad aside, the others
read its capture)."""

from __future__ import annotations

import math

import pytest

import torch

from helpers import LinRegTruth, StreamDataset, linreg_module, ns, recording_logger, trainer_kwargs
from lightning_gradnoise import GradNoiseMonitor, VRMoments, create_optimizer
from lightning_gradnoise.capture import SharedCapture

NAMESPACE = "lightning.pytorch"


TRUTH = LinRegTruth(d=6, seed=2)
SEEN: list[tuple[list, int]] = []


def fit(callbacks: list, optimizer: str = "sgd", steps: int = 40, k: int = 4):
    L = ns(NAMESPACE)
    base = type(linreg_module(NAMESPACE, TRUTH, lr=0.0, batch=8, n_batches=k * steps))

    class Model(base):
        def configure_optimizers(self):
            opt = create_optimizer(optimizer, self, lr=0.0)  # frozen: every fit sees the same gradients
            if hasattr(opt, "set_moments"):
                given = opt.set_moments

                def record(sq_sums, k):
                    SEEN.append(([s.clone() for s in sq_sums], k))
                    given(sq_sums, k)

                opt.set_moments = record
            return opt

    logger = recording_logger(NAMESPACE)
    L.Trainer(**trainer_kwargs(accumulate_grad_batches=k, callbacks=callbacks, logger=logger)).fit(Model())
    return logger


KEYS = ("b_simple", "grad_sq", "trace_cov", "gr_s", "gsnr", "gr_t")


def rows(logger) -> list[dict]:
    return [{k: m[f"gradnoise/{k}"] for k in KEYS if f"gradnoise/{k}" in m} for _, m in logger.rows]


def test_a_monitor_beside_vr_moments_measures_what_it_measures_alone() -> None:
    SEEN.clear()
    alone = rows(fit([GradNoiseMonitor(statistics="all", log_every_n_steps=5)]))
    vr, monitor = VRMoments(), GradNoiseMonitor(statistics="all", log_every_n_steps=5)
    beside = rows(fit([vr, monitor], optimizer="vr_sgd"))
    assert isinstance(monitor.tracker.collector, SharedCapture) and monitor.tracker.collector.leader is vr.tracker.collector
    assert len(alone) == len(beside) >= 8
    for a, b in zip(alone, beside):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key
    assert all(math.isfinite(r["grad_sq"]) and r["grad_sq"] >= 0 for r in beside)
    # VRMoments handed the optimizer each step's sum over micro-batches of the squared mean
    # gradient, elementwise: against a brute-force reference from the same data stream
    w = TRUTH.w0.double()
    batches = iter(StreamDataset(TRUTH, 8, 4 * 40))
    assert len(SEEN) == 40
    for sq_sums, k in SEEN:
        assert k == 4
        want = torch.zeros_like(w)
        for _ in range(k):
            x, y = (t.double() for t in next(batches))
            want += ((x @ w - y)[:, None] * x).mean(0).square()
        assert torch.allclose(sq_sums[0].double().reshape(-1), want, rtol=1e-5), (sq_sums[0], want)


def test_two_monitors_on_one_trainer_each_measure_what_they_measure_alone() -> None:
    first = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=5)
    second = GradNoiseMonitor(statistics="all", log_every_n_steps=5, per_layer=True)
    fit([first, second])
    assert isinstance(second.tracker.collector, SharedCapture) and second.tracker.collector.leader is first.tracker.collector
    alone = GradNoiseMonitor(statistics="all", log_every_n_steps=5, per_layer=True)
    fit([alone])
    assert first.state_key != second.state_key
    for key in ("b_simple", "grad_sq", "trace_cov", "gsnr", "gr_t"):
        assert second.latest[key] == pytest.approx(alone.latest[key], rel=1e-9, nan_ok=True), key
    for key in ("b_simple", "grad_sq", "trace_cov"):
        assert first.latest[key] == pytest.approx(alone.latest[key], rel=1e-9, nan_ok=True), key
