"""Issue 12, finding 11: inspecting an artifact within Salesforce's limits takes under 100 MB.

Peaks are measured with tracemalloc (every Python allocation, in every thread), so they are a
deterministic bound, not a timing. The artifact's own bytes, which the bot keeps to deploy, count.
"""

from __future__ import annotations

import io
import random
import tracemalloc
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.deploy.artifacts import Artifact, ArtifactStore, inspect_zip
from bot.errors import UsageError
from bot.settings import ArtifactsConfig

MB = 1_000_000
BUDGET = 100 * MB
NS = 'xmlns="http://soap.sforce.com/2006/04/metadata"'


def manifest(members: list[str], *, type_name: str = "ApexClass") -> bytes:
    body = "".join(f"<members>{member}</members>" for member in members)
    head = f'<?xml version="1.0" encoding="UTF-8"?><Package {NS}>'
    return f"{head}<types>{body}<name>{type_name}</name></types></Package>".encode()


def build_many_manifests(path: Path) -> int:
    """~10,000 entries, ~6 MB zipped: 190 top-level folders, each a package of its own with a
    package.xml and a destructiveChanges.xml of ~1 MB (each under the per-entry bomb rule),
    and small classes — what Salesforce calls a multi-package deploy, at its size limits."""
    rnd = random.Random(11)
    # Long member names keep the manifests quick to parse; random hex keeps them from
    # compressing so well that they would be refused as zip bombs.
    members = [f"Class{i}_{rnd.randbytes(3).hex()}_{'Service' * 200}" for i in range(700)]
    body = manifest(members)
    folders = 190
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for folder in range(folders):
            archive.writestr(f"pkg{folder}/package.xml", body)
            archive.writestr(f"pkg{folder}/destructiveChanges.xml", body)
        for index in range(10_000 - 2 * folders):
            archive.writestr(f"pkg0/classes/C{index}.cls", f"public class C{index} {{}}\n" + rnd.randbytes(24).hex())
    return folders * len(members)


def build_at_the_limits(path: Path) -> None:
    """10,000 files, ~30 MB zipped, ~300 MB unzipped: compressible Apex-like content."""
    rnd = random.Random(12)
    filler = b"    System.debug('a line of a long generated class');\n" * 560
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("package.xml", manifest(["*"]))
        for index in range(9_999):
            archive.writestr(f"classes/C{index}.cls", rnd.randbytes(2_400) + filler)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def load_measured(store: ArtifactStore, ref: str) -> tuple[Artifact, int]:
    tracemalloc.start()
    try:
        artifact = await store.load(ref)
        return artifact, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_finding_11_inspecting_a_large_artifact_stays_under_100_mb_extra(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    members = build_many_manifests(tmp_path / "many-packages.zip")
    build_at_the_limits(tmp_path / "at-the-limits.zip")
    store = ArtifactStore(config=ArtifactsConfig(dir=tmp_path), session=session)

    many, many_peak = await load_measured(store, "many-packages.zip")
    assert many.files == 10_000 and 4 * MB < many.compressed < 8 * MB and many.uncompressed > 300 * MB
    assert many.types == {"ApexClass": members} and len(many.destructive) == 190  # every manifest was read
    assert many_peak < BUDGET, f"many-packages.zip ({many.compressed:,} bytes) peaked at {many_peak / MB:.0f} MB"

    limits, limits_peak = await load_measured(store, "at-the-limits.zip")
    assert limits.files == 10_000 and limits.compressed > 20 * MB and limits.uncompressed > 250 * MB
    assert limits.types == {"ApexClass": 0}
    assert limits_peak < BUDGET, f"at-the-limits.zip peaked at {limits_peak / MB:.0f} MB"


def test_a_manifest_over_its_cap_is_refused_as_it_streams() -> None:
    rnd = random.Random(13)
    big = manifest([rnd.randbytes(40).hex() for _ in range((5 * 1024 * 1024) // 90)])
    assert len(big) > 5 * 1024 * 1024  # the cap on one manifest
    data = _zip({"package.xml": big})
    with pytest.raises(UsageError) as error:
        inspect_zip(data, label="x.zip")
    assert "`package.xml` is over 5.2 MB; a manifest that large is refused" in error.value.message
    assert error.value.usage  # the rules come with the refusal


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("<Package>" + "<a>" * 100 + "</a>" * 100 + "</Package>", "nests elements more than 64 deep"),
        (
            f"<Package {NS}><types><members>{'x' * 5000}</members><name>A</name></types></Package>",
            "over 4,096 characters",
        ),
    ],
)
def test_a_manifest_that_would_need_memory_to_read_is_refused(content: str, fragment: str) -> None:
    with pytest.raises(UsageError) as error:
        inspect_zip(_zip({"package.xml": content.encode()}), label="x.zip")
    assert fragment in error.value.message


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()
