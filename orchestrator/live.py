"""What the user sees while a sweep runs: a live table of trials (a line per event when the
output is not a terminal, e.g. CI logs)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.fmt import metric as metric_text
from orchestrator.fmt import num
from orchestrator.spec import get_path
from orchestrator.tracking import DriverCallback, on_ctrl_c, short_error, trial_error_text, trial_outcome
from trainables import metrics as M


def fmt(v: Any) -> str:
    """A metric to four significant digits."""
    return metric_text(v) if isinstance(v, float) else str(v)


class Printer:
    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console()

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


class LiveTable(DriverCallback):
    """Trial id, the values that vary, status, epoch, the metric and the best so far."""

    driver_only = ("_printer", "_live", "_trials")

    def __init__(self, printer: Printer, varying: List[str], metric: str, mode: str):
        self._printer, self.varying, self.metric, self.mode = printer, varying, metric, mode
        self.rows: Dict[str, Dict[str, Any]] = {}
        self._trials: Dict[str, Any] = {}
        self.best: Optional[float] = None
        self.best_trial: Optional[str] = None
        self._live: Optional[Live] = None
        self.interrupted = False

    @property
    def printer(self) -> Printer:
        if self._printer is None:  # a copy on the head node (Ray Client): its own console
            self._printer = Printer()
        return self._printer

    @printer.setter
    def printer(self, value: Printer) -> None:
        self._printer = value

    def _known(self) -> Dict[str, Any]:
        if self._trials is None:
            self._trials = {}
        return self._trials

    # ------------------------------------------------------------------ rendering
    def _better(self, a: float, b: Optional[float]) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def table(self) -> Table:
        t = Table(title=f"trials (best {self.metric}: {fmt(self.best) if self.best is not None else '-'})")
        for col in ["trial", *self.varying, "status", "epoch", self.metric, "best"]:
            t.add_column(col)
        for tid, r in self.rows.items():
            t.add_row(tid, *[num(r["values"].get(k, "")) for k in self.varying], r["status"],
                      fmt(r.get("epoch", "")), fmt(r.get("last", "")), fmt(r.get("best", "")))
        return t

    def _event(self, tid: str, text: str) -> None:
        if self._live is not None:
            self._live.update(self.table())
        else:
            self.printer.line(f"[{tid}] {text}")

    def setup(self, **info):
        on_ctrl_c(lambda: setattr(self, "interrupted", True))
        if self.printer.console.is_terminal:
            self._live = Live(self.table(), console=self.printer.console, refresh_per_second=4)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "RUNNING"
        self._event(trial.trial_id, "start " + " ".join(f"{k}={num(v)}" for k, v in row["values"].items()))

    def _row(self, trial) -> Dict[str, Any]:
        self._known()[trial.trial_id] = trial
        return self.rows.setdefault(trial.trial_id, {"values": {k: get_path(trial.config, k, "") for k in self.varying}})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = result.get(M.EPOCH)
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            row["last"] = value
            if self._better(value, row.get("best")):
                row["best"] = value
            if self._better(value, self.best):
                self.best, self.best_trial = value, trial.trial_id
        self._event(trial.trial_id, f"epoch {row['epoch']} {self.metric}={fmt(value)} (sweep best {fmt(self.best)})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        outcome = trial_outcome(trial, int(row.get("epoch") or 0))
        if self.interrupted and outcome == "pruned":
            row["status"] = "STOPPED"
            return
        row["status"] = outcome
        self._event(trial.trial_id, f"{row['status']} after {row.get('epoch')} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "FAILED"
        self._event(trial.trial_id, "FAILED: " + short_error(trial_error_text(trial)))

    def on_experiment_end(self, trials, **info):
        for t in trials:
            self._known()[t.trial_id] = t

    def trials(self) -> List[Any]:
        return list(self._known().values())

