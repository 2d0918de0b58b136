"""The FlexDeploy client against the simulated server over HTTP: rules, encoding, every status code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest

from bot.clients.flexdeploy import FlexDeployClient, Package, server_message
from bot.clients.retry import RetryPolicy
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError
from bot.sandbox.flexdeploy_server import FlexDeploySim

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
SF = 101
CLASSES = "/src/classes"


@pytest.fixture
async def sim() -> AsyncIterator[FlexDeploySim]:
    server = FlexDeploySim()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def client_for(sim: FlexDeploySim, session: aiohttp.ClientSession, *, password: str | None = None) -> FlexDeployClient:
    return FlexDeployClient(
        session=session, base_url=sim.url, user=sim.user, password=password or sim.password, retry=FAST
    )


def paths(package: Package) -> list[str]:
    return [file.file_path for file in package.files]


async def test_get_reads_every_attribute_with_basic_auth(sim: FlexDeploySim, session: aiohttp.ClientSession) -> None:
    package = await client_for(sim, session).get_package(SF, "Release 42")
    assert package.name == "Release 42" and package.package_type == "USER_MANAGED"
    assert package.package_status == "ACTIVE" and package.test_level == "RunSpecifiedTests"
    assert [f.sequence_number for f in package.files] == [1, 2, 3]
    assert package.files[0].object_type == "CustomObject"
    header = sim.requests[-1]
    assert sim.calls[-1] == ("GET", "/flexdeploy/rest/v1/project/101/package/Release%2042")
    assert header.method == "GET"
    dynamic = await client_for(sim, session).get_package(SF, "All Profiles")
    assert dynamic.package_type == "DYNAMIC" and all(p.endswith(".profile") for p in paths(dynamic))


async def test_create_patch_put_delete_follow_the_documented_rules(
    sim: FlexDeploySim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    created = await client.create_package(
        SF, {"name": "R43", "files": [{"filePath": f"{CLASSES}/TaxService.cls"}, {"filePath": "/src/misc/notes.txt"}]}
    )
    assert [(f.file_path, f.sequence_number) for f in created.files] == [
        (f"{CLASSES}/TaxService.cls", 1),
        ("/src/misc/notes.txt", 2),
    ]
    assert created.files[0].object_type == "ApexClass" and created.package_status == "ACTIVE"

    # PATCH: attributes left out stay, new files are appended after the last number, known ones ignored.
    patched = await client.patch_package(
        SF,
        "R43",
        {
            "description": "tax",
            "files": [{"filePath": f"{CLASSES}/TaxService.cls"}, {"filePath": f"{CLASSES}/TaxServiceTest.cls"}],
        },
    )
    assert patched.description == "tax"
    assert [f.sequence_number for f in patched.files] == [1, 2, 3]
    assert paths(patched)[-1] == f"{CLASSES}/TaxServiceTest.cls"
    again = await client.patch_package(SF, "R43", {"packageStatus": "INACTIVE"})
    assert again.description == "tax" and len(again.files) == 3 and again.package_status == "INACTIVE"

    # PUT: a complete update; the files are exactly the new ones, numbered as given.
    put = await client.replace_package(
        SF,
        "R43",
        {"files": [{"filePath": f"{CLASSES}/OrderService.cls", "sequenceNumber": 5}]},
    )
    assert [(f.file_path, f.sequence_number) for f in put.files] == [(f"{CLASSES}/OrderService.cls", 5)]
    assert put.description is None and put.package_status == "ACTIVE"

    # addFileFilter adds every project file containing the text; sortAll orders by object type.
    filtered = await client.patch_package(SF, "R43", {"addFileFilter": "Refund", "sortAll": True})
    assert {f.object_type for f in filtered.files} == {"ApexClass", "ApexTrigger"}
    assert [f.sequence_number for f in filtered.files] == list(range(1, len(filtered.files) + 1))

    await client.delete_package(SF, "R43")
    assert sim.package(SF, "R43") is None
    await client.delete_package(SF, "R43")  # a missing package is not an error
    assert [m for m, _ in sim.writes()][-2:] == ["DELETE", "DELETE"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"files": [{"filePath": "/a", "sequenceNumber": 1}, {"filePath": "/b"}]}, "all or none"),
        ({"includePath": ".*"}, "DYNAMIC packages only"),
        ({"packageStatus": "DONE"}, "Invalid packageStatus"),
        ({"files": [{"filePath": "/src/x", "sequenceNumber": 2}]}, "Sequence number 2 is already used"),
        ({"name": "Renamed"}, "cannot be modified"),
    ],
)
async def test_bad_requests_answer_400_and_change_nothing(
    sim: FlexDeploySim, session: aiohttp.ClientSession, body: dict[str, object], fragment: str
) -> None:
    before = sim.package(SF, "Release 42")
    with pytest.raises(ApiError) as caught:
        await client_for(sim, session).patch_package(SF, "Release 42", body)
    assert caught.value.status == 400 and fragment in caught.value.message
    assert sim.package(SF, "Release 42") == before


async def test_completed_packages_cannot_be_modified_but_can_be_read(
    sim: FlexDeploySim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    assert (await client.get_package(SF, "Hotfix 41.1")).package_status == "COMPLETED"
    for call in (
        client.patch_package(SF, "Hotfix 41.1", {"description": "x"}),
        client.replace_package(SF, "Hotfix 41.1", {"files": []}),
    ):
        with pytest.raises(ApiError, match="completed packages can not be modified"):
            await call


@pytest.mark.parametrize("name", ["Release 44/hotfix", "Größe ✓ 2025", "50% off?#frag", "a%2Fb", "  spaced  "])
async def test_names_are_url_encoded_as_one_path_segment(
    sim: FlexDeploySim, session: aiohttp.ClientSession, name: str
) -> None:
    client = client_for(sim, session)
    await client.create_package(SF, {"name": name})
    got = await client.get_package(SF, name)
    assert got.name == name and sim.package(SF, name) is not None
    expected = f"/flexdeploy/rest/v1/project/101/package/{quote(name, safe='')}"
    assert sim.calls[-1] == ("GET", expected)
    assert "/" not in expected.rsplit("/package/", 1)[1]
    await client.delete_package(SF, name)
    assert sim.package(SF, name) is None


async def test_each_status_code_has_its_own_error(sim: FlexDeploySim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    seen: dict[int, tuple[type[Exception], str]] = {}
    for status in (400, 401, 403, 404, 500):
        sim.force(status, times=None)
        with pytest.raises((ApiError, AuthError, TransientError)) as caught:
            await client.get_package(SF, "Release 42")
        sim.clear_forced()
        seen[status] = (type(caught.value), caught.value.message)
        assert caught.value.status == status
    assert seen[401][0] is AuthError and "FLEXDEPLOY_USER" in seen[401][1]
    assert seen[403][0] is ApiError and "Execute Project permission" in seen[403][1]
    assert seen[404][0] is ApiError and "no such project or package" in seen[404][1]
    assert seen[500][0] is TransientError and "internal error (HTTP 500)" in seen[500][1]
    assert seen[400][0] is ApiError and "bad request" in seen[400][1]
    assert len({message for _, message in seen.values()}) == 5
    assert not any("<html" in message.lower() or "NullPointer" in message for _, message in seen.values())


async def test_500_is_retried_for_reads_but_not_for_writes(sim: FlexDeploySim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    sim.force(500, times=1)
    assert (await client.get_package(SF, "Release 42")).name == "Release 42"
    assert [m for m, _ in sim.calls] == ["GET", "GET"]

    sim.reset_calls()
    sim.force(500, times=None)
    with pytest.raises(TransientError):
        await client.get_package(SF, "Release 42")
    assert len(sim.calls) == FAST.attempts
    sim.clear_forced()

    sim.reset_calls()
    sim.force(500, method="PATCH", times=None)
    with pytest.raises(AmbiguousWriteError, match="may or may not have been applied"):
        await client.patch_package(SF, "Release 42", {"description": "x"})
    assert [m for m, _ in sim.calls] == ["PATCH"]


async def test_wrong_credentials_are_a_real_401_and_never_shown(
    sim: FlexDeploySim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session, password="not-the-password")
    with pytest.raises(AuthError) as caught:
        await client.get_package(SF, "Release 42")
    assert "not-the-password" not in caught.value.message and "not-the-password" not in repr(client)
    assert sim.password not in repr(client)
    # The same call with the right password passes the simulator's Basic auth check.
    assert (await client_for(sim, session).get_package(SF, "Release 42")).name == "Release 42"


async def test_forbidden_project_is_403_and_unknown_project_404(
    sim: FlexDeploySim, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim, session)
    with pytest.raises(ApiError) as forbidden:
        await client.get_package(103, "anything")
    assert forbidden.value.status == 403
    with pytest.raises(ApiError) as missing:
        await client.delete_package(999, "anything")
    assert missing.value.status == 404 and "Project 999 not found" in missing.value.message


async def test_connection_refused_is_transient(session: aiohttp.ClientSession) -> None:
    client = FlexDeployClient(session=session, base_url="http://127.0.0.1:9", user="u", password="p", retry=FAST)
    with pytest.raises(TransientError, match="cannot connect to FlexDeploy"):
        await client.get_package(SF, "x")


def test_server_message_is_short_and_never_html() -> None:
    assert server_message(b'{"status": 400, "message": "Bad thing"}', "application/json") == "Bad thing"
    assert server_message(b"<html><body>secret stack</body></html>", "text/html") == ""
    assert len(server_message(("x" * 5000).encode(), "text/plain")) <= 201
    assert server_message(b"line one\nline two", "text/plain") == "line one"
