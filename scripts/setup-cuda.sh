#!/usr/bin/env bash
# Installs NVRTC 13.0 and the CUDA headers the kernels include (cuda_bf16.h, mma.h, libcu++) from PyPI into
# ./.cuda-pip (git-ignored), so a machine without a GPU or a CUDA toolkit compiles every kernel (CI does).
# Pinned to the 13.0 line: NVRTC 13.0 emits PTX ISA 9.0, which a CUDA 13.0 (driver 580) machine accepts;
# newer NVRTCs emit PTX a 13.0 driver rejects. ptxas comes with NVRTC, so register/spill reports need nothing else.
# Idempotent; ~95 MB download the first time. Prints the LD_LIBRARY_PATH line to use.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.cuda-pip
if [ -f "$D/nvidia/cu13/lib/libnvrtc.so.13" ] && [ -f "$D/nvidia/cu13/include/cuda_bf16.h" ] && [ -d "$D/nvidia/cu13/include/cccl" ] \
  && [ -f "$D/nvidia/cu13/include/crt/mma.h" ]; then
  echo "cuda: $D present"
else
  python3 -m pip install -q --disable-pip-version-check --no-cache-dir --target "$D" --upgrade \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  echo "cuda: installed NVRTC 13.0 into $D"
fi
# NVRTC's dlopen name: cudarc looks for libnvrtc.so / libnvrtc.so.13.
echo "export LD_LIBRARY_PATH=$PWD/$D/nvidia/cu13/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
