"""The Metadata API SOAP client against the simulated orgs over HTTP: the four calls, envelopes
and escaping, fault mapping, session refresh, retries, and the org's deployment rules."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from defusedxml import ElementTree

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.auth import TokenCache, parse_sfdx_auth_url
from bot.clients.salesforce.deploy_result import (
    DEPLOY_STATUS_PATH,
    CodeCoverageWarning,
    DeployResult,
    FlowCoverageWarning,
    deploy_status_url,
    parse_deploy_result,
)
from bot.clients.salesforce.metadata import (
    DeployOptions,
    MetadataClient,
    _fault_of,
    _result_of,
    xml_text,
)
from bot.clients.salesforce.rest import SalesforceClient
from bot.errors import AmbiguousWriteError, ApiError, TransientError
from bot.sandbox.metadata_api import MetadataApiSim, write_sample_artifacts
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.03)


@pytest.fixture
async def uat() -> AsyncIterator[SalesforceOrgSim]:
    org = SalesforceOrgSim(org_id="00D00000000UAT1", kind="sandbox", subscribers=0)
    await org.start()
    yield org
    await org.stop()


@pytest.fixture
async def prod() -> AsyncIterator[SalesforceOrgSim]:
    org = SalesforceOrgSim(org_id="00D00000000PRD1", kind="production", subscribers=0)
    await org.start()
    yield org
    await org.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, bytes]:
    names = write_sample_artifacts(tmp_path)
    return {key: (tmp_path / name).read_bytes() for key, name in names.items() if name.endswith(".zip")}


def md_for(sim: SalesforceOrgSim, session: aiohttp.ClientSession) -> MetadataClient:
    rest = SalesforceClient(session=session, tokens=TokenCache(parse_sfdx_auth_url(build_auth_url(sim))), retry=FAST)
    return MetadataClient(rest=rest, session=session, retry=FAST)


def api(sim: SalesforceOrgSim) -> MetadataApiSim:
    assert sim.metadata is not None
    return sim.metadata


async def until_done(md: MetadataClient, deploy_id: str) -> DeployResult:
    for _ in range(400):
        result = await md.check_deploy_status(deploy_id)
        if result.done:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"{deploy_id} did not finish")


def small_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_deploy_options_follow_the_wsdl_sequence_and_escape_text() -> None:
    xml = DeployOptions(check_only=True, run_tests=("A&B", "<C>"), test_level="RunSpecifiedTests").to_xml()
    order = [
        "allowMissingFiles",
        "autoUpdatePackage",
        "checkOnly",
        "ignoreWarnings",
        "performRetrieve",
        "purgeOnDelete",
        "rollbackOnError",
        "runTests",
        "singlePackage",
        "testLevel",
    ]
    positions = [xml.index(f"<met:{name}>") for name in order]
    assert positions == sorted(positions)
    assert "<met:runTests>A&amp;B</met:runTests><met:runTests>&lt;C&gt;</met:runTests>" in xml
    assert "<met:checkOnly>true</met:checkOnly>" in xml and "<met:rollbackOnError>true</met:rollbackOnError>" in xml
    with pytest.raises(ValueError):
        xml_text("bad\x00value")
    with pytest.raises(ValueError):
        DeployOptions(test_level="RunEverything").to_xml()


def test_responses_are_parsed_without_dtds_or_entities() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
        b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
        b"<deployResponse><result><id>&lol2;</id></result></deployResponse></soapenv:Body></soapenv:Envelope>"
    )
    assert _fault_of(bomb) is None
    with pytest.raises(TransientError, match="unreadable"):
        _result_of(bomb, "deploy")


async def test_deploy_reports_progress_and_every_failure(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(uat, session)
    deploy_id = await md.deploy(artifacts["failing"], DeployOptions(test_level="RunLocalTests"))
    assert deploy_id.startswith("0Af") and len(deploy_id) == 18
    seen_details: set[str] = set()
    result = await md.check_deploy_status(deploy_id)
    while not result.done:
        seen_details.add(result.state_detail.split(":")[0])
        await asyncio.sleep(0.03)
        result = await md.check_deploy_status(deploy_id)
    assert "Running Test" in seen_details
    assert result.status == "Failed" and not result.success
    assert (result.component_errors, result.components_total) == (3, 7)
    assert (result.test_errors, result.tests_total) == (2, 12)
    assert result.completed_date is not None and result.created_date is not None
    failures = {f.full_name: f for f in result.component_failures}
    assert set(failures) == {"BrokenInvoiceCalc", "BrokenTaxRule", "BrokenInvoiceTrigger"}
    calc = failures["BrokenInvoiceCalc"]
    assert (calc.file_name, calc.line, calc.problem_type) == ("classes/BrokenInvoiceCalc.cls", 5, "Error")
    assert calc.problem == "Variable does not exist: taxRate"
    tests = {t.qualified: t for t in result.test_failures}
    assert set(tests) == {"InvoiceRegressionTest.failsOnRounding", "InvoiceRegressionTest.failsOnNullCustomer"}
    assert tests["InvoiceRegressionTest.failsOnNullCustomer"].message.startswith("System.NullPointerException")
    assert tests["InvoiceRegressionTest.failsOnRounding"].stack_trace.startswith(
        "Class.InvoiceRegressionTest.failsOnRounding: line "
    )
    sent = api(uat).calls("deploy")[0].args
    assert sent["testLevel"] == "RunLocalTests" and sent["rollbackOnError"] is True and sent["checkOnly"] is False


async def test_one_deployment_runs_per_org_and_cancel_semantics(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(uat, session)
    slow = await md.deploy(artifacts["slow"], DeployOptions())
    queued = await md.deploy(artifacts["good"], DeployOptions())
    await asyncio.sleep(0.2)
    assert (await md.check_deploy_status(slow)).status == "InProgress"
    assert (await md.check_deploy_status(queued)).status == "Pending"

    # Queued: canceled at once (done=true). Running: Canceling, then Canceled.
    canceled = await md.cancel_deploy(queued)
    assert canceled.done and (await md.check_deploy_status(queued)).status == "Canceled"
    first = await md.cancel_deploy(slow)
    assert not first.done
    assert (await md.check_deploy_status(slow)).status == "Canceling"
    result = await until_done(md, slow)
    assert result.status == "Canceled"
    with pytest.raises(ApiError) as error:
        await md.cancel_deploy(slow)
    assert error.value.code == "INVALID_ID_FIELD" and "already completed" in error.value.message
    with pytest.raises(ApiError) as unknown:
        await md.check_deploy_status("0Af000000000999AAA")
    assert unknown.value.code == "INVALID_ID_FIELD"


async def test_expired_session_is_refreshed_once_and_the_call_repeated(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(uat, session)
    deploy_id = await md.deploy(artifacts["good"], DeployOptions())
    uat.expire_sessions()
    result = await until_done(md, deploy_id)
    assert result.status == "Succeeded"
    assert sum(1 for _, path in uat.calls if path.endswith("/oauth2/token")) == 2
    uat.expire_sessions()
    again = await md.deploy(artifacts["good"], DeployOptions())  # refused by the fault, so resent once
    assert again != deploy_id and len(api(uat).calls("deploy")) == 2


async def test_transient_faults_are_retried_and_ambiguous_deploys_are_not(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(uat, session)
    sim = api(uat)
    sim.fault_next("REQUEST_LIMIT_EXCEEDED", "ConcurrentRequests (Concurrent API Requests) Limit exceeded.")
    deploy_id = await md.deploy(artifacts["good"], DeployOptions())
    sim.fail_next(1, 503)
    sim.drop_next(2)  # aiohttp itself resends an idempotent-looking POST once; both dropped
    assert (await until_done(md, deploy_id)).status == "Succeeded"

    soap_posts = sum(1 for _, path in uat.calls if "/Soap/m/" in path)
    sim.fail_next(1, 500)  # an HTML 500 without a SOAP fault: did Salesforce start it? Unknown.
    with pytest.raises(AmbiguousWriteError):
        await md.deploy(artifacts["good"], DeployOptions())
    assert sum(1 for _, path in uat.calls if "/Soap/m/" in path) == soap_posts + 1
    sim.fail_next(1, 503)  # maintenance: not processed, so safe to send again
    assert await md.deploy(artifacts["good"], DeployOptions())


async def test_quick_deploy_needs_a_recent_successful_validation_with_tests(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(uat, session)
    sim = api(uat)
    no_tests = await md.deploy(artifacts["good"], DeployOptions(check_only=True))
    deployed = await md.deploy(artifacts["good"], DeployOptions(test_level="RunLocalTests"))
    validation = await md.deploy(artifacts["good"], DeployOptions(check_only=True, test_level="RunLocalTests"))
    old = await md.deploy(artifacts["good"], DeployOptions(check_only=True, test_level="RunLocalTests"))
    for deploy_id in (no_tests, deployed, validation, old):
        assert (await until_done(md, deploy_id)).status == "Succeeded"
    sim.backdate(old, days=11)

    refusals = {}
    for deploy_id in (no_tests, deployed, old):
        with pytest.raises(ApiError) as error:
            await md.deploy_recent_validation(deploy_id)
        assert error.value.code == "INVALID_ID_FIELD"
        refusals[deploy_id] = error.value.message
    assert "no Apex tests ran" in refusals[no_tests]
    assert "not a validation" in refusals[deployed]
    assert "more than 10 days old" in refusals[old]

    quick = await md.deploy_recent_validation(validation)
    result = await until_done(md, quick)
    assert quick != validation and result.status == "Succeeded" and not result.check_only
    assert result.tests_total == 0 and result.components_total == 3
    with pytest.raises(ApiError, match="already quick-deployed"):
        await md.deploy_recent_validation(validation)


async def test_production_refuses_what_the_docs_forbid(
    prod: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    md = md_for(prod, session)
    for options, fragment in [
        (DeployOptions(test_level="NoTestRun"), "NoTestRun"),
        (DeployOptions(rollback_on_error=False), "rollbackOnError"),
        (DeployOptions(purge_on_delete=True), "purgeOnDelete"),
        (DeployOptions(allow_missing_files=True), "allowMissingFiles"),
    ]:
        result = await until_done(md, await md.deploy(artifacts["good"], options))
        assert result.status == "Failed" and result.error_status_code == "INVALID_OPERATION"
        assert fragment in result.error_message
    # Production without a test level runs local tests for a package with Apex.
    result = await until_done(md, await md.deploy(artifacts["good"], DeployOptions()))
    assert result.status == "Succeeded" and result.tests_total == 8


async def test_text_from_the_request_round_trips_escaped(uat: SalesforceOrgSim, session: aiohttp.ClientSession) -> None:
    md = md_for(uat, session)
    data = small_zip({"package.xml": "<Package xmlns='http://soap.sforce.com/2006/04/metadata'/>"})
    options = DeployOptions(test_level="RunSpecifiedTests", run_tests=("Evil</met:runTests><x>&amp;",))
    result = await until_done(md, await md.deploy(data, options))
    assert result.status == "Failed"
    assert result.error_message == "No Apex test class named Evil</met:runTests><x>&amp; was found"
    assert api(uat).calls("deploy")[0].args["runTests"] == ["Evil</met:runTests><x>&amp;"]
    missing = await until_done(md, await md.deploy(small_zip({"classes/A.cls": "x"}), DeployOptions()))
    assert (missing.status, missing.error_message) == ("Failed", "No package.xml found")


async def test_coverage_only_failure_is_read_from_both_warning_lists(
    prod: SalesforceOrgSim, uat: SalesforceOrgSim, session: aiohttp.ClientSession, artifacts: dict[str, bytes]
) -> None:
    """A production validation that compiles and passes every test but leaves a class and a flow
    uncovered: Failed with no errorMessage; the reason is in runTestResult's coverage warnings."""
    options = DeployOptions(check_only=True, test_level="RunLocalTests")
    result = await until_done(md_for(prod, session), await md_for(prod, session).deploy(artifacts["coverage"], options))
    assert (result.status, result.success, result.error_message) == ("Failed", False, "")
    assert (result.components_deployed, result.components_total, result.component_errors) == (5, 5, 0)
    assert (result.tests_completed, result.tests_total, result.test_errors) == (8, 8, 0)
    assert result.component_failures == () and result.test_failures == ()
    average, uncovered = result.code_coverage_warnings
    assert average.name == "" and average.namespace == "" and average.id.startswith("01p")
    assert (average.percent, average.required) == (68.0, 75.0)
    assert average.message == (
        "Average test coverage across all Apex Classes and Triggers is 68%, at least 75% test coverage is required."
    )
    assert (uncovered.name, uncovered.kind, uncovered.percent, uncovered.required) == (
        "UncoveredInvoiceExport",
        "Apex Class",
        0.0,
        75.0,
    )
    (flow,) = result.flow_coverage_warnings
    assert (flow.flow_name, flow.flow_namespace, flow.percent) == ("Uncovered_Invoice_Reminder", "", 0.0)
    assert flow.flow_id.startswith("301")
    # Sandbox orgs do not enforce coverage: the same artifact validates there.
    md = md_for(uat, session)
    assert (await until_done(md, await md.deploy(artifacts["coverage"], options))).status == "Succeeded"


COVERAGE_RESULT = """<result xmlns="http://soap.sforce.com/2006/04/metadata"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <checkOnly>true</checkOnly>
  <details>
    <runTestResult>
      <codeCoverageWarnings><id>01p5g00000AbCdEAAV</id>
        <message>Average test coverage across all Apex Classes and Triggers is 74.5%, at least 75% test coverage
 is required.</message><name xsi:nil="true"/><namespace xsi:nil="true"/></codeCoverageWarnings>
      <codeCoverageWarnings><id>01q5g00000AbCdEAAV</id>
        <message>Test coverage of selected Apex Trigger is 0%, at least 1% test coverage is required</message>
        <name>InvoiceTrigger</name><namespace>acme</namespace><type>Trigger</type></codeCoverageWarnings>
      <failures><id>01p5g00000XyZaBAAV</id><message>System.DmlException: Insert failed</message>
        <methodName>testInsert</methodName><name>InvoiceTest</name><namespace xsi:nil="true"/>
        <stackTrace>External entry point
Class.InvoiceTest.testInsert: line 9, column 1</stackTrace></failures>
      <flowCoverageWarnings><flowId xsi:nil="true"/><flowName xsi:nil="true"/><flowNamespace xsi:nil="true"/>
        <message>Test coverage of active processes and autolaunched flows is 60%, but at least 75% is required</message>
      </flowCoverageWarnings>
      <flowCoverageWarnings><flowId>3015g000000AbCdAAK</flowId><flowName>Invoice_Reminder</flowName>
        <flowNamespace>acme</flowNamespace><message>Flow coverage is 0%</message></flowCoverageWarnings>
      <numFailures>1</numFailures><numTestsRun>49</numTestsRun><totalTime>1200</totalTime>
    </runTestResult>
  </details>
  <done>true</done><id>0Af5g00000AbCdEGAZ</id><numberComponentsDeployed>47</numberComponentsDeployed>
  <numberComponentsTotal>47</numberComponentsTotal><numberTestsCompleted>48</numberTestsCompleted>
  <numberTestErrors>1</numberTestErrors><numberTestsTotal>49</numberTestsTotal>
  <status>Failed</status><success>false</success>
</result>"""


def test_coverage_warning_fields_nils_namespaces_and_figures_are_typed() -> None:
    result = parse_deploy_result(ElementTree.fromstring(COVERAGE_RESULT))
    average, trigger = result.code_coverage_warnings
    assert average == CodeCoverageWarning(
        message="Average test coverage across all Apex Classes and Triggers is 74.5%, at least 75% test coverage\n"
        " is required.",
        id="01p5g00000AbCdEAAV",
    )
    assert (average.percent, average.required, average.qualified) == (74.5, 75.0, "")
    assert (trigger.qualified, trigger.kind, trigger.percent, trigger.required) == (
        "acme__InvoiceTrigger",
        "Apex Trigger",
        0.0,
        1.0,
    )
    org_flows, flow = result.flow_coverage_warnings
    assert (
        org_flows.flow_name == ""
        and org_flows.flow_id == ""
        and (org_flows.percent, org_flows.required)
        == (
            60.0,
            75.0,
        )
    )
    assert flow == FlowCoverageWarning(
        message="Flow coverage is 0%", flow_name="Invoice_Reminder", flow_namespace="acme", flow_id="3015g000000AbCdAAK"
    )
    assert (flow.qualified, flow.percent, flow.required) == ("acme__Invoice_Reminder", 0.0, None)
    (failure,) = result.test_failures
    assert failure.stack_trace.splitlines() == [
        "External entry point",
        "Class.InvoiceTest.testInsert: line 9, column 1",
    ]


async def test_deploy_status_url_is_built_from_the_instance_url_and_a_checked_id(
    uat: SalesforceOrgSim, session: aiohttp.ClientSession
) -> None:
    deploy_id = "0Af5g00000AbCdEGAZ"
    assert await md_for(uat, session).deploy_status_url(deploy_id) == f"{uat.url}{DEPLOY_STATUS_PATH}{deploy_id}"
    assert deploy_status_url("https://acme.my.salesforce.com/", deploy_id) == (
        "https://acme.my.salesforce.com/lightning/setup/DeployStatus/page?address=%2Fchangemgmt"
        "%2FmonitorDeploymentsDetails.apexp%3FasyncId%3D0Af5g00000AbCdEGAZ"
    )
    # Only scheme, host and port of the instance URL; anything else it might carry is dropped.
    assert deploy_status_url("https://u:p@acme.my.salesforce.com:8443/x?y#z", deploy_id).startswith(
        "https://acme.my.salesforce.com:8443/lightning/setup/DeployStatus/"
    )
    for bad_id in ("0Af5g00000AbCdEGAZ&retURL=evil", "../x", ""):
        with pytest.raises(ValueError):
            deploy_status_url("https://acme.my.salesforce.com", bad_id)
    with pytest.raises(ValueError):
        deploy_status_url("javascript:alert(1)", deploy_id)
