"""Signing in to the dashboard with Keystone tokens, on a real platform in OpenStack mode (``auth = keystone``).

The platform validates tokens with keystonemiddleware against the test cloud's Keystone, as in
test_openstack_platform.py; here a browser-like ``requests.Session`` uses the dashboard's own form: it fetches
the form, sends its CSRF token with the Keystone token, and follows the redirect. No training is needed.
"""

from __future__ import annotations

import re
import uuid

import pytest
import requests

from tests.harness import start_platform
from tests.openstack.settings import openstack_environment

pytestmark = pytest.mark.integration

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module")
def platform(test_cloud, tmp_path_factory, database_url):
    import kombu

    from tests.conftest import AMQP_URL

    queue = f"cloudml-dash-ks-{uuid.uuid4().hex[:8]}"
    with start_platform(tmp_path_factory.mktemp("keystone-dashboard"), database_url=database_url,
                        broker_url=AMQP_URL, task_queue=queue, stop_grace_seconds=2,
                        local_address_prefix="127.16", local_port_base=25500,
                        **openstack_environment(test_cloud)) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


def sign_in(platform, token: str) -> tuple[requests.Session, requests.Response]:
    """Fetch the sign-in form, post the token with the form's CSRF token; the session and the final page."""
    browser = requests.Session()
    form = browser.get(f"{platform.base_url}/dashboard/login?next=/dashboard/project/jobs", timeout=60)
    assert form.status_code == 200, form.text
    assert "Keystone token" in form.text  # the form says what to paste in OpenStack mode
    csrf = CSRF_FIELD.search(form.text).group(1)
    answer = browser.post(f"{platform.base_url}/dashboard/login", timeout=60,
                          data={"csrf_token": csrf, "token": token, "next": "/dashboard/project/jobs"})
    return browser, answer


def test_a_project_member_signs_in_with_a_keystone_token_and_sees_its_jobs(platform, test_cloud):
    token = test_cloud.connect("cloudml-os").auth_token  # a member of project cloudml
    browser, page = sign_in(platform, token)
    assert page.status_code == 200, page.text
    assert page.url.endswith("/dashboard/project/jobs")
    assert [r.status_code for r in page.history] == [302]
    assert 'id="jobs-table"' in page.text or 'id="jobs-rows"' in page.text
    assert re.search(r'id="signed-in-as"[^>]*>\s*cloudml / member', page.text), page.text
    assert token not in page.text  # the token stays in the signed session cookie, never in a page
    assert 'id="nav-admin"' not in page.text
    # The session carries on: another page, then sign-out ends it.
    models = browser.get(f"{platform.base_url}/dashboard/project/models", timeout=60)
    assert models.status_code == 200 and models.url.endswith("/dashboard/project/models")
    csrf = CSRF_FIELD.search(models.text).group(1)
    browser.post(f"{platform.base_url}/dashboard/logout", data={"csrf_token": csrf}, timeout=60)
    again = browser.get(f"{platform.base_url}/dashboard/project/jobs", timeout=60)
    assert "/dashboard/login" in again.url


def test_a_readers_keystone_token_signs_in_but_is_refused_the_admin_panels(platform, test_cloud):
    # carol is a reader of team-a: the API calls Keystone's reader role a viewer.
    browser, page = sign_in(platform, test_cloud.connect("carol").auth_token)
    assert page.status_code == 200, page.text
    assert re.search(r'id="signed-in-as"[^>]*>\s*team-a / viewer', page.text), page.text
    for panel in ("overview", "tokens", "clusters"):
        refused = browser.get(f"{platform.base_url}/dashboard/admin/{panel}", timeout=60)
        assert refused.status_code == 403, panel
        assert "platform admins" in refused.text
    # Its project's pages work; acting is the API's to refuse (a reader may not create a model).
    models = browser.get(f"{platform.base_url}/dashboard/project/models", timeout=60)
    assert models.status_code == 200
    csrf = CSRF_FIELD.search(models.text).group(1)
    created = browser.post(f"{platform.base_url}/dashboard/project/models", timeout=60,
                           data={"csrf_token": csrf, "name": "reader_model"})
    assert created.status_code == 200
    assert re.search(r'alert-danger[^>]*>[^<]*(permission|not allowed|role)', created.text, re.I), created.text
    assert 'data-model="reader_model"' not in created.text and "/models/reader_model" not in created.text


def test_a_bad_keystone_token_is_refused_with_a_message(platform, test_cloud):
    for token in ("not-a-keystone-token", "gAAAAAB" + "x" * 150):
        browser, page = sign_in(platform, token)
        assert page.status_code == 401, page.text
        assert re.search(r'id="login-error"[^>]*>\s*Sign-in refused: \S', page.text), page.text
        assert token not in page.text
        jobs = browser.get(f"{platform.base_url}/dashboard/project/jobs", timeout=60)
        assert "/dashboard/login" in jobs.url  # no session was made
    browser, page = sign_in(platform, "")
    assert page.status_code == 401 and "Enter a token." in page.text
