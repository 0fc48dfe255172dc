"""The small UI (``/ui/``) in a real browser: Debian's Chromium driven by Playwright (installed by
scripts/test.sh; ``playwright install`` is never run). What an operator does with it: see what
the gateway holds and whether publishing works, find studies, and get a clear message when a
query or a cohort cannot be answered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import GatewayProcess, c_store_all
from fhir_servers import NARROW_CLIENT, Sekmet
from samples import fresh_copies

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed: run scripts/test.sh (it installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened = browser.new_page()
    yield opened
    opened.close()


def test_the_ui_shows_holdings_finds_studies_and_says_why_a_query_fails(
        make_gateway: Callable[..., GatewayProcess], page: Page, tmp_path: Path) -> None:

    gateway = make_gateway().start()
    files = fresh_copies(tmp_path, 3)
    study_uid = c_store_all(gateway, files)
    patient_id = str(pydicom.dcmread(files[0]).PatientID)

    page.goto(f"{gateway.base_url}/")  # the root leads to the UI
    expect(page.locator("#ae")).to_have_text(gateway.ae_title)
    expect(page.locator("[data-count=instances]")).to_have_text("3")
    expect(page.locator("[data-count=studies]")).to_have_text("1")
    expect(page.locator("#publishing")).to_contain_text("off")

    page.fill("#find [name=PatientID]", patient_id)
    page.click("#find button")
    expect(page.locator("#find-status")).to_have_text("1 study")
    row = page.locator("#studies tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(6)).to_have_text("3")
    expect(row.locator("td").nth(7)).to_have_text(study_uid)

    page.fill("#find [name=PatientID]", "")
    page.fill("#find [name=StudyDate]", "2024-01-01")  # not a DICOM date (DA is YYYYMMDD)
    page.click("#find button")
    expect(page.locator("#find-status")).to_have_class("error")
    expect(page.locator("#find-status")).to_contain_text("StudyDate")
    expect(page.locator("#studies")).to_be_hidden()


def test_a_cohort_the_gateway_cannot_evaluate_gets_the_reason_not_an_empty_result(
        make_gateway: Callable[..., GatewayProcess], page: Page) -> None:
    gateway = make_gateway().start()  # no FHIR server configured
    page.goto(f"{gateway.base_url}/ui/")
    page.fill("#cohort [name=name]", "osteosarcoma")
    page.fill("#cohort [name=fhir]", "Condition?code=http://snomed.info/sct|307576001")
    page.click("#cohort button")
    expect(page.locator("#cohort-status")).to_have_class("error")
    expect(page.locator("#cohort-status")).to_contain_text("FHIR")
    expect(page.locator("#cohorts")).to_be_hidden()


def test_text_from_the_archive_is_shown_as_text_never_as_markup(
        make_gateway: Callable[..., GatewayProcess], page: Page, tmp_path: Path) -> None:

    gateway = make_gateway().start()
    (path,) = fresh_copies(tmp_path, 1)
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "<img src=x onerror=document.title='owned'>"
    ds.save_as(path)
    c_store_all(gateway, [path])
    page.goto(f"{gateway.base_url}/ui/")
    page.click("#find button")
    cell = page.locator("#studies tbody tr td").nth(4)
    expect(cell).to_have_text("<img src=x onerror=document.title='owned'>")
    assert page.title() == "imaging-gateway"
    assert page.locator("#studies img").count() == 0


def test_a_page_of_another_site_cannot_make_a_browser_change_anything(
        make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    gateway = make_gateway().start()
    (path,) = fresh_copies(tmp_path, 1)
    study_uid = c_store_all(gateway, [path])
    cross_site = {"Sec-Fetch-Site": "cross-site"}  # what a browser sends for another site's page
    gone = requests.delete(f"{gateway.dicomweb}/studies/{study_uid}", headers=cross_site,
                           timeout=10)
    assert gone.status_code == 403 and "another site" in gone.json()["error"]
    replay = f"{gateway.base_url}/api/publish/replay"
    assert requests.post(replay, headers=cross_site, json={}, timeout=10).status_code == 403
    form = requests.post(replay, data="study=1.2.3", timeout=10,  # what a plain form sends
                         headers={"Content-Type": "text/plain"})
    assert form.status_code == 415
    assert requests.post(replay, json={}, timeout=10).json() == {"queued": 0}
    same_site = requests.get(f"{gateway.dicomweb}/studies", headers=cross_site, timeout=10)
    assert same_site.status_code == 200 and len(same_site.json()) == 1  # reading is fine


def test_a_study_the_fhir_server_refused_is_listed_with_why_and_can_be_published_again(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, page: Page,
        tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(sekmet.narrow_secret.reveal())
    gateway = make_gateway(extra={  # a client whose scopes do not allow writing ImagingStudy
        "fhir": {"base_url": sekmet.base_url, "auth": "client_credentials",
                 "client_id": NARROW_CLIENT, "auth_method": "client_secret_basic",
                 "client_secret_file": str(secret), "ca_bundle": str(sekmet.ca_file),
                 "scope": "system/Patient.rs"},
        "publish": {"quiet_seconds": 0.5, "patient_system": "urn:oid:1.2.3.4",
                    "patient_policy": "identifier"}}).start()
    (path,) = fresh_copies(tmp_path, 1)
    study_uid = c_store_all(gateway, [path])
    page.goto(f"{gateway.base_url}/ui/")
    expect(page.locator("#publishing")).to_contain_text("on:")
    for _ in range(100):  # the refusal is permanent: the study lands in the failed list
        page.reload()
        if page.locator("#failed tbody tr").count():
            break
        page.wait_for_timeout(200)
    failed = page.locator("#failed tbody tr")
    expect(failed).to_have_count(1)
    expect(failed.locator("td").nth(0)).to_have_text(study_uid)
    expect(failed.locator("td").nth(2)).to_contain_text("403")
    page.click("#replay")
    expect(page.locator("#replayed")).to_have_text("1 queued")
