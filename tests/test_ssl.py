"""Self-supervision: pretext tasks as loss components (rotation, colourisation, SimCLR), the
online probe of pre-training, joint training, and chained sweeps (model.weights: sweep:<name>)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BASE_SPEC, SEARCH_SPACES, offline_command, run_cli, trial_config
from orchestrator.spec import SpecError, validate
from trainables.losses.ssl import grayscale, head_module, nt_xent, rgb_to_lab, rotate
from trainables.trainable import FineTuneTrial

torch.set_num_threads(1)


def spec_with(losses=None, epochs=1, label_fraction=1.0, supervised="joint", **train):
    spec = copy.deepcopy(BASE_SPEC)
    spec["data"].update(max_images=80, label_fraction=label_fraction, num_workers=0)
    spec["losses"] = losses or {}
    spec["train"].update(epochs=epochs, supervised=supervised, **train)
    return spec


def trial(spec) -> FineTuneTrial:
    return FineTuneTrial(trial_config(spec))


def first_batch(t: FineTuneTrial):
    x, y = next(iter(t.loaders["train"]))
    return t.inputs(x), y


TIMING = ("images_per_s", "train/peak_mem_mb")  # measurements of the machine, not of the training


def fit(t: FineTuneTrial):
    out = []
    t.fit(lambda m, d: out.append({k: v for k, v in m.items() if k not in TIMING}), checkpoint=False)
    return out


# --------------------------------------------------------------------------- the pieces


def test_rotation_labels_are_the_quarter_turns_applied():
    t = trial(spec_with({"rotation": {}}))
    comp = t.components["rotation"]
    pixels = torch.rand(64, 3, 16, 16)
    before = comp.generator.get_state()
    rotated, labels = comp.views(pixels)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]  # every rotation is drawn
    for img, turned, k in zip(pixels, rotated, labels.tolist()):
        assert torch.equal(turned, torch.rot90(img, k, dims=(1, 2)))
        assert torch.equal(torch.rot90(turned, -k, dims=(1, 2)), img)  # turning back gives the image
    comp.generator.set_state(before)
    assert torch.equal(comp.views(pixels)[1], labels)  # drawn from the component's generator
    # label 1 is a quarter turn counter-clockwise: the top-right corner goes to the top-left
    corner = torch.zeros(1, 1, 4, 4)
    corner[0, 0, 0, 3] = 1
    assert rotate(corner, torch.tensor([1]))[0, 0, 0, 0] == 1


def test_nt_xent_is_the_direct_computation_on_a_small_batch():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(4, 8), torch.randn(4, 8), 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n, total = 4, 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[partner]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(total / (2 * n), rel=1e-5)
    # two views that are the same point and far from every other: the loss goes to 0 as tau does
    same = torch.eye(4)
    assert float(nt_xent(same, same, 0.01)) < 1e-6


def test_nt_xent_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    for tau in (0.1, 0.5):
        ours = nt_xent(z1, z2, tau)
        theirs = lightly_loss.NTXentLoss(temperature=tau)(z1, z2)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_colourisation_targets_are_the_original_pixels_and_its_input_is_grayscale():
    t = trial(spec_with({"colorize": {"space": "rgb"}}))
    comp = t.components["colorize"]
    x_uint8, _ = next(iter(t.loaders["train"]))
    original = x_uint8.float() / 255
    pixels = comp.images(t.inputs(x_uint8))  # the labelled batch, back from its normalisation
    assert torch.allclose(pixels, original, atol=1e-5)
    assert torch.allclose(comp.targets(pixels), original, atol=1e-5)
    gray = grayscale(pixels)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    # the loss is taken against those targets: a decoder that gave the original colours scores 0
    seen = []
    comp.predict = lambda g: (seen.append(g), comp.targets(original))[1]
    assert float(comp.loss(t.inputs(x_uint8), None)) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(seen[0], grayscale(original), atol=1e-5)


def test_lab_targets_are_the_original_colours_a_and_b():
    white, red = torch.ones(1, 3, 1, 1), torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    assert rgb_to_lab(white).flatten().tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert rgb_to_lab(red).flatten().tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # CIE reference
    t = trial(spec_with({"colorize": {"space": "lab", "loss": "l2"}}))
    comp = t.components["colorize"]
    pixels = torch.rand(2, 3, 8, 8)
    assert torch.allclose(comp.targets(pixels), rgb_to_lab(pixels)[:, 1:] / 128)
    assert comp.predict(grayscale(pixels)).shape == (2, 2, 8, 8)  # decoded, upsampled to the input size


def test_simclr_views_differ_stay_in_range_and_repeat_from_the_generator():
    t = trial(spec_with({"simclr": {"crop_scale_min": 0.2}}))
    comp = t.components["simclr"]
    pixels = torch.rand(8, 3, 32, 32)
    state = comp.generator.get_state()
    a, b = comp.augment(pixels), comp.augment(pixels)
    assert a.shape == pixels.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.allclose(a, b)
    comp.generator.set_state(state)
    assert torch.equal(comp.augment(pixels), a)


@pytest.mark.parametrize("name, module", [("resnet18", "fc"), ("timm:tf_efficientnet_lite0", "classifier"),
                                          ("timm:convnext_atto", "head.fc")])
def test_the_encoder_features_are_the_heads_input(name, module):
    from trainables.models import build_backbone
    from trainables.config import ModelConfig

    b = build_backbone(ModelConfig(name=name, weights="none"), 10)
    assert head_module(b.model, b) is b.model.get_submodule(module)


# --------------------------------------------------------------------------- in a trial


def test_lambda_zero_trains_exactly_as_supervised_only():
    plain = fit(trial(spec_with(epochs=2)))
    zero = trial(spec_with({"simclr": {"weight": 0}, "rotation": {"weight": 0}, "colorize": {"weight": 0}}, epochs=2))
    assert zero.components == {} and zero.feature_sets is not None  # left out; the feature cache as without it
    assert fit(zero) == plain
    # the control: lambda > 0 trains otherwise
    joint = fit(trial(spec_with({"simclr": {"weight": 1.0}}, epochs=2)))
    assert joint[-1]["val/loss"] != plain[-1]["val/loss"]


def test_pretext_heads_train_as_their_own_param_group_and_keep_the_feature_cache_off():
    t = trial(spec_with({"rotation": {}, "colorize": {}}))
    assert t.feature_sets is None  # the pretext tasks need the images
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    for name in ("rotation", "colorize"):
        head = t.components[name].head
        assert groups[f"losses.{name}"]["params"] == list(head.parameters())
        assert groups[f"losses.{name}"]["lr"] == pytest.approx(t.phase_cfg.train.lr)
    before = [p.detach().clone() for p in t.components["rotation"].head.parameters()]
    metrics = t.train_one_epoch()
    assert any(not torch.equal(a, p) for a, p in zip(before, t.components["rotation"].head.parameters()))
    assert {"train/rotation_loss", "train/rotation_acc", "train/colorize_loss"} <= set(metrics)


def test_probe_trains_the_head_on_detached_features():
    spec = spec_with(supervised="probe", epochs=1)
    spec["strategy"]["unfreeze_last"] = 3
    t = trial(spec)
    head = set(t.backbone.head.params)
    x, y = first_batch(t)
    loss, _, _ = t.supervised_loss(x, y)
    loss.backward()
    grads = {n: p.grad for n, p in t.model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None for n in head)
    assert all(g is None for n, g in grads.items() if n not in head)  # the cross-entropy stops at the head
    # with a pretext task the encoder learns from it alone
    p = trial(spec_with({"simclr": {}}, supervised="probe"))
    x, y = first_batch(p)
    p.components["simclr"].loss(x, y).backward()
    body = [q.grad for n, q in p.model.named_parameters() if q.requires_grad and n not in head]
    assert body and all(g is not None for g in body)


def test_probe_leaves_the_encoder_as_it_was_without_a_pretext_task():
    spec = spec_with(supervised="probe", epochs=1)
    spec["strategy"].update(unfreeze_last=2, feature_cache="off")
    t = trial(spec)
    head = set(t.backbone.head.params)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_one_epoch()
    after = dict(t.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in head)
    assert any(not torch.equal(before[n], after[n]) for n in head)


def test_unlabelled_images_feed_the_pretext_task_and_resume_is_exact(tmp_path):
    from test_trainable import straight_and_resumed

    spec = spec_with({"simclr": {"unlabeled_ratio": 2}, "rotation": {"source": "unlabeled"}}, epochs=3,
                     label_fraction=0.5)
    t = trial(spec)
    assert t.components["simclr"].loader is not None and t.components["rotation"].loader is not None
    x, y = first_batch(t)
    unlabelled = min(2 * spec["train"]["batch_size"], len(t.data.unlabeled))
    assert t.components["simclr"].images(x).shape[0] == len(x) + unlabelled
    cfg = trial_config(spec)
    straight, rest, at = straight_and_resumed(cfg, tmp_path)
    assert at == 1 and [m["epoch"] for m in rest] == [2, 3]
    for a, b in zip(straight[1:], rest):
        for k in ("train/loss", "train/simclr_loss", "train/rotation_loss", "val/loss", "val/acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(state["components"]["simclr"]["head"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_source_unlabeled_needs_unlabelled_images():
    with pytest.raises(ValueError, match=r"losses.rotation.source: unlabeled, but no training image is unlabelled"):
        trial(spec_with({"rotation": {"source": "unlabeled"}}))


def test_pretext_fields_are_validated_with_their_key_path():
    spec = spec_with({"simclr": {"temprature": 0.5}, "colorize": {"space": "hsv"}})
    spec["model"]["weights"] = "sweep:"
    with pytest.raises(SpecError) as e:
        validate(spec)
    said = str(e.value)
    assert "losses.simclr.temprature: unknown key" in said
    assert "losses.colorize.space" in said and "'rgb' or 'lab'" in said
    assert "model.weights: sweep: needs the name or id of a finished sweep" in said
    ok = spec_with({"simclr": {}})
    ok["model"]["weights"] = "sweep:ssl_pretrain"
    assert validate(ok).model.weights == "sweep:ssl_pretrain"  # the form validates without torch or the sweep


# --------------------------------------------------------------------------- the shipped studies


OFFLINE = ("digits", "mnist5k")


@pytest.mark.parametrize("study", ["ssl_pretrain", "ssl_finetune", "ssl_joint"])
def test_each_ssl_study_header_gives_a_complete_offline_command(study):
    spec, _ = offline_command(study)
    assert spec.data.name in OFFLINE
    if study == "ssl_finetune":  # from the offline pre-training sweep, in the same storage, on the same images
        pre, _ = offline_command("ssl_pretrain")
        assert spec.model.weights == "sweep:ssl_pretrain" and spec.storage.path == pre.storage.path
        assert spec.data == pre.data and spec.model.name == pre.model.name
        assert "ssl_pretrain.yaml's '# Try offline:' line" in (SEARCH_SPACES / "ssl_finetune.yaml").read_text()
    else:
        assert spec.model.weights == "none" or spec.model.name == "timm:tf_efficientnet_lite0"
    assert "model.name" not in spec.search.space


def test_the_shipped_studies_are_the_papers_arms():
    pre = validate(yaml.safe_load((SEARCH_SPACES / "ssl_pretrain.yaml").read_text()))
    fine = validate(yaml.safe_load((SEARCH_SPACES / "ssl_finetune.yaml").read_text()))
    joint = validate(yaml.safe_load((SEARCH_SPACES / "ssl_joint.yaml").read_text()))
    for s in (pre, fine, joint):
        assert (s.data.name, s.model.name, s.search.metric) == ("cifar10", "resnet50", "val/acc")
    assert pre.train.supervised == "probe" and "simclr" in pre.losses and pre.search.scope == "last"
    assert fine.model.weights == "sweep:ssl_pretrain" and not fine.losses
    assert joint.train.supervised == "joint" and 0 in joint.search.space["losses.simclr.weight"].candidates()


# --------------------------------------------------------------------------- chained sweeps


def test_a_reference_to_no_sweep_exits_2_and_makes_nothing(tmp_path, write_spec):
    storage = tmp_path / "sweeps"
    spec = spec_with({"simclr": {}})
    spec["model"]["weights"] = "sweep:ssl_pretrain"
    spec["storage"] = {"path": str(storage)}
    r = run_cli(["run", str(write_spec(spec))], cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model.weights: sweep:ssl_pretrain: no sweep named 'ssl_pretrain'" in r.stderr
    assert "run the sweep that makes them first" in r.stderr
    assert not storage.exists(), "no sweep folder, no MLflow store"
    r = run_cli(["validate", str(write_spec(spec)), "--check"], cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "no sweep named 'ssl_pretrain'" in r.stderr


def test_a_reference_to_a_sweep_without_a_best_checkpoint_exits_2_and_makes_nothing(tmp_path, write_spec):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "sweeps"
    old = storage / "ssl_pretrain-20260101-000000-aaaa"
    old.mkdir(parents=True)
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ssl_pretrain")
    parent = client.create_run(exp).info.run_id  # a sweep whose trials all failed: no child tagged best
    meta = {"id": old.name, "name": "ssl_pretrain", "status": "finished", "tracking_uri": uri, "experiment_id": exp,
            "parent_run_id": parent, "metric": "val/acc", "created": "2026-01-01T00:00:00"}
    (old / "sweep.json").write_text(json.dumps(meta))
    runs_before, experiments = len(client.search_runs([exp])), [e.name for e in client.search_experiments()]
    spec = spec_with()
    spec["model"]["weights"] = "sweep:ssl_pretrain"
    spec["storage"] = {"path": str(storage)}
    r = run_cli(["run", str(write_spec(spec))], cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"sweep {old.name} logged no best checkpoint" in r.stderr
    assert sorted(p.name for p in storage.iterdir()) == sorted(["mlflow.db", old.name])
    assert len(client.search_runs([exp])) == runs_before
    assert [e.name for e in client.search_experiments()] == experiments  # no experiment for the new sweep
    meta["status"] = "interrupted"
    (old / "sweep.json").write_text(json.dumps(meta))
    r = run_cli(["run", str(write_spec(spec))], cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "no finished sweep named 'ssl_pretrain'" in r.stderr and "tl-sweep resume" in r.stderr


def test_a_searched_sweep_reference_is_refused():
    from orchestrator.lineage import locate
    from orchestrator.sweepdir import InputError

    spec = spec_with()
    spec["search"]["space"] = {"model.weights": {"grid": ["none", "sweep:ssl_pretrain"]}}
    with pytest.raises(InputError, match="search.space.model.weights: a sweep: reference is resolved once"):
        locate(validate(spec))


# --------------------------------------------------------------------------- end to end


def shipped(study: str, storage: Path, extra: dict):
    """A shipped SSL study's own offline command, shrunk further by ``extra``."""
    _, sets = offline_command(study)
    sets = [s for s in sets if not s.startswith("storage.path=")]
    for k, v in extra.items():
        sets.append(f"{k}={v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()}")
    sets.append(f"storage.path={storage}")
    return ["run", str(SEARCH_SPACES / f"{study}.yaml"), *[w for s in sets for w in ("--set", s)]]


SHRINK = {"data": {"name": "mnist5k", "image_size": 32, "max_images": 300, "label_fraction": 0.5, "num_workers": 0},
          "train.epochs": 2}


@pytest.mark.slow
def test_pretrain_then_finetune_then_joint_shrunk(tmp_path):
    from test_e2e import mlflow_client, only_sweep, sweep_runs

    storage = tmp_path / "sweeps"
    r = run_cli(shipped("ssl_pretrain", storage, {**SHRINK, "losses.simclr.unlabeled_ratio": 1,
                                                   "search.space.losses.simclr.temperature": {"grid": [0.5]}}),
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    client = mlflow_client(storage)
    pre = only_sweep(storage, "ssl_pretrain")
    _, (child,) = sweep_runs(client, pre)
    assert child.data.params["train.supervised"] == "probe" and child.info.status == "FINISHED"
    assert {"train/simclr_loss", "val/acc", "test/acc"} <= set(child.data.metrics)
    ckpt = torch.load(client.download_artifacts(child.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)),
                      weights_only=True)["model"]
    # another backbone than the source's is refused before anything is made; the sweep's id works as its name does
    folders = sorted(p.name for p in storage.iterdir())
    fine_shrink = {**SHRINK, "search.num_samples": 1, "search.scheduler.grace_period": 1}
    r = run_cli(shipped("ssl_finetune", storage, {**fine_shrink, "model.name": "resnet34"}), cwd=tmp_path)
    assert r.returncode == 2 and "its best trial trained a resnet18" in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in storage.iterdir()) == folders
    by_id = shipped("ssl_finetune", storage, {**fine_shrink, "model.weights": f"sweep:{pre['id']}"})
    r = run_cli(["validate", "--check", *by_id[1:]], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    r = run_cli(shipped("ssl_finetune", storage, fine_shrink), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    fine = only_sweep(storage, "ssl_finetune")
    parent, (ft,) = sweep_runs(client, fine)
    lineage = f"{pre['id']}/{child.info.run_id}"
    assert parent.data.tags["tl_sweep.weights_from"] == lineage
    assert parent.data.params["spec.model.weights_from"] == lineage
    assert ft.data.params["model.weights_from"] == lineage and ft.info.status == "FINISHED"
    assert 0 <= ft.data.metrics["test/acc"] <= 1 and "train/simclr_loss" not in ft.data.metrics
    weights = Path(ft.data.params["model.weights"])
    assert weights.parent == storage / fine["id"] and weights.is_file()
    # the fine-tuning trial started from the pre-training sweep's best checkpoint, every tensor of it
    spec = yaml.safe_load(Path(client.download_artifacts(ft.info.run_id, "trial_spec.yaml", str(tmp_path))).read_text())
    start = FineTuneTrial(validate(spec).trial_config()).model.state_dict()
    assert set(start) == set(ckpt) and all(torch.equal(start[k], ckpt[k]) for k in ckpt)

    r = run_cli(shipped("ssl_joint", storage, {**SHRINK, "losses.simclr.unlabeled_ratio": 1}), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, children = sweep_runs(client, only_sweep(storage, "ssl_joint"))
    by_weight = {c.data.params["losses.simclr.weight"]: c for c in children}
    assert set(by_weight) == {"0.0", "1.0"}
    assert "train/simclr_loss" in by_weight["1.0"].data.metrics
    assert "train/simclr_loss" not in by_weight["0.0"].data.metrics  # lambda 0: supervised only
    assert all(0 <= c.data.metrics["test/acc"] <= 1 for c in children)
