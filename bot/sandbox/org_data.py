"""Schema, record ids and deterministic seed data for the simulated packaging org.

Everything here is plain data: the sObject schemas the SOQL engine binds against, Salesforce-
shaped record ids (key prefix, 15 characters plus the 3-character case checksum), and the
package / version / subscriber rows of a packaging org generated from a seed, so that a test or
a demo sees the same org every time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.sandbox.soql import ObjectSchema, Table

Row = dict[str, Any]

# Key prefixes. 033 (MetadataPackage), 04t (MetadataPackageVersion), 0DV (PackagePushRequest,
# "starts with 0DV" in the sf CLI reference) and 750 (Bulk API job) are documented. The object
# reference does not list prefixes for PackagePushJob, PackagePushError or PackageSubscriber;
# 0DX, 0DY and 0Hf are what real orgs are commonly seen to use and are not confirmed by the docs.
PREFIX = {
    "MetadataPackage": "033",
    "MetadataPackageVersion": "04t",
    "PackageSubscriber": "0Hf",
    "PackagePushRequest": "0DV",
    "PackagePushJob": "0DX",
    "PackagePushError": "0DY",
    "BulkJob": "750",
    "QueryLocator": "01g",
    "User": "005",
}

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def to_18(id_15: str) -> str:
    """Salesforce's case-safe id: one suffix character per 5-character chunk, whose bits mark
    the upper-case letters of that chunk."""
    suffix = ""
    for chunk_start in range(0, 15, 5):
        chunk = id_15[chunk_start : chunk_start + 5]
        bits = sum(1 << position for position, char in enumerate(chunk) if "A" <= char <= "Z")
        suffix += _CHECKSUM_ALPHABET[bits]
    return id_15 + suffix


def _base62(number: int, width: int) -> str:
    digits = ""
    while number:
        number, remainder = divmod(number, 62)
        digits = _BASE62[remainder] + digits
    return digits.rjust(width, "0")


class IdFactory:
    """Hands out increasing 18-character ids per key prefix, like one Salesforce pod would."""

    def __init__(self, *, pod: str = "5f", start: int = 0) -> None:
        self.pod = pod
        self._counters: dict[str, int] = {}
        self._start = start

    def new(self, kind: str) -> str:
        prefix = PREFIX[kind]
        counter = self._counters.get(prefix, self._start) + 1
        self._counters[prefix] = counter
        return to_18(f"{prefix}{self.pod}0{_base62(counter, 9)}")


def format_sf_datetime(moment: datetime | float) -> str:
    """The REST API's dateTime format: 2026-11-23T10:00:00.000+0000."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


# --------------------------------------------------------------------------- schema

_SYSTEM = {"Id": "id", "SystemModstamp": "datetime"}

SCHEMAS: dict[str, ObjectSchema] = {
    "MetadataPackage": ObjectSchema(
        "MetadataPackage",
        {**_SYSTEM, "Name": "string", "NamespacePrefix": "string", "PackageCategory": "picklist"},
    ),
    "MetadataPackageVersion": ObjectSchema(
        "MetadataPackageVersion",
        {
            **_SYSTEM,
            "Name": "string",
            "MetadataPackageId": "reference",
            "ReleaseState": "picklist",
            "MajorVersion": "int",
            "MinorVersion": "int",
            "PatchVersion": "int",
            "BuildNumber": "int",
            "IsDeprecated": "boolean",
        },
        {"MetadataPackage": ("MetadataPackageId", "MetadataPackage")},
    ),
    "PackageSubscriber": ObjectSchema(
        "PackageSubscriber",
        {
            **_SYSTEM,
            "OrgKey": "string",
            "OrgName": "string",
            "OrgType": "picklist",
            "OrgStatus": "picklist",
            "InstalledStatus": "picklist",
            "InstanceName": "string",
            "MetadataPackageId": "reference",
            "MetadataPackageVersionId": "reference",
            "ParentOrg": "string",
        },
        {
            "MetadataPackage": ("MetadataPackageId", "MetadataPackage"),
            "MetadataPackageVersion": ("MetadataPackageVersionId", "MetadataPackageVersion"),
        },
    ),
    "PackagePushRequest": ObjectSchema(
        "PackagePushRequest",
        {
            **_SYSTEM,
            "PackageVersionId": "reference",
            "Status": "picklist",
            "ScheduledStartTime": "datetime",
            "StartTime": "datetime",
            "EndTime": "datetime",
            "DurationSeconds": "int",
            "CreatedDate": "datetime",
            "CreatedById": "reference",
        },
        {"PackageVersion": ("PackageVersionId", "MetadataPackageVersion")},
    ),
    "PackagePushJob": ObjectSchema(
        "PackagePushJob",
        {
            **_SYSTEM,
            "PackagePushRequestId": "reference",
            "SubscriberOrganizationKey": "string",
            "Status": "picklist",
            "StartTime": "datetime",
            "EndTime": "datetime",
            "DurationSeconds": "int",
            "CreatedDate": "datetime",
        },
        {"PackagePushRequest": ("PackagePushRequestId", "PackagePushRequest")},
    ),
    "PackagePushError": ObjectSchema(
        "PackagePushError",
        {
            **_SYSTEM,
            "PackagePushJobId": "reference",
            "ErrorSeverity": "picklist",
            "ErrorType": "picklist",
            "ErrorTitle": "string",
            "ErrorMessage": "string",
            "ErrorDetails": "string",
        },
        {"PackagePushJob": ("PackagePushJobId", "PackagePushJob")},
    ),
}

# Foreign keys the sandbox looks rows up by; all of them are fixed once a row exists.
_INDEXES: dict[str, tuple[str, ...]] = {
    "MetadataPackageVersion": ("MetadataPackageId",),
    "PackageSubscriber": ("OrgKey", "MetadataPackageId"),
    "PackagePushJob": ("PackagePushRequestId",),
    "PackagePushError": ("PackagePushJobId",),
}


def make_tables() -> dict[str, Table]:
    """Empty tables for every sObject the sandbox serves."""
    return {name: Table(schema, index_fields=_INDEXES.get(name, ())) for name, schema in SCHEMAS.items()}


# --------------------------------------------------------------------------- seed data

# Names chosen to exercise quoting and encoding: apostrophes, ampersands, accents, CJK.
_NOTABLE_NAMES = [
    "O'Brien & Søn",
    "Müller Logistik GmbH",
    "Société Générale de Café",
    "Ålesund Fiskeri AS",
    "São Paulo Comércio Ltda",
    "D'Amico & Figli S.p.A.",
    "株式会社さくら商事",
    "Łódź Energia S.A.",
    "McAllister's Hardware",
    "Zürich Rückversicherung AG",
]
_NAME_HEADS = [
    "Northwind",
    "Contoso",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Hooli",
    "Vandelay",
    "Wonka",
    "Acme Widgets",
    "Blue Harbor",
    "Cedar Ridge",
    "Silverline",
    "Brightwater",
    "Ironwood",
    "Red Rock",
    "Summit Peak",
    "Granite State",
    "Evergreen",
    "Pioneer",
    "Harbor Point",
    "Lakeside",
    "Oakmont",
    "Riverbend",
    "Sterling",
    "Keystone",
    "Maple Leaf",
    "Bluebird",
    "Copperfield",
    "Falcon Ridge",
    "Golden Gate",
    "Highland",
    "Juniper",
    "Kingsbridge",
    "Larkspur",
    "Meridian",
    "Northstar",
    "Orchard",
    "Pinecrest",
    "Quarry Hill",
    "Redwood",
    "Seabright",
    "Trailhead",
    "Union Square",
    "Valley Forge",
    "Westbrook",
    "Yellowstone",
]
_NAME_TAILS = [
    "Inc.",
    "LLC",
    "Ltd",
    "Group",
    "Holdings",
    "Partners",
    "Corporation",
    "Co.",
    "Systems",
    "Logistics",
    "Health",
    "Financial",
    "Energy",
    "Retail",
    "Manufacturing",
    "Insurance",
    "Software",
    "Foods",
    "Media",
    "Capital",
]
_PRODUCTION_INSTANCES = [("NA", 100, 250), ("EU", 10, 50), ("AP", 10, 30), ("USA", 100, 900)]

# (version, name, release state, deprecated, share of subscribers on it)
_BILLING_VERSIONS = [
    ((1, 0, 0), "Winter '25", "Released", False, 0.12),
    ((1, 1, 0), "Spring '25", "Released", False, 0.18),
    ((1, 2, 0), "Summer '25", "Released", False, 0.25),
    ((1, 2, 1), "Summer '25 Patch 1", "Released", True, 0.10),
    ((1, 3, 0), "Winter '26", "Released", False, 0.25),
    ((1, 4, 0), "Spring '26", "Released", False, 0.10),
    ((1, 5, 0), "Summer '26", "Beta", False, 0.0),  # nobody runs a beta in a subscriber org
]
_INSIGHTS_VERSIONS = [
    ((2, 0, 0), "Insights Launch", "Released", False, 0.8),
    ((2, 1, 0), "Insights Refresh", "Released", False, 0.2),
]
INSIGHTS_SUBSCRIBERS = 50
_BLOCKED_REASONS = [
    "Push upgrades are blocked for this organization",
    "The subscriber has blocked push upgrades for this package",
    "This organization is locked and can't receive push upgrades",
]
_SEED_EPOCH = datetime(2024, 10, 1, 9, 0, tzinfo=UTC)


@dataclass
class SeedData:
    packages: list[Row] = field(default_factory=list)
    versions: list[Row] = field(default_factory=list)
    subscribers: list[Row] = field(default_factory=list)
    refused_org_keys: dict[str, str] = field(default_factory=dict)


def _weighted(rng: random.Random, choices: list[tuple[Any, float]]) -> Any:
    values, weights = zip(*choices, strict=True)
    return rng.choices(values, weights=weights)[0]


def _org_keys(rng: random.Random) -> Iterator[str]:
    """Unique 15-character org ids (00D + pod + zeros + a base62 tail)."""
    seen: set[str] = set()
    pods = ["5f", "8c", "Dn", "Ho", "Kj", "Rb", "Ws", "3a", "1U", "0E"]
    while True:
        key = f"00D{rng.choice(pods)}0000{_base62(rng.randrange(62**6), 6)}"
        if key not in seen:
            seen.add(key)
            yield key


def _company_names(rng: random.Random) -> Iterator[str]:
    yield from _NOTABLE_NAMES
    while True:
        yield f"{rng.choice(_NAME_HEADS)} {rng.choice(_NAME_TAILS)}"


def _package(ids: IdFactory, name: str, namespace: str, created: datetime) -> Row:
    return {
        "Id": ids.new("MetadataPackage"),
        "Name": name,
        "NamespacePrefix": namespace,
        "PackageCategory": "Package",
        "SystemModstamp": format_sf_datetime(created),
    }


def _versions(ids: IdFactory, package: Row, specs: list[Any], start: datetime) -> list[Row]:
    rows = []
    for build, (numbers, name, state, deprecated, _share) in enumerate(specs, start=1):
        major, minor, patch = numbers
        stamp = start + timedelta(days=91 * (build - 1))
        rows.append(
            {
                "Id": ids.new("MetadataPackageVersion"),
                "Name": name,
                "MetadataPackageId": package["Id"],
                "ReleaseState": state,
                "MajorVersion": major,
                "MinorVersion": minor,
                "PatchVersion": patch,
                "BuildNumber": build,
                "IsDeprecated": deprecated,
                "SystemModstamp": format_sf_datetime(stamp),
            }
        )
    return rows


@dataclass
class _SubscriberFactory:
    rng: random.Random
    ids: IdFactory
    names: Iterator[str]

    def row(self, *, package: Row, version: Row, org_key: str, name: str, org_type: str, parent: str | None) -> Row:
        rng = self.rng
        status = _weighted(rng, [("Active", 75), ("Trial", 10), ("Demo", 3), ("Inactive", 12)])
        if org_type == "Sandbox":
            instance = f"CS{rng.randint(1, 220)}"
        else:
            region, low, high = rng.choice(_PRODUCTION_INSTANCES)
            instance = f"{region}{rng.randint(low, high)}"
        return {
            "Id": self.ids.new("PackageSubscriber"),
            "OrgKey": org_key,
            "OrgName": name,
            "OrgType": org_type,
            "OrgStatus": status,
            "InstalledStatus": "i" if rng.random() < 0.95 else "u",
            "InstanceName": instance,
            "MetadataPackageId": package["Id"],
            "MetadataPackageVersionId": version["Id"],
            "ParentOrg": parent,
            "SystemModstamp": format_sf_datetime(_SEED_EPOCH + timedelta(days=rng.randint(0, 600))),
        }


def _version_picker(rng: random.Random, versions: list[Row], specs: list[Any]) -> Any:
    weighted = [(row, spec[4]) for row, spec in zip(versions, specs, strict=True) if spec[4] > 0]
    return lambda: _weighted(rng, weighted)


def _billing_subscribers(
    factory: _SubscriberFactory, package: Row, versions: list[Row], count: int, keys: Iterator[str]
) -> list[Row]:
    rng = factory.rng
    pick_version = _version_picker(rng, versions, _BILLING_VERSIONS)
    productions = round(count * 0.6)
    rows: list[Row] = []
    for _ in range(productions):
        rows.append(
            factory.row(
                package=package,
                version=pick_version(),
                org_key=next(keys),
                name=next(factory.names),
                org_type="Production",
                parent=None,
            )
        )
    for _ in range(count - productions):
        parent = rng.choice(rows[:productions]) if productions else None
        rows.append(
            factory.row(
                package=package,
                version=pick_version(),
                org_key=next(keys),
                name=parent["OrgName"] if parent else next(factory.names),
                org_type="Sandbox",
                parent=parent["OrgKey"] if parent else None,
            )
        )
    # Keep the notable names near the top of an unordered query, sandboxes mixed in after.
    head, tail = rows[: len(_NOTABLE_NAMES)], rows[len(_NOTABLE_NAMES) :]
    rng.shuffle(tail)
    return head + tail


def _insights_subscribers(
    factory: _SubscriberFactory, package: Row, versions: list[Row], billing: list[Row], keys: Iterator[str]
) -> list[Row]:
    """Acme Insights shares some customers with Acme Billing, so queries must filter by package."""
    rng = factory.rng
    pick_version = _version_picker(rng, versions, _INSIGHTS_VERSIONS)
    shared = rng.sample(
        [row for row in billing if row["OrgType"] == "Production"],
        k=min(30, sum(row["OrgType"] == "Production" for row in billing)),
    )
    rows = [
        factory.row(
            package=package,
            version=pick_version(),
            org_key=row["OrgKey"],
            name=row["OrgName"],
            org_type="Production",
            parent=None,
        )
        for row in shared
    ]
    while len(rows) < INSIGHTS_SUBSCRIBERS:
        rows.append(
            factory.row(
                package=package,
                version=pick_version(),
                org_key=next(keys),
                name=next(factory.names),
                org_type="Production",
                parent=None,
            )
        )
    return rows


def _blocked_orgs(subscribers: list[Row], newest_release: Row) -> dict[str, str]:
    """A few eligible-looking production orgs whose push jobs Salesforce refuses."""
    eligible = [
        row
        for row in subscribers
        if row["OrgType"] == "Production"
        and row["OrgStatus"] == "Active"
        and row["InstalledStatus"] == "i"
        and row["MetadataPackageVersionId"] != newest_release["Id"]
    ]
    return {row["OrgKey"]: reason for row, reason in zip(eligible[-3:], _BLOCKED_REASONS, strict=False)}


def generate_seed(*, seed: int, subscriber_count: int, ids: IdFactory) -> SeedData:
    """The packaging org's packages, versions and subscribers, the same for the same seed."""
    rng = random.Random(seed)
    data = SeedData()
    billing = _package(ids, "Acme Billing", "acmebill", _SEED_EPOCH)
    insights = _package(ids, "Acme Insights", "acmeins", _SEED_EPOCH + timedelta(days=200))
    billing_versions = _versions(ids, billing, _BILLING_VERSIONS, _SEED_EPOCH)
    insights_versions = _versions(ids, insights, _INSIGHTS_VERSIONS, _SEED_EPOCH + timedelta(days=200))
    data.packages = [billing, insights]
    data.versions = billing_versions + insights_versions
    factory = _SubscriberFactory(rng, ids, _company_names(rng))
    keys = _org_keys(rng)
    billing_subscribers = _billing_subscribers(factory, billing, billing_versions, subscriber_count, keys)
    insights_subscribers = _insights_subscribers(factory, insights, insights_versions, billing_subscribers, keys)
    data.subscribers = billing_subscribers + insights_subscribers
    data.refused_org_keys = _blocked_orgs(billing_subscribers, billing_versions[5])
    return data


# --------------------------------------------------------------------------- push errors


@dataclass(frozen=True)
class PushErrorKind:
    """One PackagePushError ErrorType: how often it happens, whether a retry can fix it, and
    the texts Salesforce shows for it (title, message, details; {package}/{org}/{version} filled in,
    and {error_id}: the per-org number Salesforce puts in an unexpected failure). Texts keep the
    blank lines Salesforce stores in them."""

    error_type: str
    weight: float
    retry_failure_rate: float  # chance the same org fails again on the next attempt
    texts: tuple[tuple[str, str, str], ...]


PUSH_ERROR_KINDS: tuple[PushErrorKind, ...] = (
    PushErrorKind(
        "LockingFailure",
        20,
        0.1,
        (
            (
                "Record locking failure",
                "UNABLE_TO_LOCK_ROW: unable to obtain exclusive access to this record",
                "Another process was updating acmebill__Invoice__c records in {org} while the upgrade ran.",
            ),
        ),
    ),
    PushErrorKind(
        "ApexTestFailure",
        15,
        0.5,
        (
            (
                "Apex test failure",
                "Test failure: InvoiceTriggerTest.testBulkInsert\n\n\n   1 of 12 test methods failed.\n\n",
                "System.AssertException: Assertion Failed: Expected: 200, Actual: 199. "
                "Class.acmebill.InvoiceTriggerTest.testBulkInsert: line 42, column 1",
            ),
        ),
    ),
    PushErrorKind(
        "DeployError",
        12,
        0.5,
        (
            (
                "Deployment error",
                "Field acmebill__Invoice__c.acmebill__TaxRegion__c: Picklist value 'EMEA' already exists",
                "The subscriber added a value with the same API name to a packaged picklist.",
            ),
            (
                "Deployment error",
                "Validation rule acmebill__Invoice__c.Require_PO is invalid",
                "Field PO_Number__c referenced by the packaged validation rule was deleted in {org}.",
            ),
        ),
    ),
    PushErrorKind(
        "UnclassifiedError",
        12,
        0.1,
        (
            (
                "Internal server error",
                "An unexpected error occurred. Please include this ErrorId if you contact support: {error_id}",
                "The upgrade of {package} stopped unexpectedly.",
            ),
        ),
    ),
    PushErrorKind(
        "IneligibleUpgrade",
        12,
        1.0,
        (
            (
                "Ineligible upgrade",
                "The subscriber's license for {package} has expired",
                "Push upgrades need an active license; the subscription of {org} ended.",
            ),
            (
                "Ineligible upgrade",
                "The package was uninstalled from the subscriber org",
                "{package} is no longer installed in {org}.",
            ),
        ),
    ),
    PushErrorKind(
        "FeatureMissing",
        10,
        1.0,
        (
            (
                "Required feature missing",
                "Multi-Currency must be enabled to install this version",
                "Version {version} of {package} depends on Multi-Currency, which {org} doesn't have.",
            ),
        ),
    ),
    PushErrorKind(
        "LimitExceeded",
        10,
        0.1,
        (
            (
                "Org limit exceeded",
                "Maximum number of custom fields (800) on Account exceeded",
                "The upgrade adds 3 custom fields to Account; {org} has 799.",
            ),
        ),
    ),
    PushErrorKind(
        "PACError",
        9,
        0.5,
        (
            (
                "Package access error",
                "Package Access Control blocked access to Account.AnnualRevenue",
                "The new version reads a field that the subscriber has not granted to the package.",
            ),
        ),
    ),
)
