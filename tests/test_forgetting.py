"""Catastrophic forgetting: data.classes, the next_task phase (GEM's accuracy matrix and BWT),
L2-SP and LwF, phase fields in a search space, and search_spaces/forgetting.yaml end to end."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import BASE_SPEC, SEARCH_SPACES, run_cli, trial_config
from orchestrator.spec import SpecError, validate
from trainables.trainable import FineTuneTrial

torch.set_num_threads(1)


def two_tasks(losses=None, epochs=(1, 1), second=("5", "6", "7"), unfreeze=2):
    """Digits 0-4, then (by default) 5-7 with a new 3-class head, at 32 px."""
    spec = copy.deepcopy(BASE_SPEC)
    spec["data"]["classes"] = ["0", "1", "2", "3", "4"]
    spec["train"]["epochs"] = 1
    spec["phases"] = [
        {"name": "low", "epochs": epochs[0]},
        {"name": "high", "kind": "next_task", "epochs": epochs[1], "data": {"classes": list(second)},
         "strategy": {"unfreeze_last": unfreeze}, **({"losses": losses} if losses is not None else {})},
    ]
    return spec


def run(spec):
    reports = []
    trial = FineTuneTrial(trial_config(spec))
    trial.fit(lambda m, d: reports.append(m), checkpoint=False)
    return trial, reports


def entered(spec):
    """A trial put straight into its next_task phase (the first task untrained: its model as built)."""
    trial = FineTuneTrial(trial_config(spec))
    trial.enter_phase(1)
    return trial


# --------------------------------------------------------------------------- BWT


def test_backward_transfer_is_gems_by_hand():
    from trainables.phases.next_task import backward_transfer

    assert backward_transfer([[0.8, 0.1], [0.5, 0.9]]) == pytest.approx(0.5 - 0.8)
    R = [[0.9, 0.1, 0.1], [0.7, 0.8, 0.2], [0.6, 0.5, 0.95]]
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert backward_transfer([[0.5, 0.2], [0.7, 0.6]]) == pytest.approx(0.2), "positive: the second task helped"
    with pytest.raises(ValueError):
        backward_transfer([[1.0]])


# --------------------------------------------------------------------------- data.classes


def test_data_classes_keep_those_classes_relabelled_in_order():
    from trainables.data import Source, select_classes
    from trainables.data.images import TensorImageSet

    labels = np.arange(10).repeat(3)
    images = (labels * 10).astype(np.uint8)[:, None, None, None].repeat(8, 2).repeat(8, 3)
    source = Source({"train": TensorImageSet(images, labels, 8)}, [str(i) for i in range(10)], {"odd": [1, 3, 5, 7, 9]})
    picked = select_classes(source, ["7", "3"], "toy")
    pool = picked.pools["train"]
    assert picked.classes == ["7", "3"] and len(pool) == 6 and sorted(set(pool.targets.tolist())) == [0, 1]
    for i in range(len(pool)):
        image, target = pool[i]
        assert target == pool.targets[i] and int(image[0, 0, 0]) // 10 == int(picked.classes[target])
    assert picked.groups == {"odd": [0, 1]}
    sub = pool.subset([0, 5])  # a subset keeps the new labels
    assert [sub[i][1] for i in range(2)] == sub.targets.tolist()


def test_data_classes_of_digits_and_its_errors():
    from trainables.data import DataError, build_data

    data = build_data({"name": "digits", "image_size": 16, "classes": [9, 4], "seed": 0})  # numbers read as names
    assert data.classes == ["9", "4"] and data.num_classes == 2
    assert all(set(s.targets.tolist()) == {0, 1} for s in (data.train, data.val, data.test))
    assert len(data.train) + len(data.val) + len(data.test) == 180 + 181  # digits has 180 nines, 181 fours
    with pytest.raises(DataError) as e:
        build_data({"name": "digits", "image_size": 16, "classes": ["4", "ten"]})
    assert "data.classes" in str(e.value) and "'ten'" in str(e.value) and "0, 1, 2" in str(e.value)
    for bad in ([], ["1", "1"]):
        spec = copy.deepcopy(BASE_SPEC)
        spec["data"]["classes"] = bad
        with pytest.raises(SpecError) as e:
            validate(spec)
        assert any(p.startswith("data.classes") for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- the next_task phase


def test_the_first_tasks_head_is_kept_unchanged_and_measured_after_the_second():
    from trainables.phases.next_task import accuracy

    spec = two_tasks(epochs=(1, 2))
    heads = {}
    trial = FineTuneTrial(trial_config(spec))

    def report(metrics, directory):
        if metrics["epoch"] == 1:  # the first task's end: its head and body as they are
            heads["first"] = copy.deepcopy(trial.model.classifier)
            heads["body"] = trial.model.blocks[6][0].conv_pwl.weight.detach().clone()
        reports.append(metrics)

    reports = []
    trial.fit(report, checkpoint=False)
    last, phase = reports[-1], trial.phase
    kept = phase.kept_head
    assert kept is not trial.model.classifier and kept.out_features == 5 and trial.model.classifier.out_features == 3
    assert torch.equal(kept.weight, heads["first"].weight) and torch.equal(kept.bias, heads["first"].bias)
    assert not any(p.requires_grad for p in kept.parameters())
    assert not torch.equal(trial.model.blocks[6][0].conv_pwl.weight, heads["body"]), "the second task moved the body"
    # the measurement: today's body with the kept head, on the first task's test split
    probe = copy.deepcopy(trial.model)
    probe.classifier = heads["first"]
    assert last["task1/acc_after"] == accuracy(trial, probe, phase.test_loaders[0])
    assert last["task1/acc_before"] == reports[0]["low/test/acc"], "R[0][0] is the first task's own test accuracy"
    assert last["task2/acc"] == last["test/acc"] == last["high/test/acc"]
    assert last["forgetting/bwt"] == pytest.approx(last["task1/acc_after"] - last["task1/acc_before"])
    matrix = json.loads(last["artifact:accuracy_matrix.json"])
    assert matrix["R"][0][0] == last["task1/acc_before"] and matrix["R"][1] == [last["task1/acc_after"], last["task2/acc"]]
    assert 0 <= matrix["R"][0][1] <= 1 and matrix["bwt"] == last["forgetting/bwt"]
    assert [t["phase"] for t in matrix["tasks"]] == ["low", "high"] and matrix["tasks"][1]["classes"] == ["5", "6", "7"]


def test_a_trial_resumed_inside_its_next_task_phase_retraces_the_uninterrupted_one(tmp_path):
    spec = two_tasks({"l2sp": {"weight": 0.1}, "lwf": {"weight": 1.0}}, epochs=(1, 2))
    _, straight = run(spec)
    first = FineTuneTrial(trial_config(spec))
    seen = []

    def stop_after_two(metrics, directory):
        seen.append(metrics)
        if len(seen) == 2:
            import shutil

            shutil.copytree(directory, tmp_path / "ckpt")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(stop_after_two)
    resumed = FineTuneTrial(trial_config(spec))
    resumed.load(str(tmp_path / "ckpt"))
    assert (resumed.phase_index, resumed.phase_epoch) == (1, 1)
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    for k in ("train/loss", "train/l2sp", "train/lwf", "task1/acc_before", "task1/acc_after", "task2/acc", "forgetting/bwt"):
        assert rest[-1][k] == pytest.approx(straight[-1][k], rel=1e-5), k
    assert rest[-1]["artifact:accuracy_matrix.json"] == straight[-1]["artifact:accuracy_matrix.json"]


def test_a_next_task_phase_needs_its_own_data_and_a_task_before_it():
    spec = two_tasks()
    del spec["phases"][1]["data"]
    with pytest.raises(SpecError) as e:
        validate(spec)
    assert any("needs its own data" in p for p in e.value.problems), e.value.problems
    spec = two_tasks()
    spec["phases"] = spec["phases"][1:]
    with pytest.raises(ValueError, match="follows the phase that trains the first task"):
        FineTuneTrial(trial_config(spec))


# --------------------------------------------------------------------------- L2-SP


def test_l2sp_is_zero_at_the_anchor_and_weight_times_the_squared_distance():
    weight = 0.5
    with_l2sp = entered(two_tasks({"l2sp": {"weight": weight}}))
    plain = entered(two_tasks())
    comp = with_l2sp.components["l2sp"]
    assert comp.loss(None, None).item() == 0.0
    deltas = {"conv_stem.weight": 0.01, "blocks.6.0.conv_pwl.weight": -0.02}
    for trial in (with_l2sp, plain):
        params = dict(trial.model.named_parameters())
        with torch.no_grad():
            for name, d in deltas.items():
                params[name].add_(d)
    params = dict(with_l2sp.model.named_parameters())
    by_hand = sum(d * d * params[n].numel() for n, d in deltas.items())
    assert comp.loss(None, None).item() == pytest.approx(by_hand, rel=1e-4)
    # in the step: the supervised loss plus weight * that
    x, y = next(with_l2sp.calibration_batches(1))
    torch.manual_seed(0)
    total, _ = with_l2sp.train_step(x, y)
    torch.manual_seed(0)
    supervised, _ = plain.train_step(x, y)
    assert (total - supervised).item() == pytest.approx(weight * by_hand, rel=1e-4)
    head = set(with_l2sp.backbone.head.params)
    assert not any(n in head for n, p in with_l2sp.model.named_parameters() if any(p is q for q, _ in comp.pairs)), \
        "the new head is not held to anything"


def test_l2sp_and_lwf_outside_a_next_task_phase_are_refused():
    from trainables.losses.forgetting import L2SP, L2SPConfig

    spec = copy.deepcopy(BASE_SPEC)
    spec["losses"] = {"l2sp": {"weight": 0.1}}
    with pytest.raises(SpecError) as e:
        validate(spec)
    assert any("losses.l2sp" in p and "next_task" in p for p in e.value.problems), e.value.problems
    spec = two_tasks()
    spec["phases"][0]["losses"] = {"lwf": {}}
    with pytest.raises(SpecError) as e:
        validate(spec)
    assert any("phases.0 (low)" in p and "losses.lwf" in p for p in e.value.problems), e.value.problems
    trial = FineTuneTrial(trial_config(copy.deepcopy(BASE_SPEC)))
    with pytest.raises(ValueError, match="losses.l2sp: only in a next_task phase"):
        L2SP(L2SPConfig(), trial, 0)


# --------------------------------------------------------------------------- LwF


def test_lwf_is_the_cross_entropy_of_softened_outputs_by_hand():
    from trainables.losses.forgetting import distillation_loss

    student = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, -2.0]])
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])

    def by_hand(s, t, T):
        p = [math.exp(v / T) for v in t]
        p = [v / sum(p) for v in p]
        z = math.log(sum(math.exp(v / T) for v in s))
        return -sum(pi * (v / T - z) for pi, v in zip(p, s))

    for T in (1.0, 2.0):
        expected = (by_hand(student[0].tolist(), teacher[0].tolist(), T) + by_hand(student[1].tolist(), teacher[1].tolist(), T)) / 2
        assert distillation_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)
    same = distillation_loss(teacher, teacher, 2.0)
    entropy = -(torch.softmax(teacher / 2, 1) * torch.log_softmax(teacher / 2, 1)).sum(1).mean()
    assert same.item() == pytest.approx(entropy.item(), rel=1e-6), "at the teacher: its entropy (KL = 0)"
    assert distillation_loss(student, teacher, 2.0) > same


def test_lwf_distils_the_first_model_into_the_body_through_the_kept_head():
    from trainables.losses.forgetting import distillation_loss

    trial = entered(two_tasks({"lwf": {"weight": 1.0, "temperature": 2.0}}))
    comp, phase = trial.components["lwf"], trial.phase
    x, y = next(trial.calibration_batches(1))
    trial.model.eval()  # as the teacher: then the student, at the anchor, is the teacher
    with torch.no_grad():
        teacher = phase.previous(x)
        at_anchor = comp.loss(x, y)
    assert at_anchor.item() == pytest.approx(distillation_loss(teacher, teacher, 2.0).item(), rel=1e-5)
    trial.strategy.set_modes(trial.model)  # training: batch norm on the batch, its statistics left alone
    bn = trial.model.blocks[6][0].bn1
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    loss = comp.loss(x, y)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    loss.backward()
    assert trial.model.blocks[6][0].conv_pwl.weight.grad is not None, "the body learns from the teacher"
    assert all(p.grad is None for p in phase.kept_head.parameters()), "the kept head stays as it was"
    assert trial.model.classifier.weight.grad is None, "the new head is not in the distillation"


def test_zero_weights_train_exactly_as_plain_fine_tuning():
    plain_trial, plain = run(two_tasks())
    zero_trial, zero = run(two_tasks({"l2sp": {"weight": 0.0}, "lwf": {"weight": 0.0}}))
    held_trial, held = run(two_tasks({"l2sp": {"weight": 1.0}, "lwf": {"weight": 1.0}}))
    drop = ("images_per_s", "train/peak_mem_mb")
    assert [{k: v for k, v in m.items() if k not in drop} for m in zero] == \
        [{k: v for k, v in m.items() if k not in drop} for m in plain]
    assert all(torch.equal(a, b) for a, b in zip(zero_trial.model.state_dict().values(), plain_trial.model.state_dict().values()))
    assert held[-1]["train/loss"] != plain[-1]["train/loss"] and "train/l2sp" in held[-1] and "train/lwf" in held[-1]
    assert not all(torch.equal(a, b) for a, b in zip(held_trial.model.state_dict().values(),
                                                      plain_trial.model.state_dict().values()))


# --------------------------------------------------------------------------- phase fields in a search space


def test_a_search_over_phase_fields_reaches_the_trial_and_its_params():
    from orchestrator.fmt import short
    from orchestrator.spec import load_documents
    from orchestrator.tuning import search_algorithm
    from trainables.config import applicable

    raw = load_documents(SEARCH_SPACES / "forgetting.yaml")[0]
    spec = validate(raw)
    search = search_algorithm(spec)
    search.set_search_properties(spec.search.metric, spec.search.mode, {})
    config = search.suggest("t0")
    phases = config["phases"]
    assert isinstance(phases, list) and [p["name"] for p in phases] == ["task1", "task2"]
    assert phases[1]["data"]["name"] == "flowers102" and phases[1]["losses"]["lwf"]["temperature"] == 2
    assert 1e-5 <= phases[1]["train"]["lr"] <= 1e-2 and phases[1]["losses"]["l2sp"]["weight"] in (0, 0.001, 0.01, 0.1)
    from trainables.config import merge

    params = applicable(merge(spec.trial_config(), config), keep=list(spec.search.space))
    assert params["phases.1.train.lr"] == phases[1]["train"]["lr"] and params["phases.1.kind"] == "next_task"
    assert [short(k) for k in spec.search.space] == ["lr", "l", "l2sp", "lwf"]
    for key, problem in (("phases.1.train.lrx", "train.lrx"), ("phases.5.train.lr", "0..1"),
                         ("phases.1.losses.l2sp.weight", "greater than or equal to 0")):
        bad = copy.deepcopy(raw)
        bad["search"]["space"][key] = {"choice": [-1]}
        with pytest.raises(SpecError) as e:
            validate(bad)
        assert any(p.startswith(f"search.space.{key}:") and problem in p for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- the study, end to end


@pytest.mark.slow
def test_forgetting_study_runs_shrunk_offline(tmp_path):
    from test_e2e import mlflow_client, only_sweep, sweep_runs

    storage = tmp_path / "sweeps"
    sets = {"data": "{name: digits, image_size: 32, max_images: 80, num_workers: 0, classes: [0, 1, 2, 3, 4]}",
            "phases.1.data": "{classes: [5, 6, 7, 8, 9]}", "model.name": "timm:tf_efficientnet_lite0",
            "phases.0.epochs": "1", "phases.1.epochs": "1", "train.batch_size": "16", "search.num_samples": "2",
            "resources.cpu": "1", "resources.gpu": "0", "storage.path": str(storage)}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = run_cli(["run", str(SEARCH_SPACES / "forgetting.yaml"), *args], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = only_sweep(storage, "forgetting")
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert len({c.data.params["phases.1.train.lr"] for c in children}) == 2, "each trial its own second-task LR"
    for c in children:
        assert c.info.status == "FINISHED"
        m = c.data.metrics
        for k in ("task1/acc_before", "task1/acc_after", "task2/acc"):
            assert 0 <= m[k] <= 1, k
        assert m["forgetting/bwt"] == pytest.approx(m["task1/acc_after"] - m["task1/acc_before"])
        assert m["task1/acc_before"] == m["task1/test/acc"] and m["task2/acc"] == m["task2/test/acc"]
        assert "accuracy_matrix.json" in [a.path for a in client.list_artifacts(c.info.run_id)]
        matrix = json.loads(open(client.download_artifacts(c.info.run_id, "accuracy_matrix.json", str(tmp_path))).read())
        assert matrix["R"][1] == [pytest.approx(m["task1/acc_after"]), pytest.approx(m["task2/acc"])]
        assert matrix["tasks"][1]["classes"] == ["5", "6", "7", "8", "9"]
    # search.scope: last: the best trial is the one whose last val/acc (the second task's) is best
    last = {c.info.run_id: c.data.metrics["val/acc"] for c in children}  # a run's latest value
    assert last[parent.data.tags["tl_sweep.best_run_id"]] == max(last.values())
    assert parent.data.metrics["best/val/acc"] == max(last.values())
