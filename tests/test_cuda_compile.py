"""The native CUDA sources (csrc/cuda/*.cu) compile for an H100/H200 (sm_90), and for an A100
(sm_80, the oldest architecture the kernels accept), on a machine without a GPU: nvcc with
setup.py's flags and torch's, against this torch's headers.

A CPU build of torch ships no cuBLAS/cuSPARSE/cuSOLVER headers, which ATen's CUDA headers include
for handle and status types only; stand-ins declaring those types (below) are enough to compile
these files, whose code uses none of them. The GPU session then finds compile errors no longer;
and the kernels' register budgets are checked here (ptxas -v), where the design depends on them.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)
pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="needs nvcc (a CUDA toolkit)")

# Type stand-ins for the CUDA math libraries' headers that ATen/cuda includes (CPU torch lacks them).
STUB_HEADERS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cusolverStatus_t;",
    "cusolver_common.h": "",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}
SOURCES = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))


def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no NVCC_FLAGS")


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_stubs")
    for name, text in STUB_HEADERS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#pragma once\n{text}\n")
    return root


def nvcc(source: str, stubs, out_dir, *extra: str, arch: str = "sm_90") -> subprocess.CompletedProcess:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{stubs}"]
    command = [NVCC, *setup_nvcc_flags(), *cpp_extension.COMMON_NVCC_FLAGS, f"-arch={arch}", "-DLORA_WITH_CUDA",
               "-w", *includes, "-c", os.path.join(ROOT, "csrc", "cuda", source),
               "-o", str(out_dir / (source + ".o")), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


# masked_grad_y.cu for sm_90: test_masked_grad_y_compiles_within_its_register_budgets.
@pytest.mark.parametrize("source,arch", [(source, arch) for arch in ("sm_90", "sm_80") for source in SOURCES
                                         if (source, arch) != ("masked_grad_y.cu", "sm_90")])
def test_cuda_source_compiles(source, arch, stubs, tmp_path):
    result = nvcc(source, stubs, tmp_path, arch=arch)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def masked_grad_y_sm90(stubs, tmp_path_factory):
    """masked_grad_y.cu compiled once for sm_90 with ptxas's report: (nvcc's result, the object's path)."""
    out_dir = tmp_path_factory.mktemp("masked_grad_y_sm90")
    return nvcc("masked_grad_y.cu", stubs, out_dir, "-Xptxas", "-v"), str(out_dir / "masked_grad_y.cu.o")


def test_masked_grad_y_compiles_within_its_register_budgets(masked_grad_y_sm90):
    """masked_grad_y.cu compiles, and at ranks <= 16 each variant of its kernel (bf16/fp16) fits without
    spilling the registers its programs per SM allow (__launch_bounds__): 128 for the register load
    scheme's two, 80 for the cp.async scheme's three. The kernel's design (its head comment) rests on
    it. The partials' summing kernel keeps no stack frame."""
    result, _ = masked_grad_y_sm90
    assert result.returncode == 0, result.stderr[-4000:]
    # ptxas -v: "Compiling entry function '<mangled>'" then its spill and register lines.
    report = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                        result.stderr, flags=re.S)
    kernels = {name: (int(spills), int(registers)) for name, spills, registers in report
               if "masked_grad_y_kernel" in name}
    rank16 = {name: usage for name, usage in kernels.items() if "Li16ELi" in name}
    assert len(rank16) == 4, sorted(kernels)  # bf16 and fp16, STAGES 0 and 3
    for name, (spills, registers) in rank16.items():
        budget = 80 if name.endswith("Li16ELi3EEEvPKT_S5_S5_PfS6_PKlllilliij") else 128  # STAGES = 3: three per SM
        assert spills == 0 and registers <= budget, (name, spills, registers, budget)
    assert sum(name.endswith("Li16ELi3EEEvPKT_S5_S5_PfS6_PKlllilliij") for name in rank16) == 2, sorted(rank16)
    # At R_PAD = 64 the program runs 16 warps (one per SM), so 128 registers a thread: its accumulators,
    # split between twice the warps, fit without a spill in both load schemes (124 and 122 with nvcc 13.0 since
    # the keep flags are made a tile ahead, NOTES.md #84: the cp.async ring has 6 registers to spare).
    # On 8 warps it took 255 registers (benchmarks/NOTES.md #78); until B's and xa's rows were read as
    # 16-byte vectors the register scheme spilled 72 bytes (#79).
    rank64 = {name: usage for name, usage in kernels.items() if "Li64ELi" in name}
    assert len(rank64) == 4, sorted(kernels)
    for name, (spills, registers) in rank64.items():
        assert spills == 0 and registers <= 128, (name, spills, registers)
    assert sum(name.endswith("Li64ELi3EEEvPKT_S5_S5_PfS6_PKlllilliij") for name in rank64) == 2, sorted(rank64)
    # The partials' sum (both in one launch) reads its two argument structs field by field: no stack
    # frame (a reference to either struct had copied both to local memory, 80 bytes).
    frames = dict(re.findall(r"Compiling entry function '(\w*sum_slices_kernel\w*)'.*?(\d+) bytes stack frame",
                             result.stderr, flags=re.S))
    assert len(frames) == 2 and all(int(size) == 0 for size in frames.values()), frames


SCRIPTS = os.path.join(ROOT, "scripts")


# The R_PAD values whose register-scheme loop the check below holds to: all three since #98 copies R_PAD 64's
# fragment a tile ahead (before it, its grad_xa warps' first HMMA and a Philox multiply waited there).
LOOP_LOADS_HIDDEN_AT = (16, 32, 64)


def test_masked_grad_y_products_wait_for_no_next_tile_load(masked_grad_y_sm90):
    """In the register scheme's tile loop (bf16 and fp16, R_PAD in LOOP_LOADS_HIDDEN_AT), no instruction between
    the tile's first barrier and its end waits on a scoreboard that the next tile's loads (dY, xa), issued there, count:
    the loads a tile ahead are there to fly under the products, and one such wait makes the products start only
    once they have landed. ptxas chooses the scoreboards; where it put the partial fragment's register loads on the
    same one as the next tile's, the grad_xa warps' first HMMA (and at r <= 16 the grad_B warps' first LDSM)
    waited for both; taking them off it made the step 2.5-7.3% faster (benchmarks/NOTES.md #97). Read from the
    SASS control bits (scripts/sass_scoreboards.py); cuobjdump and nvdisasm come from PyPI's wheels in CI."""
    sys.path.insert(0, SCRIPTS)
    try:
        import sass_scoreboards
    finally:
        sys.path.remove(SCRIPTS)
    if sass_scoreboards.find_tool("cuobjdump") is None or sass_scoreboards.find_tool("nvdisasm") is None:
        pytest.skip("needs cuobjdump and nvdisasm (requirements-ci.txt installs them)")
    result, obj = masked_grad_y_sm90
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = {name: instructions for name, instructions in sass_scoreboards.functions(
        sass_scoreboards.disassemble(obj)).items()
        if re.search(r"masked_grad_y_kernel.*Li(%s)ELi0E" % "|".join(map(str, LOOP_LOADS_HIDDEN_AT)), name)}
    assert len(kernels) == 2 * len(LOOP_LOADS_HIDDEN_AT), sorted(kernels)  # bf16 and fp16
    for name, instructions in kernels.items():
        # What the check reads is there (else it would pass on nothing): a stretch of products after a barrier that
        # issues the next tile's loads, each on a scoreboard.
        assert any(any(sass_scoreboards.is_next_tile_load(ins) for ins in stretch)
                   for stretch in sass_scoreboards.product_stretches(instructions)), name
        waiting = sass_scoreboards.products_waiting_on_next_tile(instructions)
        assert not waiting, (name, [f"{ins.address:05x} {ins.text}" for ins in waiting])
