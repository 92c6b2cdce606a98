"""The estate view in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) loads ``p2pfs web`` of a three-host lab estate.

``p2pfs web`` runs on this machine's loopback and reaches the admin's daemon through
its control socket (a file: no network namespace between them); the daemons run in
the lab's hosts and tell the admin their summaries over the peer protocol.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import file_sha256, require_lab

from p2pfs.lab.estate import EstateLab, estate_lab, wait_until_meshed

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTEFACTS = Path(os.environ.get("P2PFS_ARTEFACTS", Path(__file__).parent.parent / "build"))


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, DRIVER) if not os.access(p, os.X_OK)]
    if missing:
        why = f"{', '.join(missing)} missing (apt install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EstateLab]:
    require_lab()
    _require_browser()
    work = tmp_path_factory.mktemp("web")
    tree = work / "tree"
    tree.mkdir()
    (tree / "data.bin").write_bytes(os.urandom(3 << 20))
    with estate_lab(work, ["a", "b", "c"]) as lab:
        lab.publish(tree)
        lab.admin.configure(site="hq")
        lab.start_all()
        wait_until_meshed(lab.nodes)
        yield lab


@pytest.fixture
def web(estate: EstateLab) -> Iterator[str]:
    argv = [sys.executable, "-m", "p2pfs", "--home", str(estate.admin.home), "web"]
    log = estate.workdir / "web.log"
    with (
        open(log, "wb") as err,
        subprocess.Popen(
            [*argv, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=err, text=True
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("estate view on http://127.0.0.1:"), (line, log.read_text())
            yield line.split(" on ", 1)[1].strip()
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _rows(driver: object) -> dict[str, dict[str, str]]:
    """Each node row of the page: node id -> its state and its text."""
    from selenium.webdriver.common.by import By

    out = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "tr.node"):  # type: ignore[attr-defined]
        out[row.get_attribute("data-node")] = {
            "state": row.get_attribute("data-state"),
            "text": row.text,
        }
    return out


def _load_until(driver: object, url: str, what: str, ok: object, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        driver.get(url)  # type: ignore[attr-defined]
        rows = _rows(driver)
        if ok(rows):  # type: ignore[operator]
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}: {rows}")
        time.sleep(1)


def test_the_estate_view_shows_every_node_and_a_stopped_daemon(
    estate: EstateLab, web: str, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    _, b, c = estate.nodes
    ids = {n.name: n.node_id() for n in estate.nodes}
    # Bytes through a peer's mount, so the chart and the sources have something to show.
    assert file_sha256(b.mountpoint / "tools" / "data.bin") == file_sha256(
        estate.workdir / "tree" / "data.bin"
    )

    def everyone_told(rows: dict[str, dict[str, str]]) -> bool:
        return set(rows) == set(ids.values()) and all(
            "no summary heard" not in r["text"] for r in rows.values()
        )

    rows = _load_until(browser, web, "every node's summary", everyone_told)
    assert rows[ids["a"]]["state"] == "this node"
    assert rows[ids["b"]]["state"] == rows[ids["c"]]["state"] == "connected"
    for name, node_id in ids.items():
        text = rows[node_id]["text"]
        assert name in text.split()[0] and "tools" in text, text
    assert "hq" in rows[ids["a"]]["text"]
    page = browser.find_element(By.ID, "volumes").text  # type: ignore[attr-defined]
    assert page == "tools"
    # b read 3 MiB from peers or the origin: the chart has bars.
    assert browser.find_elements(By.CSS_SELECTOR, "#chart rect")  # type: ignore[attr-defined]

    c.stop()
    rows = _load_until(
        browser,
        web,
        "c's daemon gone",
        lambda rows: rows.get(ids["c"], {}).get("state") not in (None, "connected"),
    )
    assert rows[ids["b"]]["state"] == "connected"
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "estate-view.png"
    assert browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000
    errors = [
        e
        for e in browser.get_log("browser")  # type: ignore[attr-defined]
        if e.get("level") == "SEVERE"
    ]
    assert errors == [], errors
    # The same view as JSON, for scripts.
    browser.get(web + "estate.json")  # type: ignore[attr-defined]
    assert ids["c"] in browser.page_source  # type: ignore[attr-defined]
    c.start()  # for whoever uses the estate next
