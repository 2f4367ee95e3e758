"""Build configuration of the mnemonics_fast._C extension: the one source of truth for setup.py and CMakeLists.txt.

setup.py imports this file; CMake runs ``python csrc/build_config.py --cmake OUT.cmake`` and includes the result
(which also writes the generated build_info.h next to it).
Everything that decides *what* is compiled and *how* lives here: the source list, compiler flags, the CUDA arch list,
where CUDA_HOME and the pip-installed CUDA headers are, and how many parallel compile jobs fit in memory.

Environment:
    MNEMONICS_FAST_NO_EXT=1         build no extension (pure-Python package; ops use the references)
    MNEMONICS_FAST_CUDA_ARCH=...    CUDA archs, e.g. "9.0" or "8.0;9.0+PTX" (wins over TORCH_CUDA_ARCH_LIST)
    TORCH_CUDA_ARCH_LIST=...        same, torch's variable; default "8.0;9.0" (A100, H100)
    CUDA_HOME / CUDA_PATH           toolkit root; default /usr/local/cuda when it has bin/nvcc
    MAX_JOBS                        parallel compile jobs; default from free memory (about 2 GiB per nvcc job)
"""
from __future__ import annotations

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# One .cu per op keeps the compile small and parallel (about 70 s per file on 2 cores); the layers above the
# backends (csrc/autograd.cpp) are plain C++ (no nvcc).
SOURCES = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/cosine_linear.cu", "csrc/exemplar_sgd.cu"]
EXT_NAME = "mnemonics_fast._C"
DEFAULT_ARCH_LIST = "8.0;9.0"

CXX_FLAGS = ["-O3", "-DNDEBUG"]
# No --use_fast_math: approximate sqrt/div would break agreement with the fp32 reference. -lineinfo costs nothing at
# run time and lets compute-sanitizer and Nsight point at source lines.
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def arch_list() -> str:
    """CUDA archs to compile for, in torch's TORCH_CUDA_ARCH_LIST syntax."""
    for var in ("MNEMONICS_FAST_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return DEFAULT_ARCH_LIST


def _has_nvcc(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home() -> tuple[str | None, str]:
    """(CUDA_HOME or None, how it was found). torch's own search follows `which nvcc`, which on some machines is a
    wrapper script in /usr/local/bin (giving CUDA_HOME=/usr/local); a toolkit root must hold bin/nvcc and
    include/cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _has_nvcc(value):
                return value, f"${var}"
            return None, f"${var}={value} has no bin/nvcc + include/cuda_runtime.h"
    if _has_nvcc("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _has_nvcc(root):
            return root, f"nvcc on PATH ({nvcc})"
        return None, f"nvcc on PATH ({nvcc}) is not inside a toolkit root; set CUDA_HOME"
    return None, "no CUDA toolkit found (no CUDA_HOME, no /usr/local/cuda/bin/nvcc, no nvcc on PATH)"


def pip_cuda_include_dirs(torch_cuda_version: str | None) -> list[str]:
    """Headers shipped by torch's pip CUDA dependencies (nvidia/cu13/include for CUDA 13): cuBLAS/cuSPARSE headers
    that a minimal toolkit may lack and that ATen's CUDA headers include."""
    if not torch_cuda_version:
        return []
    major = torch_cuda_version.split(".")[0]
    dirs = []
    for entry in sys.path:
        candidate = os.path.join(entry, "nvidia", f"cu{major}", "include")
        if os.path.isdir(candidate) and candidate not in dirs:
            dirs.append(candidate)
    return dirs[:1]


def max_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS if set, else min(cores, available memory / 2 GiB)."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    avail_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if avail_gib is None:
        return max(1, cores)
    return max(1, min(cores, int(avail_gib // 2)))


def generated_dir() -> str:
    return os.path.join(ROOT, "build", "generated")


def write_build_info(out_dir: str, torch_version: str, torch_cuda: str, archs: str, system: str) -> str:
    """Fill csrc/build_info.h.in (@VAR@ placeholders) into out_dir/build_info.h."""
    with open(os.path.join(HERE, "build_info.h.in")) as f:
        text = f.read()
    for key, value in (("TORCH_VERSION", torch_version), ("TORCH_CUDA_VERSION", torch_cuda),
                       ("ARCH_LIST", archs), ("BUILD_SYSTEM", system)):
        text = text.replace(f"@{key}@", value.replace('"', ""))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "build_info.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the timestamp when unchanged: no needless rebuilds
        with open(path, "w") as f:
            f.write(text)
    return path


def _cmake_list(values) -> str:
    return ";".join(str(v).replace(";", "\\;") for v in values)


def write_cmake(path: str) -> None:
    """Everything CMakeLists.txt needs, as set() commands, plus build_info.h in <dir of path>/generated."""
    import sysconfig

    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        raise SystemExit(f"mnemonics_fast: cannot build the CUDA extension: {how}")
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        raise SystemExit(f"mnemonics_fast: torch {torch.__version__} is a CPU-only build; the extension needs CUDA")
    archs = arch_list()
    cmake_archs = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        cmake_archs.append(f"{num}-real" if not ptx else num)  # "90" = SASS + PTX, "90-real" = SASS only
    std = inspect_cpp_std(cpp_extension)
    gen_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "generated")
    write_build_info(gen_dir, torch.__version__, torch.version.cuda, archs, "cmake")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    defines = [f"_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "TORCH_EXTENSION_NAME=_C",
               "TORCH_API_INCLUDE_EXTENSION_H"]
    entries = {
        "MF_SOURCES": [os.path.join(ROOT, s) for s in SOURCES],
        "MF_CUDA_HOME": [cuda_home],
        "MF_NVCC": [os.path.join(cuda_home, "bin", "nvcc")],
        "MF_CUDA_ARCHITECTURES": cmake_archs,
        "MF_CXX_STANDARD": [std],
        "MF_CXX_FLAGS": CXX_FLAGS,
        # plus the flags torch.utils.cpp_extension adds for nvcc
        "MF_NVCC_FLAGS": NVCC_FLAGS + ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                                       "--expt-relaxed-constexpr"],
        "MF_DEFINES": defines,
        # the order setup.py's compile lines have: ours, the pip CUDA headers, then torch's (CUDA_HOME/include last)
        "MF_INCLUDE_DIRS": [os.path.join(ROOT, "csrc"), gen_dir] + pip_cuda_include_dirs(torch.version.cuda)
        + cpp_extension.include_paths("cuda") + [sysconfig.get_paths()["include"]],
        "MF_TORCH_LIBRARY_DIR": [torch_lib],
        "MF_LIBRARIES": ["c10", "torch", "torch_cpu", "c10_cuda", "torch_cuda"],
        "MF_EXT_SUFFIX": [sysconfig.get_config_var("EXT_SUFFIX")],
        "MF_PACKAGE_DIR": [os.path.join(ROOT, "mnemonics_fast")],
    }
    with open(path, "w") as f:
        f.write(f"# Generated by csrc/build_config.py (CUDA_HOME from {how}). Do not edit.\n")
        for key, values in entries.items():
            f.write(f'set({key} "{_cmake_list(values)}")\n')


def inspect_cpp_std(cpp_extension) -> str:
    """The C++ standard torch's own extension builder uses (17 before torch 2.10-ish, 20 after)."""
    import inspect

    return "20" if "-std=c++20" in inspect.getsource(cpp_extension) else "17"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cmake":
        write_cmake(sys.argv[2])
    else:
        print(__doc__)
        print("usage: python csrc/build_config.py --cmake OUT.cmake")
        sys.exit(2)
