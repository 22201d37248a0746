"""VR optimizers inside real fits: Lightning on one device and two-process gnddp."""

from __future__ import annotations

import pytest
import torch

from helpers import LinRegTruth, StreamDataset, linreg_module, ns, trainer_kwargs
from lightning_gradnoise import MisconfigurationError, VRMoments, create_optimizer
from test_ddp import launch


@pytest.mark.parametrize("k", [8, 2])
def test_vr_sgd_in_lightning_equals_the_algorithm_on_the_same_micro_batches(k: int) -> None:
    """From 8 groups, VRGD Alg. 1 exactly (layer mean); below, the layer median, with a warning."""
    L = ns("lightning.pytorch")
    truth = LinRegTruth(d=4, seed=5)
    steps, lr = 8, 0.05
    base = type(linreg_module("lightning.pytorch", truth, lr=lr, n_batches=k * steps))

    class VR(base):
        def configure_optimizers(self):
            return create_optimizer("vr_sgd", self, lr=lr)

    model = VR()
    trainer = L.Trainer(**trainer_kwargs(accumulate_grad_batches=k, callbacks=[VRMoments()]))
    if k < 8:
        with pytest.warns(UserWarning, match="median"):
            trainer.fit(model)
    else:
        trainer.fit(model)
    # VRGD Alg. 1 by hand on the same stream of micro-batches
    w = truth.w0.clone().double()
    batches = list(StreamDataset(truth, 16, k * steps))
    for s in range(steps):
        gj = []
        for x, y in batches[s * k : (s + 1) * k]:
            x, y = x.double(), y.double()
            gj.append(x.T @ (x @ w - y) / len(y))
        gj = torch.stack(gj)
        g = gj.mean(0)
        var = (gj * gj).mean(0) - g * g
        r = g * g / var
        r = (r / (r.mean() if k >= 8 else r.median())).clamp(0.1, 1.0)
        w = w - lr * r * g
    assert torch.allclose(model.lin.weight.detach().double().flatten(), w, rtol=1e-4, atol=1e-6)


def test_vr_moments_refuses_a_plain_optimizer() -> None:
    L = ns("lightning.pytorch")
    model = linreg_module("lightning.pytorch", LinRegTruth(d=3), lr=0.1, n_batches=8)
    with pytest.raises(MisconfigurationError, match="set_moments"):
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=[VRMoments()])).fit(model)


def test_vr_adam_under_gnddp_identical_ranks_and_gamma_one_is_adam(tmp_path) -> None:
    common = dict(steps=20, lr=0.05, monitor=0)
    vr = launch(tmp_path, "vr", optimizer="vr_adam", **common)
    vr_one = launch(tmp_path, "vr", optimizer="vr_adam", gamma=1.0, **common)
    adam = launch(tmp_path, "vr", optimizer="adam", **common)
    assert vr[0]["weight"] == vr[1]["weight"]
    assert vr_one[0]["weight"] == adam[0]["weight"]  # the moments arrived every step; factor 1
    assert vr[0]["weight"] != adam[0]["weight"]  # and with gamma = 0.1 they changed the update
    # plain ddp: VRMoments gets the moments from its own all-reduce; the same update as gnddp's
    plain = launch(tmp_path, "vr", optimizer="vr_adam", strategy="ddp", **common)
    assert plain[0]["weight"] == plain[1]["weight"]
    assert plain[0]["weight"] == pytest.approx(vr[0]["weight"], rel=1e-5)
