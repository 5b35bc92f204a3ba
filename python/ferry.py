"""Python binding of ferry over its C ABI (libferry.so), with ctypes: no build step.

The library is found through the FERRY_LIB environment variable, else in the repository's
target/release or target/debug folder (build it with `cargo build --release -p ferry-ffi`).

    import ferry
    with ferry.Engine() as engine:
        client = engine.new_client()
        src, dst = engine.alloc_host(client, 1 << 20), engine.alloc_host(client, 1 << 20)
        src.view()[:5] = b"hello"
        queue = engine.open_queue(client)
        queue.submit([ferry.Descriptor(tag=1, src_region=src.region, dst_region=dst.region, len=5)])
        (done,) = queue.wait(1)
        assert done.status == ferry.STATUS["ok"] and bytes(dst.view()[:5]) == b"hello"

A Queue is single-producer single-consumer: use each from one thread at a time.
"""

import ctypes
import os
import pathlib
import time

c_u32, c_u64, c_size = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t

# The constants of ferry.h, without the FERRY_ prefix; a dict holds one family, FERRY_<NAME>_<KEY>
# being NAME[key]. test_header.py checks every one against the header, both ways.

# Descriptor.flags: start only after every earlier descriptor of the queue completed.
FLAG_FENCE = 1
# Descriptor.flags: `count` chunks of `len` bytes at `src_stride` / `dst_stride`, one completion.
FLAG_STRIDED = 2
# The most chunks of one strided descriptor.
MAX_CHUNKS = 4096

# Engine(sm_budget=...), Engine.set_sm_budget: every SM of the GPU, in total over the workers.
SM_BUDGET_ALL = 0xFFFFFFFF
# Engine(sm_budget=...), Engine.set_sm_budget: no SM; the copy engine alone.
SM_BUDGET_NONE = 0xFFFFFFFE

# Call results (ferry_result): FerryError.code.
RESULT = {
    "ok": 0,
    "null_argument": 1,
    "panic": 2,
    "invalid_argument": 3,
    "core_unavailable": 4,
    "region_table_full": 5,
    "unknown_region": 6,
    "region_busy": 7,
    "bad_range": 8,
    "queue_not_open": 9,
    "timeout": 10,
    "system_error": 11,
    "layout_mismatch": 12,
    "shut_down": 13,
}

# Engine(transport=...), Engine(strategy=...), Engine(use_gdr=...): ferry_config's codes.
TRANSPORT = {"host": 0, "null": 1, "gpu": 2}
CUDA_STRATEGY = {"auto": 0, "memcpy": 1, "batch": 2, "kernel": 3, "resident": 4}
USE_GDR = {"auto": 0, "off": 1, "on": 2}

# Completion status codes (ferry_status in ferry.h).
STATUS = {
    "ok": 0,
    "unknown_region": 1,
    "not_owner": 2,
    "out_of_bounds": 3,
    "zero_length": 4,
    "too_long": 5,
    "overlap": 6,
    "reserved_flags": 7,
    "transport_failed": 8,
    "cancelled": 9,
    "unsupported": 10,
    "zero_count": 11,
    "too_many_chunks": 12,
    "chunks_overlap": 13,
}
STATUS_NAME = {v: k for k, v in STATUS.items()}


# Each ctypes.Structure names the C struct it mirrors in _c_name; test_header.py compares them.


class Descriptor(ctypes.Structure):
    """One copy request; same layout as ferry_descriptor (64 bytes)."""

    _c_name = "ferry_descriptor"

    _fields_ = [
        ("tag", c_u64),
        ("src_region", c_u32),
        ("dst_region", c_u32),
        ("src_offset", c_u64),
        ("dst_offset", c_u64),
        ("len", c_u64),
        ("flags", c_u32),
        ("count", c_u32),
        ("src_stride", c_u64),
        ("dst_stride", c_u64),
    ]


class Completion(ctypes.Structure):
    """The result of one descriptor; same layout as ferry_completion (32 bytes)."""

    _c_name = "ferry_completion"

    _fields_ = [("tag", c_u64), ("seq", c_u64), ("bytes", c_u64), ("status", c_u32), ("detail", c_u32)]

    @property
    def status_name(self):
        return STATUS_NAME.get(self.status, f"unknown({self.status})")


class _Config(ctypes.Structure):
    """ferry_config; a zero field means the default."""

    _c_name = "ferry_config"
    _fields_ = [
        ("workers", c_u32),
        ("transport", c_u32),
        ("unpinned", c_u32),
        ("yield_when_idle", c_u32),
        ("max_len", c_u64),
        ("max_regions", c_u32),
        ("cuda_device", ctypes.c_int32),
        ("cuda_strategy", c_u32),
        ("sm_budget", c_u32),
        ("use_gdr", c_u32),
        ("nic", ctypes.c_char_p),
    ]


class WorkerStats(ctypes.Structure):
    """One worker's counters (ferry_worker_stats); the GDR fields count when `nic` is 1."""

    _c_name = "ferry_worker_stats"

    _fields_ = [
        ("iterations", c_u64),
        ("idle_iterations", c_u64),
        ("descriptors", c_u64),
        ("transport_completions", c_u64),
        ("nic", c_u32),
        ("work_requests", c_u64),
        ("doorbells", c_u64),
        ("nic_completions", c_u64),
        ("nic_errors", c_u64),
        ("recoveries", c_u64),
        ("inline_writes", c_u64),
        ("queues", c_u64),
    ]


assert ctypes.sizeof(Descriptor) == 64 and ctypes.sizeof(Completion) == 32


class FerryError(Exception):
    """A ferry call failed: `code` is the ferry_result value, the message is ferry's text."""

    def __init__(self, code, message):
        super().__init__(f"{message} (ferry_result {code})")
        self.code = code


def _find_library():
    if os.environ.get("FERRY_LIB"):
        return os.environ["FERRY_LIB"]
    root = pathlib.Path(__file__).resolve().parent.parent / "target"
    for profile in ("release", "debug"):
        candidate = root / profile / "libferry.so"
        if candidate.exists():
            return str(candidate)
    raise FerryError(-1, "libferry.so not found: build it with `cargo build --release -p ferry-ffi` or set FERRY_LIB")


_p = ctypes.c_void_p
# The C functions this binding calls: (name, argtypes, restype); test_header.py checks them.
_SIGNATURES = [
    ("ferry_last_error", [ctypes.c_char_p, c_size], c_size),
    ("ferry_engine_start", [ctypes.POINTER(_Config), ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_engine_free", [_p], None),
    ("ferry_engine_new_client", [_p, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_host_alloc", [_p, c_u32, c_size, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_host_buffer_region", [_p], c_u32),
    ("ferry_host_buffer_data", [_p], _p),
    ("ferry_host_buffer_free", [_p], None),
    ("ferry_deregister", [_p, c_u32], ctypes.c_int),
    ("ferry_engine_set_sm_budget", [_p, c_u32], ctypes.c_int),
    ("ferry_register_gpu", [_p, c_u32, c_u64, c_size, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_engine_transport", [_p, ctypes.c_char_p, c_size], c_size),
    ("ferry_engine_stats", [_p, c_u32, ctypes.POINTER(WorkerStats)], ctypes.c_int),
    ("ferry_queue_open", [_p, c_u32, c_u64, c_u64, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_queue_submit", [_p, ctypes.POINTER(Descriptor), c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_poll", [_p, ctypes.POINTER(Completion), c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_watermark", [_p], c_u64),
    ("ferry_queue_free", [_p], None),
    ("ferry_queue_attach", [ctypes.c_int, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_queue_hand_off", [_p, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
]

_lib = None


def _library():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_find_library())
        for name, args, res in _SIGNATURES:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _lib = lib
    return _lib


def _check(code):
    if code != 0:
        buf = ctypes.create_string_buffer(512)
        _library().ferry_last_error(buf, len(buf))
        raise FerryError(code, buf.value.decode(errors="replace"))


class HostBuffer:
    """Host memory allocated and registered by the engine."""

    def __init__(self, handle, size):
        self._handle, self.size = handle, size
        self.region = _library().ferry_host_buffer_region(handle)

    def view(self):
        """A writable memoryview of the whole buffer."""
        address = _library().ferry_host_buffer_data(self._handle)
        return memoryview((ctypes.c_ubyte * self.size).from_address(address)).cast("B")

    def close(self):
        if self._handle:
            _library().ferry_host_buffer_free(self._handle)
            self._handle = None


class Queue:
    """The client end of a queue: submit descriptors, poll completions."""

    def __init__(self, handle):
        self._handle = handle

    def submit(self, descriptors):
        """Pushes as many as fit (one publish); returns how many."""
        array = (Descriptor * len(descriptors))(*descriptors)
        pushed = c_size()
        _check(_library().ferry_queue_submit(self._handle, array, len(descriptors), ctypes.byref(pushed)))
        return pushed.value

    def poll(self, max_completions=256):
        """Ready completions, at most `max_completions`; never blocks."""
        out = (Completion * max_completions)()
        n = c_size()
        _check(_library().ferry_queue_poll(self._handle, out, max_completions, ctypes.byref(n)))
        return list(out[: n.value])

    def wait(self, count, timeout=10.0):
        """Polls until `count` completions arrived; raises TimeoutError after `timeout` seconds."""
        got, deadline = [], time.monotonic() + timeout
        while len(got) < count:
            got.extend(self.poll(count - len(got)))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} completions after {timeout} s")
        return got

    @property
    def watermark(self):
        return _library().ferry_queue_watermark(self._handle)

    @classmethod
    def attach(cls, fd):
        """The client end of a queue whose memfd `fd` another process handed off (see
        `hand_off`); the header is checked and the end claimed."""
        handle = ctypes.c_void_p()
        _check(_library().ferry_queue_attach(fd, ctypes.byref(handle)))
        return cls(handle)

    def hand_off(self):
        """Passes the queue on: releases this end without closing the queue and returns a new
        file descriptor of its memfd (the caller owns it) for another process's `Queue.attach`.
        This object is unusable afterwards."""
        handle, self._handle = self._handle, None
        fd = ctypes.c_int(-1)
        _check(_library().ferry_queue_hand_off(handle, ctypes.byref(fd)))
        return fd.value

    def close(self):
        if self._handle:
            _library().ferry_queue_free(self._handle)
            self._handle = None


class Engine:
    """A running engine; `close()` (or leaving a `with` block) shuts it down.

    transport: "host" (CPU copies), "null" (no data moves) or "gpu" (host <-> GPU: over the NIC
    or with the CUDA driver, as `use_gdr` says: "auto", "off" or "on"). GPU settings: `device`
    (CUDA ordinal), `strategy` ("auto", "memcpy", "batch", "kernel", "resident": experimental,
    one worker; a kernel that stays on the budget's SMs until the engine closes, so
    torch.cuda.synchronize() and a kernel's first (lazy) load wait for the close: run every
    kernel once before the engine starts and synchronize streams instead), `sm_budget` (the most SMs
    the copy kernel may use, in total over the engine's workers, each getting an equal share,
    capped at the GPU's SM count; SM_BUDGET_ALL: every SM; SM_BUDGET_NONE: no SM, the copy engine
    alone; 0: the default, 8 SMs; a budget below `workers` fails at start with
    RESULT["invalid_argument"]; `set_sm_budget` changes it while the engine runs), `nic` (RDMA device name; None:
    the topology plan's). As in ferry_config, 0 in `max_len` or `workers` means the default.
    """

    def __init__(self, workers=1, transport="host", pinned=True, max_len=0, device=0, strategy="auto",
                 sm_budget=0, use_gdr="auto", nic=None):
        config = _Config(
            workers=workers,
            transport=TRANSPORT[transport],
            unpinned=0 if pinned else 1,
            max_len=max_len,
            cuda_device=device,
            cuda_strategy=CUDA_STRATEGY[strategy],
            sm_budget=sm_budget,
            use_gdr=USE_GDR[use_gdr],
            nic=nic.encode() if nic else None,
        )
        handle = ctypes.c_void_p()
        _check(_library().ferry_engine_start(ctypes.byref(config), ctypes.byref(handle)))
        self._handle = handle

    def new_client(self):
        out = c_u32()
        _check(_library().ferry_engine_new_client(self._handle, ctypes.byref(out)))
        return out.value

    def alloc_host(self, client, size):
        out = ctypes.c_void_p()
        _check(_library().ferry_host_alloc(self._handle, client, size, ctypes.byref(out)))
        return HostBuffer(out, size)

    def deregister(self, region):
        _check(_library().ferry_deregister(self._handle, region))

    def set_sm_budget(self, sm_budget):
        """Changes the copy kernel's SM budget while the engine runs (a total over the workers;
        SM_BUDGET_NONE while the forward pass needs every SM, a count or SM_BUDGET_ALL when the
        GPU has room). 0 is refused here. Needs transport="gpu" with a CUDA driver."""
        _check(_library().ferry_engine_set_sm_budget(self._handle, sm_budget))

    def register_gpu(self, client, device_ptr, size):
        """Registers `size` bytes of GPU memory at device address `device_ptr` (for example
        `tensor.data_ptr()` of a CUDA tensor); returns the region id. Needs transport="gpu"."""
        out = c_u32()
        _check(_library().ferry_register_gpu(self._handle, client, device_ptr, size, ctypes.byref(out)))
        return out.value

    @property
    def transport(self):
        """The transport as text ("gdr on mlx5_0", "cuda", "host"), with why where it was a choice."""
        lib = _library()
        n = lib.ferry_engine_transport(self._handle, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.ferry_engine_transport(self._handle, buf, len(buf))
        return buf.value.decode(errors="replace")

    def stats(self, worker=0):
        """Worker `worker`'s counters (WorkerStats)."""
        out = WorkerStats()
        _check(_library().ferry_engine_stats(self._handle, worker, ctypes.byref(out)))
        return out

    def open_queue(self, client, submit_capacity=0, complete_capacity=0):
        out = ctypes.c_void_p()
        _check(_library().ferry_queue_open(self._handle, client, submit_capacity, complete_capacity, ctypes.byref(out)))
        return Queue(out)

    def close(self):
        if self._handle:
            _library().ferry_engine_free(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
