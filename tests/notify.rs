//! Notification descriptors on the host transport (the CUDA stream side, `stream_wait_slot`, is
//! in tests/gpu.rs and the Python stream tests): a notification writes its slot only once every
//! earlier descriptor of its queue has its completion published, never holds the copies behind
//! it, waits for its slot to be cleared, times out into its own status, and is validated.

mod common;

use common::*;
use ferry::transport::fault::Gate;
use ferry::{Descriptor, QueueConfig, Status, NOTIFY_SLOTS};
use std::time::{Duration, Instant};

#[test]
fn a_notification_lands_after_the_earlier_copies_and_does_not_hold_the_later_ones() {
    let gate = Gate::new();
    gate.close();
    let g = gate.clone();
    // Copies from region b's first byte are held by the fault transport; others pass.
    let engine = fault_engine(move |t| t.with_gate(g.clone()));
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let copy = |tag: u64, dst: u64| Descriptor::copy(buf.id(), 0, buf.id(), dst, 64).with_tag(tag);
    queue.submit(&[copy(1, 4096), Descriptor::notify(3, 7).with_tag(2), copy(3, 8192)]).unwrap();
    // The copy before the notification is held: the slot stays clear, and nothing completes.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(30) {
        assert_eq!(queue.slot(3).unwrap(), 0, "the slot was written before the earlier copy completed");
    }
    // The copy behind the notification was taken meanwhile (the transport holds it too).
    wait_until("the worker takes all three", || engine.stats()[0].descriptors >= 3);
    gate.open();
    let done = collect(&mut queue, 3);
    assert!(done.iter().all(|c| c.is_ok()), "{done:?}");
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(done[1].bytes, 0);
    assert_eq!(queue.slot(3).unwrap(), 7);
    assert!(queue.watermark() >= 2);
}

#[test]
fn a_notification_waits_for_its_slot_to_be_cleared_and_times_out_if_it_never_is() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let config = QueueConfig { gate_timeout: Duration::from_millis(300), ..QueueConfig::default() };
    let mut queue = engine.open_queue(client, config).unwrap();
    let copy = |tag: u64| Descriptor::copy(buf.id(), 0, buf.id(), 4096, 64).with_tag(tag);
    queue.submit(&[Descriptor::notify(0, 1).with_tag(1)]).unwrap();
    assert_eq!(collect(&mut queue, 1)[0].status(), Ok(Status::Ok));
    assert_eq!(queue.slot(0).unwrap(), 1);
    // The slot is still set: the next notification for it waits; the copy behind it is done
    // but its completion waits behind the notification's (completions stay in order).
    queue.submit(&[Descriptor::notify(0, 2).with_tag(2), copy(3)]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let mut buf4 = [ferry::Completion::default(); 4];
    assert_eq!(queue.poll(&mut buf4).unwrap(), 0);
    assert_eq!(queue.slot(0).unwrap(), 1);
    queue.clear_slot(0).unwrap();
    let done = collect(&mut queue, 2);
    assert_eq!((done[0].tag, done[0].status(), done[1].tag, done[1].status()), (2, Ok(Status::Ok), 3, Ok(Status::Ok)));
    assert_eq!(queue.slot(0).unwrap(), 2);
    // Never cleared: a timeout, and the queue goes on.
    let start = Instant::now();
    queue.submit(&[Descriptor::notify(0, 3).with_tag(4), copy(5)]).unwrap();
    let done = collect(&mut queue, 2);
    assert!(start.elapsed() >= Duration::from_millis(300), "the notification timed out early");
    assert_eq!((done[0].tag, done[0].status()), (4, Ok(Status::GateTimeout)));
    assert_eq!((done[1].tag, done[1].status()), (5, Ok(Status::Ok)));
    assert_eq!(queue.slot(0).unwrap(), 2, "a timed-out notification wrote its slot");
}

#[test]
fn a_failed_copy_before_a_notification_still_lets_it_land_and_says_so_in_its_completion() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let bad = Descriptor::copy(buf.id(), 0, ferry::RegionId(0xdead), 0, 64).with_tag(1);
    queue.submit(&[bad, Descriptor::notify(2, 3).with_tag(2)]).unwrap();
    let done = collect(&mut queue, 2);
    assert_eq!((done[0].tag, done[0].status()), (1, Ok(Status::UnknownRegion)));
    assert_eq!((done[1].tag, done[1].status()), (2, Ok(Status::Ok)));
    assert_eq!(queue.slot(2).unwrap(), 3, "a waiting stream would hang on a failure otherwise");
}

#[test]
fn a_bad_notification_fails_alone_and_slots_are_checked() {
    let engine = host_engine();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let with_len = Descriptor { len: 8, ..Descriptor::notify(1, 1) };
    let with_gate = Descriptor { flags: ferry::FLAG_NOTIFY | ferry::FLAG_GATE, ..Descriptor::notify(1, 1) };
    let bad = [
        (Descriptor::notify(NOTIFY_SLOTS, 1), Status::OutOfBounds),
        (Descriptor::notify(1, 0), Status::ZeroLength),
        (with_len, Status::ReservedFlags),
        (with_gate, Status::ReservedFlags),
    ];
    for (k, (d, _)) in bad.iter().enumerate() {
        queue.submit(&[d.with_tag(k as u64)]).unwrap();
    }
    queue
        .submit(&[Descriptor::copy(buf.id(), 0, buf.id(), 4096, 64).with_tag(99), Descriptor::notify(1, 5).fenced()])
        .unwrap();
    let done = collect(&mut queue, bad.len() + 2);
    for (k, (_, status)) in bad.iter().enumerate() {
        assert_eq!((done[k].tag, done[k].status()), (k as u64, Ok(*status)));
    }
    assert!(done[bad.len()..].iter().all(|c| c.is_ok()), "{done:?}");
    assert_eq!(queue.slot(1).unwrap(), 5);
    assert!(queue.slot(NOTIFY_SLOTS).is_err());
    assert!(queue.clear_slot(NOTIFY_SLOTS).is_err());
}
