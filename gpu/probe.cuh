// What the CUDA probes share: error checks for the runtime (CHECK) and the driver (CU) that
// print the failing call and exit, and a microsecond clock.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>
#include <algorithm>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
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

// Samples in microseconds; q(f) is the value at fraction f of them once sorted (-1 if none).
struct Stats {
    std::vector<double> v;
    void add(double x) { v.push_back(x); }
    double q(double f) {
        std::sort(v.begin(), v.end());
        return v.empty() ? -1 : v[(size_t)((v.size() - 1) * f)];
    }
};

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

// The median of `runs` timings (ms, by events e0 / e1 on `stream`) of what `enqueue` puts on
// `stream`.
template <typename F>
static inline double probe_time_ms(cudaStream_t stream, cudaEvent_t e0, cudaEvent_t e1, int runs, F enqueue) {
    std::vector<float> ms(runs);
    for (int r = 0; r < runs; r++) {
        CHECK(cudaEventRecord(e0, stream));
        enqueue();
        CHECK(cudaEventRecord(e1, stream));
        CHECK(cudaEventSynchronize(e1));
        CHECK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    std::sort(ms.begin(), ms.end());
    return double(ms[runs / 2]);
}

// The writer gate of ferry's resident kernel (gpu/resident_kernel.cu: ferry_writer_enter and
// _leave, which live in the kernel's own source), for the probes shaped like it: lane 0 takes
// one of `writers` turns (spinning), then the warp goes on.
__device__ __forceinline__ void probe_writer_enter(unsigned *count, unsigned writers, unsigned lane) {
    if (lane == 0) {
        volatile unsigned *v = count;
        while (true) {
            if (*v < writers) {
                if (atomicAdd(count, 1u) < writers) break;
                atomicSub(count, 1u);
            }
            __nanosleep(128);
        }
    }
    __syncwarp();
}

// Gives the warp's turn back once every lane's stores are issued.
__device__ __forceinline__ void probe_writer_leave(unsigned *count, unsigned lane) {
    __syncwarp();
    if (lane == 0) atomicSub(count, 1u);
}

// What the copy-engine probes start from: a pinned host pool and a device pool of `pool` bytes
// each (filled with 1 and 2), the resident load's stop word and sink, and how many blocks of 256
// threads of `load_until` fit on the GPU at once.
struct ProbeSetup {
    cudaDeviceProp prop;
    char *host, *dev;
    unsigned *stop;
    float *sink;
    int load_blocks;
};

static inline ProbeSetup probe_setup(size_t pool) {
    ProbeSetup p;
    CU(cuInit(0));
    CHECK(cudaSetDevice(0));
    CHECK(cudaGetDeviceProperties(&p.prop, 0));
    CHECK(cudaHostAlloc(&p.host, pool, cudaHostAllocDefault));
    CHECK(cudaMalloc(&p.dev, pool));
    std::memset(p.host, 1, pool);
    CHECK(cudaMemset(p.dev, 2, pool));
    CHECK(cudaMalloc(&p.stop, 4));
    CHECK(cudaMalloc(&p.sink, 4096));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, load_until, 256, 0));
    p.load_blocks = per_sm * p.prop.multiProcessorCount;
    return p;
}

// `span` bytes as blocks of `block` bytes at random slots of the two pools (`pool` bytes each):
// per direction (0 host to GPU, 1 GPU to host) the destination and source of every copy.
struct ProbePlan {
    std::vector<CUdeviceptr> dst[2], src[2];
    std::vector<size_t> size;
};

static inline ProbePlan probe_plan(char *host, char *dev, size_t pool, size_t span, size_t block, std::mt19937_64 &rng) {
    const size_t n = span / block, slots = pool / block;
    std::vector<size_t> hs(slots), ds(slots);
    std::iota(hs.begin(), hs.end(), 0);
    std::iota(ds.begin(), ds.end(), 0);
    std::shuffle(hs.begin(), hs.end(), rng);
    std::shuffle(ds.begin(), ds.end(), rng);
    ProbePlan p;
    p.size.assign(n, block);
    for (int d = 0; d < 2; d++) p.dst[d].resize(n), p.src[d].resize(n);
    for (size_t i = 0; i < n; i++) {
        CUdeviceptr h = (CUdeviceptr)(host + hs[i] * block), g = (CUdeviceptr)(dev + ds[i] * block);
        p.dst[0][i] = g, p.src[0][i] = h;
        p.dst[1][i] = h, p.src[1][i] = g;
    }
    return p;
}

// A pinned host pool of `size` bytes filled with 1, as `mode` says: `hostalloc` keeps the
// cudaHostAlloc pool `hostalloc` (probe_setup's); the others map memory here, register it with
// cuMemHostRegister as ferry registers host memory, and free `hostalloc`: `memfd` (4 KiB pages,
// as ferry's own host buffers), `thp` (anonymous memory, transparent huge pages asked for),
// `hugetlb` (a memfd of the default huge pages; needs /proc/sys/vm/nr_hugepages).
static inline char *probe_host_pool(const std::string &mode, size_t size, char *hostalloc) {
    if (mode == "hostalloc") return hostalloc;
    void *at = MAP_FAILED;
    if (mode == "memfd" || mode == "hugetlb") {
        const int fd = memfd_create("probe", MFD_CLOEXEC | (mode == "hugetlb" ? MFD_HUGETLB : 0));
        if (fd < 0 || ftruncate(fd, size) != 0) {
            std::perror("memfd");
            std::exit(2);
        }
        at = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    } else if (mode == "thp") {
        at = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (at != MAP_FAILED && madvise(at, size, MADV_HUGEPAGE) != 0) std::perror("madvise");
    } else {
        std::fprintf(stderr, "unknown host pool %s\n", mode.c_str());
        std::exit(2);
    }
    if (at == MAP_FAILED) {
        std::perror("mmap");
        std::exit(2);
    }
    std::memset(at, 1, size);
    CU(cuMemHostRegister(at, size, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP));
    CHECK(cudaFreeHost(hostalloc));
    return (char *)at;
}
