"""VRGD section 7.2 and Fig. 4: VR-SGD against SGD on linear regression, and its sensitivity.

    python benchmarks/vrgd_linreg.py [--loss norm|mse] [--grid fine|coarse] [--plot vrgd.png]

True weights W_i = i (i = 1..10), w initialized to 0, inputs x ~ U(0, 1)^10 drawn fresh each
step, labels y = W.x, batch 256 split into k = 8 groups (the paper's minimum), 100 steps, test
loss (mean squared error) on 10000 held-out inputs. The training loss is the paper's
L = |Y - wX|_2 over each group's samples (``--loss norm``: the norm itself, not its square, so
the gradient keeps its length as the residual shrinks), or the mean squared error
(``--loss mse``). Each optimizer gets its own best learning rate on a
grid (VR-SGD's factors are at most 1, so its best rate is larger): by default a fine grid spaced
by 2^(1/4) from 0.01 to 2 (``--grid coarse``: the 12 rates first used). Reported under two
protocols: (A) each optimizer at the rate with its lowest step-100 test loss, and the step at
which VR-SGD first reaches SGD's step-100 test loss (the paper reports about 50); (B) SGD as in
(A), VR-SGD at the rate that reaches that loss in the fewest steps (median over seeds). Then, at
batch 2048, the final test loss against gamma and against k (the paper finds gamma near
0.04-0.2 and k near 32-256 best). Mean over 5 seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lightning_gradnoise.optim import create_optimizer

W = torch.arange(1, 11, dtype=torch.float64)


def train(name: str, lr: float, batch: int, k: int, steps: int, seed: int, gamma: float = 0.1, loss: str = "norm") -> list[float]:
    g = torch.Generator().manual_seed(seed)
    x_test = torch.rand(10_000, 10, generator=g, dtype=torch.float64)
    y_test = x_test @ W
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = create_optimizer(name, [w], lr=lr, **({"gamma": gamma} if name.startswith("vr") else {}))
    losses = []
    for _ in range(steps):
        x = torch.rand(k, batch // k, 10, generator=g, dtype=torch.float64)
        resid = x @ w.detach() - x @ W  # [k, b]
        if loss == "norm":  # gradient of |y - wx|_2 per group
            group = (x * resid[..., None]).sum(1) / resid.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:  # gradient of mean (y - wx)^2 per group
            group = 2 * (x * resid[..., None]).mean(1)
        w.grad = group.mean(0)
        if name.startswith("vr"):
            opt.set_moments([group.square().sum(0)], k)
        opt.step()
        losses.append(float(((x_test @ w.detach() - y_test) ** 2).mean()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", help="write the curves to this PNG")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--loss", choices=("norm", "mse"), default="norm")
    parser.add_argument("--grid", choices=("fine", "coarse"), default="fine")
    args = parser.parse_args()
    seeds = range(args.seeds)
    if args.grid == "coarse":
        grid = [0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0]
    else:  # 2^(1/4) apart: no optimizer's best rate falls in a gap of the grid
        grid = [round(0.01 * 2 ** (i / 4), 6) for i in range(31)]
    run = lambda name, lr, batch, k, seed, gamma=0.1: train(name, lr, batch, k, 100, seed, gamma, args.loss)  # noqa: E731
    best = {}
    for name in ("sgd", "vr_sgd"):
        final = {lr: statistics.mean(run(name, lr, 256, 8, s)[-1] for s in seeds) for lr in grid}
        final = {k: v for k, v in final.items() if v == v and v < float("inf")}
        best[name] = min(final, key=final.get)
        print(f"{name} test loss after 100 steps by learning rate: " + ", ".join(f"{k}: {v:.3g}" for k, v in final.items()) + f" -> lr {best[name]}")
    sgd = [run("sgd", best["sgd"], 256, 8, s) for s in seeds]
    vr = [run("vr_sgd", best["vr_sgd"], 256, 8, s) for s in seeds]
    reach = []
    for s_curve, v_curve in zip(sgd, vr):
        target = s_curve[-1]
        hit = next((i + 1 for i, loss in enumerate(v_curve) if loss <= target), None)
        reach.append(hit if hit is not None else float("inf"))
    print(f"training loss {'|Y - wX|_2' if args.loss == 'norm' else 'mean squared error'}; "
          f"batch 256, k=8, lr {best['sgd']} / {best['vr_sgd']}: SGD test loss at step 100 = {statistics.mean(c[-1] for c in sgd):.4g}; "
          f"VR-SGD at step 100 = {statistics.mean(c[-1] for c in vr):.4g}")
    print(f"(A) each tuned for its step-100 loss: steps VR-SGD needs to reach SGD's step-100 test loss, per seed: {reach} (paper: about 50)")

    def steps_to(curve: list[float], target: float) -> float:
        return next((i + 1 for i, v in enumerate(curve) if v <= target), float("inf"))

    targets = [c[-1] for c in sgd]
    by_lr = {lr: statistics.median(steps_to(run("vr_sgd", lr, 256, 8, s), t) for s, t in zip(seeds, targets)) for lr in grid}
    fastest = min(by_lr, key=by_lr.get)
    per_seed = [steps_to(run("vr_sgd", fastest, 256, 8, s), t) for s, t in zip(seeds, targets)]
    print(f"(B) VR-SGD tuned for steps to SGD's step-100 loss: lr {fastest}, steps per seed: {per_seed} (median {statistics.median(per_seed)})")
    print("\nbatch 2048, k=8: final test loss against gamma (VR-SGD; gamma = 1 is SGD)")
    for gamma in (0.01, 0.04, 0.1, 0.2, 0.5, 1.0):
        print(f"  gamma={gamma:<5} {statistics.mean(run('vr_sgd', best['vr_sgd'], 2048, 8, s, gamma)[-1] for s in seeds):.4g}")
    print("batch 2048, gamma=0.1: final test loss against k")
    for k in (2, 8, 32, 128, 256, 1024):
        print(f"  k={k:<5} {statistics.mean(run('vr_sgd', best['vr_sgd'], 2048, k, s)[-1] for s in seeds):.4g}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.semilogy([statistics.mean(c[i] for c in sgd) for i in range(100)], label=f"SGD, lr {best['sgd']}")
        ax.semilogy([statistics.mean(c[i] for c in vr) for i in range(100)], "--", label=f"VR-SGD, lr {best['vr_sgd']}")
        ax.set(xlabel="step", ylabel="test loss", title="linear regression, batch 256")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
