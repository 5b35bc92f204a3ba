//! Gate descriptors on the host transport: a gate holds its queue's later descriptors until the
//! gate word reaches its value (set here from the CPU, as a CUDA stream sets it on a GPU
//! machine), times out into its own status, never holds another queue, and is validated; stream
//! ordering without a CUDA context is a clear error. The CUDA stream side is in tests/gpu.rs.

mod common;

use common::*;
use ferry::{Descriptor, Error, QueueConfig, Status};
use std::time::{Duration, Instant};

/// Nothing more completes on `queue` for `for_`.
fn quiet(queue: &mut ferry::Queue, for_: Duration) {
    let start = Instant::now();
    let mut buf = [ferry::Completion::default(); 4];
    while start.elapsed() < for_ {
        assert_eq!(queue.poll(&mut buf).unwrap(), 0, "a completion came through a closed gate");
        std::thread::yield_now();
    }
}

#[test]
fn a_gate_holds_the_descriptors_behind_it_until_the_word_reaches_its_value() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    buf.write(0, b"before").unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let copy = |tag: u64, dst: u64| Descriptor::copy(buf.id(), 0, buf.id(), dst, 6).with_tag(tag);
    // A copy before the gate goes at once; the gate and the copy behind it wait.
    queue.submit(&[copy(1, 4096), Descriptor::gate(5).with_tag(2), copy(3, 8192)]).unwrap();
    let first = collect(&mut queue, 1);
    assert_eq!((first[0].tag, first[0].status()), (1, Ok(Status::Ok)));
    quiet(&mut queue, Duration::from_millis(30));
    // The source changes while the gate is closed: the copy behind it must see the change.
    buf.write(0, b"after!").unwrap();
    queue.signal(4);
    quiet(&mut queue, Duration::from_millis(30));
    queue.signal(5);
    let rest = collect(&mut queue, 2);
    assert_eq!((rest[0].tag, rest[0].status(), rest[0].bytes), (2, Ok(Status::Ok), 0));
    assert_eq!((rest[1].tag, rest[1].status()), (3, Ok(Status::Ok)));
    let mut got = [0u8; 6];
    buf.read(4096, &mut got).unwrap();
    assert_eq!(&got, b"before");
    buf.read(8192, &mut got).unwrap();
    assert_eq!(&got, b"after!", "the copy behind the gate ran before the gate opened");
    assert_eq!(queue.gate(), 5);
    // An open gate (the word already past its value) completes at once.
    queue.submit(&[Descriptor::gate(2).with_tag(4), copy(5, 12288)]).unwrap();
    let done = collect(&mut queue, 2);
    assert!(done.iter().all(|c| c.is_ok()), "{done:?}");
}

#[test]
fn a_gate_that_never_opens_times_out_with_its_status_and_the_queue_goes_on() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let config = QueueConfig { gate_timeout: Duration::from_millis(50), ..QueueConfig::default() };
    let mut queue = engine.open_queue(client, config).unwrap();
    let start = Instant::now();
    queue
        .submit(&[Descriptor::gate(1).with_tag(1), Descriptor::copy(buf.id(), 0, buf.id(), 4096, 64).with_tag(2)])
        .unwrap();
    let done = collect(&mut queue, 2);
    assert!(start.elapsed() >= Duration::from_millis(50), "the gate timed out early");
    assert_eq!((done[0].tag, done[0].status()), (1, Ok(Status::GateTimeout)));
    assert_eq!((done[1].tag, done[1].status()), (2, Ok(Status::Ok)));
}

#[test]
fn a_closed_gate_holds_only_its_own_queue() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut gated = engine.open_queue(client, QueueConfig::default()).unwrap();
    let mut other = engine.open_queue(client, QueueConfig::default()).unwrap();
    gated.submit(&[Descriptor::gate(1), Descriptor::copy(buf.id(), 0, buf.id(), 4096, 64)]).unwrap();
    let descs: Vec<Descriptor> =
        (0..100u64).map(|i| Descriptor::copy(buf.id(), 0, buf.id(), 8192 + i * 64, 64).with_tag(i)).collect();
    other.submit(&descs).unwrap();
    let done = collect(&mut other, 100);
    assert!(done.iter().all(|c| c.is_ok()));
    quiet(&mut gated, Duration::from_millis(10));
    gated.signal(1);
    assert_eq!(collect(&mut gated, 2).len(), 2);
}

#[test]
fn a_gate_with_other_fields_set_is_refused() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let with_len = Descriptor { len: 64, ..Descriptor::gate(0) };
    let with_region = Descriptor { dst_region: buf.id().0, ..Descriptor::gate(0) };
    let strided = Descriptor::copy(buf.id(), 0, buf.id(), 4096, 64).strided(2, 64, 64);
    let strided_gate = Descriptor { flags: strided.flags | ferry::FLAG_GATE, ..strided };
    let fenced = Descriptor::gate(0).fenced();
    queue.submit(&[with_len, with_region, strided_gate, fenced]).unwrap();
    let done = collect(&mut queue, 4);
    let statuses: Vec<_> = done.iter().map(|c| c.status()).collect();
    assert_eq!(
        statuses,
        [Ok(Status::ReservedFlags), Ok(Status::ReservedFlags), Ok(Status::ReservedFlags), Ok(Status::Ok)],
        "a fenced gate is a gate; anything else set is refused"
    );
}

#[test]
fn stream_ordering_without_a_cuda_context_is_a_clear_error() {
    let engine = host_engine();
    let client = engine.new_client();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // SAFETY: the call fails before it could touch the (null) stream.
    let waited = unsafe { engine.stream_wait(&mut queue, std::ptr::null_mut(), 1) };
    match waited {
        Err(e @ Error::StreamOrdering { .. }) => assert!(e.to_string().contains("no CUDA context"), "{e}"),
        other => panic!("expected StreamOrdering, got {other:?}"),
    }
    // SAFETY: as above.
    let signalled = unsafe { engine.stream_signal(&mut queue, std::ptr::null_mut(), 1) };
    assert!(matches!(signalled, Err(Error::StreamOrdering { .. })));
    // SAFETY: as above.
    let slot_waited = unsafe { engine.stream_wait_slot(&mut queue, std::ptr::null_mut(), 0, 1) };
    assert!(matches!(slot_waited, Err(Error::StreamOrdering { .. })));
    // SAFETY: as above (the slot is checked first).
    let bad_slot = unsafe { engine.stream_wait_slot(&mut queue, std::ptr::null_mut(), ferry::NOTIFY_SLOTS, 1) };
    assert!(matches!(bad_slot, Err(Error::InvalidSetting { .. })), "{bad_slot:?}");
}
