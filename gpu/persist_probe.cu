// Probe for issue 11's open question: can a persistent copy kernel, resident on a few SMs and fed
// through a ring in pinned host memory (no launch per batch), move small blocks near PCIe speed
// while a compute load holds every other SM, and cost that load only the SMs it occupies?
//
//   nvcc -O3 -arch=sm_90 -o /tmp/persist_probe gpu/persist_probe.cu && /tmp/persist_probe
//
// The kernel: `blocks` blocks of 1024 threads (one per SM: each asks for most of an SM's shared
// memory). Warp 0 of block 0 is the poller: it mirrors the host's published tail into device
// memory and the device's completion count back to the host. Every other warp claims task
// indices with an atomic, waits until the tail covers its index, reads the task (src, dst, len)
// from the host ring, copies it (16-byte vector loads, the same loop as ferry's copy kernel),
// fences (system scope) and counts it done. The host pushes tasks, publishes the tail and waits
// for the count. The load: an FMA kernel on every SM (as gpu/load_kernel.cu), launched back to
// back on its own stream; its loss = 1 - time of its launches alone / time with the copies.
#include <cuda_runtime.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#define CHECK(x)                                                                                    \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) {                                                                    \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

struct Task {
    unsigned long long src, dst, len, pad;
};

constexpr unsigned RING = 1u << 16;  // task slots (power of two)

// Shared between host (mapped pinned memory) and device.
struct HostSide {
    volatile unsigned long long tail;       // tasks published by the host
    volatile unsigned long long completed;  // tasks done, mirrored by the poller
    volatile unsigned int stop;             // host asks the kernel to exit
    volatile unsigned int started;          // the poller says it runs
};

// Device-side state.
struct DevSide {
    unsigned long long claim;      // next task index to claim
    unsigned long long tail;       // mirror of HostSide::tail
    unsigned long long completed;  // tasks done
    unsigned int stop;
};

__device__ __forceinline__ void copy_bytes(const char* s, char* d, unsigned long long n, unsigned lane) {
    for (unsigned long long i = lane; i < n; i += 32) d[i] = s[i];
}

__device__ __forceinline__ void copy_task(unsigned long long src, unsigned long long dst, unsigned long long n,
                                          unsigned lane) {
    const char* s = (const char*)src;
    char* d = (char*)dst;
    if (((src ^ dst) & 15) != 0) {
        copy_bytes(s, d, n, lane);
        return;
    }
    unsigned long long head = (16 - (dst & 15)) & 15;
    if (head > n) head = n;
    copy_bytes(s, d, head, lane);
    s += head;
    d += head;
    n -= head;
    const uint4* s4 = (const uint4*)s;
    uint4* d4 = (uint4*)d;
    const unsigned long long n16 = n >> 4;
    unsigned long long i = lane;
    for (; i + 7 * 32 < n16; i += 8 * 32) {
        uint4 v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = s4[i + k * 32];
#pragma unroll
        for (int k = 0; k < 8; k++) d4[i + k * 32] = v[k];
    }
    for (; i < n16; i += 32) d4[i] = s4[i];
    copy_bytes(s + (n16 << 4), d + (n16 << 4), n & 15, lane);
}

__global__ void __launch_bounds__(1024, 1) persistent_copy(const Task* tasks, HostSide* host, DevSide* dev, unsigned per_claim) {
    // The dynamic shared memory the launch asks for is never used: it keeps one block per SM.
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    volatile DevSide* vdev = dev;
    if (blockIdx.x == 0 && warp == 0) {
        // The poller.
        if (lane == 0) {
            host->started = 1;
            unsigned long long last_done = ~0ull;
            while (true) {
                unsigned long long t = host->tail;
                __threadfence_system();  // the tasks below `t` are read after this
                vdev->tail = t;
                unsigned long long done = atomicAdd(&dev->completed, 0ull);
                if (done != last_done) {
                    __threadfence_system();
                    host->completed = done;
                    last_done = done;
                }
                if (host->stop) {
                    vdev->stop = 1;
                    break;
                }
                __nanosleep(200);
            }
        }
        return;
    }
    // Each claim takes `per_claim` (at most 8) consecutive tasks: one atomic, one read of their
    // descriptors (lanes 4m..4m+3 read task m's four words), one system fence and one count
    // for all of them; they are copied one after the other by the whole warp.
    while (true) {
        unsigned long long base = 0;
        if (lane == 0) base = atomicAdd(&dev->claim, (unsigned long long)per_claim);
        base = __shfl_sync(0xffffffff, base, 0);
        const unsigned long long end = base + per_claim;
        unsigned long long j = base;
        while (j < end) {
            unsigned long long tail = 0;
            int stop = 0;
            while (true) {
                if (lane == 0) {
                    tail = vdev->tail;
                    stop = vdev->stop;
                }
                tail = __shfl_sync(0xffffffff, tail, 0);
                stop = __shfl_sync(0xffffffff, stop, 0);
                if (tail > j) break;
                if (stop) return;
                __nanosleep(100);
            }
            __threadfence_system();  // the tasks below `tail` are read after it was seen
            const unsigned avail = (unsigned)(min(end, tail) - j);
            unsigned long long word = 0;
            if (lane < 4 * avail) {
                const volatile unsigned long long* w =
                    (const volatile unsigned long long*)&tasks[(j + lane / 4) & (RING - 1)];
                word = w[lane % 4];
            }
            for (unsigned m = 0; m < avail; m++) {
                const unsigned long long src = __shfl_sync(0xffffffff, word, 4 * m);
                const unsigned long long dst = __shfl_sync(0xffffffff, word, 4 * m + 1);
                const unsigned long long len = __shfl_sync(0xffffffff, word, 4 * m + 2);
                copy_task(src, dst, len, lane);
            }
            j += avail;
        }
        __threadfence_system();
        __syncwarp();
        if (lane == 0) atomicAdd(&dev->completed, (unsigned long long)per_claim);
    }
}

extern "C" __global__ void fma_load(float* sink, unsigned int iters) {
    const float b = 0.999999f, c = 1e-6f;
    float a0 = threadIdx.x * 1e-7f, a1 = a0 + 1e-7f, a2 = a0 + 2e-7f, a3 = a0 + 3e-7f;
    float a4 = a0 + 4e-7f, a5 = a0 + 5e-7f, a6 = a0 + 6e-7f, a7 = a0 + 7e-7f;
    for (unsigned int i = 0; i < iters; i++) {
#pragma unroll
        for (int k = 0; k < 16; k++) {
            a0 = fmaf(a0, b, c); a1 = fmaf(a1, b, c); a2 = fmaf(a2, b, c); a3 = fmaf(a3, b, c);
            a4 = fmaf(a4, b, c); a5 = fmaf(a5, b, c); a6 = fmaf(a6, b, c); a7 = fmaf(a7, b, c);
        }
    }
    const float s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    if (s < -1.0f) sink[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

using Clock = std::chrono::steady_clock;
static double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

struct Probe {
    Task* ring;  // pinned, mapped
    HostSide* host;
    DevSide* dev;
    unsigned long long pushed = 0;
    cudaStream_t stream;
    int blocks;

    void start(int nblocks, size_t smem, unsigned per_claim) {
        blocks = nblocks;
        CHECK(cudaHostAlloc((void**)&ring, sizeof(Task) * RING, cudaHostAllocMapped));
        CHECK(cudaHostAlloc((void**)&host, sizeof(HostSide), cudaHostAllocMapped));
        memset((void*)host, 0, sizeof(HostSide));
        CHECK(cudaMalloc(&dev, sizeof(DevSide)));
        CHECK(cudaMemset(dev, 0, sizeof(DevSide)));
        pushed = 0;
        CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        CHECK(cudaFuncSetAttribute(persistent_copy, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        Task* dring;
        HostSide* dhost;
        CHECK(cudaHostGetDevicePointer((void**)&dring, ring, 0));
        CHECK(cudaHostGetDevicePointer((void**)&dhost, host, 0));
        persistent_copy<<<blocks, 1024, smem, stream>>>(dring, dhost, dev, per_claim);
        CHECK(cudaGetLastError());
        auto t0 = Clock::now();
        while (!host->started) {
            if (secs(t0, Clock::now()) > 5) {
                fprintf(stderr, "persistent kernel did not start\n");
                exit(1);
            }
        }
    }

    // Pushes `n` tasks from the plan and waits for all of them.
    void run(const std::vector<Task>& plan, size_t n) {
        unsigned long long target = pushed + n;
        size_t k = 0;
        while (pushed < target) {
            unsigned long long done = host->completed;
            // Room: never more than RING - 1 tasks unfinished.
            unsigned long long room = RING - 1 - (pushed - done);
            unsigned long long batch = std::min<unsigned long long>(room, target - pushed);
            for (unsigned long long j = 0; j < batch; j++) {
                ring[(pushed + j) & (RING - 1)] = plan[k++ % plan.size()];
            }
            if (batch > 0) {
                std::atomic_thread_fence(std::memory_order_release);
                pushed += batch;
                host->tail = pushed;
            }
        }
        auto t0 = Clock::now();
        while (host->completed < target) {
            if (secs(t0, Clock::now()) > 10) {
                fprintf(stderr, "timeout: %llu of %llu done\n", host->completed, target);
                exit(1);
            }
        }
    }

    void stop() {
        host->stop = 1;
        CHECK(cudaStreamSynchronize(stream));
        CHECK(cudaStreamDestroy(stream));
        CHECK(cudaFreeHost(ring));
        CHECK(cudaFreeHost((void*)host));
        CHECK(cudaFree(dev));
    }
};

static std::vector<Task> scatter(char* src, char* dst, size_t span, size_t block, unsigned seed) {
    size_t n = span / block;
    std::vector<size_t> a(n), b(n);
    std::iota(a.begin(), a.end(), 0);
    std::iota(b.begin(), b.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(a.begin(), a.end(), rng);
    std::shuffle(b.begin(), b.end(), rng);
    std::vector<Task> plan(n);
    for (size_t i = 0; i < n; i++)
        plan[i] = Task{(unsigned long long)(src + a[i] * block), (unsigned long long)(dst + b[i] * block), block, 0};
    return plan;
}

int main() {
    CHECK(cudaSetDeviceFlags(cudaDeviceMapHost));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    const size_t span = 256ull << 20;
    char *host_buf, *dev_buf;
    CHECK(cudaHostAlloc((void**)&host_buf, span, cudaHostAllocMapped));
    memset(host_buf, 0x5a, span);
    CHECK(cudaMalloc(&dev_buf, span));
    char* host_dev;  // the host buffer's device address
    CHECK(cudaHostGetDevicePointer((void**)&host_dev, host_buf, 0));
    printf("GPU %s, %d SMs, %zu KiB shared memory per SM\n", prop.name, prop.multiProcessorCount,
           prop.sharedMemPerMultiprocessor >> 10);

    // Ceilings.
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    double ceil[2];
    for (int d = 0; d < 2; d++) {
        std::vector<double> runs;
        for (int r = 0; r < 5; r++) {
            auto t0 = Clock::now();
            if (d == 0) CHECK(cudaMemcpyAsync(dev_buf, host_buf, span, cudaMemcpyHostToDevice, s));
            else CHECK(cudaMemcpyAsync(host_buf, dev_buf, span, cudaMemcpyDeviceToHost, s));
            CHECK(cudaStreamSynchronize(s));
            runs.push_back(span / secs(t0, Clock::now()) / 1e9);
        }
        std::sort(runs.begin(), runs.end());
        ceil[d] = runs[2];
    }
    printf("ceiling (one 256 MiB cudaMemcpyAsync): H2D %.2f GB/s, D2H %.2f GB/s\n", ceil[0], ceil[1]);

    // The load: sized to ~1 ms a launch.
    int load_blocks_per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&load_blocks_per_sm, fma_load, 256, 0));
    const int load_grid = load_blocks_per_sm * prop.multiProcessorCount;
    float* sink;
    CHECK(cudaMalloc(&sink, sizeof(float) * load_grid * 256));
    cudaStream_t ls;
    CHECK(cudaStreamCreateWithFlags(&ls, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    unsigned iters = 256;
    for (int k = 0; k < 2; k++) {
        CHECK(cudaEventRecord(e0, ls));
        fma_load<<<load_grid, 256, 0, ls>>>(sink, iters);
        CHECK(cudaEventRecord(e1, ls));
        CHECK(cudaEventSynchronize(e1));
    }
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    iters = (unsigned)(iters * 1.0 / ms);
    const int LOAD_LAUNCHES = 150;
    // Time of LOAD_LAUNCHES launches back to back, alone.
    auto load_alone = [&]() {
        CHECK(cudaEventRecord(e0, ls));
        for (int k = 0; k < LOAD_LAUNCHES; k++) fma_load<<<load_grid, 256, 0, ls>>>(sink, iters);
        CHECK(cudaEventRecord(e1, ls));
        CHECK(cudaEventSynchronize(e1));
        float t;
        CHECK(cudaEventElapsedTime(&t, e0, e1));
        return (double)t;
    };

    struct Config {
        int sms, blocks_per_sm;
        unsigned per_claim;
    };
    printf("\npersistent copy kernel: blocks of 1024 threads (shared memory sized to fit blocks_per_sm a SM);\n"
           "the poller warp is one of block 0's; per claim: tasks a warp takes at once\n");
    printf("%4s %5s %6s %7s %4s %10s %6s | %12s %6s %7s\n", "SMs", "blk/SM", "claim", "block", "dir", "idle GB/s",
           "/ceil", "loaded GB/s", "/ceil", "loss");
    for (Config c : {Config{4, 1, 1}, Config{2, 1, 8}, Config{4, 1, 8}, Config{8, 1, 8}, Config{16, 1, 8}}) {
        const size_t smem = std::min(prop.sharedMemPerBlockOptin, prop.sharedMemPerMultiprocessor / c.blocks_per_sm - (8 << 10));
        for (size_t block : {4096ul, 16384ul, 65536ul}) {
            for (int d = 0; d < 2; d++) {
                char* src = d == 0 ? host_dev : dev_buf;
                char* dst = d == 0 ? dev_buf : host_dev;
                std::vector<Task> plan = scatter(src, dst, span, block, (unsigned)block);
                const size_t count = (1ull << 30) / block;  // 1 GiB per measurement
                Probe p;
                p.start(c.sms * c.blocks_per_sm, smem, c.per_claim);
                p.run(plan, count / 4);  // warm up
                std::vector<double> runs;
                for (int r = 0; r < 3; r++) {
                    auto t0 = Clock::now();
                    p.run(plan, count);
                    runs.push_back(count * block / secs(t0, Clock::now()) / 1e9);
                }
                std::sort(runs.begin(), runs.end());
                double idle = runs[1];
                // Under load: the load's launches queued, then copies until the load is done.
                double alone = load_alone();
                CHECK(cudaEventRecord(e0, ls));
                for (int k = 0; k < LOAD_LAUNCHES; k++) fma_load<<<load_grid, 256, 0, ls>>>(sink, iters);
                CHECK(cudaEventRecord(e1, ls));
                auto t0 = Clock::now();
                size_t moved = 0;
                while (cudaEventQuery(e1) == cudaErrorNotReady) {
                    p.run(plan, count / 16);
                    moved += count / 16;
                }
                double window = secs(t0, Clock::now());
                float with;
                CHECK(cudaEventElapsedTime(&with, e0, e1));
                double loaded = moved * block / window / 1e9;
                double loss = 1.0 - alone / with;
                p.stop();
                printf("%4d %5d %6u %6zuK %4s %10.2f %6.2f | %12.2f %6.2f %6.1f%%\n", c.sms, c.blocks_per_sm,
                       c.per_claim, block >> 10, d == 0 ? "H2D" : "D2H", idle, idle / ceil[d], loaded, loaded / ceil[d],
                       loss * 100);
                fflush(stdout);
            }
        }
    }
    // Correctness spot check: H2D of a pattern through the persistent kernel.
    for (size_t i = 0; i < span; i++) host_buf[i] = (char)(i * 7 + 3);
    CHECK(cudaMemset(dev_buf, 0, span));
    {
        std::vector<Task> plan = scatter(host_dev, dev_buf, span, 4096, 1);
        Probe p;
        p.start(4, std::min(prop.sharedMemPerBlockOptin, prop.sharedMemPerMultiprocessor - (8 << 10)), 8);
        p.run(plan, plan.size());
        p.stop();
        std::vector<char> back(span);
        CHECK(cudaMemcpy(back.data(), dev_buf, span, cudaMemcpyDeviceToHost));
        size_t bad = 0;
        for (const Task& t : plan) {
            const char* want = host_buf + (t.src - (unsigned long long)host_dev);
            const char* got = back.data() + (t.dst - (unsigned long long)dev_buf);
            if (memcmp(want, got, t.len) != 0) bad++;
        }
        printf("\ncorrectness: %zu of %zu 4 KiB blocks wrong after one H2D pass through the persistent kernel\n", bad,
               plan.size());
    }
    return 0;
}
