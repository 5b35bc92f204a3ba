// Probe (issue 13's push -> kernel latency): a stream held by a spinning one-thread kernel
// against a stream held by cuStreamWaitValue64, on a word in pinned host memory or in device
// memory. The word is written by another stream's cuStreamWriteValue64 right after a 4 KiB H2D
// copy (what ferry's worker stream does for a queue a stream waits on).
//
// Rows, for each way of waiting (`wait`: the stream's front end; `spin`: a kernel of one thread
// polling the word with acquire loads, the stream's next work behind it):
//   release: the waiting stream blocked `blocked` us before the copy is enqueued; time from the
//            enqueue to (a) a dependent kernel behind the wait running (its first thread writes a
//            pinned host flag, polled by the CPU) and (b) the event after that kernel seen done.
//   passed:  the word already written (the load landed before the stream needs it): a chain of
//            64 (tiny kernel, wait) pairs on one stream, us per pair, against the pairs without a
//            wait; what waiting costs a forward pass whose loads are in time.
// Each with the GPU idle, then under a compute load (an FMA kernel of many short blocks on a
// third stream, launched back to back, every SM full), the waiting stream at normal priority.
// Every poll has a deadline; nothing can hang (a timed-out round aborts with a message).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_spin_wait gpu/probe_spin_wait.cu -lcuda && /tmp/probe_spin_wait
#include <atomic>
#include <thread>
#include "probe.cuh"

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long *p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__global__ void spin_wait(const unsigned long long *word, unsigned long long value) {
    while (load_acquire(word) < value) {
    }
}

// The dependent kernel: says it runs, through a pinned host flag.
__global__ void running(volatile unsigned long long *flag, unsigned long long value) {
    if (threadIdx.x == 0) *flag = value;
}

__global__ void tiny() {}

__global__ void load(float *sink, unsigned iters) {
    float a = threadIdx.x * 1e-7f, b = a + 1e-7f, c = a + 2e-7f, d = a + 3e-7f;
    for (unsigned i = 0; i < iters; i++) {
#pragma unroll
        for (int k = 0; k < 16; k++) {
            a = fmaf(a, 0.999999f, 1e-6f);
            b = fmaf(b, 0.999999f, 1e-6f);
            c = fmaf(c, 0.999999f, 1e-6f);
            d = fmaf(d, 0.999999f, 1e-6f);
        }
    }
    if (a + b + c + d < -1.0f) sink[threadIdx.x] = a;
}

static void enqueue_wait(bool spin, cudaStream_t s, CUdeviceptr word, unsigned long long value) {
    if (spin) {
        spin_wait<<<1, 1, 0, s>>>((const unsigned long long *)word, value);
        CHECK(cudaGetLastError());
    } else {
        CU(cuStreamWaitValue64((CUstream)s, word, value, CU_STREAM_WAIT_VALUE_GEQ));
    }
}

int main() {
    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(nullptr));
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t w, c, l;
    CHECK(cudaStreamCreateWithFlags(&w, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&c, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&l, cudaStreamNonBlocking));
    cudaEvent_t passed, e0, e1;
    CHECK(cudaEventCreateWithFlags(&passed, cudaEventDisableTiming));
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    unsigned long long *host_word, *flag;
    CHECK(cudaHostAlloc((void **)&host_word, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    CHECK(cudaHostAlloc((void **)&flag, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    *host_word = 0;
    *flag = 0;
    CUdeviceptr host_dev, flag_dev, dev_word;
    CU(cuMemHostGetDevicePointer(&host_dev, host_word, 0));
    CU(cuMemHostGetDevicePointer(&flag_dev, flag, 0));
    CU(cuMemAlloc(&dev_word, 64));
    CU(cuMemsetD8(dev_word, 0, 64));
    void *pinned, *device;
    float *sink;
    CHECK(cudaHostAlloc(&pinned, 4096, cudaHostAllocPortable));
    CHECK(cudaMalloc(&device, 4096));
    CHECK(cudaMalloc(&sink, 4096));
    // Warm every kernel before any wait (lazy loading behind an unpassed wait can hang).
    spin_wait<<<1, 1, 0, w>>>((const unsigned long long *)dev_word, 0);
    running<<<1, 32, 0, w>>>((volatile unsigned long long *)flag_dev, 0);
    tiny<<<1, 32, 0, w>>>();
    load<<<1, 256, 0, w>>>(sink, 1);
    CHECK(cudaStreamSynchronize(w));

    // The load: blocks of 256 threads, 8 per SM (full occupancy), 16 waves a launch; sized
    // so that one block lasts about 50 us.
    const unsigned grid = (unsigned)sms * 8 * 16;
    unsigned iters = 64;
    for (;;) {
        CHECK(cudaEventRecord(e0, l));
        load<<<grid, 256, 0, l>>>(sink, iters);
        CHECK(cudaEventRecord(e1, l));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (ms > 0.8f || iters > (1u << 24)) {
            std::printf("load: %u blocks of 256 threads, %u iterations, %.2f ms a launch alone (%.1f us a wave)\n",
                        grid, iters, ms, 1000 * ms / 16);
            break;
        }
        iters *= 2;
    }
    std::atomic<bool> loading{false}, quit{false};
    std::thread loader([&] {
        CHECK(cudaSetDevice(0));
        cudaEvent_t launched[3];
        for (auto &e : launched) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        unsigned long n = 0;
        while (!quit.load()) {
            if (!loading.load()) {
                CHECK(cudaStreamSynchronize(l));
                std::this_thread::sleep_for(std::chrono::microseconds(200));
                continue;
            }
            // Three launches in flight: wait for the one three back before the next.
            cudaEvent_t e = launched[n++ % 3];
            if (n > 3) {
                while (cudaEventQuery(e) == cudaErrorNotReady && !quit.load()) {
                    std::this_thread::sleep_for(std::chrono::microseconds(50));
                }
            }
            load<<<grid, 256, 0, l>>>(sink, iters);
            CHECK(cudaGetLastError());
            CHECK(cudaEventRecord(e, l));
        }
        CHECK(cudaStreamSynchronize(l));
    });

    const int rounds = 300;
    const double blocked_us[] = {0, 100, 1000};
    unsigned long long value = 0;
    std::printf("\n| load | wait | word | blocked us | enqueue -> dependent kernel running p50 | p90 | enqueue -> its event seen p50 | p90 |\n|---|---|---|---|---|---|---|---|\n");
    for (int loaded = 0; loaded < 2; loaded++) {
        loading.store(loaded == 1);
        if (loaded) std::this_thread::sleep_for(std::chrono::milliseconds(20));
        for (int spin = 0; spin < 2; spin++) {
            for (int on_device = 0; on_device < 2; on_device++) {
                CUdeviceptr word = on_device ? dev_word : host_dev;
                for (double blocked : blocked_us) {
                    Stats run, seen;
                    for (int i = 0; i < rounds + 20; i++) {
                        value++;
                        enqueue_wait(spin, w, word, value);
                        running<<<1, 32, 0, w>>>((volatile unsigned long long *)flag_dev, value);
                        CHECK(cudaEventRecord(passed, w));
                        double tb = now_us();
                        while (now_us() - tb < blocked) {
                        }
                        double t0 = now_us();
                        CHECK(cudaMemcpyAsync(device, pinned, 4096, cudaMemcpyHostToDevice, c));
                        CU(cuStreamWriteValue64((CUstream)c, word, value, CU_STREAM_WRITE_VALUE_DEFAULT));
                        double t_run = -1, t_seen = -1;
                        while (t_seen < 0) {
                            double t = now_us() - t0;
                            if (t > 2e6) {
                                std::fprintf(stderr, "timeout: load %d spin %d device %d blocked %.0f\n", loaded, spin,
                                             on_device, blocked);
                                return 1;
                            }
                            if (t_run < 0 && __atomic_load_n(flag, __ATOMIC_ACQUIRE) >= value) t_run = t;
                            if (t_run >= 0) {
                                cudaError_t r = cudaEventQuery(passed);
                                if (r == cudaSuccess) t_seen = now_us() - t0;
                                else if (r != cudaErrorNotReady) CHECK(r);
                            }
                        }
                        CHECK(cudaStreamSynchronize(c));
                        if (i >= 20) {
                            run.add(t_run);
                            seen.add(t_seen);
                        }
                    }
                    std::printf("| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f |\n", loaded ? "FMA" : "idle",
                                spin ? "spin kernel" : "cuStreamWaitValue64", on_device ? "device" : "host", blocked,
                                run.q(0.5), run.q(0.9), seen.q(0.5), seen.q(0.9));
                    std::fflush(stdout);
                }
            }
        }
    }

    // Passed waits: 64 (tiny kernel, wait on a word already written) pairs; us per pair.
    std::printf("\n| load | wait | word | us per (kernel, passed wait) pair p50 | against the kernel alone p50 |\n|---|---|---|---|---|\n");
    CU(cuMemsetD8(dev_word, 0, 8));
    *host_word = 0;
    for (int loaded = 0; loaded < 2; loaded++) {
        loading.store(loaded == 1);
        if (loaded) std::this_thread::sleep_for(std::chrono::milliseconds(20));
        for (int mode = 0; mode < 4; mode++) {
            bool spin = mode >= 2, on_device = mode & 1;
            CUdeviceptr word = on_device ? dev_word : host_dev;
            Stats with, without;
            for (int r = 0; r < 40; r++) {
                for (int k = 0; k < 2; k++) {
                    CHECK(cudaEventRecord(e0, w));
                    for (int j = 0; j < 64; j++) {
                        tiny<<<1, 32, 0, w>>>();
                        if (k == 0) enqueue_wait(spin, w, word, 0);
                    }
                    CHECK(cudaEventRecord(e1, w));
                    CHECK(cudaEventSynchronize(e1));
                    float ms = 0;
                    CHECK(cudaEventElapsedTime(&ms, e0, e1));
                    (k == 0 ? with : without).add(1000.0 * ms / 64);
                }
            }
            std::printf("| %s | %s | %s | %.2f | %.2f |\n", loaded ? "FMA" : "idle",
                        spin ? "spin kernel" : "cuStreamWaitValue64", on_device ? "device" : "host", with.q(0.5),
                        without.q(0.5));
            std::fflush(stdout);
        }
    }
    quit.store(true);
    loader.join();
    CHECK(cudaDeviceSynchronize());
    return 0;
}
