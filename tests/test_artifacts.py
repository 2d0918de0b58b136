"""Artifact checks: every refusal is specific and happens before anything is sent."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.deploy.artifacts import ArtifactStore, Limits, inspect_zip, zip_folder
from bot.errors import NotFoundError, StateError, UsageError
from bot.sandbox.metadata_api import ArtifactServer, write_sample_artifacts
from bot.settings import ArtifactsConfig

PACKAGE = (
    '<?xml version="1.0" encoding="UTF-8"?><Package xmlns="http://soap.sforce.com/2006/04/metadata">'
    "<types><members>A</members><members>B</members><name>ApexClass</name></types>"
    "<types><members>*</members><name>CustomObject</name></types><version>61.0</version></Package>"
)


def make_zip(entries: dict[str, bytes | str], *, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def refusal(data: bytes, limits: Limits | None = None) -> str:
    with pytest.raises(UsageError) as error:
        inspect_zip(data, label="x.zip", limits=limits or Limits())
    return error.value.message


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "artifacts"
    write_sample_artifacts(directory)
    return directory


def test_a_good_zip_is_described() -> None:
    facts = inspect_zip(
        make_zip({"package.xml": PACKAGE, "classes/A.cls": "x", "destructiveChangesPost.xml": PACKAGE}),
        label="x.zip",
    )
    assert facts.files == 3 and facts.root_package
    assert facts.types == {"ApexClass": 2, "CustomObject": 0}  # 0: a wildcard
    assert facts.destructive == ("destructiveChangesPost.xml",)
    nested = inspect_zip(make_zip({"unpackaged/package.xml": PACKAGE}), label="x.zip")
    assert not nested.root_package and nested.types["ApexClass"] == 2


def test_zip_bomb_is_refused_while_reading() -> None:
    bomb = make_zip({"package.xml": PACKAGE, "classes/Bomb.cls": b"\0" * (30 * 1024 * 1024)})
    assert len(bomb) < 100_000
    message = refusal(bomb)
    assert "zip bomb" in message and "classes/Bomb.cls" in message and "100×" in message
    # The absolute limit is enforced too (here with a tiny one and the ratio rule out of the way).
    big = make_zip({"package.xml": PACKAGE, "a.bin": os.urandom(300_000), "b.bin": os.urandom(300_000)})
    assert "unzips to" in refusal(big, Limits(uncompressed=400_000, ratio=10**9))


def test_path_traversal_absolute_and_symlink_entries_are_refused() -> None:
    assert "points outside the artifact" in refusal(make_zip({"package.xml": PACKAGE, "../evil.cls": "x"}))
    assert "points outside the artifact" in refusal(make_zip({"package.xml": PACKAGE, "classes/../../x": "x"}))
    assert "absolute path" in refusal(make_zip({"package.xml": PACKAGE, "/etc/cron.d/x": "x"}))
    assert "symbolic link" in refusal(make_zip({"package.xml": PACKAGE}, symlink="classes/link.cls"))


def test_too_many_files_no_package_xml_and_damage_are_refused() -> None:
    many = make_zip({"package.xml": PACKAGE, **{f"classes/C{i}.cls": "" for i in range(10_000)}})
    assert "10,001 files" in refusal(many) and "at most 10,000" in refusal(many)
    assert "no `package.xml`" in refusal(make_zip({"classes/A.cls": "x"}))
    assert "not a zip file" in refusal(b"PK\x03\x04 not really")
    assert "not valid XML" in refusal(make_zip({"package.xml": "<!DOCTYPE x [<!ENTITY a 'b'>]><Package>&a;</Package>"}))
    assert "zipped" in refusal(make_zip({"package.xml": PACKAGE, "a.bin": os.urandom(5000)}), Limits(compressed=4000))


def test_folder_is_zipped_deterministically_and_links_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "release"
    (root / "classes").mkdir(parents=True)
    (root / "package.xml").write_text(PACKAGE)
    (root / "classes" / "A.cls").write_text("public class A {}")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    first = zip_folder(root, label="release")
    os.utime(root / "classes" / "A.cls", (1, 1))
    assert zip_folder(root, label="release") == first  # content, not timestamps, decides
    assert sorted(zipfile.ZipFile(io.BytesIO(first)).namelist()) == ["classes/A.cls", "package.xml"]
    (root / "classes" / "B.cls").symlink_to("/etc/passwd")
    with pytest.raises(UsageError, match="symbolic link"):
        zip_folder(root, label="release")
    (root / "classes" / "B.cls").unlink()
    with pytest.raises(UsageError, match="more than 1 files"):
        zip_folder(root, label="release", limits=Limits(files=1))
    (root / "package.xml").unlink()
    with pytest.raises(UsageError, match=r"no `package\.xml` at its root"):
        zip_folder(root, label="release")


async def test_store_resolves_paths_inside_the_directory_only(
    artifacts_dir: Path, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    store = ArtifactStore(config=ArtifactsConfig(dir=artifacts_dir), session=session)
    good = await store.load("good-release.zip")
    folder = await store.load("good-release")
    assert good.kind == "zip" and folder.kind == "folder" and folder.root_package
    assert folder.types == {"ApexClass": 2, "CustomObject": 1} and folder.files == 6
    assert (await store.load("good-release")).sha256 == folder.sha256
    (tmp_path / "outside.zip").write_bytes((artifacts_dir / "good-release.zip").read_bytes())
    (artifacts_dir / "linked.zip").symlink_to(tmp_path / "outside.zip")
    for ref, fragment in [
        ("../outside.zip", "points outside the artifacts directory"),
        ("/etc/passwd", "relative to the artifacts directory"),
        ("linked.zip", "symbolic link"),
        ("good-release/package.xml", "neither a `.zip` file nor a folder"),
    ]:
        with pytest.raises(UsageError) as error:
            await store.load(ref)
        assert fragment in error.value.message, ref
    with pytest.raises(NotFoundError, match=r"Available: .*`good-release\.zip`"):
        await store.load("nope.zip")
    with pytest.raises(UsageError, match="No artifacts directory is configured"):
        await ArtifactStore(config=ArtifactsConfig(), session=session).load("good-release.zip")


async def test_reload_refuses_an_artifact_that_changed(artifacts_dir: Path, session: aiohttp.ClientSession) -> None:
    store = ArtifactStore(config=ArtifactsConfig(dir=artifacts_dir), session=session)
    summary = (await store.load("good-release")).summary()
    assert (await store.reload(summary)).sha256 == summary.sha256
    (artifacts_dir / "good-release" / "classes" / "InvoiceService.cls").write_text("public class InvoiceService {}")
    with pytest.raises(StateError, match="changed since it was requested"):
        await store.reload(summary)


async def test_urls_must_be_under_an_allowed_prefix(artifacts_dir: Path, session: aiohttp.ClientSession) -> None:
    server = ArtifactServer(artifacts_dir)
    await server.start()
    try:
        store = ArtifactStore(
            config=ArtifactsConfig(allowed_url_prefixes=[server.prefix, "https://artifacts.example.com/releases"]),
            session=session,
        )
        artifact = await store.load(server.prefix + "good-release.zip")
        assert (
            artifact.kind == "url" and artifact.name == "good-release.zip" and server.downloads == ["good-release.zip"]
        )
        for url, fragment in [
            (server.url + "/other/good-release.zip", "not under an allowed prefix"),
            (server.prefix + "../good-release.zip", "`..`"),
            (server.prefix + "%2e%2e/x.zip", "`..`"),
            (server.prefix + "a%2Fb.zip", "encoded slash"),
            ("http://artifacts.example.com/releases/x.zip", "must be https"),
            ("https://user:pw@artifacts.example.com/releases/x.zip", "credentials"),
            ("https://artifacts.example.com/releases-evil/x.zip", "not under an allowed prefix"),
            ("ftp://artifacts.example.com/releases/x.zip", "not an https URL"),
        ]:
            with pytest.raises(UsageError) as error:
                await store.load(url)
            assert fragment in error.value.message, url
        with pytest.raises(NotFoundError):
            await store.load(server.prefix + "missing.zip")
        assert server.downloads == ["good-release.zip"]
    finally:
        await server.stop()


async def test_redirects_and_oversized_downloads_are_refused(session: aiohttp.ClientSession) -> None:
    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("https://elsewhere.example.com/x.zip")

    async def huge(_: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 5000, content_type="application/zip")

    app = web.Application()
    app.add_routes([web.get("/r/redirect.zip", redirect), web.get("/r/huge.zip", huge)])
    async with TestServer(app, host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}/r/"
        store = ArtifactStore(
            config=ArtifactsConfig(allowed_url_prefixes=[base]), session=session, limits=Limits(compressed=4000)
        )
        with pytest.raises(UsageError, match="redirects are not followed"):
            await store.load(base + "redirect.zip")
        with pytest.raises(UsageError, match="Salesforce accepts at most"):
            await store.load(base + "huge.zip")
