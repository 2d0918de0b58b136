"""Deployment artifacts (SPEC §5): find them, check them, package them — before any SOAP call.

An artifact is named relative to ``[artifacts] dir`` (a ``.zip`` or a folder in metadata format
with ``package.xml`` and optional ``destructiveChanges*.xml``), or is an URL under one of
``[artifacts] allowed_url_prefixes`` (https; http only to a loopback address).

Each refusal is a ``UsageError`` naming the problem, so the user can fix it:

    more than 10,000 files · over ~39 MB compressed (50 MB once base64-encoded) · over 400 MB
    uncompressed · no package.xml · entries or paths escaping the root · symbolic links ·
    zip bombs (expansion ratio) · encrypted, duplicate or damaged entries

Limits are checked while reading, never after: the declared sizes in the zip's central directory
first (Python's ``zipfile`` never yields more bytes than an entry declares, and a lying entry
fails its CRC check), then the bytes actually decompressed, chunk by chunk, against both the
absolute limit and the per-entry expansion ratio. Decompressed bytes are counted and dropped:
the manifests (``package.xml``, ``destructiveChanges*.xml``) are parsed as they stream by, so
inspecting any artifact within the limits holds the zip plus a few MB, never its content.
Folders are zipped in memory with fixed timestamps, so the same content always gives the same
SHA-256; the poller re-reads the artifact when it deploys and refuses one whose checksum changed
since it was requested (or approved).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import aiohttp

from bot.deploy.payloads import ArtifactSummary
from bot.deploy.zipcheck import CHUNK, DEFAULT_LIMITS, Limits, ZipFacts, inspect_zip, mb, refuse, zip_folder
from bot.errors import NotFoundError, StateError, TransientError, UsageError
from bot.settings import ArtifactsConfig, is_loopback_host

__all__ = ["Artifact", "ArtifactStore", "Limits", "inspect_zip", "zip_folder"]


@dataclass(frozen=True)
class Artifact:
    ref: str  # as the user gave it (normalised)
    kind: str  # zip | folder | url
    name: str
    data: bytes = field(repr=False)
    sha256: str
    files: int
    uncompressed: int
    root_package: bool  # package.xml at the zip root (singlePackage)
    types: dict[str, int]  # metadata type → members in package.xml (0 = wildcard)
    destructive: tuple[str, ...]

    @property
    def compressed(self) -> int:
        return len(self.data)

    def summary(self) -> ArtifactSummary:
        """What the operation records: enough to show it and to recognise it again."""
        return ArtifactSummary(
            ref=self.ref,
            kind=self.kind,
            name=self.name,
            sha256=self.sha256,
            files=self.files,
            compressed=self.compressed,
            uncompressed=self.uncompressed,
            root_package=self.root_package,
            types=self.types,
            destructive=list(self.destructive),
        )


class ArtifactStore:
    """Where artifacts come from; ``session`` (for URLs) is shared and owned by the caller."""

    def __init__(
        self,
        *,
        config: ArtifactsConfig,
        session: aiohttp.ClientSession,
        limits: Limits = DEFAULT_LIMITS,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> None:
        self._config = config
        self._session = session
        self._limits = limits
        self._timeout = timeout or aiohttp.ClientTimeout(total=120, connect=10)

    def available(self, limit: int = 15) -> list[str]:
        """Artifacts in the directory: ``.zip`` files and folders with a ``package.xml``."""
        root = self._config.dir
        if root is None or not root.is_dir():
            return []
        names = [
            entry.name
            for entry in sorted(root.iterdir())
            if not entry.name.startswith(".")
            and not entry.is_symlink()
            and ((entry.is_file() and entry.suffix == ".zip") or (entry / "package.xml").is_file())
        ]
        return names[:limit]

    async def load(self, text: str) -> Artifact:
        ref = text.strip()
        if not ref:
            raise refuse("Which artifact? Give a `.zip`, a folder under the artifacts directory, or an URL.")
        if "://" in ref:
            url = self.check_url(ref)
            data = await self._download(url)
            facts = await asyncio.to_thread(inspect_zip, data, label=_url_name(url), limits=self._limits)
            return _artifact(ref=url, kind="url", name=_url_name(url), data=data, facts=facts)
        path = self.check_path(ref)
        if path.is_dir():
            data = await asyncio.to_thread(zip_folder, path, label=ref, limits=self._limits)
            kind = "folder"
        elif path.suffix.lower() == ".zip" and path.is_file():
            size = path.stat().st_size
            if size > self._limits.compressed:
                raise refuse(
                    f"`{ref}` is {mb(size)}; Salesforce accepts at most {mb(self._limits.compressed)} zipped "
                    "(50 MB once base64-encoded). Split the deployment."
                )
            data = await asyncio.to_thread(path.read_bytes)
            kind = "zip"
        else:
            raise refuse(f"`{ref}` is neither a `.zip` file nor a folder.")
        facts = await asyncio.to_thread(inspect_zip, data, label=ref, limits=self._limits)
        return _artifact(ref=ref, kind=kind, name=path.name, data=data, facts=facts)

    async def reload(self, summary: ArtifactSummary) -> Artifact:
        """The artifact an operation recorded, read again and checked to be the same bytes."""
        artifact = await self.load(summary.ref)
        if artifact.sha256 != summary.sha256:
            raise StateError(
                f"`{summary.ref}` changed since it was requested (its SHA-256 differs), so it was not "
                "deployed. Request the deployment again to deploy the new content."
            )
        return artifact

    # -- locating ---------------------------------------------------------------------------
    def check_path(self, ref: str) -> Path:
        root = self._config.dir
        if root is None:
            raise UsageError(
                "No artifacts directory is configured: set `[artifacts] dir` (or use an URL under "
                "`[artifacts] allowed_url_prefixes`)."
            )
        if ref.startswith(("/", "~")) or "\\" in ref or "\x00" in ref or re.match(r"^[A-Za-z]:", ref):
            raise refuse(f"`{ref[:80]}`: give a path relative to the artifacts directory.")
        parts = PurePosixPath(ref).parts
        if ".." in parts:
            raise refuse(f"`{ref[:80]}` points outside the artifacts directory (`..`).")
        current = root
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise refuse(f"`{ref[:80]}`: `{part}` is a symbolic link; links are refused.")
        path = root / ref
        if not path.exists():
            known = ", ".join(f"`{name}`" for name in self.available()) or "none"
            raise NotFoundError(f"No artifact `{ref[:80]}` in the artifacts directory. Available: {known}.")
        if not path.resolve().is_relative_to(root.resolve()):
            raise refuse(f"`{ref[:80]}` points outside the artifacts directory.")
        return path

    def check_url(self, url: str) -> str:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in {"https", "http"} or not parts.hostname:
            raise refuse(f"`{url[:100]}` is not an https URL.")
        if scheme == "http" and not is_loopback_host(parts.hostname):
            raise refuse(f"`{url[:100]}`: artifact URLs must be https.")
        if parts.username or parts.password or "@" in parts.netloc:
            raise refuse("Artifact URLs may not carry credentials (`user@`).")
        raw_path = parts.path
        if "\\" in url or re.search(r"%(2f|5c|00)", raw_path, re.IGNORECASE):
            raise refuse(f"`{url[:100]}` has an encoded slash or backslash in its path.")
        # `..;x` is `..` to servlet containers (Tomcat, Jetty: `;` starts a path parameter).
        if any(segment.split(";", 1)[0] in {"..", "."} for segment in unquote(raw_path).split("/")):
            raise refuse(f"`{url[:100]}` has `..` in its path.")
        prefixes = self._config.allowed_url_prefixes
        if not prefixes:
            raise refuse("URL artifacts are not enabled here: set `[artifacts] allowed_url_prefixes`.")
        for prefix in prefixes:
            allowed = urlsplit(prefix)
            base = allowed.path if allowed.path.endswith("/") else allowed.path + "/"
            if (
                allowed.scheme.lower() == scheme
                and allowed.netloc.lower() == parts.netloc.lower()
                and (raw_path.startswith(base) or raw_path == allowed.path)
            ):
                return url
        shown = ", ".join(f"`{p}`" for p in prefixes[:5])
        raise refuse(f"`{url[:100]}` is not under an allowed prefix ({shown}).")

    async def _download(self, url: str) -> bytes:
        try:
            async with self._session.get(url, allow_redirects=False, timeout=self._timeout) as response:
                if 300 <= response.status < 400:
                    raise refuse(f"`{url[:100]}` redirects elsewhere; redirects are not followed. Give the final URL.")
                if response.status == 404:
                    raise NotFoundError(f"The artifact store has no `{url[:100]}` (HTTP 404).")
                if response.status >= 500 or response.status == 429:
                    raise TransientError(f"the artifact store answered HTTP {response.status}", system="artifact store")
                if response.status != 200:
                    raise refuse(f"The artifact store refused `{url[:100]}` (HTTP {response.status}).")
                declared = response.content_length
                if declared is not None and declared > self._limits.compressed:
                    raise refuse(
                        f"`{_url_name(url)}` is {mb(declared)}; Salesforce accepts at most "
                        f"{mb(self._limits.compressed)} zipped."
                    )
                # BytesIO hands its buffer over in getvalue(); a list of chunks joined would need the
                # artifact twice over at the end.
                buffer = io.BytesIO()
                async for chunk in response.content.iter_chunked(CHUNK):
                    if buffer.tell() + len(chunk) > self._limits.compressed:
                        raise refuse(
                            f"`{_url_name(url)}` is over {mb(self._limits.compressed)}; "
                            "Salesforce accepts at most that."
                        )
                    buffer.write(chunk)
                return buffer.getvalue()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"could not download the artifact ({type(exc).__name__})", system="artifact store"
            ) from exc


def _url_name(url: str) -> str:
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]) or "artifact.zip"


def _artifact(*, ref: str, kind: str, name: str, data: bytes, facts: ZipFacts) -> Artifact:
    return Artifact(
        ref=ref,
        kind=kind,
        name=name,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        files=facts.files,
        uncompressed=facts.uncompressed,
        root_package=facts.root_package,
        types=facts.types,
        destructive=facts.destructive,
    )
