//! The GDR transport on real verbs. These tests need an RDMA device: they run inside the
//! Soft-RoCE guest (`tests/softroce/run.sh`, which sets FERRY_SOFTROCE=1 and FERRY_NIC=rxe0),
//! with host memory standing in for GPU memory. Elsewhere they print SKIP, except the switch
//! tests that need no device.

mod common;

use common::{collect, Rng};
use ferry::transport::gdr::GdrError;
use ferry::{
    Completion, CorePlacement, Descriptor, Engine, EngineConfig, Error, GdrConfig, GpuConfig, IdlePolicy, QueueConfig,
    Status, TransportKind, UseGdr,
};

/// The device under test, or `None` (after printing SKIP) where there is none. Inside the
/// Soft-RoCE guest a missing device is a failure, not a skip.
fn nic() -> Option<String> {
    if let Ok(name) = std::env::var("FERRY_NIC") {
        return Some(name);
    }
    assert!(std::env::var_os("FERRY_SOFTROCE").is_none(), "FERRY_SOFTROCE is set but FERRY_NIC is not");
    println!(
        "SKIP: no RDMA device named by FERRY_NIC: the verbs tests run in the Soft-RoCE guest (tests/softroce/run.sh)"
    );
    None
}

fn gdr_config(nic: &str, use_gdr: UseGdr) -> EngineConfig {
    EngineConfig {
        transport: TransportKind::Gpu(GpuConfig {
            gdr: GdrConfig { use_gdr, nic: Some(nic.to_string()), ..GdrConfig::default() },
            ..GpuConfig::default()
        }),
        cores: CorePlacement::Unpinned,
        // Soft-RoCE does its work in kernel threads: a worker that yields leaves them the CPU.
        idle: IdlePolicy::Yield { after: 64 },
        ..EngineConfig::default()
    }
}

/// The GDR settings of a GPU engine's configuration.
fn gdr_of(config: &mut EngineConfig) -> &mut GdrConfig {
    match &mut config.transport {
        TransportKind::Gpu(gpu) => &mut gpu.gdr,
        other => panic!("not a GPU transport: {other:?}"),
    }
}

fn gdr_engine(nic: &str, tune: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = gdr_config(nic, UseGdr::On);
    tune(&mut config);
    let engine = Engine::start(config).expect("the GDR engine starts on the Soft-RoCE device");
    assert_eq!(engine.transport_name(), "gdr");
    assert_eq!(engine.nic_name().as_deref(), Some(nic));
    engine
}

fn all_ok(completions: &[Completion]) {
    for c in completions {
        assert!(c.is_ok(), "descriptor {} (tag {}) failed: {:?} detail {:#x}", c.seq, c.tag, c.status(), c.detail);
    }
}

/// Pushes every descriptor (waiting for room when the ring is full) and collects as many
/// completions, in order.
fn run(queue: &mut ferry::Queue, ds: &[Descriptor]) -> Vec<Completion> {
    let mut out = Vec::with_capacity(ds.len());
    let mut sent = 0;
    let mut buf = [Completion::default(); 256];
    let start = std::time::Instant::now();
    while out.len() < ds.len() {
        sent += queue.submit(&ds[sent..]).expect("submit");
        let n = queue.poll(&mut buf).expect("poll");
        out.extend_from_slice(&buf[..n]);
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "{} of {} completions", out.len(), ds.len());
        if n == 0 {
            std::thread::yield_now();
        }
    }
    out
}

#[test]
fn random_scattered_copies_arrive_byte_for_byte() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |_| {});
    let client = engine.new_client();
    const SIZE: usize = 32 << 20;
    let src = engine.allocate_host(client, SIZE).unwrap();
    let dst = engine.allocate_host(client, SIZE).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pattern: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, SIZE, 0xa5).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // Non-overlapping destination slots so every byte has one expected value; sizes from 1 byte
    // to 256 KiB, offsets unaligned.
    let mut expected = vec![0xa5u8; SIZE];
    let mut ds = Vec::new();
    let mut cursor = 0u64;
    while ds.len() < 2000 {
        let len = match rng.below(4) {
            0 => 1 + rng.below(64),
            1 => 1 + rng.below(4096),
            2 => 4096 + rng.below(60 << 10),
            _ => 1 + rng.below(256 << 10),
        };
        let gap = 1 + rng.below(64); // never adjacent: nothing merges
        if cursor + gap + len > SIZE as u64 {
            break;
        }
        let dst_off = cursor + gap;
        let src_off = rng.below(SIZE as u64 - len);
        expected[dst_off as usize..(dst_off + len) as usize]
            .copy_from_slice(&pattern[src_off as usize..(src_off + len) as usize]);
        ds.push(Descriptor { tag: ds.len() as u64, ..Descriptor::copy(src.id(), src_off, dst.id(), dst_off, len) });
        cursor = dst_off + len;
    }
    let completions = run(&mut queue, &ds);
    all_ok(&completions);
    for (i, c) in completions.iter().enumerate() {
        assert_eq!(c.tag, i as u64, "completions come back in order");
    }
    let mut got = vec![0u8; SIZE];
    dst.read(0, &mut got).unwrap();
    let first_bad = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "destination differs from the expected bytes");
    let stats = engine.stats()[0].nic.expect("GDR counters");
    println!("{} descriptors: {stats:?}", ds.len());
    assert!(stats.work_requests >= ds.len() as u64, "no descriptor here is adjacent to the next");
    assert_eq!(stats.errors, 0);
}

#[test]
fn adjacent_descriptors_merge_and_small_ones_go_inline() {
    let Some(nic) = nic() else { return };
    // A chain of 64 per doorbell, so that 64 adjacent descriptors submitted together can merge.
    let engine = gdr_engine(&nic, |c| c.burst = 256);
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 20).unwrap();
    let dst = engine.allocate_host(client, 1 << 20).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 31 + 7) as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, 1 << 20, 0).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();

    // 1. Adjacent on both sides: one scatter/gather entry grows.
    // 2. Adjacent destinations, scattered sources: entries of one work request.
    let mut ds = Vec::new();
    for i in 0..64u64 {
        ds.push(Descriptor::copy(src.id(), i * 1024, dst.id(), i * 1024, 1024));
    }
    for i in 0..64u64 {
        ds.push(Descriptor::copy(src.id(), 512 * 1024 - (i + 1) * 2048, dst.id(), (128 << 10) + i * 1024, 1024));
    }
    let before = engine.stats()[0].nic.unwrap();
    all_ok(&run(&mut queue, &ds));
    let after = engine.stats()[0].nic.unwrap();
    let wrs = after.work_requests - before.work_requests;
    println!("128 adjacent descriptors took {wrs} work requests");
    assert!(wrs < 64, "adjacent descriptors merge: {wrs} work requests for 128 descriptors");
    let mut got = vec![0u8; 1 << 20];
    dst.read(0, &mut got).unwrap();
    assert_eq!(got[..64 << 10], pattern[..64 << 10]);
    for i in 0..64usize {
        let s = 512 * 1024 - (i + 1) * 2048;
        let d = (128 << 10) + i * 1024;
        assert_eq!(got[d..d + 1024], pattern[s..s + 1024], "descriptor {i} of the gathered run");
    }

    // 3. Small scattered writes go inline: their bytes are copied at post time.
    let before = engine.stats()[0].nic.unwrap();
    let small: Vec<Descriptor> =
        (0..200u64).map(|i| Descriptor::copy(src.id(), i * 4099, dst.id(), (600 << 10) + i * 1000, 37)).collect();
    all_ok(&run(&mut queue, &small));
    let after = engine.stats()[0].nic.unwrap();
    assert!(after.inline_writes - before.inline_writes >= 200, "37-byte writes go inline: {after:?}");
    dst.read(0, &mut got).unwrap();
    for i in 0..200usize {
        let d = (600 << 10) + i * 1000;
        assert_eq!(got[d..d + 37], pattern[i * 4099..i * 4099 + 37]);
    }
}

#[test]
fn a_strided_descriptor_gathers_into_few_work_requests_and_scatters_one_per_chunk() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |c| c.burst = 256);
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 20).unwrap();
    let dst = engine.allocate_host(client, 1 << 20).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 13 + 5) as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, 1 << 20, 0).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // A paged block's 16 chunks of 2 KiB at a 32 KiB pitch gathered into one contiguous block
    // (the offload direction): the chunks become scatter/gather entries of few work requests.
    let gather = Descriptor::copy(src.id(), 1000, dst.id(), 0, 2048).strided(16, 32 << 10, 2048).with_tag(1);
    let before = engine.stats()[0].nic.unwrap();
    all_ok(&run(&mut queue, &[gather]));
    let after = engine.stats()[0].nic.unwrap();
    let gathered = after.work_requests - before.work_requests;
    // The load direction: one contiguous block scattered at the pitch, one remote range each.
    let scatter = Descriptor::copy(src.id(), 0, dst.id(), 64 << 10, 2048).strided(16, 2048, 32 << 10).with_tag(2);
    all_ok(&run(&mut queue, &[scatter]));
    let scattered = engine.stats()[0].nic.unwrap().work_requests - after.work_requests;
    println!("16 strided chunks: gathered in {gathered} work requests, scattered in {scattered}");
    assert!(gathered < 16, "a gather's chunks share work requests: {gathered}");
    assert_eq!(scattered, 16, "one work request per destination chunk");
    let mut got = vec![0u8; 1 << 20];
    dst.read(0, &mut got).unwrap();
    for i in 0..16usize {
        let s = 1000 + i * (32 << 10);
        assert_eq!(got[i * 2048..(i + 1) * 2048], pattern[s..s + 2048], "gathered chunk {i}");
        let d = (64 << 10) + i * (32 << 10);
        assert_eq!(got[d..d + 2048], pattern[i * 2048..(i + 1) * 2048], "scattered chunk {i}");
    }
}

#[test]
fn one_doorbell_and_one_completion_per_16_work_requests_at_steady_state() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |c| c.burst = 256);
    let client = engine.new_client();
    let src = engine.allocate_host(client, 64 << 20).unwrap();
    let dst = engine.allocate_host(client, 64 << 20).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // Scattered 4 KiB blocks (every other slot, so nothing merges), the ring kept full.
    let blocks = 8192u64;
    let ds: Vec<Descriptor> = (0..40_000u64)
        .map(|i| Descriptor::copy(src.id(), (i * 2 % blocks) * 4096, dst.id(), ((i * 2 + 1) % blocks) * 4096, 4096))
        .collect();
    let mut sent = 0;
    let mut received = 0;
    let mut buf = [Completion::default(); 256];
    let mut warm = None;
    let mut steady = None;
    while received < ds.len() {
        sent += queue.submit(&ds[sent..]).unwrap();
        let n = queue.poll(&mut buf).unwrap();
        all_ok(&buf[..n]);
        received += n;
        // Steady state: from 5 000 completions in until 5 000 before the end, while the
        // submission ring is still full.
        if warm.is_none() && received >= 5_000 {
            warm = engine.stats()[0].nic;
        }
        if steady.is_none() && received >= ds.len() - 5_000 {
            steady = engine.stats()[0].nic;
        }
        if n == 0 {
            std::thread::yield_now();
        }
    }
    let (a, b) = (warm.unwrap(), steady.unwrap());
    let wrs = b.work_requests - a.work_requests;
    let doorbells = b.doorbells - a.doorbells;
    let completions = b.completions - a.completions;
    println!(
        "steady state: {wrs} work requests, {doorbells} doorbells ({:.1} per doorbell), {completions} completions ({:.1} per completion)",
        wrs as f64 / doorbells as f64,
        wrs as f64 / completions as f64
    );
    assert!(wrs > 20_000);
    assert_eq!(b.errors, 0, "the send queue never overflowed (a post beyond its depth fails)");
    assert!(doorbells * 16 <= wrs, "at most one doorbell per 16 work requests");
    assert!(completions * 16 <= wrs, "at most one completion per 16 work requests");
}

#[test]
fn a_failed_work_request_fails_only_its_descriptors_and_the_queue_pair_recovers() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |_| {});
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 20).unwrap();
    let good = engine.allocate_host(client, 1 << 20).unwrap();
    let broken = engine.allocate_host(client, 1 << 20).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 13 + 1) as u8).collect();
    src.write(0, &pattern).unwrap();
    good.fill(0, 1 << 20, 0).unwrap();
    engine.inject_stale_remote_key(broken.id()).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // 300 writes; every 50th targets the region whose remote key the NIC does not know.
    let ds: Vec<Descriptor> = (0..300u64)
        .map(|i| {
            let target = if i % 50 == 25 { broken.id() } else { good.id() };
            Descriptor { tag: i, ..Descriptor::copy(src.id(), i * 2048, target, i * 2048, 2048) }
        })
        .collect();
    let completions = run(&mut queue, &ds);
    for c in &completions {
        if c.tag % 50 == 25 {
            assert_eq!(c.status(), Ok(Status::TransportFailed), "descriptor {} wrote to the broken region", c.tag);
        } else {
            assert!(c.is_ok(), "descriptor {} failed: {:?} detail {:#x}", c.tag, c.status(), c.detail);
        }
    }
    let mut got = vec![0u8; 1 << 20];
    good.read(0, &mut got).unwrap();
    for i in (0..300usize).filter(|i| i % 50 != 25) {
        assert_eq!(got[i * 2048..(i + 1) * 2048], pattern[i * 2048..(i + 1) * 2048], "descriptor {i}");
    }
    let stats = engine.stats()[0].nic.unwrap();
    println!("after 6 injected faults: {stats:?}");
    assert!(stats.recoveries >= 6, "each fault resets the queue pair: {stats:?}");
    // Later descriptors succeed.
    let after: Vec<Descriptor> =
        (0..100u64).map(|i| Descriptor::copy(src.id(), 0, good.id(), i * 4096, 4096)).collect();
    all_ok(&run(&mut queue, &after));
}

#[test]
fn descriptors_longer_than_a_work_request_are_split_and_arrive_whole() {
    let Some(nic) = nic() else { return };
    // Work requests of at most 4 KiB, so that the split path runs with small buffers (the
    // default is 1 GiB).
    let engine = gdr_engine(&nic, |c| gdr_of(c).max_wr_bytes = 4096);
    let client = engine.new_client();
    const SIZE: usize = 4 << 20;
    let src = engine.allocate_host(client, SIZE).unwrap();
    let dst = engine.allocate_host(client, SIZE).unwrap();
    let mut rng = Rng(7);
    let pattern: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    src.write(0, &pattern).unwrap();
    dst.fill(0, SIZE, 0xee).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let mut expected = vec![0xeeu8; SIZE];
    let mut ds = Vec::new();
    let mut cursor = 0u64;
    let mut pieces = 0u64;
    loop {
        let len = 1 + rng.below(40_000);
        let dst_off = cursor + 1 + rng.below(100);
        if dst_off + len > SIZE as u64 {
            break;
        }
        let src_off = rng.below(SIZE as u64 - len);
        expected[dst_off as usize..(dst_off + len) as usize]
            .copy_from_slice(&pattern[src_off as usize..(src_off + len) as usize]);
        ds.push(Descriptor { tag: ds.len() as u64, ..Descriptor::copy(src.id(), src_off, dst.id(), dst_off, len) });
        pieces += len.div_ceil(4096);
        cursor = dst_off + len;
    }
    all_ok(&run(&mut queue, &ds));
    let mut got = vec![0u8; SIZE];
    dst.read(0, &mut got).unwrap();
    assert_eq!(got.iter().zip(&expected).position(|(a, b)| a != b), None, "destination differs");
    let stats = engine.stats()[0].nic.unwrap();
    println!("{} descriptors of 1 B to 40 KB in {} work requests of at most 4 KiB", ds.len(), stats.work_requests);
    assert_eq!(stats.work_requests, pieces, "each descriptor takes ceil(len / 4096) work requests");
}

#[test]
fn a_failed_merged_work_request_is_retried_one_descriptor_each() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |c| c.burst = 256);
    let client = engine.new_client();
    let good = engine.allocate_host(client, 1 << 20).unwrap();
    let broken = engine.allocate_host(client, 1 << 20).unwrap();
    let dst = engine.allocate_host(client, 1 << 20).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 7 + 5) as u8).collect();
    good.write(0, &pattern).unwrap();
    dst.fill(0, 1 << 20, 0).unwrap();
    engine.inject_stale_local_key(broken.id()).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    // 16 descriptors with adjacent destinations (they merge into one work request's scatter/
    // gather list); the sixth reads from the region whose local key the NIC does not know.
    let ds: Vec<Descriptor> = (0..16u64)
        .map(|i| {
            let source = if i == 5 { broken.id() } else { good.id() };
            Descriptor { tag: i, ..Descriptor::copy(source, i * 8192, dst.id(), i * 1024, 1024) }
        })
        .collect();
    let submitted = queue.submit(&ds).unwrap();
    assert_eq!(submitted, ds.len());
    let completions = collect(&mut queue, ds.len());
    for c in &completions {
        if c.tag == 5 {
            assert_eq!(c.status(), Ok(Status::TransportFailed), "the descriptor with the bad source fails");
        } else {
            assert!(c.is_ok(), "descriptor {} merged with the bad one failed: {:?}", c.tag, c.status());
        }
    }
    let mut got = vec![0u8; 16 * 1024];
    dst.read(0, &mut got).unwrap();
    for i in (0..16usize).filter(|&i| i != 5) {
        assert_eq!(got[i * 1024..(i + 1) * 1024], pattern[i * 8192..i * 8192 + 1024], "descriptor {i}");
    }
    let stats = engine.stats()[0].nic.unwrap();
    println!("a bad source in a merged work request: {stats:?}");
    assert!(stats.recoveries >= 2, "the merged request failed, then the lone bad one: {stats:?}");
}

#[test]
fn repeated_failures_mark_the_nic_unusable() {
    let Some(nic) = nic() else { return };
    let engine = gdr_engine(&nic, |c| gdr_of(c).max_recoveries = 2);
    let client = engine.new_client();
    let src = engine.allocate_host(client, 1 << 20).unwrap();
    let broken = engine.allocate_host(client, 1 << 20).unwrap();
    engine.inject_stale_remote_key(broken.id()).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    for i in 0..3u64 {
        queue.push(Descriptor::copy(src.id(), 0, broken.id(), i * 4096, 4096)).unwrap();
        assert_eq!(collect(&mut queue, 1)[0].status(), Ok(Status::TransportFailed));
    }
    // The third failure in a row exceeded max_recoveries: good copies now fail too, saying so.
    let good = engine.allocate_host(client, 1 << 20).unwrap();
    queue.push(Descriptor::copy(src.id(), 0, good.id(), 0, 4096)).unwrap();
    let c = collect(&mut queue, 1)[0];
    assert_eq!(c.status(), Ok(Status::TransportFailed));
    assert_eq!(c.detail, ferry::transport::gdr::DETAIL_NIC_UNUSABLE);
}

#[cfg(feature = "gdr")]
#[test]
fn an_unusable_nic_hands_over_to_the_fallback_transport() {
    let Some(nic) = nic() else { return };
    use ferry::desc::{Endpoint, ValidCopy};
    use ferry::internals::nic::Nic;
    use ferry::transport::gdr::GdrTransport;
    use ferry::transport::{host::HostTransport, Done, Op, Token, Transport};
    let config = GdrConfig { nic: Some(nic), max_recoveries: 0, ..GdrConfig::default() };
    let nic = Nic::open(&config, None).expect("the Soft-RoCE device opens");
    // rxe on a dummy netdev has only link-local GIDs: the RoCE v2 one must be chosen.
    println!("{nic:?}: RoCE v2 {}, {} send WRs, {} SGEs", nic.roce_v2, nic.max_qp_wr, nic.max_sge);
    assert!(nic.roce_v2, "a RoCE v2 GID is chosen when the port has one");
    let mut src = vec![7u8; 8192];
    let mut dst = vec![0u8; 8192];
    // SAFETY: both buffers outlive the registrations (dropped at the end of the test, after the
    // transport).
    let (src_mr, dst_mr) = unsafe {
        (nic.register(src.as_mut_ptr() as u64, 8192).unwrap(), nic.register(dst.as_mut_ptr() as u64, 8192).unwrap())
    };
    let mut t = GdrTransport::new(nic, config, Default::default()).with_fallback(Box::new(HostTransport::new()));
    t.start().unwrap();
    let endpoint = |addr: u64, lkey: u32, rkey: u32| Endpoint::new(0, 0, addr, lkey, rkey);
    let op = |slot: u32, rkey: u32| {
        let src = endpoint(src.as_ptr() as u64, src_mr.lkey(), src_mr.rkey());
        let dst = endpoint(dst.as_ptr() as u64 + u64::from(slot) * 1024, dst_mr.lkey(), rkey);
        // SAFETY: both 1 KiB ranges lie in `src` and `dst` (slot < 8), registered with the NIC
        // and alive until the end of the test, after the transport.
        Op::new(Token { queue: 0, slot }, unsafe { ValidCopy::new_unchecked(src, dst, 1024) })
    };
    let wait = |t: &mut GdrTransport| -> Done {
        let mut done = [Done::ok(Token { queue: 0, slot: 0 }); 1];
        let start = std::time::Instant::now();
        while t.poll(&mut done) == 0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(20), "no completion");
        }
        done[0]
    };
    // One failure with max_recoveries = 0: the NIC is marked unusable...
    assert_eq!(t.submit(&[op(0, dst_mr.rkey() ^ 0x00ff_ff00)]), 1);
    assert_eq!(wait(&mut t).status, Status::TransportFailed);
    assert!(t.unusable());
    // ...and the next copy is done by the fallback.
    assert_eq!(t.submit(&[op(1, dst_mr.rkey())]), 1);
    let done = wait(&mut t);
    assert_eq!(done.status, Status::Ok);
    assert_eq!(dst[1024..2048], src[..1024]);
    drop(t);
}

#[test]
fn use_gdr_on_without_a_nic_fails_at_start_naming_it() {
    let config = EngineConfig {
        transport: TransportKind::Gpu(GpuConfig {
            gdr: GdrConfig { use_gdr: UseGdr::On, nic: Some("ferry-no-such-nic".into()), ..GdrConfig::default() },
            ..GpuConfig::default()
        }),
        cores: CorePlacement::Unpinned,
        ..EngineConfig::default()
    };
    match Engine::start(config) {
        Err(Error::Gdr(reason)) => {
            println!("use_gdr = on, no such NIC: {reason}");
            let named = if cfg!(feature = "gdr") {
                match &reason {
                    GdrError::DeviceNotFound { name, .. } => name == "ferry-no-such-nic",
                    GdrError::NoLibrary | GdrError::NoDevice => true,
                    _ => false,
                }
            } else {
                matches!(reason, GdrError::NotBuilt)
            };
            assert!(named, "the error names what is missing: {reason:?}");
            let text = reason.to_string();
            assert!(
                ["ferry-no-such-nic", "libibverbs", "no RDMA device", "`gdr` Cargo feature"]
                    .iter()
                    .any(|t| text.contains(t)),
                "the message names it too: {text}"
            );
        }
        Err(other) => panic!("expected a GDR start-up error, got: {other}"),
        Ok(_) => panic!("use_gdr = on started without its NIC"),
    }
}

#[test]
fn use_gdr_off_and_auto_without_a_nic_run_on_cuda() {
    let config = |use_gdr| EngineConfig {
        transport: TransportKind::Gpu(GpuConfig {
            gdr: GdrConfig { use_gdr, nic: Some("ferry-no-such-nic".into()), ..GdrConfig::default() },
            ..GpuConfig::default()
        }),
        cores: CorePlacement::Unpinned,
        ..EngineConfig::default()
    };
    for use_gdr in [UseGdr::Off, UseGdr::Auto] {
        match Engine::start(config(use_gdr)) {
            Ok(engine) => {
                assert_eq!(engine.transport_name(), "cuda", "{use_gdr:?}");
                if use_gdr == UseGdr::Auto {
                    assert!(
                        engine.transport_notes().iter().any(|n| n.contains("GDR unavailable")),
                        "{:?}",
                        engine.transport_notes()
                    );
                }
            }
            // No GPU here: the CUDA driver is what failed, so CUDA is what was chosen.
            Err(Error::Cuda(e)) if use_gdr == UseGdr::Off => {
                println!("SKIP: use_gdr = off chose CUDA, which is missing here: {e}")
            }
            Err(Error::NoDeviceTransport { gdr, cuda }) if use_gdr == UseGdr::Auto => {
                println!("SKIP: use_gdr = auto fell back to CUDA, which is missing here: {cuda} (GDR: {gdr})")
            }
            Err(other) => panic!("{use_gdr:?}: unexpected error: {other}"),
        }
    }
}

#[test]
fn use_gdr_auto_and_on_pick_the_nic_when_it_works() {
    let Some(nic) = nic() else { return };
    for use_gdr in [UseGdr::On, UseGdr::Auto] {
        let engine = Engine::start(gdr_config(&nic, use_gdr)).expect("starts");
        assert_eq!(engine.transport_name(), "gdr", "{use_gdr:?}");
    }
}
