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

    for spec, _, notes in _load(spec_file, overrides):
        if check:
            from orchestrator.sweep import check_configs
            from trainables.check import check_each

            problems = check_each(check_configs(spec))
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
    from orchestrator.sweep import run_sweep
    from orchestrator.sweepdir import InputError

    loaded = _load(spec_file, overrides)
    console = Console()
    failed = False
    for spec, raw, notes in loaded:
        for n in notes:
            console.print(f"note: {n}", markup=False)
        try:
            out = run_sweep(spec, raw, address=address, tracking_uri=tracking_uri, console=console)
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
    ui = f"mlflow ui --backend-store-uri {out.tracking_uri}" if out.tracking_uri.startswith("sqlite:") else f"open {out.tracking_uri}"
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
    best = ranked[0]
    values = " ".join(f"{k}={v}" for k, v in best.values.items())
    console.print(
        f"sweep {out.sweep_id} {out.status} ({tally}): best trial {best.trial} {metric}={best.best:.4f}"
        f"{' ' + values if values else ''} | UI: {ui} | export: tl-sweep export {out.sweep_id} --top 1 -o best.yaml",
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
def show(sweep: str, storage: str) -> None:
    """Print the leaderboard of SWEEP (an id, a name for its latest sweep, or a folder).

    \b
    Example:
      tl-sweep show quickstart
    """
    from orchestrator.results import leaderboard
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        found = find_sweep(sweep, storage)
    except InputError as e:
        _fail_input(str(e))
    meta = found.meta
    rows = leaderboard(found)
    t = Table(title=f"{meta['id']} ({meta.get('status')}) - best {meta['metric']} ({meta['mode']})")
    for col in ["rank", "trial", *meta.get("varying", []), f"best {meta['metric']}", "epochs", "status", M.TEST_ACC]:
        t.add_column(col)
    for i, r in enumerate(rows, 1):
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[-1][:80]}"
        t.add_row(str(i), r.trial, *r.values.values(), "-" if r.best is None else f"{r.best:.4f}",
                  str(r.epochs), status, "-" if r.test_acc is None else f"{r.test_acc:.4f}")
    Console(width=200).print(t)


@cli.command()
@click.argument("sweep")
@click.option("--top", default=1, show_default=True, type=click.IntRange(min=1), help="How many of the best trials.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here (default: stdout).")
@click.option("--storage", default="sweeps", show_default=True, help="Where the sweeps are: the storage.path folder, or a storage.uri (s3://...).")
def export(sweep: str, top: int, output: Optional[str], storage: str) -> None:
    """Write the top K configs of SWEEP as specs that re-run as is (search removed).

    \b
    Example:
      tl-sweep export quickstart --top 1 -o best.yaml && tl-sweep run best.yaml
    """
    from orchestrator.results import export_best
    from orchestrator.sweepdir import InputError, find_sweep

    try:
        text = export_best(find_sweep(sweep, storage), top)
    except InputError as e:
        _fail_input(str(e))
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}; run it with: tl-sweep run {output}")
    else:
        click.echo(text, nl=False)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cli()


if __name__ == "__main__":
    main()
