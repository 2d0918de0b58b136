"""The configured Salesforce orgs and one API client per org, sharing one HTTP session."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.auth import AuthFlow, JwtBearerFlow, TokenCache, parse_sfdx_auth_url
from bot.clients.salesforce.rest import SalesforceClient
from bot.errors import NotFoundError, UsageError
from bot.settings import OrgConfig, Settings


def auth_flow(alias: str, org: OrgConfig) -> AuthFlow:
    if org.auth_url is not None:
        try:
            return parse_sfdx_auth_url(org.auth_url.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"orgs.{alias}.auth_url: {exc}") from None
    assert org.jwt is not None
    key = Path(org.jwt.key_file).expanduser().read_text()
    return JwtBearerFlow(
        login_url=org.jwt.login_url, client_id=org.jwt.client_id, username=org.jwt.username, private_key=key
    )


class OrgRegistry:
    def __init__(self, *, settings: Settings, session: aiohttp.ClientSession, retry: RetryPolicy | None = None) -> None:
        self._settings = settings
        self._session = session
        self._retry = retry or RetryPolicy()
        self._clients: dict[str, SalesforceClient] = {}
        timeout = settings.http_timeout_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))

    @property
    def aliases(self) -> list[str]:
        return list(self._settings.orgs)

    def config(self, alias: str) -> OrgConfig:
        try:
            return self._settings.orgs[alias]
        except KeyError:
            known = ", ".join(f"`{name}`" for name in self._settings.orgs) or "none configured"
            raise NotFoundError(f"No org called `{alias[:40]}`. Known orgs: {known}.") from None

    def kind(self, alias: str) -> str:
        return self.config(alias).kind

    def client(self, alias: str) -> SalesforceClient:
        if alias not in self._clients:
            flow = auth_flow(alias, self.config(alias))
            self._clients[alias] = SalesforceClient(
                session=self._session,
                tokens=TokenCache(flow),
                api_version=self._settings.salesforce_api_version,
                timeout=self._timeout,
                retry=self._retry,
            )
        return self._clients[alias]

    def packaging_alias(self) -> str:
        alias = self._settings.packaging_org
        if alias is None:
            raise UsageError("No packaging org is configured: set `packaging = true` on one `[orgs.<alias>]` table.")
        return alias
