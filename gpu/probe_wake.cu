// Probe (issue 13's push -> kernel latency): how fast a stream blocked in cuStreamWaitValue64
// goes on once its word is written, by who writes it and how long the stream was blocked.
//
// A: stream W waits on a word in pinned host memory (cuMemHostAlloc, device-mapped), blocked
//    for `blocked` us; the CPU writes the word; time from the write to W's next event done
//    (polled with cudaEventQuery), as ferry's worker publishing a watermark.
// B: the same word written by the GPU: stream C copies 4 KiB H2D, then cuStreamWriteValue64s the
//    word (host or device memory); time from the CPU enqueuing the copy to W's event done. This
//    is what a worker that wrote its watermark on its own copy stream would give.
// C: the CPU path in full, for comparison with B: C copies 4 KiB, the CPU polls C's event, then
//    writes the host word; time from the enqueue to W's event done (ferry before the landed word).
// D: ferry's order since the ninth session: C copies 4 KiB, writes its done word (another pinned
//    host word, which the CPU polls to see the batch done), then the landed word W waits on; the
//    time to W's event done and to the CPU seeing the done word.
// E: D with the two writes the other way round (the landed word first): what W and the CPU would
//    see if a queue that a stream waits on had its mark enqueued before the done word.
// (The second write without a memory barrier, CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER, is
// refused with CUDA_ERROR_INVALID_VALUE on the H200 VM, driver 580: fifteenth session.)
// H: a kernel already running on stream C (one warp, as ferry's resident kernel waits for its
//    tasks) copies 4 KiB H2D once the CPU's go flag says so, then stores the word itself (host
//    or device memory); time from the CPU's go to W's event done. What a resident kernel writing
//    a queue's landed word would give: does a kernel's store wake the stream as fast as a
//    stream's own write (B), or only as late as the CPU's (A)?
// Every poll has a deadline; nothing can hang (a timed-out round prints -1).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_wake gpu/probe_wake.cu -lcuda && /tmp/probe_wake
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
#include <cuda.h>
#include <cuda_runtime.h>
#include "probe.cuh"


__global__ void copy_on_go(const unsigned long long *go, unsigned long long value, volatile unsigned long long *started,
                           const uint4 *src, uint4 *dst, unsigned long long *word) {
    if (threadIdx.x == 0) *started = value;
    for (;;) {
        unsigned long long v;
        asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(go) : "memory");
        if (v >= value) break;
    }
    for (unsigned i = threadIdx.x; i < 4096 / 16; i += 32) dst[i] = src[i];
    __threadfence_system();
    __syncwarp();
    if (threadIdx.x == 0) asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(word), "l"(value) : "memory");
}

static bool spin(cudaEvent_t e, double deadline_us) {
    double t0 = now_us();
    for (;;) {
        cudaError_t r = cudaEventQuery(e);
        if (r == cudaSuccess) return true;
        if (r != cudaErrorNotReady) CHECK(r);
        if (now_us() - t0 > deadline_us) return false;
    }
}

static void busy_wait(double us) {
    double t0 = now_us();
    while (now_us() - t0 < us) {
    }
}

int main() {
    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(nullptr));
    cudaStream_t w, c;
    CHECK(cudaStreamCreateWithFlags(&w, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&c, cudaStreamNonBlocking));
    cudaEvent_t passed, copied;
    CHECK(cudaEventCreateWithFlags(&passed, cudaEventDisableTiming));
    CHECK(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming));
    uint64_t *host_word, *done_word;
    CHECK(cudaHostAlloc((void **)&host_word, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    CHECK(cudaHostAlloc((void **)&done_word, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    *done_word = 0;
    CUdeviceptr done_dev;
    CU(cuMemHostGetDevicePointer(&done_dev, done_word, 0));
    CUdeviceptr host_dev;
    CU(cuMemHostGetDevicePointer(&host_dev, host_word, 0));
    CUdeviceptr dev_word;
    CU(cuMemAlloc(&dev_word, 64));
    CU(cuMemsetD8(dev_word, 0, 64));
    void *pinned, *device;
    CHECK(cudaHostAlloc(&pinned, 4096, cudaHostAllocPortable));
    CHECK(cudaMalloc(&device, 4096));
    uint64_t *go, *started, *mapped_src;
    CHECK(cudaHostAlloc((void **)&go, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    CHECK(cudaHostAlloc((void **)&started, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    CHECK(cudaHostAlloc((void **)&mapped_src, 4096, cudaHostAllocMapped | cudaHostAllocPortable));
    *go = 0;
    *started = 0;
    void *go_dev, *started_dev, *src_dev;
    CHECK(cudaHostGetDevicePointer(&go_dev, go, 0));
    CHECK(cudaHostGetDevicePointer(&started_dev, started, 0));
    CHECK(cudaHostGetDevicePointer(&src_dev, mapped_src, 0));
    copy_on_go<<<1, 32, 0, c>>>((const unsigned long long *)go_dev, 0, (volatile unsigned long long *)started_dev,
                                (const uint4 *)src_dev, (uint4 *)device, (unsigned long long *)dev_word);
    CHECK(cudaStreamSynchronize(c));
    const int rounds = 400;
    const double blocked_us[] = {0, 20, 100, 1000};
    uint64_t value = 0;
    std::printf("| case | word | blocked us | p50 us | p90 us | p99 us | timeouts | done word seen, p50 us |\n|---|---|---|---|---|---|---|---|\n");
    for (int kind = 0; kind < 8; kind++) {
        const char *name = kind == 0 ? "A: CPU writes the word" : kind == 1 ? "B: GPU writes after a 4 KiB copy"
                         : kind == 2 ? "B: GPU writes after a 4 KiB copy" : kind == 3 ? "C: CPU polls the copy, writes"
                         : kind == 4 ? "D: copy, done word, landed word" : kind == 5 ? "E: copy, landed word, done word"
                         : "H: a running kernel copies on go, stores the word";
        bool on_device = kind == 2 || kind == 7;
        CUdeviceptr word = on_device ? dev_word : host_dev;
        for (double blocked : blocked_us) {
            Stats s, seen;
            int timeouts = 0;
            for (int i = 0; i < rounds + 20; i++) {
                value++;
                CU(cuStreamWaitValue64((CUstream)w, word, value, CU_STREAM_WAIT_VALUE_GEQ));
                CHECK(cudaEventRecord(passed, w));
                if (kind >= 6) {
                    copy_on_go<<<1, 32, 0, c>>>((const unsigned long long *)go_dev, value,
                                                (volatile unsigned long long *)started_dev, (const uint4 *)src_dev,
                                                (uint4 *)device, (unsigned long long *)word);
                    CHECK(cudaGetLastError());
                    double ts = now_us();
                    while (__atomic_load_n(started, __ATOMIC_ACQUIRE) < value) {
                        if (now_us() - ts > 1e6) {
                            std::fprintf(stderr, "timeout: the copy kernel did not start\n");
                            return 1;
                        }
                    }
                }
                busy_wait(blocked);
                double t0 = now_us();
                if (kind >= 6) {
                    __atomic_store_n(go, value, __ATOMIC_RELEASE);
                } else if (kind == 0) {
                    __atomic_store_n(host_word, value, __ATOMIC_RELEASE);
                } else if (kind == 1 || kind == 2) {
                    CHECK(cudaMemcpyAsync(device, pinned, 4096, cudaMemcpyHostToDevice, c));
                    CU(cuStreamWriteValue64((CUstream)c, word, value, CU_STREAM_WRITE_VALUE_DEFAULT));
                } else if (kind == 3) {
                    CHECK(cudaMemcpyAsync(device, pinned, 4096, cudaMemcpyHostToDevice, c));
                    CHECK(cudaEventRecord(copied, c));
                    if (!spin(copied, 1e6)) timeouts++;
                    __atomic_store_n(host_word, value, __ATOMIC_RELEASE);
                } else {
                    CHECK(cudaMemcpyAsync(device, pinned, 4096, cudaMemcpyHostToDevice, c));
                    CUdeviceptr first = kind == 4 ? done_dev : word, second = kind == 4 ? word : done_dev;
                    CU(cuStreamWriteValue64((CUstream)c, first, value, CU_STREAM_WRITE_VALUE_DEFAULT));
                    CU(cuStreamWriteValue64((CUstream)c, second, value, CU_STREAM_WRITE_VALUE_DEFAULT));
                }
                bool ok;
                double dt;
                if (kind == 4 || kind == 5) {
                    // Both ends at once: W's event and the CPU's look at the done word.
                    double pass = -1, done = -1;
                    while ((pass < 0 || done < 0) && now_us() - t0 < 1e6) {
                        if (done < 0 && __atomic_load_n(done_word, __ATOMIC_ACQUIRE) >= value) done = now_us() - t0;
                        if (pass < 0) {
                            cudaError_t r = cudaEventQuery(passed);
                            if (r == cudaSuccess) pass = now_us() - t0;
                            else if (r != cudaErrorNotReady) CHECK(r);
                        }
                    }
                    ok = pass >= 0 && done >= 0;
                    dt = pass;
                    if (ok && i >= 20) seen.add(done);
                } else {
                    ok = spin(passed, 1e6);
                    dt = now_us() - t0;
                }
                if (!ok) {
                    timeouts++;
                    __atomic_store_n(host_word, value, __ATOMIC_RELEASE);  // release it, whatever kind
                    __atomic_store_n(go, value, __ATOMIC_RELEASE);
                    CU(cuMemsetD8(dev_word, 0xff, 8));
                    CHECK(cudaStreamSynchronize(w));
                    std::fprintf(stderr, "timeout: %s blocked %.0f\n", name, blocked);
                    return 1;
                }
                CHECK(cudaStreamSynchronize(c));
                if (i >= 20) s.add(dt);
            }
            char done_p50[32] = "-";
            if (!seen.v.empty()) std::snprintf(done_p50, sizeof done_p50, "%.2f", seen.q(0.5));
            std::printf("| %s | %s | %.0f | %.2f | %.2f | %.2f | %d | %s |\n", name, on_device ? "device" : "host",
                        blocked, s.q(0.5), s.q(0.9), s.q(0.99), timeouts, done_p50);
        }
    }
    // Baseline: the copy alone, enqueue -> its event seen.
    Stats s;
    for (int i = 0; i < rounds + 20; i++) {
        double t0 = now_us();
        CHECK(cudaMemcpyAsync(device, pinned, 4096, cudaMemcpyHostToDevice, c));
        CHECK(cudaEventRecord(copied, c));
        spin(copied, 1e6);
        if (i >= 20) s.add(now_us() - t0);
    }
    std::printf("| the 4 KiB copy alone (enqueue -> its event seen) | - | - | %.2f | %.2f | %.2f | 0 | - |\n", s.q(0.5),
                s.q(0.9), s.q(0.99));
    return 0;
}
