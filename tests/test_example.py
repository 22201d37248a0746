"""The README's main job: the digits example trains, logs to TensorBoard and prints its table."""

from __future__ import annotations

import glob
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def test_digits_example_prints_table_and_writes_tensorboard(tmp_path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digits_monitor import main

    latest = main(["--epochs", "2", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("B_simple", "GR_S", "GR_T", "mean GSNR", "batch for GR_S band"):
        assert row in out
    for key in ("b_simple", "gr_s", "gr_t", "gsnr"):
        assert math.isfinite(latest[key])
    # the run ends on an epoch's short last window (93 micro-batches an epoch: one of 16 samples);
    # the table reads the run's current value, the median of the last fifth of the logged points
    assert latest["batch_size"] == 16 and latest["b_simple"] > 0 and latest["gr_t"] >= 1
    assert any(line.split()[:4] == ["global", "batch", "B", "64"] for line in out.splitlines()), out
    (event,) = glob.glob(str(tmp_path / "digits" / "version_0" / "events.out.tfevents.*"))
    acc = EventAccumulator(os.path.dirname(event))
    acc.Reload()
    assert {"gradnoise/b_simple", "gradnoise/gr_s", "gradnoise/gr_t", "gradnoise/gsnr"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("gradnoise/b_simple")[-1].value == pytest.approx(latest["b_simple"], rel=1e-6)
