#!/usr/bin/env bash
# Builds here what the GPU machine runs and copies it into .device/ (ignored by git; name it in
# the device tool's carry list). The GPU machine has no Rust toolchain, so nothing is built
# there but the CUDA probe and the PTX (nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin ferry
lib_tests=$(cargo test --release --lib -p ferry --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]][-1])')
rm -rf .device && mkdir -p .device
cp target/release/ferry .device/ferry
cp "$lib_tests" .device/ferry-lib-tests
du -sh .device
