"""Which tracking store and experiment, and everything read from it: runs, their settings,
searches by tag and parent, and artifacts (tables, weights). Where new runs go is chosen once per
process (use_experiment), before any work.

Tracking URI: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the working
directory). Inside `mlflow run`, MLFLOW_RUN_ID is set and the first top-level run resumes it."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import mlflow.pytorch
import pandas as pd
import requests
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from prunecxr import PrunecxrError

log = logging.getLogger(__name__)
STAGE_TAG = "prunecxr.stage"


STAGES = ("study", "train", "sweep", "prune", "analyze", "reader_study")


SERVER_CHECK_SECONDS = 10  # a tracking server that does not answer /health within this is down


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default": where `mlflow run` puts runs unless told


_experiment_id: str | None = None  # set by use_experiment; where new runs are created


_lookup_ids: list[str] = []  # where default sources (newest train run, sweep) are looked for


def use_experiment(name: str) -> None:
    """Log into experiment `name` (created if missing), unless `mlflow run` already chose the
    experiment of the run it created. `mlflow run` without --experiment-name puts that run in
    MLflow's Default experiment; sources are then looked for there and in `name` too, so that
    `mlflow run . -e prune` right after `prunecxr study` prunes the study's model."""
    global _experiment_id, _lookup_ids
    _check_store()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        _experiment_id = mlflow.set_experiment(name).experiment_id
        _lookup_ids = [_experiment_id]
        return
    _experiment_id = get_run(run_id).info.experiment_id
    _lookup_ids = [_experiment_id]
    named = mlflow.get_experiment_by_name(name)
    if _experiment_id == DEFAULT_EXPERIMENT_ID and named and named.experiment_id != _experiment_id:
        _lookup_ids.append(named.experiment_id)


def use_run_experiment(run_id: str, typed_name: str | None = None) -> None:
    """Continue `run_id` in the experiment it belongs to (a run cannot move); a typed
    experiment name that is another experiment is an error."""
    global _experiment_id, _lookup_ids
    _check_store()
    if os.environ.get("MLFLOW_RUN_ID"):
        raise PrunecxrError(
            f"--resume continues run {run_id} by itself, not inside `mlflow run`: "
            f"use prunecxr train --resume {run_id}"
        )
    run = get_run(run_id)
    own = mlflow.get_experiment(run.info.experiment_id).name
    if typed_name is not None and typed_name != own:
        raise PrunecxrError(
            f"run {run_id} belongs to experiment {own!r}, not {typed_name!r}: a run stays in "
            f"its experiment; drop --experiment to continue it there"
        )
    _experiment_id = mlflow.set_experiment(experiment_id=run.info.experiment_id).experiment_id
    _lookup_ids = [_experiment_id]


def _check_store() -> None:
    """Before any work: a clear error instead of SQLite's "unable to open database file" (e.g.
    a root-owned folder mounted into the container as the store's folder), or instead of
    minutes of MLflow's retries against a tracking server that is not there."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=SERVER_CHECK_SECONDS)
        except requests.RequestException as error:
            raise PrunecxrError(
                f"the tracking server {uri} does not answer ({type(error).__name__}); start it "
                f"or point MLFLOW_TRACKING_URI at a running one"
            ) from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not os.access(folder, os.W_OK):
            raise PrunecxrError(f"cannot write the MLflow store {uri}: {folder} is not writable")


def current_experiment_id() -> str:
    if _experiment_id is None:
        raise RuntimeError("tracking.use_experiment() must be called first")
    return _experiment_id


def absolute_tracking_uri() -> str:
    """The tracking URI with a relative store path made absolute (for processes started
    elsewhere: Ray workers, another working directory)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def is_current(uri: str, experiment_id: str) -> bool:
    return _experiment_id == experiment_id and absolute_tracking_uri() == uri


def use_tracking(uri: str, experiment_id: str) -> None:
    """Log to `uri`, experiment `experiment_id` (a worker process joining the driver's runs)."""
    global _experiment_id, _lookup_ids
    mlflow.set_tracking_uri(uri)
    _experiment_id = mlflow.set_experiment(experiment_id=experiment_id).experiment_id
    _lookup_ids = [_experiment_id]


def server_answers(uri: str) -> bool:
    """A local store always does; a tracking server when its /health answers within seconds."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=3).ok
    except requests.RequestException:
        return False


RESOLVED_SUFFIX = "_resolved"


def run_settings(run) -> dict[str, str]:
    """A run's params with every `<name>_resolved` value in place of `<name>`'s."""
    params = dict(run.data.params)
    for key in [k for k in params if k.endswith(RESOLVED_SUFFIX)]:
        params[key.removesuffix(RESOLVED_SUFFIX)] = params[key]
    return params


WEIGHTS_ARTIFACT = "model_weights.pt"  # the logged model's state dict, beside the pickle model


def load_weights(run_id: str) -> dict | None:
    """The state dict of the model `run_id` logged, read without unpickling code
    (torch.load weights_only); None for a run logged before models came with it."""
    if not has_artifact(run_id, WEIGHTS_ARTIFACT):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, WEIGHTS_ARTIFACT, Path(tmp))
        return torch.load(path, map_location="cpu", weights_only=True)


def load_pickled_model(model_uri: str) -> nn.Module:
    """The whole pickled MLflow model: unpickling can run code, so only on the user's opt-in."""
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as error:
        raise PrunecxrError(f"cannot load model {model_uri!r}: {error}") from None


def download_artifact(run_id: str, artifact_path: str, dst_dir: Path) -> Path:
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst_dir)
        )
    except Exception as error:
        raise PrunecxrError(
            f"run {run_id}: cannot fetch artifact {artifact_path!r}: {error}"
        ) from None
    return Path(local)


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except Exception:
        raise PrunecxrError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}"
        ) from None


def where_to_browse(run_id: str) -> str:
    """The run's page on a tracking server, or the `mlflow ui` command for a local store. The
    link opens MLflow 3's "Model training" view (its UI otherwise starts in the GenAI view)."""
    uri = mlflow.get_tracking_uri()
    experiment_id = get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000/{page})"


def has_artifact(run_id: str, artifact_path: str) -> bool:
    folder = str(Path(artifact_path).parent)
    listed = MlflowClient().list_artifacts(run_id, None if folder == "." else folder)
    return any(item.path == artifact_path for item in listed)


def run_finished(run_id: str) -> bool:
    return get_run(run_id).info.status == "FINISHED"


def stage_of(run) -> str | None:
    return run.data.tags.get(STAGE_TAG)


def model_run_id(model_uri: str) -> str | None:
    """The run that logged the model at `model_uri` (runs:/ or models:/)."""
    try:
        return mlflow.models.get_model_info(model_uri).run_id
    except Exception as error:
        raise PrunecxrError(f"cannot find model {model_uri!r}: {error}") from None


def newest_finished_run_id(stage: str, *, how_to_make_one: str) -> str:
    """The newest finished `stage` run where sources are looked for (see use_experiment); a
    clear error when there is none. Says on stderr which run it took."""
    query = f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'"
    runs = _search(query, _lookup_ids)
    names = " or ".join(repr(mlflow.get_experiment(i).name) for i in _lookup_ids)
    if not runs:
        raise PrunecxrError(f"no finished {stage} run in experiment {names}; {how_to_make_one}")
    newest = runs[0]
    where = mlflow.get_experiment(newest.info.experiment_id).name
    log.info(
        "using the newest finished %s run %s (%s, experiment %r)",
        stage,
        newest.info.run_id,
        newest.info.run_name,
        where,
    )
    return newest.info.run_id


def runs_with_tag(
    stage: str, tag: str, value: str, parent_run_id: str | None = None
) -> list[tuple[str, str]]:
    """(run id, status) of the `stage` runs whose `tag` is `value`, newest first: in the current
    experiment, or directly under `parent_run_id` (in the parent's experiment)."""
    query = f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{tag}` = '{value}'"
    if parent_run_id is None:
        runs = _search(query)
    else:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
        runs = _search(query, [get_run(parent_run_id).info.experiment_id])
    return [(run.info.run_id, run.info.status) for run in runs]


def _search(query: str, experiment_ids: list[str] | None = None) -> list:
    """All runs matching `query` in the current experiment (or `experiment_ids`), newest first
    (every page)."""
    client, runs, token = MlflowClient(), [], None
    while True:
        page = client.search_runs(
            experiment_ids or [current_experiment_id()],
            query,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _child_runs(parent_run_id: str, stage: str, *, finished: bool = False) -> list:
    """The `stage` runs directly under `parent_run_id`, newest first. Searched in the parent's
    own experiment, which under `mlflow run` may not be the one new runs go to."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    if finished:
        query += " and attributes.status = 'FINISHED'"
    return _search(query, [get_run(parent_run_id).info.experiment_id])


def children(parent_run_id: str, stage: str) -> list[tuple[str, str, dict[str, str]]]:
    """(run id, status, settings) of every `stage` run under `parent_run_id`, newest first."""
    return [
        (run.info.run_id, run.info.status, run_settings(run))
        for run in _child_runs(parent_run_id, stage)
    ]


def finished_children(parent_run_id: str, stage: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, settings) of the finished `stage` runs directly under `parent_run_id`."""
    return [
        (run.info.run_id, run_settings(run))
        for run in _child_runs(parent_run_id, stage, finished=True)
    ]


def finished_child_ids_by_tag(parent_run_id: str, stage: str, tag: str) -> dict[str, str]:
    """{value of `tag`: id of the newest finished `stage` run under `parent_run_id` with it}."""
    runs = reversed(_child_runs(parent_run_id, stage, finished=True))  # the newest wins
    return {run.data.tags[tag]: run.info.run_id for run in runs if tag in run.data.tags}


def end_unfinished_children(parent_run_id: str, still_alive: Callable[[object], bool]) -> None:
    """Mark runs a killed process left RUNNING under `parent_run_id` as KILLED (the UI would
    show them running forever); runs for which still_alive(run) is true are left alone."""
    client = MlflowClient()
    for stage in STAGES:
        for run in _child_runs(parent_run_id, stage):
            if run.info.status == "RUNNING" and not still_alive(run):
                client.set_terminated(run.info.run_id, "KILLED")


def read_table(run_id: str, artifact_file: str) -> pd.DataFrame:
    """A CSV or Parquet artifact of a run as a DataFrame."""
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, artifact_file, Path(tmp))
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
