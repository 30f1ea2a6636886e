#!/bin/sh
# Runs a CUDA build of lorq (scripts/build-cuda.sh) on a GPU machine:
#   scripts/gpu-run.sh [BINARY] ARGS...      e.g. scripts/gpu-run.sh ./lorq generate --device cuda --prompt Hi
# BINARY defaults to $LORQ_BIN, else ./lorq, else .cuda-build/target/release/lorq.
# The binary dlopens the driver (libcuda.so.1) and CUDA 13 user-space libraries (cuBLAS, cuBLASLt,
# cuRAND, NVRTC): this puts the `nvidia/cu13/lib` folder of the machine's Python `nvidia` wheels
# (PyTorch's) and /usr/local/cuda/lib64 on LD_LIBRARY_PATH.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=${LORQ_BIN:-}
if [ -z "$B" ]; then
    case "${1:-}" in
    */*) B=$1; shift ;;
    *) if [ -x ./lorq ]; then B=./lorq; else B=$ROOT/.cuda-build/target/release/lorq; fi ;;
    esac
fi
[ -f "$B" ] || { echo "no lorq binary at $B: build it with scripts/build-cuda.sh" >&2; exit 1; }
# A copied binary may have lost its executable bit.
[ -x "$B" ] || { T=$(mktemp) && cp "$B" "$T" && chmod +x "$T" && B=$T; }
NV=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${NV:+$NV/lib:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64"
exec "$B" "$@"
