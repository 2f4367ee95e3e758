"""Phase-0 training throughput of ResNet-32 (cosine head, CE, SGD) on 32x32 images, side by side in one process:

  dataloader path : torch DataLoader + torchvision transforms (RandomCrop 32 pad 4, flip, ToTensor) over uint8 images,
                    pinned memory, worker processes (what LUCIR/PyCIL/the authors' code do)
  resident path   : the whole split as uint8 on the GPU, crop/flip batched there (mnemonics_fast's fast path)

each in fp32 and bf16 (autocast, channels_last), and with --compile MODE also with the backbone under torch.compile
(what train.compile does; the warm-up steps absorb the compile, which is reported apart). Images: the tin100a-32
ImageFolder tree when --root is given (real JPEGs, decoded once), else random uint8 images of the same shape. Prints a
table and writes JSON.

    python bench/bench_train.py --root ~/.cache/mnemonics_fast/tin100a-32 --out bench/results/train_throughput.json
    python bench/bench_train.py --paths resident --compile default      # eager vs torch.compile, side by side
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnemonics_fast.data.resident import ResidentTrainLoader, to_device_nchw
from mnemonics_fast.models import build_model


class _U8Dataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T
        self.images, self.labels = images, labels
        self.tf = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(self.images[i]), int(self.labels[i])


def _load(root: str | None, n_classes: int):
    if root:
        from mnemonics_fast.data.sources import load_image_folder
        ds = load_image_folder(root, 32, "~/.cache/mnemonics_fast", progress=False)
        keep = ds.train.labels < n_classes
        return ds.train.images[keep].numpy(), ds.train.labels[keep].numpy(), ds.mean, ds.std, "tin100a-32 (real)"
    g = np.random.default_rng(0)
    n = 500 * n_classes
    return (g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, n_classes, n),
            (0.5,) * 3, (0.25,) * 3, "random uint8")


def run_one(path: str, dtype: str, images, labels, mean, std, device, batch, steps, warmup, workers,
            compile_mode: str = "none"):
    torch.manual_seed(0)
    model = build_model("resnet32", mean, std, num_classes=int(labels.max()) + 1).to(device)
    if compile_mode != "none":   # as train.compile: the backbone only (mnemonics_fast/trainer/compile.py)
        model.backbone.compile(mode=None if compile_mode == "default" else compile_mode)
    bf16 = dtype == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    if path == "resident":
        x_dev = to_device_nchw(torch.from_numpy(images), device)
        y = torch.from_numpy(labels).long()
        loader = ResidentTrainLoader(x_dev, torch.arange(len(y)), y, None, batch, device, seed=0)
    else:
        loader = torch.utils.data.DataLoader(_U8Dataset(images, labels), batch_size=batch, shuffle=True,
                                             num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                                             persistent_workers=workers > 0)

    def batches():
        epoch = 0
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            epoch += 1

    it = batches()

    def step():
        x, y = next(it)
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    rates = []
    for _ in range(3):  # three timed windows; report the median
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rates), warmup_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None, help="tin100a-32 ImageFolder root (real images); default random uint8")
    ap.add_argument("--classes", type=int, default=50, help="phase-0 classes (50 = the B50 protocol)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--paths", default="dataloader,resident", help="comma list of dataloader,resident")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--compile", default="none", help="comma list of torch.compile modes to run besides eager "
                    "(none, default, reduce-overhead, max-autotune-no-cudagraphs), e.g. 'none,default'")
    ap.add_argument("--quick", action="store_true", help="tiny CPU sanity run")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True   # as the trainer (train.cudnn_benchmark)
    if a.quick:
        a.steps, a.warmup = 3, 2
    if a.quick or device.type == "cpu":
        a.workers = 0
    images, labels, mean, std, source = _load(a.root, a.classes)
    modes = ["none"] + [m for m in a.compile.split(",") if m and m != "none"]
    rows = []
    dtypes = a.dtypes.split(",")
    if device.type != "cuda" and "bf16" in dtypes:   # bf16 autocast is CUDA-only here: a CPU "bf16" row would be fp32
        print("note: bf16 rows skipped on the CPU (the trainer's autocast is CUDA-only)", flush=True)
        dtypes = [d for d in dtypes if d != "bf16"] or ["fp32"]
    for path in a.paths.split(","):
        for dtype in dtypes:
            for mode in modes:
                r, warm = run_one(path, dtype, images, labels, mean, std, device, a.batch, a.steps, a.warmup,
                                  a.workers, mode)
                rows.append({"path": path, "dtype": dtype, "compile": mode, "img_per_s": r,
                             "warmup_s": warm, "warmup_steps": a.warmup})
                print(f"{path:>10} {dtype:>5} compile={mode:<16}: {r:10.0f} img/s (warm-up {warm:.1f} s)",
                      flush=True)
    for r in rows:
        same = [b for b in rows if b["dtype"] == r["dtype"] and b["compile"] == "none"]
        base = next((b for b in same if b["path"] == "dataloader"), None)
        eager = next(b for b in same if b["path"] == r["path"])
        if base is not None:
            r["speedup_vs_dataloader"] = r["img_per_s"] / base["img_per_s"]
        r["speedup_vs_eager"] = r["img_per_s"] / eager["img_per_s"]
    card = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"bench": "phase0_train_throughput", "card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
              "model": "resnet32 + cosine head", "image": "3x32x32", "batch": a.batch, "classes": a.classes,
              "images": source, "n_images": int(len(labels)), "workers": a.workers, "timed_steps": a.steps,
              "rows": rows}
    print(f"\ncard {card} | torch {torch.__version__} | batch {a.batch} | {source}")
    print(f"{'path':>10} {'dtype':>5} {'compile':>16} {'img/s':>10} {'x dataloader':>13} {'x eager':>8}")
    for r in rows:
        xd = f"{r['speedup_vs_dataloader']:.2f}" if "speedup_vs_dataloader" in r else "-"
        print(f"{r['path']:>10} {r['dtype']:>5} {r['compile']:>16} {r['img_per_s']:>10.0f} {xd:>13} "
              f"{r['speedup_vs_eager']:>8.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
