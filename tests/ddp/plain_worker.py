"""Two processes (gloo) running plain torch DistributedDataParallel with the README's loop: the
tracker and the communication hook without Lightning. Rank 0 also replays every step on one
process (the same micro-batches, as 2 x accumulate groups) for reference.

    python plain_worker.py SCENARIO OUTDIR [accumulate=2] [steps=40] [every=10]

Scenarios: ``match`` (results per summarized step, DDP and one-process reference) and
``disagree`` (rank 1 runs one more micro-batch per step than rank 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import LinRegTruth  # noqa: E402

from lightning_gradnoise import GradNoiseTracker  # noqa: E402
from lightning_gradnoise.capture import GradNoiseCommState, destroy_process_group, gradnoise_comm_hook  # noqa: E402

STATS = ("b_simple", "gr_s", "gsnr")


def batches(step: int, rank: int, count: int, truth: LinRegTruth) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + 1)
    return [truth.sample(16, g) for _ in range(count)]


def model_at(truth: LinRegTruth) -> nn.Linear:
    model = nn.Linear(truth.d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(truth.w0[None])
    return model


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y).square().mean() / 2


def run(rank: int, port: int, scenario: str, outdir: str, opts: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    truth = LinRegTruth(d=8, seed=0)
    accumulate, steps, every = int(opts.get("accumulate", 2)), int(opts.get("steps", 40)), int(opts.get("every", 10))
    mine = accumulate + (1 if scenario == "disagree" and rank == 1 else 0)
    model = model_at(truth)  # frozen: no optimizer step, so every step has the same truth
    # external: the hook reads DDP's buckets; final: no hook, .grad read at the end of backward
    mode = opts.get("mode") or ("external" if accumulate == 1 else "hooks")
    tracker = GradNoiseTracker(model, statistics=STATS, ema_decay=0.9, mode=mode).attach()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = GradNoiseCommState(tracker.collector)
    if mode != "final":
        ddp.register_comm_hook(state, gradnoise_comm_hook)
    solo = dist.new_group([0])  # the reference's own group of one: no collective (every rank creates it)
    ref_model = model_at(truth)
    ref = GradNoiseTracker(ref_model, statistics=STATS, ema_decay=0.9, mode="swap").attach()
    rows, error = [], None
    try:
        for step in range(steps):
            micro = batches(step, rank, mine, truth)
            summarize = step % every == every - 1
            ddp.zero_grad()
            tracker.begin_step(elementwise=summarize)
            for i, (x, y) in enumerate(micro):
                ctx = ddp.no_sync() if i < mine - 1 else contextlib.nullcontext()
                with ctx:
                    loss = loss_fn(ddp(x), y) / mine
                    tracker.begin_group(scale=mine, size=len(x), loss=loss)
                    loss.backward()
                tracker.end_group()
            reduced = state.take() if mode != "final" else None
            summary = tracker.finish_step(loss_divisor=mine, summarize=summarize, reduced=reduced)
            if summary is None:
                continue
            row = {"step": step, "ddp": summary, "packed_bytes": state.last_packed_bytes}
            if rank == 0:  # the same 2 x accumulate micro-batches as groups of one process
                for ref_step in range(step - every + 1, step + 1):
                    groups = [b for r in range(2) for b in batches(ref_step, r, accumulate, truth)]
                    ref_model.zero_grad()
                    ref.begin_step(elementwise=ref_step == step)
                    for x, y in groups:
                        ref.begin_group(scale=len(groups), size=len(x))
                        (loss_fn(ref_model(x), y) / len(groups)).backward()
                        ref.end_group()
                    out = ref.finish_step(loss_divisor=len(groups), summarize=ref_step == step, process_group=solo)
                row["reference"] = out
            rows.append(row)
    except RuntimeError as exc:
        error = str(exc)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "error": error}, f)
    # DDP's Reducer must not hold the last reference to the gloo group (a hang at exit, about 1
    # run in 3 here without this): see destroy_process_group
    del ddp
    destroy_process_group()


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(port, scenario, outdir, opts), nprocs=2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
