"""`python -m mnemonics_fast.info`: which kernels are live and what they were built against (after xformers.info).

Prints the extension's state (and why it is off), torch/CUDA versions at build and run time, the arch list, which
implementation each op uses per device, whether DALI is importable, whether torch.compile can run (train.compile) and
whether a GPU is visible. `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import os

import argparse
import json
import sys


def collect() -> dict:
    import torch

    from . import ops

    info = ops.backend_info()
    info["gpu"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "count": torch.cuda.device_count()}
    try:
        import nvidia.dali as dali  # noqa: F401

        info["dali"] = getattr(dali, "__version__", "available")
    except Exception as exc:  # ImportError, or a broken install raising something else
        info["dali"] = None
        info["dali_reason"] = f"{type(exc).__name__}: {exc}"
    from .trainer.compile import compile_unavailable
    info["compile"] = {dev: compile_unavailable(torch.device(dev)) or "available"
                       for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])}
    info["python"] = sys.version.split()[0]
    return info


def format_info(info: dict) -> str:
    lines = []

    def row(key, value):
        lines.append(f"{key:<34}{value}")

    row("mnemonics_fast._C", "loaded" if info["kernels_available"] else f"not used: {info['reason_unavailable']}")
    if info["extension_module"]:
        row("  file", info["extension_module"])
        pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "mnemonics_fast"
        if os.path.dirname(os.path.abspath(info["extension_module"])) != pkg:
            # e.g. an editable install of another checkout maps mnemonics_fast._C to its own tree
            row("  note", f"not the imported package's folder ({pkg}): it was built from another checkout's sources")
    elif info["extension_files"]:
        row("  files found", ", ".join(info["extension_files"]))
    build = info["build"]
    if build:
        cudart = build["cuda_runtime_version"]
        row("  built against torch", build["torch_version"])
        nvcc = f"{cudart // 1000}.{cudart % 1000 // 10}"
        row("  built against CUDA", f"{build['torch_cuda_version']} (nvcc runtime {nvcc})")
        row("  arch list", build["arch_list"])
        row("  built by", build["build_system"])
    row("runtime torch", f"{info['runtime_torch_version']} (CUDA {info['runtime_torch_cuda_version']})")
    row("MNEMONICS_FAST_FORCE_REFERENCE", "1" if info["force_reference"] else "unset")
    row("cosine_linear CUDA path", info["cosine_linear_path"])
    for name, devices in info["ops"].items():
        row(f"op {name}", ", ".join(f"{dev}: {impl}" for dev, impl in devices.items()))
    gpu = info["gpu"]
    row("GPU", f"{gpu['name']} (sm {gpu['capability']}, {gpu['count']} visible)" if gpu else "none visible")
    row("DALI", info["dali"] if info["dali"] else f"not available ({info.get('dali_reason', '')})")
    row("torch.compile (train.compile)", ", ".join(f"{d}: {w}" for d, w in info["compile"].items()))
    row("python", info["python"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnemonics_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
