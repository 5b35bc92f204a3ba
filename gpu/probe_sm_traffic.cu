// What an SM copy costs a GEMM, by kind of traffic: why ferry's copy kernels going to the host
// take two to three times what they take going to the GPU from a compute load, and many times
// that from cuBLAS GEMMs (bench/results/h200.md, sixth session).
//
// A copy loop stays on `SMS` SMs (one 1024-thread block each, most of the shared memory asked
// for so that nothing else lands there) while cuBLAS bf16 GEMMs of 8192^3 run back to back on
// another stream; each warp moves 4 KiB pieces of a 256 MiB pool at random offsets, as ferry's
// kernels do. The traffic kinds, one at a time: host to device (ferry's H2D), device to host
// (D2H), device to device (the same reads and writes, no PCIe), device reads only, host reads
// only, host writes only (a constant: no device read); then device to host and host writes by
// other stores: streaming (st.cs), write-through (st.wt), and the TMA (cp.async.bulk from shared
// memory, one 4 KiB bulk copy per warp); last, device to host, host writes and host to device
// with fewer warps of each block moving data. The GEMMs' loss: 1 - their time alone /
// their time beside the loop; the loop's GB/s beside it. A row without the loop repeats the
// GEMMs alone, for the run's noise.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_sm_traffic gpu/probe_sm_traffic.cu -lcuda -lcublas && /tmp/probe_sm_traffic

#include "probe.cuh"
#include <cublas_v2.h>
#include <cuda_bf16.h>

constexpr size_t POOL = 256ull << 20;
constexpr int PIECE = 4096;
constexpr int SMS = 4;
constexpr int GEMMS = 40;
constexpr int N = 8192;

enum Kind { H2D, D2H, D2D, DEV_READ, HOST_READ, HOST_WRITE, D2H_CS, D2H_WT, D2H_BULK, HOST_WRITE_BULK, KINDS };
static const char *NAMES[KINDS] = {"host -> device", "device -> host", "device -> device", "device reads only",
                                   "host reads only", "host writes only", "d -> h, st.cs", "d -> h, st.wt",
                                   "d -> h, TMA bulk", "host writes, TMA bulk"};

// One warp's 4 KiB from shared memory to `dst` by the TMA (cp.async.bulk), waited for before the
// shared memory is written again.
__device__ __forceinline__ void bulk_store(void *dst, const void *smem, unsigned bytes, unsigned lane) {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    if (lane == 0) {
        const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(s), "r"(bytes)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    }
    __syncwarp();
}

__global__ void __launch_bounds__(1024, 1)
    traffic(int kind, int warps, const char *host_src, char *host_dst, const char *dev_src, char *dev_dst,
            const volatile unsigned *stop, unsigned *started, unsigned long long *moved, unsigned *sink) {
    extern __shared__ uint4 smem[];
    if ((int)(threadIdx.x >> 5) >= warps) return;  // only `warps` warps of each block move data
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = blockIdx.x * 32 + (threadIdx.x >> 5);
    uint4 *mine = smem + (threadIdx.x >> 5) * (PIECE / 16);  // this warp's 4 KiB
    if (threadIdx.x == 0) atomicAdd(started, 1);  // warp 0 always moves
    unsigned long long x = 0x9E3779B97F4A7C15ull * (warp + 1), pieces = 0;
    uint4 acc = make_uint4(0, 0, 0, 0);
    const size_t slots = POOL / PIECE;
    while (*stop == 0) {
        for (int rep = 0; rep < 16; rep++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            const size_t off = (x % slots) * PIECE;
            const char *src = (kind == H2D || kind == HOST_READ) ? host_src : dev_src;
            const bool to_host = kind == D2H || kind == HOST_WRITE || kind >= D2H_CS;
            char *dst = to_host ? host_dst : dev_dst;
            const uint4 *s = (const uint4 *)(src + off);
            uint4 *d = (uint4 *)(dst + off);
            uint4 v[8];
            if (kind != HOST_WRITE && kind != HOST_WRITE_BULK) {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = s[lane + 32 * k];
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = make_uint4(k, lane, warp, 7);
            }
            if (kind == DEV_READ || kind == HOST_READ) {
#pragma unroll
                for (int k = 0; k < 8; k++) acc.x ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
            } else if (kind == D2H_CS) {
#pragma unroll
                for (int k = 0; k < 8; k++) __stcs(d + lane + 32 * k, v[k]);
            } else if (kind == D2H_WT) {
#pragma unroll
                for (int k = 0; k < 8; k++) __stwt(d + lane + 32 * k, v[k]);
            } else if (kind == D2H_BULK || kind == HOST_WRITE_BULK) {
#pragma unroll
                for (int k = 0; k < 8; k++) mine[lane + 32 * k] = v[k];
                bulk_store(d, mine, PIECE, lane);
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) d[lane + 32 * k] = v[k];
            }
            pieces++;
        }
    }
    if (lane == 0) atomicAdd(moved, pieces * PIECE);
    if (acc.x == 0x12345678u) sink[0] = acc.x;
}

int main() {
    ProbeSetup p = probe_setup(POOL);
    char *host_dst, *dev_dst;
    CHECK(cudaHostAlloc(&host_dst, POOL, cudaHostAllocDefault));
    CHECK(cudaMalloc(&dev_dst, POOL));
    unsigned *stop, *started;
    CHECK(cudaHostAlloc(&stop, 4, cudaHostAllocMapped));
    CHECK(cudaHostAlloc(&started, 4, cudaHostAllocMapped));
    unsigned long long *moved;
    CHECK(cudaMalloc(&moved, 8));
    int shared = 0;
    CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    CHECK(cudaFuncSetAttribute(traffic, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));

    cudaStream_t gemm_stream, copy_stream;
    CHECK(cudaStreamCreateWithFlags(&gemm_stream, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking));
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(blas, gemm_stream) != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublas setup failed\n");
        return 1;
    }
    __nv_bfloat16 *a, *b, *c;
    CHECK(cudaMalloc(&a, size_t(N) * N * 2));
    CHECK(cudaMalloc(&b, size_t(N) * N * 2));
    CHECK(cudaMalloc(&c, size_t(N) * N * 2));
    CHECK(cudaMemset(a, 0, size_t(N) * N * 2));
    CHECK(cudaMemset(b, 0, size_t(N) * N * 2));
    const float one = 1.0f, zero = 0.0f;
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    auto gemms_ms = [&]() {
        CHECK(cudaEventRecord(e0, gemm_stream));
        for (int i = 0; i < GEMMS; i++) {
            if (cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &one, a, CUDA_R_16BF, N, b, CUDA_R_16BF, N, &zero,
                             c, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
                std::fprintf(stderr, "gemm failed\n");
                std::exit(1);
            }
        }
        CHECK(cudaEventRecord(e1, gemm_stream));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        return double(ms);
    };
    gemms_ms();  // warm-up: cuBLAS picks and loads its kernel
    std::printf("cuBLAS bf16 %d^3 GEMMs, %d back to back per row; the traffic loop on %d SMs (%s, %d SMs)\n", N, GEMMS,
                SMS, p.prop.name, p.prop.multiProcessorCount);
    std::printf("%-30s %12s %12s %14s\n", "traffic", "GEMM ms", "GEMM loss", "loop GB/s");
    // One row: the GEMMs beside `kind` moved by `warps` warps on each of the SMS blocks.
    auto row = [&](int kind, int warps, double alone) {
        *stop = 0;
        *started = 0;
        CHECK(cudaMemset(moved, 0, 8));
        CHECK(cudaDeviceSynchronize());
        traffic<<<SMS, 1024, shared, copy_stream>>>(kind, warps, p.host, host_dst, p.dev, dev_dst, stop, started,
                                                    moved, (unsigned *)p.sink);
        CHECK(cudaGetLastError());
        while (*(volatile unsigned *)started < SMS) {
        }
        const double t0 = now_us();
        const double ms = gemms_ms();
        const double wall = (now_us() - t0) / 1e3;
        *(volatile unsigned *)stop = 1;
        CHECK(cudaStreamSynchronize(copy_stream));
        unsigned long long bytes = 0;
        CHECK(cudaMemcpy(&bytes, moved, 8, cudaMemcpyDeviceToHost));
        char name[64];
        std::snprintf(name, sizeof name, "%s, %d warps", NAMES[kind], warps);
        std::printf("%-30s %12.2f %11.1f%% %14.2f\n", name, ms, 100.0 * (1.0 - alone / ms), bytes / (wall * 1e6));
    };
    for (int round = 0; round < 2; round++) {
        double alone = gemms_ms();
        std::printf("%-30s %12.2f %11.1f%% %14s\n", "(none)", alone, 0.0, "-");
        for (int kind = 0; kind < KINDS; kind++) row(kind, 32, alone);
        // Fewer warps writing to the host at once: what the rate and the GEMMs' loss do.
        alone = gemms_ms();
        std::printf("%-30s %12.2f %11.1f%% %14s\n", "(none)", alone, 0.0, "-");
        for (int warps : {1, 2, 4, 8, 16}) row(D2H, warps, alone);
        for (int warps : {1, 4}) row(HOST_WRITE, warps, alone);
        for (int warps : {1, 4, 8}) row(H2D, warps, alone);
    }
    return 0;
}
