//! Opening and closing queues, many times over, leaks no file descriptor and no memory, and the
//! worker serves only the queues still open. This binary holds one test, so nothing else runs
//! in the process while it counts.

mod common;

use common::*;
use ferry::{Descriptor, Engine, EngineConfig, HostBuffer, IdlePolicy, QueueConfig, Status, TransportKind};

const CYCLES: u64 = 100_000;
const WARM_UP: u64 = 2_000;
/// Resident-memory growth allowed over the churn: allocator and page-cache noise, not one
/// queue's worth per cycle (a queue of this test is 2 KiB of rings and its worker window).
const RSS_SLACK: u64 = 4 << 20;

/// Opens a queue with small rings, copies one 64-byte block through it, closes it.
fn cycle(engine: &Engine, client: ferry::ClientId, src: &HostBuffer, dst: &HostBuffer, i: u64) {
    let small = QueueConfig { submit_capacity: 4, complete_capacity: 4, ..QueueConfig::default() };
    let mut queue = engine.open_queue(client, small).unwrap();
    let block = (i % 64) * 64;
    copy_one_yielding(&mut queue, Descriptor::copy(src.id(), block, dst.id(), block, 64), i);
    queue.close();
}

fn live_queues(engine: &Engine) -> u64 {
    engine.stats().iter().map(|s| s.queues).sum()
}

#[test]
fn a_hundred_thousand_queues_opened_and_closed_leak_nothing() {
    let engine = Engine::start(EngineConfig { idle: IdlePolicy::Yield { after: 64 }, ..config(TransportKind::Host) })
        .expect("engine starts");
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 16).unwrap();
    let dst = engine.allocate_host(client, 1 << 16).unwrap();
    for b in 0..64 {
        src.fill(b * 64, 64, b as u8 + 1).unwrap();
    }
    // A queue opened before the churn and used after it.
    let mut keeper = engine.open_queue(client, QueueConfig::default()).unwrap();
    for i in 0..WARM_UP {
        cycle(&engine, client, &src, &dst, i);
    }
    wait_until("the warm-up queues to be freed", || live_queues(&engine) == 1);
    let (fds, rss) = (open_fds(), resident_bytes());

    for i in WARM_UP..WARM_UP + CYCLES {
        cycle(&engine, client, &src, &dst, i);
    }
    wait_until("the closed queues to be freed", || live_queues(&engine) == 1);
    let (fds_after, rss_after) = (open_fds(), resident_bytes());
    println!("{CYCLES} queues: {fds} -> {fds_after} fds, resident {} -> {} KiB", rss >> 10, rss_after >> 10);
    assert_eq!(fds_after, fds, "open file descriptors after {CYCLES} queues");
    assert!(
        rss_after <= rss + RSS_SLACK,
        "resident memory grew by {} KiB over {CYCLES} queues",
        (rss_after - rss) >> 10
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let queue_maps = maps.lines().filter(|l| l.contains("memfd:ferry-queue")).count();
    assert_eq!(queue_maps, 2, "only the keeper queue is mapped (its client end and its worker end):\n{maps}");

    // Every copy of the churn landed, and the queue opened before it still copies.
    let mut got = vec![0u8; 64 * 64];
    dst.read(0, &mut got).unwrap();
    assert!(got.chunks(64).enumerate().all(|(b, c)| c.iter().all(|&x| x == b as u8 + 1)), "a churn copy is missing");
    src.fill(0, 4096, 0xEE).unwrap();
    keeper.push(Descriptor::copy(src.id(), 0, dst.id(), 8192, 4096).with_tag(42)).unwrap();
    let done = keeper.wait_one(TIMEOUT).unwrap();
    assert_eq!((done.tag, done.seq, done.status()), (42, 0, Ok(Status::Ok)));
    let mut block = vec![0u8; 4096];
    dst.read(8192, &mut block).unwrap();
    assert!(block.iter().all(|&x| x == 0xEE), "the keeper's copy did not land");
    keeper.close();
    wait_until("the keeper to be freed", || live_queues(&engine) == 0);
}
