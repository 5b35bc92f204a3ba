// ferry's compute load for `ferry bench --load compute`: an FMA-bound kernel that keeps every
// SM busy the way a forward pass does, with no memory traffic of its own (each thread runs eight
// independent FMA chains in registers and stores one word at the end, only if a value no input
// can produce appears, so the compiler cannot drop the work). The bench launches it back to back
// on its own stream, each launch sized to last about a millisecond, and times every launch with
// events: the launches' mean duration with copies running, against their mean duration alone, is
// the share of the load's throughput the copies took.
//
// The PTX beside this file is what the bench loads (cuModuleLoadData), so building ferry never
// needs nvcc. Regenerate it on a machine with the CUDA toolkit:
//   nvcc -ptx -arch=compute_80 -O3 -o gpu/load_kernel.ptx gpu/load_kernel.cu

extern "C" __global__ void ferry_load(float* sink, unsigned int iters) {
    const float b = 0.999999f;
    const float c = 1e-6f;
    float a0 = threadIdx.x * 1e-7f, a1 = a0 + 1e-7f, a2 = a0 + 2e-7f, a3 = a0 + 3e-7f;
    float a4 = a0 + 4e-7f, a5 = a0 + 5e-7f, a6 = a0 + 6e-7f, a7 = a0 + 7e-7f;
    for (unsigned int i = 0; i < iters; i++) {
#pragma unroll
        for (int k = 0; k < 16; k++) {
            a0 = fmaf(a0, b, c);
            a1 = fmaf(a1, b, c);
            a2 = fmaf(a2, b, c);
            a3 = fmaf(a3, b, c);
            a4 = fmaf(a4, b, c);
            a5 = fmaf(a5, b, c);
            a6 = fmaf(a6, b, c);
            a7 = fmaf(a7, b, c);
        }
    }
    const float s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    // Never true (every chain stays in [0, 1]); the store keeps the chains alive.
    if (s < -1.0f) sink[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
