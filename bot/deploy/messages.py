"""Everything a person reads about deployments: the status card, thread replies, lists.

Pure functions from plain data to ``(text, blocks)``; no I/O. Every value that came from a user
or from Salesforce (file names, problems, test messages, artifact names) goes through
``escape``. The card shows only state, never elapsed time, so it changes — and is edited —
only when the deployment does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.deploy.service import (
    ACTION_LABEL,
    DeployPlan,
    OrgInfo,
    QuickPlan,
    failed_without_reason,
    percent_text,
    validation_usable_until,
)
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
from bot.store.models import Operation, OpState

MAX_LISTED_FAILURES = 20
MAX_LISTED_COVERAGE = 10  # on the card; the thread lists up to MAX_LISTED_FAILURES, the report all
NON_DEFAULT_OPTIONS = {
    "ignore_warnings": "ignoreWarnings",
    "purge_on_delete": "purgeOnDelete",
    "allow_missing_files": "allowMissingFiles",
    "auto_update_package": "autoUpdatePackage",
    "perform_retrieve": "performRetrieve",
}


def _n(value: Any) -> str:
    return f"{int(value or 0):,}"


def _size(value: Any) -> str:
    size = int(value or 0)
    return f"{size / 1_000_000:,.1f} MB" if size >= 100_000 else f"{max(1, round(size / 1000)):,} KB"


def _title(op: Operation) -> str:
    action = str(op.params.get("action") or "deploy")
    return f"{ACTION_LABEL.get(action, 'Deploy')} {op.ref} · {op.org}"


def _what(op: Operation) -> str:
    validation = op.params.get("validation") or {}
    if validation:
        return f"validation {validation.get('ref')} ({bk.escape(str(validation.get('artifact') or '?'))})"
    artifact = op.params.get("artifact") or {}
    return (
        f"`{bk.escape(str(artifact.get('name') or '?'))}` "
        f"({_n(artifact.get('files'))} files, {_size(artifact.get('compressed'))})"
    )


def _tests_text(op: Operation) -> str:
    if op.params.get("action") == "quick_deploy":
        return "none (ran in the validation)"
    options = op.params.get("options") or {}
    default = "org default (local tests if Apex)" if op.params.get("org_kind") == "production" else "none"
    level = options.get("test_level") or default
    tests = options.get("run_tests") or []
    if tests:
        shown = ", ".join(bk.escape(str(t)) for t in tests[:5]) + (f" +{len(tests) - 5}" if len(tests) > 5 else "")
        return f"{level}: {shown}"
    return str(level)


def _options_text(op: Operation) -> str:
    options = op.params.get("options") or {}
    if not options:
        return ""
    words = [
        "checkOnly" if options.get("check_only") else "",
        f"rollbackOnError={'true' if options.get('rollback_on_error') else 'false'}",
        "singlePackage" if options.get("single_package") else "",
        *(label for key, label in NON_DEFAULT_OPTIONS.items() if options.get(key)),
    ]
    return " · ".join(word for word in words if word)


def _bar_line(label: str, counts: Sequence[Any], *, unit: str) -> str:
    done_ok, total, errors = (int(x or 0) for x in [*counts, 0, 0, 0][:3])
    done = done_ok + errors  # Salesforce counts failures apart from what went through
    line = f"{label} `{bk.progress_bar(done, total)}` {_n(done)}/{_n(total)}"
    if errors:
        line += f" · ❌ {_n(errors)} {unit}"
    return line


def status_label(op: Operation) -> str:
    """The state in words; for a finished deployment Salesforce's own status decides."""
    state = OpState(op.state)
    sf_status = (op.data.get("result") or {}).get("status") or (op.data.get("progress") or {}).get("status")
    if state == OpState.RUNNING and sf_status == "Pending":
        return "⏳ Queued in Salesforce"
    if state == OpState.RUNNING and sf_status == "InProgress":
        return "🚀 Deploying" if op.params.get("action") != "validate" else "🔎 Validating"
    if state == OpState.FAILED and sf_status == "SucceededPartial":
        return "⚠️ Partly deployed (SucceededPartial)"
    if state == OpState.FAILED:
        return "❌ Validation failed" if op.params.get("action") == "validate" else "❌ Failed"
    if state == OpState.SUCCEEDED and op.params.get("action") == "validate":
        return "✅ Validated"
    return STATE_LABEL[state]


def deploy_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a deployment, edited in place as it progresses."""
    params, data = op.params, op.data
    state = OpState(op.state)
    title = _title(op)
    fields = [
        f"*Status*\n{status_label(op)}",
        f"*Org*\n`{op.org}` ({params.get('org_kind')})",
        f"*Artifact*\n{_what(op)}",
        f"*Apex tests*\n{_tests_text(op)}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Starts*\n{slack_date(op.scheduled_for)}"
        if op.scheduled_for
        else f"*Requested*\n{slack_date(op.created_at)}",
    ]
    blocks: list[Block] = [bk.header(title), bk.fields_section(fields)]
    options = _options_text(op)
    if options:
        blocks.append(bk.context(f"Options: {options}"))
    for note in params.get("notes") or []:
        blocks.append(bk.context(f"ℹ️ {bk.escape(str(note))}"))

    progress = data.get("progress") or {}
    result = data.get("result")
    if result:
        blocks.append(bk.section(_result_text(op)))
    elif progress and state in {OpState.RUNNING, OpState.CANCELING}:
        blocks.append(bk.section(_progress_text(op, progress)))

    until = validation_usable_until(op)
    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    elif state in {OpState.SCHEDULED, OpState.STARTING, OpState.RUNNING}:
        blocks.append(bk.actions([_cancel_button(op)], block_id=f"deploy:{op.id}"))
    elif until is not None:
        blocks.append(
            bk.section(
                f"⚡ Validated with Apex tests: it can be quick-deployed to `{op.org}` until {slack_date(until)} "
                f"(`/deploy quick {op.ref}`)."
            )
        )
        blocks.append(bk.actions([_quick_button(op)], block_id=f"deploy:{op.id}"))
    if state == OpState.REJECTED:
        reason = bk.escape(data.get("reject_reason") or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.get('rejected_by')}>: {reason}"))
    if state == OpState.CANCELING:
        blocks.append(bk.section(f"✋ <@{data.get('cancel_requested_by')}> asked Salesforce to cancel it; canceling…"))
    if state == OpState.CANCELED and data.get("canceled_by"):
        blocks.append(bk.section(f"✋ Canceled by <@{data['canceled_by']}>."))
    if data.get("finished_before_cancel"):
        blocks.append(bk.context("Salesforce finished it before the cancel took effect."))
    if state == OpState.ERROR and data.get("error"):
        blocks.append(bk.section(f"❗ {bk.escape(data['error'])}"))
    if data.get("last_problem") and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ Salesforce trouble, retrying automatically: {bk.escape(data['last_problem'])}"))
    context = [f"`{op.ref}`"]
    if op.external_id:
        context.append(_salesforce_id(op))
    if data.get("approved_by"):
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data["approved_by"]))
    blocks.append(bk.context(" · ".join(context)))
    return f"{bk.escape(title)}: {status_label(op)}", bk.limit_blocks(blocks)  # mrkdwn, unlike the header


def _salesforce_id(op: Operation) -> str:
    """The deploy id, and a link to the org's Deployment Status page of it when the bot built one
    (from the org's instance URL and the id, never from anything typed in Slack)."""
    text = f"Salesforce id `{op.external_id}`"
    url = op.data.get("status_url")
    return f"{text} · <{url}|Deployment Status>" if url else text


def _status_link(op: Operation) -> str:
    url = op.data.get("status_url")
    return f"<{url}|its Deployment Status page>" if url else "Setup → Deployment Status"


def coverage_text(op: Operation, *, limit: int = MAX_LISTED_COVERAGE) -> str | None:
    """Why coverage failed it: the org-wide average and threshold, the classes, triggers and flows
    Salesforce named below it. None when Salesforce sent no coverage warning."""
    coverage = op.data.get("coverage")
    if not coverage:
        return None
    failed = op.state == OpState.FAILED
    lines = ["🧪 *Code coverage too low*" if failed else "🧪 *Code coverage warnings*"]
    if coverage.get("average") is not None:
        required = coverage.get("required")
        lines.append(
            f"Average across all Apex classes and triggers: *{percent_text(coverage['average'])}*"
            + (f", at least *{percent_text(required)}* required." if required is not None else ".")
        )
    if coverage.get("flow_average") is not None:
        required = coverage.get("flow_required")
        lines.append(
            f"Flows and processes: *{percent_text(coverage['flow_average'])}*"
            + (f", at least *{percent_text(required)}* required." if required is not None else ".")
        )
    named = [("Apex", item) for item in coverage.get("classes") or []] + [
        ("Flow", item) for item in coverage.get("flows") or []
    ]
    for kind, item in named[:limit]:
        label = "Flow" if kind == "Flow" else (item.get("type") or "Apex")
        if item.get("percent") is not None:
            figure = percent_text(item["percent"]) + (
                f" (at least {percent_text(item['required'])})" if item.get("required") is not None else ""
            )
        else:
            figure = bk.escape(bk.clip(str(item.get("message") or ""), 200))
        lines.append(f"• {label} `{bk.escape(str(item.get('name')))}`: {figure}")
    if len(named) > limit:
        lines.append(f"…and {len(named) - limit:,} more in the report file.")
    lines.extend(f"• {bk.escape(bk.clip(str(message), 300))}" for message in (coverage.get("other") or [])[:3])
    return "\n".join(lines)


def coverage_summary(op: Operation) -> str | None:
    """One line: the average against the threshold and what is below it, by name."""
    coverage = op.data.get("coverage")
    if not coverage:
        return None
    parts = []
    if coverage.get("average") is not None:
        required = coverage.get("required")
        parts.append(
            f"average {percent_text(coverage['average'])}"
            + (f", at least {percent_text(required)} required" if required is not None else "")
        )
    names = [str(item.get("name")) for item in [*(coverage.get("classes") or []), *(coverage.get("flows") or [])]]
    if names:
        shown = ", ".join(f"`{bk.escape(name)}`" for name in names[:5])
        parts.append(f"below it: {shown}" + (f" and {len(names) - 5:,} more" if len(names) > 5 else ""))
    title = "Code coverage too low" if op.state == OpState.FAILED else "Code coverage warnings"
    return f"🧪 {title}" + (": " + "; ".join(parts) if parts else " (see the report).")


def no_reason_text(op: Operation) -> str:
    return (
        f"❗ Salesforce marked it {(op.data.get('result') or {}).get('status') or 'Failed'} and gave no reason: "
        f"no error, no component or test failure, no coverage warning. See {_status_link(op)} in `{op.org}`."
    )


def _first_own_frame(stack: str) -> str | None:
    """The stack line that points into the org's code (``Class.…``/``Trigger.…``); real traces
    often start with ``External entry point`` or ``(System Code)``. Else the first line."""
    lines = [line.strip() for line in stack.strip().splitlines() if line.strip()]
    own = next((line for line in lines if line.startswith(("Class.", "Trigger."))), None)
    return own or (lines[0] if lines else None)


def _progress_text(op: Operation, progress: dict[str, Any]) -> str:
    status = progress.get("status")
    if status == "Pending":
        ahead = int(progress.get("queue_ahead") or 0)
        if ahead:
            return (
                f"⏳ Pending in Salesforce: queued behind {ahead} deployment{'s' if ahead > 1 else ''} to "
                f"`{op.org}` sent from here (queue position {ahead + 1}). Salesforce runs one deployment per org "
                "at a time."
            )
        return "⏳ Pending in Salesforce: waiting for it to start (Salesforce runs one deployment per org at a time)."
    lines = [
        _bar_line("Components", progress.get("components") or [], unit="failed"),
        _bar_line("Apex tests", progress.get("tests") or [], unit="failed"),
    ]
    if progress.get("current_test"):
        lines.append(f"▶️ Running test `{bk.escape(str(progress['current_test']))}`")
    elif progress.get("state_detail"):
        lines.append(f"⚙️ {bk.escape(str(progress['state_detail']))}")
    return "\n".join(lines)


def _result_text(op: Operation, *, compact: bool = False) -> str:
    """Counts and why it failed; ``compact`` for the completion notice, whose thread (or the card)
    has the full coverage list."""
    data = op.data
    result = data.get("result") or {}
    deployed, total, errors = (int(x or 0) for x in (result.get("components") or [0, 0, 0])[:3])
    passed, tests_total, test_errors = (int(x or 0) for x in (result.get("tests") or [0, 0, 0])[:3])
    lines = [
        f"Components: ✅ {_n(deployed)} · ❌ {_n(errors)} of {_n(total)}"
        + (f"   Apex tests: ✅ {_n(passed)} · ❌ {_n(test_errors)} of {_n(tests_total)}" if tests_total else "")
    ]
    if result.get("status") == "Canceled" and result.get("canceled_by_name") and not data.get("canceled_by"):
        lines.append(f"✋ Canceled in Salesforce by {bk.escape(str(result['canceled_by_name']))}.")
    if result.get("error_message"):
        code = result.get("error_status_code")
        lines.append(f"❗ {bk.escape((code + ': ' if code else '') + str(result['error_message']))}")
    totals = data.get("failure_totals") or {}
    if totals.get("components") or totals.get("tests"):
        lines.append(
            f"{_n(totals.get('components'))} component failure(s) and {_n(totals.get('tests'))} test failure(s): "
            "listed in the thread, with the full report attached."
        )
    coverage = coverage_summary(op) if compact else coverage_text(op)
    if coverage:
        lines.append(coverage)
    if failed_without_reason(op):
        lines.append(no_reason_text(op))
    return "\n".join(lines)


def _cancel_button(op: Operation) -> Block:
    return bk.button(
        "Cancel",
        action_id="deploy_cancel",
        value=str(op.id),
        confirm=(
            "Cancel this deployment?",
            f"Cancel {op.ref}? If Salesforce has started it, it rolls back what it did.",
            "Cancel deployment",
        ),
    )


def _quick_button(op: Operation) -> Block:
    return bk.button(
        "Quick deploy",
        action_id="deploy_quick",
        value=str(op.id),
        style="primary",
        confirm=(
            "Quick deploy?",
            f"Deploy the components validated in {op.ref} to `{op.org}` without running the tests again?",
            "Quick deploy",
        ),
    )


def failures_text(op: Operation) -> str | None:
    """Why it failed, for the thread: component failures (file, line, problem type, problem), test
    failures (Class.method, message, the stack line in the org's code), coverage below the
    threshold — or that Salesforce gave no reason, with the link to look further."""
    data = op.data
    components = data.get("component_failures") or []
    tests = data.get("test_failures") or []
    coverage = coverage_text(op, limit=MAX_LISTED_FAILURES)
    # A failure without any reason gets no list here: the completion notice, in this thread too,
    # says so with the link.
    if not components and not tests and not coverage:
        return None
    totals = data.get("failure_totals") or {}
    lines: list[str] = []
    if components:
        lines.append(f"*Component failures ({_n(totals.get('components', len(components)))})*")
        for f in components[:MAX_LISTED_FAILURES]:
            where = bk.escape(str(f.get("file_name") or f.get("full_name") or "?"))
            line = f" line {f['line']}" if f.get("line") else ""
            lines.append(
                f"• `{where}`{line} — {bk.escape(str(f.get('problem_type') or 'Error'))}: "
                f"{bk.escape(bk.clip(str(f.get('problem') or ''), 300))}"
            )
        more = int(totals.get("components", len(components))) - min(len(components), MAX_LISTED_FAILURES)
        if more > 0:
            lines.append(f"…and {more:,} more in the report file.")
    if tests:
        lines.append(f"*Apex test failures ({_n(totals.get('tests', len(tests)))})*")
        for t in tests[:MAX_LISTED_FAILURES]:
            frame = _first_own_frame(str(t.get("stack_trace") or ""))
            lines.append(
                f"• `{bk.escape(str(t.get('qualified') or t.get('class_name')))}` — "
                f"{bk.escape(bk.clip(str(t.get('message') or ''), 300))}"
                + (f"\n    `{bk.escape(bk.clip(frame, 200))}`" if frame else "")
            )
        more = int(totals.get("tests", len(tests))) - min(len(tests), MAX_LISTED_FAILURES)
        if more > 0:
            lines.append(f"…and {more:,} more in the report file.")
    if coverage:
        lines.append(coverage)
    return bk.clip("\n".join(lines), bk.MESSAGE_TEXT_MAX)


def event_reply(op: Operation, event: OpEvent) -> str | None:
    """The thread reply for a state change that matters, or None."""
    name, detail = event.name, event.detail
    if name == "scheduled":
        return f"🗓️ Scheduled: it will be sent to Salesforce {slack_date(op.scheduled_for or op.created_at)}."
    if name == "queued":
        ahead = int(detail.get("ahead") or 0)
        return (
            f"⏳ Salesforce keeps it Pending behind {ahead} other deployment{'s' if ahead > 1 else ''} to "
            f"`{op.org}`; it starts when {'they finish' if ahead > 1 else 'that one finishes'}."
        )
    if name == "in_progress":
        tests = int(detail.get("tests") or 0)
        return f"🚀 Its turn came: Salesforce started it ({_n(detail.get('components'))} components" + (
            f", {_n(tests)} Apex tests)." if tests else ", no Apex tests)."
        )
    if name == "completed":
        return failures_text(op)
    if name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was deployed."
    if name == "error":
        return f"❗ {bk.escape(op.data.get('error', 'The deployment could not be carried out.'))}"
    return None


def completion_text(op: Operation) -> str:
    """Posted once when a deployment ends: in the thread and in the notifications channel."""
    state = OpState(op.state)
    action = str(op.params.get("action") or "deploy")
    verb = {"deploy": "deployment", "validate": "validation", "quick_deploy": "quick deploy"}.get(action, "deployment")
    base = f"{status_label(op)}: {verb} {op.ref} to `{op.org}` — {_what(op)}"
    result = op.data.get("result")
    if result:
        # The id first: a long result is clipped at the end, and the id is what people search for.
        text = f"{base}\n{_salesforce_id(op)}\n{_result_text(op, compact=True)}"
        until = validation_usable_until(op)
        if until is not None:
            text += f"\n⚡ Quick deploy it with `/deploy quick {op.ref}` until {slack_date(until)}."
        if state == OpState.CANCELED and op.data.get("canceled_by"):
            text += f"\nCanceled by <@{op.data['canceled_by']}>."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.REJECTED:
        reason = bk.escape(op.data.get("reject_reason") or "no reason")
        return f"{base} (rejected by <@{op.data.get('rejected_by')}>: {reason})"
    if state == OpState.CANCELED:
        who = op.data.get("canceled_by")
        return base + (f" (canceled by <@{who}> before Salesforce started it)" if who else "")
    if state == OpState.ERROR:
        text = f"{base}\n{bk.escape(op.data.get('error', ''))}"
        return bk.clip(text + (f"\n{_salesforce_id(op)}" if op.external_id else ""), bk.MESSAGE_TEXT_MAX)
    return base


def created_message(op: Operation, *, created: bool, notes: Sequence[str] = ()) -> str:
    if not created:
        return f"That request was already received as {op.ref}."
    if op.state == OpState.AWAITING_APPROVAL:
        text = f"{op.ref} is waiting for approval; the card is in the channel."
    elif op.state == OpState.SCHEDULED:
        text = f"{op.ref} is scheduled for {slack_date(op.scheduled_for or op.created_at)}; the card is in the channel."
    else:
        text = f"{op.ref} is starting; follow the card in the channel."
    for note in notes:
        text += f"\nℹ️ {bk.escape(note)}"
    return text


def plan_summary(plan: DeployPlan | QuickPlan) -> str:
    if isinstance(plan, QuickPlan):
        return f"Quick deploy of {plan.validation.ref} to `{plan.org}` (usable until {slack_date(plan.usable_until)})"
    artifact = plan.artifact
    types = ", ".join(
        f"{bk.escape(name)} ×{count}" if count else f"{bk.escape(name)} (all)"
        for name, count in sorted(artifact.types.items())[:8]
    )
    return f"`{bk.escape(artifact.name)}`: {artifact.files:,} files, {types or 'no types listed'}"


def list_message(ops: Sequence[Operation]) -> str:
    if not ops:
        return (
            "No deployments yet in this channel (nor yours elsewhere). "
            "Start one with `/deploy validate <org> <artifact>`."
        )
    lines = ["*Recent deployments* (this channel, and yours elsewhere)"]
    for op in ops:
        result = op.data.get("result") or {}
        extra = ""
        if result:
            _, _, errors = (result.get("components") or [0, 0, 0])[:3]
            _, _, test_errors = (result.get("tests") or [0, 0, 0])[:3]
            failed = f" (❌ {errors} components, {test_errors} tests)" if errors or test_errors else ""
            extra = f" · {result.get('status')}{failed}"
        lines.append(
            f"• `{op.ref}` {ACTION_LABEL.get(str(op.params.get('action')), 'Deploy')} {_what(op)} → `{op.org}` · "
            f"{status_label(op)}{extra} · <@{op.requester}> · {slack_date(op.created_at)}"
        )
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def orgs_message(orgs: Sequence[OrgInfo]) -> str:
    if not orgs:
        return "No orgs are configured (`[orgs.<alias>]` in the configuration)."
    lines = ["*Orgs you can deploy to*"]
    for org in orgs:
        label = f" — {bk.escape(org.label)}" if org.label else ""
        who = ", ".join(f"<!subteam^{a}>" if a.startswith("S") else f"<@{a}>" for a in org.approvers)
        if not org.deploy_approval:
            deploys = "deployments need no approval"
        elif who:
            deploys = f"deployments need approval ({who})"
        elif org.kind == "production":
            deploys = "deployments are refused until approvers are configured for them"
        else:
            deploys = "deployments need approval (anyone but the requester)"
        validations = "validations need approval" if org.validate_approval else "validations need none"
        active = f" · {org.active} deployment(s) in progress" if org.active else ""
        lines.append(f"• `{org.alias}` ({org.kind}){label}: {deploys}; {validations}{active}")
    return "\n".join(lines)


def status_blocks(op: Operation) -> list[Block]:
    _, blocks = deploy_card(op)
    # An ephemeral copy must not carry live buttons: they belong to the channel card.
    return [block for block in blocks if block.get("type") != "actions"]


def cancel_ack(op: Operation) -> str:
    if op.state == OpState.CANCELING:
        return f"✋ Salesforce is canceling {op.ref}; the card shows when it is done."
    return f"✋ {op.ref} is canceled."


def cancel_thread_text(op: Operation, user: str) -> str:
    if op.state == OpState.CANCELING:
        return f"✋ Cancel requested by <@{user}>: Salesforce is canceling the deployment…"
    return f"✋ Canceled by <@{user}>" + (" in Salesforce." if op.external_id else " before it was sent to Salesforce.")
