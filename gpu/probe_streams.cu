// Probe: what happens to work on one stream while another stream of the same context is blocked
// in cuStreamWaitValue64 on a word in host memory (issue 13's stream_wait pattern), and how long
// a cuStreamWriteValue64 into host memory takes to be seen by a polling host thread (its
// stream_signal). No step can hang: every poll has a deadline, and a blocked wait is released
// by the host writing its word.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_streams gpu/probe_streams.cu -lcuda && /tmp/probe_streams
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <cuda.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <unistd.h>
#include "probe.cuh"


__global__ void touch(unsigned char *p, size_t n, unsigned char v) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = v;
}

// Polls `e` until done or `deadline_us` passes; microseconds taken, or -1.
static double poll(cudaEvent_t e, double deadline_us) {
    double t0 = now_us();
    for (;;) {
        cudaError_t r = cudaEventQuery(e);
        if (r == cudaSuccess) return now_us() - t0;
        if (r != cudaErrorNotReady) CHECK(r);
        if (now_us() - t0 > deadline_us) return -1;
    }
}

struct Word {
    volatile uint64_t *host;
    CUdeviceptr dev;
};

// A word in a memfd mapping registered with cuMemHostRegister (as ferry's queue header) or in
// cuMemHostAlloc memory.
static Word word(bool memfd) {
    void *p;
    if (memfd) {
        int fd = memfd_create("probe", 0);
        if (fd < 0 || ftruncate(fd, 1 << 16) != 0) std::exit(1);
        p = mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) std::exit(1);
        CU(cuMemHostRegister(p, 1 << 16, CU_MEMHOSTREGISTER_DEVICEMAP | CU_MEMHOSTREGISTER_PORTABLE));
    } else {
        CU(cuMemHostAlloc(&p, 1 << 16, CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE));
    }
    std::memset(p, 0, 1 << 16);
    Word w{(volatile uint64_t *)p, 0};
    CU(cuMemHostGetDevicePointer(&w.dev, p, 0));
    return w;
}

int main() {
    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(nullptr));
    int pr_lo, pr_hi;
    CHECK(cudaDeviceGetStreamPriorityRange(&pr_lo, &pr_hi));
    const size_t big = 64 << 20;
    unsigned char *dev, *host;
    CHECK(cudaMalloc(&dev, big));
    CHECK(cudaHostAlloc((void **)&host, big, cudaHostAllocDefault));
    std::memset(host, 3, big);
    // Kernels loaded before any wait (lazy loading is another hazard, not this probe's).
    touch<<<1, 32>>>(dev, 1, 0);
    CHECK(cudaDeviceSynchronize());

    std::printf("## A blocked in a wait on a host word; then work on stream B (another thread, as ferry's worker)\n");
    std::printf("| word | A before its wait | B priority | B's work | B done after (us) | A done after release (us) |\n|---|---|---|---|---|---|\n");
    const char *works[] = {"H2D 4 KiB", "H2D 1 MiB", "D2H 4 KiB", "kernel"};
    for (int memfd = 1; memfd >= 0; memfd--) {
        Word w = word(memfd);
        for (int prior = 0; prior < 2; prior++) {
            for (int high = 0; high < 2; high++) {
                for (int k = 0; k < 4; k++) {
                    cudaStream_t a, b;
                    CHECK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
                    CHECK(cudaStreamCreateWithPriority(&b, cudaStreamNonBlocking, high ? pr_hi : pr_lo));
                    cudaEvent_t ea, eb;
                    CHECK(cudaEventCreateWithFlags(&ea, cudaEventDisableTiming));
                    CHECK(cudaEventCreateWithFlags(&eb, cudaEventDisableTiming));
                    *w.host = 0;
                    if (prior) touch<<<1, 32, 0, a>>>(dev + (32 << 20), 4096, 1);
                    CU(cuStreamWaitValue64((CUstream)a, w.dev, 1, CU_STREAM_WAIT_VALUE_GEQ));
                    CHECK(cudaEventRecord(ea, a));
                    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // A is in its wait
                    std::thread t([&] {
                        CHECK(cudaSetDevice(0));
                        if (k == 0) CHECK(cudaMemcpyAsync(dev, host, 4096, cudaMemcpyHostToDevice, b));
                        if (k == 1) CHECK(cudaMemcpyAsync(dev, host, 1 << 20, cudaMemcpyHostToDevice, b));
                        if (k == 2) CHECK(cudaMemcpyAsync(host, dev, 4096, cudaMemcpyDeviceToHost, b));
                        if (k == 3) touch<<<1, 32, 0, b>>>(dev, 4096, 2);
                        CHECK(cudaEventRecord(eb, b));
                    });
                    t.join();
                    double tb = poll(eb, 500000);
                    *w.host = 1;
                    double ta = poll(ea, 2000000);
                    if (tb < 0) tb = -poll(eb, 2000000) - 1;  // B only after A's release: negative
                    std::printf("| %s | %s | %s | %s | %s%.1f | %.1f |\n", memfd ? "memfd+register" : "cuMemHostAlloc",
                                prior ? "a kernel" : "nothing", high ? "highest" : "normal", works[k],
                                tb < 0 ? "HUNG, then " : "", tb < 0 ? -tb - 1 : tb, ta);
                    CHECK(cudaStreamSynchronize(a));
                    CHECK(cudaStreamSynchronize(b));
                    cudaStreamDestroy(a);
                    cudaStreamDestroy(b);
                    cudaEventDestroy(ea);
                    cudaEventDestroy(eb);
                }
            }
        }
    }

    std::printf("\n## stream_signal: a kernel then cuStreamWriteValue64 into a host word, seen by this thread (200 rounds)\n");
    std::printf("| word | p50 us | p99 us | max us |\n|---|---|---|---|\n");
    for (int memfd = 1; memfd >= 0; memfd--) {
        Word w = word(memfd);
        cudaStream_t a;
        CHECK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
        std::vector<double> t;
        for (uint64_t i = 1; i <= 200; i++) {
            double t0 = now_us();
            touch<<<1, 32, 0, a>>>(dev, 4096, 1);
            CU(cuStreamWriteValue64((CUstream)a, w.dev + 8, i, 0));
            while (w.host[1] < i)
                if (now_us() - t0 > 1e6) break;
            t.push_back(now_us() - t0);
        }
        CHECK(cudaStreamSynchronize(a));
        std::sort(t.begin(), t.end());
        std::printf("| %s | %.1f | %.1f | %.1f |\n", memfd ? "memfd+register" : "cuMemHostAlloc", t[100], t[197], t[199]);
    }
    return 0;
}
