"""NVIDIA DALI file loaders for ImageNet-size JPEGs: `DaliTrainLoader`, `DaliEvalLoader`, `dali_available`.

Pipeline (per rank, one per phase and split; rebuilt when the file list changes):
    external_source(file paths of this step) -> io.file.read -> decode (+ random crop for training)
      -> resize -> crop_mirror_normalize(mean 0, std 255, float32, CHW)   => [0, 1] pixels, the model normalises.
Training: `decoders.image_random_crop` (RandomResizedCrop's area 0.08-1, ratio 3/4-4/3, 10 tries; the JPEG is only
decoded inside the crop) -> resize to SxS (linear, antialiased) -> random horizontal flip. Eval: decode -> resize
shorter side to `resize` -> centre crop SxS (SPEC §1: Resize 256 + CenterCrop 224).
Decoding is "mixed" (nvJPEG, with the hardware decoder and preallocation hints of DALI's ResNet-50 example) when
torch sees a GPU, else "cpu" with `device_id=None` (CI and the CPU-only dev machines).

Why external_source instead of `fn.readers.file(shard_id=, num_shards=, random_shuffle=, pad_last_batch=True)` (the
DALI ResNet-50 example's reader): that reader's `random_shuffle` only shuffles inside a 1024-sample buffer (ImageNet
file lists are sorted by class, so batches would hold one or two classes), its `shuffle_after_epoch` order depends on
how many epochs the pipeline has run (not resumable from (seed, epoch)), and it cannot merge exemplar pixel tensors
into the epoch's shuffle. Here the order comes from `imagenet.train_plan` / `eval_plan`: exactly the torchvision
loader's order, a global shuffle from (seed, epoch), every rank the same number of steps, and the exact file
positions of every batch (the eval loader yields them). DALI still does the file reading (its thread pool), the
decoding, cropping, resizing and the flip; Python only hands it a list of paths per step.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from .imagenet import PlannedTrainLoader, eval_plan, eval_steps, split_batch
from .sources import DatasetError

try:  # optional dependency: everything below checks `_DALI_ERROR` before touching DALI
    import nvidia.dali as _dali
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray
    _DALI_ERROR = None
except Exception as e:  # ImportError, or a broken install (missing CUDA libs) raising something else
    _dali = fn = types = Pipeline = feed_ndarray = None
    _DALI_ERROR = f"{type(e).__name__}: {e}"

# Preallocation hints from DALI's ResNet-50 example: nvJPEG's device/host buffers sized for the largest ImageNet
# images (so it does not reallocate mid-epoch), and the hardware JPEG decoder (A100/H100) preallocated for them.
MIXED_DECODER_HINTS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                           preallocate_width_hint=5980, preallocate_height_hint=6430, hw_decoder_load=0.65)


def dali_available() -> tuple[bool, str]:
    """(True, 'nvidia-dali X.Y') when DALI imports, else (False, one line saying why and how to install it)."""
    if _DALI_ERROR is None:
        return True, f"nvidia-dali {_dali.__version__}"
    return False, (f"NVIDIA DALI is not importable ({_DALI_ERROR}); install it with "
                   f"`pip install nvidia-dali-cuda130` (or the extra `mnemonics_fast[dali]`)")


def _require_dali():
    ok, why = dali_available()
    if not ok:
        raise RuntimeError(why)


def _pipeline_seed(seed: int, rank: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(rank) * 7919 + salt) % (2**31 - 1)


def _queue_source(queue: deque, paths: np.ndarray, offsets: np.ndarray):
    """The external source: the next step's file positions -> their paths as uint8 views (made per step, so an
    epoch's worth of path arrays never exists at once)."""
    def source():
        if not queue:
            raise StopIteration
        return [paths[offsets[i]:offsets[i + 1]] for i in queue.popleft().tolist()]
    return source


class _DaliFileRunner:
    """Owns one DALI pipeline fed by file paths; runs one epoch = a list of position batches, in order.

    The pipeline's external source pops the next step's paths from a queue; the first `schedule_run` of an epoch
    prefetches `prefetch` steps, every consumed step schedules one more, and when the queue is empty the source raises
    StopIteration, which ends DALI's epoch (then `reset`). Leaving an epoch early drains what is in flight.
    """

    def __init__(self, files: list[str], train: bool, max_batch: int, device: torch.device, rank: int, seed: int,
                 image_size: int, resize: int, num_threads: int, prefetch: int = 2):
        _require_dali()
        # All paths in one uint8 buffer + offsets (~60 B per file): a per-file array would cost ~200 B x 1.28M files.
        encoded = [f.encode("utf-8") for f in files]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._paths = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        del encoded
        self.device = device
        self.gpu = device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"DALI loader asked for {device} but torch sees no GPU")
        self._queue: deque = deque()
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self.gpu else None
        pipe = Pipeline(batch_size=max(1, max_batch), num_threads=max(1, num_threads), device_id=device_id,
                        seed=_pipeline_seed(seed, rank, 1 if train else 2), prefetch_queue_depth=prefetch)
        dec = "mixed" if self.gpu else "cpu"
        hints = MIXED_DECODER_HINTS if self.gpu else {}
        with pipe:
            # The source closes over the queue only (not over self): no reference cycle, so the pipeline and its
            # threads go away as soon as the loader does, never later inside a forked DataLoader worker's GC.
            source = _queue_source(self._queue, self._paths, self._offsets)
            paths = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, name="paths")
            raw = fn.io.file.read(paths)
            if train:
                img = fn.decoders.image_random_crop(raw, device=dec, output_type=types.RGB, random_area=[0.08, 1.0],
                                                    random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **hints)
                img = fn.resize(img, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                                antialias=True)
                out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                               std=[255.0] * 3, mirror=fn.random.coin_flip(probability=0.5))
            else:
                img = fn.decoders.image(raw, device=dec, output_type=types.RGB, **hints)
                img = fn.resize(img, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
                out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                               crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                               mean=[0.0] * 3, std=[255.0] * 3)
            pipe.set_outputs(out)
        pipe.build()  # fail (and spend the build time) here, not in the first step
        self.pipe = pipe
        self.image_size = image_size

    def run(self, batches: list[np.ndarray]):
        """Yields one float32 [b,3,S,S] tensor on `device` per (non-empty) batch of file positions, in order."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return
        pipe = self.pipe
        self._queue.extend(batches)
        done = broken = False
        try:
            pipe.schedule_run()  # first call of an epoch: prefetch
            for _ in range(len(batches)):
                out = pipe.share_outputs()[0].as_tensor()
                x = torch.empty(out.shape(), dtype=torch.float32, device=self.device)
                if self.gpu:
                    feed_ndarray(out, x, cuda_stream=torch.cuda.current_stream(device=x.device))
                else:
                    feed_ndarray(out, x)
                pipe.release_outputs()
                pipe.schedule_run()  # keeps `prefetch` steps in flight; past the end the source stops DALI's epoch
                yield x
            done = True
        except RuntimeError as e:
            broken = True   # after a pipeline error DALI refuses every further call: nothing to drain
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "decode" in str(e).lower():
                raise DatasetError(f"DALI could not decode an image of this epoch ({first}). DALI does not say which "
                                   f"file; MNEMONICS_FAST_IMAGENET_CHECK=decode lists every undecodable file before "
                                   f"training, and data.loader=torchvision names the file when it meets it") from None
            raise
        finally:
            if not done and not broken:  # left early (break / exception): drop the queue, drain
                self._queue.clear()
                pipe.schedule_run()
                while not pipe.empty():
                    pipe.share_outputs()
                    pipe.release_outputs()
            if not broken:
                pipe.reset()

    def close(self):
        self.pipe = None  # frees DALI's buffers (nvJPEG preallocations) once the last reference goes


class DaliTrainLoader(PlannedTrainLoader):
    """Training batches (x float32 [b,3,S,S] in [0,1] on `device`, y int64 [b]) for this rank, b = batch_size//world.

    Files and the exemplar pixels `extra` are shuffled jointly per epoch (see `imagenet.train_plan`); the file part of
    each batch goes through DALI, the exemplar rows are gathered from `extra` (never copied whole) and augmented on the
    device (random-resized-crop + flip, `extra_augment`); the two parts are concatenated (files first).
    DALI's augmentation randomness is seeded from (seed, rank) when the loader is built.
    """

    def __init__(self, files: list[str], labels: torch.Tensor, extra, batch_size: int, device: torch.device,
                 rank: int, world: int, seed: int, image_size: int = 224, num_workers: int = 4,
                 extra_augment: str = "crop_flip", prefetch: int = 2):
        _require_dali()
        self._init_plan(files, labels, extra, batch_size, device, rank, world, seed, image_size, extra_augment)
        self.runner = _DaliFileRunner(files, True, batch_size // world, self.device, rank, seed, image_size, 0,
                                      num_workers, prefetch)

    def __iter__(self):
        parts = [split_batch(b, self.num_files) for b in self.plan()]
        decoded = self.runner.run([f for f, _ in parts])
        try:
            for files, rows in parts:
                xs, ys = [], []
                if len(files):
                    xs.append(next(decoded))
                    ys.append(self.labels[torch.from_numpy(files).to(self.device)])
                if len(rows):
                    xe, ye = self.extra.take(rows)
                    xs.append(xe)
                    ys.append(ye)
                yield (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
        finally:
            decoded.close()  # an epoch left early drains DALI's in-flight steps

    def close(self):
        self.runner.close()


class DaliEvalLoader:
    """Eval batches (x float32 [b,3,S,S] in [0,1], y int64 [b], pos int64 [b]) on `device`, Resize(resize) +
    CenterCrop(S); b = batch_size PER RANK (as the resident eval loader). `pos` are positions into `files`: over all
    ranks each file comes exactly once (no padding), so features / logits can be all_gathered and put back in file
    order with `pos` (see `imagenet.eval_plan`)."""

    def __init__(self, files: list[str], labels: torch.Tensor, batch_size: int, device: torch.device, rank: int,
                 world: int, image_size: int = 224, resize: int = 256, num_workers: int = 4, prefetch: int = 2):
        _require_dali()
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.device = torch.device(device)
        self.num_files = len(files)
        self.labels = labels.long().to(self.device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.runner = _DaliFileRunner(files, False, batch_size, self.device, rank, 0, image_size, resize,
                                      num_workers, prefetch)
        self.image_size = image_size

    def __len__(self) -> int:
        return eval_steps(self.num_files, self.batch_size, self.world)

    def __iter__(self):
        batches = eval_plan(self.num_files, self.batch_size, self.rank, self.world)
        decoded = self.runner.run(batches)
        S = self.image_size
        try:
            for b in batches:
                pos = torch.from_numpy(b).to(self.device)
                x = next(decoded) if len(b) else torch.empty(0, 3, S, S, device=self.device)
                yield x, self.labels[pos], pos
        finally:
            decoded.close()

    def close(self):
        self.runner.close()
