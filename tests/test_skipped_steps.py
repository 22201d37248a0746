"""Steps that cannot be measured are skipped and counted, never stop training: non-finite
gradients under a VR optimizer, an empty micro-batch; and a run's last steps are reported."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import ns, recording_logger, trainer_kwargs
from lightning_gradnoise import GradNoiseMonitor, VRMoments, create_optimizer

L = ns("lightning.pytorch")


class Batches(torch.utils.data.Dataset):
    """Fixed micro-batches of a linear regression; ``sizes[i]`` samples in batch i."""

    def __init__(self, sizes: list[int], d: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [(torch.randn(n, d, generator=g), torch.randn(n, generator=g)) for n in sizes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Regression(L.LightningModule):
    def __init__(self, optimizer: str = "sgd", nan_at: int | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.optimizer, self.nan_at = optimizer, nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        # a summed loss over the samples that are there (an empty batch gives 0, not NaN)
        loss = (self.lin(x).squeeze(-1) - y).square().sum() / max(len(x), 1)
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return create_optimizer(self.optimizer, self, lr=0.01)


def run(module: Regression, sizes: list[int], callbacks: list, accumulate: int = 2):
    logger = recording_logger("lightning.pytorch")
    loader = DataLoader(Batches(sizes), batch_size=None)
    trainer = L.Trainer(**trainer_kwargs(accumulate_grad_batches=accumulate, callbacks=callbacks, logger=logger))
    trainer.fit(module, loader)
    return trainer, logger


def test_a_vr_optimizer_skips_a_non_finite_step_and_training_goes_on() -> None:
    module = Regression("vr_sgd", nan_at=5)  # micro-batch 5: the third optimizer step
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=1)
    trainer, logger = run(module, [8] * 20, [VRMoments(), monitor])
    optimizer = trainer.optimizers[0]
    assert optimizer.skipped_steps == 1
    assert trainer.global_step == 10
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in module.parameters())
    assert monitor.latest["skipped_steps"] == 1


def test_an_empty_micro_batch_is_skipped_and_counted() -> None:
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=1)
    trainer, logger = run(Regression(), [8, 8, 8, 0, 8, 8, 8, 8], [monitor])
    assert monitor.latest["skipped_steps"] == 1
    sizes = [v for _, v in logger.series("gradnoise/batch_size")]
    assert sizes and all(math.isfinite(v) and v == 16 for v in sizes), sizes
    logged_steps = [s for s, _ in logger.rows]
    assert 1 not in logged_steps  # the step with the empty micro-batch logs nothing


def test_the_last_step_of_a_run_is_logged() -> None:
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=4)
    trainer, logger = run(Regression(), [8] * 20, [monitor])  # 10 steps: logs at 0, 4, 8 and the end
    assert [s for s, _ in logger.rows] == [0, 4, 8, 9]
    assert logger.rows[-1][1]["gradnoise/batch_size"] == 16
