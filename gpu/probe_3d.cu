// Probe (issues 11 and 13): does cuMemcpy3DBatchAsync (CUDA 12.8+) move a strided block (rows at
// fixed pitches) for one batch entry, where cuMemcpyBatchAsync takes one entry per row and
// cuMemcpy2DAsync one call per block? The copy engine's small-copy rate is a cost per entry
// (gpu/probe_ce.cu), so fewer entries would mean more GB/s.
//
// Layouts: a GPU KV tensor [rows, G blocks, width] (vLLM's K/V planes, or 64 chunks of a paged
// block) and a host pool [P blocks, rows, width] (a block's rows contiguous); 256 MiB of blocks
// at random GPU and pool slots, H2D and D2H. Each way, median of 3, checked byte for byte once.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_3d gpu/probe_3d.cu -lcuda && /tmp/probe_3d
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>
#include "probe.cuh"

static const size_t SPAN = 256ull << 20, CALL_BYTES = 4ull << 20;

static CUmemcpy3DOperand pointer(CUdeviceptr p, size_t pitch, size_t rows) {
    CUmemcpy3DOperand o;
    std::memset(&o, 0, sizeof o);
    o.type = CU_MEMCPY_OPERAND_TYPE_POINTER;
    o.op.ptr.ptr = p;
    o.op.ptr.rowLength = pitch;  // elements of one byte (pointer to pointer copies)
    o.op.ptr.layerHeight = rows;
    o.op.ptr.locHint.type = CU_MEM_LOCATION_TYPE_INVALID;
    return o;
}

static void batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, CUstream st) {
    probe_batch(d, s, n, count, probe_attrs(0), st);
}

static void batch3d(CUDA_MEMCPY3D_BATCH_OP *ops, size_t count, CUstream st) {
#if CUDA_VERSION >= 13000
    CU(cuMemcpy3DBatchAsync(count, ops, 0, st));
#else
    size_t fail = 0;
    CU(cuMemcpy3DBatchAsync(count, ops, &fail, 0, st));
#endif
}

int main() {
    CU(cuInit(0));
    CHECK(cudaSetDevice(0));
    cudaStream_t stream;
    CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::mt19937_64 rng(11);
    std::printf("probe_3d: GB/s of 256 MiB of strided blocks (rows x width, GPU rows G blocks apart), median of 3\n");
    std::printf("%5s %7s %4s %14s %14s %14s %s\n", "rows", "width", "dir", "batch/row", "3D batch/blk", "2D per blk",
                "cpu us per block (batch, 3D, 2D)");
    struct Shape {
        size_t rows, width;
    };
    for (Shape sh : {Shape{1, 4096}, Shape{1, 16384}, Shape{2, 16384}, Shape{2, 32768}, Shape{64, 4096}, Shape{64, 32768}}) {
        const size_t block = sh.rows * sh.width, n = SPAN / block, G = 2 * n, P = 2 * n;
        char *gpu, *pool;
        CHECK(cudaMalloc(&gpu, G * block));
        CHECK(cudaHostAlloc(&pool, P * block, cudaHostAllocDefault));
        std::vector<size_t> gs(G), ps(P);
        std::iota(gs.begin(), gs.end(), 0);
        std::iota(ps.begin(), ps.end(), 0);
        std::shuffle(gs.begin(), gs.end(), rng);
        std::shuffle(ps.begin(), ps.end(), rng);
        // Row r of GPU block g: gpu + (r * G + g) * width; row r of pool block p: pool + (p * rows + r) * width.
        auto grow = [&](size_t g, size_t r) { return (CUdeviceptr)(gpu + (r * G + g) * sh.width); };
        auto prow = [&](size_t p, size_t r) { return (CUdeviceptr)(pool + (p * sh.rows + r) * sh.width); };
        for (int dir = 0; dir < 2; dir++) {
            // Fill the sources with a pattern, poison the destinations.
            for (size_t i = 0; i < P * block; i += 8) *(unsigned long long *)(pool + i) = dir ? 0xEEEEEEEEEEEEEEEEull : (i * 2654435761ull);
            if (dir) {
                std::vector<unsigned long long> pat(G * block / 8);
                for (size_t i = 0; i < pat.size(); i++) pat[i] = (i * 8) * 40503ull + 1;
                CHECK(cudaMemcpy(gpu, pat.data(), G * block, cudaMemcpyHostToDevice));
            } else {
                CHECK(cudaMemset(gpu, 0xEE, G * block));
            }
            std::vector<CUdeviceptr> d, s;
            std::vector<size_t> sz;
            std::vector<CUDA_MEMCPY3D_BATCH_OP> ops(n);
            for (size_t i = 0; i < n; i++) {
                const size_t g = gs[i], p = ps[i];
                for (size_t r = 0; r < sh.rows; r++) {
                    d.push_back(dir ? prow(p, r) : grow(g, r));
                    s.push_back(dir ? grow(g, r) : prow(p, r));
                    sz.push_back(sh.width);
                }
                CUDA_MEMCPY3D_BATCH_OP &o = ops[i];
                std::memset(&o, 0, sizeof o);
                const CUmemcpy3DOperand go = pointer(grow(g, 0), G * sh.width, sh.rows);
                const CUmemcpy3DOperand po = pointer(prow(p, 0), sh.width, sh.rows);
                o.src = dir ? go : po;
                o.dst = dir ? po : go;
                o.extent.width = sh.width;
                o.extent.height = sh.rows;
                o.extent.depth = 1;
                o.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
            }
            double gbs[3], cpu[3];
            for (int way = 0; way < 3; way++) {
                std::vector<double> r, c;
                for (int rep = 0; rep < 3; rep++) {
                    double in_calls = 0, t0 = now_us();
                    if (way == 0) {
                        const size_t per_call = std::min<size_t>(CALL_BYTES / sh.width, 4096);
                        for (size_t i = 0; i < d.size(); i += per_call) {
                            const double c0 = now_us();
                            batch(&d[i], &s[i], &sz[i], std::min(per_call, d.size() - i), (CUstream)stream);
                            in_calls += now_us() - c0;
                        }
                    } else if (way == 1) {
                        const size_t per_call = std::max<size_t>(1, std::min<size_t>(CALL_BYTES / block, 4096));
                        for (size_t i = 0; i < n; i += per_call) {
                            const double c0 = now_us();
                            batch3d(&ops[i], std::min(per_call, n - i), (CUstream)stream);
                            in_calls += now_us() - c0;
                        }
                    } else {
                        for (size_t i = 0; i < n; i++) {
                            const CUDA_MEMCPY3D_BATCH_OP &o = ops[i];
                            const double c0 = now_us();
                            CHECK(cudaMemcpy2DAsync((void *)o.dst.op.ptr.ptr, o.dst.op.ptr.rowLength, (void *)o.src.op.ptr.ptr,
                                                    o.src.op.ptr.rowLength, sh.width, sh.rows, cudaMemcpyDefault, stream));
                            in_calls += now_us() - c0;
                        }
                    }
                    CHECK(cudaStreamSynchronize(stream));
                    r.push_back(SPAN / ((now_us() - t0) * 1e3));
                    c.push_back(in_calls / n);
                    if (rep == 0 && way == 1) {
                        // Check the 3D batch's bytes: every row of the first 64 blocks and the last.
                        for (size_t i : {size_t(0), size_t(1), size_t(63), n - 1}) {
                            for (size_t row = 0; row < sh.rows; row++) {
                                std::vector<char> a(sh.width), b(sh.width);
                                CHECK(cudaMemcpy(a.data(), (void *)s[i * sh.rows + row], sh.width, cudaMemcpyDefault));
                                CHECK(cudaMemcpy(b.data(), (void *)d[i * sh.rows + row], sh.width, cudaMemcpyDefault));
                                if (std::memcmp(a.data(), b.data(), sh.width) != 0) {
                                    std::printf("WRONG: 3D batch, block %zu row %zu differs\n", i, row);
                                    return 1;
                                }
                            }
                        }
                    }
                }
                std::sort(r.begin(), r.end());
                std::sort(c.begin(), c.end());
                gbs[way] = r[1];
                cpu[way] = c[1];
            }
            std::printf("%5zu %6zuK %4s %14.2f %14.2f %14.2f %.2f %.2f %.2f\n", sh.rows, sh.width >> 10, dir ? "D2H" : "H2D",
                        gbs[0], gbs[1], gbs[2], cpu[0], cpu[1], cpu[2]);
        }
        CHECK(cudaFree(gpu));
        CHECK(cudaFreeHost(pool));
    }
    return 0;
}
