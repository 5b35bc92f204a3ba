// Probe (issue 11's idle 16 KiB >= 0.95 and both ways >= 0.9): SM copies stop at 50-52 GB/s
// (0.91-0.94 of PCIe) whatever the block size, and the copy engine moves 4-16 KiB blocks at
// 18-35 GB/s and costs the CPU 0.5-0.9 us a copy. Does a batch split between the two move more
// than either alone, in one direction and both ways?
//
// Scattered blocks (random slots of disjoint halves of a 1 GiB pinned host pool and a 1 GiB
// device pool), 256 MiB per direction a run; a share `ce` of each direction's blocks goes to the
// copy engine (cuMemcpyBatchAsync calls of 8 MiB, the overlap hint, one stream per direction),
// the rest to an SM kernel on `sms` SMs per direction shaped as ferry's resident kernel (one
// 1024-thread block per SM, warps claim 8 blocks at a time; into the GPU staged through 4 KiB of
// shared memory per warp by the TMA, into the host by the loop behind a gate of 16 writers).
// Everything waits on one gate word; the time is from opening it to the last stream done.
// `pre`: the copy engine's calls enqueued before the gate opens (its CPU cost hidden); `live`:
// made by the timing thread after it opens, as a worker would. Median of 5 runs; GB/s and the
// ratio to the copy engine's ceiling in the same run (one 256 MiB copy; both ways at once on
// two streams for the two-way rows). Sampled blocks are checked against their sources.
//
// The host pool comes from cudaHostAlloc (`hostalloc`, the default), or is mapped here and
// registered with cuMemHostRegister as ferry registers host memory: a memfd of 4 KiB pages
// (`memfd`, ferry's own host buffers), anonymous memory with transparent huge pages asked for
// (`thp`), or a memfd of 2 MiB huge pages (`hugetlb`, needs pages reserved in
// /proc/sys/vm/nr_hugepages). `sm` as a second argument runs only the SMs-alone and copy
// engine-alone rows.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_mix gpu/probe_mix.cu -lcuda && /tmp/probe_mix [hostalloc|memfd|thp|hugetlb] [sm]
#include <atomic>
#include <thread>
#include "probe.cuh"
#include "copy_task.cuh"
#include "tma.cuh"

constexpr size_t POOL = 1ull << 30, HALF = POOL / 2, SPAN = 256ull << 20, CALL = 8ull << 20;
constexpr int RUNS = 5, CLAIM = 8, WRITERS = 16;
constexpr unsigned STAGE = 4096;

__global__ void __launch_bounds__(1024, 1)
    sm_copy(const unsigned long long *src, const unsigned long long *dst, unsigned long long count, unsigned piece,
            int to_host, unsigned long long *claim, unsigned *writers) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ unsigned long long bars[32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4 *stage = (uint4 *)(smem + (size_t)warp * STAGE);
    if (lane == 0) ferry_bar_init(&bars[warp]);
    __syncwarp();
    unsigned phase = 0;
    while (true) {
        unsigned long long base = 0;
        if (lane == 0) base = atomicAdd(claim, (unsigned long long)CLAIM);
        base = __shfl_sync(0xffffffff, base, 0);
        if (base >= count) break;
        const unsigned long long end = min(base + CLAIM, count);
        if (to_host) {
            probe_writer_enter(writers, WRITERS, lane);
            for (unsigned long long i = base; i < end; i++) ferry_copy_task(src[i], dst[i], piece, lane);
            probe_writer_leave(writers, lane);
        } else {
            for (unsigned long long i = base; i < end; i++) {
                for (unsigned off = 0; off < piece; off += STAGE) {
                    const unsigned c = min(STAGE, piece - off);
                    if (lane == 0) {
                        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                        ferry_bulk_load(stage, src[i] + off, c, &bars[warp]);
                    }
                    ferry_bar_wait(&bars[warp], phase);
                    phase ^= 1;
                    uint4 *d4 = (uint4 *)(dst[i] + off);
                    for (unsigned k = lane; k < c / 16; k += 32) d4[k] = stage[k];
                    __syncwarp();
                }
            }
        }
    }
}

// One direction's blocks: the first `n - ce` to the kernel (their lists in device memory), the
// rest to the copy engine.
struct Dir {
    std::vector<CUdeviceptr> src, dst;
    std::vector<size_t> size;
    unsigned long long *dsrc, *ddst, *claim;
    unsigned *writers;
    size_t sm_count;
    cudaStream_t kstream, cstream;
};

int main(int argc, char **argv) {
    const std::string mode = argc > 1 ? argv[1] : "hostalloc";
    const bool sm_only = argc > 2 && std::string(argv[2]) == "sm";
    ProbeSetup p = probe_setup(POOL);
    p.host = probe_host_pool(mode, POOL, p.host);
    int shared = 32 * STAGE;
    CHECK(cudaFuncSetAttribute(sm_copy, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    // The gate in pinned host memory: opened by a plain store (no driver call), so that a
    // watchdog can open it should the driver block an enqueue behind it.
    volatile unsigned *gate;
    CHECK(cudaHostAlloc((void **)&gate, 4, cudaHostAllocMapped));
    *gate = 0;
    std::atomic<int> forced{0};
    Dir dirs[2];
    for (Dir &d : dirs) {
        CHECK(cudaStreamCreateWithFlags(&d.kstream, cudaStreamNonBlocking));
        CHECK(cudaStreamCreateWithFlags(&d.cstream, cudaStreamNonBlocking));
        CHECK(cudaMalloc(&d.dsrc, SPAN / 4096 * 8));
        CHECK(cudaMalloc(&d.ddst, SPAN / 4096 * 8));
        CHECK(cudaMalloc(&d.claim, 8));
        CHECK(cudaMalloc(&d.writers, 4));
    }
    const CUmemcpyAttributes attrs = probe_attrs(CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE);
    auto enqueue_ce = [&](Dir &d) {
        const size_t per = CALL / d.size[0];
        for (size_t i = d.sm_count; i < d.src.size(); i += per) {
            const size_t k = std::min(per, d.src.size() - i);
            probe_batch(&d.dst[i], &d.src[i], &d.size[i], k, attrs, (CUstream)d.cstream);
        }
    };
    // One timed run over the directions in `use` (bit 0 H2D, bit 1 D2H); returns us.
    auto run = [&](int use, int sms, bool live) {
        CHECK(cudaDeviceSynchronize());
        *gate = 0;
        std::atomic<bool> opened{false};
        std::thread watchdog([&] {
            for (int i = 0; i < 3000 && !opened.load(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            if (!opened.load()) {
                forced++;
                *gate = 1;
            }
        });
        for (int k = 0; k < 2; k++) {
            if (!(use >> k & 1)) continue;
            Dir &d = dirs[k];
            CHECK(cudaMemsetAsync(d.claim, 0, 8, d.kstream));
            CHECK(cudaMemsetAsync(d.writers, 0, 4, d.kstream));
            if (d.sm_count) {
                CU(cuStreamWaitValue32((CUstream)d.kstream, (CUdeviceptr)(uintptr_t)gate, 1, CU_STREAM_WAIT_VALUE_GEQ));
                sm_copy<<<sms, 1024, shared, d.kstream>>>(d.dsrc, d.ddst, d.sm_count, (unsigned)d.size[0], k, d.claim,
                                                          d.writers);
                CHECK(cudaGetLastError());
            }
            CU(cuStreamWaitValue32((CUstream)d.cstream, (CUdeviceptr)(uintptr_t)gate, 1, CU_STREAM_WAIT_VALUE_GEQ));
            if (!live) enqueue_ce(d);
        }
        opened = true;
        const double t0 = now_us();
        *gate = 1;
        if (live)
            for (int k = 0; k < 2; k++)
                if (use >> k & 1) enqueue_ce(dirs[k]);
        CHECK(cudaDeviceSynchronize());
        const double us = now_us() - t0;
        watchdog.join();
        return us;
    };
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    // The ceilings: one 256 MiB copy each way, and both at once.
    double ceiling[3];
    for (int c = 0; c < 3; c++) {
        std::vector<double> t;
        for (int r = 0; r < RUNS; r++) {
            CHECK(cudaDeviceSynchronize());
            const double t0 = now_us();
            if (c != 1) CHECK(cudaMemcpyAsync(p.dev, p.host, SPAN, cudaMemcpyDefault, dirs[0].cstream));
            if (c != 0) CHECK(cudaMemcpyAsync(p.host + HALF, p.dev + HALF, SPAN, cudaMemcpyDefault, dirs[1].cstream));
            CHECK(cudaDeviceSynchronize());
            t.push_back(now_us() - t0);
        }
        ceiling[c] = (c == 2 ? 2 : 1) * SPAN / (median(t) * 1e3);
    }
    std::printf("host pool: %s\n", mode.c_str());
    std::printf("%s, %d SMs; ceilings (256 MiB, timed from the host) H2D %.1f, D2H %.1f, both ways %.1f GB/s; "
                "%zu MiB per direction a run, median of %d\n",
                p.prop.name, p.prop.multiProcessorCount, ceiling[0], ceiling[1], ceiling[2], SPAN >> 20, RUNS);
    std::fflush(stdout);
    std::printf("%6s %5s %4s %8s %8s %5s %9s %9s\n", "block", "dirs", "SMs", "ce H2D", "ce D2H", "mode", "GB/s", "/ceiling");
    std::mt19937_64 rng(11);
    int bad = 0;
    for (size_t block : {4096ul, 16384ul, 65536ul}) {
        // The plans: H2D from the host's first half to the GPU's first half, D2H from the GPU's
        // second half to the host's second half.
        const size_t n = SPAN / block, slots = HALF / block;
        for (int k = 0; k < 2; k++) {
            std::vector<size_t> hs(slots), gs(slots);
            std::iota(hs.begin(), hs.end(), 0);
            std::iota(gs.begin(), gs.end(), 0);
            std::shuffle(hs.begin(), hs.end(), rng);
            std::shuffle(gs.begin(), gs.end(), rng);
            Dir &d = dirs[k];
            d.src.resize(n), d.dst.resize(n), d.size.assign(n, block);
            for (size_t i = 0; i < n; i++) {
                CUdeviceptr h = (CUdeviceptr)(p.host + k * HALF + hs[i] * block);
                CUdeviceptr g = (CUdeviceptr)(p.dev + k * HALF + gs[i] * block);
                d.src[i] = k ? g : h, d.dst[i] = k ? h : g;
            }
            CHECK(cudaMemcpy(d.dsrc, d.src.data(), n * 8, cudaMemcpyHostToDevice));
            CHECK(cudaMemcpy(d.ddst, d.dst.data(), n * 8, cudaMemcpyHostToDevice));
        }
        struct Config { int use, sms; double ce[2]; };
        std::vector<Config> configs;
        for (int k = 0; k < 2; k++) {
            for (double f : {0.0, 0.125, 0.25, 0.375, 0.5, 1.0}) {
                Config c = {1 << k, 2, {0, 0}};
                c.ce[k] = f;
                configs.push_back(c);
            }
            Config c4 = {1 << k, 4, {0, 0}};
            configs.push_back(c4);
            c4.ce[k] = 0.25;
            configs.push_back(c4);
        }
        for (int sms : {1, 2})
            for (auto f : std::vector<std::pair<double, double>>{{0, 0}, {0.25, 0.25}, {0.5, 0.5}, {0, 1}, {1, 0}, {0, 0.5}, {0.25, 0.5}, {1, 1}})
                if (sms == 1 || (f.first < 1 && f.second < 1)) configs.push_back({3, sms, {f.first, f.second}});
        for (const Config &c : configs) {
            for (bool live : {false, true}) {
                const bool any_ce = (c.use & 1 && c.ce[0] > 0) || (c.use & 2 && c.ce[1] > 0);
                if (live && !any_ce) continue;
                const bool alone = (c.ce[0] == 0 || c.ce[0] == 1) && (c.ce[1] == 0 || c.ce[1] == 1);
                if (sm_only && !(alone && (live || !any_ce))) continue;
                for (int k = 0; k < 2; k++) dirs[k].sm_count = n - size_t(c.ce[k] * n);
                // Destinations poisoned: the GPU's first half, the host's second half.
                CHECK(cudaMemset(p.dev, 0, HALF));
                std::memset(p.host + HALF, 0, HALF);
                const int forced_before = forced.load();
                std::vector<double> t;
                for (int r = 0; r < RUNS; r++) t.push_back(run(c.use, c.sms, live));
                const int ways = (c.use & 1) + (c.use >> 1 & 1);
                const double gbs = ways * SPAN / (median(t) * 1e3);
                const double ceil = c.use == 3 ? ceiling[2] : ceiling[c.use >> 1];
                bool same = true;
                for (int k = 0; k < 2; k++) {
                    if (!(c.use >> k & 1)) continue;
                    const char want = k ? 2 : 1;  // host pool bytes 1, device pool bytes 2
                    for (size_t i = 0; i < n; i += n / 16 + 1) {
                        for (size_t at : {i, n - 1 - i}) {
                            std::vector<char> got(block);
                            CHECK(cudaMemcpy(got.data(), (void *)dirs[k].dst[at], block, cudaMemcpyDefault));
                            same = same && std::all_of(got.begin(), got.end(), [&](char b) { return b == want; });
                        }
                    }
                }
                bad += !same;
                const char *names[] = {"", "H2D", "D2H", "both"};
                std::printf("%5zuK %5s %4d %8.3f %8.3f %5s %9.1f %9.2f%s\n", block >> 10, names[c.use], c.sms,
                            c.use & 1 ? c.ce[0] : 0.0, c.use & 2 ? c.ce[1] : 0.0, live ? "live" : "pre", gbs,
                            gbs / ceil, same ? "" : "  WRONG BYTES");
                if (forced.load() != forced_before) std::printf("  (a run of the row above was opened by the watchdog)\n");
                std::fflush(stdout);
            }
        }
    }
    if (forced) std::printf("%d runs had the gate opened by the watchdog (an enqueue blocked): their times are wrong\n", forced.load());
    return bad ? 1 : 0;
}
