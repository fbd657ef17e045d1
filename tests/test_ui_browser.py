"""`ablate ui` in a real browser: headless Chromium, driven by Selenium, against a finished study.

test_launch's tiny study of every outcome, run and reported into its default SQLite store once for the
session (tests/studies.py), is served by `ablate ui`; the browser checks what a user looks for: the
parent run in the experiment's run list, the trials nested under it, a trial's factor levels and loss
curve, and the report among the parent run's artifacts. Screenshots go to $ABLATE_TEST_ARTIFACTS
(default tests/artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import ablate_command, free_port, wait_for

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
WAIT_S = 90  # generous: the UI's bundle is large and the CI host may be busy


def artifacts_dir() -> Path:
    default = Path(__file__).resolve().parent / "artifacts"
    folder = Path(os.environ.get("ABLATE_TEST_ARTIFACTS") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(_address(address))
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:  # IPv4, little-endian
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # IPv6: four little-endian words
    return socket.inet_ntop(socket.AF_INET6, words)


@dataclass
class Served:
    url: str
    port: int
    banner: str  # what `ablate ui` printed
    experiment_id: str
    parent: object  # mlflow Run
    children: list


@pytest.fixture(scope="module")
def served(every_outcome, tmp_path_factory):
    """The finished, reported study of every outcome, served by `ablate ui` with its default host."""
    study, client = every_outcome.design.source, every_outcome.client
    experiment = client.get_experiment_by_name("concurrent")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`ablate.kind` = 'parent'")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 14  # 12 trials and the retries of the 2 raising ones

    folder = tmp_path_factory.mktemp("ui")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": "",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # the UI needs no GenAI job runner
    }
    port, log = free_port(), folder / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen(
            [*ablate_command(), "ui", str(study), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", ui, log, timeout=120)
        yield Served(url, port, log.read_text(), experiment.experiment_id, parent, children)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(10)


def chromium_paths() -> tuple[str, str]:
    """The Chromium binary and its matching chromedriver (OS packages); skip if either is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    browser = (
        os.environ.get("ABLATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    driver = os.environ.get("ABLATE_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # no driver download
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, TimeoutException
    from selenium.common.exceptions import StaleElementReferenceException as StaleElement
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(driver, WAIT_S, 0.5, ignored_exceptions=(NoSuchElementException, StaleElement))
        return wait.until(condition)
    except TimeoutException:
        shot = artifacts_dir() / "ui-failure.png"
        driver.save_screenshot(str(shot))
        pytest.fail(f"the UI did not show {what} within {WAIT_S}s (screenshot: {shot})")


def open_page(driver, served: Served, path: str) -> None:
    """Open a page of the experiment in the UI's model-training view (its default view is GenAI)."""
    driver.get(f"{served.url}/#/experiments/{served.experiment_id}/{path}?workflowType=machine_learning")


def search(driver, placeholder: str, text: str, what: str) -> None:
    """Type `text` into the page's search box with this placeholder, once the box has appeared."""
    from selenium.webdriver.common.by import By

    selector = f'input[placeholder="{placeholder}"]'
    wait_until(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector), what).send_keys(text)


def screenshot(driver, name: str) -> None:
    """Save the page as a test artifact, with the assistant side panel closed (it hides the page)."""
    from selenium.webdriver.common.by import By

    for close in driver.find_elements(By.CSS_SELECTOR, 'button[aria-label="Close"]'):
        with contextlib.suppress(Exception):
            close.click()
    time.sleep(0.5)
    driver.save_screenshot(str(artifacts_dir() / name))


def grid_rows(driver) -> dict[str, int]:
    """Run id -> row index of the rows the runs table shows (AG Grid keys its rows by run id)."""
    script = """return Array.from(document.querySelectorAll('div[role="row"][row-id]'),
                              row => [row.getAttribute('row-id'), row.getAttribute('row-index')]);"""
    return {run_id: int(index) for run_id, index in driver.execute_script(script)}


def table_cells(driver) -> list[list[str]]:
    """The cells' texts of every row of the page's plain tables (such as a run's parameters)."""
    script = """return Array.from(document.querySelectorAll('div[role="row"]'), row =>
                    Array.from(row.querySelectorAll(':scope > div[role="cell"]'), c => c.innerText.trim()));"""
    return driver.execute_script(script)


def test_ui_binds_loopback_by_default(served):
    assert f"http://127.0.0.1:{served.port}" in served.banner, served.banner
    assert listening_addresses(served.port) == {"127.0.0.1"}


def test_experiment_page_lists_the_parent_with_its_trials_nested_under_it(served, browser):
    from selenium.webdriver.common.by import By

    parent_id = served.parent.info.run_id
    open_page(browser, served, "runs")
    wait_until(browser, lambda d: parent_id in grid_rows(d), "the study's parent run")
    assert set(grid_rows(browser)) == {parent_id}, "trials should be folded under the parent run"

    name_cell = f'div[role="row"][row-id="{parent_id}"] [col-id="attributes.`Run Name`"]'
    link = browser.find_element(By.CSS_SELECTOR, f'{name_cell} a[href$="/runs/{parent_id}"]')
    assert link.text.strip() == "concurrent"
    browser.find_element(By.CSS_SELECTOR, f"{name_cell} button").click()  # expand the parent
    children = {run.info.run_id for run in served.children}
    wait_until(browser, lambda d: children <= set(grid_rows(d)), "the trials under the parent run")
    rows = grid_rows(browser)
    assert set(rows) == children | {parent_id}
    below = range(rows[parent_id] + 1, rows[parent_id] + 1 + len(children))  # right under the parent
    assert sorted(rows[c] for c in children) == list(below)
    screenshot(browser, "ui-experiment-runs.png")


def test_trial_page_shows_its_factor_levels_and_loss_curve(served, browser):
    from selenium.webdriver.common.by import By

    child = next(r for r in served.children if r.data.params["factor.metric"] == "rbf")
    levels = {k: v for k, v in child.data.params.items() if k.startswith("factor.")}
    assert set(levels) == {"factor.metric", "factor.registers"}
    open_page(browser, served, f"runs/{child.info.run_id}")
    search(browser, "Search parameters", "factor.", "the run's parameters")

    def shown_params(driver) -> dict[str, str]:
        return {c[0]: c[1] for c in table_cells(driver) if len(c) == 2 and c[0].startswith("factor.")}

    wait_until(browser, lambda d: shown_params(d) == levels, f"the factor levels {levels}")
    screenshot(browser, "ui-trial-params.png")

    open_page(browser, served, f"runs/{child.info.run_id}/model-metrics")
    search(browser, "Search metric charts", "val/loss", "the metric charts")
    legend = f"{child.info.run_name} (val/loss)"
    wait_until(browser, lambda d: legend in d.find_element(By.TAG_NAME, "body").text, f"the chart '{legend}'")
    points = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace .points path")
    assert len(points) >= 2, "the val/loss chart should plot the curve's evaluations"
    screenshot(browser, "ui-trial-val-loss.png")


def test_parent_run_artifacts_include_the_report(served, browser):
    from selenium.webdriver.common.by import By

    def node(name: str):  # the visible tree entry named `name`
        path = f"//*[normalize-space(text())='{name}']"
        return lambda d: next((e for e in d.find_elements(By.XPATH, path) if e.is_displayed()), False)

    open_page(browser, served, f"runs/{served.parent.info.run_id}/artifacts")
    wait_until(browser, node("report"), "the report folder").click()
    wait_until(browser, node("report.md"), "report/report.md")
    wait_until(browser, node("report.html"), "report/report.html").click()
    frame = wait_until(
        browser, lambda d: next(iter(d.find_elements(By.TAG_NAME, "iframe")), False), "a preview"
    )
    screenshot(browser, "ui-parent-report.png")
    browser.switch_to.frame(frame)
    try:
        heading = wait_until(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text, "the report's title")
    finally:
        browser.switch_to.default_content()
    assert heading == "concurrent: attribution"
