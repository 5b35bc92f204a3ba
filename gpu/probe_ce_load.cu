// Probe (issues 11 and 13): why the copy engine moves small blocks at half speed while the GPU
// computes. probe_ce.cu found no slowdown under one resident kernel holding every SM, while
// ferry's batch strategy halves under `ferry bench --load compute` (FMA kernels launched back to
// back) and under torch GEMMs. This probe times the same cuMemcpyBatchAsync calls (4 MiB each,
// the overlap hint, 256 MiB of scattered blocks) under four loads: none; one resident FMA kernel;
// FMA kernels launched back to back by another thread; cuBLAS bf16 8192^3 GEMMs launched back to
// back by another thread; with the copy stream at normal and at the highest priority; with every
// call submitted at once ("all") or at most two calls on the stream, the next submitted when the
// oldest completed ("paced", as ferry's worker does). It prints GB/s and the CPU's time per copy
// inside the calls (a lock held by the launching thread would show there). First, a call timed
// on a held stream separates the CPU's cost per copy from the copy engine's.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_ce_load gpu/probe_ce_load.cu -lcuda -lcublas && /tmp/probe_ce_load
#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include "probe.cuh"

static const size_t SPAN = 256ull << 20, POOL = 512ull << 20, CALL_BYTES = 4ull << 20;

__global__ void fma_burst(int iters, float *sink) {
    float a = threadIdx.x, b = 1.0001f, c = 0.9999f, d = blockIdx.x;
    for (int k = 0; k < iters; k++) {
        a = fmaf(a, b, c);
        d = fmaf(d, b, a);
    }
    if (a + d == 1234.5f) sink[threadIdx.x] = a;
}

static void batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, CUstream st) {
    probe_batch(d, s, n, count, probe_attrs(CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE), st);
}

int main() {
    const ProbeSetup setup = probe_setup(POOL);
    const cudaDeviceProp &prop = setup.prop;
    char *host = setup.host, *dev = setup.dev;
    unsigned *stop = setup.stop;
    float *sink = setup.sink;
    const int resident_blocks = setup.load_blocks, burst_blocks = resident_blocks * 16;
    int lo = 0, hi = 0;
    CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    cudaStream_t copy[2], load_stream, ctl;
    CHECK(cudaStreamCreateWithPriority(&copy[0], cudaStreamNonBlocking, lo));
    CHECK(cudaStreamCreateWithPriority(&copy[1], cudaStreamNonBlocking, hi));
    CHECK(cudaStreamCreateWithFlags(&load_stream, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&ctl, cudaStreamNonBlocking));
    const int N = 8192;
    __nv_bfloat16 *A, *B, *C;
    CHECK(cudaMalloc(&A, size_t(N) * N * 2));
    CHECK(cudaMalloc(&B, size_t(N) * N * 2));
    CHECK(cudaMalloc(&C, size_t(N) * N * 2));
    CHECK(cudaMemset(A, 0, size_t(N) * N * 2));
    CHECK(cudaMemset(B, 0, size_t(N) * N * 2));
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(blas, load_stream) != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublas setup failed\n");
        return 1;
    }
    const float one = 1, zero = 0;
    auto gemm = [&]() {
        if (cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &one, A, CUDA_R_16BF, N, B, CUDA_R_16BF, N, &zero, C,
                         CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
            std::fprintf(stderr, "cublasGemmEx failed\n");
            std::exit(1);
        }
    };
    const int burst_iters = 20000;
    auto burst = [&]() {
        fma_burst<<<burst_blocks, 256, 0, load_stream>>>(burst_iters, sink);
        CHECK(cudaGetLastError());
    };
    // Each load's launch time alone.
    for (int w = 0; w < 2; w++) {
        gemm();
        burst();
    }
    CHECK(cudaStreamSynchronize(load_stream));
    double t0 = now_us();
    for (int i = 0; i < 10; i++) gemm();
    CHECK(cudaStreamSynchronize(load_stream));
    const double gemm_ms = (now_us() - t0) / 10e3;
    t0 = now_us();
    for (int i = 0; i < 10; i++) burst();
    CHECK(cudaStreamSynchronize(load_stream));
    const double burst_ms = (now_us() - t0) / 10e3;
    std::printf("probe_ce_load: %s, %d SMs, driver stream priorities %d (normal) .. %d (highest)\n", prop.name,
                prop.multiProcessorCount, lo, hi);
    std::printf("loads: resident = load_until on every SM (%d blocks); launched = fma_burst, %d blocks, %.2f ms each, "
                "back to back from a thread; gemm = cublasGemmEx bf16 %d^3, %.2f ms each (%.0f TFLOP/s), back to back "
                "from a thread\n\n",
                resident_blocks, burst_blocks, burst_ms, N, gemm_ms, 2.0 * N * N * N / (gemm_ms * 1e9));

    // CPU or copy engine? One call of 1024 copies timed on the CPU while the stream is held by a
    // cuStreamWaitValue32 (nothing runs, so the call cannot wait for the GPU), then the stream
    // released and the copies' execution timed alone.
    {
        unsigned *gate;
        CHECK(cudaMalloc(&gate, 4));
        std::printf("one call of 1024 copies on a held stream: CPU us per copy inside the call; then the GPU's time "
                    "per copy once released (median of 5)\n");
        for (size_t block : {4096ul, 16384ul, 65536ul}) {
            for (int dir = 0; dir < 2; dir++) {
                const size_t n = 1024;
                std::vector<CUdeviceptr> d(n), s(n);
                std::vector<size_t> sz(n, block);
                for (size_t i = 0; i < n; i++) {
                    CUdeviceptr h = (CUdeviceptr)(host + ((i * 7919) % (POOL / block)) * block);
                    CUdeviceptr g = (CUdeviceptr)(dev + ((i * 104729) % (POOL / block)) * block);
                    d[i] = dir ? h : g, s[i] = dir ? g : h;
                }
                std::vector<double> cpu, gpu;
                for (int rep = 0; rep < 5; rep++) {
                    CHECK(cudaMemset(gate, 0, 4));
                    CU(cuStreamWaitValue32((CUstream)copy[0], (CUdeviceptr)gate, 1, CU_STREAM_WAIT_VALUE_GEQ));
                    double c0 = now_us();
                    batch(d.data(), s.data(), sz.data(), n, (CUstream)copy[0]);
                    cpu.push_back((now_us() - c0) / n);
                    std::this_thread::sleep_for(std::chrono::milliseconds(2));
                    double g0 = now_us();
                    CU(cuStreamWriteValue32((CUstream)ctl, (CUdeviceptr)gate, 1, 0));
                    CHECK(cudaStreamSynchronize(copy[0]));
                    gpu.push_back((now_us() - g0) / n);
                }
                std::sort(cpu.begin(), cpu.end());
                std::sort(gpu.begin(), gpu.end());
                std::printf("  %3zu KiB %s: CPU %.3f us per copy (%.1f GB/s), GPU %.3f us per copy (%.1f GB/s)\n",
                            block >> 10, dir ? "D2H" : "H2D", cpu[2], block / (cpu[2] * 1e3), gpu[2],
                            block / (gpu[2] * 1e3));
            }
        }
        std::printf("\n");
    }
    const char *loads[] = {"none", "resident", "launched", "gemm"};
    std::mt19937_64 rng(7);
    std::printf("%7s %4s %-9s %-8s %-6s %8s %7s\n", "block", "dir", "load", "priority", "submit", "GB/s", "cpu us");
    for (size_t block : {4096ul, 16384ul, 65536ul}) {
        const size_t n = SPAN / block;
        ProbePlan plan = probe_plan(host, dev, POOL, SPAN, block, rng);
        auto &dst = plan.dst, &src = plan.src;
        auto &size = plan.size;
        const size_t per_call = std::min<size_t>(CALL_BYTES / block, 4096);
        const size_t calls = (n + per_call - 1) / per_call;
        std::vector<cudaEvent_t> done(calls);
        for (auto &e : done) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        for (int dir = 0; dir < 2; dir++) {
            for (int load = 0; load < 4; load++) {
                // Start the load.
                std::atomic<bool> run{true};
                std::thread launcher;
                if (load == 1) {
                    CHECK(cudaMemsetAsync(stop, 0, 4, load_stream));
                    load_until<<<resident_blocks, 256, 0, load_stream>>>(stop, sink);
                    CHECK(cudaGetLastError());
                } else if (load >= 2) {
                    launcher = std::thread([&, load]() {
                        CHECK(cudaSetDevice(0));
                        while (run.load()) {
                            for (int i = 0; i < 3; i++) load == 2 ? burst() : gemm();
                            CHECK(cudaStreamSynchronize(load_stream));
                        }
                    });
                }
                if (load) std::this_thread::sleep_for(std::chrono::milliseconds(20));
                for (int pri = 0; pri < 2; pri++) {
                    for (int paced = 0; paced < 2; paced++) {
                        std::vector<double> r, c;
                        for (int rep = 0; rep < 3; rep++) {
                            double in_calls = 0, t0 = now_us();
                            for (size_t k = 0; k < calls; k++) {
                                if (paced && k >= 2) {
                                    cudaError_t q;
                                    while ((q = cudaEventQuery(done[k - 2])) == cudaErrorNotReady) {
                                    }
                                    CHECK(q);
                                }
                                const size_t i = k * per_call, count = std::min(per_call, n - i);
                                const double c0 = now_us();
                                batch(&dst[dir][i], &src[dir][i], &size[i], count, (CUstream)copy[pri]);
                                in_calls += now_us() - c0;
                                CHECK(cudaEventRecord(done[k], copy[pri]));
                            }
                            CHECK(cudaStreamSynchronize(copy[pri]));
                            r.push_back(SPAN / ((now_us() - t0) * 1e3));
                            c.push_back(in_calls / n);
                        }
                        std::sort(r.begin(), r.end());
                        std::sort(c.begin(), c.end());
                        std::printf("%5zu K %4s %-9s %-8s %-6s %8.2f %7.3f\n", block >> 10, dir ? "D2H" : "H2D", loads[load],
                                    pri ? "highest" : "normal", paced ? "paced" : "all", r[1], c[1]);
                    }
                }
                // End the load.
                if (load == 1) CU(cuStreamWriteValue32((CUstream)ctl, (CUdeviceptr)stop, 1, 0));
                run = false;
                if (launcher.joinable()) launcher.join();
                CHECK(cudaStreamSynchronize(load_stream));
            }
        }
        for (auto &e : done) CHECK(cudaEventDestroy(e));
    }
    return 0;
}
