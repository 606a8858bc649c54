"""Where a sweep lives, and its layout.

A sweep's state lives in its *store*: ``<storage.uri>/<sweep id>/`` when ``storage.uri`` is set
(a folder every node sees, or ``s3://bucket/prefix``), else ``<storage.path>/<sweep id>/``:

    sweep.json       what the sweep is: name, status, MLflow run ids, metric, where Tune's state is
    spec.yaml        the validated spec it runs (no credentials)
    scheduler.pkl    ASHA's rungs (orchestrator/space.py)
    tune/            Ray Tune's experiment state, searcher state and checkpoints

On the machine that runs the driver, ``<storage.path>/<sweep id>/`` always holds ``ray.log``; when
the store is elsewhere it also holds ``store.json``, which says where. ``resume``, ``show`` and
``export`` work from any machine that can read the store (``--storage s3://...``).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from orchestrator.secrets import redact, split_storage_credentials

SWEEP_FILE = "sweep.json"
SPEC_FILE = "spec.yaml"
POINTER_FILE = "store.json"
LOG_FILE = "ray.log"
TUNE_DIR = "tune"


class InputError(RuntimeError):
    """A problem with the user's input found before anything started (exit code 2)."""


def new_sweep_id(name: str) -> str:
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


@dataclass
class Store:
    """A folder on this machine or in an object store (a pyarrow filesystem and a path in it)."""

    fs: Any
    path: str
    display: str  # the location as shown: no credentials

    @classmethod
    def at(cls, location: str) -> "Store":
        """A local path, ``file://...``, or a URI pyarrow reads (``s3://bucket/prefix?...``).
        Credentials inside the URI move to this process's AWS_* variables; the store keeps none."""
        import pyarrow.fs as pafs

        if not is_uri(location):
            path = Path(location.removeprefix("file://")).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), str(path), str(path))
        clean, _ = split_storage_credentials(location)
        opened = clean
        if clean.startswith("s3://") and "allow_delayed_open" not in clean:
            # single-request writes for files smaller than a part: fewer round trips, and what
            # S3-compatible servers handle most alike
            opened += ("&" if "?" in clean else "?") + "allow_delayed_open=true"
        try:
            fs, path = pafs.FileSystem.from_uri(opened)
        except Exception as e:
            raise InputError(f"storage.uri {redact(location)} is not a location pyarrow can open: {redact(str(e))}") from None
        return cls(fs, path.rstrip("/"), redact(clean))

    def child(self, name: str) -> "Store":
        return Store(self.fs, f"{self.path}/{name}", f"{self.display.split('?')[0].rstrip('/')}/{name}"
                     + (f"?{self.display.split('?', 1)[1]}" if "?" in self.display else ""))

    @property
    def local(self) -> bool:
        return type(self.fs).__name__ == "LocalFileSystem"

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write whole: a local file through a temporary name and a rename, an object in one put."""
        target = self._p(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.local:
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def read_json(self, rel: str) -> Dict[str, Any]:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, data: Dict[str, Any]) -> None:
        self.write_bytes(rel, json.dumps(data, indent=2, sort_keys=True).encode())

    def subdirs(self) -> List[str]:
        import pyarrow.fs as pafs

        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def remove(self) -> None:
        """Delete this folder and everything in it."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def probe(self) -> None:
        """Write, read back and delete a small file: the store is reachable and writable."""
        name = f".tl-sweep-probe-{secrets.token_hex(4)}"
        try:
            self.write_bytes(name, b"ok")
            ok = self.read_bytes(name) == b"ok"
            self.fs.delete_file(self._p(name))
        except Exception as e:
            raise InputError(
                f"storage: cannot write to {self.display}: {redact(str(e)).strip().splitlines()[0]}. Check that it "
                "exists and that this machine's credentials may write there (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, or key:secret@ in the URI)."
            ) from None
        if not ok:
            raise InputError(f"storage: {self.display} did not give back what was written to it")

    def tune_location(self) -> tuple:
        """(storage_path, storage_filesystem) for Ray Tune: its experiment goes in ``tune/``."""
        return self.path, self.fs


# --------------------------------------------------------------------------- sweeps


@dataclass
class Sweep:
    """One sweep: its store, its metadata (sweep.json), and its local folder."""

    store: Store
    meta: Dict[str, Any]
    local: Optional[Path] = None  # the folder with ray.log on the machine that ran the driver

    @property
    def id(self) -> str:
        return self.meta["id"]

    def save(self) -> None:
        self.store.write_json(SWEEP_FILE, self.meta)


def open_store(storage: str) -> Store:
    return Store.at(storage)


def list_sweeps(storage: str) -> List[Sweep]:
    """Every sweep under ``storage`` (a storage.path on this machine, or a storage.uri),
    oldest first; on this machine, sweeps whose store is elsewhere are found by their pointer."""
    root = open_store(storage)
    out: List[Sweep] = []
    for name in root.subdirs():
        folder = root.child(name)
        try:
            if folder.exists(SWEEP_FILE):
                out.append(Sweep(folder, folder.read_json(SWEEP_FILE),
                                 Path(folder.path) if root.local else None))
            elif folder.exists(POINTER_FILE):
                where = folder.read_json(POINTER_FILE)["store"]
                store = Store.at(where)
                out.append(Sweep(store, store.read_json(SWEEP_FILE), Path(folder.path)))
        except (OSError, ValueError, KeyError, InputError):
            continue  # an unreadable folder, or a store that is gone: not a sweep to list
    return sorted(out, key=lambda s: s.meta.get("created", ""))


def find_sweep(ref: str, storage: str) -> Sweep:
    """A sweep by folder path, id, or name (its latest sweep)."""
    p = Path(ref).expanduser()
    if not is_uri(ref) and ((p / SWEEP_FILE).is_file() or (p / POINTER_FILE).is_file()):
        found = [s for s in list_sweeps(str(p.parent)) if s.local and s.local.resolve() == p.resolve()]
        if found:
            return found[0]
    sweeps = list_sweeps(storage)
    exact = [s for s in sweeps if s.id == ref]
    named = [s for s in sweeps if s.meta.get("name") == ref or s.id.startswith(ref)]
    hit = exact or named
    if not hit:
        known = ", ".join(s.id for s in sweeps[-5:]) or "none"
        where = open_store(storage).display
        raise InputError(f"no sweep {ref!r} under {where} (latest: {known}); see tl-sweep ls --storage {where}")
    return hit[-1]
