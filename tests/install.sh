#!/usr/bin/env bash
# What the tests need, on a fresh machine: the project with its test extras (pip), and what
# pip does not bring: PostgreSQL (a server the tests start as processes) and chromium (the
# browser the report test drives through Playwright), both Debian's packages. SeaweedFS (S3),
# the MLflow server, optuna-dashboard and Ray come from pip. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[test]"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  # the tests start their own cluster; the package's default one is not needed
  if command -v pg_ctlcluster >/dev/null 2>&1; then $SUDO pg_ctlcluster --force 15 main stop 2>/dev/null || true; fi
fi
