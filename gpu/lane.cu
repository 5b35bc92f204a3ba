// Latency experiment (not used by ferry yet): how close a persistent copy kernel gets to one
// PCIe round trip for one 4 KiB copy, with no launch per copy. Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 -o /tmp/lane gpu/lane.cu && /tmp/lane
// It prints: the round trip of one GPU load from pinned host memory; then, per variant, p50/p99
// from the host writing a slot to the host seeing the done flag, H2D and D2H, bytes checked.
//   v1: the probe.cu lane: poll `seq` with acquire, then read the fields (two round trips),
//       nanosleep between polls;
//   v2: the slot is read in one go (two 16-byte loads issued together): each 8-byte word carries
//       a tag of the sequence number, so a torn read is detected and retried; no sleep;
//   v3: v2 with four warps polling the same slot, staggered, so one poll is always in flight.
#include "copy_kernel.cu"

#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

typedef unsigned long long u64;
static const u64 ADDR = (1ull << 48) - 1;

struct __align__(32) Slot {
    u64 w0;  // src | tag << 48
    u64 w1;  // dst | tag << 48
    u64 w2;  // len | seq << 32
    u64 seq; // v1 only: written last
};

__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void ld_slot(const Slot* s, u64& a, u64& b, u64& c) {
    u64 d;
    asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%4];\n\tld.volatile.global.v2.u64 {%2, %3}, [%4+16];"
                 : "=l"(a), "=l"(b), "=l"(c), "=l"(d) : "l"(s) : "memory");
    (void)d;  // the fourth word is v1's seq, unused here
}
__device__ __forceinline__ bool complete(u64 a, u64 b, u64 c, u64 i) {
    const u64 tag = (i + 1) & 0xffff;
    return (a >> 48) == tag && (b >> 48) == tag && (c >> 32) == ((i + 1) & 0xffffffff);
}

__global__ void rtt(const u64* host, u64* out, int n) {
    u64 sum = 0, t0 = clock64();
    for (int k = 0; k < n; k++) sum += *(volatile const u64*)&host[(k * 64) & 1023];
    out[0] = (clock64() - t0) / n;
    out[1] = sum;
}

// variant 1, 2: one warp; variant 3: `warps` warps share each slot, the first to see it copies.
__global__ void lane(int variant, const Slot* slots, u64* done, u64 mask, const u64* stop) {
    __shared__ u64 next;          // next slot to copy
    __shared__ int claimed;       // slot index claimed by a warp (as next + 1)
    const unsigned ln = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) { next = 0; claimed = 0; }
    __syncthreads();
    if (variant == 3) __nanosleep(300 * warp);  // stagger the pollers
    unsigned polls = 0;
    for (;;) {
        u64 i = *(volatile u64*)&next;
        const Slot* s = &slots[i & mask];
        u64 a = 0, b = 0, c = 0;
        int st = 0;  // 0 wait, 1 ready, 2 stop
        if (ln == 0) {
            if (variant == 1) {
                if (ld_acquire_sys(&s->seq) == i + 1) {
                    a = *(volatile const u64*)&s->w0;
                    b = *(volatile const u64*)&s->w1;
                    c = *(volatile const u64*)&s->w2;
                    st = 1;
                }
            } else {
                ld_slot(s, a, b, c);
                if (complete(a, b, c, i)) st = 1;
            }
            // (the stop flag is another round trip: read it on one poll in 256)
            if (st == 0 && (++polls & 255) == 0 && *(volatile const u64*)stop) st = 2;
            if (st == 1 && variant == 3 && atomicCAS(&claimed, (int)i, (int)i + 1) != (int)i) st = 0;
        }
        st = __shfl_sync(0xffffffffu, st, 0);
        if (st == 2) return;
        if (st == 0) {
            if (variant == 1) __nanosleep(200);
            continue;
        }
        a = __shfl_sync(0xffffffffu, a, 0) & ADDR;
        b = __shfl_sync(0xffffffffu, b, 0) & ADDR;
        c = __shfl_sync(0xffffffffu, c, 0) & 0xffffffffull;
        ferry_copy_task(a, b, c, ln);
        __threadfence_system();
        __syncwarp();
        if (ln == 0) {
            st_release_sys(&done[i & mask], i + 1);
            *(volatile u64*)&next = i + 1;
        }
        __syncwarp();
    }
}

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
    const u64 C = 1024;
    char *host, *host_dev, *dev;
    CK(cudaHostAlloc((void**)&host, 128 << 20, cudaHostAllocMapped));
    CK(cudaHostGetDevicePointer((void**)&host_dev, host, 0));
    CK(cudaMalloc((void**)&dev, 64 << 20));
    for (size_t k = 0; k < (64u << 20); k++) host[k] = (char)(k * 131 + 7);
    CK(cudaMemset(dev, 0, 64 << 20));
    {
        u64 *out;
        CK(cudaMalloc((void**)&out, 16));
        rtt<<<1, 1>>>((const u64*)host_dev, out, 2000);
        CK(cudaDeviceSynchronize());
        u64 cycles;
        CK(cudaMemcpy(&cycles, out, 8, cudaMemcpyDeviceToHost));
        int khz;
        CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
        printf("one GPU load from pinned host memory: %llu cycles = %.2f us (SM clock %d MHz)\n", cycles,
               cycles / (khz / 1000.0), khz / 1000);
    }
    for (int variant = 1; variant <= 3; variant++) {
        Slot* slots;
        u64 *done, *stop;
        CK(cudaHostAlloc((void**)&slots, C * sizeof(Slot), cudaHostAllocMapped));
        CK(cudaHostAlloc((void**)&done, C * 8, cudaHostAllocMapped));
        CK(cudaHostAlloc((void**)&stop, 8, cudaHostAllocMapped));
        memset(slots, 0, C * sizeof(Slot));
        memset(done, 0, C * 8);
        *stop = 0;
        Slot *slots_dev;
        u64 *done_dev, *stop_dev;
        CK(cudaHostGetDevicePointer((void**)&slots_dev, slots, 0));
        CK(cudaHostGetDevicePointer((void**)&done_dev, done, 0));
        CK(cudaHostGetDevicePointer((void**)&stop_dev, stop, 0));
        cudaStream_t st;
        CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        lane<<<1, variant == 3 ? 128 : 32, 0, st>>>(variant, slots_dev, done_dev, C - 1, stop_dev);
        CK(cudaGetLastError());
        u64 i = 0;
        for (int dir = 0; dir < 2; dir++) {
            std::vector<double> t;
            for (int r = 0; r < 5000; r++, i++) {
                Slot* sl = &slots[i & (C - 1)];
                size_t off = (size_t)(r % 1024) * 4096;
                u64 src = dir == 0 ? (u64)(host_dev + off) : (u64)(dev + off);
                u64 dst = dir == 0 ? (u64)(dev + off) : (u64)(host_dev + (64 << 20) + off);
                const u64 tag = ((i + 1) & 0xffff) << 48;
                double t0 = now_us();
                if (variant == 1) {
                    sl->w0 = src; sl->w1 = dst; sl->w2 = 4096;
                    __atomic_store_n(&sl->seq, i + 1, __ATOMIC_RELEASE);
                } else {
                    __atomic_store_n(&sl->w0, src | tag, __ATOMIC_RELAXED);
                    __atomic_store_n(&sl->w1, dst | tag, __ATOMIC_RELAXED);
                    __atomic_store_n(&sl->w2, 4096 | ((i + 1) << 32), __ATOMIC_RELEASE);
                }
                bool ok = true;
                while (__atomic_load_n(&done[i & (C - 1)], __ATOMIC_ACQUIRE) != i + 1) {
                    if (now_us() - t0 > 1e6) { ok = false; break; }
                }
                if (!ok) { printf("v%d: slot %llu never completed\n", variant, i); return 1; }
                if (r >= 500) t.push_back(now_us() - t0);
            }
            std::sort(t.begin(), t.end());
            printf("v%d lane 4 KiB %s: p50 %.2f us, p99 %.2f us\n", variant, dir == 0 ? "H2D" : "D2H", t[t.size() / 2],
                   t[t.size() * 99 / 100]);
        }
        __atomic_store_n(stop, 1ull, __ATOMIC_RELEASE);
        CK(cudaStreamSynchronize(st));
        // D2H bytes of the last 1024 copies: device block k at host + 64 MiB + k * 4096
        std::vector<char> d(4096);
        CK(cudaMemcpy(d.data(), dev + 7 * 4096, 4096, cudaMemcpyDeviceToHost));
        bool h2d_ok = memcmp(d.data(), host + 7 * 4096, 4096) == 0;
        bool d2h_ok = memcmp(host + (64 << 20) + 7 * 4096, d.data(), 4096) == 0;
        printf("v%d bytes: H2D %s, D2H %s\n", variant, h2d_ok ? "ok" : "MISMATCH", d2h_ok ? "ok" : "MISMATCH");
        CK(cudaStreamDestroy(st));
        CK(cudaFreeHost(slots));
        CK(cudaFreeHost(done));
        CK(cudaFreeHost(stop));
    }
    printf("lane experiment done\n");
    return 0;
}
