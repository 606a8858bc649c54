"""The spec: distributions, shipped YAMLs, and bad input -> exit 2 with the key path."""
from __future__ import annotations


import pytest
from click.testing import CliRunner

from conftest import SEARCH_SPACES, run_cli
from orchestrator.cli import cli
from orchestrator.spec import SpecError, apply_overrides, load_specs, validate


def problems(raw) -> list[str]:
    with pytest.raises(SpecError) as e:
        validate(raw)
    return e.value.problems


@pytest.mark.parametrize("dist", [
    {"choice": [16, 32]}, {"grid": [0, 1, 2]}, {"uniform": [0.3, 1.0]},
    {"loguniform": [1e-5, 1e-2]}, {"randint": [1, 4]}, {"quniform": [0.1, 0.9, 0.1]},
])
def test_each_distribution_validates(base_spec, dist):
    field = {"choice": "train.batch_size", "grid": "strategy.unfreeze_last", "uniform": "strategy.lr_decay",
             "loguniform": "train.lr", "randint": "strategy.unfreeze_last", "quniform": "strategy.lr_decay"}[next(iter(dist))]
    base_spec["search"]["space"] = {field: dist}
    spec = validate(base_spec)
    assert spec.search.space[field].kind == next(iter(dist))
    assert spec.search.space[field].to_yaml() == {k: list(v) for k, v in dist.items()}


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    [(spec, _, _)] = load_specs(path)
    assert spec.name == path.stem
    text = path.read_text()
    assert text.startswith("#") and "tl-sweep run" in text, "a shipped spec documents itself in a header"


@pytest.mark.parametrize("dist, needle", [
    ({"loguniform": [0.1, 0.01]}, "loguniform needs low < high, got low=0.1 high=0.01"),
    ({"uniform": [1.0, 1.0]}, "uniform needs low < high"),
    ({"loguniform": [0.0, 0.1]}, "loguniform needs low > 0"),
    ({"quniform": [0.1, 0.9, 0]}, "quniform needs q > 0"),
    ({"grid": []}, "grid needs a non-empty list"),
    ({"uniform": [0.1, 0.2], "grid": [1]}, "give exactly one of"),
    ({"normal": [0, 1]}, "unknown key"),
])
def test_bad_distribution_names_its_key(base_spec, dist, needle):
    base_spec["search"]["space"] = {"train.lr": dist}
    found = problems(base_spec)
    assert any(p.startswith("search.space.train.lr") and needle in p for p in found), found


def test_searched_values_are_type_checked_against_the_field(base_spec):
    base_spec["search"]["space"] = {"data.label_fraction": {"grid": [1.0, 0.5, 1.5]},
                                    "train.optimizer": {"choice": ["adamw", "lion"]},
                                    "train.nosuch": {"grid": [1]}, "search.seed": {"grid": [1]}}
    found = problems(base_spec)
    assert any(p.startswith("search.space.data.label_fraction: value 1.5") for p in found), found
    assert any(p.startswith("search.space.train.optimizer: value 'lion'") for p in found), found
    assert any(p.startswith("search.space.train.nosuch: train has no field 'nosuch'") for p in found), found
    assert any(p.startswith("search.space.search.seed: not a searchable field") for p in found), found


def test_every_problem_is_reported_at_once(base_spec):
    base_spec["train"]["lr"] = "fast"
    base_spec["train"]["colour"] = "blue"
    base_spec["data"]["label_fraction"] = 0
    base_spec["model"]["name"] = "resnet 9000"
    base_spec["search"]["space"] = {"train.lr": {"loguniform": [0.1, 0.01]}}
    found = problems(base_spec)
    for key in ("train.lr: Input should be a valid number", "train.colour: unknown key",
                "data.label_fraction: Input should be greater than 0", "model.name:", "search.space.train.lr"):
        assert any(p.startswith(key) for p in found), (key, found)


def test_a_model_torchvision_and_timm_lack_is_found_by_the_worker_side_check(base_spec):
    # whether a backbone exists needs torchvision / timm: trainables.check, where trials run
    from trainables.check import CheckError, check

    base_spec["model"]["name"] = "resnet9000"
    config = validate(base_spec).trial_config()
    with pytest.raises(CheckError) as e:
        check([config])
    assert e.value.key == "model" and "not a torchvision classification model" in e.value.message


def test_label_fraction_bounds(base_spec):
    for bad in (0, 1.5, -0.1):
        base_spec["data"]["label_fraction"] = bad
        assert any(p.startswith("data.label_fraction") for p in problems(base_spec))
    for good in (1.0, 0.5, 0.1, 0.01):
        base_spec["data"]["label_fraction"] = good
        assert validate(base_spec).data.label_fraction == good


def test_unknown_registry_names_list_the_choices(base_spec):
    base_spec["data"]["name"] = "imagenet21k"
    base_spec["strategy"]["name"] = "unfreeze_sometimes"
    found = problems(base_spec)
    assert any(p.startswith("data.name") and "digits" in p and "pets" in p for p in found), found
    assert any(p.startswith("strategy.name") and "unfreeze_last" in p for p in found), found


def test_set_override_and_fixing_a_searched_field(base_spec):
    base_spec["search"]["space"] = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "strategy.unfreeze_last": {"grid": [0, 1]}}
    raw, notes = apply_overrides(base_spec, ["train.epochs=5", "train.lr=0.01", "search.space.train.batch_size={choice: [8, 16]}"])
    spec = validate(raw)
    assert spec.train.epochs == 5 and spec.train.lr == 0.01
    assert "train.lr" not in spec.search.space and spec.search.space["train.batch_size"].choice == [8, 16]
    assert notes == ["train.lr fixed to 0.01 by --set (no longer searched)"]
    assert base_spec["train"]["epochs"] == 2, "overrides do not change the caller's mapping"


def test_list_valued_choices_work_with_every_algorithm(base_spec):
    # Optuna's categoricals take scalars only: tl-sweep hands it the index of each list instead
    from orchestrator import space as sp
    from orchestrator import tuning

    lists = [[1e-3, 1e-4], [1e-3, 1e-5]]
    base_spec["search"]["space"] = {"strategy.group_lrs": {"choice": lists}}
    for algorithm in ("optuna", "random", "grid"):
        base_spec["search"].update(algorithm=algorithm, num_samples=2)
        spec = validate(base_spec)
        searcher = tuning.search_algorithm(spec)
        proposals = [searcher.suggest(f"t{i}")["strategy"]["group_lrs"] for i in range(sp.num_trials(spec))]
        assert all(p in lists for p in proposals), (algorithm, proposals)
        if algorithm == "grid":
            assert sorted(map(tuple, proposals)) == sorted(map(tuple, lists * 2))


# --------------------------------------------------------------------------- CLI exit codes


def _cli(args):
    return CliRunner().invoke(cli, args)


def test_cli_malformed_yaml_exits_2_with_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain: {epochs: 2\n  lr: [\n")
    r = _cli(["validate", str(p)])
    assert r.exit_code == 2
    assert "malformed YAML at line" in r.output and str(p) in r.output


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["train"].update(epochz=3), "train.epochz: unknown key"),
    (lambda s: s["train"].update(epochs="three"), "train.epochs: Input should be a valid integer"),
    (lambda s: s["search"]["space"].update({"train.lr": {"loguniform": [0.1, 0.01]}}), "search.space.train.lr: loguniform needs low < high"),
    (lambda s: s["data"].update(label_fraction=2), "data.label_fraction: Input should be less than or equal to 1"),
])
def test_cli_bad_spec_exits_2_with_key_path(base_spec, write_spec, mutate, needle):
    mutate(base_spec)
    r = _cli(["validate", str(write_spec(base_spec))])
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_cli_bad_set_value_exits_2(base_spec, write_spec):
    r = _cli(["validate", str(write_spec(base_spec)), "--set", "train.epochs=-1"])
    assert r.exit_code == 2 and "train.epochs" in r.output
    r = _cli(["validate", str(write_spec(base_spec)), "--set", "train.epochs"])
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.output


def test_missing_spec_file_exits_2(tmp_path):
    r = _cli(["run", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_installed_command_exits_2_and_starts_nothing(tmp_path, base_spec, write_spec):
    base_spec["train"]["optimiser"] = "adam"
    r = run_cli(["run", str(write_spec(base_spec))], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "train.optimiser: unknown key" in r.stderr
    assert not (tmp_path / "sweeps").exists(), "no sweep folder, no MLflow store on a spec error"


def test_readme_spec_reference_names_every_field():
    from orchestrator.spec import SchedulerSpec, Spec
    from trainables.config import registry

    readme = (SEARCH_SPACES.parent / "README.md").read_text()
    keyed = {"data": "dataset", "strategy": "strategy", "losses": "loss", "phases": "phase"}
    for section, model in Spec.model_fields.items():
        if section in keyed:
            reg = registry(keyed[section])
            for name in reg.names():  # every component's own fields
                for field in reg.config(name).model_fields:
                    where = f"losses.{name}.{field}" if section == "losses" else f"{section}.{field}"
                    assert where in readme, f"{where} ({name}) is missing from README's spec reference"
            continue
        sub = getattr(model.annotation, "model_fields", None)
        if sub is None:
            assert f"`{section}`" in readme, section
            continue
        for field in sub:
            if section == "search" and field == "scheduler":
                for f in SchedulerSpec.model_fields:
                    assert f"search.scheduler.{f}" in readme, f
            else:
                assert f"{section}.{field}" in readme, f"{section}.{field} is missing from README's spec reference"
    assert readme.startswith("# tl-sweep\n\n```bash\npip install -e . && tl-sweep run search_spaces/quickstart.yaml")


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["search"].update(metric="val/loss", mode="max"), "search.mode: val/loss is better when lower: use mode min"),
    (lambda s: s["search"].update(metric="val/acc", mode="min"), "search.mode: val/acc is better when higher: use mode max"),
    (lambda s: s["search"].update(space={"train.epochs": {"randint": [2, 8]}},
                                  scheduler={"type": "asha", "max_t": 5}), "search.space.train.epochs: up to 8 epochs"),
    (lambda s: s["search"].update(scheduler={"type": "asha", "max_t": 9}), "search.scheduler.max_t: 9 is more than"),
    (lambda s: s["search"].update(scheduler={"type": "asha", "grace_period": 3}), "search.scheduler.grace_period: 3 is more than"),
    (lambda s: s["train"].update(scheduler="warmup"), "train.scheduler 'warmup' needs train.warmup_epochs > 0"),
    (lambda s: s.update(failure={"max_retries": -1}), "failure.max_retries: Input should be greater than or equal to 0"),
    (lambda s: s["data"].update(val_fraction=0.6, test_fraction=0.5), "must leave images to train on"),
    (lambda s: s["search"].update(metric="test/acc"), "search.metric: 'test/acc' is not reported every epoch"),
])
def test_specs_that_cannot_work_are_refused(base_spec, mutate, needle):
    mutate(base_spec)
    found = problems(base_spec)
    assert any(needle in p for p in found), found


def test_a_loss_metric_defaults_to_mode_min(base_spec):
    base_spec["search"].pop("mode")
    base_spec["search"]["metric"] = "val/loss"
    assert validate(base_spec).search.mode == "min"


@pytest.mark.parametrize("study", ["lora", "masked", "compress", "forgetting", "multitask", "keypoints"])
def test_each_study_header_gives_a_complete_offline_command(study):
    """One '# Try offline:' line: a whole `tl-sweep run search_spaces/<file>.yaml --set ...`
    command (shell words, nothing after it) whose overrides validate, on offline data only."""
    from conftest import offline_command

    spec, _ = offline_command(study)
    offline = {"digits", "mnist5k", "synthetic_faces"}
    assert spec.data.name in offline
    for i, _ in enumerate(spec.phases):
        assert spec.phase_sections(i).data.name in offline
    assert spec.model.weights == "none" or spec.model.name == "timm:tf_efficientnet_lite0"
    assert "model.name" not in spec.search.space, "the offline model is fixed, not searched"
