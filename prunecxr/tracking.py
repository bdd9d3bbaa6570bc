"""The only module that talks to MLflow: run structure, names of params/metrics/artifacts, models.

Tracking URI: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the working
directory). Inside `mlflow run`, MLFLOW_RUN_ID is set and the first top-level run resumes it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import mlflow.data
import mlflow.pytorch
import numpy as np
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from prunecxr import PrunecxrError
from prunecxr.data.schemas import get_schema
from prunecxr.outbox import Outbox

log = logging.getLogger(__name__)
STAGE_TAG = "prunecxr.stage"
CONTINUED_TAG = "prunecxr.continued_run"  # on a run `mlflow run` made for continuing another
STAGES = ("study", "train", "sweep", "prune", "analyze")
ERROR_TAG = "prunecxr.error"  # why a run failed, on runs a failed job could not log itself


def quiet_logs() -> None:
    """Keep MLflow's store-migration INFO lines, its pickle warning (pickle is chosen on
    purpose: it keeps structurally pruned shapes) and a progress bar per downloaded artifact
    out of the CLI's output (our own bars show the work)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").addFilter(
        lambda record: "Pickle or CloudPickle" not in record.getMessage()
    )


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


def log_failed_run(
    stage: str, parent_run_id: str, run_name: str, tags: dict[str, str], params: dict, error: str
) -> str:
    """A FAILED `stage` run under `parent_run_id` with its params and why it failed (a job that
    failed every retry before it could log a run of its own)."""
    client = MlflowClient()
    experiment_id = get_run(parent_run_id).info.experiment_id
    all_tags = {
        **tags,
        STAGE_TAG: stage,
        ERROR_TAG: error[:5000],
        "mlflow.parentRunId": parent_run_id,
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    params = [Param(key, _param_text(value)) for key, value in params.items()]
    client.log_batch(run.info.run_id, params=params)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


@contextlib.contextmanager
def start_run(
    stage: str,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    outbox_root: Path | None = None,
) -> Iterator[str]:
    """A run tagged with its stage; nested under `parent_run_id`, else under the active run if
    there is one (active runs are per thread). `run_id` continues an existing run (resume).
    `system_metrics`: MLflow samples CPU, memory and GPU use into the run while it is open (so
    the UI shows whether the GPU was starved). `outbox_root`: what the run logs while the
    tracking server is away is kept in `outbox_root/<run id>` (see _kept_while_away). Yields
    the run id."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    nested = parent_run_id is not None or mlflow.active_run() is not None
    created_by_mlflow_run = os.environ.get("MLFLOW_RUN_ID")
    if run_id and not nested and created_by_mlflow_run and created_by_mlflow_run != run_id:
        # `mlflow run` made a run for this command, but the work continues in an older one.
        set_run_tags(created_by_mlflow_run, {CONTINUED_TAG: run_id})
    with mlflow.start_run(
        run_id=run_id,
        run_name=run_name,
        nested=nested,
        parent_run_id=parent_run_id,
        log_system_metrics=system_metrics,
    ) as run:
        mlflow.set_tag(STAGE_TAG, stage)
        if outbox_root is None:
            yield run.info.run_id
        else:
            with _kept_while_away(run.info.run_id, Path(outbox_root) / run.info.run_id):
                yield run.info.run_id


# A tracking server that goes away mid-run (train runs, see outbox.py): at the run's end, how
# long to wait for it before leaving what was kept for `prunecxr upload`.
OUTAGE_WAIT_SECONDS = float(os.environ.get("PRUNECXR_OUTAGE_WAIT_SECONDS", "300"))
_outbox: Outbox | None = None  # set while a run keeps what the server cannot take


def server_answers(uri: str) -> bool:
    """A local store always does; a tracking server when its /health answers within seconds."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=3).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def _kept_while_away(run_id: str, folder: Path) -> Iterator[None]:
    """Metrics, files and the model the run logs while the server is away are kept in `folder`
    and sent when it answers again; the run is ended here (not by MLflow's context). If the
    server is still away when the run ends (after waiting OUTAGE_WAIT_SECONDS), the run's end is
    kept too, and one error line names the command that sends it all later."""
    global _outbox
    uri = mlflow.get_tracking_uri()
    _outbox = box = Outbox(folder, run_id, uri, _perform, server_answers)
    status, failed = "FINISHED", False
    # A call the server drops midway fails in seconds and is kept, instead of MLflow's retries
    # holding the training for minutes (7 retries, backoff up to 2 minutes).
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"):
        try:
            yield
        except BaseException as error:
            status, failed = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", True
            raise
        finally:
            _outbox = None
            if box.records:
                log.warning("waiting up to %.0f s for the server %s", OUTAGE_WAIT_SECONDS, uri)
            sent = box.wait(OUTAGE_WAIT_SECONDS)
            if not (_end_run(status, uri) and sent):  # ended in this process either way
                box.keep({"kind": "end", "status": status})
                message = (
                    f"the tracking server {uri} went away during run {run_id} and has not come "
                    f"back: what the run logged since is kept in {folder}; when the server is "
                    f"back, send it with: prunecxr upload {folder}"
                )
                if not failed:
                    raise PrunecxrError(message)
                log.error(message)


def _end_run(status: str, uri: str) -> bool:
    """End MLflow's active run (in this process always: MLflow takes it off its stack before
    asking the server). -> whether the server recorded it; False only when it is away."""
    try:
        mlflow.end_run(status)
        return True
    except Exception:
        if server_answers(uri):
            raise
        return False


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set for a while (MLflow reads its settings at each request); a
    value the user set is kept."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if before[key] is None})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)


def _send(direct: Callable[[], None], record: dict) -> bool:
    """`direct()`, or, while a run keeps what the server cannot take, through the outbox."""
    if _outbox is None:
        direct()
        return True
    return _outbox.call(direct, record)


def _perform(run_id: str, record: dict) -> None:
    """Make a kept logging call (outbox.py) on the server."""
    client, files = MlflowClient(), record["files"]
    if record["kind"] == "metrics":
        metrics = [
            Metric(key, value, record["timestamp"], record["step"])
            for key, value in record["metrics"].items()
        ]
        client.log_batch(run_id, metrics=metrics)
    elif record["kind"] == "artifact":
        client.log_artifact(run_id, files["file"], record["artifact_dir"])
    elif record["kind"] == "model":
        _log_kept_model(run_id, files["weights"], files["example"])
    elif record["kind"] == "end":
        client.set_terminated(run_id, record["status"])
    else:
        raise PrunecxrError(f"unknown kept record {record['kind']!r}")


def upload_kept(folder: Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Send what a run left in `folder` while its tracking server was away, to the server it
    was logging to (or `tracking_uri`, where the server has moved). -> (run id, calls sent)."""
    if not (Path(folder) / "meta.json").is_file():
        raise PrunecxrError(f"{folder} holds nothing a run kept (no meta.json)")
    box = Outbox.open(folder, _perform, server_answers)
    box.tracking_uri = tracking_uri or box.tracking_uri
    mlflow.set_tracking_uri(box.tracking_uri)
    count = len(box.records)
    if not box.flush(now=True):
        raise PrunecxrError(
            f"the tracking server {box.tracking_uri} does not answer; {folder} is kept: run this "
            f"again when it is back"
        )
    return box.run_id, count


RESOLVED_SUFFIX = "_resolved"


def log_params(params: dict) -> None:
    """Log settings as given. `mlflow run` logs its -P values (and declared defaults) before our
    code starts, and MLflow refuses to change a param: a name already logged with an equivalent
    value ("1e-3" vs "0.001") is skipped; one logged with another value keeps it, and ours (what
    prunecxr resolved and used, e.g. a relative path made absolute) goes to `<name>_resolved`."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = _param_text(value)
        if key not in logged:
            fresh[key] = text
        elif not _same_value(logged[key], text):
            fresh[key + RESOLVED_SUFFIX] = text
    mlflow.log_params(fresh)


def log_resolved(values: dict) -> None:
    """Log what prunecxr resolved from "auto" settings as `<name>_resolved` params."""
    log_params({key + RESOLVED_SUFFIX: value for key, value in values.items()})


def run_settings(run) -> dict[str, str]:
    """A run's params with every `<name>_resolved` value in place of `<name>`'s."""
    params = dict(run.data.params)
    for key in [k for k in params if k.endswith(RESOLVED_SUFFIX)]:
        params[key.removesuffix(RESOLVED_SUFFIX)] = params[key]
    return params


def _param_text(value) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _same_value(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.lower() == b.lower() if a.lower() in ("true", "false") else a == b


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    metrics = {key: float(value) for key, value in metrics.items()}
    record = dict(kind="metrics", metrics=metrics, step=step or 0, timestamp=int(time.time() * 1e3))
    _send(lambda: mlflow.log_metrics(metrics, step=step), record)


def log_label_file(label_dir: str | Path, dataset: str, split: str) -> None:
    """Record a split's label file as the run's input (the UI's Dataset column): named
    `<dataset>-<split>`, its source the file, its digest the file's SHA-256 (first 16 hex)."""
    path = (Path(label_dir) / get_schema(dataset).label_file(split)).resolve()
    frame, digest = _label_file(path, path.stat().st_mtime_ns)
    data = mlflow.data.from_pandas(
        frame, source=str(path), name=f"{dataset}-{split}", digest=digest
    )
    mlflow.log_input(data, context=split)


@functools.lru_cache(maxsize=16)
def _label_file(path: Path, _mtime_ns: int) -> tuple[pd.DataFrame, str]:
    frame = pd.read_csv(path)
    # Integer columns as floats: MLflow's schema inference warns about integers otherwise.
    integers = frame.select_dtypes("integer").columns
    frame[integers] = frame[integers].astype("float64")
    return frame, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def log_table(frame: pd.DataFrame, artifact_file: str) -> None:
    """Write `frame` as CSV or Parquet (by extension) under the run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        if path.suffix == ".parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        log_file(path, _artifact_dir(artifact_file))


def log_file(path: Path, artifact_dir: str | None, *, keep_while_away: bool = True) -> bool:
    """Log a local file into `artifact_dir`, replacing an earlier file of the same name. While
    the server is away it is kept to be sent later, or, without `keep_while_away`, not logged.
    -> whether it was sent now."""
    if _outbox is not None and not keep_while_away:
        if not (_outbox.flush() and _outbox.server_answers()):  # away, or calls still wait
            return False
    record = {"kind": "artifact", "artifact_dir": artifact_dir, "files": {"file": str(path)}}
    return _send(lambda: mlflow.log_artifact(str(path), artifact_dir), record)


def _artifact_dir(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def log_model(model: nn.Module, input_example: np.ndarray) -> None:
    """Log `model` as the run's `model` artifact (pickle format keeps pruned shapes), in the
    standard layout on the CPU whatever it ran in, so that it loads and prunes anywhere. The
    model itself is moved there (fp32, CPU, NCHW), as `nn.Module.to` works in place."""
    import torch

    from prunecxr.runtime import standard_layout

    model = standard_layout(model.float().cpu()).eval()
    if _outbox is None:
        _log_model(model, input_example)
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights, example = Path(tmp) / WEIGHTS_ARTIFACT, Path(tmp) / "input_example.npy"
        torch.save(model.state_dict(), weights)
        np.save(example, input_example)
        files = {"weights": str(weights), "example": str(example)}
        _send(lambda: _log_model(model, input_example), {"kind": "model", "files": files})


def _log_kept_model(run_id: str, weights: str, example: str) -> None:
    """A model kept while the server was away, rebuilt from its weights and logged."""
    import torch

    from prunecxr.models import model_from_weights

    params = run_settings(get_run(run_id))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = model_from_weights(params["arch"], get_schema(params["dataset"]).num_classes, state)
    active = mlflow.active_run()
    # Under `prunecxr upload` the run is opened for it; the kept "end" then sets its status.
    inside = active is not None and active.info.run_id == run_id
    with contextlib.nullcontext() if inside else mlflow.start_run(run_id=run_id):
        _log_model(model, np.load(example))


def _log_model(model: nn.Module, input_example: np.ndarray) -> None:
    import torch

    with torch.inference_mode():
        output = model(torch.from_numpy(input_example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(input_example, output),
        input_example=input_example,
        serialization_format="pickle",
    )
    with tempfile.TemporaryDirectory() as tmp:  # what prunecxr loads: no code in it
        torch.save(model.state_dict(), Path(tmp) / WEIGHTS_ARTIFACT)
        mlflow.log_artifact(str(Path(tmp) / WEIGHTS_ARTIFACT))


WEIGHTS_ARTIFACT = "model_weights.pt"  # the logged model's state dict, beside the pickle model


def load_weights(run_id: str) -> dict | None:
    """The state dict of the model `run_id` logged, read without unpickling code
    (torch.load weights_only); None for a run logged before models came with it."""
    import torch

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


def run_stage(run) -> str | None:
    return run.data.tags.get(STAGE_TAG)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tags on any run, active or not, in one request (safe from a background thread)."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


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


def runs_with_tag(stage: str, tag: str, value: str) -> list[tuple[str, str]]:
    """(run id, status) of the `stage` runs whose `tag` is `value`, newest first."""
    runs = _search(f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{tag}` = '{value}'")
    return [(run.info.run_id, run.info.status) for run in runs]


def find_unfinished_run_id(stage: str, tag: str, value: str) -> str | None:
    """Newest unfinished (running, failed or killed) run of `stage` whose `tag` is `value`."""
    return next(
        (run_id for run_id, status in runs_with_tag(stage, tag, value) if status != "FINISHED"),
        None,
    )


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


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)
