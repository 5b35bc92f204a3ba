"""A paged KV cache's blocks between a torch CUDA tensor and a ferry host pool, from Python.

The KV cache is one bf16 tensor [layers, 2, num_blocks, block_tokens, heads, head_dim] on the
GPU (default [32, 2, 4096, 16, 8, 128]: 8 GiB, a logical block is 64 chunks of 32 KiB at the
(layer, k/v) plane stride); the host pool is a ferry host buffer of `--pool` blocks of the same
block shape, [pool, layers, 2, block_tokens, heads, head_dim], seen as a torch tensor without a
copy. Each round moves `--pool` random GPU blocks to a random permutation of the pool (D2H) or
back (H2D). Rows, each checked once against torch indexing (destinations poisoned first), then
timed, median of `--reps` rounds:

- package: `Queue.copy_blocks` (one strided descriptor per block, built from the ids each round);
- C ABI, prebuilt: the same strided descriptors in a ctypes array built before timing, pushed and
  polled with raw `ferry_queue_submit` / `ferry_queue_poll_wait` (the package's own cost is the
  difference); and the same work as one plain descriptor per chunk (the copy kernel's route);
- Descriptor objects: one `ferry.Descriptor` per chunk built each round, `Queue.submit(list)`
  and `Queue.poll()` (the binding before the package's array paths);
- torch: gather on the GPU, one pinned copy, scatter on the host (and the reverse);
- ceiling: one contiguous pinned copy of the same bytes (torch `copy_`).

Then those three rows again under a compute load (bf16 GEMMs back to back on their
own stream in this process, as in bench_under_load.py), with the share of the GEMMs' throughput
the copies took. On the GPU machine, from the repository root:

    FERRY_LIB=.device/libferry.so python3 python/bench_paged_kv.py
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

import ferry
from bench_under_load import GemmLoad, SETTLE_S

DIRECTIONS = ("D2H", "H2D")
DEPTH = 1 << 16


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Case:
    def __init__(self, args: argparse.Namespace) -> None:
        self.engine = ferry.Engine(transport="gpu", use_gdr="off", workers=1, strategy=args.strategy,
                                   sm_budget=args.sm_budget)
        progress(f"engine: {self.engine.transport}")
        self.client = self.engine.new_client()
        shape = (args.layers, 2, args.blocks, args.tokens, args.heads, args.dim)
        self.kv = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        self.reg = self.engine.register(self.client, self.kv)
        block_shape = (args.layers, 2, args.tokens, args.heads, args.dim)
        pool_bytes = args.pool * int(np.prod(block_shape)) * 2
        progress(f"host pool: {pool_bytes >> 20} MiB, allocating and pinning")
        self.buffer = self.engine.alloc_host(self.client, pool_bytes)
        self.pool = self.buffer.torch(torch.bfloat16, (args.pool, *block_shape))
        self.pool.copy_(torch.randn(self.pool.shape, device="cuda", dtype=torch.bfloat16))
        self.gpu_blocks, self.host_blocks = self.reg.blocks(2), self.buffer.blocks(self.pool, 0)
        self.queue = self.engine.open_queue(self.client, DEPTH, DEPTH)
        self.bytes = args.pool * self.gpu_blocks.block_bytes
        self.rng = np.random.default_rng(3)
        self.args = args
        self.completions = (ferry.Completion * DEPTH)()
        self.statuses = np.frombuffer(self.completions, ferry.COMPLETION_DTYPE)["status"]

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(GPU block ids, pool block ids) of one round."""
        return self.rng.choice(self.args.blocks, self.args.pool, replace=False), self.rng.permutation(self.args.pool)

    def sides(self, direction: str) -> tuple[ferry.Blocks, ferry.Blocks]:
        return (self.gpu_blocks, self.host_blocks) if direction == "D2H" else (self.host_blocks, self.gpu_blocks)

    def chunk_descriptors(self, direction: str, gpu_ids: np.ndarray, pool_ids: np.ndarray) -> np.ndarray:
        """The same work as one plain descriptor per chunk (layers x 2 per block)."""
        src, dst = self.sides(direction)
        src_ids, dst_ids = (gpu_ids, pool_ids) if direction == "D2H" else (pool_ids, gpu_ids)
        strided = ferry.block_descriptors(src, dst, src_ids, dst_ids)
        count = int(strided["count"][0])
        plain = np.repeat(strided, count)
        chunk = np.tile(np.arange(count, dtype=np.uint64), len(strided))
        plain["src_offset"] += chunk * plain["src_stride"]
        plain["dst_offset"] += chunk * plain["dst_stride"]
        plain["flags"], plain["count"], plain["src_stride"], plain["dst_stride"] = 0, 0, 0, 0
        plain["tag"] = np.arange(len(plain))
        return plain

    # The rows: each moves one round's blocks and returns when they are done.

    def package(self, direction: str, gpu_ids: np.ndarray, pool_ids: np.ndarray) -> None:
        src, dst = self.sides(direction)
        if direction == "D2H":
            self.queue.copy_blocks(src, dst, gpu_ids, pool_ids)
        else:
            self.queue.copy_blocks(src, dst, pool_ids, gpu_ids)

    def c_abi(self, array: ctypes.Array, n: int) -> None:
        """Raw ferry_queue_submit / ferry_queue_poll over a prebuilt ctypes array."""
        lib, handle, out = ferry._library(), self.queue._handle, self.completions
        base, size = ctypes.addressof(array), ctypes.sizeof(ferry.Descriptor)
        pushed = done = 0
        n_out = ctypes.c_size_t()
        deadline = time.monotonic() + 30
        while done < n:
            if pushed < n:
                ptr = ctypes.cast(base + pushed * size, ctypes.POINTER(ferry.Descriptor))
                ferry._check(lib.ferry_queue_submit(handle, ptr, n - pushed, ctypes.byref(n_out)))
                pushed += n_out.value
            # All pushed: wait for the rest inside libferry, the GIL released (as Queue.run does).
            want = n - done if pushed == n else 0
            ferry._check(lib.ferry_queue_poll_wait(handle, out, DEPTH, min(want, DEPTH), 30_000_000_000, ctypes.byref(n_out)))
            if self.statuses[: n_out.value].any():  # a numpy view of `out`: no object per completion
                raise SystemExit("C ABI row: a descriptor failed")
            done += n_out.value
            if time.monotonic() > deadline:
                raise SystemExit(f"C ABI row: {done} of {n} after 30 s")

    def objects(self, rows: list) -> None:
        """One Descriptor per chunk built now (from tuples of ints, the fields in order), submitted
        as a list, polled as objects."""
        descs = [ferry.Descriptor(*fields) for fields in rows]
        pushed = done = 0
        while done < len(descs):
            if pushed < len(descs):
                pushed += self.queue.submit(descs[pushed:pushed + DEPTH])
            got = self.queue.poll()
            if any(c.status for c in got):
                raise SystemExit("objects row: a descriptor failed")
            done += len(got)

    def torch_path(self, direction: str, gpu_ids: np.ndarray, pool_ids: np.ndarray, staging: torch.Tensor,
                   gathered: torch.Tensor) -> None:
        g, p = torch.from_numpy(gpu_ids).cuda(), torch.from_numpy(pool_ids)
        if direction == "D2H":
            torch.index_select(self.kv, 2, g, out=gathered)
            staging.copy_(gathered, non_blocking=True)
            torch.cuda.synchronize()
            self.pool[p] = staging.permute(2, 0, 1, 3, 4, 5)
        else:
            staging.copy_(self.pool[p].permute(1, 2, 0, 3, 4, 5))
            gathered.copy_(staging, non_blocking=True)
            self.kv.index_copy_(2, g, gathered)
            torch.cuda.synchronize()

    def check(self, direction: str, gpu_ids: np.ndarray, pool_ids: np.ndarray, run: Callable[[], None]) -> None:
        """Poisons the destination blocks, runs one round, compares with torch indexing."""
        g, p = torch.from_numpy(gpu_ids).cuda(), torch.from_numpy(pool_ids)
        if direction == "D2H":
            self.pool[p] = float("nan")
            run()
            ok = torch.equal(self.pool[p].cuda(), self.kv[:, :, g].permute(2, 0, 1, 3, 4, 5))
        else:
            expected = self.kv[:, :, g].clone()
            self.kv[:, :, g] = float("nan")
            torch.cuda.synchronize()  # ferry's copies are not ordered with torch's stream
            run()
            torch.cuda.synchronize()
            ok = torch.equal(self.kv[:, :, g].permute(2, 0, 1, 3, 4, 5).cpu(), self.pool[p])
            if not ok:
                self.kv[:, :, g] = expected
        if not ok:
            raise SystemExit(f"{direction}: the copied blocks differ from torch indexing")


def timed(case: Case, run: Callable[[np.ndarray, np.ndarray], None], reps: int,
          prepare: Optional[Callable[[np.ndarray, np.ndarray], object]] = None) -> float:
    """Median GB/s of `reps` rounds, each on new random ids (prepare's work is not timed)."""
    rates = []
    for _ in range(reps):
        gpu_ids, pool_ids = case.ids()
        prepared = prepare(gpu_ids, pool_ids) if prepare else None
        t0 = time.perf_counter()
        run(gpu_ids, pool_ids) if prepared is None else run(prepared)
        rates.append(case.bytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def ceiling(case: Case, direction: str, reps: int) -> float:
    host = torch.empty(case.bytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(case.bytes, dtype=torch.uint8, device="cuda")
    dst, src = (host, device) if direction == "D2H" else (device, host)
    rates = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(case.bytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates[1:])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--pool", type=int, default=1024, help="host pool blocks = blocks moved per round")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--sm-budget", type=int, default=8)
    parser.add_argument("--no-load", action="store_true", help="skip the rows under the GEMM load")
    parser.add_argument("--no-objects", action="store_true", help="skip the Descriptor-object row (slow)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device: the paged-KV benchmark needs one")
        return 0
    progress(f"library: {ferry.library_path()}; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    case = Case(args)
    block_shape = case.kv[:, :, 0].shape
    staging = torch.empty((args.layers, 2, args.pool, *block_shape[2:]), dtype=torch.bfloat16, pin_memory=True)
    gathered = torch.empty_like(staging, device="cuda")
    load = None if args.no_load else GemmLoad()
    if load:
        progress("calibrating the GEMM load")
        load.calibrate(0.5)
    rows: dict[str, dict[str, str]] = {}

    def row(name: str, direction: str, text: str) -> None:
        rows.setdefault(name, {})[direction] = text
        progress(f"{direction} {name}: {text}")

    for direction in DIRECTIONS:
        gpu_ids, pool_ids = case.ids()
        case.check(direction, gpu_ids, pool_ids, lambda: case.package(direction, gpu_ids, pool_ids))
        plain = case.chunk_descriptors(direction, gpu_ids, pool_ids)
        array = (ferry.Descriptor * len(plain)).from_buffer_copy(plain.tobytes())
        case.check(direction, gpu_ids, pool_ids, lambda: case.c_abi(array, len(plain)))
        case.check(direction, gpu_ids, pool_ids,
                   lambda: case.torch_path(direction, gpu_ids, pool_ids, staging, gathered))
        progress(f"{direction}: package, C ABI and torch rows checked against torch indexing "
                 f"({len(plain)} chunks in {args.pool} blocks per round)")
        top = ceiling(case, direction, args.reps)
        row("ceiling", direction, f"{top:.1f}")

        def prebuilt(strided: bool) -> Callable[[np.ndarray, np.ndarray], tuple[ctypes.Array, int]]:
            def build(gpu_ids: np.ndarray, pool_ids: np.ndarray) -> tuple[ctypes.Array, int]:
                if strided:
                    src, dst = case.sides(direction)
                    pair = (gpu_ids, pool_ids) if direction == "D2H" else (pool_ids, gpu_ids)
                    descs = ferry.block_descriptors(src, dst, *pair)
                else:
                    descs = case.chunk_descriptors(direction, gpu_ids, pool_ids)
                return (ferry.Descriptor * len(descs)).from_buffer_copy(descs.tobytes()), len(descs)
            return build

        runs = {
            "package": (lambda g, p: case.package(direction, g, p), None),
            "c_abi_strided": (lambda prepared: case.c_abi(*prepared), prebuilt(True)),
            "c_abi": (lambda prepared: case.c_abi(*prepared), prebuilt(False)),
        }

        def measure(name: str, load_on: bool) -> tuple[float, Optional[float]]:
            run, prepare = runs[name]
            if load_on:
                load.start()
                time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            try:
                rate = timed(case, run, args.reps, prepare)
            finally:
                t1 = time.perf_counter()
                if load_on:
                    load.stop()
            return rate, load.loss(t0, t1) if load_on else None

        idle = {name: measure(name, False)[0] for name in runs}
        pkg, same = idle["package"], idle["c_abi_strided"]
        row("package", direction, f"{pkg:.1f} ({pkg / top:.2f} of the ceiling, {pkg / same:.2f} of the C ABI, same descriptors)")
        row("c_abi_strided", direction, f"{same:.1f} ({same / top:.2f})")
        row("c_abi", direction, f"{idle['c_abi']:.1f} ({idle['c_abi'] / top:.2f})")
        if not args.no_objects:
            objs = timed(case, lambda rows: case.objects(rows), max(1, args.reps // 2),
                         lambda g, p: case.chunk_descriptors(direction, g, p).tolist())
            row("objects", direction, f"{objs:.1f} ({objs / top:.2f})")
        t = timed(case, lambda g, p: case.torch_path(direction, g, p, staging, gathered), max(1, args.reps // 2))
        row("torch", direction, f"{t:.1f} ({t / top:.2f})")
        if load:
            for name in runs:
                rate, loss = measure(name, True)
                row(f"{name}_load", direction, f"{rate:.1f} ({rate / top:.2f}; GEMM loss {loss:.1%})")
    names = {
        "package": "package: `Queue.copy_blocks`, one strided descriptor per block",
        "c_abi_strided": "C ABI: the same strided descriptors in a prebuilt ctypes array, raw submit/poll_wait",
        "c_abi": "C ABI: prebuilt ctypes array of one plain descriptor per chunk, raw submit/poll_wait",
        "objects": "`Queue.submit(list of Descriptor)` / `Queue.poll()`, one per chunk",
        "torch": "torch: gather on the GPU, one pinned copy, scatter on the host",
        "ceiling": "ceiling: one contiguous pinned copy of the same bytes (torch)",
        "package_load": "package under the GEMM load (its loss)",
        "c_abi_strided_load": "C ABI, strided, under the GEMM load",
        "c_abi_load": "C ABI, one descriptor per chunk, under the GEMM load",
    }
    chunks = 2 * args.layers
    print(f"\nKV [{args.layers}, 2, {args.blocks}, {args.tokens}, {args.heads}, {args.dim}] bf16 on the GPU, "
          f"{args.pool} random blocks per round ({chunks} chunks of {case.gpu_blocks.chunk_bytes >> 10} KiB each, "
          f"{case.bytes >> 20} MiB), strategy {args.strategy}, {args.sm_budget} SMs, median of {args.reps}; GB/s")
    print("| path | D2H | H2D |")
    print("|---|---|---|")
    for key, name in names.items():
        if key in rows:
            print(f"| {name} | {rows[key].get('D2H', '-')} | {rows[key].get('H2D', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
