// Probe (issue 11's 4 KiB D2H): ferry's resident kernel copies 4 KiB blocks into host memory at
// about 0.87 of PCIe, where probe_mix.cu's kernel of the same shape (2 SMs, warps claiming 8
// blocks, the copy loop behind a 16-writer gate) reaches 0.95. What of the resident kernel's
// extras costs the difference? Each variant adds some of them to the plain kernel:
//   host tasks: the tasks (ferry's 32-byte FerryTask) read from pinned host memory, 8 at once by
//               the warp's lanes, as the resident kernel reads its ring (else from device memory,
//               the same way);
//   fences:     after each group a system-scope fence, then a done flag per task (device memory);
//   poller:     warp 0 of block 0 copies nothing and reads a word of host memory every 100 ns
//               with a system-scope fence, as the resident kernel's poller reads the host's tail.
//   scanner:    warp 1 of block 0 copies nothing and moves a watermark over the done flags as
//               the resident kernel's scanner does (two system-scope fences and a word of host
//               memory per advance), sleeping 32 ns between passes as it does, or 2 us.
// 256 MiB of 4 KiB blocks at random slots of a 512 MiB device pool into a 512 MiB host pool
// (`hostalloc` and `memfd` pools: probe.cuh's probe_host_pool), timed by events, median of 5,
// against the copy engine's ceiling (one 256 MiB copy) in the same run. Sampled blocks checked.
// Then EACH single runs of the plain variant, each with the SMs (%smid) its blocks ran on.
//
// The blocks lie in the last REGION_MIB (default 512; 256: every slot once, as `ferry bench`'s
// plan) of both pools: POOL_MIB (default 512) above that puts them at the pools' upper end, as
// probe_mix.cu's D2H blocks lie. MODES: probe_host_pool's, comma-separated.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_resident_d2h gpu/probe_resident_d2h.cu -lcuda && /tmp/probe_resident_d2h [SMS [POOL_MIB [MODES [REGION_MIB]]]]
//
#include "probe.cuh"
#include "copy_task.cuh"

constexpr size_t SPAN = 256ull << 20, BLOCK = 4096;
constexpr int RUNS = 5, CLAIM = 8, WRITERS = 16, EACH = 12;
// Dynamic shared memory asked for (unused), so that no two blocks share an SM, as in ferry.
constexpr int SHARED = 128 << 10;
constexpr int FENCES = 1, POLLER = 2, SCANNER = 4, SLOW_SCAN = 8;

struct Task {
    unsigned long long src, dst, len, to_host;
};

__global__ void __launch_bounds__(1024, 1)
    resident_like(const Task *tasks, unsigned long long count, int features, unsigned char *flags,
                  unsigned *writers, unsigned long long *claim, const unsigned long long *host_word,
                  unsigned *exited, unsigned *smids, unsigned long long *host_done, unsigned long long *dev_done) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
        unsigned id;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
        smids[blockIdx.x] = id;
    }
    const bool poller = features & POLLER;
    const bool scanner = features & SCANNER;
    const unsigned copy_warps = gridDim.x * 32 - (poller ? 1 : 0) - (scanner ? 1 : 0);
    if (scanner && blockIdx.x == 0 && warp == 1) {
        // ferry_scan's shape: the watermark over the done flags 32 at a time (cleared behind
        // it), then a system-scope fence, the host's word, a fence, the device's word.
        volatile unsigned char *vf = flags;
        volatile unsigned long long *hd = host_done, *dd = dev_done;
        unsigned long long done = 0;
        while (done < count) {
            unsigned long long advanced = done;
            while (advanced < count) {
                const unsigned long long i = advanced + lane;
                const bool set = i < count && vf[i] != 0;
                const unsigned ones = __ballot_sync(0xffffffff, set);
                const unsigned run = ones == 0xffffffffu ? 32u : (unsigned)(__ffs(~ones) - 1);
                if (lane < run) vf[i] = 0;
                advanced += run;
                if (run < 32) break;
            }
            if (advanced != done) {
                __threadfence_system();
                done = advanced;
                if (lane == 0) *hd = done;
                __threadfence_system();
                if (lane == 0) *dd = done;
            }
            __nanosleep(features & SLOW_SCAN ? 2000 : 32);
        }
        return;
    }
    if (poller && blockIdx.x == 0 && warp == 0) {
        volatile const unsigned long long *w = host_word;
        volatile unsigned *e = exited;
        unsigned long long sum = 0;
        while (*e < copy_warps) {
            if (lane == 0) sum += *w;
            __threadfence_system();
            __nanosleep(100);
        }
        if (sum == 12345) flags[0] = 2;  // keeps the reads
        return;
    }
    while (true) {
        unsigned long long base = 0;
        if (lane == 0) base = atomicAdd(claim, (unsigned long long)CLAIM);
        base = __shfl_sync(0xffffffff, base, 0);
        if (base >= count) break;
        const unsigned avail = (unsigned)min((unsigned long long)CLAIM, count - base);
        unsigned long long word = 0;
        if (lane < 4 * avail) {
            const volatile unsigned long long *t = (const volatile unsigned long long *)&tasks[base + lane / 4];
            word = t[lane % 4];
        }
        probe_writer_enter(writers, WRITERS, lane);
        for (unsigned m = 0; m < avail; m++) {
            const unsigned long long src = __shfl_sync(0xffffffff, word, 4 * m);
            const unsigned long long dst = __shfl_sync(0xffffffff, word, 4 * m + 1);
            const unsigned long long len = __shfl_sync(0xffffffff, word, 4 * m + 2);
            ferry_copy_task(src, dst, len, lane);
        }
        probe_writer_leave(writers, lane);
        if (features & FENCES) {
            __threadfence_system();
            __syncwarp();
            if (lane < avail) ((volatile unsigned char *)flags)[base + lane] = 1;
        }
    }
    __syncwarp();
    if (lane == 0) atomicAdd(exited, 1u);
}

int main(int argc, char **argv) {
    const int sms = argc > 1 ? std::atoi(argv[1]) : 2;
    const size_t pool = (argc > 2 ? std::atoll(argv[2]) : 512) << 20;
    const std::string modes = argc > 3 ? argv[3] : "hostalloc,memfd";
    const size_t REGION = (argc > 4 ? std::atoll(argv[4]) : 512) << 20;
    if (REGION < SPAN || pool < REGION) return 2;
    const size_t n = SPAN / BLOCK;
    for (size_t at = 0; at < modes.size();) {
        const size_t comma = std::min(modes.find(',', at), modes.size());
        const std::string mode = modes.substr(at, comma - at);
        at = comma + 1;
        ProbeSetup p = probe_setup(pool);
        p.host = probe_host_pool(mode, pool, p.host);
        // The blocks lie in the pools' last REGION bytes.
        char *const host_region = p.host + (pool - REGION), *const dev_region = p.dev + (pool - REGION);
        CHECK(cudaFuncSetAttribute(resident_like, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED));
        cudaStream_t stream;
        CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        auto time_ms = [&](auto enqueue) { return probe_time_ms(stream, e0, e1, RUNS, enqueue); };
        const double ceiling = SPAN / (time_ms([&] {
                                           CHECK(cudaMemcpyAsync(p.host, p.dev, SPAN, cudaMemcpyDefault, stream));
                                       }) * 1e6);
        // The plan: device slots to host slots, shuffled.
        std::mt19937_64 rng(5);
        std::vector<size_t> hs(REGION / BLOCK), gs(REGION / BLOCK);
        std::iota(hs.begin(), hs.end(), 0);
        std::iota(gs.begin(), gs.end(), 0);
        std::shuffle(hs.begin(), hs.end(), rng);
        std::shuffle(gs.begin(), gs.end(), rng);
        std::vector<Task> plan(n);
        for (size_t i = 0; i < n; i++)
            plan[i] = {(unsigned long long)(dev_region + gs[i] * BLOCK), (unsigned long long)(host_region + hs[i] * BLOCK), BLOCK, 1};
        Task *dev_tasks, *host_tasks;
        CHECK(cudaMalloc(&dev_tasks, n * sizeof(Task)));
        CHECK(cudaMemcpy(dev_tasks, plan.data(), n * sizeof(Task), cudaMemcpyHostToDevice));
        CHECK(cudaHostAlloc(&host_tasks, n * sizeof(Task), cudaHostAllocMapped));
        std::memcpy(host_tasks, plan.data(), n * sizeof(Task));
        unsigned char *flags;
        unsigned *writers, *exited, *smids;
        unsigned long long *claim, *host_word, *host_done, *dev_done;
        CHECK(cudaMalloc(&flags, n));
        CHECK(cudaMalloc(&writers, 4));
        CHECK(cudaMalloc(&exited, 4));
        CHECK(cudaMalloc(&claim, 8));
        CHECK(cudaHostAlloc(&host_word, 8, cudaHostAllocMapped));
        *host_word = 1;
        CHECK(cudaHostAlloc(&host_done, 8, cudaHostAllocMapped));
        CHECK(cudaMalloc(&dev_done, 8));
        CHECK(cudaHostAlloc(&smids, 4 * sms, cudaHostAllocMapped));
        std::printf("%s, host pool %s of %zu MiB, %d SMs; copy-engine ceiling D2H %.1f GB/s; 256 MiB of 4 KiB blocks in %zu MiB, median of %d\n",
                    p.prop.name, mode.c_str(), pool >> 20, sms, ceiling, REGION >> 20, RUNS);
        std::printf("%11s %7s %7s %8s %9s %9s\n", "tasks in", "fences", "poller", "scanner", "GB/s", "/ceiling");
        int bad = 0;
        for (int host : {0, 1})
            for (int features : {0, FENCES, FENCES | POLLER, FENCES | SCANNER, FENCES | SCANNER | POLLER,
                                 FENCES | SCANNER | SLOW_SCAN}) {
                std::memset(p.host, 0, pool);
                const double ms = time_ms([&] {
                    CHECK(cudaMemsetAsync(claim, 0, 8, stream));
                    CHECK(cudaMemsetAsync(writers, 0, 4, stream));
                    CHECK(cudaMemsetAsync(exited, 0, 4, stream));
                    CHECK(cudaMemsetAsync(flags, 0, n, stream));
                    resident_like<<<sms, 1024, SHARED, stream>>>(host ? host_tasks : dev_tasks, n, features, flags, writers,
                                                            claim, host_word, exited, smids, host_done, dev_done);
                    CHECK(cudaGetLastError());
                });
                const double gbs = SPAN / (ms * 1e6);
                bool same = true;
                for (size_t i = 0; i < n; i += n / 32) {
                    const char *h = (const char *)plan[i].dst;
                    same = same && std::all_of(h, h + BLOCK, [](char b) { return b == 2; });
                }
                bad += !same;
                const char *scan = features & SLOW_SCAN ? "2 us" : features & SCANNER ? "32 ns" : "no";
                std::printf("%11s %7s %7s %8s %9.1f %9.2f%s\n", host ? "host" : "device", features & FENCES ? "yes" : "no",
                            features & POLLER ? "yes" : "no", scan, gbs, gbs / ceiling, same ? "" : "  WRONG BYTES");
                std::fflush(stdout);
            }
        // Single runs of the plain variant, each with the SMs its blocks ran on.
        std::printf("%9s %9s  SMs (TPC = SM / 2)\n", "GB/s", "/ceiling");
        for (int r = 0; r < EACH; r++) {
            const double ms = probe_time_ms(stream, e0, e1, 1, [&] {
                CHECK(cudaMemsetAsync(claim, 0, 8, stream));
                CHECK(cudaMemsetAsync(writers, 0, 4, stream));
                CHECK(cudaMemsetAsync(exited, 0, 4, stream));
                resident_like<<<sms, 1024, SHARED, stream>>>(dev_tasks, n, 0, flags, writers, claim, host_word, exited,
                                                        smids, host_done, dev_done);
                CHECK(cudaGetLastError());
            });
            std::printf("%9.1f %9.2f ", SPAN / (ms * 1e6), SPAN / (ms * 1e6) / ceiling);
            for (int b = 0; b < sms; b++) std::printf(" %u", smids[b]);
            std::printf("\n");
        }
        std::printf("\n");
        if (bad) return 1;
        CHECK(cudaDeviceReset());
    }
    return 0;
}
