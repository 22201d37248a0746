"""A real multi-process fit, launched by the tests as ``python worker.py SCENARIO OUTDIR [key=value ...]``.

Lightning's own launcher starts the other ranks (gloo on CPU). Each rank writes
``OUTDIR/rank<R>.json``: what it logged, its final weights, and scenario extras.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import LinRegTruth, linreg_module, ns, trainer_kwargs  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor  # noqa: E402


def main() -> None:
    scenario, outdir, *rest = sys.argv[1:]
    opts = dict(kv.split("=", 1) for kv in rest)
    namespace = opts.get("namespace", "lightning.pytorch")
    strategy = opts.get("strategy", "gnddp")
    steps = int(opts.get("steps", 50))
    accumulate = int(opts.get("accumulate", 1))
    lr = float(opts.get("lr", 0.0))
    statistics = opts.get("statistics", "all")
    L = ns(namespace)
    truth = LinRegTruth(d=int(opts.get("d", 8)), seed=0)

    rows: list[dict] = []
    records: list[dict] = []

    class Record(L.Callback):
        """Before the monitor: keep what it sees and every step's values."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if scenario == "norms" and trainer.global_step < 3:
                records.append({"step": trainer.global_step, "x": batch[0].tolist(), "y": batch[1].tolist()})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if scenario == "norms" and trainer.global_step < 3:
                col = monitor.tracker.collector
                records.append({"step": trainer.global_step, "group_sq": col.group_sq_norms().tolist()})

    class Rows(L.Callback):
        seen = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if monitor.latest and monitor.latest is not self.seen:  # a new summary this step
                self.seen = monitor.latest
                rows.append(dict(monitor.latest, step=trainer.global_step))

    reference_rows: list[dict] = []

    class Reference(L.Callback):
        """Scenario gsnr: the logged GSNR's definition in float64 from every rank's groups (each
        group's gradient computed exactly from its batch), gathered over ranks."""

        def __init__(self) -> None:
            from lightning_gradnoise.stats import GSNRStatistic

            self.stat = GSNRStatistic(decay=float(opts.get("decay", 0.999)), dtype=torch.float64)
            self.groups: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x, y = (t.double() for t in batch)
            w = truth.w0.double()
            self.groups.append(x.T @ (x @ w - y) / len(y))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            import torch.distributed as dist

            local = torch.stack(self.groups)
            self.groups = []
            gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            groups = torch.cat(gathered)
            mean = groups.mean(0)
            k = groups.shape[0]
            self.stat.update([mean], [(groups - mean).square().sum(0)], k, inv_size_sum=k / int(opts.get("batch", 16)))
            reference_rows.append({"step": trainer.global_step, "gsnr": float(self.stat.reading()["gsnr"])})

    monitor = GradNoiseMonitor(statistics=statistics, log_every_n_steps=int(opts.get("every", 1)), ema_decay=float(opts.get("decay", 0.999)), loss_reduction=opts.get("reduction", "mean"))
    callbacks = [Record(), monitor, Rows()] if opts.get("monitor", "1") == "1" else []
    if scenario == "gsnr":
        callbacks.append(Reference())
    kw: dict = {}
    if opts.get("hook") == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        kw["ddp_comm_hook"] = default_hooks.fp16_compress_hook
    if opts.get("wrapper") == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        kw["ddp_comm_wrapper"] = default_hooks.fp16_compress_wrapper
    adapters = []
    if scenario == "adapt":
        from lightning_gradnoise import BatchSizeAdapter, LRAdapter

        adapters = [BatchSizeAdapter(cooldown=10), LRAdapter(cooldown=10)]
        callbacks.extend(adapters)

    class Count(L.Callback):
        seen = 0
        accumulate: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            Count.seen += 1
            Count.accumulate.append(trainer.accumulate_grad_batches)

    callbacks.append(Count())
    if "moments_hook" in opts:
        kw["moments_hook"] = opts["moments_hook"]
    for flag in ("gradient_as_bucket_view", "static_graph"):  # DDP's own options, for either strategy
        if opts.get(flag) == "1":
            kw[flag] = True
    if kw:
        from lightning_gradnoise.strategies import strategy_class

        cls = strategy_class(namespace) if strategy.startswith("gnddp") else L.strategies.DDPStrategy
        strategy = cls(**kw, find_unused_parameters="unused" in strategy)
    empty_at = (1, int(opts["empty_at"])) if "empty_at" in opts else None  # rank 1's batch of that index is empty
    model = linreg_module(namespace, truth, lr=lr, batch=int(opts.get("batch", 16)), n_batches=steps * accumulate,
                          reduction=opts.get("reduction", "mean"), empty_at=empty_at)
    if "optimizer" in opts:  # a registered optimizer; VR ones get their moments from VRMoments
        from lightning_gradnoise import VRMoments, create_optimizer

        extra = {"gamma": float(opts["gamma"])} if "gamma" in opts else {}
        model.configure_optimizers = lambda: create_optimizer(opts["optimizer"], model, lr=lr, **extra)
        if opts["optimizer"].startswith("vr_"):
            callbacks.append(VRMoments())
    if scenario == "unused":
        model.extra = torch.nn.Linear(3, 1)  # never used in the loss
    extra_kw: dict = {"max_epochs": int(opts.get("epochs", 1))}
    if "ckpt_dir" in opts:
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=opts["ckpt_dir"], save_top_k=-1, every_n_epochs=1))
        extra_kw["enable_checkpointing"] = True
    trainer = L.Trainer(**trainer_kwargs(devices=2, strategy=strategy, accumulate_grad_batches=accumulate, callbacks=callbacks, **extra_kw))
    if "fuse_from" in opts:  # the packed bucket's division into the packed buffer, at any size
        import lightning_gradnoise.capture._comm as comm

        comm._FUSE_FROM = int(opts["fuse_from"])
    if "pack_limit" in opts:  # 0: every bucket reduced in place, the moments beside it
        trainer.strategy.gradnoise.pack_limit = int(opts["pack_limit"])
    if not str(strategy).startswith("gnddp"):
        # plain ddp leaves a gloo group to interpreter shutdown, which now and then aborts the
        # process after a successful fit; gnddp destroys it at exit itself
        from lightning_gradnoise.capture import destroy_process_group

        atexit.register(destroy_process_group)
    trainer.fit(model, ckpt_path=opts.get("resume"))
    out = {
        "rank": trainer.global_rank,
        "rows": rows,
        "reference_rows": reference_rows,
        "records": records,
        "weight": model.lin.weight.detach().flatten().tolist(),
        "pack_limit": getattr(getattr(trainer.strategy, "gradnoise", None), "pack_limit", None),
        "truth_b_simple": truth.b_simple,
        "micro_batches_seen": Count.seen,
        "accumulate": Count.accumulate,
        "decisions": [a.decisions for a in adapters],
        "final_accumulate": trainer.accumulate_grad_batches,
        "lr_scales": [a.lr_scale for a in adapters],
        "strategy": type(trainer.strategy).__module__ + "." + type(trainer.strategy).__name__,
        "capture_mode": monitor.tracker.collector.mode if monitor.tracker is not None else None,
        "hook_registered": getattr(getattr(trainer.strategy, "gradnoise", None), "registered", None),
    }
    with open(os.path.join(outdir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
