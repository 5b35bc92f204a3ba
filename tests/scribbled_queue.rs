//! A client may write anything anywhere in its queue's shared memory: the header (ids, claims,
//! state, watermark, gate and landed words, notification slots), both rings' indices and their
//! slots. Such a client breaks or loses its own queue, nothing more: the worker that serves it
//! beside an honest queue keeps that queue's copies whole and in order, frees the scribbled
//! queues once they are closed, and serves new queues after them.
//!
//! The scribbles are random but replayable: the seed is printed, and `FERRY_SCRIBBLE_SEED`
//! sets it.

mod common;

use common::{config, wait_until, Rng, TIMEOUT};
use ferry::internals::ring::layout::RingHeader;
use ferry::{
    Completion, Descriptor, Engine, EngineConfig, HostBuffer, Queue, QueueConfig, QueueState, Status, TransportKind,
};
use ferry::{FLAG_FENCE, FLAG_GATE, FLAG_NOTIFY, FLAG_STRIDED};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A value of the kinds that break arithmetic: zero, one, the extremes, small numbers, powers of
/// two near a ring's size, or anything.
fn nasty(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX / 2 + 1,
        4 => rng.below(64),
        5 => 1 << rng.below(64),
        6 => (1u64 << rng.below(24)).wrapping_sub(rng.below(3)),
        _ => rng.next(),
    }
}

/// The layout fields a scribbler reads from the queue header before it starts (byte offsets of
/// `Meta` in engine/queue.rs: magic, ABI, queue, client, padding, then the submission ring's
/// offset and capacity and the completion ring's offset).
struct Layout {
    submit: usize,
    submit_capacity: u64,
    complete: usize,
}

/// Where a ring's tail, head and slots lie from the ring's start.
const TAIL: usize = std::mem::offset_of!(RingHeader, tail);
const HEAD: usize = std::mem::offset_of!(RingHeader, head);
const SLOTS: usize = RingHeader::SIZE;

/// Scribbles over the mapping of `queue`'s memfd for `steps` writes: random words and bytes
/// anywhere, plausible descriptors (of its own regions `own`, of another client's `foreign`, or
/// of none) published by moving the submission tail a little, indices moved anywhere, and now
/// and then the client's own calls on the queue, whose errors are its own.
fn scribble(rng: &mut Rng, queue: &mut Queue, own: [u32; 2], foreign: u32, steps: u64) {
    let file = queue.file().try_clone().expect("the queue's memfd");
    // SAFETY: a shared mapping of the queue's memfd (sealed against shrinking: it stays this
    // size); its bytes are only ever accessed through the volatile word writes below.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("the queue's memory maps");
    let base = map.as_mut_ptr();
    let len = map.len();
    let word = |offset: usize| -> *mut u64 {
        assert!(offset % 8 == 0 && offset + 8 <= len);
        // SAFETY: inside the mapping, 8-byte aligned (the mapping is page aligned).
        unsafe { base.add(offset).cast::<u64>() }
    };
    let read = |offset: usize| -> u64 {
        // SAFETY: a word of the live mapping; other threads write it too: volatile, no reference.
        unsafe { word(offset).read_volatile() }
    };
    let write = |offset: usize, value: u64| {
        // SAFETY: as in `read`.
        unsafe { word(offset).write_volatile(value) }
    };
    let layout = Layout { submit: read(24) as usize, submit_capacity: read(32), complete: read(40) as usize };
    let region = |rng: &mut Rng| match rng.below(4) {
        0 | 1 => own[rng.below(2) as usize],
        2 => foreign,
        _ => rng.next() as u32,
    };
    let mut out = [Completion::default(); 16];
    // Between the plausible steps, one that may break anything comes about every `chaos`
    // steps: from every step to one in 8192, so that some queues break at once and others
    // carry a long stream of plausible descriptors first.
    let chaos = 1 << rng.below(14);
    for _ in 0..steps {
        if rng.below(chaos) == 0 {
            match rng.below(8) {
                // Any word, anywhere; any byte, anywhere.
                0 | 1 => write(rng.below(len as u64 / 8) as usize * 8, nasty(rng)),
                2 => {
                    let at = rng.below(len as u64) as usize;
                    // SAFETY: a byte of the live mapping.
                    unsafe { base.add(at).write_volatile(rng.next() as u8) };
                }
                // The header's first kilobyte, word by word.
                3 | 4 => write(rng.below(1024 / 8) as usize * 8, nasty(rng)),
                // The submission tail, the completion head (the worker's ring ends) moved
                // anywhere, and the indices the worker writes.
                5 => write(layout.submit + TAIL, read(layout.submit + TAIL).wrapping_add(nasty(rng))),
                6 => write(layout.complete + HEAD, read(layout.complete + HEAD).wrapping_add(nasty(rng))),
                _ => write(if rng.below(2) == 0 { layout.submit + HEAD } else { layout.complete + TAIL }, nasty(rng)),
            }
            continue;
        }
        match rng.below(10) {
            // Plausible descriptors in the next submission slots, published by the tail, while
            // the worker keeps up.
            0..=5 => {
                let tail = read(layout.submit + TAIL);
                if tail.wrapping_sub(read(layout.submit + HEAD)) >= layout.submit_capacity / 2 {
                    std::thread::yield_now();
                    continue;
                }
                let n = 1 + rng.below(4);
                for i in 0..n {
                    let slot = (tail.wrapping_add(i) & (layout.submit_capacity - 1)) as usize;
                    let at = layout.submit + SLOTS + slot * 64;
                    let flags = match rng.below(10) {
                        0..=4 => 0,
                        5 => FLAG_STRIDED,
                        6 => FLAG_FENCE,
                        7 => FLAG_GATE,
                        8 => FLAG_NOTIFY,
                        _ => rng.next() as u32,
                    };
                    let small = |rng: &mut Rng| if rng.below(4) == 0 { nasty(rng) } else { rng.below(1 << 16) };
                    let fields = [
                        rng.next(),
                        u64::from(region(rng)) | u64::from(region(rng)) << 32,
                        small(rng),
                        small(rng),
                        if rng.below(4) == 0 { nasty(rng) } else { 1 + rng.below(8192) },
                        u64::from(flags) | (rng.below(8) << 32),
                        small(rng),
                        small(rng),
                    ];
                    for (k, f) in fields.into_iter().enumerate() {
                        write(at + 8 * k, f);
                    }
                }
                write(layout.submit + TAIL, tail.wrapping_add(n));
            }
            // The completion head moved on as a client that read would: room for more.
            6 | 7 => write(layout.complete + HEAD, read(layout.complete + TAIL)),
            // The gate word, as the client or its streams would write it.
            8 => queue.signal(rng.below(1 << 20)),
            // The client's own calls on the scribbled queue: errors, never a panic.
            _ => {
                let _ = queue.poll(&mut out);
                let d = Descriptor::copy(ferry::RegionId(own[0]), 0, ferry::RegionId(own[1]), 0, 4096);
                let _ = queue.submit(&[d]);
                let _ = (queue.state(), queue.watermark(), queue.gate(), queue.landed());
            }
        }
        if rng.below(64) == 0 {
            std::thread::yield_now(); // two cores: let the worker and the honest client run
        }
    }
}

/// Sets the close flag of the queue whose memfd is `file` (`Ends::closed` in engine/queue.rs: the
/// header's third block, after the two holder words).
fn close_by_hand(file: &std::fs::File) {
    // SAFETY: a shared mapping of a queue's memfd, written only through the volatile store below.
    let mut map = unsafe { memmap2::MmapMut::map_mut(file) }.expect("the queue's memory maps");
    // SAFETY: 4-byte aligned, inside the header.
    unsafe { map.as_mut_ptr().add(256 + 16).cast::<u32>().write_volatile(1) };
}

/// The honest client: `count` copies of 4 KiB blocks from `src` to `dst`, a permutation of the
/// blocks, checked completion by completion (tag, order, status) and byte for byte at the end.
fn honest_copies(queue: &mut Queue, src: &HostBuffer, dst: &HostBuffer, count: u64) {
    let blocks = (src.len() / 4096) as u64;
    let pattern: Vec<u8> =
        (0..src.len()).map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8).collect();
    src.write(0, &pattern).unwrap();
    let block = |i: u64| (i * 7919) % blocks; // 7919 is prime: a permutation when it does not divide blocks
    let mut buf = [Completion::default(); 64];
    let first = queue.pushed();
    let (mut pushed, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while done < count {
        while pushed < count {
            let b = block(pushed);
            let d = Descriptor::copy(src.id(), b * 4096, dst.id(), b * 4096, 4096).with_tag(pushed);
            if queue.submit(&[d]).unwrap() == 0 {
                break;
            }
            pushed += 1;
        }
        let n = queue.poll(&mut buf).unwrap();
        for c in &buf[..n] {
            assert_eq!((c.tag, c.seq, c.status(), c.bytes), (done, first + done, Ok(Status::Ok), 4096), "copy {done}");
            done += 1;
        }
        assert!(start.elapsed() < TIMEOUT * 3, "the honest queue got {done} of {count} completions");
        if n == 0 {
            std::thread::yield_now();
        }
    }
    let mut got = vec![0u8; dst.len()];
    dst.read(0, &mut got).unwrap();
    for i in 0..count.min(blocks) {
        let at = (block(i) * 4096) as usize;
        assert!(got[at..at + 4096] == pattern[at..at + 4096], "block {} differs", block(i));
    }
}

#[test]
fn a_client_scribbling_over_its_queue_costs_the_other_queues_nothing() {
    let seed = std::env::var("FERRY_SCRIBBLE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    }) | 1;
    println!("scribble seed {seed} (FERRY_SCRIBBLE_SEED={seed} replays it)");
    // One worker: the scribbled queues and the honest one share its loop.
    let engine = Arc::new(
        Engine::start(EngineConfig { workers: 1, max_len: 1 << 16, ..config(TransportKind::Host) })
            .expect("engine starts"),
    );
    let honest = engine.new_client();
    let (src, dst) = (engine.allocate_host(honest, 4 << 20).unwrap(), engine.allocate_host(honest, 4 << 20).unwrap());
    let mut queue = engine.open_queue(honest, QueueConfig::default()).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let scribbler = {
        let (engine, stop, rounds) = (engine.clone(), stop.clone(), rounds.clone());
        let foreign = src.id().0;
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let hostile = engine.new_client();
            let own =
                [engine.allocate_host(hostile, 1 << 16).unwrap(), engine.allocate_host(hostile, 1 << 16).unwrap()];
            let mut broken = 0;
            // At least 20 queues, on while the honest client copies, and until the worker took
            // 50 000 descriptors from them (once the honest client is done, the worker's count
            // beyond its 100 000; for at most a minute).
            let start = Instant::now();
            let more = || {
                rounds.load(Ordering::Relaxed) < 20
                    || !stop.load(Ordering::Relaxed)
                    || engine.stats()[0].descriptors < 150_000 && start.elapsed() < Duration::from_secs(60)
            };
            while more() {
                let config = QueueConfig {
                    gate_timeout: Duration::from_millis(rng.below(20)),
                    close_if_client_dies: rng.below(2) == 0,
                    ..QueueConfig::default().with_capacities(1 << (4 + rng.below(6)), 1 << (4 + rng.below(6)))
                };
                let mut queue = engine.open_queue(hostile, config).unwrap();
                let own = [own[0].id().0, own[1].id().0];
                scribble(&mut rng, &mut queue, own, foreign, 20_000);
                broken += u64::from(queue.state() == QueueState::Broken);
                if rng.below(2) == 0 {
                    // Handed off and attached again, as a client in another process takes a
                    // queue over, and scribbled on: the attach refuses the header or gives a
                    // queue whose calls fail, never a panic (its ring ends start from whatever
                    // indices are there).
                    let file = queue.hand_off().expect("a memfd to hand off");
                    match Queue::attach(file.try_clone().unwrap()) {
                        Ok(mut again) => scribble(&mut rng, &mut again, own, foreign, 2_000),
                        // Refused: closed the way any client closes, by the header's close flag.
                        Err(_) => close_by_hand(&file),
                    }
                } else {
                    drop(queue); // its close, whatever the header holds by now
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            broken
        })
    };
    honest_copies(&mut queue, &src, &dst, 100_000);
    stop.store(true, Ordering::Relaxed);
    let broken = scribbler.join().expect("the scribbler's own calls never panic");
    // The scribbles reached the worker: it took descriptors from the scribbled queues (beyond
    // the honest ones), and found some queues' indices corrupt.
    let stats = engine.stats()[0];
    let scribbled = stats.descriptors - 100_000;
    println!(
        "{} scribbled queues beside 100000 honest copies: the worker took {scribbled} descriptors from them; {broken} broken",
        rounds.load(Ordering::Relaxed)
    );
    assert!(scribbled >= 50_000 && broken > 0, "the scribbles hardly reached the worker");

    // Every scribbled queue is freed: the worker serves the honest one alone.
    wait_until("the scribbled queues to be freed", || engine.stats()[0].queues == 1);
    // The worker still serves a new queue, and the honest queue still copies.
    let mut fresh = engine.open_queue(honest, QueueConfig::default()).unwrap();
    dst.write(0, &[0u8; 4096]).unwrap();
    honest_copies(&mut fresh, &src, &dst, 1000);
    honest_copies(&mut queue, &src, &dst, 1000);
}
