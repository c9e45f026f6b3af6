"""Policy test results as JUnit XML (one testsuite per cases file), for CI test reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from telemetry_guard.policy.cases import CaseFileResult


def junit_xml(results: Sequence[CaseFileResult], policy: str) -> str:
    root = ET.Element("testsuites", name=f"telemetry-guard test {policy}")
    total = failures = 0
    seconds = 0.0
    for file_result in results:
        suite_seconds = sum(r.seconds for r in file_result.results)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=file_result.file,
            tests=str(len(file_result.results)),
            failures=str(file_result.failed),
            errors="0",
            skipped="0",
            time=f"{suite_seconds:.6f}",
        )
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="policy", value=policy)
        for r in file_result.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=Path(file_result.file).stem,
                name=r.case.name,
                file=r.case.file,
                line=str(r.case.line),
                time=f"{r.seconds:.6f}",
            )
            if not r.passed:
                failure = ET.SubElement(case, "failure", message=r.failures[0], type="PolicyCaseFailure")
                failure.text = "\n".join([*r.failures, *r.diff])
        total += len(file_result.results)
        failures += file_result.failed
        seconds += suite_seconds
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("time", f"{seconds:.6f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
