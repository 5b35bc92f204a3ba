// The copy loop shared by ferry's copy kernels (copy_kernel.cu, launched per batch, and
// resident_kernel.cu, resident on reserved SMs) and by persist_probe.cu: one warp copies one task,
// 16-byte vector accesses with eight loads in flight per lane. Pointers may be device memory or
// pinned, device-mapped host memory (unified addressing). Unaligned tasks are correct: a task
// whose source and destination share their alignment modulo 16 gets a byte head, a vector body
// and a byte tail; any other task is copied bytewise.
#pragma once

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

