"""A real browser opens the OpenAPI page with no internet access and sees every operation.

Headless Chromium (Debian's ``chromium`` package) renders the page; every host but 127.0.0.1
resolves to nothing, so a page that needed a CDN would stay blank. Chromium's network log then
shows that the page itself asked for nothing but the service's own URLs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

OPERATIONS = {
    "/health", "/ready", "/metrics", "/models", "/models/{model_name}",
    "/models/{model_name}/versions", "/predict",
    "/predict/{model_name}", "/predict-batch", "/predict-batch/{model_name}",
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}",
    "/v2/models/{model_name}/versions/{model_version}", "/v2/models/{model_name}/ready",
    "/v2/models/{model_name}/versions/{model_version}/ready", "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{model_version}/infer",
}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed for this test: `apt-get install -y chromium`")


def _render(url: str, workdir: Path) -> tuple[str, Path]:
    """The DOM of ``url`` after its scripts ran, and Chromium's network log."""
    net_log = workdir / "net-log.json"
    done = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={workdir / 'profile'}",
            # Offline: no name resolves except the service's address.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--log-net-log={net_log}", "--virtual-time-budget=10000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, net_log


def _page_requests(net_log: Path) -> set[str]:
    """The URLs the page asked for (not Chromium's own background requests)."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return {
        params["url"]
        for event in log["events"]
        if event["type"] == start_job and "url" in (params := event.get("params", {}))
        # Requests made for the page are keyed to its site; the browser's own are not.
        and "127.0.0.1" in params.get("network_isolation_key", "")
    }


@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_openapi_page_renders_offline(live_service, tmp_path, page):
    dom, net_log = _render(f"{live_service.url}{page}", tmp_path)

    assert "swagger-ui" in dom, dom[:2000]
    shown = set(re.findall(r'data-path="([^"]+)"', dom))
    assert shown == OPERATIONS, f"operations listed on the page: {sorted(shown)}"

    requested = _page_requests(net_log)
    assert f"{live_service.url}/static/swagger-ui/swagger-ui-bundle.js" in requested
    external = {url for url in requested if not url.startswith(f"{live_service.url}/")}
    assert not external, f"the page requested other hosts: {sorted(external)}"
