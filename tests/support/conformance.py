"""The Durable Streams server conformance suite, run as its authors run it: vitest, against a URL.

The suite is an npm package, pinned with its lockfile in ``tests/system/durable_streams/``. It is installed
(``npm ci``) into a cache folder outside the work tree, named after the lockfile's digest, so a second run
installs nothing and a new pin installs afresh. ``TOKENFAN_CONFORMANCE_CACHE`` moves that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SUITE_PACKAGE", "ConformanceResult", "install_suite", "run_suite"]

SUITE_PACKAGE = "@durable-streams/server-conformance-tests"
_PINNED = Path(__file__).resolve().parent.parent / "system" / "durable_streams"
_RUNNER = (
    f'import {{ runConformanceTests }} from "{SUITE_PACKAGE}"\n'
    "runConformanceTests({ baseUrl: process.env.CONFORMANCE_TEST_URL })\n"
)


@dataclass
class ConformanceResult:
    """What one run of the suite said: test names by outcome, and its failure messages."""

    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _cache_folder() -> Path:
    lock = (_PINNED / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock).hexdigest()[:16]
    base = os.environ.get("TOKENFAN_CONFORMANCE_CACHE") or str(Path.home() / ".cache" / "tokenfan")
    return Path(base) / f"durable-streams-conformance-{digest}"


def install_suite() -> Path:
    """The folder holding the pinned suite, installing it the first time (needs npm and the registry)."""
    folder = _cache_folder()
    marker = folder / "node_modules" / SUITE_PACKAGE / "package.json"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(_PINNED / name, folder / name)
        npm = shutil.which("npm") or "npm"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=folder,
            check=True,
            capture_output=True,
            timeout=300,
        )
    (folder / "conformance.test.mjs").write_text(_RUNNER)
    return folder


def run_suite(folder: Path, base_url: str, *, timeout: float) -> ConformanceResult:
    """Run every test of the suite against `base_url`; its results, test by test."""
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    vitest = folder / "node_modules" / ".bin" / "vitest"
    args = [str(vitest), "run", "conformance.test.mjs", "--reporter=json", f"--outputFile={report}"]
    env = {**os.environ, "CONFORMANCE_TEST_URL": base_url, "CI": "true"}
    subprocess.run(args, cwd=folder, env=env, capture_output=True, timeout=timeout, check=False)
    result = ConformanceResult()
    for module in json.loads(report.read_text())["testResults"]:
        for test in module["assertionResults"]:
            name, status = test["fullName"], test["status"]
            if status == "passed":
                result.passed.append(name)
            elif status == "failed":
                result.failed[name] = (test.get("failureMessages") or [""])[0].splitlines()[0][:300]
            else:
                result.skipped.append(name)
    return result
