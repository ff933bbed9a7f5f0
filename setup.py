"""Builds lora_ext._C: the lora op schemas, the CPU kernels and, when a CUDA toolkit
and a CUDA build of torch are both present, the native CUDA kernels.

Environment variables:
  LORA_EXT_SKIP_CUDA=1     build the CPU kernels only, even where CUDA could be built.
  TORCH_CUDA_ARCH_LIST     CUDA architectures to compile for (e.g. "9.0" for the H200).
  MAX_JOBS                 parallel compile jobs (ninja).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc's flags for csrc/cuda (tests/test_cuda_compile.py reads this line: keep it a literal list).
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]


def cuda_build_reason():
    """Returns None when the CUDA sources should be built, else why not."""
    import torch

    if os.environ.get("LORA_EXT_SKIP_CUDA", "0") == "1":
        return "LORA_EXT_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (CUDA_HOME)"
    return None


def extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: at::parallel_for (the CPU dropout loop) runs its chunks on torch's OpenMP threads only when
    # the extension itself is compiled with OpenMP; without it the loop ran on one thread.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    skip_reason = cuda_build_reason()
    if skip_reason is not None:
        print(f"lora_ext: building CPU kernels only ({skip_reason})")
        return cpp_extension.CppExtension("lora_ext._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=["-fopenmp"])
    print("lora_ext: building CPU and CUDA kernels")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return cpp_extension.CUDAExtension(
        "lora_ext._C",
        cpp_sources + cuda_sources,
        define_macros=[("LORA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="lora_ext",
    version="0.1.0",
    description="LoRA linear layers as torch.library custom ops (C++/CUDA/Triton)",
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
)
