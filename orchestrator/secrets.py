"""Secrets (passwords, keys, tokens) stay out of every file, log, MLflow record and terminal line.

- URIs are shown and stored without credentials (``redact``); credentials given inside a URI
  move into the variables their client reads (MLFLOW_TRACKING_USERNAME / _PASSWORD for MLflow,
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for an object store) for this process only.
- The variables that hold secrets (``SECRET_ENV``) are forwarded to the cluster in memory: to a
  submitted job through Ray's key-value store (read and deleted as the job starts), to trials
  through a broker actor (trainables/secrets.py).
"""
from __future__ import annotations

import json
import os
import re
import secrets as _secrets
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Values under these names are never shown (the user name is not secret, but travels with them).
SECRET_WORDS = ("token", "password", "secret", "access_key", "api_key")
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact(text: str) -> str:
    """Drop credentials from URIs (``user:***@host``), secret-looking query values, and any
    value of a secret variable of this process's environment."""

    def one(m: "re.Match[str]") -> str:
        parts = urlsplit(m.group(0))
        if parts.password is None and not parts.username:
            return m.group(0)  # nothing to hide; urlunsplit would also fold sqlite://// to sqlite://
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = (f"{user}:***@" if parts.password is not None else "***@") + host
        netloc += f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=netloc))

    text = _URI.sub(one, text)
    text = re.sub(r"(?i)((?:token|password|secret|access_key|api_key)[^=&\s]*=)[^&\s'\"]+", r"\1***", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4 and "USERNAME" not in name and "ACCESS_KEY_ID" not in name:
            text = text.replace(value, "***")
    return text


def without_credentials(text: str) -> str:
    """``text`` with every URI's ``user:password@`` removed (not masked: a spec stored or sent
    this way re-runs with the credentials of the environment it runs in) and any value of a
    secret variable of this environment masked."""

    def one(m: "re.Match[str]") -> str:
        parts = urlsplit(m.group(0))
        if parts.password is not None or parts.username:
            parts = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
        return urlunsplit(parts)

    return redact(_URI.sub(one, text))


def is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in SECRET_WORDS)


def strip_credentials(uri: str, user_env: str, password_env: str) -> str:
    """``scheme://user:pass@host/...`` -> ``scheme://host/...``; user and password go to
    ``user_env`` / ``password_env`` of this process (where the URI's client reads them)."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    if parts.username:
        os.environ[user_env] = parts.username
    if parts.password is not None:
        os.environ[password_env] = parts.password
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def forwarded() -> Dict[str, str]:
    """The secret variables of this process's environment (what a cluster run needs)."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


# --------------------------------------------------------------------------- to a submitted job


def handoff_key() -> str:
    # a package URI, the form Ray's job API stores raw bytes under (gcs://_ray_pkg_*.zip)
    return f"gcs://_ray_pkg_tlsweep_{_secrets.token_hex(16)}.zip"


def upload_for_job(client, key: str, values: Dict[str, str]) -> None:
    """Put ``values`` into the cluster's in-memory key-value store under ``key``, through the
    job API's package upload (the job reads and deletes them as it starts)."""
    from ray.dashboard.modules.job.common import uri_to_http_components

    protocol, name = uri_to_http_components(key)
    # Ray echoes the first bytes of a payload it fails to store: they say nothing secret
    payload = json.dumps({"tl_sweep_credentials": 1, **values}).encode()
    r = client._do_request("PUT", f"/api/packages/{protocol}/{name}", data=payload)
    if r.status_code != 200:
        raise RuntimeError(f"could not hand the credentials to the cluster (HTTP {r.status_code})")


def receive_in_job(key: Optional[str]) -> None:
    """In a submitted job's driver: take the credentials from the key-value store into this
    process's environment, and delete them there."""
    if not key:
        return
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    blob = _internal_kv_get(key)
    if blob is None:
        raise RuntimeError("the credentials this job was given are gone from the cluster's store (a restarted head?); "
                           "submit the sweep again or resume it")
    _internal_kv_del(key)
    values = json.loads(blob)
    values.pop("tl_sweep_credentials", None)
    os.environ.update(values)


def split_storage_credentials(uri: str) -> Tuple[str, bool]:
    """An object-store URI without its ``key:secret@`` (moved to AWS_* for this process)."""
    clean = strip_credentials(uri, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    return clean, clean != uri
