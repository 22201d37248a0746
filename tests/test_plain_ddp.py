"""The tracker and the communication hook on plain torch DistributedDataParallel (no Lightning),
two real processes on CPU (gloo), as the README's "Without Lightning" loop uses them."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import launch_two_processes

WORKER = Path(__file__).parent / "ddp" / "plain_worker.py"


def launch(tmp_path: Path, scenario: str, **opts) -> list[dict]:
    out = tmp_path / f"{scenario}_{'_'.join(f'{k}{v}' for k, v in opts.items())}"
    out.mkdir()
    return launch_two_processes(WORKER, out, scenario, **opts)


@pytest.mark.parametrize(("accumulate", "mode"), [(1, "external"), (1, "final"), (2, "hooks")])
def test_two_processes_measure_what_one_process_measures_from_the_same_groups(tmp_path, accumulate, mode) -> None:
    """2 processes x ``accumulate`` micro-batches against one process whose groups are the same
    micro-batches: the same estimator on the same numbers, so the same statistics up to float
    rounding. external: the hook reads each process's gradient from DDP's bucket; final: no hook,
    ``.grad`` read at the end of backward before DDP writes the average back; hooks: per-tensor
    hooks. GSNR's centred elementwise moments travel in an all-reduce of the tracker's own (DDP's
    carries sums of squares only for a VR optimizer that asks for them)."""
    ranks = launch(tmp_path, "match", accumulate=accumulate, steps=30, every=10, mode=mode)
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    assert [r["ddp"] for r in ranks[0]["rows"]] == [r["ddp"] for r in ranks[1]["rows"]]  # identical on every rank
    assert [r["step"] for r in ranks[0]["rows"]] == [9, 19, 29]
    for row in ranks[0]["rows"]:
        got, want = row["ddp"], row["reference"]
        assert got["batch_size"] == want["batch_size"] == 32 * accumulate
        for key in ("b_simple", "grad_sq", "trace_cov", "gr_s", "gsnr"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, nan_ok=True), key
        assert row["packed_bytes"] == 0


def test_processes_with_different_numbers_of_micro_batches_are_told(tmp_path) -> None:
    ranks = launch(tmp_path, "disagree", accumulate=2, steps=10, every=5)
    for rank in ranks:
        assert rank["rows"] == []
        assert "disagree on the number of gradient groups" in rank["error"]
