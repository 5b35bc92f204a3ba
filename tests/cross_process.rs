//! Two real processes over one memfd. The child is this test binary run again with
//! `--ignored --exact <helper>` and the parent's descriptors named in environment variables;
//! it opens them through /proc/<parent>/fd. Also: each end of a queue is claimed by one
//! process, and a killed client's end is taken over.

mod common;

use common::*;
use ferry::internals::ring::layout::ring_bytes;
use ferry::internals::ring::shm::SharedMemory;
use ferry::internals::ring::{Consumer, Producer, RingMemory};
use ferry::QueueEnd;
use ferry::{Descriptor, Engine, Error, HostBuffer, Queue, QueueConfig, QueueState, RegionId, Status};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

const COUNT: u64 = 10_000_000;
const CAPACITY: u64 = 4096;

fn open_parent_fd(var: &str) -> File {
    let fd: i32 = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} not set: this helper is started by another test"))
        .parse()
        .unwrap();
    let parent = std::os::unix::process::parent_id();
    File::options().read(true).write(true).open(format!("/proc/{parent}/fd/{fd}")).unwrap()
}

fn child_command(helper: &str, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--ignored", "--exact", helper, "--nocapture", "--test-threads", "1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

fn run_child(helper: &str, env: &[(&str, String)]) {
    let status = child_command(helper, env).status().unwrap();
    assert!(status.success(), "child {helper} failed: {status}");
}

/// Starts a helper with its stdout piped and waits until it prints `marker` on a line; the rest
/// of its output is passed on by a thread, so that the child never writes into a closed pipe.
fn spawn_child_until(helper: &str, env: &[(&str, String)], marker: &str) -> Child {
    let mut child = child_command(helper, env).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            // libtest prints "test <name> ... " before the helper runs, on the same line.
            Some(line) if line.as_ref().unwrap().ends_with(marker) => break,
            Some(_) => {}
            None => panic!("child {helper} exited before printing {marker}: {:?}", child.wait()),
        }
    }
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| println!("child: {line}")));
    child
}

/// A descriptor whose every field derives from `i`, so a torn or stale slot is caught.
fn numbered(i: u64) -> Descriptor {
    Descriptor {
        tag: i,
        src_region: i as u32,
        dst_region: !(i as u32),
        src_offset: i * 3,
        dst_offset: i ^ 0x5555,
        len: i + 1,
        ..Default::default()
    }
}

#[test]
fn ten_million_descriptors_from_another_process_arrive_once_and_in_order() {
    let memory = Arc::new(SharedMemory::create("cross-process-ring", ring_bytes(CAPACITY, 64)).unwrap());
    let ring = Arc::new(RingMemory::<Descriptor>::create(memory.clone(), 0, CAPACITY).unwrap());
    let mut consumer = Consumer::new(ring);
    let fd = memory.file().as_raw_fd();
    let start = Instant::now();
    let child =
        std::thread::spawn(move || run_child("child_pushes_ten_million", &[("FERRY_TEST_RING_FD", fd.to_string())]));
    let mut expected = 0u64;
    while expected < COUNT {
        let batch = consumer.read(256).unwrap();
        for d in batch {
            assert_eq!(d, numbered(expected), "descriptor {expected} missing, repeated or torn");
            expected += 1;
        }
        assert!(start.elapsed() < TIMEOUT * 6, "only {expected} descriptors arrived");
    }
    child.join().unwrap();
    assert_eq!(consumer.pop().unwrap(), None, "more than {COUNT} descriptors arrived");
    println!("{COUNT} descriptors across processes in {:?}", start.elapsed());
}

#[test]
#[ignore = "helper: started by ten_million_descriptors_from_another_process_arrive_once_and_in_order"]
fn child_pushes_ten_million() {
    let memory = Arc::new(SharedMemory::open(open_parent_fd("FERRY_TEST_RING_FD")).unwrap());
    let mut producer = Producer::new(Arc::new(RingMemory::<Descriptor>::attach(memory, 0).unwrap()));
    let mut i = 0;
    while i < COUNT {
        let mut batch = producer.write();
        while i < COUNT && batch.push(numbered(i)).is_ok() {
            i += 1;
        }
    }
}

#[test]
fn a_client_in_another_process_copies_through_the_engine() {
    let engine = host_engine();
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 20).unwrap();
    let dst = engine.allocate_host(client, 1 << 20).unwrap();
    // The child takes over the client end: this process releases its claim.
    let queue = engine.open_queue(client, QueueConfig::default()).unwrap().hand_off().unwrap();
    let env = [
        ("FERRY_TEST_QUEUE_FD", queue.as_raw_fd().to_string()),
        ("FERRY_TEST_SRC_FD", src.file().as_raw_fd().to_string()),
        ("FERRY_TEST_DST_FD", dst.file().as_raw_fd().to_string()),
        ("FERRY_TEST_SRC_ID", src.id().0.to_string()),
        ("FERRY_TEST_DST_ID", dst.id().0.to_string()),
    ];
    run_child("child_client", &env);
    assert_eq!(engine.stats()[0].descriptors, 100_000);
    // The child's Queue closed the queue when it dropped; the worker frees it.
    wait_until("the worker to free the queue the child closed", || engine.stats()[0].queues == 0);
    assert!(matches!(Queue::attach(queue), Err(Error::QueueNotOpen { state: QueueState::ClosedByClient, .. })));
}

#[test]
#[ignore = "helper: started by a_client_in_another_process_copies_through_the_engine"]
fn child_client() {
    let mut queue = Queue::attach(open_parent_fd("FERRY_TEST_QUEUE_FD")).unwrap();
    let src = SharedMemory::open(open_parent_fd("FERRY_TEST_SRC_FD")).unwrap();
    let dst = SharedMemory::open(open_parent_fd("FERRY_TEST_DST_FD")).unwrap();
    let id = |var: &str| RegionId(std::env::var(var).unwrap().parse().unwrap());
    let (src_id, dst_id) = (id("FERRY_TEST_SRC_ID"), id("FERRY_TEST_DST_ID"));
    // SAFETY: the mappings are 1 MiB each and nothing copies into `src`.
    let (src_bytes, dst_bytes) = unsafe {
        (std::slice::from_raw_parts_mut(src.as_ptr(), 1 << 20), std::slice::from_raw_parts(dst.as_ptr(), 1 << 20))
    };
    for (i, b) in src_bytes.iter_mut().enumerate() {
        *b = (i * 7 + 1) as u8;
    }
    let n = 100_000u64;
    let mut sent = 0;
    let mut received = 0;
    let mut out = [ferry::Completion::default(); 128];
    let start = Instant::now();
    while received < n {
        if sent < n {
            let block = sent % 256;
            let d = Descriptor::copy(src_id, block * 4096, dst_id, block * 4096, 4096).with_tag(sent);
            if queue.push(d).is_ok() {
                sent += 1;
            }
        }
        let k = queue.poll(&mut out).unwrap();
        for c in &out[..k] {
            assert_eq!((c.tag, c.status()), (received, Ok(Status::Ok)));
            received += 1;
        }
        assert!(start.elapsed() < TIMEOUT, "{received} of {n} completions");
    }
    assert_eq!(queue.watermark(), n);
    assert!(dst_bytes.iter().enumerate().all(|(i, &b)| b == (i * 7 + 1) as u8), "destination differs");
}

/// Env for a child that attaches a queue and copies between two regions of the parent.
fn client_env(queue: &File, src: &HostBuffer, dst: &HostBuffer) -> [(&'static str, String); 3] {
    [
        ("FERRY_TEST_QUEUE_FD", queue.as_raw_fd().to_string()),
        ("FERRY_TEST_SRC_ID", src.id().0.to_string()),
        ("FERRY_TEST_DST_ID", dst.id().0.to_string()),
    ]
}

fn two_regions(engine: &Engine) -> (ferry::ClientId, HostBuffer, HostBuffer) {
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 16).unwrap();
    let dst = engine.allocate_host(client, 1 << 16).unwrap();
    for i in 0..16 {
        src.fill(i * 4096, 4096, i as u8 + 1).unwrap();
    }
    (client, src, dst)
}

/// Pushes a copy of 4 KiB block `block` and waits for its completion (skipping completions of
/// earlier descriptors, which a previous holder of the end may have left unread).
fn copy_block(queue: &mut Queue, src: RegionId, dst: RegionId, block: u64) {
    let seq = queue.pushed();
    queue.push(Descriptor::copy(src, block * 4096, dst, block * 4096, 4096).with_tag(block)).unwrap();
    loop {
        let c = queue.wait_one(TIMEOUT).unwrap();
        if c.seq == seq {
            assert_eq!((c.tag, c.status()), (block, Ok(Status::Ok)));
            return;
        }
    }
}

#[test]
fn an_end_is_claimed_once_in_this_process() {
    let engine = host_engine();
    let (client, src, dst) = two_regions(&engine);
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let id = queue.id().0;
    let file = queue.file().try_clone().unwrap();
    let me = std::process::id();
    match Queue::attach(file.try_clone().unwrap()) {
        Err(e @ Error::QueueEndClaimed { queue, end: QueueEnd::Client, pid }) => {
            assert_eq!((queue, pid), (id, me));
            let text = e.to_string();
            for part in [format!("queue {id}"), "client end".into(), format!("process {me} (this process)")] {
                assert!(text.contains(&part), "{text:?} does not name {part:?}");
            }
        }
        other => panic!("expected QueueEndClaimed, got {:?}", other.map(|q| q.id())),
    }
    // The refused attach changed nothing: the first end still copies.
    copy_block(&mut queue, src.id(), dst.id(), 1);
    // Handed off, the end can be claimed again, here too.
    let file2 = queue.hand_off().unwrap();
    let mut queue = Queue::attach(file2).unwrap();
    copy_block(&mut queue, src.id(), dst.id(), 2);
    // Closed, it cannot.
    queue.close();
    match Queue::attach(file) {
        Err(e @ Error::QueueNotOpen { state: QueueState::ClosedByClient, .. }) => {
            assert!(e.to_string().contains("closed by its client"), "{e}");
        }
        other => panic!("expected QueueNotOpen, got {:?}", other.map(|q| q.id())),
    }
}

#[test]
fn a_second_process_cannot_claim_a_held_end() {
    let engine = host_engine();
    let (client, src, dst) = two_regions(&engine);
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let file = queue.file().try_clone().unwrap();
    run_child("child_is_refused_the_client_end", &client_env(&file, &src, &dst));
    copy_block(&mut queue, src.id(), dst.id(), 3);
}

#[test]
#[ignore = "helper: started by a_second_process_cannot_claim_a_held_end"]
fn child_is_refused_the_client_end() {
    let parent = std::os::unix::process::parent_id();
    match Queue::attach(open_parent_fd("FERRY_TEST_QUEUE_FD")) {
        Err(Error::QueueEndClaimed { end: QueueEnd::Client, pid, .. }) => assert_eq!(pid, parent),
        other => panic!("expected QueueEndClaimed, got {:?}", other.map(|q| q.id())),
    }
}

#[test]
fn a_killed_clients_end_is_taken_over_and_copies_still_complete() {
    let engine = host_engine();
    let (client, src, dst) = two_regions(&engine);
    let file = engine.open_queue(client, QueueConfig::default()).unwrap().hand_off().unwrap();
    let mut child = spawn_child_until("child_attaches_and_waits", &client_env(&file, &src, &dst), "attached");
    // The live child holds the end.
    match Queue::attach(file.try_clone().unwrap()) {
        Err(Error::QueueEndClaimed { end: QueueEnd::Client, pid, .. }) => assert_eq!(pid, child.id()),
        other => panic!("expected QueueEndClaimed, got {:?}", other.map(|q| q.id())),
    }
    child.kill().unwrap(); // SIGKILL: the child's claim stays in the header
    child.wait().unwrap();
    let mut queue = Queue::attach(file).unwrap();
    copy_block(&mut queue, src.id(), dst.id(), 5);
    let mut block = [0u8; 4096];
    for (i, expected) in [(4usize, 5u8), (5, 6)] {
        dst.read(i * 4096, &mut block).unwrap();
        assert!(block.iter().all(|&b| b == expected), "block {i} was not copied");
    }
    assert_eq!(engine.stats()[0].queues, 1);
    queue.close();
    wait_until("the worker to free the closed queue", || engine.stats()[0].queues == 0);
}

#[test]
fn a_killed_clients_queue_is_freed_when_it_asks_to_close_if_the_client_dies() {
    let engine = host_engine();
    let (client, src, dst) = two_regions(&engine);
    let config = QueueConfig { close_if_client_dies: true, ..QueueConfig::default() };
    let file = engine.open_queue(client, config).unwrap().hand_off().unwrap();
    // Released by hand_off and not attached yet: nobody holds the end, and the queue stays.
    std::thread::sleep(ferry::CLIENT_CHECK_INTERVAL * 3);
    assert_eq!(engine.stats()[0].queues, 1, "a queue waiting to be attached was closed");
    let mut child = spawn_child_until("child_attaches_and_waits", &client_env(&file, &src, &dst), "attached");
    std::thread::sleep(ferry::CLIENT_CHECK_INTERVAL * 3);
    assert_eq!(engine.stats()[0].queues, 1, "a live client's queue was closed");
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    wait_until("the worker to free the dead client's queue", || engine.stats()[0].queues == 0);
    let freed = killed.elapsed();
    println!("a SIGKILLed client's queue freed {freed:?} after its death");
    assert!(freed < std::time::Duration::from_millis(500), "freed only after {freed:?}");
    // Closed: it cannot be attached again.
    assert!(Queue::attach(file).is_err());
}

#[test]
#[ignore = "helper: started by a_killed_clients_end_is_taken_over_and_copies_still_complete and a_killed_clients_queue_is_freed_..."]
fn child_attaches_and_waits() {
    let mut queue = Queue::attach(open_parent_fd("FERRY_TEST_QUEUE_FD")).unwrap();
    let id = |var: &str| RegionId(std::env::var(var).unwrap().parse().unwrap());
    copy_block(&mut queue, id("FERRY_TEST_SRC_ID"), id("FERRY_TEST_DST_ID"), 4);
    println!("attached");
    // Until the parent kills this process.
    std::thread::sleep(TIMEOUT);
    panic!("not killed within {TIMEOUT:?}");
}

#[test]
fn a_client_in_another_process_sees_the_engine_shut_down() {
    let engine = host_engine();
    let (client, src, dst) = two_regions(&engine);
    let file = engine.open_queue(client, QueueConfig::default()).unwrap().hand_off().unwrap();
    let mut child = spawn_child_until("child_waits_for_shutdown", &client_env(&file, &src, &dst), "attached");
    engine.shutdown();
    let status = child.wait().unwrap();
    assert!(status.success(), "child_waits_for_shutdown failed: {status}");
}

#[test]
#[ignore = "helper: started by a_client_in_another_process_sees_the_engine_shut_down"]
fn child_waits_for_shutdown() {
    let mut queue = Queue::attach(open_parent_fd("FERRY_TEST_QUEUE_FD")).unwrap();
    let id = |var: &str| RegionId(std::env::var(var).unwrap().parse().unwrap());
    let (src, dst) = (id("FERRY_TEST_SRC_ID"), id("FERRY_TEST_DST_ID"));
    copy_block(&mut queue, src, dst, 6);
    println!("attached");
    wait_until("the engine to shut down", || queue.state() != QueueState::Open);
    assert_eq!(queue.state(), QueueState::Closed);
    assert!(matches!(queue.push(Descriptor::copy(src, 0, dst, 0, 64)), Err(ferry::PushError::NotOpen(..))));
    assert!(matches!(queue.wait_one(TIMEOUT), Err(Error::QueueNotOpen { state: QueueState::Closed, .. })));
    assert_eq!(queue.watermark(), 1);
}
