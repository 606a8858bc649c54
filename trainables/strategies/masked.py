"""Masked (sparse) fine-tuning: only a chosen share of the body's weights moves; the head trains fully.

The mask is chosen once per phase, in ``prepare`` (before the optimizer exists), globally over the
body (every layer group below the head), with an exact count: ``round(fraction * N)`` weights
(at least one) of the body's ``N``:

- ``magnitude``: the largest ``|w|``. The large pretrained weights are those the features lean on
  most (magnitude pruning keeps them for that reason), so they are the analogue of FISH's most
  informative weights; a global ranking favours tensors of large scale (BN's gamma).
- ``fisher``: the largest diagonal of the empirical Fisher, as FISH Mask (Sung et al. 2021): the
  squared gradients of the cross-entropy (true labels) summed over ``fisher_batches`` training
  batches, with the model in eval mode: batch-norm uses (and keeps) its pretrained statistics,
  as it does in training here, and dropout / stochastic depth adds no noise to the scores.
- ``random``: a uniform draw, from the trial's seed (``train.seed`` + the trial's index).
- ``bitfit``: every bias of the body (Zaken et al. 2022), BN's beta included (the additive term
  of its affine: a ResNet's convolutions have no bias, its BN layers hold all of them);
  ``fraction`` is ignored. Every other body weight is frozen.

The optimizer cannot undo the mask: a body tensor without a chosen entry is frozen (not in the
optimizer); one with some has its other entries' gradients zeroed after backward, and after each
step those entries are put back from a copy taken when the mask was set, so neither weight decay
(AdamW's decoupled one, SGD's L2) nor momentum moves them: they stay bit-identical.

Batch-norm: the running statistics of every BN layer stay the pretrained ones (eval mode), since
a mask does not choose them and updating them would change every channel; ``bn: stats_only``
updates them, as for every strategy. ``bn: frozen`` and ``stats_only`` leave BN's affine out of
the body the mask picks from; ``bn: bn_only`` (every BN layer trains) contradicts a mask.

The masks go into checkpoints (1 bit per body weight), since a resumed trial's ``prepare`` sees
other weights than the original one did when the phase is not the first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Literal

from pydantic import Field, model_validator

from trainables.config import StrategyConfig
from trainables.strategies.base import STRATEGIES, Strategy, freeze_frozen_modules
from trainables.strategies.batchnorm import bn_layers

if TYPE_CHECKING:
    import torch
    from torch import nn


class MaskedConfig(StrategyConfig):
    name: Literal["masked"] = "masked"
    method: Literal["magnitude", "fisher", "random", "bitfit"] = "magnitude"
    fraction: float = Field(0.01, gt=0, le=1)  # share of the body's weights that move (bitfit: ignored)
    fisher_batches: int = Field(8, ge=1)  # training batches whose squared gradients are summed

    @model_validator(mode="after")
    def _mask_can_hold(self) -> "MaskedConfig":
        if self.bn == "bn_only":
            raise ValueError("strategy.bn 'bn_only' trains every BN layer, which contradicts a mask; use bn train, "
                             "frozen or stats_only (method bitfit trains BN's biases)")
        return self


@STRATEGIES.register("masked", config=MaskedConfig)
class Masked(Strategy):
    def __init__(self, backbone, cfg: MaskedConfig, lr: float):
        super().__init__(backbone, cfg, lr)
        self.group_of = {p: i for i, g in enumerate(backbone.groups) for p in g.params}
        self.head = set(backbone.head.params)
        self.pool: Dict[str, "nn.Parameter"] = {}  # the body's weights the mask picks from, in order
        self.masks: Dict[str, "torch.Tensor"] = {}  # pool name -> bool tensor (True: moves)

    # ------------------------------------------------------------------ choosing the mask
    def prepare(self, model, batches=None) -> None:
        if self.masks:
            return
        import torch

        named = dict(model.named_parameters())
        skip = set()
        if self.cfg.bn in ("frozen", "stats_only"):  # the BN mode freezes BN's affine
            skip = {id(p) for _, m in bn_layers(model) for p in m.parameters()}
        self.pool = {n: named[n] for g in self.backbone.body for n in g.params if id(named[n]) not in skip}
        if not self.pool:
            raise ValueError("strategy masked: this backbone has no weights below the head to pick from")
        method = self.cfg.method
        if method == "bitfit":
            masks = {n: torch.full_like(p, n.rsplit(".", 1)[-1].endswith("bias"), dtype=torch.bool)
                     for n, p in self.pool.items()}
        else:
            n_all = sum(p.numel() for p in self.pool.values())
            k = max(1, round(self.cfg.fraction * n_all))
            if method == "random":
                g = torch.Generator().manual_seed(torch.initial_seed() * 7919 + 11)  # the trial's seed
                chosen = torch.randperm(n_all, generator=g)[:k]
            else:
                scores = self._fisher(model, batches) if method == "fisher" else \
                    torch.cat([p.detach().abs().flatten() for p in self.pool.values()])
                chosen = torch.topk(scores, k, sorted=False).indices
            flat = torch.zeros(n_all, dtype=torch.bool)
            flat[chosen.cpu()] = True
            masks = self._split(flat)
        self._set_masks(masks)

    def _fisher(self, model, batches) -> "torch.Tensor":
        """The summed squared gradients of the cross-entropy over the pool, flat, in pool order."""
        import torch
        import torch.nn.functional as F

        if batches is None:
            raise ValueError("strategy masked with method fisher needs training batches in prepare(model, batches)")
        params = list(self.pool.values())
        flags = [p.requires_grad for p in params]
        was_training = model.training
        sums = [torch.zeros_like(p) for p in params]
        seen = 0
        try:
            for p in params:
                p.requires_grad_(True)
            model.eval()
            for x, y in batches(self.cfg.fisher_batches):
                loss = F.cross_entropy(model(x).float(), y)
                for s, g in zip(sums, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:  # a weight the loss does not reach scores 0
                        s.add_(g.detach().float().square())
                seen += 1
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        if not seen:
            raise ValueError("strategy masked with method fisher got no training batch to score the weights with")
        return torch.cat([s.flatten() for s in sums])

    def _split(self, flat: "torch.Tensor") -> Dict[str, "torch.Tensor"]:
        """A flat bool vector in pool order as one mask per pool tensor, on its device."""
        out, at = {}, 0
        for n, p in self.pool.items():
            out[n] = flat[at : at + p.numel()].view(p.shape).to(p.device)
            at += p.numel()
        return out

    def _set_masks(self, masks: Dict[str, "torch.Tensor"]) -> None:
        """Take ``masks``; keep the current values of the entries they hold still."""
        self.masks = masks
        self.moving = {n for n, m in masks.items() if bool(m.any())}
        # (parameter, entries that stay, their values): only tensors with some entries of each kind
        self.partial = []
        for n in self.moving:
            stay = ~masks[n]
            if bool(stay.any()):
                p = self.pool[n]
                self.partial.append((p, stay, p.detach()[stay].clone()))
        named = dict(self.backbone.model.named_parameters())
        self.count = sum(int(m.sum()) for m in masks.values()) + sum(named[n].numel() for n in self.head)

    # ------------------------------------------------------------------ policy
    def trainable_groups(self, epoch: int) -> List[int]:
        """The groups that hold a weight that moves, and the head (the feature cache computes
        the groups below the lowest of them once)."""
        if not self.masks:
            raise RuntimeError("strategy masked: no mask yet; prepare(model, batches) chooses it")
        return sorted({self.group_of[n] for n in self.moving} | {self.num_groups - 1})

    def apply(self, model, epoch: int) -> List[int]:
        for n, p in model.named_parameters():
            p.requires_grad_(n in self.head or n in self.moving)
        return self.trainable_groups(epoch)

    def set_modes(self, model) -> None:
        model.train()
        freeze_frozen_modules(model)
        for _, m in bn_layers(model):
            m.train(self.cfg.bn == "stats_only")

    def trainable_count(self, model) -> int:
        return self.count

    # ------------------------------------------------------------------ enforcing it
    def after_backward(self, model) -> None:
        for p, stay, _ in self.partial:
            if p.grad is not None:
                p.grad.masked_fill_(stay, 0.0)

    def after_step(self, model) -> None:
        import torch

        with torch.no_grad():
            for p, stay, kept in self.partial:
                p.masked_scatter_(stay, kept)  # what weight decay and momentum moved goes back

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        import torch

        flat = torch.cat([m.flatten().cpu() for m in self.masks.values()])
        pad = torch.zeros((-flat.numel()) % 8, dtype=torch.bool)
        bits = torch.cat([flat, pad]).view(-1, 8).to(torch.uint8)
        packed = (bits << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1).to(torch.uint8)
        return {"names": list(self.masks), "count": flat.numel(), "bits": packed}

    def load_state_dict(self, state) -> None:
        """The saved masks replace the ones ``prepare`` chose again; the entries they hold
        still keep the values just loaded (the checkpoint's, which are the original ones)."""
        import torch

        if not state:
            return
        if list(state["names"]) != list(self.pool):
            raise RuntimeError("strategy masked: the checkpoint's masks are over other weights than this model's body")
        bits = state["bits"].cpu().to(torch.uint8)
        flat = ((bits[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).bool().flatten()[: int(state["count"])]
        masks = self._split(flat)
        moving = {n for n, m in masks.items() if bool(m.any())}
        if moving != self.moving:
            # the optimizer was built (and its state loaded) for the tensors prepare chose
            raise RuntimeError(f"strategy masked: the checkpoint's masks move other tensors than those chosen "
                               f"again on resume ({sorted(moving ^ self.moving)[:3]}); the run cannot resume exactly")
        self._set_masks(masks)
