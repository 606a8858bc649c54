"""The sweep spec: YAML -> one validated, typed object, every problem reported at once.

Sections: name, data, model, strategy, train, semi, search, resources, failure, tracking, storage.
``search.space`` maps a dotted path of the trial config (``train.lr``) to a distribution.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Sections of a spec that make up one trial's config (what a search may vary).
TRIAL_SECTIONS = ("data", "model", "strategy", "train", "semi")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
# Metrics that every epoch reports, and so may drive ASHA / Optuna.
EPOCH_METRICS = ("val/acc", "val/loss", "val/balanced_acc", "val/macro_f1", "train/acc", "train/loss")


class SpecError(ValueError):
    """A spec is invalid; ``problems`` holds one ``key.path: message`` line per problem."""

    def __init__(self, source: str, problems: List[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the spec:\n{lines}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class DataSpec(Strict):
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    target: Literal["breeds", "species"] = "breeds"  # Oxford-IIIT Pets only
    image_size: int = Field(224, ge=16, le=1024)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    label_fraction: float = Field(1.0, gt=0, le=1)
    max_images: Optional[int] = Field(None, ge=2)
    # imbalance: keep this fraction of the training images of a class, a group of classes
    # (Pets: cat, dog) or every class ("*"), e.g. {cat: 0.2}
    class_fraction: Optional[Dict[str, float]] = None
    # augmentation of training images (torchvision.transforms.v2)
    hflip: bool = False
    rotation: float = Field(0.0, ge=0, le=180)  # degrees, +-
    scale_jitter: float = Field(0.0, ge=0, lt=1)  # zoom in/out by up to this factor
    crop_scale_min: float = Field(1.0, gt=0, le=1)  # random resized crop's smallest area; 1 = off
    trivial_augment: bool = False
    random_erasing: float = Field(0.0, ge=0, le=1)  # probability
    seed: int = 0
    num_workers: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from trainables.data import DATASETS

        DATASETS.get(v)
        return v


class ModelSpec(Strict):
    name: str = "resnet18"  # torchvision name, or timm:<name>
    weights: str = "imagenet"  # imagenet | none | path to a state dict

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v.startswith("timm:"):
            import timm

            if not timm.is_model(v[5:]):
                raise ValueError(f"timm has no model {v[5:]!r} (see timm.list_models())")
        else:
            import torchvision

            names = torchvision.models.list_models(module=torchvision.models)
            if v not in names:
                raise ValueError(
                    f"{v!r} is not a torchvision classification model (e.g. resnet50, efficientnet_b0, "
                    "vgg16_bn); use timm:<name> for a timm model"
                )
        return v


class StrategySpec(Strict):
    name: str = "unfreeze_last"  # unfreeze_last (strategy 1) | gradual_unfreeze (strategy 2)
    unfreeze_last: int = Field(0, ge=0)
    # gradual_unfreeze: start with the head + start_groups, one more group every unfreeze_every
    # epochs (or at the epochs in unfreeze_at), up to max_groups below the head
    start_groups: int = Field(0, ge=0)
    unfreeze_every: int = Field(1, ge=1)
    unfreeze_at: Optional[List[int]] = None
    max_groups: Optional[int] = Field(None, ge=0)
    bn: Literal["train", "frozen", "stats_only", "bn_only"] = "train"
    lr_decay: float = Field(1.0, gt=0, le=1)
    group_lrs: Optional[List[float]] = None  # head first, then down towards the stem

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from trainables.strategies import STRATEGIES

        STRATEGIES.get(v)
        return v

    @field_validator("group_lrs")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(x <= 0 for x in v)):
            raise ValueError("group_lrs needs one or more learning rates > 0, head first")
        return v


class TrainSpec(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "cosine", "step", "onecycle", "warmup"] = "cosine"
    step_size: int = Field(1, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    onecycle_pct: float = Field(0.3, gt=0, lt=1)
    warmup_epochs: float = Field(0, ge=0)  # linear warm-up of every group, any scheduler
    new_group_warmup: float = Field(0, ge=0)  # warm-up of a group that unfreezes mid-run
    schedule_scope: Literal["shared", "per_group"] = "shared"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA only
    # batch mixing (soft targets), label smoothing, imbalance remedies
    cutmix_alpha: float = Field(0.0, ge=0)
    mixup_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: Literal["none", "inverse", "effective"] = "none"
    effective_beta: float = Field(0.999, gt=0, lt=1)
    sampler: Literal["uniform", "oversample"] = "uniform"
    per_class_metrics: bool = False
    # For testing fault tolerance: the trial raises at the start of this epoch.
    fail_at_epoch: Optional[int] = Field(None, ge=1)


class SemiSpec(Strict):
    """Semi-supervised use of the training images that data.label_fraction leaves unlabelled."""

    method: Literal["none", "pseudo_label", "fixmatch"] = "none"
    threshold: float = Field(0.95, ge=0, le=1)  # confidence a pseudo label needs
    unlabeled_weight: float = Field(1.0, ge=0)  # lambda_u
    unlabeled_ratio: float = Field(1.0, gt=0)  # mu: unlabelled images per labelled one in a step


class Distribution(Strict):
    choice: Optional[List[Any]] = None
    grid: Optional[List[Any]] = None
    uniform: Optional[Tuple[float, float]] = None
    loguniform: Optional[Tuple[float, float]] = None
    randint: Optional[Tuple[int, int]] = None
    quniform: Optional[Tuple[float, float, float]] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        kind = given[0]
        v = getattr(self, kind)
        if kind in ("choice", "grid") and not v:
            raise ValueError(f"{kind} needs a non-empty list of values")
        if kind in ("uniform", "loguniform", "quniform", "randint"):
            low, high = v[0], v[1]
            if not low < high:
                raise ValueError(f"{kind} needs low < high, got low={low} high={high}")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got low={low}")
            if kind == "quniform" and v[2] <= 0:
                raise ValueError(f"quniform needs q > 0, got q={v[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> List[Any]:
        """Values to type-check against the field: every listed value, or the bounds."""
        a = self.args
        return list(a) if self.kind in ("choice", "grid") else [a[0], a[1]]

    def to_yaml(self) -> Dict[str, Any]:
        return {self.kind: list(self.args)}


class SchedulerSpec(Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before it may be stopped
    reduction_factor: float = Field(2, gt=1)
    max_t: Optional[int] = Field(None, ge=1)  # defaults to train.epochs


class SearchSpec(Strict):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: SchedulerSpec = SchedulerSpec()
    space: Dict[str, Distribution] = {}
    num_samples: int = Field(1, ge=1)  # per grid point
    max_concurrent: Optional[int] = Field(None, ge=1)
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"
    seed: int = 0

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        if v not in EPOCH_METRICS:
            raise ValueError(f"{v!r} is not reported every epoch; use one of {', '.join(EPOCH_METRICS)}")
        return v


class ResourcesSpec(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)  # fractional: several trials share a GPU
    custom: Dict[str, float] = {}  # Ray custom resources, e.g. {a100: 1} to pin trials to such nodes


class FailureSpec(Strict):
    max_retries: int = Field(0, ge=0)  # a failed trial restarts from its last checkpoint this often


class TrackingSpec(Strict):
    uri: Optional[str] = None  # default: sqlite store inside storage.path
    experiment: Optional[str] = None  # default: the spec's name


class StorageSpec(Strict):
    path: str = "sweeps"  # on the driver: sweep folders, logs, the default MLflow store
    # Where Ray Tune keeps checkpoints and experiment state: a folder every node sees (shared
    # file system) or a pyarrow URI (s3://bucket/prefix, gs://...). Default: the sweep folder.
    uri: Optional[str] = None
    keep_checkpoints: int = Field(1, ge=1)


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    description: Optional[str] = None
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    strategy: StrategySpec = StrategySpec()
    train: TrainSpec = TrainSpec()
    semi: SemiSpec = SemiSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()

    def trial_config(self) -> Dict[str, Any]:
        """The fixed part of every trial's config (search values are set on top of it)."""
        d = self.model_dump(mode="json")
        cfg = {k: d[k] for k in TRIAL_SECTIONS}
        cfg.update(metric=self.search.metric, mode=self.search.mode, resources=d["resources"])
        return cfg


# --------------------------------------------------------------------------- loading

SECTION_MODELS = {"data": DataSpec, "model": ModelSpec, "strategy": StrategySpec, "train": TrainSpec, "semi": SemiSpec}


def _loc(loc: Tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _format(e: ValidationError, prefix: str = "") -> List[str]:
    out = []
    for err in e.errors():
        path = ".".join(x for x in (prefix, _loc(err["loc"])) if x)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the spec reference in README.md)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        out.append(f"{path}: {msg}" if path else msg)
    return out


def set_path(d: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``a.b.c``; ``search.space.<key>`` keeps ``<key>`` whole."""
    if dotted.startswith("search.space."):
        d.setdefault("search", {}).setdefault("space", {})[dotted[len("search.space."):]] = value
        return
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[parts[-1]] = value


def get_path(d: Dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for p in dotted.split("."):
        cur = cur[p]
    return cur


def _check_space(raw: Dict[str, Any], spec_space: Dict[str, Distribution]) -> List[str]:
    """Each searched key must be a trial-config field, and each value must fit that field."""
    problems = []
    for key, dist in spec_space.items():
        where = f"search.space.{key}"
        section, _, field = key.partition(".")
        if section not in SECTION_MODELS or not field or "." in field:
            problems.append(f"{where}: not a searchable field; use <section>.<field> with section one of {', '.join(TRIAL_SECTIONS)}")
            continue
        model = SECTION_MODELS[section]
        if field not in model.model_fields:
            problems.append(f"{where}: {section} has no field {field!r}; fields: {', '.join(model.model_fields)}")
            continue
        base = raw.get(section) if isinstance(raw.get(section), dict) else {}
        for value in dist.candidates():
            trial = dict(base, **{field: value})
            try:
                model.model_validate(trial)
            except ValidationError as e:
                for err in e.errors():
                    if _loc(err["loc"]).split(".")[0] == field:
                        problems.append(f"{where}: value {value!r} does not fit {key}: {err['msg'].removeprefix('Value error, ')}")
    return problems


def _cross_checks(spec: Spec) -> List[str]:
    problems = []
    s = spec.search
    kinds = {k: d.kind for k, d in s.space.items()}
    if s.algorithm == "grid":
        for k, kind in kinds.items():
            if kind not in ("grid", "choice"):
                problems.append(f"search.space.{k}: algorithm 'grid' takes only grid / choice values, got {kind}; use algorithm optuna or random")
    if s.algorithm == "optuna":
        for k, d in s.space.items():
            if d.kind in ("grid", "choice") and not all(v is None or isinstance(v, (bool, int, float, str)) for v in d.args):
                problems.append(f"search.space.{k}: Optuna takes only scalar {d.kind} values (numbers, strings, booleans); use algorithm random or grid for lists")
    if s.scheduler.max_t is not None and s.scheduler.max_t > spec.train.epochs and "train.epochs" not in s.space:
        problems.append(f"search.scheduler.max_t: {s.scheduler.max_t} is more than train.epochs={spec.train.epochs}")
    if s.scheduler.type == "asha" and s.scheduler.grace_period > spec.train.epochs and "train.epochs" not in s.space:
        problems.append(f"search.scheduler.grace_period: {s.scheduler.grace_period} is more than train.epochs={spec.train.epochs}")
    if spec.data.val_fraction + spec.data.test_fraction >= 1:
        problems.append("data.val_fraction + data.test_fraction must leave images to train on (sum < 1)")
    return problems


def parse_override(item: str) -> Tuple[str, Any]:
    """``train.epochs=2`` -> ("train.epochs", 2); the value is read as YAML."""
    if "=" not in item:
        raise SpecError("--set", [f"{item!r}: expected KEY=VALUE, e.g. train.epochs=2"])
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise SpecError("--set", [f"{key}: value {text!r} is not valid YAML ({e})"]) from None
    return key.strip(), value


def validate(raw: Any, source: str = "spec") -> Spec:
    """Validate a raw mapping; raise SpecError listing every problem with its key path."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    problems: List[str] = []
    spec: Optional[Spec] = None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        problems.extend(_format(e))
    # The search space is checked on its own so its problems show beside the others.
    space_raw = (raw.get("search") or {}).get("space") if isinstance(raw.get("search"), dict) else None
    if isinstance(space_raw, dict):
        dists = {}
        for k, v in space_raw.items():
            try:
                dists[k] = Distribution.model_validate(v)
            except ValidationError:
                pass  # already reported by the whole-spec validation
        problems.extend(p for p in _check_space(raw, dists) if p not in problems)
    if spec is not None:
        problems.extend(_cross_checks(spec))
    if problems:
        raise SpecError(source, problems)
    assert spec is not None
    return spec


def load_documents(path: str | Path) -> List[Dict[str, Any]]:
    """Read a YAML file (one spec, or several as separate documents) with safe_load."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(p), [f"no such file: {p}"])
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(str(p), [f"malformed YAML{where}: {getattr(e, 'problem', None) or e}"]) from None
    if not docs:
        raise SpecError(str(p), ["the file is empty"])
    return docs


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Apply ``--set`` items; a field that is set and also searched is fixed (search dropped)."""
    raw = copy.deepcopy(raw)
    notes = []
    for item in overrides:
        key, value = parse_override(item)
        set_path(raw, key, value)
        space = (raw.get("search") or {}).get("space") if isinstance(raw.get("search"), dict) else None
        if isinstance(space, dict) and key in space and not key.startswith("search."):
            del space[key]
            notes.append(f"{key} fixed to {value!r} by --set (no longer searched)")
    return raw, notes


def load_specs(path: str | Path, overrides: Optional[List[str]] = None) -> List[Tuple[Spec, Dict[str, Any], List[str]]]:
    """Load and validate every document of ``path``: (spec, raw mapping after overrides, notes)."""
    docs = load_documents(path)
    out, problems = [], []
    for i, doc in enumerate(docs):
        source = str(path) if len(docs) == 1 else f"{path} (document {i + 1})"
        try:
            raw, notes = apply_overrides(doc, overrides or []) if isinstance(doc, dict) else (doc, [])
            out.append((validate(raw, source), raw, notes))
        except SpecError as e:
            problems.append(e)
    if problems:
        if len(problems) == 1:
            raise problems[0]
        raise SpecError(str(path), [f"{e.source}: {p}" for e in problems for p in e.problems])
    return out
