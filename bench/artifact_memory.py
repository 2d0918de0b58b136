"""Peak memory of inspecting a deploy artifact at Salesforce's limits (issue 12, finding 11).

Two zips, built in the benchmark's temporary directory and loaded through ``ArtifactStore.load``
(the path `/deploy` takes: read, check, describe, checksum): one of 190 packages, each with a
~1 MB package.xml and destructiveChanges.xml among ~10,000 entries (~7 MB zipped, ~380 MB
unzipped), and one of 10,000 classes (~29 MB zipped, ~320 MB unzipped). tracemalloc's peak
counts every Python allocation in every thread, the artifact's own bytes included.
"""

from __future__ import annotations

import random
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import aiohttp

from bot.deploy.artifacts import ArtifactStore
from bot.settings import ArtifactsConfig

TARGET_MB = 100
_HEAD = '<?xml version="1.0" encoding="UTF-8"?><Package xmlns="http://soap.sforce.com/2006/04/metadata">'


def _manifest(members: list[str]) -> bytes:
    body = "".join(f"<members>{member}</members>" for member in members)
    return f"{_HEAD}<types>{body}<name>ApexClass</name></types></Package>".encode()


def _many_packages(path: Path) -> None:
    rnd = random.Random(11)
    body = _manifest([f"Class{i}_{rnd.randbytes(3).hex()}_{'Service' * 200}" for i in range(700)])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for folder in range(190):
            archive.writestr(f"pkg{folder}/package.xml", body)
            archive.writestr(f"pkg{folder}/destructiveChanges.xml", body)
        for index in range(10_000 - 380):
            archive.writestr(f"pkg0/classes/C{index}.cls", f"public class C{index} {{}}\n" + rnd.randbytes(24).hex())


def _ten_thousand_classes(path: Path) -> None:
    rnd = random.Random(12)
    filler = b"    System.debug('a line of a long generated class');\n" * 560
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("package.xml", _manifest(["*"]))
        for index in range(9_999):
            archive.writestr(f"classes/C{index}.cls", rnd.randbytes(2_400) + filler)


async def measure(workdir: Path) -> dict[str, Any]:
    directory = workdir / "artifacts"
    directory.mkdir(exist_ok=True)
    _many_packages(directory / "many-packages.zip")
    _ten_thousand_classes(directory / "ten-thousand-classes.zip")
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        store = ArtifactStore(config=ArtifactsConfig(dir=directory), session=session)
        for name in ("many-packages.zip", "ten-thousand-classes.zip"):
            started = time.perf_counter()
            tracemalloc.start()
            try:
                artifact = await store.load(name)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            rows.append(
                {
                    "artifact": name,
                    "files": artifact.files,
                    "compressed_mb": round(artifact.compressed / 1_000_000, 1),
                    "uncompressed_mb": round(artifact.uncompressed / 1_000_000, 1),
                    "peak_mb": round(peak / 1_000_000, 1),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            del artifact
    return {"target_mb": TARGET_MB, "artifacts": rows}
