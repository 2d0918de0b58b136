"""``python -m bot``: serve, the embedded sandbox, scripted demos, audit export, migrations."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DESCRIPTION = """Slack ChatOps for Salesforce release management.

With no Slack credentials and no orgs configured, `python -m bot` starts the local sandbox:
simulated Salesforce orgs, a fake Slack and a console that plays Slack."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: $CHATOPS_CONFIG)")
    parser.add_argument("--log-level", default="INFO")
    # Every subcommand takes the global options after its name too (`serve --config FILE`, SPEC §16).
    # SUPPRESS keeps a value given before the subcommand when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    common.add_argument("--log-level", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", parents=[common], help="run the bot against Slack (HTTP mode or Socket Mode)")
    serve.add_argument("--host", default="0.0.0.0")
    sandbox = sub.add_parser(
        "sandbox", parents=[common], help="the local sandbox with a console that plays Slack (the default)"
    )
    sandbox.add_argument("--fast", action="store_true", help="run simulated pushes quickly")
    demo = sub.add_parser(
        "demo", parents=[common], help="run a scripted tour against the sandbox; non-zero exit if a step fails"
    )
    demo.add_argument("--script", type=Path, help="tour file (default: the built-in push tour)")
    audit = sub.add_parser("audit", parents=[common], help="export the audit log")
    audit.add_argument("--format", choices=("csv", "json"), default="csv")
    audit.add_argument("--since", help="ISO date or datetime (UTC)")
    audit.add_argument("--out", type=Path, help="file to write (default: stdout)")
    sub.add_parser("migrate", parents=[common], help="bring the database schema up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bot.errors import ConfigError
    from bot.logs import configure_logging
    from bot.settings import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        # One line that names what to fix and shows no secret (the message is built for that).
        print(exc.message, file=sys.stderr)
        return 2
    secrets = [
        s.get_secret_value()
        for s in (
            settings.slack_bot_token,
            settings.slack_signing_secret,
            settings.slack_app_token,
            settings.sfp_token,
            settings.flexdeploy_password,
        )
        if s is not None
    ]
    secrets += [org.auth_url.get_secret_value() for org in settings.orgs.values() if org.auth_url]
    command = args.command
    if command is None:
        command = "serve" if settings.slack_configured or settings.orgs else "sandbox"
    configure_logging(level=args.log_level if command == "serve" else "WARNING", secrets=secrets)
    if command == "serve":
        return asyncio.run(_serve(settings, host=args.host if args.command else "0.0.0.0"))
    if command == "sandbox":
        from bot.sandbox.embedded import run_console_sandbox

        return asyncio.run(run_console_sandbox(fast=getattr(args, "fast", False)))
    if command == "demo":
        from bot.sandbox.embedded import run_demo

        return asyncio.run(run_demo(args.script))
    if command == "audit":
        return asyncio.run(_audit(settings.database_url, fmt=args.format, since=args.since, out=args.out))
    if command == "migrate":
        from bot.store.db import migrate_sync

        migrate_sync(settings.database_url)
        print("database schema is up to date")
        return 0
    return 2


async def _serve(settings: Any, *, host: str) -> int:
    from bot.runtime import build_runtime
    from bot.server import serve_forever

    try:
        settings.require_slack()
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        runtime = await build_runtime(settings)
    except ValueError as exc:  # e.g. an unreadable JWT key file or a malformed auth URL
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    await serve_forever(runtime, host=host)
    return 0


async def _audit(database_url: str, *, fmt: str, since: str | None, out: Path | None) -> int:
    from bot.redaction import redact, write_csv
    from bot.store import repo
    from bot.store.db import Database, migrate

    since_at = None
    if since:
        try:
            since_at = datetime.fromisoformat(since)
        except ValueError:
            print(f"--since: not an ISO date: {since}", file=sys.stderr)
            return 2
        since_at = since_at if since_at.tzinfo else since_at.replace(tzinfo=UTC)
    await migrate(database_url)
    db = Database(database_url)
    try:
        events = await repo.audit_events(db, since=since_at)
    finally:
        await db.close()
    columns = ["id", "at", "actor", "channel", "operation_ref", "action", "detail", "outcome"]
    # Rows are redacted when written; redacting again here also covers rows older than that.
    rows = [redact({c: (getattr(e, c).isoformat() if c == "at" else getattr(e, c)) for c in columns}) for e in events]
    stream = out.open("w", newline="") if out else sys.stdout
    try:
        if fmt == "json":
            json.dump(rows, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
        else:
            write_csv(stream, header=columns, rows=([row[c] for c in columns] for row in rows))
    finally:
        if out:
            stream.close()
    return 0
