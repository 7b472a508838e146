"""The study's Optuna searcher: Ray's ``OptunaSearch`` plus what optuna-dashboard shows of a trial.

On top of Ray's searcher (which asks Optuna for a trial's values and tells it the result):

* the objectives carry their names on the Optuna study (``best_val_nmse``, ...: what Optuna is
  told, the metric at the trial's best epoch), instead of "Objective 0";
* each Optuna trial carries user attributes ``ray_trial_id``, ``folder`` (the trial's folder,
  relative to the study folder) and, once it ends, ``status`` (``TERMINATED``, ``early_stopped``,
  ``nan``, ``ERROR``: the statuses of ``trials.parquet``; while it runs, Optuna's own state says
  RUNNING);
* every epoch's value of the first objective (``val_nmse``, not the best-so-far value) is stored as
  the trial's intermediate value at step = epoch: optuna-dashboard 0.21 draws these as learning
  curves for a single objective and lists them on each trial's page for several.

All of it runs in the driver, where Ray keeps the Optuna trial of each Ray trial, with one SQLite
write per result (the intermediate value) and three per trial besides Optuna's own. The searcher's
saved state (:meth:`StudySearch.save`, after every Tune state save) holds only what the database
does not, so that it stays small however many trials the study has.
"""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Any

import optuna
from optuna.storages._cached_storage import _CachedStorage
from ray.tune.search.optuna import OptunaSearch

from study.layout import trial_folder


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``Study.stop()`` after the last grid point.

    ``stop()`` ends ``study.optimize()``; Ray asks and tells instead (and runs as many trials as the
    grid has points), so the call only raised "`Study.stop` is supposed to be invoked inside an
    objective function or a callback" inside ``tell()``, which Ray logged as a warning."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        pass


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that names the objectives and records each trial's link to its Ray trial,
    its status and per-epoch values (see the module docstring).

    Args:
        study_dir: the study folder (where trial folders are found by trial id).
        curve_metric: the per-epoch result key stored as the intermediate value.
        **kwargs: ``OptunaSearch``'s (``metric``, ``mode``, ``sampler``, ``storage``, ``study_name``).
    """

    def __init__(self, *, study_dir: str, curve_metric: str, **kwargs: Any) -> None:
        self._study_dir = str(study_dir)
        self._curve_metric = curve_metric
        self._linked: set[str] = set()  # Ray trials whose folder is recorded
        super().__init__(**kwargs)

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        with warnings.catch_warnings():  # an ExperimentalWarning since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))
        self._ot_study.set_user_attr("intermediate_values", f"{self._curve_metric} at each epoch")

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record the trial's folder (first result) and its epoch's value; Ray's own reporting
        (the searched best-so-far value, single objective only) is replaced by this."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            try:
                self._record(trial_id, ot_trial, result, None)
            except optuna.exceptions.UpdateFinishedTrialError:
                self._completed_trials.add(trial_id)  # told before a kill that Tune's saved state missed

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tune hands a trial's last result here, not to :meth:`on_trial_result`, when the trial
        stops on it (a scheduler's decision): it is recorded, with the final status, before Optuna
        is told (a finished Optuna trial takes no more attributes)."""
        if trial_id in self._completed_trials:
            return  # told already (Ray's own method would only warn)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ended = (result or {}).get("epoch_status")
            status = "ERROR" if error else ended if ended in ("early_stopped", "nan") else "TERMINATED"
            try:
                self._record(trial_id, ot_trial, result or {}, status)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Optuna was told before a kill that Tune's saved state (a few seconds behind, see
                # study.tune_state) missed; Tune ran the trial's last epochs again, to the same values
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)

    def _record(self, trial_id: str, ot_trial: Any, result: dict[str, Any], status: str | None) -> None:
        """Store the trial's folder (once), its final ``status`` (None while it runs: Optuna's own
        state says RUNNING) and its epoch's value; raises Optuna's ``UpdateFinishedTrialError`` when
        the Optuna trial has finished already."""
        if trial_id not in self._linked:
            folder = trial_folder(self._study_dir, trial_id)
            if folder is not None:
                ot_trial.set_user_attr("folder", folder.name)
                self._linked.add(trial_id)
        if status is not None:
            ot_trial.set_user_attr("status", status)
        value, epoch = result.get(self._curve_metric), result.get("epoch")
        if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(epoch, int):
            # the storage, not Trial.report(): that refuses several objectives and warns when a
            # resumed trial reports an epoch again
            self._ot_study._storage.set_trial_intermediate_value(ot_trial._trial_id, epoch, float(value))

    def save(self, checkpoint_path: str) -> None:
        """Ray's ``OptunaSearch.save`` (this searcher's attributes, pickled), without what the
        Optuna database already holds: the storage's in-memory copy of every Optuna trial, and the
        Optuna trials of finished Ray trials (never used again: finished ids are in
        ``_completed_trials``). Tune saves the searcher with each of its state saves; Ray's
        pickle grew with every trial. The restored searcher reads the trials from the database on
        first use."""
        state = self.__dict__.copy()
        state["_ot_trials"] = {k: t for k, t in self._ot_trials.items() if k not in self._completed_trials}
        with open(checkpoint_path, "wb") as f:
            _WithoutStorageCache(f).dump(state)


class _WithoutStorageCache(pickle.Pickler):
    """Pickles Optuna's caching storage as a fresh one around the same database."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is _CachedStorage:
            return _CachedStorage, (obj._backend,)
        return NotImplemented
