"""The sweep spec: YAML -> one validated, typed object, every problem reported at once.

A spec is the trial's sections, as the worker side defines them (``trainables.config``: data,
model, strategy, train, augment, semi, losses, phases), plus what the sweep needs: name,
search, resources, failure, tracking, storage. ``search.space`` maps a dotted path of the trial
config (``train.lr``) to a distribution. Nothing here imports torch or Ray.
"""
from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from trainables import metrics as M
from trainables.config import SECTIONS, Section, TrialConfig, TrialResources, TrialSections

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
# Keys a section dropped in a reshape, with where they went (a friendlier miss than "unknown key").
MOVED = {f"data.{k}": f"augment.{k}" for k in ("hflip", "rotation", "scale_jitter", "crop_scale_min",
                                                  "trivial_augment", "random_erasing")}
MOVED.update({f"train.{k}": f"augment.{k}" for k in ("cutmix_alpha", "mixup_alpha", "mix_prob")})


class SpecError(ValueError):
    """A spec is invalid; ``problems`` holds one ``key.path: message`` line per problem."""

    def __init__(self, source: str, problems: List[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the spec:\n{lines}")


class Distribution(Section):
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

    @property
    def largest(self) -> Any:
        """The largest value it can take (for checks against limits)."""
        a = self.args
        if self.kind in ("choice", "grid"):
            numbers = [x for x in a if isinstance(x, (int, float)) and not isinstance(x, bool)]
            return max(numbers) if numbers else None
        return a[1]

    def to_yaml(self) -> Dict[str, Any]:
        return {self.kind: list(self.args)}


class SchedulerSpec(Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before it may be stopped
    reduction_factor: float = Field(2, gt=1)  # ASHA keeps 1/factor of the trials at each rung
    max_t: Optional[int] = Field(None, ge=1)  # defaults to the trial's epochs


class SearchSpec(Section):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: SchedulerSpec = SchedulerSpec()
    space: Dict[str, Distribution] = {}
    num_samples: int = Field(1, ge=1)  # per grid point
    max_concurrent: Optional[int] = Field(None, ge=1)
    metric: str = M.VAL_ACC
    mode: Optional[Literal["max", "min"]] = None  # default: min for a loss, else max
    # how a trial's value of the metric is read when trials are ranked: its best epoch ("all"),
    # or its last one ("last": a trial of phases whose final model is what counts, as forgetting's)
    scope: Literal["all", "last"] = "all"
    seed: int = 0

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        if v not in M.EPOCH_METRICS and not M.is_task_metric(v):  # a task's is checked against the targets (Spec)
            raise ValueError(f"{v!r} is not reported every epoch; use one of {', '.join(M.EPOCH_METRICS)}, "
                             "or with targets val/<task>/<metric>")
        return v

    @model_validator(mode="after")
    def _mode_fits_metric(self) -> "SearchSpec":
        natural = M.natural_mode(self.metric)
        if self.mode is None:
            self.mode = natural
        elif self.mode != natural:
            better = "lower" if natural == "min" else "higher"
            raise ValueError(f"search.mode: {self.metric} is better when {better}: use mode {natural}, not {self.mode}")
        return self


class ResourcesSpec(TrialResources):
    custom: Dict[str, float] = {}  # Ray custom resources, e.g. {a100: 1} to pin trials to such nodes


class FailureSpec(Section):
    max_retries: int = Field(0, ge=0)  # a failed trial restarts from its last checkpoint this often


class TrackingSpec(Section):
    uri: Optional[str] = None  # default: sqlite store inside storage.path
    experiment: Optional[str] = None  # default: the spec's name


class StorageSpec(Section):
    path: str = "sweeps"  # on the driver: sweep folders, logs, the default MLflow store
    # Where the sweep's state, Ray Tune's checkpoints and experiment state live: a folder every
    # node sees (shared file system) or s3://bucket/prefix (query parameters for an S3-compatible
    # server, e.g. ?endpoint_override=host:9000&scheme=http). Default: the sweep folder.
    uri: Optional[str] = None
    # checkpoints kept per trial: at least the last and the one before, so a driver that dies
    # while a trial's checkpoint is being replaced still finds the one its saved state points
    # to (tuning.StateSaver saves the state as each checkpoint lands)
    keep_checkpoints: int = Field(2, ge=2)


class Spec(TrialSections):
    """A whole sweep: the trial's sections (inherited from ``TrialSections``) and the sweep's."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    description: Optional[str] = None
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()

    @model_validator(mode="after")
    def _metric_reported(self) -> "Spec":
        """search.metric is one the trial reports every epoch: with targets, the tasks' own."""
        kinds = {name: t.kind for name, t in self.targets.items()}
        reported = M.task_epoch_metrics(kinds) if kinds else M.EPOCH_METRICS
        if self.search.metric not in reported:
            said = "with these targets" if kinds else "without targets"
            raise ValueError(f"search.metric: {self.search.metric!r} is not reported {said}; use one of "
                             f"{', '.join(reported)}")
        return self

    def trial_config(self) -> Dict[str, Any]:
        """The fixed part of every trial's config (search values are set on top of it)."""
        d = self.model_dump(mode="json")
        cfg = {k: d[k] for k in SECTIONS}
        cfg.update(metric=self.search.metric, mode=self.search.mode,
                   resources=TrialResources(cpu=self.resources.cpu, gpu=self.resources.gpu).model_dump())
        return TrialConfig.model_validate(cfg).model_dump(mode="json")

    @property
    def max_epochs(self) -> Optional[int]:
        """The most epochs a trial can run (None when a searched field makes it unknown here)."""
        if any(k == "train.epochs" or k.startswith("phases") for k in self.search.space):
            return None
        return self.total_epochs


# --------------------------------------------------------------------------- loading


def _loc(loc: Tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _format(e: ValidationError, prefix: str = "") -> List[str]:
    out = []
    for err in e.errors():
        path = ".".join(x for x in (prefix, _loc(err["loc"])) if x)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            moved = MOVED.get(path)
            msg = (f"moved to {moved}" if moved else
                   "unknown key (check the spelling; see the spec reference in README.md)")
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        out.append(f"{path}: {msg}" if path else msg)
    return out


def set_path(d: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``a.b.c``; ``search.space.<key>`` keeps ``<key>`` whole;
    a number indexes a list (``phases.1.epochs``)."""
    if dotted.startswith("search.space."):
        d.setdefault("search", {}).setdefault("space", {})[dotted[len("search.space."):]] = value
        return
    parts = dotted.split(".")
    cur: Any = d
    for p in parts[:-1]:
        if isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
            continue
        nxt = cur.get(p)
        if not isinstance(nxt, (dict, list)):
            nxt = cur[p] = {}
        cur = nxt
    last = parts[-1]
    if isinstance(cur, list) and last.isdigit() and int(last) < len(cur):
        cur[int(last)] = value
    else:
        cur[last] = value


def get_path(d: Any, dotted: str, default: Any = KeyError) -> Any:
    """``d[a][b][c]`` for ``a.b.c`` (numbers index lists); ``default`` when missing, if given."""
    cur: Any = d
    for p in dotted.split("."):
        if isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        elif isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif default is KeyError:
            raise KeyError(dotted)
        else:
            return default
    return cur


def _trial_part(raw: Dict[str, Any]) -> Dict[str, Any]:
    return {k: copy.deepcopy(raw[k]) for k in SECTIONS if k in raw}


def _check_space(raw: Dict[str, Any], space: Dict[str, Distribution]) -> List[str]:
    """Each searched key must be a field of the trial config, and each value must fit it,
    also beside every value of the other searched keys (a searched strategy.name must take
    the other searched strategy fields)."""
    problems: List[str] = []
    valid = {k: d for k, d in space.items() if k.split(".")[0] in SECTIONS and "." in k}
    for key in space:
        if key not in valid:
            problems.append(f"search.space.{key}: not a searchable field; use <section>.<field> with section one of "
                            f"{', '.join(SECTIONS)}")
    phases = raw.get("phases") if isinstance(raw.get("phases"), list) else []
    for key in [k for k in valid if k.startswith("phases.")]:
        index = key.split(".")[1]
        if not index.isdigit() or int(index) >= len(phases) or key.count(".") < 2:
            valid.pop(key)
            problems.append(f"search.space.{key}: not a field of a phase; use phases.<i>.<field> or "
                            f"phases.<i>.<section>.<field> with i one of 0..{len(phases) - 1} (the spec's phases)"
                            if phases else f"search.space.{key}: the spec has no phases")
    base = _trial_part(raw)
    for key, dist in valid.items():
        others = [[(k, v) for v in d.candidates()] for k, d in valid.items() if k != key] or [[]]
        combos = [[]] + [[pair] for pairs in others for pair in pairs]
        seen, missing_field = set(), False
        for value, combo in itertools.product(dist.candidates(), combos):
            if missing_field:
                break
            trial = copy.deepcopy(base)
            for k, v in combo:
                set_path(trial, k, v)
            set_path(trial, key, value)
            try:
                TrialSections.model_validate(trial)
            except ValidationError as e:
                for err in e.errors():
                    loc = _loc(err["loc"])
                    if not loc and key.startswith("phases."):
                        said = _phase_said(key, err["msg"].removeprefix("Value error, "))
                        if said and said not in seen:
                            seen.add(said)
                            problems.append(f"search.space.{key}: value {value!r} does not fit: {said}")
                            missing_field = "Extra inputs are not permitted" in said
                        continue
                    if loc != key and not loc.startswith(key + "."):
                        continue
                    section = key.split(".")[0]
                    if err["type"] == "extra_forbidden":
                        missing_field = True  # said once: the other values and combinations add nothing
                        beside = f" when {combo[0][0]}={combo[0][1]!r}" if combo else ""
                        moved = f" (moved to {MOVED[key]})" if key in MOVED else ""
                        msg = f"search.space.{key}: {section} has no field {key.split('.', 1)[1]!r}{beside}{moved}"
                    else:
                        msg = f"search.space.{key}: value {value!r} does not fit {key}: {err['msg'].removeprefix('Value error, ')}"
                    if msg not in seen:
                        seen.add(msg)
                        problems.append(msg)
    return problems


def _phase_said(key: str, msg: str) -> Optional[str]:
    """What a phase's sections said of ``key`` (``phases.<i>.<section>.<field>``): they report as
    one message, ``phases.<i> (<name>): <section.field>: <problem>; ...``."""
    _, index, rest = key.split(".", 2)
    head = f"phases.{index} ("
    if not msg.startswith(head):
        return None
    name, _, said = msg[len(head):].partition("): ")
    parent = rest.rpartition(".")[0]  # a registered entry that does not exist says so under its name
    mine = [part for part in re.split(r"; (?=[\w.]+: )", said)
            if part.split(": ", 1)[0] in (rest, f"{parent}.name") or part.startswith(rest + ".")]
    return f"phases.{index} ({name}): {'; '.join(mine)}" if mine else None


def _cross_checks(spec: Spec) -> List[str]:
    problems = []
    s = spec.search
    if s.algorithm == "grid":
        for k, d in s.space.items():
            if d.kind not in ("grid", "choice"):
                problems.append(f"search.space.{k}: algorithm 'grid' takes only grid / choice values, got {d.kind}; "
                                "use algorithm optuna or random")
    sch = s.scheduler
    epochs = spec.max_epochs
    searched_epochs = s.space.get("train.epochs")
    if sch.max_t is not None and epochs is not None and sch.max_t > epochs:
        problems.append(f"search.scheduler.max_t: {sch.max_t} is more than the trial's {epochs} epoch(s)")
    if searched_epochs is not None and sch.type == "asha":
        top = searched_epochs.largest
        limit = sch.max_t
        if limit is not None and top is not None and top > limit:
            problems.append(f"search.space.train.epochs: up to {top} epochs, but ASHA stops every trial at "
                            f"search.scheduler.max_t={limit}; raise max_t or lower the epochs")
    if sch.type == "asha":
        horizon = sch.max_t or epochs
        if horizon is not None and sch.grace_period > horizon:
            problems.append(f"search.scheduler.grace_period: {sch.grace_period} is more than the {horizon} epoch(s) "
                            "a trial runs")
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


def load_specs_text(text: str, source: str) -> List[Tuple[Spec, Dict[str, Any], List[str]]]:
    """Validate a spec given as YAML text (a submitted sweep's, on the cluster)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(source, [f"malformed YAML: {e}"]) from None
    return [(validate(raw, source), raw, [])]


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
