//! The control protocol between `ferry serve` and its clients, and the client side
//! ([`Client`]): a client connects to the daemon's Unix socket, says hello, and asks for queues
//! and host memory, or hands over its own (a memfd, or GPU memory as a CUDA IPC handle); each
//! answer that hands over memory carries its memfd (`SCM_RIGHTS`). The
//! data path (descriptors and completions) never touches the socket: the client maps the memfds.
//!
//! A frame is 12 bytes of header, `magic: u32, kind: u32, len: u32` (little-endian), then `len`
//! bytes of payload, at most [`MAX_PAYLOAD`]. Every field read from the peer is checked:
//! [`Frame::decode`] refuses a bad magic, an unknown kind, or a payload of the wrong size for
//! its kind, naming what was wrong.

use crate::desc::RegionId;
use crate::error::Error;
use crate::queue::{Queue, QUEUE_ABI_VERSION};
use crate::region::{ClientId, HostBuffer};
use crate::ring::shm::SharedMemory;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

/// The first word of every frame: "FRY1".
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: u32 = 4096;
/// A frame begun must be complete within this long: a peer that sends part of one and stalls
/// gets a timeout error (the daemon then ends that connection, so that it cannot hold a
/// connection's thread forever). Between frames a connection may stay idle for any time.
pub const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
const HEADER: usize = 12;

/// Checks a pool's name ([`Frame::Join`]): 1 to 64 of `A-Za-z0-9._-`.
pub fn check_pool_name(name: &str) -> Result<(), Error> {
    let valid = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
        return Err(Error::setting("pool name", format!("{name:?}"), "1 to 64 of A-Za-z0-9._-"));
    }
    Ok(())
}

/// One row of [`Frame::Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatRow {
    /// [`StatRow::CLIENT`] or [`StatRow::WORKER`].
    pub kind: u32,
    /// The client id, or the worker's index.
    pub id: u32,
    /// Open queues (of the client, or served by the worker).
    pub queues: u32,
    /// A client: descriptors completed, bytes completed ok, descriptors failed, descriptors in
    /// flight (pushed, not completed), over its open queues. A worker: descriptors taken,
    /// copies the transport finished, loop iterations, idle iterations.
    pub values: [u64; 4],
}

impl StatRow {
    /// A row of a client's counters.
    pub const CLIENT: u32 = 0;
    /// A row of a worker's counters.
    pub const WORKER: u32 = 1;
    const BYTES: usize = 48;
}

/// The most rows one [`Frame::Stats`] carries.
pub const MAX_STAT_ROWS: usize = MAX_PAYLOAD as usize / StatRow::BYTES;

/// One message of the control protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client to daemon, first.
    Hello {
        /// The queue ABI version the client maps ([`QUEUE_ABI_VERSION`]).
        abi: u32,
    },
    /// Daemon to client: accepted.
    Welcome {
        /// The connection's client id (its regions' owner).
        client: u32,
    },
    /// Client to daemon: a queue.
    OpenQueue {
        /// Submission ring slots (0: the default).
        submit_capacity: u64,
        /// Completion ring slots (0: the default).
        complete_capacity: u64,
    },
    /// Daemon to client, with the queue's memfd.
    QueueOpened {
        /// The queue's id.
        queue: u32,
    },
    /// Client to daemon: host memory, registered for this client.
    AllocHost {
        /// Bytes.
        len: u64,
    },
    /// Daemon to client, with the memfd.
    HostAllocated {
        /// The region id.
        region: u32,
        /// Its bytes.
        len: u64,
    },
    /// Client to daemon: deregister and free one of this client's regions.
    Free {
        /// The region id.
        region: u32,
    },
    /// Client to daemon: the counters of every client and worker (`ferry stat`).
    Stat,
    /// Client to daemon, before it allocates or opens anything: this connection is a member of
    /// the pool named `name` (1 to 64 of `A-Za-z0-9._-`): every member is the same client, so
    /// its regions are theirs, and they live until the last member is gone. Answered `Welcome`.
    Join {
        /// The pool's name.
        name: String,
    },
    /// Client to daemon, with a memfd of the client's (sealed against shrinking and growing):
    /// register its memory for this client. Answered `HostAllocated` (no memfd: the client has
    /// it).
    RegisterMemfd {
        /// The memfd's bytes, as the client sees them (the daemon checks).
        len: u64,
    },
    /// Client to daemon: one of this client's host regions (a pool member's), mapped here.
    /// Answered `HostAllocated` with the memfd.
    MapRegion {
        /// The region id.
        region: u32,
    },
    /// Client to daemon: register GPU memory of the client's for this client: `len` bytes at
    /// `offset` of the allocation whose CUDA IPC handle this is (the daemon opens it in its
    /// own context). Answered `GpuRegistered`.
    RegisterGpu {
        /// The allocation's `CUipcMemHandle` bytes.
        handle: [u8; 64],
        /// Where the range starts in the allocation.
        offset: u64,
        /// Its bytes.
        len: u64,
    },
    /// Daemon to client: GPU memory registered.
    GpuRegistered {
        /// The region id.
        region: u32,
    },
    /// Daemon to client: the counters, one row per client, then one per worker (at most
    /// [`MAX_STAT_ROWS`]).
    Stats {
        /// The rows.
        rows: Vec<StatRow>,
    },
    /// Daemon to client: done.
    Done,
    /// Daemon to client: the request failed.
    Failed {
        /// Why.
        text: String,
    },
}

impl Frame {
    fn kind(&self) -> u32 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::OpenQueue { .. } => 2,
            Frame::AllocHost { .. } => 3,
            Frame::Free { .. } => 4,
            Frame::Stat => 5,
            Frame::Join { .. } => 6,
            Frame::MapRegion { .. } => 7,
            Frame::RegisterMemfd { .. } => 8,
            Frame::RegisterGpu { .. } => 9,
            Frame::GpuRegistered { .. } => 106,
            Frame::Stats { .. } => 105,
            Frame::Welcome { .. } => 101,
            Frame::QueueOpened { .. } => 102,
            Frame::HostAllocated { .. } => 103,
            Frame::Done => 104,
            Frame::Failed { .. } => 199,
        }
    }

    /// The frame's bytes: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            Frame::Hello { abi } => payload.extend_from_slice(&abi.to_le_bytes()),
            Frame::Welcome { client } => payload.extend_from_slice(&client.to_le_bytes()),
            Frame::OpenQueue { submit_capacity, complete_capacity } => {
                payload.extend_from_slice(&submit_capacity.to_le_bytes());
                payload.extend_from_slice(&complete_capacity.to_le_bytes());
            }
            Frame::QueueOpened { queue } => payload.extend_from_slice(&queue.to_le_bytes()),
            Frame::AllocHost { len } => payload.extend_from_slice(&len.to_le_bytes()),
            Frame::HostAllocated { region, len } => {
                payload.extend_from_slice(&region.to_le_bytes());
                payload.extend_from_slice(&len.to_le_bytes());
            }
            Frame::Free { region } => payload.extend_from_slice(&region.to_le_bytes()),
            Frame::Done | Frame::Stat => {}
            Frame::Join { name } => {
                let bytes = name.as_bytes();
                payload.extend_from_slice(&bytes[..bytes.len().min(MAX_PAYLOAD as usize)]);
            }
            Frame::MapRegion { region } => payload.extend_from_slice(&region.to_le_bytes()),
            Frame::RegisterMemfd { len } => payload.extend_from_slice(&len.to_le_bytes()),
            Frame::RegisterGpu { handle, offset, len } => {
                payload.extend_from_slice(handle);
                payload.extend_from_slice(&offset.to_le_bytes());
                payload.extend_from_slice(&len.to_le_bytes());
            }
            Frame::GpuRegistered { region } => payload.extend_from_slice(&region.to_le_bytes()),
            Frame::Stats { rows } => {
                for row in rows.iter().take(MAX_STAT_ROWS) {
                    for word in [row.kind, row.id, row.queues, 0] {
                        payload.extend_from_slice(&word.to_le_bytes());
                    }
                    for value in row.values {
                        payload.extend_from_slice(&value.to_le_bytes());
                    }
                }
            }
            Frame::Failed { text } => {
                let bytes = text.as_bytes();
                payload.extend_from_slice(&bytes[..bytes.len().min(MAX_PAYLOAD as usize)]);
            }
        }
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.kind().to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// The payload length a frame header announces, checked: `Err` for a bad magic or a
    /// payload over [`MAX_PAYLOAD`].
    pub fn payload_len(header: &[u8; HEADER]) -> Result<usize, String> {
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        if word(0) != MAGIC {
            return Err(format!("bad magic {:#010x} (expected {MAGIC:#010x})", word(0)));
        }
        let len = word(8);
        if len > MAX_PAYLOAD {
            return Err(format!("payload of {len} bytes (at most {MAX_PAYLOAD})"));
        }
        Ok(len as usize)
    }

    /// Decodes a frame from its header and payload (untrusted bytes): `Err` names the fault.
    pub fn decode(header: &[u8; HEADER], payload: &[u8]) -> Result<Frame, String> {
        let len = Frame::payload_len(header)?;
        if payload.len() != len {
            return Err(format!("payload of {} bytes where the header says {len}", payload.len()));
        }
        let kind = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().expect("checked length"));
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("checked length"));
        let want =
            |n: usize| if len == n { Ok(()) } else { Err(format!("kind {kind} needs {n} payload bytes, got {len}")) };
        Ok(match kind {
            1 => want(4).map(|()| Frame::Hello { abi: u32_at(0) })?,
            2 => want(16).map(|()| Frame::OpenQueue { submit_capacity: u64_at(0), complete_capacity: u64_at(8) })?,
            3 => want(8).map(|()| Frame::AllocHost { len: u64_at(0) })?,
            4 => want(4).map(|()| Frame::Free { region: u32_at(0) })?,
            5 => want(0).map(|()| Frame::Stat)?,
            6 => Frame::Join { name: String::from_utf8_lossy(payload).into_owned() },
            7 => want(4).map(|()| Frame::MapRegion { region: u32_at(0) })?,
            8 => want(8).map(|()| Frame::RegisterMemfd { len: u64_at(0) })?,
            9 => want(80).map(|()| Frame::RegisterGpu {
                handle: payload[..64].try_into().expect("checked length"),
                offset: u64_at(64),
                len: u64_at(72),
            })?,
            106 => want(4).map(|()| Frame::GpuRegistered { region: u32_at(0) })?,
            105 if len % StatRow::BYTES == 0 => Frame::Stats {
                rows: (0..len / StatRow::BYTES)
                    .map(|r| {
                        let at = r * StatRow::BYTES;
                        StatRow {
                            kind: u32_at(at),
                            id: u32_at(at + 4),
                            queues: u32_at(at + 8),
                            values: std::array::from_fn(|v| u64_at(at + 16 + 8 * v)),
                        }
                    })
                    .collect(),
            },
            105 => return Err(format!("kind 105 needs a multiple of {} payload bytes, got {len}", StatRow::BYTES)),
            101 => want(4).map(|()| Frame::Welcome { client: u32_at(0) })?,
            102 => want(4).map(|()| Frame::QueueOpened { queue: u32_at(0) })?,
            103 => want(12).map(|()| Frame::HostAllocated { region: u32_at(0), len: u64_at(4) })?,
            104 => want(0).map(|()| Frame::Done)?,
            199 => Frame::Failed { text: String::from_utf8_lossy(payload).into_owned() },
            other => return Err(format!("unknown kind {other}")),
        })
    }
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Control { what, reason: source.to_string() }
}

/// Room for one control message carrying one descriptor.
fn control_buffer() -> Vec<u8> {
    // SAFETY: CMSG_SPACE is a pure computation on a constant size.
    vec![0u8; unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize]
}

/// A msghdr over one buffer and a control buffer; valid while both live.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the pointers are set next.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Sends `frame`, with `fd` attached (`SCM_RIGHTS`) when given, in one `sendmsg`.
pub fn send(stream: &UnixStream, frame: &Frame, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = frame.encode();
    let Some(fd) = fd else {
        return (&*stream).write_all(&bytes);
    };
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut control = control_buffer();
    let msg = message(&mut iov, &mut control);
    // SAFETY: msg_control is CMSG_SPACE(one descriptor) bytes: a non-null first header with room for one.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: a valid socket and a msghdr whose buffers live across the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptor went with the first bytes; the rest of a short write goes plainly.
    (&*stream).write_all(&bytes[sent as usize..])
}

/// Receives one frame and the descriptor sent with it, if any; `Ok(None)` when the peer hung
/// up before a frame began. A malformed frame is an `InvalidData` error naming the fault.
pub fn receive(stream: &UnixStream) -> std::io::Result<Option<(Frame, Option<OwnedFd>)>> {
    let mut header = [0u8; HEADER];
    let mut iov = libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: HEADER };
    let mut control = control_buffer();
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: a valid socket and a msghdr whose buffers live across the call; CLOEXEC on any
    // received descriptor.
    let got = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if got == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of control messages; each
    // one is read through the CMSG macros within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    // Every descriptor received is owned now (so none leaks); the first is kept.
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // The rest of the frame within FRAME_TIMEOUT; the socket waits without a limit again after.
    stream.set_read_timeout(Some(FRAME_TIMEOUT))?;
    let rest = read_rest(stream, &mut header, got as usize);
    stream.set_read_timeout(None)?;
    let payload = rest?;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    Frame::decode(&header, &payload).map(|frame| Some((frame, fd))).map_err(invalid)
}

/// The rest of a frame whose first `got` header bytes are in `header`: its payload.
fn read_rest(stream: &UnixStream, header: &mut [u8; HEADER], got: usize) -> std::io::Result<Vec<u8>> {
    let stalled = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a frame begun was not complete within {FRAME_TIMEOUT:?}"),
        ),
        _ => e,
    };
    (&*stream).read_exact(&mut header[got..]).map_err(stalled)?;
    let len = Frame::payload_len(header).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    (&*stream).read_exact(&mut payload).map_err(stalled)?;
    Ok(payload)
}

/// A connection to a `ferry serve` daemon: queues and host memory come from it, as memfds this
/// process maps; descriptors and completions then go through shared memory only.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    id: ClientId,
}

impl Client {
    /// Connects to the daemon listening at `path` and says hello.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let stream = UnixStream::connect(path.as_ref()).map_err(io_error("connecting to the daemon"))?;
        let mut client = Client { stream, id: ClientId(0) };
        match client.call(&Frame::Hello { abi: QUEUE_ABI_VERSION })? {
            (Frame::Welcome { client: id }, _) => client.id = ClientId(id),
            (other, _) => return Err(unexpected("hello", &other)),
        }
        Ok(client)
    }

    /// The client id the daemon gave this connection (its regions' owner).
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// A queue served by the daemon's workers, with rings of the given capacities (0: the
    /// default). The daemon frees it when this process closes it or dies.
    pub fn open_queue(&mut self, submit_capacity: u64, complete_capacity: u64) -> Result<Queue, Error> {
        match self.call(&Frame::OpenQueue { submit_capacity, complete_capacity })? {
            (Frame::QueueOpened { .. }, Some(fd)) => Queue::attach(File::from(fd)),
            (other, _) => Err(unexpected("open a queue", &other)),
        }
    }

    /// `len` bytes of host memory allocated and registered by the daemon for this client,
    /// mapped here. Free it with [`Client::free`]; the daemon frees what is left when the
    /// connection ends.
    pub fn alloc_host(&mut self, len: usize) -> Result<HostBuffer, Error> {
        match self.call(&Frame::AllocHost { len: len as u64 })? {
            (Frame::HostAllocated { region, len }, Some(fd)) => host_buffer(RegionId(region), len, fd),
            (other, _) => Err(unexpected("allocate host memory", &other)),
        }
    }

    /// Makes this connection a member of the pool `name` (see [`Frame::Join`]), before it
    /// allocates or opens anything; its client id becomes the pool's.
    pub fn join(&mut self, name: &str) -> Result<ClientId, Error> {
        match self.call(&Frame::Join { name: name.to_owned() })? {
            (Frame::Welcome { client }, _) => {
                self.id = ClientId(client);
                Ok(self.id)
            }
            (other, _) => Err(unexpected("join a pool", &other)),
        }
    }

    /// Sends a memfd of this process (sealed against shrinking and growing) for the daemon to
    /// register as this client's host memory; returns it mapped here.
    pub fn register_memfd(&mut self, file: File) -> Result<HostBuffer, Error> {
        let memory = SharedMemory::open(file).map_err(io_error("mapping the memfd"))?;
        let len = memory.len() as u64;
        let frame = Frame::RegisterMemfd { len };
        send(&self.stream, &frame, Some(memory.file().as_raw_fd()))
            .map_err(io_error("sending a memfd to the daemon"))?;
        match self.answer()? {
            (Frame::HostAllocated { region, len: got }, _) if got == len => {
                Ok(HostBuffer::new(RegionId(region), Arc::new(memory)))
            }
            (other, _) => Err(unexpected("register a memfd", &other)),
        }
    }

    /// Registers GPU memory of this process for this client: `len` bytes at `offset` of the
    /// allocation whose CUDA IPC handle is `handle` (see [`crate::internals::cuda::export_ipc`]).
    pub fn register_gpu(&mut self, handle: [u8; 64], offset: u64, len: u64) -> Result<RegionId, Error> {
        match self.call(&Frame::RegisterGpu { handle, offset, len })? {
            (Frame::GpuRegistered { region }, _) => Ok(RegionId(region)),
            (other, _) => Err(unexpected("register GPU memory", &other)),
        }
    }

    /// Maps one of this client's host regions (allocated by another member of its pool, say).
    pub fn map_region(&mut self, region: RegionId) -> Result<HostBuffer, Error> {
        match self.call(&Frame::MapRegion { region: region.0 })? {
            (Frame::HostAllocated { region, len }, Some(fd)) => host_buffer(RegionId(region), len, fd),
            (other, _) => Err(unexpected("map a region", &other)),
        }
    }

    /// The counters of the daemon's clients and workers (what `ferry stat` shows).
    pub fn stats(&mut self) -> Result<Vec<StatRow>, Error> {
        match self.call(&Frame::Stat)? {
            (Frame::Stats { rows }, _) => Ok(rows),
            (other, _) => Err(unexpected("read the daemon's counters", &other)),
        }
    }

    /// Deregisters and frees one of this client's regions (refused while copies use it).
    pub fn free(&mut self, region: RegionId) -> Result<(), Error> {
        match self.call(&Frame::Free { region: region.0 })? {
            (Frame::Done, _) => Ok(()),
            (other, _) => Err(unexpected("free a region", &other)),
        }
    }

    fn call(&mut self, request: &Frame) -> Result<(Frame, Option<OwnedFd>), Error> {
        send(&self.stream, request, None).map_err(io_error("sending a request to the daemon"))?;
        self.answer()
    }

    fn answer(&mut self) -> Result<(Frame, Option<OwnedFd>), Error> {
        match receive(&self.stream).map_err(io_error("reading the daemon's answer"))? {
            None => Err(Error::Control { what: "reading the daemon's answer", reason: "the daemon hung up".into() }),
            Some((Frame::Failed { text }, _)) => Err(Error::Daemon { message: text }),
            Some(answer) => Ok(answer),
        }
    }
}

/// Maps a region's memfd from the daemon, checking its length against what the daemon said.
fn host_buffer(region: RegionId, len: u64, fd: OwnedFd) -> Result<HostBuffer, Error> {
    let memory = SharedMemory::open(File::from(fd)).map_err(io_error("mapping host memory"))?;
    if memory.len() as u64 != len {
        return Err(Error::Control {
            what: "mapping host memory",
            reason: format!("the memfd holds {} bytes, the daemon said {len}", memory.len()),
        });
    }
    Ok(HostBuffer::new(region, Arc::new(memory)))
}

fn unexpected(what: &'static str, frame: &Frame) -> Error {
    Error::Control { what, reason: format!("unexpected answer {frame:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> [u8; HEADER] {
        bytes[..HEADER].try_into().unwrap()
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in [
            Frame::Hello { abi: 3 },
            Frame::Welcome { client: 7 },
            Frame::OpenQueue { submit_capacity: 4096, complete_capacity: 64 },
            Frame::QueueOpened { queue: 9 },
            Frame::AllocHost { len: 1 << 40 },
            Frame::HostAllocated { region: 0x1_0002, len: 4096 },
            Frame::Free { region: 5 },
            Frame::Done,
            Frame::Stat,
            Frame::Join { name: "kv-pool.1".into() },
            Frame::MapRegion { region: 0x1_0003 },
            Frame::RegisterMemfd { len: 1 << 30 },
            Frame::RegisterGpu { handle: std::array::from_fn(|i| i as u8), offset: 4096, len: 1 << 20 },
            Frame::GpuRegistered { region: 0x2_0001 },
            Frame::Stats { rows: vec![] },
            Frame::Stats {
                rows: vec![
                    StatRow { kind: StatRow::CLIENT, id: 3, queues: 2, values: [1, 2, 3, u64::MAX] },
                    StatRow { kind: StatRow::WORKER, id: 0, queues: 5, values: [9, 8, 7, 6] },
                ],
            },
            Frame::Failed { text: "no".into() },
        ] {
            let bytes = frame.encode();
            assert_eq!(Frame::decode(&header(&bytes), &bytes[HEADER..]), Ok(frame));
        }
    }

    #[test]
    fn malformed_frames_are_refused_with_the_fault() {
        let good = Frame::AllocHost { len: 8 }.encode();
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(Frame::decode(&header(&bad_magic), &bad_magic[HEADER..]).unwrap_err().contains("magic"));
        let mut unknown = good.clone();
        unknown[4] = 77;
        assert!(Frame::decode(&header(&unknown), &unknown[HEADER..]).unwrap_err().contains("unknown kind 77"));
        let mut short = Frame::Hello { abi: 1 }.encode();
        short[8] = 2; // the header says 2 payload bytes
        short.truncate(HEADER + 2);
        assert!(Frame::decode(&header(&short), &short[HEADER..]).unwrap_err().contains("needs 4"));
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(Frame::payload_len(&header(&huge)).unwrap_err().contains("at most"));
        assert!(Frame::decode(&header(&good), &good[HEADER..HEADER + 3]).unwrap_err().contains("header says 8"));
    }

    #[test]
    fn a_descriptor_travels_with_its_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let memory = SharedMemory::create("ferry-control-test", 4096).unwrap();
        send(&a, &Frame::QueueOpened { queue: 3 }, Some(memory.file().as_raw_fd())).unwrap();
        send(&a, &Frame::Done, None).unwrap();
        let (frame, fd) = receive(&b).unwrap().unwrap();
        assert_eq!(frame, Frame::QueueOpened { queue: 3 });
        let file = File::from(fd.expect("the descriptor came along"));
        assert_eq!(file.metadata().unwrap().len(), 4096);
        let (frame, fd) = receive(&b).unwrap().unwrap();
        assert_eq!((frame, fd.is_none()), (Frame::Done, true));
        drop(a);
        assert!(receive(&b).unwrap().is_none(), "a hang-up before a frame is None");
    }

    mod fuzz {
        //! The daemon reads frames from any process that may connect: whatever the bytes, decoding
        //! never panics and refuses what is not a frame; every frame survives the wire.
        use super::*;
        use proptest::prelude::*;

        fn frame() -> impl Strategy<Value = Frame> {
            prop_oneof![
                any::<u32>().prop_map(|abi| Frame::Hello { abi }),
                any::<u32>().prop_map(|client| Frame::Welcome { client }),
                (any::<u64>(), any::<u64>()).prop_map(|(submit_capacity, complete_capacity)| Frame::OpenQueue {
                    submit_capacity,
                    complete_capacity
                }),
                any::<u32>().prop_map(|queue| Frame::QueueOpened { queue }),
                any::<u64>().prop_map(|len| Frame::AllocHost { len }),
                (any::<u32>(), any::<u64>()).prop_map(|(region, len)| Frame::HostAllocated { region, len }),
                any::<u32>().prop_map(|region| Frame::Free { region }),
                Just(Frame::Done),
                Just(Frame::Stat),
                "[A-Za-z0-9._-]{0,64}".prop_map(|name| Frame::Join { name }),
                any::<u32>().prop_map(|region| Frame::MapRegion { region }),
                any::<u64>().prop_map(|len| Frame::RegisterMemfd { len }),
                (any::<[u8; 64]>(), any::<u64>(), any::<u64>()).prop_map(|(handle, offset, len)| Frame::RegisterGpu {
                    handle,
                    offset,
                    len
                }),
                any::<u32>().prop_map(|region| Frame::GpuRegistered { region }),
                proptest::collection::vec((0..2u32, any::<u32>(), any::<u32>(), any::<[u64; 4]>()), 0..MAX_STAT_ROWS)
                    .prop_map(|rows| Frame::Stats {
                        rows: rows
                            .into_iter()
                            .map(|(kind, id, queues, values)| StatRow { kind, id, queues, values })
                            .collect(),
                    }),
                "[ -~]{0,200}".prop_map(|text| Frame::Failed { text }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]
            #[test]
            fn any_bytes_decode_to_a_frame_or_a_named_fault(bytes in proptest::collection::vec(any::<u8>(), HEADER..HEADER + 64),
                                                             magic in any::<bool>()) {
                let mut bytes = bytes;
                if magic {
                    bytes[..4].copy_from_slice(&MAGIC.to_le_bytes());
                    bytes[4] %= 10; // known kinds are frequent
                }
                let head = header(&bytes);
                match Frame::decode(&head, &bytes[HEADER..]) {
                    // A failure's text and a pool's name are read lossily (any bytes); every
                    // other frame is exact.
                    Ok(frame @ (Frame::Failed { .. } | Frame::Join { .. })) => {
                        let again = frame.encode();
                        prop_assert_eq!(Frame::decode(&header(&again), &again[HEADER..]).unwrap(), frame);
                    }
                    Ok(frame) => prop_assert_eq!(frame.encode(), bytes),
                    Err(why) => prop_assert!(!why.is_empty()),
                }
            }

            #[test]
            fn every_frame_survives_the_socket(frames in proptest::collection::vec(frame(), 1..8)) {
                let (a, b) = UnixStream::pair().unwrap();
                for f in &frames {
                    send(&a, f, None).unwrap();
                }
                for f in &frames {
                    let (got, fd) = receive(&b).unwrap().unwrap();
                    prop_assert_eq!(&got, f);
                    prop_assert!(fd.is_none());
                }
            }

            #[test]
            fn a_stream_of_garbage_is_refused_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 1..600)) {
                let (a, b) = UnixStream::pair().unwrap();
                (&a).write_all(&bytes).unwrap();
                drop(a);
                // Frames until the garbage shows or the bytes end: each is an error or a frame.
                for _ in 0..64 {
                    match receive(&b) {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
    }
}
