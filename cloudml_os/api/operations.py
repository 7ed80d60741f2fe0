"""``/v1/projects/{p}/operations``: read, list and cancel long-running operations (Cloud ML Engine v1).

Version create, delete and scale answer with an operation that the serving workflow completes; model
and version edits that need no node answer with one that is already done. These views only read the
rows the workflow keeps and record a cancel request; the workflow honours it (a version that is still
being created is torn down) and marks the operation done with a ``CANCELLED`` error.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloudml_os.api import ApiBlueprint, resource_name, services
from cloudml_os.api.filters import compare, parse_list_filter
from cloudml_os.api.models import OperationView, list_page, operation_views
from cloudml_os.api.schemas import (
    EmptySchema,
    ListOperationsQuerySchema,
    ListOperationsResponseSchema,
    OperationSchema,
)
from cloudml_os.errors import FailedPrecondition, NotFound
from cloudml_os.store.models import Operation, VersionEvent

blp = ApiBlueprint("operations", __name__, url_prefix="/v1/projects/<project:project>",
                   description="Long-running operations of model versions (Cloud ML Engine v1).")

OPERATION_TYPES = ("CREATE_VERSION", "DELETE_VERSION", "UPDATE_VERSION", "DELETE_MODEL", "UPDATE_MODEL")


def _operation_or_404(session: Session, project: str, operation: str) -> Operation:
    row = session.scalar(select(Operation).where(Operation.project == project, Operation.name == operation))
    if row is None:
        raise NotFound(f"{resource_name(project, 'operations', operation)} not found")
    return row


@blp.route("/operations/<operation_id:operation>", methods=["GET"])
@blp.response(200, OperationSchema)
def get_operation(project: str, operation: str) -> OperationView:
    """Describe an operation: done, and then its error or result (v1 ``operations.get``)."""
    with services().store.session() as session:
        return operation_views(session, [_operation_or_404(session, project, operation)])[0]


@blp.route("/operations", methods=["GET"])
@blp.arguments(ListOperationsQuerySchema, location="query")
@blp.response(200, ListOperationsResponseSchema)
def list_operations(args: dict[str, Any], project: str) -> dict[str, Any]:
    """List a project's operations, newest first (v1 ``operations.list``)."""
    columns = {"done": Operation.done, "operationType": Operation.kind}
    conditions = []
    for condition in parse_list_filter(args["filter"], {"done": ("true", "false"), "operationType": OPERATION_TYPES}):
        if condition.field == "done":
            wanted = (condition.value == "true") == (condition.op == "=")
            conditions.append(Operation.done.is_(wanted))
        else:
            conditions.append(compare(columns[condition.field], condition))
    with services().store.session() as session:
        rows, token = list_page(session, select(Operation).where(Operation.project == project, *conditions),
                                Operation.id, args, newest_first=True)
        result: dict[str, Any] = {"operations": operation_views(session, rows)}
    if token:
        result["nextPageToken"] = token
    return result


@blp.route("/operations/<operation_id:operation>:cancel", methods=["POST"])
@blp.response(200, EmptySchema)
def cancel_operation(project: str, operation: str) -> dict[str, Any]:
    """Ask for an operation to be cancelled (v1 ``operations.cancel``); the workflow honours it.

    A deletion cannot be cancelled, nor can an operation that is done.
    """
    with services().store.session() as session:
        row = _operation_or_404(session, project, operation)
        name = resource_name(project, "operations", operation)
        if row.done:
            raise FailedPrecondition(f"{name} is already done")
        if row.kind == "DELETE_VERSION":
            raise FailedPrecondition(f"{name}: a deletion cannot be cancelled")
        if row.cancel_requested:
            return {}
        moved = session.execute(update(Operation).where(Operation.id == row.id, Operation.done.is_(False))
                                .values(cancel_requested=True).execution_options(synchronize_session=False))
        if moved.rowcount and row.version_id is not None:
            session.add(VersionEvent(version_id=row.version_id, kind="STATE",
                                     message=f"Cancellation of {row.kind} requested"))
    return {}
