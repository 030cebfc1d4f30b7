"""``/v1/dead``: an operation's dead letters over HTTP (list, show, requeue, purge).

Each call opens a broker connection of its own for its duration; the broker
work is in ``manager/dead_letters.py``. An operation that is not declared is a
404 unless its dead-letter queue is still there (an operation deleted while it
held dead letters: they stay until purged); a declared one whose dead-letter
queue does not exist yet has none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query

from streamboss.agent.naming import NAME_PATTERN, dead_queue

from .. import dead_letters
from ..api_models import NAME_SCHEMA, READ, WRITE, errors
from ..store import StoreError

if TYPE_CHECKING:
    from ..api import Manager


# An operation's name in a path: the pattern is the schema's; any other is a 404.
OperationPath = Annotated[str, Path(json_schema_extra=NAME_SCHEMA)]


def router(manager: Manager) -> APIRouter:
    """The dead-letter routes, working on ``manager``'s store and broker URL."""
    routes = APIRouter(prefix="/v1/dead", tags=["dead letters"])

    def known(operation: str) -> str:
        # Only a well-formed name can name a queue of ours left behind (and only such
        # a name may reach the broker).
        if manager.store.get_operation(operation) is None and not (
                NAME_PATTERN.fullmatch(operation)
                and dead_letters.held(manager.broker.url, operation)):
            raise StoreError(f"operation {operation!r} does not exist: `streamboss list "
                             "operations` shows the declared ones", 404)
        return operation

    @routes.get("", responses=errors(*READ, 404, 503))
    def list_dead_letters(operation: Annotated[str | None, Query(
            description="only this operation", json_schema_extra=NAME_SCHEMA)] = None
            ) -> list[dict[str, Any]]:
        """Per operation: dead letters held, the oldest one's time, and counts by
        path and by reason among the first ``scanned``."""
        names = [known(operation)] if operation is not None else \
            [op.name for op in manager.store.operations()]
        return dead_letters.summaries(manager.broker.url, names)

    @routes.get("/{operation}", responses=errors(*READ, 404, 503))
    def show_dead_letters(operation: OperationPath, count: Annotated[int, Query(
            ge=1, le=dead_letters.SHOW_LIMIT, description="how many, from the head")]
            = dead_letters.SHOW_DEFAULT) -> dict[str, Any]:
        """The first ``count`` dead letters with headers and bodies; they stay in
        the queue, in their order."""
        return dead_letters.show(manager.broker.url, known(operation), count)

    @routes.post("/{operation}/requeue", responses=errors(*WRITE, 404, 409, 503))
    def requeue_dead_letters(operation: OperationPath, count: Annotated[int | None, Query(
            ge=1, description="how many, from the head [all held now]")] = None
            ) -> dict[str, Any]:
        """Move dead letters back into the operation's input queue, attempts reset,
        each acked only after its copy is confirmed."""
        try:
            return dead_letters.requeue(manager.broker.url, known(operation), count)
        except dead_letters.RequeueError as exc:
            raise HTTPException(409, str(exc)) from None

    @routes.delete("/{operation}", responses=errors(*WRITE, 404, 503))
    def purge_dead_letters(operation: OperationPath) -> dict[str, Any]:
        """Delete every dead letter of the operation."""
        purged = dead_letters.purge(manager.broker.url, known(operation))
        return {"operation": operation, "queue": dead_queue(operation),
                "purged": purged}

    return routes
