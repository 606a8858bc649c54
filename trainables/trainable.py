"""One trial: fine-tune a backbone on a data set, epoch by epoch, with checkpoints.

``FineTuneTrial`` runs without Ray (tests, benchmarks); ``train_trial`` is the thin entry
function Ray Tune calls. Metric keys are namespaced (``train/loss``, ``val/acc``) and are the
same in Ray Tune, ASHA / Optuna and MLflow (trainables/metrics.py).

The training step is open: a strategy may change modules before the optimizer exists
(``prepare``) and act after backward / after the optimizer step (gradient masks); extra losses
are components with their own loaders and state (trainables/losses/) that the step sums with
their weights; a trial may run phases one after the other (trainables/phases.py).
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trainables import metrics as M
from trainables.config import READING_FIELDS, TrialConfig, TrialSections
from trainables.data import build_data
from trainables.data.decode import decodable
from trainables.data.loaders import eval_loader, read_workers, seeded_loader, workers
from trainables.data.transforms import BatchAugment, train_transform
from trainables.losses import LOSSES, SEMI, LossComponent
from trainables.mixing import BatchMix, class_weights
from trainables.models import build_backbone
from trainables.optim import build_optimizer
from trainables.phases import PHASES
from trainables.schedules import group_lr
from trainables.strategies import STRATEGIES, Strategy
from trainables.tasks import Tasks

CHECKPOINT_FILE = "checkpoint.pt"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible to this trial")
    return torch.device(name)


class FineTuneTrial:
    """Setup, train one epoch, evaluate, save and load: everything one trial does."""

    def __init__(self, config: Any):
        self.config = TrialConfig.parse(config)
        self.epoch = 0  # epochs run, over all phases (ASHA's time attribute)
        self.phase_index, self.phase_epoch = 0, 0
        self.last_metrics: Dict[str, float] = {}
        self.setup()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        c = self.config
        self.seed = c.seed
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)
        torch.set_num_threads(max(1, int(c.resources.cpu)))
        self.device = _device(c.train.device)
        cuda = self.device.type == "cuda"
        self.amp = c.train.amp and cuda
        self.channels_last = c.train.channels_last and cuda
        self.pin_memory = cuda
        self.num_workers = workers(c)

        self.phases = c.phases or []
        self.touched: set = set()  # parameters an optimizer of this trial has held
        first = self.sections(0)
        self.data = build_data(first.data)
        self.tasks = Tasks.build(first, self.data)  # targets: several tasks on one head; None: one classification task
        self.backbone = build_backbone(c.model, self.tasks.width if self.tasks else self.data.num_classes)
        self.model = self.backbone.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if c.train.compile:
            # the compiled module shares the model's parameters; state dicts and hooks use the model
            self.compiled = torch.compile(self.model)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(self.backbone.mean, device=self.device).view(shape)
        self.std = torch.tensor(self.backbone.std, device=self.device).view(shape)
        self.scale, self.shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        self.enter_phase(0)

    def sections(self, index: int) -> TrialSections:
        """The sections phase ``index`` runs with (the trial's own when it has no phases)."""
        return self.config.phase_sections(index) if self.phases else self.config

    def phase_epochs(self, index: int) -> int:
        return self.config.phase_epochs(index) if self.phases else self.config.train.epochs

    @property
    def num_phases(self) -> int:
        return max(1, len(self.phases))

    def enter_phase(self, index: int) -> None:
        """Build what phase ``index`` trains with: data, strategy (its ``prepare`` hook runs
        here, before the optimizer exists), optimizer, supervised loss, extra losses, loaders."""
        s = self.sections(index)
        if hasattr(self, "optimizer"):  # what the previous phase trained (the feature cache's key needs it)
            self._touched()
        self.phase_index, self.phase_epoch = index, 0
        self.phase_cfg = s
        kind = self.phases[index].kind if self.phases else "train"
        self.phase = PHASES.get(kind)(self, index)
        if index > 0 and s.data != self.sections(index - 1).data:
            data = build_data(s.data)
            if data.num_classes != self.data.num_classes and not getattr(self.phase, "new_head", False):
                raise ValueError(f"phases.{index}: its data set has {data.num_classes} classes, the trial's head "
                                 f"{self.data.num_classes}; phases of a trial share one head")
            if self.tasks is not None:
                self.tasks.attach(data, s.data.image_size)
            self.data = data
        start = getattr(self.phase, "start", None)
        if start is not None:  # a phase that changes the model (a new head, pruning) does it here
            start()
        t = s.train
        self.strategy = STRATEGIES.get(s.strategy.name)(self.backbone, s.strategy, t.lr)
        self.strategy.prepare(self.model, self.calibration_batches)
        self.active_groups = self.strategy.apply(self.model, 1)
        self.optimizer = build_optimizer(self._new_param_groups(self.active_groups, joined=0), t)

        C = self.data.num_classes
        counts = torch.bincount(torch.as_tensor(self.data.train.targets), minlength=C)
        weights = class_weights(counts, t.class_weighting, t.effective_beta)
        self.loss_weights = None if weights is None else weights.to(self.device)
        a = s.augment
        self.mix = BatchMix(C, a.cutmix_alpha, a.mixup_alpha, a.mix_prob)

        # Every generator of the phase derives from the trial's seed and the phase's index.
        base = self.seed + 1000 * index
        self.generator = torch.Generator().manual_seed(base)
        per_item = None
        if t.sampler == "oversample":  # every class equally likely per draw, with replacement
            per_item = (1.0 / counts.clamp(min=1).double())[torch.as_tensor(self.data.train.targets)]
        transform = train_transform(a, s.data.image_size)
        if self.tasks is not None:  # key points move with the pixels
            transform = self.tasks.train_transform(transform, s.data.image_size)
        self.augment = BatchAugment.of(transform) if a.batched else None
        per_image = transform is not None and self.augment is None  # runs in the workers, on decoded images
        # JPEG files decoded on the device (all splits alike), unless a per-image transform needs the workers to
        on_device = not per_image and decodable(self.data.train, s.data.decode, self.device)
        self.decode_size = s.data.image_size if on_device else None
        self.loaders = {"train": seeded_loader(
            self.data.train, transform, t.batch_size, self.generator,
            read_workers(self.data.train, self.num_workers, per_image), self.pin_memory, per_item,
            augment=self.augment, device=self.device, decode_size=self.decode_size)}
        eval_bs = t.eval_batch_size or 2 * t.batch_size
        for split in ("val", "test"):
            self.loaders[split] = self._eval_loader(getattr(self.data, split), eval_bs)

        self.forward = getattr(self, "compiled", self.model)  # the suffix alone when the frozen prefix's outputs are cached
        self.use_feature_cache(s, index)

        self.components: Dict[str, LossComponent] = {}
        if s.semi.method != "none":
            self.components["semi"] = SEMI.get(s.semi.method)(s.semi, self, base + 1)
        for k, (name, cfg) in enumerate(s.losses.items()):
            self.components[name] = LOSSES.get(name)(cfg, self, base + 2 + k)
        self.components = {k: c for k, c in self.components.items() if c.active}
        for name, comp in self.components.items():  # a component's own weights (a pretext head) train at train.lr
            params = comp.parameters()
            if params:
                self.optimizer.add_param_group({"params": params, "lr": t.lr, "base_lr": t.lr, "joined": 0,
                                                "name": f"losses.{name}"})
        self._probe(t.supervised == "probe")

    def _read_batch(self, images, indices) -> torch.Tensor:
        """Images ``indices`` of ``images`` as one uint8 batch, decoded as the phase decodes them."""
        if self.decode_size:
            from trainables.data.decode import decode_batch, read_bytes

            files = images.files()
            paths = [files[i] for i in indices]
            return decode_batch([read_bytes(f) for f in paths], paths, self.decode_size, self.device)
        return torch.stack([images[i][0] for i in indices])

    def _eval_loader(self, images, batch_size: int):
        """Images in order, read and decoded as the phase's training images are."""
        on_device = self.decode_size and decodable(images, self.phase_cfg.data.decode, self.device)
        return eval_loader(images, batch_size, read_workers(images, self.num_workers), self.pin_memory,
                           device=self.device, decode_size=self.decode_size if on_device else None)

    def _probe(self, on: bool) -> None:
        """train.supervised probe: the head's input is detached, so the supervised loss trains the
        head alone (an online linear probe) and only the extra losses shape the encoder."""
        from trainables.losses.ssl import head_module

        if getattr(self, "_probe_hook", None) is not None:
            self._probe_hook.remove()
        self._probe_hook = None
        if on:
            self._probe_hook = head_module(self.model, self.backbone).register_forward_pre_hook(
                lambda m, args: tuple(a.detach() for a in args))

    def calibration_batches(self, n: int):
        """Up to ``n`` training batches, normalised and on the device, for a strategy's
        ``prepare`` (Fisher masks): drawn with a generator of their own, without augmentation."""
        s = self.phase_cfg
        g = torch.Generator().manual_seed(self.seed * 7907 + 17 + self.phase_index)
        loader = seeded_loader(self.data.train, None, s.train.batch_size, g, 0, False)
        for i, (x, y) in enumerate(loader):
            if i >= n:
                break
            yield self.inputs(x), y.to(self.device, non_blocking=True)

    def use_feature_cache(self, s: TrialSections, index: int) -> bool:
        """Train the phase on the cached outputs of its frozen prefix, when it can: the prefix
        stays frozen all phase, nothing random comes before it (or its views are cached), and
        the model splits there. The loaders then give the prefix's outputs, ``forward`` is the
        suffix. See trainables/features.py."""
        from trainables import features as FC

        self.feature_sets = None
        if getattr(self.phase, "no_feature_cache", False):
            return False
        if any(getattr(LOSSES.get(n), "needs_images", False) and c.weight > 0 for n, c in s.losses.items()):
            return False  # a pretext task makes its views from the images
        st = s.strategy
        k = self.strategy.frozen_prefix(self.phase_epochs(index))
        transform = train_transform(s.augment, s.data.image_size)
        views = st.feature_cache_views if transform is not None else 1
        if st.feature_cache == "off" or k < 1 or views < 1 or self.mix.active:
            return False
        if transform is not None and self.tasks is not None and self.tasks.moves_with_pixels:
            return False  # each view's key points moved with it: the cache keeps one target per image
        split = FC.split_at(self.model, self.backbone.groups, k)
        if split is None or not self._batch_outputs(split):
            return False
        cfg = self.config
        weights = cfg.model.weights
        source = _file_digest(weights) if weights not in ("imagenet", "none") else weights
        prepared = type(self.strategy).prepare is not Strategy.prepare  # a prepare hook may change the prefix
        base = {"v": 1, "model": cfg.model.name, "weights": source, "seed": self.seed if weights == "none" else None,
                "k": k, "data": s.data.model_dump(mode="json", exclude=set(READING_FIELDS)),
                "strategy": st.model_dump(mode="json") if prepared else st.name, "amp": self.amp,
                "device": self.device.type, "channels_last": self.channels_last,
                "decoded_on_device": bool(self.decode_size)}  # nvJPEG's pixels may differ from PIL's by a level
        prefix = [n for g in self.backbone.groups[:k] for n in g.params]
        trained = sorted(set(prefix) & self.touched)  # weights of the prefix an earlier phase trained
        if trained:  # then the prefix is not its source's: key the cache by what the weights are now
            base["trained_prefix"] = _tensor_digest(self.model, trained)
        eval_bs = s.train.eval_batch_size or 2 * s.train.batch_size
        sets = {}
        for split_name in ("train", "val", "test"):
            images = getattr(self.data, split_name)
            augmented = split_name == "train" and transform is not None
            n = views if augmented else 1
            key = FC.key_of({**base, "split": split_name, "views": n,
                             "augment": s.augment.model_dump(mode="json") if augmented else None})
            sets[split_name] = FC.cached_features(
                key, images, getattr(images, "values", images.targets), n,  # tasks' target vectors, or classes
                lambda view, images=images, aug=augmented: self._prefix_outputs(split, images, view, aug, transform, eval_bs))
        t = s.train
        self.loaders = {"train": seeded_loader(sets["train"], None, t.batch_size, self.generator, 0, False,
                                               self.loaders["train"].sampler.weights)}
        for split_name in ("val", "test"):
            self.loaders[split_name] = eval_loader(sets[split_name], eval_bs, 0, False)
        self.feature_sets = sets
        self.forward = split.suffix
        return True

    def _batch_outputs(self, split) -> bool:
        """The prefix gives tensors per image (not sizes or other values of the whole batch)."""
        x, _ = self.data.train[0]
        with torch.no_grad():
            self.model.eval()
            one = split.prefix(self.inputs(x[None]))
            two = split.prefix(self.inputs(torch.stack([x, x])))
        return all(torch.is_tensor(a) and a.shape[:1] == (1,) for a in one) and \
            all(torch.is_tensor(b) and b.shape[:1] == (2,) for b in two)

    @torch.no_grad()
    def _prefix_outputs(self, split, images, view: int, augmented: bool, transform, batch_size: int):
        """The prefix's outputs of every image, in order (eval mode, as the frozen groups run in
        training), for augmentation view ``view`` (each image's transform seeded by the view)."""
        from trainables.data.loaders import SeededView

        self.model.eval()
        if augmented:
            seeds = torch.Generator().manual_seed(self.seed * 7919 + view)
            order = [(i, int(torch.randint(0, 2**62, (), generator=seeds))) for i in range(len(images))]
            batches = (order[i : i + batch_size] for i in range(0, len(order), batch_size))
            augment = BatchAugment.of(transform) if self.phase_cfg.augment.batched else None
            if augment is not None:  # the same views, made on the device
                from trainables.data.loaders import on_device

                loader = ((on_device(augment, self._read_batch(images, [i for i, _ in chunk]), [k for _, k in chunk],
                                     self.device), None) for chunk in batches)
            else:
                keyed = SeededView(images, transform)
                loader = (torch.utils.data.default_collate([keyed[key] for key in chunk]) for chunk in batches)
        else:
            loader = self._eval_loader(images, batch_size)
        for x, _ in loader:
            with self.autocast():
                yield tuple(o.float() if not self.amp else o for o in split.prefix(self.inputs(x)))

    def _new_param_groups(self, indices, joined: float) -> List[Dict[str, Any]]:
        groups = self.strategy.param_groups(self.model, indices)
        for g in groups:
            g["joined"] = joined  # the phase's progress (in epochs) at which the group started training
        return groups

    def _sync_groups(self, epoch: int) -> None:
        """Apply the strategy for the phase's ``epoch``; groups it newly unfreezes join the
        optimizer (existing groups keep their optimizer state)."""
        active = self.strategy.apply(self.model, epoch)
        new = [i for i in active if i not in self.active_groups]
        for g in self._new_param_groups(new, joined=epoch - 1):
            self.optimizer.add_param_group(g)
        self.active_groups = active

    def _set_lrs(self, t: float, step_t: float) -> None:
        cfg = self.phase_cfg.train
        total = float(self.phase_epochs(self.phase_index))
        for g in self.optimizer.param_groups:
            g["lr"] = group_lr(cfg, g["base_lr"], g["joined"], t, total, step_t)

    # ------------------------------------------------------------------ the step
    def inputs(self, x):
        """A uint8 batch as the model's input: on the device, normalised with the backbone's stats
        (cached prefix outputs, a tuple, only go to the device)."""
        if isinstance(x, (tuple, list)):
            return tuple(a.to(self.device, non_blocking=True) for a in x)
        x = x.to(self.device, non_blocking=True)
        # (x / 255 - mean) / std as one scale and one shift, in place on the one float copy
        x = (x.float() if x.dtype != torch.float32 else x.clone()).mul_(self.scale).add_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def supervised_loss(self, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on the labelled batch (mixed with CutMix / MixUp when on): the loss,
        the logits, and the targets accuracy is counted against."""
        target = y
        if self.mix.active:
            x, target = self.mix(x, y)  # soft targets: each row sums to 1
        with self.autocast():
            logits = self.forward(*x) if isinstance(x, tuple) else self.forward(x)
        if self.tasks is not None:  # declared targets: the tasks' weighted losses on their slices of the head
            return self.tasks.loss(logits.float(), y, self.phase_cfg.train.label_smoothing), logits, None
        loss = F.cross_entropy(logits.float(), target, weight=self.loss_weights,
                               label_smoothing=self.phase_cfg.train.label_smoothing)
        return loss, logits, (y if target is y else target.argmax(1))

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One optimizer step: the supervised loss plus every component's weighted loss."""
        loss, logits, hard = self.supervised_loss(x, y)
        for comp in self.components.values():
            loss = loss + comp.weight * comp.loss(x, y)
            comp.step_done()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.after_backward(self.model)
        self.optimizer.step()
        self.strategy.after_step(self.model)
        return loss.detach(), (logits.argmax(1) == hard).sum() if hard is not None else loss.new_zeros((), dtype=torch.long)

    def train_one_epoch(self) -> Dict[str, float]:
        self.epoch += 1
        self.phase_epoch += 1
        fail = self.phase_cfg.train.fail_at_epoch
        if fail == self.epoch:
            raise RuntimeError(f"train.fail_at_epoch={self.epoch}: this trial was asked to fail (a fault-tolerance test)")
        _test_fault(self.epoch)
        self._sync_groups(self.phase_epoch)
        self.strategy.set_modes(self.model)
        if self.feature_sets:
            self.feature_sets["train"].use_view(self.phase_epoch - 1)
        # Sums stay on the device: no host sync per step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        # A non-finite loss stops the trial at once: checked every step on CPU, every 20 steps on
        # CUDA, where each check is a host sync.
        check_every = 20 if self.device.type == "cuda" else 1
        steps = max(len(self.loaders["train"]), 1)
        e = self.phase_epoch - 1
        self._set_lrs(e, e)
        head = self.backbone.head.name  # groups that unfreeze later come after the head's
        lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == head)
        step = 0
        for step, (x, y) in enumerate(self.loaders["train"]):
            t0 = e + step / steps
            self._set_lrs(t0, t0 + 1.0 / steps)
            x, y = self.inputs(x), y.to(self.device, non_blocking=True)
            loss, right = self.train_step(x, y)
            loss_sum += loss * len(y)
            correct += right
            seen += len(y)
            if step % check_every == 0:
                self._check_finite(loss_sum, step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self._check_finite(loss_sum, step)
        out: Dict[str, float] = {}
        for comp in self.components.values():
            out.update(comp.epoch_metrics())
        out.update({
            M.EPOCH: self.epoch,
            M.TRAIN_LOSS: loss_sum.item() / max(seen, 1),
            M.TRAIN_ACC: correct.item() / max(seen, 1),
            M.TRAIN_LR: lr,  # the head's LR at the start of the epoch
            M.TRAINABLE_GROUPS: len(self.active_groups),
            M.IMAGES_PER_S: seen / max(elapsed, 1e-9),
        })
        out.update(self.size_metrics())
        if self.tasks is not None:  # each task's loss; there is no one accuracy
            del out[M.TRAIN_ACC]
            out.update(self.tasks.epoch_metrics())
        return out

    def size_metrics(self) -> Dict[str, float]:
        """The model's trainable and total parameter counts (the strategy's count: LoRA's
        adapters and the head, a mask's unmasked weights) and the peak memory of training so far
        (CUDA: the device's peak allocation; CPU: the process's peak resident set)."""
        total = sum(p.numel() for p in self.model.parameters())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            peak = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
        return {M.PARAMS_TRAINABLE: float(self.strategy.trainable_count(self.model)),
                M.PARAMS_TOTAL: float(total), M.PEAK_MEM_MB: float(peak)}

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"loss is {loss_sum.item()} at epoch {self.epoch}, by step {step}: the trial is stopped "
                "(lower train.lr, or check the data)"
            )

    @torch.no_grad()
    def evaluate(self, split: str = M.VAL) -> Dict[str, float]:
        """Loss, accuracy, balanced accuracy and macro-F1 (and per class, and reduced vs other
        classes, when asked or when data.class_fraction cut some classes down)."""
        if self.tasks is not None:  # declared targets: each task's metrics (trainables/tasks.py)
            return self.tasks.evaluate(self, split)
        self.model.eval()
        C = self.data.num_classes
        confusion = torch.zeros(C, C, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        for x, y in self.loaders[split]:
            x, y = self.inputs(x), y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = (self.forward(*x) if isinstance(x, tuple) else self.forward(x)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            confusion += torch.bincount(y * C + logits.argmax(1), minlength=C * C).view(C, C)
        per_class = self.phase_cfg.train.per_class_metrics or bool(self.data.reduced)
        return M.confusion_metrics(confusion.cpu(), loss_sum.item(), split, self.data.classes, self.data.reduced,
                                   per_class=per_class)

    # ------------------------------------------------------------------ checkpoints
    def _touched(self) -> set:
        """The parameters that have been in an optimizer of this trial (so may have changed)."""
        ids = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        self.touched |= {n for n, p in self.model.named_parameters() if id(p) in ids}
        return self.touched

    def _frozen_digest(self, touched: set) -> str:
        """A fingerprint of the parameters never trained: a lean checkpoint restores them from
        their source (the pretrained weights, or the seed), and checks they are what it left."""
        import hashlib

        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            if name not in touched:
                t = p.detach().double()
                h.update(f"{name}:{tuple(p.shape)}:{float(t.sum()):.10e}:{float((t * t).sum()):.10e}".encode())
        return h.hexdigest()

    def save(self, directory: str, complete: bool = False) -> None:
        """Everything a resumed trial needs to retrace an uninterrupted one: the weights that
        trained and every buffer (the frozen weights come back from their source: the
        pretrained weights or the seed), the optimizer, every component's and the strategy's
        state, every RNG. ``complete`` saves every weight (the trial's last checkpoint, the
        model one exports or starts another trial from)."""
        touched = self._touched()
        full = self.model.state_dict()
        params = dict(self.model.named_parameters())
        lean = {k: v for k, v in full.items() if k not in params or k in touched}
        torch.save(
            {
                "model": full if complete else lean,
                "touched": sorted(touched),
                "frozen_digest": self._frozen_digest(touched),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
                "phase": self.phase_index,
                "phase_epoch": self.phase_epoch,
                "strategy": self.strategy.state_dict(),
                "phase_state": self.phase.state_dict() if hasattr(self.phase, "state_dict") else {},
                "components": {k: c.state_dict() for k, c in self.components.items()},
                "rng": rng_state(),
                "loader_rng": self.generator.get_state(),
                "metrics": self.last_metrics,
            },
            Path(directory) / CHECKPOINT_FILE,
        )

    def load(self, directory: str) -> None:
        path = Path(directory) / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} does not load ({type(e).__name__}: {e})") from e
        if state["phase"] != self.phase_index:
            self.enter_phase(state["phase"])
        if hasattr(self.phase, "load_state_dict"):  # before the weights: a phase may change the model's shapes
            self.phase.load_state_dict(state.get("phase_state", {}))
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        touched = set(state.get("touched", []))
        if unexpected or set(missing) & touched or self._frozen_digest(touched) != state["frozen_digest"]:
            raise RuntimeError(f"checkpoint {path} does not fit this trial: its frozen weights came from other "
                               f"weights than {self.config.model.weights!r} (or it lacks {sorted(set(missing) & touched)[:5]})")
        self.touched = touched
        if self.feature_sets is not None and self.phase_index > 0:
            # the prefix's outputs again, from the weights just loaded (an earlier phase may have trained them)
            self.use_feature_cache(self.phase_cfg, self.phase_index)
        self.epoch = int(state["epoch"])
        for epoch in range(1, int(state["phase_epoch"]) + 1):  # param groups as they were, in the order they joined
            self._sync_groups(epoch)
        self.phase_epoch = int(state["phase_epoch"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        for k, c in self.components.items():
            c.load_state_dict(state["components"][k])
        set_rng_state(state["rng"])
        self.generator.set_state(state["loader_rng"].cpu())
        self.last_metrics = dict(state.get("metrics", {}))

    # ------------------------------------------------------------------ driver
    @property
    def total_epochs(self) -> int:
        return self.config.total_epochs

    def fit(self, report: Callable[[Dict[str, float], Optional[str]], None], checkpoint: bool = True) -> None:
        """Run the remaining epochs of every phase; after each, ``report(metrics, checkpoint_dir_or_None)``.

        The last epoch of a phase also carries the test-split metrics (``test/acc``); with
        phases, that epoch repeats the phase's val and test metrics under ``<phase>/``.
        """
        if self.epoch >= self.total_epochs and self.last_metrics:
            # restored from the final checkpoint (the driver died as the trial ended): say so again
            report(self.last_metrics, None)
            return
        while self.epoch < self.total_epochs:
            if self.phase_epoch >= self.phase_epochs(self.phase_index):
                self.enter_phase(self.phase_index + 1)
                continue
            metrics = self.phase.run_epoch()
            if self.phase_epoch == self.phase_epochs(self.phase_index):
                metrics.update(self.phase.finish())
                if self.phases:
                    name = self.phases[self.phase_index].name
                    metrics.update({f"{name}/{k}": v for k, v in list(metrics.items())
                                    if k.startswith((M.VAL + "/", M.TEST + "/"))})
            self.last_metrics = metrics
            if not checkpoint:
                report(metrics, None)
                continue
            with tempfile.TemporaryDirectory(prefix="tl-sweep-ckpt-") as d:
                # a phase that changed the model's shapes (pruning) saves every weight
                complete = self.epoch == self.total_epochs or getattr(self.phase, "complete_checkpoints", False)
                self.save(d, complete=complete)
                metrics[M.CHECKPOINT_MB] = (Path(d) / CHECKPOINT_FILE).stat().st_size / 2**20
                report(metrics, d)


def _tensor_digest(model: torch.nn.Module, names) -> str:
    """A fingerprint of the bytes of the named parameters."""
    import hashlib

    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for n in names:
        h.update(n.encode())
        h.update(params[n].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> Dict[str, Any]:
    """Every global RNG's state, in a form ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# Fault injection for the tests of retries (a test-only variable: TL_SWEEP_TEST_FAIL_ONCE=<epoch>:<dir>).
def _test_fault(epoch: int) -> None:
    import os

    spec = os.environ.get("TL_SWEEP_TEST_FAIL_ONCE")
    if not spec:
        return
    at, _, folder = spec.partition(":")
    if int(at) != epoch:
        return
    marker = Path(folder) / "failed-once"
    if marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"TL_SWEEP_TEST_FAIL_ONCE: this trial fails once at epoch {epoch} (a retry test)")


def train_trial(config: dict, broker: Optional[str] = None) -> None:
    """Ray Tune entry point: resume from the trial's last checkpoint, then report every epoch.
    ``broker`` names the actor that holds the credentials the driver hands to its trials."""
    import ray
    from ray import tune

    from trainables.secrets import apply

    apply(broker)
    trial = FineTuneTrial(config)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trial.load(d)
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: Dict[str, float], directory: Optional[str]) -> None:
        metrics = dict(metrics, **{M.NODE_ID: node})  # where the trial ran (a tag in MLflow)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    trial.fit(report)
