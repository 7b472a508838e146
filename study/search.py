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

Optuna is told under the same rule as the tables (:class:`study.results.ResultsCallback`): what a
trial reports (its epochs' values, its end and the values Optuna ranks it by) waits in the searcher
until a Tune state save that covers it has been copied into the study folder (:func:`commit`, called
after each copy), and is then written to the database. The waiting part is saved with the searcher,
so a resume from that save writes it (:meth:`StudySearch.restore`); a resume from an earlier save
finds the Optuna trial still running, and the re-run of its lost epochs is what Optuna is told. So
after a kill Optuna never keeps a value of a timeline the tables discarded, even where re-runs are not
bit-exact (a GPU with ``cudnn.benchmark``, a scheduler deciding in arrival order).

A trial a scheduler stops (ASHA) is told COMPLETE with the values of its last epoch, as Ray's
searcher tells it, not PRUNED: Optuna 5.1's TPE ranks pruned trials by their last intermediate value
through ``study.direction``, which raises in a multi-objective study (measured), and every trial here
has intermediate values. Its values are those of fewer epochs, so they rank it worse than it might have
ended, which is what stopping it meant.

All of it runs in the driver, where Ray keeps the Optuna trial of each Ray trial, with one SQLite
write per result (the intermediate value) and three per trial besides Optuna's own. The searcher's
saved state (:meth:`StudySearch.save`, after every Tune state save) holds only what the database
does not, so that it stays small however many trials the study has.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
import weakref
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from ray.tune.search.optuna import OptunaSearch

from study.home import home, moved
from study.layout import OPTUNA_FILE, REFERENCE_KEY, trial_folder

logger = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[StudySearch] = weakref.WeakSet()  # the driver's searchers, for commit()


def commit(study_dir: str | Path) -> None:
    """Tell Optuna what the searchers of ``study_dir`` hold back: called once Tune's saved state,
    which holds it too, has been copied into the study folder (:class:`study.results.ResultsCallback`)."""
    for search in list(_LIVE):
        if Path(search._study_dir) == Path(study_dir):
            search.commit()


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

    def __init__(
        self,
        *,
        study_dir: str,
        curve_metric: str,
        reference: dict[str, Any] | None = None,
        reference_first: bool = False,
        **kwargs: Any,
    ) -> None:
        self._study_dir = str(study_dir)
        self._curve_metric = curve_metric
        self._reference = dict(reference) if reference else None  # the space's first trial (study.reference)
        # fine-tuning spaces: no other trial until the reference has ended, so that no trial waiting for
        # its best.pt holds the place the reference (or its retry) needs
        self._reference_first = reference_first
        self._reference_id: str | None = None
        self._reference_ended = False
        self._linked: set[str] = set()  # Ray trials whose folder is recorded
        # what waits for a covering state save, in order: ("epoch", id, epoch, value) | ("end", id, result, error)
        self._held: list[tuple] = []
        super().__init__(**kwargs)
        _LIVE.add(self)

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        with warnings.catch_warnings():  # an ExperimentalWarning since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))
        self._ot_study.set_user_attr("intermediate_values", f"{self._curve_metric} at each epoch")

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._reference is not None and self._reference_id is None and trial_id not in self._ot_trials:
            # the space's reference first: an Optuna trial with none of the searched values (outside
            # their ranges), told its objectives like any other
            self._reference_id = trial_id
            self._ot_trials[trial_id] = self._ot_study.ask()
            self._ot_trials[trial_id].set_user_attr("reference", True)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            return {**self._reference, REFERENCE_KEY: True}
        if self._reference_first and self._reference_id is not None and not self._reference_ended:
            return None  # Tune asks again later
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record the trial's folder (first result); hold its epoch's value for :meth:`commit`. Ray's
        own reporting (the searched best-so-far value, single objective only) is replaced by this."""
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._hold_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tune hands a trial's last result here, not to :meth:`on_trial_result`, when the trial stops
        on it (a scheduler's decision): its value, status and Optuna's verdict are held for
        :meth:`commit`, which records them before Optuna is told (a finished Optuna trial takes no more
        attributes)."""
        if trial_id in self._completed_trials or any(h[0] == "end" and h[1] == trial_id for h in self._held):
            return  # told, or to be told, already (Ray's own method would only warn)
        if trial_id == self._reference_id:
            self._reference_ended = True  # the other trials may start (reference_first)
        if trial_id in self._ot_trials:
            self._hold_epoch(trial_id, result or {})
        self._held.append(("end", trial_id, dict(result or {}), error))

    def _hold_epoch(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record the trial's folder (once) and hold its epoch's value of the curve metric for :meth:`commit`."""
        self._link(trial_id, self._ot_trials[trial_id])
        value, epoch = result.get(self._curve_metric), result.get("epoch")
        if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(epoch, int):
            self._held.append(("epoch", trial_id, epoch, float(value)))

    def commit(self) -> None:
        """Write what is held to Optuna's database, in the order it came: epoch values, then each
        ended trial's status and Optuna's ``tell``. One already finished in the database (told before
        a kill by a session whose saved state this resume started from) is left as it is."""
        held, self._held = self._held, []
        storage = self._ot_study._storage
        for item in held:
            if item[1] in self._completed_trials or item[1] not in self._ot_trials:
                continue
            ot_trial = self._ot_trials[item[1]]
            try:
                if item[0] == "epoch":
                    storage.set_trial_intermediate_value(ot_trial._trial_id, item[2], item[3])
                    continue
                _, trial_id, result, error = item
                ended = result.get("epoch_status")
                status = "ERROR" if error else ended if ended in ("early_stopped", "nan") else "TERMINATED"
                ot_trial.set_user_attr("status", status)
            except optuna.exceptions.UpdateFinishedTrialError:
                logger.warning("Optuna trial of %s had finished already; its values are kept", item[1])
                self._completed_trials.add(item[1])
                continue
            super().on_trial_complete(trial_id, result=result, error=error)

    def _link(self, trial_id: str, ot_trial: Any) -> None:
        """Store the trial's folder as a user attribute, once (it never changes)."""
        if trial_id not in self._linked:
            folder = trial_folder(self._study_dir, trial_id)
            if folder is not None:
                try:
                    ot_trial.set_user_attr("folder", folder.name)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # finished before a kill (see commit): it has its folder
                self._linked.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's restore; then what the restored save held back is written (that save covers it)."""
        super().restore(checkpoint_path)
        self._study_dir = str(home(self._study_dir))  # resumed in another folder: that folder's study
        restored = (("_held", []), ("_reference", None), ("_reference_first", False), ("_reference_id", None))
        for key, value in (*restored, ("_reference_ended", False)):
            self.__dict__.setdefault(key, value)  # a searcher saved before these existed
        _LIVE.add(self)
        self.commit()

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


class StudyStorage(RDBStorage):
    """A study's Optuna database (``sqlite:///<study>/optuna.db``), pickled by its URL. Tune pickles the
    searcher with the tuner and with every state save; unpickled by a driver that runs the study in
    another folder (a working copy of a study on object storage, pulled elsewhere), it opens that
    folder's ``optuna.db`` (:mod:`study.home`), not the path it was saved with."""

    def __reduce__(self) -> tuple:
        return _storage_at, (self.url,)


def _storage_at(url: str) -> StudyStorage:
    return StudyStorage(moved(url, OPTUNA_FILE))
