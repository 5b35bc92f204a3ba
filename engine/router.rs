//! Which CUDA strategy moves a batch under [`Strategy::Auto`]: a table of measured crossovers,
//! and the decision made from it for every batch.
//!
//! Measured on the H200 (`bench/results/h200.md`, `ferry bench --workers 1 --load compute`, one
//! worker, 8 SMs, fractions of the PCIe ceiling), idle and with an FMA kernel saturating every SM:
//!
//! | mean block | idle: kernel / copy engine | under load: launched kernel / resident kernel / copy engine (load lost) |
//! |---|---|---|
//! | 4 KiB | 0.70-0.93 / 0.03-0.18 | 0.24 (10-12 %) / 0.71-0.82 (6-12 %) / 0.04-0.18 (0-2 %) |
//! | 16 KiB | 0.87-0.94 / 0.25-0.68 | 0.42-0.45 (5-10 %) / 0.80-0.90 (7-14 %) / 0.28-0.66 (0-0.7 %) |
//! | 64 KiB | 0.83-0.93 / 0.87-0.95 | 0.56-0.63 (5-11 %) / - / 0.91-0.97 (0-0.6 %) |
//! | 256 KiB, 1 MiB | 0.91-0.94 / 0.95-0.99 | 0.6-0.7 (6-12 %) / - / 0.96-0.99 (0-0.6 %) |
//!
//! The copy engine (`cuMemcpyBatchAsync`) takes no SM and loses nothing under load; below
//! 64 KiB its rate per copy is the limit (`gpu/probe_ce_load.cu`: the engine itself runs 4 KiB
//! copies at 18-22 GB/s and 16 KiB at 34-35, and the call costs the worker 0.5-0.9 us per copy),
//! so a copy kernel is the only way to small blocks at PCIe speed. Launched per batch, under a
//! saturating load it waits for SMs at every launch; the resident kernel (launched once per
//! burst, `engine/transport/resident.rs`) keeps most of its idle rate and takes about its SMs'
//! share of the load (twice that going to the host). From 64 KiB up the copy engine matches or
//! beats the kernels idle (given four batches of 8 MiB queued ahead, `engine/transport/cuda.rs`)
//! and alone keeps its rate under load. So: a lone descriptor goes by `cuMemcpyAsync` (the
//! latency path); batches whose mean block reaches [`RouteTable::copy_engine_from`] go to the
//! copy engine; smaller ones to the SMs ([`Strategy::Kernel`] here: the transport uses the
//! resident kernel for it where that loads) while the live SM budget
//! ([`crate::Engine::set_sm_budget`]) allows any SM, else to the copy engine too. Where the
//! resident kernel runs, the transport has already sent it each block below its direction's
//! crossover as the block came (`CudaTransport::split`): the batches routed here are mostly the
//! larger blocks left in its queue.
//! A server lowers the budget to [`crate::SmBudget::None`] while its forward pass needs every
//! SM and raises it when the GPU has room.
//!
//! [`RouteTable::HOPPER`], the default on every GPU, was measured on the H200. For another GPU,
//! `ferry bench --workers 1 --load compute --crossover 2M --sizes 16K,32K,64K,128K,256K,1M` runs
//! the resident kernel at every size beside the copy engine, idle and under load, and its
//! closing "crossover" line names the crossover those cells call for
//! (`engine/bin/ferry/crossover.rs`; on the H200 64 KiB both ways, where the copy engine moved
//! 0.92 of the resident kernel's D2H under the load but took 0.1 % of the load against its
//! 3.8 %: `bench/results/h200/2026-12-03-s14-calibrate.txt`); `CudaConfig::route` (C: `copy_engine_from_h2d` / `_d2h`,
//! `ferry bench --crossover`) sets it.

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
        assert_eq!(route(&t, 100, 100 * (16 << 10), 1, 8, ALL), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 * ((64 << 10) - 1), 1, 8, ALL), Strategy::Kernel);
        assert_eq!(route(&t, 100, 100 * (64 << 10), 1, 8, ALL), Strategy::Batch);
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
