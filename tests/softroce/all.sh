#!/bin/sh
# Runs each argument (a path relative to the repository root) in turn inside the Soft-RoCE guest;
# Rust test binaries get --test-threads=1 (two busy-polling threads already fill both vCPUs).
# Exits non-zero when any of them failed.
failed=0
for program in "$@"; do
    echo "== $program"
    case "$program" in
        */deps/*) "./$program" --test-threads=1 ;;
        *) "./$program" ;;
    esac || { echo "FAILED: $program"; failed=1; }
done
exit $failed
