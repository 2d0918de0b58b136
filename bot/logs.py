"""Logging set-up: key=value lines with bound extras, and a filter that masks secrets."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from bot.redaction import redact_text

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Masks known secret values (the configured credentials) and, through the bot's one
    redaction routine, every secret-shaped string in every record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        return redact_text(text, known=self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        record.msg = self.redact(message + (f" {extras}" if extras else ""))
        record.args = ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def configure_logging(*, level: str = "INFO", secrets: Iterable[str] = (), stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" is expected: a long cycle simply delays the next.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
