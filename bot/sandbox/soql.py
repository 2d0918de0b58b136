"""A small SOQL engine for the simulated Salesforce org.

It exists so the sandbox answers the bot's real queries the way Salesforce does: a tokenizer
and a recursive-descent parser (string literals are decoded once, by the tokenizer, so a
hostile literal can never become query syntax), a binder that resolves field names against a
schema (case-insensitive, errors named like Salesforce's), and an evaluator over in-memory
tables.

Supported: SELECT of fields, dotted relationship fields and aggregates (COUNT, COUNT_DISTINCT,
MIN, MAX, SUM, AVG, with optional alias); FROM one object; WHERE with AND / OR / NOT and
parentheses, ``= != <> < <= > >=``, ``[NOT] IN (...)``, ``LIKE``; string, number, boolean,
null, dateTime, date and a few date literals (TODAY, LAST_N_DAYS:n, ...); GROUP BY; ORDER BY
with ASC/DESC and NULLS FIRST/LAST; LIMIT; OFFSET. Subqueries, HAVING, INCLUDES/EXCLUDES and
the like are answered with MALFORMED_QUERY, as for any syntax the engine does not know.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property, lru_cache
from typing import Any, TypeVar

Row = dict[str, Any]
T = TypeVar("T")

ID_TYPES = frozenset({"id", "reference"})
TEXT_TYPES = frozenset({"string", "picklist"})
NUMBER_TYPES = frozenset({"int", "double"})
AGGREGATES = frozenset({"COUNT", "COUNT_DISTINCT", "MIN", "MAX", "SUM", "AVG"})
KEYWORDS = frozenset(
    {
        "SELECT",
        "FROM",
        "WHERE",
        "AND",
        "OR",
        "NOT",
        "IN",
        "LIKE",
        "GROUP",
        "BY",
        "ORDER",
        "ASC",
        "DESC",
        "NULLS",
        "FIRST",
        "LAST",
        "LIMIT",
        "OFFSET",
        "TRUE",
        "FALSE",
        "NULL",
        "HAVING",
        "INCLUDES",
        "EXCLUDES",
        "WITH",
        "FOR",
        "USING",
        "TYPEOF",
    }
)
# Date literals that take ":n"; the others stand alone.
N_DATE_LITERALS = frozenset({"LAST_N_DAYS", "NEXT_N_DAYS"})
DATE_LITERALS = frozenset({"TODAY", "YESTERDAY", "TOMORROW"}) | N_DATE_LITERALS


class SoqlError(Exception):
    """A query Salesforce would refuse; error_code is the REST API errorCode."""

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message


# --------------------------------------------------------------------------- schema & tables


@dataclass(frozen=True)
class ObjectSchema:
    """Field types and parent relationships of one sObject.

    Field types: id, reference, string, picklist, boolean, int, double, datetime.
    relationships maps a relationship name to (foreign key field, parent object).
    """

    name: str
    fields: Mapping[str, str]
    relationships: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @cached_property
    def _fields_lower(self) -> dict[str, str]:
        return {name.lower(): name for name in self.fields}

    @cached_property
    def _relationships_lower(self) -> dict[str, str]:
        return {name.lower(): name for name in self.relationships}

    def field_named(self, name: str) -> str | None:
        """The canonical spelling of a field, SOQL names being case-insensitive."""
        return self._fields_lower.get(name.lower())

    def relationship_named(self, name: str) -> str | None:
        return self._relationships_lower.get(name.lower())


def id15(value: str) -> str:
    """15- and 18-character ids name the same record; the first 15 characters decide."""
    return value[:15]


def _index_key(field_type: str, value: Any) -> Any:
    if value is None:
        return None
    if field_type in ID_TYPES:
        return id15(str(value))
    if field_type in TEXT_TYPES:
        return str(value).casefold()
    return value


class Table:
    """The rows of one sObject, with an Id index and optional secondary indexes.

    Indexed fields must not change after insert (foreign keys such as
    PackagePushJob.PackagePushRequestId), which keeps the indexes trivially correct.
    """

    def __init__(self, schema: ObjectSchema, *, index_fields: Iterable[str] = ()) -> None:
        self.schema = schema
        self.rows: list[Row] = []
        self._by_id: dict[str, Row] = {}
        self._position: dict[str, int] = {}
        self._indexes: dict[str, dict[Any, list[Row]]] = {name: {} for name in index_fields}

    def __len__(self) -> int:
        return len(self.rows)

    def insert(self, row: Row) -> None:
        key = id15(row["Id"])
        self._position[key] = len(self.rows)
        self.rows.append(row)
        self._by_id[key] = row
        for name, index in self._indexes.items():
            index.setdefault(_index_key(self.schema.fields[name], row.get(name)), []).append(row)

    def get(self, record_id: str | None) -> Row | None:
        if not record_id:
            return None
        return self._by_id.get(id15(record_id))

    def is_indexed(self, field_name: str) -> bool:
        return field_name == "Id" or field_name in self._indexes

    def lookup(self, field_name: str, values: Iterable[Any]) -> list[Row]:
        """Rows whose field equals one of values, in insertion order."""
        field_type = self.schema.fields[field_name]
        keys = {_index_key(field_type, value) for value in values}
        if field_name == "Id":
            found = [row for key in keys if key and (row := self._by_id.get(key))]
        else:
            index = self._indexes[field_name]
            found = [row for key in keys for row in index.get(key, [])]
        found.sort(key=lambda row: self._position[id15(row["Id"])])
        return found


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class StringValue:
    """A decoded string literal; like_regex keeps LIKE's wildcards and escapes apart."""

    text: str
    like_regex: str
    like_only_escape: bool  # \_ or \% was used, which SOQL allows only in LIKE


@dataclass(frozen=True)
class Token:
    kind: str  # IDENT STRING NUMBER DATETIME DATE DATE_LITERAL OP LPAREN RPAREN COMMA EOF
    text: str
    pos: int
    value: Any = None

    def is_keyword(self, *words: str) -> bool:
        return self.kind == "IDENT" and self.text.upper() in words


_SIMPLE_ESCAPES = {
    "n": "\n",
    "N": "\n",
    "r": "\r",
    "R": "\r",
    "t": "\t",
    "T": "\t",
    "b": "\b",
    "B": "\b",
    "f": "\f",
    "F": "\f",
    '"': '"',
    "'": "'",
    "\\": "\\",
}
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:?\d{2})")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?![\dT])")
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
_OPERATORS = ("!=", "<>", "<=", ">=", "=", "<", ">")


def _syntax_error(source: str, pos: int, detail: str) -> SoqlError:
    """Salesforce points at the offending column; the message mimics its layout."""
    line_start = source.rfind("\n", 0, pos) + 1
    line_end = source.find("\n", pos)
    line = source[line_start : len(source) if line_end == -1 else line_end]
    row = source.count("\n", 0, pos) + 1
    column = pos - line_start
    message = f"\n{line}\n{' ' * column}^\nERROR at Row:{row}:Column:{column + 1}\n{detail}"
    return SoqlError("MALFORMED_QUERY", message)


class _Lexer:
    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.tokens: list[Token] = []

    def run(self) -> list[Token]:
        while True:
            self._skip_space()
            if self.pos >= len(self.source):
                self.tokens.append(Token("EOF", "<EOF>", self.pos))
                return self.tokens
            self.tokens.append(self._next())

    def _skip_space(self) -> None:
        while self.pos < len(self.source) and self.source[self.pos].isspace():
            self.pos += 1

    def _next(self) -> Token:
        char = self.source[self.pos]
        if char == "'":
            return self._string()
        if char in "(),":
            kind = {"(": "LPAREN", ")": "RPAREN", ",": "COMMA"}[char]
            return self._take(kind, 1)
        for operator in _OPERATORS:
            if self.source.startswith(operator, self.pos):
                return self._take("OP", len(operator))
        if char.isdigit() or (char in "+-" and self._sign_allowed()):
            return self._number_or_date()
        if char.isalpha() or char == "_":
            return self._identifier()
        raise _syntax_error(self.source, self.pos, f"unexpected token: '{char}'")

    def _take(self, kind: str, length: int, value: Any = None) -> Token:
        token = Token(kind, self.source[self.pos : self.pos + length], self.pos, value)
        self.pos += length
        return token

    def _sign_allowed(self) -> bool:
        """A sign starts a number only where a value may start."""
        following = self.source[self.pos + 1 : self.pos + 2]
        previous = self.tokens[-1].kind if self.tokens else ""
        return following.isdigit() and previous in {"OP", "COMMA", "LPAREN"}

    def _number_or_date(self) -> Token:
        for kind, pattern in (("DATETIME", _DATETIME_RE), ("DATE", _DATE_RE)):
            match = pattern.match(self.source, self.pos)
            if match:
                return self._take(kind, match.end() - self.pos, _parse_literal_time(match.group()))
        match = _NUMBER_RE.match(self.source, self.pos)
        assert match is not None  # _next only calls this in front of a digit
        text = match.group()
        number: int | float = float(text) if "." in text else int(text)
        return self._take("NUMBER", len(text), number)

    def _identifier(self) -> Token:
        match = _IDENT_RE.match(self.source, self.pos)
        assert match is not None
        text = match.group()
        if text.upper() in N_DATE_LITERALS:
            suffix = re.compile(r":(\d+)").match(self.source, match.end())
            if not suffix:
                raise _syntax_error(self.source, match.end(), f"unexpected token: {text}")
            length = suffix.end() - self.pos
            return self._take("DATE_LITERAL", length, (text.upper(), int(suffix.group(1))))
        if text.upper() in DATE_LITERALS:
            return self._take("DATE_LITERAL", len(text), (text.upper(), 0))
        return self._take("IDENT", len(text))

    def _string(self) -> Token:
        start = self.pos
        index = self.pos + 1
        text: list[str] = []
        regex: list[str] = []
        like_only = False
        while index < len(self.source):
            char = self.source[index]
            if char == "'":
                value = StringValue("".join(text), "".join(regex), like_only)
                self.pos = index + 1
                return Token("STRING", self.source[start : self.pos], start, value)
            if char == "\\":
                decoded, consumed, wildcard_escape = self._escape(index)
                text.append(decoded)
                regex.append(re.escape(decoded))
                like_only = like_only or wildcard_escape
                index += consumed
                continue
            text.append(char)
            regex.append({"%": ".*", "_": "."}.get(char) or re.escape(char))
            index += 1
        raise _syntax_error(self.source, start, "line 1:0 mismatched character '<EOF>' expecting '''")

    def _escape(self, index: int) -> tuple[str, int, bool]:
        """Decode the escape at index: (text, characters consumed, LIKE-only escape)."""
        following = self.source[index + 1 : index + 2]
        if following in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[following], 2, False
        if following in ("%", "_"):
            return following, 2, True
        if following == "u":
            digits = self.source[index + 2 : index + 6]
            if re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                return chr(int(digits, 16)), 6, False
        raise _syntax_error(self.source, index, f"Invalid string literal. Illegal character sequence '\\{following}'")


@lru_cache(maxsize=4096)
def parse_sf_datetime(text: str) -> datetime:
    """Salesforce writes 2026-11-23T10:00:00.000+0000; SOQL also takes ...Z and +hh:mm."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _parse_literal_time(text: str) -> datetime | date:
    if "T" in text:
        return parse_sf_datetime(text)
    return date.fromisoformat(text)


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Literal:
    kind: str  # string number boolean null datetime date date_literal
    value: Any
    pos: int


@dataclass(frozen=True)
class FieldPath:
    parts: tuple[str, ...]
    pos: int

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class SelectField:
    path: FieldPath
    alias: str | None


@dataclass(frozen=True)
class SelectAggregate:
    func: str
    path: FieldPath | None  # None for COUNT()
    alias: str | None
    pos: int


@dataclass(frozen=True)
class Compare:
    path: FieldPath
    op: str
    value: Literal


@dataclass(frozen=True)
class InList:
    path: FieldPath
    values: tuple[Literal, ...]
    negated: bool


@dataclass(frozen=True)
class Like:
    path: FieldPath
    pattern: Literal


@dataclass(frozen=True)
class BoolOp:
    op: str  # AND | OR
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    item: Condition


Condition = Compare | InList | Like | BoolOp | Not
SelectItem = SelectField | SelectAggregate


@dataclass(frozen=True)
class OrderItem:
    target: FieldPath | SelectAggregate
    descending: bool
    nulls_last: bool


@dataclass(frozen=True)
class Query:
    items: tuple[SelectItem, ...]
    sobject: str
    sobject_pos: int
    where: Condition | None
    group_by: tuple[FieldPath, ...]
    order_by: tuple[OrderItem, ...]
    limit: int | None
    offset: int | None


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _Lexer(source).run()
        self.index = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def _advance(self) -> Token:
        token = self.current
        self.index += 1
        return token

    def _error(self, token: Token | None = None) -> SoqlError:
        token = token or self.current
        return _syntax_error(self.source, token.pos, f"unexpected token: {token.text}")

    def _expect_keyword(self, word: str) -> Token:
        if not self.current.is_keyword(word):
            raise self._error()
        return self._advance()

    def _accept_keyword(self, *words: str) -> Token | None:
        return self._advance() if self.current.is_keyword(*words) else None

    def _expect(self, kind: str) -> Token:
        if self.current.kind != kind:
            raise self._error()
        return self._advance()

    def parse(self) -> Query:
        self._expect_keyword("SELECT")
        items = self._select_list()
        self._expect_keyword("FROM")
        sobject = self._plain_identifier()
        where = self._condition() if self._accept_keyword("WHERE") else None
        group_by: tuple[FieldPath, ...] = ()
        if self._accept_keyword("GROUP"):
            self._expect_keyword("BY")
            group_by = tuple(self._comma_separated(self._field_path))
        order_by: tuple[OrderItem, ...] = ()
        if self._accept_keyword("ORDER"):
            self._expect_keyword("BY")
            order_by = tuple(self._comma_separated(self._order_item))
        limit = self._integer_clause("LIMIT")
        offset = self._integer_clause("OFFSET")
        if self.current.kind != "EOF":
            raise self._error()
        return Query(tuple(items), sobject.text, sobject.pos, where, group_by, order_by, limit, offset)

    def _comma_separated(self, parse_one: Callable[[], T]) -> list[T]:
        items = [parse_one()]
        while self.current.kind == "COMMA":
            self._advance()
            items.append(parse_one())
        return items

    def _plain_identifier(self) -> Token:
        token = self.current
        if token.kind != "IDENT" or "." in token.text or token.text.upper() in KEYWORDS:
            raise self._error()
        return self._advance()

    def _field_path(self) -> FieldPath:
        token = self.current
        if token.kind != "IDENT" or token.text.upper() in KEYWORDS:
            raise self._error()
        self._advance()
        return FieldPath(tuple(token.text.split(".")), token.pos)

    def _select_list(self) -> list[SelectItem]:
        return self._comma_separated(self._select_item)

    def _select_item(self) -> SelectItem:
        following = self.tokens[self.index + 1]
        if self.current.kind == "LPAREN":
            raise _syntax_error(self.source, self.current.pos, "subqueries are not supported here")
        if following.kind == "LPAREN":
            aggregate = self._aggregate_call()
            return SelectAggregate(aggregate.func, aggregate.path, self._alias(), aggregate.pos)
        return SelectField(self._field_path(), self._alias())

    def _aggregate_call(self) -> SelectAggregate:
        name = self._advance()
        func = name.text.upper()
        if func not in AGGREGATES:
            raise _syntax_error(self.source, name.pos, f"Unknown function: {name.text}")
        self._expect("LPAREN")
        path = None if self.current.kind == "RPAREN" else self._field_path()
        self._expect("RPAREN")
        if path is None and func != "COUNT":
            raise _syntax_error(self.source, name.pos, f"{func} requires a field")
        return SelectAggregate(func, path, None, name.pos)

    def _alias(self) -> str | None:
        token = self.current
        if token.kind == "IDENT" and "." not in token.text and token.text.upper() not in KEYWORDS:
            return self._advance().text
        return None

    def _order_item(self) -> OrderItem:
        following = self.tokens[self.index + 1]
        target: FieldPath | SelectAggregate
        target = self._aggregate_call() if following.kind == "LPAREN" else self._field_path()
        descending = bool(self._accept_keyword("DESC"))
        if not descending:
            self._accept_keyword("ASC")
        nulls_last = False
        if self._accept_keyword("NULLS"):
            which = self._accept_keyword("FIRST", "LAST")
            if which is None:
                raise self._error()
            nulls_last = which.text.upper() == "LAST"
        return OrderItem(target, descending, nulls_last)

    def _integer_clause(self, keyword: str) -> int | None:
        if not self._accept_keyword(keyword):
            return None
        token = self._expect("NUMBER")
        if not isinstance(token.value, int) or token.value < 0:
            raise self._error(token)
        return token.value

    # Conditions. SOQL refuses AND and OR side by side without parentheses.
    def _condition(self) -> Condition:
        items = [self._unary()]
        operator: str | None = None
        while self.current.is_keyword("AND", "OR"):
            token = self._advance()
            if operator and token.text.upper() != operator:
                raise _syntax_error(
                    self.source,
                    token.pos,
                    f"unexpected token: '{token.text}' (use parentheses to mix AND and OR)",
                )
            operator = token.text.upper()
            items.append(self._unary())
        return items[0] if operator is None else BoolOp(operator, tuple(items))

    def _unary(self) -> Condition:
        if self._accept_keyword("NOT"):
            return Not(self._unary())
        if self.current.kind == "LPAREN":
            self._advance()
            inner = self._condition()
            self._expect("RPAREN")
            return inner
        return self._comparison()

    def _comparison(self) -> Condition:
        path = self._field_path()
        if self._accept_keyword("LIKE"):
            pattern = self._literal()
            if pattern.kind != "string":
                raise _syntax_error(self.source, pattern.pos, "LIKE needs a string literal")
            return Like(path, pattern)
        negated = bool(self._accept_keyword("NOT"))
        if self._accept_keyword("IN"):
            return InList(path, self._literal_list(), negated)
        if negated:
            raise self._error()
        operator = self._expect("OP")
        op = "!=" if operator.text == "<>" else operator.text
        return Compare(path, op, self._literal())

    def _literal_list(self) -> tuple[Literal, ...]:
        self._expect("LPAREN")
        if self.current.kind == "RPAREN":
            raise self._error()
        values = self._comma_separated(self._literal)
        self._expect("RPAREN")
        return tuple(values)

    def _literal(self) -> Literal:
        token = self.current
        kinds = {
            "STRING": "string",
            "NUMBER": "number",
            "DATETIME": "datetime",
            "DATE": "date",
            "DATE_LITERAL": "date_literal",
        }
        if token.kind in kinds:
            self._advance()
            return Literal(kinds[token.kind], token.value, token.pos)
        if token.is_keyword("TRUE", "FALSE"):
            self._advance()
            return Literal("boolean", token.text.upper() == "TRUE", token.pos)
        if token.is_keyword("NULL"):
            self._advance()
            return Literal("null", None, token.pos)
        raise self._error()


def parse(source: str) -> Query:
    """Parse one SOQL statement; SoqlError(MALFORMED_QUERY) on bad syntax."""
    return _Parser(source).parse()


# --------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class BoundField:
    """A field path resolved against the schema."""

    chain: tuple[tuple[str, str, str], ...]  # (relationship name, foreign key, parent object)
    name: str  # canonical field name on the last object
    field_type: str
    dotted: str


Getter = Callable[[Row], Any]
Predicate = Callable[[Row], bool]


class _Binder:
    def __init__(self, source: str, tables: Mapping[str, Table], sobject: str, now: datetime) -> None:
        self.source = source
        self.tables = tables
        self.sobject = sobject
        self.now = now

    def bind(self, path: FieldPath) -> BoundField:
        schema = self.tables[self.sobject].schema
        chain: list[tuple[str, str, str]] = []
        for part in path.parts[:-1]:
            relationship = schema.relationship_named(part)
            if relationship is None:
                raise self._no_column(path, schema.name, relationship=True)
            foreign_key, parent = schema.relationships[relationship]
            chain.append((relationship, foreign_key, parent))
            schema = self.tables[parent].schema
        name = schema.field_named(path.parts[-1])
        if name is None:
            raise self._no_column(path, schema.name, relationship=False)
        canonical = ".".join([link[0] for link in chain] + [name])
        return BoundField(tuple(chain), name, schema.fields[name], canonical)

    def _no_column(self, path: FieldPath, entity: str, *, relationship: bool) -> SoqlError:
        located = _syntax_error(self.source, path.pos, "").message.rstrip("\n")
        if relationship and len(path.parts) > 1:
            detail = (
                f"Didn't understand relationship '{path.parts[0]}' in field path. If you are "
                "attempting to use a custom relationship, be sure to append the '__r' after "
                "the custom relationship name. Please reference your WSDL or the describe call "
                "for the appropriate names."
            )
        else:
            detail = (
                f"No such column '{path.parts[-1]}' on entity '{entity}'. If you are attempting "
                "to use a custom field, be sure to append the '__c' after the custom field "
                "name. Please reference your WSDL or the describe call for the appropriate names."
            )
        return SoqlError("INVALID_FIELD", f"{located}\n{detail}")

    def getter(self, bound: BoundField) -> Getter:
        tables = self.tables
        chain = bound.chain
        name = bound.name

        def get(row: Row) -> Any:
            current: Row | None = row
            for _relationship, foreign_key, parent in chain:
                current = tables[parent].get(current.get(foreign_key)) if current else None
            return current.get(name) if current else None

        return get

    # ---- literal coercion, with Salesforce's wording for type mismatches

    def _filter_error(self, bound: BoundField, wanted: str, quoted: bool) -> SoqlError:
        enclosure = "should be enclosed in quotes" if quoted else "should not be enclosed in quotes"
        return SoqlError(
            "INVALID_QUERY_FILTER_OPERATOR",
            f"value of filter criterion for field '{bound.dotted}' must be of type {wanted} and {enclosure}",
        )

    def coerce(self, bound: BoundField, literal: Literal) -> Any:
        """The literal as a comparable value for this field (None for null)."""
        if literal.kind == "null":
            return None
        if literal.kind == "string" and literal.value.like_only_escape:
            raise _syntax_error(
                self.source, literal.pos, "Invalid string literal: \\_ and \\% are only allowed in LIKE"
            )
        kind, ftype = literal.kind, bound.field_type
        if ftype in ID_TYPES:
            return self._coerce_id(bound, literal)
        if ftype in TEXT_TYPES:
            if kind != "string":
                raise self._filter_error(bound, "string", quoted=True)
            return literal.value.text.casefold()
        if ftype == "boolean":
            if kind != "boolean":
                raise self._filter_error(bound, "boolean", quoted=False)
            return literal.value
        if ftype in NUMBER_TYPES:
            if kind != "number":
                raise self._filter_error(bound, "integer" if ftype == "int" else "double", quoted=False)
            return literal.value
        if ftype == "datetime":
            return self._coerce_datetime(bound, literal)
        raise SoqlError("INVALID_FIELD", f"field '{bound.dotted}' can not be filtered in a query call")

    def _coerce_id(self, bound: BoundField, literal: Literal) -> str:
        if literal.kind != "string":
            raise self._filter_error(bound, "id", quoted=True)
        text = literal.value.text
        if not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", text):
            raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {text}")
        return id15(text)

    def _coerce_datetime(self, bound: BoundField, literal: Literal) -> Any:
        if literal.kind == "datetime":
            return literal.value
        if literal.kind == "date":
            start = datetime.combine(literal.value, datetime.min.time(), UTC)
            return (start, start + timedelta(days=1))
        if literal.kind == "date_literal":
            return self._date_range(*literal.value)
        raise self._filter_error(bound, "dateTime", quoted=False)

    def _date_range(self, name: str, n: int) -> tuple[datetime, datetime]:
        """Date literals are ranges of whole UTC days (the sandbox user's time zone is UTC)."""
        today = datetime.combine(self.now.astimezone(UTC).date(), datetime.min.time(), UTC)
        day = timedelta(days=1)
        ranges = {
            "TODAY": (today, today + day),
            "YESTERDAY": (today - day, today),
            "TOMORROW": (today + day, today + 2 * day),
            # LAST_N_DAYS:n covers today and the n-1 days before it, as Salesforce counts.
            "LAST_N_DAYS": (today - (n - 1) * day, today + day),
            "NEXT_N_DAYS": (today + day, today + (n + 1) * day),
        }
        return ranges[name]


def _comparable(field_type: str, value: Any) -> Any:
    """A stored value in the form coerce() gives literals."""
    if value is None:
        return None
    if field_type in ID_TYPES:
        return id15(str(value))
    if field_type in TEXT_TYPES:
        return str(value).casefold()
    if field_type == "datetime":
        return parse_sf_datetime(value)
    return value


def _compare(op: str, left: Any, right: Any) -> bool:
    """SOQL: '!=' keeps rows whose value is null; other operators never match null."""
    if isinstance(right, tuple):  # a date range
        return _compare_range(op, left, right)
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if left is None or right is None:
        return False
    comparisons: dict[str, Callable[[Any, Any], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    return bool(comparisons[op](left, right))


def _compare_range(op: str, left: Any, bounds: tuple[datetime, datetime]) -> bool:
    if left is None:
        return op == "!="
    start, end = bounds
    inside = start <= left < end
    checks = {"=": inside, "!=": not inside, "<": left < start, "<=": left < end, ">": left >= end, ">=": left >= start}
    return bool(checks[op])


class _ConditionCompiler:
    """Turns a WHERE tree into a predicate over rows."""

    def __init__(self, binder: _Binder) -> None:
        self.binder = binder

    def compile(self, condition: Condition) -> Predicate:
        if isinstance(condition, BoolOp):
            parts = [self.compile(item) for item in condition.items]
            if condition.op == "AND":
                return lambda row: all(part(row) for part in parts)
            return lambda row: any(part(row) for part in parts)
        if isinstance(condition, Not):
            inner = self.compile(condition.item)
            return lambda row: not inner(row)
        if isinstance(condition, Like):
            return self._like(condition)
        if isinstance(condition, InList):
            return self._in_list(condition)
        return self._compare(condition)

    def _value_of(self, path: FieldPath) -> tuple[BoundField, Callable[[Row], Any]]:
        bound = self.binder.bind(path)
        get = self.binder.getter(bound)
        ftype = bound.field_type
        return bound, lambda row: _comparable(ftype, get(row))

    def _compare(self, condition: Compare) -> Predicate:
        bound, value = self._value_of(condition.path)
        right = self.binder.coerce(bound, condition.value)
        if right is None and condition.op not in ("=", "!="):
            return lambda row: False
        if bound.field_type == "boolean" and condition.op not in ("=", "!="):
            raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", "invalid operator on boolean field")
        op = condition.op
        return lambda row: _compare(op, value(row), right)

    def _in_list(self, condition: InList) -> Predicate:
        bound, value = self._value_of(condition.path)
        ranges: list[tuple[datetime, datetime]] = []
        plain: set[Any] = set()
        for literal in condition.values:
            coerced = self.binder.coerce(bound, literal)
            if isinstance(coerced, tuple):
                ranges.append(coerced)
            else:
                plain.add(coerced)
        negated = condition.negated

        def matches(row: Row) -> bool:
            current = value(row)
            found = current in plain or any(_compare_range("=", current, span) for span in ranges)
            # NOT IN keeps rows whose value is null, as '!=' does.
            return not found if negated else found

        return matches

    def _like(self, condition: Like) -> Predicate:
        bound, _ = self._value_of(condition.path)
        if bound.field_type not in TEXT_TYPES:
            raise SoqlError(
                "INVALID_QUERY_FILTER_OPERATOR",
                f"invalid operator on {'id' if bound.field_type in ID_TYPES else bound.field_type} "
                f"field: {bound.dotted}",
            )
        pattern = re.compile(condition.pattern.value.like_regex, re.IGNORECASE | re.DOTALL)
        get = self.binder.getter(bound)
        return lambda row: (text := get(row)) is not None and pattern.fullmatch(str(text)) is not None


# --------------------------------------------------------------------------- execution


@dataclass
class QueryResult:
    total_size: int
    records: list[Row]
    count_only: bool = False  # SELECT COUNT() answers with totalSize and no records


def run_query(source: str, tables: Mapping[str, Table], *, api_version: str, now: datetime) -> QueryResult:
    """Parse, bind and run one query over tables (keyed by sObject name)."""
    query = parse(source)
    sobject = _resolve_object(query, tables, source)
    binder = _Binder(source, tables, sobject, now)
    predicate = _ConditionCompiler(binder).compile(query.where) if query.where else None
    rows = _candidate_rows(query.where, tables[sobject], binder)
    matched = [row for row in rows if predicate is None or predicate(row)]
    if _is_aggregate(query):
        return _run_aggregate(query, matched, binder)
    return _run_plain(query, matched, binder, api_version)


def _resolve_object(query: Query, tables: Mapping[str, Table], source: str) -> str:
    by_lower = {name.lower(): name for name in tables}
    name = by_lower.get(query.sobject.lower())
    if name is None:
        located = _syntax_error(source, query.sobject_pos, "").message.rstrip("\n")
        raise SoqlError(
            "INVALID_TYPE",
            f"{located}\nsObject type '{query.sobject}' is not supported. If you are attempting to "
            "use a custom object, be sure to append the '__c' after the entity name. Please "
            "reference your WSDL or the describe call for the appropriate names.",
        )
    return name


def _candidate_rows(where: Condition | None, table: Table, binder: _Binder) -> list[Row]:
    """Use an index when the filter pins an indexed field with = or IN (an AND branch is enough)."""
    terms: Sequence[Condition] = ()
    if isinstance(where, BoolOp) and where.op == "AND":
        terms = where.items
    elif where is not None:
        terms = (where,)
    for term in terms:
        literals: tuple[Literal, ...] = ()
        if isinstance(term, Compare) and term.op == "=":
            literals = (term.value,)
        elif isinstance(term, InList) and not term.negated:
            literals = term.values
        path = getattr(term, "path", None)
        if not literals or path is None or len(path.parts) != 1:
            continue
        bound = binder.bind(path)
        if table.is_indexed(bound.name) and all(lit.kind == "string" for lit in literals):
            return table.lookup(bound.name, [lit.value.text for lit in literals])
    return table.rows


def _is_aggregate(query: Query) -> bool:
    return bool(query.group_by) or any(isinstance(item, SelectAggregate) for item in query.items)


def _window(query: Query, rows: list[Any]) -> list[Any]:
    start = query.offset or 0
    end = None if query.limit is None else start + query.limit
    return rows[start:end]


def _sort(rows: list[Any], keys: Sequence[tuple[Callable[[Any], Any], bool, bool]]) -> list[Any]:
    """Stable multi-key sort; each key is (value function, descending, nulls last).

    Salesforce sorts text case-insensitively and puts nulls first unless told otherwise.
    """
    ordered = list(rows)
    for value_of, descending, nulls_last in reversed(keys):
        nulls = [row for row in ordered if value_of(row) is None]
        present = [row for row in ordered if value_of(row) is not None]
        present.sort(key=value_of, reverse=descending)
        ordered = present + nulls if nulls_last else nulls + present
    return ordered


def _run_plain(query: Query, rows: list[Row], binder: _Binder, api_version: str) -> QueryResult:
    fields: list[BoundField] = []
    seen: set[str] = set()
    for item in query.items:
        assert isinstance(item, SelectField)
        if item.alias:
            raise _syntax_error(
                binder.source, item.path.pos, f"unexpected token: {item.alias} (aliases need an aggregate query)"
            )
        bound = binder.bind(item.path)
        if bound.dotted.lower() in seen:
            raise SoqlError("MALFORMED_QUERY", f"duplicate field selected: {bound.dotted}")
        seen.add(bound.dotted.lower())
        fields.append(bound)
    sort_keys = []
    for order in query.order_by:
        if isinstance(order.target, SelectAggregate):
            raise _syntax_error(binder.source, order.target.pos, "aggregate in ORDER BY of a plain query")
        bound = binder.bind(order.target)
        get = binder.getter(bound)
        ftype = bound.field_type
        sort_keys.append((_sort_value(ftype, get), order.descending, order.nulls_last))
    window = _window(query, _sort(rows, sort_keys))
    serializer = _RecordSerializer(binder.tables, api_version)
    records = [serializer.record(binder.sobject, row, fields) for row in window]
    return QueryResult(len(records), records)


def _sort_value(field_type: str, get: Getter) -> Callable[[Row], Any]:
    return lambda row: _comparable(field_type, get(row))


class _RecordSerializer:
    """Builds REST records: attributes first, parents nested under their relationship name."""

    def __init__(self, tables: Mapping[str, Table], api_version: str) -> None:
        self.tables = tables
        self.api_version = api_version

    def attributes(self, sobject: str, record_id: str) -> dict[str, str]:
        return {"type": sobject, "url": f"/services/data/v{self.api_version}/sobjects/{sobject}/{record_id}"}

    def record(self, sobject: str, row: Row, fields: Sequence[BoundField]) -> Row:
        out: Row = {"attributes": self.attributes(sobject, row["Id"])}
        for bound in fields:
            self._place(out, row, bound)
        return out

    def _place(self, out: Row, row: Row, bound: BoundField) -> None:
        target_out: Row = out
        current: Row = row
        for relationship, foreign_key, parent in bound.chain:
            parent_row = self.tables[parent].get(current.get(foreign_key))
            if relationship not in target_out:
                target_out[relationship] = (
                    None if parent_row is None else {"attributes": self.attributes(parent, parent_row["Id"])}
                )
            nested = target_out[relationship]
            if nested is None or parent_row is None:
                return
            target_out, current = nested, parent_row
        target_out[bound.name] = current.get(bound.name)


# ---- aggregate queries


@dataclass
class _AggregateColumn:
    key: str  # output name
    func: str | None  # None for a grouped field
    bound: BoundField | None
    getter: Getter | None


def _aggregate_columns(query: Query, binder: _Binder, grouped: list[BoundField]) -> list[_AggregateColumn]:
    columns: list[_AggregateColumn] = []
    expression_number = 0
    grouped_names = {bound.dotted.lower() for bound in grouped}
    for item in query.items:
        if isinstance(item, SelectAggregate):
            bound = binder.bind(item.path) if item.path else None
            if item.func in ("SUM", "AVG") and bound and bound.field_type not in NUMBER_TYPES:
                raise SoqlError(
                    "MALFORMED_QUERY", f"field {bound.dotted} does not support aggregate operator {item.func}"
                )
            key = item.alias
            if key is None:
                key = f"expr{expression_number}"
                expression_number += 1
            getter = binder.getter(bound) if bound else None
            columns.append(_AggregateColumn(key, item.func, bound, getter))
            continue
        bound = binder.bind(item.path)
        if bound.dotted.lower() not in grouped_names:
            raise SoqlError("MALFORMED_QUERY", f"Field must be grouped or aggregated: {bound.name}")
        columns.append(_AggregateColumn(item.alias or bound.name, None, bound, binder.getter(bound)))
    return columns


def _aggregate_value(column: _AggregateColumn, rows: list[Row]) -> Any:
    if column.getter is None:  # COUNT()
        return len(rows)
    assert column.bound is not None
    values = [value for row in rows if (value := column.getter(row)) is not None]
    ftype = column.bound.field_type
    if column.func == "COUNT":
        return len(values)
    if column.func == "COUNT_DISTINCT":
        return len({_comparable(ftype, value) for value in values})
    if not values:
        return None
    if column.func == "MIN":
        return min(values, key=lambda value: _comparable(ftype, value))
    if column.func == "MAX":
        return max(values, key=lambda value: _comparable(ftype, value))
    total = sum(values)
    return total if column.func == "SUM" else total / len(values)


def _run_aggregate(query: Query, rows: list[Row], binder: _Binder) -> QueryResult:
    items = query.items
    if (
        len(items) == 1
        and isinstance(items[0], SelectAggregate)
        and items[0].func == "COUNT"
        and items[0].path is None
        and items[0].alias is None
        and not query.group_by
    ):
        return QueryResult(len(rows), [], count_only=True)
    grouped = [binder.bind(path) for path in query.group_by]
    columns = _aggregate_columns(query, binder, grouped)
    groups = _group_rows(rows, grouped, binder)
    if not grouped and not groups:
        groups = {(): []}  # an ungrouped aggregate always answers one row
    results: list[Row] = []
    for members in groups.values():
        record: Row = {"attributes": {"type": "AggregateResult"}}
        for column in columns:
            record[column.key] = (
                _aggregate_value(column, members)
                if column.func
                else (column.getter(members[0]) if column.getter and members else None)
            )
        results.append(record)
    results = _sort(results, _aggregate_sort_keys(query, columns, binder))
    window = _window(query, results)
    return QueryResult(len(window), window)


def _group_rows(rows: list[Row], grouped: list[BoundField], binder: _Binder) -> dict[tuple[Any, ...], list[Row]]:
    getters = [(bound.field_type, binder.getter(bound)) for bound in grouped]
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        key = tuple(_comparable(ftype, get(row)) for ftype, get in getters)
        groups.setdefault(key, []).append(row)
    return groups


def _aggregate_sort_keys(
    query: Query, columns: list[_AggregateColumn], binder: _Binder
) -> list[tuple[Callable[[Any], Any], bool, bool]]:
    keys: list[tuple[Callable[[Any], Any], bool, bool]] = []
    for order in query.order_by:
        column = _order_column(order, columns, binder)
        ftype = column.bound.field_type if column.bound and not column.func else "double"
        keys.append((_column_value(column.key, ftype), order.descending, order.nulls_last))
    return keys


def _column_value(key: str, field_type: str) -> Callable[[Row], Any]:
    return lambda record: _comparable(field_type, record[key])


def _order_column(order: OrderItem, columns: list[_AggregateColumn], binder: _Binder) -> _AggregateColumn:
    """An ORDER BY item of an aggregate query names an alias, a grouped field or an aggregate."""
    target = order.target
    if isinstance(target, SelectAggregate):
        wanted = binder.bind(target.path).dotted if target.path else None
        for column in columns:
            have = column.bound.dotted if column.bound else None
            if column.func == target.func and wanted == have:
                return column
    else:
        for column in columns:
            if len(target.parts) == 1 and target.parts[0].lower() == column.key.lower():
                return column
        dotted = binder.bind(target).dotted
        for column in columns:
            if column.func is None and column.bound and column.bound.dotted == dotted:
                return column
    raise _syntax_error(binder.source, target.pos, "ORDER BY needs a grouped field or a selected aggregate")
