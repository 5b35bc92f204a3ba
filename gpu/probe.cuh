// What the CUDA probes share: error checks for the runtime (CHECK) and the driver (CU) that
// print the failing call and exit, and a microsecond clock.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda.h>
#include <cuda_runtime.h>

#define CHECK(x)                                                                                    \
    do {                                                                                            \
        cudaError_t probe_err_ = (x);                                                               \
        if (probe_err_ != cudaSuccess) {                                                            \
            std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(probe_err_));\
            std::exit(1);                                                                           \
        }                                                                                           \
    } while (0)
#define CU(x)                                                                                       \
    do {                                                                                            \
        CUresult probe_res_ = (x);                                                                  \
        if (probe_res_ != CUDA_SUCCESS) {                                                           \
            const char *probe_msg_ = nullptr;                                                       \
            cuGetErrorString(probe_res_, &probe_msg_);                                              \
            std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, probe_msg_ ? probe_msg_ : "?");\
            std::exit(1);                                                                           \
        }                                                                                           \
    } while (0)

static inline double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}


// Copy attributes in stream order with no location hints and the given flags.
static inline CUmemcpyAttributes probe_attrs(unsigned flags) {
    CUmemcpyAttributes a = {};
    a.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    a.flags = flags;
    a.srcLocHint.type = a.dstLocHint.type = CU_MEM_LOCATION_TYPE_INVALID;
    return a;
}

// cuMemcpyBatchAsync with one attribute set for every copy, in the 12.8 or the 13.0 signature.
static inline void probe_batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, CUmemcpyAttributes a, CUstream st) {
    size_t idx = 0;
#if CUDA_VERSION >= 13000
    CU(cuMemcpyBatchAsync(d, s, n, count, &a, &idx, 1, st));
#else
    size_t fail = 0;
    CU(cuMemcpyBatchAsync(d, s, n, count, &a, &idx, 1, &fail, st));
#endif
}

// A saturating load: FMAs until *stop (device memory, written by cuStreamWriteValue32 on another
// stream, so that ending it needs no SM).
__global__ void load_until(const volatile unsigned *stop, float *sink) {
    float a = threadIdx.x, b = 1.0001f, c = 0.9999f, d = blockIdx.x;
    __shared__ unsigned done;
    for (;;) {
        for (int k = 0; k < 8192; k++) {
            a = fmaf(a, b, c);
            d = fmaf(d, b, a);
        }
        if (threadIdx.x == 0) done = *stop;
        __syncthreads();
        if (done) break;
        __syncthreads();
    }
    if (a + d == 1234.5f) sink[threadIdx.x] = a;
}
