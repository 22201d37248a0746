"""Per-example measurement under sharded training (FSDP2 through Lightning's
ModelParallelStrategy) and under gnddp, in two real processes on CPU (gloo): no mocks."""

from __future__ import annotations

from pathlib import Path

from helpers import digits, digits_mlp, exact_b_simple, launch_two_processes, per_sample_grads, rel_err

WORKER = Path(__file__).parent / "ddp" / "sharded_worker.py"


def exact_b() -> float:
    """B_simple of the worker's frozen digits MLP from all 1797 per-sample gradients, float64."""
    x_all, y_all = digits()
    return exact_b_simple(per_sample_grads(digits_mlp(), x_all, y_all))


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
    assert rel_err(a["latest"]["b_simple"], exact_b()) < 0.05, (a["latest"]["b_simple"], exact_b())


def test_gnddp_per_example_converges_to_the_exact_value(tmp_path) -> None:
    """strategy="gnddp" without accumulation, capture="per_example": k = 64 examples per step."""
    a, b = launch(tmp_path, "gnddp", steps=500, batch=80, decay=0.999, every=100, capture="per_example")
    assert a["capture_mode"] == "per_example" and not a["sharded"]
    assert a["rows"] == b["rows"] and a["latest"]["batch_size"] == 160
    assert rel_err(a["latest"]["b_simple"], exact_b()) < 0.05, (a["latest"]["b_simple"], exact_b())
