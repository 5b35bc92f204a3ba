//! Strided descriptors through the engine (issue 12's first step): one descriptor moves a paged
//! KV block's `layers x 2` chunks at fixed strides, and its one completion covers them all. Runs
//! on the host transport and the fault-injecting one; the worker gives the transport one
//! operation per chunk.

mod common;

use common::*;
use ferry::transport::fault::Gate;
use ferry::{Descriptor, QueueConfig, Status};

/// A paged KV layout: per layer a K and a V plane of `blocks` blocks of `block` bytes, so block
/// `b` of plane `p` starts at `p * plane + b * block`; one logical block is `planes` chunks,
/// `plane` bytes apart.
struct Paged {
    planes: u32,
    blocks: u64,
    block: u64,
}

impl Paged {
    fn plane(&self) -> u64 {
        self.blocks * self.block
    }

    fn bytes(&self) -> usize {
        (u64::from(self.planes) * self.plane()) as usize
    }

    /// Moves logical block `from` of the source layout to block `to` of the destination's.
    fn block(&self, src: ferry::RegionId, from: u64, dst: ferry::RegionId, to: u64) -> Descriptor {
        Descriptor::copy(src, from * self.block, dst, to * self.block, self.block).strided(
            self.planes,
            self.plane(),
            self.plane(),
        )
    }
}

#[test]
fn a_strided_descriptor_moves_every_chunk_of_a_paged_block() {
    let engine = host_engine();
    let client = engine.new_client();
    // 32 layers x K and V, 16 blocks of 4 KiB per plane: 64 chunks a logical block.
    let kv = Paged { planes: 64, blocks: 16, block: 4096 };
    let src = engine.allocate_host(client, kv.bytes()).unwrap();
    let dst = engine.allocate_host(client, kv.bytes()).unwrap();
    let mut rng = Rng(0x5eed);
    let pattern: Vec<u8> = (0..kv.bytes()).map(|_| rng.next() as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, kv.bytes(), 0xEE).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // Logical blocks 3 -> 0, 7 -> 5 and 15 -> 9; a plain descriptor between them.
    let moves = [(3u64, 0u64), (7, 5), (15, 9)];
    let mut descs: Vec<Descriptor> = moves.iter().map(|&(f, t)| kv.block(src.id(), f, dst.id(), t)).collect();
    descs.insert(1, Descriptor::copy(src.id(), 0, dst.id(), kv.block * 12, 100));
    for (i, d) in descs.iter_mut().enumerate() {
        *d = d.with_tag(i as u64);
    }
    assert_eq!(queue.submit(&descs).unwrap(), descs.len());
    let done = collect(&mut queue, descs.len());
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.tag, c.status()), (i as u64, Ok(Status::Ok)), "descriptor {i}");
    }
    assert_eq!(done[0].bytes, 64 * 4096, "the completion counts every chunk");
    assert_eq!(done[1].bytes, 100);
    let mut got = vec![0u8; kv.bytes()];
    dst.read(0, &mut got).unwrap();
    let mut expected = vec![0xEEu8; kv.bytes()];
    expected[(kv.block * 12) as usize..][..100].copy_from_slice(&pattern[..100]);
    for &(from, to) in &moves {
        for p in 0..u64::from(kv.planes) {
            let (s, d) = ((p * kv.plane() + from * kv.block) as usize, (p * kv.plane() + to * kv.block) as usize);
            expected[d..d + kv.block as usize].copy_from_slice(&pattern[s..s + kv.block as usize]);
        }
    }
    assert!(got == expected, "the destination differs from the expected chunks");
}

#[test]
fn each_strided_fault_gets_its_status_and_the_queue_carries_on() {
    let engine = host_engine();
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    let d = |count, src_stride, dst_stride| {
        Descriptor::copy(a.id(), 0, b.id(), 0, 4096).strided(count, src_stride, dst_stride)
    };
    let cases = [
        (d(0, 4096, 4096), Status::ZeroCount),
        (d(ferry::MAX_CHUNKS + 1, 0, 4096), Status::TooManyChunks),
        (d(4, 4096, 4095), Status::ChunksOverlap),
        (d(300, 0, 4096), Status::OutOfBounds),
        (Descriptor { count: 2, ..Descriptor::copy(a.id(), 0, b.id(), 0, 4096) }, Status::ReservedFlags),
        (Descriptor::copy(a.id(), 0, a.id(), 4096, 4096).strided(4, 4096, 8192), Status::Overlap),
        (d(4, 8192, 8192), Status::Ok),
    ];
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let descs: Vec<Descriptor> = cases.iter().enumerate().map(|(i, (d, _))| d.with_tag(i as u64)).collect();
    assert_eq!(queue.submit(&descs).unwrap(), descs.len());
    let done = collect(&mut queue, descs.len());
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.status(), Ok(cases[i].1), "case {i}");
        let bytes = if cases[i].1 == Status::Ok { 4 * 4096 } else { 0 };
        assert_eq!(c.bytes, bytes, "case {i}");
    }
}

#[test]
fn one_failed_chunk_fails_the_descriptor_and_its_regions_stay_counted_until_every_chunk_is_over() {
    let gate = Gate::new();
    gate.close();
    let g = gate.clone();
    // The third operation the transport is offered (chunk 2 of the strided descriptor) fails.
    let engine = fault_engine(move |t| t.with_gate(g.clone()).fail_when(|index, _| (index == 2).then_some(7)));
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    a.fill(0, 1 << 20, 0x5A).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let strided = Descriptor::copy(a.id(), 0, b.id(), 0, 4096).strided(4, 8192, 8192).with_tag(1);
    queue.push(strided).unwrap();
    queue.push(Descriptor::copy(a.id(), 64, b.id(), 1 << 19, 64).with_tag(2)).unwrap();
    // Held at the gate: the regions are counted, so deregistering is refused.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(matches!(engine.deregister(b.id()), Err(ferry::Error::RegionBusy { .. })));
    gate.open();
    let done = collect(&mut queue, 2);
    assert_eq!((done[0].tag, done[0].status(), done[0].bytes, done[0].detail), (1, Ok(Status::TransportFailed), 0, 7));
    assert_eq!((done[1].tag, done[1].status(), done[1].bytes), (2, Ok(Status::Ok), 64));
    // The other chunks were copied, the failed one not; every chunk is over, so nothing is
    // counted any more.
    for (i, want) in [(0u64, 0x5A), (1, 0x5A), (2, 0), (3, 0x5A)] {
        let mut chunk = [0u8; 4];
        b.read((i * 8192) as usize, &mut chunk).unwrap();
        assert_eq!(chunk, [want; 4], "chunk {i}");
    }
    assert!(engine.deregister(b.id()).is_ok());
}
