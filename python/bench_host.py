"""The Python package against `ferry bench` on the host transport, in one run.

Both move 1 GiB per repetition as scattered 64 KiB blocks between two 256 MiB regions (a random
permutation of the blocks), worker on the topology plan's core (core 1 on a 2-CPU machine),
client on core 0: `ferry bench --transport host` from Rust, and the Python package's
`Queue.run` over a prebuilt descriptor array (submit_array / poll_into). Rounds alternate the
two; the medians and their ratio are printed last.

    python3 python/bench_host.py [--ferry target/release/ferry] [--rounds 3] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import numpy as np

import ferry

SPAN = 256 << 20
TOTAL = 1 << 30


def rust_rate(binary: str, block: int, reps: int, client_core: int) -> float:
    """`ferry bench --transport host`'s engine GB/s at `block` (its own median of `reps`)."""
    out = subprocess.run(
        [binary, "bench", "--transport", "host", "--sizes", f"{block >> 10}K", "--reps", str(reps),
         "--client-core", str(client_core)],
        capture_output=True, text=True, check=True,
    ).stdout
    row = re.search(rf"^\s*{block >> 10} KiB\s+([\d.]+)", out, flags=re.M)
    if not row:
        raise SystemExit(f"no {block >> 10} KiB row in ferry bench's output:\n{out}")
    return float(row.group(1))


def python_rate(block: int, reps: int) -> float:
    """GB/s (median of `reps`) of 1 GiB of scattered blocks through the package's array path."""
    with ferry.Engine(transport="host") as engine:
        client = engine.new_client()
        src, dst = engine.alloc_host(client, SPAN), engine.alloc_host(client, SPAN)
        src.numpy()[:] = 0x5A
        dst.numpy()[:] = 0  # fault the pages in before timing, as ferry bench does
        queue = engine.open_queue(client)
        blocks = SPAN // block
        rng = np.random.default_rng(11)
        count = TOTAL // block
        descs = ferry.descriptors(count)
        descs["tag"] = np.arange(count)
        descs["src_region"], descs["dst_region"], descs["len"] = src.region, dst.region, block
        descs["src_offset"] = np.concatenate([rng.permutation(blocks) for _ in range(count // blocks)]) * block
        descs["dst_offset"] = np.concatenate([rng.permutation(blocks) for _ in range(count // blocks)]) * block
        queue.run(descs[:blocks])  # warm-up: one pass over the regions
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            done = queue.run(descs)
            seconds = time.perf_counter() - t0
            if not (done["status"] == ferry.STATUS["ok"]).all():
                raise SystemExit("a descriptor failed")
            rates.append(TOTAL / seconds / 1e9)
        queue.close()
        return statistics.median(rates)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ferry", default=str(pathlib.Path(__file__).resolve().parent.parent / "target/release/ferry"))
    parser.add_argument("--block", type=int, default=64 << 10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--client-core", type=int, default=0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.client_core})
    print(f"library: {ferry.library_path()}", file=sys.stderr)
    rust, python = [], []
    for i in range(args.rounds):
        rust.append(rust_rate(args.ferry, args.block, args.reps, args.client_core))
        python.append(python_rate(args.block, args.reps))
        print(f"round {i + 1}/{args.rounds}: ferry bench {rust[-1]:.2f} GB/s, python {python[-1]:.2f} GB/s", file=sys.stderr)
    r, p = statistics.median(rust), statistics.median(python)
    print(f"host transport, {args.block >> 10} KiB scattered blocks, 1 GiB per repetition, medians of {args.rounds} rounds:")
    print("| path | GB/s | / ferry bench |")
    print("|---|---|---|")
    print(f"| `ferry bench --transport host` (Rust) | {r:.2f} | 1.00 |")
    print(f"| Python package, `Queue.run` over a DESCRIPTOR_DTYPE array | {p:.2f} | {p / r:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
