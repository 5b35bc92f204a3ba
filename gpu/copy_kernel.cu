// ferry's SM copy kernel: copies a list of (src, dst, len) tasks, one warp per task, 16-byte
// vector accesses with eight loads in flight per lane. Pointers may be device memory or pinned,
// device-mapped host memory (unified addressing), so one kernel serves H2D, D2H and D2D.
// Unaligned tasks are correct: a task whose source and destination share their alignment
// modulo 16 gets a byte head, a vector body and a byte tail; any other task is copied bytewise.
//
// The PTX beside this file is what ferry loads (cuModuleLoadData), so building ferry never needs
// nvcc. Regenerate it on a machine with the CUDA toolkit:
//   nvcc -ptx -arch=compute_80 -O3 -o gpu/copy_kernel.ptx gpu/copy_kernel.cu

struct FerryCopy {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

#include "copy_task.cuh"

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
