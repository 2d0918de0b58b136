"""What every step of a push needs from the packaging org: its client, and Salesforce's spellings."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from bot.clients.salesforce.rest import SalesforceClient
from bot.core.orgs import OrgRegistry
from bot.errors import UpstreamError, UsageError

log = logging.getLogger(__name__)

IN_CHUNK = 200  # ids per IN (...) clause: keeps SOQL well under its 100,000-character limit
REQUEST_TERMINAL = {"Succeeded", "Failed", "Canceled", "Cancelled"}


def packaging_client(orgs: OrgRegistry) -> SalesforceClient:
    """Pushes are made from the one packaging org; asked for each time, so a config reload applies."""
    return orgs.client(orgs.packaging_alias())


def canon(status: str) -> str:
    """Salesforce has spelled it both ways over the years."""
    return "Canceled" if status == "Cancelled" else status


def sf_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def request_status(client: SalesforceClient, request_id: str) -> str:
    return canon(str((await client.get_record("PackagePushRequest", request_id)).get("Status") or ""))


async def quietly_cancel(client: SalesforceClient, request_id: str) -> None:
    """Cancel a request nobody will follow; if that fails it stays Created, and a request without jobs never runs."""
    try:
        await client.update("PackagePushRequest", request_id, {"Status": "Canceled"})
    except (UpstreamError, UsageError):
        log.warning("could not cancel orphaned push request %s", request_id)
