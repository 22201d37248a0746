"""Step time with GradNoiseMonitor divided by step time without it, measured in one run.

    python benchmarks/monitor_overhead.py [--steps 200] [--repeats 5] [--accumulate 4] [--hidden 128]

The digits MLP of examples/digits_monitor.py, one CPU device, accumulate_grad_batches=4. In each
fit the monitor is active on a fixed pseudo-random half of the optimizer steps (see ``_alternate.py``), so steps with and
without it are interleaved in the same process; a fit's ratio is the median step with the monitor
over the median step without it, and the table gives the median ratio over ``repeats`` fits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
from _alternate import build  # noqa: E402
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor  # noqa: E402

Alternating, StepTimes = build(L)

CONFIGS = {
    "scalar (b_simple, gr_s)": dict(statistics=("b_simple", "gr_s"), log_every_n_steps=51),
    "gr_t": dict(statistics=("gr_t",), log_every_n_steps=51),
    "gsnr, logged every 51 steps": dict(statistics=("gsnr",), log_every_n_steps=51),
    "gsnr, logged every step": dict(statistics=("gsnr",), log_every_n_steps=1),
    "all four, logged every 51 steps": dict(statistics="all", log_every_n_steps=51),
}


def paired_fit(monitor_kwargs: dict, steps: int, accumulate: int, micro: int, hidden: int = 128) -> tuple[float, float]:
    """(ratio on/off, ms per step without the monitor) of one fit."""
    L.seed_everything(0, verbose=False)
    times = StepTimes(warmup=10)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps,
        accumulate_grad_batches=accumulate, callbacks=[times, Alternating(GradNoiseMonitor(**monitor_kwargs))],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    train, _ = digits_loaders(micro)
    trainer.fit(DigitsMLP(hidden=hidden), train)
    return times.ratio(), times.off_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's first layer (the demo model: 128)")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = {name: [paired_fit(kw, args.steps, args.accumulate, args.micro_batch, args.hidden) for _ in range(args.repeats)] for name, kw in CONFIGS.items()}
    params = sum(p.numel() for p in DigitsMLP(hidden=args.hidden).parameters())
    print(f"\ndigits MLP (hidden {args.hidden}, {params} parameters), 1 CPU device, accumulate_grad_batches={args.accumulate}, micro-batch {args.micro_batch}, "
          f"{args.steps} steps x {args.repeats} fits (torch {torch.__version__})")
    print(f"{'configuration':<34} {'ms/step without':>16} {'ratio':>7}  {'(min-max over fits)':<20} {'extra us/step':>13}")
    for name, rs in results.items():
        ratios = [r for r, _ in rs]
        base = statistics.median(ms for _, ms in rs)
        r = statistics.median(ratios)
        print(f"{name:<34} {base:>16.3f} {r:>7.3f}  ({min(ratios):.3f}-{max(ratios):.3f}){'':<7} {(r - 1) * base * 1e3:>13.0f}")


if __name__ == "__main__":
    main()
