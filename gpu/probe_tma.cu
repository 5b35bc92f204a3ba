// Probe (issue 11's idle 4-16 KiB host-to-GPU rate): ferry's SM copy loop reads host memory at
// about 0.85 of the PCIe ceiling whatever its SMs (4 or 8), where the copy engine reaches it.
// Does the TMA (cp.async.bulk: host memory into shared memory, then out) read host memory any
// faster, and how many pieces in flight per warp does it need?
//
// On `sms` SMs (one 1024-thread block each, only `warps` warps of it moving data), warps claim
// pieces of `piece` bytes of a shuffled plan (random slots of two 256 MiB pools, as ferry's
// scattered blocks) with one atomic each and copy them, 1 GiB per run, timed with events, median
// of 5; GB/s and the ratio to the copy engine's ceiling measured in the same run (one 256 MiB
// cudaMemcpyAsync each way). Modes:
//   loop:        ferry's copy loop (copy_task.cuh: 16-byte loads, eight in flight per lane);
//   tma+st:      lane 0 bulk-loads `depth` pieces into shared memory (mbarrier-completed), the
//                warp's 32 lanes store them with 16-byte stores;
//   tma+tma:     bulk load, then a bulk store from shared memory (cp.async.bulk.global.shared).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_tma gpu/probe_tma.cu -lcuda && /tmp/probe_tma [SMS...]  (default 4 8)
#include "probe.cuh"
#include "copy_task.cuh"
#include "tma.cuh"

constexpr size_t POOL = 256ull << 20;
constexpr size_t SPAN = 1ull << 30;
constexpr int RUNS = 5;

enum Mode { LOOP, TMA_ST, TMA_TMA, MODES };
static const char *MODE_NAMES[MODES] = {"loop", "tma+st", "tma+tma"};

__global__ void __launch_bounds__(1024, 1)
    tma_copy(int mode, int warps, int depth, unsigned piece, const unsigned long long *src, const unsigned long long *dst,
             unsigned long long count, unsigned long long *claim) {
    extern __shared__ __align__(128) unsigned char smem[];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ unsigned long long bars[32][8];
    if ((int)warp >= warps) return;
    unsigned char *buf = smem + (size_t)warp * depth * piece;
    if (mode != LOOP && lane == 0)
        for (int b = 0; b < depth; b++) ferry_bar_init(&bars[warp][b]);
    __syncwarp();
    unsigned phase = 0;
    const unsigned long long take = mode == LOOP ? 1 : depth;
    while (true) {
        unsigned long long base = 0;
        if (lane == 0) base = atomicAdd(claim, take);
        base = __shfl_sync(0xffffffff, base, 0);
        if (base >= count) break;
        const int n = (int)min(take, count - base);
        if (mode == LOOP) {
            ferry_copy_task(src[base], dst[base], piece, lane);
            continue;
        }
        if (lane == 0)
            for (int b = 0; b < n; b++) ferry_bulk_load(buf + (size_t)b * piece, src[base + b], piece, &bars[warp][b]);
        for (int b = 0; b < n; b++) {
            ferry_bar_wait(&bars[warp][b], phase);
            unsigned char *s = buf + (size_t)b * piece;
            if (mode == TMA_ST) {
                const uint4 *s4 = (const uint4 *)s;
                uint4 *d4 = (uint4 *)dst[base + b];
                for (unsigned i = lane; i < piece / 16; i += 32) d4[i] = s4[i];
            } else if (lane == 0) {
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst[base + b]),
                             "r"(ferry_smem(s)), "r"(piece)
                             : "memory");
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            }
        }
        // Barriers not armed this round (a short last claim) keep their phase: arm them empty.
        if (lane == 0)
            for (int b = n; b < depth; b++)
                asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(ferry_smem(&bars[warp][b])) : "memory");
        if (mode == TMA_TMA && lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        __syncwarp();
        phase ^= 1;
    }
    if (mode == TMA_TMA && lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main(int argc, char **argv) {
    // SM counts to try: the arguments (default 4 8).
    std::vector<int> sm_counts;
    for (int i = 1; i < argc; i++) sm_counts.push_back(std::atoi(argv[i]));
    if (sm_counts.empty()) sm_counts = {4, 8};
    ProbeSetup p = probe_setup(POOL);
    int shared = 0;
    CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    shared -= 32 * 8 * 8 + 1024;  // the static barriers, and some slack
    CHECK(cudaFuncSetAttribute(tma_copy, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    cudaStream_t stream;
    CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    unsigned long long *claim, *src, *dst;
    CHECK(cudaMalloc(&claim, 8));
    const size_t most = SPAN / 4096;
    CHECK(cudaMalloc(&src, most * 8));
    CHECK(cudaMalloc(&dst, most * 8));
    auto time_ms = [&](auto enqueue) { return probe_time_ms(stream, e0, e1, RUNS, enqueue); };
    double ceiling[2];
    for (int d = 0; d < 2; d++) {
        void *to = d == 0 ? (void *)p.dev : (void *)p.host, *from = d == 0 ? (void *)p.host : (void *)p.dev;
        ceiling[d] = POOL / (time_ms([&] { CHECK(cudaMemcpyAsync(to, from, POOL, cudaMemcpyDefault, stream)); }) * 1e6);
    }
    std::printf("%s, %d SMs; copy-engine ceiling (256 MiB) H2D %.1f GB/s, D2H %.1f GB/s; 1 GiB of scattered pieces per run, median of %d\n",
                p.prop.name, p.prop.multiProcessorCount, ceiling[0], ceiling[1], RUNS);
    std::printf("%6s %4s %4s %8s %6s %6s %9s %9s\n", "piece", "dir", "SMs", "mode", "warps", "depth", "GB/s", "/ceiling");
    std::mt19937_64 rng(7);
    int bad = 0;
    for (unsigned piece : {4096u, 16384u}) {
        ProbePlan plan = probe_plan(p.host, p.dev, POOL, SPAN / 4, piece, rng);  // 256 MiB of slots, used 4 times
        const size_t slots = plan.size.size(), count = SPAN / piece;
        for (int d = 0; d < 2; d++) {
            std::vector<unsigned long long> s(count), t(count);
            for (size_t i = 0; i < count; i++) s[i] = plan.src[d][i % slots], t[i] = plan.dst[d][i % slots];
            CHECK(cudaMemcpy(src, s.data(), count * 8, cudaMemcpyHostToDevice));
            CHECK(cudaMemcpy(dst, t.data(), count * 8, cudaMemcpyHostToDevice));
            for (int sms : sm_counts) {
                struct Config { int mode, warps, depth; };
                std::vector<Config> configs = {{LOOP, 32, 1}};
                for (int mode : {TMA_ST, TMA_TMA})
                    for (int depth : {1, 2, 4, 8}) {
                        const int warps = std::min(32, int(shared / (depth * piece)));
                        if (warps >= 1) configs.push_back({mode, warps, depth});
                    }
                for (Config c : configs) {
                    // The destination pool zeroed first; after the runs, pieces compared with
                    // their sources (the pools hold 1 on the host and 2 on the GPU, never 0).
                    CHECK(cudaMemset(d == 0 ? p.dev : p.host, 0, POOL));
                    const double ms = time_ms([&] {
                        CHECK(cudaMemsetAsync(claim, 0, 8, stream));
                        tma_copy<<<sms, 1024, shared, stream>>>(c.mode, c.warps, c.depth, piece, src, dst, count, claim);
                        CHECK(cudaGetLastError());
                    });
                    // The memset rides in the timed window: a few microseconds of ~20 ms.
                    const double gbs = SPAN / (ms * 1e6);
                    bool same = true;
                    for (size_t i = 0; i < count; i += count / 16) {
                        std::vector<char> a(piece), b(piece);
                        CHECK(cudaMemcpy(a.data(), (void *)s[i], piece, cudaMemcpyDefault));
                        CHECK(cudaMemcpy(b.data(), (void *)t[i], piece, cudaMemcpyDefault));
                        same = same && a == b && a[0] != 0;
                    }
                    bad += !same;
                    std::printf("%5uK %4s %4d %8s %6d %6d %9.1f %9.2f%s\n", piece >> 10, d == 0 ? "H2D" : "D2H", sms,
                                MODE_NAMES[c.mode], c.warps, c.depth, gbs, gbs / ceiling[d], same ? "" : "  WRONG BYTES");
                }
            }
        }
    }
    return bad ? 1 : 0;
}
