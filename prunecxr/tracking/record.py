"""What a run records: starting and ending runs (nested, tagged with their stage), params,
metrics, tables, files and models, and the outbox that keeps them on this machine while a
tracking server is away (outbox.py), sent when it answers again or by `prunecxr upload`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.data
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from prunecxr import PrunecxrError
from prunecxr.tracking.outbox import Outbox
from prunecxr.tracking.store import (
    RESOLVED_SUFFIX,
    STAGE_TAG,
    STAGES,
    WEIGHTS_ARTIFACT,
    absolute_tracking_uri,
    get_run,
    run_settings,
    server_answers,
)

log = logging.getLogger(__name__)
# Rebuilds a model from a run's settings and a state dict (given by the caller: this package
# knows no architectures); used when a model kept while the server was away is sent.
ModelRebuilder = Callable[[dict, dict], nn.Module]
CONTINUED_TAG = "prunecxr.continued_run"  # on a run `mlflow run` made for continuing another


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
    keep_while_away: KeepWhileAway | None = None,
) -> Iterator[str]:
    """A run tagged with its stage; nested under `parent_run_id`, else under the active run if
    there is one (active runs are per thread). `run_id` continues an existing run (resume).
    `system_metrics`: MLflow samples CPU, memory and GPU use into the run while it is open (so
    the UI shows whether the GPU was starved). `keep_while_away`: what the run logs while the
    tracking server is away is kept on this machine (see _kept_while_away). Yields the run
    id."""
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
        try:
            if keep_while_away is None:
                yield run.info.run_id
            else:
                with _kept_while_away(run.info.run_id, keep_while_away):
                    yield run.info.run_id
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli): KILLED, where MLflow says FAILED
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run.info.run_id:
                mlflow.end_run("KILLED")
            raise


@dataclass(frozen=True)
class KeepWhileAway:
    """Keep what a run logs while its tracking server is away in `root/<run id>`; a kept model
    is rebuilt by `rebuild_model(run settings, state dict)` when it is sent."""

    root: Path
    rebuild_model: ModelRebuilder


# A tracking server that goes away mid-run (train runs, see outbox.py): at the run's end, how
# long to wait for it before leaving what was kept for `prunecxr upload`.
OUTAGE_WAIT_SECONDS = float(os.environ.get("PRUNECXR_OUTAGE_WAIT_SECONDS", "300"))


_outbox: Outbox | None = None  # set while a run keeps what the server cannot take


@contextlib.contextmanager
def _kept_while_away(run_id: str, keep: KeepWhileAway) -> Iterator[None]:
    """Metrics, files and the model the run logs while the server is away are kept in `folder`
    and sent when it answers again; the run is ended here (not by MLflow's context). If the
    server is still away when the run ends (after waiting OUTAGE_WAIT_SECONDS), the run's end is
    kept too, and one error line names the command that sends it all later."""
    global _outbox
    uri = absolute_tracking_uri()
    folder = Path(keep.root) / run_id
    perform = functools.partial(_perform, rebuild_model=keep.rebuild_model)
    _outbox = box = Outbox(folder, run_id, uri, perform, server_answers)
    status, failed, taken_over = "FINISHED", False, False
    # A call the server drops midway fails in seconds and is kept, instead of MLflow's retries
    # holding the training for minutes (7 retries, backoff up to 2 minutes).
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"):
        try:
            yield
        except BaseException as error:
            taken_over = _taken_over(error)
            status, failed = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", True
            raise
        finally:
            _outbox = None
            if taken_over:  # its new owner redoes the work: nothing more is sent or ended
                log.warning(
                    "run %s was taken over by another process: what this process kept while "
                    "the server was away stays in %s, not sent",
                    run_id,
                    folder,
                )
            else:
                _send_or_leave(box, status, failed, uri, run_id, folder)


def _taken_over(error: BaseException) -> bool:
    from prunecxr.tracking.ownership import RunTakenOver  # ownership logs through this module

    return isinstance(error, RunTakenOver)


def _send_or_leave(box: Outbox, status: str, failed: bool, uri: str, run_id: str, folder) -> None:
    """At the run's end: send what was kept and end the run, or leave both for `prunecxr
    upload` when the server stays away."""
    if box.waiting():
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


def _perform(run_id: str, record: dict, rebuild_model: ModelRebuilder) -> None:
    """Make a kept logging call (outbox.py) on the server."""
    client, files = MlflowClient(), record["files"]
    if record["kind"] == "metrics":
        _log_metric_points(run_id, record)
    elif record["kind"] == "artifact":
        client.log_artifact(run_id, files["file"], record["artifact_dir"])
    elif record["kind"] == "model":
        _log_kept_model(run_id, files["weights"], files["example"], rebuild_model)
    elif record["kind"] == "end":
        client.set_terminated(run_id, record["status"])
    else:
        raise PrunecxrError(f"unknown kept record {record['kind']!r}")


def upload_kept(
    folder: Path,
    rebuild_model: ModelRebuilder,
    tracking_uri: str | None = None,
    *,
    to_other_server: bool = False,
) -> tuple[str, int]:
    """Send what a run left in `folder` while its tracking server was away, to `tracking_uri`
    or else the environment's MLFLOW_TRACKING_URI, never to a server the folder alone names
    (its credentials would go there); to another server than the folder's only with
    `to_other_server` (the server moved). Every record and file is checked before anything is
    sent (outbox.py). -> (run id, calls sent)."""
    if not (Path(folder) / "meta.json").is_file():
        raise PrunecxrError(f"{folder} holds nothing a run kept (no meta.json)")
    perform = functools.partial(_perform, rebuild_model=rebuild_model)
    box = Outbox.open(folder, perform, server_answers)
    chosen = tracking_uri or MLFLOW_TRACKING_URI.get()
    if not chosen:
        raise PrunecxrError(
            f"which tracking server? pass --tracking-uri or set MLFLOW_TRACKING_URI ({folder} "
            f"was kept for {box.tracking_uri}; it is not used unless you choose it)"
        )
    if chosen.rstrip("/") != box.tracking_uri.rstrip("/") and not to_other_server:
        raise PrunecxrError(
            f"{folder} was kept for the tracking server {box.tracking_uri}, not {chosen}; pass "
            f"--to-other-server to send it to {chosen} (a server that moved)"
        )
    box.tracking_uri = chosen
    mlflow.set_tracking_uri(chosen)
    if not box.flush(now=True, wait=False):
        raise PrunecxrError(
            f"the tracking server {chosen} does not answer; {folder} is kept: run this again "
            f"when it is back"
        )
    return box.run_id, box.sent


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
    run_id = mlflow.active_run().info.run_id
    _send(functools.partial(_log_metric_points, run_id, record), record)


def _log_metric_points(run_id: str, record: dict) -> None:
    """A metrics record's points, with its own timestamp and step: sent again (a retry after a
    lost answer, a replay from the outbox), the same points, which the store keeps once."""
    metrics = [
        Metric(key, value, record["timestamp"], record["step"])
        for key, value in record["metrics"].items()
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


def log_label_file(path: Path, dataset: str, split: str) -> None:
    """Record a split's label file as the run's input (the UI's Dataset column): named
    `<dataset>-<split>`, its source the file, its digest the file's SHA-256 (first 16 hex)."""
    path = Path(path).resolve()
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


def upload_file(run_id: str, path: Path, artifact_dir: str | None) -> bool:
    """Log a local file into `artifact_dir` of run `run_id`, from any thread (it needs no
    active run and bypasses the outbox). -> whether it was sent: nothing is sent while the
    tracking server does not answer."""
    if not server_answers(absolute_tracking_uri()):
        return False
    MlflowClient().log_artifact(run_id, str(path), artifact_dir)
    return True


def _artifact_dir(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def log_model(model: nn.Module, input_example: np.ndarray) -> None:
    """Log `model` (fp32, on the CPU, in the standard layout: runtime.portable_model) as the
    run's `model` artifact (pickle format keeps pruned shapes), so that it loads and prunes
    anywhere."""
    if _outbox is None:
        _log_model(model, input_example)
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights, example = Path(tmp) / WEIGHTS_ARTIFACT, Path(tmp) / "input_example.npy"
        torch.save(model.state_dict(), weights)
        np.save(example, input_example)
        files = {"weights": str(weights), "example": str(example)}
        _send(lambda: _log_model(model, input_example), {"kind": "model", "files": files})


def _log_kept_model(run_id: str, weights: str, example: str, rebuild_model: ModelRebuilder) -> None:
    """A model kept while the server was away, rebuilt from its weights and logged."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = rebuild_model(run_settings(get_run(run_id)), state)
    active = mlflow.active_run()
    # Under `prunecxr upload` the run is opened for it; the kept "end" then sets its status.
    inside = active is not None and active.info.run_id == run_id
    with contextlib.nullcontext() if inside else mlflow.start_run(run_id=run_id):
        _log_model(model, np.load(example))


def model_requirements() -> list[str]:
    """What a logged model needs to load: MLflow's torch and cloudpickle pins, and torchvision
    (the models are its classes). Given explicitly: inferring them costs 10-20 s per model."""
    torchvision = importlib.metadata.version("torchvision").split("+")[0]
    return [*mlflow.pytorch.get_default_pip_requirements(), f"torchvision=={torchvision}"]


def _log_model(model: nn.Module, input_example: np.ndarray) -> None:
    with torch.inference_mode():
        output = model(torch.from_numpy(input_example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(input_example, output),
        input_example=input_example,
        serialization_format="pickle",
        pip_requirements=model_requirements(),
    )
    with tempfile.TemporaryDirectory() as tmp:  # what prunecxr loads: no code in it
        torch.save(model.state_dict(), Path(tmp) / WEIGHTS_ARTIFACT)
        mlflow.log_artifact(str(Path(tmp) / WEIGHTS_ARTIFACT))


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tags on any run, active or not, in one request (safe from a background thread)."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)
