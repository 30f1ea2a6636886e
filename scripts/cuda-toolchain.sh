#!/bin/sh
# Installs the pinned CUDA 13.0 compiler (nvcc + nvvm + crt), headers (cccl) and the static CUDA runtime
# from PyPI wheels into a cache folder (not the repo) and assembles a CUDA-root-like tree there:
#   $LORQ_CUDA_PREFIX/{bin,include,nvvm,lib64,linkonly}      default: $HOME/.cache/lorq/cuda13
# Needed only to BUILD lorq with --features cuda (candle-kernels and lorq-quant run nvcc in build.rs);
# no GPU is needed. 13.0.x is pinned on purpose: the GPU machines' driver 580 is CUDA 13.0, and PTX from a
# newer nvcc carries a PTX ISA that driver refuses to JIT. nvidia-nvvm is pinned too, else pip pulls a newer one.
# Optional argument "rt": also install the run-time libraries (cuBLAS, NVRTC, cudart, cuRAND) into
# $LORQ_CUDA_PREFIX/rt, e.g. to check that NVRTC kernels compile on a CPU-only machine (~0.9 GiB).
set -eu
PREFIX=${LORQ_CUDA_PREFIX:-$HOME/.cache/lorq/cuda13}
P=$PREFIX/pip
[ -x "$P/bin/pip" ] || python3 -m venv "$P"
"$P/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
C=$("$P/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
mkdir -p "$PREFIX/lib64" "$PREFIX/linkonly"
for d in bin include nvvm; do ln -sfn "$C/$d" "$PREFIX/$d"; done
for f in "$C"/lib/*; do ln -sfn "$f" "$PREFIX/lib64/"; done
# candle-kernels' build.rs emits `cargo:rustc-link-lib=dylib=cudart`; with only libcudart.a (the static
# runtime) in this search folder, `-lcudart` links it statically: no libcudart.so at link or run time.
ln -sfn "$C/lib/libcudart_static.a" "$PREFIX/linkonly/libcudart.a"
"$PREFIX/bin/nvcc" --version | tail -1
if [ "${1:-}" = rt ]; then
    [ -x "$PREFIX/rt/bin/pip" ] || python3 -m venv "$PREFIX/rt"
    # The versions the GPU machines' PyTorch (cu130) pins.
    "$PREFIX/rt/bin/pip" install -q --disable-pip-version-check "nvidia-cublas==13.1.0.3" \
        "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-curand==10.4.0.35"
fi
echo "CUDA toolchain ready: $PREFIX"
