//! Allocating, using and deregistering host regions, many times over, leaks no file descriptor,
//! no mapping and no memory: a long-lived server that grows and shrinks its pools keeps a flat
//! footprint. This binary holds one test, so nothing else runs in the process while it counts.

mod common;

use common::*;
use ferry::{Descriptor, Engine, EngineConfig, IdlePolicy, QueueConfig, TransportKind};

const CYCLES: u64 = 20_000;
const WARM_UP: u64 = 500;
/// Resident-memory growth allowed over the churn: allocator and page-cache noise, not one
/// region's worth per cycle (each is 64 KiB, touched).
const RSS_SLACK: u64 = 4 << 20;

fn region_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("memfd:ferry-region")).count()
}

#[test]
fn twenty_thousand_regions_allocated_used_and_deregistered_leak_nothing() {
    // A table of 64 slots: a region that outlived its deregistration would fill it.
    let engine = Engine::start(EngineConfig {
        max_regions: 64,
        idle: IdlePolicy::Yield { after: 64 },
        ..config(TransportKind::Host)
    })
    .expect("engine starts");
    let client = engine.new_client();
    let dst = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let cycle = |queue: &mut ferry::Queue, i: u64| {
        let src = engine.allocate_host(client, 1 << 16).unwrap();
        let block = (i % 1024) * 64;
        src.fill(block as usize, 64, i as u8).unwrap();
        copy_one_yielding(queue, Descriptor::copy(src.id(), block, dst.id(), block, 64), i);
        engine.deregister(src.id()).unwrap();
        let mut got = [0u8; 64];
        dst.read(block as usize, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == i as u8), "cycle {i}: the copy did not land");
        // `src` drops here: its mapping and memfd go with the last handle.
    };
    for i in 0..WARM_UP {
        cycle(&mut queue, i);
    }
    let (fds, rss, maps) = (open_fds(), resident_bytes(), region_maps());
    for i in WARM_UP..WARM_UP + CYCLES {
        cycle(&mut queue, i);
    }
    let (fds_after, rss_after, maps_after) = (open_fds(), resident_bytes(), region_maps());
    println!(
        "{CYCLES} regions: {fds} -> {fds_after} fds, {maps} -> {maps_after} region mappings, resident {} -> {} KiB",
        rss >> 10,
        rss_after >> 10
    );
    assert_eq!(fds_after, fds, "open file descriptors after {CYCLES} regions");
    assert_eq!(maps_after, maps, "region mappings after {CYCLES} regions");
    assert!(
        rss_after <= rss + RSS_SLACK,
        "resident memory grew by {} KiB over {CYCLES} regions",
        (rss_after - rss) >> 10
    );
}
