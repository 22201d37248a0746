"""The gradnoise command line: every subcommand, on real inputs, and its failures."""

from __future__ import annotations

import csv
import os
import sys

import pytest

from lightning_gradnoise.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.mark.parametrize("command", [[], ["nqm"], ["fit"], ["plan"], ["report"]])
def test_help_for_every_subcommand(command, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    assert "usage: gradnoise" in capsys.readouterr().out


def test_nqm_sweep_writes_table_csv_and_plot(tmp_path, capsys) -> None:
    png, table = tmp_path / "nqm.png", tmp_path / "nqm.csv"
    assert main(["nqm", "--d", "1000", "--bins", "40", "--num", "8", "--powers", "0", "0.5", "--plot", str(png), "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "critical batch" in out and "momentum 0.9" in out
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 2 * 2 * 8
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_recovers_b_noise_from_a_csv(tmp_path, capsys) -> None:
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch_size", "steps", "lr"])
        for b in (16, 64, 256, 1024, 4096):
            s = 3000 * (1 + 500 / b)
            w.writerow([b, s, 0.01 / (0.5 * ((500 / b) ** 0.5 + (b / 500) ** 0.5))])
    assert main(["fit", str(path), "--rule", "adam", "--plot", str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    assert "B_noise = B_crit = 500" in out and "S_min = 3000" in out and "eps_max (adam rule) = 0.01" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("batch,loss\n1,2\n")
    assert main(["fit", str(bad)]) == 2
    assert "needs columns" in capsys.readouterr().err


def test_plan_table(capsys) -> None:
    assert main(["plan", "--b-simple", "200", "--batch-sizes", "50", "200", "800", "--reference-batch", "200",
                 "--reference-steps", "1000", "--step-time", "50:0.01", "800:0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("B_noise ~ B_simple = 200")
    steps = [float(line.split()[1]) for line in out[2:5]]
    assert steps == [2500.0, 1000.0, 625.0]
    assert "GR_S band 0.5-0.65: global batch" in out[-1]


def test_report_on_the_example_run(tmp_path, capsys) -> None:
    from digits_monitor import main as digits

    latest = digits(["--epochs", "2", "--logdir", str(tmp_path)])
    demo = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("B_simple", "GR_S", "GR_T"))}
    png = tmp_path / "report.png"
    assert main(["report", str(tmp_path / "digits"), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "recommended global batch for GR_S in 0.5-0.65" in out
    # the demo's table and the report read "the current value" the same way
    report = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.split()[:1] in (["b_simple"], ["gr_s"], ["gr_t"])}
    for demo_key, key, printed in (("B_simple", "b_simple", 0.05), ("GR_S", "gr_s", 5e-4), ("GR_T", "gr_t", 0.05)):
        assert float(demo[demo_key]) == pytest.approx(report[key], rel=1e-3, abs=printed * 1.01), key
    assert "b_simple" in out and "gr_t" in out and "gsnr" in out
    assert png.stat().st_size > 10_000
    (tmp_path / "nothing").mkdir()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert latest["b_simple"] > 0


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert 2 == main(["nqm", "--d", "50", "--bins", "5", "--num", "3", "--powers", "0", "--momentum", "0", "--plot", str(tmp_path / "x.png")])
    assert "lightning-gradnoise[plot]" in capsys.readouterr().err
