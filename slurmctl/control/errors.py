"""The errors of operating a job. Each carries the message the CLI prints and the exit code it exits with: 2 when
nothing was done (refused: a bad request, a running job, a budget to raise), 1 when something was tried and did not
work (the message says what state things are in and what to run next)."""

from __future__ import annotations


class ControlError(Exception):
    """Refused: nothing was changed. The message says why and what to do."""

    exit_code = 2


class JobRunning(ControlError):
    """The job's coordinator is alive: it cannot be resumed (or its budget raised) under it."""


class BudgetRefused(ControlError):
    """The job is paused at its budget (or the raise is malformed or too low): ``raise_budget`` decides."""


class NothingToDo(ControlError):
    """The request does not apply to this job (a pause without rate limits, an unknown limit, a gc'd job's
    aggregation)."""


class ControlFailed(ControlError):
    """Tried, and it did not work: the message says what state the job is in and what to run again."""

    exit_code = 1


class LimitNotChanged(ControlFailed):
    """A rate limit's backend or its signal could not be written; the message says what state things are in."""


class SubmitRefused(ControlError, ValueError):
    """Nothing was submitted: ``problems`` are (field, message) pairs, as ``ConfigError``'s."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("cannot submit\n" + "\n".join(f"  {f}: {m}" for f, m in problems))


class SubmitFailed(ControlFailed, RuntimeError):
    """The job exists but its coordinator did not start; the message says what to fix, then ``resume``."""
