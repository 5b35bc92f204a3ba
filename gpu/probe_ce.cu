// Probe (issue 11): how fast the copy engines move scattered small blocks when a batch is spread
// over several streams, and whether cuMemcpyBatchAsync's attributes change that, idle and while
// a resident FMA kernel holds every SM (a copy that needed an SM would wait for the load's end,
// which the probe sees as a cell that takes as long as the load).
//
// 256 MiB per cell as blocks of B bytes at random slots of a 512 MiB pinned host pool and a
// 512 MiB device pool; cuMemcpyBatchAsync calls of 4 MiB (at most 4096 copies), dealt round
// robin over K non-blocking streams (both ways: K streams per direction, the calls alternating);
// every call submitted at once, then every stream synchronized. Median of 3 per cell; the CPU's
// time inside the calls is reported per copy (what a worker thread would spend).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_ce gpu/probe_ce.cu -lcuda && /tmp/probe_ce
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>
#include "probe.cuh"

static const size_t SPAN = 256ull << 20, POOL = 512ull << 20, CALL_BYTES = 4ull << 20;

struct Variant {
    const char *name;
    CUmemcpySrcAccessOrder order;
    unsigned flags;
    bool hints;
};

static void batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, const Variant &v, int dir, CUstream st) {
    CUmemcpyAttributes a = probe_attrs(v.flags);
    a.srcAccessOrder = v.order;
    if (v.hints) {
        CUmemLocation host = {CU_MEM_LOCATION_TYPE_HOST, 0}, dev = {CU_MEM_LOCATION_TYPE_DEVICE, 0};
        a.srcLocHint = dir == 0 ? host : dev;
        a.dstLocHint = dir == 0 ? dev : host;
    }
    probe_batch(d, s, n, count, a, st);
}

int main() {
    const ProbeSetup setup = probe_setup(POOL);
    const cudaDeviceProp &prop = setup.prop;
    char *host = setup.host, *dev = setup.dev;
    unsigned *stop = setup.stop;
    float *sink = setup.sink;
    const int load_blocks = setup.load_blocks;
    int drv = 0;
    CHECK(cudaDriverGetVersion(&drv));
    std::printf("probe_ce: %s, %d SMs, asyncEngineCount %d, driver %d\n", prop.name, prop.multiProcessorCount,
                prop.asyncEngineCount, drv);
    std::vector<cudaStream_t> streams(16);
    for (auto &s : streams) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaStream_t load_stream, ctl;
    CHECK(cudaStreamCreateWithFlags(&load_stream, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&ctl, cudaStreamNonBlocking));

    auto sync_all = [&]() {
        for (auto &s : streams) CHECK(cudaStreamSynchronize(s));
    };
    // The ceiling: one 256 MiB copy (each way), and both at once on two streams.
    double ceil[3];
    for (int dir = 0; dir < 3; dir++) {
        std::vector<double> r;
        for (int rep = 0; rep < 5; rep++) {
            double t0 = now_us();
            if (dir != 1) CHECK(cudaMemcpyAsync(dev, host, dir == 2 ? SPAN / 2 : SPAN, cudaMemcpyHostToDevice, streams[0]));
            if (dir != 0)
                CHECK(cudaMemcpyAsync(host + SPAN, dev + SPAN, dir == 2 ? SPAN / 2 : SPAN, cudaMemcpyDeviceToHost, streams[1]));
            sync_all();
            r.push_back(SPAN / ((now_us() - t0) * 1e3));
        }
        std::sort(r.begin(), r.end());
        ceil[dir] = r[r.size() - 1];
    }
    std::printf("ceiling (best of 5, one 256 MiB copy; both: 128 MiB each way on two streams): H2D %.2f, D2H %.2f, both %.2f GB/s\n",
                ceil[0], ceil[1], ceil[2]);
    std::printf("load: load_until on every SM (%d blocks of 256 threads, all resident), ended by a stream write\n\n",
                load_blocks);

    const Variant variants[] = {
        {"stream", CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, 0, false},
        {"overlap", CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE, false},
        {"any+hints", CU_MEMCPY_SRC_ACCESS_ORDER_ANY, 0, true},
    };
    const char *dirs[] = {"H2D", "D2H", "both"};
    std::mt19937_64 rng(7);
    std::printf("%7s %4s %-10s %2s %9s %6s %9s %6s %7s\n", "block", "dir", "attrs", "K", "idle GB/s", "/ceil", "load GB/s",
                "/ceil", "cpu us");
    for (size_t block : {4096ul, 16384ul, 65536ul, 262144ul}) {
        const size_t n = SPAN / block;
        ProbePlan plan = probe_plan(host, dev, POOL, SPAN, block, rng);
        auto &dst = plan.dst, &src = plan.src;
        auto &size = plan.size;
        const size_t per_call = std::min<size_t>(CALL_BYTES / block, 4096);
        for (int dir = 0; dir < 3; dir++) {
            for (const Variant &v : variants) {
                for (int k : {1, 2, 4, 8}) {
                    double gbs[2], cpu = 0;
                    for (int loaded = 0; loaded < 2; loaded++) {
                        if (loaded && v.hints) {
                            gbs[1] = 0;
                            continue;
                        }
                        std::vector<double> r, c;
                        for (int rep = 0; rep < 3; rep++) {
                            if (loaded) {
                                CHECK(cudaMemsetAsync(stop, 0, 4, load_stream));
                                load_until<<<load_blocks, 256, 0, load_stream>>>(stop, sink);
                                CHECK(cudaGetLastError());
                                std::this_thread::sleep_for(std::chrono::milliseconds(3));
                            }
                            double in_calls = 0, t0 = now_us();
                            size_t call = 0;
                            for (size_t i = 0; i < n; i += per_call, call++) {
                                const size_t count = std::min(per_call, n - i);
                                // both: calls alternate H2D / D2H, each direction over its own K streams.
                                const int d = dir == 2 ? int(call & 1) : dir;
                                const size_t lane = dir == 2 ? (call / 2) % k + k * d : call % k;
                                const double c0 = now_us();
                                batch(&dst[d][i], &src[d][i], &size[i], count, v, d, (CUstream)streams[lane]);
                                in_calls += now_us() - c0;
                            }
                            // Under the load, a copy that needs an SM would wait for the load's end:
                            // give up after 2 s (the cell prints -1), end the load, then wait.
                            bool late = false;
                            for (auto &s : streams) {
                                while (!late) {
                                    cudaError_t q = cudaStreamQuery(s);
                                    if (q == cudaSuccess) break;
                                    if (q != cudaErrorNotReady) CHECK(q);
                                    late = now_us() - t0 > 2e6;
                                }
                            }
                            const double t = late ? -1 : now_us() - t0;
                            if (loaded) {
                                CU(cuStreamWriteValue32((CUstream)ctl, (CUdeviceptr)stop, 1, 0));
                                CHECK(cudaStreamSynchronize(load_stream));
                            }
                            if (late) sync_all();
                            r.push_back(late ? -1 : SPAN / (t * 1e3));
                            c.push_back(in_calls / n);
                        }
                        std::sort(r.begin(), r.end());
                        std::sort(c.begin(), c.end());
                        gbs[loaded] = r[1];
                        if (!loaded) cpu = c[1];
                    }
                    std::printf("%5zu K %4s %-10s %2d %9.2f %6.2f %9.2f %6.2f %7.3f\n", block >> 10, dirs[dir], v.name, k,
                                gbs[0], gbs[0] / ceil[dir], gbs[1], gbs[1] / ceil[dir], cpu);
                }
            }
        }
    }
    return 0;
}
