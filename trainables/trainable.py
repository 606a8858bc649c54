"""One trial: fine-tune a backbone on a data set, epoch by epoch, with checkpoints.

``FineTuneTrial`` runs without Ray (tests, benchmarks); ``train_trial`` is the thin entry
function Ray Tune calls. Metric keys are namespaced (``train/loss``, ``val/acc``) and are the
same in Ray Tune, ASHA / Optuna and MLflow.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, WeightedRandomSampler

from trainables.augment import Augmented, BatchMix, build_train_transform, class_weights

from trainables.data import build_data
from trainables.models import build_backbone
from trainables.optim import build_optimizer
from trainables.schedules import group_lr
from trainables.semi import Views, unlabeled_loss
from trainables.strategies import STRATEGIES

CHECKPOINT_FILE = "checkpoint.pt"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible to this trial")
    return torch.device(name)


class FineTuneTrial:
    """Setup, train one epoch, evaluate, save and load: everything one trial does."""

    def __init__(self, config: dict):
        self.config = config
        self.data_cfg, self.model_cfg = config["data"], config["model"]
        self.strategy_cfg, self.train_cfg = config["strategy"], config["train"]
        self.epoch = 0
        self.last_metrics: Dict[str, float] = {}
        self.setup()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        t = self.train_cfg
        seed = int(t.get("seed", 0))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        threads = self.config.get("resources", {}).get("cpu")
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = _device(t.get("device", "auto"))
        cuda = self.device.type == "cuda"
        self.amp = bool(t.get("amp", True)) and cuda
        self.channels_last = bool(t.get("channels_last", True)) and cuda

        self.data = build_data(self.data_cfg)
        self.backbone = build_backbone(self.model_cfg, self.data.num_classes)
        self.model = self.backbone.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(self.backbone.mean, device=self.device).view(shape)
        self.std = torch.tensor(self.backbone.std, device=self.device).view(shape)

        self.strategy = STRATEGIES.get(self.strategy_cfg.get("name", "unfreeze_last"))(
            self.backbone, self.strategy_cfg, float(t["lr"])
        )
        self.active_groups = self.strategy.apply(self.model, 1)
        self.optimizer = build_optimizer(self._new_param_groups(self.active_groups, joined=0), t)

        C = self.data.num_classes
        counts = torch.bincount(torch.as_tensor(self.data.train.targets), minlength=C)
        weights = class_weights(counts, t.get("class_weighting", "none"), float(t.get("effective_beta", 0.999)))
        self.loss_weights = None if weights is None else weights.to(self.device)
        self.label_smoothing = float(t.get("label_smoothing", 0.0))
        self.mix = BatchMix(C, float(t.get("cutmix_alpha", 0.0)), float(t.get("mixup_alpha", 0.0)),
                            float(t.get("mix_prob", 1.0)))
        transform = build_train_transform(self.data_cfg)
        train_set = Augmented(self.data.train, transform) if transform else self.data.train

        workers = int(self.data_cfg.get("num_workers", 0))
        common = dict(num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)
        self.generator = torch.Generator().manual_seed(seed)
        if t.get("sampler", "uniform") == "oversample":
            # every class equally likely per draw: rare classes are seen again, with replacement
            per_item = (1.0 / counts.clamp(min=1).double())[torch.as_tensor(self.data.train.targets)]
            order = dict(sampler=WeightedRandomSampler(per_item, len(per_item), replacement=True, generator=self.generator))
        else:
            order = dict(shuffle=True, generator=self.generator)
        self.loaders = {
            "train": DataLoader(train_set, batch_size=int(t["batch_size"]), drop_last=False, **order, **common),
        }
        semi = self.config.get("semi") or {}
        unlabeled = self.data.unlabeled
        self.semi_method = semi.get("method", "none") if unlabeled is not None and len(unlabeled) else "none"
        self.semi_cfg = semi
        self.u_generator = torch.Generator().manual_seed(seed + 1)
        if self.semi_method != "none":
            views = Views(unlabeled, int(self.data_cfg["image_size"]), strong=self.semi_method == "fixmatch")
            u_batch = max(1, int(round(float(semi.get("unlabeled_ratio", 1.0)) * int(t["batch_size"]))))
            self.loaders["unlabeled"] = DataLoader(views, batch_size=u_batch, shuffle=True, generator=self.u_generator, **common)
        eval_bs = int(t.get("eval_batch_size") or 2 * int(t["batch_size"]))
        for split in ("val", "test"):
            self.loaders[split] = DataLoader(getattr(self.data, split), batch_size=eval_bs, shuffle=False, **common)

    def _new_param_groups(self, indices, joined: int):
        groups = self.strategy.param_groups(self.model, indices)
        for g in groups:
            g["joined"] = joined  # the epoch (as progress) at which the group started training
        return groups

    def _sync_groups(self, epoch: int) -> None:
        """Apply the strategy for ``epoch``; groups it newly unfreezes join the optimizer
        (existing groups keep their optimizer state)."""
        active = self.strategy.apply(self.model, epoch)
        new = [i for i in active if i not in self.active_groups]
        for g in self._new_param_groups(new, joined=epoch - 1):
            self.optimizer.add_param_group(g)
        self.active_groups = active

    def _set_lrs(self, t: float, step_t: float) -> None:
        total = float(self.train_cfg["epochs"])
        for g in self.optimizer.param_groups:
            g["lr"] = group_lr(self.train_cfg, g["base_lr"], g["joined"], t, total, step_t)

    # ------------------------------------------------------------------ loops
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_one_epoch(self) -> Dict[str, float]:
        self.epoch += 1
        if self.train_cfg.get("fail_at_epoch") == self.epoch:
            raise RuntimeError(f"train.fail_at_epoch={self.epoch}: this trial was asked to fail (a fault-tolerance test)")
        self._sync_groups(self.epoch)
        self.strategy.set_modes(self.model)
        # Sums stay on the device: no host sync per step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        # A non-finite loss stops the trial at once: checked every step on CPU, every 20 steps on
        # CUDA, where each check is a host sync.
        check_every = 20 if self.device.type == "cuda" else 1
        steps = max(len(self.loaders["train"]), 1)
        semi = self.semi_method != "none"
        u_iter = iter(self.loaders["unlabeled"]) if semi else None
        u_loss_sum = torch.zeros((), device=self.device)
        mask_sum = torch.zeros((), device=self.device)
        self._set_lrs(self.epoch - 1, self.epoch - 1)
        head = self.backbone.head.name  # groups that unfreeze later come after the head's
        lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == head)
        for step, (x, y) in enumerate(self.loaders["train"]):
            t0 = self.epoch - 1 + step / steps
            self._set_lrs(t0, t0 + 1.0 / steps)
            x, y = self._inputs(x), y.to(self.device, non_blocking=True)
            soft = None
            if self.mix.active:
                x, soft = self.mix(x, y)  # soft targets: each row sums to 1
            with self._autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y if soft is None else soft, weight=self.loss_weights,
                                       label_smoothing=self.label_smoothing)
            if semi:
                try:
                    views = next(u_iter)
                except StopIteration:  # the unlabelled pool runs out before the labelled one: again
                    u_iter = iter(self.loaders["unlabeled"])
                    views = next(u_iter)
                weak, strong = views if self.semi_method == "fixmatch" else (views, None)
                lu, rate = unlabeled_loss(self.model, self._inputs(weak), None if strong is None else self._inputs(strong),
                                          self.semi_method, float(self.semi_cfg.get("threshold", 0.95)), self._autocast)
                loss = loss + float(self.semi_cfg.get("unlabeled_weight", 1.0)) * lu
                u_loss_sum += lu.detach()
                mask_sum += rate
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == (y if soft is None else soft.argmax(1))).sum()
            seen += len(y)
            if step % check_every == 0:
                self._check_finite(loss_sum, step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self._check_finite(loss_sum, step)
        extra = {"train/unlabeled_loss": u_loss_sum.item() / steps, "train/mask_rate": mask_sum.item() / steps} if semi else {}
        return {
            **extra,
            "epoch": self.epoch,
            "train/loss": loss_sum.item() / max(seen, 1),
            "train/acc": correct.item() / max(seen, 1),
            "train/lr": lr,  # the head's LR at the start of the epoch
            "train/trainable_groups": len(self.active_groups),
            "images_per_s": seen / max(elapsed, 1e-9),
        }

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"loss is {loss_sum.item()} at epoch {self.epoch}, by step {step}: the trial is stopped "
                "(lower train.lr, or check the data)"
            )

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> Dict[str, float]:
        """Loss, accuracy, balanced accuracy and macro-F1 (and per class, and reduced vs other
        classes, when asked or when data.class_fraction cut some classes down)."""
        self.model.eval()
        C = self.data.num_classes
        confusion = torch.zeros(C, C, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        for x, y in self.loaders[split]:
            x, y = self._inputs(x), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            confusion += torch.bincount(y * C + logits.argmax(1), minlength=C * C).view(C, C)
        return confusion_metrics(confusion.cpu(), loss_sum.item(), split, self.data.classes, self.data.reduced,
                                 per_class=bool(self.train_cfg.get("per_class_metrics")) or bool(self.data.reduced))

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
                "torch_rng": torch.get_rng_state(),
                "loader_rng": self.generator.get_state(),
                "unlabeled_rng": self.u_generator.get_state(),
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
        self.model.load_state_dict(state["model"])
        self.epoch = int(state["epoch"])
        for epoch in range(1, self.epoch + 1):  # param groups as they were, in the order they joined
            self._sync_groups(epoch)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.generator.set_state(state["loader_rng"].cpu())
        self.u_generator.set_state(state["unlabeled_rng"].cpu())
        self.last_metrics = dict(state.get("metrics", {}))

    # ------------------------------------------------------------------ driver
    def fit(self, report: Callable[[Dict[str, float], Optional[str]], None], checkpoint: bool = True) -> None:
        """Run the remaining epochs; after each, ``report(metrics, checkpoint_dir_or_None)``.

        The last epoch also carries the test-split metrics (``test/acc``).
        """
        epochs = int(self.train_cfg["epochs"])
        if self.epoch >= epochs and self.last_metrics:
            # restored from the final checkpoint (the driver died as the trial ended): say so again
            report(self.last_metrics, None)
            return
        while self.epoch < epochs:
            metrics = self.train_one_epoch()
            metrics.update(self.evaluate("val"))
            if self.epoch == epochs:
                metrics.update(self.evaluate("test"))
            self.last_metrics = metrics
            if not checkpoint:
                report(metrics, None)
                continue
            with tempfile.TemporaryDirectory(prefix="tl-sweep-ckpt-") as d:
                self.save(d)
                report(metrics, d)


def confusion_metrics(confusion: torch.Tensor, loss_sum: float, split: str, classes, reduced, per_class: bool):
    """Metrics from a confusion matrix (rows: true class, columns: predicted)."""
    seen = int(confusion.sum())
    support = confusion.sum(1)
    tp = confusion.diag().double()
    recall = tp / support.clamp(min=1)
    precision = tp / confusion.sum(0).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = support > 0
    out = {
        f"{split}/loss": loss_sum / max(seen, 1),
        f"{split}/acc": float(tp.sum()) / max(seen, 1),
        f"{split}/balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
        f"{split}/macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    if per_class:
        for c, name in enumerate(classes):
            if present[c]:
                out[f"{split}/acc_per_class/{name}"] = float(recall[c])
    if reduced:
        mask = torch.zeros(len(classes), dtype=torch.bool)
        mask[list(reduced)] = True
        for label, m in (("reduced", mask), ("rest", ~mask)):
            n = int(support[m].sum())
            if n:
                out[f"{split}/acc_{label}"] = float(tp[m].sum()) / n
    return out


def train_trial(config: dict) -> None:
    """Ray Tune entry point: resume from the trial's last checkpoint, then report every epoch."""
    from ray import tune

    import ray

    trial = FineTuneTrial(config)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trial.load(d)
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: Dict[str, float], directory: Optional[str]) -> None:
        metrics = dict(metrics, node_id=node)  # where the trial ran (a tag in MLflow)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    trial.fit(report)
