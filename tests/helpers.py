"""Shared test fixtures: the linear-regression ground truth and Lightning models for both namespaces."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def ns(name: str):
    return importlib.import_module(name)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits of scikit-learn: inputs scaled to [0, 1] (float32) and labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)


def digits_mlp() -> nn.Sequential:
    """The small MLP the ground-truth tests freeze at its (seeded) initialization."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every example's cross-entropy gradient, flat ``[examples, parameters]``, computed in
    float64 on a copy of ``model`` (torch.func)."""
    import copy

    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(torch.func.functional_call(m64, p, (xi[None],)), yi[None])

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x.double(), y)
    return torch.cat([v.reshape(len(x), -1) for v in per.values()], 1)


def exact_b_simple(flat: torch.Tensor) -> float:
    """B_simple = tr(Sigma)/|G|^2 of the population of per-sample gradients ``flat``."""
    mean = flat.mean(0)
    return float((flat - mean).square().sum(1).mean() / mean.square().sum())


@dataclass
class LinRegTruth:
    r"""x ~ N(0, I_d), y = w*.x + e, e ~ N(0, s^2), loss (w.x - y)^2 / 2, at a frozen w.

    Per-sample gradient x (x.delta - e), delta = w - w*: mean G = delta and covariance
    |delta|^2 I + delta delta^T + s^2 I (Isserlis), so tr(Sigma) = d(|delta|^2 + s^2) + |delta|^2.
    """

    d: int = 8
    noise_std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.w_star = torch.randn(self.d, generator=g)
        self.w0 = self.w_star + torch.randn(self.d, generator=g) * 0.5

    @property
    def delta(self) -> torch.Tensor:
        return self.w0 - self.w_star

    @property
    def grad_sq(self) -> float:
        return float(self.delta.square().sum())

    @property
    def trace_cov(self) -> float:
        d2 = self.grad_sq
        return self.d * (d2 + self.noise_std**2) + d2

    @property
    def cov_diag(self) -> torch.Tensor:
        return self.grad_sq + self.delta.square() + self.noise_std**2

    @property
    def b_simple(self) -> float:
        return self.trace_cov / self.grad_sq

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.d, generator=generator)
        y = x @ self.w_star + self.noise_std * torch.randn(n, generator=generator)
        return x, y


class StreamDataset(IterableDataset):
    """Fresh samples from the population, seeded per rank, ``n_batches`` batches of ``batch``."""

    def __init__(self, truth: LinRegTruth, batch: int, n_batches: int, seed: int = 1, rank: int = 0, empty_at: int | None = None) -> None:
        self.truth, self.batch, self.n_batches, self.seed, self.rank = truth, batch, n_batches, seed, rank
        self.empty_at = empty_at  # this batch index comes with no samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        for i in range(self.n_batches):
            x, y = self.truth.sample(self.batch, g)
            yield (x[:0], y[:0]) if i == self.empty_at else (x, y)

    def __len__(self) -> int:
        return self.n_batches


def linreg_module(namespace: str, truth: LinRegTruth, lr: float = 0.0, batch: int = 16, n_batches: int = 64, reduction: str = "mean",
                  empty_at: tuple[int, int] | None = None):
    """A LightningModule of the given namespace: one linear layer (no bias) at truth.w0, its loss
    averaged (``reduction="mean"``) or summed over the batch."""
    L = ns(namespace)

    class LinReg(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(truth.d, 1, bias=False)
            with torch.no_grad():
                self.lin.weight.copy_(truth.w0[None])

        def training_step(self, batch, batch_idx):
            x, y = batch
            sq = 0.5 * (self.lin(x).squeeze(-1) - y).square()
            return sq.sum() if reduction == "sum" else sq.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

        def train_dataloader(self):
            rank = self.trainer.global_rank if self._trainer is not None else 0
            empty = empty_at[1] if empty_at is not None and empty_at[0] == rank else None  # (rank, batch index)
            return DataLoader(StreamDataset(truth, batch, n_batches, rank=rank, empty_at=empty), batch_size=None)

    return LinReg()


def trainer_kwargs(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    base.update(kw)
    return base


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else math.inf


def recording_logger(namespace: str):
    """A Lightning logger (of the namespace) that keeps every ``log_metrics`` call."""
    L = ns(namespace)

    class Recorder(L.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def series(self, key: str) -> list[tuple[int, float]]:
            return [(s, m[key]) for s, m in self.rows if key in m]

    return Recorder()


# A normal two-process launch takes 8-15 s on 2 quiet cores; a loaded machine was seen to need
# more than 120 s. 300 s passes a busy machine and still ends a real hang within the CI budget.
LAUNCH_TIMEOUT_S = float(os.environ.get("GRADNOISE_TEST_LAUNCH_TIMEOUT", 300))


def launch_two_processes(worker, out, scenario: str, cwd=None, **opts) -> list[dict]:
    """Run ``worker SCENARIO OUT key=value ...`` as two ranks and read each rank's JSON.

    Both ranks start at once, as a cluster launcher starts them (``LOCAL_RANK`` set, so Lightning
    does not start the second itself once the first has imported everything): their start-up
    overlaps. One thread per process: two processes of two threads each on two cores spend their
    time waiting for each other at every collective."""
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, str(worker), scenario, str(out)] + [f"{k}={v}" for k, v in opts.items()]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE="2")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              env=dict(env, LOCAL_RANK=str(r), RANK=str(r))) for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
