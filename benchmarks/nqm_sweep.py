"""Time of a full NQM sweep: 5 preconditioning powers x {plain SGD, momentum 0.9} x 20 batch sizes,
the learning rate tuned per point (golden-section search, exact closed-form risk).

    python benchmarks/nqm_sweep.py [--d 10000] [--bins 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gradnoise.nqm import NQM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=10_000)
    parser.add_argument("--bins", type=int, default=200)
    args = parser.parse_args()
    model = NQM.paper(d=args.d, bins=args.bins)
    batch = torch.logspace(0, 19, 20, base=2.0, dtype=torch.float64)
    start = time.perf_counter()
    points = 0
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        for opt in ({}, {"momentum": 0.9}):
            steps, _ = model.best_lr(batch, 0.01, precond=p, **opt)
            points += steps.numel()
    elapsed = time.perf_counter() - start
    print(f"NQM sweep: d={args.d} in {model.h.numel()} bins, {points} (p, optimizer, batch) points, "
          f"learning rate tuned per point: {elapsed:.2f} s on {torch.get_num_threads()} threads (torch {torch.__version__})")


if __name__ == "__main__":
    main()
