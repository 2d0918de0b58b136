"""What every slash command's grammar shares: words, options, refs, and asking for help."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from bot.clients.sfp import OPERATION_ID_RE
from bot.errors import UsageError

REF_RE = re.compile(r"^(?P<letter>[A-Za-z]?)(?P<number>\d{1,10})$")


@dataclass(frozen=True)
class Help:
    pass


def tokenize(text: str, *, usage: str) -> list[str]:
    try:
        return shlex.split(
            text.replace("\u201c", '"')
            .replace("\u201d", '"')
            .replace("\u2018", "'")
            .replace("\u2019", "'")
            .replace("\u2014", "--")
        )
    except ValueError as exc:
        raise UsageError(f"I couldn't read that: {exc}.", usage=usage) from None


def split_options(
    tokens: list[str], *, flags: set[str], valued: set[str], multiword: set[str], usage: str
) -> tuple[list[str], dict[str, str | bool]]:
    """Positional words up to the first option, then ``--flag`` / ``--opt value`` pairs.

    ``multiword`` options take every word up to the next option (``--at tomorrow 09:00``).
    """
    positional: list[str] = []
    options: dict[str, str | bool] = {}
    index = 0
    while index < len(tokens) and not tokens[index].startswith("--"):
        positional.append(tokens[index])
        index += 1
    while index < len(tokens):
        token = tokens[index]
        name, _, inline = token.partition("=")
        if name in options:
            raise UsageError(f"`{name}` is given twice.", usage=usage)
        if name in flags and not inline:
            options[name] = True
            index += 1
            continue
        if name not in valued:
            known = ", ".join(f"`{option}`" for option in sorted(flags | valued))
            raise UsageError(f"Unknown option `{name[:40]}`. Options here: {known}.", usage=usage)
        words = [inline] if inline else []
        index += 1
        while index < len(tokens) and not tokens[index].startswith("--") and (name in multiword or not words):
            words.append(tokens[index])
            index += 1
        if not words:
            raise UsageError(f"`{name}` needs a value.", usage=usage)
        options[name] = " ".join(words)
    return positional, options


@dataclass(frozen=True)
class RefKind:
    """What one command accepts as a reference (SPEC §15 "Refs")."""

    letter: str  # the bot's short refs: P12, D3, S4, F2
    wrong_letter: str  # "`X12` is not …" when another command's short ref is given
    id_prefix: str | None = None  # Salesforce key prefix of the record the operation follows
    id_hint: str = ""  # how that id is named in hints
    operation_ids: bool = False  # sfp operationIds

    def salesforce_id(self, word: str) -> bool:
        # Key prefixes are case-sensitive; the id is 15 (case-sensitive) or 18 characters.
        return (
            bool(self.id_prefix)
            and re.fullmatch(rf"{self.id_prefix}[a-zA-Z0-9]{{12}}(?:[a-zA-Z0-9]{{3}})?", word) is not None
        )

    @property
    def example(self) -> str:
        return f"`{self.letter}12`" + (f" or {self.id_hint}" if self.id_hint else "")


PUSH_REFS = RefKind(
    letter="P", wrong_letter="a push", id_prefix="0DV", id_hint="the push request id (`0DV…`, 15 or 18 characters)"
)
DEPLOY_REFS = RefKind(
    letter="D",
    wrong_letter="a deployment reference",
    id_prefix="0Af",
    id_hint="the deployment id (`0Af…`, 15 or 18 characters)",
)
SFP_REFS = RefKind(letter="S", wrong_letter="an sfp task", id_hint="the task's operationId", operation_ids=True)
FD_REFS = RefKind(letter="F", wrong_letter="a FlexDeploy request")


def parse_ref(words: list[str], *, usage: str, action: str, refs: RefKind = PUSH_REFS) -> str:
    """The bot's short ref (``P12``, or ``12``), or the id the external system gave the operation.

    A short ref comes back as ``P12``; an id comes back exactly as typed (Salesforce ids are
    case-sensitive) and only once its shape is checked, so nothing else ever reaches a lookup.
    """
    if len(words) != 1:
        raise UsageError(f"`{action}` takes one reference, such as {refs.example}.", usage=usage)
    word = words[0]
    short = REF_RE.match(word)
    if short:
        letter = short.group("letter").upper()
        if letter and letter != refs.letter:
            raise UsageError(
                f"`{word}` is not {refs.wrong_letter}; here references look like {refs.example}.", usage=usage
            )
        if not letter and refs.operation_ids:
            return word  # bare digits: the task S<n> or an operationId made of digits; the service tries both
        return f"{refs.letter}{int(short.group('number'))}"
    if refs.salesforce_id(word) or (refs.operation_ids and OPERATION_ID_RE.match(word)):
        return word
    raise UsageError(f"`{word[:30]}` is not a reference (they look like {refs.example}).", usage=usage)
