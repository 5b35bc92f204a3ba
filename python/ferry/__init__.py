"""ferry's Python package: the C ABI (libferry.so) through ctypes, with numpy fast paths.

`pip install ./python` builds libferry with cargo and installs it inside this package. Without
installing, the library is found through the FERRY_LIB environment variable, else in the
repository's target/release or target/debug folder (`cargo build --release -p ferry-ffi`).

    import ferry
    with ferry.Engine() as engine:
        client = engine.new_client()
        src, dst = engine.alloc_host(client, 1 << 20), engine.alloc_host(client, 1 << 20)
        src.view()[:5] = b"hello"
        queue = engine.open_queue(client)
        queue.submit([ferry.Descriptor(tag=1, src_region=src.region, dst_region=dst.region, len=5)])
        (done,) = queue.wait(1)
        assert done.status == ferry.STATUS["ok"] and bytes(dst.view()[:5]) == b"hello"

Many descriptors at once: `Queue.submit_array` takes a numpy array of DESCRIPTOR_DTYPE (or a
torch int64 tensor of shape [n, 8], the same bytes), `Queue.poll_into` fills a preallocated
array of COMPLETION_DTYPE, and `Queue.copy_blocks` moves a paged KV cache's blocks, one strided
descriptor per block, between registered tensors described by `Blocks`.

A Queue is single-producer single-consumer: use each from one thread at a time.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

c_u32, c_u64, c_size = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t

# The constants of ferry.h, without the FERRY_ prefix; a dict holds one family, FERRY_<NAME>_<KEY>
# being NAME[key]. test_header.py checks every one against the header, both ways.

# The C ABI this package speaks: a libferry whose ferry_abi_version() differs is refused at load.
ABI_VERSION = 1
# Descriptor.flags: start only after every earlier descriptor of the queue completed.
FLAG_FENCE = 1
# Descriptor.flags: `count` chunks of `len` bytes at `src_stride` / `dst_stride`, one completion.
FLAG_STRIDED = 2
# Descriptor.flags: a gate: later descriptors start once the queue's gate word reaches src_offset.
FLAG_GATE = 4
# Descriptor.flags: a notification: once every earlier descriptor completed and slot dst_offset is
# clear, the worker writes src_offset into it (Queue.stream_wait_slot waits for it and clears it).
FLAG_NOTIFY = 8
# How many notification slots a queue has.
NOTIFY_SLOTS = 64
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
    "engine_gone": 14,
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
    "gate_timeout": 14,
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
        ("all_gpus", c_u32),
        ("copy_engine_from_h2d", c_u64),
        ("copy_engine_from_d2h", c_u64),
        ("resident_life_us", c_u64),
        ("resident_writers", c_u32),
    ]


class _QueueConfig(ctypes.Structure):
    """ferry_queue_config; a zero field means the default."""

    _c_name = "ferry_queue_config"
    _fields_ = [
        ("submit_capacity", c_u64),
        ("complete_capacity", c_u64),
        ("gate_timeout_ns", c_u64),
        ("worker", c_u32),
        ("close_if_client_dies", c_u32),
        ("gpu", c_u32),
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


def _dtype_of(struct: type) -> np.dtype:
    """The numpy structured dtype with the same fields, offsets and size as a ctypes.Structure."""
    names = [name for name, _ in struct._fields_]
    return np.dtype(
        {
            "names": names,
            "formats": [np.dtype(ctype) for _, ctype in struct._fields_],
            "offsets": [getattr(struct, name).offset for name in names],
            "itemsize": ctypes.sizeof(struct),
        }
    )


# numpy views of ferry_descriptor and ferry_completion (test_header.py checks them against
# ferry.h): `descriptors(n)` / `completions(n)` make zeroed arrays of them.
DESCRIPTOR_DTYPE = _dtype_of(Descriptor)
COMPLETION_DTYPE = _dtype_of(Completion)


def descriptors(n: int) -> np.ndarray:
    """A zeroed array of `n` descriptors (DESCRIPTOR_DTYPE), for `Queue.submit_array`."""
    return np.zeros(n, DESCRIPTOR_DTYPE)


def completions(n: int) -> np.ndarray:
    """A zeroed array of `n` completions (COMPLETION_DTYPE), for `Queue.poll_into`."""
    return np.zeros(n, COMPLETION_DTYPE)


class FerryError(Exception):
    """A ferry call failed: `code` is the ferry_result value, the message is ferry's text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (ferry_result {code})")
        self.code = code


class CopyError(Exception):
    """Descriptors completed with a status other than ok: `failed` of them; the first is
    descriptor `index` of the call, with `status` (a STATUS name) and `detail`."""

    def __init__(self, failed: int, index: int, status: str, detail: int, what: str) -> None:
        super().__init__(f"{failed} descriptor(s) failed; the first, {what}, with status {status} (detail {detail})")
        self.failed, self.index, self.status, self.detail = failed, index, status, detail


def _find_library() -> str:
    if os.environ.get("FERRY_LIB"):
        return os.environ["FERRY_LIB"]
    here = pathlib.Path(__file__).resolve().parent
    # Installed by `pip install ./python`: the cdylib sits in the package, with a Python suffix.
    packaged = sorted(here.glob("libferry*.so"))
    if packaged:
        return str(packaged[0])
    root = here.parent.parent / "target"
    for profile in ("release", "debug"):
        candidate = root / profile / "libferry.so"
        if candidate.exists():
            return str(candidate)
    raise FerryError(
        -1,
        "libferry.so not found: `pip install ./python`, or build it with `cargo build --release -p ferry-ffi`, "
        "or set FERRY_LIB",
    )


_p = ctypes.c_void_p
# The C functions this binding calls: (name, argtypes, restype); test_header.py checks them.
_SIGNATURES = [
    ("ferry_abi_version", [], c_u32),
    ("ferry_last_error", [ctypes.c_char_p, c_size], c_size),
    ("ferry_engine_start", [ctypes.POINTER(_Config), ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_engine_connect", [ctypes.c_char_p, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_engine_free", [_p], None),
    ("ferry_engine_new_client", [_p, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_host_alloc", [_p, c_u32, c_size, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_host_buffer_region", [_p], c_u32),
    ("ferry_host_buffer_len", [_p], c_size),
    ("ferry_engine_shared_client", [_p, ctypes.c_char_p, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_host_map", [_p, c_u32, c_u32, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_host_register_memfd", [_p, c_u32, ctypes.c_int, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_host_buffer_data", [_p], _p),
    ("ferry_host_buffer_free", [_p], None),
    ("ferry_register_host", [_p, c_u32, _p, c_size, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_deregister", [_p, c_u32], ctypes.c_int),
    ("ferry_engine_set_sm_budget", [_p, c_u32], ctypes.c_int),
    ("ferry_register_gpu", [_p, c_u32, c_u64, c_size, ctypes.POINTER(c_u32)], ctypes.c_int),
    ("ferry_engine_transport", [_p, ctypes.c_char_p, c_size], c_size),
    ("ferry_engine_stats", [_p, c_u32, ctypes.POINTER(WorkerStats)], ctypes.c_int),
    ("ferry_queue_open", [_p, c_u32, c_u64, c_u64, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_queue_open_with", [_p, c_u32, ctypes.POINTER(_QueueConfig), ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_queue_submit", [_p, ctypes.POINTER(Descriptor), c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_poll", [_p, ctypes.POINTER(Completion), c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_poll_wait", [_p, ctypes.POINTER(Completion), c_size, c_size, c_u64, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_watermark", [_p], c_u64),
    ("ferry_queue_pushed", [_p], c_u64),
    ("ferry_queue_signal", [_p, c_u64], ctypes.c_int),
    ("ferry_queue_stream_wait", [_p, _p, _p, c_u64], ctypes.c_int),
    ("ferry_queue_stream_signal", [_p, _p, _p, c_u64], ctypes.c_int),
    ("ferry_queue_stream_wait_slot", [_p, _p, _p, c_u32, c_u64], ctypes.c_int),
    ("ferry_queue_slot", [_p, c_u32, ctypes.POINTER(c_u64)], ctypes.c_int),
    ("ferry_queue_clear_slot", [_p, c_u32], ctypes.c_int),
    ("ferry_queue_free", [_p], None),
    ("ferry_queue_attach", [ctypes.c_int, ctypes.POINTER(_p)], ctypes.c_int),
    ("ferry_queue_hand_off", [_p, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
]
# Second bindings of the same functions taking arrays as bare addresses (numpy, torch): the
# typed signature above with each struct pointer as void *; test_header.py checks that too.
_ADDRESS_SIGNATURES = [
    ("ferry_queue_submit", [_p, _p, c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_poll", [_p, _p, c_size, ctypes.POINTER(c_size)], ctypes.c_int),
    ("ferry_queue_poll_wait", [_p, _p, c_size, c_size, c_u64, ctypes.POINTER(c_size)], ctypes.c_int),
]

_lib = None
_by_address: dict = {}


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = _find_library()
        lib = ctypes.CDLL(path)
        _check_abi(lib, path)
        for name, args, res in _SIGNATURES:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        for name, args, res in _ADDRESS_SIGNATURES:
            fn = lib[name]  # a new function object: the typed one above keeps its argtypes
            fn.argtypes, fn.restype = args, res
            _by_address[name] = fn
        _lib = lib
    return _lib


def _check_abi(lib: ctypes.CDLL, path: str) -> None:
    """Refuses a libferry built for another C ABI than this package's (ABI_VERSION)."""
    try:
        version_of = lib.ferry_abi_version
    except AttributeError:
        version = None
    else:
        version_of.argtypes, version_of.restype = [], c_u32
        version = version_of()
    if version != ABI_VERSION:
        found = "no ferry_abi_version (built before the ABI had a version)" if version is None else f"C ABI version {version}"
        raise FerryError(
            -1,
            f"{path} has {found}; this ferry package needs version {ABI_VERSION}: "
            "install the package and the library from one checkout (or point FERRY_LIB at a matching build)",
        )


def library_path() -> str:
    """The path of the libferry this package loads."""
    return _library()._name


def _check(code: int) -> None:
    if code != 0:
        buf = ctypes.create_string_buffer(512)
        _library().ferry_last_error(buf, len(buf))
        raise FerryError(code, buf.value.decode(errors="replace"))


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


def _geometry(obj: Any) -> tuple[int, tuple[int, ...], tuple[int, ...], int, str]:
    """(address, shape, strides in bytes, item size, device type) of a torch tensor or numpy array."""
    if _is_torch(obj):
        size = obj.element_size()
        return obj.data_ptr(), tuple(obj.shape), tuple(s * size for s in obj.stride()), size, obj.device.type
    if isinstance(obj, np.ndarray):
        return obj.__array_interface__["data"][0], obj.shape, obj.strides, obj.itemsize, "cpu"
    raise TypeError(f"expected a torch tensor or a numpy array, got {type(obj).__name__}")


def _contiguous_span(obj: Any) -> tuple[int, int, str]:
    """(address, bytes, device type) of a C-contiguous torch tensor or numpy array."""
    address, shape, strides, item, device = _geometry(obj)
    expected = item
    for n, stride in zip(reversed(shape), reversed(strides)):
        if n != 1 and stride != expected:
            raise ValueError(f"the {type(obj).__name__} is not contiguous (shape {shape}, byte strides {strides})")
        expected *= n
    return address, expected, device


def _array_of(obj: Any, dtype: np.dtype, words: int, what: str, writable: bool) -> tuple[int, int]:
    """(address, element count) of a 1-D C-contiguous numpy array of `dtype`, or of a contiguous CPU
    torch int64 tensor of shape [n, words] (the same bytes)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype != dtype or obj.ndim != 1 or not obj.flags.c_contiguous:
            raise TypeError(
                f"{what}: a 1-D contiguous numpy array of ferry.{_dtype_name(dtype)} is needed, got {obj.dtype} {obj.shape}"
            )
        if writable and not obj.flags.writeable:
            raise ValueError(f"{what}: the array is read-only")
        interface = obj.__array_interface__
        return interface["data"][0], obj.shape[0]
    if _is_torch(obj):
        import torch

        shape_ok = obj.dim() == 2 and obj.shape[1] == words
        if obj.dtype != torch.int64 or obj.device.type != "cpu" or not shape_ok or not obj.is_contiguous():
            raise TypeError(
                f"{what}: a contiguous CPU torch.int64 tensor of shape [n, {words}] is needed, "
                f"got {obj.dtype} {tuple(obj.shape)} on {obj.device}"
            )
        return obj.data_ptr(), obj.shape[0]
    raise TypeError(
        f"{what}: expected a numpy array of ferry.{_dtype_name(dtype)} or a torch int64 tensor, got {type(obj).__name__}"
    )


def _dtype_name(dtype: np.dtype) -> str:
    return "DESCRIPTOR_DTYPE" if dtype == DESCRIPTOR_DTYPE else "COMPLETION_DTYPE"


class HostBuffer:
    """Host memory allocated and registered by the engine (a sealed memfd, pinned for the GPU
    transport). `numpy()` and `torch()` show it without a copy."""

    def __init__(self, handle: ctypes.c_void_p, size: int) -> None:
        self._handle, self.size = handle, size
        self.region: int = _library().ferry_host_buffer_region(handle)
        self.address: int = _library().ferry_host_buffer_data(handle)

    def view(self) -> memoryview:
        """A writable memoryview of the whole buffer."""
        return memoryview((ctypes.c_ubyte * self.size).from_address(self.address)).cast("B")

    def numpy(self, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        """The buffer as a numpy array (no copy), of `dtype`, reshaped to `shape` when given."""
        array = np.frombuffer(self.view(), dtype=dtype)
        return array if shape is None else array.reshape(shape)

    def torch(self, dtype: Any = None, shape: Optional[Sequence[int]] = None) -> Any:
        """The buffer as a CPU torch tensor (no copy), of `dtype` (default uint8), reshaped to
        `shape` when given. Keep this HostBuffer open while the tensor is used."""
        import torch

        tensor = torch.frombuffer(self.view(), dtype=torch.uint8)
        if dtype is not None:
            tensor = tensor.view(dtype)
        return tensor if shape is None else tensor.reshape(shape)

    def blocks(self, tensor: Any, block_dim: int) -> Blocks:
        """The paged layout of `tensor` (a view of this buffer) along `block_dim`: see `Blocks.of`."""
        return Blocks.of(self, tensor, block_dim)

    def close(self) -> None:
        if self._handle:
            _library().ferry_host_buffer_free(self._handle)
            self._handle = None


class Registration:
    """A torch tensor or numpy array registered with the engine (`Engine.register`); holds a
    reference to it until `close()` deregisters the region."""

    def __init__(self, engine: Engine, region: int, address: int, size: int, obj: Any) -> None:
        self._engine, self.region, self.address, self.size, self.obj = engine, region, address, size, obj

    def blocks(self, block_dim: int, tensor: Any = None) -> Blocks:
        """The paged layout of the registered tensor (or of `tensor`, a view of it) along
        `block_dim`: see `Blocks.of`."""
        return Blocks.of(self, self.obj if tensor is None else tensor, block_dim)

    def close(self) -> None:
        """Deregisters the region (FerryError region_busy while copies use it). After the engine
        closed there is nothing left to do."""
        if self.obj is not None and self._engine._handle:
            self._engine.deregister(self.region)
        self.obj = None

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Blocks:
    """A paged KV cache's blocks in one registered region: block b's chunk c (c < chunks) is
    `chunk_bytes` at `offset + b * block_stride + c * chunk_stride` in the region.

    For a tensor [layers, 2, num_blocks, block_tokens, heads, head_dim] the block dimension is 2:
    a block is layers x 2 chunks of block_tokens x heads x head_dim elements, at the stride of
    the (layer, k/v) planes. Make one with `Blocks.of` (or `Registration.blocks`,
    `HostBuffer.blocks`); `block_descriptors` and `Queue.copy_blocks` use them."""

    region: int
    offset: int
    num_blocks: int
    block_stride: int
    chunks: int
    chunk_bytes: int
    chunk_stride: int

    @property
    def block_bytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def contiguous(self) -> bool:
        """Whether a block is one run of bytes (then it can be cut into chunks of any size)."""
        return self.chunks == 1 or self.chunk_stride == self.chunk_bytes

    @classmethod
    def of(cls, owner: Union[Registration, HostBuffer], tensor: Any, block_dim: int) -> Blocks:
        """The layout of `tensor` (a torch tensor or numpy array inside `owner`'s region) with its
        blocks along `block_dim`. The dimensions after it must be contiguous (a chunk); those
        before it must collapse into one stride (the chunks of a block)."""
        address, shape, strides, item, _ = _geometry(tensor)
        ndim = len(shape)
        if not -ndim <= block_dim < ndim:
            raise ValueError(f"block_dim {block_dim} is outside a tensor of {ndim} dimensions")
        block_dim %= ndim
        if any(s < 0 for s in strides):
            raise ValueError(f"negative strides {strides} are not supported")
        chunk_bytes = item
        for n, stride in zip(reversed(shape[block_dim + 1 :]), reversed(strides[block_dim + 1 :])):
            if n != 1 and stride != chunk_bytes:
                raise ValueError(
                    f"the dimensions after block_dim {block_dim} must be contiguous (shape {shape}, byte strides {strides})"
                )
            chunk_bytes *= n
        lead = [(n, s) for n, s in zip(shape[:block_dim], strides[:block_dim]) if n != 1]
        chunks = 1
        for n, _ in lead:
            chunks *= n
        for (_, outer), (n, inner) in zip(lead, lead[1:]):
            if outer != inner * n:
                raise ValueError(
                    f"the dimensions before block_dim {block_dim} do not collapse into one stride "
                    f"(shape {shape}, byte strides {strides})"
                )
        chunk_stride = lead[-1][1] if lead else 0
        if chunks > 1 and chunk_stride < chunk_bytes:
            raise ValueError(f"a block's chunks overlap (stride {chunk_stride} < {chunk_bytes} bytes)")
        blocks = cls(
            region=owner.region,
            offset=address - owner.address,
            num_blocks=shape[block_dim],
            block_stride=strides[block_dim],
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            chunk_stride=chunk_stride,
        )
        end = blocks.offset + (blocks.num_blocks - 1) * blocks.block_stride + (chunks - 1) * chunk_stride + chunk_bytes
        if blocks.offset < 0 or end > owner.size:
            raise ValueError(f"the tensor's blocks [{blocks.offset}, {end}) are outside the region's {owner.size} bytes")
        return blocks


def _raise_failures(done: np.ndarray, what: Callable[[int], str]) -> None:
    """Raises CopyError when a completion of `done` is not ok, naming the first (`what(i)`)."""
    bad = np.flatnonzero(done["status"] != STATUS["ok"])
    if bad.size:
        first = int(bad[0])
        status = STATUS_NAME.get(int(done["status"][first]), "unknown")
        raise CopyError(bad.size, first, status, int(done["detail"][first]), what(first))


def _block_ids(ids: Any, blocks: Blocks, what: str) -> np.ndarray:
    if _is_torch(ids):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise TypeError(f"{what}: a 1-D sequence of integer block ids is needed, got {array.dtype} {array.shape}")
    array = array.astype(np.int64, copy=False)
    if array.size:
        bad = np.flatnonzero((array < 0) | (array >= blocks.num_blocks))
        if bad.size:
            raise ValueError(f"{what}[{bad[0]}] = {array[bad[0]]} is not a block id (0 to {blocks.num_blocks - 1})")
    return array


def _chunking(src: Blocks, dst: Blocks) -> tuple[int, int, int, int]:
    """(count, len, src_stride, dst_stride) of one block's strided descriptor."""
    if src.block_bytes != dst.block_bytes:
        raise ValueError(f"a source block has {src.block_bytes} bytes, a destination block {dst.block_bytes}")
    if src.contiguous and dst.contiguous:
        return 1, src.block_bytes, 0, 0
    if src.contiguous:
        return dst.chunks, dst.chunk_bytes, dst.chunk_bytes, dst.chunk_stride
    if dst.contiguous:
        return src.chunks, src.chunk_bytes, src.chunk_stride, src.chunk_bytes
    if src.chunk_bytes == dst.chunk_bytes:
        return src.chunks, src.chunk_bytes, src.chunk_stride, dst.chunk_stride
    raise ValueError(
        f"the source's chunks ({src.chunks} x {src.chunk_bytes} bytes) and the destination's "
        f"({dst.chunks} x {dst.chunk_bytes}) differ and neither block is contiguous"
    )


def block_descriptors(src: Blocks, dst: Blocks, src_block_ids: Any, dst_block_ids: Any, tag: int = 0) -> np.ndarray:
    """One descriptor per block (strided when a block is several chunks): block
    `src_block_ids[i]` of `src` to block `dst_block_ids[i]` of `dst`, tagged `tag + i`. Ids are
    sequences, numpy arrays or torch tensors of integers; each is checked against its side's
    blocks, and a destination block may appear once."""
    s = _block_ids(src_block_ids, src, "src_block_ids")
    d = _block_ids(dst_block_ids, dst, "dst_block_ids")
    if s.size != d.size:
        raise ValueError(f"{s.size} source block ids but {d.size} destination block ids")
    if np.unique(d).size != d.size:
        raise ValueError("a destination block id appears twice: the copies would race")
    count, length, src_stride, dst_stride = _chunking(src, dst)
    if count > MAX_CHUNKS:
        raise ValueError(f"a block of {count} chunks is more than one descriptor carries ({MAX_CHUNKS})")
    out = np.zeros(s.size, DESCRIPTOR_DTYPE)
    out["tag"] = np.arange(tag, tag + s.size, dtype=np.uint64)
    out["src_region"], out["dst_region"] = src.region, dst.region
    out["src_offset"] = src.offset + s.astype(np.uint64) * np.uint64(src.block_stride)
    out["dst_offset"] = dst.offset + d.astype(np.uint64) * np.uint64(dst.block_stride)
    out["len"] = length
    if count > 1:
        out["flags"], out["count"] = FLAG_STRIDED, count
        out["src_stride"], out["dst_stride"] = src_stride, dst_stride
    return out


def gate(value: int, tag: int = 0) -> Descriptor:
    """A gate descriptor (FLAG_GATE): the queue's later descriptors start once its gate word
    (`Queue.stream_signal`, `Queue.signal`) reaches `value`; it completes "ok", or
    "gate_timeout" after the queue's gate timeout (10 s), and then the queue goes on."""
    return Descriptor(tag=tag, flags=FLAG_GATE, src_offset=value)


def notify(slot: int, value: int = 1, tag: int = 0) -> Descriptor:
    """A notification descriptor (FLAG_NOTIFY): once every descriptor pushed before it on the
    queue has completed and notification slot `slot` (below NOTIFY_SLOTS) is clear, the worker
    writes `value` (not 0) into the slot; `Queue.stream_wait_slot` waits for it on a CUDA stream
    and clears it. The copies behind it are not held. It completes "ok", or "gate_timeout" when
    the slot stayed set for the queue's gate timeout."""
    return Descriptor(tag=tag, flags=FLAG_NOTIFY, src_offset=value, dst_offset=slot)


def connect(socket: str) -> Engine:
    """The engine of the `ferry serve` daemon listening at the Unix socket `socket`: an `Engine`
    with the same calls (`new_client` is a connection; `alloc_host` and `open_queue` come from the
    daemon as memfds mapped here; descriptors and completions go through shared memory, as
    in-process; `register` of a CUDA tensor hands a daemon on the CUDA transport the tensor's
    CUDA IPC handle). Not available connected: `register` of host memory (use `alloc_host` or
    `register_memfd`), `set_sm_budget`, stream ordering (FerryError invalid_argument naming it). A daemon that dies makes the queues'
    polls raise FerryError engine_gone. FerryError system_error where no daemon answers."""
    return Engine._connected(socket)


def _stream_handle(stream: Any) -> int:
    """The CUstream of a torch.cuda.Stream (or anything with `cuda_stream` or `ptr`), an int
    handle, or None: torch's current stream."""
    if stream is None:
        import torch

        return torch.cuda.current_stream().cuda_stream
    for attribute in ("cuda_stream", "ptr"):
        if hasattr(stream, attribute):
            return int(getattr(stream, attribute))
    if isinstance(stream, int):
        return stream
    raise TypeError(f"expected a CUDA stream (torch.cuda.Stream, a handle), got {type(stream).__name__}")


class Queue:
    """The client end of a queue: submit descriptors, poll completions."""

    def __init__(self, handle: ctypes.c_void_p, engine: Optional[Engine] = None) -> None:
        self._handle = handle
        self._engine = engine
        self._n = c_size()
        self._scratch = completions(0)
        # Completions `run` took from the ring that belong to descriptors pushed before it: the
        # next poll, wait or drain hands them out first, so that none is lost.
        self._stash = completions(0)

    def submit(self, descriptors: Sequence[Descriptor]) -> int:
        """Pushes as many as fit (one publish); returns how many."""
        array = (Descriptor * len(descriptors))(*descriptors)
        _check(_library().ferry_queue_submit(self._handle, array, len(descriptors), ctypes.byref(self._n)))
        return self._n.value

    def submit_array(self, descriptors: Any) -> int:
        """Pushes as many of an array's descriptors as fit (one publish, no Python object per
        descriptor); returns how many. `descriptors`: a 1-D numpy array of DESCRIPTOR_DTYPE, or a
        contiguous CPU torch int64 tensor of shape [n, 8] holding the same bytes."""
        address, n = _array_of(descriptors, DESCRIPTOR_DTYPE, 8, "submit_array", writable=False)
        _library()
        _check(_by_address["ferry_queue_submit"](self._handle, address, n, ctypes.byref(self._n)))
        return self._n.value

    def poll(self, max_completions: int = 256) -> list[Completion]:
        """Ready completions, at most `max_completions`; never blocks."""
        out = completions(max_completions)
        got = self.poll_into(out)
        return [Completion.from_buffer_copy(out[i].tobytes()) for i in range(got)]

    def _unstash(self, address: int, n: int) -> int:
        """Moves up to `n` stashed completions to `address`; returns how many."""
        k = min(n, self._stash.size)
        if k:
            ctypes.memmove(address, self._stash.ctypes.data, k * COMPLETION_DTYPE.itemsize)
            self._stash = self._stash[k:].copy()
        return k

    def poll_into(self, out: Any) -> int:
        """Writes ready completions into `out` (a preallocated 1-D numpy array of COMPLETION_DTYPE,
        or a CPU torch int64 tensor of shape [n, 4]); returns how many. Never blocks."""
        address, n = _array_of(out, COMPLETION_DTYPE, 4, "poll_into", writable=True)
        k = self._unstash(address, n)
        if k == n:
            return k
        _library()
        size = COMPLETION_DTYPE.itemsize
        _check(_by_address["ferry_queue_poll"](self._handle, address + k * size, n - k, ctypes.byref(self._n)))
        return k + self._n.value

    def wait_into(self, out: Any, at_least: int, timeout: float = 10.0) -> int:
        """Like `poll_into`, but waits until at least `at_least` completions are in `out` (at most
        its length) or `timeout` seconds passed; returns how many, fewer only after the
        timeout. The wait spins inside libferry with the GIL released: other Python threads
        (the server's own) run meanwhile."""
        address, n = _array_of(out, COMPLETION_DTYPE, 4, "wait_into", writable=True)
        k = self._unstash(address, n)
        if k >= min(at_least, n):
            return k
        return k + self._wait_ring(address + k * COMPLETION_DTYPE.itemsize, n - k, min(at_least, n) - k, timeout)

    def _wait_ring(self, address: int, n: int, at_least: int, timeout: float) -> int:
        """ferry_queue_poll_wait into `n` completions at `address`, the stash left alone."""
        _library()
        nanos = max(0, int(timeout * 1e9))
        wait = _by_address["ferry_queue_poll_wait"]
        _check(wait(self._handle, address, n, at_least, nanos, ctypes.byref(self._n)))
        return self._n.value

    def wait(self, count: int, timeout: float = 10.0) -> list[Completion]:
        """Polls until `count` completions arrived; raises TimeoutError after `timeout` seconds."""
        got: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got.extend(self.poll(count - len(got)))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} completions after {timeout} s")
        return got

    def run(self, descriptors: np.ndarray, timeout: float = 10.0) -> np.ndarray:
        """Submits every descriptor of the array, as the ring makes room, and returns their
        completions (COMPLETION_DTYPE, in order; statuses not checked: see `copy_blocks`).
        Completions of descriptors pushed before (a gated `push_blocks`, say) that come back
        meanwhile are kept for the next poll, wait or drain. Raises TimeoutError when they are
        not all back within `timeout` seconds."""
        n = len(descriptors)
        if self._scratch.size < n:
            self._scratch = completions(n)
        out = self._scratch[:n]
        first = self.pushed  # the seq of the first descriptor of this run
        pushed = done = 0
        size = COMPLETION_DTYPE.itemsize
        deadline = time.monotonic() + timeout
        while done < n:
            if pushed < n:
                pushed += self.submit_array(descriptors[pushed:])
                if pushed == done:
                    continue
            # All pushed: wait for the rest inside libferry (the GIL released); else for one, so
            # that the ring makes room.
            want = n - done if pushed == n else 1
            got = self._wait_ring(out.ctypes.data + done * size, n - done, want, deadline - time.monotonic())
            mine = out[done:done + got]
            earlier = mine["seq"] < first  # in seq order: these all come before this run's
            if earlier.any():
                self._stash = np.concatenate([self._stash, mine[earlier]])
                keep = mine[~earlier].copy()
                out[done:done + keep.size] = keep
                got = keep.size
                want = 0  # those were not ours: look again
            done += got
            if got < want:
                raise TimeoutError(f"{done} of {n} completions after {timeout} s ({pushed} pushed)")
        return out

    def copy_blocks(self, src: Blocks, dst: Blocks, src_block_ids: Any, dst_block_ids: Any, timeout: float = 10.0) -> int:
        """Copies block `src_block_ids[i]` of `src` to block `dst_block_ids[i]` of `dst` for every
        i, one strided descriptor per block (`block_descriptors`), and returns when all are done;
        raises CopyError when any failed (naming the first), TimeoutError after `timeout`
        seconds. Nothing else may be in flight on the queue (see `run`). Returns the number of
        descriptors."""
        descs = block_descriptors(src, dst, src_block_ids, dst_block_ids)
        done = self.run(descs, timeout)
        _raise_failures(done, lambda i: f"block {src_block_ids[i]} -> {dst_block_ids[i]} (index {i})")
        return len(descs)

    @property
    def watermark(self) -> int:
        """How many of the queue's descriptors have their completion published."""
        return _library().ferry_queue_watermark(self._handle)

    @property
    def pushed(self) -> int:
        """How many descriptors this end has pushed: the watermark of everything pushed so far."""
        return _library().ferry_queue_pushed(self._handle)

    def signal(self, value: int) -> None:
        """Sets the queue's gate word from the CPU: a gate (`ferry.gate(v)`, v <= value) opens."""
        _check(_library().ferry_queue_signal(self._handle, value))

    def stream_wait(self, stream: Any = None, watermark: Optional[int] = None) -> None:
        """Enqueues on a CUDA stream (a torch.cuda.Stream, a raw handle, or None for torch's
        current stream) a wait, on the GPU, until the descriptors below `watermark` (default:
        everything pushed so far) have finished their copies (the queue's landed word, written by
        the CUDA transport's stream right behind them): kernels enqueued after it see every byte those
        descriptors copied, and the CPU does not wait. Keep polling completions now and then
        (they report errors, and a full completion ring holds the queue). Captured in a CUDA
        graph, the wait keeps its value: a replay waits for the same watermark again. Needs
        transport="gpu" with a CUDA driver and a GPU with 64-bit stream memory operations
        (FerryError invalid_argument naming what is missing). Run every kernel that follows the
        wait once before (a warm-up), or set CUDA_MODULE_LOADING=EAGER: a kernel's lazy first
        load behind an unpassed wait can hang; and keep torch's CPU threads off the engine's
        worker core (torch.set_num_threads), which delays completions when shared."""
        target = self.pushed if watermark is None else watermark
        engine = self._engine_handle("stream_wait")
        _check(_library().ferry_queue_stream_wait(engine, self._handle, _stream_handle(stream), target))

    def stream_signal(self, stream: Any, value: int) -> None:
        """Enqueues on a CUDA stream (as in `stream_wait`) a write of `value` into the queue's
        gate word, after the stream's earlier work: a gate `ferry.gate(v)` with v <= value then
        opens, and the copies behind it see what that work wrote (a D2H of a block the forward
        pass has just written, say). Values should grow from one signal to the next."""
        engine = self._engine_handle("stream_signal")
        _check(_library().ferry_queue_stream_signal(engine, self._handle, _stream_handle(stream), value))

    def stream_wait_slot(self, stream: Any, slot: int, value: int = 1) -> None:
        """Enqueues on a CUDA stream (as in `stream_wait`) a wait until notification slot `slot`
        holds `value` (`ferry.notify(slot, value)` wrote it: everything pushed before that
        notification has completed), then a write clearing the slot for the next one. The same
        two operations every time, so a captured CUDA graph replays them: push a step's copies
        and its notifications, then replay the graph (`push_blocks(..., notify=slot)`)."""
        engine = self._engine_handle("stream_wait_slot")
        _check(_library().ferry_queue_stream_wait_slot(engine, self._handle, _stream_handle(stream), slot, value))

    def slot(self, slot: int) -> int:
        """Notification slot `slot` as it is now (0: clear)."""
        value = c_u64()
        _check(_library().ferry_queue_slot(self._handle, slot, ctypes.byref(value)))
        return value.value

    def clear_slot(self, slot: int) -> None:
        """Clears notification slot `slot` from the CPU (a stream clears it in `stream_wait_slot`)."""
        _check(_library().ferry_queue_clear_slot(self._handle, slot))

    def push_blocks(self, src: Blocks, dst: Blocks, src_block_ids: Any, dst_block_ids: Any,
                    gate: Optional[int] = None, notify: Optional[int] = None) -> int:
        """Pushes one strided descriptor per block (`block_descriptors`), behind a gate waiting
        for `gate` when given, followed by a notification for slot `notify` (value 1) when given,
        and returns the watermark they complete at, for `stream_wait`;
        it does not wait. First takes the completions already back, raising CopyError for a
        failed one. All must fit in the submission ring at once (ValueError otherwise)."""
        self.drain()
        descs = block_descriptors(src, dst, src_block_ids, dst_block_ids)
        if gate is not None or notify is not None:
            first = 0 if gate is None else 1
            framed = descriptors(len(descs) + first + (notify is not None))
            if gate is not None:
                framed[0]["flags"], framed[0]["src_offset"] = FLAG_GATE, gate
            framed[first:first + len(descs)] = descs
            if notify is not None:
                framed[-1]["flags"], framed[-1]["src_offset"], framed[-1]["dst_offset"] = FLAG_NOTIFY, 1, notify
            descs = framed
        pushed = self.submit_array(descs)
        if pushed != len(descs):
            raise ValueError(f"only {pushed} of {len(descs)} descriptors fit in the submission ring (the rest were "
                             "pushed: poll and push the rest with submit_array, or open the queue with a larger ring)")
        return self.pushed

    def drain(self) -> int:
        """Takes every completion already back without waiting; raises CopyError for the first
        that failed (a gate's timeout included). Returns how many it took."""
        total = 0
        while True:
            if self._scratch.size < 1024:
                self._scratch = completions(1024)
            got = self.poll_into(self._scratch)
            done = self._scratch[:got]
            _raise_failures(done, lambda i: f"seq {int(done['seq'][i])}")
            total += got
            if got < self._scratch.size:
                return total

    def _engine_handle(self, what: str) -> ctypes.c_void_p:
        if self._engine is None or not self._engine._handle:
            raise FerryError(RESULT["invalid_argument"], f"{what} needs the queue's engine in this process (an attached queue has none)")
        return self._engine._handle

    @classmethod
    def attach(cls, fd: int) -> Queue:
        """The client end of a queue whose memfd `fd` another process handed off (see
        `hand_off`); the header is checked and the end claimed."""
        handle = ctypes.c_void_p()
        _check(_library().ferry_queue_attach(fd, ctypes.byref(handle)))
        return cls(handle)

    def hand_off(self) -> int:
        """Passes the queue on: releases this end without closing the queue and returns a new
        file descriptor of its memfd (the caller owns it) for another process's `Queue.attach`.
        This object is unusable afterwards."""
        handle, self._handle = self._handle, None
        fd = ctypes.c_int(-1)
        _check(_library().ferry_queue_hand_off(handle, ctypes.byref(fd)))
        return fd.value

    def close(self) -> None:
        if self._handle:
            _library().ferry_queue_free(self._handle)
            self._handle = None


class Engine:
    """A running engine; `close()` (or leaving a `with` block) shuts it down.

    transport: "host" (CPU copies), "null" (no data moves) or "gpu" (host <-> GPU: over the NIC
    or with the CUDA driver, as `use_gdr` says: "auto", "off" or "on"). GPU settings: `device`
    (CUDA ordinal), `all_gpus` (True: every GPU, each with `workers` workers of its own; GPU g's
    workers are g * workers to (g + 1) * workers - 1, `open_queue(gpu=g)` picks them; any queue may
    name any GPU's memory), `strategy` ("auto", "memcpy", "batch", "kernel", "resident": experimental,
    a kernel that stays on the budget's SMs while blocks come and ends 200 us after the last (or
    after 20 ms, then launched again), so torch.cuda.synchronize() and a kernel's first (lazy) load
    wait that long at most behind it), `sm_budget` (the most SMs
    the copy kernel may use, in total over the engine's workers, each getting an equal share,
    capped at the GPU's SM count; SM_BUDGET_ALL: every SM; SM_BUDGET_NONE: no SM, the copy engine
    alone; 0: the default, 2 SMs; a budget below `workers` fails at start with
    RESULT["invalid_argument"]; `set_sm_budget` changes it while the engine runs), `copy_engine_from`
    (the "auto" strategy's crossover: batches whose mean block has at least this many bytes go to
    the copy engine, smaller ones to the copy kernel; one int for both directions or a pair
    (host to GPU, GPU to host); 0: the default measured on the H200, 64 KiB each way; on an idle
    GPU the kernel can be faster at 64 KiB, under a compute load it starves), `resident_life`
    (seconds one launch of the resident copy kernel takes new blocks before it is launched again:
    the longest torch.cuda.synchronize() waits behind an engine that is never idle; 0: the
    default, 0.02; from 0.001 to 1, else FerryError invalid_argument at start), `resident_writers`
    (the resident kernel's writer gate: at most this many of each worker's resident-kernel warps
    copy GPU-to-host blocks at once, since SM stores to host memory slow a compute load beside
    them far more than the SMs they use; 0: the defaults, 16 for blocks below 16 KiB and 12 from
    16 KiB up; any other value: that gate for every size; above the kernel's warps, 32 per SM of
    the budget: ungated), `nic` (RDMA device
    name; None: the topology plan's). As in ferry_config, 0 in `max_len` or `workers` means the
    default.
    """

    def __init__(self, workers: int = 1, transport: str = "host", pinned: bool = True, max_len: int = 0,
                 device: int = 0, strategy: str = "auto", sm_budget: int = 0, use_gdr: str = "auto",
                 nic: Optional[str] = None, all_gpus: bool = False,
                 copy_engine_from: Union[int, Tuple[int, int]] = 0, resident_life: float = 0,
                 resident_writers: int = 0) -> None:
        crossover = copy_engine_from if isinstance(copy_engine_from, (tuple, list)) else (copy_engine_from,) * 2
        if len(crossover) != 2 or not all(type(v) is int and 0 <= v < 1 << 64 for v in crossover):
            raise ValueError(f"copy_engine_from: a byte count from 0 to 2**64 - 1, or a pair of them; got {copy_engine_from!r}")
        if type(resident_life) not in (int, float) or not 0 <= resident_life < 2**44:
            raise ValueError(f"resident_life: seconds (0: the default), a non-negative number; got {resident_life!r}")
        if type(resident_writers) is not int or not 0 <= resident_writers < 1 << 32:
            raise ValueError(f"resident_writers: a warp count from 0 (the default) to 2**32 - 1; got {resident_writers!r}")
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
            all_gpus=1 if all_gpus else 0,
            copy_engine_from_h2d=crossover[0],
            copy_engine_from_d2h=crossover[1],
            resident_life_us=round(resident_life * 1e6),
            resident_writers=resident_writers,
        )
        handle = ctypes.c_void_p()
        _check(_library().ferry_engine_start(ctypes.byref(config), ctypes.byref(handle)))
        self._handle = handle

    @classmethod
    def _connected(cls, socket: str) -> Engine:
        engine = cls.__new__(cls)
        handle = ctypes.c_void_p()
        _check(_library().ferry_engine_connect(os.fsencode(socket), ctypes.byref(handle)))
        engine._handle = handle
        return engine

    def new_client(self) -> int:
        """A new client id (connected to a daemon: a new connection, its client)."""
        out = c_u32()
        _check(_library().ferry_engine_new_client(self._handle, ctypes.byref(out)))
        return out.value

    def alloc_host(self, client: int, size: int) -> HostBuffer:
        out = ctypes.c_void_p()
        _check(_library().ferry_host_alloc(self._handle, client, size, ctypes.byref(out)))
        return HostBuffer(out, size)

    def shared_client(self, name: str) -> int:
        """The client of the pool named `name` (1 to 64 of A-Za-z0-9._-): every caller naming it
        gets the same client and so shares its regions. Connected to a daemon (`ferry.connect`),
        the processes that name it share the pool's host memory: one allocates, the others
        `map_host` the region id it passes along; the regions live until the last member has
        gone (replicas sharing a CPU KV pool)."""
        out = c_u32()
        _check(_library().ferry_engine_shared_client(self._handle, name.encode(), ctypes.byref(out)))
        return out.value

    def register_memfd(self, client: int, fd: int) -> HostBuffer:
        """Registers for `client` the memory of `fd`, a memfd of this process sealed against
        shrinking and growing (os.memfd_create with MFD_ALLOW_SEALING, os.ftruncate, then
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)); returns it
        mapped as a HostBuffer. The caller keeps `fd`. Connected to a daemon, the daemon
        registers it and both processes share its bytes."""
        out = ctypes.c_void_p()
        _check(_library().ferry_host_register_memfd(self._handle, client, fd, ctypes.byref(out)))
        return HostBuffer(out, _library().ferry_host_buffer_len(out))

    def map_host(self, client: int, region: int) -> HostBuffer:
        """Connected to a daemon: maps `client`'s region `region` (one another member of its pool
        allocated) here. FerryError invalid_argument on an engine in this process."""
        out = ctypes.c_void_p()
        _check(_library().ferry_host_map(self._handle, client, region, ctypes.byref(out)))
        return HostBuffer(out, _library().ferry_host_buffer_len(out))

    def deregister(self, region: int) -> None:
        _check(_library().ferry_deregister(self._handle, region))

    def set_sm_budget(self, sm_budget: int) -> None:
        """Changes the copy kernel's SM budget while the engine runs (a total over the workers;
        SM_BUDGET_NONE while the forward pass needs every SM, a count or SM_BUDGET_ALL when the
        GPU has room). 0 is refused here. Needs transport="gpu" with a CUDA driver."""
        _check(_library().ferry_engine_set_sm_budget(self._handle, sm_budget))

    def register(self, client: int, obj: Any) -> Registration:
        """Registers a contiguous torch tensor or numpy array for `client`: a CUDA tensor as GPU
        memory (transport="gpu", the engine's device), a CPU tensor or array as host memory
        (pinned by the GPU transport unless it is already, as with `pin_memory()`). The
        Registration keeps the object alive until it is closed."""
        address, size, device = _contiguous_span(obj)
        if size == 0:
            raise ValueError("cannot register an empty tensor")
        if device == "cuda":
            region = self.register_gpu(client, address, size)
        elif device == "cpu":
            out = c_u32()
            _check(_library().ferry_register_host(self._handle, client, address, size, ctypes.byref(out)))
            region = out.value
        else:
            raise ValueError(f"cannot register memory on a {device} device")
        return Registration(self, region, address, size, obj)

    def register_gpu(self, client: int, device_ptr: int, size: int) -> int:
        """Registers `size` bytes of GPU memory at device address `device_ptr` (for example
        `tensor.data_ptr()` of a CUDA tensor); returns the region id. Needs transport="gpu"."""
        out = c_u32()
        _check(_library().ferry_register_gpu(self._handle, client, device_ptr, size, ctypes.byref(out)))
        return out.value

    @property
    def transport(self) -> str:
        """The transport as text ("gdr on mlx5_0", "cuda", "host"), with why where it was a choice."""
        lib = _library()
        n = lib.ferry_engine_transport(self._handle, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.ferry_engine_transport(self._handle, buf, len(buf))
        return buf.value.decode(errors="replace")

    def stats(self, worker: int = 0) -> WorkerStats:
        """Worker `worker`'s counters (WorkerStats)."""
        out = WorkerStats()
        _check(_library().ferry_engine_stats(self._handle, worker, ctypes.byref(out)))
        return out

    def open_queue(self, client: int, submit_capacity: int = 0, complete_capacity: int = 0,
                   worker: Optional[int] = None, gate_timeout: Optional[float] = None,
                   close_if_client_dies: bool = False, gpu: Optional[int] = None) -> Queue:
        """A queue for `client`: ring capacities (powers of two; 0: 4096), the worker serving it
        (None: the least loaded), how long a gate holds it before timing out (seconds; None:
        10 s), whether the worker closes it when the process holding its client end dies, and on
        an engine over every GPU (all_gpus=True) the GPU whose workers serve it (None: any)."""
        config = _QueueConfig(
            submit_capacity=submit_capacity,
            complete_capacity=complete_capacity,
            gate_timeout_ns=0 if gate_timeout is None else max(1, int(gate_timeout * 1e9)),
            worker=0 if worker is None else worker + 1,
            close_if_client_dies=1 if close_if_client_dies else 0,
            gpu=0 if gpu is None else gpu + 1,
        )
        out = ctypes.c_void_p()
        _check(_library().ferry_queue_open_with(self._handle, client, ctypes.byref(config), ctypes.byref(out)))
        return Queue(out, self)

    def close(self) -> None:
        if self._handle:
            _library().ferry_engine_free(self._handle)
            self._handle = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
