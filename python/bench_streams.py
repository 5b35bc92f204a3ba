"""Copies ordered with CUDA streams, on a GPU with torch: correctness over many iterations and
the latencies of the stream waits.

1. For each strategy: `--iterations` rounds of poison (torch, on a stream) -> `stream_signal` ->
   a gate and 4 KiB-64 KiB blocks loaded H2D (`push_blocks`) -> `stream_wait` -> a check on the
   same stream that counts wrong bytes, the CPU never waiting; then as many gated offloads
   (the stream writes a block, signals; the D2H behind the gate must see the write). Prints the
   wrong and stale bytes (must be 0).
2. Latency, `--samples` times, median and p99 (CPU clocks; a CUDA event polled from Python):
   - watermark -> stream: a stream blocked in `stream_wait` on one 4 KiB descriptor; from the
     CPU seeing its completion to the stream's next event being done;
   - push -> kernel: the stream already waiting; from pushing one 4 KiB H2D descriptor to a
     kernel after the wait being done;
   - baseline: the same 4 KiB copy and kernel enqueued by the CPU on the stream (torch `copy_`
     from pinned memory): what the CPU round trip that stream ordering removes costs at best.

    FERRY_LIB=.device/libferry.so python3 python/bench_streams.py [--iterations N] [--samples N]

On the H200 (2026-12-01) the loads ran at 200-600 us a round and every check passed, the gated
offloads took about 19 ms a round (not understood), and the latency part hung in every call:
a copy pushed after the stream had reached its wait never completed. So `--samples` is 0 by
default (the latency part does not run, and says so); see bench/results/h200.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import ferry

STRATEGIES = ("memcpy", "batch", "kernel", "auto")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def correctness(strategy: str, iterations: int) -> tuple[int, int, float, float]:
    """(wrong bytes after stream_wait, stale bytes of gated offloads, seconds of the loads,
    seconds of the offloads) for `iterations` rounds of each."""
    with ferry.Engine(transport="gpu", use_gdr="off", strategy=strategy) as engine:
        client = engine.new_client()
        layers, blocks, pool_blocks = 4, 256, 64
        kv = torch.zeros(layers, 2, blocks, 16, 8, 64, dtype=torch.float16, device="cuda")  # 16 KiB chunks
        reg = engine.register(client, kv)
        pool = engine.alloc_host(client, pool_blocks * kv[:, :, 0].numel() * 2)
        host = pool.torch(torch.float16, (pool_blocks, layers, 2, 16, 8, 64))
        host.copy_(torch.randn(host.shape, dtype=torch.float16))
        expected = host.cuda().permute(1, 2, 0, 3, 4, 5)
        gpu_side, host_side = reg.blocks(2), pool.blocks(host, 0)
        queue = engine.open_queue(client, 1 << 14, 1 << 14)
        stream = torch.cuda.Stream()
        wrong = torch.zeros((), dtype=torch.int64, device="cuda")
        rng = np.random.default_rng(7)
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(1, iterations + 1):
                n = int(rng.integers(1, 5))
                src, dst = rng.choice(pool_blocks, n, replace=False), rng.choice(blocks, n, replace=False)
                dst_t, src_t = torch.from_numpy(dst).cuda(non_blocking=True), torch.from_numpy(src).cuda(non_blocking=True)
                kv.index_fill_(2, dst_t, float("nan"))
                queue.stream_signal(stream, i)
                queue.push_blocks(host_side, gpu_side, src, dst, gate=i)
                queue.stream_wait(stream)
                wrong += (kv.index_select(2, dst_t) != expected.index_select(2, src_t)).sum()
            stream.synchronize()
        queue.drain()
        loads_s = time.perf_counter() - start
        start = time.perf_counter()
        stale = 0
        marker = torch.zeros((), dtype=torch.float16, device="cuda")
        with torch.cuda.stream(stream):
            for i in range(1, iterations + 1):
                block, slot = int(rng.integers(blocks)), i % pool_blocks
                value = float(i % 2000)
                marker.fill_(value)
                kv[:, :, block] = marker  # the forward pass's stand-in writes the block
                queue.stream_signal(stream, iterations + i)
                watermark = queue.push_blocks(gpu_side, host_side, [block], [slot], gate=iterations + i)
                deadline = time.perf_counter() + 5
                while queue.watermark < watermark:
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"{strategy}: a gated offload did not complete within 5 s")
                queue.drain()
                stale += int((host[slot] != value).sum())
        offloads_s = time.perf_counter() - start
        queue.close()
        reg.close()
        return int(wrong), stale, loads_s, offloads_s


def spin(event: "torch.cuda.Event", what: str) -> None:
    """Polls `event` until it is done; fails after 5 s (never hangs)."""
    deadline = time.perf_counter() + 5
    while not event.query():
        if time.perf_counter() > deadline:
            raise SystemExit(f"{what}: the stream did not proceed within 5 s")


def latencies(samples: int) -> dict[str, tuple[float, float]]:
    """{what: (p50 us, p99 us)}."""
    with ferry.Engine(transport="gpu", use_gdr="off", strategy="auto") as engine:
        client = engine.new_client()
        host = engine.alloc_host(client, 1 << 20)
        device = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
        reg = engine.register(client, device)
        queue = engine.open_queue(client)
        stream = torch.cuda.Stream()
        one = torch.zeros(1, device="cuda")
        copy = ferry.Descriptor(src_region=host.region, dst_region=reg.region, len=4096)
        out = ferry.completions(4)
        pinned = torch.zeros(4096, dtype=torch.uint8, pin_memory=True)
        results: dict[str, list[float]] = {"watermark -> stream": [], "push -> kernel": [],
                                           "baseline: torch copy_ + kernel on the stream": []}
        for k in range(samples + 10):
            # watermark -> stream
            event = torch.cuda.Event()
            queue.stream_wait(stream, queue.pushed + 1)
            event.record(stream)
            queue.submit([copy])
            if queue.wait_into(out, 1, timeout=5) != 1:
                raise SystemExit("watermark -> stream: the copy did not complete within 5 s")
            t0 = time.perf_counter()
            spin(event, "watermark -> stream")
            watermark_us = (time.perf_counter() - t0) * 1e6
            # push -> kernel
            event = torch.cuda.Event()
            queue.stream_wait(stream, queue.pushed + 1)
            with torch.cuda.stream(stream):
                one.add_(1)
            event.record(stream)
            time.sleep(0.0002)  # the stream is blocked in its wait by now
            t0 = time.perf_counter()
            queue.submit([copy])
            spin(event, "push -> kernel")
            kernel_us = (time.perf_counter() - t0) * 1e6
            if queue.wait_into(out, 1, timeout=5) != 1:
                raise SystemExit("push -> kernel: the copy did not complete within 5 s")
            # baseline: the same 4 KiB copy and kernel issued by the CPU on the stream itself.
            event = torch.cuda.Event()
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                device[:4096].copy_(pinned, non_blocking=True)
                one.add_(1)
            event.record(stream)
            spin(event, "baseline")
            baseline_us = (time.perf_counter() - t0) * 1e6
            if k >= 10:  # warm-up rounds not counted
                results["watermark -> stream"].append(watermark_us)
                results["push -> kernel"].append(kernel_us)
                results["baseline: torch copy_ + kernel on the stream"].append(baseline_us)
        stream.synchronize()
        queue.close()
        reg.close()
        return {k: (statistics.median(v), float(np.percentile(v, 99))) for k, v in results.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=0, help="latency samples (0: not run; it hung on the H200)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device: the stream-ordering benchmark needs one")
        return 0
    progress(f"library: {ferry.library_path()}; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    for strategy in args.strategies.split(","):
        wrong, stale, loads_s, offloads_s = correctness(strategy, args.iterations)
        progress(f"{strategy}: {wrong} wrong bytes after stream_wait ({loads_s:.1f} s), {stale} stale bytes in gated "
                 f"offloads ({offloads_s:.1f} s)")
        rows.append((strategy, wrong, stale, loads_s, offloads_s))
    lat = latencies(args.samples) if args.samples else {}
    print(f"\n{args.iterations} stream-ordered loads (1-4 blocks of 4 x 2 chunks of 16 KiB, poisoned first, checked on the "
          f"stream) and {args.iterations} gated offloads per strategy:")
    print("| strategy | wrong bytes after stream_wait | stale bytes in gated offloads | us per load round | us per offload round |")
    print("|---|---|---|---|---|")
    for strategy, wrong, stale, loads_s, offloads_s in rows:
        n = args.iterations
        print(f"| {strategy} | {wrong} | {stale} | {loads_s / n * 1e6:.0f} | {offloads_s / n * 1e6:.0f} |")
    if not lat:
        print("\nlatency: not measured (--samples 0: the latency part hung on the H200; see bench/results/h200.md)")
    else:
        print(f"\nlatency, {args.samples} samples, us:")
        print("| what | p50 | p99 |")
        print("|---|---|---|")
        for what, (p50, p99) in lat.items():
            print(f"| {what} | {p50:.2f} | {p99:.2f} |")
    return 0 if all(w == 0 and s == 0 for _, w, s, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
