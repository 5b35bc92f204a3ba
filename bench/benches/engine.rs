//! The engine end to end (descriptor ring -> worker -> transport -> completion ring) on the
//! null and host transports, with one unpinned worker.

/// The ferry command's workload, shared by path: the benches measure what `ferry bench` does.
#[path = "../../engine/bin/ferry/bandwidth.rs"]
#[allow(dead_code)]
mod bandwidth;

use bandwidth::{drive, scatter};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::{CorePlacement, Engine, EngineConfig, QueueConfig, TransportKind};
use std::time::{Duration, Instant};

fn end_to_end(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for (name, kind, block, count) in [
        ("null_4KiB", TransportKind::Null, 4096u64, 100_000u64),
        ("host_4KiB", TransportKind::Host, 4096, 20_000),
        ("host_1MiB", TransportKind::Host, 1 << 20, 256),
    ] {
        let engine =
            Engine::start(EngineConfig { transport: kind, cores: CorePlacement::Unpinned, ..EngineConfig::default() })
                .unwrap();
        let client = engine.new_client();
        let span = 64 << 20;
        let src = engine.allocate_host(client, span).unwrap();
        let dst = engine.allocate_host(client, span).unwrap();
        src.fill(0, span, 1).unwrap();
        dst.fill(0, span, 0).unwrap();
        let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
        let plan = scatter(span, block as usize, 7);
        group.throughput(Throughput::Bytes(block * count));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    drive(&mut queue, src.id(), dst.id(), &plan, block, count).unwrap();
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
