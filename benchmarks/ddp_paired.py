"""The tracker under DDP against plain DDP in the same run: two CPU processes (gloo), no Lightning.

    python benchmarks/ddp_paired.py [--steps 400] [--repeats 5] [--hidden 128] [--every 51] [--capture final|hook] [--hook-only]

Each process holds two copies of the digits MLP: one wrapped in plain DistributedDataParallel
(DDP's built-in all-reduce), one with a ``GradNoiseTracker`` (B_simple and GR_S, summarized
every ``--every`` steps, when the steps since the last summary are summed over processes in one
all-reduce). ``--capture final`` (default, gnddp's path without a consumer of elementwise
moments on every step): no communication hook, each process's ``.grad`` read at the end of
backward (mode "final"). ``--capture hook``: ``gradnoise_comm_hook`` registered, reading each
process's norms from the bucket (mode "external"). Steps go to one or the other (a fixed pseudo-random half each) on
one stream of batches, so both see the same drift of this shared machine. Per fit: the median step with the monitor
over the median step without it (the typical step), and the same for means (which also counts
the summarized steps). Printed: the median over fits, and the range. ``--hook-only`` registers the
hook with nothing to measure: what a Python communication hook costs against DDP's built-in one.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
from _alternate import monitored as pick  # noqa: E402
from digits_monitor import DigitsMLP, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseTracker  # noqa: E402
from lightning_gradnoise.capture import GradNoiseCommState, destroy_process_group, gradnoise_comm_hook  # noqa: E402


def fit(rank: int, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    net = DigitsMLP(hidden=args.hidden).net
    plain_net, gn_net = net, DigitsMLP(hidden=args.hidden).net
    gn_net.load_state_dict(net.state_dict())
    plain = nn.parallel.DistributedDataParallel(plain_net)
    hooked = args.hook_only or args.capture == "hook"
    tracker = GradNoiseTracker(gn_net, statistics=("b_simple", "gr_s"), mode="external" if hooked else "final").attach()
    gn = nn.parallel.DistributedDataParallel(gn_net)
    state = GradNoiseCommState(None if args.hook_only else tracker.collector)
    if hooked:
        gn.register_comm_hook(state, gradnoise_comm_hook)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, gn)}
    loader, _ = digits_loaders(args.micro_batch, seed=seed)
    shard = [b for i, b in enumerate(loader) if i % 2 == rank]
    times: dict[str, list[float]] = {"on": [], "off": []}
    summaries = summaries_due = 0
    for step in range(2 * args.steps):
        # which model steps: a fixed pseudo-random half (strict alternation meets DDP's
        # period-two rhythm between the processes); both read the same stream of batches
        x, y = shard[step % len(shard)]
        monitored = pick(step)
        model = gn if monitored else plain
        start = time.perf_counter()
        opt = opts[id(model)]
        opt.zero_grad()
        if monitored and not args.hook_only:
            tracker.begin_step()
        loss = nn.functional.cross_entropy(model(x), y)
        if monitored and not args.hook_only:
            tracker.begin_group(scale=1.0, size=len(x), loss=loss)
        loss.backward()
        if monitored and not args.hook_only:
            tracker.end_group()
            out = tracker.finish_step(summarize=summaries_due % args.every == args.every - 1, reduced=state.take() if hooked else None)
            summaries += out is not None
            summaries_due += 1
        opt.step()
        if step >= 20:
            times["on" if monitored else "off"].append(time.perf_counter() - start)
    median = statistics.median(times["on"]) / statistics.median(times["off"])
    mean = statistics.mean(times["on"]) / statistics.mean(times["off"])
    return median, mean, statistics.median(times["off"]) * 1e3


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = [fit(rank, args, seed) for seed in range(args.repeats)]
    if rank == 0:
        params = sum(p.numel() for p in DigitsMLP(hidden=args.hidden).parameters())
        med = [r[0] for r in results]
        mean = [r[1] for r in results]
        off = statistics.median(r[2] for r in results)
        print(f"digits MLP (hidden {args.hidden}, {params} parameters), 2 CPU processes (gloo), micro-batch {args.micro_batch}, "
              f"{args.steps} steps each x {args.repeats} fits, summary every {args.every} steps (torch {torch.__version__})")
        print(f"plain DDP step: {off:.3f} ms (median)")
        what = "hook alone" if args.hook_only else ("hook + tracker" if args.capture == "hook" else "tracker, no hook")
        print(f"{what} / plain DDP, median steps: {statistics.median(med):.3f} ({min(med):.3f}-{max(med):.3f}), "
              f"extra {(statistics.median(med) - 1) * off * 1e3:.0f} us")
        print(f"{what} / plain DDP, mean steps:   {statistics.median(mean):.3f} ({min(mean):.3f}-{max(mean):.3f})")
    destroy_process_group()  # the fits' DDP wrappers are gone: no reducer holds the group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per model and fit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's first layer (the demo model: 128)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=51, help="summarize every this many steps")
    parser.add_argument("--capture", choices=("final", "hook"), default="final", help="how each process's gradient is read (see above)")
    parser.add_argument("--hook-only", action="store_true", help="the hook with nothing to measure (no tracker): the cost of a Python comm hook")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
