"""Security of the web worklist on a real node (in-process, the `nodekit.sc_job` stand-in model) over
real HTTP on loopback: 401 without a login, wrong passwords refused, CSRF on every state change,
admins only for actions, bearer tokens for the API, validated path and query input, secure headers,
the audit log, HTTPS with the node's certificate, and no patient identity in the operational log."""

from __future__ import annotations

import json
import ssl

import pydicom
import pytest

from dicom_node.config import ConfigError, load_config
from dicom_node.web.auth import LoginThrottle, new_token
from nodekit import PATIENT_BIRTH, PATIENT_ID, phantom_series, storescu, wait_until
from peers import free_port, needs_dcmtk
from pki import self_signed
from webkit import WebClient, csrf_of, user_entry, web_config

pytestmark = needs_dcmtk


@pytest.fixture
def analysed(make_node, tmp_path):
    """A node with the worklist on, one analysed series, users alice (admin) and bob, and an API token."""
    token, digest = new_token()
    http = free_port()
    node = make_node([], **web_config(http, users=("alice", "bob"), admins=("alice", "robot"),
                                      tokens=(f"robot:{digest}",)))
    files = phantom_series(tmp_path / "in", n_slices=12, rows=32)
    r = storescu(node.port, files)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    wait_until(lambda: [j for j in node.state.jobs() if j.state.value == "done"], 30, "job done")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return node, http, token, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_pages_images_and_api_calls_without_a_login_get_401_while_health_and_metrics_stay_open(analysed):
    node, http, _token, study, _series = analysed
    c = WebClient(http)
    page = c.get("/worklist")
    assert page.status == 401 and 'id="login-form"' in page.text and PATIENT_ID not in page.text
    assert c.get(f"/studies/{study}").status == 401
    api = c.get("/api/v1/studies")
    assert api.status == 401 and api.headers["www-authenticate"].startswith("Bearer")
    job = node.state.jobs()[0]
    assert c.get(f"/api/v1/jobs/{job.id}/images/{job.result_uids[0]}.png").status == 401
    assert c.post(f"/api/v1/series/{job.series_uid}/rerun").status == 401
    assert len(node.state.jobs()) == 1
    assert c.get("/healthz").status == 200 and c.get("/metrics").status == 200


def test_a_wrong_password_or_an_unknown_user_is_refused_and_both_are_audited(analysed, tmp_path):
    _node, http, _token, _study, _series = analysed
    c = WebClient(http)
    wrong = c.login("alice", "not her password")
    assert wrong.status == 401 and "Wrong user name or password" in wrong.text and "pe_session" not in c.cookies
    assert c.login("mallory").status == 401 and "pe_session" not in c.cookies
    assert c.get("/worklist").status == 401
    ok = c.login("alice")
    assert ok.status == 303 and ok.headers["location"] == "/worklist"
    cookie = ok.cookie("pe_session")
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = c.get("/worklist")
    assert page.status == 200 and PATIENT_ID in page.text  # the worklist shows identity, once logged in
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    refused = [(a["user"], a["outcome"]) for a in audit if a["action"] == "login"]
    assert refused == [("alice", "refused"), ("mallory", "refused"), ("alice", "done")]
    assert any(a["action"] == "view_worklist" and a["user"] == "alice" for a in audit)


def test_password_guessing_is_locked_out_per_name_and_per_address_without_testing_guesses(make_node, tmp_path):
    http = free_port()
    make_node([], **web_config(http, users=("alice", "bob"), **{"web.login_failures": 3, "web.login_lockout_s": 2.0,
                                                                "web.login_address_failures": 12}))
    c = WebClient(http)
    assert [c.login("alice", f"guess {i}").status for i in range(3)] == [401, 401, 401]
    locked = c.login("alice")  # the right password, during the wait: not even checked
    assert locked.status == 429 and locked.headers["retry-after"] in ("1", "2") and "pe_session" not in c.cookies
    assert "Too many wrong logins" in locked.text
    assert c.login("bob").status == 303  # another name from the same address is not locked
    assert [WebClient(http).login("mallory", "x").status for _ in range(4)] == [401, 401, 401, 429]  # unknown names too
    wait_until(lambda: WebClient(http).login("alice").status == 303, 10, "alice may log in after the wait")
    # one address: login_address_failures = 12 wrong logins in a row over any names (6 so far), then it waits too
    statuses = [WebClient(http).login(f"user{i}", "x").status for i in range(7)]
    assert statuses == [401] * 6 + [429]
    assert WebClient(http).login("bob").status == 429  # a right password from that address waits as well
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    throttled = {a["user"] for a in audit if a["action"] == "login" and "too many wrong logins" in (a.get("detail") or "")}
    assert {"alice", "mallory", "user6", "bob"} <= throttled and "user5" not in throttled


def test_x_forwarded_for_names_the_client_only_when_it_comes_from_a_trusted_proxy(make_node, tmp_path):
    forged = {"X-Forwarded-For": "203.0.113.9"}
    http = free_port()
    make_node([], **web_config(http, users=("alice",)))  # no trusted_proxies: a local process is not a proxy
    assert WebClient(http, headers=forged).login("alice").status == 303
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert [a["client"] for a in audit if a["action"] == "login"] == ["127.0.0.1"]

    http = free_port()
    make_node([], data_dir=str(tmp_path / "behind-proxy"),
              **web_config(http, users=("alice",), **{"web.trusted_proxies": ["127.0.0.0/8"],
                                                     "web.login_address_failures": 2}))
    # the proxy appends the address it saw; the nearest address that is not a trusted proxy is the client
    first = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    assert [WebClient(http, headers=first).login(f"u{i}", "x").status for i in range(3)] == [401, 401, 429]
    assert WebClient(http, headers={"X-Forwarded-For": "203.0.113.10"}).login("alice").status == 303  # not locked
    assert WebClient(http, headers=first).login("alice").status == 429  # that client waits, whatever name it uses
    audit = [json.loads(line) for line in (tmp_path / "behind-proxy" / "audit.log").read_text().splitlines()]
    assert [a["client"] for a in audit if a["action"] == "login"] == ["203.0.113.9"] * 3 + ["203.0.113.10", "203.0.113.9"]

    # a TLS-terminating proxy says https: the session cookie is Secure and HSTS is sent; from a client that
    # is not a trusted proxy the same header changes nothing
    proxied = WebClient(http, headers={"X-Forwarded-For": "203.0.113.11", "X-Forwarded-Proto": "https"})
    login = proxied.login("alice")
    assert login.status == 303 and "secure" in [p.strip().lower() for p in login.cookie("pe_session").split(";")]
    assert login.headers["strict-transport-security"].startswith("max-age=")


def test_x_forwarded_proto_from_a_client_that_is_not_a_trusted_proxy_changes_nothing(make_node):
    http = free_port()
    make_node([], **web_config(http, users=("alice",)))
    login = WebClient(http, headers={"X-Forwarded-Proto": "https"}).login("alice")
    assert login.status == 303 and "secure" not in [p.strip().lower() for p in login.cookie("pe_session").split(";")]
    assert "strict-transport-security" not in login.headers


def test_a_trusted_proxy_that_is_not_an_address_stops_the_start_with_one_line():
    with pytest.raises(ConfigError, match=r"web.trusted_proxies\[1\]: '\*' is not an IP address or network; give the "
                                          r"proxy's address \(e.g. 10.0.0.5\)"):
        load_config(None, environ={}, overrides={"web.trusted_proxies": ["10.0.0.0/24", "*"]})


def test_each_further_lockout_of_a_name_doubles_its_wait_up_to_30_minutes_and_a_login_resets_it():
    throttle, now, waits = LoginThrottle(2, 60.0, address_failures=0), 0.0, []
    for _ in range(7):  # 14 wrong logins from one address: with address_failures=0 only the name counts
        assert throttle.failed("alice", "10.0.0.1", now) == 0.0
        waits.append(throttle.failed("alice", "10.0.0.1", now))
        assert throttle.wait_s("alice", "10.0.1.1", now + waits[-1] - 1) == pytest.approx(1.0)
        now += waits[-1]
    assert waits == [60, 120, 240, 480, 960, 1800, 1800]
    throttle.succeeded("alice")
    assert throttle.failed("alice", "10.0.2.1", now) == 0.0 and throttle.failed("alice", "10.0.2.1", now) == 60


def test_a_login_form_posted_without_its_own_csrf_cookie_is_refused(analysed):
    _node, http, *_ = analysed
    c = WebClient(http)
    r = c.post("/login", {"username": "alice", "password": "correct horse battery", "login_csrf": "forged"})
    assert r.status == 403 and "pe_session" not in c.cookies


def test_admin_actions_without_the_csrf_token_are_refused_and_change_nothing(analysed, tmp_path):
    node, http, _token, study, series = analysed
    c = WebClient(http)
    c.login("alice")
    page = c.get(f"/studies/{study}")
    assert page.status == 200 and 'id="action-rerun"' in page.text
    for form in ({}, {"csrf_token": "forged"}):
        r = c.post(f"/studies/{study}/actions/rerun", {"series_uid": series, **form})
        assert r.status == 403 and "CSRF" in r.text
    assert c.post(f"/api/v1/series/{series}/rerun").status == 403  # session without the X-CSRF-Token header
    assert len(node.state.jobs()) == 1
    r = c.post(f"/studies/{study}/actions/rerun", {"series_uid": series, "csrf_token": csrf_of(page)})
    assert r.status == 303 and "message=" in r.headers["location"]
    assert len(node.state.jobs()) == 2  # the same code as `dicom-node rerun`: a new job for the series
    r = c.post(f"/api/v1/series/{series}/complete", headers={"X-CSRF-Token": csrf_of(page)})
    assert r.status == 409 and "not receiving" in r.json()["error"]  # refused by the action itself, said why
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    actions = [(a["user"], a["action"], a["outcome"], a.get("study_uid")) for a in audit
               if a["action"] in ("rerun", "complete")]
    assert actions == [("alice", "rerun", "done", study), ("alice", "complete", "refused", study)]


def test_a_user_who_is_not_an_admin_sees_the_worklist_but_cannot_run_actions(analysed):
    node, http, _token, study, series = analysed
    c = WebClient(http)
    c.login("bob")
    page = c.get(f"/studies/{study}")
    assert page.status == 200 and 'id="action-rerun"' not in page.text
    r = c.post(f"/studies/{study}/actions/rerun", {"series_uid": series, "csrf_token": csrf_of(page)})
    assert r.status == 403 and "may not run admin actions" in r.text
    assert len(node.state.jobs()) == 1


def test_a_browser_gets_errors_as_a_page_with_the_reason_and_the_api_keeps_json(analysed):
    node, http, token, study, series = analysed
    c = WebClient(http)
    c.login("bob")
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = c.get(f"/studies/{study}")
    refused = c.post(f"/studies/{study}/actions/rerun", {"series_uid": series, "csrf_token": csrf_of(page)}, browser)
    assert refused.status == 403 and refused.headers["content-type"].startswith("text/html")
    assert 'id="error-detail">user bob may not run admin actions; ask for web.admins</p>' in refused.text
    assert 'href="/worklist"' in refused.text and "default-src 'self'" in refused.headers["content-security-policy"]
    unknown = c.get("/studies/1.2.3.999", browser)
    assert unknown.status == 404 and "study 1.2.3.999 is unknown to this node" in unknown.text and "<html" in unknown.text
    bad = c.get("/studies/1.2.x", browser)
    assert bad.status == 422 and "is not a DICOM UID" in bad.text and "<html" in bad.text
    assert c.get("/worklist?limit=abc", browser).status == 422
    api = c.get("/api/v1/studies/1.2.3.999", {"Authorization": f"Bearer {token}", **browser})
    assert api.status == 404 and api.json() == {"detail": "study 1.2.3.999 is unknown to this node"}
    assert c.get("/studies/1.2.3.999").json() == {"detail": "study 1.2.3.999 is unknown to this node"}  # no Accept


def test_the_api_takes_a_bearer_token_lists_studies_with_priority_and_serves_the_openapi_schema(analysed):
    node, http, token, study, series = analysed
    c = WebClient(http)
    auth = {"Authorization": f"Bearer {token}"}
    assert c.get("/api/v1/studies", {"Authorization": "Bearer not-the-token"}).status == 401
    listed = c.get("/api/v1/studies", auth)
    assert listed.status == 200
    (row,) = listed.json()["studies"]
    assert (row["study_uid"], row["series_uid"], row["patient_id"], row["state"]) == (study, series, PATIENT_ID, "delivered")
    assert row["priority"] == "check" and row["priority_reason"]  # the stand-in model reports no findings
    detail = c.get(f"/api/v1/studies/{study}", auth).json()
    (job,) = detail["series"][0]["jobs"]
    assert [t["stage"] for t in job["timeline"]][:2] == ["received", "complete"] and job["durations_s"]
    png = c.get(job["images"][0]["png"], auth)
    assert png.status == 200 and png.headers["content-type"] == "image/png" and png.body[:8] == b"\x89PNG\r\n\x1a\n"
    r = c.post(f"/api/v1/series/{series}/rerun", headers=auth)  # a token needs no CSRF token
    assert r.status == 200 and r.json()["ok"] is True
    schema = c.get("/api/v1/openapi.json").json()
    assert {"/api/v1/studies", "/api/v1/studies/{study_uid}", "/api/v1/jobs/{job_id}/resend"} <= set(schema["paths"])
    assert c.get("/docs").status == 404  # Swagger UI would load its scripts from a CDN


def test_path_and_query_input_is_validated_and_never_reaches_sql_as_text(analysed):
    node, http, token, study, _series = analysed
    c = WebClient(http)
    auth = {"Authorization": f"Bearer {token}"}
    assert c.get("/api/v1/studies/1.2.3'%3BDROP%20TABLE%20jobs--", auth).status == 422
    assert c.get("/api/v1/studies?priority=critical'--", auth).status == 422
    assert c.get("/api/v1/studies?state=bogus", auth).status == 422
    assert c.get("/api/v1/studies?limit=100000", auth).status == 422
    assert c.get("/api/v1/jobs/1%20OR%201=1", auth).status == 422
    job = node.state.jobs()[0]
    assert c.get(f"/api/v1/jobs/{job.id}/images/..%2F..%2Fstate.png", auth).status in (404, 422)
    hit = c.get("/api/v1/studies?q=%27%20OR%201%3D1%20--", auth)
    assert hit.status == 200 and hit.json()["studies"] == []
    assert len(node.state.jobs()) == 1 and c.get(f"/api/v1/studies/{study}", auth).status == 200


def test_every_answer_carries_secure_headers_and_pages_are_not_cached(analysed):
    _node, http, *_ = analysed
    c = WebClient(http)
    for path in ("/login", "/worklist"):
        h = c.get(path).headers
        assert "default-src 'self'" in h["content-security-policy"] and "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer" and h["cache-control"] == "no-store"
        assert "server" not in h
    css = c.get("/static/worklist.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")


def test_no_patient_identity_in_the_operational_log_after_logins_pages_and_actions(analysed, tmp_path):
    _node, http, _token, study, series = analysed
    c = WebClient(http)
    c.login("alice", "wrong password")
    c.login("alice")
    assert PATIENT_ID in c.get("/worklist").text
    page = c.get(f"/studies/{study}")
    c.post(f"/studies/{study}/actions/rerun", {"series_uid": series, "csrf_token": csrf_of(page)})
    text = (tmp_path / "node.log").read_text()
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert events.count("web_login") == 2 and "web_action" in events
    for phi in (PATIENT_ID, PATIENT_BIRTH, "Testperson", "Phantomina"):
        assert phi not in text


def test_the_worklist_is_served_over_https_with_the_node_certificate(make_node, tmp_path):
    paths, ca = self_signed(tmp_path)
    http = free_port()
    make_node([], **web_config(http, **{"web.tls": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1]}))
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    c = WebClient(http, tls=ctx)
    assert c.login("alice").status == 303
    page = c.get("/worklist")
    assert page.status == 200 and page.headers["strict-transport-security"].startswith("max-age=")
    assert "secure" in [p.strip() for p in c.get("/login").cookie("pe_login_csrf").split(";")]
    with pytest.raises((ConnectionError, OSError)):
        WebClient(http).get("/worklist")  # plain HTTP on the HTTPS port gets no page


def test_the_worklist_is_off_by_default_and_bad_web_settings_stop_the_start_with_one_line(make_node, tmp_path):
    http = free_port()
    make_node([], metrics_port=http)
    c = WebClient(http)
    assert c.get("/worklist").status == 404 and c.get("/api/v1/studies").status == 404
    assert c.get("/healthz").status == 200
    with pytest.raises(ConfigError, match=r"web.enabled: true needs the node's HTTP port; set metrics_port"):
        load_config(None, environ={}, overrides={"web.enabled": True, "web.users": [user_entry("alice")]})
    with pytest.raises(ConfigError, match=r"web.enabled: true with no web.users and no web.api_tokens"):
        load_config(None, environ={}, overrides={"web.enabled": True, "metrics_port": http})
    with pytest.raises(ConfigError, match=r"web.users\[0\]: alice:\(not shown\) is not NAME:HASH") as e:
        load_config(None, environ={}, overrides={"web.users": ["alice:plain-text-password"]})  # not a hash
    assert "plain-text-password" not in str(e.value)
    with pytest.raises(ConfigError, match=r"web.admins\[0\]: 'carol' is not a name in web.users"):
        load_config(None, environ={}, overrides={"web.users": [user_entry("alice")], "web.admins": ["carol"]})
