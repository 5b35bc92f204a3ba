"""ferry from Python under an inference server's own load: bf16 GEMMs in the same process.

For each block size, each direction (H2D, D2H) and each engine setup (strategy "batch",
"kernel", "auto", "auto" with the live SM budget set to SM_BUDGET_NONE, "resident", and
"resident" on 8 SMs; one worker, ferry's default SM budget unless --sm-budget, no GDR), ferry
copies about `--total` bytes of scattered blocks between a ferry host buffer and a torch CUDA
tensor (256 MiB each; a shuffled plan, so consecutive descriptors never touch adjacent slots),
`--reps` times, median:

- idle: the copy rate with nothing else on the GPU;
- load: the copy rate while a Python thread runs `torch.matmul` on 8192x8192 bf16 tensors back
  to back on its own stream, and the share of the GEMMs' throughput lost while the copies ran,
  1 - (mean GEMM duration alone) / (mean duration of the GEMMs that ran inside the copy window),
  each GEMM timed with a pair of CUDA events;
- best/ceiling: the best rate under load over the setups, against the PCIe ceiling of the same
  run (torch's own `copy_` of 256 MiB between pinned host memory and the GPU, median of 5).

Every setup checks its copies once per block size first (one H2D pass, untimed, a few blocks
compared). On the GPU machine (one GPU, torch with CUDA), from the repository root:

    FERRY_LIB=.device/libferry.so python3 python/bench_under_load.py

`--setups` picks setups by name; `--writers 8,32,all` adds "auto" setups with those writer gates
(`resident_writers`; all: ungated).

`--transport host` copies host to host with ferry's host transport, without torch or load: a
smoke test of the whole control flow on any machine, for example

    FERRY_LIB=target/release/libferry.so python3 python/bench_under_load.py --transport host --sizes 4K,64K --total 64M
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import random
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import ferry

if TYPE_CHECKING:
    import torch

SPAN = 256 << 20  # bytes of each end of the copies
DEPTH = 16384  # the queue's rings, and the most descriptors in flight
GEMM_N = 8192
GEMMS_QUEUED = 3  # GEMMs kept queued on the load's stream
CALIBRATE_S = 0.5  # GEMMs alone, before the table
SETTLE_S = 0.05  # load running before a cell's copies start
CEILING_RUNS = 5
VERIFY_BLOCKS = 16
PATTERN_PERIOD = 1_000_003  # prime: no two block slots of a region hold the same bytes
STALL_S = 30.0  # no completion for this long fails the run
DIRECTIONS = ("H2D", "D2H")
UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class BenchFailure(Exception):
    """A check of the run did not hold (a failed copy, wrong bytes, a stall, the load thread)."""


@dataclass(frozen=True)
class Setup:
    """One engine configuration: the CUDA strategy, and an SM budget set live after the start."""

    name: str
    strategy: str
    live_budget: Optional[int] = None
    sm_budget: int = 0  # 0: ferry's default
    writers: int = 0  # the resident kernel's writer gate; 0: ferry's default


GPU_SETUPS = (
    Setup("batch", "batch"),
    Setup("kernel", "kernel"),
    Setup("auto", "auto"),
    Setup("auto+none", "auto", ferry.SM_BUDGET_NONE),
    Setup("resident", "resident"),
    Setup("resident/8", "resident", sm_budget=8),
)
HOST_SETUP = Setup("host", "auto")


@dataclass(frozen=True)
class Cell:
    """One (setup, block, direction): GB/s idle, and under load with the GEMMs' loss (a share)."""

    idle: float
    load: Optional[float] = None
    loss: Optional[float] = None


def parse_bytes(text: str) -> int:
    """"4K", "1M", "1G" (powers of 1024) or a plain number of bytes."""
    text = text.strip().upper()
    scale = UNIT.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r} (e.g. 4096, 64K, 1M)")
    return int(digits) * scale


def parse_sizes(text: str) -> list[int]:
    return [parse_bytes(part) for part in text.split(",")]


def format_bytes(n: int) -> str:
    for suffix in ("G", "M", "K"):
        if n % UNIT[suffix] == 0:
            return f"{n // UNIT[suffix]}{suffix}"
    return str(n)


def progress(message: str) -> None:
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def tile(view: memoryview, chunk: bytes) -> None:
    """Fills `view` with `chunk` repeated, doubling the filled part with each copy."""
    filled = min(len(chunk), len(view))
    view[:filled] = chunk[:filled]
    while filled < len(view):
        step = min(filled, len(view) - filled)
        view[filled : filled + step] = view[:step]
        filled += step


@dataclass(frozen=True)
class Plan:
    """Byte offsets of each block slot at the source and at the destination, both shuffled."""

    src: list[int]
    dst: list[int]

    @classmethod
    def scatter(cls, span: int, block: int, seed: int) -> Plan:
        rng = random.Random(seed)
        slots = span // block
        src, dst = list(range(slots)), list(range(slots))
        rng.shuffle(src)
        rng.shuffle(dst)
        return cls([s * block for s in src], [d * block for d in dst])


class DescriptorRing:
    """One plan's descriptors in one direction, prebuilt in a ctypes array (tag = index), pushed
    in slices straight through the C function."""

    def __init__(self, plan: Plan, block: int, src_region: int, dst_region: int) -> None:
        self.block, self.n = block, len(plan.src)
        self._array = (ferry.Descriptor * self.n)()
        for i, (s, d) in enumerate(zip(plan.src, plan.dst)):
            self._array[i] = ferry.Descriptor(tag=i, src_region=src_region, dst_region=dst_region,
                                              src_offset=s, dst_offset=d, len=block)
        self._base = ctypes.addressof(self._array)

    def at(self, index: int) -> "ctypes._Pointer[ferry.Descriptor]":
        return ctypes.cast(self._base + index * ctypes.sizeof(ferry.Descriptor), ctypes.POINTER(ferry.Descriptor))


class Driver:
    """Pushes descriptors through one queue and polls their completions into a preallocated
    array, with ferry's C functions directly: no Python object per descriptor."""

    def __init__(self, queue: ferry.Queue, depth: int) -> None:
        self._queue, self._depth = queue, depth
        self._done = (ferry.Completion * depth)()
        words = ctypes.sizeof(ferry.Completion) // 4
        status_word = ferry.Completion.status.offset // 4
        self._status = memoryview(self._done).cast("B").cast("I")[status_word::words]

    def run(self, ring: DescriptorRing, count: int) -> float:
        """Copies `count` blocks of `ring` (cycling through it) and returns the wall-clock
        seconds; fails if any copy does not complete ok, or none completes for STALL_S."""
        lib, handle = ferry._library(), self._queue._handle
        pushed, got = ctypes.c_size_t(), ctypes.c_size_t()
        in_flight_max = min(self._depth, ring.n)  # a slot is never the target of two copies at once
        sent = received = 0
        start = last = time.perf_counter()
        while received < count:
            room = min(in_flight_max - (sent - received), count - sent)
            if room > 0:
                first = sent % ring.n
                ferry._check(lib.ferry_queue_submit(handle, ring.at(first), min(room, ring.n - first), ctypes.byref(pushed)))
                sent += pushed.value
            ferry._check(lib.ferry_queue_poll(handle, self._done, self._depth, ctypes.byref(got)))
            if got.value:
                self._check_statuses(got.value)
                received += got.value
                last = time.perf_counter()
            elif time.perf_counter() - last > STALL_S:
                raise BenchFailure(f"no completion for {STALL_S:.0f} s ({received} of {count} completed)")
        return time.perf_counter() - start

    def _check_statuses(self, got: int) -> None:
        if any(self._status[:got]):
            bad = [c for c in self._done[:got] if c.status != ferry.STATUS["ok"]]
            first = bad[0]
            raise BenchFailure(f"{len(bad)} of {got} copies failed; first: tag {first.tag} "
                               f"{first.status_name} (detail {first.detail})")


class Side(Protocol):
    """The far end of the copies (the GPU tensor, or a second host buffer)."""

    region: int

    def clear(self) -> None: ...

    def read(self, offset: int, length: int) -> bytes: ...


class HostSide:
    def __init__(self, buffer: ferry.HostBuffer) -> None:
        self.region, self._view = buffer.region, buffer.view()

    def clear(self) -> None:
        tile(self._view, bytes(4096))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset : offset + length])


class TorchSide:
    def __init__(self, engine: ferry.Engine, client: int, tensor: torch.Tensor) -> None:
        self.region, self._tensor = engine.register_gpu(client, tensor.data_ptr(), tensor.numel()), tensor

    def clear(self) -> None:
        import torch

        self._tensor.zero_()
        # The stream, not the device: a device-wide synchronize also waits for the resident
        # strategy's kernel, which ends only once idle.
        torch.cuda.current_stream(self._tensor.device).synchronize()

    def read(self, offset: int, length: int) -> bytes:
        piece = self._tensor[offset : offset + length].cpu()
        return ctypes.string_at(piece.data_ptr(), length)


def verify(driver: Driver, ring: DescriptorRing, plan: Plan, host: memoryview, side: Side, pattern: bytes) -> None:
    """One H2D pass over the whole plan onto a cleared far end; a few blocks compared."""
    tile(host, pattern)
    side.clear()
    driver.run(ring, ring.n)
    block = ring.block
    for i in random.Random(ring.n).sample(range(ring.n), min(VERIFY_BLOCKS, ring.n)):
        src, dst = plan.src[i], plan.dst[i]
        if side.read(dst, block) != bytes(host[src : src + block]):
            raise BenchFailure(f"{format_bytes(block)} blocks: block {i} (host {src:#x} -> far end {dst:#x}) "
                               "arrived with other bytes")


@dataclass(frozen=True)
class Sample:
    """One GEMM: when the load thread saw it finish (perf_counter) and its GPU time."""

    seen: float
    ms: float


class GemmLoad:
    """bf16 GEMMs back to back on their own stream from a Python thread, GEMMS_QUEUED queued,
    each timed with a pair of CUDA events; `start` and `stop` around each measured window."""

    def __init__(self, n: int = GEMM_N) -> None:
        import torch

        self._torch = torch
        self.flops = 2 * n**3
        self._a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        self._b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        self._c = torch.empty_like(self._a)
        torch.matmul(self._a, self._b, out=self._c)  # cuBLAS picks its kernel before any timing
        torch.cuda.synchronize()
        self._stream = torch.cuda.Stream()
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.alone_ms = 0.0

    def calibrate(self, seconds: float) -> None:
        """Measures the GEMMs' mean duration with nothing else running."""
        self.start()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        time.sleep(seconds)
        t1 = time.perf_counter()
        self.stop()
        alone = self.mean_ms(t0, t1)
        if alone is None:
            raise BenchFailure(f"no GEMM finished in {seconds} s of calibration")
        self.alone_ms = alone

    def start(self) -> None:
        self._samples, self._error = [], None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gemm-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread after its GEMMs drain; fails if it failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise BenchFailure(f"the GEMM thread failed: {self._error!r}") from self._error

    def mean_ms(self, t0: float, t1: float) -> Optional[float]:
        """Mean duration of the GEMMs seen finishing in (t0, t1], less the first (it may have
        started before t0); None if none is left."""
        inside = [s.ms for s in self._samples if t0 < s.seen <= t1][1:]
        return statistics.fmean(inside) if inside else None

    def loss(self, t0: float, t1: float) -> Optional[float]:
        during = self.mean_ms(t0, t1)
        return None if during is None else 1.0 - self.alone_ms / during

    def _run(self) -> None:
        torch = self._torch
        try:
            with torch.cuda.stream(self._stream):
                queued: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
                spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
                while not self._stop.is_set():
                    while len(queued) < GEMMS_QUEUED:
                        begin, end = spare.pop() if spare else (torch.cuda.Event(enable_timing=True),
                                                                torch.cuda.Event(enable_timing=True))
                        begin.record(self._stream)
                        torch.matmul(self._a, self._b, out=self._c)
                        end.record(self._stream)
                        queued.append((begin, end))
                    begin, end = queued[0]
                    if end.query():
                        self._samples.append(Sample(time.perf_counter(), begin.elapsed_time(end)))
                        spare.append(queued.popleft())
                    else:
                        time.sleep(20e-6)
            self._stream.synchronize()
        except BaseException as e:  # reported by stop()
            self._error = e


def torch_ceiling(span: int) -> dict[str, float]:
    """GB/s of torch's own `copy_` of `span` bytes each way between pinned host memory and the
    GPU, median of CEILING_RUNS after a warm-up."""
    import torch

    host = torch.empty(span, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(span, dtype=torch.uint8, device="cuda")

    def seconds(dst: torch.Tensor, src: torch.Tensor) -> float:
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    ceiling = {}
    for direction, (dst, src) in {"H2D": (device, host), "D2H": (host, device)}.items():
        seconds(dst, src)
        ceiling[direction] = span / statistics.median(seconds(dst, src) for _ in range(CEILING_RUNS)) / 1e9
    return ceiling


def timed_reps(driver: Driver, ring: DescriptorRing, count: int, reps: int) -> tuple[float, float, float]:
    """Median GB/s of `reps` runs, and the wall-clock window they spanned."""
    start = time.perf_counter()
    runs = [driver.run(ring, count) for _ in range(reps)]
    end = time.perf_counter()
    return count * ring.block / statistics.median(runs) / 1e9, start, end


def measure_cell(driver: Driver, ring: DescriptorRing, count: int, reps: int, load: Optional[GemmLoad]) -> Cell:
    idle, _, _ = timed_reps(driver, ring, count, reps)
    if load is None:
        return Cell(idle)
    load.start()
    try:
        time.sleep(SETTLE_S)
        loaded, t0, t1 = timed_reps(driver, ring, count, reps)
    finally:
        load.stop()
    return Cell(idle, loaded, load.loss(t0, t1))


def start_engine(setup: Setup, transport: str) -> ferry.Engine:
    if transport == "host":
        return ferry.Engine(transport="host", workers=1)
    engine = ferry.Engine(transport="gpu", use_gdr="off", workers=1, strategy=setup.strategy,
                          sm_budget=setup.sm_budget, resident_writers=setup.writers)
    if setup.live_budget is not None:
        engine.set_sm_budget(setup.live_budget)
    return engine


def run_setup(setup: Setup, transport: str, tensor: Optional[torch.Tensor], sizes: Sequence[int], total: int,
              reps: int, load: Optional[GemmLoad]) -> dict[tuple[int, str], Cell]:
    """Every (block, direction) cell of one setup, on an engine of its own."""
    pattern = random.Random(1).randbytes(PATTERN_PERIOD)
    cells = {}
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(setup, transport))
        progress(f"{setup.name}: transport {engine.transport}")
        client = engine.new_client()
        host = stack.enter_context(contextlib.closing(engine.alloc_host(client, SPAN)))
        if tensor is None:
            side: Side = HostSide(stack.enter_context(contextlib.closing(engine.alloc_host(client, SPAN))))
        else:
            side = TorchSide(engine, client, tensor)
        queue = stack.enter_context(contextlib.closing(engine.open_queue(client, DEPTH, DEPTH)))
        driver = Driver(queue, DEPTH)
        for block in sizes:
            plan = Plan.scatter(SPAN, block, seed=block)
            rings = {"H2D": DescriptorRing(plan, block, host.region, side.region),
                     "D2H": DescriptorRing(plan, block, side.region, host.region)}
            verify(driver, rings["H2D"], plan, host.view(), side, pattern)
            for direction in DIRECTIONS:
                cell = measure_cell(driver, rings[direction], total // block, reps, load)
                cells[(block, direction)] = cell
                progress(f"{setup.name} {format_bytes(block)} {direction}: idle {cell.idle:.1f} GB/s, "
                         f"load {format_load(cell)}")
    return cells


def format_load(cell: Cell) -> str:
    if cell.load is None:
        return "-"
    loss = "?" if cell.loss is None else f"{100 * cell.loss:+.1f}%"
    return f"{cell.load:.1f} ({loss})"


def render_table(setups: Sequence[Setup], sizes: Sequence[int], results: dict[str, dict[tuple[int, str], Cell]],
                 ceiling: Optional[dict[str, float]]) -> list[str]:
    idle_w, load_w = len("idle GB/s"), len("load GB/s (loss %)")
    group_w = idle_w + 2 + load_w
    lines = [f"{'':11}" + "".join(f"  {s.name:^{group_w}}" for s in setups),
             f"{'block':>5} {'dir':>5}" + f"  {'idle GB/s':>{idle_w}}  {'load GB/s (loss %)':>{load_w}}" * len(setups)
             + "  best/ceiling"]
    for block in sizes:
        for direction in DIRECTIONS:
            cells = [results[s.name][(block, direction)] for s in setups]
            loads = [c.load for c in cells if c.load is not None]
            best = f"{100 * max(loads) / ceiling[direction]:.0f}%" if loads and ceiling else "-"
            row = "".join(f"  {c.idle:>{idle_w}.1f}  {format_load(c):>{load_w}}" for c in cells)
            lines.append(f"{format_bytes(block):>5} {direction:>5}{row}  {best:>12}")
    return lines


def bench_gpu(setups: Sequence[Setup], sm_budget: int, sizes: Sequence[int], total: int, reps: int) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        raise BenchFailure("torch sees no CUDA device (use --transport host without a GPU)")
    progress("PCIe ceiling (torch copy_) ...")
    ceiling = torch_ceiling(SPAN)
    load = GemmLoad()
    progress(f"GEMMs alone for {CALIBRATE_S} s ...")
    load.calibrate(CALIBRATE_S)
    tensor = torch.empty(SPAN, dtype=torch.uint8, device="cuda")
    results = {s.name: run_setup(s, "gpu", tensor, sizes, total, reps, load) for s in setups}
    header = [
        f"ferry under load on {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"PCIe ceiling (torch copy_ of {format_bytes(SPAN)} pinned) H2D {ceiling['H2D']:.1f} GB/s, "
        f"D2H {ceiling['D2H']:.1f} GB/s; GEMM {GEMM_N}^3 bf16 alone "
        f"{load.flops / load.alone_ms / 1e9:.0f} TFLOP/s ({load.alone_ms:.2f} ms each)",
        f"1 worker, sm_budget {sm_budget or 'default'}, use_gdr off; {format_bytes(total)} of scattered blocks per run, "
        f"median of {reps}; loss: GEMM throughput lost while the copies ran; best/ceiling: best load GB/s",
    ]
    return header + render_table(setups, sizes, results, ceiling)


def bench_host(sizes: Sequence[int], total: int, reps: int) -> list[str]:
    results = {HOST_SETUP.name: run_setup(HOST_SETUP, "host", None, sizes, total, reps, None)}
    header = [
        "ferry host transport, host to host between two ferry buffers (H2D: first to second, D2H: back); "
        "no torch, no load (smoke test)",
        f"1 worker; {format_bytes(total)} of scattered blocks per run, median of {reps}",
    ]
    return header + render_table([HOST_SETUP], sizes, results, None)


def parse_writers(text: str) -> list[tuple[str, int]]:
    """'8,32,all' -> [("8", 8), ("32", 32), ("all", 2**32 - 1)]."""
    gates = []
    for word in text.split(","):
        if word == "all":
            gates.append(("all", 2**32 - 1))
        elif word.isdigit() and 0 < int(word) < 1 << 32:
            gates.append((word, int(word)))
        else:
            raise argparse.ArgumentTypeError(f"{word!r}: a count of warps (at least 1) or all")
    return gates


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("4K,64K,1M"),
                        help="block sizes, comma-separated (default 4K,64K,1M)")
    parser.add_argument("--total", type=parse_bytes, default=parse_bytes("1G"),
                        help="bytes moved per run of a cell (default 1G)")
    parser.add_argument("--reps", type=int, default=3, help="runs per cell, median (default 3)")
    parser.add_argument("--transport", choices=("gpu", "host"), default="gpu",
                        help="gpu: host <-> torch CUDA tensor under GEMMs (default); host: host to host, no torch")
    parser.add_argument("--sm-budget", type=int, default=0,
                        help="the engines' SM budget (default 0: ferry's default) but for resident/8")
    parser.add_argument("--setups", default=",".join(s.name for s in GPU_SETUPS),
                        help="the GPU setups to run, comma-separated (default all: "
                        + ",".join(s.name for s in GPU_SETUPS) + ")")
    parser.add_argument("--writers", type=parse_writers, default=[],
                        help="also run auto with these writer gates (resident_writers), comma-separated "
                        "counts of warps or 'all' (ungated); each a setup auto/wN")
    args = parser.parse_args(argv)
    if args.sm_budget < 0:
        parser.error("--sm-budget must be 0 (the default) or more")
    known = {s.name: s for s in GPU_SETUPS}
    names = [n for n in args.setups.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--setups: unknown {','.join(unknown)}; known: {','.join(known)}")
    chosen = [known[n] for n in names] + [Setup(f"auto/w{label}", "auto", writers=n) for label, n in args.writers]
    # A setup's own budget (resident/8) stays; the others take --sm-budget.
    args.setups = [dataclasses.replace(s, sm_budget=s.sm_budget or args.sm_budget) for s in chosen]
    if not args.setups:
        parser.error("--setups and --writers name no setup")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    for block in args.sizes:
        if block > SPAN or block > args.total:
            parser.error(f"block {format_bytes(block)} is over the {format_bytes(SPAN)} regions or --total")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        if args.transport == "gpu":
            lines = bench_gpu(args.setups, args.sm_budget, args.sizes, args.total, args.reps)
        else:
            lines = bench_host(args.sizes, args.total, args.reps)
    except ImportError as e:
        print(f"bench_under_load: --transport gpu needs torch: {e}", file=sys.stderr)
        return 1
    except (ferry.FerryError, BenchFailure, RuntimeError, OSError) as e:
        print(f"bench_under_load: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
