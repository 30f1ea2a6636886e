#!/bin/sh
# The quantized peers' wheels for a GPU machine that cannot reach a package registry (the peer
# scripts peer_quant_kernels.py and decode_torch.py --quantize import them there):
#   scripts/bench/peer_wheels.sh [DIR]        (default .whl; then, on the GPU machine:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site)
# Pinned to the versions docs/benchmarks.md reports, for CPython 3.12 on x86-64 Linux (the GPU
# image's PyTorch). bitsandbytes' wheel carries a library per CUDA / ROCm / XPU version (~130 MB
# unpacked): only the CUDA 13.0 one is kept (~4 MB). hqq and gemlite publish source archives: both
# are pure Python, built into wheels here. termcolor is hqq's one dependency the image lacks.
# GPTQ-Marlin is compiled, not downloaded: scripts/bench/marlin_wheel.sh DIR adds its wheel.
set -eu
D=${1:-.whl}
mkdir -p "$D"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$D" \
    bitsandbytes==0.50.2 torchao==0.18.0 termcolor==3.3.0
python3 -m pip wheel -q --no-deps -w "$D" hqq==0.2.8.post1 gemlite==0.6.0.post2
python3 - "$D" <<'PY'
import glob, os, sys, zipfile

# Rewrite the bitsandbytes wheel without the native libraries of other CUDA / ROCm / XPU versions
# (and their RECORD lines).
for whl in glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")):
    keep = lambda n: not (os.path.basename(n).startswith("libbitsandbytes_")
                          and os.path.basename(n) != "libbitsandbytes_cuda130.so")
    tmp = whl + ".tmp"
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not keep(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
            dst.writestr(item, data)
    os.replace(tmp, whl)
    print(f"{whl}: {os.path.getsize(whl) / 1e6:.1f} MB")
PY
ls -l "$D"
