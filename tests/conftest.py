"""Shared fixtures: one shrunk base config, tiny data sets written in their real layouts,
and a helper that runs the real ``tl-sweep`` command."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The tests' decoded-image cache: a folder of this test session, not the user's ~/.cache
# (the tl-sweep commands they start inherit it).
os.environ.setdefault("TL_SWEEP_CACHE", tempfile.mkdtemp(prefix="tl-sweep-cache-"))
SEARCH_SPACES = REPO / "search_spaces"

# Tiny: 120 digits at 32 px, a pretrained EfficientNet-Lite0, 2 epochs.
BASE_SPEC: Dict = {
    "name": "tiny",
    "data": {"name": "digits", "image_size": 32, "max_images": 120, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0},
    "model": {"name": "timm:tf_efficientnet_lite0", "weights": "imagenet"},
    "strategy": {"name": "unfreeze_last", "unfreeze_last": 1, "lr_decay": 0.5},
    "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "optimizer": "adamw", "scheduler": "cosine"},
    "search": {"algorithm": "optuna", "space": {}, "num_samples": 1, "metric": "val/acc", "mode": "max",
               "scheduler": {"type": "fifo"}, "seed": 0},
    "resources": {"cpu": 1, "gpu": 0},
    "storage": {"path": "sweeps"},
}


# One shrink for every end-to-end run of a shipped spec (an overlay of --set values): tiny inputs,
# one sample per grid point, one CPU per trial, no DataLoader workers.
SHRINK: Dict[str, object] = {
    "data.image_size": 32, "data.max_images": 150, "data.num_workers": 0, "train.batch_size": 16,
    "search.num_samples": 1, "resources.cpu": 1, "resources.gpu": 0,
}


def shrunk(extra: Dict[str, object] | None = None) -> List[str]:
    """``--set`` arguments for SHRINK with ``extra`` on top (values are written as YAML)."""
    args: List[str] = []
    for key, value in {**SHRINK, **(extra or {})}.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        args += ["--set", f"{key}={text}"]
    return args


def offline_command(study: str):
    """The study's one '# Try offline:' header line, checked to be a whole `tl-sweep run
    search_spaces/<study>.yaml --set ...` command (shell words, nothing after it): the spec its
    overrides give, and the overrides."""
    import shlex

    from orchestrator.spec import load_specs

    path = SEARCH_SPACES / f"{study}.yaml"
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("# Try offline:")]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0][len("# Try offline:"):])
    assert words[:3] == ["tl-sweep", "run", f"search_spaces/{study}.yaml"]
    rest = words[3:]
    assert rest and all(w == "--set" for w in rest[0::2]) and len(rest) % 2 == 0, rest
    (spec, _, _), = load_specs(path, rest[1::2])
    return spec, rest[1::2]


@pytest.fixture
def base_spec() -> Dict:
    return copy.deepcopy(BASE_SPEC)


def trial_config(spec: Dict) -> Dict:
    """The plain dict a trial receives, from a raw spec mapping (defaults filled in)."""
    from orchestrator.spec import validate

    return validate(spec).trial_config()


@pytest.fixture
def write_spec(tmp_path):
    def write(spec: Dict, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        return p

    return write


# Credentials a test command must get from the test alone, never from the developer's shell.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")


def run_cli(args: List[str], cwd: Path, timeout: int = 600, env: Dict | None = None) -> subprocess.CompletedProcess:
    """Run the real installed ``tl-sweep`` console script (credentials only from ``env``)."""
    exe = Path(sys.executable).with_name("tl-sweep")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "orchestrator.cli"]
    full_env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    full_env.update(env or {})
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_epochs_close(got: List[tuple], want: List[tuple], rel: float, why: str = "") -> None:
    """Two runs' per-epoch rows of figures (``(train/loss, val/acc, ...)`` each) agree field by
    field within ``rel`` (pytest.approx takes no nested data); a None field must be None in both."""
    assert len(got) == len(want), f"{len(got)} epochs against {len(want)}"
    for epoch, (g, w) in enumerate(zip(got, want), start=1):
        assert len(g) == len(w), f"epoch {epoch}: {len(g)} fields against {len(w)}"
        for field, (a, b) in enumerate(zip(g, w)):
            if a is None or b is None:
                assert a is None and b is None, f"epoch {epoch}, field {field}: {a!r} against {b!r}"
            else:
                assert a == pytest.approx(b, rel=rel), f"epoch {epoch}, field {field}: {a!r} against {b!r}. {why}"


def save_jpeg(path: Path, rgb: tuple, size: int = 24, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb, dtype=np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


PET_BREEDS = [("Abyssinian", 1, 1), ("Bengal", 2, 1), ("american_bulldog", 3, 2), ("beagle", 4, 2)]


@pytest.fixture
def pets_root(tmp_path) -> Path:
    """Oxford-IIIT Pets in its real layout: 4 breeds (2 cats, 2 dogs), tiny JPEGs."""
    return make_pets(tmp_path / "pets")


def make_pets(root: Path) -> Path:
    """Oxford-IIIT Pets in its real layout under ``root``: 4 breeds (2 cats, 2 dogs), 9 trainval
    and 3 test images of each, tiny JPEGs."""
    base = root / "oxford-iiit-pet"
    lines = {"trainval": [], "test": []}
    for b, (breed, cls, species) in enumerate(PET_BREEDS):
        for i in range(1, 13):
            image_id = f"{breed}_{i}"
            save_jpeg(base / "images" / f"{image_id}.jpg", (60 * b, 200 - 40 * b, 40 + 50 * species), seed=i)
            lines["trainval" if i <= 9 else "test"].append(f"{image_id} {cls} {species} {i}")
    (base / "annotations").mkdir(parents=True)
    for split, ls in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root
