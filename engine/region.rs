//! The region table: registered memory, looked up by id on the worker's hot path.
//!
//! Each slot holds its fields in atomics and a state word `generation << 8 | state`. A region id
//! carries the generation it was registered under, so a stale id does not match a reused slot:
//! slots are reused longest-free first, so a slot's 16-bit generation comes round again only
//! after about 65 535 times as many registrations as the table has free slots.
//!
//! Deregistration is refused while copies that use the region are in flight
//! ([`crate::Error::RegionBusy`]); it never waits for them. Each worker counts, per region, the
//! copies it accepted and the transport has not finished, in counters only it writes. To
//! deregister, the control plane marks the slot closing, waits until every worker has started a
//! new loop iteration (after which none can accept a copy that names the region) and reads the
//! counters: zero frees the slot, anything else reopens it and reports busy. A descriptor that
//! names the region while it is closing fails with [`crate::Status::UnknownRegion`]:
//! deregistering a region while still submitting work on it is the caller's race.

use crate::desc::RegionId;
use crate::desc::RegionView;
use crate::error::Error;
use crate::ring::shm::SharedMemory;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A client of the engine: regions and queues belong to one, and a queue may only name its own
/// client's regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// What kind of memory a region is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryKind {
    /// Host DRAM.
    Host = 0,
    /// Device memory of the engine's GPU (of its first GPU; see [`MemoryKind::gpu_code`]).
    Gpu = 1,
}

impl MemoryKind {
    /// The kind code of device memory of the engine's GPU `gpu` (its place in the engine's GPU
    /// list, [`crate::GpuConfig::devices`]; 0 for an engine of one GPU): `Gpu` in the low byte,
    /// `gpu` above it.
    pub fn gpu_code(gpu: usize) -> u32 {
        MemoryKind::Gpu as u32 | (gpu as u32) << 8
    }

    /// Whether kind code `code` is device memory (of any of the engine's GPUs).
    pub fn is_gpu(code: u32) -> bool {
        code & 0xff == MemoryKind::Gpu as u32
    }

    /// The engine GPU of device-memory kind code `code`.
    pub fn gpu_of(code: u32) -> usize {
        (code >> 8) as usize
    }
}

const FREE: u32 = 0;
const ACTIVE: u32 = 1;
const CLOSING: u32 = 2;

fn state_word(generation: u16, state: u32) -> u32 {
    u32::from(generation) << 8 | state
}

#[derive(Default)]
struct Slot {
    /// `generation << 8 | FREE/ACTIVE/CLOSING`.
    state: AtomicU32,
    base: AtomicU64,
    len: AtomicU64,
    owner: AtomicU32,
    kind: AtomicU32,
    /// The NIC's keys, `rkey << 32 | lkey` (GDR transport; 0 otherwise).
    keys: AtomicU64,
}

/// What a worker publishes for the control plane. Only that worker writes it.
#[repr(align(128))]
pub(crate) struct WorkerSync {
    /// Loop iterations started; SeqCst store at the top of each (Q1).
    epoch: AtomicU64,
    /// False once the worker has exited (it then counts as quiescent).
    online: AtomicBool,
    /// Copies in flight per region index.
    in_flight: Box<[AtomicU64]>,
}

struct Control {
    /// Slot indices free for reuse, the longest free first: a slot's generation (16 bits) then
    /// comes round again only after about 65 535 times as many registrations as there are free
    /// slots, not after 65 535 registrations of one buffer, so a stale id of a deregistered
    /// region does not name a later one (of its client: another client's is `NotOwner`).
    free: VecDeque<u16>,
    /// Next never-used slot.
    next_unused: usize,
    /// What a region keeps alive (an allocation, a pinning) until it is deregistered.
    owned: Vec<Option<Keep>>,
}

/// The keys a NIC gave a region's memory registration (zero without the GDR transport).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NicKeys {
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
}

/// Resources held for a region and released (dropped) when it is deregistered.
pub(crate) type Keep = Box<dyn std::any::Any + Send + Sync>;

/// The table. Shared by the control plane and every worker.
pub(crate) struct RegionTable {
    slots: Box<[Slot]>,
    workers: Box<[WorkerSync]>,
    control: Mutex<Control>,
    /// How long deregistration waits for a worker to pass through its loop.
    quiesce_timeout: Duration,
}

impl RegionTable {
    pub(crate) fn new(capacity: usize, workers: usize) -> RegionTable {
        let slots = (0..capacity).map(|_| Slot::default()).collect();
        let workers = (0..workers)
            .map(|_| WorkerSync {
                epoch: AtomicU64::new(0),
                online: AtomicBool::new(false),
                in_flight: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        let control = Control { free: VecDeque::new(), next_unused: 0, owned: (0..capacity).map(|_| None).collect() };
        RegionTable { slots, workers, control: Mutex::new(control), quiesce_timeout: Duration::from_secs(5) }
    }

    /// Registers `len` bytes at `base`, owned by `owner`.
    pub(crate) fn register(
        &self,
        owner: ClientId,
        kind: u32,
        base: u64,
        len: u64,
        keys: NicKeys,
        keep: Option<Keep>,
    ) -> Result<RegionId, Error> {
        check_range(base, len)?;
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        // Never-used slots first, then the longest free (see `Control::free`).
        let index = if control.next_unused < self.slots.len() {
            control.next_unused += 1;
            control.next_unused - 1
        } else {
            match control.free.pop_front() {
                Some(i) => usize::from(i),
                None => return Err(Error::RegionTableFull { capacity: self.slots.len() }),
            }
        };
        let slot = &self.slots[index];
        // Relaxed: only the control plane (under the lock) writes state; no worker reads a FREE
        // slot's fields.
        let generation = next_generation(slot.state.load(Ordering::Relaxed));
        // Relaxed field stores: published by R3 below.
        slot.base.store(base, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.owner.store(owner.0, Ordering::Relaxed);
        slot.kind.store(kind, Ordering::Relaxed);
        slot.keys.store(u64::from(keys.rkey) << 32 | u64::from(keys.lkey), Ordering::Relaxed);
        // R3: Release; pairs with A3 in lookup: a worker that sees ACTIVE sees the fields.
        slot.state.store(state_word(generation, ACTIVE), Ordering::Release);
        control.owned[index] = keep;
        Ok(RegionId::new(index as u16, generation))
    }

    /// The current registration of `id`, if it is active. Hot path.
    #[inline]
    pub(crate) fn lookup(&self, id: u32) -> Option<RegionView> {
        let id = RegionId(id);
        let slot = self.slots.get(id.index())?;
        // A3: SeqCst (a plain load on x86); pairs with R3 in register for the fields, and with
        // the SeqCst CLOSING store in deregister through Q1 (see there).
        if slot.state.load(Ordering::SeqCst) != state_word(id.generation(), ACTIVE) {
            return None;
        }
        // Relaxed: ordered after A3; the slot cannot be reused before this worker's next
        // iteration (deregister waits for it).
        let keys = slot.keys.load(Ordering::Relaxed);
        Some(RegionView {
            base: slot.base.load(Ordering::Relaxed),
            len: slot.len.load(Ordering::Relaxed),
            owner: slot.owner.load(Ordering::Relaxed),
            kind: slot.kind.load(Ordering::Relaxed),
            lkey: keys as u32,
            rkey: (keys >> 32) as u32,
        })
    }

    /// Replaces the NIC keys of an active region (fault injection in tests).
    pub(crate) fn set_keys(&self, id: RegionId, keys: NicKeys) -> Result<(), Error> {
        let _control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.slots.get(id.index()).ok_or(Error::UnknownRegion { id })?;
        // Relaxed: under the control lock; a worker may read the old or the new keys, both of
        // which are whole (one 64-bit word).
        if slot.state.load(Ordering::Relaxed) != state_word(id.generation(), ACTIVE) {
            return Err(Error::UnknownRegion { id });
        }
        slot.keys.store(u64::from(keys.rkey) << 32 | u64::from(keys.lkey), Ordering::Relaxed);
        Ok(())
    }

    /// The NIC keys of an active region.
    pub(crate) fn keys(&self, id: RegionId) -> Option<NicKeys> {
        self.lookup(id.0).map(|v| NicKeys { lkey: v.lkey, rkey: v.rkey })
    }

    /// Deregisters `id`: refused while copies that use it are in flight.
    pub(crate) fn deregister(&self, id: RegionId) -> Result<(), Error> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.slots.get(id.index()).ok_or(Error::UnknownRegion { id })?;
        let active = state_word(id.generation(), ACTIVE);
        if slot.state.load(Ordering::Relaxed) != active {
            return Err(Error::UnknownRegion { id });
        }
        // A cheap first look, with no effect on workers.
        let in_flight = self.in_flight(id.index());
        if in_flight > 0 {
            return Err(Error::RegionBusy { id, in_flight });
        }
        // C1: SeqCst; with Q1 and A3 (all SeqCst) either a worker's lookup after its next epoch
        // store sees CLOSING, or this thread sees that epoch store and waits no more for it.
        slot.state.store(state_word(id.generation(), CLOSING), Ordering::SeqCst);
        if let Err(e) = self.wait_quiescent(id) {
            slot.state.store(active, Ordering::SeqCst);
            return Err(e);
        }
        let in_flight = self.in_flight(id.index());
        if in_flight > 0 {
            slot.state.store(active, Ordering::SeqCst);
            return Err(Error::RegionBusy { id, in_flight });
        }
        // Relaxed: no worker can use this slot any more (quiescent, nothing in flight), and the
        // next register publishes its fields with R3.
        slot.state.store(state_word(id.generation(), FREE), Ordering::Relaxed);
        control.owned[id.index()] = None;
        control.free.push_back(id.index() as u16);
        Ok(())
    }

    /// Copies in flight that use region `index`, summed over workers.
    fn in_flight(&self, index: usize) -> u64 {
        // Acquire: pairs with the Release of each worker's counter store (W1 in worker_done).
        self.workers.iter().map(|w| w.in_flight[index].load(Ordering::Acquire)).sum()
    }

    /// Waits until every online worker has started a loop iteration after this call began.
    fn wait_quiescent(&self, id: RegionId) -> Result<(), Error> {
        // SeqCst: part of the C1/Q1 edge.
        let seen: Vec<u64> = self.workers.iter().map(|w| w.epoch.load(Ordering::SeqCst)).collect();
        let start = Instant::now();
        for (worker, (w, seen)) in self.workers.iter().zip(seen).enumerate() {
            // SeqCst: the epoch load must follow C1 in the single total order (Q1 partner).
            while w.online.load(Ordering::SeqCst) && w.epoch.load(Ordering::SeqCst) == seen {
                if start.elapsed() > self.quiesce_timeout {
                    let waited_ms = start.elapsed().as_millis() as u64;
                    return Err(Error::WorkerUnresponsive { id, worker, waited_ms });
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Worker `w` starts a loop iteration. Q1: SeqCst; see C1.
    #[inline]
    pub(crate) fn worker_epoch(&self, w: usize, epoch: u64) {
        self.workers[w].epoch.store(epoch, Ordering::SeqCst);
    }

    /// Worker `w` comes online or goes offline.
    pub(crate) fn worker_online(&self, w: usize, online: bool) {
        // SeqCst: read by wait_quiescent in the same total order as the epochs.
        self.workers[w].online.store(online, Ordering::SeqCst);
    }

    /// Worker `w` accepted a copy that uses regions `src` and `dst` (by index).
    #[inline]
    pub(crate) fn worker_took(&self, w: usize, src: usize, dst: usize) {
        let counters = &self.workers[w].in_flight;
        for i in [src, dst] {
            // Relaxed load and store: only this worker writes the counter; readers see it
            // after Q1 (the next epoch store) publishes it.
            counters[i].store(counters[i].load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Worker `w` finished a copy that used regions `src` and `dst`.
    #[inline]
    pub(crate) fn worker_done(&self, w: usize, src: usize, dst: usize) {
        let counters = &self.workers[w].in_flight;
        for i in [src, dst] {
            // W1: Release; pairs with the Acquire in in_flight: the transport's accesses to the
            // memory are done before deregistration can see zero.
            counters[i].store(counters[i].load(Ordering::Relaxed) - 1, Ordering::Release);
        }
    }
}

/// Whether `len` bytes at `base` can be a region: not null, not empty, not wrapping.
pub(crate) fn check_range(base: u64, len: u64) -> Result<(), Error> {
    let reason = if base == 0 {
        "null address"
    } else if len == 0 {
        "zero length"
    } else if base.checked_add(len).is_none_or(|end| end > isize::MAX as u64) {
        "range wraps the address space"
    } else {
        return Ok(());
    };
    Err(Error::BadRange { addr: base, len, reason })
}

fn next_generation(state: u32) -> u16 {
    let generation = (state >> 8) as u16;
    match generation.wrapping_add(1) {
        0 => 1,
        g => g,
    }
}

/// Host memory that the engine allocated (a sealed memfd) and registered as a region.
///
/// The mapping stays valid as long as this handle lives, even after deregistration; the file
/// can be handed to another process. Do not touch bytes that a copy in flight reads or writes.
#[derive(Clone, Debug)]
pub struct HostBuffer {
    id: RegionId,
    memory: Arc<SharedMemory>,
}

impl HostBuffer {
    pub(crate) fn new(id: RegionId, memory: Arc<SharedMemory>) -> HostBuffer {
        HostBuffer { id, memory }
    }

    /// The region id to put in descriptors.
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Whether the buffer is empty (never: allocation refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.as_ptr()
    }

    /// The memfd behind the buffer.
    pub fn file(&self) -> &std::fs::File {
        self.memory.file()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), Error> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::OutOfRange { offset: offset as u64, len: len as u64, size: self.len() as u64 });
        }
        Ok(())
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        self.check(offset, data.len())?;
        // SAFETY: the range is inside the mapping (checked); `data` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len()) };
        Ok(())
    }

    /// Copies bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the mapping (checked); `out` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), Error> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked).
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}
