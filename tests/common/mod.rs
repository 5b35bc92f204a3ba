//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use ferry::transport::fault::FaultTransport;
use ferry::transport::host::HostTransport;
use ferry::{Completion, CorePlacement, Engine, EngineConfig, Queue, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod daemon;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn config(transport: TransportKind) -> EngineConfig {
    EngineConfig { transport, cores: CorePlacement::Unpinned, ..EngineConfig::default() }
}

pub fn host_engine() -> Engine {
    Engine::start(config(TransportKind::Host)).expect("engine starts")
}

/// An engine whose transport is a host transport wrapped by `wrap`.
pub fn fault_engine(wrap: impl Fn(FaultTransport) -> FaultTransport + Send + Sync + 'static) -> Engine {
    fault_engine_with(wrap, |c| c)
}

pub fn fault_engine_with(
    wrap: impl Fn(FaultTransport) -> FaultTransport + Send + Sync + 'static,
    tune: impl FnOnce(EngineConfig) -> EngineConfig,
) -> Engine {
    let factory = Arc::new(move |_| -> Box<dyn ferry::Transport> {
        Box::new(wrap(FaultTransport::new(Box::new(HostTransport::new()))))
    });
    Engine::start(tune(config(TransportKind::Custom(factory)))).expect("engine starts")
}

/// Polls until `n` completions arrived.
pub fn collect(queue: &mut Queue, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [Completion::default(); 64];
    let start = Instant::now();
    while out.len() < n {
        let k = queue.poll(&mut buf).expect("poll");
        out.extend_from_slice(&buf[..k]);
        assert!(start.elapsed() < TIMEOUT, "only {} of {n} completions after {TIMEOUT:?}", out.len());
        if k == 0 {
            std::hint::spin_loop();
        }
    }
    out
}

/// Waits until `cond` holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// File descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's resident memory, in bytes.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf only reads a system constant.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Pushes `d` tagged `tag` and polls until its completion, yielding while it waits (as an idle
/// worker does, so that neither thread starves the other on a busy machine); it must be `Ok`.
pub fn copy_one_yielding(queue: &mut Queue, d: ferry::Descriptor, tag: u64) {
    queue.push(d.with_tag(tag)).unwrap();
    let mut done = [Completion::default()];
    let start = Instant::now();
    while queue.poll(&mut done).unwrap() == 0 {
        assert!(start.elapsed() < TIMEOUT, "copy {tag}: no completion");
        std::thread::yield_now();
    }
    assert_eq!((done[0].tag, done[0].status()), (tag, Ok(ferry::Status::Ok)), "copy {tag}");
}
