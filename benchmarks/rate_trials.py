"""Can a trial of another learning rate be judged within tens of steps? A measurement on the
character-level language model of the auto-tuning benchmark (AdamW, batch 32).

A run at a fixed rate is forked at a step into three branches from the same state, each drawing
its own batches (as a trial in a live run would): the rate halved, kept, doubled. Each branch runs 200 steps. The outcome is which branch
has the lowest held-out loss over its last 25 steps (256 held-out sequences, every 5 steps). The
measures that a rule could act on early are the slopes, over steps 10 to ``--window`` after the
fork (the first 10 skipped as a transient), of

- the training loss of each step's own batch (what ``LRAdapter`` reads today), and
- the loss on one fixed probe batch of the same size, drawn once from the training data and
  evaluated after every step (one extra forward pass a step).

For each pair of branches (doubled against kept, halved against kept) the table says whether each
measure's ordering agrees with the outcome. A rule that cannot fork compares the window after a
change with the window before it: the last column gives the probe slope of the kept branch minus
that of the same run over the ``--window`` steps before the fork, the bias such a sequential
comparison would carry (the loss curve bends over time).

    python benchmarks/rate_trials.py                      # 5 rates x 2 fork steps x 3 seeds
    python benchmarks/rate_trials.py --rates 0.002 --forks 150 --seeds 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _charlm import CharLM, char_splits  # noqa: E402

FACTORS = (0.5, 1.0, 2.0)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def slope(values: list[float], lo: int, hi: int) -> float:
    """Least-squares slope per step of ``values[lo:hi]``."""
    t = torch.arange(lo, hi, dtype=torch.float64)
    v = torch.tensor(values[lo:hi], dtype=torch.float64)
    tc = t - t.mean()
    return float((tc * (v - v.mean())).sum() / tc.square().sum())


def fork(rate: float, at: int, seed: int, window: int, branch_steps: int, batch: int, parts) -> dict:
    vocab, (tx, ty), (vx, vy) = parts
    torch.manual_seed(seed)
    model = CharLM(vocab, d=64, layers=2, heads=4, seq=tx.shape[1], lr=rate)
    opt = torch.optim.AdamW(model.parameters(), lr=rate)
    draws = torch.Generator().manual_seed(seed)
    probe_draw = torch.randint(0, len(tx), (batch,), generator=torch.Generator().manual_seed(10_000 + seed))
    probe = (tx[probe_draw], ty[probe_draw])

    def step() -> float:
        i = torch.randint(0, len(tx), (batch,), generator=draws)
        opt.zero_grad()
        loss = loss_of(model, tx[i], ty[i])
        loss.backward()
        opt.step()
        return float(loss.detach())

    def probe_loss() -> float:
        with torch.no_grad():
            return float(loss_of(model, *probe))

    before = []
    for s in range(at):
        step()
        if s >= at - window:
            before.append(probe_loss())
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    out = {"pre_probe": slope(before, 0, len(before))}
    for factor in FACTORS:
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        # each branch its own batches, as a trial in a live run would see
        draws.manual_seed(1_000 * seed + int(4 * factor))
        for group in opt.param_groups:
            group["lr"] = rate * factor
        train, probed, held = [], [], []
        for s in range(branch_steps):
            train.append(step())
            probed.append(probe_loss())
            if s % 5 == 4 and s >= branch_steps - 25:
                with torch.no_grad():
                    held.append(float(loss_of(model, vx, vy)))
        out[factor] = {"train": slope(train, 10, window), "probe": slope(probed, 10, window), "held": sum(held) / len(held)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0008, 0.002, 0.004, 0.008, 0.024])
    parser.add_argument("--forks", type=int, nargs="+", default=[100, 300], help="optimizer steps before the fork")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=50, help="slopes over steps 10..window after the fork")
    parser.add_argument("--branch-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.window < 13 or args.window > args.branch_steps:
        parser.error(f"--window {args.window}: between 13 and --branch-steps ({args.branch_steps})")
    torch.set_num_threads(args.threads)
    parts = char_splits()
    start = time.time()
    agree = {"train": [0, 0], "probe": [0, 0]}  # [agreeing pairs, pairs]
    biases = []
    print(f"char LM, AdamW, batch 32: forks at x0.5 / x1 / x2; slopes over steps 10-{args.window} after the fork, "
          f"outcome: held-out loss over the last 25 of {args.branch_steps} steps")
    print(f"{'rate':>8} {'fork':>5} {'seed':>4}  {'held-out x0.5 / x1 / x2':>24}  {'train slope x0.5 / x1 / x2':>30}  "
          f"{'probe slope x0.5 / x1 / x2':>30}  {'x2 vs x1 (train, probe)':>24}  {'x0.5 vs x1':>11}  {'sequential bias':>15}")
    for rate in args.rates:
        for at in args.forks:
            for seed in range(args.seeds):
                r = fork(rate, at, seed, args.window, args.branch_steps, 32, parts)
                verdicts = []
                for other in (2.0, 0.5):
                    truth = r[other]["held"] < r[1.0]["held"]
                    mark = ""
                    for measure in ("train", "probe"):
                        says = r[other][measure] < r[1.0][measure]
                        agree[measure][0] += says == truth
                        agree[measure][1] += 1
                        mark += "y" if says == truth else "n"
                    verdicts.append(f"{'better' if truth else 'worse'} ({mark[0]}, {mark[1]})")
                bias = r[1.0]["probe"] - r["pre_probe"]
                biases.append((bias, abs(r[2.0]["probe"] - r[1.0]["probe"])))
                fmt = lambda key, spec: " / ".join(format(r[f][key], spec) for f in FACTORS)  # noqa: E731
                print(f"{rate:>8g} {at:>5} {seed:>4}  {fmt('held', '.3f'):>24}  {fmt('train', '+.4f'):>30}  {fmt('probe', '+.4f'):>30}  "
                      f"{verdicts[0]:>24}  {verdicts[1]:>11}  {bias:>+15.4f}", flush=True)
    for measure, (hits, total) in agree.items():
        print(f"{measure} loss slope orders a pair of branches as the held-out outcome does: {hits} of {total}")
    mean_bias = sum(b for b, _ in biases) / len(biases)
    mean_gap = sum(g for _, g in biases) / len(biases)
    print(f"sequential comparison (kept rate after the fork minus before it, probe slope): mean {mean_bias:+.4f} per step, "
          f"against a mean |x2 - x1| gap of {mean_gap:.4f} per step; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
