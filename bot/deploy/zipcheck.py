"""Checking a deployment zip, and zipping a folder, within Salesforce's limits and without holding
its content: entry names, sizes and expansion ratios are checked while reading, and the manifests
(``package.xml``, ``destructiveChanges*.xml``) parsed as they stream by (see ``bot.deploy.artifacts``).
"""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn
from xml.parsers import expat

from defusedxml.common import DefusedXmlException

from bot.errors import UsageError

MD_URI = "http://soap.sforce.com/2006/04/metadata"
_DESTRUCTIVE = re.compile(r"^destructiveChanges(?:Pre|Post)?\.xml$")
CHUNK = 64 * 1024
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
class ZipFacts:
    files: int
    uncompressed: int
    root_package: bool
    types: dict[str, int]
    destructive: tuple[str, ...]


def refuse(message: str) -> UsageError:
    return UsageError(message, usage=ARTIFACT_RULES)


def mb(size: int) -> str:
    return f"{size / 1_000_000:,.1f} MB"


def _check_entry_name(name: str, label: str) -> None:
    if "\x00" in name or "\\" in name:
        raise refuse(f"`{label}`: entry `{name[:80]!r}` has a backslash or NUL in its name.")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise refuse(f"`{label}`: entry `{name[:80]}` is an absolute path; entries must stay inside the artifact.")
    if ".." in PurePosixPath(name).parts:
        raise refuse(f"`{label}`: entry `{name[:80]}` points outside the artifact (`..`).")


def inspect_zip(data: bytes, *, label: str, limits: Limits = DEFAULT_LIMITS) -> ZipFacts:
    """Every check on a zip, reading it in a streaming way; returns what it contains."""
    if len(data) > limits.compressed:
        raise refuse(
            f"`{label}` is {mb(len(data))} zipped; Salesforce accepts at most {mb(limits.compressed)} "
            "(50 MB once base64-encoded). Split the deployment."
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise refuse(f"`{label}` is not a zip file, or it is damaged.") from None
    entries = [info for info in infos if not info.is_dir()]
    if len(entries) > limits.files:
        raise refuse(f"`{label}` has {len(entries):,} files; Salesforce deploys at most {limits.files:,} at once.")
    seen: set[str] = set()
    declared = 0
    for info in infos:
        _check_entry_name(info.filename, label)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise refuse(f"`{label}`: entry `{info.filename[:80]}` is a symbolic link; links are not deployed.")
        if info.flag_bits & 0x1:
            raise refuse(f"`{label}`: entry `{info.filename[:80]}` is encrypted.")
        if info.filename in seen:
            raise refuse(f"`{label}`: entry `{info.filename[:80]}` appears twice.")
        seen.add(info.filename)
        declared += info.file_size
    if declared > limits.uncompressed:
        raise refuse(
            f"`{label}` unzips to {mb(declared)}; Salesforce accepts at most {mb(limits.uncompressed)} uncompressed."
        )
    root_package = "package.xml" in seen
    nested = sorted(name for name in seen if name.count("/") == 1 and name.endswith("/package.xml"))
    if not root_package and not nested:
        raise refuse(f"`{label}` has no `package.xml` (at its root or in one top-level folder).")
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
                while chunk := handle.read(CHUNK):
                    read += len(chunk)
                    total += len(chunk)
                    if total > limits.uncompressed:
                        raise refuse(
                            f"`{label}` unzips to more than {mb(limits.uncompressed)}; "
                            "Salesforce accepts at most that uncompressed."
                        )
                    if read > allowed:
                        raise refuse(
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
        raise refuse(f"`{label}` is damaged ({str(exc)[:80]}).") from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
        raise refuse(f"`{label}` cannot be read ({type(exc).__name__}).") from None
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
            raise refuse(
                f"`{self._label}`: `{self._name[:80]}` is over {mb(MANIFEST_CAP)}; a manifest that large is refused."
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
            raise refuse(f"`{self._label}`: `{self._name}` is not valid XML (DTDs and entities are refused).") from None

    def _forbidden(self, *_: object) -> NoReturn:
        raise DefusedXmlException("DTDs, entities and external references are refused")

    def _start(self, name: str, _attrs: object) -> None:
        stack = self._stack
        if not stack and name not in _PACKAGE:
            raise refuse(f"`{self._label}`: `{self._name}` is not a `<Package>` manifest.")
        if len(stack) >= _MANIFEST_DEPTH:
            raise refuse(f"`{self._label}`: `{self._name}` nests elements more than {_MANIFEST_DEPTH} deep.")
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
            raise refuse(f"`{self._label}`: `{self._name}` has a name or member over {_MANIFEST_TEXT:,} characters.")
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
        raise refuse(f"`{label}` has no `package.xml` at its root.")
    files: list[Path] = []
    size = 0
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(directory)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                raise refuse(f"`{label}`: `{(here / name).relative_to(root)}` is a symbolic link; links are refused.")
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            path = here / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise refuse(f"`{label}`: `{path.relative_to(root)}` is a symbolic link; links are refused.")
            if name.startswith("."):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise refuse(f"`{label}`: `{path.relative_to(root)}` is not a regular file.")
            files.append(path)
            size += info.st_size
            if len(files) > limits.files:
                raise refuse(f"`{label}` has more than {limits.files:,} files; Salesforce deploys at most that many.")
            if size > limits.uncompressed:
                raise refuse(f"`{label}` is over {mb(limits.uncompressed)}; Salesforce accepts at most that.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            entry = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_FIXED_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            with path.open("rb") as source, archive.open(entry, "w") as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
            if buffer.tell() > limits.compressed:
                raise refuse(
                    f"`{label}` zips to more than {mb(limits.compressed)}; Salesforce accepts at most that. "
                    "Split the deployment."
                )
    return buffer.getvalue()
