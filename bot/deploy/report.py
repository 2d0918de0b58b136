"""The report file attached when a deployment ends: plain text with every option, count and
failure (full stack traces included), for what the card and the thread have to cut short."""

from __future__ import annotations

from bot.deploy.payloads import (
    ACTION_LABEL,
    Coverage,
    FailureTotals,
    Outcome,
    counts,
    data_of,
    failed_without_reason,
    params_of,
    percent_text,
)
from bot.store.models import Operation


def deploy_report(op: Operation) -> str:
    params, data = params_of(op), data_of(op)
    result = data.result or Outcome(status="-")
    lines = [
        f"{ACTION_LABEL.get(params.action, 'Deploy')} {op.ref} to {op.org} ({params.org_kind})",
        f"Salesforce deployment id: {op.external_id or '-'}",
        f"Salesforce status: {result.status}",
        f"Requested by: {op.requester}  at {op.created_at.isoformat() if op.created_at else '-'}",
    ]
    if data.approved_by:
        lines.append("Approved by: " + ", ".join(data.approved_by))
    artifact = params.artifact
    if artifact:
        lines.append(
            f"Artifact: {artifact.ref} ({artifact.kind}, {artifact.files} files, "
            f"{artifact.compressed} bytes zipped, sha256 {artifact.sha256})"
        )
    if params.validation:
        lines.append(f"Quick deploy of validation {params.validation.ref} ({params.validation.id})")
    if params.options:
        lines.append(
            "Options: "
            + ", ".join(f"{key}={value}" for key, value in params.options.model_dump(exclude_unset=True).items())
        )
    deployed, total, errors = counts(result.components)
    lines.append(f"Components: {deployed} deployed, {errors} failed, {total} total")
    passed, tests_total, test_errors = counts(result.tests)
    lines.append(f"Apex tests: {passed} passed, {test_errors} failed, {tests_total} total")
    lines.append(f"Created: {result.created_date or '-'}   Completed: {result.completed_date or '-'}")
    if result.error_message:
        lines.append(f"Error: {result.error_status_code or ''} {result.error_message}".strip())
    totals = data.failure_totals or FailureTotals(
        components=len(data.component_failures), tests=len(data.test_failures)
    )
    lines += ["", f"Component failures ({totals.components})"]
    for f in data.component_failures:
        where = f.file_name + (f":{f.line}" if f.line else "") + (f":{f.column}" if f.column else "")
        lines.append(f"  {where}  {f.component_type} {f.full_name}  {f.problem_type}: {f.problem}")
    lines += ["", f"Apex test failures ({totals.tests})"]
    for t in data.test_failures:
        lines.append(f"  {t.qualified}")
        lines.append(f"    {t.message}")
        lines.extend(f"    {line}" for line in t.stack_trace.splitlines())
    for what, total_count, kept in (
        ("component", totals.components, len(data.component_failures)),
        ("test", totals.tests, len(data.test_failures)),
    ):
        if total_count - kept > 0:
            lines.append(f"({total_count - kept} more {what} failures were returned but not kept)")
    if data.coverage:
        lines += ["", "Code coverage", *_coverage_lines(data.coverage)]
    if failed_without_reason(op):
        lines += ["", "Salesforce gave no reason for this failure (no error, no failures, no coverage warnings)."]
    if data.status_url:
        lines.append(f"Deployment Status in Salesforce: {data.status_url}")
    return "\n".join(lines) + "\n"


def _coverage_lines(coverage: Coverage) -> list[str]:
    lines = []
    if coverage.average is not None:
        lines.append(
            f"  Average across all Apex classes and triggers: {percent_text(coverage.average)}"
            + (f" (at least {percent_text(coverage.required)} required)" if coverage.required is not None else "")
        )
    if coverage.flow_average is not None:
        lines.append(
            f"  Flows and processes: {percent_text(coverage.flow_average)}"
            + (
                f" (at least {percent_text(coverage.flow_required)} required)"
                if coverage.flow_required is not None
                else ""
            )
        )
    lines.extend(f"  {item.type or 'Apex'} {item.name}: {item.message}" for item in coverage.classes)
    lines.extend(f"  Flow {item.name}: {item.message}" for item in coverage.flows)
    lines.extend(f"  {message}" for message in coverage.other)
    return lines
