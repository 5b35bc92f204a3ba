//! The engine end to end on the host, null and fault-injecting transports.

mod common;

use common::*;
use ferry::transport::fault::Gate;
use ferry::{CorePlacement, Descriptor, Engine, EngineConfig, Error, QueueConfig, QueueState, Status, TransportKind};
use std::time::Duration;

#[test]
fn random_scattered_copies_arrive_byte_for_byte() {
    let engine = host_engine();
    let client = engine.new_client();
    let size = 4 << 20;
    let src = engine.allocate_host(client, size).unwrap();
    let dst = engine.allocate_host(client, size).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pattern: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, size, 0xA5).unwrap();
    let mut expected = vec![0xA5u8; size];
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // Non-overlapping destination ranges: a random length in each 64 KiB stripe.
    let stripe = 64 << 10;
    let mut descs = Vec::new();
    for (i, start) in (0..size).step_by(stripe).enumerate() {
        let len = 1 + rng.below(stripe as u64) as usize;
        let dst_off = start + rng.below((stripe - len + 1) as u64) as usize;
        let src_off = rng.below((size - len + 1) as u64) as usize;
        expected[dst_off..dst_off + len].copy_from_slice(&pattern[src_off..src_off + len]);
        descs.push(Descriptor::copy(src.id(), src_off as u64, dst.id(), dst_off as u64, len as u64).with_tag(i as u64));
    }
    assert_eq!(queue.submit(&descs).unwrap(), descs.len());
    let done = collect(&mut queue, descs.len());
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.tag, c.seq, c.status()), (i as u64, i as u64, Ok(Status::Ok)));
        assert_eq!(c.bytes, descs[i].len);
    }
    assert_eq!(queue.watermark(), descs.len() as u64);
    let mut got = vec![0u8; size];
    dst.read(0, &mut got).unwrap();
    assert!(got == expected, "destination differs from the expected bytes");
}

#[test]
fn every_bad_descriptor_gets_its_status_and_the_queue_carries_on() {
    let engine = Engine::start(EngineConfig { max_len: 1 << 16, ..config(TransportKind::Host) }).unwrap();
    let client = engine.new_client();
    let other = engine.new_client();
    let a = engine.allocate_host(client, 1 << 16).unwrap();
    let b = engine.allocate_host(client, 1 << 16).unwrap();
    let foreign = engine.allocate_host(other, 4096).unwrap();
    let good = Descriptor::copy(a.id(), 0, b.id(), 0, 4096);
    let cases = [
        (Descriptor { src_region: 0xdead_0000, ..good }, Status::UnknownRegion),
        (Descriptor { dst_region: foreign.id().0, ..good }, Status::NotOwner),
        (Descriptor { src_offset: u64::MAX - 1, ..good }, Status::OutOfBounds),
        (Descriptor { len: 0, ..good }, Status::ZeroLength),
        (Descriptor { len: (1 << 16) + 1, ..good }, Status::TooLong),
        (Descriptor { dst_region: a.id().0, dst_offset: 100, ..good }, Status::Overlap),
        (Descriptor { flags: 1 << 9, ..good }, Status::ReservedFlags),
        (good, Status::Ok),
    ];
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    for (i, (d, _)) in cases.iter().enumerate() {
        queue.push(d.with_tag(i as u64)).unwrap();
    }
    let done = collect(&mut queue, cases.len());
    for (i, (c, (_, want))) in done.iter().zip(&cases).enumerate() {
        assert_eq!((c.tag, c.status()), (i as u64, Ok(*want)), "case {i}");
        assert_eq!(c.bytes, if *want == Status::Ok { 4096 } else { 0 });
    }
}

#[test]
fn out_of_order_and_partial_transport_completions_come_back_in_order() {
    let engine = fault_engine(|t| t.reverse_completions().accept_at_most(3));
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let n = 3000;
    for i in 0..n {
        let d = Descriptor::copy(a.id(), (i % 256) * 4096, b.id(), (i % 256) * 4096, 4096).with_tag(i);
        let mut d = d;
        loop {
            match queue.push(d) {
                Ok(()) => break,
                Err(ferry::PushError::Full(back)) => d = back,
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    let done = collect(&mut queue, n as usize);
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.tag, c.seq, c.status()), (i as u64, i as u64, Ok(Status::Ok)));
    }
}

#[test]
fn injected_errors_fail_exactly_the_affected_descriptors_and_other_queues_carry_on() {
    const MARK: u64 = 777;
    let engine = fault_engine(|t| t.fail_when(|_, op| (op.copy().len() == MARK).then_some(5)));
    let (c1, c2) = (engine.new_client(), engine.new_client());
    let (a1, b1) = (engine.allocate_host(c1, 1 << 20).unwrap(), engine.allocate_host(c1, 1 << 20).unwrap());
    let (a2, b2) = (engine.allocate_host(c2, 1 << 20).unwrap(), engine.allocate_host(c2, 1 << 20).unwrap());
    a1.fill(0, 1 << 20, 1).unwrap();
    a2.fill(0, 1 << 20, 2).unwrap();
    let mut q1 = engine.open_queue(c1, QueueConfig::default()).unwrap();
    let mut q2 = engine.open_queue(c2, QueueConfig::default()).unwrap();
    let n = 1000u64;
    let len = |i: u64| if i % 7 == 3 { MARK } else { 512 };
    let d1: Vec<_> =
        (0..n).map(|i| Descriptor::copy(a1.id(), i * 1024, b1.id(), i * 1024, len(i)).with_tag(i)).collect();
    let d2: Vec<_> = (0..n).map(|i| Descriptor::copy(a2.id(), i * 1024, b2.id(), i * 1024, 512).with_tag(i)).collect();
    assert_eq!(q1.submit(&d1).unwrap(), n as usize);
    assert_eq!(q2.submit(&d2).unwrap(), n as usize);
    let done1 = collect(&mut q1, n as usize);
    let done2 = collect(&mut q2, n as usize);
    for c in &done1 {
        if len(c.tag) == MARK {
            assert_eq!((c.status(), c.detail, c.bytes), (Ok(Status::TransportFailed), 5, 0), "tag {}", c.tag);
        } else {
            assert_eq!(c.status(), Ok(Status::Ok), "tag {}", c.tag);
        }
    }
    assert!(done2.iter().all(|c| c.is_ok()));
    // The failed copies wrote nothing; the others did.
    let mut byte = [0u8];
    for i in 0..n {
        b1.read((i * 1024) as usize, &mut byte).unwrap();
        assert_eq!(byte[0], if len(i) == MARK { 0 } else { 1 }, "descriptor {i}");
    }
    // The engine still works on the failing queue afterwards.
    q1.push(Descriptor::copy(a1.id(), 0, b1.id(), 0, 64).with_tag(n)).unwrap();
    assert!(q1.wait_one(TIMEOUT).unwrap().is_ok());
}

#[test]
fn a_full_submission_ring_hands_the_descriptor_back() {
    let (gate, engine, client, a, b) = gated_engine();
    let cfg = QueueConfig { submit_capacity: 8, complete_capacity: 64, ..QueueConfig::default() };
    let mut queue = engine.open_queue(client, cfg).unwrap();
    // The worker takes 8 (its window is the submission capacity) and the gate holds them; then
    // 8 more fill the ring.
    let d = |i: u64| Descriptor::copy(a.id(), i * 64, b.id(), i * 64, 64).with_tag(i);
    let mut pushed = 0;
    let mut refused = None;
    for i in 0..64 {
        match queue.push(d(i)) {
            Ok(()) => pushed += 1,
            Err(ferry::PushError::Full(back)) => {
                refused = Some(back);
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
        if i == 7 {
            wait_until("the worker to take the first 8", || engine.stats()[0].descriptors == 8);
        }
    }
    assert_eq!(pushed, 16);
    assert_eq!(refused, Some(d(16)), "the refused descriptor comes back unchanged");
    gate.open();
    let done = collect(&mut queue, 16);
    assert!(done.iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.is_ok()));
}

#[test]
fn a_full_completion_ring_holds_the_queue_without_loss() {
    let engine = host_engine();
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    let cfg = QueueConfig { submit_capacity: 64, complete_capacity: 4, ..QueueConfig::default() };
    let mut queue = engine.open_queue(client, cfg).unwrap();
    let d = |i: u64| Descriptor::copy(a.id(), (i % 128) * 64, b.id(), (i % 128) * 64, 64).with_tag(i);
    let first: Vec<_> = (0..64).map(d).collect();
    assert_eq!(queue.submit(&first).unwrap(), 64);
    wait_until("the first 64 to be taken", || engine.stats()[0].descriptors == 64);
    wait_until("4 completions (the ring's capacity)", || queue.watermark() == 4);
    // The submission ring is empty again: 64 more fit, but the worker must not take them while
    // the completion ring is full.
    let second: Vec<_> = (64..128).map(d).collect();
    assert_eq!(queue.submit(&second).unwrap(), 64);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(engine.stats()[0].descriptors, 64, "new work taken while completions were held");
    assert_eq!(queue.watermark(), 4);
    let done = collect(&mut queue, 128);
    assert!(done.iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.seq == i as u64 && c.is_ok()));
    assert_eq!(queue.watermark(), 128);
}

#[test]
fn a_fence_waits_for_every_earlier_descriptor() {
    let (gate, engine, client, a, b) = gated_engine();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let d = |i: u64| Descriptor::copy(a.id(), i * 64, b.id(), i * 64, 64).with_tag(i);
    queue.submit(&[d(0), d(1), d(2).fenced(), d(3)]).unwrap();
    wait_until("two descriptors taken", || engine.stats()[0].descriptors == 2);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(engine.stats()[0].descriptors, 2, "the fence started before earlier work completed");
    gate.open();
    let done = collect(&mut queue, 4);
    assert!(done.iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.is_ok()));
}

#[test]
fn poll_wait_waits_for_its_minimum_and_returns_what_it_has_at_the_timeout() {
    let (gate, engine, client, a, b) = gated_engine();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let d = |i: u64| Descriptor::copy(a.id(), i * 64, b.id(), i * 64, 64).with_tag(i);
    queue.submit(&[d(0), d(1), d(2), d(3)]).unwrap();
    let mut out = [ferry::Completion::default(); 8];
    let start = std::time::Instant::now();
    assert_eq!(queue.poll_wait(&mut out, 2, Duration::from_millis(30)).unwrap(), 0, "nothing can complete yet");
    assert!(start.elapsed() >= Duration::from_millis(30), "returned before the timeout");
    gate.open();
    // min above what out holds is capped at out's length.
    let got = queue.poll_wait(&mut out[..4], 9, Duration::from_secs(5)).unwrap();
    assert_eq!(got, 4);
    assert!(out[..4].iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.is_ok()));
}

#[test]
fn deregistration_is_refused_while_copies_are_in_flight() {
    let (gate, engine, client, a, b) = gated_engine();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    queue.push(Descriptor::copy(a.id(), 0, b.id(), 0, 4096).with_tag(1)).unwrap();
    wait_until("the copy to be taken", || engine.stats()[0].descriptors == 1);
    match engine.deregister(b.id()) {
        Err(Error::RegionBusy { id, in_flight }) => assert_eq!((id, in_flight), (b.id(), 1)),
        other => panic!("expected RegionBusy, got {other:?}"),
    }
    let message = engine.deregister(a.id()).unwrap_err().to_string();
    assert!(message.contains("in flight"), "{message}");
    gate.open();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
    engine.deregister(b.id()).unwrap();
    assert!(matches!(engine.deregister(b.id()), Err(Error::UnknownRegion { .. })));
    // The stale id names no later region (its slot's reuse: a_deregistered_regions_id_names_no_later_region).
    let c = engine.allocate_host(client, 4096).unwrap();
    assert_ne!(c.id(), b.id());
    queue.push(Descriptor::copy(a.id(), 0, b.id(), 0, 64).with_tag(2)).unwrap();
    assert_eq!(queue.wait_one(TIMEOUT).unwrap().status(), Ok(Status::UnknownRegion));
}

#[test]
fn caller_memory_can_be_registered_and_bad_ranges_are_refused() {
    let engine = host_engine();
    let client = engine.new_client();
    let mut src = vec![7u8; 8192];
    let mut dst = vec![0u8; 8192];
    // SAFETY: both vectors outlive their registrations (deregistered below) and are not touched
    // while the copy is in flight.
    let (s, d) = unsafe {
        (
            engine.register_host(client, src.as_mut_ptr(), src.len()).unwrap(),
            engine.register_host(client, dst.as_mut_ptr(), dst.len()).unwrap(),
        )
    };
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    queue.push(Descriptor::copy(s, 100, d, 200, 5000)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
    engine.deregister(s).unwrap();
    engine.deregister(d).unwrap();
    assert!(dst[200..5200].iter().all(|&x| x == 7) && dst[..200].iter().all(|&x| x == 0));
    // SAFETY: these calls are refused before anything is registered.
    unsafe {
        assert!(matches!(
            engine.register_host(client, std::ptr::null_mut(), 10),
            Err(Error::BadRange { reason: "null address", .. })
        ));
        assert!(matches!(
            engine.register_host(client, src.as_mut_ptr(), 0),
            Err(Error::BadRange { reason: "zero length", .. })
        ));
        assert!(matches!(engine.register_host(client, usize::MAX as *mut u8, 2), Err(Error::BadRange { .. })));
    }
}

#[test]
fn the_region_table_reports_when_full() {
    let engine = Engine::start(EngineConfig { max_regions: 2, ..config(TransportKind::Null) }).unwrap();
    let client = engine.new_client();
    let _a = engine.allocate_host(client, 64).unwrap();
    let b = engine.allocate_host(client, 64).unwrap();
    assert!(matches!(engine.allocate_host(client, 64), Err(Error::RegionTableFull { capacity: 2 })));
    engine.deregister(b.id()).unwrap();
    engine.allocate_host(client, 64).unwrap();
}

#[test]
fn a_deregistered_regions_id_names_no_later_region() {
    // Four slots, one held: a buffer registered and deregistered over and over takes the other
    // three in turn, so 70 000 registrations (more than one slot's 65 535 generations) hand out
    // no id twice, and the first one stays unknown to descriptors throughout.
    let engine = Engine::start(EngineConfig { max_regions: 4, ..config(TransportKind::Host) }).unwrap();
    let client = engine.new_client();
    let (mut held, mut buffer) = (vec![0u8; 4096], vec![7u8; 4096]);
    // SAFETY: both vectors outlive the engine's use of them: `held` is registered until the
    // engine drops at the end, and each registration of `buffer` is deregistered in its round.
    let held_id = unsafe { engine.register_host(client, held.as_mut_ptr(), held.len()) }.unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut first = None;
    for round in 0..70_000u32 {
        // SAFETY: as above.
        let id = unsafe { engine.register_host(client, buffer.as_mut_ptr(), buffer.len()) }.unwrap();
        assert!(seen.insert(id), "round {round} was given {id:?} again");
        let stale = *first.get_or_insert(id);
        if round % 5000 == 1 {
            queue.push(Descriptor::copy(stale, 0, held_id, 0, 64)).unwrap();
            assert_eq!(queue.wait_one(TIMEOUT).unwrap().status(), Ok(Status::UnknownRegion), "round {round}");
        }
        engine.deregister(id).unwrap();
    }
    assert!(held.iter().all(|&b| b == 0), "a stale id copied");
}

#[test]
fn workers_pin_to_their_cores_and_a_bad_core_is_named() {
    let online = ferry_topology::cpu::online_cpus(std::path::Path::new("/sys")).unwrap();
    let last = *online.last().unwrap();
    let engine =
        Engine::start(EngineConfig { cores: CorePlacement::Cores(vec![last]), ..config(TransportKind::Null) }).unwrap();
    assert_eq!(engine.worker_cores(), vec![Some(last)]);
    drop(engine);
    let err = Engine::start(EngineConfig { cores: CorePlacement::Cores(vec![4000]), ..config(TransportKind::Null) })
        .err()
        .unwrap();
    assert!(matches!(err, Error::CoreOffline { core: 4000, .. }), "{err}");
    assert!(err.to_string().contains("core 4000"), "{err}");
}

#[test]
fn several_workers_serve_their_own_queues() {
    let engine = Engine::start(EngineConfig { workers: 2, ..config(TransportKind::Host) }).unwrap();
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    let mut queues: Vec<_> = (0..4).map(|_| engine.open_queue(client, QueueConfig::default()).unwrap()).collect();
    for (qi, q) in queues.iter_mut().enumerate() {
        let ds: Vec<_> = (0..100u64)
            .map(|i| Descriptor::copy(a.id(), i * 64, b.id(), (qi as u64) * 65536 + i * 64, 64).with_tag(i))
            .collect();
        q.submit(&ds).unwrap();
    }
    for q in &mut queues {
        assert!(collect(q, 100).iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.is_ok()));
    }
    let stats = engine.stats();
    assert_eq!(stats.iter().map(|s| s.descriptors).sum::<u64>(), 400);
    assert!(stats.iter().all(|s| s.descriptors == 200), "queues are spread over workers: {stats:?}");
}

#[test]
fn shutdown_finishes_started_copies_and_cancels_the_rest() {
    let (gate, engine, client, a, b) = gated_engine();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let d = |i: u64| Descriptor::copy(a.id(), i * 64, b.id(), i * 64, 64).with_tag(i);
    queue.submit(&[d(0), d(1).fenced(), d(2), d(3)]).unwrap();
    wait_until("the first copy to be taken", || engine.stats()[0].descriptors == 1);
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        gate.open();
    });
    engine.shutdown();
    opener.join().unwrap();
    let done = collect(&mut queue, 4);
    let statuses: Vec<_> = done.iter().map(|c| (c.tag, c.status().unwrap())).collect();
    assert_eq!(statuses, vec![(0, Status::Ok), (1, Status::Cancelled), (2, Status::Cancelled), (3, Status::Cancelled)]);
    assert_eq!(queue.state(), QueueState::Closed);
    assert_eq!(queue.watermark(), 4);
    assert!(matches!(queue.push(d(4)), Err(ferry::PushError::NotOpen(_, QueueState::Closed))));
    assert!(matches!(queue.wait_one(TIMEOUT), Err(Error::QueueNotOpen { .. })));
}

#[test]
fn closing_a_queue_with_copies_in_flight_keeps_their_regions_counted_until_they_finish() {
    let (gate, engine, client, a, b) = gated_engine();
    a.fill(0, 1 << 20, 0x5A).unwrap();
    let d = |i: u64| Descriptor::copy(a.id(), i * 4096, b.id(), i * 4096, 4096).with_tag(i);
    let mut closed = engine.open_queue(client, QueueConfig::default()).unwrap();
    // Four copies reach the transport (the gate holds them); the fence keeps the other four in
    // the submission ring.
    closed.submit(&[d(0), d(1), d(2), d(3), d(4).fenced(), d(5), d(6), d(7)]).unwrap();
    wait_until("four copies to be taken", || engine.stats()[0].descriptors == 4);
    closed.close();
    let seen = engine.stats()[0].iterations;
    wait_until("the worker to visit the closed queue", || engine.stats()[0].iterations >= seen + 2);
    // The started copies still count against their regions, and the queue is not freed.
    match engine.deregister(a.id()) {
        Err(Error::RegionBusy { in_flight, .. }) => assert_eq!(in_flight, 4),
        other => panic!("expected RegionBusy, got {other:?}"),
    }
    assert_eq!(engine.stats()[0].queues, 1);
    // A queue opened meanwhile gets its own slot: none of the closed queue's completions
    // reach it.
    let mut open = engine.open_queue(client, QueueConfig::default()).unwrap();
    open.push(Descriptor::copy(a.id(), 0, b.id(), 64 * 4096, 4096).with_tag(100)).unwrap();
    gate.open();
    let done = open.wait_one(TIMEOUT).unwrap();
    assert_eq!((done.tag, done.seq, done.status()), (100, 0, Ok(Status::Ok)));
    wait_until("the closed queue to be freed", || engine.stats()[0].queues == 1);
    let mut out = [ferry::Completion::default(); 8];
    assert_eq!(open.poll(&mut out).unwrap(), 0, "another queue's completion arrived");
    // The started copies ran to the end; the four left in the ring never started.
    let mut block = vec![0u8; 4096];
    for i in 0..8 {
        b.read(i * 4096, &mut block).unwrap();
        let expected = if i < 4 { 0x5A } else { 0 };
        assert!(block.iter().all(|&x| x == expected), "block {i}");
    }
    open.close();
    wait_until("both queues to be freed", || engine.stats()[0].queues == 0);
    engine.deregister(a.id()).unwrap();
    engine.deregister(b.id()).unwrap();
}

#[test]
fn queues_are_spread_by_how_many_each_worker_serves_now() {
    let engine = Engine::start(EngineConfig { workers: 2, ..config(TransportKind::Null) }).unwrap();
    let client = engine.new_client();
    let queues = |engine: &Engine| engine.stats().iter().map(|s| s.queues).collect::<Vec<_>>();
    let first = engine.open_queue(client, QueueConfig::default()).unwrap();
    let second = engine.open_queue(client, QueueConfig::default()).unwrap();
    assert_eq!(queues(&engine), vec![1, 1]);
    drop(first);
    wait_until("the first queue to be freed", || queues(&engine) == vec![0, 1]);
    // The next queue goes to the worker that is now free.
    let _third = engine.open_queue(client, QueueConfig::default()).unwrap();
    assert_eq!(queues(&engine), vec![1, 1]);
    drop(second);
}

/// An engine whose fault transport holds every copy behind a closed gate, a client and two 1 MiB
/// host regions of it.
fn gated_engine() -> (Gate, Engine, ferry::ClientId, ferry::HostBuffer, ferry::HostBuffer) {
    let gate = Gate::new();
    gate.close();
    let g = gate.clone();
    let engine = fault_engine(move |t| t.with_gate(g.clone()));
    let client = engine.new_client();
    let a = engine.allocate_host(client, 1 << 20).unwrap();
    let b = engine.allocate_host(client, 1 << 20).unwrap();
    (gate, engine, client, a, b)
}

#[test]
fn a_queue_on_a_gpu_the_engine_lacks_is_refused() {
    // A host engine counts as one GPU's worth of workers: GPU 0 is every worker, GPU 1 is none.
    let engine = common::host_engine();
    let client = engine.new_client();
    assert_eq!(engine.worker_gpus(), vec![0]);
    assert!(engine.cuda_contexts().is_empty());
    engine.open_queue(client, QueueConfig { gpu: Some(0), ..QueueConfig::default() }).unwrap();
    match engine.open_queue(client, QueueConfig { gpu: Some(1), ..QueueConfig::default() }) {
        Err(e @ Error::InvalidSetting { .. }) => assert!(e.to_string().contains("below the engine's 1 GPU"), "{e}"),
        other => panic!("expected a refusal, got {:?}", other.map(|q| q.id())),
    }
}
