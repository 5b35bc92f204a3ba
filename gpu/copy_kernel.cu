// ferry's SM copy kernel: copies a list of (src, dst, len) tasks, one warp per task, 16-byte
// vector accesses with eight loads in flight per lane. Pointers may be device memory or pinned,
// device-mapped host memory (unified addressing), so one kernel serves H2D, D2H and D2D.
// Unaligned tasks are correct: a task whose source and destination share their alignment
// modulo 16 gets a byte head, a vector body and a byte tail; any other task is copied bytewise.
//
// The PTX beside this file is what ferry loads (cuModuleLoadData), so building ferry never needs
// nvcc. Regenerate it on a machine with the CUDA toolkit:
//   nvcc -ptx -arch=compute_80 -O3 -o gpu/copy_kernel.ptx gpu/copy_kernel.cu
#include <stdint.h>

struct FerryCopy {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

__device__ __forceinline__ void ferry_copy_bytes(const char* s, char* d, unsigned long long n, unsigned lane) {
    for (unsigned long long i = lane; i < n; i += 32) d[i] = s[i];
}

// Copies one task with the 32 lanes of the calling warp.
__device__ __forceinline__ void ferry_copy_task(unsigned long long src, unsigned long long dst, unsigned long long n,
                                                unsigned lane) {
    const char* s = (const char*)src;
    char* d = (char*)dst;
    if (((src ^ dst) & 15) != 0) {
        ferry_copy_bytes(s, d, n, lane);
        return;
    }
    unsigned long long head = (16 - (dst & 15)) & 15;
    if (head > n) head = n;
    ferry_copy_bytes(s, d, head, lane);
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
    ferry_copy_bytes(s + (n16 << 4), d + (n16 << 4), n & 15, lane);
}

// Launched per batch: warp w copies tasks w, w + warps, ...
extern "C" __global__ void ferry_copy(const FerryCopy* __restrict__ tasks, unsigned int count) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned warps = (gridDim.x * blockDim.x) >> 5;
    for (unsigned t = warp; t < count; t += warps) {
        const FerryCopy c = tasks[t];
        ferry_copy_task(c.src, c.dst, c.len, lane);
    }
}
