"""Make the README's pictures with the tool itself: the shipped quickstart run as is and a
browser screenshot of its report, and strategy 1 shrunk to this machine (digits at 32 px,
EfficientNet-Lite0 with its ImageNet weights, 5 depths x 2 LRs, 3 epochs) with its study plot.

    python docs/make_images.py            # ~10 min on 2 cores; writes docs/img/*.png

Needs Debian's chromium (tests/install.sh installs it) and playwright (the test extra).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"


def run(args, cwd: Path) -> None:
    exe = Path(sys.executable).with_name("tl-sweep")
    r = subprocess.run([str(exe), *args], cwd=cwd, text=True, capture_output=True)
    print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr)
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)


def latest(storage: Path, name: str) -> Path:
    metas = sorted((json.loads(p.read_text()) for p in storage.glob("*/sweep.json")), key=lambda m: m["created"])
    return storage / [m for m in metas if m["name"] == name][-1]["id"]


def screenshot(page_file: Path, target: Path, height: int = 2400) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": height}, device_scale_factor=1)
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(target), full_page=False)
        browser.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tl-sweep-images-"))
    storage = work / "sweeps"

    run(["run", str(ROOT / "search_spaces" / "quickstart.yaml"), "--set", f"storage.path={storage}"], work)
    screenshot(latest(storage, "quickstart") / "report" / "report.html", OUT / "quickstart-report.png")

    spec = yaml.safe_load((ROOT / "search_spaces" / "strategy1.yaml").read_text())
    spec["data"] = {"name": "digits", "image_size": 32, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0,
                    "num_workers": 0}
    spec["model"] = {"name": "timm:tf_efficientnet_lite0", "weights": "imagenet"}
    spec["train"].update(epochs=3, batch_size=32, amp=False, channels_last=False)
    spec["search"]["space"]["strategy.unfreeze_last"] = {"grid": [1, 2, 3, 4, 5]}
    spec["search"].update(num_samples=2, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 3})
    spec["resources"] = {"cpu": 1, "gpu": 0}
    spec["storage"] = {"path": str(storage)}
    spec["description"] = "strategy 1 shrunk to a laptop: digits at 32 px, EfficientNet-Lite0"
    (work / "strategy1-small.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run(["run", str(work / "strategy1-small.yaml")], work)
    shutil.copy(latest(storage, "strategy1") / "report" / "study.png", OUT / "strategy1-study.png")
    print(f"wrote {OUT / 'quickstart-report.png'} and {OUT / 'strategy1-study.png'} (runs in {work})")


if __name__ == "__main__":
    main()
