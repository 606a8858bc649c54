"""The servers of docker/compose.yaml, started as processes on 127.0.0.1 with compose's own
commands (every flag kept; ports and paths swapped for local ones): PostgreSQL, SeaweedFS (S3),
an MLflow server with basic auth, and a two-node Ray cluster with its Jobs API."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
# What a server's environment must not hold: the tests prove credentials reach the cluster
# only the way tl-sweep hands them over.
SCRUBBED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE",
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI",
            "RAY_ADDRESS")


def service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def compose_command(name: str, values: Dict[str, object], extra=()) -> List[str]:
    """The service's command from compose.yaml with flag values replaced; every flag kept."""
    cmd = list(service(name)["command"])
    out, i, used = [], 0, set()
    while i < len(cmd):
        tok = cmd[i]
        flag = tok.split("=", 1)[0]
        if flag in values and "=" in tok:
            out.append(f"{flag}={values[flag]}")
            used.add(flag)
        elif flag in values and i + 1 < len(cmd):
            out += [flag, str(values[flag])]
            used.add(flag)
            i += 1
        else:
            out.append(tok)
        i += 1
    assert used == set(values), f"compose's {name} command lacks {set(values) - used}"
    return [*out, *extra]


def compose_env(name: str, values: Dict[str, str]) -> Dict[str, str]:
    """The service's environment from compose.yaml, every variable given a local value."""
    env = {k: str(v) for k, v in (service(name).get("environment") or {}).items() if k != "<<"}
    missing = set(env) - set(values)
    assert not missing, f"no local value for compose's {name} variables {missing}"
    return {k: values[k] for k in env}


def free_port(also: int = 0) -> int:
    """A free port on 127.0.0.1 (with ``also``: port + also free too, both below 55536)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0 if not also else 20000 + secrets.randbelow(25000)))
            port = s.getsockname()[1]
        if not also or (port + also < 65536 and _free(port + also)):
            return port
    raise RuntimeError("no free port")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def exe(name: str) -> str:
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def wait(check: Callable[[], bool], what: str, timeout: float = 120, log: Optional[Path] = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except (OSError, urllib.error.URLError):
        return False


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(extra)
    return env


def secret_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(0o600)
    return path


@dataclass
class Proc:
    """A started server process (its own process group), stopped with SIGTERM then SIGKILL."""

    popen: subprocess.Popen
    log: Path

    def stop(self, grace: float = 40) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)


def start(cmd: List[str], log: Path, env: Dict[str, str], cwd: Optional[Path] = None) -> Proc:
    out = open(log, "w")
    return Proc(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), log)


# --------------------------------------------------------------------------- SeaweedFS (S3)


@dataclass
class S3:
    endpoint: str  # host:port
    keys: Dict[str, tuple]  # identity -> (access key, secret key)
    proc: Proc
    buckets: List[str] = field(default_factory=list)

    def uri(self, path: str, identity: Optional[str] = None) -> str:
        """An s3:// URI for pyarrow and tl-sweep (credentials inside when ``identity`` is given)."""
        creds = "{}:{}@".format(*self.keys[identity]) if identity else ""
        return f"s3://{creds}{path}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def client(self, identity: str = "admin"):
        import boto3

        key, secret = self.keys[identity]
        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def objects(self, bucket: str) -> Dict[str, bytes]:
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out


def start_s3(root: Path) -> S3:
    """SeaweedFS with compose's command: identities admin, mlflow (its bucket), trials (bucket ray)."""
    root.mkdir(parents=True, exist_ok=True)
    keys = {name: (secrets.token_hex(8), secrets.token_hex(16)) for name in ("admin", "mlflow", "trials")}
    config = {"identities": [
        {"name": "admin", "credentials": [{"accessKey": keys["admin"][0], "secretKey": keys["admin"][1]}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        *({"name": n, "credentials": [{"accessKey": keys[n][0], "secretKey": keys[n][1]}],
           "actions": [f"{a}:{b}" for a in ("Read", "List", "Tagging", "Write")]} for n, b in (("mlflow", "mlflow"), ("trials", "ray"))),
    ]}
    cfg = secret_file(root, "s3_config.json", json.dumps(config))
    ports = {f: free_port(also=10000) for f in ("-s3.port", "-master.port", "-volume.port", "-filer.port", "-admin.port")}
    cmd = compose_command("s3", {"-dir": root / "data", "-ip": "127.0.0.1", "-ip.bind": "127.0.0.1",
                                 "-s3.config": cfg, **ports})
    (root / "data").mkdir()
    assert cmd[0] == "mini"
    proc = start([exe("weed"), *cmd], root / "s3.log", clean_env())
    endpoint = f"127.0.0.1:{ports['-s3.port']}"
    s3 = S3(endpoint, keys, proc, ["mlflow", "ray"])

    def ready() -> bool:
        try:
            names = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
            return {"mlflow", "ray"} <= names
        except Exception:
            return False

    wait(ready, "SeaweedFS with its buckets", timeout=60, log=proc.log)
    return s3


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"PostgreSQL's {name} is not installed: run tests/install.sh (apt-get install postgresql)")
    return found


@dataclass
class Postgres:
    port: int
    password: str  # the mlflow role's
    run: Callable[[List[str]], subprocess.CompletedProcess]
    data: Path

    def stop(self) -> None:
        self.run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        if self.data.parent.name.startswith("tl-sweep-pg-"):
            shutil.rmtree(self.data.parent, ignore_errors=True)

    def dump(self, db: str) -> bytes:
        env = clean_env(PGPASSWORD=self.password)
        return subprocess.run([_pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", db],
                              env=env, capture_output=True, check=True).stdout


def start_postgres(root: Path) -> Postgres:
    """A throwaway cluster with compose's server flags; role and databases as compose makes them.
    PostgreSQL refuses to run as root: as root, it runs as ``nobody`` from a folder of its own
    (pytest's temporary folders are closed to other users)."""
    import tempfile

    as_root = os.geteuid() == 0
    owner = "nobody" if as_root else None

    def run(cmd, **kw):
        full = ["runuser", "-u", owner, "--", *cmd] if owner else cmd
        r = subprocess.run(full, capture_output=True, text=True, cwd="/", **kw)
        if r.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed: {r.stdout}{r.stderr}")
        return r

    if owner:
        root = Path(tempfile.mkdtemp(prefix="tl-sweep-pg-"))
        root.chmod(0o755)
    root.mkdir(parents=True, exist_ok=True)
    data, sock = root / "pgdata", root / "sock"
    sock.mkdir()
    superuser, password = secrets.token_hex(16), secrets.token_hex(16)
    pw = secret_file(root, "superuser", superuser)
    if owner:
        shutil.chown(root, owner)
        for p in (sock, pw):
            shutil.chown(p, owner)
    run([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pw}",
         "-E", "UTF8", "--no-locale"])
    port = free_port()
    flags = compose_command("postgres", {})[1:]  # every flag of compose's command
    opts = " ".join([f"-p {port}", f"-k {sock}", "-c listen_addresses=127.0.0.1", *flags])
    run([_pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "postgres.log"), "-w", "start"])
    env = clean_env(PGPASSWORD=superuser)
    psql = [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
    # as the postgres image makes them: the mlflow role and database, then compose's init script
    sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
    subprocess.run([*psql, "-d", "postgres"], input=sql, env=env, text=True, capture_output=True, check=True)
    subprocess.run([*psql, "-d", "postgres", "-f", str(REPO / "docker" / "postgres-init.sql")], env=env,
                   capture_output=True, check=True)
    return Postgres(port, password, lambda cmd: run(cmd), data)


# --------------------------------------------------------------------------- MLflow


@dataclass
class Mlflow:
    url: str
    admin: tuple
    proc: Proc

    def add_user(self, name: str) -> str:
        """A user (not an admin) with a password of its own; returns the password."""
        import base64

        password = secrets.token_hex(12)
        body = json.dumps({"username": name, "password": password}).encode()
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/users/create", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Basic " + base64.b64encode(":".join(self.admin).encode()).decode()})
        urllib.request.urlopen(req, timeout=30)
        return password

    def client(self, user: tuple = None):
        """An MlflowClient logged in as ``user`` (the admin by default)."""
        from mlflow.tracking import MlflowClient

        name, password = user or self.admin
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = name, password
        return MlflowClient(tracking_uri=self.url)


def start_mlflow(root: Path, pg: Postgres, s3: S3) -> Mlflow:
    """compose's mlflow service: basic auth (users in PostgreSQL), runs in PostgreSQL, artifacts
    in SeaweedFS through the server; its secrets in files and the environment."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin = ("admin", secrets.token_hex(12))
    pgpass = secret_file(root, "pgpass", f"127.0.0.1:{pg.port}:*:mlflow:{pg.password}\n")
    creds = secret_file(root, "s3_mlflow", "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n".format(*s3.keys["mlflow"]))
    ini = (REPO / "docker" / "mlflow-auth.ini").read_text().replace("postgres:5432", f"127.0.0.1:{pg.port}")
    auth_ini = root / "mlflow-auth.ini"
    auth_ini.write_text(ini)
    env = compose_env("mlflow", {
        "MLFLOW_BACKEND_STORE_URI": f"postgresql://mlflow@127.0.0.1:{pg.port}/mlflow",
        "PGPASSFILE": str(pgpass), "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "MLFLOW_S3_ENDPOINT_URL": f"http://{s3.endpoint}", "AWS_DEFAULT_REGION": "us-east-1",
    })
    # what compose's entrypoint exports from its secret files
    env.update(MLFLOW_AUTH_ADMIN_PASSWORD=admin[1], MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    cmd = compose_command("mlflow", {"--host": "127.0.0.1", "--port": port, "--workers": 1})
    assert cmd[:2] == ["mlflow", "server"]
    proc = start([exe("mlflow"), *cmd[1:]], root / "mlflow.log", clean_env(**env), cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait(lambda: http_ok(f"{url}/health"), "mlflow server /health", timeout=180, log=proc.log)
    return Mlflow(url, admin, proc)


# --------------------------------------------------------------------------- Ray


@dataclass
class Cluster:
    address: str  # GCS host:port
    dashboard: str  # http://127.0.0.1:port (Jobs API)
    client: str  # ray://127.0.0.1:port
    worker_id: str
    env: Dict[str, str]  # what a client of this cluster needs (token auth)
    temp_dirs: List[Path]
    procs: List[Proc]

    def stop(self) -> None:
        """Stop this cluster's processes, and only those (not `ray stop`, which stops every
        Ray on the machine): its two `ray start` process groups, then anything left that
        runs from its temp dirs."""
        for p in reversed(self.procs):
            p.stop(grace=30)
        for d in self.temp_dirs:
            subprocess.run(["pkill", "-9", "-f", str(d)], capture_output=True)
        if self.temp_dirs:
            shutil.rmtree(self.temp_dirs[0].parent, ignore_errors=True)


def start_cluster(root: Path) -> Cluster:
    """A head (no CPUs: it runs drivers, not trials) and a worker with 2 CPUs and the custom
    resource worker_node, each with its own temp dir; token auth; no credentials in their env."""
    root.mkdir(parents=True, exist_ok=True)
    token = secret_file(root, "ray_token", secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env = clean_env(**auth)
    gcs, client_port, dash = free_port(), free_port(), free_port()
    small = ["--object-store-memory=150000000"]
    # Ray's socket paths must stay under 108 bytes: its temp dirs go in a short folder of /tmp
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="tlr-", dir="/tmp"))
    head_tmp, worker_tmp = short / "h", short / "w"
    head = compose_command("ray-head", {"--port": gcs, "--ray-client-server-port": client_port,
                                        "--dashboard-host": "127.0.0.1", "--dashboard-port": dash},
                           ["--node-ip-address=127.0.0.1", f"--temp-dir={head_tmp}", *small])
    worker = compose_command("ray-worker", {"--address": f"127.0.0.1:{gcs}"},
                             ["--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"worker_node": 2}',
                              f"--temp-dir={worker_tmp}", *small])
    health = service("ray-head")["healthcheck"]["test"]
    health = [exe("ray") if t == "ray" else (f"127.0.0.1:{gcs}" if t == "127.0.0.1:6379" else t) for t in health[1:]]
    procs = [start([exe("ray"), *head[1:]], root / "head.log", env)]
    cluster = Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"ray://127.0.0.1:{client_port}", "",
                      auth, [head_tmp, worker_tmp], procs)
    try:
        wait(lambda: subprocess.run(health, capture_output=True, env=env).returncode == 0, "the head's health check",
             log=root / "head.log")
        procs.append(start([exe("ray"), *worker[1:]], root / "worker.log", env))
        nodes = _nodes(cluster.address, env)
        wait(lambda: len(nodes()) == 2, "two live nodes", log=root / "worker.log")
        cluster.worker_id = next(nid for nid, res in nodes() if res.get("worker_node"))
        wait(lambda: http_ok(f"{cluster.dashboard}/api/version") or _auth_only(cluster.dashboard), "the Jobs API",
             log=root / "head.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _auth_only(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2)
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)  # up, and locked
    except OSError:
        return False
    return True


def _nodes(address: str, env: Dict[str, str]):
    def nodes():
        r = subprocess.run([sys.executable, "-c", (
            "import json, ray; ray.init(address=%r, logging_level='ERROR');"
            "print(json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() if n['Alive']]))") % address],
            capture_output=True, text=True, env=env)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []

    return nodes
