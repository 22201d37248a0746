"""Large-batch classification: the VR optimizers against their bases (VRGD Table 6's trend).

    python benchmarks/vr_classification.py [--epochs 40] [--seeds 3]

scikit-learn's digits (1500 train / 297 test), an MLP 64-128-64-10, the same number of epochs at
every batch size (so large batches take few steps, where VRGD reports its gains), k = 8 groups per
step (each a slice of the batch, its gradient by its own backward). Each optimizer keeps its
learning rate across batch sizes: Momentum 0.1, Adam 3e-3, LAMB 1e-2, and VR versions the same.
Reported: test accuracy after the last epoch, mean over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_gradnoise.optim import create_optimizer

PAIRS = [("momentum", "vr_momentum", 0.1), ("adam", "vr_adam", 3e-3), ("lamb", "vr_lamb", 1e-2)]


def data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def train(name: str, lr: float, batch: int, epochs: int, seed: int, k: int = 8) -> float:
    xtr, ytr, xte, yte = data()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = create_optimizer(name, net, lr=lr)
    params = list(net.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr) - batch + 1, batch):
            idx = perm[start : start + batch]
            opt.zero_grad()
            sq = [torch.zeros_like(p) for p in params]
            for chunk in idx.chunk(k):
                loss = nn.functional.cross_entropy(net(xtr[chunk]), ytr[chunk])
                grads = torch.autograd.grad(loss, params)
                for s, gr, p in zip(sq, grads, params):
                    s.addcmul_(gr, gr)
                    p.grad = gr / k if p.grad is None else p.grad + gr / k
            if name.startswith("vr_"):
                opt.set_moments(sq, k)
            opt.step()
    with torch.no_grad():
        return float((net(xte).argmax(-1) == yte).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batches = (64, 256, 750)
    print(f"digits, {args.epochs} epochs at every batch size, k=8 groups, test accuracy (mean of {args.seeds} seeds)")
    print(f"{'optimizer':<14}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
    for base, vr, lr in PAIRS:
        for name in (base, vr):
            accs = [statistics.mean(train(name, lr, b, args.epochs, s) for s in range(args.seeds)) for b in batches]
            print(f"{name:<14}" + "".join(f"{a:>12.3f}" for a in accs))


if __name__ == "__main__":
    main()
