//! The CUDA transport on a real GPU: random scattered copies of random sizes (1 byte to 4 MiB,
//! unaligned offsets) in both directions with every strategy, destinations poisoned first and
//! checked byte for byte; GPU registration checks. Without a CUDA driver and GPU every test here
//! prints SKIP and returns.

mod common;

use common::Rng;
use ferry::internals::cuda::{DeviceBuffer, Driver};
use ferry::transport::gdr::GdrError;
use ferry::{
    CorePlacement, CudaConfig, Descriptor, Engine, EngineConfig, Error, GdrConfig, GpuConfig, GpuSet, QueueConfig,
    SmBudget, Strategy, TransportKind, UseGdr,
};

fn gpu_available() -> bool {
    match ferry::internals::cuda::gpus() {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP: no usable GPU ({e})");
            false
        }
    }
}

fn cuda_engine(strategy: Strategy) -> Engine {
    let cuda = CudaConfig { strategy, ..CudaConfig::default() };
    let transport = TransportKind::Gpu(GpuConfig { cuda, ..GpuConfig::default() });
    Engine::start(EngineConfig { transport, cores: CorePlacement::Unpinned, burst: 256, ..EngineConfig::default() })
        .expect("cuda engine starts")
}

const SIZE: usize = 64 << 20;

/// Random copies between `src` and `dst` (offsets into regions of SIZE bytes): random lengths,
/// unaligned, destinations disjoint. Returns (src_off, dst_off, len) triples.
fn plan(rng: &mut Rng) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut cursor = 0;
    while cursor < SIZE - (5 << 20) {
        let len = 1 + if rng.below(4) == 0 { rng.below(4 << 20) } else { rng.below(8192) } as usize;
        let dst = cursor + rng.below(64) as usize;
        let src = rng.below((SIZE - len) as u64) as usize;
        out.push((src, dst, len));
        cursor = dst + len;
    }
    out
}

fn run_copies(engine: &Engine, src: ferry::RegionId, dst: ferry::RegionId, copies: &[(usize, usize, usize)]) {
    let descs: Vec<Descriptor> = copies
        .iter()
        .enumerate()
        .map(|(i, &(s, d, n))| Descriptor::copy(src, s as u64, dst, d as u64, n as u64).with_tag(i as u64))
        .collect();
    run_descriptors(engine, &descs);
}

/// Pushes `descs` (tagged with their index) through a new queue of client 1 and checks that each
/// completed ok, in order.
fn run_descriptors(engine: &Engine, descs: &[Descriptor]) {
    let mut queue = engine.open_queue(ferry::ClientId(1), QueueConfig::default()).expect("queue");
    let done = complete(&mut queue, descs);
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.tag, c.status()), (i as u64, Ok(ferry::Status::Ok)), "descriptor {i}: {:?}", descs[i]);
    }
}

/// Pushes `descs` through `queue` as room allows and returns their completions, in order.
fn complete(queue: &mut ferry::Queue, descs: &[Descriptor]) -> Vec<ferry::Completion> {
    let (mut sent, mut done) = (0, Vec::new());
    while done.len() < descs.len() {
        if sent < descs.len() {
            sent += queue.submit(&descs[sent..]).unwrap();
        }
        let mut buf = [ferry::Completion::default(); 256];
        let n = queue.poll(&mut buf).unwrap();
        done.extend_from_slice(&buf[..n]);
    }
    done
}

/// Random strided descriptors (and some plain ones) between regions of SIZE bytes: 1 to 80
/// chunks of 1 byte to 64 KiB at unaligned offsets, destination pitches at least the chunk
/// (some exactly it), source pitches anything from 0 up (source chunks may overlap), each
/// destination span after the one before. Returns the descriptors and the expected destination.
fn strided_plan(
    rng: &mut Rng,
    src: ferry::RegionId,
    dst: ferry::RegionId,
    source: &[u8],
    poison: u8,
) -> (Vec<Descriptor>, Vec<u8>) {
    let mut expected = vec![poison; SIZE];
    let (mut descs, mut cursor) = (Vec::new(), 0usize);
    loop {
        let len = 1 + if rng.below(2) == 0 { rng.below(64 << 10) } else { rng.below(4096) } as usize;
        let count = 1 + rng.below(80) as usize;
        let dst_pitch = len + if rng.below(3) == 0 { 0 } else { rng.below(70_000) as usize };
        let src_pitch =
            if rng.below(8) == 0 { rng.below(len as u64) as usize } else { len + rng.below(200_000) as usize };
        let dst_off = cursor + rng.below(64) as usize;
        let dst_end = dst_off + (count - 1) * dst_pitch + len;
        let src_span = (count - 1) * src_pitch + len;
        if dst_end > SIZE || src_span > SIZE {
            break;
        }
        let src_off = rng.below((SIZE - src_span + 1) as u64) as usize;
        for i in 0..count {
            let (s, d) = (src_off + i * src_pitch, dst_off + i * dst_pitch);
            expected[d..d + len].copy_from_slice(&source[s..s + len]);
        }
        let mut desc =
            Descriptor::copy(src, src_off as u64, dst, dst_off as u64, len as u64).with_tag(descs.len() as u64);
        if count > 1 || rng.below(2) == 0 {
            desc = desc.strided(count as u32, src_pitch as u64, dst_pitch as u64);
        }
        descs.push(desc);
        cursor = dst_end;
    }
    (descs, expected)
}

#[test]
fn strided_descriptors_every_strategy_both_directions() {
    if !gpu_available() {
        return;
    }
    for strategy in [Strategy::Memcpy, Strategy::Batch, Strategy::Kernel, Strategy::Auto] {
        let engine = cuda_engine(strategy);
        let client = engine.new_client();
        let host = engine.allocate_host(client, SIZE).unwrap();
        let device = DeviceBuffer::new(SIZE).unwrap();
        // SAFETY: `device` outlives the engine's use of it (deregistered below).
        let gpu = unsafe { engine.register_gpu(client, device.ptr(), SIZE) }.unwrap();
        let mut rng = Rng(0x5eed_0000 ^ strategy as u64);
        let pattern: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
        host.write(0, &pattern).unwrap();
        device.fill(0xA5).unwrap();
        let (h2d, on_device) = strided_plan(&mut rng, host.id(), gpu, &pattern, 0xA5);
        run_descriptors(&engine, &h2d);
        let mut got = vec![0u8; SIZE];
        device.read(0, &mut got).unwrap();
        assert!(got == on_device, "{}: strided H2D bytes differ", strategy.name());
        host.fill(0, SIZE, 0x3C).unwrap();
        let (d2h, on_host) = strided_plan(&mut rng, gpu, host.id(), &on_device, 0x3C);
        run_descriptors(&engine, &d2h);
        host.read(0, &mut got).unwrap();
        assert!(got == on_host, "{}: strided D2H bytes differ", strategy.name());
        let chunks: u32 = h2d.iter().chain(&d2h).map(|d| d.count.max(1)).sum();
        println!(
            "{}: {} H2D and {} D2H strided descriptors ({chunks} chunks) checked byte for byte",
            strategy.name(),
            h2d.len(),
            d2h.len()
        );
        engine.deregister(gpu).unwrap();
    }
}

#[test]
fn random_copies_every_strategy_both_directions() {
    if !gpu_available() {
        return;
    }
    // The last two: the live SM budget taken to none, so `auto` and `kernel` use the copy engine.
    let cases = [
        (Strategy::Memcpy, None),
        (Strategy::Batch, None),
        (Strategy::Kernel, None),
        (Strategy::Resident, None),
        (Strategy::Auto, None),
        (Strategy::Auto, Some(SmBudget::None)),
        (Strategy::Kernel, Some(SmBudget::None)),
    ];
    for (strategy, live_budget) in cases {
        let engine = cuda_engine(strategy);
        if let Some(budget) = live_budget {
            engine.set_sm_budget(budget).unwrap();
        }
        assert_eq!(engine.new_client().0, 1);
        let client = ferry::ClientId(1);
        let host = engine.allocate_host(client, SIZE).unwrap();
        let device = DeviceBuffer::new(SIZE).unwrap();
        // SAFETY: `device` outlives the engine's use of it (deregistered below).
        let gpu = unsafe { engine.register_gpu(client, device.ptr(), SIZE) }.unwrap();
        let mut rng = Rng(0x1234_5678 ^ strategy as u64);
        // H2D: random host bytes into a poisoned device buffer.
        let pattern: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
        host.write(0, &pattern).unwrap();
        device.fill(0xA5).unwrap();
        let copies = plan(&mut rng);
        let mut expected = vec![0xA5u8; SIZE];
        for &(s, d, n) in &copies {
            expected[d..d + n].copy_from_slice(&pattern[s..s + n]);
        }
        run_copies(&engine, host.id(), gpu, &copies);
        let mut got = vec![0u8; SIZE];
        device.read(0, &mut got).unwrap();
        assert!(got == expected, "{}: H2D bytes differ", strategy.name());
        // D2H: the device now holds `expected`; copy it into poisoned host memory.
        host.fill(0, SIZE, 0x3C).unwrap();
        let copies = plan(&mut rng);
        let mut expected_host = vec![0x3Cu8; SIZE];
        for &(s, d, n) in &copies {
            expected_host[d..d + n].copy_from_slice(&expected[s..s + n]);
        }
        run_copies(&engine, gpu, host.id(), &copies);
        host.read(0, &mut got).unwrap();
        assert!(got == expected_host, "{}: D2H bytes differ", strategy.name());
        println!(
            "{} (live SM budget {}): {} H2D and {} D2H copies checked byte for byte",
            strategy.name(),
            live_budget.map_or("as configured".to_owned(), |b| b.to_string()),
            copies.len(),
            copies.len()
        );
        engine.deregister(gpu).unwrap();
        drop(engine);
    }
}

#[test]
fn gpu_registration_checks_the_range() {
    if !gpu_available() {
        return;
    }
    let engine = cuda_engine(Strategy::Auto);
    let client = engine.new_client();
    let device = DeviceBuffer::new(1 << 20).unwrap();
    let host = engine.allocate_host(client, 4096).unwrap();
    // SAFETY: every call below is refused before anything is registered, or registers memory
    // that outlives the engine.
    unsafe {
        let past_end = engine.register_gpu(client, device.ptr() + 4096, 1 << 20).unwrap_err();
        assert!(
            matches!(past_end, Error::GpuRange { .. }) && past_end.to_string().contains("past its allocation"),
            "{past_end}"
        );
        let host_memory = engine.register_gpu(client, host.as_ptr() as u64, 4096).unwrap_err();
        assert!(host_memory.to_string().contains("not device memory"), "{host_memory}");
        let unknown = engine.register_gpu(client, 0x10, 16).unwrap_err();
        assert!(unknown.to_string().contains("does not know"), "{unknown}");
        engine.register_gpu(client, device.ptr() + 4096, 4096).unwrap();
    }
    // A pinned host region can be deregistered (and unpinned) from a thread that never used CUDA.
    let pinned = engine.allocate_host(client, 1 << 20).unwrap();
    std::thread::scope(|s| s.spawn(|| engine.deregister(pinned.id())).join().unwrap()).unwrap();
    let host_engine =
        Engine::start(EngineConfig { cores: CorePlacement::Unpinned, ..EngineConfig::default() }).unwrap();
    // SAFETY: refused before anything is registered.
    let err = unsafe { host_engine.register_gpu(host_engine.new_client(), device.ptr(), 4096) }.unwrap_err();
    assert!(matches!(err, Error::GpuRange { fault: ferry::error::GpuRangeFault::NoGpuTransport, .. }), "{err}");
    assert!(err.to_string().contains("does not run the GPU transport"), "{err}");
}

#[test]
fn asking_for_cuda_without_a_driver_is_a_clear_startup_error() {
    if Driver::load().is_ok() {
        println!("SKIP: a CUDA driver is present; this checks the error where there is none");
        return;
    }
    for devices in [GpuSet::One, GpuSet::All, GpuSet::List(vec![0, 1])] {
        let err = Engine::start(EngineConfig {
            transport: TransportKind::Gpu(GpuConfig { devices: devices.clone(), ..GpuConfig::default() }),
            cores: CorePlacement::Unpinned,
            ..EngineConfig::default()
        })
        .err()
        .expect("no driver, no engine");
        assert!(err.to_string().contains("libcuda.so.1 not found"), "{devices:?}: {err}");
    }
}

/// An engine over every GPU of the machine (`GpuSet::All`; one on the lent H200, eight on a
/// DGX): each GPU has its workers (`worker_gpus`) and its context; from one queue, host memory
/// moves to and from every GPU's memory byte for byte (each copy on the streams of the GPU it
/// touches); with two GPUs or more, a copy between GPUs moves its bytes where the driver
/// reports peer access and completes `Unsupported` where it does not. A GPU ordinal the machine
/// lacks is a clear start-up error.
#[test]
fn one_engine_over_every_gpu_copies_to_and_from_each() {
    if !gpu_available() {
        return;
    }
    let count = ferry::internals::cuda::gpus().unwrap().len();
    let engine = Engine::start(EngineConfig {
        workers: 1,
        transport: TransportKind::Gpu(GpuConfig { devices: GpuSet::All, ..GpuConfig::default() }),
        cores: CorePlacement::Unpinned,
        ..EngineConfig::default()
    })
    .expect("an engine over every GPU");
    let contexts = engine.cuda_contexts();
    assert_eq!(contexts.len(), count);
    assert_eq!(engine.worker_gpus(), (0..count).collect::<Vec<_>>(), "a worker per GPU, in order");
    println!("{count} GPU(s), workers for GPUs {:?}; notes {:?}", engine.worker_gpus(), engine.transport_notes());
    const LEN: usize = 4 << 20;
    let client = engine.new_client();
    let host = engine.allocate_host(client, 2 * LEN).unwrap();
    let mut rng = Rng(0x6a11);
    let pattern: Vec<u8> = (0..LEN).map(|_| rng.next() as u8).collect();
    host.write(0, &pattern).unwrap();
    let mut devices = Vec::new();
    for context in &contexts {
        context.make_current().unwrap();
        let device = DeviceBuffer::new(LEN).unwrap();
        device.fill(0xA5).unwrap();
        // SAFETY: `device` outlives its region (deregistered below).
        let region = unsafe { engine.register_gpu(client, device.ptr(), LEN) }.unwrap();
        devices.push((device, region));
    }
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let blocks = LEN / 65536;
    for (g, (device, region)) in devices.iter().enumerate() {
        // Scattered 64 KiB blocks in, then back into the host's second half, all on one queue.
        let h2d: Vec<Descriptor> = (0..blocks)
            .map(|i| Descriptor::copy(host.id(), (i * 65536) as u64, *region, ((blocks - 1 - i) * 65536) as u64, 65536))
            .collect();
        assert!(complete(&mut queue, &h2d).iter().all(|c| c.is_ok()), "H2D to GPU {g}");
        host.fill(LEN, LEN, 0x3C).unwrap();
        let d2h: Vec<Descriptor> = (0..blocks)
            .map(|i| {
                Descriptor::copy(*region, ((blocks - 1 - i) * 65536) as u64, host.id(), (LEN + i * 65536) as u64, 65536)
            })
            .collect();
        assert!(complete(&mut queue, &d2h).iter().all(|c| c.is_ok()), "D2H from GPU {g}");
        let mut back = vec![0u8; LEN];
        host.read(LEN, &mut back).unwrap();
        assert!(back == pattern, "GPU {g}: the bytes back differ");
        contexts[g].make_current().unwrap();
        let mut on_device = vec![0u8; 65536];
        device.read((blocks - 1) * 65536, &mut on_device).unwrap();
        assert!(on_device[..] == pattern[..65536], "GPU {g}: block 0 is not where it was put");
    }
    if count >= 2 {
        let ((a, ra), (b, rb)) = (&devices[0], &devices[1]);
        let done = complete(&mut queue, &[Descriptor::copy(*ra, 0, *rb, 0, LEN as u64)]);
        let peer = contexts[1].enable_peer_access(&contexts[0]).unwrap();
        if peer {
            assert!(done[0].is_ok(), "GPU 0 -> GPU 1 with peer access: {:?}", done[0]);
            let (mut x, mut y) = (vec![0u8; LEN], vec![0u8; LEN]);
            contexts[0].make_current().unwrap();
            a.read(0, &mut x).unwrap();
            contexts[1].make_current().unwrap();
            b.read(0, &mut y).unwrap();
            assert!(x == y, "GPU 0 -> GPU 1: bytes differ");
        } else {
            assert_eq!(done[0].status(), Ok(ferry::Status::Unsupported), "no peer access: {:?}", done[0]);
        }
        println!("GPU 0 -> GPU 1: peer access {peer}, {:?}", done[0].status());
    } else {
        println!("SKIP: one GPU here: the copy between two GPUs' memory did not run");
    }
    drop(queue);
    for (_, region) in &devices {
        engine.deregister(*region).unwrap();
    }
    // Queues on one GPU's workers; a GPU past the engine's is refused.
    let on_last = QueueConfig { gpu: Some(count - 1), ..QueueConfig::default() };
    engine.open_queue(client, on_last).unwrap();
    let past = QueueConfig { gpu: Some(count), ..QueueConfig::default() };
    assert!(matches!(engine.open_queue(client, past), Err(Error::InvalidSetting { .. })));
    drop(engine);
    let missing = Engine::start(EngineConfig {
        transport: TransportKind::Gpu(GpuConfig { devices: GpuSet::List(vec![count as u32]), ..GpuConfig::default() }),
        cores: CorePlacement::Unpinned,
        ..EngineConfig::default()
    });
    match missing {
        Err(e) => println!("GPU list naming ordinal {count}: {e}"),
        Ok(_) => panic!("ordinal {count} does not exist here, yet the engine started"),
    }
}

#[test]
fn a_gpu_region_exports_as_a_dmabuf_and_registering_it_with_a_nic_names_the_missing_nic() {
    if !gpu_available() {
        return;
    }
    // use_gdr = auto (the default): with no NIC here the engine runs on CUDA, saying why.
    let engine = cuda_engine(Strategy::Auto);
    assert_eq!(engine.transport_name(), "cuda");
    println!("transport notes: {:?}", engine.transport_notes());
    let context = engine.cuda_context().expect("a CUDA context").clone();
    let device = DeviceBuffer::new(4 << 20).unwrap();
    let (addr, len) = (device.ptr() + 8192 + 100, 1 << 20);
    // SAFETY: the allocation outlives the engine.
    unsafe { engine.register_gpu(engine.new_client(), addr, len) }.unwrap();
    let info = context.pointer_info(addr).unwrap();
    let dmabuf = context
        .export_dmabuf(addr, len as u64, (info.range_start, info.range_size))
        .expect("cuMemGetHandleForAddressRange exports the registered range as a dma-buf");
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", dmabuf.fd.as_raw_fd())).unwrap();
    println!(
        "dma-buf: fd {} -> {}, {} bytes exported, the range at offset {}",
        dmabuf.fd.as_raw_fd(),
        link.display(),
        dmabuf.exported,
        dmabuf.offset
    );
    assert!(link.to_string_lossy().contains("dmabuf"), "{}", link.display());
    assert_eq!(dmabuf.offset, 100, "the buffer starts at the page holding the address");
    assert!(dmabuf.exported >= dmabuf.offset + len as u64);
    // Registering it with a NIC (use_gdr = on) fails at start, naming what is missing.
    let on = Engine::start(EngineConfig {
        transport: TransportKind::Gpu(GpuConfig {
            gdr: GdrConfig { use_gdr: UseGdr::On, ..GdrConfig::default() },
            ..GpuConfig::default()
        }),
        cores: CorePlacement::Unpinned,
        ..EngineConfig::default()
    });
    match on {
        Err(Error::Gdr(reason)) => {
            println!("use_gdr = on: {reason}");
            assert!(
                matches!(reason, GdrError::NoLibrary | GdrError::NoDevice),
                "the error names the missing NIC: {reason}"
            );
        }
        Err(other) => panic!("expected a GDR error, got {other}"),
        Ok(engine) => {
            println!("SKIP: this machine has a usable RDMA NIC ({:?}): nothing is missing", engine.nic_name())
        }
    }
}

#[test]
fn the_live_sm_budget_is_refused_without_a_cuda_context() {
    // Runs everywhere: a host engine has no copy kernel to budget.
    let engine = Engine::start(EngineConfig { cores: CorePlacement::Unpinned, ..EngineConfig::default() }).unwrap();
    for budget in [SmBudget::None, SmBudget::All, SmBudget::DEFAULT] {
        let err = engine.set_sm_budget(budget).unwrap_err();
        assert!(matches!(err, Error::InvalidSetting { .. }), "{err}");
        assert!(err.to_string().contains("GPU transport"), "{err}");
    }
}

/// Stream ordering on a real GPU (issue 13), for each copy strategy: a stream already waiting (`stream_wait`, then `stream_wait_slot`) reads the loaded
/// blocks back with its own copy, which must see every byte of this round's load, never the
/// poison; and a D2H behind a gate opened by `stream_signal` must see what the stream wrote
/// before the signal. Each round loads different bytes, so a stale read cannot pass.
#[test]
fn stream_waits_and_gates_order_copies_with_a_stream() {
    use ferry::internals::cuda::{PinnedBuffer, Stream};
    if !gpu_available() {
        return;
    }
    const BLOCK: usize = 16 << 10;
    const BLOCKS: usize = 8;
    const ROUNDS: usize = 200;
    let len = BLOCK * BLOCKS;
    for strategy in [Strategy::Memcpy, Strategy::Batch, Strategy::Kernel, Strategy::Resident, Strategy::Auto] {
        let engine = cuda_engine(strategy);
        let context = engine.cuda_context().expect("a CUDA context").clone();
        let client = engine.new_client();
        let host = engine.allocate_host(client, 2 * len).unwrap();
        let device = DeviceBuffer::new(len).unwrap();
        // SAFETY: `device` outlives the engine's use of it (deregistered below).
        let gpu = unsafe { engine.register_gpu(client, device.ptr(), len) }.unwrap();
        let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
        context.make_current().unwrap();
        let stream = Stream::new().unwrap();
        let check = PinnedBuffer::new(len).unwrap();
        let mut rng = Rng(0x57ea_0000 ^ strategy as u64);
        let mut out = [ferry::Completion::default(); 64];
        let mut wait_all = |queue: &mut ferry::Queue, expect: usize| {
            let mut seen = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen < expect {
                let n = queue.poll(&mut out).unwrap();
                for c in &out[..n] {
                    assert_eq!(c.status(), Ok(ferry::Status::Ok), "{}: {c:?}", strategy.name());
                }
                seen += n;
                assert!(std::time::Instant::now() < deadline, "{}: completions did not come", strategy.name());
            }
        };
        let (mut wrong_wait, mut wrong_slot, mut stale_gated) = (0usize, 0usize, 0usize);
        for round in 0..ROUNDS {
            let by_slot = round % 2 == 1;
            // This round's bytes in the host's first half; the device poisoned.
            let pattern: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            host.write(0, &pattern).unwrap();
            device.fill(0xA5).unwrap();
            // SAFETY: the stream and queue are live until the stream is synchronized below; the
            // device and pinned buffers outlive the stream's copies.
            unsafe {
                if by_slot {
                    engine.stream_wait_slot(&mut queue, stream.handle(), 3, round as u64 + 1).unwrap();
                } else {
                    let watermark = queue.pushed() + BLOCKS as u64;
                    engine.stream_wait(&mut queue, stream.handle(), watermark).unwrap();
                }
                stream.copy(check.as_ptr() as u64, device.ptr(), len).unwrap();
            }
            // Blocks in reverse order, so the load is scattered, not one run.
            let mut descs: Vec<Descriptor> = (0..BLOCKS)
                .rev()
                .map(|b| Descriptor::copy(host.id(), (b * BLOCK) as u64, gpu, (b * BLOCK) as u64, BLOCK as u64))
                .collect();
            if by_slot {
                descs.push(Descriptor::notify(3, round as u64 + 1));
            }
            assert_eq!(queue.submit(&descs).unwrap(), descs.len());
            wait_all(&mut queue, descs.len());
            stream.synchronize().unwrap();
            // SAFETY: the stream's copy into `check` has finished (synchronized).
            let seen = unsafe { std::slice::from_raw_parts(check.as_ptr(), len) };
            let wrong = seen.iter().zip(&pattern).filter(|(a, b)| a != b).count();
            *(if by_slot { &mut wrong_slot } else { &mut wrong_wait }) += wrong;

            // Gated offload: the stream writes the device (after a poison of the host's second
            // half by the CPU), then signals; the D2H behind the gate must see the stream's bytes.
            host.fill(len, len, 0x3C).unwrap();
            let fresh: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // SAFETY: `check` is pinned and ours; the stream's copy finishes before the gate
            // opens (the signal is behind it on the stream).
            unsafe {
                std::ptr::copy_nonoverlapping(fresh.as_ptr(), check.as_ptr(), len);
                stream.copy(device.ptr(), check.as_ptr() as u64, len).unwrap();
                engine.stream_signal(&mut queue, stream.handle(), round as u64 + 1).unwrap();
            }
            let gated =
                [Descriptor::gate(round as u64 + 1), Descriptor::copy(gpu, 0, host.id(), len as u64, len as u64)];
            assert_eq!(queue.submit(&gated).unwrap(), 2);
            wait_all(&mut queue, 2);
            let mut got = vec![0u8; len];
            host.read(len, &mut got).unwrap();
            stale_gated += got.iter().zip(&fresh).filter(|(a, b)| a != b).count();
            stream.synchronize().unwrap();
        }
        println!(
            "{}: {ROUNDS} rounds of {BLOCKS} x {} KiB: wrong bytes after stream_wait {wrong_wait}, after stream_wait_slot {wrong_slot}; stale bytes in gated offloads {stale_gated}",
            strategy.name(),
            BLOCK >> 10
        );
        assert_eq!((wrong_wait, wrong_slot, stale_gated), (0, 0, 0), "{}", strategy.name());
        drop(queue);
        engine.deregister(gpu).unwrap();
    }
}

/// One queue moving both ways at once with blocks either side of the crossover, interleaved:
/// `auto` and `resident` send each block its way (small ones to the resident kernel, large ones
/// to the copy engine) as it comes, also with a different crossover per direction (all of one
/// direction's blocks to the SMs, the other's to the copy engine). Every byte both ways is
/// checked, and a stream waiting for the whole mix (stream_wait) sees every loaded byte.
#[test]
fn one_queue_moving_both_ways_with_small_and_large_blocks_interleaved() {
    use ferry::internals::cuda::{PinnedBuffer, Stream};
    use ferry::RouteTable;
    if !gpu_available() {
        return;
    }
    const HALF: usize = 32 << 20;
    let routes = [
        ("the default crossover", RouteTable::HOPPER),
        ("H2D 1 MiB, D2H 16 KiB", RouteTable { copy_engine_from: [1 << 20, 16 << 10] }),
    ];
    let cases = [Strategy::Batch, Strategy::Kernel, Strategy::Resident, Strategy::Auto]
        .into_iter()
        .flat_map(|s| routes.iter().map(move |r| (s, *r)));
    for (strategy, (route_name, route)) in cases {
        let cuda = CudaConfig { strategy, route, ..CudaConfig::default() };
        let transport = TransportKind::Gpu(GpuConfig { cuda, ..GpuConfig::default() });
        let engine = Engine::start(EngineConfig {
            transport,
            cores: CorePlacement::Unpinned,
            burst: 256,
            ..EngineConfig::default()
        })
        .expect("cuda engine starts");
        let context = engine.cuda_context().expect("a CUDA context").clone();
        let client = engine.new_client();
        // Host: H2D sources in the first half, D2H destinations (poisoned) in the second. Device:
        // H2D destinations (poisoned) in the first half, D2H sources in the second.
        let host = engine.allocate_host(client, 2 * HALF).unwrap();
        let device = DeviceBuffer::new(2 * HALF).unwrap();
        // SAFETY: `device` outlives the engine's use of it (deregistered below).
        let gpu = unsafe { engine.register_gpu(client, device.ptr(), 2 * HALF) }.unwrap();
        let mut rng = Rng(0xb071_0000_u64.wrapping_add(strategy as u64) ^ route.copy_engine_from[0]);
        let to_gpu: Vec<u8> = (0..HALF).map(|_| rng.next() as u8).collect();
        let to_host: Vec<u8> = (0..HALF).map(|_| rng.next() as u8).collect();
        host.write(0, &to_gpu).unwrap();
        host.fill(HALF, HALF, 0x3C).unwrap();
        device.fill(0xA5).unwrap();
        device.write(HALF, &to_host).unwrap();
        let (mut expect_gpu, mut expect_host) = (vec![0xA5u8; HALF], vec![0x3Cu8; HALF]);
        // Alternating directions; each block small (to 32 KiB) or large (64 KiB to 1 MiB) at random.
        let (mut descs, mut cursor) = (Vec::new(), [0usize; 2]);
        loop {
            let dir = descs.len() % 2;
            let len =
                if rng.below(2) == 0 { 1 + rng.below(32 << 10) } else { (64 << 10) + rng.below(960 << 10) } as usize;
            let dst = cursor[dir] + rng.below(64) as usize;
            if dst + len > HALF {
                break;
            }
            let src = rng.below((HALF - len) as u64) as usize;
            let desc = if dir == 0 {
                expect_gpu[dst..dst + len].copy_from_slice(&to_gpu[src..src + len]);
                Descriptor::copy(host.id(), src as u64, gpu, dst as u64, len as u64)
            } else {
                expect_host[dst..dst + len].copy_from_slice(&to_host[src..src + len]);
                Descriptor::copy(gpu, (HALF + src) as u64, host.id(), (HALF + dst) as u64, len as u64)
            };
            descs.push(desc.with_tag(descs.len() as u64));
            cursor[dir] = dst + len;
        }
        let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
        context.make_current().unwrap();
        let stream = Stream::new().unwrap();
        let check = PinnedBuffer::new(HALF).unwrap();
        // SAFETY: the stream and queue are live until the stream is synchronized below; the
        // device and pinned buffers outlive the stream's copy.
        let watermark = queue.pushed() + descs.len() as u64;
        unsafe {
            engine.stream_wait(&mut queue, stream.handle(), watermark).unwrap();
            stream.copy(check.as_ptr() as u64, device.ptr(), HALF).unwrap();
        }
        let done = complete(&mut queue, &descs);
        for (i, c) in done.iter().enumerate() {
            assert_eq!((c.tag, c.status()), (i as u64, Ok(ferry::Status::Ok)), "{}: descriptor {i}", strategy.name());
        }
        stream.synchronize().unwrap();
        let mut got = vec![0u8; HALF];
        device.read(0, &mut got).unwrap();
        assert!(got == expect_gpu, "{} ({route_name}): H2D bytes differ", strategy.name());
        // SAFETY: the stream's copy into `check` has finished (synchronized).
        let seen = unsafe { std::slice::from_raw_parts(check.as_ptr(), HALF) };
        let stale = seen.iter().zip(&expect_gpu).filter(|(a, b)| a != b).count();
        host.read(HALF, &mut got).unwrap();
        assert!(got == expect_host, "{} ({route_name}): D2H bytes differ", strategy.name());
        println!(
            "{} ({route_name}): {} blocks both ways interleaved checked byte for byte; stale bytes after stream_wait {stale}",
            strategy.name(),
            descs.len()
        );
        assert_eq!(stale, 0, "{} ({route_name}): the stream went on before the loads landed", strategy.name());
        drop(queue);
        engine.deregister(gpu).unwrap();
    }
}

/// `ferry serve --transport cuda` with a client in this process (issue 14): the client's own
/// GPU memory goes to the daemon as a CUDA IPC handle (`Engine::register_gpu` on a connected
/// engine), and copies between it and daemon-allocated (pinned) host memory move the right
/// bytes both ways; a bad handle, a range past the allocation, and another client's GPU region
/// are refused; a freed region is gone.
#[test]
fn a_cuda_daemon_copies_a_clients_gpu_memory_shared_by_ipc() {
    use common::daemon::Daemon;
    if !gpu_available() {
        return;
    }
    let daemon = match Daemon::start_with("cuda-ipc", &["--transport", "cuda", "--unpinned"]) {
        Ok(daemon) => daemon,
        Err(e) => panic!("a CUDA daemon should start on a GPU machine: {e}"),
    };
    let driver = Driver::load().unwrap();
    let context = ferry::internals::cuda::Context::new(&driver, 0).unwrap();
    const LEN: usize = 8 << 20;
    // A range inside a larger allocation: the daemon maps the allocation, the offset says where.
    let device = DeviceBuffer::new(LEN + (1 << 20)).unwrap();
    let (ptr, at) = (device.ptr() + 65536, 65536);
    let engine = Engine::connect(&daemon.socket).expect("connects");
    let client = engine.new_client();
    // SAFETY: `device` outlives the region (freed below, before the buffer drops).
    let gpu = unsafe { engine.register_gpu(client, ptr, LEN) }.expect("registered by CUDA IPC");
    let host = engine.allocate_host(client, LEN).unwrap();
    let mut rng = Rng(0x1bc0);
    let pattern: Vec<u8> = (0..LEN).map(|_| rng.next() as u8).collect();
    host.write(0, &pattern).unwrap();
    device.fill(0xA5).unwrap();
    // H2D in 64 KiB blocks, scattered (block i of the host to block n-1-i of the GPU).
    let blocks = LEN / 65536;
    let h2d: Vec<Descriptor> = (0..blocks)
        .map(|i| Descriptor::copy(host.id(), (i * 65536) as u64, gpu, ((blocks - 1 - i) * 65536) as u64, 65536))
        .collect();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    assert!(complete(&mut queue, &h2d).iter().all(|c| c.is_ok()), "H2D through the daemon");
    let mut got = vec![0u8; LEN];
    device.read(at, &mut got).unwrap();
    for i in 0..blocks {
        let (g, p) = ((blocks - 1 - i) * 65536, i * 65536);
        assert!(got[g..g + 65536] == pattern[p..p + 65536], "H2D block {i} differs");
    }
    // D2H: the GPU's bytes back into a poisoned host buffer, in order.
    host.fill(0, LEN, 0x3C).unwrap();
    let d2h: Vec<Descriptor> =
        (0..blocks).map(|i| Descriptor::copy(gpu, (i * 65536) as u64, host.id(), (i * 65536) as u64, 65536)).collect();
    assert!(complete(&mut queue, &d2h).iter().all(|c| c.is_ok()), "D2H through the daemon");
    let mut back = vec![0u8; LEN];
    host.read(0, &mut back).unwrap();
    assert!(back == got, "D2H bytes differ");
    println!("{LEN} bytes of this process's GPU memory copied both ways by a CUDA daemon (IPC), checked");
    // Refusals: a garbage handle, a range past the allocation, another client's region.
    let mut raw = ferry::Client::connect(&daemon.socket).unwrap();
    match raw.register_gpu([0x5a; 64], 0, 4096) {
        Err(Error::Daemon { message }) => println!("a garbage handle: {message}"),
        other => panic!("a garbage IPC handle must be refused, got {other:?}"),
    }
    let export = ferry::internals::cuda::export_ipc(ptr, LEN as u64).unwrap();
    assert_eq!(export.offset, at as u64);
    match raw.register_gpu(export.handle, (LEN + (1 << 20)) as u64 - 4096, 8192) {
        Err(Error::Daemon { message }) => {
            assert!(message.contains("inside the allocation"), "{message}");
        }
        other => panic!("a range past the allocation must be refused, got {other:?}"),
    }
    let other = engine.new_client();
    let their_host = engine.allocate_host(other, 65536).unwrap();
    let mut their_queue = engine.open_queue(other, QueueConfig::default()).unwrap();
    let stolen = complete(&mut their_queue, &[Descriptor::copy(gpu, 0, their_host.id(), 0, 65536)]);
    assert_eq!(stolen[0].status(), Ok(ferry::Status::NotOwner), "{:?}", stolen[0]);
    // Freed: the region is gone (the daemon closed its mapping).
    engine.deregister(gpu).unwrap();
    let after = complete(&mut queue, &[Descriptor::copy(host.id(), 0, gpu, 0, 4096)]);
    assert!(!after[0].is_ok(), "a freed GPU region must not be copied into: {:?}", after[0]);
    drop((queue, their_queue, raw));
    drop(engine);
    daemon.stop();
    drop(context);
}
