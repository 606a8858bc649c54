"""Masked / sparse fine-tuning (trainables/strategies/masked.py): the mask's choice (magnitude,
Fisher, random, BitFit), its exact count, its enforcement against weight decay and momentum,
checkpoints, and the study masked.yaml end to end."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import SEARCH_SPACES, run_cli, shrunk, trial_config
from test_trainable import straight_and_resumed
from trainables.models import Backbone, LayerGroup
from trainables.strategies.masked import Masked, MaskedConfig
from trainables.trainable import FineTuneTrial


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(base_spec):
    """A resnet18 from scratch at 16 px, 60 digits, batches of 8: 4 steps an epoch."""
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["train"].update(epochs=2, batch_size=8, scheduler="constant", lr=5e-2)
    return base_spec


def masked_trial(spec, optimizer="adamw", **strategy):
    spec = copy.deepcopy(spec)
    spec["strategy"] = {"name": "masked", **strategy}
    spec["train"].update(optimizer=optimizer, weight_decay=0.1, momentum=0.9)
    return FineTuneTrial(trial_config(spec))


def body_names(trial):
    return [n for g in trial.backbone.body for n in g.params]


def head_size(trial):
    named = dict(trial.model.named_parameters())
    return sum(named[n].numel() for n in trial.backbone.head.params)


# --------------------------------------------------------------------------- a hand-made model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.body(x)))


def tiny_backbone():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.body.weight.mul_(0.01)
        model.body.weight[:, 3] = 10.0  # the largest magnitudes, on an input that is always 0
        model.head.weight.copy_(0.1 * torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]))  # every feature alike
    groups = [LayerGroup("body", ["body.weight", "bn.weight", "bn.bias"]), LayerGroup("head", ["head.weight", "head.bias"])]
    return Backbone(model, groups, (0.0,) * 3, (1.0,) * 3)


def tiny_batches(n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        x[:, 0] *= 10.0  # feature 0 is 10x the others: its column's gradients are 10x theirs
        x[:, 3] = 0.0  # feature 3 never fires: its column's gradients are 0
        yield x, torch.randint(0, 2, (8,), generator=g)


def test_fisher_picks_the_largest_accumulated_squared_gradients_in_eval_mode():
    bb = tiny_backbone()
    model = bb.model
    model.train()  # as the trial leaves it; Fisher must score in eval mode all the same
    stats = model.bn.running_mean.clone(), model.bn.running_var.clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    # by hand: the squared gradients of the loss, summed over the batches, in eval mode
    ref = copy.deepcopy(model).eval()
    pool = [ref.body.weight, ref.bn.weight, ref.bn.bias]
    sums = [torch.zeros_like(p) for p in pool]
    for x, y in tiny_batches(3):
        grads = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), pool)
        for s, g in zip(sums, grads):
            s += g ** 2
    scores = torch.cat([s.flatten() for s in sums])
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected[scores.topk(4).indices] = True

    s = Masked(bb, MaskedConfig(method="fisher", fraction=4 / 24, fisher_batches=3), lr=0.1)
    s.prepare(model, tiny_batches)
    got = torch.cat([s.masks[n].flatten() for n in ("body.weight", "bn.weight", "bn.bias")])
    assert torch.equal(got, expected)
    # the large input's column, not the large weights of the dead input
    assert s.masks["body.weight"][:, 0].all() and int(s.masks["body.weight"].sum()) == 4
    assert not s.masks["bn.weight"].any() and not s.masks["bn.bias"].any()
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1]), \
        "scored in eval mode: BN's statistics untouched"
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    mag = Masked(tiny_backbone(), MaskedConfig(method="magnitude", fraction=4 / 24), lr=0.1)
    mag.prepare(mag.backbone.model)
    assert mag.masks["body.weight"][:, 3].all() and int(mag.masks["body.weight"].sum()) == 4, \
        "magnitude picks the largest |w|: the dead input's column"


def test_saved_masks_replace_the_ones_chosen_again_and_must_fit():
    a = Masked(tiny_backbone(), MaskedConfig(method="random", fraction=0.5), lr=0.1)
    b = Masked(tiny_backbone(), MaskedConfig(method="random", fraction=0.5), lr=0.1)
    torch.manual_seed(0)
    a.prepare(a.backbone.model)
    torch.manual_seed(1)
    b.prepare(b.backbone.model)
    assert not all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    state = a.state_dict()
    assert state["bits"].dtype == torch.uint8 and state["bits"].numel() == 3, "24 weights: 3 bytes"
    b.load_state_dict(state)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert b.trainable_count(b.backbone.model) == 12 + 10

    c = Masked(tiny_backbone(), MaskedConfig(method="magnitude", fraction=1 / 24), lr=0.1)
    c.prepare(c.backbone.model)  # one weight of body.weight: bn's tensors out of the optimizer
    with pytest.raises(RuntimeError, match="move other tensors"):
        c.load_state_dict(state)


def test_config_rejects_what_a_mask_cannot_be():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="bn_only"):
        MaskedConfig(bn="bn_only")
    with pytest.raises(ValidationError, match="fraction"):
        MaskedConfig(fraction=0)
    with pytest.raises(ValidationError, match="fraction"):
        MaskedConfig(fraction=1.5)
    with pytest.raises(ValidationError, match="method"):
        MaskedConfig(method="snip")
    with pytest.raises(ValidationError, match="fisher_batches"):
        MaskedConfig(fisher_batches=0)


# --------------------------------------------------------------------------- on a trial


def test_magnitude_keeps_the_exact_count_of_the_largest_weights_globally(tiny):
    trial = masked_trial(tiny, method="magnitude", fraction=0.003)
    s = trial.strategy
    named = dict(trial.model.named_parameters())
    body = body_names(trial)
    assert list(s.masks) == body, "the whole body is the pool (bn: train)"
    n = sum(named[b].numel() for b in body)
    k = round(0.003 * n)
    assert sum(int(m.sum()) for m in s.masks.values()) == k
    picked = torch.cat([named[b].detach().abs()[s.masks[b]] for b in body])
    left = torch.cat([named[b].detach().abs()[~s.masks[b]] for b in body])
    assert picked.min() >= left.max()
    # trainable_count: the mask's count plus the head, in the metric too
    m = trial.train_one_epoch()
    assert s.trainable_count(trial.model) == k + head_size(trial) == m["model/params_trainable"]
    # what is in the optimizer: the tensors with a chosen entry, and the head
    in_opt = {id(p) for g in trial.optimizer.param_groups for p in g["params"]}
    moving = {b for b in body if s.masks[b].any()} | set(trial.backbone.head.params)
    assert {n for n, p in named.items() if id(p) in in_opt} == moving == {n for n, p in named.items() if p.requires_grad}
    groups = {i for i, g in enumerate(trial.backbone.groups) for p in g.params if p in moving}
    assert s.trainable_groups(1) == sorted(groups)


def test_bn_frozen_leaves_bn_out_of_the_pool(tiny):
    trial = masked_trial(tiny, method="random", fraction=0.01, bn="frozen")
    bn = {f"{name}.{p}" for name, m in trial.model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert bn and not bn & set(trial.strategy.masks)
    assert not any(p.requires_grad for n, p in trial.model.named_parameters() if n in bn)


def test_random_masks_follow_the_trial_seed(tiny):
    def mask(seed):
        spec = copy.deepcopy(tiny)
        spec["train"]["seed"] = seed
        s = masked_trial(spec, method="random", fraction=0.01).strategy
        return torch.cat([m.flatten() for m in s.masks.values()])

    a, b, c = mask(0), mask(0), mask(1)
    assert torch.equal(a, b), "same seed, same mask"
    assert not torch.equal(a, c)
    assert int(a.sum()) == int(c.sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # sgd: momentum 0.9 + L2; adamw: decoupled decay
@pytest.mark.parametrize("method", ["magnitude", "fisher", "bitfit"])
def test_masked_weights_stay_bit_identical_through_decay_and_momentum(tiny, optimizer, method):
    trial = masked_trial(tiny, optimizer, method=method, fraction=0.05)
    named = dict(trial.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    s = trial.strategy
    for _ in range(2):  # 8 optimizer steps
        trial.train_one_epoch()
    for b in body_names(trial):
        stay = ~s.masks[b]
        assert torch.equal(named[b].detach()[stay], before[b][stay]), b
        if method == "bitfit":
            assert s.masks[b].all() == b.endswith("bias") and s.masks[b].any() == b.endswith("bias"), b
    moved = sum(int((named[b].detach() != before[b]).sum()) for b in body_names(trial))
    assert moved > 0.5 * sum(int(m.sum()) for m in s.masks.values()), "the chosen weights train"
    if method != "bitfit":
        # tensors with entries of both kinds sit in the optimizer: decay and momentum act on them
        in_opt = {id(p) for g in trial.optimizer.param_groups for p in g["params"]}
        assert any(id(p) in in_opt for p, _, _ in s.partial)


def test_without_the_restore_decay_would_move_masked_weights(tiny):
    # the control of the test above: the restore after each step is what holds them
    trial = masked_trial(tiny, "sgd", method="magnitude", fraction=0.05)
    trial.strategy.after_step = lambda model: None
    named = dict(trial.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trial.train_one_epoch()
    s = trial.strategy
    assert any(not torch.equal(named[b].detach()[~s.masks[b]], before[b][~s.masks[b]]) for b in s.masks if s.masks[b].any())


def test_bitfit_trains_the_biases_and_the_head(tiny):
    trial = masked_trial(tiny, method="bitfit")
    named = dict(trial.model.named_parameters())
    biases = [b for b in body_names(trial) if b.endswith("bias")]
    assert biases and all(named[b].requires_grad for b in biases)
    assert not any(named[b].requires_grad for b in body_names(trial) if not b.endswith("bias"))
    assert trial.strategy.partial == [], "whole tensors: nothing to restore"
    assert trial.strategy.trainable_count(trial.model) == sum(named[b].numel() for b in biases) + head_size(trial)


def test_a_resumed_masked_trial_retraces_the_uninterrupted_one(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg["strategy"] = {"name": "masked", "method": "fisher", "fraction": 0.02, "fisher_batches": 2}
    cfg["train"].update(epochs=3, optimizer="adamw", weight_decay=0.1)
    cfg = trial_config(cfg)
    straight, rest, at = straight_and_resumed(cfg, tmp_path)
    assert at == 1 and [m["epoch"] for m in rest] == [2, 3]
    assert [m["train/loss"] for m in rest] == pytest.approx([m["train/loss"] for m in straight[1:]], rel=1e-5)
    assert rest[-1]["val/acc"] == pytest.approx(straight[-1]["val/acc"])
    assert rest[-1]["model/params_trainable"] == straight[-1]["model/params_trainable"]

    # the masks come back from the checkpoint, and what they hold still is the initial weights, bit for bit
    initial = FineTuneTrial(cfg)
    resumed = FineTuneTrial(cfg)
    resumed.load(str(tmp_path))
    for _ in range(2):
        resumed.train_one_epoch()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["strategy"]
    assert torch.equal(saved["bits"], resumed.strategy.state_dict()["bits"])
    start, end = dict(initial.model.named_parameters()), dict(resumed.model.named_parameters())
    for b, mask in resumed.strategy.masks.items():
        assert torch.equal(end[b].detach()[~mask], start[b].detach()[~mask]), b


# --------------------------------------------------------------------------- the study, end to end


@pytest.mark.slow
def test_masked_study_runs_shrunk(tmp_path):
    from test_e2e import mlflow_client, only_sweep, sweep_runs
    from trainables.config import ModelConfig
    from trainables.models import build_backbone

    storage = tmp_path / "sweeps"
    fractions = [0.001, 0.01, 0.1]
    r = run_cli(["run", str(SEARCH_SPACES / "masked.yaml"), *shrunk({
        "data": {"name": "digits", "image_size": 32, "max_images": 150, "num_workers": 0},
        "model.name": "timm:tf_efficientnet_lite0", "train.epochs": 1, "strategy.fisher_batches": 2,
        "storage.path": str(storage)})], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, only_sweep(storage, "masked"))
    assert parent.info.status == "FINISHED" and len(children) == 12
    assert all(c.info.status == "FINISHED" for c in children)

    bb = build_backbone(ModelConfig(name="timm:tf_efficientnet_lite0", weights="none"), 10)
    named = dict(bb.model.named_parameters())
    head = sum(named[n].numel() for n in bb.head.params)
    body = sum(named[n].numel() for g in bb.body for n in g.params)
    biases = sum(named[n].numel() for g in bb.body for n in g.params if n.endswith("bias"))
    by = {}
    for c in children:
        m = c.data.metrics
        assert 0.0 <= m["val/acc"] <= 1.0 and "test/acc" in m
        assert m["model/params_total"] == body + head
        by[(c.data.params["strategy.method"], float(c.data.params["strategy.fraction"]))] = m["model/params_trainable"]
    assert set(by) == {(meth, f) for meth in ("magnitude", "fisher", "random", "bitfit") for f in fractions}
    for method in ("magnitude", "fisher", "random"):
        counts = [by[(method, f)] for f in fractions]
        assert counts == [round(f * body) + head for f in fractions], method
        assert counts == sorted(counts) and len(set(counts)) == 3
    assert {by[("bitfit", f)] for f in fractions} == {biases + head}
