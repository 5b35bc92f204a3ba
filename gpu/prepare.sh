#!/usr/bin/env bash
# Builds here what the GPU machine runs and copies it into .device/ (ignored by git; name it in
# the device tool's carry list). The GPU machine has no Rust toolchain, so nothing is built
# there but the CUDA probes and the PTX (nvcc).
#
# Every binary in .device/ is the one the README describes: `ferry` and libferry.so with the
# default features (gdr included). The GDR switch tests built without the gdr feature go into
# their own target directory (target/nogdr), so that building them never replaces an artifact
# of the default build.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prints "<target name> <executable>" for each test executable a `cargo test --no-run` built.
test_executables() {
    python3 -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])'
}

# Test executables of the default build: the library's unit tests, the GPU integration tests,
# and the GDR tests (their use_gdr switch tests run on a GPU machine without a NIC).
executables=$(cargo test --release -p ferry --lib --test gpu --test gdr --no-run --message-format=json 2>/dev/null | test_executables)
# The GDR switch tests once more, built without the gdr feature (the matrix's feature-off cells).
nogdr=$(CARGO_TARGET_DIR=target/nogdr cargo test --release -p ferry --no-default-features --test gdr --no-run \
    --message-format=json 2>/dev/null | test_executables | awk '$1 == "gdr" { print $2 }')
# Last, so that nothing above can have rebuilt them: the binaries the README describes.
cargo build --release --bin ferry
cargo build --release -p ferry-ffi   # libferry.so, for the Python binding's GPU test

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
version=$(.device/ferry --version)
case $version in
    *"features: "*gdr*) echo "prepare: $version" ;;
    *) echo "prepare: .device/ferry lacks the gdr feature ($version)" >&2; exit 1 ;;
esac
ls .device && du -sh .device
