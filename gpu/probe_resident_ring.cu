// Probe (issue 11's 4 KiB D2H, after probe_resident_d2h.cu): that probe's kernel, shaped like
// ferry's resident kernel and with every one of its extras, moves 4 KiB blocks into host memory
// at 0.95 of PCIe where ferry's resident kernel moves 0.87-0.89 (`ferry bench --workers 1`).
// Is the loss in the kernel's own code or in how ferry feeds it? (Neither: the launch's shared
// memory ask, which left the SMs ~29 KiB of L1; fixed in resident.rs `launch_shared`, twelfth
// session, bench/results/h200.md.) This runs ferry's real
// `ferry_resident` (resident_kernel.cu, included) outside ferry, on 65535 4 KiB D2H tasks (every
// slot but one of a 256 MiB region, shuffled, as `ferry bench` plans them) in a ring of pinned,
// device-mapped host memory, fed two ways, each launched asking three amounts of dynamic shared
// memory (ferry's ask, the most a block may have; what the sm_90 kernel's stages need; its
// barriers alone): what a block leaves of an SM's 256 KiB of shared memory and L1 is its L1.
//   prepublished: every task written and its tail published before the launch (stop set too: the
//                 poller ends once the watermark reaches the tail);
//   fed W/S:      a host thread writes the tasks into their slots and publishes the tail S tasks
//                 at a time, never more than W tasks past the kernel's watermark (as ferry's
//                 worker publishes them as its queues hand them over, the queue holding W).
// Then the same with both ways at once: half the blocks H2D (staged through shared memory by
// the TMA in the sm_90 build), half D2H, interleaved. Timed by events (the launch's head reset
// included, as ferry sets it before each launch), median of 5, against the copy engine's ceiling
// in the same run (one 256 MiB copy; both ways, one each way at once on two streams); sampled
// blocks checked. Host pools as probe.cuh's probe_host_pool (MODES, comma-separated).
//
// Built twice by gpu/run.sh: for sm_90 (the kernel ferry loads there, TMA staging compiled in)
// and as compute_80 PTX jitted on the device (the kernel without the TMA branch), which tells
// whether that branch's code costs the D2H copies (which never take it) anything:
//   nvcc -O3 -arch=sm_90 -o /tmp/probe_resident_ring gpu/probe_resident_ring.cu -lcuda
//   nvcc -O3 -gencode arch=compute_80,code=compute_80 -o /tmp/probe_resident_ring80 gpu/probe_resident_ring.cu -lcuda
//   /tmp/probe_resident_ring [SMS [MODES]]
//
#include "probe.cuh"
#include "resident_kernel.cu"
#include <cstddef>
#include <thread>

constexpr size_t SPAN = 256ull << 20, BLOCK = 4096;
constexpr unsigned long long N = FERRY_RING - 1;  // at most RING - 1 tasks unfinished, as in ferry
constexpr int RUNS = 5, WRITERS = 16;
constexpr unsigned long long IDLE_NS = 200000, LIFE_NS = 1000000000;  // ferry's IDLE; a life it never reaches

struct Feed {
    const char *name;
    unsigned long long window, step;  // window 0: prepublished
};

// The host's tail, written as ferry's worker writes it (a release store of the mapped word).
static inline void publish(FerryResidentHost *h, unsigned long long tail) { __atomic_store_n(&h->tail, tail, __ATOMIC_RELEASE); }

// The kernel's watermark, read as ferry reads it.
static inline unsigned long long watermark(FerryResidentHost *h) { return __atomic_load_n(&h->done, __ATOMIC_ACQUIRE); }

// Sampled destinations of `plan` hold `want` (host memory read here, device memory copied back).
static bool sampled_ok(const std::vector<FerryTask> &plan, char want) {
    std::vector<char> block(BLOCK);
    for (size_t i = 0; i < plan.size(); i += plan.size() / 64) {
        CHECK(cudaMemcpy(block.data(), (const void *)plan[i].dst, BLOCK, cudaMemcpyDefault));
        if (!std::all_of(block.begin(), block.end(), [&](char b) { return b == want; })) return false;
    }
    return true;
}

int main(int argc, char **argv) {
    const int sms = argc > 1 ? std::atoi(argv[1]) : 2;
    const std::string modes = argc > 2 ? argv[2] : "hostalloc,memfd";
    const Feed feeds[] = {
        {"prepublished", 0, 0}, {"fed 16384/64", 16384, 64}, {"fed 1024/64", 1024, 64}, {"fed 16384/8", 16384, 8},
    };
    for (size_t at = 0; at < modes.size();) {
        const size_t comma = std::min(modes.find(',', at), modes.size());
        const std::string mode = modes.substr(at, comma - at);
        at = comma + 1;
        ProbeSetup p = probe_setup(SPAN);
        p.host = probe_host_pool(mode, SPAN, p.host);
        int optin = 0;
        CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
        // The launch's dynamic shared memory: as ferry asks (the most a block may have, so that no
        // two share an SM), or what the sm_90 kernel's stages need (the rest of the SM's 256 KiB
        // stays L1 cache), or its barriers alone (D2H copies never use the stages).
        const int shared_sizes[] = {optin, 32 * 8 + 32 * 4096, 32 * 8};
        CHECK(cudaFuncSetAttribute(ferry_resident, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        cudaFuncAttributes fa;
        CHECK(cudaFuncGetAttributes(&fa, ferry_resident));
        cudaStream_t stream, other;
        CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        CHECK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
        cudaEvent_t e0, e1, joined;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        CHECK(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
        // The ceilings: one SPAN copy D2H; one each way at once on two streams.
        const double ceiling = SPAN / (probe_time_ms(stream, e0, e1, RUNS, [&] {
                                           CHECK(cudaMemcpyAsync(p.host, p.dev, SPAN, cudaMemcpyDefault, stream));
                                       }) * 1e6);
        const double ceiling_both = 2 * SPAN / (probe_time_ms(stream, e0, e1, RUNS, [&] {
                                                    CHECK(cudaStreamWaitEvent(other, e0));
                                                    CHECK(cudaMemcpyAsync(p.dev, p.host, SPAN, cudaMemcpyDefault, other));
                                                    CHECK(cudaMemcpyAsync(p.host, p.dev, SPAN, cudaMemcpyDefault, stream));
                                                    CHECK(cudaEventRecord(joined, other));
                                                    CHECK(cudaStreamWaitEvent(stream, joined));
                                                }) * 1e6);
        FerryTask *ring;
        FerryResidentHost *host;
        FerryResidentDev *dev;
        CHECK(cudaHostAlloc(&ring, FERRY_RING * sizeof(FerryTask), cudaHostAllocMapped));
        CHECK(cudaHostAlloc(&host, sizeof(FerryResidentHost), cudaHostAllocMapped));
        CHECK(cudaMalloc(&dev, sizeof(FerryResidentDev)));
        CHECK(cudaMemset(dev, 0, sizeof(FerryResidentDev)));
        std::printf("%s, host pool %s, %d SMs, ferry_resident %d registers, %zu B local, compute_%d code, device fields %s; "
                    "copy-engine ceilings D2H %.1f GB/s, both ways %.1f; %llu 4 KiB blocks, median of %d\n",
                    p.prop.name, mode.c_str(), sms, fa.numRegs, fa.localSizeBytes, fa.ptxVersion,
                    offsetof(FerryResidentDev, flags) > 32 ? "apart" : "packed", ceiling, ceiling_both, N, RUNS);
        std::printf("%-9s %-14s %10s %9s %9s\n", "blocks", "feed", "shared KiB", "GB/s", "/ceiling");
        unsigned epoch = 0;
        int bad = 0;
        for (const bool both : {false, true}) {
            // D2H: every slot of the region but one, shuffled, device to host. Both ways: task i
            // H2D for even i (host slots of the lower half to device slots of the lower half),
            // D2H for odd i (upper halves), as `ferry bench` interleaves its two lanes.
            std::mt19937_64 rng(5);
            const size_t slots = SPAN / BLOCK, half = slots / 2;
            auto shuffled = [&](size_t from, size_t n) {
                std::vector<size_t> v(n);
                std::iota(v.begin(), v.end(), from);
                std::shuffle(v.begin(), v.end(), rng);
                return v;
            };
            std::vector<FerryTask> plan(N), h2d, d2h;
            if (!both) {
                const std::vector<size_t> hs = shuffled(0, slots), gs = shuffled(0, slots);
                for (size_t i = 0; i < N; i++) plan[i] = {(unsigned long long)(p.dev + gs[i] * BLOCK), (unsigned long long)(p.host + hs[i] * BLOCK), BLOCK, 1};
            } else {
                const std::vector<size_t> hl = shuffled(0, half), gl = shuffled(0, half), hu = shuffled(half, half), gu = shuffled(half, half);
                for (size_t i = 0; i < N; i++)
                    plan[i] = i % 2 == 0 ? FerryTask{(unsigned long long)(p.host + hl[i / 2] * BLOCK), (unsigned long long)(p.dev + gl[i / 2] * BLOCK), BLOCK, 0}
                                         : FerryTask{(unsigned long long)(p.dev + gu[i / 2] * BLOCK), (unsigned long long)(p.host + hu[i / 2] * BLOCK), BLOCK, 1};
            }
            for (const FerryTask &t : plan) (t.to_host ? d2h : h2d).push_back(t);
            // Every slot's task written once here (the fed runs write them again as they feed).
            std::memcpy(ring, plan.data(), N * sizeof(FerryTask));
            for (const int shared : shared_sizes)
                for (const Feed &f : feeds) {
                    // The sm_90 kernel stages H2D copies in shared memory: it needs its stages there.
                    if (both && fa.ptxVersion >= 90 && shared < shared_sizes[1]) continue;
                    // Sources 1 (host) and 2 (device), destinations 0.
                    std::memset(p.host, both ? 1 : 0, SPAN / (both ? 2 : 1));
                    if (both) std::memset(p.host + SPAN / 2, 0, SPAN / 2);
                    CHECK(cudaMemset(p.dev, both ? 0 : 2, SPAN / (both ? 2 : 1)));
                    if (both) CHECK(cudaMemset(p.dev + SPAN / 2, 2, SPAN / 2));
                    const double ms = probe_time_ms(stream, e0, e1, RUNS, [&] {
                        // A fresh launch's state: the device head zeroed (the flags are zero: the
                        // scanner clears them behind its watermark), the host side reset.
                        CHECK(cudaMemsetAsync(dev, 0, offsetof(FerryResidentDev, flags), stream));
                        host->done = 0;
                        host->ended = 0;
                        host->stop = f.window == 0;
                        publish(host, f.window == 0 ? N : 0);
                        epoch++;
                        ferry_resident<<<sms, 1024, shared, stream>>>(ring, host, dev, IDLE_NS, LIFE_NS, epoch, WRITERS);
                        CHECK(cudaGetLastError());
                        if (f.window == 0) return;
                        std::thread feeder([&] {
                            unsigned long long tail = 0;
                            const double give_up = now_us() + 5e6;
                            while (tail < N) {
                                const unsigned long long room = watermark(host) + f.window;
                                const unsigned long long next = std::min({room, N, tail + f.step});
                                if (next < N && next - tail < f.step) {
                                    if (now_us() > give_up) break;
                                    continue;  // a whole step of room, as a queue hands over batches
                                }
                                std::memcpy(ring + tail, plan.data() + tail, (next - tail) * sizeof(FerryTask));
                                publish(host, next);
                                tail = next;
                            }
                            __atomic_store_n(&host->stop, 1u, __ATOMIC_RELEASE);
                        });
                        feeder.join();
                    });
                    // A launch that ended before the last task (nothing relaunches it here).
                    const bool ended_early = watermark(host) != N;
                    const bool same = sampled_ok(d2h, 2) && (h2d.empty() || sampled_ok(h2d, 1));
                    const double gbs = N * BLOCK / (ms * 1e6), top = both ? ceiling_both : ceiling;
                    bad += !same;
                    std::printf("%-9s %-14s %10.1f %9.1f %9.2f%s%s\n", both ? "both ways" : "D2H", f.name, shared / 1024.0,
                                gbs, gbs / top, same ? "" : "  WRONG BYTES", ended_early ? "  ENDED EARLY" : "");
                    std::fflush(stdout);
                }
        }
        std::printf("\n");
        if (bad) return 1;
        CHECK(cudaDeviceReset());
    }
    return 0;
}
