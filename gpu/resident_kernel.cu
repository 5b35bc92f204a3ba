// ferry's resident copy kernel (the `resident` strategy): launched when a worker's CUDA transport
// has tasks for it, it stays on a few reserved SMs and copies the tasks the worker publishes in a
// ring in pinned host memory, so that no copy waits for a launch behind the GPU's other work.
// Measured on the H200 (bench/results/h200.md): 4-64 KiB blocks at 0.88-0.95 of PCIe on 2 SMs
// under a saturating compute load, which loses 2-5 % of its throughput.
//
// It ends by itself: once every published task is copied and none came for `idle_ns`, or once it
// has run `life_ns` (it then stops taking new tasks and ends when those it took are copied), or
// when the host asks. So anything that waits for the CUDA context to go idle (a device-wide
// synchronize, a lazy kernel load) waits at most that long behind it, never forever; the host
// launches it again (same stream, from the watermark) when tasks are left.
//
// One block of 1024 threads per SM (the launch asks for more than half of an SM's shared memory,
// so that no second block lands there, and no more: the rest is the SM's L1, where the copy
// loop's loads land; from sm_90 on its warps stage copies through it, below). Warp 0
// of block 0 is the poller: it mirrors the host's published tail into device memory, decides
// when the kernel ends, and passes that on. Warp 1 of block 0 is the scanner: it advances the
// in-order watermark over the per-task done flags (32 at a time) and publishes it to the host,
// then to the poller; it never reads host memory, so a finished copy is not kept waiting behind
// the poller's read of the host's tail over PCIe (a microsecond or more). Every other warp
// claims FERRY_CLAIM consecutive task indices with one atomic, copies each task once it is
// published (the descriptors of the published ones read in one go), fences and raises the
// tasks' done flags; copies into host memory pass the writer gate (at most `writers` warps at a
// time, below).
//
// The host's side (engine/transport/resident.rs) keeps at most FERRY_RING - 1 tasks unfinished,
// so a ring slot and its done flag are reused only after the watermark passed them, and before
// each launch resets the device side's claim and tail to the watermark (stream-ordered behind
// the previous launch).
//
// The PTX beside this file is what ferry loads (cuModuleLoadData; resident_kernel_sm90.ptx on
// sm_90 and later, resident_kernel.ptx before), so building ferry never needs nvcc. Regenerate
// them on a machine with the CUDA toolkit:
//   nvcc -ptx -arch=compute_80 -O3 -o gpu/resident_kernel.ptx gpu/resident_kernel.cu
//   nvcc -ptx -arch=compute_90 -O3 -o gpu/resident_kernel_sm90.ptx gpu/resident_kernel.cu

#define FERRY_RING 65536u  // task slots, a power of two (the transport's RESIDENT_RING)
#define FERRY_CLAIM 8u     // tasks a warp claims at once
#ifndef FERRY_SCAN_NS
#define FERRY_SCAN_NS 32   // the scanner's sleep between its passes over the done flags
#endif

struct FerryTask {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
    unsigned long long to_host;  // nonzero: dst is host memory (the copy passes the writer gate)
};

// In pinned host memory, mapped for the device. The layout of `ResidentHost` in cuda.rs.
struct FerryResidentHost {
    unsigned long long tail;     // tasks published by the host
    unsigned long long done;     // in-order watermark: every task below it is copied
    unsigned int stop;           // the host asks the kernel to end
    unsigned int ended;          // the launch (its `epoch`) whose poller has decided to end
};

// In device memory, zeroed before the launch. The layout of `RESIDENT_DEV_BYTES` in cuda.rs.
// Probes may define FERRY_DEV_APART (as alignas(128)) to give each group of fields below a line
// of its own.
#ifndef FERRY_DEV_APART
#define FERRY_DEV_APART
#endif
struct FerryResidentDev {
    FERRY_DEV_APART unsigned long long claim;    // next task index to claim (the host sets it before a launch)
    FERRY_DEV_APART unsigned long long tail;     // the poller's mirror of the host's tail (likewise)
    unsigned int stop;           // the poller's mirror of the host's stop
    FERRY_DEV_APART unsigned int writers;        // warps copying into host memory now (the host zeroes it)
    FERRY_DEV_APART unsigned long long done;     // the scanner's watermark, once the host's copy of it is written
    FERRY_DEV_APART unsigned char flags[FERRY_RING];  // task i is copied: flags[i % FERRY_RING] != 0
};

#include "copy_task.cuh"

// Reading host memory, 4 SMs of ferry's copy loop reach about 0.83 of PCIe, 8 SMs 0.93: the
// loop keeps too few reads in flight per SM. The TMA (sm_90 on) keeps more: 4 SMs whose warps
// bulk-load 4 KiB into shared memory and store it with the 32 lanes reach 0.93
// (gpu/probe_tma.cu, H200). So from sm_90 on, a task into device memory whose ends are 16-byte
// aligned is staged through its warp's FERRY_STAGE bytes of shared memory; any other task (those
// into host memory read device memory, where the loop keeps enough in flight), and every task
// before sm_90, takes the loop. The PTX for sm_90 on is generated apart (resident_kernel_sm90.ptx).
#define FERRY_STAGE 4096u  // bytes of shared memory per warp, a multiple of 16

#include "tma.cuh"

#if __CUDA_ARCH__ >= 900
// Copies `n` bytes (src and dst 16-byte aligned) through `stage` with the calling warp: lane 0
// bulk-loads up to FERRY_STAGE bytes, every lane waits for the barrier's phase, the 32 lanes
// store them; `phase` is the warp's barrier parity, flipped per load.
__device__ __forceinline__ void ferry_copy_staged(unsigned long long src, unsigned long long dst, unsigned long long n,
                                                  unsigned lane, uint4* stage, unsigned long long* bar,
                                                  unsigned& phase) {
    const unsigned long long body = n & ~15ull;
    for (unsigned long long off = 0; off < body; off += FERRY_STAGE) {
        const unsigned c = (unsigned)min((unsigned long long)FERRY_STAGE, body - off);
        if (lane == 0) {
            // The lanes' reads of the stage (the last chunk) before the async proxy rewrites it.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            ferry_bulk_load(stage, src + off, c, bar);
        }
        ferry_bar_wait(bar, phase);
        phase ^= 1;
        uint4* d4 = (uint4*)(dst + off);
        for (unsigned i = lane; i < c / 16; i += 32) d4[i] = stage[i];
        __syncwarp();
    }
    ferry_copy_bytes((const char*)(src + body), (char*)(dst + body), n - body, lane);
}
#endif

// The writer gate. SM stores to host memory cost the compute beside them far more than any other
// SM traffic, and the more warps store at once the more (gpu/probe_sm_traffic.cu on the H200: 16
// warps in all moved 47 GB/s for a third of the loss of 32 warps at 42 GB/s), so at most
// `writers` warps of a launch copy into host memory at a time; the others wait their turn. A warp
// passes the gate once for the tasks into host memory it read together (up to FERRY_CLAIM, a few
// microseconds of copying), so the counter sees two atomics per group, not per task.
__device__ __forceinline__ void ferry_writer_enter(unsigned* count, unsigned writers, unsigned lane) {
    if (lane == 0) {
        volatile unsigned* vcount = count;
        while (true) {
            if (*vcount < writers) {
                if (atomicAdd(count, 1u) < writers) break;
                atomicSub(count, 1u);
            }
            __nanosleep(128);
        }
    }
    __syncwarp();
}

__device__ __forceinline__ void ferry_writer_leave(unsigned* count, unsigned lane) {
    __syncwarp();  // every lane's stores issued before the warp gives its turn back
    if (lane == 0) atomicSub(count, 1u);
}

__device__ __forceinline__ unsigned long long ferry_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ void ferry_poll(FerryResidentHost* host, FerryResidentDev* dev, unsigned lane, unsigned long long idle_ns,
                           unsigned long long life_ns, unsigned epoch) {
    volatile FerryResidentHost* vhost = host;
    volatile FerryResidentDev* vdev = dev;
    // The launch's first task: the host set the mirror (and the claim, and the scanner's
    // watermark) to its watermark.
    unsigned long long mirror = vdev->tail;
    unsigned long long seen = mirror;  // the scanner's watermark when last read
    const unsigned long long born = ferry_now();
    unsigned long long busy = born;  // when work was last seen
    bool frozen = false;             // past life_ns: no new tasks
    while (true) {
        unsigned long long tail = 0;
        unsigned int stop = 0;
        if (lane == 0) {
            tail = vhost->tail;
            stop = vhost->stop;
        }
        tail = __shfl_sync(0xffffffff, tail, 0);
        stop = __shfl_sync(0xffffffff, stop, 0);
        __threadfence_system();  // the tasks below `tail` are read only after it was seen
        const unsigned long long now = ferry_now();
        if (!frozen && tail > mirror) {
            mirror = tail;
            busy = now;
            if (lane == 0) vdev->tail = mirror;
        }
        // The scanner stores its watermark here only after the host's copy of it.
        const unsigned long long done = vdev->done;
        if (done != seen) {
            seen = done;
            busy = now;
        }
        if (now - born >= life_ns) frozen = true;
        if (done == mirror && (stop || frozen || now - busy >= idle_ns)) {
            // Every task this launch took is copied and its watermark is with the host: the
            // claiming warps and the scanner end at the mirrored stop, and the host learns
            // (after the watermark) that it must launch again for more.
            __threadfence();  // the watermark read above before the stop
            if (lane == 0) vdev->stop = 1;
            __threadfence_system();
            if (lane == 0) vhost->ended = epoch;
            return;
        }
        __nanosleep(100);
    }
}

__device__ void ferry_scan(FerryResidentHost* host, FerryResidentDev* dev, unsigned lane) {
    volatile FerryResidentHost* vhost = host;
    volatile FerryResidentDev* vdev = dev;
    unsigned long long done = vdev->done;
    while (true) {
        unsigned long long mirror = 0;
        unsigned int stop = 0;
        if (lane == 0) {
            stop = vdev->stop;
            mirror = vdev->tail;
        }
        mirror = __shfl_sync(0xffffffff, mirror, 0);
        stop = __shfl_sync(0xffffffff, stop, 0);
        // The watermark over the done flags, 32 at a time.
        unsigned long long advanced = done;
        while (advanced < mirror) {
            const unsigned long long i = advanced + lane;
            const bool set = i < mirror && vdev->flags[i & (FERRY_RING - 1)] != 0;
            const unsigned ones = __ballot_sync(0xffffffff, set);
            const unsigned run = ones == 0xffffffffu ? 32u : (unsigned)(__ffs(~ones) - 1);
            if (lane < run) vdev->flags[i & (FERRY_RING - 1)] = 0;
            advanced += run;
            if (run < 32) break;
        }
        if (advanced != done) {
            __threadfence_system();  // the copies and the cleared flags before the watermark
            done = advanced;
            if (lane == 0) vhost->done = done;
            __threadfence_system();  // the host's watermark before the poller's
            if (lane == 0) vdev->done = done;
        } else if (stop) {
            // The poller stops only once this watermark reached its final mirror: nothing is left.
            return;
        }
        __nanosleep(FERRY_SCAN_NS);
    }
}

extern "C" __global__ void __launch_bounds__(1024, 1)
    ferry_resident(const FerryTask* __restrict__ tasks, FerryResidentHost* host, FerryResidentDev* dev,
                   unsigned long long idle_ns, unsigned long long life_ns, unsigned epoch, unsigned writers) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    if (blockIdx.x == 0 && warp == 0) {
        ferry_poll(host, dev, lane, idle_ns, life_ns, epoch);
        return;
    }
    if (blockIdx.x == 0 && warp == 1) {
        ferry_scan(host, dev, lane);
        return;
    }
    volatile FerryResidentDev* vdev = dev;
#if __CUDA_ARCH__ >= 900
    // The block's dynamic shared memory: 32 barriers, then 32 stages (the host asks for enough).
    extern __shared__ __align__(128) unsigned long long ferry_shared[];
    unsigned long long* bar = &ferry_shared[warp];
    uint4* stage = (uint4*)(ferry_shared + 32) + warp * (FERRY_STAGE / 16);
    unsigned phase = 0;
    if (lane == 0) ferry_bar_init(bar);
    __syncwarp();
#endif
    while (true) {
        unsigned long long base = 0;
        if (lane == 0) base = atomicAdd(&dev->claim, (unsigned long long)FERRY_CLAIM);
        base = __shfl_sync(0xffffffff, base, 0);
        const unsigned long long end = base + FERRY_CLAIM;
        unsigned long long j = base;
        while (j < end) {
            unsigned long long tail = 0;
            unsigned int stop = 0;
            while (true) {
                if (lane == 0) {
                    tail = vdev->tail;
                    stop = vdev->stop;
                }
                tail = __shfl_sync(0xffffffff, tail, 0);
                stop = __shfl_sync(0xffffffff, stop, 0);
                if (tail > j) break;
                if (stop) return;  // every task this launch took is done (the poller checked)
                __nanosleep(100);
            }
            // Task j is read only after its tail was seen. GPU scope is enough: the poller read the
            // host's tail and fenced at system scope before it stored the mirror read above.
            __threadfence();
            const unsigned avail = (unsigned)(min(end, tail) - j);
            unsigned long long word = 0;
            if (lane < 4 * avail) {
                const volatile unsigned long long* w =
                    (const volatile unsigned long long*)&tasks[(j + lane / 4) & (FERRY_RING - 1)];
                word = w[lane % 4];
            }
            // Copies into device memory first, then those into host memory behind the writer
            // gate (passed once for the group), so that a group moving both ways never holds a
            // turn while it copies to the device.
            const bool to_host = lane < 4 * avail && lane % 4 == 3 && word != 0;
            const unsigned host_tasks = __ballot_sync(0xffffffff, to_host);
            for (unsigned pass = 0; pass < 2; pass++) {
                const bool gated = pass == 1;
                if (gated && host_tasks == 0) break;
                if (gated) ferry_writer_enter(&dev->writers, writers, lane);
                for (unsigned m = 0; m < avail; m++) {
                    if (((host_tasks >> (4 * m + 3)) & 1) != gated) continue;
                    const unsigned long long src = __shfl_sync(0xffffffff, word, 4 * m);
                    const unsigned long long dst = __shfl_sync(0xffffffff, word, 4 * m + 1);
                    const unsigned long long len = __shfl_sync(0xffffffff, word, 4 * m + 2);
#if __CUDA_ARCH__ >= 900
                    // Copies into host memory take the loop: their reads are of device memory,
                    // and staging them serialized each chunk's read before its stores (4 KiB
                    // blocks: 47 GB/s staged, 49-50 by the loop, two calls each, eighth session).
                    if (!gated && ((src | dst) & 15) == 0)
                        ferry_copy_staged(src, dst, len, lane, stage, bar, phase);
                    else
#endif
                        ferry_copy_task(src, dst, len, lane);
                }
                if (gated) ferry_writer_leave(&dev->writers, lane);
            }
            // The copies before their flags: at system scope where the host reads them, else at
            // GPU scope (what reads a copy into device memory runs on the GPU, ordered after the
            // poller saw the flags and fenced at system scope before the watermark).
            if (host_tasks != 0)
                __threadfence_system();
            else
                __threadfence();
            __syncwarp();
            if (lane < avail) vdev->flags[(j + lane) & (FERRY_RING - 1)] = 1;
            j += avail;
        }
    }
}
