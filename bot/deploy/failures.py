"""Why a deployment failed, in Slack mrkdwn: counts, component and test failures, coverage below
the threshold, or that Salesforce gave no reason. Shared by the card, the thread and the
completion notice (``bot.deploy.messages``); every value from Salesforce goes through ``escape``.
"""

from __future__ import annotations

from bot.deploy.payloads import (
    Coverage,
    DeployData,
    FailureTotals,
    Outcome,
    counts,
    data_of,
    failed_without_reason,
    percent_text,
)
from bot.slack import blocks as bk
from bot.store.models import Operation, OpState

MAX_LISTED_FAILURES = 20
MAX_LISTED_COVERAGE = 10  # on the card; the thread lists up to MAX_LISTED_FAILURES, the report all


def n(value: int | None) -> str:
    return f"{int(value or 0):,}"


def status_link(op: Operation) -> str:
    url = data_of(op).status_url
    return f"<{url}|its Deployment Status page>" if url else "Setup → Deployment Status"


def _figures(average: float, required: float | None, *, bold: str) -> str:
    return f"{bold}{percent_text(average)}{bold}" + (
        f", at least {bold}{percent_text(required)}{bold} required." if required is not None else "."
    )


def coverage_text(op: Operation, *, limit: int = MAX_LISTED_COVERAGE) -> str | None:
    """Why coverage failed it: the org-wide average and threshold, the classes, triggers and flows
    Salesforce named below it. None when Salesforce sent no coverage warning."""
    coverage = data_of(op).coverage
    if not coverage:
        return None
    failed = op.state == OpState.FAILED
    lines = ["🧪 *Code coverage too low*" if failed else "🧪 *Code coverage warnings*"]
    if coverage.average is not None:
        lines.append(
            "Average across all Apex classes and triggers: " + _figures(coverage.average, coverage.required, bold="*")
        )
    if coverage.flow_average is not None:
        lines.append("Flows and processes: " + _figures(coverage.flow_average, coverage.flow_required, bold="*"))
    named = [(item.type or "Apex", item.name, item.percent, item.required, item.message) for item in coverage.classes]
    named += [("Flow", item.name, item.percent, item.required, item.message) for item in coverage.flows]
    for label, name, percent, required, message in named[:limit]:
        if percent is not None:
            figure = percent_text(percent) + (f" (at least {percent_text(required)})" if required is not None else "")
        else:
            figure = bk.escape(bk.clip(message, 200))
        lines.append(f"• {label} `{bk.escape(name)}`: {figure}")
    if len(named) > limit:
        lines.append(f"…and {len(named) - limit:,} more in the report file.")
    lines.extend(f"• {bk.escape(bk.clip(message, 300))}" for message in coverage.other[:3])
    return "\n".join(lines)


def coverage_summary(op: Operation) -> str | None:
    """One line: the average against the threshold and what is below it, by name."""
    coverage = data_of(op).coverage
    if not coverage:
        return None
    return f"🧪 {_coverage_title(op)}" + _coverage_parts(coverage)


def _coverage_title(op: Operation) -> str:
    return "Code coverage too low" if op.state == OpState.FAILED else "Code coverage warnings"


def _coverage_parts(coverage: Coverage) -> str:
    parts = []
    if coverage.average is not None:
        parts.append(
            f"average {percent_text(coverage.average)}"
            + (f", at least {percent_text(coverage.required)} required" if coverage.required is not None else "")
        )
    names = [item.name for item in coverage.classes] + [item.name for item in coverage.flows]
    if names:
        shown = ", ".join(f"`{bk.escape(name)}`" for name in names[:5])
        parts.append(f"below it: {shown}" + (f" and {len(names) - 5:,} more" if len(names) > 5 else ""))
    return ": " + "; ".join(parts) if parts else " (see the report)."


def no_reason_text(op: Operation) -> str:
    status = (data_of(op).result or Outcome()).status or "Failed"
    return (
        f"❗ Salesforce marked it {status} and gave no reason: "
        f"no error, no component or test failure, no coverage warning. See {status_link(op)} in `{op.org}`."
    )


def _first_own_frame(stack: str) -> str | None:
    """The stack line that points into the org's code (``Class.…``/``Trigger.…``); real traces
    often start with ``External entry point`` or ``(System Code)``. Else the first line."""
    lines = [line.strip() for line in stack.strip().splitlines() if line.strip()]
    own = next((line for line in lines if line.startswith(("Class.", "Trigger."))), None)
    return own or (lines[0] if lines else None)


def result_text(op: Operation, *, compact: bool = False) -> str:
    """Counts and why it failed; ``compact`` for the completion notice, whose thread (or the card)
    has the full coverage list."""
    data = data_of(op)
    result = data.result or Outcome()
    deployed, total, errors = counts(result.components)
    passed, tests_total, test_errors = counts(result.tests)
    lines = [
        f"Components: ✅ {n(deployed)} · ❌ {n(errors)} of {n(total)}"
        + (f"   Apex tests: ✅ {n(passed)} · ❌ {n(test_errors)} of {n(tests_total)}" if tests_total else "")
    ]
    if result.status == "Canceled" and result.canceled_by_name and not data.canceled_by:
        lines.append(f"✋ Canceled in Salesforce by {bk.escape(result.canceled_by_name)}.")
    if result.error_message:
        code = result.error_status_code
        lines.append(f"❗ {bk.escape((code + ': ' if code else '') + result.error_message)}")
    totals = data.failure_totals or FailureTotals()
    if totals.components or totals.tests:
        lines.append(
            f"{n(totals.components)} component failure(s) and {n(totals.tests)} test failure(s): "
            "listed in the thread, with the full report attached."
        )
    coverage = coverage_summary(op) if compact else coverage_text(op)
    if coverage:
        lines.append(coverage)
    if failed_without_reason(op):
        lines.append(no_reason_text(op))
    return "\n".join(lines)


def failures_text(op: Operation) -> str | None:
    """Why it failed, for the thread: component failures (file, line, problem type, problem), test
    failures (Class.method, message, the stack line in the org's code), coverage below the
    threshold — or that Salesforce gave no reason, with the link to look further."""
    data = data_of(op)
    coverage = coverage_text(op, limit=MAX_LISTED_FAILURES)
    # A failure without any reason gets no list here: the completion notice, in this thread too,
    # says so with the link.
    if not data.component_failures and not data.test_failures and not coverage:
        return None
    lines = _component_lines(data) + _test_lines(data)
    if coverage:
        lines.append(coverage)
    return bk.clip("\n".join(lines), bk.MESSAGE_TEXT_MAX)


def _totals(data: DeployData) -> FailureTotals:
    return data.failure_totals or FailureTotals(components=len(data.component_failures), tests=len(data.test_failures))


def _more(total: int, listed: int) -> list[str]:
    more = total - min(listed, MAX_LISTED_FAILURES)
    return [f"…and {more:,} more in the report file."] if more > 0 else []


def _component_lines(data: DeployData) -> list[str]:
    failures = data.component_failures
    if not failures:
        return []
    total = _totals(data).components
    lines = [f"*Component failures ({n(total)})*"]
    for f in failures[:MAX_LISTED_FAILURES]:
        where = bk.escape(f.file_name or f.full_name or "?")
        line = f" line {f.line}" if f.line else ""
        lines.append(
            f"• `{where}`{line} — {bk.escape(f.problem_type or 'Error')}: {bk.escape(bk.clip(f.problem, 300))}"
        )
    return lines + _more(total, len(failures))


def _test_lines(data: DeployData) -> list[str]:
    failures = data.test_failures
    if not failures:
        return []
    total = _totals(data).tests
    lines = [f"*Apex test failures ({n(total)})*"]
    for t in failures[:MAX_LISTED_FAILURES]:
        frame = _first_own_frame(t.stack_trace)
        lines.append(
            f"• `{bk.escape(t.qualified or t.class_name)}` — {bk.escape(bk.clip(t.message, 300))}"
            + (f"\n    `{bk.escape(bk.clip(frame, 200))}`" if frame else "")
        )
    return lines + _more(total, len(failures))
