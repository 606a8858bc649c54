"""Semi-supervised use of the unlabelled training images (``semi.method``).

- ``pseudo_label`` (Lee 2013): the model's confident predictions on weakly augmented
  unlabelled images become their labels.
- ``fixmatch`` (Sohn et al. 2020): a confident prediction on a weak view is the label of a
  strongly augmented view of the same image.

Only predictions with confidence >= ``threshold`` count; the unlabelled loss is weighted by
``unlabeled_weight`` and ``unlabeled_ratio`` unlabelled images are drawn per labelled one.
"""
from __future__ import annotations

from trainables.config import SemiConfig
from trainables.losses.base import SEMI, LossComponent, next_batch


class Unlabeled(LossComponent):
    """What both methods share: a loader of views of the unlabelled pool."""

    strong = False

    def __init__(self, cfg: SemiConfig, trial, seed: int):
        super().__init__(cfg, trial, seed)
        from trainables.data.loaders import seeded_loader
        from trainables.data.transforms import strong_transform, weak_transform

        pool = trial.data.unlabeled
        self.pool_size = 0 if pool is None else len(pool)
        if not self.pool_size:
            return
        size = trial.config.data.image_size
        weak = weak_transform(size)
        strong = strong_transform(size) if self.strong else None
        views = (lambda x: (weak(x), strong(x))) if strong is not None else weak
        batch = max(1, int(round(cfg.unlabeled_ratio * trial.config.train.batch_size)))
        self.loader = seeded_loader(pool, views, batch, self.generator, trial.num_workers, trial.pin_memory)

    @property
    def weight(self) -> float:
        return float(self.cfg.unlabeled_weight)

    @property
    def active(self) -> bool:
        return self.pool_size > 0

    def masked_loss(self, logits, probs):
        import torch.nn.functional as F

        conf, pseudo = probs.max(1)
        mask = (conf >= self.cfg.threshold).float()
        loss = (F.cross_entropy(logits, pseudo, reduction="none") * mask).mean()
        self.track(unlabeled_loss=loss, mask_rate=mask.mean())
        return loss


@SEMI.register("pseudo_label")
class PseudoLabel(Unlabeled):
    def loss(self, x, y):
        weak, _ = next_batch(self)
        t = self.trial
        with t.autocast():
            logits = t.model(t.inputs(weak)).float()
        return self.masked_loss(logits, logits.detach().softmax(1))


@SEMI.register("fixmatch")
class FixMatch(Unlabeled):
    strong = True

    def loss(self, x, y):
        import torch

        (weak, strong), _ = next_batch(self)
        t = self.trial
        with torch.no_grad(), t.autocast():
            probs = t.model(t.inputs(weak)).float().softmax(1)
        with t.autocast():
            logits = t.model(t.inputs(strong)).float()
        return self.masked_loss(logits, probs)
