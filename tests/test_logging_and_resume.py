"""What a user sees: TensorBoard and W&B files hold the keys; a resumed run logs what an uninterrupted one does."""

from __future__ import annotations

import glob
import os

import pytest

from helpers import NAMESPACES, LinRegTruth, linreg_module, ns, recording_logger, trainer_kwargs
from lightning_gradnoise import GradNoiseMonitor

KEYS = ["b_simple", "gr_s", "gr_t", "gsnr", "grad_sq", "trace_cov", "batch_size"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_tensorboard_event_files_hold_the_keys(namespace, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L = ns(namespace)
    truth = LinRegTruth(d=5)
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="run")
    mon = GradNoiseMonitor(statistics="all", log_every_n_steps=5, per_layer=True, histograms=True)
    model = linreg_module(namespace, truth, lr=0.01, n_batches=4 * 20)
    L.Trainer(**trainer_kwargs(accumulate_grad_batches=4, callbacks=[mon], logger=logger)).fit(model)
    (event_dir,) = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "run" / "*" / "events.out.tfevents.*"))}
    acc = EventAccumulator(event_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in KEYS:
        assert f"gradnoise/{key}" in tags["scalars"], key
        assert [e.step for e in acc.Scalars(f"gradnoise/{key}")] == [0, 5, 10, 15, 19]  # and the last step, at the end
    assert "gradnoise/layer/lin.weight/b_simple" in tags["scalars"]
    assert "gradnoise/layer/lin.weight/log10_gsnr" in tags["histograms"]
    written = acc.Scalars("gradnoise/b_simple")[-1].value
    assert written == pytest.approx(mon.latest["b_simple"], rel=1e-6)


def test_wandb_offline_run_holds_the_keys(tmp_path, monkeypatch) -> None:
    from wandb_reader import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    L = ns("lightning.pytorch")
    truth = LinRegTruth(d=5)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradnoise-test")
    mon = GradNoiseMonitor(statistics="all", log_every_n_steps=5, per_layer=True, histograms=True)
    model = linreg_module("lightning.pytorch", truth, lr=0.01, n_batches=4 * 20)
    L.Trainer(**trainer_kwargs(accumulate_grad_batches=4, callbacks=[mon], logger=logger)).fit(model)
    logger.experiment.finish()
    wandb.teardown()  # waits for the writer process to flush the run file
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    rows = history(run_file)
    keys = set().union(*rows)
    for key in KEYS:
        assert f"gradnoise/{key}" in keys, key
    assert any(k.startswith("gradnoise/layer/lin.weight/log10_gsnr") for k in keys)
    last = [r for r in rows if "gradnoise/b_simple" in r][-1]
    assert last["gradnoise/b_simple"] == pytest.approx(mon.latest["b_simple"], rel=1e-9)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_resumed_run_logs_what_an_uninterrupted_run_logs(namespace, tmp_path) -> None:
    L = ns(namespace)
    truth = LinRegTruth(d=5, seed=7)

    def run(max_epochs, ckpt_dir=None, resume=None):
        logger = recording_logger(namespace)
        mon = GradNoiseMonitor(statistics="all", log_every_n_steps=3, ema_decay=0.9)
        cbs = [mon]
        if ckpt_dir:
            cbs.append(L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_epochs=1))
        model = linreg_module(namespace, truth, lr=0.05, n_batches=4 * 10)
        kw = trainer_kwargs(accumulate_grad_batches=4, callbacks=cbs, logger=logger, max_epochs=max_epochs)
        kw["enable_checkpointing"] = bool(ckpt_dir)
        L.Trainer(**kw).fit(model, ckpt_path=resume)
        return logger.rows

    full = run(3, ckpt_dir=tmp_path)
    (ckpt,) = glob.glob(str(tmp_path / "epoch=0-*.ckpt"))
    resumed = run(3, resume=ckpt)
    tail = [(s, m) for s, m in full if s >= 10]
    assert len(tail) >= 6 and [s for s, _ in resumed] == [s for s, _ in tail]
    for (_, want), (_, got) in zip(tail, resumed):
        for key in ("gradnoise/b_simple", "gradnoise/gr_t", "gradnoise/gsnr", "gradnoise/grad_sq"):
            assert got[key] == want[key], key
