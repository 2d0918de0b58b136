"""Everything a person reads about deployments: the status card, thread replies, lists.

Pure functions from plain data to ``(text, blocks)``; no I/O. Every value that came from a user
or from Salesforce (file names, problems, test messages, artifact names) goes through
``escape``. The card shows only state, never elapsed time, so it changes — and is edited —
only when the deployment does.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.deploy.failures import failures_text, n, result_text
from bot.deploy.payloads import (
    ACTION_LABEL,
    ArtifactSummary,
    DeployParams,
    OptionsData,
    Outcome,
    Progress,
    counts,
    data_of,
    params_of,
    validation_usable_until,
)
from bot.deploy.service import DeployPlan, OrgInfo, QuickPlan
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
from bot.store.models import Operation, OpState


def _size(value: int) -> str:
    return f"{value / 1_000_000:,.1f} MB" if value >= 100_000 else f"{max(1, round(value / 1000)):,} KB"


def _title(op: Operation) -> str:
    return f"{ACTION_LABEL.get(params_of(op).action, 'Deploy')} {op.ref} · {op.org}"


def _what(op: Operation) -> str:
    params = params_of(op)
    if params.validation:
        return f"validation {params.validation.ref} ({bk.escape(params.validation.artifact or '?')})"
    artifact = params.artifact or ArtifactSummary()
    return f"`{bk.escape(artifact.name or '?')}` ({n(artifact.files)} files, {_size(artifact.compressed)})"


def _tests_text(params: DeployParams) -> str:
    if params.action == "quick_deploy":
        return "none (ran in the validation)"
    options = params.options or OptionsData()
    default = "org default (local tests if Apex)" if params.org_kind == "production" else "none"
    level = options.test_level or default
    tests = options.run_tests
    if tests:
        shown = ", ".join(bk.escape(t) for t in tests[:5]) + (f" +{len(tests) - 5}" if len(tests) > 5 else "")
        return f"{level}: {shown}"
    return level


def _options_text(options: OptionsData | None) -> str:
    if options is None or not options.model_fields_set:
        return ""
    words = [
        "checkOnly" if options.check_only else "",
        f"rollbackOnError={'true' if options.rollback_on_error else 'false'}",
        "singlePackage" if options.single_package else "",
        "ignoreWarnings" if options.ignore_warnings else "",
        "purgeOnDelete" if options.purge_on_delete else "",
        "allowMissingFiles" if options.allow_missing_files else "",
        "autoUpdatePackage" if options.auto_update_package else "",
        "performRetrieve" if options.perform_retrieve else "",
    ]
    return " · ".join(word for word in words if word)


def _bar_line(label: str, values: list[int], *, unit: str) -> str:
    done_ok, total, errors = counts(values)
    done = done_ok + errors  # Salesforce counts failures apart from what went through
    line = f"{label} `{bk.progress_bar(done, total)}` {n(done)}/{n(total)}"
    if errors:
        line += f" · ❌ {n(errors)} {unit}"
    return line


def status_label(op: Operation) -> str:
    """The state in words; for a finished deployment Salesforce's own status decides."""
    state, action, data = OpState(op.state), params_of(op).action, data_of(op)
    sf_status = (data.result or Outcome()).status or (data.progress or Progress()).status
    if state == OpState.RUNNING and sf_status == "Pending":
        return "⏳ Queued in Salesforce"
    if state == OpState.RUNNING and sf_status == "InProgress":
        return "🚀 Deploying" if action != "validate" else "🔎 Validating"
    if state == OpState.FAILED and sf_status == "SucceededPartial":
        return "⚠️ Partly deployed (SucceededPartial)"
    if state == OpState.FAILED:
        return "❌ Validation failed" if action == "validate" else "❌ Failed"
    if state == OpState.SUCCEEDED and action == "validate":
        return "✅ Validated"
    return STATE_LABEL[state]


def deploy_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a deployment, edited in place as it progresses."""
    params, data = params_of(op), data_of(op)
    state = OpState(op.state)
    title = _title(op)
    fields = [
        f"*Status*\n{status_label(op)}",
        f"*Org*\n`{op.org}` ({params.org_kind})",
        f"*Artifact*\n{_what(op)}",
        f"*Apex tests*\n{_tests_text(params)}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Starts*\n{slack_date(op.scheduled_for)}"
        if op.scheduled_for
        else f"*Requested*\n{slack_date(op.created_at)}",
    ]
    blocks: list[Block] = [bk.header(title), bk.fields_section(fields)]
    options = _options_text(params.options)
    if options:
        blocks.append(bk.context(f"Options: {options}"))
    for note in params.notes:
        blocks.append(bk.context(f"ℹ️ {bk.escape(note)}"))

    if data.result is not None:
        blocks.append(bk.section(result_text(op)))
    elif data.progress and data.progress.model_fields_set and state in {OpState.RUNNING, OpState.CANCELING}:
        blocks.append(bk.section(_progress_text(op, data.progress)))

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
        reason = bk.escape(data.reject_reason or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.rejected_by}>: {reason}"))
    if state == OpState.CANCELING:
        blocks.append(bk.section(f"✋ <@{data.cancel_requested_by}> asked Salesforce to cancel it; canceling…"))
    if state == OpState.CANCELED and data.canceled_by:
        blocks.append(bk.section(f"✋ Canceled by <@{data.canceled_by}>."))
    if data.finished_before_cancel:
        blocks.append(bk.context("Salesforce finished it before the cancel took effect."))
    if state == OpState.ERROR and data.error:
        blocks.append(bk.section(f"❗ {bk.escape(data.error)}"))
    if data.last_problem and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ Salesforce trouble, retrying automatically: {bk.escape(data.last_problem)}"))
    context = [f"`{op.ref}`"]
    if op.external_id:
        context.append(_salesforce_id(op))
    if data.approved_by:
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data.approved_by))
    blocks.append(bk.context(" · ".join(context)))
    return f"{bk.escape(title)}: {status_label(op)}", bk.limit_blocks(blocks)  # mrkdwn, unlike the header


def _salesforce_id(op: Operation) -> str:
    """The deploy id, and a link to the org's Deployment Status page of it when the bot built one
    (from the org's instance URL and the id, never from anything typed in Slack)."""
    text = f"Salesforce id `{op.external_id}`"
    url = data_of(op).status_url
    return f"{text} · <{url}|Deployment Status>" if url else text


def _progress_text(op: Operation, progress: Progress) -> str:
    if progress.status == "Pending":
        ahead = progress.queue_ahead or 0
        if ahead:
            return (
                f"⏳ Pending in Salesforce: queued behind {ahead} deployment{'s' if ahead > 1 else ''} to "
                f"`{op.org}` sent from here (queue position {ahead + 1}). Salesforce runs one deployment per org "
                "at a time."
            )
        return "⏳ Pending in Salesforce: waiting for it to start (Salesforce runs one deployment per org at a time)."
    lines = [
        _bar_line("Components", progress.components, unit="failed"),
        _bar_line("Apex tests", progress.tests, unit="failed"),
    ]
    if progress.current_test:
        lines.append(f"▶️ Running test `{bk.escape(progress.current_test)}`")
    elif progress.state_detail:
        lines.append(f"⚙️ {bk.escape(progress.state_detail)}")
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
        return f"🚀 Its turn came: Salesforce started it ({n(detail.get('components'))} components" + (
            f", {n(tests)} Apex tests)." if tests else ", no Apex tests)."
        )
    if name == "completed":
        return failures_text(op)
    if name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was deployed."
    if name == "error":
        return f"❗ {bk.escape(data_of(op).error or 'The deployment could not be carried out.')}"
    return None


def completion_text(op: Operation) -> str:
    """Posted once when a deployment ends: in the thread and in the notifications channel."""
    state = OpState(op.state)
    data = data_of(op)
    verb = {"deploy": "deployment", "validate": "validation", "quick_deploy": "quick deploy"}[params_of(op).action]
    base = f"{status_label(op)}: {verb} {op.ref} to `{op.org}` — {_what(op)}"
    if data.result is not None:
        # The id first: a long result is clipped at the end, and the id is what people search for.
        text = f"{base}\n{_salesforce_id(op)}\n{result_text(op, compact=True)}"
        until = validation_usable_until(op)
        if until is not None:
            text += f"\n⚡ Quick deploy it with `/deploy quick {op.ref}` until {slack_date(until)}."
        if state == OpState.CANCELED and data.canceled_by:
            text += f"\nCanceled by <@{data.canceled_by}>."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.REJECTED:
        reason = bk.escape(data.reject_reason or "no reason")
        return f"{base} (rejected by <@{data.rejected_by}>: {reason})"
    if state == OpState.CANCELED:
        who = data.canceled_by
        return base + (f" (canceled by <@{who}> before Salesforce started it)" if who else "")
    if state == OpState.ERROR:
        text = f"{base}\n{bk.escape(data.error or '')}"
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
        result = data_of(op).result
        extra = ""
        if result is not None:
            _, _, errors = counts(result.components)
            _, _, test_errors = counts(result.tests)
            failed = f" (❌ {errors} components, {test_errors} tests)" if errors or test_errors else ""
            extra = f" · {result.status}{failed}"
        lines.append(
            f"• `{op.ref}` {ACTION_LABEL[params_of(op).action]} {_what(op)} → `{op.org}` · "
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
