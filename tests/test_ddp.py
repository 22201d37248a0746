"""strategy="gnddp" in real two-process DDP on CPU (gloo), launched by Lightning: no mocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import NAMESPACES, LinRegTruth, launch_two_processes, ns, rel_err
from lightning_gradnoise import GradNoiseDDPStrategy, MisconfigurationError
from lightning_gradnoise.strategies import STRATEGY_NAMES, strategy_class

WORKER = Path(__file__).parent / "ddp" / "worker.py"


_LAUNCHED: dict[tuple, list[dict]] = {}
"""Fits already run in this session, by their arguments: a fit is deterministic, so tests that
need the same one (the default gnddp trajectory, for instance) share a launch."""


def launch(tmp_path: Path, scenario: str, **opts) -> list[dict]:
    key = (scenario, tuple(sorted((k, str(v)) for k, v in opts.items())))
    if key in _LAUNCHED and not any(k in opts for k in ("ckpt_dir", "resume")):
        return _LAUNCHED[key]
    out = tmp_path / f"run{sum(1 for _ in tmp_path.glob('run*'))}_{scenario}"
    out.mkdir()
    _LAUNCHED[key] = ranks = launch_two_processes(WORKER, out, scenario, cwd=tmp_path, **opts)
    return ranks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_frozen_linear_regression_b_simple_and_identical_ranks(tmp_path, reduction) -> None:
    # 2 devices x 2 micro-batches = 4 groups of 16. 600 steps under an EMA of decay 0.999 average
    # about 450 steps; the per-step noise measured in test_stats_noise_scale puts 4 SE under 5%.
    # A summed loss reads the step's batch from the reduced counts (the mean needs none of them).
    ranks = launch(tmp_path, "truth", steps=600, accumulate=2, every=50, reduction=reduction)
    a, b = ranks
    assert a["strategy"].endswith("GradNoiseDDPStrategy")
    assert a["rows"] == b["rows"] and len(a["rows"]) == 12
    last = a["rows"][-1]
    truth = LinRegTruth(d=8, seed=0)
    assert last["batch_size"] == 64
    assert rel_err(last["b_simple"], truth.b_simple) < 0.05
    assert rel_err(last["grad_sq"], truth.grad_sq) < 0.05


@pytest.mark.parametrize("accumulate", [1])
def test_gsnr_under_gnddp_matches_float64_every_step_and_the_closed_form(tmp_path, accumulate) -> None:
    """k = 2 (plain gnddp, the comm hook reading DDP's buckets; k = 4 and 8 are checked on one
    device, and the cross-process combination is the same for any k): every logged GSNR equals
    its definition computed in float64 from every rank's exact group gradients (within 1e-3), and
    after 2000 steps it is within 5% of the closed form."""
    steps = 2000 // accumulate
    ranks = launch(tmp_path, "gsnr", steps=steps, accumulate=accumulate, every=1, statistics="gsnr",
                   moments_hook="always" if accumulate == 1 else "auto")
    a, b = ranks
    assert a["rows"] == b["rows"] and len(a["rows"]) == steps
    if accumulate == 1:
        assert a["capture_mode"] == "external" and a["hook_registered"]
    refs = {r["step"]: r["gsnr"] for r in a["reference_rows"]}
    worst = 0.0
    for row in a["rows"]:
        want = refs[row["step"]]
        if want == want:  # NaN while not determined, in both
            worst = max(worst, abs(row["gsnr"] / want - 1))
        else:
            assert row["gsnr"] != row["gsnr"]
    assert worst < 1e-3, worst
    truth = LinRegTruth(d=8, seed=0)
    exact = float((truth.delta.square() / truth.cov_diag).mean())
    assert rel_err(a["rows"][-1]["gsnr"], exact) < 0.05, (a["rows"][-1]["gsnr"], exact)


@pytest.mark.parametrize(
    ("accumulate", "opts", "mode", "registered"),
    [
        (2, {}, "hooks", False),  # micro-batches: per-tensor hooks; GSNR's centred moments in an all-reduce of their own
        (1, {"every": 50}, "final", False),  # .grad read at the end of backward, DDP's own all-reduce
        (1, {"every": 50, "moments_hook": "always"}, "external", True),  # read from DDP's buckets
    ],
    ids=["accumulate2-hooks", "final", "comm-hook"],
)
def test_per_device_norms_equal_brute_force_from_each_ranks_data(tmp_path, accumulate, opts, mode, registered) -> None:
    # run through pytorch_lightning's registry ("gnddp" there); the other tests use lightning.pytorch
    truth = LinRegTruth(d=8, seed=0)
    w = truth.w0.double()
    ranks = launch(tmp_path, "norms", steps=3, accumulate=accumulate, namespace="pytorch_lightning", **opts)
    assert ranks[0]["strategy"].endswith("GradNoiseDDPStrategy") and ranks[0]["rows"] == ranks[1]["rows"]
    assert ranks[0]["capture_mode"] == mode and ranks[0]["hook_registered"] == registered
    for rank in ranks:
        batches = [r for r in rank["records"] if "x" in r]
        norms = [r for r in rank["records"] if "group_sq" in r]
        assert len(batches) == 3 * accumulate and len(norms) == 3
        for step in range(3):
            got = torch.tensor(norms[step]["group_sq"], dtype=torch.float64)  # [local groups, tensors]
            mine = [bt for bt in batches if bt["step"] == step]
            want = []
            for bt in mine:  # per-sample gradients by autograd, averaged over the micro-batch
                x = torch.tensor(bt["x"], dtype=torch.float64)
                y = torch.tensor(bt["y"], dtype=torch.float64)
                wv = w.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(0.5 * (x @ wv - y).square().mean(), wv)
                want.append([float(g.square().sum())])
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5)


def test_trajectory_is_bit_identical_to_plain_ddp_and_plain_ddp_monitor_agrees(tmp_path) -> None:
    # VR-SGD: VRMoments' sums of squares are packed into DDP's all-reduce on every step; the
    # monitor beside it reads .grad with hooks and combines its centred moments itself
    common = dict(steps=30, accumulate=2, lr=0.05, every=1, optimizer="vr_sgd")
    plain = launch(tmp_path, "traj", strategy="ddp", monitor=0, **common)
    gn = launch(tmp_path, "traj", strategy="gnddp", **common)  # VR moments packed every step
    beside = launch(tmp_path, "traj", strategy="gnddp", pack_limit=0, **common)  # bucket in place, moments beside
    fused = launch(tmp_path, "traj", strategy="gnddp", fuse_from=0, **common)  # divided into the packed buffer
    ddp_monitor = launch(tmp_path, "traj", strategy="ddp", **common)
    assert gn[0]["weight"] == plain[0]["weight"] == gn[1]["weight"] == beside[0]["weight"] == beside[1]["weight"]
    assert fused[0]["weight"] == fused[1]["weight"] == plain[0]["weight"] and fused[0]["rows"] == gn[0]["rows"]
    assert beside[0]["rows"] == beside[1]["rows"] and beside[0]["pack_limit"] == 0 < gn[0]["pack_limit"]
    for row_gn, row_beside in zip(gn[0]["rows"], beside[0]["rows"], strict=True):
        for key in ("b_simple", "gr_t", "gsnr", "grad_sq"):
            assert row_gn[key] == pytest.approx(row_beside[key], rel=1e-12, nan_ok=True), key
    assert ddp_monitor[0]["weight"] == plain[0]["weight"]
    assert gn[0]["hook_registered"] and gn[0]["capture_mode"] == "hooks"  # VR moments on every step: packed
    for row_gn, row_ddp in zip(gn[0]["rows"], ddp_monitor[0]["rows"]):
        for key in ("b_simple", "gr_t", "gsnr", "grad_sq"):
            assert row_gn[key] == pytest.approx(row_ddp[key], rel=1e-5, nan_ok=True), key


def test_without_accumulation_ddp_keeps_its_own_all_reduce_and_the_trajectory(tmp_path) -> None:
    # GSNR every 10 steps: no comm hook; .grad is read at the end of backward, before DDP writes
    # the average back, and the logged steps' elementwise moments go in an all-reduce of their own
    common = dict(steps=30, accumulate=1, lr=0.05, every=10)
    plain = launch(tmp_path, "traj", strategy="ddp", monitor=0, **common)
    final = launch(tmp_path, "traj", strategy="gnddp", **common)
    packed = launch(tmp_path, "traj", strategy="gnddp", moments_hook="always", **common)
    assert final[0]["capture_mode"] == "final" and not final[0]["hook_registered"]
    assert packed[0]["capture_mode"] == "external" and packed[0]["hook_registered"]
    assert final[0]["weight"] == final[1]["weight"] == plain[0]["weight"] == packed[0]["weight"]
    assert final[0]["rows"] == final[1]["rows"] and len(final[0]["rows"]) == 3
    for row_final, row_packed in zip(final[0]["rows"], packed[0]["rows"], strict=True):
        for key in ("b_simple", "gr_t", "gsnr", "grad_sq", "trace_cov"):
            assert row_final[key] == pytest.approx(row_packed[key], rel=1e-6, nan_ok=True), key


@pytest.mark.parametrize(("flag", "mode"), [("gradient_as_bucket_view", "external"), ("static_graph", "final")])
def test_bucket_views_and_static_graph_keep_the_trajectory_and_the_statistics(tmp_path, flag, mode) -> None:
    # gradient_as_bucket_view: .grad is DDP's bucket, divided in place, so the hook reads each
    # process's gradient from the bucket before the reduction; static_graph: DDP's first step
    # reduces in a callback of its own, queued after the end-of-backward read
    common = dict(steps=30, accumulate=1, lr=0.05, every=10)
    plain = launch(tmp_path, "traj", strategy="ddp", monitor=0, **common, **{flag: 1})
    gn = launch(tmp_path, "traj", strategy="gnddp", **common, **{flag: 1})
    default = launch(tmp_path, "traj", strategy="gnddp", **common)
    assert gn[0]["capture_mode"] == mode and gn[0]["hook_registered"] == (mode == "external")
    assert gn[0]["weight"] == gn[1]["weight"] == plain[0]["weight"] == default[0]["weight"]
    assert gn[0]["rows"] == gn[1]["rows"] and len(gn[0]["rows"]) == 3
    for row, want in zip(gn[0]["rows"], default[0]["rows"], strict=True):
        for key in ("b_simple", "gr_t", "gsnr", "grad_sq", "trace_cov"):
            assert row[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), key


def test_a_monitor_beside_vr_moments_measures_what_it_measures_alone(tmp_path) -> None:
    # the hook feeds one collector: VRMoments' (elementwise moments on every step, packed); the
    # monitor reads .grad itself. Frozen model (lr 0): the same statistics with or without VRMoments.
    common = dict(steps=60, every=20, lr=0.0)
    alone = launch(tmp_path, "truth", optimizer="sgd", **common)
    beside = launch(tmp_path, "truth", optimizer="vr_sgd", **common)
    assert beside[0]["hook_registered"] and beside[0]["capture_mode"] == "final"
    assert alone[0]["capture_mode"] == "final" and not alone[0]["hook_registered"]
    assert beside[0]["rows"] == beside[1]["rows"] and len(beside[0]["rows"]) == 3
    for row, want in zip(beside[0]["rows"], alone[0]["rows"], strict=True):
        for key in ("b_simple", "grad_sq", "trace_cov", "gr_t", "gsnr"):
            assert row[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), key


def test_unused_parameters_and_composed_fp16_hooks(tmp_path) -> None:
    common = dict(steps=300, every=50)
    reference = launch(tmp_path, "unused", strategy="gnddp_find_unused_parameters_true", **common)
    truth = LinRegTruth(d=8, seed=0)
    assert reference[0]["rows"] == reference[1]["rows"]
    # the unused layer's zero gradient neither biases |G|^2 nor tr(Sigma)
    assert rel_err(reference[0]["rows"][-1]["b_simple"], truth.b_simple) < 0.08
    for opt in (dict(hook="fp16"), dict(wrapper="fp16")):
        ranks = launch(tmp_path, "truth", **common, **opt)
        assert ranks[0]["rows"] == ranks[1]["rows"]
        # same data as the fp32 reference: fp16 compression moves B_simple by rounding only
        assert rel_err(ranks[0]["rows"][-1]["b_simple"], reference[0]["rows"][-1]["b_simple"]) < 0.01


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_name_resolves_in_both_registries(namespace) -> None:
    L = ns(namespace)
    cls = strategy_class(namespace)
    for name in STRATEGY_NAMES:
        assert name in L.strategies.StrategyRegistry, name
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert type(trainer.strategy) is cls
        fup = trainer.strategy._ddp_kwargs.get("find_unused_parameters")
        assert fup == (True if name.endswith("_true") else False if name.endswith("_false") else None)
        start = trainer.strategy._start_method
        assert start == {"gnddp": "popen", "spawn": "spawn", "fork": "fork", "notebook": "fork"}[
            "gnddp" if name.split("_")[1:2] in ([], ["find"]) else name.split("_")[1]
        ]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_one_strategy_object_is_accepted_by_either_trainer(namespace) -> None:
    L = ns(namespace)
    strategy = GradNoiseDDPStrategy(find_unused_parameters=True, static_graph=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert trainer.strategy is strategy and type(strategy) is strategy_class(namespace)
    assert isinstance(strategy, L.strategies.DDPStrategy)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "static_graph": False}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_moments_hook_is_validated(namespace) -> None:
    with pytest.raises(ValueError, match=r"moments_hook='sometimes' is invalid: expected one of 'auto', 'always'"):
        strategy_class(namespace)(moments_hook="sometimes")
    with pytest.raises(ValueError, match="moments_hook"):
        GradNoiseDDPStrategy(moments_hook=True)
    assert strategy_class(namespace)(moments_hook="always").moments_hook == "always"


def test_model_averaging_is_refused_with_a_fix() -> None:
    strategy = strategy_class("lightning.pytorch")(model_averaging_period=4)
    with pytest.raises(MisconfigurationError, match="model averaging"):
        strategy.check_supported()


def test_an_empty_micro_batch_on_one_rank_is_skipped_and_counted_on_every_rank(tmp_path) -> None:
    """Rank 1's sixth micro-batch (of step 2) has no samples; with a summed loss its gradient is
    zero and finite, but the group has no size: both ranks skip the step and count it, log the
    same values, and the statistics go on from the other steps. (A mean loss over no samples is
    NaN, and a NaN step is skipped on every rank already.)"""
    ranks = launch(tmp_path, "truth", steps=12, accumulate=2, every=4, reduction="sum", empty_at=5)
    a, b = ranks
    assert a["rows"] == b["rows"]
    last = a["rows"][-1]
    assert last["skipped_steps"] == 1
    assert last["b_simple"] > 0
