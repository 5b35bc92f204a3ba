//! The ring alone: push/pop in one thread, and across two threads; descriptor validation.

/// The ferry command's workload, shared by path: the benches measure what `ferry bench` does.
#[path = "../../engine/bin/ferry/bandwidth.rs"]
#[allow(dead_code)]
mod bandwidth;

use bandwidth::ring_throughput;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::desc::{validate, RegionView};
use ferry::internals::ring::layout::ring_bytes;
use ferry::internals::ring::shm::SharedMemory;
use ferry::internals::ring::{Consumer, Producer, RingMemory};
use ferry::Descriptor;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn one_thread(c: &mut Criterion) {
    let memory = Arc::new(SharedMemory::create("bench-ring", ring_bytes(4096, 64)).unwrap());
    let ring = Arc::new(RingMemory::<Descriptor>::create(memory, 0, 4096).unwrap());
    let (mut producer, mut consumer) = (Producer::new(ring.clone()), Consumer::new(ring));
    let mut group = c.benchmark_group("ring_one_thread");
    group.throughput(Throughput::Elements(64));
    group.bench_function("push64_pop64_batched", |b| {
        b.iter(|| {
            let mut batch = producer.write();
            for i in 0..64 {
                batch.push(Descriptor { tag: i, ..Descriptor::default() }).unwrap();
            }
            drop(batch);
            let mut sum = 0;
            for d in consumer.read(64).unwrap() {
                sum += d.tag;
            }
            black_box(sum)
        })
    });
    group.bench_function("push1_pop1", |b| {
        b.iter(|| {
            for i in 0..64 {
                producer.push(Descriptor { tag: i, ..Descriptor::default() }).unwrap();
                black_box(consumer.pop().unwrap());
            }
        })
    });
    group.finish();
}

fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_two_threads");
    group.throughput(Throughput::Elements(1_000_000));
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.bench_function("push_pop_1M", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                ring_throughput(1_000_000, None, None).unwrap();
            }
            start.elapsed()
        })
    });
    group.finish();
}

fn validation(c: &mut Criterion) {
    // SAFETY: validation only: no copy validated against these views is ever given to a
    // transport.
    let regions = unsafe {
        [RegionView::new(0x1000_0000, 1 << 30, 1, 0, 0, 0), RegionView::new(0x8000_0000, 1 << 30, 1, 0, 0, 0)]
    };
    let lookup = |id: u32| regions.get(id as usize).copied();
    let descs: Vec<Descriptor> = (0..64u64)
        .map(|i| Descriptor {
            tag: i,
            src_region: 0,
            dst_region: 1,
            src_offset: i << 12,
            dst_offset: i << 13,
            len: 4096,
            ..Default::default()
        })
        .collect();
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_valid", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for d in &descs {
                bytes += validate(black_box(d), 1, 1 << 30, lookup).map_or(0, |v| v.bytes());
            }
            black_box(bytes)
        })
    });
    group.finish();
}

criterion_group!(benches, one_thread, two_threads, validation);
criterion_main!(benches);
