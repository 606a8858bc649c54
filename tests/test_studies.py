"""Each study YAML, shrunk with --set (tiny Pets in its real layout, resnet18 from scratch at
32 px, few epochs), runs end to end through the real tl-sweep command."""
from __future__ import annotations

import pytest

from conftest import SEARCH_SPACES, run_cli, shrunk
from test_e2e import mlflow_client, only_sweep, sweep_runs

pytestmark = pytest.mark.slow

FROM_SCRATCH = {"model.name": "resnet18", "model.weights": "none"}  # no ImageNet ResNet-50 offline

STUDIES = {
    "strategy1": ({"train.epochs": 2, "search.space.strategy.unfreeze_last": {"grid": [1, 3]},
                   "search.scheduler.grace_period": 1}, 2),
    "strategy2": ({"train.epochs": 3, "search.space.strategy.unfreeze_every": {"grid": [1, 2]},
                   "search.scheduler.grace_period": 1}, 2),
    "bn": ({"train.epochs": 1, "search.space.strategy.unfreeze_last": {"grid": [1]}}, 4),
    "augment": ({"train.epochs": 1, "search.num_samples": 2, "search.scheduler.grace_period": 1,
                 "augment.crop_scale_min": 0.5}, 2),
    "imbalance": ({"train.epochs": 1, "search.space.train.class_weighting": {"grid": ["none", "effective"]}}, 4),
    "binary": ({"train.epochs": 1, "search.scheduler.grace_period": 1}, 2),
    "label_fraction": ({"train.epochs": 1, "semi.unlabeled_ratio": 1,
                        "search.space.data.label_fraction": {"grid": [0.5]}}, 3),
    "deeper": ({"train.epochs": 1, "train.warmup_epochs": 0,
                "search.space.model.name": {"grid": ["resnet18", "timm:convnext_atto"]},
                "search.space.strategy.lr_decay": {"grid": [0.5]}}, 2),
}


@pytest.mark.parametrize("study", list(STUDIES))
def test_study_runs_shrunk(study, tmp_path, pets_root):
    extra, trials = STUDIES[study]
    storage = tmp_path / "sweeps"
    r = run_cli(["run", str(SEARCH_SPACES / f"{study}.yaml"), *shrunk({**FROM_SCRATCH, **extra}),
                 "--set", f"data.root={pets_root}", "--set", f"storage.path={storage}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = only_sweep(storage, study)
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    assert parent.info.status == "FINISHED" and len(children) == trials
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    if study == "strategy1":
        assert sorted(c.data.params["strategy.unfreeze_last"] for c in children) == ["1", "3"]
        # the parent names the trial that kept the most val/acc per trainable parameter
        per_param = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "val/acc"))
                     / c.data.metrics["model/params_trainable"] for c in children}
        assert parent.data.tags["tl_sweep.most_efficient_run_id"] == max(per_param, key=per_param.get)
        assert "trainable parameters" in parent.data.tags["tl_sweep.most_efficient"]
        counts = {c.data.params["strategy.unfreeze_last"]: c.data.metrics["model/params_trainable"] for c in children}
        assert counts["1"] < counts["3"] < min(c.data.metrics["model/params_total"] for c in children)
    elif study == "strategy2":
        for c in children:
            if c.info.status == "FINISHED":
                every = int(c.data.params["strategy.unfreeze_every"])
                groups = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "train/trainable_groups"),
                                                  key=lambda m: m.step)]
                assert groups == [1 + (e - 1) // every for e in (1, 2, 3)]
    elif study == "bn":
        assert sorted(c.data.params["strategy.bn"] for c in children) == ["bn_only", "frozen", "stats_only", "train"]
    elif study == "imbalance":
        for c in children:
            assert {"val/acc_reduced", "val/acc_rest", "val/balanced_acc", "val/macro_f1"} <= set(c.data.metrics)
            assert any(k.startswith("val/acc_per_class/") for k in c.data.metrics)
    elif study == "label_fraction":
        by_method = {c.data.params["semi.method"]: c for c in children}
        assert set(by_method) == {"none", "pseudo_label", "fixmatch"}
        assert "train/mask_rate" in by_method["fixmatch"].data.metrics
        assert "train/mask_rate" not in by_method["none"].data.metrics
    elif study == "deeper":
        assert sorted(c.data.params["model.name"] for c in children) == ["resnet18", "timm:convnext_atto"]
