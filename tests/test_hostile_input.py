"""Hostile input never reaches SOQL, SOAP or URLs unescaped or unvalidated (SPEC §9).

User input goes end to end (signed slash command → the real bot → the simulators), and the
assertions are on what each simulator actually received: the SOQL text the org parsed, the SOAP
values the Metadata API parsed, the raw request paths of sfp and FlexDeploy, every request an
artifact store (or a would-be attacker's server) saw. Answers from a hostile server (XML entity
bombs, external entities) are tested at the client, against a test-only server over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.auth import TokenCache, parse_sfdx_auth_url
from bot.clients.salesforce.metadata import DeployOptions, MetadataClient
from bot.clients.salesforce.rest import SalesforceClient
from bot.errors import AmbiguousWriteError, TransientError
from bot.redaction import redact_text
from bot.sandbox.embedded import SANDBOX_ADMINS, Sandbox, running_sandbox
from bot.sandbox.flexdeploy_server import FlexDeploySim
from bot.sandbox.metadata_api import MetadataApiSim
from bot.sandbox.sfp_server import SfpServerSim
from bot.sandbox.soql import _Lexer
from bot.settings import ArtifactsConfig
from bot.store import repo
from bot.store.models import AuditEvent
from tests.helpers import CHANNEL, ephemerals, full_text, next_ephemeral, writes

ALICE = "U0ALICE"
FD_PACKAGE = "/flexdeploy/rest/v1/project/101/package"


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40) as running:
        yield running


async def run(sandbox: Sandbox, command: str, text: str, *, user: str = ALICE) -> str:
    """Run ``/<command> <text>`` as ``user`` (Alice); the first ephemeral answer, Slack's escapes undone."""
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.command(user=user, channel=CHANNEL, command=f"/{command}", text=text)
    assert result.status == 200, result
    answer = await next_ephemeral(sandbox, user, before)
    return answer.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


async def nothing_created(sandbox: Sandbox, details: list[str]) -> None:
    """No operation exists, and each command left exactly one ``refused`` audit row."""
    assert sandbox.runtime is not None
    db = sandbox.runtime.db
    assert await repo.count_operations(db) == 0
    rows: list[AuditEvent] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # a syntax error is answered in the ack, audited just after
        rows = list(await repo.audit_events(db))
        if len(rows) >= len(details):
            break
        await asyncio.sleep(0.05)
    # Audit rows are redacted like every output: `op:x?token=1` is kept as `op:x?token=[redacted]`.
    assert sorted(row.detail for row in rows) == sorted(redact_text(detail) for detail in details)
    assert all(row.outcome.startswith("refused") for row in rows), [row.outcome for row in rows]


def soap_requests(sandbox: Sandbox) -> int:
    return sum(1 for org in (sandbox.production, sandbox.sandbox_org) for _, path in org.calls if "/Soap/m/" in path)


def mdapi(sandbox: Sandbox) -> MetadataApiSim:
    sim = sandbox.sandbox_org.metadata
    assert sim is not None
    return sim


def sfp_sim(sandbox: Sandbox) -> SfpServerSim:
    sim = sandbox.servers["sfp"]
    assert isinstance(sim, SfpServerSim)
    return sim


def fd_sim(sandbox: Sandbox) -> FlexDeploySim:
    sim = sandbox.servers["flexdeploy"]
    assert isinstance(sim, FlexDeploySim)
    return sim


# --------------------------------------------------------------------------- SOQL


def string_literals(soql: str) -> list[str]:
    """The decoded string literals of a query, as Salesforce's lexer reads them."""
    return [token.value.text for token in _Lexer(soql).run() if token.kind == "STRING"]


def keywords(soql: str) -> list[str]:
    return [token.text.upper() for token in _Lexer(soql).run() if token.kind == "IDENT"]


HOSTILE_PACKAGE_NAMES = [
    "Acme Billing' OR MetadataPackage.Name LIKE 'A",  # closes the literal, adds a clause
    "Acme Billing') OR (MetadataPackage.Name LIKE 'A",
    "O'Brien Tools",
    "Acme_Billing",  # `_` is a LIKE wildcard: an exact match must not find "Acme Billing"
]


async def test_package_names_stay_one_exact_soql_literal(sandbox: Sandbox) -> None:
    for name in HOSTILE_PACKAGE_NAMES:
        sandbox.packaging.reset_calls()
        answer = await run(sandbox, "push", f'create "{name}@1.4.0"')
        assert f"No package called `{name}`" in answer, answer
        lookups = [q for q in sandbox.packaging.queries if "FROM MetadataPackageVersion" in q]
        assert len(lookups) == 1, sandbox.packaging.queries
        soql = lookups[0]
        assert string_literals(soql) == [name], soql  # the whole name is one literal, read back exactly
        assert "OR" not in keywords(soql) and "LIKE" not in keywords(soql), soql
        assert "MetadataPackage.Name = '" in soql
        assert writes(sandbox.packaging.calls) == []
    assert sandbox.runtime is not None and await repo.count_operations(sandbox.runtime.db) == 0


HOSTILE_PUSH_INPUT = [
    ("create \"Acme Billing' OR Name != 'x@1.4.0\"", "is not a package name I can look up"),
    ('create "Acme%@1.4.0"', "is not a package name I can look up"),
    ('create "Acme\\\\@1.4.0"', "is not a package name I can look up"),
    ("create \"Acme Billing@1.4.0' OR '1'='1\"", "is not a version"),
    ("create \"04t000000000000' OR Id != '\"", "is not a package version id"),
    ("create 04t00000000000%25", "is not a package version id"),
    ("create Acme Billing@1.4.0 --orgs \"00D000000000001' OR '1'='1\"", "not valid"),
    ("create Acme Billing@1.4.0 --orgs 00D00000000000%", "not valid: `00D00000000000%`"),
    ("create Acme Billing@1.4.0 --orgs 00D0000000000_1", "not valid: `00D0000000000_1`"),
    ("status \"P1' OR '1'='1\"", "is not a reference"),
]


async def test_hostile_push_input_is_refused_before_any_query(sandbox: Sandbox) -> None:
    sandbox.packaging.reset_calls()
    for text, fragment in HOSTILE_PUSH_INPUT:
        answer = await run(sandbox, "push", text)
        assert fragment in answer, (text, answer)
        assert "/push create <version>" in answer  # the usage comes with the refusal
    assert sandbox.packaging.queries == [] and sandbox.packaging.calls == []
    await nothing_created(sandbox, [f"/push {text}" for text, _ in HOSTILE_PUSH_INPUT])


# --------------------------------------------------------------------------- SOAP


HOSTILE_TEST_NAMES = [
    "A<B",
    "A&B",
    "Evil]]>",
    'Quote"Test',
    "Evil</met:runTests><met:testLevel>NoTestRun</met:testLevel><met:runTests>X",
    "&lt;Encoded&gt;",
    "Test;DROP",
]


async def test_hostile_test_class_names_never_reach_the_soap_envelope(sandbox: Sandbox) -> None:
    texts = []
    for name in HOSTILE_TEST_NAMES:
        texts.append(f"validate uat good-release.zip --tests 'InvoiceServiceTest,{name}'")
        answer = await run(sandbox, "deploy", texts[-1])
        assert f"Not an Apex test class name: `{name[:60]}`" in answer, (name, answer)
    texts.append("validate 'uat<x>' good-release.zip")
    assert "is not an org alias" in await run(sandbox, "deploy", texts[-1])
    assert soap_requests(sandbox) == 0
    await nothing_created(sandbox, [f"/deploy {text}" for text in texts])

    # A legitimate namespaced class and method goes through and is parsed back literally.
    answer = await run(
        sandbox, "deploy", "validate uat good-release.zip --tests InvoiceServiceTest,acme__TaxTest.round"
    )
    assert "is starting" in answer, answer
    found = await sandbox.slack.wait_for(lambda: mdapi(sandbox).calls("deploy") or None, 10)
    assert found is not None
    assert found[0].args["runTests"] == ["InvoiceServiceTest", "acme__TaxTest.round"]


# --------------------------------------------------------------------------- URLs: sfp

HOSTILE_OPERATION_IDS = ["../../admin", "1/../../admin", "x?token=1", "x#frag", "a%2Fb", "..", ".", "ünïcode", "a\\b"]


async def test_hostile_sfp_operation_ids_are_refused_before_any_call(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    texts = [f"{action} 'op:{op_id}'" for action in ("status", "cancel", "stop") for op_id in HOSTILE_OPERATION_IDS]
    for text in texts:
        answer = await run(sandbox, "sfp", text)
        assert "is not an sfp operation id" in answer, (text, answer)
    assert sim.calls == []
    await nothing_created(sandbox, [f"/sfp {text}" for text in texts])

    # An odd but valid id (dots and colons) is sent, as one path segment (by an admin: a task
    # the bot did not submit is for admins only).
    answer = await run(sandbox, "sfp", "status op:1..2:x", user=SANDBOX_ADMINS[0])
    assert "has no task with operation id `1..2:x`" in answer, answer
    assert sim.calls == [("GET", "/sfp/api/tasks/1..2:x/status")]


async def test_sfp_task_data_goes_in_the_json_body_never_the_url(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    value = "../../admin?x=1#frag %2F ü"
    answer = await run(sandbox, "sfp", f"submit checkReviewEnvironment 'env={value}' 'note=</x>&'")
    assert "S1" in answer, answer
    found = await sandbox.slack.wait_for(lambda: sim.bodies or None, 10)
    assert found is not None
    assert found[0]["data"] == {"env": value, "note": "</x>&"}
    assert [call for call in sim.calls if call[0] != "GET"] == [("POST", "/sfp/api/tasks")]
    assert all(path.startswith("/sfp/api/tasks/") and path.count("/") == 5 for m, path in sim.calls if m == "GET")


# --------------------------------------------------------------------------- URLs: FlexDeploy

HOSTILE_PROJECT_IDS = ["101/../102", "101%2F", "..", "101?x=1", "101#x", "-1", "0x65", "1e3", "101 "]
HOSTILE_PACKAGE_NAMES_FD = [
    "../../../admin",
    "../102/package/Release 42",
    "a/../../b",
    "%2F..%2Fadmin",
    "..%2F..%2F",
    "x?y=1#z",
    "..;",
    "...",
    "Ünïcödé ✓ \u202egnp.exe",
]


async def test_hostile_flexdeploy_project_ids_and_dot_names_are_refused(sandbox: Sandbox) -> None:
    texts = []
    for project in HOSTILE_PROJECT_IDS:
        texts.append(f"show '{project}' 'Release 42'")
        answer = await run(sandbox, "fd", texts[-1])
        assert "is not a FlexDeploy project id" in answer, (project, answer)
    for name in ("..", "."):  # as a path segment these would mean "parent" and "this"
        texts.append(f'delete 101 "{name}"')
        answer = await run(sandbox, "fd", texts[-1])
        assert f"`{name}` cannot be used as a package name" in answer, answer
    assert fd_sim(sandbox).calls == []
    await nothing_created(sandbox, [f"/fd {text}" for text in texts])


async def test_flexdeploy_package_names_are_one_percent_encoded_segment(sandbox: Sandbox) -> None:
    sim = fd_sim(sandbox)
    for name in HOSTILE_PACKAGE_NAMES_FD:
        sim.reset_calls()
        answer = await run(sandbox, "fd", f'show 101 "{name}"')
        assert f"FlexDeploy has no package `{name}` in project 101" in answer, answer
        encoded = f"{FD_PACKAGE}/{quote(name, safe='')}"
        assert sim.calls == [("GET", encoded)]
        assert encoded.count("/") == FD_PACKAGE.count("/") + 1

    # A write with such a name goes to the package collection of project 101 and nowhere else.
    sim.reset_calls()
    name = "../102/package/x?y=1#z"
    answer = await run(sandbox, "fd", f'create 101 "{name}" --files "/src/classes/A.cls"')
    assert "is being sent to FlexDeploy" in answer, answer
    # The poller makes the change and says so on its card.
    card = await sandbox.slack.wait_for(
        lambda: next(
            (m for m in sandbox.slack.messages.get(CHANNEL, []) if f"Done: create `{name}`" in full_text(m)), None
        ),
        15,
    )
    assert card is not None
    assert sim.writes() == [("POST", FD_PACKAGE)]
    assert sim.package(101, name) is not None and sim.requests[-1].body["name"] == name  # type: ignore[index]
    assert sim.package(102, "x") is None and all(path.startswith(FD_PACKAGE) for _, path in sim.calls)


# --------------------------------------------------------------------------- URLs and paths: artifacts


class RecordingServer:
    """Records every request it gets and answers 404: an artifact store, or a would-be target."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.server = TestServer(app, host="127.0.0.1")

    async def _any(self, request: web.Request) -> web.Response:
        self.requests.append(request.raw_path)
        return web.Response(status=404)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[Sandbox, RecordingServer, RecordingServer]]:
    """A sandbox whose allowed artifact prefixes are a recording store and allowed.example.com."""
    store, evil = RecordingServer(), RecordingServer()
    await store.server.start_server()
    await evil.server.start_server()
    config = ArtifactsConfig(
        dir=tmp_path / "artifacts",
        allowed_url_prefixes=[f"{store.base}/releases/", "https://allowed.example.com/releases/"],
    )
    try:
        async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, artifacts=config) as running:
            yield running, store, evil
    finally:
        await store.server.close()
        await evil.server.close()


async def test_artifact_urls_outside_the_allowed_prefixes_are_refused_before_any_request(
    stores: tuple[Sandbox, RecordingServer, RecordingServer],
) -> None:
    sandbox, store, evil = stores
    allowed, evil_host = store.base.removeprefix("http://"), evil.base.removeprefix("http://")
    cases = [
        ("https://allowed.example.com@evil.com/releases/x.zip", "may not carry credentials"),
        ("https://allowed.example.com:443@evil.com/releases/x.zip", "may not carry credentials"),
        ("https://allowed.example.com\\@evil.com/releases/x.zip", "may not carry credentials"),
        (f"http://{allowed}@{evil_host}/releases/x.zip", "may not carry credentials"),
        ("https://allowed.example.com.evil.com/releases/x.zip", "not under an allowed prefix"),
        ("https://allowed.example.com%40evil.com/releases/x.zip", "not under an allowed prefix"),
        ("https://evil.com/https://allowed.example.com/releases/x.zip", "not under an allowed prefix"),
        ("https://evil.com/?u=https://allowed.example.com/releases/x.zip", "not under an allowed prefix"),
        ("https://evil.com#https://allowed.example.com/releases/x.zip", "not under an allowed prefix"),
        ("https://allowed.example.com/releases-evil/x.zip", "not under an allowed prefix"),
        (f"{evil.base}/releases/x.zip", "not under an allowed prefix"),
        (f"{store.base}/admin/x.zip", "not under an allowed prefix"),
        (f"{store.base}/releases/../admin/x.zip", "has `..` in its path"),
        (f"{store.base}/releases/%2e%2e/admin/x.zip", "has `..` in its path"),
        (f"{store.base}/releases/..;/admin/x.zip", "has `..` in its path"),  # Tomcat reads `..;` as `..`
        (f"{store.base}/releases/%2E%2E;jsessionid=1/admin/x.zip", "has `..` in its path"),
        (f"{store.base}/releases/a%2F..%2F..%2Fadmin.zip", "encoded slash or backslash"),
        (f"{store.base}/releases/..%5cadmin.zip", "encoded slash or backslash"),
        ("http://allowed.example.com/releases/x.zip", "must be https"),
        ("file:///etc/passwd", "is not an https URL"),
        ("ftp://allowed.example.com/releases/x.zip", "is not an https URL"),
    ]
    for url, fragment in cases:
        answer = await run(sandbox, "deploy", f"validate uat '{url}'")
        assert fragment in answer, (url, answer)
    assert store.requests == [] and evil.requests == []
    assert soap_requests(sandbox) == 0
    await nothing_created(sandbox, [f"/deploy validate uat '{url}'" for url, _ in cases])

    # Under the prefix, the bot does fetch, and from exactly that path (the store has no such file).
    answer = await run(sandbox, "deploy", f"validate uat {store.base}/releases/good-release.zip")
    assert "has no" in answer and "HTTP 404" in answer, answer
    assert store.requests == ["/releases/good-release.zip"] and evil.requests == []


async def test_artifact_paths_escaping_the_artifacts_directory_are_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    root = sandbox.settings.artifacts.dir
    assert root is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "package.xml").write_text((root / "good-release" / "package.xml").read_text())
    (outside / "secret.zip").write_bytes((root / "good-release.zip").read_bytes())
    (root / "linked.zip").symlink_to(outside / "secret.zip")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "package.xml").write_text((root / "good-release" / "package.xml").read_text())
    (sneaky / "classes").mkdir()
    (sneaky / "classes" / "Stolen.cls").symlink_to(outside / "secret.zip")
    cases = [
        ("/etc/passwd", "give a path relative to the artifacts directory"),
        (str(outside / "secret.zip"), "give a path relative to the artifacts directory"),
        ("~/secret.zip", "give a path relative to the artifacts directory"),
        ("C:\\secret.zip", "give a path relative to the artifacts directory"),
        ("..\\chatops.db", "give a path relative to the artifacts directory"),
        ("../chatops.db", "points outside the artifacts directory"),
        ("good-release/../../chatops.db", "points outside the artifacts directory"),
        ("linked.zip", "is a symbolic link"),
        ("linked-dir", "is a symbolic link"),
        ("linked-dir/secret.zip", "is a symbolic link"),
        ("sneaky", "is a symbolic link"),
    ]
    for ref, fragment in cases:
        answer = await run(sandbox, "deploy", f"validate uat '{ref}'")
        assert fragment in answer, (ref, answer)
    assert soap_requests(sandbox) == 0
    await nothing_created(sandbox, [f"/deploy validate uat '{ref}'" for ref, _ in cases])


# --------------------------------------------------------------------------- a hostile SOAP server

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
DEPLOY_ID = "0Af000000000001AAA"


def billion_laughs(inner: str) -> bytes:
    """Ten levels of ten: expanded, ``&lol9;`` would be 10^9 "lol"s (about 3 GB)."""
    entities = ['<!ENTITY lol "lol">'] + [
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    ]
    return (
        '<?xml version="1.0"?><!DOCTYPE lolz [' + "".join(entities) + "]>"
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns="http://soap.sforce.com/2006/04/metadata"><soapenv:Body>' + inner + "</soapenv:Body></soapenv:Envelope>"
    ).encode()


def external_entity(inner: str, secret: Path) -> bytes:
    return (
        f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file://{secret}">]>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns="http://soap.sforce.com/2006/04/metadata"><soapenv:Body>' + inner + "</soapenv:Body></soapenv:Envelope>"
    ).encode()


class HostileOrg:
    """A "Salesforce" that hands out a token, then answers every SOAP call with ``answer``."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] = (200, b"")
        self.soap_calls: list[str] = []
        app = web.Application()
        app.router.add_post("/services/oauth2/token", self._token)
        app.router.add_post("/services/Soap/m/{version}", self._soap)
        self.server = TestServer(app, host="127.0.0.1")

    async def _token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "hostile-token", "instance_url": self.base})

    async def _soap(self, request: web.Request) -> web.Response:
        self.soap_calls.append(request.headers.get("SOAPAction", ""))
        status, body = self.answer
        return web.Response(status=status, body=body, content_type="text/xml")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[HostileOrg, MetadataClient]]:
    org = HostileOrg()
    await org.server.start_server()
    async with aiohttp.ClientSession() as session:
        tokens = TokenCache(parse_sfdx_auth_url(f"force://id:secret:refresh@{org.base}"))
        rest = SalesforceClient(session=session, tokens=tokens, retry=FAST)
        yield org, MetadataClient(rest=rest, session=session, retry=FAST)
    await org.server.close()


STATUS_RESULT = f"<checkDeployStatusResponse><result><id>{DEPLOY_ID}</id><done>true</done><status>&lol9;</status>"
STATUS_RESULT += "<success>true</success></result></checkDeployStatusResponse>"


async def test_an_entity_bomb_from_the_server_is_an_error_not_expanded(
    hostile: tuple[HostileOrg, MetadataClient],
) -> None:
    org, md = hostile
    org.answer = (200, billion_laughs(STATUS_RESULT))
    started = time.monotonic()
    with pytest.raises(TransientError, match="unreadable checkDeployStatus response"):
        await md.check_deploy_status(DEPLOY_ID)
    assert time.monotonic() - started < 5  # refused at the DTD, not expanded
    # The same bomb inside a fault with HTTP 500 is not read as a fault either.
    org.answer = (500, billion_laughs("<soapenv:Fault><faultcode>sf:&lol9;</faultcode></soapenv:Fault>"))
    with pytest.raises(TransientError, match="HTTP 500"):
        await md.check_deploy_status(DEPLOY_ID)
    # No DTD is processed at all, not even a small one an ordinary parser would expand.
    small = STATUS_RESULT.replace("&lol9;", "&ok;").encode()
    doctype = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY ok "Succeeded">]>'
    envelope = b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
    org.answer = (200, doctype + envelope + small + b"</soapenv:Body></soapenv:Envelope>")
    with pytest.raises(TransientError, match="unreadable"):
        await md.check_deploy_status(DEPLOY_ID)


async def test_an_external_entity_from_the_server_is_never_resolved(
    hostile: tuple[HostileOrg, MetadataClient], tmp_path: Path
) -> None:
    org, md = hostile
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-FILE-CONTENT")
    inner = f"<checkDeployStatusResponse><result><id>{DEPLOY_ID}</id><done>true</done>"
    inner += "<status>Failed</status><errorMessage>&xxe;</errorMessage></result></checkDeployStatusResponse>"
    org.answer = (200, external_entity(inner, secret))
    with pytest.raises(TransientError) as error:
        await md.check_deploy_status(DEPLOY_ID)
    assert "TOP-SECRET" not in str(error.value)


async def test_an_unreadable_answer_to_deploy_is_ambiguous_and_never_resent(
    hostile: tuple[HostileOrg, MetadataClient],
) -> None:
    """HTTP 200 means Salesforce took the deployment: a body the bot cannot read must not make it
    send the deployment again (the deploy service resends only on TransientError)."""
    org, md = hostile
    for body in (
        billion_laughs("<deployResponse><result><id>&lol9;</id></result></deployResponse>"),
        b"<soapenv:Envelope><soapenv:Body><deployRes",  # cut off
        b'<?xml version="1.0"?><Envelope><Body><deployResponse><result><id>../../x</id></result>'
        b"</deployResponse></Body></Envelope>",  # not an id
    ):
        org.soap_calls.clear()
        org.answer = (200, body)
        with pytest.raises(AmbiguousWriteError):
            await md.deploy(b"PK\x05\x06" + b"\0" * 18, DeployOptions())
        assert org.soap_calls == ["deploy"]
    org.soap_calls.clear()
    org.answer = (
        200,
        billion_laughs("<deployRecentValidationResponse><result>&lol9;</result></deployRecentValidationResponse>"),
    )
    with pytest.raises(AmbiguousWriteError):
        await md.deploy_recent_validation(DEPLOY_ID)
    assert org.soap_calls == ["deployRecentValidation"]
