"""The trainer. It reads as the protocol (SPEC §1): for each phase -> build data, grow the head, train, select (and
optionally optimise) exemplars, evaluate, checkpoint.

Everything that must agree across DDP ranks (exemplars, class means, imprinted rows) is computed from features
gathered from all ranks, then broadcast from rank 0, so every rank holds the same state.
"""
from __future__ import annotations

import copy
import platform
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import __version__
from ..config import Config, ConfigError, save_config, to_dict
from ..data import Phases, class_order, exemplars_per_class, load_dataset
from ..data.images import eval_resize
from ..data.sources import DatasetError
from ..data.resident import ResidentEvalLoader, ResidentTrainLoader, to_device_nchw
from ..exemplars import ExemplarMemory, class_mean, herding, random_selection
from ..methods import PhaseInfo, build_method
from ..methods.mnemonics import SHARDABLE_MODES
from ..models import build_model, imprint_weights
from ..utils.io import atomic_torch_save
from . import distributed as D
from .compile import compile_unavailable, compiled_backbones
from .metrics import Metrics, RunLog, format_table


class Trainer:
    def __init__(self, cfg: Config, dist_info: D.DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or D.init_distributed(cfg.run.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.run.output_dir).expanduser() / (cfg.run.name or cfg.name)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.method = build_method(cfg.method)
        self.metrics = Metrics()
        self.memory = ExemplarMemory()
        self.class_means: torch.Tensor | None = None
        self.model = None
        self._log_file = None
        self.compile_mode = "none"   # train.compile, once setup() has checked that torch.compile can run here

    # ================================================================ logging
    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        print(msg, flush=True)
        if self._log_file is not None:
            self._log_file.write(msg + "\n")
            self._log_file.flush()

    def _bar(self, total: int, desc: str):
        if self.cfg.run.progress and self.dist.is_main:
            from tqdm import tqdm
            # disable=None: no bar when stderr is not a terminal (a redirected log would get a redraw every 0.5 s)
            return tqdm(total=total, desc=desc, leave=False, mininterval=0.5, dynamic_ncols=True, disable=None)
        return None

    # ================================================================ set-up
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.run_dir / "log.txt", "a")
        self.runlog = RunLog(self.run_dir, self.dist.is_main, cfg.run.tensorboard)
        if self.runlog.tb_missing:
            self.log("note: tensorboard is not installed; TensorBoard scalars are off (metrics.json/CSV still written)")

        # ---- data: the main rank decodes (and caches) first so other ranks only read the cache. Its verdict is
        # broadcast, so a bad tree ends every rank with the same one-line error (not rank 0's error and the other
        # ranks' "connection closed by peer" tracebacks from the collective they were waiting in).
        failed = None
        if self.dist.is_main:
            try:
                ds = load_dataset(cfg.data, progress=cfg.run.progress)
            except DatasetError as e:
                failed = str(e)
        failed = D.broadcast_object(failed, self.dist)
        if failed is not None:
            raise DatasetError(failed)
        if not self.dist.is_main:
            ds = load_dataset(cfg.data, progress=False)
        self.ds = ds
        self.order = class_order(ds.num_classes, cfg.protocol.class_order_seed)
        remap = torch.empty(ds.num_classes, dtype=torch.long)
        remap[torch.tensor(self.order)] = torch.arange(ds.num_classes)
        self.y_train = remap[ds.train.labels]     # labels = positions in the class order
        self.y_test = remap[ds.test.labels]
        try:
            self.phases = Phases(ds.num_classes, cfg.protocol.base_classes, cfg.protocol.num_phases)
        except ValueError as e:   # the split depends on the dataset's class count: a config error, named
            raise ConfigError(f"{e} (dataset {ds.name} has {ds.num_classes} classes)") from None
        seen = self.phases.classes_up_to(len(self.phases) - 1)
        if cfg.memory.kind == "fixed" and cfg.memory.total < seen:
            raise ConfigError(f"config key 'memory.total': {cfg.memory.total} exemplars cannot hold one per class once "
                              f"all {seen} classes are seen (fixed memory keeps total // seen per class)")
        if ds.resident:
            self.x_train = to_device_nchw(ds.train.images, self.device)
            self.x_test = to_device_nchw(ds.test.images, self.device)
        self.file_loader_kind = self._choose_file_loader() if not ds.resident else None
        self.image_bytes = 3 * ds.image_size * ds.image_size
        counts = torch.bincount(ds.train.labels, minlength=ds.num_classes)   # per ORIGINAL class id
        self.log(f"mnemonics_fast {__version__} | torch {torch.__version__} | python {platform.python_version()} | "
                 f"device {self.device} | world {self.dist.world}")
        self.log(f"ops: {self._ops_line()}")
        self.compile_mode = cfg.train.compile
        if self.compile_mode != "none":
            why = compile_unavailable(self.device)
            if why:   # said once; the run goes on eagerly (same results, the eager speed)
                self.log(f"train.compile={self.compile_mode}: torch.compile cannot run here ({why}); training eagerly")
                self.compile_mode = "none"
            else:
                self.log(f"train.compile={self.compile_mode}: the backbone runs through torch.compile while the "
                         f"model level trains (compiled once, reused by every phase)")
        self.log(f"data: {ds.name}, {ds.num_classes} classes, {len(ds.train)} train / {len(ds.test)} test images "
                 f"of {ds.image_size}x{ds.image_size}, loader {'resident' if ds.resident else self.file_loader_kind}")
        if ds.resident and cfg.data.loader in ("torchvision", "dali"):
            self.log(f"note: data.loader={cfg.data.loader} applies to file-backed datasets; {ds.name} is held in "
                     f"memory and uses the resident loader")
        self.log(f"protocol: class order seed {cfg.protocol.class_order_seed} (first: {self.order[:10]}), "
                 f"{self.phases.base} base classes + {self.phases.num_phases} phases of {self.phases.per_phase}")
        mem = cfg.memory
        # with mnemonics on, mnemonics.init picks the initial exemplars (select_exemplars): say which one runs
        sel = f"selection {cfg.mnemonics.init}, mnemonics {cfg.mnemonics.mode}" if cfg.mnemonics.enabled \
            else f"selection {mem.selection}"
        if (cfg.mnemonics.enabled and cfg.mnemonics.shard_inner and self.dist.world > 1
                and cfg.mnemonics.mode in SHARDABLE_MODES):
            sel += f" (inner loop sharded over {self.dist.world} ranks)"
        if cfg.mnemonics.enabled and cfg.mnemonics.compile != "none":
            sel += (f" (exemplar gradient through torch.compile mode {cfg.mnemonics.compile}: compiles about twice per "
                    f"phase, worth it only for many outer steps; docs/mnemonics.md)")
        self.log(f"memory: {mem.kind} ({f'{mem.per_class} per class' if mem.kind == 'growing' else f'{mem.total} total'}), "
                 f"{sel}")
        world = self.dist.world
        for key, value in (("train.batch_size", cfg.train.batch_size),
                           ("mnemonics.query_batch_size", cfg.mnemonics.query_batch_size if cfg.mnemonics.enabled else 0)):
            if world > 1 and value % world:   # DDP (and the exemplar level's all-reduce) average per-rank means
                how = (f"ranks hold {-(-value // world)} or {value // world} samples a step and their means are "
                       f"averaged, so samples weigh unequally (by 1 part in {value // world})") if ds.resident else \
                      (f"the file loaders give each rank {value // world} a step (a global batch of "
                       f"{value // world * world})")
                self.log(f"note: {key}={value} does not divide over {world} ranks: {how}; a multiple of {world} "
                         f"avoids it")
        amp = self.device.type == "cuda" and cfg.train.amp
        self.log(f"evaluation: CNN and NME (exemplar class means, {cfg.method.nme_view} view); precision: training "
                 f"{'bf16 autocast' if amp else 'fp32'}, feature passes "
                 f"{'bf16 autocast' if amp and cfg.train.amp_eval else 'fp32'}")
        small = torch.nonzero(counts < mem.per_class).flatten().tolist()
        if mem.kind == "growing" and small:
            self.log(f"note: {len(small)} classes have fewer training images than memory.per_class={mem.per_class}; "
                     f"they keep all their images as exemplars (e.g. class {ds.class_names[small[0]]})")

    def _ops_line(self) -> str:
        """Which path the custom ops take on this run's device: said once, never a silent slowdown."""
        from .. import ops
        info = ops.backend_info()
        kind = self.device.type
        paths = ", ".join(f"{name} {where.get(kind, '?')}" for name, where in info.get("ops", {}).items())
        if kind == "cuda" and not info.get("kernels_available"):
            why = "MNEMONICS_FAST_FORCE_REFERENCE=1" if info.get("force_reference") else info.get("reason_unavailable")
            return f"plain-PyTorch reference ({why}); {paths}"
        return paths

    def _choose_file_loader(self) -> str:
        kind = self.cfg.data.loader
        if kind == "resident":
            raise ConfigError("data.loader=resident needs an in-memory dataset; this one is file-backed (ImageNet)")
        if kind in ("auto", "dali"):
            from ..data.dali import dali_available
            ok, why = dali_available()
            if ok:
                return "dali"
            if kind == "dali":
                self.log(f"warning: data.loader=dali but DALI is unavailable ({why}); using the torchvision loader")
            return "torchvision"
        return kind

    # ================================================================ loaders
    def _train_loader(self, idx: torch.Tensor, labels: torch.Tensor, extra, seed: int, batch_size: int):
        if self.ds.resident:
            return ResidentTrainLoader(self.x_train, idx, labels, extra, batch_size, self.device, self.dist.rank,
                                       self.dist.world, seed, pad=self.cfg.data.crop_padding)
        files = [self.ds.train.files[i] for i in idx.tolist()]
        cls = self._file_loader_classes()[0]
        return cls(files, labels, extra, batch_size, self.device, self.dist.rank, self.dist.world, seed,
                   image_size=self.cfg.data.image_size, num_workers=self.cfg.data.num_workers)

    def _eval_loader(self, split: str, idx: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        bs = self.cfg.train.eval_batch_size
        if self.ds.resident:
            images = self.x_train if split == "train" else self.x_test
            return ResidentEvalLoader(images, idx, labels, bs, self.device, self.dist.rank, self.dist.world, flip)
        src = self.ds.train if split == "train" else self.ds.test
        files = [src.files[i] for i in idx.tolist()]
        cls = self._file_loader_classes()[1]
        loader = cls(files, labels, bs, self.device, self.dist.rank, self.dist.world,
                     image_size=self.cfg.data.image_size, resize=eval_resize(self.cfg.data),
                     num_workers=self.cfg.data.num_workers)
        if flip:
            return ((x.flip(3), y, p) for x, y, p in loader)
        return loader

    def _file_loader_classes(self):
        if self.file_loader_kind == "dali":
            from ..data.dali import DaliEvalLoader, DaliTrainLoader
            return DaliTrainLoader, DaliEvalLoader
        from ..data.torchvision_loader import TorchvisionEvalLoader, TorchvisionTrainLoader
        return TorchvisionTrainLoader, TorchvisionEvalLoader

    def _autocast(self, evaluation: bool = False):
        """bf16 autocast of the model level (train.amp); feature passes (evaluation, herding, imprinting, class
        means) only with train.amp_eval as well: bf16 logits flip close top-1 calls and herding picks."""
        if self.device.type == "cuda" and self.cfg.train.amp and (not evaluation or self.cfg.train.amp_eval):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ================================================================ features (sharded, gathered)
    @torch.no_grad()
    def features(self, model, split: str, idx: torch.Tensor, flip: bool = False, with_logits: bool = False):
        """Eval-mode, un-augmented features of `idx` (all ranks' shares gathered: identical on every rank)."""
        model.eval()
        n = len(idx)
        d = model.feature_dim
        feats = torch.zeros(n, d, device=self.device)
        logits = torch.zeros(n, model.num_classes, device=self.device) if with_logits else None
        labels = torch.zeros(n, dtype=torch.long)
        got = torch.zeros(n, dtype=torch.bool, device=self.device)
        for x, _, pos in self._eval_loader(split, idx, labels, flip):
            with self._autocast(evaluation=True):
                if with_logits:
                    out = model(self._fmt(x), return_all=True)
                    f, lg = out.features, out.logits
                else:
                    f = model.features(self._fmt(x))
            feats[pos] = f.float()
            got[pos] = True
            if with_logits:
                logits[pos] = lg.float()
        pos = torch.nonzero(got).flatten()
        feats = D.gather_by_position(feats[pos], pos, n, self.dist)
        if with_logits:
            logits = D.gather_by_position(logits[pos], pos, n, self.dist)
            return feats, logits
        return feats

    @torch.no_grad()
    def pixel_features(self, model, pixels: torch.Tensor, flip: bool = False) -> torch.Tensor:
        model.eval()
        out = []
        for s in range(0, len(pixels), self.cfg.train.eval_batch_size):
            x = pixels[s:s + self.cfg.train.eval_batch_size].to(self.device).float()
            with self._autocast(evaluation=True):
                out.append(model.features(self._fmt(x.flip(3) if flip else x)).float())
        return torch.cat(out) if out else torch.zeros(0, model.feature_dim, device=self.device)

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ================================================================ one phase
    def run(self) -> dict:
        self.setup()
        start = self._resume()
        if start == 0 and self.cfg.run.branch_from:
            start = self._branch()       # writes config.yaml once its checks have passed
            if self.cfg.run.stop_after_phase == 0:
                start = len(self.phases)
        else:
            self._save_run_config()
        for phase in range(start, len(self.phases)):
            self.run_phase(phase)
            if self.cfg.run.stop_after_phase == phase:
                self.log(f"stopping after phase {phase} (run.stop_after_phase)")
                break
        summary = self.metrics.summary()
        if self.dist.is_main and len(self.metrics.phases):
            self.log(format_table(self.metrics))
        self.runlog.close()
        D.barrier(self.dist)
        return summary

    def _phase_seed(self, phase: int) -> int:
        return self.cfg.seed * 1000 + phase   # every phase seeded on its own: resuming or branching changes nothing

    def _new_class_indices(self, new: range) -> torch.Tensor:
        """Training-set positions of the images of the classes in `new`."""
        return torch.nonzero((self.y_train >= new.start) & (self.y_train < new.stop)).flatten()

    def run_phase(self, phase: int):
        cfg, ph = self.cfg, self.phases
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        new = ph.new_classes(phase)
        info = PhaseInfo(phase, new.start, len(new))
        phase_seed = self._phase_seed(phase)
        torch.manual_seed(phase_seed)
        self.log(f"\n==== phase {phase}/{len(ph) - 1}: classes {new.start}..{new.stop - 1} "
                 f"({ph.classes_up_to(phase)} seen)")

        # ---- data of this phase: new-class images + exemplars, as index tensors
        new_idx = self._new_class_indices(new)
        ex_idx, ex_lab = self.memory.index_exemplars()
        train_idx = torch.cat([new_idx, ex_idx])
        train_lab = torch.cat([self.y_train[new_idx], ex_lab])
        extra = self.memory.pixel_exemplars()

        # ---- model: phase 0 from scratch; later phases grow the head, imprint, keep the frozen teacher
        partial = self._load_partial(phase)
        if phase == 0:
            model = build_model(cfg.model.arch, self.ds.mean, self.ds.std, num_classes=len(new)).to(self.device)
            teacher = None
        else:
            teacher = copy.deepcopy(self.model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            model = self.model
            model.grow(len(new), weight_transfer=cfg.model.weight_transfer)
            model.to(self.device)
            if partial is None:
                feats = self.features(teacher, "train", new_idx)
                labs = self.y_train[new_idx].to(self.device)
                imprint_weights(model.head, [feats[labs == c] for c in new])
        if partial is not None:
            model.load_state_dict(partial["model"])
            t0 -= partial.get("progress", {}).get("wall_s", 0.0)   # the phase's time before the kill still counts
        self._phase_t0 = t0
        self.model = model

        # ---- model level: train
        epochs = cfg.train.phase0_epochs if phase == 0 and cfg.train.phase0_epochs > 0 else cfg.train.epochs
        loader = self._train_loader(train_idx, train_lab, extra, phase_seed, cfg.train.batch_size)
        stats = self.train_model(model, teacher, loader, info, epochs, cfg.train.lr, cfg.train.milestones,
                                 partial=partial)
        self._close_phase(phase, model, info, new_idx, phase_seed, t0, stats, epochs, teacher=teacher)
        return teacher

    def _close_phase(self, phase: int, model, info: PhaseInfo, new_idx: torch.Tensor, phase_seed: int, t0: float,
                     stats: dict, epochs: int, teacher=None) -> None:
        """Everything after the main training: exemplar selection, class-balanced fine-tuning (LUCIR option),
        exemplar level, class means, evaluation, metrics, checkpoint."""
        cfg, ph = self.cfg, self.phases
        new = ph.new_classes(phase)
        # ---- exemplars: select for the new classes (fixed memory trims the old ones first)
        m = exemplars_per_class(cfg.memory.kind, ph.classes_up_to(phase), cfg.memory.per_class, cfg.memory.total)
        if cfg.memory.kind == "fixed":
            self.memory.trim(m)
        self.select_exemplars(model, new, new_idx, m, phase_seed)
        # ---- class-balanced fine-tuning: after selection (as LUCIR's released CBF code), so it sees m exemplars of
        # every class, old ones already trimmed to this phase's quota. It trains the head only with BN frozen, so the
        # features that selection used are unchanged; it still belongs to the model level, before mnemonics (b)/(c).
        if cfg.method.class_balanced_finetune and phase > 0:
            self.class_balanced_finetune(model, teacher, info, phase_seed)
        mnemonics = self.optimise_exemplars(model, info, new_idx, phase_seed) if cfg.mnemonics.enabled else None

        # ---- class means (NME) and evaluation on all seen classes
        self.class_means = self.compute_class_means(model, ph.classes_up_to(phase))
        results = self.evaluate(model, phase)
        wall = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        self.metrics.add_phase(phase, results, {
            "num_classes": ph.classes_up_to(phase), "wall_s": wall, "train_s": stats["train_s"],
            "train_img_per_s": stats["img_per_s"], "peak_mem_mb": peak, "memory_exemplars": len(self.memory),
            "memory_bytes": self.memory.nbytes(self.image_bytes), "epochs": epochs, "final_loss": stats["loss"],
            "world_size": self.dist.world,
            **({"mnemonics": mnemonics} if mnemonics else {}),
        })
        self.log(f"phase {phase}: top 1 accuracy CNN: {results['cnn']['top1']:.2f}  NME: {results['nme']['top1']:.2f}"
                 f"  | {wall:.1f} s, train {stats['img_per_s']:.0f} img/s")
        for kind in ("cnn", "nme"):
            self.runlog.scalar(f"top1/{kind}", results[kind]["top1"], phase)
        self.save_checkpoint(phase)
        self.runlog.write(self.metrics, self._run_header())

    # ================================================================ model level
    def train_model(self, model, teacher, loader, info: PhaseInfo, epochs: int, lr: float, milestones, partial=None,
                    head_only: bool = False, params: list | None = None) -> dict:
        """Train `model` (all its trainable parameters, or `params`); head_only keeps the backbone in eval mode."""
        cfg = self.cfg.train
        if params is None:
            params = [p for n, p in model.named_parameters()
                      if p.requires_grad and (not head_only or n.startswith("head."))]
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)
        start_epoch = 0
        if partial is not None:
            opt.load_state_dict(partial["optimizer"])
            sched.load_state_dict(partial["scheduler"])
            start_epoch = partial["epoch"] + 1
            self.log(f"resuming phase {info.phase} at epoch {start_epoch}")
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else model
        bar = self._bar(epochs * len(loader), f"phase {info.phase} train")
        if bar is not None:
            bar.update(start_epoch * len(loader))
        n_img, t_train, last = 0, 0.0, float("nan")
        if partial is not None:   # throughput and time of the whole phase, not only of the epochs after a resume
            n_img, t_train = partial.get("progress", {}).get("n_img", 0), partial.get("progress", {}).get("train_s", 0.0)
        with compiled_backbones([model, teacher], self.compile_mode):
            for epoch in range(start_epoch, epochs):
                loader.set_epoch(epoch)
                model.train()
                if head_only:  # class-balanced fine-tuning keeps BN frozen
                    model.backbone.eval()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                te = time.perf_counter()
                tot, cnt = torch.zeros((), device=self.device), 0
                for x, y in loader:
                    x = self._fmt(x)
                    with self._autocast():
                        out = net(x, return_all=True)
                        t_out = None
                        if teacher is not None:
                            with torch.no_grad():
                                t_out = teacher(x, return_all=True)
                        loss, _ = self.method.loss(out, y, t_out, info)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += loss.detach()
                    cnt += 1
                    n_img += len(y) * self.dist.world
                    if bar is not None:
                        bar.update(1)
                sched.step()  # after the epoch: stepping before it would shift the whole schedule by one (SPEC §7)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t_train += time.perf_counter() - te
                last = float(tot / max(cnt, 1))
                if bar is not None:
                    bar.set_postfix(loss=f"{last:.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
                self.runlog.scalar(f"loss/phase{info.phase}", last, epoch)
                every = self.cfg.run.checkpoint_every
                if not head_only and every > 0 and (epoch + 1) % every == 0 and epoch + 1 < epochs:
                    self._progress = {"n_img": n_img, "train_s": t_train,
                                      "wall_s": time.perf_counter() - self._phase_t0}
                    self._save_partial(info.phase, epoch, model, opt, sched)
        if bar is not None:
            bar.close()
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            model.to(memory_format=torch.contiguous_format)
        if self.dist.enabled:
            # DDP broadcasts buffers only at the start of each forward, so the last step left every rank with its
            # own BN running statistics: make rank 0's the model of every rank (features, exemplars, checkpoint).
            for b in model.buffers():
                D.broadcast_tensor(b, self.dist)
        self._last_opt = (opt, sched)
        return {"train_s": t_train, "img_per_s": n_img / t_train if t_train > 0 else 0.0, "loss": last}

    def class_balanced_finetune(self, model, teacher, info: PhaseInfo, seed: int) -> None:
        """LUCIR's ImageNet option: train only the head on the exemplar memory just selected (the same number of
        exemplars for every seen class, new ones included), BN frozen, same loss."""
        cfg = self.cfg
        idx, lab = self.memory.index_exemplars()
        loader = self._train_loader(idx, lab, self.memory.pixel_exemplars(), seed + 7, cfg.train.batch_size)
        self.log(f"class-balanced fine-tuning: {cfg.method.cbf_epochs} epochs on {loader.n} images "
                 f"(old and new class rows; sigma and the backbone fixed)")
        # As LUCIR's default (ft_flag 2): the old rows (frozen in the main training) and the new rows train, sigma
        # is in no parameter group, so it stays. The flags are put back afterwards for the exemplar level.
        head = model.head
        rows = [head.fc1.weight, head.fc2.weight]
        saved = [p.requires_grad for p in rows] + [head.sigma.requires_grad]
        try:
            for p in rows:
                p.requires_grad_(True)
            head.sigma.requires_grad_(False)
            self.train_model(model, teacher, loader, info, cfg.method.cbf_epochs, cfg.method.cbf_lr,
                             cfg.method.cbf_milestones, head_only=True, params=rows)
        finally:
            for p, flag in zip(rows + [head.sigma], saved):
                p.requires_grad_(flag)

    # ================================================================ exemplar level
    def select_exemplars(self, model, new: range, new_idx: torch.Tensor, m: int, seed: int) -> None:
        """Herding (or seeded random) over each new class's training images, on features gathered from all ranks;
        the rankings are broadcast from rank 0 so every rank stores the identical memory."""
        sel = self.cfg.mnemonics.init if self.cfg.mnemonics.enabled else self.cfg.memory.selection
        labs = self.y_train[new_idx]
        rankings = {}
        if sel == "herding":
            feats = self.features(model, "train", new_idx).cpu()
            for c in new:
                mask = labs == c
                rankings[c] = new_idx[mask][herding(feats[mask], m)]
        else:
            g = torch.Generator().manual_seed(seed + 1)
            for c in new:
                cidx = new_idx[labs == c]
                rankings[c] = cidx[random_selection(len(cidx), m, g)]
        rankings = D.broadcast_object(rankings, self.dist)
        for c, r in rankings.items():
            self.memory.set_class(c, r)

    def optimise_exemplars(self, model, info: PhaseInfo, new_idx: torch.Tensor, seed: int) -> dict:
        from .mnemonics_stage import run_mnemonics
        return run_mnemonics(self, model, info, new_idx, seed)

    def exemplar_pixels(self, c: int) -> torch.Tensor:
        """Float [m, 3, S, S] in [0, 1] of class c's exemplars (stored pixels, or the real images of its ranking)."""
        if c in self.memory.pixels:
            p = self.memory.pixels[c]
            return p.float() / 255.0 if p.dtype == torch.uint8 else p.float()
        idx = self.memory.ranking[c]
        if self.ds.resident:
            return self.x_train[idx.to(self.device)].float() / 255.0
        # File-backed (ImageNet): decode with the eval transform, each rank its share, then gathered.
        s = self.cfg.data.image_size
        xs = torch.zeros(len(idx), 3, s, s, device=self.device)
        got = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        for x, _, pos in self._eval_loader("train", idx, torch.zeros(len(idx), dtype=torch.long)):
            xs[pos] = x.float()
            got[pos] = True
        pos = torch.nonzero(got).flatten()
        return D.gather_by_position(xs[pos], pos, len(idx), self.dist)

    @torch.no_grad()
    def compute_class_means(self, model, num_seen: int) -> torch.Tensor:
        flip = self.cfg.method.nme_view == "plain+flip"
        means = torch.zeros(num_seen, model.feature_dim, device=self.device)
        idx, lab = self.memory.index_exemplars()
        if len(idx):
            f = self.features(model, "train", idx)
            ff = self.features(model, "train", idx, flip=True) if flip else None
            lab = lab.to(self.device)
            for c in lab.unique().tolist():
                mask = lab == c
                means[c] = class_mean(f[mask], ff[mask] if ff is not None else None)
        px = self.memory.pixel_exemplars()
        if px is not None:
            f = self.pixel_features(model, px[0])
            ff = self.pixel_features(model, px[0], flip=True) if flip else None
            lab = px[1].to(self.device)
            for c in lab.unique().tolist():
                mask = lab == c
                means[c] = class_mean(f[mask], ff[mask] if ff is not None else None)
        return means

    # ================================================================ evaluation
    @torch.no_grad()
    def evaluate(self, model, phase: int) -> dict:
        n_seen = self.phases.classes_up_to(phase)
        test_idx = torch.nonzero(self.y_test < n_seen).flatten()
        y = self.y_test[test_idx].to(self.device)
        feats, logits = self.features(model, "test", test_idx, with_logits=True)
        ph = self.phases
        groups = torch.where(y < ph.base, 0, 1 + (y - ph.base) // max(ph.per_phase, 1))
        nme_scores = F.normalize(feats, dim=1) @ self.class_means.T   # nearest mean == largest cosine (nme_predict)
        results = {}
        for kind, scores in (("cnn", logits), ("nme", nme_scores)):
            k = min(5, scores.shape[1])
            top = scores.topk(k, dim=1).indices
            correct1 = top[:, 0] == y
            correct5 = (top == y[:, None]).any(1)
            group_acc = [float(correct1[groups == g].float().mean() * 100) for g in range(phase + 1)]
            results[kind] = {"top1": float(correct1.float().mean() * 100), "top5": float(correct5.float().mean() * 100),
                             "groups": group_acc}
        return results

    # ================================================================ checkpoints
    def _run_header(self) -> dict:
        import numpy
        return {"config": to_dict(self.cfg), "class_order": self.order, "versions": {
            "mnemonics_fast": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
            or "cpu"}, "world_size": self.dist.world, "memory_kind": self.cfg.memory.kind}

    def _ckpt_path(self, phase: int) -> Path:
        return self.ckpt_dir / f"phase_{phase:03d}.pt"

    def save_checkpoint(self, phase: int) -> None:
        if not self.dist.is_main:
            D.barrier(self.dist)
            return
        opt, sched = self._last_opt
        state = {
            "phase": phase, "structure": self.model.structure(), "model": self.model.state_dict(),
            "memory": self.memory.state_dict(), "class_means": self.class_means.cpu(),
            "metrics": self.metrics.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if
                    torch.cuda.is_available() else None},
            "config": to_dict(self.cfg), "class_order": self.order, "version": __version__,
            "world_size": self.dist.world,
        }
        atomic_torch_save(state, self._ckpt_path(phase))   # temp file + fsync + rename
        partial = self.ckpt_dir / "partial.pt"
        if partial.exists():
            partial.unlink()
        D.barrier(self.dist)

    def _save_run_config(self) -> None:
        """config.yaml of the run folder: written after the resume/branch checks, so a refused run (other settings
        than the checkpoints') leaves the folder describing the results it holds."""
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")

    def _save_partial(self, phase: int, epoch: int, model, opt, sched) -> None:
        if self.dist.is_main:
            atomic_torch_save({"phase": phase, "epoch": epoch, "structure": model.structure(),
                               "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "config": to_dict(self.cfg),
                               "class_order": self.order, "progress": getattr(self, "_progress", {}),
                               "world_size": self.dist.world},
                              self.ckpt_dir / "partial.pt")
        D.barrier(self.dist)

    def _load_partial(self, phase: int):
        p = self.ckpt_dir / "partial.pt"
        if self.cfg.run.resume != "auto" or not p.is_file():
            return None
        state = torch.load(p, map_location=self.device, weights_only=False)
        # (checked against this config by _resume when the run started; a later one was written by this run)
        return state if state["phase"] == phase else None

    def _note_world(self, state: dict, path: Path) -> None:
        """A run may resume on another number of ranks (the global batch stays, so the protocol is the same), but the
        results then mix two BatchNorm batch splits: say so; metrics.json records each phase's world size."""
        theirs = state.get("world_size")
        if theirs is not None and theirs != self.dist.world:
            self.log(f"note: {path.name} was written by a run on {theirs} rank(s); this one continues on "
                     f"{self.dist.world} (each phase's world_size is in metrics.json)")

    def _check_partial(self, state: dict, path: Path) -> None:
        if "config" not in state:   # written before partial checkpoints recorded their config
            raise ConfigError(f"run.resume=auto: {path} does not record the settings it was trained with, so resuming "
                              f"from it cannot be checked; delete it (the phase restarts) or set run.resume=never")
        self._check_same(state, path, self._RESUME_SECTIONS, "run.resume=auto",
                         "use another run.name or run.resume=never")

    def _resume(self) -> int:
        """Continue after the last complete phase checkpoint (run.resume=auto). Returns the phase to start at."""
        if self.cfg.run.resume != "auto" or not self.ckpt_dir.is_dir():
            if self.cfg.run.resume == "never" and self.dist.is_main and self.ckpt_dir.is_dir():
                old = sorted(self.ckpt_dir.glob("*.pt"))
                stale = [f for f in (self.run_dir / "metrics.json", self.run_dir / "metrics.csv") if f.is_file()]
                for f in old + stale:
                    f.unlink()
                if old or stale:
                    self.log(f"run.resume=never: removed {len(old)} checkpoint(s) and {len(stale)} metrics file(s) "
                             f"of an earlier run in {self.run_dir}")
            D.barrier(self.dist)
            return 0
        partial = self.ckpt_dir / "partial.pt"
        if partial.is_file():   # checked now, before anything is written, whichever phase it belongs to
            state = torch.load(partial, map_location="cpu", weights_only=False)
            self._check_partial(state, partial)
            self._note_world(state, partial)
        done = sorted(self.ckpt_dir.glob("phase_*.pt"))
        if not done:
            return 0
        last = done[-1]
        try:
            # CPU first: the memory's rankings must stay CPU index tensors (they index CPU label tensors); the
            # model and class means are moved to the device below.
            state = torch.load(last, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a corrupt file must name itself
            raise ConfigError(f"run.resume=auto: checkpoint {last} cannot be read ({type(e).__name__}: {e}); delete it "
                              f"to resume from the phase before, or set run.resume=never") from None
        # Every section that shapes the results must match: resuming a herding run under a mnemonics config (or
        # with other epochs) would silently mix two experiments. Speed/logging-only fields may differ.
        self._check_same(state, last, self._RESUME_SECTIONS, "run.resume=auto",
                         "use another run.name or run.resume=never")
        self.model = build_model(self.cfg.model.arch, self.ds.mean, self.ds.std, structure=state["structure"])
        self.model.load_state_dict(state["model"])
        self.model.to(self.device)
        self.memory.load_state_dict(state["memory"])
        self.class_means = state["class_means"].to(self.device)
        self.metrics.load_state_dict(state["metrics"])
        self.log(f"resumed from {last} (phase {state['phase']} complete)")
        self._note_world(state, last)
        return state["phase"] + 1

    # Every section that shapes the results (and the seed, checked with them).
    _RESUME_SECTIONS = ("protocol", "data", "model", "memory", "method", "train", "mnemonics")
    # Fields that change speed or logging only: they may differ across resume and branch.
    _RESULT_NEUTRAL = {"data": {"num_workers", "cache_dir"},
                       "mnemonics": {"cuda_graph", "exemplar_chunk", "lean_conv_grad", "shard_inner", "compile",
                                     "tf32"},
                       "train": {"eval_batch_size", "cudnn_benchmark", "compile"}}

    def _check_same(self, state: dict, path: Path, sections, what: str, hint: str) -> None:
        mine, defaults = to_dict(self.cfg), to_dict(Config())
        for key in sections:
            # a key added after the checkpoint was written counts as its default (what that run ran with)
            theirs, ours = {**defaults[key], **state["config"].get(key, {})}, dict(mine[key])
            for k in self._RESULT_NEUTRAL.get(key, ()):
                theirs.pop(k, None)
                ours.pop(k, None)
            if theirs != ours:
                diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                raise ConfigError(f"{what}: checkpoint {path} was written with a different '{key}' section "
                                  f"({', '.join(f'{key}.{k}' for k in diff)}); {hint}")
        if state["class_order"] != self.order:
            raise ConfigError(f"{what}: checkpoint {path}: class order differs from this config's")
        if state["config"].get("seed", Config().seed) != self.cfg.seed:
            raise ConfigError(f"{what}: checkpoint {path} was written with seed {state['config'].get('seed')}, this "
                              f"run has seed {self.cfg.seed}; {hint}")

    def _branch(self) -> int:
        """run.branch_from: take another run's phase-0 model level as is and redo phase 0's exemplar level, class
        means and evaluation under this config. Returns the phase to continue at."""
        path = Path(self.cfg.run.branch_from).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / "phase_000.pt"
        if not path.is_file():
            raise ConfigError(f"run.branch_from: {path} is not a file (give a phase_000.pt or its run folder)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["phase"] != 0:
            raise ConfigError(f"run.branch_from: {path} is a phase-{state['phase']} checkpoint; only phase 0 can be "
                              f"branched from (later phases depend on the exemplars a branch changes)")
        self._check_same(state, path, ("protocol", "data", "model", "method", "train"), "run.branch_from",
                         "the base model must be the one this config would train")
        self._save_run_config()
        model = build_model(self.cfg.model.arch, self.ds.mean, self.ds.std, structure=state["structure"])
        model.load_state_dict(state["model"])
        self.model = model.to(self.device)
        src = state["metrics"]["phases"][0]
        self._last_opt = (_Saved(state["optimizer"]), _Saved(state["scheduler"]))
        self.log(f"branched from {path}: phase 0 model level taken as is; redoing its exemplar level")
        t0 = time.perf_counter() - src["train_s"]   # the phase's wall time still counts its (shared) training
        new = self.phases.new_classes(0)
        new_idx = self._new_class_indices(new)
        phase_seed = self._phase_seed(0)
        torch.manual_seed(phase_seed)
        self._close_phase(0, self.model, PhaseInfo(0, new.start, len(new)), new_idx, phase_seed, t0,
                          {"train_s": src["train_s"], "img_per_s": src["train_img_per_s"], "loss": src["final_loss"]},
                          src["epochs"])
        return 1


class _Saved:
    """A saved optimizer/scheduler state standing in for the live object in save_checkpoint."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def run_from_config(cfg: Config, dist_info: D.DistInfo | None = None) -> dict:
    return Trainer(cfg, dist_info).run()


