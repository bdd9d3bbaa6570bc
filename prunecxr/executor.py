"""Where independent jobs (a seed's training, a batch of sweep cells) run: one after another in
this process (`local`), or as Ray tasks on a cluster (`ray`). Both run the same function on the
same arguments, so they log the same runs with the same names and numbers.

A job either returns or raises; the caller decides what is retried (see `retry`). A Ray task
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

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Executor:
    kind: str = "local"
    address: str | None = None  # Ray: None = $RAY_ADDRESS, else a local Ray instance
    cpus_per_task: float = 1
    gpus_per_task: float = 0  # fractional: several tasks share a GPU
    max_retries: int = 2  # further attempts of a job that failed
    cells_per_task: int = 8  # sweep cells per Ray task (one model and test set loaded per task)

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise PrunecxrError(f"unknown executor {self.kind!r}; valid: {', '.join(EXECUTORS)}")
        if min(self.max_retries, self.gpus_per_task) < 0 or self.cpus_per_task <= 0:
            raise PrunecxrError(
                "--max-retries and --gpus-per-task must be >= 0 and --cpus-per-task > 0"
            )
        if self.cells_per_task < 1:
            raise PrunecxrError(f"--cells-per-task must be >= 1, not {self.cells_per_task}")

    def map(self, function: Callable, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        """function(*job) for every job; yields (index of the job, its result or the exception
        it raised) as jobs finish. Ray: large arguments are shared once per cluster (an
        argument object that appears in several jobs is put in the object store once)."""
        if self.kind == "local" or not jobs:  # nothing to do: no cluster needed
            for index, job in enumerate(jobs):
                try:
                    yield index, function(*job)
                except Exception as error:  # the caller decides whether to retry
                    yield index, error
            return
        yield from self._ray_map(function, jobs)

    def run_all(self, function: Callable, jobs: list[tuple], names: list[str]) -> list:
        """function(*job) for every job, each retried up to max_retries times (a user error is
        not retried); -> the results in order. A job that failed every attempt is an error
        that names it (`names[i]`), raised after the other jobs are done."""
        results, errors, todo = {}, {}, list(range(len(jobs)))
        for attempt in range(self.max_retries + 1):
            if attempt:
                log.info(
                    "retrying %s (retry %d of %d)",
                    ", ".join(names[i] for i in todo),
                    attempt,
                    self.max_retries,
                )
            again = []
            for position, outcome in self.map(function, [jobs[i] for i in todo]):
                index = todo[position]
                if isinstance(outcome, BaseException):
                    errors[index] = describe_error(outcome)
                    if not is_final(outcome):
                        again.append(index)
                else:
                    results[index] = outcome
                    errors.pop(index, None)
            todo = again
            if not todo:
                break
        if errors:
            failed = "; ".join(f"{names[i]}: {error}" for i, error in sorted(errors.items()))
            raise PrunecxrError(
                f"{len(errors)} of {len(jobs)} failed ({failed}); run the same command again "
                f"to continue"
            )
        return [results[i] for i in range(len(jobs))]

    def _ray_map(self, function: Callable, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        ray = connect_ray(self.address)
        options = dict(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task, max_retries=0)
        if not self.gpus_per_task:  # Ray leaves every GPU visible to a task that reserved none
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
        except (ConnectionError, RuntimeError) as error:
            raise PrunecxrError(
                f"cannot connect to the Ray cluster at {address}: {error}"
            ) from None
        log.info("Ray: %s", address or "a local instance")
    return ray


def check_readable(*paths: str) -> None:
    """A clear error where a worker cannot see the data the driver named."""
    for path in dict.fromkeys(paths):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PrunecxrError(
                f"{socket.gethostname()} cannot read {path}: every worker must see the data "
                f"at the same path (a shared file system)"
            )


def describe_error(error: BaseException) -> str:
    """One line: the error's type and message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def is_final(error: BaseException) -> bool:
    """A user error (bad data path, bad option) fails the same way on every retry."""
    return isinstance(error, PrunecxrError)


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
