"""Training-transform throughput of the ImageNet file loaders, beside the ResNet-18 step rate they must feed.

Columns: DALI "mixed" (nvJPEG + HW decoder, GPU only), DALI CPU (libjpeg-turbo in DALI's threads, output copied to
the device), torchvision (PIL in DataLoader workers, uint8 to the device), and the LUCIR ResNet-18 training step
(bf16 autocast, channels_last, SGD, synthetic GPU-resident batch) in img/s. A loader keeps the GPU busy when its rate
is above the model's.

Images: --n JPEGs (default 500) of about 500x375 (a quarter portrait 375x500), quality 90, made at start in a temp
dir from scikit-image's bundled photos (astronaut, coffee, chelsea, rocket, ...) by random crops, resizes and flips;
synthetic textures if scikit-image is missing. They sit in the page cache: this measures decoding and augmentation,
not the disk. Each loader runs one warm-up epoch (worker start-up, DALI prefetch), then --epochs timed epochs.

    python bench/bench_loader.py --out bench/results/loader_h100.json          # GPU machine
    python bench/bench_loader.py --quick --out /tmp/loader_quick.json          # CPU sanity check (tiny)
DALI columns are skipped (with the reason) when nvidia.dali does not import; see docs/imagenet.md for shipping DALI
to the GPU machine (../shared/tools/dali_chunks.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnemonics_fast.data import imagenet  # noqa: E402
from mnemonics_fast.data.dali import dali_available  # noqa: E402
from mnemonics_fast.data.torchvision_loader import TorchvisionTrainLoader  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def _sources(rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
    try:
        import skimage.data as skd
        out = []
        for name in PHOTOS:
            try:
                im = getattr(skd, name)()
            except Exception:  # an image that needs a download (pooch) or is absent in this version
                continue
            if im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8:
                out.append(im)
        if out:
            return out, "scikit-image " + __import__("skimage").__version__ + ": " + ", ".join(PHOTOS)
    except ImportError:
        pass
    yy, xx = np.mgrid[0:600, 0:800]  # fallback: smooth colour fields + noise (JPEG-codes like a photo, roughly)
    out = []
    for k in range(6):
        f = np.stack([np.sin(xx / (20 + 7 * k) + c) * np.cos(yy / (25 + 5 * c)) for c in range(3)], -1)
        out.append(np.clip(127 + 90 * f + rng.normal(0, 12, f.shape), 0, 255).astype(np.uint8))
    return out, "synthetic (scikit-image not installed)"


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> tuple[list[str], str]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    srcs, what = _sources(rng)
    files = []
    for i in range(n):
        src = srcs[i % len(srcs)]
        h, w = src.shape[:2]
        W, H = size if i % 4 else size[::-1]  # every 4th portrait
        s = rng.uniform(0.5, 1.0)  # crop a random region of the source with the target's aspect ratio
        ch = int(min(h, w * H / W) * s)
        cw = int(ch * W / H)
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((W, H), Image.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        p = folder / f"{i:05d}.jpg"
        im.save(p, quality=90)
        files.append(str(p))
    return files, what


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(make, device, epochs: int, to_device=None) -> dict:
    t0 = time.perf_counter()
    loader = make()
    build = time.perf_counter() - t0
    loader.set_epoch(0)
    for x, y in loader:  # warm-up epoch
        if to_device is not None:
            x = x.to(to_device, non_blocking=True)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for ep in range(1, epochs + 1):
        loader.set_epoch(ep)
        for x, y in loader:
            if to_device is not None:
                x, y = x.to(to_device, non_blocking=True), y.to(to_device, non_blocking=True)
            n += x.shape[0]
    _sync(device)
    dt = time.perf_counter() - t0
    if hasattr(loader, "close"):
        loader.close()
    return {"img_per_s": n / dt, "images": n, "seconds": dt, "build_s": build, "batch_shape": list(x.shape)}


def time_model(device, batch: int, image_size: int, steps: int, warmup: int) -> dict:
    from mnemonics_fast.models import build_model
    model = build_model("resnet18", imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD, num_classes=100).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    xs = torch.rand(2, batch, 3, image_size, image_size, device=device, generator=g)
    ys = torch.randint(0, 100, (2, batch), device=device, generator=g)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(i):
        x = xs[i % 2].contiguous(memory_format=torch.channels_last)
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), ys[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(i)
        end.record()
        torch.cuda.synchronize(device)
        dt = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        dt = time.perf_counter() - t0
    return {"img_per_s": batch * steps / dt, "images": batch * steps, "seconds": dt,
            "what": "ResNet-18 (LUCIR) fwd+bwd+SGD, bf16 autocast, channels_last, 100 classes"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU sanity run (24 small JPEGs, 64 px, 2 epochs)")
    ap.add_argument("--n", type=int, default=500, help="number of JPEGs")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20, help="timed epochs over the --n images (after one warm-up)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                    help="DataLoader workers / DALI threads")
    ap.add_argument("--model-steps", type=int, default=30)
    ap.add_argument("--dir", default=None, help="where to write the JPEGs (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.width, a.height, a.batch, a.image_size, a.epochs = 24, 120, 90, 8, 64, 2
        a.workers, a.model_steps = min(a.workers, 2), 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    dali_ok, dali_why = dali_available()
    tmp = None
    if a.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        folder = Path(tmp.name)
    else:
        folder = Path(a.dir)
        folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files, source = make_jpegs(folder, a.n, (a.width, a.height))
    gen_s = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(f) for f in files)
    labels = torch.arange(len(files)) % 100
    common = dict(files=files, labels=labels, extra=None, batch_size=a.batch, rank=0, world=1, seed=0,
                  image_size=a.image_size, num_workers=a.workers)

    results: dict[str, dict] = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # report and keep going: one broken column must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {name}: {results[name]}", flush=True)

    if dali_ok:
        from mnemonics_fast.data.dali import DaliTrainLoader
        if device.type == "cuda":
            run("dali_mixed", lambda: time_loader(lambda: DaliTrainLoader(device=device, **common), device, a.epochs))
        else:
            results["dali_mixed"] = {"skipped": "no GPU (mixed decoding needs one)"}
        run("dali_cpu", lambda: time_loader(lambda: DaliTrainLoader(device=torch.device("cpu"), **common), device,
                                            a.epochs, to_device=device if device.type == "cuda" else None))
    else:
        results["dali_mixed"] = results["dali_cpu"] = {"skipped": dali_why}
    run("torchvision", lambda: time_loader(lambda: TorchvisionTrainLoader(device=device, **common), device, a.epochs))
    run("resnet18_step", lambda: time_model(device, a.batch, a.image_size, a.model_steps,
                                            warmup=2 if a.quick else 10))

    import PIL
    import torchvision
    meta = {
        "device": card, "device_type": device.type, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "dali": dali_why.removeprefix("nvidia-dali ") if dali_ok else None,
        "dali_missing": None if dali_ok else dali_why,
        "images": {"n": len(files), "size": f"{a.width}x{a.height} (1 in 4 portrait)",
                   "mean_bytes": nbytes // len(files), "source": source, "generated_s": round(gen_s, 2)},
        "transform": f"RandomResizedCrop({a.image_size}) + flip, float32 [0,1] CHW on {device.type}",
        "batch": a.batch, "workers": a.workers, "timed_epochs": a.epochs, "quick": a.quick,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print()
    print(f"# bench_loader: {meta['device']} | torch {meta['torch']} | torchvision {meta['torchvision']} | "
          f"DALI {meta['dali'] or 'absent'} | {meta['cpu_count']} CPUs, {a.workers} workers/threads")
    print(f"# {len(files)} JPEGs {meta['images']['size']}, ~{nbytes // len(files) // 1024} KiB each ({source}); "
          f"batch {a.batch}; {meta['transform']}")
    print(f"| {'column':<14} | {'img/s':>10} | {'images':>7} | {'seconds':>8} | note")
    print(f"| {'-' * 14} | {'-' * 10} | {'-' * 7} | {'-' * 8} | ----")
    for name, r in results.items():
        if "img_per_s" in r:
            note = f"build {r['build_s']:.2f}s" if "build_s" in r else r.get("what", "")
            print(f"| {name:<14} | {r['img_per_s']:>10,.0f} | {r['images']:>7} | {r['seconds']:>8.3f} | {note}")
        else:
            print(f"| {name:<14} | {'-':>10} | {'-':>7} | {'-':>8} | {r.get('skipped') or r.get('error')}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"# wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
