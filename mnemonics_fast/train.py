"""Entry point:  python -m mnemonics_fast.train --config X.yaml [a.b=value ...]
            or  torchrun --nproc_per_node=K -m mnemonics_fast.train --config X.yaml ...

With no --config it runs the embedded demo (scikit-learn's bundled digits; offline, a minute or two on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnemonics_fast.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_digits",
                    help="YAML path, or the name of a bundled config (e.g. imagenet_10phase); default: demo_digits")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 run.name=test")
    args = ap.parse_intermixed_args(argv)   # overrides may come before or after --config

    from .config import ConfigError, load_config
    from .data.sources import DatasetError

    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import run_from_config
        run_from_config(cfg)
    except (ConfigError, DatasetError) as e:
        if int(os.environ.get("RANK", "0")) == 0:   # every rank meets the same error: say it once
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _one_line(msg: str) -> str:
    """A DataLoader worker re-raises as "Caught DatasetError in DataLoader worker process N. Original Traceback
    ...": keep the error's own message, which is the traceback's last line after the exception's name."""
    if msg.startswith("Caught ") and "Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return msg


if __name__ == "__main__":
    from .trainer.distributed import exit_process
    try:
        code = main()
    except SystemExit as e:   # argparse: --help (0) or a usage error (2), message already printed
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:   # a crash still goes through exit_process (a gloo rank's normal teardown can abort)
        import traceback
        traceback.print_exc()
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    exit_process(code)   # sys.exit, or os._exit after a torch.distributed run (why: exit_process)
