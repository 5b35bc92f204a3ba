#!/usr/bin/env bash
# The one command to run on the GPU machine, from the repository root, after gpu/prepare.sh
# here (carry .device). Writes logs and artifacts under $OUT and prints a short table last.
set -uo pipefail
out=${OUT:-/tmp/ferry-out}
mkdir -p "$out"
step() { echo; echo "== $*"; }
{
    step "machine"
    nvidia-smi -L
    nvidia-smi topo -m
    step "ferry topo"
    .device/ferry topo | tee "$out/topo.txt"
    step "ferry doctor"
    .device/ferry doctor | tee "$out/doctor.txt"
    step "CUDA loading test (library unit tests, cuda module)"
    .device/ferry-lib-tests cuda:: --nocapture
    step "sysfs capture"
    rm -rf /tmp/h100-vm && bash topology/fixtures/capture.sh /tmp/h100-vm && tar czf "$out/h100-vm-sysfs.tgz" -C /tmp h100-vm
    step "PTX of the copy kernel"
    nvcc --version | tail -2
    nvcc -ptx -arch=compute_80 -O3 -o "$out/copy_kernel.ptx" gpu/copy_kernel.cu && echo "ptx: $(wc -c <"$out/copy_kernel.ptx") bytes"
    step "copy kernel probe"
    nvcc -O3 -arch=sm_90 -o /tmp/probe gpu/probe.cu -lcuda && /tmp/probe | tee "$out/probe.txt"
    step "ferry bench (host transport) on this machine"
    .device/ferry bench --reps 3 --total 512M | tee "$out/bench-host.txt"
} 2>&1 | tee "$out/log.txt"
echo
echo "== summary"
grep -E "^(OK|WARN|FAIL) |OK, .* FAIL$" "$out/doctor.txt" | tail -1
grep -E "^(correctness|ceiling|latency)" "$out/probe.txt" 2>/dev/null
sed -n '/^block/,$p' "$out/probe.txt" 2>/dev/null | head -12
