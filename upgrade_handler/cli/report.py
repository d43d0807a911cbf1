"""What happened to a delivery, in words: read from the handler's events and its :class:`Outcome`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..outcome import Outcome
from .events import Event

#: How an outcome is called in the command line's output.
OUTCOME_WORDS = {
    Outcome.UPGRADED: "upgraded",
    Outcome.CURRENT: "current",
    Outcome.SKIPPED: "skipped",
    Outcome.RETRY_SCHEDULED: "retry scheduled",
    Outcome.DEAD_LETTERED: "dead-lettered",
    Outcome.FANNED_OUT: "fanned out",
}
ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class Summary:
    """One delivery in a few words: outcome, Graph's last answer, attempts so far, and the story."""

    outcome: str
    graph: str
    attempts: int | None
    steps: tuple[str, ...]
    reason: str | None = None

    @property
    def detail(self) -> str:
        return "; ".join(self.steps)


def graph_answer(event: Event) -> str:
    """``502 BadGateway``, ``204``, ``ConnectionError``: Graph's status and error code, as far as known."""
    status, code = event.get("graph_status"), event.get("graph_error_code")
    return " ".join(str(part) for part in (status, code) if part is not None)


def summarise(outcome: Outcome | None, events: Sequence[Event], error: BaseException | None = None) -> Summary:
    steps: list[str] = []
    graph, attempts, reason = "", None, None
    for event in events:
        attempt = event.get("attempt", event.get("attempts"))
        if isinstance(attempt, int):
            attempts = attempt
        answer = graph_answer(event)
        if answer:
            graph = answer
        if event.name == "upgrade.attempt_failed":
            steps.append(f"attempt {attempt}: Graph {answer}, {event.get('next', 'retrying')}")
        elif event.name == "upgrade.succeeded":
            steps.append(f"attempt {attempt}: Graph {answer}, upgraded")
        elif event.name == "upgrade.retry_scheduled":
            when = str(event.get("retry_at", "")).rpartition("T")[2]
            steps.append(f"attempt {attempt}: Graph {answer}, retry copy scheduled for {when}")
        elif event.name == "upgrade.already_current":
            steps.append(
                f"attempt {attempt}: runs {event.get('installed_version')}, at least "
                f"{event.get('requested_version')}: already current, no upgrade call"
            )
        elif event.name == "upgrade.skipped":
            steps.append(f"attempt {attempt}: not installed, ifNotInstalled is skip")
        elif event.name == "upgrade.fanned_out":
            steps.append(f"{event.get('children')} single-user requests put on the queue")
        elif event.name == "upgrade.dead_lettered":
            reason = str(event.get("reason"))
            steps.append(f"to the dead-letter queue: {event.get('description')}")
    if error is not None:
        steps.append(f"handler raised {type(error).__name__}: {error}; message abandoned, it will be delivered again")
    word = OUTCOME_WORDS[outcome] if outcome is not None else ABANDONED
    return Summary(word, graph, attempts, tuple(steps), reason)


def journey(summaries: Iterable[Summary]) -> Summary:
    """Several deliveries of one request (a retry copy after the original) as one summary: the last word wins."""
    items = list(summaries)
    if not items:
        raise ValueError("no deliveries")
    last = items[-1]
    steps = tuple(step for item in items for step in item.steps)
    attempts = max((item.attempts for item in items if item.attempts is not None), default=None)
    return Summary(last.outcome, last.graph, attempts, steps, last.reason)
