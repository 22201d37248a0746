"""Train a small MLP on scikit-learn's handwritten digits and measure its gradient noise.

    python examples/digits_monitor.py [--epochs 8] [--micro-batch 16] [--accumulate 4] [--logdir runs]

Writes TensorBoard logs under ``<logdir>/digits`` (``tensorboard --logdir runs``) and ends with a
table of B_simple, GR_S, GR_T, mean GSNR and the global batch range the GR_S band implies.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as L
except ImportError:  # pragma: no cover
    import pytorch_lightning as L

from lightning_gradnoise import GradNoiseMonitor
from lightning_gradnoise.stats import GR_S_BAND, GR_T_TARGET, batch_range_for_gr_s


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 128, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def digits_loaders(micro_batch: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1500], perm[1500:]
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=micro_batch, shuffle=True, generator=g, drop_last=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)

    monitor = GradNoiseMonitor(statistics="all", log_every_n_steps=5, per_layer=True, histograms=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        callbacks=[monitor],
        logger=L.loggers.TensorBoardLogger(args.logdir, name="digits"),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    train, val = digits_loaders(args.micro_batch, args.seed)
    trainer.fit(DigitsMLP(args.lr), train, val)

    # the current value as `gradnoise report` reads it: the median of the last fifth of the logged
    # points at the run's usual batch (one point is noisy), with the last such point's 90% interval
    from lightning_gradnoise.cli import current_interval, current_value, read_tensorboard_scalars, usual_steps

    series = read_tensorboard_scalars(trainer.logger.log_dir)
    full = usual_steps(series)  # an epoch's short last window is a smaller batch: left out
    now = {key.split("/", 1)[1]: current_value(points, full) for key, points in series.items()}

    def interval(key: str) -> str:
        ends = current_interval(series, f"gradnoise/{key}", full)
        if all(math.isfinite(e) for e in ends):
            return f"({ends[0]:.3g}-{ends[1]:.3g})"
        return "(interval not bounded)" if any(math.isinf(e) for e in ends) else ""

    s = monitor.latest
    low, high = batch_range_for_gr_s(now["b_simple"], GR_S_BAND)
    rows = [
        ("global batch B", f"{now['batch_size']:.0f}", f"{args.accumulate} x {args.micro_batch}"),
        ("B_simple", f"{now['b_simple']:.1f}", f"gradient noise scale (McCandlish et al.) {interval('b_simple')}"),
        ("GR_S", f"{now['gr_s']:.3f}", f"ideal {GR_S_BAND[0]}-{GR_S_BAND[1]} {interval('gr_s')}"),
        ("GR_T", f"{now['gr_t']:.1f}", f"ideal near {GR_T_TARGET:.0f} {interval('gr_t')}"),
        ("mean GSNR", f"{now['gsnr']:.3f}", f"per parameter and sample (VRGD Eq. 2) {interval('gsnr')}"),
        ("batch for GR_S band", f"{max(low, 1):.0f}-{max(high, 1):.0f}", "global batch sizes"),
        ("val accuracy", f"{float(trainer.callback_metrics['val/acc']):.3f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n(values: medians of the last fifth of the logged points at the usual batch, as `gradnoise report`"
          " reads them; in parentheses the last such point's 90% interval)")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print(f"\nTensorBoard logs: {trainer.logger.log_dir}   (tensorboard --logdir {args.logdir})")
    return s


if __name__ == "__main__":
    main()
