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

struct Stats {
    std::vector<double> v;
    void add(double x) { v.push_back(x); }
    double q(double f) {
        std::sort(v.begin(), v.end());
        return v.empty() ? -1 : v[(size_t)((v.size() - 1) * f)];
    }
};

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
    const int rounds = 400;
    const double blocked_us[] = {0, 20, 100, 1000};
    uint64_t value = 0;
    std::printf("| case | word | blocked us | p50 us | p90 us | p99 us | timeouts | done word seen, p50 us |\n|---|---|---|---|---|---|---|---|\n");
    for (int kind = 0; kind < 6; kind++) {
        const char *name = kind == 0 ? "A: CPU writes the word" : kind == 1 ? "B: GPU writes after a 4 KiB copy"
                         : kind == 2 ? "B: GPU writes after a 4 KiB copy" : kind == 3 ? "C: CPU polls the copy, writes"
                         : kind == 4 ? "D: copy, done word, landed word" : "E: copy, landed word, done word";
        bool on_device = kind == 2;
        CUdeviceptr word = on_device ? dev_word : host_dev;
        for (double blocked : blocked_us) {
            Stats s, seen;
            int timeouts = 0;
            for (int i = 0; i < rounds + 20; i++) {
                value++;
                CU(cuStreamWaitValue64((CUstream)w, word, value, CU_STREAM_WAIT_VALUE_GEQ));
                CHECK(cudaEventRecord(passed, w));
                busy_wait(blocked);
                double t0 = now_us();
                if (kind == 0) {
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
                if (kind >= 4) {
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
