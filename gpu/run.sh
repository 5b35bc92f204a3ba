#!/usr/bin/env bash
# The one command to run on the GPU machine (the lent H200), from the repository root, after
# gpu/prepare.sh here (carry .device). Runs the GPU tests, then the benchmarks; writes logs under $OUT and
# prints a short table last (two workers; then one worker, idle and under a compute load). PROBE=1 also rebuilds the PTX and runs the kernel probe (nvcc).
# ONLY=tests,python,paged,streams,pipeline,gdr,bench,latency,serve,allgpus,calibrate,wakeprobe,spinprobe,d2hprobe,ringprobe runs those parts alone (a full run is close to the device
# tool's 10 minutes a call): tests = the Rust GPU tests, python = the package's tests, paged = bench_paged_kv,
# streams = bench_streams, pipeline = examples/layer_pipeline.py, gdr = the GDR switch tests, bench = ferry bench, latency = its 4 KiB latency lines alone, serve = bench_serve_gpu, allgpus = ferry bench --all-gpus, calibrate = the crossover's calibration run (ferry bench --crossover 2M ...), wakeprobe = gpu/probe_wake.cu (a stream released by a copy's stream write, in ferry's order and the other way round), spinprobe = gpu/probe_spin_wait.cu (a stream held by a spinning kernel against cuStreamWaitValue64), d2hprobe = gpu/probe_resident_d2h.cu, ringprobe = gpu/probe_resident_ring.cu (nvcc; calibrate and the probes are not in a full run).
set -uo pipefail
out=${OUT:-/tmp/ferry-out}
mkdir -p "$out"
step() { echo; echo "== $*"; }
want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
rm -f "$out/failed"
fail() { echo "$1" >>"$out/failed"; }
{
    step "machine"
    nvidia-smi -L
    step "ferry --version (the bench and doctor below are only meaningful with the gdr feature)"
    version=$(.device/ferry --version) || version="ferry does not run"
    echo "$version"
    case $version in
        *"features: "*gdr*) ;;
        *) fail "the ferry in .device lacks the gdr feature: $version (run gpu/prepare.sh)" ;;
    esac
    step "ferry topo"
    .device/ferry topo | tee "$out/topo.txt"
    step "ferry doctor"
    .device/ferry doctor | tee "$out/doctor.txt"
    if want tests; then
        step "GPU tests: CUDA loading (library) and the CUDA transport (tests/gpu.rs)"
        .device/ferry-lib-tests cuda:: --nocapture --test-threads 1 || fail "library cuda tests"
        FERRY_BIN=$PWD/.device/ferry .device/gpu-tests --nocapture --test-threads 1 || fail "gpu tests"
    fi
    if want python; then
        step "Python package (from the source tree, libferry from .device): GPU copies and KV blocks with torch CUDA tensors"
        (cd python/tests && PYTHONPATH=$OLDPWD/python FERRY_LIB=$OLDPWD/.device/libferry.so FERRY_BIN=$OLDPWD/.device/ferry python3 -m unittest discover -s . -v) || fail "python package"
    fi
    if want paged; then
        step "paged KV blocks from Python: package vs C ABI vs torch, idle and under GEMMs (python/bench_paged_kv.py)"
        FERRY_LIB=$PWD/.device/libferry.so python3 python/bench_paged_kv.py >"$out/bench-paged-kv.txt" || fail "bench_paged_kv"
        cat "$out/bench-paged-kv.txt"
    fi
    if want streams; then
        step "copies ordered with CUDA streams: ${STREAM_ROUNDS:=10000} rounds per strategy and mode, latencies (python/bench_streams.py)"
        PYTHONPATH=$PWD/python FERRY_LIB=$PWD/.device/libferry.so timeout 400 python3 python/bench_streams.py --iterations "$STREAM_ROUNDS" >"$out/bench-streams.txt" || fail "bench_streams"
        cat "$out/bench-streams.txt"
    fi
    if want pipeline; then
        step "layer by layer loads ordered by streams alone, plain and as a CUDA graph (examples/layer_pipeline.py)"
        PYTHONPATH=$PWD/python FERRY_LIB=$PWD/.device/libferry.so timeout 300 python3 examples/layer_pipeline.py >"$out/layer-pipeline.txt" || fail "layer_pipeline"
        cat "$out/layer-pipeline.txt"
    fi
    if want gdr; then
        step "GDR tests (tests/gdr.rs): the use_gdr switch on a GPU machine without an RDMA NIC"
        .device/gdr-tests --nocapture --test-threads 1 || fail "gdr tests"
        step "GDR switch tests built without the gdr feature (--no-default-features)"
        .device/gdr-tests-without-feature --nocapture --test-threads 1 use_gdr || fail "gdr tests without the feature"
    fi
    if [ "${PROBE:-0}" = 1 ]; then
        step "PTX and kernel probe"
        nvcc -ptx -arch=compute_80 -O3 -o "$out/copy_kernel.ptx" gpu/copy_kernel.cu
        nvcc -ptx -arch=compute_80 -O3 -o "$out/resident_kernel.ptx" gpu/resident_kernel.cu
        nvcc -ptx -arch=compute_90 -O3 -o "$out/resident_kernel_sm90.ptx" gpu/resident_kernel.cu
        nvcc -O3 -arch=sm_90 -o /tmp/probe gpu/probe.cu -lcuda && /tmp/probe | tee "$out/probe.txt"
        nvcc -O3 -arch=sm_90 -o /tmp/lane gpu/lane.cu && /tmp/lane | tee "$out/lane.txt"
    fi
    if [[ ",${ONLY:-}," == *",wakeprobe,"* ]]; then  # named only: not part of a full run
        step "how fast a waiting stream goes on, by who releases it, and ferry's two stream writes in either order (gpu/probe_wake.cu)"
        nvcc -O3 -arch=sm_90 -o /tmp/probe_wake gpu/probe_wake.cu -lcuda && timeout 120 /tmp/probe_wake | tee "$out/probe-wake.txt" || fail "probe_wake"
    fi
    if [[ ",${ONLY:-}," == *",spinprobe,"* ]]; then  # named only: not part of a full run
        step "a stream held by a spinning one-thread kernel against cuStreamWaitValue64, host or device word, idle and under an FMA load (gpu/probe_spin_wait.cu)"
        nvcc -O3 -arch=sm_90 -o /tmp/probe_spin_wait gpu/probe_spin_wait.cu -lcuda && CUDA_MODULE_LOADING=EAGER timeout 150 /tmp/probe_spin_wait | tee "$out/probe-spin-wait.txt" || fail "probe_spin_wait"
    fi
    if [[ ",${ONLY:-}," == *",d2hprobe,"* ]]; then  # named only: not part of a full run
        step "the resident kernel's 4 KiB D2H taken apart: its extras one by one on a plain kernel (gpu/probe_resident_d2h.cu)"
        nvcc -O3 -arch=sm_90 -o /tmp/probe_resident_d2h gpu/probe_resident_d2h.cu -lcuda && /tmp/probe_resident_d2h 2 | tee "$out/probe-resident-d2h.txt" || fail "probe_resident_d2h"
    fi
    if [[ ",${ONLY:-}," == *",ringprobe,"* ]]; then  # named only: not part of a full run
        step "ferry's resident kernel outside ferry: its 4 KiB D2H prepublished and fed (gpu/probe_resident_ring.cu), for sm_90 and as compute_80 PTX"
        nvcc -O3 -arch=sm_90 -o /tmp/probe_resident_ring gpu/probe_resident_ring.cu -lcuda \
            && nvcc -O3 -gencode arch=compute_80,code=compute_80 -o /tmp/probe_resident_ring80 gpu/probe_resident_ring.cu -lcuda \
            && { /tmp/probe_resident_ring 2 && /tmp/probe_resident_ring80 2; } | tee "$out/probe-resident-ring.txt" || fail "probe_resident_ring"
    fi
    if want bench; then
        step "ferry bench (the main job: picks the cuda transport where a GPU is; two workers here)"
        .device/ferry bench >"$out/bench-cuda.txt" 2>&1 || fail "ferry bench"
        cat "$out/bench-cuda.txt"
        step "ferry bench --workers 1 --load compute (idle, then under a saturating FMA kernel on every SM)"
        .device/ferry bench --workers 1 --load compute --plot "$out/bench-h200.svg" >"$out/bench-cuda-load.txt" 2>&1 || fail "ferry bench --load compute"
        cat "$out/bench-cuda-load.txt"
        step "ferry bench --transport null (the engine's own cost per descriptor on this machine)"
        .device/ferry bench --transport null --descriptors 10M >"$out/bench-null.txt" 2>&1 || fail "ferry bench null"
        cat "$out/bench-null.txt"
    fi
    if want serve; then
        step "two Python processes on one ferry serve --transport cuda (torch tensors by CUDA IPC) against one in-process client (python/bench_serve_gpu.py)"
        PYTHONPATH=$PWD/python FERRY_LIB=$PWD/.device/libferry.so FERRY_BIN=$PWD/.device/ferry timeout 240 python3 python/bench_serve_gpu.py >"$out/bench-serve-gpu.txt" || fail "bench_serve_gpu"
        cat "$out/bench-serve-gpu.txt"
    fi
    if want allgpus; then
        step "ferry bench --all-gpus (one engine over every GPU: each alone, then all at once)"
        timeout 300 .device/ferry bench --all-gpus >"$out/bench-all-gpus.txt" 2>&1 || fail "ferry bench --all-gpus"
        cat "$out/bench-all-gpus.txt"
    fi
    if [[ ",${ONLY:-}," == *",calibrate,"* ]]; then  # named only: not part of a full run
        step "the crossover's calibration: the resident kernel at every size beside the copy engine, idle and under load (ends with the crossover line)"
        timeout 300 .device/ferry bench --workers 1 --load compute --crossover 2M --sizes 16K,32K,64K,128K,256K,1M >"$out/bench-calibrate.txt" 2>&1 || fail "ferry bench calibration"
        cat "$out/bench-calibrate.txt"
    fi
    if want latency; then
        step "ferry bench --workers 1 --sizes 4K (the latency lines: push -> completion beside cuMemcpyAsync, and stream ordering from Rust)"
        timeout 240 .device/ferry bench --workers 1 --sizes 4K >"$out/bench-latency.txt" 2>&1 || fail "ferry bench --sizes 4K"
        cat "$out/bench-latency.txt"
    fi
    if [ "${REPEAT:-0}" = 1 ] && want bench; then
        step "ferry bench again, same call (run-to-run spread)"
        .device/ferry bench >"$out/bench-cuda-2.txt" 2>&1 || fail "ferry bench (repeat)"
        cat "$out/bench-cuda-2.txt"
    fi
} 2>&1 | tee "$out/log.txt"
echo
echo "== summary (tests: $(grep -c '^test result: ok' "$out/log.txt") suites ok, $(grep -c 'FAILED' "$out/log.txt") FAILED lines)"
for f in bench-cuda.txt bench-cuda-load.txt bench-calibrate.txt; do [ -e "$out/$f" ] && { echo "-- $f"; sed -n '/^GB\/s through the engine/,$p' "$out/$f"; }; done
[ -e "$out/bench-paged-kv.txt" ] && { echo "-- bench-paged-kv.txt"; sed -n '/^KV /,$p' "$out/bench-paged-kv.txt"; }
[ -e "$out/bench-streams.txt" ] && { echo "-- bench-streams.txt"; sed -n '/stream-ordered loads/,$p' "$out/bench-streams.txt"; }
[ -e "$out/layer-pipeline.txt" ] && { echo "-- layer-pipeline.txt"; cat "$out/layer-pipeline.txt"; }
[ -e "$out/bench-all-gpus.txt" ] && { echo "-- bench-all-gpus.txt"; cat "$out/bench-all-gpus.txt"; }
[ -e "$out/bench-serve-gpu.txt" ] && { echo "-- bench-serve-gpu.txt"; cat "$out/bench-serve-gpu.txt"; }
if [ -e "$out/failed" ]; then echo "FAILED: $(paste -sd, "$out/failed")"; exit 1; fi
