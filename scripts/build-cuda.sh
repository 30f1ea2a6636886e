#!/bin/sh
# Builds lorq with the CUDA backend on any x86-64 Linux machine, GPU or not:
#   scripts/cuda-toolchain.sh        # once: pinned CUDA 13.0 nvcc + headers into ~/.cache/lorq/cuda13
#   scripts/build-cuda.sh            # -> prints the path of a stripped, fat-LTO `lorq` binary
#   scripts/build-cuda.sh --tests    # also builds the GPU test binaries, prints their paths
#   scripts/build-cuda.sh --clippy   # clippy (-D warnings) over the workspace with the cuda code
# Run the result on a GPU machine with scripts/gpu-run.sh.
#
# How: candle-core hard-codes cudarc's `dynamic-linking`, which needs CUDA's .so files at link time;
# scripts/patch-candle-core.sh generates a copy switched to `dynamic-loading` (cudarc dlopens the
# libraries at run time) into .cuda-build/candle-core, applied with `cargo --config patch.crates-io…`.
# A [patch] rewrites Cargo.lock, so the build runs in a mirror of the workspace (.cuda-build/ws,
# sources copied with their timestamps): the repository's Cargo.lock and the CPU build stay untouched.
# Env: LORQ_CUDA_PREFIX (toolchain, default ~/.cache/lorq/cuda13), CUDA_COMPUTE_CAP (default 90 ->
# sm_90a, H100/H200), CARGO_TARGET_DIR (default .cuda-build/target), LORQ_CUDA_FAST=1 (no LTO, 16
# codegen units: a larger binary that links in a fraction of the time, for development).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${LORQ_CUDA_PREFIX:-$HOME/.cache/lorq/cuda13}
[ -x "$PREFIX/bin/nvcc" ] || { echo "no nvcc in $PREFIX: run scripts/cuda-toolchain.sh first" >&2; exit 1; }
B=$ROOT/.cuda-build
mkdir -p "$B/ws"
sh "$ROOT/scripts/patch-candle-core.sh" "$B/candle-core"
# Mirror the workspace (timestamps kept, so cargo rebuilds only what changed).
rm -rf "$B/ws/crates"
cp -a "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" "$ROOT/crates" "$B/ws/"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$B/target}
# candle-kernels' build script emits `-lcudart`: with only the static runtime in this folder it
# links statically, so the binary needs no libcudart.so.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$PREFIX/linkonly"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} NVCC=$PREFIX/bin/nvcc CUDA_HOME=$PREFIX
MODE=bin
case "${1:-}" in
--tests) MODE=tests; shift ;;
--clippy) MODE=clippy; shift ;;
esac
if [ "${LORQ_CUDA_FAST:-0}" = 1 ]; then LTO=false CGU=16; else LTO='"fat"' CGU=1; fi
set -- --release --features cuda \
    --config "patch.crates-io.candle-core.path=\"$B/candle-core\"" \
    --config "profile.release.lto=$LTO" \
    --config "profile.release.codegen-units=$CGU" \
    --config 'profile.release.strip=true' \
    "$@"
cd "$B/ws"
if [ $MODE = clippy ]; then
    exec cargo clippy --workspace --all-targets "$@" -- -D warnings
fi
if [ $MODE = tests ]; then
    # The GPU tests: every kernel against its CPU reference (they skip, saying why, without a GPU).
    # LORQ_CUDA_TESTS picks the test targets (cargo test arguments); the paths of the built test
    # binaries are printed, one per line.
    # shellcheck disable=SC2086
    cargo test --no-run ${LORQ_CUDA_TESTS:--p lorq-quant --test cuda_kernels} "$@" 2>"$B/tests.log" || { cat "$B/tests.log" >&2; exit 1; }
    grep -v '^ptxas info' "$B/tests.log" >&2
    grep -o '([^ ]*/deps/[^ ]*)' "$B/tests.log" | tr -d '()'
    exit 0
fi
cargo build -p lorq --bin lorq "$@" 2>"$B/build.log" || { cat "$B/build.log" >&2; exit 1; }
grep -v '^ptxas info' "$B/build.log" | grep -v '^\s*Compiling' >&2 || true
ls -la "$CARGO_TARGET_DIR/release/lorq" >&2
echo "$CARGO_TARGET_DIR/release/lorq"
