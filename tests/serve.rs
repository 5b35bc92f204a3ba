//! `ferry serve` with clients in this and in other processes (host transport): copies through
//! daemon-allocated memory and daemon-opened queues, regions that belong to their client, a
//! garbage frame or half a frame that costs only its own connection, a SIGKILLed client's queues and memory
//! freed, SIGTERM stopping the daemon and removing its socket.

mod common;

use common::daemon::Daemon;
use common::TIMEOUT;
use ferry::{Client, Descriptor, Error, Queue, Status};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Copies `blocks` 4 KiB blocks from `src` to `dst` (block i to block i) through `queue`.
fn copy(queue: &mut Queue, src: ferry::RegionId, dst: ferry::RegionId, blocks: u64) -> Vec<ferry::Completion> {
    let descs: Vec<Descriptor> =
        (0..blocks).map(|i| Descriptor::copy(src, i * 4096, dst, i * 4096, 4096).with_tag(i)).collect();
    assert_eq!(queue.submit(&descs).unwrap(), descs.len());
    (0..blocks).map(|_| queue.wait_one(TIMEOUT).unwrap()).collect()
}

#[test]
fn clients_copy_through_the_daemon_and_regions_are_their_own() {
    let daemon = Daemon::start("copies");
    let mut a = Client::connect(&daemon.socket).unwrap();
    let src = a.alloc_host(1 << 20).unwrap();
    let dst = a.alloc_host(1 << 20).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 7 + 3) as u8).collect();
    src.write(0, &pattern).unwrap();
    let mut queue = a.open_queue(0, 0).unwrap();
    let done = copy(&mut queue, src.id(), dst.id(), 64);
    assert!(done.iter().enumerate().all(|(i, c)| c.tag == i as u64 && c.is_ok()), "{done:?}");
    let mut got = vec![0u8; 64 * 4096];
    dst.read(0, &mut got).unwrap();
    assert!(got == pattern[..64 * 4096], "the bytes did not arrive");
    // Another client may not name a's regions, nor free them.
    let mut b = Client::connect(&daemon.socket).unwrap();
    assert_ne!(a.id(), b.id());
    let mut theirs = b.open_queue(0, 0).unwrap();
    let done = copy(&mut theirs, src.id(), dst.id(), 1);
    assert_eq!(done[0].status(), Ok(Status::NotOwner));
    match b.free(src.id()) {
        Err(Error::Daemon { message }) => assert!(message.contains("not this client's"), "{message}"),
        other => panic!("expected the daemon's refusal, got {other:?}"),
    }
    a.free(dst.id()).unwrap();
    // Over the host bytes a client may hold (16 GiB by default): a clear refusal, nothing lost.
    match b.alloc_host(17 << 30) {
        Err(Error::Daemon { message }) => assert!(message.contains("limits.host_bytes_per_client"), "{message}"),
        other => panic!("expected the limit's refusal, got {other:?}"),
    }
    assert!(b.alloc_host(4096).is_ok(), "the client goes on after a refusal");
    drop((queue, theirs, a, b));
    daemon.expect_line("gone");
    daemon.stop();
}

#[test]
fn a_garbage_frame_costs_only_its_own_connection() {
    let daemon = Daemon::start("garbage");
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\nand more bytes than a header").unwrap();
    daemon.expect_line("disconnecting it");
    // The daemon answered with its reason and hung up; others are served.
    let mut client = Client::connect(&daemon.socket).unwrap();
    let buf = client.alloc_host(8192).unwrap();
    let mut queue = client.open_queue(0, 0).unwrap();
    buf.write(0, b"still here").unwrap();
    queue.push(Descriptor::copy(buf.id(), 0, buf.id(), 4096, 10)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
    let mut got = [0u8; 10];
    buf.read(4096, &mut got).unwrap();
    assert_eq!(&got, b"still here");
    // Half a frame, then silence: the daemon ends that connection after FRAME_TIMEOUT.
    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled.write_all(&ferry::control::Frame::Hello { abi: 1 }.encode()[..5]).unwrap();
    let sent = Instant::now();
    daemon.expect_line("not complete within");
    let waited = sent.elapsed();
    assert!(waited >= ferry::control::FRAME_TIMEOUT, "ended after {waited:?}, before the frame timeout");
    stalled.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stalled, &mut rest);
    assert!(String::from_utf8_lossy(&rest).contains("not complete within"), "the daemon said {rest:?}");
    queue.push(Descriptor::copy(buf.id(), 0, buf.id(), 4096, 10)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok(), "the other client went on meanwhile");
    drop((queue, client));
    daemon.stop();
}

#[test]
fn a_killed_clients_queues_and_memory_are_freed() {
    let daemon = Daemon::start("killed");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_serve_client", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("FERRY_TEST_SOCKET", &daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child client ended before it was ready");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    daemon.expect_line("gone");
    println!("the killed client's connection was cleaned up {:?} after the kill", killed.elapsed());
    // The daemon goes on.
    let mut client = Client::connect(&daemon.socket).unwrap();
    assert!(client.alloc_host(4096).is_ok());
    drop(client);
    daemon.stop();
}

#[test]
fn a_daemon_killed_under_load_is_engine_gone_for_every_loaded_client() {
    let mut daemon = Daemon::start("killed-loaded");
    let killed = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let (ready_tx, ready) = mpsc::channel();
    let clients: Vec<_> = (0..3)
        .map(|k| {
            let (socket, killed, ready_tx) = (daemon.socket.clone(), killed.clone(), ready_tx.clone());
            std::thread::spawn(move || {
                let engine = ferry::Engine::connect(&socket).unwrap();
                let client = engine.new_client();
                let buf = engine.allocate_host(client, 1 << 20).unwrap();
                let mut queue = engine.open_queue(client, ferry::QueueConfig::default()).unwrap();
                let batch: Vec<Descriptor> =
                    (0..64).map(|i| Descriptor::copy(buf.id(), i * 4096, buf.id(), (128 + i) * 4096, 4096)).collect();
                let mut out = [ferry::Completion::default(); 256];
                let (mut done, mut signalled) = (0u64, false);
                // Push and poll until an error: the daemon's death.
                let error = loop {
                    if let Err(e) = queue.submit(&batch) {
                        break e;
                    }
                    match queue.poll(&mut out) {
                        Ok(n) => done += n as u64,
                        Err(e) => break e,
                    }
                    if done > 10_000 && !signalled {
                        ready_tx.send(k).unwrap();
                        signalled = true;
                    }
                    assert!(
                        killed.get().is_none_or(|t| t.elapsed() < Duration::from_secs(2)),
                        "client {k}: no error 2 s after the kill"
                    );
                };
                let after = killed.get().map(|t| t.elapsed());
                (k, done, error, after)
            })
        })
        .collect();
    for _ in 0..3 {
        ready.recv_timeout(TIMEOUT).expect("every client moves copies before the kill");
    }
    // The time is taken just before the kill, so that no client can see the death before it.
    killed.set(Instant::now()).unwrap();
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    for handle in clients {
        let (k, done, error, after) = handle.join().unwrap();
        println!("client {k}: {done} copies, then {error} ({after:?} after the kill)");
        assert!(matches!(error, Error::EngineGone { .. }), "client {k}: {error:?}");
        assert!(after.is_some_and(|a| a < Duration::from_secs(1)), "client {k}: {after:?}");
    }
}

#[test]
fn a_killed_daemon_is_engine_gone_for_its_clients_and_a_restarted_one_serves_them_again() {
    let mut daemon = Daemon::start("restart");
    let mut client = Client::connect(&daemon.socket).unwrap();
    let buf = client.alloc_host(1 << 20).unwrap();
    let mut queue = client.open_queue(0, 0).unwrap();
    let mut small = client.open_queue(64, 64).unwrap();
    let d = Descriptor::copy(buf.id(), 0, buf.id(), 8192, 4096);
    assert!(queue.push(d).is_ok() && queue.wait_one(TIMEOUT).unwrap().is_ok());
    // Under load: copies in flight when the daemon is killed.
    assert_eq!(queue.submit(&[d; 200]).unwrap(), 200);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let killed = Instant::now();
    // Polling: what had completed comes out, then "engine gone", within a bounded time.
    let mut out = [ferry::Completion::default(); 64];
    let gone = loop {
        match queue.poll(&mut out) {
            Ok(_) => assert!(killed.elapsed() < Duration::from_secs(2), "no engine-gone within 2 s of the kill"),
            Err(e) => break e,
        }
    };
    assert!(matches!(gone, Error::EngineGone { pid, .. } if pid == daemon.child.id()), "{gone:?}");
    println!("poll said engine gone {:?} after the kill: {gone}", killed.elapsed());
    assert!(matches!(queue.submit(&[d]), Err(Error::EngineGone { .. })));
    assert!(matches!(queue.poll_wait(&mut out, 1, TIMEOUT), Err(Error::EngineGone { .. })));
    // Pushing into a ring that stays full says so too.
    let start = Instant::now();
    let pushed = loop {
        match small.submit(&[d]) {
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(2), "a full ring never said engine gone"),
            Err(e) => break e,
        }
    };
    assert!(matches!(pushed, Error::EngineGone { .. }), "{pushed:?}");
    // The control connection says the daemon hung up, not a hang.
    assert!(client.alloc_host(4096).is_err());
    drop((queue, small, buf, client));
    // A daemon restarted on the same socket serves the client again.
    let daemon = Daemon::start_at(daemon.socket.clone());
    let mut client = Client::connect(&daemon.socket).unwrap();
    let buf = client.alloc_host(1 << 16).unwrap();
    let mut queue = client.open_queue(0, 0).unwrap();
    assert!(queue.push(Descriptor::copy(buf.id(), 0, buf.id(), 8192, 4096).with_tag(7)).is_ok());
    let done = queue.wait_one(TIMEOUT).unwrap();
    assert!(done.is_ok() && done.tag == 7, "{done:?}");
    drop((queue, buf, client));
    daemon.stop();
}

#[test]
fn an_engine_connected_to_the_daemon_takes_the_same_calls() {
    let daemon = Daemon::start("connect");
    let engine = ferry::Engine::connect(&daemon.socket).unwrap();
    assert_eq!(engine.transport_name(), "daemon");
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 16).unwrap();
    let dst = engine.allocate_host(client, 1 << 16).unwrap();
    src.write(0, b"through the daemon").unwrap();
    let mut queue = engine.open_queue(client, ferry::QueueConfig::default()).unwrap();
    queue.push(Descriptor::copy(src.id(), 0, dst.id(), 100, 18).with_tag(3)).unwrap();
    let done = queue.wait_one(TIMEOUT).unwrap();
    assert!(done.is_ok() && done.tag == 3, "{done:?}");
    let mut got = [0u8; 18];
    dst.read(100, &mut got).unwrap();
    assert_eq!(&got, b"through the daemon");
    // Another client is another connection: the first one's regions are not its own.
    let other = engine.new_client();
    assert_ne!(other, client);
    let mut theirs = engine.open_queue(other, ferry::QueueConfig::default()).unwrap();
    theirs.push(Descriptor::copy(src.id(), 0, dst.id(), 0, 8)).unwrap();
    assert_eq!(theirs.wait_one(TIMEOUT).unwrap().status(), Ok(Status::NotOwner));
    // What a connected engine cannot do says so.
    let mut local = [0u8; 64];
    // SAFETY: refused before the memory is touched.
    let registered = unsafe { engine.register_host(client, local.as_mut_ptr(), local.len()) };
    assert!(matches!(registered, Err(Error::NotConnected { .. })), "{registered:?}");
    assert!(matches!(engine.set_sm_budget(ferry::SmBudget::None), Err(Error::NotConnected { .. })));
    let pinned = ferry::QueueConfig { worker: Some(0), ..ferry::QueueConfig::default() };
    assert!(matches!(engine.open_queue(client, pinned), Err(Error::NotConnected { .. })));
    // SAFETY: refused before the stream is touched.
    let waited = unsafe { engine.stream_wait(&mut queue, std::ptr::null_mut(), 1) };
    assert!(matches!(waited, Err(Error::StreamOrdering { .. })), "{waited:?}");
    assert!(engine.open_queue(ferry::ClientId(999), ferry::QueueConfig::default()).is_err(), "an unknown client");
    assert!(engine.stats().is_empty());
    // Deregistering frees the region in the daemon: a copy naming it fails afterwards.
    let dst_id = dst.id();
    drop(dst);
    engine.deregister(dst_id).unwrap();
    queue.push(Descriptor::copy(src.id(), 0, dst_id, 0, 8)).unwrap();
    assert_eq!(queue.wait_one(TIMEOUT).unwrap().status(), Ok(Status::UnknownRegion));
    drop((queue, theirs, src, engine));
    daemon.expect_line("gone");
    daemon.stop();
    // No daemon: connecting fails at once, naming the socket's trouble.
    match ferry::Engine::connect(daemon_socket_gone()) {
        Err(e @ Error::Control { .. }) => assert!(e.to_string().contains("connecting"), "{e}"),
        Err(other) => panic!("expected a control error, got {other:?}"),
        Ok(_) => panic!("connected to no daemon"),
    }
}

fn daemon_socket_gone() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-serve-none-{}.sock", std::process::id()))
}

#[test]
fn ferry_stat_shows_each_clients_and_workers_counters() {
    let daemon = Daemon::start("stat");
    let mut client = Client::connect(&daemon.socket).unwrap();
    let buf = client.alloc_host(1 << 20).unwrap();
    let (mut a, mut b) = (client.open_queue(0, 0).unwrap(), client.open_queue(0, 0).unwrap());
    // 100 good 4 KiB copies on one queue, 10 failing ones (an unknown region) on the other.
    let done = copy(&mut a, buf.id(), buf.id(), 0);
    assert!(done.is_empty());
    for i in 0..100u64 {
        a.push(Descriptor::copy(buf.id(), 0, buf.id(), 65536 + (i % 64) * 4096, 4096)).unwrap();
    }
    for _ in 0..10 {
        b.push(Descriptor::copy(buf.id(), 0, ferry::RegionId(0xdead), 0, 64)).unwrap();
    }
    for _ in 0..100 {
        assert!(a.wait_one(TIMEOUT).unwrap().is_ok());
    }
    for _ in 0..10 {
        assert!(!b.wait_one(TIMEOUT).unwrap().is_ok());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["stat", "--socket", daemon.socket.to_str().unwrap(), "--count", "2", "--interval", "0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}");
    assert_eq!(text.matches("| client | queues |").count(), 2, "two tables");
    let row = format!("| {} | 2 | 110 | ", client.id().0);
    let line = text.lines().rev().find(|l| l.starts_with(&row)).unwrap_or_else(|| panic!("no row {row:?} in\n{text}"));
    // The second table has rates (0.00 here: nothing moved between the two looks).
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    assert_eq!(cells[4], "0.00", "{line}");
    assert_eq!((cells[6], cells[7]), ("10", "0"), "failed and in flight: {line}");
    assert!(text.lines().any(|l| l.starts_with("| 0 | ") && l.ends_with(" % |")), "a worker row with its busy share");
    // Wrong arguments: a usage error.
    let bad = Command::new(env!("CARGO_BIN_EXE_ferry")).args(["stat"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--socket PATH is needed"));
    drop((a, b, buf, client));
    daemon.stop();
}

#[test]
fn replicas_in_one_pool_share_its_host_memory_until_the_last_one_leaves() {
    let daemon = Daemon::start("pool");
    let (first, second, outsider) = (
        ferry::Engine::connect(&daemon.socket).unwrap(),
        ferry::Engine::connect(&daemon.socket).unwrap(),
        ferry::Engine::connect(&daemon.socket).unwrap(),
    );
    let a = first.shared_client("kv-pool").unwrap();
    let b = second.shared_client("kv-pool").unwrap();
    assert_eq!(a, b, "the members of a pool are one client");
    assert_eq!(first.shared_client("kv-pool").unwrap(), a, "naming it again");
    let pool = first.allocate_host(a, 1 << 16).unwrap();
    pool.write(0, b"written by the first replica").unwrap();
    // The second replica maps the region by its id and copies out of it with its own queue.
    let seen = second.map_host(b, pool.id()).unwrap();
    let mut got = [0u8; 28];
    seen.read(0, &mut got).unwrap();
    assert_eq!(&got, b"written by the first replica");
    let mut queue = second.open_queue(b, ferry::QueueConfig::default()).unwrap();
    queue.push(Descriptor::copy(pool.id(), 0, pool.id(), 4096, 28)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
    // Outside the pool: neither its region nor a map of it.
    let other = outsider.new_client();
    assert!(matches!(outsider.map_host(other, pool.id()), Err(Error::Daemon { .. })));
    let mut theirs = outsider.open_queue(other, ferry::QueueConfig::default()).unwrap();
    theirs.push(Descriptor::copy(pool.id(), 0, pool.id(), 8192, 8)).unwrap();
    assert_eq!(theirs.wait_one(TIMEOUT).unwrap().status(), Ok(Status::NotOwner));
    // The first replica goes: the pool stays for the second.
    let id = pool.id();
    drop((pool, first));
    // Two members left: the connection of the second `shared_client` call (the pool already had
    // one here) and the first replica's.
    daemon.expect_line("the pool's regions stay");
    daemon.expect_line("the pool's regions stay");
    queue.push(Descriptor::copy(id, 4096, id, 12288, 28)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok(), "the pool outlived its allocating member");
    seen.read(12288, &mut got).unwrap();
    assert_eq!(&got, b"written by the first replica");
    // The last one goes: the pool's regions are freed.
    drop((queue, seen, second));
    daemon.expect_line("its queues and regions are freed");
    // Bad names, and joining late, are refused.
    assert!(matches!(outsider.shared_client("no spaces"), Err(Error::Daemon { .. })));
    let mut late = Client::connect(&daemon.socket).unwrap();
    late.alloc_host(4096).unwrap();
    assert!(matches!(late.join("kv-pool"), Err(Error::Daemon { .. })));
    // In this process the pools are the same client too; mapping is for connected engines.
    let local = ferry::Engine::start(ferry::EngineConfig {
        cores: ferry::CorePlacement::Unpinned,
        ..ferry::EngineConfig::default()
    })
    .unwrap();
    assert_eq!(local.shared_client("p").unwrap(), local.shared_client("p").unwrap());
    assert_ne!(local.shared_client("p").unwrap(), local.shared_client("q").unwrap());
    assert!(local.map_host(local.shared_client("p").unwrap(), id).is_err());
    drop((theirs, late, outsider));
    daemon.stop();
}

/// A memfd of `len` bytes, sealed against shrinking and growing when `sealed`.
fn memfd(len: u64, sealed: bool) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"test-pool".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor this function owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on our own memfd with valid seal bits.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }, 0);
    }
    file
}

#[test]
fn a_clients_own_memfd_is_registered_here_and_through_the_daemon() {
    let daemon = Daemon::start("memfd");
    let local = ferry::Engine::start(ferry::EngineConfig {
        cores: ferry::CorePlacement::Unpinned,
        ..ferry::EngineConfig::default()
    })
    .unwrap();
    let remote = ferry::Engine::connect(&daemon.socket).unwrap();
    for engine in [&local, &remote] {
        let client = engine.new_client();
        let file = memfd(1 << 16, true);
        let mine = engine.register_memfd(client, file.try_clone().unwrap()).unwrap();
        assert_eq!(mine.len(), 1 << 16);
        // Bytes written through the file are the region's (the same memory).
        std::os::unix::fs::FileExt::write_all_at(&file, b"in my own memfd", 0).unwrap();
        let mut queue = engine.open_queue(client, ferry::QueueConfig::default()).unwrap();
        queue.push(Descriptor::copy(mine.id(), 0, mine.id(), 4096, 15)).unwrap();
        assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
        let mut got = [0u8; 15];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 4096).unwrap();
        assert_eq!(&got, b"in my own memfd", "{}", engine.transport_name());
        // Unsealed (a peer could truncate it under the engine), empty, or not a memfd: refused.
        for bad in [memfd(4096, false), memfd(0, true), std::fs::File::open("/proc/self/stat").unwrap()] {
            assert!(engine.register_memfd(client, bad).is_err(), "{}", engine.transport_name());
        }
        drop(queue);
        engine.deregister(mine.id()).unwrap();
    }
    drop((local, remote));
    daemon.stop();
}

/// A descriptor of random fields, its regions drawn from `regions` or anything.
fn random_descriptor(rng: &mut common::Rng, regions: &[ferry::RegionId]) -> Descriptor {
    let region = |rng: &mut common::Rng| match rng.below(4) {
        0 => rng.next() as u32,
        _ => regions[rng.below(regions.len() as u64) as usize].0,
    };
    let word = |rng: &mut common::Rng| match rng.below(3) {
        0 => rng.next(),
        _ => rng.below(1 << 17),
    };
    if rng.below(4) == 0 {
        // Plausible: a plain copy inside 64 KiB regions (valid when both are the pusher's).
        let pick = |rng: &mut common::Rng| regions[rng.below(regions.len() as u64) as usize];
        let (src, dst) = (pick(rng), pick(rng));
        let (a, b) = (rng.below(30_000), 32_768 + rng.below(28_000));
        return Descriptor::copy(src, a, dst, b, 1 + rng.below(4096)).with_tag(rng.next());
    }
    Descriptor {
        tag: rng.next(),
        src_region: region(rng),
        dst_region: region(rng),
        src_offset: word(rng),
        dst_offset: word(rng),
        len: word(rng),
        flags: if rng.below(2) == 0 { rng.next() as u32 } else { rng.below(16) as u32 },
        count: rng.below(8) as u32,
        src_stride: word(rng),
        dst_stride: word(rng),
    }
}

#[test]
fn hostile_clients_get_errors_or_are_disconnected_and_cost_the_others_nothing() {
    let daemon = Daemon::start("hostile");
    let mut good = Client::connect(&daemon.socket).unwrap();
    let mine = good.alloc_host(1 << 16).unwrap();
    let mut good_queue = good.open_queue(0, 0).unwrap();
    let mut round = 0u64;
    let mut still_served = |q: &mut Queue| {
        round += 1;
        mine.write(0, &round.to_le_bytes()).unwrap();
        q.push(Descriptor::copy(mine.id(), 0, mine.id(), 8192, 8).with_tag(round)).unwrap();
        let done = q.wait_one(TIMEOUT).unwrap();
        assert!(done.is_ok() && done.tag == round, "the well-behaved client's copy: {done:?}");
        let mut got = [0u8; 8];
        mine.read(8192, &mut got).unwrap();
        assert_eq!(u64::from_le_bytes(got), round);
    };
    // Garbage descriptors, naming its own regions, the other client's and any number: every one
    // completes (an error, or ok where it happens to be a valid copy within its own regions),
    // and none naming the other client's region succeeds.
    let mut hostile = Client::connect(&daemon.socket).unwrap();
    let own = hostile.alloc_host(1 << 16).unwrap();
    let mut queue = hostile.open_queue(0, 0).unwrap();
    let mut rng = common::Rng(0x5eed_f00d);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..32 {
        let ds: Vec<Descriptor> = (0..64).map(|_| random_descriptor(&mut rng, &[own.id(), mine.id()])).collect();
        assert_eq!(queue.submit(&ds).unwrap(), ds.len());
        for d in &ds {
            let c = queue.wait_one(TIMEOUT).expect("every garbage descriptor completes");
            assert_eq!(c.tag, d.tag);
            if c.is_ok() {
                accepted += 1;
                assert!(d.src_region != mine.id().0 && d.dst_region != mine.id().0, "another client's region: {d:?}");
            } else {
                refused += 1;
            }
        }
        still_served(&mut good_queue);
    }
    println!("garbage descriptors: {refused} refused, {accepted} valid by chance");
    assert!(refused > 0 && accepted > 0, "{refused} refused, {accepted} accepted: both sides exercised");
    // A tampered ring: the client overwrites its submission ring's header and indices. The
    // worker finds the queue broken; the daemon and the other client go on.
    let file = queue.file();
    // SAFETY: maps the queue's memfd (its length) shared, for writing garbage into it; the
    // mapping is unmapped below and nothing else in this process reads those bytes meanwhile.
    unsafe {
        let len = file.metadata().unwrap().len() as usize;
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        std::ptr::write_bytes(map.cast::<u8>().add(1024), 0xAB, 512);
        libc::munmap(map, len);
    }
    let deadline = Instant::now() + TIMEOUT;
    while queue.state() != ferry::QueueState::Broken {
        assert!(Instant::now() < deadline, "a tampered ring was not found broken: {:?}", queue.state());
        std::thread::sleep(Duration::from_millis(1));
    }
    still_served(&mut good_queue);
    drop((queue, own, hostile));
    // Garbage on the control socket, 64 connections of it: each is refused or hung up on.
    for k in 0..64u64 {
        let mut raw = UnixStream::connect(&daemon.socket).unwrap();
        let bytes: Vec<u8> = (0..1 + rng.below(300)).map(|_| rng.next() as u8).collect();
        let mut frame = bytes.clone();
        if k % 2 == 0 {
            frame[..4.min(bytes.len())].copy_from_slice(&b"FRY1"[..4.min(bytes.len())]);
        }
        let _ = raw.write_all(&frame);
        drop(raw);
    }
    still_served(&mut good_queue);
    drop((good_queue, mine, good));
    daemon.stop();
}

#[test]
fn another_uid_is_refused() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        println!("SKIP: connecting as another uid needs root here (setuid in a child)");
        return;
    }
    let daemon = Daemon::start("uid");
    // The socket is 0600: another uid cannot even connect; opened up, the peer check refuses it.
    std::fs::set_permissions(&daemon.socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let path = std::ffi::CString::new(daemon.socket.to_str().unwrap()).unwrap();
    // SAFETY: a zeroed sockaddr_un is valid; the path (shorter than sun_path) is copied in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let mut answer = [0u8; 256];
    // SAFETY: the child calls only async-signal-safe functions (setuid, socket, connect, read,
    // _exit) on memory prepared before the fork; the parent waits for it.
    let got = unsafe {
        let mut pipe = [0i32; 2];
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        let pid = libc::fork();
        if pid == 0 {
            let mut n: isize = -1;
            if libc::setuid(65534) == 0 {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let size = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), size) == 0 {
                    n = libc::read(fd, answer.as_mut_ptr().cast(), answer.len());
                }
            }
            if n > 0 {
                libc::write(pipe[1], answer.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
        libc::close(pipe[1]);
        let n = libc::read(pipe[0], answer.as_mut_ptr().cast(), answer.len());
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::close(pipe[0]);
        n
    };
    assert!(got > 0, "the child got no answer from the daemon");
    let text = String::from_utf8_lossy(&answer[..got as usize]);
    assert!(text.contains("uid 65534 is not allowed"), "the daemon said {text:?}");
    daemon.expect_line("refused a connection from uid 65534");
    // Its own user is served.
    assert!(Client::connect(&daemon.socket).is_ok());
    daemon.stop();
}

#[test]
#[ignore = "helper: started by a_killed_clients_queues_and_memory_are_freed"]
fn child_serve_client() {
    let mut client = Client::connect(std::env::var("FERRY_TEST_SOCKET").unwrap()).unwrap();
    let buf = client.alloc_host(1 << 16).unwrap();
    let mut queue = client.open_queue(0, 0).unwrap();
    queue.push(Descriptor::copy(buf.id(), 0, buf.id(), 8192, 4096)).unwrap();
    assert!(queue.wait_one(TIMEOUT).unwrap().is_ok());
    println!("ready");
    std::thread::sleep(TIMEOUT);
    panic!("not killed within {TIMEOUT:?}");
}

#[test]
fn serve_without_a_socket_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket PATH is needed"));
}

#[test]
fn the_configuration_file_with_flags_over_it_and_unknown_keys_refused() {
    let dir = std::env::temp_dir().join(format!("ferry-serve-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("serve.toml");
    std::fs::write(&file, "socket = \"/tmp/x.sock\"\nallow_uids = [1001]\n[engine]\nworkers = 2\n").unwrap();
    let ferry = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().unwrap();
    let out = ferry(&["serve", "--config", file.to_str().unwrap(), "--transport", "null", "--print-config"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "socket = \"/tmp/x.sock\"",
        "allow_uids = [1001]",
        "log = \"info\"",
        "[engine]",
        "transport = \"null\"",
        "workers = 2",
        "pinned = true",
        "all_gpus = false",
        "device = 0",
        "[limits]",
        "connections = 256",
        "queues_per_client = 64",
        "regions_per_client = 1024",
    ] {
        assert!(printed.contains(expected), "{expected:?} missing from the effective configuration:\n{printed}");
    }
    // The printed configuration reads back as the same configuration.
    std::fs::write(&file, &printed).unwrap();
    let again = ferry(&["serve", "--config", file.to_str().unwrap(), "--print-config"]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);
    std::fs::write(&file, "socket = \"/tmp/x.sock\"\n[engine]\nworkerz = 2\n").unwrap();
    let out = ferry(&["serve", "--config", file.to_str().unwrap(), "--print-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workerz"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_daemon_benchmark_runs_and_prints_its_table() {
    // A functional check of `ferry bench-serve` (2 clients, a few descriptors): it runs end to
    // end and prints both rows; the figures are not judged here.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["bench-serve", "--clients", "2", "--descriptors", "20K", "--rounds", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("one client thread, engine in this process"), "{stdout}");
    assert!(stdout.contains("2 client processes through `ferry serve`"), "{stdout}");
    // The fault run (2 s of pushing, one client SIGKILLed): it runs and prints its table (the
    // figures are recorded in bench/results, not judged on a shared machine).
    let out =
        Command::new(env!("CARGO_BIN_EXE_ferry")).args(["bench-serve", "--kill", "--clients", "2"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no longer served (its memory freed), after the kill"), "{stdout}");
    assert!(stdout.contains("in the 100 ms after the kill, / that median"), "{stdout}");
}

#[test]
fn connections_and_queues_over_their_limits_are_refused_and_the_served_ones_go_on() {
    let dir = std::env::temp_dir().join(format!("ferry-serve-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!("socket = {:?}\n[engine]\npinned = false\n[limits]\nconnections = 2\nqueues_per_client = 2\n", socket),
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--config", config.to_str().unwrap(), "--quiet"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut first = loop {
        match Client::connect(&socket) {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the daemon never listened: {e}"),
        }
    };
    let mut second = Client::connect(&socket).unwrap();
    match Client::connect(&socket) {
        Err(Error::Daemon { message }) => assert!(message.contains("limits.connections"), "{message}"),
        other => panic!("expected the connection limit's refusal, got {other:?}"),
    }
    assert!(first.alloc_host(4096).is_ok() && second.alloc_host(4096).is_ok(), "the served connections go on");
    // Two open queues a client; a closed one makes room.
    let (q1, _q2) = (first.open_queue(0, 0).unwrap(), first.open_queue(0, 0).unwrap());
    match first.open_queue(0, 0) {
        Err(Error::Daemon { message }) => assert!(message.contains("limits.queues_per_client"), "{message}"),
        Err(other) => panic!("expected the queue limit's refusal, got {other:?}"),
        Ok(_) => panic!("a third queue was opened over limits.queues_per_client = 2"),
    }
    assert!(second.open_queue(0, 0).is_ok(), "the limit is per client");
    q1.close();
    assert!(first.open_queue(0, 0).is_ok(), "a closed queue does not count");
    drop(first);
    // A connection ended makes room (once its session has finished).
    let deadline = Instant::now() + TIMEOUT;
    while Client::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "no room after a connection ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpu_memory_needs_a_cuda_daemon_and_says_so() {
    let daemon = Daemon::start("gpu-refused");
    // The request itself, to a host-transport daemon: refused, naming the missing transport.
    let mut raw = Client::connect(&daemon.socket).unwrap();
    match raw.register_gpu([7; 64], 0, 4096) {
        Err(Error::Daemon { message }) => assert!(message.contains("GPU transport"), "{message}"),
        other => panic!("expected the daemon's refusal, got {other:?}"),
    }
    // Through a connected engine: the memory is exported first, which fails here (no CUDA
    // driver) or on a GPU machine (not device memory), with a GpuRange error saying why.
    let engine = ferry::Engine::connect(&daemon.socket).unwrap();
    let client = engine.new_client();
    // SAFETY: the registration fails before anything would use the address.
    match unsafe { engine.register_gpu(client, 0x1000, 4096) } {
        Err(e @ Error::GpuRange { fault: ferry::GpuRangeFault::NotExportable(_), .. }) => {
            assert!(e.to_string().contains("CUDA IPC"), "{e}")
        }
        other => panic!("expected a GpuRange error, got {other:?}"),
    }
    drop((raw, engine));
    // A CUDA daemon on a machine without a GPU does not start, and says why.
    if ferry::internals::cuda::gpus().is_ok() {
        println!("SKIP: this machine has a GPU: tests/gpu.rs starts a CUDA daemon instead");
    } else {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--socket", "/tmp/ferry-no-gpu.sock", "--transport", "cuda", "--quiet"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("starting the engine"), "{stderr}");
        println!("a CUDA daemon without a GPU: {}", stderr.trim());
    }
    daemon.stop();
}
