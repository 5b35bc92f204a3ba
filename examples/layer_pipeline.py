"""Layer by layer KV loading ordered by CUDA streams alone: while layer l computes, ferry loads
layer l+1's blocks, and layer l+1 starts on the GPU once they are in; the CPU never waits.

The model stand-in has `--layers` layers, each with its own paged KV tensor on the GPU
[2, gpu_blocks, tokens, heads, dim] (K and V planes: a block is two 16 KiB chunks) and its own
host pool of the same blocks in a ferry host buffer. Each step brings `--blocks` pool blocks
into random GPU blocks (the same block ids in every layer, as a paged cache has them) and runs
the layers. Layer l's work on the stream: wait for notification slot l (ferry wrote it once layer
l's blocks were in), a check of layer l's loaded blocks (each pool block carries its own value,
poisoned with NaN before), and a bf16 GEMM of `--gemm`^3 (the layer's compute).

The step's stream work, in order: poison every layer's destination blocks, `stream_signal`;
ferry's loads wait for that signal (a gate), then go layer by layer, each followed by its
notification. Three modes, each timed over `--steps` steps (median step time):

- compute alone: the same poison, checks and GEMMs, no loads and no waits (the floor);
- loads alone: the loads, waits and checks without the GEMMs (the copy path's own rate);
- streams: as above, the waits (`Queue.stream_wait_slot`) enqueued by Python each step;
- graph: the layers (waits, checks, GEMMs) captured once as one CUDA graph and replayed.

    FERRY_LIB=.device/libferry.so python3 examples/layer_pipeline.py [--layers 32] [--blocks 1024] [--workers 1]

It prints a table and exits nonzero if a loaded block was wrong. By default the copies take the
engine's default SM budget (2 SMs: `auto` sends the 16 KiB chunks to the resident copy kernel);
`--sm-budget none` leaves every SM to the GEMMs and the copies to the copy engine; `--dim 128`
makes 32 KiB chunks (a Llama-3 block), which go to the copy engine on any budget. On the H200, on
the default 2 SMs 1.06-1.16x the GEMMs alone across calls (graph and streams); with none 1.16x in
an earlier call; with `--dim 128` 1.025-1.045x (bench/results/h200.md, eighth session).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import ferry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=1024, help="blocks loaded per layer and step")
    parser.add_argument("--gpu-blocks", type=int, default=4096)
    parser.add_argument("--pool-blocks", type=int, default=2048)
    parser.add_argument("--gemm", type=int, default=8192, help="each layer's compute: a GEMM of this size cubed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64, help="head dimension: a chunk is 16 x 8 x dim float16")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker cores; each serves a queue, layers alternate between them")
    parser.add_argument("--sm-budget", default="default",
                        help="the copy kernels' SMs: default (the engine's, 2), a count, none (the copy engine "
                        "alone) or all")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed: the layer pipeline needs torch and a CUDA GPU")
        return 0
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device: the layer pipeline needs one")
        return 0
    if args.layers > ferry.NOTIFY_SLOTS:
        raise SystemExit(f"--layers {args.layers}: at most {ferry.NOTIFY_SLOTS} (one notification slot a layer)")
    tokens, heads, dim = 16, 8, args.dim  # 16 KiB a chunk in float16 at dim 64
    budget = {"default": 0, "none": ferry.SM_BUDGET_NONE, "all": ferry.SM_BUDGET_ALL}.get(args.sm_budget)
    engine = ferry.Engine(transport="gpu", use_gdr="off", workers=args.workers,
                          sm_budget=budget if budget is not None else int(args.sm_budget))
    client = engine.new_client()
    kv, pools, gpu_sides, host_sides, regs = [], [], [], [], []
    for layer in range(args.layers):
        t = torch.zeros(2, args.gpu_blocks, tokens, heads, dim, dtype=torch.float16, device="cuda")
        reg = engine.register(client, t)
        pool = engine.alloc_host(client, args.pool_blocks * 2 * tokens * heads * dim * 2)
        host = pool.torch(torch.float16, (args.pool_blocks, 2, tokens, heads, dim))
        # Pool block b of layer l holds one value throughout: exact in float16, unique enough.
        host.copy_(((torch.arange(args.pool_blocks) * 31 + layer) % 1999 + 1).to(torch.float16).view(-1, 1, 1, 1, 1)
                   .expand(host.shape))
        kv.append(t)
        regs.append(reg)
        pools.append((pool, host))
        gpu_sides.append(reg.blocks(1))
        host_sides.append(pool.blocks(host, 0))
    # One queue per worker; layer l goes through queue l % workers (its loads, its notification).
    queues = [engine.open_queue(client, 1 << 16, 1 << 16, worker=w) for w in range(args.workers)]
    stream = torch.cuda.Stream()
    n = args.blocks
    ids = torch.zeros(n, dtype=torch.int64, device="cuda")  # the step's GPU blocks (every layer)
    want = torch.zeros(args.layers, n, dtype=torch.float16, device="cuda")  # each block's value
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    a = torch.randn(args.gemm, args.gemm, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(args.gemm, args.gemm, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(args.gemm, args.gemm, dtype=torch.bfloat16, device="cuda")
    layer_values = torch.arange(args.layers, device="cuda").view(-1, 1)
    rng = np.random.default_rng(5)
    gate = 0

    def layer_work(layer: int, wait: bool, compute: bool = True) -> None:
        if wait:
            queues[layer % len(queues)].stream_wait_slot(stream, layer)
        wrong.add_((kv[layer].index_select(1, ids) != want[layer].view(1, n, 1, 1, 1)).sum())
        if compute:
            torch.matmul(a, w, out=out)

    def prepare(load: bool) -> None:
        """The step's start on the stream: pick blocks, poison them, signal; push the loads."""
        nonlocal gate
        src = rng.choice(args.pool_blocks, n, replace=False)
        dst = rng.choice(args.gpu_blocks, n, replace=False)
        src_t = torch.from_numpy(src).cuda(non_blocking=True)
        ids.copy_(torch.from_numpy(dst), non_blocking=True)
        want.copy_(((src_t.view(1, -1) * 31 + layer_values) % 1999 + 1).to(torch.float16))
        for layer in range(args.layers):
            kv[layer].index_fill_(1, ids, float("nan"))
        if not load:
            for layer in range(args.layers):  # compute alone: the blocks are put in by torch
                kv[layer].index_copy_(1, ids, want[layer].view(1, n, 1, 1, 1).expand(2, n, tokens, heads, dim))
            return
        gate += 1
        for queue in queues:
            queue.stream_signal(stream, gate)
        for layer in range(args.layers):
            queue = queues[layer % len(queues)]
            queue.push_blocks(host_sides[layer], gpu_sides[layer], src, dst, gate=gate if layer < len(queues) else None,
                              notify=layer)

    def timed(mode: str, graph: object = None) -> list[float]:
        times = []
        for step in range(args.steps + 2):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                prepare(load=mode != "compute alone")
                if graph is not None:
                    graph.replay()
                else:
                    for layer in range(args.layers):
                        layer_work(layer, wait=mode != "compute alone", compute=mode != "loads alone")
                end.record(stream)
            end.synchronize()  # a step ends as a decode step does: the server reads its tokens
            for queue in queues:
                queue.drain()
            if step >= 2:  # warm-up steps not counted
                times.append(start.elapsed_time(end))
        return times

    with torch.cuda.stream(stream):  # warm-up: every kernel loaded before any wait
        prepare(load=False)
        for layer in range(args.layers):
            layer_work(layer, wait=False)
        wrong.zero_()
    stream.synchronize()
    results = {"compute alone": timed("compute alone"), "loads alone": timed("loads alone")}
    results["streams"] = timed("streams")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for layer in range(args.layers):
            layer_work(layer, wait=True)
    results["graph"] = timed("graph", graph)
    bad = int(wrong)
    floor = statistics.median(results["compute alone"])
    load_mib = args.layers * n * 2 * tokens * heads * dim * 2 / 2**20
    chunk_kib = tokens * heads * dim * 2 // 1024
    print(f"{args.layers} layers, {n} blocks of 2 x {chunk_kib} KiB loaded per layer and step ({load_mib:.0f} MiB a step), "
          f"a {args.gemm}^3 bf16 GEMM per layer, {args.steps} steps, SM budget {args.sm_budget}, {args.workers} worker(s), "
          f"{torch.cuda.get_device_name()}:")
    print("| mode | step ms (median) | vs compute alone | loaded GB/s during the step |")
    print("|---|---|---|---|")
    for mode, times in results.items():
        step = statistics.median(times)
        rate = "-" if mode == "compute alone" else f"{load_mib * 2**20 / (step / 1e3) / 1e9:.1f}"
        print(f"| {mode} | {step:.2f} | {step / floor:.3f} | {rate} |")
    print(f"wrong values in loaded blocks: {bad}")
    for queue in queues:
        queue.close()
    for reg in regs:
        reg.close()
    engine.close()
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
