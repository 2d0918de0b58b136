"""The Salesforce client against the simulated org over HTTP: auth flows, paging, retries, faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.auth import JwtBearerFlow, TokenCache, parse_sfdx_auth_url
from bot.clients.salesforce.rest import SalesforceClient, soql_literal
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


PRIVATE_KEY, PUBLIC_KEY = rsa_pair()


@pytest.fixture
async def sim() -> AsyncIterator[SalesforceOrgSim]:
    org = SalesforceOrgSim(jwt_public_key=PUBLIC_KEY)
    await org.start()
    yield org
    await org.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def client_for(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> SalesforceClient:
    return SalesforceClient(session=session, tokens=TokenCache(parse_sfdx_auth_url(build_auth_url(sim))), retry=FAST)


def test_sfdx_auth_url_forms() -> None:
    flow = parse_sfdx_auth_url("force://PlatformCLI::5Aep861.x.y@acme.my.salesforce.com")
    assert (flow.client_id, flow.client_secret, flow.refresh_token) == ("PlatformCLI", "", "5Aep861.x.y")
    assert flow.instance_url == "https://acme.my.salesforce.com"
    assert "5Aep" not in repr(flow)
    with pytest.raises(ValueError, match="https://"):
        parse_sfdx_auth_url("force://id:secret:token@http://acme.example.com")
    with pytest.raises(ValueError, match="not an SFDX auth URL"):
        parse_sfdx_auth_url("https://acme.my.salesforce.com")


def test_soql_literal_escapes_every_reserved_character() -> None:
    assert soql_literal('O\'Brien \\ "x"\n') == "'O\\'Brien \\\\ \\\"x\\\"\\n'"


async def test_query_follows_next_records_url(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    records = await client.query("SELECT OrgKey FROM PackageSubscriber")
    assert len(records) == len(sim.subscribers) > 2000
    assert sum(1 for _, path in sim.calls if "/query" in path) == 2


@pytest.mark.parametrize(
    "hostile", ["@evil.example.com/q", "//evil.example.com/q", "/services/apexrest/x", "https://evil.example.com/q"]
)
async def test_a_next_page_elsewhere_is_refused_and_never_fetched(session: aiohttp.ClientSession, hostile: str) -> None:
    """A nextRecordsUrl pointing anywhere but this API's query locator would take the bearer
    token with it (the path is appended to the instance URL): refused, nothing fetched."""

    class HostileOrg(SalesforceOrgSim):
        def _page(self, cursor: Any, locator: str | None, offset: int, version: str) -> dict[str, Any]:
            body = super()._page(cursor, locator, offset, version)
            if "nextRecordsUrl" in body:
                body["nextRecordsUrl"] = hostile
            return body

    org = HostileOrg()
    await org.start()
    try:
        with pytest.raises(ApiError, match="unexpected next page"):
            await client_for(org, session).query("SELECT OrgKey FROM PackageSubscriber")
        assert sum(1 for _, path in org.calls if "/query" in path) == 1
    finally:
        await org.stop()


async def test_jwt_bearer_flow(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    flow = JwtBearerFlow(login_url=sim.url, client_id=sim.client_id, username="ci@acme.com", private_key=PRIVATE_KEY)
    client = SalesforceClient(session=session, tokens=TokenCache(flow), retry=FAST)
    assert await client.query("SELECT Id FROM MetadataPackage")
    other, _ = rsa_pair()
    wrong = JwtBearerFlow(login_url=sim.url, client_id=sim.client_id, username="ci@acme.com", private_key=other)
    with pytest.raises(AuthError, match="invalid_grant"):
        await SalesforceClient(session=session, tokens=TokenCache(wrong), retry=FAST).query(
            "SELECT Id FROM MetadataPackage"
        )


async def test_expired_session_is_refreshed_once(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    await client.query("SELECT Id FROM MetadataPackage")
    sim.expire_sessions()
    sim.reset_calls()
    assert await client.query("SELECT Id FROM MetadataPackage")
    assert [path for _, path in sim.calls].count("/services/oauth2/token") == 1


async def test_bad_refresh_token_is_an_auth_error(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    url = build_auth_url(sim).replace(sim.refresh_token, "revoked")
    client = SalesforceClient(session=session, tokens=TokenCache(parse_sfdx_auth_url(url)), retry=FAST)
    with pytest.raises(AuthError, match="invalid_grant"):
        await client.query("SELECT Id FROM MetadataPackage")


async def test_reads_retry_through_503_limits_and_dropped_connections(
    sim: SalesforceOrgSim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    await client.query("SELECT Id FROM MetadataPackage")
    for inject in (
        lambda: sim.fail_next(2, status=503),
        lambda: sim.limit_exceeded_next(2),
        lambda: sim.drop_next(2),
        lambda: sim.fail_next(1, status=500),
    ):
        inject()
        assert await client.query("SELECT Id FROM MetadataPackage")


async def test_reads_give_up_as_transient_after_the_policy(
    sim: SalesforceOrgSim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    await client.query("SELECT Id FROM MetadataPackage")
    sim.fail_next(10, status=503)
    with pytest.raises(TransientError):
        await client.query("SELECT Id FROM MetadataPackage")


async def test_writes_are_not_blindly_repeated(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    version = (
        await client.query(
            "SELECT Id FROM MetadataPackageVersion WHERE ReleaseState = 'Released' AND IsDeprecated = false LIMIT 1"
        )
    )[0]["Id"]
    sim.fail_next(1, status=500)
    with pytest.raises(AmbiguousWriteError):
        await client.create("PackagePushRequest", {"PackageVersionId": version})
    sim.fail_next(1, status=503)  # a maintenance page: nothing was done, so retrying is safe
    assert await client.create("PackagePushRequest", {"PackageVersionId": version})


async def test_api_errors_carry_the_code_and_a_short_message(
    sim: SalesforceOrgSim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    with pytest.raises(ApiError) as caught:
        await client.query("SELECT Nope FROM PackageSubscriber")
    assert caught.value.code == "INVALID_FIELD" and len(caught.value.message) <= 300
