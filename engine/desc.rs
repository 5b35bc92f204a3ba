//! Wire types shared with clients: [`Descriptor`] (client to engine), [`Completion`] (engine to
//! client) and a queue's [`QueueState`] code, and the validation that turns an untrusted
//! descriptor into a copy.
//!
//! Both types live in shared memory, so any bit pattern can arrive: they are `#[repr(C)]`,
//! fixed size, hold no pointers, no `bool` and no enums, and are decoded with checks.

use bytemuck::{Pod, Zeroable};

/// Flag: start this descriptor only after every earlier descriptor of its queue has completed.
pub const FLAG_FENCE: u32 = 1 << 0;
/// Flag: the descriptor moves `count` chunks of `len` bytes, chunk `i` from `src_offset + i *
/// src_stride` to `dst_offset + i * dst_stride` (one logical KV block of `layers x 2` chunks at a
/// fixed stride, say); its completion covers them all.
pub const FLAG_STRIDED: u32 = 1 << 1;
/// Flag: a gate, which moves nothing: the queue's later descriptors start only once the queue's
/// gate word (written by a CUDA stream or the client's CPU) reaches this descriptor's
/// `src_offset`; its completion says when (`Ok`) or that the queue's gate timeout passed first
/// ([`Status::GateTimeout`]). Every field but `tag`, `flags` and `src_offset` must be 0.
pub const FLAG_GATE: u32 = 1 << 2;
/// Flag: a notification, which moves nothing: once every earlier descriptor of the queue has
/// its completion published and the queue's notification slot `dst_offset` (below
/// [`NOTIFY_SLOTS`]) reads 0, the worker writes `src_offset` (not 0) into that slot and completes
/// it `Ok` (or [`Status::GateTimeout`] when the slot stayed set for the queue's gate timeout; the
/// queue then goes on). A CUDA stream waits for it and clears the slot
/// (`Engine::stream_wait_slot`): the same two stream operations every time, so a captured CUDA
/// graph replays them unchanged. An earlier descriptor that failed counts as completed (its
/// completion says how): the slot is written all the same, so a waiting stream never hangs on
/// a failure. Every field but `tag`, `flags` (a fence too), `src_offset` and `dst_offset` must
/// be 0.
pub const FLAG_NOTIFY: u32 = 1 << 3;
/// Every flag this ABI version knows; any other bit set is [`Status::ReservedFlags`].
pub const KNOWN_FLAGS: u32 = FLAG_FENCE | FLAG_STRIDED | FLAG_GATE | FLAG_NOTIFY;
/// How many notification slots a queue has ([`FLAG_NOTIFY`]).
pub const NOTIFY_SLOTS: u32 = 64;
/// The most chunks one strided descriptor may move.
pub const MAX_CHUNKS: u32 = 1 << 12;
// The worker counts a descriptor's chunks in 16 bits, and statuses in 8.
const _: () = assert!(MAX_CHUNKS <= u16::MAX as u32);

/// One copy request: `len` bytes from (`src_region`, `src_offset`) to (`dst_region`,
/// `dst_offset`), or with [`FLAG_STRIDED`] `count` such chunks at strides. The direction follows
/// from the regions' kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Descriptor {
    /// Caller's tag, returned unchanged in the completion.
    pub tag: u64,
    /// Source region id (see [`crate::RegionId`]).
    pub src_region: u32,
    /// Destination region id.
    pub dst_region: u32,
    /// Byte offset into the source region.
    pub src_offset: u64,
    /// Byte offset into the destination region.
    pub dst_offset: u64,
    /// Bytes to copy; at least 1 and at most the engine's configured maximum.
    pub len: u64,
    /// `FLAG_*` bits; unknown bits are rejected.
    pub flags: u32,
    /// With [`FLAG_STRIDED`]: chunks to move (1 to [`MAX_CHUNKS`]); else 0.
    pub count: u32,
    /// With [`FLAG_STRIDED`]: bytes from one source chunk's start to the next's; else 0.
    pub src_stride: u64,
    /// With [`FLAG_STRIDED`]: bytes from one destination chunk's start to the next's (at least
    /// `len`: chunks must not overlap); else 0.
    pub dst_stride: u64,
}

/// The result of one descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Completion {
    /// The descriptor's tag.
    pub tag: u64,
    /// The descriptor's position in its queue: 0 for the first descriptor pushed.
    pub seq: u64,
    /// Bytes moved: the descriptor's length on success, 0 otherwise.
    pub bytes: u64,
    /// A [`Status`] code; decode with [`Completion::status`].
    pub status: u32,
    /// Transport-specific detail for a failure (for example an errno or a verbs status), else 0.
    pub detail: u32,
}

// The ABI: these sizes are part of the shared-memory layout (checked again on attach).
const _: () = assert!(std::mem::size_of::<Descriptor>() == 64);
const _: () = assert!(std::mem::align_of::<Descriptor>() == 8);
const _: () = assert!(std::mem::size_of::<Completion>() == 32);
const _: () = assert!(std::mem::align_of::<Completion>() == 8);

/// A registered region's id: table index in the low 16 bits, a generation in the high 16, so
/// an id that was deregistered never names the slot's next region. 0 is never valid.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct RegionId(pub u32);

impl RegionId {
    /// Builds an id from a table index and a generation.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn new(index: u16, generation: u16) -> RegionId {
        RegionId(u32::from(generation) << 16 | u32::from(index))
    }

    /// Table index.
    pub fn index(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    /// Generation of the slot when the region was registered.
    pub fn generation(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

impl std::fmt::Display for RegionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "region {}#{}", self.index(), self.generation())
    }
}

/// Outcome of a descriptor. `Ok` is 0; every failure has its own code.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Copied.
    Ok = 0,
    /// A region id names no registered region (never registered, or deregistered).
    UnknownRegion = 1,
    /// A region belongs to another client than the queue's.
    NotOwner = 2,
    /// `offset + len` runs past the end of a region, or overflows.
    OutOfBounds = 3,
    /// `len` is 0.
    ZeroLength = 4,
    /// `len` is over the engine's `max_len`.
    TooLong = 5,
    /// Source and destination ranges overlap inside one region.
    Overlap = 6,
    /// Unknown flag bits or non-zero reserved fields.
    ReservedFlags = 7,
    /// The transport failed the copy; `detail` says more.
    TransportFailed = 8,
    /// The engine shut down before the copy started.
    Cancelled = 9,
    /// No transport of this engine can copy between these kinds of memory.
    Unsupported = 10,
    /// [`FLAG_STRIDED`] with `count` 0.
    ZeroCount = 11,
    /// [`FLAG_STRIDED`] with `count` over [`MAX_CHUNKS`].
    TooManyChunks = 12,
    /// [`FLAG_STRIDED`] with destination chunks that overlap each other (`dst_stride < len`).
    ChunksOverlap = 13,
    /// A [`FLAG_GATE`] whose value the gate word did not reach, or a [`FLAG_NOTIFY`] whose slot
    /// was not cleared, within the queue's gate timeout; the queue's later descriptors went on.
    GateTimeout = 14,
}

impl Status {
    /// Every status, in code order.
    pub fn all() -> [Status; 15] {
        ALL_STATUSES
    }

    /// Decodes a code read from shared memory.
    pub fn from_code(code: u32) -> Option<Status> {
        ALL_STATUSES.get(code as usize).copied()
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Every status, in code order (a function above rather than an associated constant: the C
/// header generator would export that constant).
const ALL_STATUSES: [Status; 15] = [
    Status::Ok,
    Status::UnknownRegion,
    Status::NotOwner,
    Status::OutOfBounds,
    Status::ZeroLength,
    Status::TooLong,
    Status::Overlap,
    Status::ReservedFlags,
    Status::TransportFailed,
    Status::Cancelled,
    Status::Unsupported,
    Status::ZeroCount,
    Status::TooManyChunks,
    Status::ChunksOverlap,
    Status::GateTimeout,
];

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Status::Ok => "ok",
            Status::UnknownRegion => "unknown region",
            Status::NotOwner => "region not owned by the queue's client",
            Status::OutOfBounds => "range out of bounds",
            Status::ZeroLength => "zero length",
            Status::TooLong => "length over the configured maximum",
            Status::Overlap => "source and destination overlap",
            Status::ReservedFlags => "reserved flag bits or fields set",
            Status::TransportFailed => "transport failed",
            Status::Cancelled => "cancelled by shutdown",
            Status::Unsupported => "no transport for these memory kinds",
            Status::ZeroCount => "strided with zero chunks",
            Status::TooManyChunks => "strided with more chunks than the maximum",
            Status::ChunksOverlap => "strided destination chunks overlap",
            Status::GateTimeout => {
                "the gate did not open (or the notification slot was not cleared) within the queue's gate timeout"
            }
        };
        f.write_str(text)
    }
}

impl Descriptor {
    /// A copy of `len` bytes, tag 0, no flags.
    pub fn copy(src_region: RegionId, src_offset: u64, dst_region: RegionId, dst_offset: u64, len: u64) -> Descriptor {
        Descriptor {
            src_region: src_region.0,
            dst_region: dst_region.0,
            src_offset,
            dst_offset,
            len,
            ..Descriptor::default()
        }
    }

    /// Sets the caller's tag.
    pub fn with_tag(mut self, tag: u64) -> Descriptor {
        self.tag = tag;
        self
    }

    /// Makes it strided ([`FLAG_STRIDED`]): `count` chunks of its `len` bytes, the source ones
    /// `src_stride` bytes apart, the destination ones `dst_stride` apart.
    pub fn strided(mut self, count: u32, src_stride: u64, dst_stride: u64) -> Descriptor {
        self.flags |= FLAG_STRIDED;
        (self.count, self.src_stride, self.dst_stride) = (count, src_stride, dst_stride);
        self
    }

    /// A gate ([`FLAG_GATE`]): the queue's later descriptors start once its gate word reaches
    /// `value`.
    pub fn gate(value: u64) -> Descriptor {
        Descriptor { flags: FLAG_GATE, src_offset: value, ..Descriptor::default() }
    }

    /// A notification ([`FLAG_NOTIFY`]): once every earlier descriptor of the queue has
    /// completed and notification slot `slot` is clear, `value` is written into it.
    pub fn notify(slot: u32, value: u64) -> Descriptor {
        Descriptor { flags: FLAG_NOTIFY, src_offset: value, dst_offset: slot.into(), ..Descriptor::default() }
    }

    /// Whether [`FLAG_NOTIFY`] is set.
    pub fn is_notify(&self) -> bool {
        self.flags & FLAG_NOTIFY != 0
    }

    /// Whether [`FLAG_GATE`] is set.
    pub fn is_gate(&self) -> bool {
        self.flags & FLAG_GATE != 0
    }

    /// Adds [`FLAG_FENCE`].
    pub fn fenced(mut self) -> Descriptor {
        self.flags |= FLAG_FENCE;
        self
    }

    /// Whether [`FLAG_FENCE`] is set.
    pub fn is_fence(&self) -> bool {
        self.flags & FLAG_FENCE != 0
    }
}

impl Completion {
    /// Decodes the status code; `Err(code)` for a code this version does not know.
    pub fn status(&self) -> Result<Status, u32> {
        Status::from_code(self.status).ok_or(self.status)
    }

    /// Whether the copy succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok.code()
    }
}

/// Whether a queue is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueState {
    /// A worker serves it.
    Open,
    /// The engine shut down; no more completions will come.
    Closed,
    /// A ring index was corrupt; the worker stopped serving the queue.
    Broken,
    /// Its client closed it ([`crate::Queue::close`] or dropping the [`crate::Queue`]); the
    /// worker frees it once the copies it started are done. It cannot be attached again.
    ClosedByClient,
}

impl std::fmt::Display for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueState::Open => "open",
            QueueState::Closed => "closed (the engine shut down)",
            QueueState::Broken => "broken (a ring index was corrupt)",
            QueueState::ClosedByClient => "closed by its client (open a new queue)",
        })
    }
}

impl QueueState {
    pub(crate) fn code(self) -> u32 {
        match self {
            QueueState::Open => 0,
            QueueState::Closed => 1,
            QueueState::Broken => 2,
            QueueState::ClosedByClient => 3,
        }
    }

    pub(crate) fn from_code(code: u32) -> QueueState {
        match code {
            0 => QueueState::Open,
            1 => QueueState::Closed,
            3 => QueueState::ClosedByClient,
            // Anything else was written by a misbehaving peer: treat as broken.
            _ => QueueState::Broken,
        }
    }
}

/// An end of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueEnd {
    /// The client's end ([`crate::Queue`]): produces descriptors, consumes completions.
    Client,
    /// The worker's end: consumes descriptors, produces completions.
    Worker,
}

impl std::fmt::Display for QueueEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueEnd::Client => "client",
            QueueEnd::Worker => "worker",
        })
    }
}

/// What validation needs to know of a region. Made by the region table, or by
/// [`RegionView::new`], whose caller vouches for the memory: a [`ValidCopy`] validated against
/// it carries its addresses to a transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionView {
    /// Address of the first byte in this process.
    pub(crate) base: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// Owning client.
    pub(crate) owner: u32,
    /// Memory kind code (see [`crate::MemoryKind`]).
    pub(crate) kind: u32,
    /// The NIC's local key for the region (GDR transport; 0 otherwise).
    pub(crate) lkey: u32,
    /// The NIC's remote key for the region (GDR transport; 0 otherwise).
    pub(crate) rkey: u32,
}

impl RegionView {
    /// A region of `len` bytes at `base`, owned by client `owner`, of memory kind code `kind`,
    /// with the NIC's keys (0 without a NIC).
    ///
    /// # Safety
    /// `[base, base + len)` must be memory that every transport given copies validated against
    /// this view may read and write, for as long as those copies are in flight.
    pub unsafe fn new(base: u64, len: u64, owner: u32, kind: u32, lkey: u32, rkey: u32) -> RegionView {
        RegionView { base, len, owner, kind, lkey, rkey }
    }
}

/// One side of a validated copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub(crate) region: u32,
    pub(crate) kind: u32,
    pub(crate) addr: u64,
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
}

impl Endpoint {
    /// One side of a copy: region id (as in the descriptor), memory kind code, the address of
    /// the first byte in this process, and the NIC's keys (0 without a NIC). Only a
    /// [`ValidCopy`] gives it meaning; see [`ValidCopy::new_unchecked`].
    pub fn new(region: u32, kind: u32, addr: u64, lkey: u32, rkey: u32) -> Endpoint {
        Endpoint { region, kind, addr, lkey, rkey }
    }

    /// Region id as it appeared in the descriptor.
    pub fn region(&self) -> u32 {
        self.region
    }

    /// Memory kind code of the region (see [`crate::MemoryKind`]).
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// Address of the first byte, in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The NIC's local key for the region (GDR transport; 0 otherwise).
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The NIC's remote key for the region (GDR transport; 0 otherwise).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
}

/// A descriptor that passed validation: transports copy `len` bytes from `src.addr()` to
/// `dst.addr()` on its word. Made only by [`validate`] (against region views the table, or an
/// `unsafe` caller, vouched for) or by [`ValidCopy::new_unchecked`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidCopy {
    pub(crate) src: Endpoint,
    pub(crate) dst: Endpoint,
    pub(crate) len: u64,
}

impl ValidCopy {
    /// A copy of `len` bytes from `src` to `dst`, unchecked.
    ///
    /// # Safety
    /// `len` bytes at `src.addr()` must be readable, and at `dst.addr()` writable, by the
    /// transport that is given this copy (the CPU, the GPU or the NIC, with the keys given),
    /// until the transport reports it done; the two ranges must not overlap.
    pub unsafe fn new_unchecked(src: Endpoint, dst: Endpoint, len: u64) -> ValidCopy {
        ValidCopy { src, dst, len }
    }

    /// Source.
    pub fn src(&self) -> Endpoint {
        self.src
    }

    /// Destination.
    pub fn dst(&self) -> Endpoint {
        self.dst
    }

    /// Bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the copy moves no bytes (never true of a validated one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A descriptor that passed validation: its first chunk, and how its others follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validated {
    first: ValidCopy,
    chunks: u32,
    src_stride: u64,
    dst_stride: u64,
}

impl Validated {
    /// The first chunk (the whole copy of a plain descriptor).
    #[inline]
    pub fn first(&self) -> &ValidCopy {
        &self.first
    }

    /// Chunks: 1, or a strided descriptor's `count`.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Chunk `i` (below [`Validated::chunks`]) as a copy of its own. Every chunk lies inside the
    /// regions: validation checked the last one's end.
    pub fn chunk(&self, i: u32) -> ValidCopy {
        debug_assert!(i < self.chunks, "chunk {i} of {}", self.chunks);
        let i = u64::from(i.min(self.chunks - 1));
        let mut copy = self.first;
        copy.src.addr += i * self.src_stride;
        copy.dst.addr += i * self.dst_stride;
        copy
    }

    /// Bytes of all chunks.
    pub fn bytes(&self) -> u64 {
        self.first.len * u64::from(self.chunks)
    }
}

/// A strided descriptor's own checks: count, chunk overlap, and its bytes of all chunks against
/// `max_len` (an overflowing product is [`Status::TooLong`] too).
#[inline]
fn check_strided_fields(d: &Descriptor, max_len: u64) -> Result<(), Status> {
    if d.count == 0 {
        return Err(Status::ZeroCount);
    }
    if d.count > MAX_CHUNKS {
        return Err(Status::TooManyChunks);
    }
    if d.count > 1 && d.dst_stride < d.len {
        return Err(Status::ChunksOverlap);
    }
    d.len.checked_mul(u64::from(d.count)).filter(|&total| total <= max_len).map(drop).ok_or(Status::TooLong)
}

/// Checks one untrusted descriptor. `lookup` resolves a region id to its current registration.
///
/// Checks run in a fixed order, so a descriptor with several faults always gets the same
/// status: reserved bits (and strided fields without [`FLAG_STRIDED`]), zero length, zero count,
/// too many chunks, overlapping destination chunks, maximum length (of all chunks), unknown
/// region (source first), owner, bounds (of the last chunk, with overflow), overlap (of the
/// spans the chunks cover).
#[inline]
pub fn validate(
    d: &Descriptor,
    client: u32,
    max_len: u64,
    lookup: impl FnMut(u32) -> Option<RegionView>,
) -> Result<Validated, Status> {
    if d.flags & FLAG_STRIDED == 0 {
        return validate_plain(d, client, max_len, lookup).map(|first| Validated {
            first,
            chunks: 1,
            src_stride: 0,
            dst_stride: 0,
        });
    }
    validate_strided(d, client, max_len, lookup)
}

/// Checks a gate descriptor ([`FLAG_GATE`]): only `tag`, `flags` (the gate, and a fence) and
/// `src_offset` (the value) may be set; returns the value.
pub fn validate_gate(d: &Descriptor) -> Result<u64, Status> {
    let rest = Descriptor { tag: 0, flags: d.flags & !(FLAG_GATE | FLAG_FENCE), src_offset: 0, ..*d };
    if d.flags & FLAG_GATE == 0 || rest != Descriptor::default() {
        return Err(Status::ReservedFlags);
    }
    Ok(d.src_offset)
}

/// Checks a notification ([`FLAG_NOTIFY`]): only `tag`, `flags` (the notification, and a
/// fence), `src_offset` (the value, not 0) and `dst_offset` (the slot, below [`NOTIFY_SLOTS`])
/// may be set; returns the slot and the value.
pub fn validate_notify(d: &Descriptor) -> Result<(usize, u64), Status> {
    let rest = Descriptor { tag: 0, flags: d.flags & !(FLAG_NOTIFY | FLAG_FENCE), src_offset: 0, dst_offset: 0, ..*d };
    if d.flags & FLAG_NOTIFY == 0 || rest != Descriptor::default() {
        return Err(Status::ReservedFlags);
    }
    if d.src_offset == 0 {
        return Err(Status::ZeroLength);
    }
    if d.dst_offset >= u64::from(NOTIFY_SLOTS) {
        return Err(Status::OutOfBounds);
    }
    Ok((d.dst_offset as usize, d.src_offset))
}

/// [`validate`] for a descriptor without [`FLAG_STRIDED`] (the worker's hot path: no chunks).
#[inline]
pub(crate) fn validate_plain(
    d: &Descriptor,
    client: u32,
    max_len: u64,
    lookup: impl FnMut(u32) -> Option<RegionView>,
) -> Result<ValidCopy, Status> {
    if d.flags & !KNOWN_FLAGS != 0
        || d.flags & (FLAG_STRIDED | FLAG_GATE | FLAG_NOTIFY) != 0
        || d.count != 0
        || d.src_stride != 0
        || d.dst_stride != 0
    {
        return Err(Status::ReservedFlags);
    }
    if d.len == 0 {
        return Err(Status::ZeroLength);
    }
    if d.len > max_len {
        return Err(Status::TooLong);
    }
    check_regions(d, client, 0, (0, 0), lookup)
}

/// [`validate`] for a descriptor with [`FLAG_STRIDED`].
fn validate_strided(
    d: &Descriptor,
    client: u32,
    max_len: u64,
    lookup: impl FnMut(u32) -> Option<RegionView>,
) -> Result<Validated, Status> {
    if d.flags & !KNOWN_FLAGS != 0 || d.flags & (FLAG_GATE | FLAG_NOTIFY) != 0 {
        return Err(Status::ReservedFlags);
    }
    if d.len == 0 {
        return Err(Status::ZeroLength);
    }
    check_strided_fields(d, max_len)?;
    let first = check_regions(d, client, d.count - 1, (d.src_stride, d.dst_stride), lookup)?;
    Ok(Validated { first, chunks: d.count, src_stride: d.src_stride, dst_stride: d.dst_stride })
}

/// The checks after the descriptor's own fields, for its chunk 0 and the `last` chunk after it
/// at `strides` (source, destination): unknown region (source first), owner, bounds of the last
/// chunk's end (with overflow), overlap of the spans in one region. Returns chunk 0's copy.
#[inline]
fn check_regions(
    d: &Descriptor,
    client: u32,
    last: u32,
    strides: (u64, u64),
    mut lookup: impl FnMut(u32) -> Option<RegionView>,
) -> Result<ValidCopy, Status> {
    let src = lookup(d.src_region).ok_or(Status::UnknownRegion)?;
    let dst = lookup(d.dst_region).ok_or(Status::UnknownRegion)?;
    if src.owner != client || dst.owner != client {
        return Err(Status::NotOwner);
    }
    let span_end = |offset: u64, stride: u64| {
        stride.checked_mul(u64::from(last)).and_then(|s| s.checked_add(offset)).and_then(|s| s.checked_add(d.len))
    };
    let src_end = span_end(d.src_offset, strides.0).ok_or(Status::OutOfBounds)?;
    let dst_end = span_end(d.dst_offset, strides.1).ok_or(Status::OutOfBounds)?;
    if src_end > src.len || dst_end > dst.len {
        return Err(Status::OutOfBounds);
    }
    if d.src_region == d.dst_region && d.src_offset < dst_end && d.dst_offset < src_end {
        return Err(Status::Overlap);
    }
    Ok(copy_of(d, &src, &dst))
}

/// The (first) copy of a checked descriptor. Bounds are checked against the regions' lengths,
/// so base + offset cannot overflow for a region registered with a valid (non-wrapping) range.
#[inline]
fn copy_of(d: &Descriptor, src: &RegionView, dst: &RegionView) -> ValidCopy {
    ValidCopy {
        src: Endpoint {
            region: d.src_region,
            kind: src.kind,
            addr: src.base + d.src_offset,
            lkey: src.lkey,
            rkey: src.rkey,
        },
        dst: Endpoint {
            region: d.dst_region,
            kind: dst.kind,
            addr: dst.base + d.dst_offset,
            lkey: dst.lkey,
            rkey: dst.rkey,
        },
        len: d.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: u32 = 1;
    const MAX: u64 = 1 << 20;
    const A: u32 = 10;
    const B: u32 = 11;
    const FOREIGN: u32 = 12;

    fn lookup(id: u32) -> Option<RegionView> {
        match id {
            A => Some(RegionView { base: 0x1000_0000, len: 1 << 16, owner: CLIENT, kind: 0, lkey: 0, rkey: 0 }),
            B => Some(RegionView { base: 0x2000_0000, len: 1 << 16, owner: CLIENT, kind: 0, lkey: 0, rkey: 0 }),
            FOREIGN => Some(RegionView { base: 0x3000_0000, len: 1 << 16, owner: 2, kind: 0, lkey: 0, rkey: 0 }),
            _ => None,
        }
    }

    fn check(d: Descriptor) -> Result<ValidCopy, Status> {
        validate(&d, CLIENT, MAX, lookup).map(|v| {
            assert_eq!(v.chunks(), 1, "a plain descriptor is one chunk");
            v.chunk(0)
        })
    }

    fn check_strided(d: Descriptor) -> Result<Validated, Status> {
        validate(&d, CLIENT, MAX, lookup)
    }

    fn good() -> Descriptor {
        Descriptor {
            tag: 1,
            src_region: A,
            dst_region: B,
            src_offset: 64,
            dst_offset: 128,
            len: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn valid_descriptor_resolves_addresses() {
        let c = check(good()).unwrap();
        assert_eq!(c.src.addr, 0x1000_0000 + 64);
        assert_eq!(c.dst.addr, 0x2000_0000 + 128);
        assert_eq!(c.len, 4096);
    }

    #[test]
    fn unknown_region() {
        assert_eq!(check(Descriptor { src_region: 99, ..good() }), Err(Status::UnknownRegion));
        assert_eq!(check(Descriptor { dst_region: 0, ..good() }), Err(Status::UnknownRegion));
    }

    #[test]
    fn region_of_another_client() {
        assert_eq!(check(Descriptor { dst_region: FOREIGN, ..good() }), Err(Status::NotOwner));
        assert_eq!(check(Descriptor { src_region: FOREIGN, ..good() }), Err(Status::NotOwner));
    }

    #[test]
    fn out_of_bounds_and_overflow() {
        let end = 1 << 16;
        assert_eq!(check(Descriptor { src_offset: end - 4095, ..good() }), Err(Status::OutOfBounds));
        assert!(check(Descriptor { src_offset: end - 4096, ..good() }).is_ok());
        assert_eq!(check(Descriptor { dst_offset: end, ..good() }), Err(Status::OutOfBounds));
        // offset + len wraps around u64: must not pass as a small end.
        assert_eq!(check(Descriptor { src_offset: u64::MAX - 10, ..good() }), Err(Status::OutOfBounds));
        assert_eq!(check(Descriptor { dst_offset: u64::MAX, len: 1, ..good() }), Err(Status::OutOfBounds));
    }

    #[test]
    fn zero_length() {
        assert_eq!(check(Descriptor { len: 0, ..good() }), Err(Status::ZeroLength));
    }

    #[test]
    fn length_over_maximum() {
        assert_eq!(check(Descriptor { len: MAX + 1, ..good() }), Err(Status::TooLong));
        assert_eq!(validate(&Descriptor { len: 4097, ..good() }, CLIENT, 4096, lookup).err(), Some(Status::TooLong));
    }

    #[test]
    fn overlap_in_one_region() {
        let same = Descriptor { dst_region: A, ..good() };
        assert_eq!(check(Descriptor { src_offset: 0, dst_offset: 4095, ..same }), Err(Status::Overlap));
        assert_eq!(check(Descriptor { src_offset: 4095, dst_offset: 0, ..same }), Err(Status::Overlap));
        assert_eq!(check(Descriptor { src_offset: 100, dst_offset: 100, ..same }), Err(Status::Overlap));
        // Touching ranges do not overlap.
        assert!(check(Descriptor { src_offset: 0, dst_offset: 4096, ..same }).is_ok());
        assert!(check(Descriptor { src_offset: 4096, dst_offset: 0, ..same }).is_ok());
        // The same offsets in two regions are fine.
        assert!(check(Descriptor { src_offset: 0, dst_offset: 0, ..good() }).is_ok());
    }

    #[test]
    fn reserved_flag_bits_and_fields() {
        assert_eq!(check(Descriptor { flags: 1 << 7, ..good() }), Err(Status::ReservedFlags));
        assert_eq!(check(Descriptor { flags: FLAG_FENCE | (1 << 31), ..good() }), Err(Status::ReservedFlags));
        // The strided fields without the strided flag.
        assert_eq!(check(Descriptor { count: 1, ..good() }), Err(Status::ReservedFlags));
        assert_eq!(check(Descriptor { src_stride: 5, ..good() }), Err(Status::ReservedFlags));
        assert_eq!(check(Descriptor { dst_stride: 5, ..good() }), Err(Status::ReservedFlags));
        assert!(check(good().fenced()).is_ok());
    }

    /// 8 chunks of 1 KiB, 4 KiB apart at the source and 2 KiB at the destination.
    fn strided() -> Descriptor {
        Descriptor { len: 1024, src_offset: 0, dst_offset: 0, ..good() }.strided(8, 4096, 2048)
    }

    #[test]
    fn strided_chunks_resolve_at_their_strides() {
        let v = check_strided(strided()).unwrap();
        assert_eq!((v.chunks(), v.bytes()), (8, 8 * 1024));
        for i in 0..8u64 {
            let c = v.chunk(i as u32);
            assert_eq!((c.src.addr, c.dst.addr, c.len), (0x1000_0000 + i * 4096, 0x2000_0000 + i * 2048, 1024));
        }
        // One chunk and zero strides is a plain copy.
        assert_eq!(check_strided(good().strided(1, 0, 0)).unwrap().chunks(), 1);
    }

    #[test]
    fn strided_zero_count() {
        assert_eq!(check_strided(strided().strided(0, 4096, 2048)), Err(Status::ZeroCount));
    }

    #[test]
    fn strided_too_many_chunks() {
        let d = Descriptor { len: 1, ..strided() }.strided(MAX_CHUNKS + 1, 1, 1);
        assert_eq!(check_strided(d), Err(Status::TooManyChunks));
        let d = Descriptor { len: 1, ..strided() }.strided(MAX_CHUNKS, 1, 1);
        assert!(check_strided(d).is_ok(), "MAX_CHUNKS itself is allowed");
    }

    #[test]
    fn strided_destination_chunks_must_not_overlap() {
        assert_eq!(check_strided(strided().strided(8, 4096, 1023)), Err(Status::ChunksOverlap));
        assert!(check_strided(strided().strided(8, 4096, 1024)).is_ok(), "touching chunks are fine");
        // Source chunks may overlap (they are only read).
        assert!(check_strided(strided().strided(8, 10, 2048)).is_ok());
    }

    #[test]
    fn strided_total_length_over_maximum() {
        let d = Descriptor { len: 1 << 16, ..strided() }.strided(17, 0, 1 << 16);
        assert_eq!(validate(&d, CLIENT, 16 << 16, lookup).err(), Some(Status::TooLong));
        // len * count overflowing u64 is too long, not a small product.
        let d = Descriptor { len: 1 << 62, ..strided() }.strided(4, 0, 1 << 62);
        assert_eq!(check_strided(d), Err(Status::TooLong));
    }

    #[test]
    fn strided_bounds_cover_the_last_chunk_and_overflow() {
        // 8 chunks 8 KiB apart end at 7 * 8 KiB + 1 KiB = 57 KiB: inside the 64 KiB region.
        assert!(check_strided(strided().strided(8, 8192, 2048)).is_ok());
        // 8 KiB apart with the last at 7 * 9 KiB + 1 KiB = 64 KiB + 0: exactly the end, fine; one
        // byte further is out.
        assert!(check_strided(strided().strided(8, 9216, 2048)).is_ok());
        assert_eq!(check_strided(strided().strided(8, 9217, 2048)), Err(Status::OutOfBounds));
        assert_eq!(check_strided(strided().strided(8, 4096, 9217)), Err(Status::OutOfBounds));
        // stride * (count - 1) overflowing u64.
        assert_eq!(check_strided(strided().strided(8, u64::MAX / 4, 2048)), Err(Status::OutOfBounds));
    }

    #[test]
    fn strided_spans_in_one_region_must_not_overlap() {
        let same = Descriptor { dst_region: A, dst_offset: 16384, ..strided() };
        // Source span [0, 7 * 4096 + 1024) reaches into the destination's [16384, ...).
        assert_eq!(check_strided(same), Err(Status::Overlap));
        let apart = Descriptor { dst_offset: 32768, ..same };
        assert!(check_strided(apart).is_ok());
    }

    #[test]
    fn status_codes_round_trip() {
        for (i, s) in Status::all().iter().enumerate() {
            assert_eq!(s.code(), i as u32);
            assert_eq!(Status::from_code(s.code()), Some(*s));
        }
        assert_eq!(Status::from_code(Status::all().len() as u32), None);
        let c = Completion { status: 4242, ..Default::default() };
        assert_eq!(c.status(), Err(4242));
    }

    mod fuzz {
        //! Untrusted descriptors (another process writes them): whatever the 64 bytes, validation
        //! never panics, and what it accepts lies inside regions the client owns.
        use super::*;
        use proptest::prelude::*;

        fn region(id: u32) -> RegionView {
            lookup(id).expect("a known region")
        }

        /// Field values near the edges that matter, and anything.
        fn word() -> impl Strategy<Value = u64> {
            prop_oneof![0..70_000u64, Just(u64::MAX), (0..64u32).prop_map(|b| 1u64 << b), any::<u64>()]
        }

        fn descriptor() -> impl Strategy<Value = Descriptor> {
            let id = prop_oneof![Just(A), Just(B), Just(FOREIGN), any::<u32>()];
            let flags = prop_oneof![0..16u32, any::<u32>()];
            let count = prop_oneof![0..5000u32, any::<u32>()];
            (any::<u64>(), id.clone(), id, word(), word(), word(), flags, count, word(), word()).prop_map(
                |(tag, src_region, dst_region, src_offset, dst_offset, len, flags, count, src_stride, dst_stride)| {
                    Descriptor {
                        tag,
                        src_region,
                        dst_region,
                        src_offset,
                        dst_offset,
                        len,
                        flags,
                        count,
                        src_stride,
                        dst_stride,
                    }
                },
            )
        }

        /// Descriptors close to valid ones (small offsets, lengths and strides, real flags), so
        /// that the accepted side is exercised as much as the refused one.
        fn near() -> impl Strategy<Value = Descriptor> {
            let small = || prop_oneof![0..70_000u64, Just(1u64 << 16), Just((1u64 << 16) - 1)];
            let flags = prop_oneof![Just(0), Just(FLAG_STRIDED), Just(FLAG_FENCE), Just(FLAG_STRIDED | FLAG_FENCE)];
            (
                prop_oneof![Just(A), Just(B)],
                prop_oneof![Just(A), Just(B)],
                small(),
                small(),
                0..20_000u64,
                flags,
                0..20u32,
                small(),
                small(),
            )
                .prop_map(
                    |(src_region, dst_region, src_offset, dst_offset, len, flags, count, src_stride, dst_stride)| {
                        let strided = flags & FLAG_STRIDED != 0;
                        Descriptor {
                            src_region,
                            dst_region,
                            src_offset,
                            dst_offset,
                            len,
                            flags,
                            count: if strided { count } else { 0 },
                            src_stride: if strided { src_stride % 8192 } else { 0 },
                            dst_stride: if strided { dst_stride % 8192 } else { 0 },
                            ..Descriptor::default()
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]
            #[test]
            fn accepted_descriptors_stay_inside_the_clients_regions(d in prop_oneof![descriptor(), near()]) {
                if let Ok(v) = validate(&d, CLIENT, MAX, lookup) {
                    prop_assert!(d.flags & !KNOWN_FLAGS == 0);
                    prop_assert!(v.bytes() <= MAX * u64::from(MAX_CHUNKS));
                    for i in 0..v.chunks() {
                        let c = v.chunk(i);
                        prop_assert!(c.len > 0 && c.len <= MAX);
                        for (end, id) in [(c.src, d.src_region), (c.dst, d.dst_region)] {
                            let r = region(id);
                            prop_assert_eq!(r.owner, CLIENT);
                            prop_assert!(end.addr >= r.base && end.addr + c.len <= r.base + r.len,
                                "chunk {} at {:#x}+{} outside region {:#x}+{}", i, end.addr, c.len, r.base, r.len);
                        }
                    }
                }
                // The other decoders take any bytes too.
                let _ = validate_gate(&d);
                let _ = validate_notify(&d);
                let _ = validate_plain(&d, CLIENT, MAX, lookup);
            }
        }
    }
}
