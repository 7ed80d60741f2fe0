"""The dashboard's object browser in Debian's Chromium: folders, downloads (streamed through the dashboard from
the objects API), deletions and the API's refusal shown to a viewer."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import screenshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def page(browser, dashboard_platform, team_a) -> Page:
    for name, data in (("data/regression/train-00000.csv", b"x,y\n1,5\n"),
                       ("data/regression/train-00001.csv", b"x,y\n2,8\n"), ("data/README", b"read me"),
                       ("notes.txt", b"top level")):
        assert team_a.request("PUT", f"/objects/{name}", data=data).status_code == 200
    return browser.signed_in(dashboard_platform.token("team-a", "member"))


def test_a_user_browses_downloads_and_deletes_objects(page, team_a):
    page.goto("/dashboard/project/objects")
    table = page.locator("#objects-table")
    # Other tests of the session leave the project's packages/ and jobs/ folders beside these.
    expect(table.locator("tr.object-folder", has_text="data/")).to_have_text(["data/ Delete"])
    expect(table.locator("tr.object-file")).to_contain_text(["notes.txt"])
    table.locator("tr.object-folder a", has_text="data/").click()
    table.locator("tr.object-folder a", has_text="regression/").click()
    expect(page.locator("#object-path")).to_contain_text("regression")
    expect(table.locator("tr.object-file")).to_have_count(2)
    expect(table.locator("tr.object-file").first).to_contain_text("store://team-a/data/regression/train-00000.csv")
    screenshot(page, "objects")
    with page.expect_download() as download:
        table.locator("tr.object-file a", has_text="train-00001.csv").click()
    assert download.value.suggested_filename == "train-00001.csv"
    assert open(download.value.path(), "rb").read() == b"x,y\n2,8\n"

    table.locator("tr.object-file", has_text="train-00000.csv").locator("button").click()
    expect(page.locator(".alert-success")).to_contain_text("data/regression/train-00000.csv deleted")
    expect(table.locator("tr.object-file")).to_have_count(1)
    assert team_a.request("GET", "/objects/data/regression/train-00000.csv").status_code == 404
    page.locator("#object-path a", has_text="data").click()
    table.locator("tr.object-folder", has_text="regression/").locator("button").click()
    expect(page.locator(".alert-success")).to_contain_text("Folder data/regression/ deleted")
    assert team_a.request("GET", "/objects", params={"prefix": "data/regression/"}).json()["objects"] == []


def test_a_viewer_sees_the_apis_refusal(browser, dashboard_platform, team_a):
    team_a.request("PUT", "/objects/kept.txt", data=b"kept")
    viewer = browser.signed_in(dashboard_platform.token("team-a", "viewer"))
    viewer.goto("/dashboard/project/objects")
    viewer.locator("#objects-table tr.object-file", has_text="kept.txt").locator("button").click()
    expect(viewer.locator(".alert-danger")).to_be_visible()
    assert team_a.request("GET", "/objects/kept.txt").content == b"kept"
