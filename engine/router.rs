//! Which CUDA strategy moves a batch under [`Strategy::Auto`]: a table of measured crossovers,
//! and the decision made from it for every batch.
//!
//! Measured on the H200 (`bench/results/h200.md`, `ferry bench --workers 1 --load compute`, one
//! worker, 8 SMs), idle and with an FMA kernel saturating every SM:
//!
//! | mean block | idle: kernel / copy engine GB/s | under load: kernel / copy engine GB/s (load lost) |
//! |---|---|---|
//! | 4 KiB | 49 / 8 | 14 (12 %) / 8 (0 %) |
//! | 16 KiB | 50 / 30-35 | 23-26 (15-19 %) / 32-38 (0 %) |
//! | 64 KiB | 51 / 42-43 | 34 (15-20 %) / 43-44 (0 %) |
//! | 256 KiB, 1 MiB | 51-52 / 54.5 | 33-39 (15-22 %) / 54.6-54.9 (0 %) |
//!
//! The copy engine (`cuMemcpyBatchAsync`) takes no SM and loses nothing under load; the copy
//! kernel is the only way to small blocks at PCIe speed on an idle GPU, but under a saturating
//! load it waits for SMs and takes 12-22 % of the load's throughput. So: a lone descriptor goes
//! by `cuMemcpyAsync` (the latency path); batches whose mean block reaches
//! [`RouteTable::copy_engine_from`] go to the copy engine; smaller ones to the kernel while the
//! live SM budget ([`crate::Engine::set_sm_budget`]) allows any SM, else to the copy engine too.
//! A server lowers the budget to [`crate::SmBudget::None`] while its forward pass needs every
//! SM and raises it when the GPU has room.

use crate::config::{RouteTable, Strategy};

/// What the device offers the router.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Available {
    /// The copy kernel is loaded.
    pub(crate) kernel: bool,
    /// `cuMemcpyBatchAsync` exists (driver 12.8+).
    pub(crate) batch: bool,
}

/// The strategy for a batch of `n` operations moving `bytes`, mostly in direction `dir` (0 host
/// to GPU, 1 GPU to host), with `sms` SMs allowed to this worker's kernel right now.
pub(crate) fn route(table: &RouteTable, n: usize, bytes: u64, dir: usize, sms: u32, has: Available) -> Strategy {
    if n <= 1 {
        return Strategy::Memcpy;
    }
    let mean = bytes / n as u64;
    let kernel = has.kernel && sms > 0;
    match (kernel, has.batch) {
        (true, true) if mean >= table.copy_engine_from[dir.min(1)] => Strategy::Batch,
        (true, _) => Strategy::Kernel,
        (false, true) => Strategy::Batch,
        (false, false) => Strategy::Memcpy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Available = Available { kernel: true, batch: true };

    #[test]
    fn a_lone_descriptor_takes_the_latency_path() {
        assert_eq!(route(&RouteTable::HOPPER, 1, 4096, 0, 8, ALL), Strategy::Memcpy);
        assert_eq!(route(&RouteTable::HOPPER, 1, 64 << 20, 1, 8, ALL), Strategy::Memcpy);
    }

    #[test]
    fn small_blocks_go_to_the_kernel_and_large_ones_to_the_copy_engine() {
        let t = RouteTable::HOPPER;
        assert_eq!(route(&t, 1000, 1000 * 4096, 0, 8, ALL), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 * (64 << 10), 1, 8, ALL), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 * (256 << 10), 0, 8, ALL), Strategy::Batch);
        assert_eq!(route(&t, 10, 10 << 20, 1, 8, ALL), Strategy::Batch);
        // The crossover is per direction.
        let t = RouteTable { copy_engine_from: [1 << 20, 16 << 10] };
        assert_eq!(route(&t, 100, 100 * (64 << 10), 0, 8, ALL), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 * (64 << 10), 1, 8, ALL), Strategy::Batch);
    }

    #[test]
    fn no_sms_or_no_kernel_means_the_copy_engine_and_no_batch_call_means_memcpy() {
        let t = RouteTable::HOPPER;
        assert_eq!(route(&t, 1000, 1000 * 4096, 0, 0, ALL), Strategy::Batch);
        let no_kernel = Available { kernel: false, batch: true };
        assert_eq!(route(&t, 1000, 1000 * 4096, 0, 8, no_kernel), Strategy::Batch);
        let old_driver = Available { kernel: true, batch: false };
        assert_eq!(route(&t, 100, 100 << 20, 0, 8, old_driver), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 << 20, 0, 0, old_driver), Strategy::Memcpy);
        let nothing = Available { kernel: false, batch: false };
        assert_eq!(route(&t, 100, 100 * 4096, 1, 8, nothing), Strategy::Memcpy);
    }
}
