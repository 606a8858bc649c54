"""What one trial reads, defined once, with its defaults: the trial config.

The orchestrator's spec embeds these sections (``TrialSections``) instead of restating them, and
a trial receives ``TrialConfig.model_dump()`` as a plain dict and reads it back with
``TrialConfig.model_validate``. Sections keyed by a component's name (``data``, ``strategy``,
``semi``, ``losses``, ``phases``) are validated by the config model that component registered,
so a new strategy or data set brings its own fields. Nothing here imports torch.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Dict, Iterable, List, Literal, Optional, Tuple

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator, model_validator,
)

from trainables import metrics as M


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def registry(kind: str):
    """The registry of a kind of component, imported when first needed (they import this module)."""
    if kind == "dataset":
        from trainables.data.sets import DATASETS as r
    elif kind == "strategy":
        from trainables.strategies import STRATEGIES as r
    elif kind == "optimizer":
        from trainables.optim import OPTIMIZERS as r
    elif kind == "scheduler":
        from trainables.schedules import SCHEDULES as r
    elif kind == "semi":
        from trainables.losses import SEMI as r
    elif kind == "loss":
        from trainables.losses import LOSSES as r
    elif kind == "phase":
        from trainables.phases import PHASES as r
    else:
        raise KeyError(kind)
    return r


def _by_name(kind: str, default: str):
    """A before-validator that validates a section with the model its ``name`` picks."""
    return BeforeValidator(lambda v: registry(kind).section(default)(v))


def _default(kind: str, name: str):
    return lambda: registry(kind).config(name).model_validate({"name": name})


# --------------------------------------------------------------------------- data


# Data fields that say how the images are read, not which: a data set's identity leaves them out.
READING_FIELDS = frozenset({"num_workers", "cache", "decode"})


class DataConfig(Section):
    """Fields every data set takes; a data set adds its own (``root``, ``target``, ...)."""

    name: str = "digits"
    image_size: int = Field(224, ge=16, le=1024)  # square input size (shorter side resized, centre crop)
    val_fraction: float = Field(0.15, gt=0, lt=1)  # carved when the data set has no such split
    test_fraction: float = Field(0.15, gt=0, lt=1)
    label_fraction: float = Field(1.0, gt=0, le=1)  # stratified, nested subset of the training split
    max_images: Optional[int] = Field(None, ge=2)  # cap each source split (stratified), for quick runs
    # imbalance: keep this fraction of the training images of a class, a group of classes
    # (Pets: cat, dog) or every class ("*"), e.g. {cat: 0.2}
    class_fraction: Optional[Dict[str, float]] = None
    # keep only these classes, by name, relabelled 0..k-1 in this order (a task of a data set:
    # digits ["0", "1", "2", "3", "4"]); default every class
    classes: Optional[List[str]] = None
    seed: int = 0  # fixes the splits
    # DataLoader workers that read files (decode them, unless decode is on the device) or run
    # per-image augmentation; default: the trial's CPUs - 1. Images in memory or in the cache
    # are read in the training process.
    num_workers: Optional[int] = Field(None, ge=0)
    # decoded images cached on the node's disk, shared by its trials (trainables/data/cache.py)
    cache: Literal["auto", "off"] = "auto"
    # where JPEGs read from files (not from the cache) are decoded: device = batched in the
    # training process on the trial's device (nvJPEG on a GPU); workers = with PIL in the
    # DataLoader workers; auto = device on CUDA when every file is a JPEG, else workers
    decode: Literal["auto", "device", "workers"] = "auto"

    @field_validator("classes", mode="before")
    @classmethod
    def _numbers_as_names(cls, v: Any) -> Any:  # digits' classes are "0".."9": YAML reads [0, 1] as numbers
        if isinstance(v, list):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v]
        return v

    @field_validator("classes")
    @classmethod
    def _some_classes_once(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("data.classes needs one or more class names, each once (or leave it out: every class)")
        return v

    @model_validator(mode="after")
    def _leaves_training_images(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must leave images to train on (sum < 1)")
        return self


class DiskDataConfig(DataConfig):
    """A data set read from files under ``root``."""

    root: Optional[str] = None  # default: $TL_SWEEP_DATA, else ~/data
    download: bool = False  # fetch it with torchvision's verified downloader


# --------------------------------------------------------------------------- model, strategy


class ModelConfig(Section):
    name: str = "resnet18"  # a torchvision classification model, or timm:<name>
    # imagenet | none | a state-dict file | sweep:<name or id>: the best checkpoint of an earlier
    # sweep, which the driver turns into a file before the sweep starts (orchestrator/lineage.py)
    weights: str = "imagenet"
    # where a sweep: reference led (<sweep id>/<run id>): set by the driver, a param of every run
    weights_from: Optional[str] = None

    @field_validator("weights")
    @classmethod
    def _sweep_names_one(cls, v: str) -> str:
        if v.startswith("sweep:") and not v[len("sweep:"):].strip():
            raise ValueError("sweep: needs the name or id of a finished sweep, e.g. sweep:ssl_pretrain")
        return v

    @field_validator("name")
    @classmethod
    def _form(cls, v: str) -> str:
        # Whether torchvision / timm has the model is checked where trials run (trainables.check).
        body = v[5:] if v.startswith("timm:") else v
        if not body or not all(c.isalnum() or c in "_.-" for c in body):
            raise ValueError(f"{v!r} is not a model name: a torchvision name (resnet50) or timm:<name>")
        return v


BnMode = Literal["train", "frozen", "stats_only", "bn_only"]
ClassWeighting = Literal["none", "inverse", "effective"]


class StrategyConfig(Section):
    """Fields every fine-tuning strategy takes; a strategy adds its own."""

    name: str = "unfreeze_last"
    bn: BnMode = "train"  # batch-norm mode (trainables/strategies/batchnorm.py)
    lr_decay: float = Field(1.0, gt=0, le=1)  # LR factor per layer group below the head
    group_lrs: Optional[List[float]] = None  # explicit LRs, head first, then down towards the stem
    # the outputs of the layer groups that stay frozen, computed once per image and shared by the
    # node's trials (trainables/features.py); auto: whenever the trial allows it
    feature_cache: Literal["auto", "off"] = "auto"
    # with training augmentation: that many augmented views cached (epoch e trains on view e mod n);
    # 0 leaves the cache off when augmentation is on
    feature_cache_views: int = Field(0, ge=0)

    @field_validator("group_lrs")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(x <= 0 for x in v)):
            raise ValueError("group_lrs needs one or more learning rates > 0, head first")
        return v


# --------------------------------------------------------------------------- training


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)  # default: 2 x batch_size
    lr: float = Field(1e-3, gt=0)  # the head's LR
    optimizer: str = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = Field(0.0, ge=0)  # L2 for adam / sgd, decoupled for adamw
    scheduler: str = "cosine"
    step_size: int = Field(1, ge=1)  # step
    gamma: float = Field(0.1, gt=0, le=1)  # step
    onecycle_pct: float = Field(0.3, gt=0, lt=1)  # onecycle
    warmup_epochs: float = Field(0, ge=0)  # linear warm-up of every group, any scheduler
    new_group_warmup: float = Field(0, ge=0)  # warm-up of a group that unfreezes mid-run
    schedule_scope: Literal["shared", "per_group"] = "shared"
    seed: int = 0  # init and shuffling; a sweep gives each trial train.seed + its index
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the model (pays a compile at the start of each trial)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: ClassWeighting = "none"
    effective_beta: float = Field(0.999, gt=0, lt=1)
    sampler: Literal["uniform", "oversample"] = "uniform"
    per_class_metrics: bool = False
    # joint: the supervised loss trains the whole model; probe: its head learns on detached
    # features (an online linear probe), so only extra losses shape the encoder (pre-training)
    supervised: Literal["joint", "probe"] = "joint"
    # For testing fault tolerance: the trial raises at the start of this epoch.
    fail_at_epoch: Optional[int] = Field(None, ge=1)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return registry("optimizer").check(v)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        return registry("scheduler").check(v)

    @model_validator(mode="after")
    def _warmup_has_a_length(self) -> "TrainConfig":
        if self.scheduler == "warmup" and self.warmup_epochs <= 0:
            raise ValueError("train.scheduler 'warmup' needs train.warmup_epochs > 0 (the length of the ramp)")
        return self


class AugmentConfig(Section):
    """Training-time augmentation: per image (torchvision.transforms.v2; batched on the trial's
    device when it can), then per batch (CutMix / MixUp)."""

    hflip: bool = False
    rotation: float = Field(0.0, ge=0, le=180)  # degrees, +-
    scale_jitter: float = Field(0.0, ge=0, lt=1)  # zoom in/out by up to this factor
    crop_scale_min: float = Field(1.0, gt=0, le=1)  # random resized crop's smallest area; 1 = off
    trivial_augment: bool = False
    random_erasing: float = Field(0.0, ge=0, le=1)  # probability
    cutmix_alpha: float = Field(0.0, ge=0)  # CutMix / MixUp per batch: soft targets
    mixup_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    # apply the per-image steps to whole batches in the training process, on the trial's device
    # (its GPU when it has one), each image under its own seed: the DataLoader only reads
    # images. TrivialAugment and key points stay per image in the workers. false: all per image
    # in the workers.
    batched: bool = True


class SemiConfig(Section):
    """Semi-supervised use of the training images that data.label_fraction leaves unlabelled."""

    method: str = "none"  # none, or a registered semi-supervised loss (pseudo_label, fixmatch)
    threshold: float = Field(0.95, ge=0, le=1)  # confidence a pseudo label needs
    unlabeled_weight: float = Field(1.0, ge=0)  # lambda_u
    unlabeled_ratio: float = Field(1.0, gt=0)  # mu: unlabelled images per labelled one in a step

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return v if v == "none" else registry("semi").check(v)


class LossConfig(Section):
    """An extra loss summed into the training step with its weight; an entry adds its own fields."""

    name: str
    weight: float = Field(1.0, ge=0)
    # the kinds of phase the loss works in (L2-SP, LwF: next_task); empty: any
    phase_kinds: ClassVar[Tuple[str, ...]] = ()


def _losses(value: Any) -> Any:
    """``losses: {<registered loss>: {its fields}}``: each entry validated by its own model,
    every problem reported with its key path."""
    from pydantic import ValidationError

    if not isinstance(value, dict):
        return value
    reg = registry("loss")
    out, errors = {}, []
    for k, v in value.items():
        if not isinstance(v, (dict, type(None), LossConfig)):
            out[k] = v  # the field's type reports it
            continue
        try:
            out[k] = v if isinstance(v, LossConfig) else reg.section(k)({**(v or {}), "name": k})
        except ValidationError as e:
            errors += [{"type": err["type"], "loc": (k, *err["loc"]), "input": err.get("input"),
                        **({"ctx": err["ctx"]} if "ctx" in err else {})} for err in e.errors()]
    if errors:
        raise ValidationError.from_exception_data("losses", errors)
    return out


# --------------------------------------------------------------------------- targets (multi-task)


class TargetConfig(Section):
    """One task of a multi-task trial (``targets: {<task>: {kind: ..., ...}}``): its columns of
    a table data set, its slice of the head, its loss and weight (trainables/tasks.py)."""

    kind: str
    weight: float = Field(1.0, ge=0)  # the task's share of the summed loss


class ClassTarget(TargetConfig):
    """A class column (numbers or text): cross-entropy; acc, balanced_acc, macro_f1."""

    kind: Literal["class"] = "class"
    column: str
    loss: Literal["ce"] = "ce"


RegressionLoss = Literal["mse", "l1", "smooth_l1"]


class RegressionTarget(TargetConfig):
    """A number column: predicted as (value - center) / scale; MAE in the column's units."""

    kind: Literal["regression"] = "regression"
    column: str
    loss: RegressionLoss = "l1"
    beta: float = Field(0.1, gt=0)  # smooth_l1: quadratic below beta (in standardised units)
    center: Optional[float] = None  # default: the mean of the training split's values
    scale: Optional[float] = Field(None, gt=0)  # default: their standard deviation


class KeypointsTarget(TargetConfig):
    """Points in the image (x, y columns, interleaved): they move with the pixels (resize,
    crop, flip, affine); the loss on offsets from the training split's mean shape, in units of its
    spread; NME = mean distance / image size."""

    kind: Literal["keypoints"] = "keypoints"
    columns: Optional[List[str]] = None  # x0, y0, x1, y1, ...
    column_range: Optional[Tuple[str, str]] = None  # or: the table's columns from first to last, in file order
    units: Literal["pixels", "relative"] = "pixels"  # of the original image, or fractions of its width / height
    loss: RegressionLoss = "smooth_l1"
    beta: float = Field(0.1, gt=0)  # smooth_l1: quadratic below beta (in units of the shapes' spread)
    # point index pairs that swap under a horizontal flip (a face's left and right eye), 0-based
    flip_pairs: List[Tuple[int, int]] = []

    @model_validator(mode="after")
    def _columns_once(self) -> "KeypointsTarget":
        if (self.columns is None) == (self.column_range is None):
            raise ValueError("give the x, y columns either as columns: [x0, y0, x1, y1, ...] or as "
                             "column_range: [first, last]")
        if self.columns is not None and (not self.columns or len(self.columns) % 2):
            raise ValueError(f"columns: x and y columns in pairs, got {len(self.columns)} name(s)")
        flat = [i for pair in self.flip_pairs for i in pair]
        if any(i < 0 for i in flat) or len(set(flat)) != len(flat):
            raise ValueError("flip_pairs: point indices >= 0, each in one pair at most")
        if self.columns is not None and flat and max(flat) >= len(self.columns) // 2:
            raise ValueError(f"flip_pairs: index {max(flat)} but only {len(self.columns) // 2} points")
        return self


TARGET_KINDS: Dict[str, type] = {"class": ClassTarget, "regression": RegressionTarget, "keypoints": KeypointsTarget}


def _targets(value: Any) -> Any:
    """``targets: {<task>: {kind, ...}}``: each entry validated by its kind's model, every
    problem reported with its key path (``targets.age.loss``)."""
    from pydantic import ValidationError

    if not isinstance(value, dict):
        return value
    out, errors = {}, []
    for k, v in value.items():
        if isinstance(v, TargetConfig) or not isinstance(v, dict):
            out[k] = v  # the field's type reports a wrong one
            continue
        kind = v.get("kind")
        if kind not in TARGET_KINDS:
            errors.append({"type": "value_error", "loc": (k, "kind"), "input": kind, "ctx": {
                "error": ValueError(f"kind must be one of {', '.join(TARGET_KINDS)}")}})
            continue
        try:
            out[k] = TARGET_KINDS[kind].model_validate(v)
        except ValidationError as e:
            errors += [{"type": err["type"], "loc": (k, *err["loc"]), "input": err.get("input"),
                        **({"ctx": err["ctx"]} if "ctx" in err else {})} for err in e.errors()]
    if errors:
        raise ValidationError.from_exception_data("targets", errors)
    return out


TaskName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]  # a metric key's segment: val/<task>/mae


class PhaseConfig(Section):
    """One phase of a trial. Its sections override the trial's (deep-merged); its metrics are
    also logged under ``<name>/`` when the phase ends."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    kind: str = "train"
    epochs: Optional[int] = Field(None, ge=0)  # default: the phase's train.epochs
    data: Optional[Dict[str, Any]] = None
    strategy: Optional[Dict[str, Any]] = None
    train: Optional[Dict[str, Any]] = None
    augment: Optional[Dict[str, Any]] = None
    semi: Optional[Dict[str, Any]] = None
    losses: Optional[Dict[str, Any]] = None


def _phase(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    kind = value.get("kind", "train")
    if not isinstance(kind, str):
        return value
    return registry("phase").config(kind).model_validate({**value, "kind": kind})


class TrialResources(Section):
    cpu: float = Field(1, gt=0)  # per trial: torch threads and DataLoader workers follow it
    gpu: float = Field(0, ge=0)  # fractional: several trials share a GPU


# --------------------------------------------------------------------------- the trial


class TrialSections(Section):
    """The sections of a spec that make up a trial (what a search may vary)."""

    data: Annotated[SerializeAsAny[DataConfig], _by_name("dataset", "digits")] = Field(
        default_factory=_default("dataset", "digits"))
    model: ModelConfig = ModelConfig()
    strategy: Annotated[SerializeAsAny[StrategyConfig], _by_name("strategy", "unfreeze_last")] = Field(
        default_factory=_default("strategy", "unfreeze_last"))
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    semi: SemiConfig = SemiConfig()
    losses: Annotated[Dict[str, SerializeAsAny[LossConfig]], BeforeValidator(_losses)] = {}
    # several targets of a table data set, each with its own head slice, loss, weight and metrics;
    # none: one classification task (data set's classes, cross-entropy), as always
    targets: Annotated[Dict[TaskName, SerializeAsAny[TargetConfig]], BeforeValidator(_targets)] = {}
    phases: List[Annotated[SerializeAsAny[PhaseConfig], BeforeValidator(_phase)]] = []

    @model_validator(mode="after")
    def _phases_merge(self, info: ValidationInfo) -> "TrialSections":
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: names must differ, got {names}")
        for i, phase in enumerate(self.phases):
            self.phase_sections(i)  # each phase's merged sections validate
            if getattr(phase, "last_only", False) and i < len(self.phases) - 1:
                raise ValueError(f"phases.{i} ({phase.name}): a {phase.kind} phase must be the last one (it changes "
                                 f"the model for good and measures it at its end); move it after "
                                 f"{self.phases[-1].name!r}")
        if not self.phases:  # one phase's sections (validated with its kind), or a trial of one train phase
            kind = (info.context or {}).get("phase_kind", "train")
            for name, loss in self.losses.items():
                if loss.phase_kinds and kind not in loss.phase_kinds:
                    raise ValueError(f"losses.{name} works only in a phase of kind {' or '.join(loss.phase_kinds)}, "
                                     f"not {kind}; put it under that phase's losses")
        return self

    @model_validator(mode="after")
    def _targets_fit(self) -> "TrialSections":
        """Declared targets replace the one classification task: what works only with class
        labels is refused, naming its keys."""
        if not self.targets:
            if getattr(self.data, "label_column", "") is None:  # a table: which column is the class?
                raise ValueError(f"data.name {self.data.name}: set data.label_column (one classification task) or "
                                 "declare targets: {<task>: {kind: class | regression | keypoints, ...}}")
            return self
        if not getattr(type(self.data), "has_columns", False):
            raise ValueError(f"targets: data set {self.data.name!r} has no columns to learn; use data.name table "
                             "(a CSV or Parquet file) or synthetic_faces")
        a, t = self.augment, self.train
        off = []
        if a.cutmix_alpha > 0 or a.mixup_alpha > 0:
            off.append("augment.cutmix_alpha / augment.mixup_alpha (they mix class labels)")
        if t.class_weighting != "none":
            off.append("train.class_weighting (weights of one task's classes)")
        if self.semi.method != "none":
            off.append("semi.method (its pseudo labels are one task's classes)")
        if getattr(self.strategy, "method", None) == "fisher":
            off.append("strategy.method fisher (its scores come from the cross-entropy; use magnitude)")
        if a.trivial_augment and any(x.kind == "keypoints" for x in self.targets.values()):
            off.append("augment.trivial_augment (it cannot move key points with the pixels)")
        off += [f"phases.{i}.kind {p.kind} (it measures one classification head; use kind train)"
                for i, p in enumerate(self.phases) if p.kind != "train"]
        if off:
            raise ValueError("targets: these work only with one classification task: " + "; ".join(off))
        return self

    def phase_sections(self, index: int) -> "TrialSections":
        """The sections as phase ``index`` sees them: the trial's, with the phase's on top."""
        phase = self.phases[index]
        base = self.model_dump(include=set(TrialSections.model_fields) - {"phases"})
        for section in PHASE_SECTIONS:
            override = getattr(phase, section)
            if not override:
                continue
            if section in ("data", "strategy") and override.get("name", base[section]["name"]) != base[section]["name"]:
                base[section] = copy.deepcopy(override)  # another component: none of the trial's fields apply
            else:
                base[section] = merge(base[section], override)
        from pydantic import ValidationError

        try:
            return TrialSections.model_validate(base, context={"phase_kind": phase.kind})
        except ValidationError as e:  # re-raised with the phase's key path
            said = "; ".join(f"{'.'.join(str(x) for x in err['loc'] if not str(x).startswith('function-'))}: "
                             f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            raise ValueError(f"phases.{index} ({phase.name}): {said}") from None

    def phase_epochs(self, index: int) -> int:
        phase = self.phases[index]
        return phase.epochs if phase.epochs is not None else self.phase_sections(index).train.epochs

    @property
    def total_epochs(self) -> int:
        """Epochs the whole trial runs: ``train.epochs``, or the sum over its phases."""
        if not self.phases:
            return self.train.epochs
        return sum(self.phase_epochs(i) for i in range(len(self.phases)))


PHASE_SECTIONS = ("data", "strategy", "train", "augment", "semi", "losses")
SECTIONS = tuple(TrialSections.model_fields)  # the spec's trial sections, in order


class TrialConfig(TrialSections):
    """A trial's whole config: its sections plus what the sweep decides for it."""

    metric: str = M.VAL_ACC  # the sweep's metric (what ASHA / Optuna optimise)
    mode: Literal["max", "min"] = "max"
    resources: TrialResources = TrialResources()
    trial_index: int = Field(0, ge=0)  # the trial's place in the sweep (its seed is train.seed + this)

    @property
    def seed(self) -> int:
        """The trial's seed: ``train.seed`` plus its index in the sweep (replicates differ)."""
        return self.train.seed + self.trial_index

    @classmethod
    def parse(cls, config: Any) -> "TrialConfig":
        return config if isinstance(config, cls) else cls.model_validate(config)


def merge(base: Any, override: Any) -> Any:
    """Deep-merge mappings; anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for k, v in override.items():
            out[k] = merge(out.get(k), v) if k in out else v
        return out
    return copy.deepcopy(override)


def done(config: Any, epochs_run: int) -> bool:
    """Whether a trial that ran ``epochs_run`` epochs ran to its end (else it was stopped early)."""
    return epochs_run >= TrialConfig.parse(config).total_epochs


# Fields that mean something only when another field has some value: a trial's MLflow params
# leave them out otherwise (momentum with AdamW, a step size without the step schedule).
APPLIES = {
    "train.momentum": lambda c: c.train.optimizer == "sgd",
    "train.nesterov": lambda c: c.train.optimizer == "sgd",
    "train.step_size": lambda c: c.train.scheduler == "step",
    "train.gamma": lambda c: c.train.scheduler == "step",
    "train.onecycle_pct": lambda c: c.train.scheduler == "onecycle",
    "train.new_group_warmup": lambda c: c.strategy.name == "gradual_unfreeze",
    "train.schedule_scope": lambda c: c.strategy.name == "gradual_unfreeze",
    "train.effective_beta": lambda c: c.train.class_weighting == "effective",
    "augment.mix_prob": lambda c: c.augment.cutmix_alpha > 0 or c.augment.mixup_alpha > 0,
    "semi.method": lambda c: c.semi.method != "none",
    "semi.threshold": lambda c: c.semi.method != "none",
    "semi.unlabeled_weight": lambda c: c.semi.method != "none",
    "semi.unlabeled_ratio": lambda c: c.semi.method != "none",
    "strategy.feature_cache_views": lambda c: c.strategy.feature_cache != "off",
}
SWEEP_LEVEL = ("metric", "mode", "resources")  # the same in every trial: the sweep's parent run has them


def applicable(config: Any, keep: Iterable[str] = ()) -> Dict[str, Any]:
    """The trial's config as flat ``section.field`` params: only what applies to it (no None,
    no field whose condition fails, no sweep-level value), plus its seed. Fields in ``keep``
    (those the sweep searches) are always there, so trials compare on them."""
    cfg = TrialConfig.parse(config)

    def flat(d: Any, prefix: str = "") -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # phases: phases.1.train.lr
                v = {str(i): x for i, x in enumerate(v)}
            if isinstance(v, dict) and v:
                out.update(flat(v, key + "."))
            elif v is not None and v != {} and v != []:
                out[key] = v
        return out

    dumped = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SWEEP_LEVEL}
    keep = set(keep)
    params = {k: v for k, v in flat(dumped).items() if k in keep or APPLIES.get(k, lambda c: True)(cfg)}
    params["seed"] = cfg.seed
    return params
