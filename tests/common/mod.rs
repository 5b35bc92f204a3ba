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
