"""A real two-process fit of a digits MLP frozen at its initialization, launched by the tests as
``python sharded_worker.py SCENARIO OUTDIR [key=value ...]`` (Lightning starts the other rank;
gloo on CPU). Each rank writes ``OUTDIR/rank<R>.json`` with the monitor's summaries.

Scenarios: ``fsdp2`` (``ModelParallelStrategy``, ``fully_shard`` on each layer and the model in
``configure_model``) and ``gnddp`` (``strategy="gnddp"``); ``capture=`` passes to the monitor.
Batches are drawn with replacement from the whole data set, so the exact population values
follow from all per-sample gradients (the test computes them from the same initialization).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import digits, digits_mlp, trainer_kwargs  # noqa: E402

import lightning.pytorch as L  # noqa: E402
from lightning_gradnoise import GradNoiseMonitor  # noqa: E402


class Digits(L.LightningModule):
    def __init__(self, steps: int, batch: int, shard: bool) -> None:
        super().__init__()
        self.steps, self.batch, self.shard = steps, batch, shard
        self.net = digits_mlp()

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x, y = digits()
        gen = torch.Generator().manual_seed(100 + self.trainer.global_rank)
        sampler = RandomSampler(TensorDataset(x, y), replacement=True, num_samples=self.steps * self.batch, generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch, sampler=sampler)


def main() -> None:
    scenario, outdir, *rest = sys.argv[1:]
    opts = dict(kv.split("=", 1) for kv in rest)
    steps, batch = int(opts.get("steps", 600)), int(opts.get("batch", 32))
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=int(opts.get("every", 100)),
                               ema_decay=float(opts.get("decay", 0.999)), capture=opts.get("capture", "auto"),
                               per_example_every=int(opts.get("per_example_every", 1)))
    rows: list[dict] = []

    class Rows(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if monitor.latest and (not rows or rows[-1] is not monitor.latest):
                rows.append(monitor.latest)

    if scenario == "fsdp2":
        strategy = L.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "gnddp"
    trainer = L.Trainer(**trainer_kwargs(devices=2, strategy=strategy, callbacks=[monitor, Rows()],
                                         use_distributed_sampler=False))
    model = Digits(steps, batch, shard=scenario == "fsdp2")
    trainer.fit(model)
    grads_are_sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    out = {
        "rank": trainer.global_rank,
        "rows": [dict(r) for r in rows],
        "latest": dict(monitor.latest),
        "capture_mode": monitor.tracker.collector.mode,
        "sharded": grads_are_sharded,
    }
    with open(os.path.join(outdir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
