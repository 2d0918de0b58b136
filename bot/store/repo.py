"""Every repository function under one name (``from bot.store import repo``; ``repo.audit(…)``).

The functions live by what they hold: operations, leases, approvals, audit, push targets, the
Slack outbox. Each takes a ``Store`` first: the caller's session, so a decision spanning several
statements is one transaction the caller commits (``async with db.transaction() as session``),
or the Database, for a transaction of its own.
"""

from __future__ import annotations

from bot.store.approvals import add_approval, approvals_for, approvers
from bot.store.audit import audit, audit_events, claim_delivery
from bot.store.db import Store, unit_of_work
from bot.store.leases import claim_due, extend_leases, record_announced, release_lease, release_many
from bot.store.operations import (
    count_operations,
    find_operation,
    get_operation,
    insert_operation,
    list_operations,
    operation_by_external_id,
    operations_by_ids,
    parse_ref,
    update_many,
    update_operation,
)
from bot.store.push_targets import (
    add_push_targets,
    push_request_claims,
    push_targets,
    record_push_failures,
    record_push_job_results,
)

__all__ = [
    "Store",
    "add_approval",
    "add_push_targets",
    "approvals_for",
    "approvers",
    "audit",
    "audit_events",
    "claim_delivery",
    "claim_due",
    "count_operations",
    "extend_leases",
    "find_operation",
    "get_operation",
    "insert_operation",
    "list_operations",
    "operation_by_external_id",
    "operations_by_ids",
    "parse_ref",
    "push_request_claims",
    "push_targets",
    "record_announced",
    "record_push_failures",
    "record_push_job_results",
    "release_lease",
    "release_many",
    "unit_of_work",
    "update_many",
    "update_operation",
]
