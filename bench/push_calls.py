"""Salesforce calls and wall time to resolve, create and start a push to N orgs.

The bot's own path (PushService: one Bulk API 2.0 ingest job) runs next to two baselines that
live only here: one PackagePushJob per REST call, and 200 per sObject Collections call (the
CumulusCI approach). All three resolve the version and read the subscribers the same way, and
run against the same simulated org in the same process, one after the other.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import packaging_settings
from bot.clients.salesforce.auth import TokenCache, parse_sfdx_auth_url
from bot.clients.salesforce.rest import SalesforceClient
from bot.core.advance import KindAdvancer
from bot.core.lifecycle import LeasedWrites
from bot.core.orgs import OrgRegistry
from bot.push.payloads import PushData
from bot.push.requests import OrgSelection, VersionSpec
from bot.push.service import PushService
from bot.push.steps import PushSteps
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.store import repo
from bot.store.db import Database, migrate
from bot.store.models import OpState

SPEC = VersionSpec(package_name="Acme Billing", number=(1, 4, 0))
ELIGIBLE_SHARE = 0.74  # a little under the generated share (about 0.75), so there is a surplus to trim
LATENCY = 0.05  # per Salesforce call, as in the poll-cycle benchmark: loopback alone flatters chatty clients
# Scheduled a day ahead and canceled after measuring, so every approach meets the same subscribers.
LATER = datetime.now(UTC) + timedelta(days=1)


async def _bot_path(sim: SalesforceOrgSim, session: aiohttp.ClientSession, workdir: Path) -> tuple[int, str]:
    settings = packaging_settings(sim, workdir)
    await migrate(settings.database_url)
    db = Database(settings.database_url)
    try:
        orgs = OrgRegistry(settings=settings, session=session)
        service = PushService(db=db, orgs=orgs, settings=settings)
        writes = LeasedWrites(db)
        advancer = KindAdvancer(steps=PushSteps(db=db, orgs=orgs, writes=writes), writes=writes)
        plan = await service.plan(SPEC, OrgSelection())
        op, _ = await service.create(
            plan, requester="UBENCH", channel="CBENCH", idempotency_key=f"bench-{time.time()}", scheduled_for=LATER
        )
        for _ in range(20):
            claimed = await repo.claim_due(
                db, owner="bench", now=datetime.now(UTC) + timedelta(hours=1), lease=timedelta(seconds=60), limit=10
            )
            await advancer.advance(claimed, lease_token=claimed[0].lease_owner or "")
            fresh = await repo.get_operation(db, operation_id=op.id or 0)
            assert fresh is not None
            if fresh.state in {OpState.RUNNING, OpState.SCHEDULED}:
                return len(plan.targets), str(fresh.external_id)
            await repo.release_lease(
                db, operation_id=fresh.id or 0, lease_token=claimed[0].lease_owner or "", next_poll_at=datetime.now(UTC)
            )
        raise RuntimeError(f"push did not start: {fresh.state} {PushData.of(fresh).error}")
    finally:
        await db.close()


async def _baseline(sim: SalesforceOrgSim, session: aiohttp.ClientSession, *, per_call: int) -> tuple[int, str]:
    client = SalesforceClient(session=session, tokens=TokenCache(parse_sfdx_auth_url(build_auth_url(sim))))
    versions = await client.query(
        "SELECT Id, MetadataPackageId, MajorVersion, MinorVersion, PatchVersion FROM MetadataPackageVersion "
        "WHERE MetadataPackage.Name = 'Acme Billing'"
    )
    target = next(v for v in versions if (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) == (1, 4, 0))
    older = {v["Id"] for v in versions if (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) < (1, 4, 0)}
    subscribers = await client.query(
        "SELECT OrgKey, MetadataPackageVersionId FROM PackageSubscriber WHERE MetadataPackageId = "
        f"'{target['MetadataPackageId']}' AND InstalledStatus = 'i' AND OrgStatus != 'Inactive'"
    )
    orgs = [s["OrgKey"] for s in subscribers if s["MetadataPackageVersionId"] in older]
    request_id = await client.create(
        "PackagePushRequest",
        {"PackageVersionId": target["Id"], "ScheduledStartTime": LATER.strftime("%Y-%m-%dT%H:%M:%S.000Z")},
    )
    records = [{"PackagePushRequestId": request_id, "SubscriberOrganizationKey": org} for org in orgs]
    if per_call == 1:
        limit = asyncio.Semaphore(16)

        async def one(record: dict[str, Any]) -> None:
            async with limit:
                try:
                    await client.create("PackagePushJob", record)
                except Exception:
                    pass

        await asyncio.gather(*(one(record) for record in records))
    else:
        await client.create_many("PackagePushJob", records)
    await client.update("PackagePushRequest", request_id, {"Status": "Pending"})
    return len(orgs), request_id


def _sim_with_eligible(orgs: int) -> tuple[SalesforceOrgSim, int]:
    """A packaging org where exactly ``orgs`` subscribers are eligible for the push, and its
    number of Acme Billing subscribers.

    The generated subscriber base has about three eligible orgs in four (the others are already on
    1.4.0 or newer, or uninstalled); we generate a few more than needed and mark the surplus
    inactive (expired orgs, which the subscriber query leaves out).
    """
    sim = SalesforceOrgSim(
        subscribers=math.ceil(orgs / ELIGIBLE_SHARE), failure_rate=0.0, job_seconds=3600.0, latency=LATENCY
    )
    versions = {v["Id"]: (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) for v in sim.versions}
    billing = next(p["Id"] for p in sim.packages if p["Name"] == SPEC.package_name)
    mine = [s for s in sim.subscribers if s["MetadataPackageId"] == billing]
    eligible = [
        s
        for s in mine
        if s["InstalledStatus"] == "i"
        and s["OrgStatus"] != "Inactive"
        and versions.get(s["MetadataPackageVersionId"], SPEC.number) < SPEC.number
    ]
    if len(eligible) < orgs:
        raise RuntimeError(f"the simulated org has only {len(eligible):,} eligible subscribers, not {orgs:,}")
    for subscriber in eligible[orgs:]:
        subscriber["OrgStatus"] = "Inactive"
    return sim, len(mine)


async def measure(orgs: int) -> dict[str, Any]:
    sim, subscribers = _sim_with_eligible(orgs)
    await sim.start()
    results: dict[str, Any] = {"orgs": orgs, "subscribers": subscribers}
    try:
        async with aiohttp.ClientSession() as session:
            with tempfile.TemporaryDirectory() as tmp:
                for name, run in (
                    ("bot (Bulk API 2.0)", lambda: _bot_path(sim, session, Path(tmp))),
                    ("baseline: 200 per call", lambda: _baseline(sim, session, per_call=200)),
                    ("baseline: 1 per call", lambda: _baseline(sim, session, per_call=1)),
                ):
                    sim.reset_calls()
                    started = time.perf_counter()
                    orgs, request_id = await run()
                    seconds = time.perf_counter() - started
                    calls = len(sim.calls)
                    # The subscriber query's pages: its first page, then one call per next-page locator.
                    pages = 1 + sum(1 for method, path in sim.calls if method == "GET" and "/query/" in path)
                    results[name] = {"orgs": orgs, "calls": calls, "seconds": round(seconds, 3), "pages": pages}
                    # Leave the subscribers as they were for the next approach.
                    client = SalesforceClient(
                        session=session, tokens=TokenCache(parse_sfdx_auth_url(build_auth_url(sim)))
                    )
                    await client.update("PackagePushRequest", request_id, {"Status": "Canceled"})
        for name in ("bot (Bulk API 2.0)", "baseline: 200 per call", "baseline: 1 per call"):
            if results[name]["orgs"] != orgs:
                raise RuntimeError(f"{name} pushed to {results[name]['orgs']:,} orgs, not {orgs:,}")
        results["budget"] = math.ceil(orgs / 2000) + 15
    finally:
        await sim.stop()
    return results
