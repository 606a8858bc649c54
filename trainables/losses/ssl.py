"""Self-supervised pretext tasks as loss components (``losses: {rotation | colorize | simclr: ...}``).

- ``rotation`` (Gidaris et al. 2018): each image is turned by 0, 90, 180 or 270 degrees (drawn
  per image); a linear head on the encoder's features says which (4-way cross-entropy).
- ``colorize`` (after Zhang et al. 2016): the grayscale view goes through the encoder; a small
  decoder turns the pooled feature vector into a coarse ``decoder_size`` x ``decoder_size``
  colour map, upsampled (bilinear) to the input size, which predicts the original colours:
  RGB in [0, 1], or Lab's a and b (/128); L1 or L2 per pixel.
- ``simclr`` (Chen et al. 2020): two augmented views of each image, an MLP projection head,
  NT-Xent at ``temperature`` over the 2N views.

Listing two trains both (rotation + colorize: the combination). A component's ``weight`` is
lambda: beside the supervised loss it is joint training (Chhipa et al. 2023, "functional
knowledge transfer"); with ``train.supervised: probe`` only these losses shape the encoder
(pre-training; the supervised head is an online linear probe on detached features).

Features are the input of the supervised head module (the pooled vector of every torchvision
and timm classifier), caught by a forward pre-hook put first, so the probe's detaching hook
does not cut them. The pretext heads are the component's own weights: one optimizer param group
at ``train.lr``, and part of the component's checkpoint state.

Images (``source``): the step's labelled batch, ``unlabeled_ratio`` x batch size of the images
``data.label_fraction`` left unlabelled (drawn with the component's own generator, anew each
epoch), or both. Views are made on the device from the pixels; every random draw comes from the
component's generator, which is checkpointed: a resumed trial draws the same views. Weight 0
leaves a component out: the trial trains exactly as without it. No torch at module level.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional

from pydantic import Field

from trainables.config import LossConfig
from trainables.losses.base import LOSSES, LossComponent, next_batch

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainables.models import Backbone
    from trainables.trainable import FineTuneTrial


class PretextConfig(LossConfig):
    """What every pretext task takes."""

    weight: float = Field(1.0, ge=0)  # lambda (0: left out)
    source: Literal["labeled", "unlabeled", "both"] = "both"  # whose images the pretext task sees
    unlabeled_ratio: float = Field(1.0, gt=0)  # unlabelled images per labelled one in a step (unlabeled, both)


class RotationConfig(PretextConfig):
    name: Literal["rotation"] = "rotation"


class ColorizeConfig(PretextConfig):
    name: Literal["colorize"] = "colorize"
    space: Literal["rgb", "lab"] = "lab"  # predict RGB, or Lab's a and b
    loss: Literal["l1", "l2"] = "l1"
    decoder_size: int = Field(8, ge=1, le=64)  # side of the decoded colour map, upsampled to the input


class SimCLRConfig(PretextConfig):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0)  # NT-Xent's tau (SimCLR's CIFAR-10 value)
    projection_dim: int = Field(128, ge=1)
    hidden_dim: int = Field(512, ge=1)  # the projection MLP's hidden width
    strength: float = Field(1.0, ge=0, le=1)  # colour distortion s: brightness / contrast / saturation 0.8 s
    crop_scale_min: float = Field(0.08, gt=0, le=1)  # random resized crop's smallest area


# --------------------------------------------------------------------------- pieces (tested on their own)


def head_module(model: "nn.Module", backbone: "Backbone") -> "nn.Module":
    """The module that holds the supervised head's parameters (``fc``, ``classifier``,
    ``head.fc``): its input is the encoder's feature vector."""
    owners = set()
    for p in backbone.head.params:
        owner = p.rpartition(".")[0]
        owners.add(owner.split(".parametrizations.")[0].removesuffix(".parametrizations"))  # LoRA's names
    parts = [o.split(".") for o in owners]
    common: List[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if not common:
        raise ValueError(f"the head's parameters {backbone.head.params[:3]} share no module: no feature vector to "
                         "put a pretext head on")
    return model.get_submodule(".".join(common))


def feature_dim(head: "nn.Module") -> int:
    """Width of the head's input: a Linear's in_features or a 1x1 Conv2d's in_channels (the first
    such layer of a head made of several)."""
    from torch import nn

    for m in [head, *head.modules()]:
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"the head {type(head).__name__} has no Linear or Conv2d layer: its input width is unknown")


def nt_xent(z1: "torch.Tensor", z2: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """SimCLR's NT-Xent: over the 2N normalised projections, each view's cross-entropy of its
    partner against the 2N - 2 other views, at ``temperature``; the mean over the 2N."""
    import torch
    import torch.nn.functional as F

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def rotate(images: "torch.Tensor", k: "torch.Tensor") -> "torch.Tensor":
    """Each image turned counter-clockwise by ``k[i]`` x 90 degrees (square images)."""
    import torch

    out = images.clone()
    for r in range(1, 4):
        idx = (k == r).nonzero().flatten().to(images.device)
        if len(idx):
            out[idx] = torch.rot90(images[idx], r, dims=(2, 3))
    return out


def rgb_to_lab(rgb: "torch.Tensor") -> "torch.Tensor":
    """sRGB in [0, 1] (N, 3, H, W) to CIE Lab (D65): L in [0, 100], a and b about [-128, 127]."""
    import torch

    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp(min=1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


def grayscale(rgb: "torch.Tensor") -> "torch.Tensor":
    """ITU-R 601 luma, repeated on three channels (the encoder takes RGB)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.rgb_to_grayscale(rgb, num_output_channels=3)


# --------------------------------------------------------------------------- the components


class Pretext(LossComponent):
    """What the pretext tasks share: their head, their images, the encoder's features."""

    needs_images = True  # the trial keeps the frozen-prefix feature cache off while one has weight > 0

    def __init__(self, cfg: PretextConfig, trial: "FineTuneTrial", seed: int):
        super().__init__(cfg, trial, seed)
        self.head: Optional["nn.Module"] = None
        self.loader = None
        if not self.active:
            return
        import torch

        from trainables.data.loaders import read_workers, seeded_loader

        t = trial
        self.encoder_head = head_module(t.model, t.backbone)
        with torch.random.fork_rng(devices=[]):  # the head's init leaves the trial's RNG alone
            torch.manual_seed(seed)
            self.head = self.build_head(feature_dim(self.encoder_head)).to(t.device)
        pool = t.data.unlabeled
        size = 0 if pool is None else len(pool)
        if cfg.source == "unlabeled" and not size:
            raise ValueError(f"losses.{cfg.name}.source: unlabeled, but no training image is unlabelled "
                             "(data.label_fraction is 1); use source both or labeled, or a label_fraction below 1")
        if cfg.source != "labeled" and size:
            batch = max(1, int(round(cfg.unlabeled_ratio * t.phase_cfg.train.batch_size)))
            self.loader = seeded_loader(pool, None, batch, self.generator, read_workers(pool, t.num_workers),
                                        t.pin_memory)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def build_head(self, dim: int) -> "nn.Module":
        raise NotImplementedError

    def parameters(self) -> List["nn.Parameter"]:
        return list(self.head.parameters()) if self.head is not None else []

    # ------------------------------------------------------------------ images and features
    def images(self, x: "torch.Tensor") -> "torch.Tensor":
        """This step's images as pixels in [0, 1] on the device (labelled, unlabelled, or both)."""
        import torch

        t = self.trial
        parts = []
        if self.cfg.source != "unlabeled":
            parts.append((x.float() * t.std + t.mean).clamp(0, 1))
        if self.loader is not None:
            u, _ = next_batch(self)
            parts.append(u.to(t.device, non_blocking=True).float().div(255.0))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        import torch

        t = self.trial
        x = (pixels - t.mean) / t.std
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    def features(self, x: "torch.Tensor") -> "torch.Tensor":
        """The encoder's features of ``x`` (normalised): what the supervised head receives."""
        t = self.trial
        caught: List[Any] = []
        hook = self.encoder_head.register_forward_pre_hook(lambda m, args: caught.append(args[0]), prepend=True)
        try:
            with t.autocast():
                t.model(x)
        finally:
            hook.remove()
        f = caught[0].float()
        return f.flatten(2).mean(2) if f.dim() > 2 else f  # a convolutional head's input, pooled

    # ------------------------------------------------------------------ epochs and checkpoints
    def epoch_metrics(self) -> Dict[str, float]:
        self._iter = None  # the unlabelled order is drawn anew each epoch from the checkpointed generator
        return super().epoch_metrics()

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self.head is not None:
            state["head"] = self.head.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.head is not None:
            self.head.load_state_dict(state["head"])

    def uniform(self, n: int) -> "torch.Tensor":
        import torch

        return torch.rand(n, generator=self.generator)


@LOSSES.register("rotation", config=RotationConfig)
class Rotation(Pretext):
    """Which of four rotations an image went through."""

    def build_head(self, dim):
        from torch import nn

        return nn.Linear(dim, 4)

    def views(self, pixels: "torch.Tensor"):
        """The rotated images and their labels (the number of quarter turns)."""
        import torch

        k = torch.randint(0, 4, (pixels.shape[0],), generator=self.generator)
        return rotate(pixels, k), k.to(pixels.device)

    def loss(self, x, y):
        import torch.nn.functional as F

        images, labels = self.views(self.images(x))
        logits = self.head(self.features(self.normalize(images)))
        value = F.cross_entropy(logits, labels)
        self.track(rotation_loss=value, rotation_acc=(logits.argmax(1) == labels).float().mean())
        return value


@LOSSES.register("colorize", config=ColorizeConfig)
class Colorize(Pretext):
    """The original colours, from the grayscale view."""

    def build_head(self, dim):
        from torch import nn

        s = self.cfg.decoder_size
        return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, self.channels * s * s))

    @property
    def channels(self) -> int:
        return 2 if self.cfg.space == "lab" else 3

    def targets(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """What the decoder predicts: the original pixels (RGB in [0, 1]), or their a, b / 128."""
        return pixels if self.cfg.space == "rgb" else rgb_to_lab(pixels)[:, 1:] / 128.0

    def predict(self, gray: "torch.Tensor") -> "torch.Tensor":
        """The decoder's colours of the grayscale view (pixels), at the input size."""
        import torch.nn.functional as F

        s = self.cfg.decoder_size
        out = self.head(self.features(self.normalize(gray))).view(gray.shape[0], self.channels, s, s)
        out = F.interpolate(out, size=gray.shape[-2:], mode="bilinear", align_corners=False)
        return out.sigmoid() if self.cfg.space == "rgb" else out.tanh()

    def loss(self, x, y):
        import torch.nn.functional as F

        pixels = self.images(x)
        target = self.targets(pixels)
        pred = self.predict(grayscale(pixels))
        value = F.l1_loss(pred, target) if self.cfg.loss == "l1" else F.mse_loss(pred, target)
        self.track(colorize_loss=value)
        return value


@LOSSES.register("simclr", config=SimCLRConfig)
class SimCLR(Pretext):
    """Two augmented views of each image agree (NT-Xent through a projection head)."""

    def build_head(self, dim):
        from torch import nn

        c = self.cfg
        return nn.Sequential(nn.Linear(dim, c.hidden_dim), nn.ReLU(), nn.Linear(c.hidden_dim, c.projection_dim))

    def augment(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """SimCLR's view on the device, per image: a random resized crop (area in
        [crop_scale_min, 1], aspect in [3/4, 4/3]) with a horizontal flip, as one affine resampling;
        with probability 0.8 brightness, contrast and saturation by factors in [1 - 0.8 s,
        1 + 0.8 s] (no hue jitter, no blur: images this small, as SimCLR's CIFAR-10 setting);
        grayscale with probability 0.2."""
        import torch
        import torch.nn.functional as F

        c, n, dev = self.cfg, pixels.shape[0], pixels.device
        u = self.uniform
        area = c.crop_scale_min + (1 - c.crop_scale_min) * u(n)
        ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(n))
        w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        cx, cy = (1 - w) * (2 * u(n) - 1), (1 - h) * (2 * u(n) - 1)
        flip = torch.where(u(n) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = F.affine_grid(theta.to(dev, pixels.dtype), list(pixels.shape), align_corners=False)
        v = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        jitter = (u(n) < 0.8).float()
        spread = 0.8 * c.strength
        factors = [(1 + jitter * spread * (2 * u(n) - 1)).to(dev, v.dtype).view(n, 1, 1, 1) for _ in range(3)]
        bright, contrast, saturation = factors
        v = (v * bright).clamp(0, 1)
        mean = grayscale(v).mean((1, 2, 3), keepdim=True)
        v = ((v - mean) * contrast + mean).clamp(0, 1)
        gray = grayscale(v)
        v = (gray + (v - gray) * saturation).clamp(0, 1)
        to_gray = (u(n) < 0.2).to(dev).view(n, 1, 1, 1)
        return torch.where(to_gray, grayscale(v), v)

    def loss(self, x, y):
        import torch

        pixels = self.images(x)
        views = torch.cat([self.augment(pixels), self.augment(pixels)])
        z1, z2 = self.head(self.features(self.normalize(views))).chunk(2)
        value = nt_xent(z1, z2, self.cfg.temperature)
        self.track(simclr_loss=value)
        return value
