//! Starting, using and shutting down engines leaks no thread, mapping or file descriptor.
//! This binary holds one test, so nothing else runs in the process while it counts.

mod common;

use common::*;
use ferry::{Descriptor, Engine, EngineConfig, QueueConfig, TransportKind};

fn count(path: &str) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

fn snapshot() -> (usize, usize, usize) {
    (count("/proc/self/task"), count("/proc/self/fd"), mappings())
}

fn use_an_engine(workers: usize) {
    let engine = Engine::start(EngineConfig { workers, ..config(TransportKind::Host) }).unwrap();
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    let mut queues: Vec<_> = (0..3).map(|_| engine.open_queue(client, QueueConfig::default()).unwrap()).collect();
    for q in &mut queues {
        let ds: Vec<_> =
            (0..500u64).map(|i| Descriptor::copy(a.id(), i * 64, b.id(), i * 64, 64).with_tag(i)).collect();
        q.submit(&ds).unwrap();
        collect(q, 200);
    }
    engine.deregister(a.id()).unwrap_or(()); // may be busy: the engine cleans up on shutdown either way
    engine.shutdown();
}

#[test]
fn shutdown_leaks_no_thread_mapping_or_descriptor() {
    // Warm up with the most workers used below: the allocator maps arenas on first use and
    // glibc keeps the stacks of exited threads for reuse.
    use_an_engine(2);
    let before = snapshot();
    for workers in [1, 2, 1, 2] {
        use_an_engine(workers);
    }
    let after = snapshot();
    assert_eq!(before.0, after.0, "threads");
    assert_eq!(before.1, after.1, "file descriptors");
    assert_eq!(before.2, after.2, "mappings");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!maps.contains("memfd:ferry"), "a ferry memfd is still mapped:\n{maps}");
}
