"""Per-example measurement under sharded training (FSDP2 through Lightning's
ModelParallelStrategy) and under gnddp, in two real processes on CPU (gloo): no mocks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helpers import launch_two_processes, rel_err

WORKER = Path(__file__).parent / "ddp" / "sharded_worker.py"


def exact_b_simple() -> float:
    """B_simple of the worker's frozen digits MLP from all 1797 per-sample gradients, float64."""
    import sys

    sys.path.insert(0, str(WORKER.parent))
    from sharded_worker import digits, mlp

    x_all, y_all = digits()
    m64 = mlp().double()
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def loss_one(p, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(m64, p, (x[None],)), y[None])

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x_all.double(), y_all)
    flat = torch.cat([v.reshape(len(x_all), -1) for v in per.values()], 1)
    mean = flat.mean(0)
    return float((flat - mean).square().sum(1).mean() / mean.square().sum())


def launch(tmp_path: Path, scenario: str, **opts) -> list[dict]:
    out = tmp_path / scenario
    out.mkdir()
    return launch_two_processes(WORKER, out, scenario, cwd=tmp_path, **opts)


def test_fsdp2_measures_per_example_and_converges_to_the_exact_value(tmp_path) -> None:
    """ModelParallelStrategy with fully_shard on each layer: the gradients are DTensor shards,
    per-example norms are local and |g|^2 sums the shards' squares over processes; B_simple
    within 5% of the truth, the same on both ranks."""
    a, b = launch(tmp_path, "fsdp2", steps=500, batch=80, decay=0.999, every=100)
    assert a["sharded"] and a["capture_mode"] == "per_example"
    assert a["rows"] == b["rows"] and a["latest"]["coverage"] == 1.0 and a["latest"]["batch_size"] == 160
    assert rel_err(a["latest"]["b_simple"], exact_b_simple()) < 0.05, (a["latest"]["b_simple"], exact_b_simple())


def test_gnddp_per_example_converges_to_the_exact_value(tmp_path) -> None:
    """strategy="gnddp" without accumulation, capture="per_example": k = 64 examples per step."""
    a, b = launch(tmp_path, "gnddp", steps=500, batch=80, decay=0.999, every=100, capture="per_example")
    assert a["capture_mode"] == "per_example" and not a["sharded"]
    assert a["rows"] == b["rows"] and a["latest"]["batch_size"] == 160
    assert rel_err(a["latest"]["b_simple"], exact_b_simple()) < 0.05, (a["latest"]["b_simple"], exact_b_simple())
