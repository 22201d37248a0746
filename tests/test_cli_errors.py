"""The gradnoise command on bad input: a one-line message, a non-zero exit, never a traceback and
never a confident number from bad data. The table runs ``main`` in this process (an exception
escaping it is what a traceback would be); a few cases run the real command as a user would."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_gradnoise", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def run_here(args: list[str], capsys) -> tuple[int, str, str]:
    """``main(args)`` as the command runs it: its exit status, standard output and error."""
    from lightning_gradnoise.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_scalars(logdir: Path, series: dict[str, list[float]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for step in range(max(len(v) for v in series.values())):
        for key, values in series.items():
            if step < len(values):
                writer.add_scalar(key, values[step], step)
    writer.close()
    return next(logdir.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    out = {"dir": str(d), "missing": str(d / "missing.csv"), "nofolder": str(d / "no" / "such" / "out.png")}
    texts = {
        "empty": "",
        "header_only": "batch_size,steps\n",
        "wrong_columns": "batch,loss\n1,2\n",
        "non_numeric": "batch_size,steps\n16,many\n64,40\n",
        "empty_cell": "batch_size,steps\n16,\n64,40\n",
        "nan_steps": "batch_size,steps\n16,nan\n64,40\n",
        "negative_batch": "batch_size,steps\n-16,100\n64,40\n",
        "zero_steps": "batch_size,steps\n16,0\n64,40\n",
        "nan_lr": "batch_size,steps,lr\n16,400,0.1\n64,150,nan\n256,80,0.3\n",
        "zero_lr": "batch_size,steps,lr\n16,400,0.1\n64,150,0\n256,80,0.3\n",
        "negative_lr": "batch_size,steps,lr\n16,400,0.1\n64,150,-0.2\n256,80,0.3\n",
        "no_tradeoff": "batch_size,steps\n16,100\n64,100\n",
        "good": "batch_size,steps\n16,400\n64,150\n256,80\n",
    }
    for name, text in texts.items():
        (d / f"{name}.csv").write_text(text)
        out[name] = str(d / f"{name}.csv")
    (d / "binary.csv").write_bytes(bytes(range(256)) * 8)
    out["binary"] = str(d / "binary.csv")
    (d / "empty_dir").mkdir()
    out["empty_dir"] = str(d / "empty_dir")
    out["under_a_file"] = str(d / "empty.csv" / "out.png")  # unwritable even as root
    good = {"gradnoise/b_simple": [40.0] * 10, "gradnoise/batch_size": [64.0] * 10, "gradnoise/gr_s": [0.6] * 10}
    for name, series in {
        "nan_b_simple": {**good, "gradnoise/b_simple": [math.nan] * 10},
        "inf_b_simple": {**good, "gradnoise/b_simple": [math.inf] * 10},
        "negative_b_simple": {**good, "gradnoise/b_simple": [-13.0] * 10},
        "no_batch_size": {k: v for k, v in good.items() if k != "gradnoise/batch_size"},
        "no_b_simple": {k: v for k, v in good.items() if k != "gradnoise/b_simple"},
        "empty_run": {"other/loss": [1.0]},
    }.items():
        write_scalars(d / name, series)
        out[name] = str(d / name)
    return out


BAD = {
    # fit: files
    "fit, missing file": (["fit", "{missing}"], "no such file"),
    "fit, a directory": (["fit", "{dir}"], "is a directory"),
    "fit, binary file": (["fit", "{binary}"], "binary"),
    "fit, empty file": (["fit", "{empty}"], "no rows"),
    "fit, header only": (["fit", "{header_only}"], "no rows"),
    "fit, wrong columns": (["fit", "{wrong_columns}"], "needs columns"),
    "fit, non-numeric cell": (["fit", "{non_numeric}"], "'many' is not a number"),
    "fit, empty cell": (["fit", "{empty_cell}"], "cell is empty"),
    "fit, NaN steps": (["fit", "{nan_steps}"], "steps=nan"),
    "fit, negative batch": (["fit", "{negative_batch}"], "batch_size=-16"),
    "fit, zero steps": (["fit", "{zero_steps}"], "steps=0"),
    "fit, NaN learning rate": (["fit", "{nan_lr}"], "lr=nan"),
    "fit, zero learning rate": (["fit", "{zero_lr}"], "lr=0"),
    "fit, negative learning rate": (["fit", "{negative_lr}"], "lr=-0.2"),
    "fit, no trade-off": (["fit", "{no_tradeoff}"], "cannot fit"),
    "fit, plot into a missing folder": (["fit", "{good}", "--plot", "{nofolder}"], "does not exist"),
    "fit, plot under a file": (["fit", "{good}", "--plot", "{under_a_file}"], "is not a folder"),
    "fit, bad rule": (["fit", "{good}", "--rule", "lion"], "invalid choice"),
    # plan
    "plan, no B_simple": (["plan"], "--b-simple"),
    "plan, B_simple 0": (["plan", "--b-simple", "0"], "--b-simple"),
    "plan, B_simple negative": (["plan", "--b-simple", "-5"], "--b-simple"),
    "plan, B_simple nan": (["plan", "--b-simple", "nan"], "--b-simple"),
    "plan, B_simple inf": (["plan", "--b-simple", "inf"], "--b-simple"),
    "plan, B_simple absurd": (["plan", "--b-simple", "1e300"], "--b-simple"),
    "plan, B_simple not a number": (["plan", "--b-simple", "lots"], "--b-simple"),
    "plan, batch sizes 0 and -1": (["plan", "--b-simple", "100", "--batch-sizes", "0", "-1"], "--batch-sizes"),
    "plan, batch size nan": (["plan", "--b-simple", "100", "--batch-sizes", "nan"], "--batch-sizes"),
    "plan, step time without seconds": (["plan", "--b-simple", "100", "--step-time", "32"], "BATCH:SECONDS"),
    "plan, step time negative": (["plan", "--b-simple", "100", "--step-time", "32:-1", "64:1"], "--step-time"),
    "plan, one step time": (["plan", "--b-simple", "100", "--step-time", "32:0.1"], "at least two"),
    "plan, reference batch 0": (["plan", "--b-simple", "100", "--reference-batch", "0", "--reference-steps", "10"], "--reference-batch"),
    "plan, reference steps negative": (["plan", "--b-simple", "100", "--reference-batch", "64", "--reference-steps", "-100"], "--reference-steps"),
    "plan, reference batch alone": (["plan", "--b-simple", "100", "--reference-batch", "64"], "go together"),
    "plan, inverted band": (["plan", "--b-simple", "100", "--band", "0.65", "0.5"], "--band"),
    "plan, band above 1": (["plan", "--b-simple", "100", "--band", "0.5", "1.5"], "--band"),
    "plan, band of one number": (["plan", "--b-simple", "100", "--band", "0.5"], "--band"),
    # nqm
    "nqm, d 0": (["nqm", "--d", "0"], "--d"),
    "nqm, d not whole": (["nqm", "--d", "2.5"], "--d"),
    "nqm, bins 0": (["nqm", "--bins", "0"], "--bins"),
    "nqm, bins negative": (["nqm", "--bins", "-3"], "--bins"),
    "nqm, batch-min 0": (["nqm", "--batch-min", "0"], "--batch-min"),
    "nqm, batch range inverted": (["nqm", "--batch-min", "100", "--batch-max", "10"], "--batch-min"),
    "nqm, num 0": (["nqm", "--num", "0"], "--num"),
    "nqm, num negative": (["nqm", "--num", "-2"], "--num"),
    "nqm, target 0": (["nqm", "--target", "0"], "--target"),
    "nqm, target negative": (["nqm", "--target", "-1"], "--target"),
    "nqm, momentum 1": (["nqm", "--momentum", "1"], "--momentum"),
    "nqm, power above 1": (["nqm", "--powers", "2"], "--powers"),
    "nqm, plot into a missing folder": (["nqm", "--plot", "{nofolder}"], "does not exist"),
    "nqm, csv into a directory": (["nqm", "--csv", "{dir}"], "is a directory"),
    # report
    "report, missing directory": (["report", "{missing}"], "no such directory"),
    "report, no event files": (["report", "{empty_dir}"], "no TensorBoard event files"),
    "report, NaN B_simple": (["report", "{nan_b_simple}"], "B_simple is nan"),
    "report, inf B_simple": (["report", "{inf_b_simple}"], "B_simple is inf"),
    "report, negative B_simple": (["report", "{negative_b_simple}"], "B_simple is -13"),
    "report, no batch size logged": (["report", "{no_batch_size}"], "gradnoise/batch_size"),
    "report, no B_simple logged": (["report", "{no_b_simple}"], "gradnoise/b_simple"),
    "report, nothing of ours logged": (["report", "{empty_run}"], "gradnoise/b_simple"),
    "report, plot into a missing folder": (["report", "{nan_b_simple}", "--out", "{nofolder}"], "does not exist"),
    "report, inverted band": (["report", "{nan_b_simple}", "--band", "0.6", "0.5"], "--band"),
    # top level
    "no subcommand": ([], "required"),
    "unknown subcommand": (["train"], "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gives_one_line_and_a_non_zero_exit(files, case: str, capsys) -> None:
    args, message = BAD[case]
    code, out, err = run_here([a.format(**files) for a in args], capsys)
    assert code == 2, out + err
    assert message in err, err
    assert err.strip().splitlines()[-1].startswith("gradnoise"), err
    assert out == "", "no result is printed from bad input"


@pytest.mark.parametrize("case", ["fit, binary file", "plan, B_simple nan", "report, NaN B_simple", "nqm, csv into a directory"])
def test_the_real_command_shows_no_traceback(files, case: str) -> None:
    args, message = BAD[case]
    proc = run(*(a.format(**files) for a in args))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


def test_a_damaged_event_file_is_said_and_what_stands_is_read(files, tmp_path) -> None:
    series = {"gradnoise/b_simple": [40.0] * 50, "gradnoise/batch_size": [64.0] * 50}
    path = write_scalars(tmp_path / "run", series)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    proc = run("report", str(tmp_path / "run"))
    assert "damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.returncode == 0 and "recommended global batch" in proc.stdout


def test_plan_says_where_the_step_time_is_extrapolated() -> None:
    proc = run("plan", "--b-simple", "100", "--batch-sizes", "16", "64", "1024", "--step-time", "32:0.05", "256:0.2")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split() and line.split()[0].isdigit()}
    assert rows["64"][-1][-1].isdigit() and rows["16"][-1].endswith("*") and rows["1024"][-1].endswith("*")
    # beyond the measured sizes the step time keeps growing with the batch (the old clamp held it flat)
    t64, t1024 = (float(rows[b][-1].rstrip("*")) / float(rows[b][1]) for b in ("64", "1024"))
    assert t1024 > 0.2 > t64
    assert "extrapolated" in proc.stdout


def test_nqm_says_the_critical_batch_lies_beyond_the_range() -> None:
    proc = run("nqm", "--d", "200", "--bins", "20", "--num", "4", "--batch-min", "1", "--batch-max", "8", "--powers", "1", "--momentum", "0")
    assert proc.returncode == 0, proc.stderr
    assert "> 8" in proc.stdout and "nan" not in proc.stdout


def test_version_and_module_entry_point() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("gradnoise (lightning-gradnoise) ")
    assert "``" not in run("--help").stdout


@pytest.mark.parametrize("command", ["nqm", "fit", "plan", "report"])
def test_every_option_has_plain_help(command: str) -> None:
    from lightning_gradnoise.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        assert "``" not in action.help and ":math:" not in action.help
    assert os.linesep not in (sub.description or "")
