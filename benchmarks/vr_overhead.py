"""Optimizer-step and training-step time of each VR optimizer over its base, 2 CPU processes (gnddp).

    python benchmarks/vr_overhead.py [--steps 150] [--repeats 3]

The digits MLP, strategy="gnddp", micro-batch 32, no accumulation (k = 2 devices). A VR
optimizer gets its moments from VRMoments (inside DDP's all-reduce); its base runs without it.
Fits run in one shuffled order shared by both ranks; rank 0 times, after a warm-up, each whole
step and each optimizer step (from the last on_before_optimizer_step hook to on_train_batch_end);
the table gives medians over fits and the VR/base ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import VRMoments, create_optimizer  # noqa: E402

PAIRS = [("sgd", "vr_sgd", 0.1), ("momentum", "vr_momentum", 0.1), ("adam", "vr_adam", 1e-3),
         ("adamw", "vr_adamw", 1e-3), ("lamb", "vr_lamb", 1e-3), ("lars", "vr_lars", 1.0)]


class Timer(L.Callback):
    def __init__(self, warmup: int = 10) -> None:
        self.warmup, self.last, self.step, self.opt, self.t_opt = warmup, None, [], [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.t_opt = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.opt.append(now - self.t_opt)
            if self.last is not None:
                self.step.append(now - self.last)
        self.last = now


def fit(name: str, lr: float, steps: int) -> tuple[float, float]:
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(lr)
    model.configure_optimizers = lambda: create_optimizer(name, model, lr=lr)
    timer = Timer()
    callbacks = ([VRMoments()] if name.startswith("vr_") else []) + [timer]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="gnddp", max_steps=steps, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    train, _ = digits_loaders(32)
    trainer.fit(model, train)
    return statistics.median(timer.step), statistics.median(timer.opt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    runs = [(name, lr) for pair in PAIRS for name, lr in ((pair[0], pair[2]), (pair[1], pair[2]))] * args.repeats
    random.Random(0).shuffle(runs)  # the same order on both ranks
    results: dict[str, list[tuple[float, float]]] = {}
    for name, lr in runs:
        results.setdefault(name, []).append(fit(name, lr, args.steps))
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    med = {n: (statistics.median(s for s, _ in r), statistics.median(o for _, o in r)) for n, r in results.items()}
    print(f"\ndigits MLP, 2 CPU processes, gnddp, micro-batch 32, {args.steps} steps x {args.repeats} fits (torch {torch.__version__})")
    print(f"{'optimizer':<12} {'step ms':>8} {'opt ms':>8} {'step ratio':>11} {'opt ratio':>10}")
    for base, vr, _ in PAIRS:
        for name in (base, vr):
            s, o = med[name]
            rs, ro = (s / med[base][0], o / med[base][1]) if name == vr else (1.0, 1.0)
            print(f"{name:<12} {s * 1e3:>8.3f} {o * 1e3:>8.3f} {rs:>11.3f} {ro:>10.3f}")


if __name__ == "__main__":
    main()
