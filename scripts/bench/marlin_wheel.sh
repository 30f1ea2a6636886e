#!/bin/sh
# Marlin (GPTQ-Marlin, the 4-bit kernel vLLM and TGI serve GPTQ/AWQ checkpoints with) as a wheel for
# the GPU machine, which has PyTorch 2.11 + CUDA 13.0 but no Marlin build for them:
#   scripts/bench/marlin_wheel.sh [DIR]        (default .whl; installed there as peer_wheels.sh says)
# The kernel sources come from the `marlin-kernels` source archive on PyPI (TGI's packaging of vLLM's
# GPTQ-Marlin); only its GPTQ GEMM and repack are compiled, for sm_90 (H100/H200), against the
# headers and libraries of the torch 2.11.0 wheel (the GPU image's version, CUDA 13.0) with the
# pinned nvcc of scripts/cuda-toolchain.sh, and bound to Python as `lorq_marlin_peer` for CPython
# 3.12 (the GPU image's). Nothing of it is committed. Needs: python3.12 (PYTHON312 to name another),
# the CUDA toolchain (LORQ_CUDA_PREFIX), ~1 GB of downloads; the compile takes several minutes.
set -eu
D=$(mkdir -p "${1:-.whl}" && cd "${1:-.whl}" && pwd)
PY=${PYTHON312:-python3.12}
CUDA=${LORQ_CUDA_PREFIX:-$HOME/.cache/lorq/cuda13}
[ -x "$CUDA/bin/nvcc" ] || { echo "no nvcc in $CUDA: run scripts/cuda-toolchain.sh first" >&2; exit 1; }
W=${MARLIN_BUILD_DIR:-$HOME/.cache/lorq/marlin-build}
mkdir -p "$W"
# torch without its CUDA dependencies (headers and link stubs only: it is never imported here), and
# the CUDA headers torch's headers include.
[ -x "$W/venv/bin/pip" ] || "$PY" -m venv "$W/venv"
"$W/venv/bin/pip" install -q --no-deps --no-warn-conflicts torch==2.11.0 "nvidia-cublas==13.1.0.3" "nvidia-cusparse==12.6.3.3" \
    "nvidia-cusolver==12.0.4.66" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
# The source archive: pip prepares its metadata by running its setup.py, which imports torch's
# extension helpers; a stand-in module with those two names (and MARLIN_SKIP_CUDA_BUILD) lets it
# run without a loadable torch.
if [ ! -f "$W/marlin-kernels-0.2.0.tar.gz" ]; then
    mkdir -p "$W/meta/torch/utils"
    : >"$W/meta/torch/__init__.py"
    : >"$W/meta/torch/utils/__init__.py"
    printf 'class BuildExtension:\n    pass\n\n\ndef CUDAExtension(*args, **kwargs):\n    return None\n' \
        >"$W/meta/torch/utils/cpp_extension.py"
    "$W/venv/bin/pip" install -q setuptools wheel
    PYTHONPATH=$W/meta MARLIN_SKIP_CUDA_BUILD=TRUE "$W/venv/bin/pip" download -q --no-deps --no-build-isolation \
        --no-binary :all: -d "$W" marlin-kernels==0.2.0
fi
rm -rf "$W/src" && mkdir -p "$W/src" && tar xzf "$W/marlin-kernels-0.2.0.tar.gz" -C "$W/src"
SRC=$W/src/marlin-kernels-0.2.0/marlin_kernels/gptq_marlin
SITE=$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
EXT=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
T=$SITE/torch
INC="-I$T/include -I$T/include/torch/csrc/api/include -I$SITE/nvidia/cu13/include -I$PYINC"
DEFS="-DTORCH_EXTENSION_NAME=lorq_marlin_peer -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1"
# The binding: the two functions the peer script calls (signatures as the archive's ext.h).
cat >"$W/src/bind.cpp" <<'CPP'
#include <torch/extension.h>
torch::Tensor gptq_marlin_gemm(torch::Tensor &a, torch::Tensor &b_q_weight, torch::Tensor &b_scales,
                               torch::Tensor &b_zeros, torch::Tensor &g_idx, torch::Tensor &perm,
                               torch::Tensor &workspace, int64_t num_bits, int64_t size_m, int64_t size_n,
                               int64_t size_k, bool is_k_full, bool has_zp, bool use_fp32_reduce);
torch::Tensor gptq_marlin_repack(torch::Tensor &b_q_weight, torch::Tensor &perm, int64_t size_k,
                                 int64_t size_n, int64_t num_bits);
PYBIND11_MODULE(lorq_marlin_peer, m) {
    m.def("gptq_marlin_gemm", &gptq_marlin_gemm, "GPTQ-Marlin GEMM (marlin-kernels 0.2.0)");
    m.def("gptq_marlin_repack", &gptq_marlin_repack, "GPTQ layout -> Marlin layout");
    m.attr("__version__") = "marlin-kernels 0.2.0";
}
CPP
cd "$W/src"
NVFLAGS="-O3 -std=c++17 --use_fast_math -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 \
    -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ \
    -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda"
for f in gptq_marlin gptq_marlin_repack; do
    # shellcheck disable=SC2086
    "$CUDA/bin/nvcc" $NVFLAGS $INC $DEFS -c "$SRC/$f.cu" -o "$f.o" &
done
# shellcheck disable=SC2086
g++ -O2 -std=c++17 -fPIC $INC $DEFS -c bind.cpp -o bind.o
wait
[ -f gptq_marlin.o ] && [ -f gptq_marlin_repack.o ] || { echo "nvcc failed" >&2; exit 1; }
mkdir -p pkg
g++ -shared -o "pkg/lorq_marlin_peer$EXT" bind.o gptq_marlin.o gptq_marlin_repack.o -L"$T/lib" \
    -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python -L"$SITE/nvidia/cu13/lib" -l:libcudart.so.13
strip --strip-unneeded "pkg/lorq_marlin_peer$EXT"
# A wheel holding the one module (import torch first: the module's libraries are torch's).
"$PY" - "$D" "pkg/lorq_marlin_peer$EXT" <<'PY'
import base64, hashlib, os, sys, zipfile

out, so = sys.argv[1], sys.argv[2]
name, ver = "lorq_marlin_peer", "0.2.0"
tag = "cp312-cp312-linux_x86_64"
info = f"{name}-{ver}.dist-info"
files = {
    os.path.basename(so): open(so, "rb").read(),
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n".encode(),
    f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: lorq\nRoot-Is-Purelib: false\nTag: {tag}\n".encode(),
}
def digest(b):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
record = "".join(f"{n},{digest(b)},{len(b)}\n" for n, b in files.items()) + f"{info}/RECORD,,\n"
path = os.path.join(out, f"{name}-{ver}-{tag}.whl")
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for n, b in files.items():
        z.writestr(n, b)
    z.writestr(f"{info}/RECORD", record)
print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB")
PY
