"""Declaring sagas: ``Saga``, ``@saga.step``, ``@step.compensate``, policies and the registry."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, overload

from django.core.exceptions import ImproperlyConfigured

from sagas.durations import parse_duration

BACKOFFS = ("exponential", "linear", "constant")
GROUP_MODES = ("all", "all_settled", "any", "race")
ON_EXHAUSTED = ("compensate", "fail", "dead_letter")
SAGA_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
# Step names travel in job ids and idempotency keys: keep them to [A-Za-z0-9_-].
STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")

StepFunction = Callable[[Any], Any]
InputValidator = Callable[[dict[str, Any]], None]
# Lets a task's input change a step's action policy (the chaos saga's "on_exhausted").
RetryOverride = Callable[[dict[str, Any], "StepDefinition"], "RetryPolicy | None"]


class UnknownSaga(LookupError):
    """No saga with that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown saga {name!r}")
        self.name = name


def _require_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed attempt is retried; ``max_retries=N`` means N+1 attempts."""

    max_retries: int = 3
    backoff: str = "exponential"
    base_delay_ms: int = 200
    jitter: float = 0.0
    max_delay_ms: int | None = None
    # None means the default ("compensate") and is the only value a compensation accepts.
    on_exhausted: str | None = None

    def __post_init__(self) -> None:
        _require_int("RetryPolicy", "max_retries", self.max_retries, 0)
        _require_int("RetryPolicy", "base_delay_ms", self.base_delay_ms, 0)
        if self.max_delay_ms is not None:
            _require_int("RetryPolicy", "max_delay_ms", self.max_delay_ms, 0)
        if self.backoff not in BACKOFFS:
            raise ValueError(
                f"RetryPolicy: unknown backoff {self.backoff!r}; use one of {', '.join(BACKOFFS)}"
            )
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int | float):
            raise ValueError(f"RetryPolicy: jitter must be a fraction, got {self.jitter!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy: jitter must be between 0 and 1, got {self.jitter!r}")
        if self.on_exhausted is not None and self.on_exhausted not in ON_EXHAUSTED:
            raise ValueError(
                f"RetryPolicy: unknown on_exhausted {self.on_exhausted!r}; "
                f"use one of {', '.join(ON_EXHAUSTED)}"
            )

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    @property
    def exhausted_action(self) -> str:
        return self.on_exhausted or "compensate"


@dataclass(frozen=True)
class CircuitBreakerPolicy:
    """A breaker shared by every worker, keyed by ``name``."""

    name: str
    failure_threshold: int = 5
    open_seconds: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not STEP_NAME.match(self.name):
            raise ValueError(
                f"CircuitBreakerPolicy: name must match {STEP_NAME.pattern}, got {self.name!r}"
            )
        _require_int("CircuitBreakerPolicy", "failure_threshold", self.failure_threshold, 1)
        _require_int("CircuitBreakerPolicy", "open_seconds", self.open_seconds, 1)


DEFAULT_RETRY = RetryPolicy()


@dataclass(eq=False)
class StepDefinition:
    """A step's action, its policies and (optionally) the compensation that undoes it."""

    saga: Saga
    name: str
    index: int
    action: StepFunction
    retry: RetryPolicy = DEFAULT_RETRY
    breaker: CircuitBreakerPolicy | None = None
    timeout_s: float | None = None
    critical: bool = True
    compensation: StepFunction | None = None
    compensation_retry: RetryPolicy | None = field(default=None)
    # None: after the node declared just before it. Names steps or parallel groups.
    after: tuple[str, ...] | None = None
    group: str = ""  # the parallel group this step is a branch of

    def __call__(self, ctx: Any) -> Any:
        return self.action(ctx)

    @property
    def compensation_policy(self) -> RetryPolicy:
        """The compensation's own policy, or the step's when it has none."""
        return self.compensation_retry or self.retry

    @overload
    def compensate(self, fn: StepFunction) -> StepFunction: ...
    @overload
    def compensate(
        self, fn: None = None, *, retry: RetryPolicy | None = None
    ) -> Callable[[StepFunction], StepFunction]: ...

    def compensate(
        self, fn: StepFunction | None = None, *, retry: RetryPolicy | None = None
    ) -> StepFunction | Callable[[StepFunction], StepFunction]:
        """Register the function that undoes this step (``@step.compensate(...)``)."""
        if retry is not None:
            if not isinstance(retry, RetryPolicy):
                raise ValueError(f"{self.label}: compensate(retry=...) needs a RetryPolicy")
            if retry.on_exhausted is not None:
                raise ValueError(
                    f"{self.label}: on_exhausted is not allowed on a compensation's policy; "
                    "an exhausted compensation always ends the task in compensation_failed"
                )

        def register(func: StepFunction) -> StepFunction:
            if not callable(func):
                raise ValueError(f"{self.label}: a compensation must be callable")
            if self.compensation is not None:
                raise ValueError(f"{self.label}: already has a compensation")
            self.compensation = func
            self.compensation_retry = retry
            return func

        return register(fn) if fn is not None else register

    @property
    def label(self) -> str:
        return f"saga {self.saga.name!r} step {self.name!r}"


@dataclass(eq=False)
class ParallelGroup:
    """Branches that run at the same time on any workers; the group joins in the database.

    Modes: ``all`` (every branch must succeed), ``all_settled`` (succeeds with each
    branch's result or structured error), ``any`` (the first success wins), ``race``
    (the first branch to settle decides). ``timeout_s`` bounds the group's work: it counts
    from the moment its first branch starts, so time spent waiting for a worker is not
    charged to it. ``schedule_to_close_s`` caps the whole group from the moment it is
    scheduled, queue time included, for callers who need an answer by then.
    """

    saga: Saga
    name: str
    mode: str
    timeout_s: float | None = None
    after: tuple[str, ...] | None = None
    critical: bool = True
    schedule_to_close_s: float | None = None
    branches: list[StepDefinition] = field(default_factory=list)

    @overload
    def branch(self, fn: StepFunction) -> StepDefinition: ...
    @overload
    def branch(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreakerPolicy | None = None,
        timeout_s: float | None = None,
    ) -> Callable[[StepFunction], StepDefinition]: ...

    def branch(
        self,
        fn: StepFunction | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreakerPolicy | None = None,
        timeout_s: float | None = None,
    ) -> StepDefinition | Callable[[StepFunction], StepDefinition]:
        """Add a branch (``@group.branch`` or ``@group.branch(retry=..., ...)``)."""
        self.saga._check_step_options(retry, breaker, timeout_s)

        def register(func: StepFunction) -> StepDefinition:
            definition = self.saga._add_step(
                func,
                name=name,
                retry=retry,
                breaker=breaker,
                timeout_s=timeout_s,
                critical=True,
                after=None,
                group=self.name,
            )
            self.branches.append(definition)
            return definition

        return register(fn) if fn is not None else register


Node = StepDefinition | ParallelGroup


ORPHAN_POLICIES = ("report", "delete", "archive")
DEFAULT_ORPHAN_GRACE = timedelta(hours=48)


def _orphan_grace(saga: str, value: timedelta | str) -> timedelta:
    grace = parse_duration(value) if isinstance(value, str) else value
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise ValueError(f"saga {saga!r}: orphan_grace must be a duration such as '48h'")
    return grace


class Saga:
    """An ordered list of steps with the options that apply to every task of it."""

    def __init__(
        self,
        name: str,
        *,
        cancellable: bool = False,
        s3_prefix: str = "",
        orphan_policy: str = "report",
        orphan_grace: timedelta | str = DEFAULT_ORPHAN_GRACE,
        lock_expiry_s: int = 60,
        deadline_s: int | None = None,
        validate_input: InputValidator | None = None,
        retry_override: RetryOverride | None = None,
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not SAGA_NAME.match(name):
            raise ValueError(
                f"invalid saga name {name!r}: use lower-case letters, digits, '-' and '_' "
                "(it appears in URLs)"
            )
        _require_int(f"saga {name!r}", "lock_expiry_s", lock_expiry_s, 1)
        if deadline_s is not None:
            _require_int(f"saga {name!r}", "deadline_s", deadline_s, 1)
        if validate_input is not None and not callable(validate_input):
            raise ValueError(f"saga {name!r}: validate_input must be callable")
        self.name = name
        self.cancellable = bool(cancellable)
        self.s3_prefix = s3_prefix
        self.orphan_policy = orphan_policy
        self.orphan_grace = _orphan_grace(name, orphan_grace)
        self._check_reconciliation_options()
        self.lock_expiry_s = lock_expiry_s
        self.deadline_s = deadline_s
        self.validate_input = validate_input
        self.retry_override = retry_override
        self.description = description
        self.steps: list[StepDefinition] = []  # every step, branches included
        self.nodes: list[Node] = []  # top-level steps and groups, in declaration order

    def __repr__(self) -> str:
        return f"<Saga {self.name} ({len(self.steps)} steps)>"

    def _check_reconciliation_options(self) -> None:
        if self.s3_prefix and not self.s3_prefix.endswith("/"):
            raise ValueError(
                f"saga {self.name!r}: s3_prefix {self.s3_prefix!r} must end with '/' "
                "(so a sibling such as 'create-zip-old/' is never under it)"
            )
        if self.orphan_policy not in ORPHAN_POLICIES:
            raise ValueError(
                f"saga {self.name!r}: unknown orphan_policy {self.orphan_policy!r}; "
                f"use one of {', '.join(ORPHAN_POLICIES)}"
            )

    @overload
    def step(self, fn: StepFunction) -> StepDefinition: ...
    @overload
    def step(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreakerPolicy | None = None,
        timeout_s: float | None = None,
        critical: bool = True,
        after: list[str] | tuple[str, ...] | None = None,
    ) -> Callable[[StepFunction], StepDefinition]: ...

    def step(
        self,
        fn: StepFunction | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreakerPolicy | None = None,
        timeout_s: float | None = None,
        critical: bool = True,
        after: list[str] | tuple[str, ...] | None = None,
    ) -> StepDefinition | Callable[[StepFunction], StepDefinition]:
        """Add a step (``@saga.step`` or ``@saga.step(retry=..., after=[...])``)."""
        self._check_step_options(retry, breaker, timeout_s)
        dependencies = self._check_after(after)

        def register(func: StepFunction) -> StepDefinition:
            definition = self._add_step(
                func,
                name=name,
                retry=retry,
                breaker=breaker,
                timeout_s=timeout_s,
                critical=critical,
                after=dependencies,
                group="",
            )
            self.nodes.append(definition)
            return definition

        return register(fn) if fn is not None else register

    def parallel(
        self,
        name: str,
        *,
        mode: str = "all",
        timeout_s: float | None = None,
        after: list[str] | tuple[str, ...] | None = None,
        critical: bool = True,
        schedule_to_close_s: float | None = None,
    ) -> ParallelGroup:
        """Declare a parallel group; add its branches with ``@group.branch``."""
        self._check_step_name(name)
        if mode not in GROUP_MODES:
            raise ValueError(
                f"saga {self.name!r} group {name!r}: unknown mode {mode!r}; "
                f"use one of {', '.join(GROUP_MODES)}"
            )
        self._check_step_options(None, None, timeout_s)
        self._check_seconds("schedule_to_close_s", schedule_to_close_s)
        group = ParallelGroup(
            self, name, mode, timeout_s, self._check_after(after), critical, schedule_to_close_s
        )
        self.nodes.append(group)
        return group

    def _add_step(
        self,
        func: StepFunction,
        *,
        name: str | None,
        retry: RetryPolicy | None,
        breaker: CircuitBreakerPolicy | None,
        timeout_s: float | None,
        critical: bool,
        after: tuple[str, ...] | None,
        group: str,
    ) -> StepDefinition:
        step_name = str(name or getattr(func, "__name__", ""))
        self._check_step_name(step_name)
        definition = StepDefinition(
            saga=self,
            name=step_name,
            index=len(self.steps),
            action=func,
            retry=retry or DEFAULT_RETRY,
            breaker=breaker,
            timeout_s=timeout_s,
            critical=critical,
            after=after,
            group=group,
        )
        self.steps.append(definition)
        return definition

    def _check_after(self, after: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
        if after is None:
            return None
        if isinstance(after, str) or not all(isinstance(a, str) for a in after):
            raise ValueError(f"saga {self.name!r}: after must be a list of step names")
        return tuple(after)

    def _check_step_name(self, step_name: str) -> None:
        if not STEP_NAME.match(step_name):
            raise ValueError(
                f"saga {self.name!r}: invalid step name {step_name!r} "
                f"(use letters, digits, '-' and '_')"
            )
        if self.get_step(step_name) is not None or self.get_group(step_name) is not None:
            raise ValueError(f"saga {self.name!r}: duplicate step name {step_name!r}")

    def _check_step_options(
        self,
        retry: RetryPolicy | None,
        breaker: CircuitBreakerPolicy | None,
        timeout_s: float | None,
    ) -> None:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValueError(f"saga {self.name!r}: retry must be a RetryPolicy")
        if breaker is not None and not isinstance(breaker, CircuitBreakerPolicy):
            raise ValueError(f"saga {self.name!r}: breaker must be a CircuitBreakerPolicy")
        self._check_seconds("timeout_s", timeout_s)

    def _check_seconds(self, name: str, value: float | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ValueError(f"saga {self.name!r}: {name} must be a positive number")

    def get_step(self, name: str) -> StepDefinition | None:
        return next((s for s in self.steps if s.name == name), None)

    def get_group(self, name: str) -> ParallelGroup | None:
        return next(
            (n for n in self.nodes if isinstance(n, ParallelGroup) and n.name == name), None
        )

    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """Each top-level node and the nodes it waits for (default: the one declared before)."""
        graph: dict[str, tuple[str, ...]] = {}
        for position, node in enumerate(self.nodes):
            default = (self.nodes[position - 1].name,) if position else ()
            graph[node.name] = node.after if node.after is not None else default
        return graph

    def levels(self) -> dict[str, int]:
        """Dependency level of every node and branch (0 = runs first); validates the graph."""
        graph = self.dependencies()
        self._check_graph(graph)
        levels: dict[str, int] = {}

        def level(name: str) -> int:
            if name not in levels:
                levels[name] = 1 + max((level(d) for d in graph[name]), default=-1)
            return levels[name]

        for name in graph:
            level(name)
        for group in (n for n in self.nodes if isinstance(n, ParallelGroup)):
            levels.update({b.name: levels[group.name] for b in group.branches})
        return levels

    @property
    def is_linear(self) -> bool:
        """One node after another, no groups: the whole task can share one lock."""
        return all(isinstance(n, StepDefinition) and n.after is None for n in self.nodes)

    def validate(self) -> None:
        """Check what can only be checked once the saga is complete (raises ``ValueError``)."""
        for group in (n for n in self.nodes if isinstance(n, ParallelGroup)):
            if not group.branches:
                raise ValueError(f"saga {self.name!r}: group {group.name!r} has no branches")
        self.levels()

    def _check_graph(self, graph: dict[str, tuple[str, ...]]) -> None:
        for name, deps in graph.items():
            unknown = [d for d in deps if d not in graph]
            if unknown:
                raise ValueError(
                    f"saga {self.name!r}: {name!r} runs after unknown step or group "
                    f"{unknown[0]!r} (branches cannot be waited for; wait for their group)"
                )
        cycle = _find_cycle(graph)
        if cycle:
            raise ValueError(f"saga {self.name!r}: after= forms a cycle: {' -> '.join(cycle)}")

    def action_policy(self, step: StepDefinition, task_input: dict[str, Any]) -> RetryPolicy:
        """The retry policy of ``step``'s action for a task with this input."""
        override = self.retry_override(task_input, step) if self.retry_override else None
        return override or step.retry


def _find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str]:
    """A dependency cycle as a path (first node repeated at the end), or []."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep] if dep in path else [name, dep, name]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[name] = "done"
        return []

    for name in graph:
        if name not in state and (found := visit(name, [name])):
            return found
    return []


class SagaRegistry:
    """The sagas this process knows, loaded from ``settings.SAGA_MODULES`` at app ready."""

    def __init__(self) -> None:
        self._sagas: dict[str, Saga] = {}
        self._origins: dict[str, str] = {}

    def register(self, saga: Saga, origin: str = "<code>") -> Saga:
        known = self._sagas.get(saga.name)
        if known is saga:
            return saga
        if known is not None:
            raise ImproperlyConfigured(
                f"two sagas are named {saga.name!r}: one in {self._origins[saga.name]}, "
                f"one in {origin}"
            )
        if not saga.steps:
            raise ImproperlyConfigured(f"saga {saga.name!r} in {origin} defines no steps")
        try:
            saga.validate()
        except ValueError as exc:
            raise ImproperlyConfigured(f"{exc} (in {origin})") from exc
        self._sagas[saga.name] = saga
        self._origins[saga.name] = origin
        return saga

    def unregister(self, name: str) -> None:
        self._sagas.pop(name, None)
        self._origins.pop(name, None)

    def load(self, module_paths: Iterable[str]) -> None:
        """Import each module and register every ``Saga`` it defines at module level."""
        for path in module_paths:
            try:
                module = importlib.import_module(path)
            except ImportError as exc:
                raise ImproperlyConfigured(f"SAGA_MODULES: cannot import {path!r}: {exc}") from exc
            for value in vars(module).values():
                if isinstance(value, Saga):
                    self.register(value, origin=path)

    def get(self, name: str) -> Saga:
        try:
            return self._sagas[name]
        except KeyError:
            raise UnknownSaga(name) from None

    def names(self) -> list[str]:
        return sorted(self._sagas)

    def breakers(self) -> dict[str, tuple[CircuitBreakerPolicy, list[str]]]:
        """Every breaker the sagas declare, with the ``saga.step`` names behind it."""
        found: dict[str, tuple[CircuitBreakerPolicy, list[str]]] = {}
        for saga in (self._sagas[name] for name in self.names()):
            for step in saga.steps:
                if step.breaker is not None:
                    behind = found.setdefault(step.breaker.name, (step.breaker, []))[1]
                    behind.append(f"{saga.name}.{step.name}")
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._sagas


registry = SagaRegistry()
