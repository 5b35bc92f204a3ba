"""An inference server's KV offload loop with ferry's block helper.

The server keeps a paged KV cache [layers, 2, num_blocks, block_tokens, heads, head_dim] (a torch
CUDA tensor with --transport gpu; a numpy array standing in for it with --transport host) and a
host pool of blocks of the same shape in a ferry host buffer. Each step:

- a finished request's blocks are offloaded to the pool (`Queue.copy_blocks`, one strided
  descriptor per block) and its prefix is remembered; the least recently used prefix is evicted
  when the pool is full;
- a new request whose prefix is in the pool gets fresh GPU blocks and its prefix's blocks are
  loaded back, then checked: every block carries its prefix's fingerprint.

    python3 examples/kv_offload_server.py --transport host      # anywhere
    python3 examples/kv_offload_server.py --transport gpu       # torch and a CUDA GPU

It prints what it did and exits nonzero if a loaded block was wrong.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np

import ferry


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = ferry.Engine(transport=args.transport, pinned=False)
        client = self.engine.new_client()
        shape = (args.layers, 2, args.gpu_blocks, args.tokens, args.heads, args.dim)
        block_shape = (args.layers, 2, args.tokens, args.heads, args.dim)
        if args.transport == "gpu":
            import torch

            self.kv = torch.zeros(shape, dtype=torch.float16, device="cuda")
        else:
            self.kv = np.zeros(shape, np.float16)
        self.kv_region = self.engine.register(client, self.kv)
        self.pool_buffer = self.engine.alloc_host(client, args.pool_blocks * int(np.prod(block_shape)) * 2)
        pool = self.pool_buffer.numpy(np.float16, (args.pool_blocks, *block_shape))
        self.gpu_side = self.kv_region.blocks(2)  # block dimension 2: layers x 2 chunks per block
        self.host_side = self.pool_buffer.blocks(pool, 0)  # one contiguous run per block
        self.queue = self.engine.open_queue(client)
        self.free_gpu = collections.deque(range(args.gpu_blocks))
        self.free_host = collections.deque(range(args.pool_blocks))
        self.cached: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # prefix -> pool blocks
        self.stats = collections.Counter()

    def fill(self, blocks: list[int], prefix: int) -> None:
        """The forward pass's stand-in: writes the prefix's fingerprint into its blocks."""
        for i, b in enumerate(blocks):
            self.kv[:, :, b] = fingerprint(prefix, i)
        self.sync()

    def sync(self) -> None:
        """Waits for the GPU work that wrote the KV cache: ferry's copies are not ordered with
        torch's streams, so a block is offloaded (or overwritten by a load) only after the
        kernels writing it are done."""
        if self.args.transport == "gpu":
            import torch

            torch.cuda.current_stream().synchronize()

    def check(self, blocks: list[int], prefix: int) -> bool:
        return all(float(self.kv[:, :, b].max()) == float(self.kv[:, :, b].min()) == fingerprint(prefix, i)
                   for i, b in enumerate(blocks))

    def offload(self, prefix: int, gpu_blocks: list[int]) -> None:
        """A finished request: its blocks go to the pool, evicting old prefixes for room."""
        if prefix in self.cached:
            self.cached.move_to_end(prefix)
        else:
            while len(self.free_host) < len(gpu_blocks) and self.cached:
                _, evicted = self.cached.popitem(last=False)
                self.free_host.extend(evicted)
                self.stats["evicted"] += 1
            host_blocks = [self.free_host.popleft() for _ in gpu_blocks]
            self.stats["blocks offloaded"] += self.queue.copy_blocks(self.gpu_side, self.host_side, gpu_blocks, host_blocks)
            self.cached[prefix] = host_blocks
        self.free_gpu.extend(gpu_blocks)

    def admit(self, prefix: int) -> list[int]:
        """A new request: fresh GPU blocks for its prefix, loaded back from the pool when cached."""
        blocks = [self.free_gpu.popleft() for _ in range(prefix_blocks(prefix))]
        if prefix in self.cached:
            self.cached.move_to_end(prefix)
            self.kv[:, :, blocks] = -1  # poisoned: the check below sees only what the load wrote
            self.sync()
            self.stats["blocks loaded"] += self.queue.copy_blocks(self.host_side, self.gpu_side, self.cached[prefix], blocks)
            self.stats["prefix hits"] += 1
            if not self.check(blocks, prefix):
                raise SystemExit(f"prefix {prefix}: a loaded block is wrong")
        else:
            self.fill(blocks, prefix)
            self.stats["prefix misses"] += 1
        return blocks

    def close(self) -> None:
        self.queue.close()
        self.kv_region.close()
        self.engine.close()


def prefix_blocks(prefix: int) -> int:
    return 1 + prefix % 8


def fingerprint(prefix: int, index: int) -> float:
    return float((prefix * 31 + index) % 1000)  # exact in float16


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("host", "gpu"), default="host")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gpu-blocks", type=int, default=256)
    parser.add_argument("--pool-blocks", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--prefixes", type=int, default=24, help="distinct prompt prefixes")
    args = parser.parse_args(argv)
    server = Server(args)
    rng = np.random.default_rng(0)
    running: collections.deque[tuple[int, list[int]]] = collections.deque()
    start = time.perf_counter()
    for _ in range(args.requests):
        if len(running) >= 4:  # the oldest request finishes
            server.offload(*running.popleft())
        prefix = int(rng.integers(args.prefixes))
        running.append((prefix, server.admit(prefix)))
    while running:
        server.offload(*running.popleft())
    seconds = time.perf_counter() - start
    print(f"transport {server.engine.transport}: {args.requests} requests in {seconds:.2f} s; "
          + ", ".join(f"{k} {v}" for k, v in sorted(server.stats.items())))
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
