"""Credentials a trial needs (object-store keys for its checkpoints), handed to it in memory.

The driver puts the credentials it was given into a ``SecretBroker`` actor of the sweep. The
object store Tune writes checkpoints to is a ``BrokeredS3`` filesystem: Tune pickles it into its
experiment state and sends it to every trial, and it pickles to its endpoint options and the
broker's name alone; wherever it is unpickled it asks the broker for the keys (or, without one,
uses the node's own: the environment, a shared credentials file). Credentials never go through
a file, a log, Ray's runtime environment (whose agent logs it) or a trial's config.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import pyarrow.fs as pafs

KEYS = {"AWS_ACCESS_KEY_ID": "access_key", "AWS_SECRET_ACCESS_KEY": "secret_key", "AWS_SESSION_TOKEN": "session_token"}


class SecretBroker:
    """A Ray actor (made with ``ray.remote``) that holds environment values in memory."""

    def __init__(self) -> None:
        self._values: Dict[str, str] = {}

    def put(self, values: Dict[str, str]) -> None:
        self._values = dict(values)

    def get(self) -> Dict[str, str]:
        return dict(self._values)


def from_broker(broker: Optional[str]) -> Dict[str, str]:
    """The values the sweep's broker (named ``broker``) holds; {} without one."""
    if not broker:
        return {}
    import ray

    if not ray.is_initialized():
        return {}
    try:
        actor = ray.get_actor(broker)
    except ValueError:  # no such actor: the driver had nothing to hand over
        return {}
    return ray.get(actor.get.remote())


def apply(broker: Optional[str]) -> None:
    """Set this process's environment from the sweep's broker, if any."""
    os.environ.update(from_broker(broker))


class BrokeredS3(pafs.FileSystemHandler):
    """An S3 filesystem whose keys come from the sweep's broker when it is used, not from what
    was pickled (``pyarrow.fs.PyFileSystem(BrokeredS3(options, broker))``)."""

    def __init__(self, options: Dict[str, Any], broker: Optional[str]):
        self.options, self.broker = dict(options), broker
        self._fs: Optional[pafs.S3FileSystem] = None

    def __reduce__(self):
        return BrokeredS3, (self.options, self.broker)

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            values = from_broker(self.broker)
            keys = {arg: values[name] for name, arg in KEYS.items() if values.get(name)}
            self._fs = pafs.S3FileSystem(**self.options, **keys)
        return self._fs

    def get_type_name(self):
        return "brokered-s3"

    def equals(self, other):
        return isinstance(other, BrokeredS3) and (other.options, other.broker) == (self.options, self.broker)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def brokered(fs: Any, broker: Optional[str]) -> Any:
    """``fs`` for Tune: an S3 filesystem becomes a brokered one; any other is returned as is."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    options = _s3_options(fs)
    return pafs.PyFileSystem(BrokeredS3(options, broker))


def _s3_options(fs: pafs.S3FileSystem) -> Dict[str, Any]:
    """The constructor options of an S3FileSystem made without keys (what it pickles)."""
    _, args = fs.__reduce__()
    kwargs = dict(args[0]) if args and isinstance(args[0], dict) else {}
    for name in ("access_key", "secret_key", "session_token"):
        kwargs.pop(name, None)
    if not any((kwargs.get("proxy_options") or {}).values()) or kwargs.get("proxy_options", {}).get("port") == -1:
        kwargs.pop("proxy_options", None)
    return {k: v for k, v in kwargs.items() if v is not None and v != ""}
