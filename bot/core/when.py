"""Parsing ``--at`` times in the requester's time zone, and formatting them for Slack."""

from __future__ import annotations

import re
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bot.errors import UsageError

AT_USAGE = (
    "`--at` takes a time in your Slack time zone: `18:30`, `tomorrow 09:00`, `2026-12-01 18:30`, "
    "`2026-12-01T18:30Z` (UTC), or a delay such as `+2h`, `+45m`."
)
_DURATION = re.compile(r"\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")
_MAX_AHEAD = timedelta(days=90)


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '24h', '7d', '1h30m' → timedelta: the one duration grammar (settings such as
    an approval's ``expires``, ``--every``/``--lease`` and ``--at +2h``)."""
    match = _DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def aware(moment: datetime) -> datetime:
    """A time read back from the database as UTC: SQLite returns naive datetimes, PostgreSQL aware ones."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def parse_when(text: str, *, tz_name: str | None, now: datetime | None = None) -> datetime:
    """An aware UTC datetime strictly in the future (and within 90 days), or UsageError."""
    now = now or datetime.now(UTC)
    tz = zone(tz_name)
    raw = " ".join(text.split())
    lowered = raw.lower()
    result: datetime | None = None
    if lowered.startswith("+"):
        try:
            result = now + parse_duration(lowered[1:])
        except ValueError:
            raise UsageError(f"`{raw}` is not a time.", usage=AT_USAGE) from None
    else:
        day_word, _, clock = (
            lowered.partition(" ") if lowered.startswith(("today ", "tomorrow ")) else ("", "", lowered)
        )
        if match := _CLOCK.match(clock):
            hour, minute = int(match.group(1)), int(match.group(2))
            if hour > 23 or minute > 59:
                raise UsageError(f"`{raw}` is not a valid time of day.", usage=AT_USAGE)
            local_now = now.astimezone(tz)
            day = local_now.date() + timedelta(days=1 if day_word == "tomorrow" else 0)
            result = datetime.combine(day, time(hour, minute), tzinfo=tz)
            if not day_word and result <= local_now:
                result += timedelta(days=1)  # "18:30" after 18:30 means tomorrow
        else:
            try:
                parsed = datetime.fromisoformat(raw.replace(" ", "T", 1).replace("z", "Z"))
            except ValueError:
                raise UsageError(f"I can't read `{raw}` as a time.", usage=AT_USAGE) from None
            result = parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)
    result = result.astimezone(UTC)
    if result <= now:
        raise UsageError(f"`{raw}` is in the past ({result:%Y-%m-%d %H:%M} UTC).", usage=AT_USAGE)
    if result - now > _MAX_AHEAD:
        raise UsageError(f"`{raw}` is more than 90 days ahead.", usage=AT_USAGE)
    return result


def slack_date(moment: datetime, *, style: str = "{date_short_pretty} {time}") -> str:
    """``<!date^…>`` so every reader sees the time in their own zone; the fallback is UTC."""
    epoch = int(moment.timestamp())
    fallback = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{epoch}^{style}|{fallback}>"
