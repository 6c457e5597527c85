"""The unit tier: fusecache's parts without FUSE, root or servers, so it runs as any user, and skips nothing.

Store, peer protocol (over loopback), admission policy and the FUSE operations
called directly. A skip here would hide a part that only root can test: it
fails instead, and the test belongs in tests/ with a marker for what it needs.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a unit test must run anywhere, but this one skipped: {reason}"
    return report
