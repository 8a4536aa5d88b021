"""Independent units of work (evaluation records or batches, traced facts) on a pool of Ray actors.

    with WorkerPool(lm, workers=2) as pool:                  # a local Ray instance, unless one is running
        for index, outcome in pool.map(task, units, on_done=lambda unit: bar.step(len(unit))):
            ...                                              # in the order of `units`; a `WorkerDied` on failure

Each actor loads the model once, by the name or path `lm` was loaded by (`lm.name`, so a built-in name loads
from its installed package, offline), on `lm`'s device (or with its device map) and in its dtype, checks that
its weights fingerprint equals `lm`'s, and runs one torch thread (`threads`). A `Task` says what to build from the
model once per `map` (`setup`: e.g. the editor, from its resolved settings) and what one unit is (`run`);
one pool runs any number of tasks (`lmedit eval --method a --method b --workers N` loads the model once
per actor). Units are handed out one at a time to whichever actor is free, and results come back in the
order of `units`, so a caller that appends them to a file writes the same lines, in the same order, as a
serial loop.

A unit whose actor dies (killed, out of memory, a crash in native code) is run again once on a fresh
actor; if that one dies too, `map` yields `WorkerDied` for it and carries on with the other units. An
exception raised by a task (a bug, or an `LMEditError` the task does not handle) stops the pool and is
raised again in the caller as the task's own exception, as a serial loop would raise it.

Ray is an optional dependency (`pip install 'lmedit[ray]'`), imported only when a pool starts. With no
Ray instance running, the pool starts a local one sized for its actors and shuts it down afterwards;
`address` joins an existing cluster instead (every node needs lmedit, its model packages and the same
lmedit environment variables, which the pool passes on). A Ray instance already started in this process
(`ray.init(...)` by the caller) is used as it is and left running.

Not handled: several models per actor, GPUs shared between actors (each actor takes the device `lm` is
on), resuming a unit inside an actor after its death (the unit restarts from scratch).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lmedit.errors import LMEditError, MissingDependencyError

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

U = TypeVar("U")
R = TypeVar("R")

INSTALL_HINT = "pip install 'lmedit[ray]'"
# Test-only: a comma-separated list of unit labels (e.g. case ids), read by `map` when it starts; an actor
# handed a unit with one of these labels exits at once (os._exit), as a worker killed by the OOM killer would.
EXIT_ON_ENV = "LMEDIT_TEST_WORKER_EXIT_ON"
ATTEMPTS = 2  # a unit whose actor dies is run once more, on a fresh actor


class Task(Protocol[U, R]):
    """What a pool's actors do: `setup(lm)` once per actor after the model loads, then `run(lm, unit)` per unit.

    A task is pickled to the actors: keep it small (settings, not models) and define it at module level.
    """

    def setup(self, lm: LM) -> None: ...

    def run(self, lm: LM, unit: U) -> R: ...

    def labels(self, unit: U) -> list[str]: ...


@dataclass(frozen=True)
class WorkerDied:
    """A unit whose actor died on every attempt: what to report instead of its result."""

    labels: list[str]
    message: str


def require_ray(flag: str = "--workers") -> Any:
    """The `ray` module, or a `MissingDependencyError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"{flag} runs on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_workers(workers: int | None, threads: int = 1) -> None:
    """Validate the pool size settings (a `LMEditError` naming the setting)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise LMEditError(f"workers must be a whole number of Ray actors (0: no Ray), got {workers!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LMEditError(f"worker_threads must be at least 1, got {threads!r}")


def _identity(lm: LM) -> tuple[str, str | None]:
    """The weights an actor must hold: the checkpoint fingerprint, and the exact weights' hash where `LM` has one."""
    return lm.fingerprint, getattr(lm, "weights_hash", None)


def _refuse_edited(lm: LM) -> None:
    if len(lm.edits):
        raise LMEditError(f"{lm.name!r} has {len(lm.edits)} edit(s) applied, which Ray workers would not have "
                          "(they load the model by its name or path): undo them, or run without workers")


class _Actor:
    """The body of one Ray actor: the model, the current task (set up once per `map`), one unit at a time.

    Errors while loading are kept and raised by `run`, so that they reach the caller as the original
    exception (a Ray task error) instead of a dead actor.
    """

    def __init__(self, model: str, placement: dict, dtype: Any, identity: tuple, threads: int) -> None:
        self.error: BaseException | None = None
        self.task_key: str | None = None
        self.task: Task | None = None
        try:
            import torch

            torch.set_num_threads(threads)
            import lmedit

            self.lm = lmedit.load(model, dtype=dtype, **placement)
            if _identity(self.lm) != identity:
                raise LMEditError(f"a Ray worker loaded {model!r} with other weights (fingerprint "
                                  f"{self.lm.fingerprint[:12]}, the caller's {identity[0][:12]}): workers load the "
                                  "model by its name or path, so it must be the same, unedited model everywhere")
        except Exception as exc:  # noqa: BLE001 - re-raised by run()
            self.error = exc

    def run(self, task_key: str, task: Task, unit: Any, exit_on: frozenset[str] = frozenset()) -> Any:
        if self.error is not None:
            raise self.error
        if task_key != self.task_key:
            task.setup(self.lm)
            self.task_key, self.task = task_key, task
        if exit_on & set(self.task.labels(unit)):
            os._exit(1)  # EXIT_ON_ENV: a test's stand-in for a worker killed mid-unit
        return self.task.run(self.lm, unit)


class WorkerPool:
    """`workers` Ray actors, each holding `lm`'s model loaded again (see the module docstring).

    Use as a context manager: the actors are killed on exit, and a Ray instance the pool started is shut down.

    Args:
        lm: the model the caller holds; actors load `lm.name` on `lm.device` in `lm`'s dtype.
        workers: how many actors.
        threads: torch threads (and Ray CPUs) per actor.
        address: a Ray cluster to join (`ray.init(address=...)`); default: a local instance.

    Raises:
        MissingDependencyError: Ray is not installed.
        LMEditError: `lm` has edits applied; the Ray instance has fewer CPUs than `workers * threads`; a cluster
            at `address` cannot be joined.
    """

    def __init__(self, lm: LM, *, workers: int, threads: int = 1, address: str | None = None) -> None:
        check_workers(workers, threads)
        if workers < 1:
            raise LMEditError("a worker pool needs at least one worker")
        _refuse_edited(lm)
        self.ray = require_ray()
        self.lm, self.workers, self.threads, self.address = lm, workers, threads, address
        self._started = False
        self._actors: list[Any] = []

    def __enter__(self) -> WorkerPool:
        ray = self.ray
        if not ray.is_initialized():
            options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            if self.address:
                try:
                    ray.init(address=self.address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise LMEditError(f"cannot join the Ray cluster at {self.address!r}: {exc}") from None
            else:
                # A private local instance with exactly the CPUs the actors take (`address="local"`: never a
                # cluster that RAY_ADDRESS happens to name).
                ray.init(address="local", num_cpus=self.workers * self.threads, **options)
            self._started = True
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            if cpus < self.workers * self.threads:
                raise LMEditError(f"the Ray instance has {cpus:g} CPUs; {self.workers} workers × {self.threads} "
                                  f"thread(s) need {self.workers * self.threads}")
            dtype = next(self.lm.model.parameters()).dtype
            # lmedit's own settings (LMEDIT_CACHE, ...) as the caller has them now, also on a cluster's nodes.
            env = {k: v for k, v in os.environ.items() if k.startswith("LMEDIT_")}
            self._remote = ray.remote(num_cpus=self.threads, max_restarts=0)(_Actor).options(
                runtime_env={"env_vars": env} if env else None)
            # A model accelerate placed (device_map) is placed the same way in each actor.
            device_map = getattr(self.lm, "device_map", None)
            placement = {"device_map": dict(device_map)} if device_map else {"device": str(self.lm.device)}
            self._args = (self.lm.name, placement, dtype, _identity(self.lm), self.threads)
            self._actors = [self._remote.remote(*self._args) for _ in range(self.workers)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self._actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False

    def check_model(self, lm: LM) -> None:
        """Refuse to run work for another model than the pool's actors hold, or for one with edits applied."""
        _refuse_edited(lm)
        if _identity(lm) != _identity(self.lm):
            raise LMEditError(f"this worker pool holds {self.lm.name!r}, not {lm.name!r}")

    def map(self, task: Task[U, R], units: Sequence[U],
            on_done: Callable[[U], None] | None = None) -> Iterator[tuple[int, R | WorkerDied]]:
        """Run `task` on every unit; yield `(index, result or WorkerDied)` in the order of `units`.

        `on_done(unit)` is called as soon as any actor finishes a unit (or gives up on it), in the order they
        finish: progress across actors. A result is yielded once every unit before it has been yielded.
        """
        if not self._actors:
            raise LMEditError("use the worker pool inside `with WorkerPool(...) as pool:`")
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        key, task_ref = uuid.uuid4().hex, ray.put(task)
        exit_on = frozenset(s for s in os.environ.get(EXIT_ON_ENV, "").split(",") if s)
        queue = list(range(len(units)))  # indices not yet handed out, in order
        attempts = [0] * len(units)
        idle = list(self._actors)
        running: dict[Any, tuple[int, Any]] = {}  # object ref -> (unit index, actor)
        finished: dict[int, Any] = {}
        deaths = 0  # actors died since a unit last succeeded: many in a row means workers cannot run at all
        next_out = 0
        while next_out < len(units):
            while queue and idle:
                index, actor = queue.pop(0), idle.pop(0)
                attempts[index] += 1
                running[actor.run.remote(key, task_ref, units[index], exit_on)] = (index, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            index, actor = running.pop(ref)
            try:
                finished[index] = ray.get(ref)
                idle.append(actor)
                deaths = 0
            except RayTaskError as exc:  # the task raised: as a serial loop would
                self._drain(running)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None
                raise
            except RayActorError as exc:
                labels = task.labels(units[index])
                deaths += 1
                if deaths > 2 * self.workers + ATTEMPTS:
                    self._drain(running)
                    raise LMEditError(f"Ray workers keep dying ({deaths} in a row, none finished a unit in between; "
                                      f"the last while running {', '.join(labels)}): {exc}") from None
                log.warning("a Ray worker died while running %s (attempt %d of %d)", ", ".join(labels),
                            attempts[index], ATTEMPTS)
                fresh = self._replace(actor)
                if attempts[index] < ATTEMPTS:  # again, on the fresh actor (a dead one may have been unhealthy)
                    attempts[index] += 1
                    running[fresh.run.remote(key, task_ref, units[index], exit_on)] = (index, fresh)
                    continue
                idle.append(fresh)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                finished[index] = WorkerDied(labels, f"its Ray worker died on each of {ATTEMPTS} attempts ({reason})")
            if on_done is not None:
                on_done(units[index])
            while next_out in finished:
                yield next_out, finished.pop(next_out)
                next_out += 1

    def _drain(self, running: dict[Any, tuple[int, Any]]) -> None:
        """Wait for the units still running (their results are dropped), so the pool can run the next map."""
        from ray.exceptions import RayActorError

        for ref, (_, actor) in running.items():
            try:
                self.ray.get(ref)
            except RayActorError:
                self._replace(actor)
            except Exception:  # noqa: BLE001 - dropped: the first error is the one raised
                pass

    def _replace(self, dead: Any) -> Any:
        """Swap a dead actor for a fresh one (which loads the model again); returns the new one."""
        try:
            self.ray.kill(dead)
        except Exception:  # noqa: BLE001 - already gone
            pass
        fresh = self._remote.remote(*self._args)
        self._actors = [fresh if a is dead else a for a in self._actors]
        return fresh
