// Probe: a paged KV block (64 chunks of 32 KiB at the plane stride) by one cudaMemcpy2DAsync
// against one cudaMemcpyAsync per chunk, on 1, 2 and 4 streams, both directions, idle; the
// ceiling is one contiguous copy of the same 2 GiB. Decides whether the CUDA transport's copy
// engine path should take a strided descriptor as one 2D copy.
//
//   nvcc -O3 -o /tmp/probe_2d gpu/probe_2d.cu && /tmp/probe_2d
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>
#include <cuda_runtime.h>
#include "probe.cuh"


static const size_t CHUNK = 32 << 10, CHUNKS = 64, GPU_BLOCKS = 4096, POOL = 1024;
static const size_t PLANE = GPU_BLOCKS * CHUNK, BLOCK = CHUNKS * CHUNK;

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
    char *kv, *pool;
    CHECK(cudaMalloc(&kv, CHUNKS * PLANE));
    CHECK(cudaHostAlloc(&pool, POOL * BLOCK, cudaHostAllocDefault));
    CHECK(cudaMemset(kv, 1, CHUNKS * PLANE));
    std::memset(pool, 2, POOL * BLOCK);
    cudaStream_t streams[4];
    for (auto &s : streams) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    std::mt19937_64 rng(3);
    std::vector<size_t> gpu_ids(GPU_BLOCKS), pool_ids(POOL);
    std::iota(gpu_ids.begin(), gpu_ids.end(), 0);
    std::iota(pool_ids.begin(), pool_ids.end(), 0);

    auto round = [&](bool d2h, bool two_d, int nstreams) {
        std::shuffle(gpu_ids.begin(), gpu_ids.end(), rng);
        std::shuffle(pool_ids.begin(), pool_ids.end(), rng);
        double t0 = now();
        for (size_t b = 0; b < POOL; b++) {
            char *g = kv + gpu_ids[b] * CHUNK, *h = pool + pool_ids[b] * BLOCK;
            cudaStream_t s = streams[b % nstreams];
            if (two_d) {
                if (d2h) CHECK(cudaMemcpy2DAsync(h, CHUNK, g, PLANE, CHUNK, CHUNKS, cudaMemcpyDeviceToHost, s));
                else CHECK(cudaMemcpy2DAsync(g, PLANE, h, CHUNK, CHUNK, CHUNKS, cudaMemcpyHostToDevice, s));
            } else {
                for (size_t c = 0; c < CHUNKS; c++) {
                    if (d2h) CHECK(cudaMemcpyAsync(h + c * CHUNK, g + c * PLANE, CHUNK, cudaMemcpyDeviceToHost, s));
                    else CHECK(cudaMemcpyAsync(g + c * PLANE, h + c * CHUNK, CHUNK, cudaMemcpyHostToDevice, s));
                }
            }
        }
        for (int i = 0; i < nstreams; i++) CHECK(cudaStreamSynchronize(streams[i]));
        return POOL * BLOCK / (now() - t0) / 1e9;
    };
    auto ceiling = [&](bool d2h) {
        double t0 = now();
        if (d2h) CHECK(cudaMemcpyAsync(pool, kv, POOL * BLOCK, cudaMemcpyDeviceToHost, streams[0]));
        else CHECK(cudaMemcpyAsync(kv, pool, POOL * BLOCK, cudaMemcpyHostToDevice, streams[0]));
        CHECK(cudaStreamSynchronize(streams[0]));
        return POOL * BLOCK / (now() - t0) / 1e9;
    };
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    std::printf("1024 random blocks of 64 x 32 KiB (plane stride %zu MiB) <-> a pinned pool, GB/s, median of 5\n",
                PLANE >> 20);
    std::printf("| dir | ceiling | 2D, 1 stream | 2D, 2 | 2D, 4 | per chunk, 1 stream | per chunk, 2 | per chunk, 4 |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");
    for (bool d2h : {false, true}) {
        std::vector<double> c;
        ceiling(d2h);
        for (int r = 0; r < 5; r++) c.push_back(ceiling(d2h));
        std::printf("| %s | %.1f", d2h ? "D2H" : "H2D", median(c));
        for (bool two_d : {true, false}) {
            for (int ns : {1, 2, 4}) {
                std::vector<double> v;
                round(d2h, two_d, ns);
                for (int r = 0; r < 5; r++) v.push_back(round(d2h, two_d, ns));
                std::printf(" | %.1f", median(v));
            }
        }
        std::printf(" |\n");
    }
    return 0;
}
