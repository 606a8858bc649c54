"""The room for the next studies: validation without torch, a strategy that plugs in from its
own module, the training step's hooks, extra losses as components, phases, fine layer groups,
and the worker-side checks."""
from __future__ import annotations

import subprocess
import sys
import warnings
from typing import List, Literal

import pytest
import torch

from conftest import REPO, SEARCH_SPACES, trial_config
from orchestrator.spec import SpecError, validate
from trainables.check import CheckError, check
from trainables.config import LossConfig, StrategyConfig
from trainables.losses import LOSSES, LossComponent
from trainables.strategies import STRATEGIES, Strategy
from trainables.trainable import FineTuneTrial


def test_validating_every_shipped_spec_imports_neither_torch_nor_ray():
    code = (
        "import sys; from pathlib import Path; from orchestrator.spec import load_specs; import orchestrator.cli\n"
        f"[load_specs(p) for p in sorted(Path({str(SEARCH_SPACES)!r}).glob('*.yaml'))]\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'ray') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def tiny_resnet(spec, **train):
    """The shrunk base spec on a resnet18 from scratch at 16 px, 60 images."""
    spec["model"] = {"name": "resnet18", "weights": "none"}
    spec["data"].update(max_images=60, image_size=16)
    spec["train"].update(train)
    return spec


# --------------------------------------------------------------------------- a strategy of a test's own


class EveryOtherConfig(StrategyConfig):
    name: Literal["every_other"] = "every_other"
    period: int = 2  # the last group below the head trains in every period-th epoch


class EveryOther(Strategy):
    """Trains the head always and the last group in every ``period``-th epoch; its ``prepare``
    hook swaps the head for a subclass (a model change before the optimizer exists) and its
    ``after_backward`` hook masks the head bias's gradient."""

    prepared: List[str] = []

    def prepare(self, model, batches=None):
        head = model.fc
        model.fc = type("MarkedLinear", (torch.nn.Linear,), {})(head.in_features, head.out_features)
        model.fc.load_state_dict(head.state_dict())
        EveryOther.prepared.append("fc")

    def trainable_groups(self, epoch: int) -> List[int]:
        n = self.num_groups
        return [n - 2, n - 1] if epoch % self.cfg.period == 0 else [n - 1]

    def after_backward(self, model):
        model.fc.bias.grad = None


@pytest.fixture
def every_other():
    yield STRATEGIES.register("every_other", config=EveryOtherConfig)(EveryOther)
    STRATEGIES.unregister("every_other")


def test_a_new_strategy_plugs_in_without_touching_another_file(every_other, base_spec):
    tiny_resnet(base_spec, epochs=2, optimizer="adamw")
    base_spec["strategy"] = {"name": "every_other", "period": 2, "lr_decay": 0.5}
    spec = validate(base_spec)
    assert spec.strategy.period == 2 and spec.strategy.lr_decay == 0.5

    trial = FineTuneTrial(spec.trial_config())
    assert type(trial.model.fc).__name__ == "MarkedLinear" and EveryOther.prepared, "prepare ran before the optimizer"
    bias = trial.model.fc.bias.detach().clone()
    weight = trial.model.fc.weight.detach().clone()
    first = trial.train_one_epoch()
    second = trial.train_one_epoch()
    assert [first["train/trainable_groups"], second["train/trainable_groups"]] == [1, 2]
    assert torch.equal(trial.model.fc.bias, bias), "after_backward masked the bias: the optimizer never moved it"
    assert not torch.equal(trial.model.fc.weight, weight)

    base_spec["strategy"]["unfreeze_last"] = 1  # a field of another strategy
    with pytest.raises(SpecError) as e:
        validate(base_spec)
    assert any(p.startswith("strategy.unfreeze_last: unknown key") for p in e.value.problems)


# --------------------------------------------------------------------------- an extra loss


class HeadNormConfig(LossConfig):
    name: Literal["head_norm"] = "head_norm"
    power: int = 2


class HeadNorm(LossComponent):
    """A toy extra loss: the head's weights to the power ``power``, summed."""

    def loss(self, x, y):
        value = self.trial.model.fc.weight.abs().pow(self.cfg.power).sum()
        self.track(head_norm=value)
        return value


@pytest.fixture
def head_norm():
    yield LOSSES.register("head_norm", config=HeadNormConfig)(HeadNorm)
    LOSSES.unregister("head_norm")


def test_an_extra_loss_is_a_component_summed_with_its_weight(head_norm, base_spec):
    tiny_resnet(base_spec, epochs=1, optimizer="sgd", lr=0.05, momentum=0.0)

    def run(losses):
        base_spec["losses"] = losses
        trial = FineTuneTrial(trial_config(base_spec))
        return trial, trial.train_one_epoch()

    plain, m0 = run({})
    zero, mz = run({"head_norm": {"weight": 0.0}})
    assert mz["train/loss"] == pytest.approx(m0["train/loss"]) and torch.equal(zero.model.fc.weight, plain.model.fc.weight), \
        "weight 0: exactly the training without the component"
    heavy, mh = run({"head_norm": {"weight": 1.0, "power": 2}})
    assert heavy.model.fc.weight.norm() < plain.model.fc.weight.norm()
    assert mh["train/head_norm"] > 0, "a component's own metrics are logged as train/<name>"
    with pytest.raises(SpecError) as e:
        base_spec["losses"] = {"head_norm": {"weight": 1.0, "colour": "red"}, "nosuch": {}}
        validate(base_spec)
    assert any(p.startswith("losses.head_norm.colour: unknown key") for p in e.value.problems), e.value.problems
    assert any(p.startswith("losses.nosuch") and "head_norm" in p for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- phases


@pytest.fixture
def lp_ft(base_spec):
    """Linear probe, then fine-tune the last two groups (LP-FT, Kumar et al. 2022) in one trial."""
    tiny_resnet(base_spec, epochs=1, optimizer="adamw", lr=1e-2)
    base_spec["phases"] = [
        {"name": "probe", "epochs": 1, "strategy": {"unfreeze_last": 0}},
        {"name": "finetune", "epochs": 2, "strategy": {"unfreeze_last": 2}, "train": {"lr": 1e-3}},
    ]
    return base_spec


def test_phases_run_in_turn_and_log_under_their_names(lp_ft):
    spec = validate(lp_ft)
    assert spec.total_epochs == 3
    reports = []
    FineTuneTrial(spec.trial_config()).fit(lambda m, d: reports.append(m), checkpoint=False)
    assert [m["epoch"] for m in reports] == [1, 2, 3]
    assert [m["train/trainable_groups"] for m in reports] == [1, 3, 3]
    assert [m["train/lr"] for m in reports][0] == pytest.approx(1e-2) and reports[1]["train/lr"] == pytest.approx(1e-3)
    assert "probe/val/acc" in reports[0] and "probe/test/acc" in reports[0]
    assert "finetune/test/acc" in reports[2] and "probe/val/acc" not in reports[2]
    assert reports[2]["finetune/test/acc"] == reports[2]["test/acc"]


def test_a_trial_resumed_in_its_second_phase_retraces_the_uninterrupted_one(lp_ft, tmp_path):
    config = validate(lp_ft).trial_config()
    straight = []
    FineTuneTrial(config).fit(lambda m, d: straight.append(m), checkpoint=False)
    first = FineTuneTrial(config)
    saved = []

    def stop_after_two(metrics, directory):
        saved.append(metrics)
        if len(saved) == 2:
            import shutil

            shutil.copytree(directory, tmp_path / "ckpt")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(stop_after_two)
    resumed = FineTuneTrial(config)
    resumed.load(str(tmp_path / "ckpt"))
    assert (resumed.phase_index, resumed.phase_epoch, resumed.epoch) == (1, 1, 2)
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    assert [m["epoch"] for m in rest] == [3]
    assert rest[0]["train/loss"] == pytest.approx(straight[2]["train/loss"], rel=1e-5)
    assert rest[0]["val/acc"] == straight[2]["val/acc"]


def test_a_phase_with_a_field_its_strategy_lacks_is_refused(lp_ft):
    lp_ft["phases"][1]["strategy"] = {"unfreeze_every": 2}
    with pytest.raises(SpecError) as e:
        validate(lp_ft)
    assert any("phases.1 (finetune)" in p and "unfreeze_every" in p for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- layer groups


def _shares(name: str, build_on_meta: bool = True):
    """(group, its share of the parameters of the model as shipped, its largest layer's share of
    the group) for each group, the model built with its ImageNet head."""
    from trainables.models import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if build_on_meta:
            with torch.device("meta"):
                bb = build_backbone({"name": name, "weights": "none"}, 1000)
        else:
            bb = build_backbone({"name": name, "weights": "none"}, 1000)
    named = {n: p.numel() for n, p in bb.model.named_parameters()}
    total = sum(named.values())
    out = []
    for g in bb.groups:
        size = sum(named[p] for p in g.params)
        layers = {}
        for p in g.params:
            layers[p.rpartition(".")[0]] = layers.get(p.rpartition(".")[0], 0) + named[p]
        out.append((g.name, size / total, max(layers.values()) / size))
    return out


def _fine_enough(name: str, shares) -> None:
    for group, share, largest in shares:
        assert share <= 0.75 or largest >= 0.5, f"{name}: group {group} holds {share:.1%} of the parameters"
    assert len(shares) >= 3, f"{name}: {len(shares)} groups"


def test_every_torchvision_classifier_has_fine_layer_groups():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) > 70
    for name in names:
        # RegNet computes its widths with tensor ops that the meta device cannot run
        _fine_enough(name, _shares(name, build_on_meta=not name.startswith("regnet")))


def test_one_model_of_every_timm_family_has_fine_layer_groups():
    import timm

    families = [m for m in timm.list_modules() if timm.list_models(module=m)]
    assert len(families) > 80
    for family in families:
        name = "timm:" + timm.list_models(module=family)[0]
        _fine_enough(name, _shares(name))


def test_the_groups_that_were_coarse_are_split_and_squeezenet_gets_a_head():
    from trainables.models import build_backbone

    regnet = [g for g, share, _ in _shares("regnet_y_400mf", build_on_meta=False)]
    assert regnet[:2] == ["stem", "trunk_output.block1"] and "trunk_output.block4" in regnet
    assert [g for g, _, _ in _shares("maxvit_t")][:3] == ["stem", "blocks.0", "blocks.1"]
    squeeze = build_backbone({"name": "squeezenet1_1", "weights": "none"}, 3)
    assert squeeze.head.params == ["classifier.1.weight", "classifier.1.bias"]
    assert squeeze.model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# --------------------------------------------------------------------------- checks where trials run


def test_worker_side_checks_name_the_key(base_spec, tmp_path):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    config = validate(base_spec).trial_config()
    [found] = check([config])
    assert found["classes"] == 10 and found["groups"][-1] == "head"
    for mutate, key, needle in [
        (lambda c: c["data"].update(name="image_folder", root=str(tmp_path / "nowhere")), "data", "not found: looked in"),
        (lambda c: c["model"].update(weights=str(tmp_path / "w.pt")), "model", "no file at"),
        (lambda c: c["strategy"].update(unfreeze_last=9), "strategy", "this backbone has 5 layer groups"),
    ]:
        c = trial_config(base_spec)
        mutate(c)
        with pytest.raises(CheckError) as e:
            check([c])
        assert e.value.key == key and needle in e.value.message, (key, e.value)
