"""The simulated Salesforce org, exercised over real HTTP the way the bot's client uses it."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.sandbox import org_data
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.sandbox.soql import SoqlError, run_query

V = "/services/data/v61.0"
STICKY = {"IneligibleUpgrade", "FeatureMissing"}


class Api:
    """A minimal REST caller: one session, one token, bodies decoded as Salesforce sends them."""

    def __init__(self, session: aiohttp.ClientSession, sim: SalesforceOrgSim) -> None:
        self.session = session
        self.sim = sim
        self.token = ""

    async def login(self) -> dict[str, Any]:
        async with self.session.post(
            f"{self.sim.url}/services/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": self.sim.client_id,
                "client_secret": self.sim.client_secret,
                "refresh_token": self.sim.refresh_token,
            },
        ) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
        self.token = body["access_token"]
        return body

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        async with self.session.request(
            method, f"{self.sim.url}{path}", json=body, data=data, headers=all_headers, params=params
        ) as response:
            text = await response.text()
            if response.content_type == "application/json" and text:
                return response.status, json.loads(text)
            return response.status, text

    async def query(self, soql: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"{V}/query", params={"q": soql})
        assert status == 200, body
        return dict(body)

    async def query_error(self, soql: str) -> tuple[int, dict[str, Any]]:
        status, body = await self.call("GET", f"{V}/query", params={"q": soql})
        return status, body[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def sim() -> AsyncIterator[SalesforceOrgSim]:
    org = SalesforceOrgSim()
    await org.start()
    yield org
    await org.stop()


@pytest.fixture
async def api(session: aiohttp.ClientSession, sim: SalesforceOrgSim) -> Api:
    caller = Api(session, sim)
    await caller.login()
    return caller


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


async def started(**options: Any) -> SalesforceOrgSim:
    org = SalesforceOrgSim(**options)
    await org.start()
    return org


def version_id(sim: SalesforceOrgSim, label: str, package: str = "Acme Billing") -> str:
    package_id = next(row["Id"] for row in sim.packages if row["Name"] == package)
    for row in sim.versions:
        if (
            row["MetadataPackageId"] == package_id
            and f"{row['MajorVersion']}.{row['MinorVersion']}.{row['PatchVersion']}" == label
        ):
            return str(row["Id"])
    raise AssertionError(label)


def eligible_keys(sim: SalesforceOrgSim, target: str) -> list[str]:
    """Subscribers a push to target may include (by the rules, not counting refused orgs)."""
    versions = {row["Id"]: row for row in sim.versions}
    goal = versions[target]
    numbers = ("MajorVersion", "MinorVersion", "PatchVersion")
    return [
        row["OrgKey"]
        for row in sim.subscribers
        if row["MetadataPackageId"] == goal["MetadataPackageId"]
        and row["InstalledStatus"] == "i"
        and row["OrgStatus"] != "Inactive"
        and tuple(versions[row["MetadataPackageVersionId"]][n] for n in numbers) < tuple(goal[n] for n in numbers)
    ]


def status_of(sim: SalesforceOrgSim, request_id: str) -> str:
    request = sim.push_request(request_id)
    assert request is not None
    return str(request["Status"])


async def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def create_request(api: Api, version: str, **extra: Any) -> str:
    status, body = await api.call(
        "POST", f"{V}/sobjects/PackagePushRequest/", body={"PackageVersionId": version, **extra}
    )
    assert status == 201, body
    assert body["success"] is True and body["errors"] == []
    return str(body["id"])


async def add_jobs(api: Api, request_id: str, org_keys: list[str], *, all_or_none: bool = False) -> list[Any]:
    records = [
        {"attributes": {"type": "PackagePushJob"}, "PackagePushRequestId": request_id, "SubscriberOrganizationKey": key}
        for key in org_keys
    ]
    status, body = await api.call(
        "POST", f"{V}/composite/sobjects", body={"allOrNone": all_or_none, "records": records}
    )
    assert status == 200, body
    return list(body)


# --------------------------------------------------------------------------- OAuth


async def test_refresh_grant_answers_the_documented_token_shape(sim: SalesforceOrgSim, api: Api) -> None:
    body = await api.login()
    assert body["instance_url"] == sim.url
    assert body["token_type"] == "Bearer"
    assert re.fullmatch(rf"{re.escape(sim.url)}/id/{sim.org_id}/005\w{{15}}", body["id"])
    assert body["issued_at"].isdigit() and body["signature"]
    assert build_auth_url(sim) == f"force://sandbox-client:sandbox-secret:sandbox-refresh@{sim.url}"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"refresh_token": "stale"}, "invalid_grant"),
        ({"client_id": "someone-else"}, "invalid_client_id"),
        ({"client_secret": "wrong"}, "invalid_client"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
    ],
)
async def test_bad_token_requests_are_refused(
    sim: SalesforceOrgSim, session: aiohttp.ClientSession, changes: dict[str, str], error: str
) -> None:
    form = {
        "grant_type": "refresh_token",
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "refresh_token": sim.refresh_token,
        **changes,
    }
    async with session.post(f"{sim.url}/services/oauth2/token", data=form) as response:
        assert response.status == 400
        assert (await response.json())["error"] == error


async def test_jwt_bearer_grant_checks_signature_and_claims(session: aiohttp.ClientSession) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    sim = await started(kind="production", jwt_public_key=public_pem)
    try:

        async def grant(signing_key: Any, **claims: Any) -> tuple[int, dict[str, Any]]:
            payload = {
                "iss": sim.client_id,
                "sub": "ci@example.com",
                "aud": sim.url,
                "exp": int(time.time()) + 170,
                **claims,
            }
            assertion = jwt.encode(payload, signing_key, algorithm="RS256")
            async with session.post(
                f"{sim.url}/services/oauth2/token",
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": assertion,
                },
            ) as response:
                return response.status, await response.json()

        status, body = await grant(key)
        assert status == 200 and body["instance_url"] == sim.url and "refresh_token" not in body
        assert (await grant(other))[1]["error"] == "invalid_grant"
        assert (await grant(key, aud="https://evil.example"))[1]["error_description"] == "audience is invalid"
        assert (await grant(key, exp=int(time.time()) - 60))[1]["error"] == "invalid_grant"
        assert (await grant(key, iss="other-app"))[1]["error"] == "invalid_client_id"
    finally:
        await sim.stop()


# --------------------------------------------------------------------------- queries


async def test_query_pages_through_all_subscribers(sim: SalesforceOrgSim, api: Api) -> None:
    billing = next(row["Id"] for row in sim.packages if row["Name"] == "Acme Billing")
    first = await api.query(f"SELECT Id, OrgKey FROM PackageSubscriber WHERE MetadataPackageId = '{billing}'")
    assert first["totalSize"] == 2400 and first["done"] is False and len(first["records"]) == 2000
    assert re.fullmatch(r"/services/data/v61\.0/query/01g\w{15}-2000", first["nextRecordsUrl"])
    status, second = await api.call("GET", first["nextRecordsUrl"])
    assert status == 200 and second["done"] is True and "nextRecordsUrl" not in second
    ids = [record["Id"] for record in first["records"] + second["records"]]
    assert len(ids) == len(set(ids)) == 2400
    record = first["records"][0]
    assert record["attributes"] == {
        "type": "PackageSubscriber",
        "url": f"{V}/sobjects/PackageSubscriber/{record['Id']}",
    }
    status, error = await api.call("GET", f"{V}/query/01gBOGUS0000000AAA-2000")
    assert status == 400 and error[0]["errorCode"] == "INVALID_QUERY_LOCATOR"


async def test_filters_and_relationship_fields(sim: SalesforceOrgSim, api: Api) -> None:
    def count(predicate: Callable[[dict[str, Any]], bool]) -> int:
        return sum(1 for row in sim.subscribers if predicate(row))

    body = await api.query(
        "SELECT Id FROM PackageSubscriber WHERE OrgStatus IN ('Trial','Demo') "
        "AND (OrgType = 'Sandbox' OR InstanceName LIKE 'na%')"
    )
    assert body["totalSize"] == count(
        lambda r: (
            r["OrgStatus"] in ("Trial", "Demo")
            and (r["OrgType"] == "Sandbox" or r["InstanceName"].lower().startswith("na"))
        )
    )
    body = await api.query(
        "SELECT Id FROM PackageSubscriber WHERE NOT (OrgStatus NOT IN ('Active')) AND ParentOrg != null"
    )
    assert body["totalSize"] == count(lambda r: r["OrgStatus"] == "Active" and r["ParentOrg"] is not None)

    body = await api.query(
        "SELECT Name, MajorVersion, MetadataPackage.Name, MetadataPackage.NamespacePrefix "
        "FROM MetadataPackageVersion WHERE MetadataPackage.Name = 'acme billing' "
        "AND ReleaseState = 'Released' AND IsDeprecated = false "
        "ORDER BY MinorVersion DESC LIMIT 2"
    )
    assert [r["Name"] for r in body["records"]] == ["Spring '26", "Winter '26"]
    parent = body["records"][0]["MetadataPackage"]
    assert parent["attributes"]["type"] == "MetadataPackage"
    assert (parent["Name"], parent["NamespacePrefix"]) == ("Acme Billing", "acmebill")


async def test_aggregate_queries_answer_aggregate_results(sim: SalesforceOrgSim, api: Api) -> None:
    body = await api.query(
        "SELECT OrgType, COUNT(Id) n, COUNT(ParentOrg) FROM PackageSubscriber "
        "WHERE MetadataPackage.NamespacePrefix = 'acmebill' GROUP BY OrgType ORDER BY OrgType"
    )
    rows = body["records"]
    assert [row["OrgType"] for row in rows] == ["Production", "Sandbox"]
    assert rows[0]["attributes"] == {"type": "AggregateResult"}
    assert rows[0]["n"] + rows[1]["n"] == 2400
    assert rows[0]["expr0"] == 0 and rows[1]["expr0"] == rows[1]["n"]  # only sandboxes have a ParentOrg
    body = await api.query("SELECT COUNT() FROM PackageSubscriber WHERE MetadataPackage.Name = 'Acme Insights'")
    assert body == {"totalSize": org_data.INSIGHTS_SUBSCRIBERS, "done": True, "records": []}


async def test_hostile_literal_stays_a_literal(api: Api) -> None:
    assert (await api.query(r"SELECT Id FROM PackageSubscriber WHERE OrgName = 'x\' OR Name != \''"))["totalSize"] == 0
    assert (await api.query(r"SELECT Id, OrgName FROM PackageSubscriber WHERE OrgName = 'O\'Brien & S\u00f8n'"))[
        "records"
    ][0]["OrgName"] == "O'Brien & Søn"
    # An unescaped quote ends the literal; the rest is then syntax, which Salesforce refuses.
    status, error = await api.query_error("SELECT Id FROM PackageSubscriber WHERE OrgName = 'x' OR Name != ''")
    assert status == 400 and error["errorCode"] == "INVALID_FIELD"


@pytest.mark.parametrize(
    ("soql", "code"),
    [
        (
            "SELECT Id FROM PackageSubscriber WHERE OrgType = 'a' AND OrgStatus = 'b' OR OrgName = 'c'",
            "MALFORMED_QUERY",
        ),
        ("SELECT Id FROM PackageSubscriber WHERE OrgName = 'unterminated", "MALFORMED_QUERY"),
        ("SELECT Id FROM PackageSubscriber WHERE OrgName = 'bad \\q escape'", "MALFORMED_QUERY"),
        ("SELECT Nope FROM PackageSubscriber", "INVALID_FIELD"),
        ("SELECT Id FROM Account", "INVALID_TYPE"),
        ("SELECT Id FROM MetadataPackageVersion WHERE IsDeprecated = 'false'", "INVALID_QUERY_FILTER_OPERATOR"),
        ("SELECT Id FROM PackagePushRequest WHERE Id = 'not-an-id'", "INVALID_QUERY_FILTER_OPERATOR"),
        ("SELECT OrgType, COUNT(Id) FROM PackageSubscriber GROUP BY OrgStatus", "MALFORMED_QUERY"),
    ],
)
async def test_bad_queries_answer_salesforce_error_codes(api: Api, soql: str, code: str) -> None:
    status, error = await api.query_error(soql)
    assert (status, error["errorCode"]) == (400, code)


def test_null_relationship_and_datetime_filters_in_the_engine() -> None:
    tables = org_data.make_tables()
    tables["PackagePushRequest"].insert(
        {
            "Id": "0DV5f0000000001AAA",
            "PackageVersionId": None,
            "Status": "Created",
            "ScheduledStartTime": None,
            "CreatedDate": "2026-11-23T10:00:00.000+0000",
            "SystemModstamp": "2026-11-23T10:00:00.000+0000",
        }
    )
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    result = run_query(
        "SELECT Id, PackageVersion.Name FROM PackagePushRequest WHERE CreatedDate >= "
        "2026-11-23T09:59:59Z AND CreatedDate = TODAY AND ScheduledStartTime = null",
        tables,
        api_version="61.0",
        now=now,
    )
    assert result.records[0]["PackageVersion"] is None
    assert (
        run_query(
            "SELECT Id FROM PackagePushRequest WHERE CreatedDate < 2026-11-23T10:00:00.000+00:00",
            tables,
            api_version="61.0",
            now=now,
        ).total_size
        == 0
    )
    with pytest.raises(SoqlError):
        run_query(
            "SELECT Id FROM PackagePushRequest WHERE CreatedDate = '2026-11-23'", tables, api_version="61.0", now=now
        )


# --------------------------------------------------------------------------- push upgrades


BulkOutcome = tuple[dict[str, Any], list[dict[str, str]], list[dict[str, str]]]


async def bulk_insert_jobs(api: Api, request_id: str, org_keys: list[str]) -> BulkOutcome:
    status, job = await api.call(
        "POST",
        f"{V}/jobs/ingest",
        body={"object": "PackagePushJob", "operation": "insert", "contentType": "CSV", "lineEnding": "LF"},
    )
    assert status == 200 and job["state"] == "Open" and job["id"].startswith("750")
    assert job["contentUrl"] == f"services/data/v61.0/jobs/ingest/{job['id']}/batches"
    data = "PackagePushRequestId,SubscriberOrganizationKey\n" + "".join(f"{request_id},{key}\n" for key in org_keys)
    status, _ = await api.call(
        "PUT", f"{V}/jobs/ingest/{job['id']}/batches", data=data.encode(), headers={"Content-Type": "text/csv"}
    )
    assert status == 201
    status, closed = await api.call("PATCH", f"{V}/jobs/ingest/{job['id']}", body={"state": "UploadComplete"})
    assert status == 200 and closed["state"] == "UploadComplete"

    async def complete() -> dict[str, Any] | None:
        _, info = await api.call("GET", f"{V}/jobs/ingest/{job['id']}")
        return dict(info) if info["state"] == "JobComplete" else None

    info = await wait_for(complete)
    _, succeeded = await api.call("GET", f"{V}/jobs/ingest/{job['id']}/successfulResults/")
    _, failed = await api.call("GET", f"{V}/jobs/ingest/{job['id']}/failedResults/")
    return info, list(csv.DictReader(io.StringIO(succeeded))), list(csv.DictReader(io.StringIO(failed)))


async def test_push_upgrade_end_to_end(sim: SalesforceOrgSim, api: Api) -> None:
    target = version_id(sim, "1.4.0")
    keys = eligible_keys(sim, target)
    refused = dict(sim.refuse_org_keys)
    assert len(refused) == 3 and set(refused) <= set(keys)
    inactive = next(row["OrgKey"] for row in sim.subscribers if row["OrgStatus"] == "Inactive")
    request_id = await create_request(api, target)
    assert request_id.startswith("0DV") and status_of(sim, request_id) == "Created"

    info, succeeded, failed = await bulk_insert_jobs(api, request_id, [*keys, inactive])
    assert info["numberRecordsProcessed"] == len(keys) + 1
    assert info["numberRecordsFailed"] == len(failed) == len(refused) + 1
    assert len(succeeded) == len(keys) - len(refused)
    assert all(row["sf__Id"].startswith("0DX") and row["sf__Created"] == "true" for row in succeeded)
    reasons = {row["SubscriberOrganizationKey"]: row["sf__Error"] for row in failed}
    for key, reason in refused.items():
        assert reasons[key] == f"FIELD_INTEGRITY_EXCEPTION:{reason}:SubscriberOrganizationKey --"
    assert "inactive" in reasons[inactive]

    status, _ = await api.call("PATCH", f"{V}/sobjects/PackagePushRequest/{request_id}", body={"Status": "Pending"})
    assert status == 204
    final = await wait_for(lambda: status_of(sim, request_id) in ("Succeeded", "Failed"))
    assert final
    request = sim.push_request(request_id)
    assert request is not None and request["Status"] == "Failed" and request["EndTime"]

    counts = await api.query(
        "SELECT PackagePushRequestId, Status, COUNT(Id) n FROM PackagePushJob WHERE "
        f"PackagePushRequestId IN ('{request_id}') GROUP BY PackagePushRequestId, Status"
    )
    by_status = {row["Status"]: row["n"] for row in counts["records"]}
    assert set(by_status) == {"Succeeded", "Failed"} and sum(by_status.values()) == len(succeeded)
    assert 0.02 < by_status["Failed"] / len(succeeded) < 0.09

    jobs = {job["SubscriberOrganizationKey"]: job for job in sim.push_jobs(request_id)}
    on_version = {
        row["OrgKey"]: row["MetadataPackageVersionId"]
        for row in sim.subscribers
        if row["MetadataPackageId"] == sim.packages[0]["Id"]
    }
    for key, job in jobs.items():
        assert (on_version[key] == target) == (job["Status"] == "Succeeded")

    errors = await api.query(
        "SELECT PackagePushJob.SubscriberOrganizationKey, ErrorSeverity, ErrorType, ErrorTitle, ErrorMessage, "
        f"ErrorDetails FROM PackagePushError WHERE PackagePushJob.PackagePushRequestId = '{request_id}'"
    )
    failed_keys = {key for key, job in jobs.items() if job["Status"] == "Failed"}
    assert errors["totalSize"] == len(failed_keys)
    assert {row["PackagePushJob"]["SubscriberOrganizationKey"] for row in errors["records"]} == failed_keys
    assert all(
        row["ErrorSeverity"] == "Error" and row["ErrorTitle"] and row["ErrorMessage"] for row in errors["records"]
    )

    # A retry of the failed orgs: sticky errors fail again, transient ones mostly succeed.
    first_error = {row["PackagePushJob"]["SubscriberOrganizationKey"]: row["ErrorType"] for row in errors["records"]}
    retry_id = await create_request(api, target)
    results = await add_jobs(api, retry_id, sorted(failed_keys))
    assert all(result["success"] for result in results)
    await api.call("PATCH", f"{V}/sobjects/PackagePushRequest/{retry_id}", body={"Status": "Pending"})
    await wait_for(lambda: status_of(sim, retry_id) in ("Succeeded", "Failed"))
    retried = {job["SubscriberOrganizationKey"]: job["Status"] for job in sim.push_jobs(retry_id)}
    for key, error_type in first_error.items():
        if error_type in STICKY:
            assert retried[key] == "Failed"
    transient = [key for key, kind in first_error.items() if kind in ("LockingFailure", "LimitExceeded")]
    if transient:
        assert sum(retried[key] == "Succeeded" for key in transient) >= len(transient) / 2


async def test_push_request_needs_a_released_current_version(sim: SalesforceOrgSim, api: Api) -> None:
    for label in ("1.5.0", "1.2.1"):  # beta, deprecated
        status, body = await api.call(
            "POST", f"{V}/sobjects/PackagePushRequest/", body={"PackageVersionId": version_id(sim, label)}
        )
        assert status == 400
        assert body[0]["errorCode"] == "FIELD_INTEGRITY_EXCEPTION" and body[0]["fields"] == ["PackageVersionId"]
    status, body = await api.call("POST", f"{V}/sobjects/PackagePushRequest/", body={"Bogus": 1})
    assert status == 400 and body[0]["errorCode"] == "INVALID_FIELD"


async def test_collections_report_each_refusal_and_honour_all_or_none(sim: SalesforceOrgSim, api: Api) -> None:
    target = version_id(sim, "1.4.0")
    request_id = await create_request(api, target)
    good = [key for key in eligible_keys(sim, target) if key not in sim.refuse_org_keys][:3]
    on_target = next(row["OrgKey"] for row in sim.subscribers if row["MetadataPackageVersionId"] == target)
    insights_only = next(
        row["OrgKey"]
        for row in sim.subscribers[2400:]
        if not any(s["OrgKey"] == row["OrgKey"] for s in sim.subscribers[:2400])
    )

    rolled_back = await add_jobs(api, request_id, [good[0], on_target], all_or_none=True)
    assert [r["errors"][0]["statusCode"] for r in rolled_back] == [
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "FIELD_INTEGRITY_EXCEPTION",
    ]
    assert sim.push_jobs(request_id) == []

    eighteen = org_data.to_18(good[1])
    results = await add_jobs(api, request_id, [good[0], good[0], eighteen, on_target, insights_only, "nonsense"])
    assert [r["success"] for r in results] == [True, False, True, False, False, False]
    assert results[1]["errors"][0]["statusCode"] == "DUPLICATE_VALUE"
    assert "not older" in results[3]["errors"][0]["message"]
    assert "not a subscriber" in results[4]["errors"][0]["message"]
    assert results[5]["errors"][0]["fields"] == ["SubscriberOrganizationKey"]
    again = await add_jobs(api, request_id, [good[1]])  # same org as the 18-character id above
    assert again[0]["errors"][0]["statusCode"] == "DUPLICATE_VALUE"

    status, single = await api.call(
        "POST",
        f"{V}/sobjects/PackagePushJob/",
        body={"PackagePushRequestId": request_id, "SubscriberOrganizationKey": good[2]},
    )
    assert status == 201 and single["id"].startswith("0DX")
    status, body = await api.call("GET", f"{V}/sobjects/PackagePushJob/{single['id']}")
    assert status == 200 and body["Status"] == "Created" and body["attributes"]["type"] == "PackagePushJob"

    too_many = [
        {
            "attributes": {"type": "PackagePushJob"},
            "PackagePushRequestId": request_id,
            "SubscriberOrganizationKey": good[0],
        }
    ] * 201
    status, body = await api.call("POST", f"{V}/composite/sobjects", body={"allOrNone": False, "records": too_many})
    assert status == 400 and body[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


async def test_cancel_rules_follow_the_request_status(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = await started(clock=clock, job_seconds=1.0, cancelled_spelling=True)
    try:
        api = Api(session, sim)
        await api.login()
        target = version_id(sim, "1.4.0")
        keys = [key for key in eligible_keys(sim, target) if key not in sim.refuse_org_keys]

        async def patch(request_id: str, status: str) -> tuple[int, Any]:
            return await api.call("PATCH", f"{V}/sobjects/PackagePushRequest/{request_id}", body={"Status": status})

        empty = await create_request(api, target)
        status, body = await patch(empty, "Pending")
        assert status == 400 and body[0]["errorCode"] == "INVALID_OPERATION"
        assert (await patch(empty, "Canceled"))[0] == 204

        later = await create_request(api, target, ScheduledStartTime="2026-11-24T02:00:00.000Z")
        await add_jobs(api, later, keys[:2])
        assert (await patch(later, "Pending"))[0] == 204
        clock.now += 3600  # still before the scheduled start
        assert status_of(sim, later) == "Pending"
        assert (await patch(later, "Canceled"))[0] == 204
        assert {job["Status"] for job in sim.push_jobs(later)} == {"Cancelled"}

        running = await create_request(api, target)
        await add_jobs(api, running, keys[2:120])
        await patch(running, "Pending")
        clock.now += 1.5  # first lane of 50 finished, second running
        _, record = await api.call("GET", f"{V}/sobjects/PackagePushRequest/{running}")
        assert record["Status"] == "In Progress" and record["StartTime"]
        statuses = [job["Status"] for job in sim.push_jobs(running)]
        assert statuses.count("In Progress") == 50 and statuses.count("Pending") == 18
        status, body = await patch(running, "Canceled")
        assert status == 400 and body[0]["errorCode"] == "INVALID_OPERATION"
        clock.now += 2
        assert status_of(sim, running) in ("Succeeded", "Failed")
    finally:
        await sim.stop()


# --------------------------------------------------------------------------- faults and plumbing


async def test_expired_sessions_answer_invalid_session_id(sim: SalesforceOrgSim, api: Api) -> None:
    sim.expire_sessions()
    status, body = await api.call("GET", f"{V}/query", params={"q": "SELECT Id FROM MetadataPackage"})
    assert status == 401 and body == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    await api.login()
    assert (await api.query("SELECT Id FROM MetadataPackage"))["totalSize"] == 2


async def test_fault_knobs(sim: SalesforceOrgSim, api: Api) -> None:
    sim.fail_next(1)
    sim.fail_next(1, status=500)
    status, page = await api.call("GET", f"{V}/sobjects/MetadataPackage/{sim.packages[0]['Id']}")
    assert status == 503 and "Maintenance" in page
    status, body = await api.call("GET", f"{V}/sobjects/MetadataPackage/{sim.packages[0]['Id']}")
    assert status == 500 and body[0]["errorCode"] == "UNKNOWN_EXCEPTION"

    sim.limit_exceeded_next(1)
    status, body = await api.call("GET", f"{V}/query", params={"q": "SELECT Id FROM MetadataPackage"})
    assert status == 403
    assert body == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]

    sim.drop_next(3)
    sim.fail_next(1)
    await api.login()  # OAuth is not a data call: neither knob touches it
    sim.reset_calls()
    with pytest.raises(aiohttp.ServerDisconnectedError):  # aiohttp retries a GET once by itself
        await api.call("GET", f"{V}/query", params={"q": "SELECT Id FROM MetadataPackage"})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.call("POST", f"{V}/sobjects/PackagePushRequest/", body={})
    assert len(sim.calls) == 3 and sim.push_jobs("0DV000000000000") == []
    assert (await api.call("GET", f"{V}/"))[0] == 503
    assert (await api.query("SELECT Id FROM MetadataPackage"))["totalSize"] == 2


async def test_calls_versions_and_unknown_paths(sim: SalesforceOrgSim, api: Api) -> None:
    sim.reset_calls()
    status, versions = await api.call("GET", "/services/data/")
    assert status == 200 and versions[-1] == {"label": "Summer '24", "url": "/services/data/v61.0", "version": "61.0"}
    status, body = await api.call("GET", f"{V}/nowhere")
    assert status == 404 and body == [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
    unknown_version = await api.call("GET", "/services/data/v99.0/query", params={"q": "SELECT Id FROM Account"})
    assert unknown_version[0] == 404
    assert sim.calls == [("GET", "/services/data/"), ("GET", f"{V}/nowhere"), ("GET", "/services/data/v99.0/query")]


def test_seed_is_deterministic() -> None:
    first, second = SalesforceOrgSim(seed=11, subscribers=300), SalesforceOrgSim(seed=11, subscribers=300)
    assert first.subscribers == second.subscribers and first.refuse_org_keys == second.refuse_org_keys
    names = {row["OrgName"] for row in first.subscribers}
    assert "O'Brien & Søn" in names and any(not name.isascii() for name in names)
    assert len({row["OrgKey"] for row in first.subscribers[:300]}) == 300
    assert all(len(row["OrgKey"]) == 15 and row["OrgKey"].startswith("00D") for row in first.subscribers)
    assert SalesforceOrgSim(kind="production").subscribers == []


@pytest.mark.parametrize("message", ["Internal Server Error", None])
async def test_injected_bulk_failure_keeps_what_it_inserted_and_says_what_salesforce_says(
    sim: SalesforceOrgSim, api: Api, message: str | None
) -> None:
    target = version_id(sim, "1.4.0")
    keys = [key for key in eligible_keys(sim, target) if key not in sim.refuse_org_keys][:500]
    request_id = await create_request(api, target)
    sim.fail_bulk_next(after=200, message=message)
    _, job = await api.call(
        "POST",
        f"{V}/jobs/ingest",
        body={"object": "PackagePushJob", "operation": "insert", "contentType": "CSV", "lineEnding": "LF"},
    )
    data = "PackagePushRequestId,SubscriberOrganizationKey\n" + "".join(f"{request_id},{key}\n" for key in keys)
    await api.call(
        "PUT", f"{V}/jobs/ingest/{job['id']}/batches", data=data.encode(), headers={"Content-Type": "text/csv"}
    )
    await api.call("PATCH", f"{V}/jobs/ingest/{job['id']}", body={"state": "UploadComplete"})

    async def ended() -> dict[str, Any] | None:
        _, info = await api.call("GET", f"{V}/jobs/ingest/{job['id']}")
        return dict(info) if info["state"] in ("JobComplete", "Failed") else None

    info = await wait_for(ended)
    assert info["state"] == "Failed" and info["numberRecordsProcessed"] == 200
    assert info.get("errorMessage") == message  # absent altogether when Salesforce gives none
    # Nothing it inserted is rolled back; the rest was never processed.
    assert len(sim.push_jobs(request_id)) == 200
    _, unprocessed = await api.call("GET", f"{V}/jobs/ingest/{job['id']}/unprocessedrecords/")
    assert len(list(csv.DictReader(io.StringIO(unprocessed)))) == len(keys) - 200
