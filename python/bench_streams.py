"""Copies ordered with CUDA streams, on a GPU with torch: correctness over many iterations and
the latencies of the stream waits.

1. For each strategy: `--iterations` rounds of poison (torch, on a stream) -> `stream_signal` ->
   a gate and 4 KiB-64 KiB blocks loaded H2D (`push_blocks`) -> `stream_wait` -> a check on the
   same stream that counts wrong bytes, the CPU never waiting; as many rounds whose wait and
   check are one CUDA graph, captured once and replayed (`push_blocks(notify=0)`,
   `stream_wait_slot`); then as many gated offloads
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

Every kernel that runs behind a `stream_wait` is launched once before (a warm-up, as a server's
warm-up pass or CUDA graph capture does): CUDA loads kernels lazily by default, and a first
launch behind a wait that only ferry can release waits for the context to go idle, forever (the
H200, 2026-12-01: the latency part hung in every call until this warm-up, or with
`CUDA_MODULE_LOADING=EAGER`). The offload check compares on the CPU with numpy: torch's float16
comparison took ~20 ms a round on its 16-thread pool, and that pool's threads on the worker's
core delayed ferry's completions by ~3 ms (see bench/results/h200.md).
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


def correctness(strategy: str, iterations: int) -> dict[str, float]:
    """Wrong bytes after stream_wait (plain streams, and a replayed graph), stale bytes of gated
    offloads, and the seconds of each, for `iterations` rounds of each."""
    with ferry.Engine(transport="gpu", use_gdr="off", strategy=strategy) as engine:
        client = engine.new_client()
        layers, blocks, pool_blocks = 4, 256, 64
        kv = torch.zeros(layers, 2, blocks, 16, 8, 64, dtype=torch.float16, device="cuda")  # 16 KiB chunks
        reg = engine.register(client, kv)
        pool = engine.alloc_host(client, pool_blocks * kv[:, :, 0].numel() * 2)
        host = pool.torch(torch.float16, (pool_blocks, layers, 2, 16, 8, 64))
        raw = pool.numpy(np.uint16, (pool_blocks, layers * 2 * 16 * 8 * 64))
        host.copy_(torch.randn(host.shape, dtype=torch.float16))
        expected = host.cuda().permute(1, 2, 0, 3, 4, 5)
        gpu_side, host_side = reg.blocks(2), pool.blocks(host, 0)
        queue = engine.open_queue(client, 1 << 14, 1 << 14)
        stream = torch.cuda.Stream()
        wrong = torch.zeros((), dtype=torch.int64, device="cuda")
        rng = np.random.default_rng(7)
        with torch.cuda.stream(stream):  # warm-up: every kernel of a round loaded before any wait
            ids = torch.zeros(4, dtype=torch.int64, device="cuda")
            want = expected.index_select(2, ids)
            kv.index_fill_(2, ids, 0.0)
            wrong += (kv.index_select(2, ids) != want).sum()
            marker = torch.zeros((), dtype=torch.float16, device="cuda")
            marker.fill_(1.0)
            kv[:, :, 0] = marker
            wrong.zero_()
        stream.synchronize()
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
        # The same through one CUDA graph (the wait on notification slot 0 and the check, four
        # blocks a round), captured once and replayed every round.
        graph_wrong = torch.zeros((), dtype=torch.int64, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            queue.stream_wait_slot(stream, 0)
            graph_wrong += (kv.index_select(2, ids) != want).sum()
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(iterations + 1, 2 * iterations + 1):
                src, dst = rng.choice(pool_blocks, 4, replace=False), rng.choice(blocks, 4, replace=False)
                ids.copy_(torch.from_numpy(dst), non_blocking=True)
                want.copy_(expected.index_select(2, torch.from_numpy(src).cuda(non_blocking=True)))
                kv.index_fill_(2, ids, float("nan"))
                queue.stream_signal(stream, i)
                queue.push_blocks(host_side, gpu_side, src, dst, gate=i, notify=0)
                graph.replay()
            stream.synchronize()
        queue.drain()
        graph_s = time.perf_counter() - start
        start = time.perf_counter()
        stale = 0
        with torch.cuda.stream(stream):
            for i in range(1, iterations + 1):
                block, slot = int(rng.integers(blocks)), i % pool_blocks
                value = float(i % 2000)
                marker.fill_(value)
                kv[:, :, block] = marker  # the forward pass's stand-in writes the block
                queue.stream_signal(stream, 2 * iterations + i)
                watermark = queue.push_blocks(gpu_side, host_side, [block], [slot], gate=2 * iterations + i)
                deadline = time.perf_counter() + 5
                while queue.watermark < watermark:
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"{strategy}: a gated offload did not complete within 5 s")
                queue.drain()
                # numpy on the raw bits: torch's float16 comparison on the CPU took ~20 ms a round
                # here, on a thread pool that shares the worker's core (see the module's notes).
                stale += int(np.count_nonzero(raw[slot] != np.float16(value).view(np.uint16)))
        offloads_s = time.perf_counter() - start
        queue.close()
        reg.close()
        return {"wrong": int(wrong), "graph_wrong": int(graph_wrong), "stale": stale, "loads_s": loads_s,
                "graph_s": graph_s, "offloads_s": offloads_s}


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
        with torch.cuda.stream(stream):  # warm-up: the kernels behind the waits below loaded first
            one.add_(1)
            device[:4096].copy_(pinned, non_blocking=True)
        stream.synchronize()
        results: dict[str, list[float]] = {"watermark -> stream": [], "push -> kernel": [],
                                           "baseline: torch copy_ + kernel on the stream": []}
        for k in range(samples + 10):
            # watermark -> stream
            event = torch.cuda.Event()
            queue.stream_wait(stream, queue.pushed + 1)
            event.record(stream)
            queue.submit([copy])
            if queue.wait_into(out, 1, timeout=5) != 1:
                raise SystemExit(f"watermark -> stream, round {k}: the copy did not complete within 5 s (watermark "
                                 f"{queue.watermark}, pushed {queue.pushed}, worker counters "
                                 f"{ {n: getattr(engine.stats(0), n) for n, _ in ferry.WorkerStats._fields_} })")
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
    parser.add_argument("--samples", type=int, default=1000, help="latency samples (0: none)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device: the stream-ordering benchmark needs one")
        return 0
    progress(f"library: {ferry.library_path()}; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    for strategy in args.strategies.split(","):
        r = correctness(strategy, args.iterations)
        progress(f"{strategy}: {r['wrong']} wrong bytes after stream_wait ({r['loads_s']:.1f} s), {r['graph_wrong']} "
                 f"after a replayed graph's wait ({r['graph_s']:.1f} s), {r['stale']} stale bytes in gated offloads "
                 f"({r['offloads_s']:.1f} s)")
        rows.append((strategy, r))
    lat = latencies(args.samples) if args.samples else {}
    n = args.iterations
    print(f"\n{n} stream-ordered loads (1-4 blocks of 4 x 2 chunks of 16 KiB, poisoned first, checked on the stream), "
          f"{n} through a replayed CUDA graph (4 blocks, notification slot), {n} gated offloads, per strategy:")
    print("| strategy | wrong bytes after stream_wait | after a graph's stream_wait_slot | stale bytes in gated offloads "
          "| us per load round | per graph round | per offload round |")
    print("|---|---|---|---|---|---|---|")
    for strategy, r in rows:
        print(f"| {strategy} | {r['wrong']} | {r['graph_wrong']} | {r['stale']} | {r['loads_s'] / n * 1e6:.0f} "
              f"| {r['graph_s'] / n * 1e6:.0f} | {r['offloads_s'] / n * 1e6:.0f} |")
    if not lat:
        print("\nlatency: not measured (--samples 0)")
    else:
        print(f"\nlatency, {args.samples} samples, us:")
        print("| what | p50 | p99 |")
        print("|---|---|---|")
        for what, (p50, p99) in lat.items():
            print(f"| {what} | {p50:.2f} | {p99:.2f} |")
    return 0 if all(r["wrong"] == 0 and r["graph_wrong"] == 0 and r["stale"] == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
