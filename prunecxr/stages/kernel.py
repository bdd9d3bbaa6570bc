"""The resumable-stage kernel: how every stage run (study, train, sweep, prune, analyze) opens
and ends (docs/ARCHITECTURE.md, "The stage kernel").

1. Look up by key: a stage's key says what it computes, so running the same command again
   finds the run it started before (`find_previous`).
2. Claim: an unfinished run found is claimed before any work (refused while another process
   lives on it; of two claiming it at once, one is refused; what its dead owner left RUNNING
   underneath is marked KILLED), else a new run starts, nested under its parent, and is
   claimed at once. The owner tag is this process's random id (processes.process_id()), kept
   alive by a heartbeat until the run has ended.
3. Own: the owner tag and its heartbeat say a live process works on the run, so a second one
   is refused; a process whose run another took over (after a long tracking outage) stops at
   its stage's next safe point (ownership.ensure_mine).
4. A new run gets its key tag and its params.
5. The stage's work runs inside; the run ends with it (FINISHED, or FAILED/KILLED on an error).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prunecxr import tracking
from prunecxr.tracking import ownership

log = logging.getLogger(__name__)

# The tag that holds each stage's key (the names runs have always had).
KEY_TAGS = {
    "study": "prunecxr.study_key",
    "train": "prunecxr.train_key",
    "sweep": "prunecxr.sweep_key",
    "prune": "prunecxr.cell",
}
_DESCRIBED = {"train": "train run"}  # how errors and notes name a stage's run


@dataclass(frozen=True)
class Stage:
    """One stage run to open: its stage, name, key and params, and where it hangs."""

    name: str  # the prunecxr.stage tag: study, train, sweep, prune or analyze
    run_name: str
    key: str | None = None  # what the run computes (None: every run is new)
    params: dict = field(default_factory=dict, hash=False)
    parent_run_id: str | None = None  # None: under the active run, if any
    system_metrics: bool = False  # MLflow samples CPU, memory and GPU use while it is open
    keep_while_away: tracking.KeepWhileAway | None = None  # see tracking/record.py
    owned: bool = True  # heartbeat and refusal of a second process (cells: their sweep's)

    @property
    def key_tag(self) -> str:
        return KEY_TAGS[self.name]

    @property
    def described(self) -> str:
        return _DESCRIBED.get(self.name, self.name)


@dataclass(frozen=True)
class Previous:
    """A run of the same key found by `find_previous`: finished (its result stands) or to be
    continued."""

    run_id: str
    finished: bool


def find_previous(
    stage: Stage,
    *,
    reuse_finished: bool = False,
    can_continue: Callable[[str], bool] = lambda run_id: True,
    under: str | None = None,
    candidates: list[tuple[str, str]] | None = None,
) -> Previous | None:
    """The newest run of `stage`'s key (in the experiment, or directly under run `under`) that
    is finished, if `reuse_finished`, or unfinished and `can_continue`. `candidates` ((run id,
    status), newest first) replaces the look-up by key where a stage finds its runs otherwise."""
    if candidates is None:
        if stage.key is None:
            return None
        candidates = tracking.runs_with_tag(stage.name, stage.key_tag, stage.key, under)
    for run_id, status in candidates:
        if status == "FINISHED":
            if reuse_finished:
                return Previous(run_id, finished=True)
        elif can_continue(run_id):
            return Previous(run_id, finished=False)
    return None


@contextlib.contextmanager
def open_stage(stage: Stage, continued_run_id: str | None = None) -> Iterator[str]:
    """Steps 2 to 5 for `stage`: continue `continued_run_id` or start a new run; yields the run
    id while the stage works. A caller that claimed `continued_run_id` already (to claim it
    before slow work of its own) keeps its claim."""
    # The claim is held until after the run has ended: exit order is start_run's, then this.
    with contextlib.ExitStack() as claim:
        if continued_run_id is not None:
            claim.enter_context(ownership.claimed(continued_run_id, stage.described))
            log.info("continuing %s %s", stage.described, continued_run_id)
        with tracking.start_run(
            stage.name,
            run_name=stage.run_name,
            run_id=continued_run_id,
            parent_run_id=stage.parent_run_id,
            system_metrics=stage.system_metrics,
            keep_while_away=stage.keep_while_away,
        ) as run_id:
            if continued_run_id is None:
                if stage.owned:
                    claim.enter_context(ownership.claimed(run_id, stage.described, contested=False))
                if stage.key is not None:
                    tracking.set_tags({stage.key_tag: stage.key})
                if stage.params:
                    tracking.log_params(stage.params)
            yield run_id


def run_stage(stage: Stage, work: Callable[[str, bool], None]) -> str:
    """Steps 1 to 5 for a stage that continues its unfinished run of the same key: work(run id,
    whether it was continued) runs inside the (new or continued) run. -> the run id."""
    previous = find_previous(stage)
    with open_stage(stage, previous.run_id if previous else None) as run_id:
        work(run_id, previous is not None)
    return run_id


def finished_run(stage: Stage) -> str | None:
    """The newest finished run of `stage`'s key under its parent, if any: its work is done."""
    never = lambda run_id: False  # noqa: E731
    previous = find_previous(
        stage, reuse_finished=True, can_continue=never, under=stage.parent_run_id
    )
    return previous.run_id if previous else None
