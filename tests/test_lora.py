"""LoRA written here (trainables/lora.py, strategy ``lora``): the adapter's math on Linear and
Conv2d (grouped and depthwise too), merging, what trains and what it counts, checkpoints and
resume, export as plain layers, and search_spaces/lora.yaml end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from conftest import SEARCH_SPACES, run_cli, shrunk, trial_config
from trainables import lora as L
from trainables.trainable import FineTuneTrial

LAYERS = {
    "linear": lambda: nn.Linear(12, 20),
    "conv": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
    "grouped": lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
    "conv1x1": lambda: nn.Conv2d(8, 16, 1),
}


def sample(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g)
    return torch.randn(3, layer.in_channels, 9, 9, generator=g)


def adapted(kind: str, rank: int = 3, alpha: float = 6.0):
    """A layer, a plain copy of it, and the layer with an adapter whose B is random (trained)."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    base = LAYERS[kind]()
    base.load_state_dict(layer.state_dict())
    holder = nn.Sequential(layer)
    L.add_lora(holder, ["0"], rank, alpha)
    return base, holder[0]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_an_adapter_with_b_zero_is_its_base_layer(kind):
    base, layer = adapted(kind)
    x = sample(base)
    p = L.adapter(layer)
    assert torch.count_nonzero(p.lora_B) == 0 and torch.count_nonzero(p.lora_A) > 0, "A random, B zero"
    layer.train()
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_weights_give_base_plus_adapter(kind):
    base, layer = adapted(kind)
    p = L.adapter(layer)
    with torch.no_grad():
        p.lora_B.normal_()
    x = sample(base)
    delta = (p.lora_B @ p.lora_A).view(base.weight.shape) * (p.alpha / p.rank)
    # base plus adapter, by linearity: the base layer's output plus the update's own output
    if isinstance(base, nn.Linear):
        expected = base(x) + F.linear(x, delta)
    else:
        expected = base(x) + F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)
        holder = nn.Sequential(layer)
        plain = L.merged(holder)
        assert type(plain[0]) is type(base) and not parametrize.is_parametrized(plain[0])
        assert set(plain.state_dict()) == {f"0.{k}" for k in base.state_dict()}
        assert torch.allclose(plain(x), expected, atol=1e-5)
        assert torch.allclose(layer(x), expected, atol=1e-5), "merging a copy leaves the adapted layer as it was"


@pytest.mark.parametrize("kind, expected", [("linear", 3 * (20 + 12)), ("conv", 3 * (10 + 6 * 9)),
                                            ("grouped", 3 * (12 + 2 * 9)), ("depthwise", 3 * (8 + 9)),
                                            ("conv1x1", 3 * (16 + 8))])
def test_an_adapter_has_rank_times_out_plus_fan_in_parameters(kind, expected):
    _, layer = adapted(kind, rank=3)
    assert sum(p.numel() for p in L.adapter(layer).parameters()) == expected == L.count(layer.weight.shape, 3)


def test_adapter_dropout_drops_columns_of_a_in_training_only():
    torch.manual_seed(0)
    p = L.LoRAParametrization((4, 50), rank=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        p.lora_B.fill_(1.0)
    p.train()
    d = p.delta()
    dropped = (d == 0).all(0)  # a dropped column of A zeroes a column (an input feature) of the update
    assert 0 < int(dropped.sum()) < 50
    kept = ~dropped
    full = p.lora_B @ p.lora_A * p.scale
    assert torch.allclose(d[:, kept], full[:, kept] * 2), "kept columns scaled by 1 / (1 - p)"
    p.eval()
    assert torch.equal(p.delta(), full)


def test_targets_by_pattern_regex_and_group():
    from trainables.models import build_backbone

    b = build_backbone({"name": "timm:test_vit", "weights": "none"}, 3)
    qkv = L.find_targets(b.model, ["blocks.*.attn.qkv"])
    assert qkv and all(n.endswith("attn.qkv") for n in qkv)
    assert L.find_targets(b.model, ["re:blocks\\.[01]\\.mlp\\.fc\\d"]) == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    body = len(b.body)
    last = L.targets_by_group(b.model, b.groups, ["*"], [body - 1])
    assert last and {g for _, g in last} == {body - 1} and all(n.startswith(b.groups[body - 1].name) for n, _ in last)
    everything = L.targets_by_group(b.model, b.groups, ["*"], range(body))
    assert "patch_embed.proj" in dict(everything) and "head" not in dict(everything), "the head is never adapted"


# --------------------------------------------------------------------------- the strategy in a trial


def lora_spec(spec, **strategy):
    spec["strategy"] = {"name": "lora", "rank": 4, **strategy}
    spec["data"].update(max_images=80)
    return spec


def test_only_adapters_and_head_train_and_the_count_is_what_the_rank_implies(base_spec):
    # tf_efficientnet_lite0: depthwise and 1x1 convs, a Linear head
    trial = FineTuneTrial(trial_config(lora_spec(base_spec, target_groups=3)))
    model, groups = trial.model, trial.backbone.groups
    adapted = [n for n, m in model.named_modules() if L.adapter(m) is not None]
    assert adapted and any(model.get_submodule(n).groups > 1 for n in adapted), "depthwise convs adapted"
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == set(L.lora_parameters(model)) | set(groups[-1].params)
    assert sorted(p for g in groups for p in g.params) == sorted(named), "the groups name every parameter once"
    for n in adapted:  # the adapter's parameters belong to the group of its module
        owner = next(g for g in groups if f"{n}.parametrizations.weight.original" in g.params)
        assert {f"{n}.parametrizations.weight.0.lora_A", f"{n}.parametrizations.weight.0.lora_B"} <= set(owner.params)
    n = len(groups)
    assert trial.active_groups == list(range(n - 4, n)) and trial.strategy.frozen_prefix(2) == n - 4
    in_optimizer = {id(p) for g in trial.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in named.values() if p.requires_grad}

    expected = sum(L.count(model.get_submodule(m).parametrizations.weight.original.shape, 4) for m in adapted)
    expected += sum(named[p].numel() for p in groups[-1].params)
    before = {k: v.detach().clone() for k, v in named.items()}
    metrics = trial.train_one_epoch()
    assert metrics["model/params_trainable"] == expected == trial.strategy.trainable_count(model)
    assert metrics["model/params_total"] == sum(p.numel() for p in named.values())
    moved = {k for k, v in named.items() if not torch.equal(v, before[k])}
    assert moved and moved <= set(L.lora_parameters(model)) | set(groups[-1].params), "base weights stay frozen"
    assert any(k.endswith("lora_B") for k in moved)


def test_prepare_twice_adds_no_second_adapter(base_spec):
    trial = FineTuneTrial(trial_config(lora_spec(base_spec)))
    params = [n for n, _ in trial.model.named_parameters()]
    trial.strategy.prepare(trial.model)
    assert [n for n, _ in trial.model.named_parameters()] == params
    assert all(len(m.parametrizations.weight) == 1 for m in trial.model.modules() if L.adapter(m) is not None)
    with pytest.raises(ValueError, match="cannot become rank 8"):
        L.add_lora(trial.model, [n for n, m in trial.model.named_modules() if L.adapter(m) is not None][:1], 8, 16.0)


def test_rank_full_is_unfreeze_last(base_spec):
    lora = FineTuneTrial(trial_config(lora_spec(base_spec, rank="full", target_groups=2)))
    base_spec["strategy"] = {"name": "unfreeze_last", "unfreeze_last": 2}
    plain = FineTuneTrial(trial_config(base_spec))
    assert not any(L.adapter(m) is not None for m in lora.model.modules())
    assert lora.active_groups == plain.active_groups
    assert lora.strategy.trainable_count(lora.model) == plain.strategy.trainable_count(plain.model)
    assert lora.strategy.export(lora.model) is lora.model


def test_bn_only_trains_bn_affine_beside_the_adapters(base_spec):
    from trainables.strategies.batchnorm import bn_layers

    trial = FineTuneTrial(trial_config(lora_spec(base_spec, bn="bn_only")))
    bn = {id(p) for _, m in bn_layers(trial.model) for p in m.parameters()}
    training = {id(p) for p in trial.model.parameters() if p.requires_grad}
    lora = {id(p) for p in L.lora_parameters(trial.model).values()}
    assert bn <= training and lora <= training


def test_the_strategy_says_what_does_not_fit(base_spec):
    from trainables.check import CheckError, check

    for strategy, needle in [({"target_groups": 40}, "target_groups=40, but this backbone has 8 layer groups"),
                             ({"targets": ["nothing.*"]}, "match no nn.Linear / nn.Conv2d")]:
        with pytest.raises(CheckError, match=needle):
            check([trial_config(lora_spec(base_spec, **strategy))])


def test_lean_checkpoint_keeps_adapters_and_head_and_resumes_exactly(base_spec, tmp_path):
    from test_trainable import straight_and_resumed

    base_spec["train"].update(epochs=3)
    cfg = trial_config(lora_spec(base_spec, dropout=0.1))
    straight, rest, at = straight_and_resumed(cfg, tmp_path)
    assert at == 1 and [m["epoch"] for m in rest] == [2, 3]
    for key in ("train/loss", "val/loss", "val/acc"):
        assert [m[key] for m in rest] == pytest.approx([m[key] for m in straight[1:]], rel=1e-5), key
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert any(k.endswith("lora_A") for k in state) and "classifier.weight" in state
    assert not any(k.endswith("parametrizations.weight.original") for k in state), "base weights come from their source"


def test_phases_keep_their_adapters(base_spec):
    lora_spec(base_spec)
    base_spec["train"].update(epochs=1)
    base_spec["phases"] = [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1, "strategy": {"dropout": 0.2}}]
    trial = FineTuneTrial(trial_config(base_spec))
    trial.fit(lambda m, d: None, checkpoint=False)
    layers = [m for m in trial.model.modules() if L.adapter(m) is not None]
    assert layers and all(len(m.parametrizations.weight) == 1 and L.adapter(m).dropout == 0.2 for m in layers)


def test_the_frozen_prefix_cache_trains_as_the_full_model(base_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    lora_spec(base_spec, target_groups=2)
    runs, trials = {}, {}
    for mode in ("off", "auto"):
        base_spec["strategy"]["feature_cache"] = mode
        reports = []
        trials[mode] = FineTuneTrial(trial_config(base_spec))
        trials[mode].fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode] = [(m["train/loss"], m["val/loss"]) for m in reports]
    assert trials["off"].feature_sets is None and trials["auto"].feature_sets is not None
    for cached, full in zip(runs["auto"], runs["off"]):
        assert cached == pytest.approx(full, rel=1e-3)
    # every adapter is in the trained suffix (blocks.5.0.conv_pw, the first layer after the
    # prefix, has no bias: the split must know its weight's new name)
    assert all(torch.count_nonzero(p) for n, p in L.lora_parameters(trials["auto"].model).items() if n.endswith("lora_B"))


def test_export_is_plain_layers_with_the_same_logits(base_spec):
    from orchestrator.bestmodel import BestTrial, served

    trial = FineTuneTrial(trial_config(lora_spec(base_spec)))
    trial.train_one_epoch()
    trial.model.eval()
    model = served(BestTrial("run", trial, {}))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any("parametrizations" in k or "lora" in k for k in model.state_dict())
    x, _ = next(iter(trial.loaders["val"]))
    with torch.no_grad():
        ours = trial.model(trial.inputs(x))
        exported = model(x.float() / 255.0)
    assert torch.allclose(exported, ours, atol=1e-4)
    assert any(L.adapter(m) is not None for m in trial.model.modules()), "the trial's model keeps its adapters"
    trial.train_one_epoch()  # and still trains


# --------------------------------------------------------------------------- the study, end to end


@pytest.mark.slow
def test_lora_study_runs_shrunk_and_exports_plain(tmp_path, pets_root):
    from orchestrator.bestmodel import load_best, served
    from orchestrator.sweepdir import find_sweep
    from test_e2e import mlflow_client, only_sweep, sweep_runs

    storage = tmp_path / "sweeps"
    extra = {"model.weights": "none", "train.epochs": 1, "train.warmup_epochs": 0,
             "search.space.model.name": {"grid": ["resnet18", "timm:test_vit"]},
             "search.space.strategy.rank": {"grid": [4, "full"]},
             "search.space.strategy.target_groups": {"grid": ["all"]},
             "search.space.train.lr": {"grid": [1.0e-3]}}
    r = run_cli(["run", str(SEARCH_SPACES / "lora.yaml"), *shrunk(extra), "--set", f"data.root={pets_root}",
                 "--set", f"storage.path={storage}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = only_sweep(storage, "lora")
    client = mlflow_client(storage)
    _, children = sweep_runs(client, meta)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    trainable = {(c.data.params["model.name"], c.data.params["strategy.rank"]): c.data.metrics["model/params_trainable"]
                 for c in children}
    for model in ("resnet18", "timm:test_vit"):
        assert trainable[(model, "4")] < trainable[(model, "full")], model
    assert all(c.data.params["strategy.name"] == "lora" for c in children)

    best = load_best(find_sweep(meta["id"], str(storage)))
    assert best is not None
    assert not any(parametrize.is_parametrized(m) for m in served(best).modules())
    r = run_cli(["export", meta["id"], "--storage", str(storage), "-o", str(tmp_path / "best.yaml"),
                 "--register", "pets-lora"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "registered the best trial's model as pets-lora version 1" in r.stdout

