"""Several Python processes sharing one `ferry serve` daemon on the GPU, against one client of an
engine in this process (issue 14).

Each client process holds its own torch CUDA KV tensor (`--blocks` blocks of `--chunks` chunks of
`--chunk-kib` KiB at the tensor's plane stride, as a paged KV cache's layer) and registers it with
the daemon (`Engine.register`: connected, the tensor's CUDA IPC handle goes to the daemon, which
maps it), takes a host pool of the same blocks from the daemon (pinned there, mapped here), and
moves batches of `--batch` random blocks (`Queue.copy_blocks`: one strided descriptor per block,
pushed, then waited for) for `--seconds`, H2D then D2H. The clients start each window together;
their combined GB/s is their bytes over the window from the first start to the last end. The
baseline is the same loop in this process on an engine started here (same workers, unpinned in
both); one client alone on the daemon is a row too (the daemon's cost to one client: its loop
waits for each batch, so a second client fills the worker's gaps). Rounds alternate baseline,
one client and every client; medians. Each client checks one block's bytes after
its first batch each way (the data really moves).

On the GPU machine, from the repository root:

    FERRY_LIB=.device/libferry.so FERRY_BIN=.device/ferry python3 python/bench_serve_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import ferry

DIRECTIONS = ("H2D", "D2H")


def progress(message: str) -> None:
    if sys.stderr.isatty() or os.environ.get("FERRY_PROGRESS"):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Mover:
    """One client's KV tensor, host pool and queue on `engine`, and the timed loop."""

    def __init__(self, engine: ferry.Engine, args: argparse.Namespace, seed: int) -> None:
        import torch

        self.torch, self.args = torch, args
        client = engine.new_client()
        elems = args.chunk_kib * 1024 // 2
        self.kv = torch.randn((args.chunks, args.blocks, elems), device="cuda", dtype=torch.float16)
        self.reg = engine.register(client, self.kv)
        self.host = engine.alloc_host(client, args.chunks * args.blocks * elems * 2)
        self.pool = self.host.torch(torch.float16, (args.blocks, args.chunks, elems))
        self.queue = engine.open_queue(client, submit_capacity=max(4096, 2 * args.batch))
        self.gpu_blocks, self.host_blocks = self.reg.blocks(1), self.host.blocks(self.pool, 0)
        self.block_bytes = args.chunks * args.chunk_kib * 1024
        self.gen = torch.Generator().manual_seed(seed)
        torch.cuda.synchronize()

    def _ids(self):
        perm = self.torch.randperm(self.args.blocks, generator=self.gen)[: self.args.batch]
        return perm.tolist(), self.torch.randperm(self.args.blocks, generator=self.gen)[: self.args.batch].tolist()

    def batch(self, direction: str) -> tuple[list[int], list[int]]:
        gpu_ids, host_ids = self._ids()
        if direction == "H2D":
            self.queue.copy_blocks(self.host_blocks, self.gpu_blocks, host_ids, gpu_ids)
        else:
            self.queue.copy_blocks(self.gpu_blocks, self.host_blocks, gpu_ids, host_ids)
        return gpu_ids, host_ids

    def check(self) -> None:
        """One batch each way, one block of each compared with torch."""
        torch = self.torch
        gpu_ids, host_ids = self.batch("D2H")
        if not torch.equal(self.pool[host_ids[0]], self.kv[:, gpu_ids[0]].cpu()):
            raise SystemExit(f"offloaded block {gpu_ids[0]} -> {host_ids[0]} differs")
        gpu_ids, host_ids = self.batch("H2D")
        if not torch.equal(self.kv[:, gpu_ids[0]].cpu(), self.pool[host_ids[0]]):
            raise SystemExit(f"loaded block {host_ids[0]} -> {gpu_ids[0]} differs")

    def window(self, direction: str, seconds: float) -> dict:
        moved, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            self.batch(direction)
            moved += self.args.batch * self.block_bytes
        return {"bytes": moved, "start": start, "end": time.monotonic()}


def child(args: argparse.Namespace) -> None:
    """A client process: connects, says ready, then runs each window the parent names."""
    engine = ferry.connect(args.child)
    mover = Mover(engine, args, seed=os.getpid())
    mover.check()
    print("ready", flush=True)
    for line in sys.stdin:
        direction, seconds = line.split()
        print(json.dumps(mover.window(direction, float(seconds))), flush=True)


def combined(results: list[dict]) -> float:
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["bytes"] for r in results) / span / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2, help="client processes on the daemon")
    p.add_argument("--workers", type=int, default=1, help="engine workers (daemon and baseline)")
    p.add_argument("--blocks", type=int, default=8192, help="blocks in each KV tensor and host pool")
    p.add_argument("--chunks", type=int, default=2, help="chunks per block (K and V)")
    p.add_argument("--chunk-kib", type=int, default=32, help="KiB per chunk")
    p.add_argument("--batch", type=int, default=1024, help="blocks per copy_blocks call")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per window")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    binary = os.environ.get("FERRY_BIN")
    if not binary:
        raise SystemExit("set FERRY_BIN to the ferry binary (the daemon)")
    tmp = tempfile.mkdtemp(prefix="ferry-bench-serve-gpu-")
    socket = os.path.join(tmp, "s.sock")
    daemon = subprocess.Popen([binary, "serve", "--socket", socket, "--transport", "cuda", "--workers",
                               str(args.workers), "--unpinned", "--quiet"])
    kids = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the CUDA daemon did not start")
            time.sleep(0.05)
        local = ferry.Engine(transport="gpu", use_gdr="off", workers=args.workers, pinned=False)
        progress(f"in-process engine: {local.transport}; daemon at {socket}")
        baseline = Mover(local, args, seed=1)
        baseline.check()
        me = [sys.executable, os.path.abspath(__file__), "--child", socket] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child",)]
        kids = [subprocess.Popen(me, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(args.clients)]
        for k in kids:
            if k.stdout.readline().strip() != "ready":
                raise SystemExit("a client process did not start (see its stderr)")
        modes = ("in-process", "daemon, 1 client", f"daemon, {args.clients} clients")
        rates = {(mode, d): [] for mode in modes for d in DIRECTIONS}
        for r in range(args.rounds):
            for d in DIRECTIONS:
                progress(f"round {r + 1}/{args.rounds} {d}: in-process, then {args.clients} clients on the daemon")
                rates[(modes[0], d)].append(combined([baseline.window(d, args.seconds)]))
                for mode, some in ((modes[1], kids[:1]), (modes[2], kids)):
                    for k in some:
                        k.stdin.write(f"{d} {args.seconds}\n")
                        k.stdin.flush()
                    rates[(mode, d)].append(combined([json.loads(k.stdout.readline()) for k in some]))
        block = args.chunks * args.chunk_kib
        print(f"{args.clients} client processes on one `ferry serve --transport cuda` (each its own torch KV tensor "
              f"shared by CUDA IPC, host pool from the daemon) against one client of an engine in this process; "
              f"{args.workers} worker(s), blocks of {args.chunks} x {args.chunk_kib} KiB ({block} KiB), "
              f"{args.batch} random blocks per copy_blocks, {args.seconds:g} s windows, medians of {args.rounds} "
              f"alternating rounds:")
        print(f"| dir | one in-process client GB/s | one client on the daemon | ratio | {args.clients} clients on the "
              f"daemon, combined | ratio |")
        print("|---|---|---|---|---|---|")
        for d in DIRECTIONS:
            one, single, many = (statistics.median(rates[(m, d)]) for m in modes)
            print(f"| {d} | {one:.2f} | {single:.2f} | {single / one:.3f} | {many:.2f} | {many / one:.3f} |")
        print("every round (GB/s):", {f"{m} {d}": [round(x, 2) for x in v] for (m, d), v in rates.items()})
    finally:
        for k in kids:
            if k.stdin:
                k.stdin.close()
            k.wait(timeout=30)
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
