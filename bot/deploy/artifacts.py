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
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.parsers import expat

import aiohttp
from defusedxml.common import DefusedXmlException

from bot.errors import NotFoundError, StateError, TransientError, UsageError
from bot.settings import ArtifactsConfig, is_loopback_host

MD_URI = "http://soap.sforce.com/2006/04/metadata"
_DESTRUCTIVE = re.compile(r"^destructiveChanges(?:Pre|Post)?\.xml$")
_CHUNK = 64 * 1024
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
# Manifests are parsed while they stream, but expat buffers a token until it ends (a long comment,
# attribute or name), so a manifest's size is capped: 5 MiB lists far more members than 10,000 files.
MANIFEST_CAP = 5 * 1024 * 1024
_MANIFEST_DEPTH = 64
_MANIFEST_TEXT = 4096  # a <name> or <members> longer than this is not a metadata name
ARTIFACT_RULES = (
    "An artifact is a `.zip` or a folder under the artifacts directory (with `package.xml` at its root), "
    "or an https URL under an allowed prefix; at most 10,000 files, ~39 MB zipped, 400 MB unzipped."
)


@dataclass(frozen=True)
class Limits:
    """Salesforce's deploy limits (Metadata API: 10,000 files, 39 MB compressed, 400 MB
    uncompressed) plus the bot's own zip-bomb rule."""

    files: int = 10_000
    compressed: int = 39_000_000  # base64 makes it ~52 MB, under the 50 MiB request limit
    uncompressed: int = 400 * 1024 * 1024
    ratio: int = 100  # an entry may expand at most 100× …
    ratio_floor: int = 1024 * 1024  # … once it is past 1 MiB (tiny files compress absurdly well)


DEFAULT_LIMITS = Limits()


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

    def summary(self) -> dict[str, Any]:
        """What the operation records: enough to show it and to recognise it again."""
        return {
            "ref": self.ref,
            "kind": self.kind,
            "name": self.name,
            "sha256": self.sha256,
            "files": self.files,
            "compressed": self.compressed,
            "uncompressed": self.uncompressed,
            "root_package": self.root_package,
            "types": self.types,
            "destructive": list(self.destructive),
        }


@dataclass(frozen=True)
class ZipFacts:
    files: int
    uncompressed: int
    root_package: bool
    types: dict[str, int]
    destructive: tuple[str, ...]


def _refuse(message: str) -> UsageError:
    return UsageError(message, usage=ARTIFACT_RULES)


def _mb(size: int) -> str:
    return f"{size / 1_000_000:,.1f} MB"


def _check_entry_name(name: str, label: str) -> None:
    if "\x00" in name or "\\" in name:
        raise _refuse(f"`{label}`: entry `{name[:80]!r}` has a backslash or NUL in its name.")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _refuse(f"`{label}`: entry `{name[:80]}` is an absolute path; entries must stay inside the artifact.")
    if ".." in PurePosixPath(name).parts:
        raise _refuse(f"`{label}`: entry `{name[:80]}` points outside the artifact (`..`).")


def inspect_zip(data: bytes, *, label: str, limits: Limits = DEFAULT_LIMITS) -> ZipFacts:
    """Every check on a zip, reading it in a streaming way; returns what it contains."""
    if len(data) > limits.compressed:
        raise _refuse(
            f"`{label}` is {_mb(len(data))} zipped; Salesforce accepts at most {_mb(limits.compressed)} "
            "(50 MB once base64-encoded). Split the deployment."
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise _refuse(f"`{label}` is not a zip file, or it is damaged.") from None
    entries = [info for info in infos if not info.is_dir()]
    if len(entries) > limits.files:
        raise _refuse(f"`{label}` has {len(entries):,} files; Salesforce deploys at most {limits.files:,} at once.")
    seen: set[str] = set()
    declared = 0
    for info in infos:
        _check_entry_name(info.filename, label)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _refuse(f"`{label}`: entry `{info.filename[:80]}` is a symbolic link; links are not deployed.")
        if info.flag_bits & 0x1:
            raise _refuse(f"`{label}`: entry `{info.filename[:80]}` is encrypted.")
        if info.filename in seen:
            raise _refuse(f"`{label}`: entry `{info.filename[:80]}` appears twice.")
        seen.add(info.filename)
        declared += info.file_size
    if declared > limits.uncompressed:
        raise _refuse(
            f"`{label}` unzips to {_mb(declared)}; Salesforce accepts at most {_mb(limits.uncompressed)} uncompressed."
        )
    root_package = "package.xml" in seen
    nested = sorted(name for name in seen if name.count("/") == 1 and name.endswith("/package.xml"))
    if not root_package and not nested:
        raise _refuse(f"`{label}` has no `package.xml` (at its root or in one top-level folder).")
    wanted = {"package.xml"} if root_package else set(nested)
    prefix_of = {name: name[: -len("package.xml")] for name in wanted}
    types: dict[str, int] = {}
    destructive: list[str] = []
    total = 0
    try:
        for info in entries:
            allowed = max(info.compress_size * limits.ratio, limits.ratio_floor)
            read = 0
            manifest = info.filename in wanted or any(
                info.filename.startswith(prefix) and _DESTRUCTIVE.match(info.filename[len(prefix) :])
                for prefix in prefix_of.values()
            )
            # Content is only counted; a manifest is parsed chunk by chunk, never kept whole.
            counter = _ManifestReader(label=label, name=info.filename) if manifest else None
            with archive.open(info) as handle:
                while chunk := handle.read(_CHUNK):
                    read += len(chunk)
                    total += len(chunk)
                    if total > limits.uncompressed:
                        raise _refuse(
                            f"`{label}` unzips to more than {_mb(limits.uncompressed)}; "
                            "Salesforce accepts at most that uncompressed."
                        )
                    if read > allowed:
                        raise _refuse(
                            f"`{label}` looks like a zip bomb: `{info.filename[:80]}` expands more than "
                            f"{limits.ratio}× ({info.compress_size:,} bytes zipped). Refused."
                        )
                    if counter is not None:
                        counter.feed(chunk)
            if counter is None:
                continue
            parsed = counter.close()
            if info.filename in wanted:
                for type_name, count in parsed.items():
                    types[type_name] = types.get(type_name, 0) + count
            else:
                destructive.append(info.filename)
    except zipfile.BadZipFile as exc:
        raise _refuse(f"`{label}` is damaged ({str(exc)[:80]}).") from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
        raise _refuse(f"`{label}` cannot be read ({type(exc).__name__}).") from None
    return ZipFacts(
        files=len(entries),
        uncompressed=total,
        root_package=root_package,
        types=types,
        destructive=tuple(sorted(destructive)),
    )


class _Block:
    """A ``<types>`` block being read."""

    __slots__ = ("members", "name", "wildcard")

    def __init__(self) -> None:
        self.name = ""
        self.members = 0
        self.wildcard = False


# Element names as expat reports them with namespace_separator=" ": the metadata namespace or none.
_KINDS = {f"{uri}{local}": local for uri in ("", MD_URI + " ") for local in ("types", "members", "name")}
_PACKAGE = {"Package", f"{MD_URI} Package"}


class _ManifestReader:
    """Counts the members of each ``<types>`` block of one manifest as its bytes are fed.

    Holds only the stack of open elements (at most ``_MANIFEST_DEPTH``) and the text of the
    current ``<name>`` or ``<members>``. pyexpat directly, with defusedxml's refusals (any DTD,
    entity declaration or external reference), because a Python call per element is all a
    manifest of a hundred thousand members can afford."""

    def __init__(self, *, label: str, name: str) -> None:
        self._label = label
        self._name = name
        self._size = 0
        # One entry per open element: None, or (kind, its text before its first child).
        self._stack: list[tuple[str, list[str]] | None] = []
        self._blocks: list[_Block] = []
        self._text: list[str] | None = None  # the text being gathered, if any
        self._text_size = 0
        self.types: dict[str, int] = {}
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.buffer_text = True
        parser.StartDoctypeDeclHandler = self._forbidden
        parser.EntityDeclHandler = self._forbidden
        parser.UnparsedEntityDeclHandler = self._forbidden
        parser.ExternalEntityRefHandler = self._forbidden
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._characters
        self._parser = parser

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MANIFEST_CAP:
            raise _refuse(
                f"`{self._label}`: `{self._name[:80]}` is over {_mb(MANIFEST_CAP)}; a manifest that large is refused."
            )
        self._parse(chunk, final=False)

    def close(self) -> dict[str, int]:
        """The types of a complete, well-formed manifest: type name → members (0 = wildcard)."""
        self._parse(b"", final=True)
        return self.types

    def _parse(self, data: bytes, *, final: bool) -> None:
        try:
            self._parser.Parse(data, final)
        except (expat.ExpatError, DefusedXmlException, ValueError):
            raise _refuse(
                f"`{self._label}`: `{self._name}` is not valid XML (DTDs and entities are refused)."
            ) from None

    def _forbidden(self, *_: object) -> None:
        raise DefusedXmlException("DTDs, entities and external references are refused")

    def _start(self, name: str, _attrs: object) -> None:
        stack = self._stack
        if not stack and name not in _PACKAGE:
            raise _refuse(f"`{self._label}`: `{self._name}` is not a `<Package>` manifest.")
        if len(stack) >= _MANIFEST_DEPTH:
            raise _refuse(f"`{self._label}`: `{self._name}` nests elements more than {_MANIFEST_DEPTH} deep.")
        self._text = None  # what follows a child is that child's tail, not its parent's text
        kind = _KINDS.get(name)
        if kind == "types":
            self._blocks.append(_Block())
        elif (kind == "members" and self._blocks) or (kind == "name" and stack and (stack[-1] or ("",))[0] == "types"):
            self._text = []
            self._text_size = 0
        else:
            stack.append(None)
            return
        stack.append((kind, self._text if self._text is not None else []))

    def _characters(self, content: str) -> None:
        if self._text is None:
            return
        self._text_size += len(content)
        if self._text_size > _MANIFEST_TEXT:
            raise _refuse(f"`{self._label}`: `{self._name}` has a name or member over {_MANIFEST_TEXT:,} characters.")
        self._text.append(content)

    def _end(self, _name: str) -> None:
        self._text = None
        entry = self._stack.pop()
        if entry is None:
            return
        kind, parts = entry
        if kind == "members":
            wildcard = "".join(parts).strip() == "*"
            for block in self._blocks:  # a block counts the members of blocks nested in it, as before
                block.members += 1
                block.wildcard = block.wildcard or wildcard
        elif kind == "name":
            block = self._blocks[-1]
            block.name = block.name or "".join(parts).strip()
        else:
            block = self._blocks.pop()
            if block.name:
                self.types[block.name] = 0 if block.wildcard else self.types.get(block.name, 0) + block.members


def zip_folder(root: Path, *, label: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Zip a metadata-format folder in memory (fixed timestamps: same content, same bytes).

    Dot-files and dot-folders (``.git``, ``.DS_Store``) are left out; symbolic links anywhere
    are refused rather than followed."""
    package = root / "package.xml"
    if package.is_symlink() or not package.is_file():
        raise _refuse(f"`{label}` has no `package.xml` at its root.")
    files: list[Path] = []
    size = 0
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(directory)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                raise _refuse(f"`{label}`: `{(here / name).relative_to(root)}` is a symbolic link; links are refused.")
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            path = here / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise _refuse(f"`{label}`: `{path.relative_to(root)}` is a symbolic link; links are refused.")
            if name.startswith("."):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise _refuse(f"`{label}`: `{path.relative_to(root)}` is not a regular file.")
            files.append(path)
            size += info.st_size
            if len(files) > limits.files:
                raise _refuse(f"`{label}` has more than {limits.files:,} files; Salesforce deploys at most that many.")
            if size > limits.uncompressed:
                raise _refuse(f"`{label}` is over {_mb(limits.uncompressed)}; Salesforce accepts at most that.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            entry = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_FIXED_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            with path.open("rb") as source, archive.open(entry, "w") as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)
            if buffer.tell() > limits.compressed:
                raise _refuse(
                    f"`{label}` zips to more than {_mb(limits.compressed)}; Salesforce accepts at most that. "
                    "Split the deployment."
                )
    return buffer.getvalue()


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
            raise _refuse("Which artifact? Give a `.zip`, a folder under the artifacts directory, or an URL.")
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
                raise _refuse(
                    f"`{ref}` is {_mb(size)}; Salesforce accepts at most {_mb(self._limits.compressed)} zipped "
                    "(50 MB once base64-encoded). Split the deployment."
                )
            data = await asyncio.to_thread(path.read_bytes)
            kind = "zip"
        else:
            raise _refuse(f"`{ref}` is neither a `.zip` file nor a folder.")
        facts = await asyncio.to_thread(inspect_zip, data, label=ref, limits=self._limits)
        return _artifact(ref=ref, kind=kind, name=path.name, data=data, facts=facts)

    async def reload(self, summary: dict[str, Any]) -> Artifact:
        """The artifact an operation recorded, read again and checked to be the same bytes."""
        artifact = await self.load(str(summary.get("ref") or ""))
        if artifact.sha256 != summary.get("sha256"):
            raise StateError(
                f"`{summary.get('ref')}` changed since it was requested (its SHA-256 differs), so it was not "
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
            raise _refuse(f"`{ref[:80]}`: give a path relative to the artifacts directory.")
        parts = PurePosixPath(ref).parts
        if ".." in parts:
            raise _refuse(f"`{ref[:80]}` points outside the artifacts directory (`..`).")
        current = root
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise _refuse(f"`{ref[:80]}`: `{part}` is a symbolic link; links are refused.")
        path = root / ref
        if not path.exists():
            known = ", ".join(f"`{name}`" for name in self.available()) or "none"
            raise NotFoundError(f"No artifact `{ref[:80]}` in the artifacts directory. Available: {known}.")
        if not path.resolve().is_relative_to(root.resolve()):
            raise _refuse(f"`{ref[:80]}` points outside the artifacts directory.")
        return path

    def check_url(self, url: str) -> str:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in {"https", "http"} or not parts.hostname:
            raise _refuse(f"`{url[:100]}` is not an https URL.")
        if scheme == "http" and not is_loopback_host(parts.hostname):
            raise _refuse(f"`{url[:100]}`: artifact URLs must be https.")
        if parts.username or parts.password or "@" in parts.netloc:
            raise _refuse("Artifact URLs may not carry credentials (`user@`).")
        raw_path = parts.path
        if "\\" in url or re.search(r"%(2f|5c|00)", raw_path, re.IGNORECASE):
            raise _refuse(f"`{url[:100]}` has an encoded slash or backslash in its path.")
        # `..;x` is `..` to servlet containers (Tomcat, Jetty: `;` starts a path parameter).
        if any(segment.split(";", 1)[0] in {"..", "."} for segment in unquote(raw_path).split("/")):
            raise _refuse(f"`{url[:100]}` has `..` in its path.")
        prefixes = self._config.allowed_url_prefixes
        if not prefixes:
            raise _refuse("URL artifacts are not enabled here: set `[artifacts] allowed_url_prefixes`.")
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
        raise _refuse(f"`{url[:100]}` is not under an allowed prefix ({shown}).")

    async def _download(self, url: str) -> bytes:
        try:
            async with self._session.get(url, allow_redirects=False, timeout=self._timeout) as response:
                if 300 <= response.status < 400:
                    raise _refuse(f"`{url[:100]}` redirects elsewhere; redirects are not followed. Give the final URL.")
                if response.status == 404:
                    raise NotFoundError(f"The artifact store has no `{url[:100]}` (HTTP 404).")
                if response.status >= 500 or response.status == 429:
                    raise TransientError(f"the artifact store answered HTTP {response.status}", system="artifact store")
                if response.status != 200:
                    raise _refuse(f"The artifact store refused `{url[:100]}` (HTTP {response.status}).")
                declared = response.content_length
                if declared is not None and declared > self._limits.compressed:
                    raise _refuse(
                        f"`{_url_name(url)}` is {_mb(declared)}; Salesforce accepts at most "
                        f"{_mb(self._limits.compressed)} zipped."
                    )
                # BytesIO hands its buffer over in getvalue(); a list of chunks joined would need the
                # artifact twice over at the end.
                buffer = io.BytesIO()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    if buffer.tell() + len(chunk) > self._limits.compressed:
                        raise _refuse(
                            f"`{_url_name(url)}` is over {_mb(self._limits.compressed)}; "
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
