"""Build script: the CUDA extension vllm_fireattn/_C (torch op library, sm_90a).

Environment switches (documented in README.md):
  FIREATTN_NO_CUDA=1          pure-Python install: no extension, CPU tests and the reference only.
  FIREATTN_HEAD_DIMS=128      compile only these head dims (comma list of 64,128,256).
  FIREATTN_DTYPES=bf16        compile only these query dtypes (bf16, fp16).
  MAX_JOBS=N                  parallel nvcc jobs (ninja).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _cuda_extensions():
    if os.environ.get("FIREATTN_NO_CUDA", "0") == "1":
        print("vllm-fireattn: FIREATTN_NO_CUDA=1, building the pure-Python package (no kernels).")
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        sys.exit(
            "vllm-fireattn: no CUDA toolkit (nvcc) found. Install CUDA 13 and set CUDA_HOME, "
            "or set FIREATTN_NO_CUDA=1 for a pure-Python install without kernels."
        )
    sys.path.insert(0, str(ROOT / "csrc"))
    from generate import generate  # noqa: E402

    generated = generate(ROOT / "csrc" / "generated")
    sources = [
        "csrc/bindings.cpp",
        "csrc/cache/cache_write.cu",
        "csrc/common/attention_host.cu",
        "csrc/prefill/prefill.cu",
        "csrc/decode/decode.cu",
    ] + [str(p.relative_to(ROOT)) for p in generated]
    include_dirs = [str(ROOT / "csrc")]
    try:  # CUTLASS/CuTe headers from the nvidia-cutlass wheel (build requirement).
        import cutlass_library

        cutlass_inc = Path(cutlass_library.__file__).parent / "source" / "include"
        if cutlass_inc.is_dir():
            include_dirs.append(str(cutlass_inc))
    except ImportError:
        pass
    nvcc = [
        "-O3",
        "-std=c++17",
        "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    if os.environ.get("FIREATTN_PTXAS_VERBOSE") == "1":
        nvcc.append("--ptxas-options=-v")
    nvcc += os.environ.get("FIREATTN_NVCC_FLAGS", "").split()  # development experiments (-D...)
    ext = CUDAExtension(
        name="vllm_fireattn._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
