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


def test_batched_augmentation_on_the_gpu_makes_the_cpus_images():
    from trainables.config import AugmentConfig
    from trainables.data.loaders import on_device
    from trainables.data.transforms import BatchAugment, train_transform

    augment = BatchAugment.of(train_transform(AugmentConfig(hflip=True, rotation=10, crop_scale_min=0.4,
                                                            random_erasing=0.5), 64))
    x = torch.randint(0, 255, (16, 3, 64, 64), dtype=torch.uint8)
    seeds = list(range(16))
    cpu = augment(x, seeds).float()
    gpu = on_device(augment, x, seeds, torch.device("cuda"))
    assert gpu.is_cuda and gpu.dtype == torch.float32
    assert (gpu.cpu() - cpu).abs().mean() < 1.0, "the same crops, flips, rotations and erasing; float rounding"


def test_jpegs_are_decoded_on_the_gpu_without_the_cache(tmp_path, monkeypatch, cuda_spec):
    from test_speed import _folder, folder_cfg
    from trainables.data.decode import DeviceDecoded

    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    cuda_spec["data"] = folder_cfg(_folder(tmp_path / "imgs", n=12), cache="off")
    cuda_spec["augment"] = {"hflip": True, "crop_scale_min": 0.6}
    trial = FineTuneTrial(trial_config(cuda_spec))
    assert all(isinstance(trial.loaders[s], DeviceDecoded) for s in ("train", "val", "test")), "auto: nvJPEG on CUDA"
    x, _ = next(iter(trial.loaders["val"]))
    assert x.is_cuda and x.shape[1:] == (3, 24, 24)
    pil = torch.stack([trial.data.val[i][0] for i in range(len(x))]).float()
    assert (x.cpu().float() - pil).abs().mean() < 2.0, "nvJPEG and libjpeg-turbo agree to a level or two"
    m = trial.train_one_epoch()
    assert torch.isfinite(torch.tensor(m["train/loss"]))
