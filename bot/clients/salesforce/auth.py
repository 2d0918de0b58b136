"""Salesforce OAuth 2.0: refresh-token grant (from an SFDX auth URL) and the JWT bearer flow.

Each flow is a small object that knows how to obtain an access token; ``TokenCache`` holds the
current token for one org and refreshes it at most once per expiry, whoever asks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import jwt

from bot.errors import AuthError, TransientError
from bot.settings import check_service_url

TOKEN_PATH = "/services/oauth2/token"
DEFAULT_CLI_CLIENT_ID = "PlatformCLI"


@dataclass(frozen=True, repr=False)
class AccessToken:
    value: str
    instance_url: str

    def __repr__(self) -> str:  # never print the token
        return f"AccessToken(instance_url={self.instance_url!r})"


class AuthFlow(Protocol):
    """One way of getting an access token for one org."""

    @property
    def description(self) -> str: ...

    async def fetch(self, session: aiohttp.ClientSession, *, timeout: aiohttp.ClientTimeout) -> AccessToken: ...


@dataclass(frozen=True, repr=False)
class RefreshTokenFlow:
    instance_url: str
    client_id: str
    client_secret: str
    refresh_token: str

    @property
    def description(self) -> str:
        return f"refresh token for {urlsplit(self.instance_url).hostname}"

    def __repr__(self) -> str:
        return f"RefreshTokenFlow({self.description})"

    async def fetch(self, session: aiohttp.ClientSession, *, timeout: aiohttp.ClientTimeout) -> AccessToken:
        form = {"grant_type": "refresh_token", "client_id": self.client_id, "refresh_token": self.refresh_token}
        if self.client_secret:
            form["client_secret"] = self.client_secret
        return await _token_request(session, self.instance_url + TOKEN_PATH, form, timeout=timeout)


@dataclass(frozen=True, repr=False)
class JwtBearerFlow:
    login_url: str
    client_id: str
    username: str
    private_key: str = field(repr=False)

    @property
    def description(self) -> str:
        return f"JWT bearer for {self.username}"

    def __repr__(self) -> str:
        return f"JwtBearerFlow({self.description})"

    def assertion(self, *, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        # Salesforce wants aud = the login host (login/test.salesforce.com or My Domain) and
        # an exp no more than 3 minutes ahead.
        claims = {"iss": self.client_id, "sub": self.username, "aud": self.login_url, "exp": issued + 170}
        return jwt.encode(claims, self.private_key, algorithm="RS256")

    async def fetch(self, session: aiohttp.ClientSession, *, timeout: aiohttp.ClientTimeout) -> AccessToken:
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": self.assertion()}
        return await _token_request(session, self.login_url + TOKEN_PATH, form, timeout=timeout)


def parse_sfdx_auth_url(auth_url: str) -> RefreshTokenFlow:
    """``force://<clientId>:<clientSecret>:<refreshToken>@<instanceUrl>`` (sf org display --verbose)."""
    prefix = "force://"
    if not auth_url.startswith(prefix) or "@" not in auth_url:
        raise ValueError(
            "not an SFDX auth URL: expected force://<clientId>:<clientSecret>:<refreshToken>@<instanceUrl>"
        )
    credentials, _, instance = auth_url[len(prefix) :].rpartition("@")
    parts = credentials.split(":", 2)
    if len(parts) == 3:
        client_id, client_secret, refresh_token = parts
    elif len(parts) == 1:
        client_id, client_secret, refresh_token = DEFAULT_CLI_CLIENT_ID, "", parts[0]
    else:
        raise ValueError("SFDX auth URL credentials must be <clientId>:<clientSecret>:<refreshToken>")
    if not refresh_token or not instance:
        raise ValueError("SFDX auth URL lacks a refresh token or instance URL")
    if "://" not in instance:
        instance = "https://" + instance
    instance = check_service_url(instance, what="auth_url instance")
    return RefreshTokenFlow(instance, client_id or DEFAULT_CLI_CLIENT_ID, client_secret, refresh_token)


async def _token_request(
    session: aiohttp.ClientSession, url: str, form: dict[str, str], *, timeout: aiohttp.ClientTimeout
) -> AccessToken:
    try:
        async with session.post(url, data=form, timeout=timeout, headers={"Accept": "application/json"}) as response:
            status = response.status
            payload = await response.json(content_type=None) if status < 500 else None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransientError(
            f"could not reach the Salesforce token endpoint ({type(exc).__name__})", system="salesforce"
        ) from exc
    if status >= 500 or status == 429:
        raise TransientError(f"Salesforce token endpoint answered HTTP {status}", system="salesforce", status=status)
    if status != 200 or not isinstance(payload, dict) or "access_token" not in payload:
        error = payload.get("error", "") if isinstance(payload, dict) else ""
        description = payload.get("error_description", "") if isinstance(payload, dict) else ""
        # error/error_description are short fixed strings from Salesforce; safe to show.
        raise AuthError(
            f"Salesforce refused the credentials: {error} {description}".strip(), system="salesforce", status=status
        )
    instance_url = check_service_url(
        str(payload.get("instance_url") or url.rsplit(TOKEN_PATH, 1)[0]), what="instance_url"
    )
    return AccessToken(value=str(payload["access_token"]), instance_url=instance_url)


class TokenCache:
    """The current access token of one org; concurrent callers share one refresh."""

    def __init__(self, flow: AuthFlow) -> None:
        self.flow = flow
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()

    async def get(self, session: aiohttp.ClientSession, *, timeout: aiohttp.ClientTimeout) -> AccessToken:
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    self._token = await self.flow.fetch(session, timeout=timeout)
        return self._token

    async def refresh(
        self, stale: AccessToken, session: aiohttp.ClientSession, *, timeout: aiohttp.ClientTimeout
    ) -> AccessToken:
        """Replace ``stale`` unless another caller already did."""
        async with self._lock:
            if self._token is None or self._token is stale:
                self._token = await self.flow.fetch(session, timeout=timeout)
            return self._token


class OrgSession:
    """The session-refresh hook (``bot.clients.transport.SessionHook``) of one org: its
    ``TokenCache`` bound to an HTTP session, shared by the REST and Metadata API clients so that an
    expired session is refreshed once for both."""

    def __init__(self, tokens: TokenCache, *, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        self._tokens = tokens
        self._session = session
        self._timeout = timeout

    async def current(self) -> AccessToken:
        return await self._tokens.get(self._session, timeout=self._timeout)

    async def refresh(self, stale: AccessToken) -> AccessToken:
        return await self._tokens.refresh(stale, self._session, timeout=self._timeout)
