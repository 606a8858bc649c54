"""Compression (trainables/compress.py, the ``compress`` phase): pruning reaches the sparsity asked,
a structurally pruned model is smaller and runs, an int8 model is smaller and as accurate as its
float model within a stated bound, the phase logs its measurements and resumes, and the shipped
study runs shrunk end to end."""
from __future__ import annotations

import copy
import shutil

import pytest
import timm
import torch
import torchvision

from conftest import BASE_SPEC, SEARCH_SPACES, run_cli, shrunk, trial_config
from orchestrator.spec import SpecError, validate
from test_e2e import mlflow_client, only_sweep, sweep_runs
from trainables import compress as C
from trainables.data.loaders import eval_loader
from trainables.trainable import FineTuneTrial

SIDES = ("acc", "size_mb", "latency_ms_b1", "latency_ms_b32", "params", "macs")
MEASURED = {f"compress/{k}_{when}" for k in SIDES for when in ("before", "after")} | {"compress/sparsity"}


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _lite0():
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()  # random init: nothing downloads


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_unstructured_pruning_zeroes_the_exact_global_share_of_the_smallest_weights(sparsity):
    model = _resnet18()
    weights = C.prunable_weights(model, exclude=["fc"])
    assert "fc.weight" not in weights and "conv1.weight" in weights and "layer4.1.conv2.weight" in weights
    before = {n: w.detach().clone() for n, w in weights.items()}
    head = model.fc.weight.detach().clone()
    total = sum(w.numel() for w in before.values())
    assert all(int((w == 0).sum()) == 0 for w in before.values())  # so every zero after is a pruned weight

    masks = C.prune_unstructured(model, sparsity, exclude=["fc"])
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in before)
    assert zeros == round(sparsity * total)  # exact, over all the pruned layers together
    assert C.zero_share(model, exclude=["fc"]) == pytest.approx(zeros / total)
    assert sum(int((~m).sum()) for m in masks.values()) == zeros
    assert torch.equal(model.fc.weight, head)  # the head is left whole
    assert [n for n, _ in model.named_parameters()] == list(params)  # names kept: no weight_orig
    # global: the largest pruned magnitude is below the smallest kept one, whichever layer
    pruned = torch.cat([before[n][~masks[n]].abs() for n in before])
    kept = torch.cat([before[n][masks[n]].abs() for n in before])
    assert pruned.max() <= kept.min()
    shares = [float((~m).float().mean()) for m in masks.values()]
    assert max(shares) - min(shares) > 0.2  # layers differ: one ranking, not a share per layer


def test_masks_keep_pruned_weights_at_zero_through_optimizer_steps():
    model = _resnet18().train()
    masks = C.prune_unstructured(model, 0.5, exclude=["fc"])
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def steps():
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
            opt.step()

    steps()
    assert C.zero_share(model, exclude=["fc"]) < 0.45  # without the masks the zeros move
    C.apply_masks(params, masks)
    opt.register_step_post_hook(lambda *_: C.apply_masks(params, masks))
    steps()
    assert C.zero_share(model, exclude=["fc"]) == pytest.approx(0.5, abs=1e-6)
    assert all(not params[n][~m].any() for n, m in masks.items())


@pytest.mark.parametrize("build, head", [(_resnet18, "fc"), (_lite0, "classifier")], ids=["resnet18", "lite0"])
def test_a_structurally_pruned_model_has_fewer_parameters_and_still_runs(build, head):
    model = build()
    for n, p in model.named_parameters():  # a trial's frozen layers: the dependency graph must still see them
        p.requires_grad_(n.startswith(head))
    n_before = sum(p.numel() for p in model.parameters())
    macs_before, _ = C.macs_and_params(model, torch.randn(1, 3, 32, 32))
    C.prune_structured(model, 0.5, torch.randn(1, 3, 32, 32), ignored=[head])
    n_after = sum(p.numel() for p in model.parameters())
    macs_after, params = C.macs_and_params(model, torch.randn(1, 3, 32, 32))
    assert n_after < 0.4 * n_before and params == n_after  # about (1 - 0.5)^2 of the convolutions
    assert macs_after < 0.4 * macs_before
    assert model.get_submodule(head).out_features == 10  # the classes stay
    with torch.no_grad():
        assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{head}.weight", f"{head}.bias"}
    # the shapes depend on the ratio alone: other weights prune to the same structure (a resumed trial)
    other = build()
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.rand_like(p))
    C.prune_structured(other, 0.5, torch.randn(1, 3, 32, 32), ignored=[head])
    assert C.shapes(other) == C.shapes(model)


# --------------------------------------------------------------------------- quantization

# Bound: on these 100 test digits an int8 model's top-1 is within 0.05 (5 images) of its float
# model's. The float model reaches about 0.77, far above chance (0.1): a broken quantization fails.
ACC_BOUND = 0.05


@pytest.fixture(scope="module")
def trained():
    """EfficientNet-Lite0 (ImageNet weights) fine-tuned on 400 digits at 32 px, 4 epochs."""
    spec = copy.deepcopy(BASE_SPEC)
    spec["data"].update(max_images=400)
    spec["strategy"]["unfreeze_last"] = 4
    spec["train"].update(epochs=4, lr=5e-3)
    trial = FineTuneTrial(trial_config(spec))
    trial.fit(lambda m, d: None, checkpoint=False)
    test = [(trial.inputs(x), y) for x, y in eval_loader(trial.data.test, 64, 0, False)]
    return trial, test


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_quantized_model_runs_is_smaller_and_keeps_its_accuracy(trained, mode):
    trial, test = trained
    model = copy.deepcopy(trial.model).eval()
    float_acc = C.accuracy(model, test)
    assert float_acc > 0.5 and len(test[0][1]) + sum(len(y) for _, y in test[1:]) == 100
    quantized, stored = C.quantize(model, mode, lambda: (x for x, _ in trial.calibration_batches(4)),
                                   torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        assert quantized(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # any batch size
    assert abs(C.accuracy(quantized, test) - float_acc) <= ACC_BOUND + 1e-9  # 5 images; the accuracies are float ratios
    int8 = [k for k, v in stored.items() if getattr(v, "dtype", None) == torch.int8 or "Int8" in type(v).__name__]
    if mode == "dynamic":  # the classifier only: a CNN keeps its convolutions in float
        assert int8 == ["classifier.weight"]
        assert C.size_mb(stored) < C.size_mb(model.state_dict()) - 0.03
    else:  # the conv and linear weights (timm's stride-2 'same' convs, padded first, stay float): about a quarter
        assert len(int8) >= 0.85 * len(C.prunable_weights(model))
        assert C.size_mb(stored) < 0.35 * C.size_mb(model.state_dict())
    assert C.latency_ms(quantized, 32, 1, repeats=2) > 0


# --------------------------------------------------------------------------- the phase


def _compress_spec(**phase):
    spec = copy.deepcopy(BASE_SPEC)
    spec["phases"] = [{"name": "finetune", "epochs": 1},
                      {"name": "compress", "kind": "compress", "epochs": 1, "latency_repeats": 2,
                       "calibration_batches": 2, **phase}]
    return spec


def test_the_compress_phase_logs_before_and_after_without_the_feature_cache():
    trial = FineTuneTrial(trial_config(_compress_spec(prune="structured", sparsity=0.5, quantize="static")))
    reports, cached = [], []

    def report(metrics, directory):
        reports.append(metrics)
        cached.append(trial.feature_sets is not None)

    trial.fit(report)
    assert [m["epoch"] for m in reports] == [1, 2]
    assert cached == [True, False]  # the fine-tune trained on cached prefix outputs, the pruned model never
    first, last = reports
    assert not any(k.startswith("compress/") for k in first)
    assert MEASURED <= set(last)
    assert last["compress/params_after"] < 0.4 * last["compress/params_before"]
    assert last["compress/macs_after"] < 0.4 * last["compress/macs_before"]
    assert last["compress/size_mb_after"] < 0.15 * last["compress/size_mb_before"]  # pruned and int8
    assert last["compress/params_after"] == last["model/params_total"]
    assert last["compress/acc_before"] == first["finetune/test/acc"]  # the model the phase found
    assert 0 <= last["compress/acc_after"] <= 1 and last["compress/test/acc"] == last["test/acc"]


@pytest.mark.parametrize("prune", ["unstructured", "structured"])
def test_a_trial_resumed_inside_the_compress_phase_retraces_the_uninterrupted_one(prune, tmp_path):
    spec = _compress_spec(prune=prune, sparsity=0.5, quantize="none")
    spec["phases"][1]["epochs"] = 2
    config = trial_config(spec)
    straight = []
    FineTuneTrial(config).fit(lambda m, d: straight.append(m), checkpoint=False)
    saved = []

    def stop_after_two(metrics, directory):
        saved.append(metrics)
        if len(saved) == 2:  # the first recovery epoch
            shutil.copytree(directory, tmp_path / "ckpt")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FineTuneTrial(config).fit(stop_after_two)
    resumed = FineTuneTrial(config)
    resumed.load(str(tmp_path / "ckpt"))
    assert (resumed.phase_index, resumed.phase_epoch) == (1, 1)
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    a, b = straight[-1], rest[-1]
    assert b["epoch"] == 3 and b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    assert b["val/acc"] == a["val/acc"] and b["test/acc"] == a["test/acc"]
    for k in ("compress/acc_before", "compress/params_before", "compress/size_mb_before", "compress/params_after",
              "compress/sparsity"):
        assert b[k] == pytest.approx(a[k]), k
    if prune == "unstructured":
        assert b["compress/sparsity"] == pytest.approx(0.5, abs=1e-6)  # the checkpoint's masks, not new ones
    else:
        assert b["compress/params_after"] < 0.4 * b["compress/params_before"]


@pytest.mark.parametrize("change, needle", [
    ({"epochs": 0}, "phases.1.epochs: a compress phase needs 1 or more epochs"),
    ({"sparsity": 1.0}, "phases.1.sparsity: Input should be less than 1"),
    ({"prune": "channels"}, "phases.1.prune: Input should be 'none', 'unstructured' or 'structured'"),
    ({"quantize": "int4"}, "phases.1.quantize: Input should be 'none', 'dynamic' or 'static'"),
    ({"ratio": 0.5}, "phases.1.ratio: unknown key"),
])
def test_a_bad_compress_phase_is_refused_with_its_key(change, needle):
    with pytest.raises(SpecError) as e:
        validate(_compress_spec(**change))
    assert any(p.startswith(needle) for p in e.value.problems), e.value.problems


def test_a_compress_phase_must_be_the_last():
    spec = _compress_spec()
    spec["phases"].append({"name": "after", "epochs": 1})
    with pytest.raises(SpecError) as e:
        validate(spec)
    assert any("a compress phase must be the last one" in p and "move it after 'after'" in p
               for p in e.value.problems), e.value.problems
    validate(_compress_spec())  # last: fine


# --------------------------------------------------------------------------- the study, shrunk


@pytest.mark.slow
def test_the_compress_study_runs_shrunk_and_logs_before_and_after(tmp_path):
    storage = tmp_path / "sweeps"
    extra = {"data": {"name": "digits", "image_size": 32, "max_images": 150},
             "model.name": "timm:tf_efficientnet_lite0",
             "phases.0.epochs": 1, "phases.1.epochs": 1, "phases.1.latency_repeats": 2,
             "phases.1.calibration_batches": 2, "search.space.phases.1.sparsity": {"grid": [0.5]}}
    r = run_cli(["run", str(SEARCH_SPACES / "compress.yaml"), *shrunk(extra), "--set", f"storage.path={storage}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, only_sweep(storage, "compress"))
    assert parent.info.status == "FINISHED" and len(children) == 4
    kinds = set()
    for c in children:
        m, p = c.data.metrics, c.data.params
        kinds.add((p["phases.1.prune"], p["phases.1.quantize"]))
        assert MEASURED <= set(m), sorted(set(MEASURED) - set(m))
        assert m["compress/size_mb_after"] < m["compress/size_mb_before"]
        if p["phases.1.prune"] == "structured":
            assert m["compress/params_after"] < m["compress/params_before"]
        else:
            assert m["compress/sparsity"] == pytest.approx(0.5, abs=1e-6)
        if p["phases.1.quantize"] == "static":
            assert m["compress/size_mb_after"] < 0.35 * m["compress/size_mb_before"]
    assert kinds == {("unstructured", "dynamic"), ("unstructured", "static"), ("structured", "dynamic"),
                     ("structured", "static")}
    # the best trial's model is rebuilt from its checkpoint (a pruned one with its shapes) and logged
    best = client.get_run(parent.data.tags["tl_sweep.best_run_id"])
    assert best.data.tags.get("tl_sweep.model_id"), (best.data.params["phases.1.prune"], r.stdout[-3000:])
