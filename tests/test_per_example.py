"""Per-example squared gradient norms from layer inputs and output gradients, against torch.func
per-sample gradients (vmap(grad(...))) for every supported layer type and option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradnoise.capture import PerExampleCollector, uncovered_parameters


def per_sample_sq_sums(model: nn.Module, loss_one, *batch) -> dict[str, torch.Tensor]:
    """Sum over examples of each parameter's squared per-example gradient, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, *xs):
        return loss_one(lambda *a: torch.func.functional_call(model, p, a), *[x[None] for x in xs])

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    return {k: g.double().flatten(1).square().sum() for k, g in grads.items()}


def collector_sq_sums(model: nn.Module, loss_batch, *batch) -> dict[str, torch.Tensor]:
    col = PerExampleCollector(model).attach()
    col.begin_group(scale=1.0, size=len(batch[0]))
    loss_batch(model, *batch).backward()
    col.end_group()
    sums, k, _, _ = col.local_sums()
    col.detach()
    assert k == len(batch[0])
    return dict(zip(col.names, sums))


def check(model: nn.Module, loss_one, *batch, rtol: float = 1e-4) -> None:
    """``loss_one(f, *xs)``: a loss that averages over everything in ``xs``: for one example (a
    leading dimension of 1) its own loss, for the batch the mean of those (equal sizes)."""

    def loss_batch(m, *xs):
        return loss_one(m, *xs)

    want = per_sample_sq_sums(model, loss_one, *batch)
    got = collector_sq_sums(model, loss_batch, *batch)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=rtol, atol=1e-10), (name, float(got[name]), float(want[name]))


def mse(f, x, y):
    return (f(x) - y).square().mean()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_two_d(bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    check(model, mse, torch.randn(6, 5), torch.randn(6, 3))


@pytest.mark.parametrize(("d_in", "d_out", "t"), [(16, 12, 3), (3, 2, 10)], ids=["ghost", "materialized"])
def test_linear_on_sequences_either_form(d_in: int, d_out: int, t: int) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(inplace=True), nn.Linear(d_out, 2))
    check(model, mse, torch.randn(5, t, d_in), torch.randn(5, t, 2))


def test_linear_on_four_d_inputs() -> None:
    torch.manual_seed(2)
    model = nn.Linear(4, 3)
    check(model, mse, torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 3))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_with_repeated_tokens(padding_idx) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=padding_idx), nn.Linear(4, 1))
    ids = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 3], [5, 4, 1, 1]])
    check(model, lambda f, x, y: (f(x).squeeze(-1) - y).square().mean(), ids, torch.randn(3, 4))


@pytest.mark.parametrize("norm", ["layer", "layer_no_bias", "rms"])
def test_layer_norm_and_rms_norm(norm: str) -> None:
    torch.manual_seed(4)
    layer = {"layer": nn.LayerNorm(6), "layer_no_bias": nn.LayerNorm(6, bias=False), "rms": nn.RMSNorm(6)}[norm]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Linear(6, 2))
    check(model, mse, torch.randn(5, 3, 4), torch.randn(5, 3, 2))


@pytest.mark.parametrize(
    "conv",
    [
        dict(kind=2, cin=3, cout=4, kernel=3, stride=2, padding=1, dilation=1, groups=1),
        dict(kind=2, cin=4, cout=6, kernel=2, stride=1, padding=0, dilation=2, groups=2, bias=False),
        dict(kind=2, cin=3, cout=3, kernel=3, stride=1, padding="same", dilation=1, groups=1),
        dict(kind=2, cin=2, cout=3, kernel=3, stride=1, padding=1, dilation=1, groups=1, padding_mode="reflect"),
        dict(kind=1, cin=3, cout=5, kernel=4, stride=2, padding=2, dilation=1, groups=1),
        dict(kind=1, cin=4, cout=4, kernel=3, stride=1, padding="same", dilation=2, groups=4),
    ],
    ids=["2d-stride-pad", "2d-dilation-groups-nobias", "2d-same", "2d-reflect", "1d-stride-pad", "1d-same-depthwise"],
)
def test_convolutions(conv: dict) -> None:
    torch.manual_seed(5)
    kind = conv.pop("kind")
    cin = conv.pop("cin")
    cout = conv.pop("cout")
    kernel = conv.pop("kernel")
    layer = (nn.Conv2d if kind == 2 else nn.Conv1d)(cin, cout, kernel, **conv)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    shape = (4, cin, 7, 6) if kind == 2 else (4, cin, 9)
    x = torch.randn(*shape)
    model(x)  # materialize the lazy layer
    check(model, mse, x, torch.randn(4, 2))


class TiedLM(nn.Module):
    """Embedding, one attention block (q, k, v, o projections), an MLP, LayerNorm, and an output
    head tied to the embedding; a module called twice."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.twice = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        h = h + self.o(att @ v)
        h = h + self.mlp(self.ln(h))
        h = self.twice(torch.tanh(self.twice(h)))
        return self.head(h)


def test_a_small_transformer_with_tied_head_and_a_module_used_twice() -> None:
    torch.manual_seed(6)
    model = TiedLM()
    ids = torch.randint(0, 11, (4, 5))
    ids[0, 3:] = 0  # padding
    targets = torch.randint(1, 11, (4, 5))

    def loss_one(f, x, y):
        return nn.functional.cross_entropy(f(x).flatten(0, 1), y.flatten())

    check(model, loss_one, ids, targets)


def test_coverage_lists_what_is_left_out() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(x) * self.scale)

    model = Odd()
    assert uncovered_parameters(model) == [("scale", 3), ("bn.weight", 3), ("bn.bias", 3)]
    assert PerExampleCollector(model).names == ["lin.weight", "lin.bias"]


def test_the_readme_monitor_on_one_device_without_accumulation_converges_to_the_closed_form() -> None:
    """The README's monitor line, unchanged, on one device with accumulate_grad_batches=1: each
    example is a group; frozen linear regression, B_simple within 5% of the closed form."""
    from helpers import LinRegTruth, linreg_module, ns, trainer_kwargs
    from lightning_gradnoise import GradNoiseMonitor

    truth = LinRegTruth(d=8, seed=0)
    monitor = GradNoiseMonitor(log_every_n_steps=50, ema_decay=0.999)
    model = linreg_module("lightning.pytorch", truth, lr=0.0, batch=64, n_batches=2000)
    with pytest.warns(UserWarning, match="GSNR"):
        ns("lightning.pytorch").Trainer(**trainer_kwargs(callbacks=[monitor])).fit(model)
    assert monitor.tracker.collector.mode == "per_example"
    last = monitor.latest
    assert last["coverage"] == 1.0 and "gsnr" not in last
    assert last["b_simple"] == pytest.approx(truth.b_simple, rel=0.05)
    assert last["grad_sq"] == pytest.approx(truth.grad_sq, rel=0.05)


def test_per_example_tracker_on_a_frozen_real_data_model_converges_to_the_exact_value() -> None:
    """Digits MLP frozen at its initialization, batches of 48 drawn with replacement, one backward
    per step, 2000 steps: B_simple within 5% of the value from all per-sample gradients (float64)."""
    from helpers import digits, digits_mlp, exact_b_simple, per_sample_grads
    from lightning_gradnoise.capture import GradNoiseTracker

    x_all, y_all = digits()
    model = digits_mlp()
    exact = exact_b_simple(per_sample_grads(model, x_all, y_all))

    tracker = GradNoiseTracker(model, statistics=("b_simple", "gr_s"), ema_decay=0.9995, capture="per_example").attach()
    gen = torch.Generator().manual_seed(1)
    for step in range(2000):
        model.zero_grad()
        tracker.begin_step()
        idx = torch.randint(len(x_all), (48,), generator=gen)
        out = model(x_all[idx])
        tracker.begin_group(scale=1.0, size=48)
        nn.functional.cross_entropy(out, y_all[idx]).backward()
        tracker.end_group()
        summary = tracker.finish_step(summarize=step % 100 == 99)
    assert summary["b_simple"] == pytest.approx(exact, rel=0.05), (summary["b_simple"], exact)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_works_under_a_compiled_module(how: str) -> None:
    """Compiled with torch.compile (a wrapper) or Module.compile (in place): the hooks make the
    compiler fall back around them, and the per-example sums equal the eager ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.randn(6, 3)

    def sums(run) -> torch.Tensor:
        col = PerExampleCollector(model).attach()
        out = run(x)
        col.begin_group(scale=1.0, size=6)
        (out - y).square().mean().backward()
        col.end_group()
        col.detach()
        model.zero_grad()
        return col.local_sums()[0]

    eager = sums(model)
    if how == "torch.compile":
        compiled = torch.compile(model)
    else:
        model.compile()
        compiled = model
    assert torch.allclose(sums(compiled), eager, rtol=1e-5)
