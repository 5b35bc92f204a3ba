#!/usr/bin/env bash
# Builds here what the GPU machine runs and copies it into .device/ (ignored by git; name it in
# the device tool's carry list). The GPU machine has no Rust toolchain, so nothing is built
# there but the CUDA probe and the PTX (nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin ferry
cargo build --release -p ferry-ffi   # libferry.so, for the Python binding's GPU test
# Test executables by target: the library's unit tests, the GPU integration tests, and the GDR
# tests (their use_gdr switch tests run on a GPU machine without a NIC).
executables=$(cargo test --release -p ferry --lib --test gpu --test gdr --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])')
# The GDR switch tests once more, built without the gdr feature (the matrix's feature-off cells).
nogdr=$(cargo test --release -p ferry --no-default-features --test gdr --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gdr":
        print(m["executable"])')
rm -rf .device && mkdir -p .device
cp "$nogdr" .device/gdr-tests-without-feature
cp target/release/ferry .device/ferry
cp target/release/libferry.so .device/libferry.so
while read -r name path; do
    case $name in
        ferry) cp "$path" .device/ferry-lib-tests ;;
        gpu) cp "$path" .device/gpu-tests ;;
        gdr) cp "$path" .device/gdr-tests ;;
    esac
done <<<"$executables"
# Debug info stays here; the carry limit (64 MiB with the working tree) is for code.
strip --strip-debug .device/*
ls .device && du -sh .device
