"""The Ray Tune side of a search: the searcher (one Optuna study for every algorithm) and the
scheduler (ASHA, whose rungs survive a driver restart)."""
from __future__ import annotations

import copy
import logging
import pickle
from typing import Any, Dict, Optional

from orchestrator.space import DefineByRun, encoded, grid_points, max_t, optuna_name, param_space
from orchestrator.spec import Distribution, Spec, get_path, set_path
from trainables import metrics as M
from trainables.config import done, merge

TRIAL_INDEX = "trial_index"


def _optuna_search():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class TrialSearch(_optuna_search()):
    """OptunaSearch that (1) gives each trial its index in the study (``trial_index``, from
    which the trial's seed derives), (2) decodes values that Optuna holds by index, and (3)
    records a trial that the scheduler stopped before its last epoch as PRUNED, not COMPLETE."""

    def __init__(self, spec_space: Dict[str, Distribution], fixed: Dict[str, Any], **kwargs):
        super().__init__(space=DefineByRun(spec_space), **kwargs)
        self._decode = {k: list(d.args) for k, d in spec_space.items() if encoded(d)}
        self._fixed = fixed  # the trial config's fixed part: what ``done`` needs to know a trial's epochs
        self._configs: Dict[str, Dict[str, Any]] = {}
        self._last_epoch: Dict[str, int] = {}

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config  # FINISHED, or None (wait)
        for key, values in self._decode.items():
            set_path(config, key, values[int(get_path(config, key))])
        if isinstance(config.get("phases"), dict):
            # searched phase fields come unflattened by index ({"1": {"train": {"lr": ...}}}); Tune
            # would put that dict in place of the list: give it the whole list instead
            phases = copy.deepcopy(self._fixed.get("phases") or [])
            for i, values in config["phases"].items():
                phases[int(i)] = merge(phases[int(i)], values)
            config["phases"] = phases
        config[TRIAL_INDEX] = self._ot_trials[trial_id].number
        self._configs[trial_id] = config
        return config

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        super().on_trial_result(trial_id, result)
        if M.EPOCH in result:
            self._last_epoch[trial_id] = int(result[M.EPOCH])

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        if not error and result and trial_id in self._configs:
            config = merge(self._fixed, self._configs[trial_id])
            epoch = int(result.get(M.EPOCH, self._last_epoch.get(trial_id, 0)))
            if not done(config, epoch):
                ot_trial = self._ot_trials.get(trial_id)
                value = result.get(self._metric) if isinstance(self._metric, str) else None
                if ot_trial is not None and value is not None and self._last_epoch.get(trial_id) != epoch:
                    ot_trial.report(value, epoch)  # the result that stopped it never reached the study
                super().on_trial_complete(trial_id, result=None, error=False)  # -> PRUNED
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def search_algorithm(spec: Spec):
    """One Optuna study for every algorithm: TPE (optuna) or random sampling, enumerated values
    enqueued ``num_samples`` times each."""
    import optuna

    s = spec.search
    sampler = (optuna.samplers.TPESampler(seed=s.seed) if s.algorithm == "optuna"
               else optuna.samplers.RandomSampler(seed=s.seed))
    encode = {k: list(d.args) for k, d in s.space.items() if encoded(d)}
    points = []
    for p in grid_points(spec):
        points.append({optuna_name(k): (encode[k].index(v) if k in encode else v) for k, v in p.items()})
    points = [p for p in points if p] * s.num_samples
    return TrialSearch(s.space, param_space(spec), metric=s.metric, mode=s.mode, sampler=sampler,
                       points_to_evaluate=points or None)


def save_state_now(tune_controller, wait: bool = False) -> None:
    """Have Tune save its experiment state (which trials ended, each trial's checkpoint) at the
    end of this step rather than up to TUNE_GLOBAL_CHECKPOINT_S later: a driver killed just
    after a trial ended must not run that trial again when the sweep resumes. ``wait``: first
    let the save in flight reach the storage."""
    # schedulers get Tune's controller in a wrapper that warns on each private attribute
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    manager = getattr(controller, "_checkpoint_manager", None)
    if manager is None or not hasattr(manager, "_should_force_sync_up"):
        return
    if wait:
        syncer = getattr(getattr(manager, "_storage", None), "syncer", None)
        if syncer is not None:
            try:
                syncer.wait()
            except Exception:  # a failed upload: Tune logs it and tries again with this save
                logging.getLogger(__name__).warning("saving the experiment state failed", exc_info=True)
    manager._should_force_sync_up = True


class RemembersController:
    """For the schedulers: keeps the Tune controller that Tune hands to every scheduler hook,
    so that ``StateSaver`` can reach it when a checkpoint lands. Never pickled."""

    _controller = None

    def _remember(self, tune_controller) -> None:
        self._controller = tune_controller

    def on_trial_add(self, tune_controller, trial):
        self._remember(tune_controller)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._remember(tune_controller)
        return super().on_trial_result(tune_controller, trial, result)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_controller"}


def _callback_base():
    from ray.tune import Callback

    return Callback


class StateSaver(_callback_base()):
    """Saves Tune's experiment state each time a trial's checkpoint lands, after the previous
    save has reached the storage. Tune deletes a trial's older checkpoints as new ones come
    (``storage.keep_checkpoints``) but saves its state, which names the checkpoint to resume
    from, only now and then: a driver killed in between left a state naming a deleted
    checkpoint, and the trial failed on resume. With this, the state on the storage always
    names the trial's previous checkpoint or a newer one, and two are kept."""

    def __init__(self, scheduler: RemembersController):
        self._scheduler = scheduler

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # called before Tune registers this checkpoint (and deletes the oldest kept one)
        save_state_now(self._scheduler._controller, wait=True)


def _fifo_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class SavingFIFO(RemembersController, _fifo_base()):
    """First in, first out; the experiment state saved as each trial ends."""

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        save_state_now(tune_controller)


def trial_scheduler(spec: Spec, store=None):
    """FIFO, or ASHA on epochs; with ``store`` (a SweepStore) ASHA's rungs survive a driver
    restart. Either saves Tune's experiment state as each trial ends."""
    sch = spec.search.scheduler
    if sch.type == "fifo":
        return SavingFIFO()
    return ResumableASHA(
        store=store,
        time_attr=M.EPOCH,
        max_t=max_t(spec),
        grace_period=sch.grace_period,
        reduction_factor=sch.reduction_factor,
    )


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


STATE_FILE = "scheduler.pkl"
# What a driver restart must not lose: every trial's metric at each rung, and the bookkeeping
# that goes with them. Metric and mode are not kept: Tune sets them again on restore.
_KEPT = ("_trial_info", "_brackets", "_counter", "_num_stopped")


class ResumableASHA(RemembersController, _asha_base()):
    """ASHA whose rungs are written to the sweep's storage after each decision and read back
    when the sweep resumes (``load_state``): Tune restores the searcher's state but not the
    scheduler's, so without this a resumed sweep would judge its trials against empty rungs."""

    def __init__(self, store=None, **kwargs):
        super().__init__(**kwargs)
        self._store = store

    def _persist(self) -> None:
        if self._store is not None:
            self._store.write_bytes(STATE_FILE, pickle.dumps({k: getattr(self, k) for k in _KEPT}))

    def load_state(self) -> bool:
        """Read the rungs back from the sweep's storage; False when none were written."""
        if self._store is None or not self._store.exists(STATE_FILE):
            return False
        # written by this sweep's own driver into its own storage
        self.__dict__.update(pickle.loads(self._store.read_bytes(STATE_FILE)))
        self._restored: Optional[set] = set()  # the trials the restored experiment knows
        return True

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if getattr(self, "_restored", None) is not None:
            self._restored.add(trial.trial_id)

    def _forget_lost(self) -> None:
        """A trial the dead driver had started but Tune had not recorded is started again
        under a new id after a resume: its values at the rungs must not count twice."""
        known = getattr(self, "_restored", None)
        if known is None:
            return
        for bracket in self._brackets:
            for _, recorded in bracket._rungs:
                for tid in [t for t in recorded if t not in known]:
                    del recorded[tid]
        self._restored = None

    def on_trial_result(self, tune_controller, trial, result):
        self._forget_lost()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()
        save_state_now(tune_controller)

    def on_trial_remove(self, tune_controller, trial):
        super().on_trial_remove(tune_controller, trial)
        self._persist()


