// The TMA's bulk copies from global into shared memory (sm_90 on), as ferry's resident kernel
// and gpu/probe_tma.cu use them: lane 0 of a warp arms the warp's mbarrier for a byte count and
// starts the bulk load; every lane waits for the barrier's phase.
#pragma once

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // declared in the host pass too
__device__ __forceinline__ unsigned ferry_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Initializes `bar` (shared memory) for one arrival a phase, before any bulk load completes on it.
__device__ __forceinline__ void ferry_bar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(ferry_smem(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One thread: `bytes` (a multiple of 16, both ends 16-byte aligned) from global `src` into shared
// `dst`; `bar`'s current phase completes once they have landed.
__device__ __forceinline__ void ferry_bulk_load(void* dst, unsigned long long src, unsigned bytes,
                                                unsigned long long* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(ferry_smem(bar)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     ferry_smem(dst)),
                 "l"(src), "r"(bytes), "r"(ferry_smem(bar))
                 : "memory");
}

// Waits until `bar`'s phase of parity `phase` has completed.
__device__ __forceinline__ void ferry_bar_wait(unsigned long long* bar, unsigned phase) {
    unsigned ready = 0;
    while (!ready) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(ready)
                     : "r"(ferry_smem(bar)), "r"(phase)
                     : "memory");
    }
}
#endif
