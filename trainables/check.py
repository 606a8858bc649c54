"""Checks of a trial config that need the data or the model: does the data set load, do the
weights load, does the strategy fit the backbone's layer groups. They run where trials run (the
orchestrator sends them to a worker node as a Ray task), before any trial starts.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

from trainables.config import READING_FIELDS, TrialConfig


class CheckError(ValueError):
    """A config cannot work; ``key`` is the section or field to blame."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


class Checker:
    """Builds data sets and backbones as a trial would, each distinct one once."""

    def __init__(self) -> None:
        self.datasets: Dict[str, Any] = {}
        self.backbones: Dict[Tuple[str, str, int], Any] = {}

    def __call__(self, raw: Any) -> Dict[str, Any]:
        """Check one config; raise ``CheckError`` if it cannot work, else say what was found."""
        from trainables.data import DataError, build_data
        from trainables.models import WeightsError, build_backbone
        from trainables.strategies import STRATEGIES

        try:
            cfg = TrialConfig.parse(raw)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise CheckError("config", str(e)) from None
        classes, backbone = None, None
        for i in range(len(cfg.phases)) if cfg.phases else [None]:
            s = cfg if i is None else cfg.phase_sections(i)
            where = "" if i is None else f"phases.{i}."
            key = s.data.model_dump_json()
            if key not in self.datasets:
                try:
                    self.datasets[key] = build_data(s.data)
                except (DataError, ValueError) as e:
                    raise CheckError(f"{where}data", str(e)) from None
            if s.targets and classes is None:  # the tasks read their columns: a missing one is found here
                from trainables.tasks import Tasks

                try:
                    classes = Tasks(s.targets, self.datasets[key], s.data.image_size).width
                except (DataError, ValueError) as e:
                    raise CheckError("targets", str(e)) from None
            classes = classes or self.datasets[key].num_classes
            bkey = (cfg.model.name, cfg.model.weights, classes)
            if bkey not in self.backbones:
                try:
                    self.backbones[bkey] = build_backbone(cfg.model, classes)
                except (WeightsError, ValueError) as e:
                    raise CheckError("model", str(e)) from None
            backbone = self.backbones[bkey]
            try:
                STRATEGIES.get(s.strategy.name)(backbone, s.strategy, s.train.lr)
            except ValueError as e:
                raise CheckError(f"{where}strategy", f"with model {cfg.model.name}: {e}") from None
        data = self.datasets[cfg.data.model_dump_json()] if not cfg.phases else None
        return {"classes": classes, "groups": [g.name for g in backbone.groups],
                "data": None if data is None else describe_data(cfg.data, data)}


def describe_data(cfg: Any, data: Any) -> Dict[str, Any]:
    """A data set as MLflow records a run's input: its name, a digest of what the trial reads
    (the data config and the split sizes and classes it gave), and the split sizes."""
    import hashlib
    import json

    splits = {"train": len(data.train), "val": len(data.val), "test": len(data.test),
              "unlabeled": len(data.unlabeled) if data.unlabeled is not None else 0}
    source = cfg.model_dump(mode="json", exclude=set(READING_FIELDS))
    digest = hashlib.sha256(json.dumps([source, splits, list(data.classes)], sort_keys=True).encode()).hexdigest()[:16]
    return {"name": cfg.name, "digest": digest, "source": source, "splits": splits, "classes": len(data.classes)}


def check(configs: Iterable[Any]) -> List[Dict[str, Any]]:
    """Check each config (raise ``CheckError`` at the first that cannot work); per config,
    what was found: the number of classes and the backbone's layer groups."""
    checker = Checker()
    return [checker(c) for c in configs]


def check_each(labelled: Iterable[Tuple[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """``check`` for ``[(label, config), ...]``: every problem found, each as
    ``{"label", "key", "message"}`` (none when every config can work), and what was found of
    the others. Meant to run as a Ray task on a node where trials run."""
    checker, problems, found = Checker(), [], []
    for label, config in labelled:
        try:
            found.append(checker(config))
        except CheckError as e:
            problems.append({"label": label, "key": e.key, "message": e.message})
    return {"problems": problems, "found": found}
