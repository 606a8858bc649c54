"""The ``tl-sweep`` command: run, validate, ls, show, export."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import click
from rich.console import Console
from rich.table import Table

from orchestrator.spec import SpecError, load_specs
from trainables import metrics as M

EXIT_INPUT = 2
err_console = Console(stderr=True)


def _fail_input(msg: str) -> None:
    err_console.print(f"error: {msg}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(EXIT_INPUT)


def _load(spec_file: str, overrides: List[str]):
    try:
        return load_specs(spec_file, list(overrides))
    except SpecError as e:
        _fail_input(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tl-sweep: transfer-learning sweeps on Ray Tune + Optuna + ASHA, tracked in MLflow.

    \b
    Examples:
      tl-sweep run search_spaces/quickstart.yaml
      tl-sweep run search_spaces/strategy1.yaml --set train.epochs=2 --address auto
      tl-sweep show quickstart
      tl-sweep export quickstart --top 1 -o best.yaml && tl-sweep run best.yaml
    """


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. --set train.epochs=2 (repeatable; the value is YAML).")
@click.option("--check", is_flag=True,
              help="Also build the data sets, backbones and strategies the sweep would (here, not on a cluster).")
def validate(spec_file: str, overrides: List[str], check: bool) -> None:
    """Validate SPEC_FILE and print the resolved search; start nothing.

    Without --check this needs neither torch nor Ray: whether the data set and the weights load
    is checked when the sweep starts, on a node where trials run.

    \b
    Example:
      tl-sweep validate search_spaces/strategy1.yaml --set train.lr=0.01
      tl-sweep validate search_spaces/quickstart.yaml --check
    """
    from orchestrator.space import describe, num_trials

    for spec, raw, notes in _load(spec_file, overrides):
        if check:
            import tempfile

            from orchestrator import lineage
            from orchestrator.spec import validate as validate_raw
            from orchestrator.sweep import check_configs
            from orchestrator.sweepdir import InputError
            from trainables.check import check_each

            with tempfile.TemporaryDirectory(prefix="tl-sweep-check-") as tmp:
                try:  # model.weights: sweep:<ref> is checked with the weights it leads to
                    source = lineage.locate(spec)
                    if source is not None:
                        spec = validate_raw(lineage.pinned(raw, lineage.write_weights(source, Path(tmp)), source))
                except InputError as e:
                    _fail_input(str(e))
                problems = check_each(check_configs(spec))["problems"]
            if problems:
                _fail_input("\n".join(f"{p['label'] + ': ' if p['label'] else ''}{p['key']}: {p['message']}"
                                       for p in problems))
        for n in notes:
            click.echo(f"note: {n}")
        click.echo(f"{spec_file}: valid spec {spec.name!r}: {num_trials(spec)} trial(s), "
                   f"algorithm {spec.search.algorithm}, scheduler {spec.search.scheduler.type}, "
                   f"metric {spec.search.metric} ({spec.search.mode})")
        if spec.search.space:
            click.echo(describe(spec))


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. --set train.epochs=2 (repeatable; the value is YAML).")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on: auto, or ray://host:10001 (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, tracking.uri, else sqlite in storage.path).")
def run(spec_file: str, overrides: List[str], address: Optional[str], tracking_uri: Optional[str]) -> None:
    """Run the sweep in SPEC_FILE (validated first: nothing starts on an error).

    A file with several YAML documents (an export of the top K) runs them one after another.

    \b
    Examples:
      tl-sweep run search_spaces/quickstart.yaml
      tl-sweep run search_spaces/strategy1.yaml --set train.epochs=2 --set search.num_samples=2
      tl-sweep run best.yaml
    """
    from orchestrator.jobs import is_jobs_address

    if is_jobs_address(address or os.environ.get("RAY_ADDRESS")):
        _fail_input(f"--address {address or os.environ.get('RAY_ADDRESS')} is a Ray Jobs address: run the sweep's driver "
                    f"on the cluster with tl-sweep submit {spec_file} --address ...")
    _run_all(_load(spec_file, overrides), address, tracking_uri)


def _run_all(loaded, address: Optional[str], tracking_uri: Optional[str], sweep_id: Optional[str] = None) -> None:
    from orchestrator.sweep import run_sweep
    from orchestrator.sweepdir import InputError

    console = Console()
    failed = False
    for spec, raw, notes in loaded:
        for n in notes:
            console.print(f"note: {n}", markup=False)
        try:
            out = run_sweep(spec, raw, address=address, tracking_uri=tracking_uri, console=console, sweep_id=sweep_id)
        except InputError as e:
            _fail_input(str(e))
        failed |= _summary(console, out)
        if out.status == "interrupted":
            sys.exit(130)
    sys.exit(1 if failed else 0)


def _summary(console: Console, out) -> bool:
    """Print the one-line summary; True when no trial produced a result."""
    from orchestrator.results import leaderboard

    metric = out.sweep.meta["metric"]
    rows = leaderboard(out.sweep)
    ranked = [r for r in rows if r.best is not None]
    counts = {s: sum(r.status == s for r in rows) for s in ("FINISHED", "PRUNED", "FAILED", "KILLED")}
    tally = ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
    runs = f"#/experiments/{out.sweep.meta['experiment_id']}/runs"  # the runs table, not the traces page
    ui = (f"mlflow ui --backend-store-uri {out.tracking_uri}, then open http://127.0.0.1:5000/{runs}"
          if out.tracking_uri.startswith("sqlite:") else f"open {out.tracking_uri.rstrip('/')}/{runs}")
    if out.status == "interrupted":
        console.print(f"sweep {out.sweep_id} interrupted ({tally}); MLflow runs closed as KILLED. "
                      f"Results so far: tl-sweep show {out.sweep_id}; continue it with: tl-sweep resume {out.sweep_id}",
                      markup=False, soft_wrap=True)
        return False
    if not ranked:
        log = out.sweep.local / "ray.log" if out.sweep.local else "the driver's sweep folder"
        console.print(f"sweep {out.sweep_id}: no trial reported {metric} ({tally}). "
                      f"Errors: tl-sweep show {out.sweep_id}; Ray log: {log}", markup=False)
        return True
    from orchestrator.fmt import metric as fmt_metric
    from orchestrator.fmt import param as fmt_param

    best = ranked[0]
    values = " ".join(f"{k}={fmt_param(v)}" for k, v in best.values.items())
    report = f" | report: {out.report}" if getattr(out, "report", None) else ""
    console.print(
        f"sweep {out.sweep_id} {out.status} ({tally}): best trial {best.trial} {metric}={fmt_metric(best.best)}"
        f"{' ' + values if values else ''} | UI: {ui}{report} | export: tl-sweep export {out.sweep_id} --top 1 -o best.yaml",
        markup=False, soft_wrap=True,
    )
    return False


@cli.command()
@click.argument("sweep")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on: auto, or ray://host:10001 (default: $RAY_ADDRESS, else a local Ray).")
def resume(sweep: str, storage: str, address: Optional[str]) -> None:
    """Continue SWEEP after its driver died or was stopped (kill -9, Ctrl-C, a lost head node).

    Finished trials stay finished; unfinished ones continue from their last checkpoints; the
    Optuna study and ASHA's rungs carry on; the same MLflow parent run and each trial's one
    child run are reused.

    \b
    Example:
      tl-sweep resume quickstart-20261123-084006-0ee0
    """
    from orchestrator.jobs import is_jobs_address

    if is_jobs_address(address):
        _submit_resume(sweep, storage, address)
        return
    _resume(sweep, storage, address)


def _resume(sweep: str, storage: str, address: Optional[str]) -> None:
    from orchestrator.spec import SpecError
    from orchestrator.sweep import resume_sweep
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = find_sweep(sweep, storage)
        if found.meta.get("status") == "finished":
            raise InputError(f"sweep {found.id} has finished: nothing to resume (see tl-sweep show {found.id})")
        out = resume_sweep(found, address=address, storage_path=storage if "://" not in storage else "sweeps",
                           console=Console())
    except (InputError, SpecError) as e:
        _fail_input(str(e))
    failed = _summary(Console(), out)
    sys.exit(130 if out.status == "interrupted" else 1 if failed else 0)


def _submit_resume(sweep: str, storage: str, address: str) -> None:
    from orchestrator import jobs
    from orchestrator.live import Printer
    from orchestrator.sweepdir import InputError, find_sweep, is_uri

    if not is_uri(storage):
        _fail_input(f"--storage {storage}: a sweep resumed on a cluster is read from its storage.uri (s3://... or a "
                    "folder every node sees), e.g. --storage s3://bucket/sweeps")
    try:
        found = find_sweep(sweep, storage)
        if found.meta.get("status") == "finished":
            raise InputError(f"sweep {found.id} has finished: nothing to resume (see tl-sweep show {found.id})")
        resumes = found.meta.get("resumed", 0) + 1
        job = jobs.submit(address, ["job-resume", found.id, "--storage", storage], f"{found.id}-resume{resumes}",
                          ".", {"sweep": found.id, "name": found.meta["name"]})
    except InputError as e:
        _fail_input(str(e))
    _follow_job(Printer(Console()), f"submitted job {job} to {address}: resumes sweep {found.id}", address, job,
                found.id, storage)


def _follow_job(printer, started: str, address: str, job: str, sweep_id: str, storage: str) -> None:
    """After a job is submitted: say so, wait until its driver has started (exit with its code
    when it failed to), then print how to follow the sweep."""
    from orchestrator import jobs
    from orchestrator.secrets import redact

    printer.line(started)
    code = jobs.watch_start(address, job, printer)
    if code:
        sys.exit(code)
    printer.line(f"follow it: tl-sweep status {sweep_id} --address {address}; tl-sweep logs {sweep_id} --address "
                 f"{address} --follow; results: tl-sweep show {sweep_id} --storage {redact(storage)}")


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--address", required=True, metavar="URL", help="The cluster's Ray Jobs API (its dashboard): http://head:8265.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. --set train.epochs=2 (repeatable; the value is YAML).")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="The MLflow server the cluster logs to (default: $MLFLOW_TRACKING_URI, else tracking.uri).")
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False, exists=True),
              help="Uploaded for the job (Ray's runtime environment; .gitignore is respected).")
def submit(spec_file: str, address: str, overrides: List[str], tracking_uri: Optional[str], working_dir: str) -> None:
    """Run the sweep in SPEC_FILE on a Ray cluster, its driver there: submit it as a Ray Job.

    The spec is validated here; the working directory is uploaded; MLflow and object-store
    credentials in this environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, AWS_*) are
    handed to the job in memory, never written to disk. The sweep's state goes to its
    storage.uri, from which it resumes after anything (tl-sweep resume SWEEP --storage URI
    --address URL). Returns once the sweep has started (or failed to).

    \b
    Example:
      export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...
      tl-sweep submit search_spaces/strategy1.yaml --address http://head:8265 \\
          --tracking-uri http://mlflow:5000 --set storage.uri=s3://ray/sweeps
    """
    import yaml

    from orchestrator import jobs
    from orchestrator.live import Printer
    from orchestrator.secrets import strip_credentials, without_credentials
    from orchestrator.sweepdir import InputError, new_sweep_id

    loaded = _load(spec_file, overrides)
    if len(loaded) != 1:
        _fail_input(f"{spec_file} holds {len(loaded)} specs; submit one at a time")
    spec, raw, notes = loaded[0]
    printer = Printer(Console())
    for n in notes:
        printer.line(f"note: {n}")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    if not uri or uri.startswith(("sqlite:", "file:", "/", "./")) or "://" not in uri:
        _fail_input("tracking: a submitted sweep logs to an MLflow server the cluster reaches: give --tracking-uri "
                    "http://mlflow:5000 (or MLFLOW_TRACKING_URI, or tracking.uri)")
    if not spec.storage.uri:
        _fail_input("storage.uri: a submitted sweep keeps its state where every node and any later driver can read "
                    "it: set storage.uri to s3://bucket/prefix (or a folder every node mounts), e.g. "
                    "--set storage.uri=s3://ray/sweeps")
    uri = strip_credentials(uri, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    from orchestrator.secrets import split_storage_credentials

    split_storage_credentials(spec.storage.uri)  # key:secret@ -> AWS_* here, then to the job in memory
    text = without_credentials(yaml.safe_dump(raw, sort_keys=False))
    sweep_id = new_sweep_id(spec.name)
    try:
        job = jobs.submit(address, ["job-run", sweep_id, "--spec", jobs.encode_spec(text), "--tracking-uri", uri],
                          sweep_id, working_dir, {"sweep": sweep_id, "name": spec.name}, leave_out=[spec_file])
    except InputError as e:
        _fail_input(str(e))
    _follow_job(printer, f"submitted sweep {sweep_id} to {address} (job {job})", address, job, sweep_id,
                spec.storage.uri)


@cli.command(name="job-run", hidden=True)
@click.argument("sweep_id")
@click.option("--spec", "encoded", required=True)
@click.option("--tracking-uri", default=None)
@click.option("--secrets-key", default=None)
def job_run(sweep_id: str, encoded: str, tracking_uri: Optional[str], secrets_key: Optional[str]) -> None:
    """A submitted sweep's driver, on the cluster (what tl-sweep submit runs)."""
    import ray

    from orchestrator import jobs
    from orchestrator.secrets import receive_in_job
    from orchestrator.spec import SpecError, load_specs_text

    if secrets_key:
        ray.init(address="auto", log_to_driver=False, configure_logging=False, logging_level="ERROR")
        receive_in_job(secrets_key)
    try:
        loaded = load_specs_text(jobs.decode_spec(encoded), f"sweep {sweep_id}")
    except SpecError as e:
        _fail_input(str(e))
    _run_all(loaded, "auto", tracking_uri, sweep_id=sweep_id)


@cli.command(name="job-resume", hidden=True)
@click.argument("sweep_id")
@click.option("--storage", required=True)
@click.option("--secrets-key", default=None)
def job_resume(sweep_id: str, storage: str, secrets_key: Optional[str]) -> None:
    """A resumed sweep's driver, on the cluster (what tl-sweep resume --address http://... runs)."""
    import ray

    from orchestrator.secrets import receive_in_job

    if secrets_key:
        ray.init(address="auto", log_to_driver=False, configure_logging=False, logging_level="ERROR")
        receive_in_job(secrets_key)
    _resume(sweep_id, storage, "auto")


@cli.command()
@click.argument("sweep", required=False)
@click.option("--address", required=True, metavar="URL", help="The cluster's Ray Jobs API: http://head:8265.")
def status(sweep: Optional[str], address: str) -> None:
    """The status of SWEEP's jobs on the cluster (every tl-sweep job without SWEEP).

    \b
    Example:
      tl-sweep status strategy1-20261125-101500-ab12 --address http://head:8265
    """
    from orchestrator import jobs
    from orchestrator.sweepdir import InputError

    try:
        found = jobs.sweep_jobs(address, sweep)
    except InputError as e:
        _fail_input(str(e))
    if sweep and not found:
        _fail_input(f"no tl-sweep job for {sweep!r} on {address}")
    t = Table("sweep", "job", "status", "started", "ended", "message")
    for j in found:
        started = _time(j.start_time)
        ended = _time(j.end_time)
        t.add_row((j.metadata or {}).get("sweep", ""), j.submission_id or "", str(j.status), started, ended,
                  (j.message or "")[:120])
    Console(width=200).print(t)


def _time(ms: Optional[int]) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds") if ms else ""


@cli.command()
@click.argument("sweep")
@click.option("--address", required=True, metavar="URL", help="The cluster's Ray Jobs API: http://head:8265.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def logs(sweep: str, address: str, follow: bool) -> None:
    """What SWEEP's driver printed on the cluster (its latest job).

    \b
    Example:
      tl-sweep logs strategy1 --address http://head:8265 --follow
    """
    import time

    from orchestrator import jobs
    from orchestrator.secrets import redact
    from orchestrator.sweepdir import InputError

    try:
        job = jobs.latest_job(address, sweep)
        c = jobs.client(address)
    except InputError as e:
        _fail_input(str(e))
    shown = 0
    while True:
        text = c.get_job_logs(job.submission_id)
        lines = text.splitlines()
        for line in lines[shown:]:
            click.echo(redact(line))
        shown = len(lines)
        if not follow or c.get_job_status(job.submission_id) in jobs.DONE:
            if follow:  # the last lines written as it ended
                for line in c.get_job_logs(job.submission_id).splitlines()[shown:]:
                    click.echo(redact(line))
            return
        time.sleep(2)


@cli.command()
@click.argument("sweep")
@click.option("--address", required=True, metavar="URL", help="The cluster's Ray Jobs API: http://head:8265.")
def stop(sweep: str, address: str) -> None:
    """Stop SWEEP's running job as Ctrl-C would: trials stopped, MLflow runs closed as KILLED;
    tl-sweep resume carries on from there.

    \b
    Example:
      tl-sweep stop strategy1 --address http://head:8265
    """
    from orchestrator import jobs
    from orchestrator.sweepdir import InputError

    try:
        job = jobs.latest_job(address, sweep)
        stopped = jobs.client(address).stop_job(job.submission_id)
    except InputError as e:
        _fail_input(str(e))
    click.echo(f"job {job.submission_id}: {'stopping' if stopped else 'not running (' + str(job.status) + ')'}")


@cli.command(name="ls")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
def ls_(storage: str) -> None:
    """List the sweeps under the storage folder, oldest first.

    \b
    Example:
      tl-sweep ls --storage sweeps
    """
    from orchestrator.sweepdir import InputError, list_sweeps, open_store

    try:
        sweeps = list_sweeps(storage)
    except InputError as e:
        _fail_input(str(e))
    if not sweeps:
        click.echo(f"no sweeps under {open_store(storage).display}")
        return
    t = Table("sweep", "name", "created", "status", "trials", "metric")
    for sw in sweeps:
        m = sw.meta
        t.add_row(m["id"], m["name"], m.get("created", ""), m.get("status", ""), str(m.get("num_trials", "")), m.get("metric", ""))
    Console(width=200).print(t)


@cli.command()
@click.argument("sweep")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
@click.option("--format", "form", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="csv / json / markdown for scripts and notes (exact values in json).")
def show(sweep: str, storage: str, form: str) -> None:
    """Print the leaderboard of SWEEP (an id, a name for its latest sweep, or a folder).

    \b
    Examples:
      tl-sweep show quickstart
      tl-sweep show quickstart --format csv > quickstart.csv
    """
    import csv
    import json

    from orchestrator.fmt import metric as fmt_metric
    from orchestrator.fmt import param as fmt_param
    from orchestrator.results import leaderboard
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = find_sweep(sweep, storage)
    except InputError as e:
        _fail_input(str(e))
    meta = found.meta
    rows = leaderboard(found)
    columns = ["rank", "trial", *meta.get("varying", []), f"best {meta['metric']}", "epochs", "status", M.TEST_ACC,
               "trainable params"]
    records = []
    for i, r in enumerate(rows, 1):
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[-1][:80]}"
        trainable = None if r.trainable is None else int(r.trainable)
        records.append(dict(zip(columns, [i, r.trial, *r.values.values(), r.best, r.epochs, status, r.test_acc,
                                          trainable])))
    if form == "json":
        click.echo(json.dumps({"sweep": meta["id"], "status": meta.get("status"), "metric": meta["metric"],
                               "mode": meta["mode"], "trials": records}, indent=2))
        return
    best_col = f"best {meta['metric']}"
    shown = [{k: ("-" if v is None else fmt_metric(v) if k in (best_col, M.TEST_ACC) else f"{v:,}" if k == "trainable params" else
                  fmt_param(v) if k in meta.get("varying", []) else v) for k, v in rec.items()} for rec in records]
    if form == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=columns)
        w.writeheader()
        w.writerows(shown)
    elif form == "markdown":
        click.echo("| " + " | ".join(columns) + " |")
        click.echo("|" + "---|" * len(columns))
        for rec in shown:
            click.echo("| " + " | ".join(str(rec[c]).replace("|", "/") for c in columns) + " |")
    else:
        t = Table(title=f"{meta['id']} ({meta.get('status')}) - best {meta['metric']} ({meta['mode']})")
        for col in columns:
            t.add_column(col)
        for rec in shown:
            t.add_row(*[str(rec[c]) for c in columns])
        Console(width=200).print(t)


@cli.command()
@click.argument("sweeps", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="The folder for report.html and the figures (default: reports/<sweep>).")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
@click.option("--no-errors", is_flag=True, help="Leave out the best trial's confusion matrix and worst images (they load its model and data).")
def report(sweeps: List[str], output: Optional[str], storage: str, no_errors: bool) -> None:
    """Write a report of SWEEP (or of several side by side): HTML, one PNG per figure.

    Leaderboard, the study's own plot (the metric against what the study varies, mean and
    spread over replicates), learning curves, parallel coordinates, parameter importance
    (fANOVA, PED-ANOVA), the best trial's confusion matrix and worst-classified images,
    resources. A single sweep's report is also logged to its MLflow parent run.

    \b
    Examples:
      tl-sweep report quickstart
      tl-sweep report strategy1 strategy2 -o reports/s1-vs-s2
    """
    from orchestrator import report as R
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = [find_sweep(s, storage) for s in sweeps]
    except InputError as e:
        _fail_input(str(e))
    datas = [R.collect(f) for f in found]
    out = Path(output or Path("reports") / "-vs-".join(f.id for f in found))
    R.write(datas, out, errors=not no_errors)
    if len(found) == 1:
        from orchestrator.tracking import client_for

        R.log_to_parent(client_for(found[0].meta["tracking_uri"]), found[0], out)
    click.echo(f"wrote {out / 'report.html'}" + (" (also in the sweep's MLflow parent run, under report/)" if len(found) == 1 else ""))


@cli.command()
@click.argument("sweep")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
@click.option("--to", "url", metavar="URL", default=None,
              help="An Optuna RDB storage URL to copy the study into (default: optuna.db in the sweep's folder).")
def study(sweep: str, storage: str, url: Optional[str]) -> None:
    """Keep SWEEP's Optuna study in an Optuna storage and print how to open it.

    Every sweep does this when it ends (optuna.db beside its log); this writes it again, or into
    another storage (a study of the sweep's id there is replaced).

    \b
    Examples:
      tl-sweep study quickstart && optuna-dashboard sqlite:///sweeps/<sweep id>/optuna.db
      tl-sweep study strategy1 --to postgresql://optuna@db.example.org/studies
    """
    from orchestrator.secrets import redact
    from orchestrator.sweep import keep_study
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = find_sweep(sweep, storage)
    except InputError as e:
        _fail_input(str(e))
    try:
        kept = keep_study(found, url)
    except Exception as e:  # noqa: BLE001 (an URL Optuna cannot open)
        _fail_input(f"--to: Optuna could not write the study to {redact(url or '')}: {redact(str(e))}")
    if kept is None:
        _fail_input(f"sweep {found.id} has no saved Optuna study (its driver saved no searcher state yet)"
                    + ("" if url else "; with storage.uri, give --to URL"))
    click.echo(f"study {found.id} in {redact(kept)} ({len(found.meta.get('varying', []))} searched key(s)); "
               f"open it with: optuna-dashboard {redact(kept)}")


@cli.command()
@click.argument("sweep")
@click.option("--top", default=1, show_default=True, type=click.IntRange(min=1), help="How many of the best trials.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here (default: stdout).")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
@click.option("--register", "register_as", metavar="NAME", default=None,
              help="Also put the best trial's model in the MLflow Model Registry under NAME (a new version if NAME exists).")
def export(sweep: str, top: int, output: Optional[str], storage: str, register_as: Optional[str]) -> None:
    """Write the top K configs of SWEEP as specs that re-run as is (search removed).

    \b
    Example:
      tl-sweep export quickstart --top 1 -o best.yaml && tl-sweep run best.yaml
      tl-sweep export quickstart -o best.yaml --register pets-classifier
    """
    from orchestrator.results import export_best
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = find_sweep(sweep, storage)
        text = export_best(found, top)
        if register_as is not None and not register_as.strip():
            raise InputError("--register: give the registered model a name, e.g. --register pets-classifier")
    except InputError as e:
        _fail_input(str(e))
    if register_as:
        from orchestrator.bestmodel import register

        try:
            version = register(found, register_as.strip())
        except InputError as e:
            _fail_input(str(e))
        # to stderr when the spec goes to stdout, so that the YAML stays clean
        click.echo(f"registered the best trial's model as {version.name} version {version.version} "
                   f"(models:/{version.name}/{version.version})", err=not output)
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}; run it with: tl-sweep run {output}")
    else:
        click.echo(text, nl=False)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints a "View run" link whenever a run on a server ends; the summary line gives the runs table
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    cli()


if __name__ == "__main__":
    main()
