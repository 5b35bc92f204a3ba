// Measures gpu/copy_kernel.cu on the device it runs on, and the latency-lane experiment below:
// correctness on random unaligned tasks, GB/s against the SM budget for scattered blocks in both
// directions beside the PCIe ceiling (one 256 MiB cudaMemcpyAsync), and the latency of one 4 KiB
// copy by kernel launch and by cudaMemcpyAsync. Build and run (gpu/h100-run.sh does this):
//   nvcc -O3 -arch=sm_90 -o probe gpu/probe.cu -lcuda && ./probe
#include "copy_kernel.cu"

// ---- Experiment (not used by ferry): a persistent "latency lane" kernel, measured below. ----
// The latency lane: a slot the host fills in pinned, device-mapped memory. `seq` is written last
// (x86 keeps store order) and read first with acquire semantics.
struct FerrySlot {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
    unsigned long long seq;
};

__device__ __forceinline__ unsigned long long ferry_load_acquire_sys(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void ferry_store_release_sys(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Persistent kernel, launched once with a few warps: each warp claims the next slot index i
// (a device counter), waits until the host has filled slot i (seq == i + 1), copies, and
// publishes done[i & mask] = i + 1 after a system-scope fence, so the host that sees the flag
// sees the bytes. Exits when `stop` is non-zero while it waits. No launch per copy: the latency
// of one small copy is a few PCIe round trips.
extern "C" __global__ void ferry_copy_lane(const FerrySlot* slots, unsigned long long* done, unsigned long long mask,
                                           unsigned long long* next, const unsigned long long* stop) {
    const unsigned lane = threadIdx.x & 31;
    for (;;) {
        unsigned long long i = 0;
        if (lane == 0) i = atomicAdd(next, 1ull);
        i = __shfl_sync(0xffffffffu, i, 0);
        const FerrySlot* slot = &slots[i & mask];
        unsigned long long src = 0, dst = 0, len = 0;
        for (;;) {
            int state = 0;  // 0: wait, 1: filled, 2: stop
            if (lane == 0) {
                if (ferry_load_acquire_sys(&slot->seq) == i + 1) {
                    state = 1;
                    src = slot->src;
                    dst = slot->dst;
                    len = slot->len;
                } else if (ferry_load_acquire_sys(stop) != 0) {
                    state = 2;
                }
            }
            state = __shfl_sync(0xffffffffu, state, 0);
            if (state == 2) return;
            if (state == 1) break;
            __nanosleep(200);
        }
        src = __shfl_sync(0xffffffffu, src, 0);
        dst = __shfl_sync(0xffffffffu, dst, 0);
        len = __shfl_sync(0xffffffffu, len, 0);
        ferry_copy_task(src, dst, len, lane);
        __threadfence_system();
        __syncwarp();
        if (lane == 0) ferry_store_release_sys(&done[i & mask], i + 1);
    }
}

#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

static const size_t SPAN = 256ull << 20;
static const size_t CHUNK = 64 << 10;  // larger blocks are split into tasks of this size

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Setup {
    char *host, *host_dev, *dev;
    FerryCopy* tasks_dev;
    int sms, blocks_per_sm;
    cudaStream_t st;
};

static float run(Setup& s, const std::vector<FerryCopy>& tasks, int sms) {
    CK(cudaMemcpyAsync(s.tasks_dev, tasks.data(), tasks.size() * sizeof(FerryCopy), cudaMemcpyHostToDevice, s.st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a, s.st));
    ferry_copy<<<sms * s.blocks_per_sm, 256, 0, s.st>>>(s.tasks_dev, (unsigned)tasks.size());
    CK(cudaGetLastError());
    CK(cudaEventRecord(b, s.st));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return ms;
}

static std::vector<FerryCopy> scattered(Setup& s, size_t block, bool h2d, unsigned seed) {
    size_t n = SPAN / block;
    std::vector<size_t> src(n), dst(n);
    for (size_t i = 0; i < n; i++) src[i] = dst[i] = i;
    std::mt19937_64 rng(seed);
    std::shuffle(src.begin(), src.end(), rng);
    std::shuffle(dst.begin(), dst.end(), rng);
    std::vector<FerryCopy> tasks;
    for (size_t i = 0; i < n; i++) {
        char* from = (h2d ? s.host_dev : s.dev) + src[i] * block;
        char* to = (h2d ? s.dev : s.host_dev) + dst[i] * block;
        for (size_t off = 0; off < block; off += CHUNK) {
            size_t len = std::min(CHUNK, block - off);
            tasks.push_back({(unsigned long long)(from + off), (unsigned long long)(to + off), len});
        }
    }
    return tasks;
}

static bool correctness(Setup& s) {
    std::mt19937_64 rng(42);
    for (int dir = 0; dir < 2; dir++) {
        bool h2d = dir == 0;
        char* ref = (char*)malloc(SPAN);
        for (size_t i = 0; i < SPAN; i++) s.host[i] = (char)(rng() & 0xff);
        CK(cudaMemset(s.dev, 0x5a, SPAN));
        if (!h2d) CK(cudaMemcpy(s.dev, s.host, SPAN, cudaMemcpyHostToDevice));  // source on the device
        // Destination poisoned; tasks: random lengths 1 B..4 MiB, unaligned, non-overlapping.
        std::vector<FerryCopy> tasks;
        size_t cursor = 0;
        char* src_base = h2d ? s.host_dev : s.dev;
        char* dst_base = h2d ? s.dev : s.host_dev;
        std::vector<char> src_copy(s.host, s.host + SPAN);
        if (!h2d) memset(s.host, 0x5a, SPAN);
        memcpy(ref, h2d ? std::vector<char>(SPAN, 0x5a).data() : s.host, SPAN);
        while (cursor < SPAN - (8 << 20)) {
            size_t len = 1 + rng() % (rng() % 4 == 0 ? (4 << 20) : 8192);
            size_t dst_off = cursor + rng() % 64;
            size_t src_off = rng() % (SPAN - len);
            tasks.push_back({(unsigned long long)(src_base + src_off), (unsigned long long)(dst_base + dst_off), len});
            memcpy(ref + dst_off, src_copy.data() + src_off, len);
            cursor = dst_off + len;
        }
        CK(cudaMemcpy(s.tasks_dev, tasks.data(), tasks.size() * sizeof(FerryCopy), cudaMemcpyHostToDevice));
        ferry_copy<<<8 * s.blocks_per_sm, 256>>>(s.tasks_dev, (unsigned)tasks.size());
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        std::vector<char> got(SPAN);
        if (h2d) CK(cudaMemcpy(got.data(), s.dev, SPAN, cudaMemcpyDeviceToHost));
        else memcpy(got.data(), s.host, SPAN);
        bool ok = memcmp(got.data(), ref, SPAN) == 0;
        printf("correctness %s: %zu random unaligned tasks (1 B - 4 MiB): %s\n", h2d ? "H2D" : "D2H", tasks.size(), ok ? "ok" : "MISMATCH");
        free(ref);
        if (!ok) return false;
    }
    return true;
}

int main() {
    Setup s;
    CK(cudaSetDevice(0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    s.sms = prop.multiProcessorCount;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&s.blocks_per_sm, ferry_copy, 256, 0));
    printf("device %s, %d SMs, %d blocks of 256 threads per SM\n", prop.name, s.sms, s.blocks_per_sm);
    CK(cudaHostAlloc((void**)&s.host, SPAN, cudaHostAllocMapped | cudaHostAllocPortable));
    CK(cudaHostGetDevicePointer((void**)&s.host_dev, s.host, 0));
    CK(cudaMalloc((void**)&s.dev, SPAN));
    CK(cudaMalloc((void**)&s.tasks_dev, (SPAN / 4096) * sizeof(FerryCopy) * 2));
    CK(cudaStreamCreateWithFlags(&s.st, cudaStreamNonBlocking));
    if (!correctness(s)) return 1;

    double ceiling[2];
    for (int dir = 0; dir < 2; dir++) {
        std::vector<double> t;
        for (int r = 0; r < 5; r++) {
            double t0 = now_us();
            if (dir == 0) CK(cudaMemcpyAsync(s.dev, s.host, SPAN, cudaMemcpyHostToDevice, s.st));
            else CK(cudaMemcpyAsync(s.host, s.dev, SPAN, cudaMemcpyDeviceToHost, s.st));
            CK(cudaStreamSynchronize(s.st));
            t.push_back(now_us() - t0);
        }
        std::sort(t.begin(), t.end());
        ceiling[dir] = SPAN / t[2] / 1e3;
    }
    printf("ceiling (one 256 MiB cudaMemcpyAsync, median of 5): H2D %.2f GB/s, D2H %.2f GB/s\n", ceiling[0], ceiling[1]);

    int budgets[] = {1, 2, 4, 8, 16, s.sms};
    size_t blocks[] = {4096, 16384, 65536, 262144, 1048576};
    printf("kernel GB/s, 256 MiB of scattered blocks per cell, median of 5 (ratio to the ceiling for 8 SMs)\n");
    printf("%-8s %-4s", "block", "dir");
    for (int b : budgets) printf(" %7d SM", b);
    printf("   8SM/ceil\n");
    for (size_t block : blocks) {
        for (int dir = 0; dir < 2; dir++) {
            auto tasks = scattered(s, block, dir == 0, (unsigned)block);
            printf("%-8zu %-4s", block, dir == 0 ? "H2D" : "D2H");
            double at8 = 0;
            for (int b : budgets) {
                std::vector<float> t;
                for (int r = 0; r < 5; r++) t.push_back(run(s, tasks, b));
                std::sort(t.begin(), t.end());
                double gbs = SPAN / (t[2] * 1e-3) / 1e9;
                if (b == 8) at8 = gbs;
                printf(" %10.2f", gbs);
            }
            printf("   %8.2f\n", at8 / ceiling[dir]);
        }
    }

    // Latency of one 4 KiB H2D copy: kernel launch vs cudaMemcpyAsync, each + stream sync.
    for (int mode = 0; mode < 2; mode++) {
        std::vector<FerryCopy> one = {{(unsigned long long)s.host_dev, (unsigned long long)s.dev, 4096}};
        CK(cudaMemcpy(s.tasks_dev, one.data(), sizeof(FerryCopy), cudaMemcpyHostToDevice));
        std::vector<double> t;
        for (int r = 0; r < 2000; r++) {
            double t0 = now_us();
            if (mode == 0) ferry_copy<<<1, 32, 0, s.st>>>(s.tasks_dev, 1);
            else CK(cudaMemcpyAsync(s.dev, s.host, 4096, cudaMemcpyHostToDevice, s.st));
            CK(cudaStreamSynchronize(s.st));
            t.push_back(now_us() - t0);
        }
        std::sort(t.begin() + 0, t.end());
        printf("latency 4 KiB H2D %s + sync: p50 %.2f us, p99 %.2f us\n", mode == 0 ? "kernel launch" : "cudaMemcpyAsync", t[1000], t[1980]);
    }
    // The latency lane: one block of 4 warps polling a slot ring in mapped host memory.
    {
        const unsigned long long C = 1024;
        FerrySlot* slots;
        unsigned long long *done, *stop, *next;
        CK(cudaHostAlloc((void**)&slots, C * sizeof(FerrySlot), cudaHostAllocMapped | cudaHostAllocPortable));
        CK(cudaHostAlloc((void**)&done, C * 8, cudaHostAllocMapped | cudaHostAllocPortable));
        CK(cudaHostAlloc((void**)&stop, 8, cudaHostAllocMapped | cudaHostAllocPortable));
        memset(slots, 0, C * sizeof(FerrySlot));
        memset(done, 0, C * 8);
        *stop = 0;
        CK(cudaMalloc((void**)&next, 8));
        CK(cudaMemset(next, 0, 8));
        cudaStream_t lane_stream;
        CK(cudaStreamCreateWithFlags(&lane_stream, cudaStreamNonBlocking));
        ferry_copy_lane<<<1, 128, 0, lane_stream>>>(slots, done, C - 1, next, stop);
        CK(cudaGetLastError());
        unsigned long long i = 0;
        bool ok = true;
        for (int dir = 0; dir < 2; dir++) {
            std::vector<double> t;
            for (int r = 0; r < 5000; r++, i++) {
                FerrySlot* sl = &slots[i & (C - 1)];
                size_t off = (size_t)(r % 1024) * 4096;
                if (dir == 0) { sl->src = (unsigned long long)(s.host_dev + off); sl->dst = (unsigned long long)(s.dev + off); }
                else { sl->src = (unsigned long long)(s.dev + off); sl->dst = (unsigned long long)(s.host_dev + (64 << 20) + off); }
                sl->len = 4096;
                double t0 = now_us();
                __atomic_store_n(&sl->seq, i + 1, __ATOMIC_RELEASE);
                while (__atomic_load_n(&done[i & (C - 1)], __ATOMIC_ACQUIRE) != i + 1) {
                    if (now_us() - t0 > 1e6) { printf("latency lane: slot %llu never completed\n", i); ok = false; break; }
                }
                if (!ok) break;
                if (r >= 500) t.push_back(now_us() - t0);
            }
            if (!ok) break;
            std::sort(t.begin(), t.end());
            printf("latency lane 4 KiB %s (slot write to done flag): p50 %.2f us, p99 %.2f us\n", dir == 0 ? "H2D" : "D2H", t[t.size() / 2], t[t.size() * 99 / 100]);
        }
        if (ok) {  // D2H bytes: the last 1024 copies put device blocks at host + 64 MiB
            std::vector<char> devcopy(4096);
            CK(cudaMemcpy(devcopy.data(), s.dev + 5 * 4096, 4096, cudaMemcpyDeviceToHost));
            printf("latency lane D2H bytes: %s\n", memcmp(devcopy.data(), s.host + (64 << 20) + 5 * 4096, 4096) == 0 ? "ok" : "MISMATCH");
        }
        __atomic_store_n(stop, 1ull, __ATOMIC_RELEASE);
        CK(cudaStreamSynchronize(lane_stream));
        printf("latency lane stopped\n");
    }
    printf("probe done\n");
    return 0;
}
