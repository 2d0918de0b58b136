"""Planning a push (SPEC §4): which version, and which subscriber orgs it would upgrade.

Read-only: everything here is Salesforce queries, so a dry run and a real push plan alike.
Call budget (SPEC §11): version lookup 1–2, subscriber pages ⌈N/2000⌉ plus one count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from bot.clients.salesforce.rest import soql_id_list, soql_literal
from bot.core.orgs import OrgRegistry
from bot.errors import NotFoundError, StateError
from bot.push.requests import OrgSelection, VersionSpec
from bot.push.upstream import IN_CHUNK, packaging_client
from bot.store.models import Operation


@dataclass(frozen=True)
class VersionInfo:
    id: str
    package_id: str
    package_name: str
    number: tuple[int, int, int, int]
    release_state: str
    deprecated: bool

    @cached_property  # read once per subscriber when planning: thousands of times
    def label(self) -> str:
        return ".".join(str(part) for part in self.number[:3])


@dataclass(frozen=True)
class Target:
    org_key: str
    org_name: str
    org_type: str
    org_status: str
    from_version: str


@dataclass
class PushPlan:
    version: VersionInfo
    selection: OrgSelection
    targets: list[Target]
    not_eligible: list[tuple[str, str]] = field(default_factory=list)  # (org id, why) for listed ids
    skipped: Counter[str] = field(default_factory=Counter)  # why → how many subscribers left out

    @property
    def org_kinds(self) -> frozenset[str]:
        return frozenset(target.org_type.lower() for target in self.targets)

    def by_version_and_type(self) -> list[tuple[str, str, int]]:
        counts = Counter((t.from_version, t.org_type) for t in self.targets)
        return sorted(((v, k, n) for (v, k), n in counts.items()), key=lambda row: (_version_key(row[0]), row[1]))


def _version_key(label: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in label.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class RetryPlan:
    plan: PushPlan
    previous: Operation
    left_out: Counter[str]


def nothing_to_push(plan: PushPlan) -> str:
    reasons = ", ".join(f"{count:,} {why}" for why, count in plan.skipped.most_common()) or "no matching subscribers"
    return f"Nothing to push for {plan.version.package_name} {plan.version.label} ({plan.selection}): {reasons}."


class PushPlanner:
    """Resolves versions and subscribers in the packaging org."""

    def __init__(self, orgs: OrgRegistry) -> None:
        self._orgs = orgs

    async def _versions(self, where: str) -> list[VersionInfo]:
        records = await packaging_client(self._orgs).query(
            "SELECT Id, MetadataPackageId, MetadataPackage.Name, MajorVersion, MinorVersion, PatchVersion, "
            f"BuildNumber, ReleaseState, IsDeprecated FROM MetadataPackageVersion WHERE {where}"
        )
        return [
            VersionInfo(
                id=record["Id"],
                package_id=record["MetadataPackageId"],
                package_name=(record.get("MetadataPackage") or {}).get("Name") or "",
                number=(
                    int(record.get("MajorVersion") or 0),
                    int(record.get("MinorVersion") or 0),
                    int(record.get("PatchVersion") or 0),
                    int(record.get("BuildNumber") or 0),
                ),
                release_state=record.get("ReleaseState") or "",
                deprecated=bool(record.get("IsDeprecated")),
            )
            for record in records
        ]

    async def resolve_version(self, spec: VersionSpec) -> tuple[VersionInfo, list[VersionInfo]]:
        """The target version and every version of its package (to place subscribers)."""
        if spec.version_id:
            found = await self._versions(f"Id = {soql_literal(spec.version_id)}")
            if not found:
                raise NotFoundError(f"No package version `{spec.version_id}` in the packaging org.")
            versions = await self._versions(f"MetadataPackageId = {soql_literal(found[0].package_id)}")
            target = found[0]
        else:
            assert spec.package_name is not None and spec.number is not None
            versions = await self._versions(f"MetadataPackage.Name = {soql_literal(spec.package_name)}")
            if not versions:
                raise NotFoundError(
                    f"No package called `{spec.package_name}` in the packaging org (names are matched exactly)."
                )
            matches = [v for v in versions if v.number[:3] == spec.number]
            released = [v for v in matches if v.release_state == "Released"]
            target_list = sorted(released or matches, key=lambda v: v.number)
            if not target_list:
                available = ", ".join(
                    v.label
                    for v in sorted(versions, key=lambda v: v.number)
                    if v.release_state == "Released" and not v.deprecated
                )
                raise NotFoundError(
                    f"{spec.package_name} has no version {'.'.join(map(str, spec.number))}. "
                    f"Released versions: {available or 'none'}."
                )
            target = target_list[-1]
        if target.release_state != "Released":
            raise StateError(
                f"{target.package_name} {target.label} is {target.release_state or 'not released'}; "
                "only Released versions can be pushed."
            )
        if target.deprecated:
            raise StateError(f"{target.package_name} {target.label} is deprecated; push a current version.")
        return target, versions

    async def plan(self, spec: VersionSpec, selection: OrgSelection) -> PushPlan:
        target, versions = await self.resolve_version(spec)
        by_id = {v.id[:15]: v for v in versions}
        client = packaging_client(self._orgs)
        fields = "OrgKey, OrgName, OrgType, OrgStatus, InstalledStatus, MetadataPackageVersionId"
        of_package = f"MetadataPackageId = {soql_literal(target.package_id)}"
        base = f"SELECT {fields} FROM PackageSubscriber WHERE {of_package}"
        plan = PushPlan(version=target, selection=selection, targets=[])
        if selection.scope == "ids":
            records: list[dict[str, Any]] = []
            for start in range(0, len(selection.org_ids), IN_CHUNK):
                chunk = selection.org_ids[start : start + IN_CHUNK]
                records.extend(await client.query(f"{base} AND OrgKey IN {soql_id_list(chunk)}"))
            seen = {str(r["OrgKey"])[:15] for r in records}
            plan.not_eligible.extend(
                (org_id, "not a subscriber of this package") for org_id in selection.org_ids if org_id[:15] not in seen
            )
        else:
            where = " AND InstalledStatus = 'i' AND OrgStatus != 'Inactive'"
            if selection.scope in {"production", "sandbox"}:
                where += f" AND OrgType = {soql_literal(selection.scope.capitalize())}"
            older = [v.id for v in versions if v.number < target.number]
            up_to_date = [v.id for v in versions if v.number >= target.number]
            if older and len(versions) <= IN_CHUNK:
                # Only the orgs that need the push come back: the pages read (2,000 rows each) grow
                # with the push, not with the whole subscriber base. The rest are only counted.
                older_ids = soql_id_list(older)
                records = await client.query(f"{base}{where} AND MetadataPackageVersionId IN {older_ids}")
                left_out = await client.count(
                    "PackageSubscriber",
                    f"{of_package}{where} AND MetadataPackageVersionId IN {soql_id_list(up_to_date)}",
                )
                if left_out:
                    plan.skipped["already on this version or newer"] += left_out
            else:
                records = await client.query(base + where)
        for record in records:
            key = str(record["OrgKey"])[:15]
            current = by_id.get(str(record.get("MetadataPackageVersionId") or "")[:15])
            reason = None
            if record.get("InstalledStatus") != "i":
                reason = "package uninstalled"
            elif record.get("OrgStatus") == "Inactive":
                reason = "org inactive (expired or deleted)"
            elif current is None:
                reason = "on a version this packaging org does not know"
            elif current.number >= target.number:
                reason = (
                    "already on this version"
                    if current.number == target.number
                    else (f"already on a newer version ({current.label})")
                )
            if reason:
                plan.skipped["already on this version or newer" if reason.startswith("already") else reason] += 1
                if selection.scope == "ids":
                    plan.not_eligible.append((key, reason))
                continue
            assert current is not None
            plan.targets.append(
                Target(
                    org_key=key,
                    org_name=str(record.get("OrgName") or ""),
                    org_type=str(record.get("OrgType") or ""),
                    org_status=str(record.get("OrgStatus") or ""),
                    from_version=current.label,
                )
            )
        return plan
