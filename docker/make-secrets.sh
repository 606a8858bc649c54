#!/usr/bin/env bash
# Random passwords and keys for docker/compose.yaml, one file each in docker/secrets/ (mode 600,
# never committed). Run once before `docker compose up`; an existing file is kept. Prints no secret.
set -euo pipefail
cd "$(dirname "$0")/secrets"
umask 077
rand() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
keep() { [ -s "$1" ] || { "${@:2}" > "$1"; echo "made docker/secrets/$1"; }; }

keep postgres_password rand 24
keep pgpass sh -c 'printf "postgres:5432:*:mlflow:%s\n" "$(cat postgres_password)"'
keep mlflow_admin_password rand 24
keep mlflow_flask_secret rand 32
keep ray_token rand 32
keep s3_admin_key rand 10
keep s3_admin_secret rand 24
keep s3_mlflow_key rand 10
keep s3_mlflow_secret rand 24
keep s3_trials_key rand 10
keep s3_trials_secret rand 24
keep s3_config.json python3 - <<'PY'
import json
def ident(name, actions):
    key, secret = open(f"s3_{name}_key").read().strip(), open(f"s3_{name}_secret").read().strip()
    return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
print(json.dumps({"identities": [
    ident("admin", ["Admin", "Read", "List", "Tagging", "Write"]),
    ident("mlflow", ["Read:mlflow", "List:mlflow", "Tagging:mlflow", "Write:mlflow"]),
    ident("trials", ["Read:ray", "List:ray", "Tagging:ray", "Write:ray"]),
]}, indent=2))
PY
keep s3_mlflow sh -c 'printf "[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n" "$(cat s3_mlflow_key)" "$(cat s3_mlflow_secret)"'
keep s3_trials sh -c 'printf "[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n" "$(cat s3_trials_key)" "$(cat s3_trials_secret)"'
chmod 600 ./*
# the image runs as uid 1000 (user tl): it must be able to read the files mounted as secrets
if [ "$(id -u)" = 0 ]; then chown 1000 ./*; fi
