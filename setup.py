"""Builds mnemonics_fast, with the CUDA extension mnemonics_fast._C when it can.

    pip install --no-build-isolation -e .          # editable; compiles csrc/ when nvcc + a CUDA torch are present
    MNEMONICS_FAST_NO_EXT=1 pip install --no-build-isolation -e .   # pure Python (ops use the references)

The extension is built whenever a CUDA toolkit and a CUDA build of torch are found, with or without a GPU. Otherwise
the package installs as pure Python and this script prints one line saying why. Sources, flags, arch list and the
environment variables are in csrc/build_config.py (shared with CMakeLists.txt); see docs/kernels.md.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    spec = importlib.util.spec_from_file_location("mnemonics_fast_build_config",
                                                  os.path.join(HERE, "csrc", "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip(reason: str) -> dict:
    print(f"mnemonics_fast: building without the CUDA extension ({reason}); "
          "the ops will run their plain-PyTorch references.", file=sys.stderr)
    # An extension built in place by an earlier build would still load from an in-place (editable) install: this build
    # is pure Python, so remove it. Only for in-place builds: a wheel never carries it, so a wheel build leaves it.
    if "develop" in sys.argv or "editable_wheel" in sys.argv or ("build_ext" in sys.argv and (
            "--inplace" in sys.argv or "-i" in sys.argv)):
        import glob
        for stale in glob.glob(os.path.join(HERE, "mnemonics_fast", "_C*.so")):
            os.remove(stale)
            print(f"mnemonics_fast: removed {stale} from an earlier build", file=sys.stderr)
    return {}


def extension_kwargs() -> dict:
    cfg = _load_build_config()
    if cfg.env_flag("MNEMONICS_FAST_NO_EXT"):
        return _skip("MNEMONICS_FAST_NO_EXT is set")
    # Only the build commands compile; `setup.py --version`, egg_info, sdist etc. need nothing.
    cuda_home, how = cfg.find_cuda_home()
    if cuda_home is None:
        return _skip(how)
    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST when imported / when compiling.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list()
    os.environ.setdefault("MAX_JOBS", str(cfg.max_jobs()))
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        return _skip(f"torch is not importable here ({exc}); with pip, pass --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")

    gen_dir = cfg.generated_dir()
    cfg.write_build_info(gen_dir, torch.__version__, torch.version.cuda, cfg.arch_list(), "setup.py")
    include_dirs = [os.path.join(HERE, "csrc"), gen_dir] + cfg.pip_cuda_include_dirs(torch.version.cuda)
    ext = CUDAExtension(
        name=cfg.EXT_NAME,
        sources=cfg.SOURCES,  # relative to this directory, as setuptools requires
        include_dirs=include_dirs,
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
    )
    print(f"mnemonics_fast: building {cfg.EXT_NAME} with CUDA_HOME={cuda_home} (from {how}), "
          f"TORCH_CUDA_ARCH_LIST={cfg.arch_list()}, MAX_JOBS={os.environ['MAX_JOBS']}, torch {torch.__version__}",
          file=sys.stderr)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**extension_kwargs())
