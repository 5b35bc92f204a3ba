//! Two real processes over one memfd. The child is this test binary run again with
//! `--ignored --exact <helper>` and the parent's descriptors named in environment variables;
//! it opens them through /proc/<parent>/fd.

mod common;

use common::*;
use ferry::internals::ring::layout::ring_bytes;
use ferry::internals::ring::shm::SharedMemory;
use ferry::internals::ring::{Consumer, Producer, RingMemory};
use ferry::{Descriptor, Queue, QueueConfig, RegionId, Status};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
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

fn run_child(helper: &str, env: &[(&str, String)]) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", helper, "--nocapture", "--test-threads", "1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .unwrap();
    assert!(status.success(), "child {helper} failed: {status}");
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
    let queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let env = [
        ("FERRY_TEST_QUEUE_FD", queue.file().as_raw_fd().to_string()),
        ("FERRY_TEST_SRC_FD", src.file().as_raw_fd().to_string()),
        ("FERRY_TEST_DST_FD", dst.file().as_raw_fd().to_string()),
        ("FERRY_TEST_SRC_ID", src.id().0.to_string()),
        ("FERRY_TEST_DST_ID", dst.id().0.to_string()),
    ];
    run_child("child_client", &env);
    assert_eq!(queue.watermark(), 100_000);
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
