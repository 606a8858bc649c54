"""The CUDA path: bf16 autocast, channels_last, and two trials sharing one GPU under Ray.
Skipped without a CUDA device (run them on a GPU machine: python -m pytest -m gpu)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli, trial_config
from trainables.trainable import FineTuneTrial

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def cuda_spec(base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=200, image_size=64)
    base_spec["train"].update(epochs=1, batch_size=32, device="cuda")
    return base_spec


def test_amp_runs_the_forward_in_bf16_and_the_loss_in_fp32(cuda_spec):
    trial = FineTuneTrial(trial_config(cuda_spec))
    assert trial.amp and trial.device.type == "cuda"
    seen = []
    hook = trial.model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    m = trial.train_one_epoch()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(m["train/loss"])) and m["images_per_s"] > 0
    cuda_spec["train"]["amp"] = False
    plain = FineTuneTrial(trial_config(cuda_spec))
    seen.clear()
    hook = plain.model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    plain.train_one_epoch()
    assert set(seen) == {torch.float32}


def test_channels_last_on_cuda(cuda_spec):
    trial = FineTuneTrial(trial_config(cuda_spec))
    assert trial.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(trial.loaders["train"]))
    assert trial.inputs(x).is_contiguous(memory_format=torch.channels_last)


def test_two_trials_share_one_gpu(tmp_path, cuda_spec, write_spec):
    from test_e2e import mlflow_client, only_sweep, sweep_runs

    cuda_spec["train"]["epochs"] = 2
    cuda_spec["resources"] = {"cpu": 1, "gpu": 0.5}
    cuda_spec["search"].update(algorithm="grid", space={"strategy.unfreeze_last": {"grid": [1, 2]}})
    cuda_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(cuda_spec))], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a trial needs 1 CPU, 0.5 GPU: 2 trial(s) at once" in r.stdout
    meta = only_sweep(tmp_path / "sweeps", "tiny")
    _, children = sweep_runs(mlflow_client(tmp_path / "sweeps"), meta)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert spans[1][0] < spans[0][1], "the two trials ran at the same time"


def test_a_compiled_model_trains_like_the_eager_one(cuda_spec):
    eager, compiled = [], []
    FineTuneTrial(trial_config(cuda_spec)).fit(lambda m, d: eager.append(m), checkpoint=False)
    cuda_spec["train"]["compile"] = True
    FineTuneTrial(trial_config(cuda_spec)).fit(lambda m, d: compiled.append(m), checkpoint=False)
    assert compiled[-1]["train/loss"] == pytest.approx(eager[-1]["train/loss"], rel=0.05)
