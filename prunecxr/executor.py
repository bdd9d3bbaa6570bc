"""Where independent jobs (a seed's training, a batch of sweep cells) run: one after another in
this process (`local`), or as Ray tasks on a cluster (`ray`). Both run the same function on the
same arguments, so they log the same runs with the same names and numbers.

A job either returns or raises; `retry_failed` is the one policy for what is run again. A Ray task
that dies with its worker or node raises here like any other error, so a lost node costs only
the jobs that were on it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from prunecxr import PrunecxrError, tracking
from prunecxr.specs import EXECUTORS, ExecutionSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Executor:
    """Runs jobs as its ExecutionSpec says (local, or Ray with per-task resources)."""

    spec: ExecutionSpec = ExecutionSpec()

    def __post_init__(self):
        spec = self.spec
        if spec.executor not in EXECUTORS:
            raise PrunecxrError(
                f"unknown executor {spec.executor!r}; valid: {', '.join(EXECUTORS)}"
            )
        if min(spec.max_retries, spec.gpus_per_task) < 0 or spec.cpus_per_task <= 0:
            raise PrunecxrError(
                "--max-retries and --gpus-per-task must be >= 0 and --cpus-per-task > 0"
            )
        if spec.cells_per_task < 1:
            raise PrunecxrError(f"--cells-per-task must be >= 1, not {spec.cells_per_task}")

    @property
    def on_ray(self) -> bool:
        return self.spec.executor == "ray"

    @property
    def max_retries(self) -> int:
        return self.spec.max_retries

    def map(self, function: Callable, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        """function(*job) for every job; yields (index of the job, its result or the exception
        it raised) as jobs finish. Ray: large arguments are shared once per cluster (an
        argument object that appears in several jobs is put in the object store once)."""
        if not self.on_ray or not jobs:  # nothing to do: no cluster needed
            for index, job in enumerate(jobs):
                try:
                    yield index, function(*job)
                except Exception as error:  # the caller decides whether to retry
                    yield index, error
            return
        yield from self._ray_map(function, jobs)

    def run_all(self, function: Callable, jobs: list[tuple], names: list[str]) -> list:
        """function(*job) for every job, under the retry policy (`retry_failed`); -> the results
        in order. A job that failed every attempt is an error that names it (`names[i]`),
        raised after the other jobs are done."""
        results: dict[str, object] = {}

        def attempt(todo: list[str]) -> dict[str, Failure]:
            failed = {}
            for position, outcome in self.map(function, [jobs[int(i)] for i in todo]):
                if isinstance(outcome, BaseException):
                    failed[todo[position]] = Failure.of(outcome)
                else:
                    results[todo[position]] = outcome
            return failed

        keys = [str(i) for i in range(len(jobs))]
        failed, _ = retry_failed(keys, attempt, self.max_retries, lambda k: names[int(k)])
        if failed:
            ordered = sorted(failed.items(), key=lambda item: int(item[0]))
            listed = "; ".join(f"{names[int(k)]}: {f.error}" for k, f in ordered)
            raise PrunecxrError(
                f"{len(failed)} of {len(jobs)} failed ({listed}); run the same command again "
                f"to continue"
            )
        return [results[key] for key in keys]

    def _ray_map(self, function: Callable, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        ray = connect_ray(self.spec.ray_address)
        spec = self.spec
        options = dict(num_cpus=spec.cpus_per_task, num_gpus=spec.gpus_per_task, max_retries=0)
        if not spec.gpus_per_task:  # Ray leaves every GPU visible to a task that reserved none
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        remote = ray.remote(function).options(**options)
        shared: dict[int, object] = {}
        pending = {}
        for index, job in enumerate(jobs):
            args = [_shared_ref(ray, shared, arg) for arg in job]
            pending[remote.remote(*args)] = index
        with tqdm(total=len(jobs), desc=f"{function.__name__} on Ray", unit="task") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                bar.update()
                index = pending.pop(ready[0])
                try:
                    yield index, ray.get(ready[0])
                except ray.exceptions.RayTaskError as error:  # the job raised: its own error
                    yield index, error.cause if error.cause is not None else error
                except ray.exceptions.RayError as error:  # worker or node lost
                    yield index, error


def _shared_ref(ray, shared: dict, arg):
    """Big objects (models) go to the object store once, not once per task."""
    if isinstance(arg, (str, int, float, bool, type(None))):
        return arg
    if id(arg) not in shared:
        shared[id(arg)] = (ray.put(arg), arg)  # keep `arg` alive: its id stays unique
    return shared[id(arg)][0]


def connect_ray(address: str | None):
    """The Ray module, connected to `address`, else $RAY_ADDRESS, else a new local instance.
    Workers get the tracking URI from the job; credentials only from their own environment."""
    try:
        import ray
    except ImportError:
        raise PrunecxrError(
            "--executor ray needs Ray: pip install 'prunecxr[ray]' (on every node)"
        ) from None
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            # Workers' output stays in the cluster's logs; errors come back as exceptions.
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, _ray_auth_error(ray)) as error:
            raise PrunecxrError(
                f"cannot connect to the Ray cluster at {address}: {error} (a cluster with "
                f"RAY_AUTH_MODE=token needs its token here too: RAY_AUTH_TOKEN or "
                f"~/.ray/auth_token)"
            ) from None
        log.info("Ray: %s", address or "a local instance")
    return ray


def _ray_auth_error(ray) -> type[Exception]:
    """Ray's refusal of a missing or wrong token (Ray 2.52 and later)."""
    return getattr(ray.exceptions, "AuthenticationError", RuntimeError)


def check_readable(*paths: str) -> None:
    """A clear error where a worker cannot see the data the driver named."""
    for path in dict.fromkeys(paths):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PrunecxrError(
                f"{socket.gethostname()} cannot read {path}: every worker must see the data "
                f"at the same path (a shared file system)"
            )


@dataclass(frozen=True)
class Failure:
    """Why a job or cell failed: one line (the error's type and message), and whether the
    error is the user's to fix (a bad data path or option fails the same way on every retry)."""

    error: str
    final: bool

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        line = f"{type(error).__name__}: {' '.join(str(error).split())}"
        return cls(line, isinstance(error, PrunecxrError))


def retry_failed(
    keys: list[str],
    attempt: Callable[[list[str]], dict[str, Failure]],
    max_retries: int,
    name: Callable[[str], str],
) -> tuple[dict[str, Failure], set[str]]:
    """The one retry policy of seeds and sweep cells, local or on Ray: attempt(todo) runs the
    keys still to do and returns those that failed; they are run again, up to `max_retries`
    times, unless their failure is final. -> (the failures that remain, the keys done only
    after a retry)."""
    failed: dict[str, Failure] = {}
    retried: set[str] = set()
    todo = list(keys)
    for retry in range(max_retries + 1):
        if retry:
            shown = ", ".join(name(key) for key in todo[:5]) + (", ..." if len(todo) > 5 else "")
            log.info("retrying %d: %s (retry %d of %d)", len(todo), shown, retry, max_retries)
        now = attempt(todo)
        for key in todo:
            if key not in now:
                failed.pop(key, None)
                if retry:
                    retried.add(key)
        failed.update(now)
        todo = [key for key in todo if key in now and not now[key].final]
        if not todo:
            break
    return failed, retried


@dataclass(frozen=True)
class WorkerContext:
    """What a job in another process needs to log where the driver logs: the tracking URI and
    the experiment. Never credentials: workers read those from their own environment."""

    tracking_uri: str
    experiment_id: str

    @classmethod
    def here(cls) -> WorkerContext:
        return cls(tracking.absolute_tracking_uri(), tracking.current_experiment_id())

    def enter(self) -> None:
        if tracking.is_current(self.tracking_uri, self.experiment_id):
            return  # the driver's own process (local executor)
        os.environ.pop("MLFLOW_RUN_ID", None)  # never adopt the run `mlflow run` made the driver
        tracking.use_tracking(self.tracking_uri, self.experiment_id)
