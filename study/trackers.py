"""Ray Tune's MLflow and W&B logger callbacks, fitted to a study (see :mod:`study.tracking`).

Both subclass Ray's callbacks (``ray.air.integrations.mlflow.MLflowLoggerCallback``,
``ray.air.integrations.wandb.WandbLoggerCallback``) and keep their set-up: MLflow's tracking URI and
experiment, W&B's API key check and its one logging actor per trial. What they change:

* a run per *trial*, not per driver: Tune restores its callbacks on a resume with no memory of the
  runs they opened (Ray keys them by the ``Trial`` object), so Ray's callbacks open a second run for
  every trial that resumes. Here the MLflow run is found again by its ``trial_id`` tag
  (``search_runs``), and the W&B run's id *is* the trial's id, opened with ``resume="allow"``;
* what is logged: the trial's hyperparameters as TensorBoard's HParams has them (not Tune's raw
  config), TensorBoard's scalar tags at step = epoch (:func:`study.tracking.tracked_metrics`, not
  Tune's bookkeeping keys), and the trial's status;
* MLflow writes each result in one ``log_batch`` (Ray logs metric by metric, one store
  transaction each, ~100 per epoch here).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from study.home import home, moved
from study.layout import MLFLOW_ARTIFACTS, MLFLOW_FILE, trial_dirname
from study.tracking import RUNNING, Tracker, resolved, tracked_metrics, trial_status, wandb_mode
from study.trainable import StudyContext, hparams_of, trial_config


UPLOAD_TIMEOUT_S = 300  # the most a study's end waits for W&B runs to finish (and, online, upload)


def tracking_callbacks(trackers: list[Tracker], name: str, study_dir: str, ctx: StudyContext) -> list[Any]:
    """The Tune callbacks of ``--track``: experiment / project = the study's ``name``. MLflow's default
    store keeps the experiment's artifact folder beside it (else MLflow puts it in the working
    directory; nothing is written there unless a run logs artifacts)."""
    out: list[Any] = []
    default_uri = resolved(Tracker("mlflow"), Path(study_dir)).uri
    for t in trackers:
        if t.kind == "mlflow":
            artifacts = str(Path(study_dir) / MLFLOW_ARTIFACTS) if t.uri == default_uri else None
            out.append(StudyMLflowCallback(t.uri, name, ctx, artifact_location=artifacts))
        else:
            out.append(StudyWandbCallback(name, study_dir, ctx))
    return out


def trial_hparams(ctx: StudyContext, config: dict[str, Any]) -> dict[str, Any]:
    """The trial's hyperparameters as its TensorBoard HParams (``epsilon_ref`` at 320x320)."""
    sampled = dict(config)
    return hparams_of(trial_config(ctx, sampled), sampled, ctx.epsilon_keys)


def epoch_step(result: dict[str, Any]) -> int:
    """The step of a result: the trainer's epoch, as in TensorBoard (not Tune's ``training_iteration``)."""
    return int(result.get("epoch") or result["training_iteration"])


class StudyMLflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial, reopened on a resume; tags ``trial_id``, ``trial_name``, ``status``."""

    def __init__(
        self, tracking_uri: str, experiment_name: str, ctx: StudyContext, artifact_location: str | None = None
    ) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name)
        self.ctx, self.artifact_location = ctx, artifact_location
        self._client = None
        self._epoch_status: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_epoch_status": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restored in another folder (:mod:`study.home`): the default store is that folder's."""
        self.__dict__.update(state)
        self.tracking_uri = moved(self.tracking_uri, MLFLOW_FILE)
        if self.artifact_location:
            self.artifact_location = moved(self.artifact_location, MLFLOW_ARTIFACTS)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def setup(self, *args, **kwargs) -> None:
        logging.getLogger("mlflow.store.db.utils").setLevel(
            logging.WARNING
        )  # "Creating initial MLflow database tables"
        if self.artifact_location and self.client.get_experiment_by_name(self.experiment_name) is None:
            self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        super().setup(*args, **kwargs)  # finds the experiment by its name, or creates it

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            self._trial_runs[trial] = self._open_run(trial)
        from mlflow.entities import Param

        params = trial_hparams(self.ctx, trial.config)
        self.client.log_batch(self._trial_runs[trial], params=[Param(k, str(v)) for k, v in params.items()])

    def _open_run(self, trial) -> str:
        """The trial's run: the one tagged with its id (a resumed study), else a new one."""
        experiment = self.mlflow_util.experiment_id
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.trial_id = '{trial.trial_id}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, "trial_id": trial.trial_id, "trial_name": str(trial)}
            run_id = self.client.create_run(experiment, run_name=trial_dirname(trial), tags=tags).info.run_id
        self.client.set_tag(run_id, "status", RUNNING)
        return run_id

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        self._epoch_status[trial.trial_id] = result.get("epoch_status")
        now, step = int(time.time() * 1000), epoch_step(result)
        metrics = tracked_metrics(result, self.ctx.objective_metrics)
        self.client.log_batch(self._trial_runs[trial], metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs[trial]
        self.client.set_tag(run_id, "status", trial_status(failed, self._epoch_status.get(trial.trial_id)))
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


class TrialWandbActor(_WandbLoggingActor):
    """Ray's W&B logging actor (one process per trial), logging :func:`tracked_metrics` at step =
    epoch and the trial's status at the end (a tag and ``summary.status``). It stays in its working
    directory: the run's ``dir`` says where its files go."""

    def __init__(self, logdir: str, queue, exclude: list[str], to_config: list[str], *args, **kwargs) -> None:
        import wandb

        self._wandb, self.queue, self.args, self.kwargs = wandb, queue, args, kwargs
        self._trial_name, self._logdir = kwargs.get("name", "unknown"), logdir

    def run(self) -> None:
        os.environ["WANDB_START_METHOD"] = "thread"  # as Ray's actor: a process of its own already
        os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner for every trial, on the study's console
        run = self._wandb.init(*self.args, **self.kwargs)
        while True:
            kind, content = self.queue.get()
            if kind == _QueueItem.END:
                if content:  # None: the driver is going away, the trial not finished
                    run.summary["status"] = content
                    run.tags = (content,)
                break
            if kind == _QueueItem.RESULT:
                run.log(content["metrics"], step=content["step"])
        run.finish()
        # and wait for W&B's service process to have written everything before run() returns and Ray
        # kills this actor: once (a loaded machine, a trial that had ended before its run started) the
        # offline run file held only its header
        self._wandb.teardown()


class StudyWandbCallback(WandbLoggerCallback):
    """One W&B run per trial, id = the trial's id; files in ``<study>/wandb/``; the mode from
    ``WANDB_MODE`` when the driver starts (:func:`study.tracking.wandb_mode`)."""

    _logger_actor_cls = TrialWandbActor

    def __init__(self, project: str, study_dir: str, ctx: StudyContext) -> None:
        super().__init__(project=project, upload_timeout=UPLOAD_TIMEOUT_S)
        self.study_dir, self.ctx = study_dir, ctx
        self._epoch_status: dict[str, Any] = {}

    def setup(self, *args, **kwargs) -> None:
        self.study_dir = str(home(self.study_dir))  # restored in another folder: that folder's (study.home)
        self.kwargs = {"mode": wandb_mode(), "dir": self.study_dir}  # this driver's, not the first one's
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        self._start_logging_actor(
            trial,
            [],
            id=trial.trial_id,
            name=trial_dirname(trial),
            resume="allow",
            group=self.group or trial.experiment_dir_name,
            project=self.project,
            config=trial_hparams(self.ctx, trial.config),
            tags=[RUNNING],
            **self.kwargs,
        )

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        if trial not in self._trial_logging_actors:
            self.log_trial_start(trial)
        self._epoch_status[trial.trial_id] = result.get("epoch_status")
        item = {"step": epoch_step(result), "metrics": tracked_metrics(result, self.ctx.objective_metrics)}
        self._trial_queues[trial].put((_QueueItem.RESULT, item))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        status = trial_status(failed, self._epoch_status.get(trial.trial_id))
        self._trial_queues[trial].put((_QueueItem.END, status))
        self._cleanup_logging_actors()

    def on_experiment_end(self, trials, **info) -> None:
        """Close the runs of trials Tune did not end (an interrupted study: their runs stay open,
        without a final status), then wait for every run to finish, as Ray does, but for at most
        ``UPLOAD_TIMEOUT_S`` (Ray's 30 minutes held a driver whose logging actor had lost its queue)."""
        for queue in list(self._trial_queues.values()):
            try:
                queue.put((_QueueItem.END, None), timeout=5)
            except Exception:  # noqa: BLE001 - a lost queue: its actor is killed after the wait below
                pass
        super().on_experiment_end(trials, **info)
