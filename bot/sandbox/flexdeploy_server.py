"""A simulated FlexDeploy server: the v1 project package REST API over real HTTP on 127.0.0.1.

The bot's real FlexDeploy client talks to it exactly as it would to FlexDeploy. It follows the
"Project Packages API" documentation:

- ``GET/PUT/PATCH/DELETE /flexdeploy/rest/v1/project/{projectId}/package/{packageName}`` and
  ``POST /flexdeploy/rest/v1/project/{projectId}/package``; Basic authentication.
- Names are case-sensitive and cannot be changed. ``packageType`` USER_MANAGED (default) or
  DYNAMIC; ``packageStatus`` ACTIVE (default), INACTIVE or COMPLETED; COMPLETED packages
  cannot be modified. ``includePath``/``excludePath`` are comma-separated regular expressions
  for DYNAMIC packages only, whose files are the project files they match.
- PUT is a complete update (files not in the request are removed; attributes left out fall back
  to their defaults); PATCH updates only attributes that are not null and appends the files
  that are not in the package yet. Sequence numbers are given for all files of a request or for
  none; without them files are numbered after the last one; ``sortAll`` orders every file by
  object type and ignores sequence numbers; ``addFileFilter`` adds every project file whose
  path contains the text. Every call answers the package as JSON.
- Answers 200, 400, 401, 403, 404 or 500.

Where the docs are silent, the choice is written next to the code that makes it: the error body
is ``{"status": <code>, "message": <text>}``; a 500 is the application server's HTML page; a
duplicate name on POST, a sequence number already used, a file listed twice and any change to
a COMPLETED package answer 400; DELETE of a missing package answers 200 with an empty body (not
an error, as the API promises), of a package that is part of a release 400; the object type of a
file that is not a known project file is guessed from its folder or extension.

Tests steer it with ``force`` (the next answers to matching calls) and read ``calls`` (method
and raw, still percent-encoded, path), ``requests`` (with bodies) and ``package``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bot.sandbox.served import close, serve

Row = dict[str, Any]

BASE = "/flexdeploy/rest/v1"
TYPES = ("USER_MANAGED", "DYNAMIC")
STATUSES = ("ACTIVE", "INACTIVE", "COMPLETED")
TEST_LEVELS = ("NoTestRun", "RunSpecifiedTests", "RunLocalTests", "RunAllTestsInOrg")
SALESFORCE = "SALESFORCE"

SF_FOLDER_TYPES = {
    "classes": "ApexClass",
    "triggers": "ApexTrigger",
    "objects": "CustomObject",
    "profiles": "Profile",
    "layouts": "Layout",
    "lwc": "LightningComponentBundle",
    "flows": "Flow",
    "permissionsets": "PermissionSet",
    "pages": "ApexPage",
    "labels": "CustomLabels",
}
SQL_EXTENSIONS = (".sql", ".pls", ".pkb", ".pks", ".trg", ".vw")
ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>Error 500--Internal Server Error</title></head>"
    "<body><h2>Error 500--Internal Server Error</h2><p>java.lang.NullPointerException at "
    "flexagon.fd.services.rest.PackageResource</p></body></html>\n"
)


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class SimProject:
    project_id: int
    name: str
    project_type: str
    files: dict[str, str]  # project files: path → object type
    packages: dict[str, Row] = field(default_factory=dict)
    releases: dict[str, str] = field(default_factory=dict)  # package name → release it belongs to


@dataclass
class _Forced:
    status: int
    method: str | None
    remaining: int | None  # None: until cleared


@dataclass(frozen=True)
class SimRequest:
    method: str
    raw_path: str
    body: Any


def guess_object_type(path: str, project_type: str) -> str:
    parts = [part for part in path.split("/") if part]
    if project_type == SALESFORCE:
        for part in reversed(parts[:-1]):
            if part in SF_FOLDER_TYPES:
                return SF_FOLDER_TYPES[part]
        return "Unknown"
    if path.lower().endswith(SQL_EXTENSIONS):
        return "DB Objects (SQLs)"
    return "File"


def _salesforce_files() -> dict[str, str]:
    """A project's files as FlexDeploy lists them after populating them from source control."""
    files: dict[str, str] = {}
    services = [
        "Invoice", "Billing", "Payment", "Account", "Contact", "Order", "Quote", "Refund", "Tax", "Discount",
        "Subscription", "Usage", "Credit", "Ledger", "Statement", "Dunning", "Pricing", "Catalog", "Renewal",
        "Forecast",
    ]  # fmt: skip
    for base in services:
        files[f"/src/classes/{base}Service.cls"] = "ApexClass"
        files[f"/src/classes/{base}ServiceTest.cls"] = "ApexClass"
    for name in ("InvoiceTrigger", "PaymentTrigger", "OrderTrigger", "AccountTrigger", "RefundTrigger"):
        files[f"/src/triggers/{name}.trigger"] = "ApexTrigger"
    for name in ("Invoice__c", "Payment__c", "Subscription__c", "Ledger_Entry__c", "Account", "Order"):
        files[f"/src/objects/{name}.object"] = "CustomObject"
    for name in ("Admin", "Sales", "Support", "Finance"):
        files[f"/src/profiles/{name}.profile"] = "Profile"
    for name in ("Invoice__c-Invoice Layout", "Payment__c-Payment Layout", "Account-Account Layout"):
        files[f"/src/layouts/{name}.layout"] = "Layout"
    for name in ("invoiceList", "paymentForm", "billingDashboard"):
        files[f"/src/lwc/{name}/{name}.js"] = "LightningComponentBundle"
    for name in ("Invoice_Approval", "Dunning_Reminder"):
        files[f"/src/flows/{name}.flow"] = "Flow"
    for name in ("Billing_Admin", "Billing_User"):
        files[f"/src/permissionsets/{name}.permissionset"] = "PermissionSet"
    return files


def _db_files() -> dict[str, str]:
    names = ["XXHR_BIPUB_REP_PKG.pls", "XXHR_BIPUB_REP_PKG.pkb", "XXHR_EMP_V.vw", "XXHR_PAYROLL_PKG.pks"]
    names += ["XXHR_PAYROLL_PKG.pkb", "XXHR_AUDIT_TRG.trg", "XXHR_GRANTS.sql"]
    return {f"/sql/{name}": "DB Objects (SQLs)" for name in names}


def _pkg(name: str, *, files: list[str], catalogue: Mapping[str, str], **attributes: Any) -> Row:
    row: Row = {
        "name": name,
        "description": None,
        "packageType": "USER_MANAGED",
        "packageStatus": "ACTIVE",
        "includePath": None,
        "excludePath": None,
        "tests": None,
        "testLevel": None,
        "versionSyntax": None,
        "files": [
            {"filePath": path, "objectType": catalogue[path], "sequenceNumber": n}
            for n, path in enumerate(files, start=1)
        ],
    }
    row.update(attributes)
    return row


def default_projects() -> list[SimProject]:
    """Two projects the bot user may use, one it may not, with a few packages each."""
    sf_files = _salesforce_files()
    salesforce = SimProject(101, "Acme Salesforce", SALESFORCE, sf_files)
    classes = sorted(path for path in sf_files if path.startswith("/src/classes/"))
    for row in (
        _pkg(
            "Release 42",
            files=[
                "/src/objects/Invoice__c.object",
                "/src/classes/InvoiceService.cls",
                "/src/classes/InvoiceServiceTest.cls",
            ],
            catalogue=sf_files,
            description="Invoicing for the spring release",
            tests="InvoiceServiceTest",
            testLevel="RunSpecifiedTests",
            versionSyntax="42.0.0.${BUILD_NUMBER}",
        ),
        _pkg(
            "Hotfix 41.1",
            files=["/src/classes/TaxService.cls", "/src/classes/TaxServiceTest.cls"],
            catalogue=sf_files,
            description="Rounding fix, shipped",
            packageStatus="COMPLETED",
        ),
        _pkg(
            "All Profiles",
            files=[],
            catalogue=sf_files,
            packageType="DYNAMIC",
            includePath=r".*\.profile",
            description="Every profile in the project",
        ),
        _pkg(
            "Big Bang",
            files=[*classes, *sorted(path for path in sf_files if not path.startswith("/src/classes/"))][:60],
            catalogue=sf_files,
            description="Everything at once (kept for reference)",
            packageStatus="INACTIVE",
        ),
        _pkg("Release 40", files=["/src/classes/OrderService.cls"], catalogue=sf_files, description="In a release"),
    ):
        salesforce.packages[row["name"]] = row
    salesforce.releases["Release 40"] = "Spring '25"
    db_files = _db_files()
    database = SimProject(102, "HR Database", "ORACLE_DB", db_files)
    database.packages["ALM-150"] = _pkg(
        "ALM-150", files=["/sql/XXHR_BIPUB_REP_PKG.pls", "/sql/XXHR_BIPUB_REP_PKG.pkb"], catalogue=db_files
    )
    payroll = SimProject(103, "Payroll", "ORACLE_DB", {"/sql/PAY_RUN.sql": "DB Objects (SQLs)"})
    return [salesforce, database, payroll]


class FlexDeploySim:
    """FlexDeploy's package API for a few projects. ``forbidden`` projects answer 403 to the bot user."""

    def __init__(
        self,
        *,
        user: str = "chatops-bot",
        password: str | None = None,
        projects: list[SimProject] | None = None,
        forbidden: set[int] | None = None,
    ) -> None:
        self.user = user
        self.password = password or secrets.token_urlsafe(18)
        self.projects: dict[int, SimProject] = {p.project_id: p for p in (projects or default_projects())}
        self.forbidden = forbidden if forbidden is not None else {103}
        self.url = ""
        self.calls: list[tuple[str, str]] = []
        self.requests: list[SimRequest] = []
        self._forced: list[_Forced] = []
        self._runner: web.AppRunner | None = None

    # ---- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        project = BASE + "/project/{project_id}/package"
        app.router.add_post(project, self._create)
        app.router.add_get(project + "/{name}", self._get)
        app.router.add_put(project + "/{name}", self._put)
        app.router.add_patch(project + "/{name}", self._patch)
        app.router.add_delete(project + "/{name}", self._delete)
        self._runner, self.url = await serve(app, host=host, port=port)
        return self.url

    async def stop(self) -> None:
        await close(self._runner)
        self._runner = None

    # ---- knobs and state for tests

    def force(self, status: int, *, method: str | None = None, times: int | None = 1) -> None:
        """The next ``times`` calls (of ``method``, or any) answer ``status``; ``times=None``: until cleared."""
        self._forced.append(_Forced(status, method.upper() if method else None, times))

    def clear_forced(self) -> None:
        self._forced.clear()

    def reset_calls(self) -> None:
        self.calls.clear()
        self.requests.clear()

    def writes(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path in self.calls if method in {"POST", "PUT", "PATCH", "DELETE"}]

    def package(self, project_id: int, name: str) -> Row | None:
        project = self.projects.get(project_id)
        row = project.packages.get(name) if project else None
        return self._public(project, row) if project and row else None

    # ---- HTTP plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.calls.append((request.method, request.raw_path))
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.requests.append(SimRequest(request.method, request.raw_path, body))
        forced = self._take_forced(request.method)
        if forced is not None:
            return self._forced_answer(forced)
        if not self._authorized(request.headers.get("Authorization", "")):
            return _error(401, "Authentication failure", headers={"WWW-Authenticate": 'Basic realm="FlexDeploy"'})
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return _error(404, "Resource not found")
            if exc.status == 405:
                return _error(405, "Method not allowed")
            raise
        except Refusal as refusal:
            return _error(refusal.status, refusal.message)

    def _take_forced(self, method: str) -> int | None:
        for forced in self._forced:
            if forced.method in (None, method):
                if forced.remaining is not None:
                    forced.remaining -= 1
                    if forced.remaining <= 0:
                        self._forced.remove(forced)
                return forced.status
        return None

    def _forced_answer(self, status: int) -> web.Response:
        if status == 500:
            return web.Response(status=500, text=ERROR_PAGE, content_type="text/html")
        messages = {
            400: "Bad request",
            401: "Authentication failure",
            403: "Authorization failure (no access to resource)",
            404: "Project or Package not found",
        }
        headers = {"WWW-Authenticate": 'Basic realm="FlexDeploy"'} if status == 401 else None
        return _error(status, messages.get(status, "Error"), headers=headers)

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user.encode(), self.user.encode()) and hmac.compare_digest(
            password.encode(), self.password.encode()
        )

    def _project(self, request: web.Request) -> SimProject:
        text = request.match_info["project_id"]
        if not text.isdigit():
            raise Refusal(400, f"projectId must be a number, got '{text[:40]}'")
        project = self.projects.get(int(text))
        if project is None:
            raise Refusal(404, f"Project {text} not found")
        if project.project_id in self.forbidden:
            raise Refusal(403, f"User {self.user} has no access to project {text}")
        return project

    @staticmethod
    async def _body(request: web.Request) -> Row:
        try:
            body = await request.json()
        except ValueError:
            raise Refusal(400, "The request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refusal(400, "The request body must be a JSON package object")
        return body

    @staticmethod
    def _existing(project: SimProject, name: str) -> Row:
        row = project.packages.get(name)
        if row is None:
            raise Refusal(404, f"Package '{name}' not found in project {project.project_id}")
        return row

    def _public(self, project: SimProject, row: Row) -> Row:
        out = {key: value for key, value in row.items() if key != "files"}
        if row["packageType"] == "DYNAMIC":
            files = self._dynamic_files(project, row)
        else:
            files = sorted(row["files"], key=lambda f: f["sequenceNumber"])
        out["files"] = [dict(f) for f in files]
        if project.project_type != SALESFORCE:
            out.update(tests=None, testLevel=None, versionSyntax=None)
        return out

    @staticmethod
    def _dynamic_files(project: SimProject, row: Row) -> list[Row]:
        include = _patterns(row.get("includePath"))
        exclude = _patterns(row.get("excludePath"))
        matched = [
            path
            for path in sorted(project.files)
            if any(p.fullmatch(path) for p in include) and not any(p.fullmatch(path) for p in exclude)
        ]
        return [
            {"filePath": path, "objectType": project.files[path], "sequenceNumber": n}
            for n, path in enumerate(matched, start=1)
        ]

    # ---- the API

    async def _get(self, request: web.Request) -> web.Response:
        project = self._project(request)
        row = self._existing(project, request.match_info["name"])
        return web.json_response(self._public(project, row))

    async def _create(self, request: web.Request) -> web.Response:
        project = self._project(request)
        body = await self._body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise Refusal(400, "name is required")
        if name in project.packages:
            # Docs silent on duplicates; a definite refusal is what a caller can act on.
            raise Refusal(400, f"Package '{name}' already exists in project {project.project_id}")
        return self._store_whole(project, name, _attributes(body))

    async def _put(self, request: web.Request) -> web.Response:
        project = self._project(request)
        name = request.match_info["name"]
        current = self._existing(project, name)
        body = await self._body(request)
        self._check_modifiable(current, body, name)
        return self._store_whole(project, name, _attributes(body))

    def _store_whole(self, project: SimProject, name: str, attributes: Row) -> web.Response:
        """POST and PUT both write a whole package: what the request leaves out falls back to its default."""
        row = _pkg(name, files=[], catalogue=project.files)
        row.update(
            description=attributes.get("description"),
            packageType=attributes.get("packageType") or "USER_MANAGED",
            packageStatus=attributes.get("packageStatus") or "ACTIVE",
            tests=attributes.get("tests"),
            testLevel=attributes.get("testLevel"),
            versionSyntax=attributes.get("versionSyntax"),
        )
        self._apply_type_rules(row, attributes, replace_files=True, project=project)
        project.packages[name] = row
        return web.json_response(self._public(project, row))

    async def _patch(self, request: web.Request) -> web.Response:
        project = self._project(request)
        name = request.match_info["name"]
        current = self._existing(project, name)
        body = await self._body(request)
        self._check_modifiable(current, body, name)
        attributes = _attributes(body)
        row = json.loads(json.dumps(current))  # work on a copy: a refusal must change nothing
        for key in ("description", "packageType", "packageStatus", "tests", "testLevel", "versionSyntax"):
            if attributes.get(key) is not None:
                row[key] = attributes[key]
        if current["packageType"] == "DYNAMIC" and row["packageType"] == "USER_MANAGED":
            row["files"] = self._dynamic_files(project, current)  # what it held becomes its own list
            row["includePath"] = row["excludePath"] = None
        self._apply_type_rules(row, attributes, replace_files=False, project=project)
        project.packages[name] = row
        return web.json_response(self._public(project, row))

    async def _delete(self, request: web.Request) -> web.Response:
        project = self._project(request)
        name = request.match_info["name"]
        if name in project.releases and name in project.packages:
            raise Refusal(400, f"Package '{name}' is part of release '{project.releases[name]}' and cannot be deleted")
        project.packages.pop(name, None)  # a missing package is not an error
        return web.Response(status=200)

    # ---- rules

    @staticmethod
    def _check_modifiable(current: Row, body: Row, name: str) -> None:
        if body.get("name") is not None and body.get("name") != name:
            raise Refusal(400, "The package name cannot be modified after the package is created")
        if current["packageStatus"] == "COMPLETED":
            raise Refusal(400, f"Package '{name}' is COMPLETED; completed packages can not be modified")

    def _apply_type_rules(self, row: Row, attributes: Row, *, replace_files: bool, project: SimProject) -> None:
        files: list[Row] | None = attributes.get("files")
        if row["packageType"] == "USER_MANAGED":
            if attributes.get("includePath") is not None or attributes.get("excludePath") is not None:
                raise Refusal(400, "includePath and excludePath are applicable for DYNAMIC packages only")
            row["includePath"] = row["excludePath"] = None
            existing = [] if replace_files else row["files"]
            row["files"] = _compose(
                existing,
                files or [],
                sort_all=bool(attributes.get("sortAll")),
                add_filter=attributes.get("addFileFilter"),
                project=project,
            )
            return
        if files or attributes.get("addFileFilter"):
            raise Refusal(400, "The files of a DYNAMIC package are determined by its includePath and excludePath")
        for key in ("includePath", "excludePath"):
            if attributes.get(key) is not None or replace_files:
                row[key] = attributes.get(key)
        if not row.get("includePath"):
            raise Refusal(400, "A DYNAMIC package needs an includePath")
        row["files"] = []


def _patterns(text: str | None) -> list[re.Pattern[str]]:
    return [re.compile(part.strip()) for part in (text or "").split(",") if part.strip()]


def _attributes(body: Row) -> Row:
    """The request's attributes, type-checked; null and absent are the same."""
    out: Row = {}
    for key in ("description", "addFileFilter", "versionSyntax", "tests"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise Refusal(400, f"{key} must be a string")
        out[key] = value
    for key, allowed in (("packageType", TYPES), ("packageStatus", STATUSES), ("testLevel", TEST_LEVELS)):
        value = body.get(key)
        if value is not None and value not in allowed:
            raise Refusal(400, f"Invalid {key} '{str(value)[:40]}'; expected one of {', '.join(allowed)}")
        out[key] = value
    for key in ("includePath", "excludePath"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise Refusal(400, f"{key} must be a string")
            for part in value.split(","):
                try:
                    re.compile(part.strip())
                except re.error as exc:
                    raise Refusal(
                        400, f"{key}: '{part.strip()[:60]}' is not a valid regular expression: {exc}"
                    ) from None
        out[key] = value
    sort_all = body.get("sortAll")
    if sort_all is not None and not isinstance(sort_all, bool):
        raise Refusal(400, "sortAll must be true or false")
    out["sortAll"] = sort_all
    files = body.get("files")
    if files is not None:
        if not isinstance(files, list):
            raise Refusal(400, "files must be a list")
        checked: list[Row] = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("filePath"), str) or not item["filePath"].strip():
                raise Refusal(400, "Every file needs a filePath")
            sequence = item.get("sequenceNumber")
            if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1):
                raise Refusal(400, f"sequenceNumber of {item['filePath'][:80]} must be a positive integer")
            object_type = item.get("objectType")
            if object_type is not None and not isinstance(object_type, str):
                raise Refusal(400, "objectType must be a string")
            checked.append({"filePath": item["filePath"], "sequenceNumber": sequence, "objectType": object_type})
        numbered = [f for f in checked if f["sequenceNumber"] is not None]
        if numbered and len(numbered) != len(checked):
            raise Refusal(400, "Sequence numbers must be provided for all or none of the files")
        paths = [f["filePath"] for f in checked]
        if len(set(paths)) != len(paths):
            raise Refusal(400, "A file is listed more than once")
        numbers = [f["sequenceNumber"] for f in numbered]
        if len(set(numbers)) != len(numbers):
            raise Refusal(400, "A sequence number is used more than once")
        out["files"] = checked
    return out


def _compose(
    existing: list[Row], requested: list[Row], *, sort_all: bool, add_filter: str | None, project: SimProject
) -> list[Row]:
    """Existing files stay as they are; new ones are numbered as given or after the last one."""
    files = [dict(f) for f in existing]
    present = {f["filePath"] for f in files}
    used = {f["sequenceNumber"] for f in files}
    new = [f for f in requested if f["filePath"] not in present]
    next_number = max(used, default=0) + 1
    for item in new:
        number = item["sequenceNumber"]
        if number is None:
            number, next_number = next_number, next_number + 1
        elif number in used and not sort_all:
            raise Refusal(400, f"Sequence number {number} is already used in the package")
        used.add(number)
        next_number = max(next_number, number + 1)
        object_type = (
            item.get("objectType")
            or project.files.get(item["filePath"])
            or guess_object_type(item["filePath"], project.project_type)
        )
        files.append({"filePath": item["filePath"], "objectType": object_type, "sequenceNumber": number})
        present.add(item["filePath"])
    if add_filter:
        for path in sorted(project.files):
            if add_filter in path and path not in present:
                files.append({"filePath": path, "objectType": project.files[path], "sequenceNumber": next_number})
                present.add(path)
                next_number += 1
    if sort_all:
        files.sort(key=lambda f: (f["objectType"], f["filePath"]))
        for number, item in enumerate(files, start=1):
            item["sequenceNumber"] = number
    return files


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"status": status, "message": message}).encode(),
        content_type="application/json",
        headers=headers,
    )
