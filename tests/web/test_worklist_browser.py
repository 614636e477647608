"""The worklist in a real browser: headless Debian Chromium driven by Selenium through Debian's
chromedriver (no browser download), against a real node running the product pipeline with the
bundled demo model. A PE-positive and a PE-negative phantom are sent by dcmtk storescu (the negative
first); the test logs in, sees the positive study ranked above the negative one, opens its study
page with a heatmap preview that the browser actually decoded (naturalWidth > 0) under the caption
"not for diagnostic use", and runs one admin action (re-run). It writes the screenshots shown in the
README and docs/worklist.md (docs/worklist_list.png, docs/worklist_study.png) when the run passes and
`UPDATE_DOC_SCREENSHOTS=1` is in the environment (otherwise a test run leaves the checkout as it was)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.engine.node import Node
from dicom_node.log import configure_logging
from nodekit import PATIENT_ID, demo_like_studies, storescu, wait_until
from peers import free_port, needs_dcmtk
from webkit import PASSWORD, web_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[2] / "docs"
#: flags that run Debian's Chromium headless as root in a container, with nothing fetched from outside
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1360,900")

needs_chromium = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                    reason="Debian chromium and chromium-driver not installed (scripts/setup.sh)")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@needs_dcmtk
@needs_chromium
@pytest.mark.slow
def test_a_radiologist_logs_in_sees_the_positive_study_first_with_its_heatmap_and_re_runs_it(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    studies = demo_like_studies(tmp_path / "in")
    http = free_port()
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)
    cfg = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 2.0,
        "min_free_disk_mb": 0, "inference.providers": ["CPUExecutionProvider"],
        **web_config(http, users=("dr.house",), admins=("dr.house",))})
    node = Node(cfg).start()  # the product pipeline and the bundled demo model
    browser = None
    try:
        for name in ("negative", "positive"):  # the negative arrives first
            r = storescu(node.port, studies[name])
            assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        # 2 s of quiet: on a loaded machine storescu may pause longer than 0.5 s inside a series
        wait_until(lambda: len([j for j in node.state.jobs() if j.priority_class]) >= 2
                   and all(j.state.value == "done" for j in node.state.jobs()), 300, "both studies analysed")
        pos, neg = (str(pydicom.dcmread(studies[n][0], stop_before_pixels=True).StudyInstanceUID)
                    for n in ("positive", "negative"))
        browser = _browser(tmp_path / "chromium-profile")
        wait = WebDriverWait(browser, 30)
        base = f"http://127.0.0.1:{http}"

        browser.get(f"{base}/worklist")
        wait.until(ec.presence_of_element_located((By.ID, "login-form")))
        browser.find_element(By.ID, "username").send_keys("dr.house")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login-button").click()
        wait.until(ec.presence_of_element_located((By.ID, "worklist")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr.row")
        assert [r.get_attribute("data-study-uid") for r in rows] == [pos, neg]  # positive ranked first
        assert rows[0].get_attribute("data-priority") == "critical" and rows[1].get_attribute("data-priority") == "routine"
        assert PATIENT_ID in rows[0].text and "PE suspected" in rows[0].text
        browser.save_screenshot(str(tmp_path / "worklist_list.png"))

        rows[0].find_element(By.CSS_SELECTOR, "a.study-link").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "img.heatmap-img")))
        wait.until(lambda b: b.execute_script(
            "const i = document.querySelector('figure.heatmap img'); return i && i.complete && i.naturalWidth > 0;"))
        caption = browser.find_element(By.CSS_SELECTOR, "figure.heatmap figcaption").text
        assert "NOT FOR DIAGNOSTIC USE" in caption.upper() and "window" in caption
        findings = browser.find_element(By.CSS_SELECTOR, "table.findings").text
        assert "Central PE central_pe" in findings and "PE (any window)" in findings  # the clinical name, then the id
        browser.set_window_size(1360, max(900, browser.execute_script("return document.body.scrollHeight") + 40))
        browser.save_screenshot(str(tmp_path / "worklist_study.png"))

        jobs_before = len(node.state.jobs())
        browser.find_element(By.ID, "action-rerun").click()
        wait.until(ec.alert_is_present()).accept()  # "Analyse this series again?"
        message = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.message"))).text
        assert "queued to analyse it again" in message
        assert len(node.state.jobs()) == jobs_before + 1
        audit = (tmp_path / "data" / "audit.log").read_text()
        assert '"action": "rerun"' in audit and '"user": "dr.house"' in audit
    finally:
        if browser is not None:
            browser.quit()
        node.stop()
        configure_logging(json=True, level="INFO", stream=sys.__stderr__)
        log.close()
    if os.environ.get("UPDATE_DOC_SCREENSHOTS") == "1":  # a passing run asked to refresh the docs' pictures
        for shot in ("worklist_list.png", "worklist_study.png"):
            shutil.copyfile(tmp_path / shot, DOCS / shot)
