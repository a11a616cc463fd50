"""The web console (radnode.console): authentication and roles, the OpenAPI document under schemathesis,
sessions and CSRF, metrics against the store, STOW-RS beside C-STORE, bounded connections, serve's logs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from factories import write_study
from radnode.console.accounts import Role
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.peers import StoreSCP, free_port
from support.console import api, token_for
from support.dicom_tools import ECHOSCU, STORESCU, send_unparsed, storescu
from support.node import final_job, node_config
from support.waiting import wait_until

PASSWORD = "a long enough password"


@pytest.fixture
def node(tmp_path: Path, stand_in: list[str], pacs: StoreSCP) -> Iterator[Node]:
    config = node_config(tmp_path, egress={"destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                             "port": pacs.port}]})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as running:
        yield running


def _sent_and_done(node: Node, folder: Path, calling_ae: str = "MODALITY") -> int:
    """Send a study with storescu; the id of its job once final."""
    assert storescu(node.port, folder, calling_ae=calling_ae).returncode == 0
    uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID
    wait_until(lambda: any(j.study_instance_uid == uid for j in node.jobs()))
    job = next(j for j in node.jobs() if j.study_instance_uid == uid)
    return final_job(node, job.id).id


def _endpoints(node: Node) -> list[tuple[str, str]]:
    """(method, path) of every operation in the node's own OpenAPI document, path parameters filled."""
    with api(node, token_for(node, Role.ADMIN, "lister")) as client:
        document = client.get("/openapi.json").json()
    filled = {"job_id": "1", "study": "1.2.3", "study_uid": "1.2.3", "name": "result.dcm", "kind": "reviews"}
    return [(method.upper(), re.sub(r"\{(\w+)\}", lambda m: filled[m.group(1)], path))
            for path, item in document["paths"].items() for method in item]


def test_without_a_token_everything_but_health_answers_401(node: Node) -> None:
    endpoints = _endpoints(node)
    assert {("GET", "/api/jobs"), ("POST", "/dicom-web/studies"), ("POST", "/orthanc/events"),
            ("GET", "/metrics")} <= set(endpoints)
    with api(node) as anonymous:
        for method, path in endpoints + [("GET", "/openapi.json")]:
            answer = anonymous.request(method, path)
            expected = 200 if path == "/health" else 401
            assert answer.status_code == expected, (method, path, answer.text)
        for page in ("/", "/jobs", "/jobs/1", "/review", "/destinations", "/rules", "/audit"):  # pages send a person to the login instead
            answer = anonymous.get(page)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=")
    with api(node, "rnt_not-a-token") as forged:
        assert forged.get("/api/jobs").status_code == 401


def test_metrics_answer_without_a_token_only_where_the_site_allows_it(tmp_path: Path, stand_in: list[str]) -> None:
    with Node(node_config(tmp_path, api={"port": 0, "public_metrics": True}), job_command=stand_in) as public:
        with api(public) as anonymous:
            assert anonymous.get("/metrics").status_code == 200
            assert anonymous.get("/api/jobs").status_code == 401


def test_a_viewer_reads_without_patient_data_and_cannot_store_an_operator_can(node: Node, tmp_path: Path) -> None:
    job_id = _sent_and_done(node, tmp_path / "study" if write_study(tmp_path / "study", n=2) else tmp_path)
    viewer, operator = token_for(node, Role.VIEWER), token_for(node, Role.OPERATOR)
    with api(node, viewer) as client:
        assert client.get(f"/api/jobs/{job_id}").json()["patient_id"] is None
        assert client.get("/api/jobs", params={"q": "P1"}).json()["total"] == 0, "no finding a job by patient ID"
        answer = client.post("/dicom-web/studies", content=b"", headers={"Content-Type": "multipart/related"})
        assert answer.status_code == 403 and "viewer" in answer.json()["detail"]
        assert client.get("/api/me").json() == {"name": "test-viewer", "role": "viewer", "kind": "token",
                                                "patient_data": False}
    with api(node, operator) as client:
        assert client.get(f"/api/jobs/{job_id}").json()["patient_id"] == "P1"
        assert client.get("/api/jobs", params={"q": "P1"}).json()["total"] == 1
        answer = client.post("/dicom-web/studies", content=b"--x--",
                             headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
        assert answer.status_code == 400, "an operator gets past the gate (and an empty body is refused)"


def test_jobs_carry_iso_utc_times_and_named_states_and_priorities(node: Node, tmp_path: Path) -> None:
    write_study(tmp_path / "study", n=2)
    job_id = _sent_and_done(node, tmp_path / "study")
    with api(node, token_for(node, Role.OPERATOR)) as client:
        job = client.get(f"/api/jobs/{job_id}").json()
        listed = client.get("/api/jobs", params={"state": "done"}).json()
    iso = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
    assert iso.fullmatch(job["created_at"]) and iso.fullmatch(job["updated_at"])
    assert all(iso.fullmatch(e["at"]) for e in job["events"])
    assert (job["state"], job["priority"]) == ("done", "routine")
    assert [d["state"] for d in job["deliveries"]] == ["done"] and job["deliveries"][0]["next_attempt_at"] is None
    assert [j["id"] for j in listed["jobs"]] == [job_id] and listed["total"] == 1


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_response_breaking_the_schema(node: Node, tmp_path: Path) -> None:
    write_study(tmp_path / "study", n=2)
    _sent_and_done(node, tmp_path / "study")
    token = token_for(node, Role.ADMIN)
    base = f"http://127.0.0.1:{node.api_port}"
    run = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance,response_headers_conformance",
         "--max-examples", "25", "--workers", "1", "--phases", "examples,coverage,fuzzing", "--seed", "15",
         "--suppress-health-check", "all", "--wait-for-schema", "10", "--request-timeout", "30"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "support.schemathesis_hooks",
             "PYTHONPATH": str(Path(__file__).parent)})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", run.stdout), run.stdout[-2000:]


def test_a_person_signs_in_with_a_session_cookie_and_csrf_guards_changes(node: Node) -> None:
    node.accounts.add_user("olga", Role.OPERATOR, PASSWORD)
    with api(node) as browser:
        assert browser.post("/login", data={"username": "olga", "password": "wrong password here"}).status_code == 401
        cross_site = browser.post("/login", data={"username": "olga", "password": PASSWORD},
                                  headers={"Origin": "http://evil.example"})
        assert "another site" in cross_site.text and "radnode_session" not in browser.cookies
        signed_in = browser.post("/login", data={"username": "olga", "password": PASSWORD, "next": "//evil.example"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/", "no open redirect"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/me").json()["name"] == "olga"
        page = browser.get("/jobs")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        stow = {"content": b"--x--", "headers": {"Content-Type": 'multipart/related; type="application/dicom"; '
                                                                 'boundary=x'}}
        refused = browser.post("/dicom-web/studies", **stow)  # type: ignore[arg-type]
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        with_token = browser.post("/dicom-web/studies", **{**stow, "headers": {**stow["headers"], "X-CSRF-Token": csrf}})
        assert with_token.status_code == 400, "past the CSRF check (an empty body is then refused)"
        assert browser.post("/logout", data={"csrf": csrf}).status_code == 303
        assert browser.get("/api/me").status_code == 401, "the session ended at logout"


def test_every_change_to_people_and_tokens_is_audited_with_who_made_it(tmp_path: Path) -> None:
    from radnode.security.audit_schema import schema_errors

    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))

    def radnode(*argv: str, stdin: str = "") -> None:
        done = subprocess.run([sys.executable, "-m", "radnode", *argv, "--config", str(config)], input=stdin,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    radnode("users", "add", "olga", "--role", "viewer", "--password-stdin", stdin=PASSWORD + "\n")
    radnode("users", "role", "olga", "--role", "admin")
    radnode("users", "passwd", "olga", "--password-stdin", stdin=PASSWORD + " again\n")
    radnode("tokens", "create", "ci-bot", "--role", "operator")
    for days in ("0", "-1"):  # neither a never-expiring token nor one born expired
        refused = subprocess.run([sys.executable, "-m", "radnode", "tokens", "create", f"bot{days}", "--role", "viewer",
                                  "--days", days, "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "must be a positive number" in refused.stderr, refused.stderr
    radnode("tokens", "revoke", "ci-bot")
    radnode("users", "remove", "olga")
    log = tmp_path / "data" / "audit" / "audit.log"
    messages = log.read_text().splitlines() if log.exists() else []
    changes = [m for m in messages if 'csd-code="110137"' in m]  # Security Alert: User Security Attributes Changed
    assert [re.search(r'ParticipantObjectID="([^"]+)"', m).group(1) for m in changes] == [  # type: ignore[union-attr]
        "user/olga", "user/olga", "user/olga", "token/ci-bot", "token/ci-bot", "user/olga"], messages
    assert "role admin" in changes[1] and "role operator" in changes[3]
    import getpass
    assert all(f'UserID="{getpass.getuser()}" UserIsRequestor="true"' in m for m in changes), changes[0]
    assert PASSWORD not in log.read_text() and "rnt_" not in log.read_text(), "no secret in the audit log"
    assert all(not schema_errors(m) for m in changes), schema_errors(changes[0])


def test_a_failed_login_writes_no_unknown_name_into_the_audit_trail_or_the_log(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """People type their password into the name field: a name that is no account is recorded as an unknown user
    with a short keyed digest (repeated attempts correlate, the text cannot be read back), a known one by name."""
    node.accounts.add_user("olga", Role.OPERATOR, PASSWORD)
    typed = "Tr0ub4dor-3-my-password"
    with caplog.at_level("WARNING", logger="radnode"), api(node) as browser:
        for name in (typed, typed, "olga"):
            assert browser.post("/login", data={"username": name, "password": "wrong password here"}).status_code == 401
    failures = [m for m in node.audit.path.read_text().splitlines()
                if 'csd-code="110114"' in m and 'EventOutcomeIndicator="4"' in m]
    users = [re.search(r'UserID="([^"]+)"', m).group(1) for m in failures]  # type: ignore[union-attr]
    assert len(users) == 3 and users[2] == "olga", failures
    assert users[0] == users[1] and re.fullmatch(r"unknown user \([0-9a-f]{8}\)", users[0]), users
    logged = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len(logged) == 3 and users[0] in logged[0] and "olga" in logged[2], logged
    assert typed not in node.audit.path.read_text() and typed not in caplog.text


def test_five_wrong_passwords_lock_the_name_for_a_while(node: Node) -> None:
    node.accounts.add_user("mallory-target", Role.VIEWER, PASSWORD)
    with api(node) as browser:
        for _ in range(5):
            assert browser.post("/login", data={"username": "mallory-target", "password": "x" * 12}).status_code == 401
        locked = browser.post("/login", data={"username": "mallory-target", "password": PASSWORD})
        assert locked.status_code == 429 and "radnode_session" not in browser.cookies


@pytest.mark.slow
def test_metrics_parse_and_their_counters_match_the_job_store(node: Node, tmp_path: Path) -> None:
    for i, ae in enumerate(("CT_A", "CT_A", "CT_B")):
        write_study(tmp_path / f"s{i}", n=2 + i, patient_id=f"P{i}")
        _sent_and_done(node, tmp_path / f"s{i}", calling_ae=ae)
    with api(node, token_for(node, Role.VIEWER)) as client:
        text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    jobs = node.jobs()
    instances = {ae: sum(j.instances for j in jobs if j.calling_ae == ae) for ae in ("CT_A", "CT_B")}
    assert value("radnode_instances_received_total", calling_ae="CT_A") == instances["CT_A"] == 2 + 3
    assert value("radnode_instances_received_total", calling_ae="CT_B") == instances["CT_B"] == 4
    assert value("radnode_studies_received_total", calling_ae="CT_A") == 2
    assert value("radnode_jobs", state="done", pipeline="ct_tissue") == len(jobs) == 3
    deliveries = [d for j in jobs for d in node.deliveries(j.id)]
    destination = deliveries[0].destination
    assert value("radnode_deliveries_total", destination=destination, outcome="delivered") == len(deliveries)
    assert value("radnode_job_duration_seconds_count", pipeline="ct_tissue") == 3
    for phase in ("wait", "queue", "run", "delivery"):
        assert value("radnode_job_phase_duration_seconds_count", pipeline="ct_tissue", phase=phase) == 3
    assert value("radnode_trigger_latency_seconds_count", pipeline="ct_tissue") == 3
    assert value("radnode_queue_depth") == 0 and value("radnode_spool_free_bytes") > 0


@pytest.mark.slow
def test_a_study_stored_over_stow_rs_is_processed_exactly_like_c_store(tmp_path: Path, stand_in: list[str]) -> None:
    from dicomweb_client.api import DICOMwebClient

    files = write_study(tmp_path / "study", n=3)
    outcomes = {}
    for way in ("c-store", "stow-rs"):
        with StoreSCP(tmp_path / f"pacs-{way}") as pacs, Node(node_config(
                tmp_path / way, egress={"destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                          "port": pacs.port}]}),
                job_command=stand_in, poll_seconds=0.05) as node:
            if way == "c-store":
                job_id = _sent_and_done(node, tmp_path / "study")
            else:
                client = DICOMwebClient(f"http://127.0.0.1:{node.api_port}/dicom-web",
                                        headers={"Authorization": f"Bearer {token_for(node, Role.OPERATOR)}"})
                answer = client.store_instances([pydicom.dcmread(f) for f in files])
                assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer
                wait_until(lambda: len(node.jobs()) == 1)
                job_id = final_job(node, node.jobs()[0].id).id
            job = node.job(job_id)
            assert job is not None
            spooled = sorted(p.relative_to(tmp_path / way / "data" / "spool")
                             for p in (tmp_path / way / "data" / "spool").rglob("*.dcm"))
            received = sorted(pydicom.dcmread(p).SeriesDescription for p in pacs.folder.rglob("*") if p.is_file())
            kinds = [e.kind for e in node.events(job_id) if e.kind not in ("delivered",)]
            outcomes[way] = (job.state, job.pipeline, job.instances, job.runs, job.patient_id, spooled, received, kinds)
            if way == "stow-rs":
                assert job.calling_ae == "STOW"
    assert outcomes["stow-rs"] == outcomes["c-store"]


def test_stow_rs_refuses_what_is_not_dicom_and_keeps_what_is(node: Node, tmp_path: Path) -> None:
    files = write_study(tmp_path / "study", n=2)
    boundary = "radnode-test-boundary"
    body = b""
    for part in (files[0].read_bytes(), b"not a DICOM file at all", files[1].read_bytes()):
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    with api(node, token_for(node, Role.OPERATOR)) as client:
        answer = client.post("/dicom-web/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        wrong_study = client.post("/dicom-web/studies/1.2.3", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert answer.status_code == 202, answer.text
    document = answer.json()
    assert len(document["00081199"]["Value"]) == 2 and len(document["00081198"]["Value"]) == 1
    assert document["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert wrong_study.status_code == 409 and "not of '1.2.3'" in wrong_study.text
    wait_until(lambda: len(node.jobs()) == 1 and node.jobs()[0].instances == 2)


def test_idle_connections_take_no_thread_and_are_closed_after_the_idle_timeout(tmp_path: Path,
                                                                                stand_in: list[str]) -> None:
    config = node_config(tmp_path, api={"port": 0, "idle_timeout_seconds": 2, "max_connections": 400})
    with Node(config, job_command=stand_in) as node:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", node.api_port)) for _ in range(300)]
        try:
            started = time.monotonic()
            with api(node) as client:
                assert client.get("/health").status_code == 200
            assert time.monotonic() - started < 2, "a real request is served beside 300 idle connections"
            assert threading.active_count() - before < 10, "no thread per connection"
            for sock in idle:
                sock.settimeout(10)
            closed = sum(1 for sock in idle if sock.recv(1) == b"")
            assert closed == 300, "every connection that never sent a request was closed"
            assert time.monotonic() - started < 10
        finally:
            for sock in idle:
                sock.close()


def _serve(config: Path, log: Path, *options: str) -> subprocess.Popen:
    """``radnode serve`` as an operator starts it, its output into ``log``; returns once it answers C-ECHO."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "radnode", "serve", *options, "--config", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT)
    port = yaml.safe_load(config.read_text())["ingress"]["port"]

    def answers() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        return subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(port)], capture_output=True).returncode == 0

    wait_until(answers, timeout=60, step=0.3)
    return process


@pytest.mark.slow
def test_radnode_serve_logs_each_study_job_and_delivery_once_and_no_instance(tmp_path: Path) -> None:
    files = write_study(tmp_path / "study", n=4)
    sop_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    with StoreSCP(tmp_path / "archive", ae_title="ARCHIVE") as archive:
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n  - name: archive-ct\n    when: {Modality: CT}\n    forward: [ARCHIVE]\n")
        config = tmp_path / "radnode.yaml"
        port, api_port = free_port(), free_port()
        config.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / "data"), "rules": str(rules),
            "ingress": {"host": "127.0.0.1", "port": port, "study_idle_seconds": 0.5},
            "egress": {"named_destinations": {"ARCHIVE": archive.address}}, "api": {"port": 0}}))
        log = tmp_path / "serve.log"
        process = _serve(config, log, "--api-port", str(api_port))
        try:
            def health() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{api_port}/health").status_code == 200
                except httpx.ConnectError:  # the web service starts just after the DICOM listener
                    return False

            wait_until(health, timeout=30, step=0.2)  # --api-port starts the API
            assert subprocess.run([STORESCU, "-aet", "CT01", "-aec", "RADNODE", "127.0.0.1", str(port), "+sd",
                                   str(tmp_path / "study")], capture_output=True).returncode == 0
            wait_until(lambda: re.search(r"job 1 \S+ done: ", log.read_text()), timeout=60)
        finally:
            process.terminate()
            process.wait(timeout=30)
        lines = log.read_text().splitlines()
        verbose = _serve(config, tmp_path / "verbose.log", "-v", "--log-format", "json")  # accepted after serve
        verbose.terminate()
        verbose.wait(timeout=30)
    assert all(u not in line for u in sop_uids for line in lines), "no per-instance line at the default level"
    association = [line for line in lines if re.search(r"association \w+ from CT01 .* released: 4 stored", line)]
    study = [line for line in lines if re.search(r"job 1 \S+ received: study .* arriving from CT01", line)]
    queued = [line for line in lines if re.search(r"job 1 \S+ queued: ", line)]
    done = [line for line in lines if re.search(r"job 1 \S+ done: ", line)]
    delivered = [line for line in lines if re.search(r"job 1 \S+ delivered to \S*ARCHIVE\S*: 4 object", line)]
    assert (len(association), len(study), len(queued), len(delivered), len(done)) == (1, 1, 1, 1, 1), "\n".join(lines)
    assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|WARNING) ", line) for line in lines), "\n".join(lines)
    first = json.loads((tmp_path / "verbose.log").read_text().splitlines()[0])
    assert {"time", "level", "logger", "message"} <= set(first)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------- operators' actions

ACTIONS = [("POST", "/api/jobs/{job}/retry"), ("POST", "/api/jobs/{job}/resend"), ("POST", "/api/jobs/{job}/cancel"),
           ("POST", "/api/jobs/{job}/review"), ("POST", "/api/queue/pause"), ("POST", "/api/queue/resume"),
           ("POST", "/api/studies/{study}/complete")]


def test_a_viewer_cannot_act_an_operator_can_and_every_action_names_its_user(node: Node, tmp_path: Path) -> None:
    write_study(tmp_path / "study", n=2)
    job_id = _sent_and_done(node, tmp_path / "study")
    study = node.job(job_id).study_instance_uid  # type: ignore[union-attr]
    viewer, operator = token_for(node, Role.VIEWER), token_for(node, Role.OPERATOR, "night-shift")
    with api(node, viewer) as client:
        for method, path in ACTIONS:
            answer = client.request(method, path.format(job=job_id, study=study))
            assert answer.status_code == 403, (path, answer.text)
    with api(node, operator) as client:
        assert client.post(f"/api/jobs/{job_id}/retry").status_code == 409, "a done job is not retried"
        resent = client.post(f"/api/jobs/{job_id}/resend", json={"note": "PACS lost it"})
        assert resent.status_code == 200, resent.text
        wait_until(lambda: node.job(job_id).state is JobState.DONE and  # type: ignore[union-attr]
                   all(d.state == "done" for d in node.deliveries(job_id)))
        assert client.post("/api/queue/pause").json()["paused"] is True
        assert client.get("/api/queue").json()["paused"] is True
        assert client.post("/api/queue/resume").json()["paused"] is False
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409, "a done job cannot be cancelled"
        assert client.post("/api/jobs/999/retry").status_code == 404
    resend = [e for e in node.events(job_id) if e.kind == "resend"]
    assert len(resend) == 1 and "token:night-shift" in resend[0].message and "PACS lost it" in resend[0].message


def test_refused_attempts_are_audited_like_the_actions_they_tried(node: Node, tmp_path: Path) -> None:
    """docs/console.md: a refused attempt is audited too (outcome minor failure, why): completing a study the
    node has no job for, an action needing deliveries while the node is stopping, an export of patient
    identifiers by a role not allowed them."""
    write_study(tmp_path / "study", n=2)
    job_id = _sent_and_done(node, tmp_path / "study")
    study = node.job(job_id).study_instance_uid  # type: ignore[union-attr]
    with api(node, token_for(node, Role.OPERATOR, "night-shift")) as client:
        assert client.post("/api/studies/1.2.3.999/complete").status_code == 404
        egress, node.egress = node.egress, None  # the node between stopping its deliveries and its web service
        try:
            assert client.post(f"/api/jobs/{job_id}/resend").status_code == 503
            assert client.post(f"/api/jobs/{job_id}/review", json={"decision": "accepted"}).status_code == 503
        finally:
            node.egress = egress
        assert client.get("/api/export/reviews", params={"identifiers": "true"}).status_code == 403
    trail = node.audit.path.read_text().splitlines()  # type: ignore[union-attr]
    refused = [line for line in trail if 'EventOutcomeIndicator="4"' in line and "token:night-shift" in line]
    assert len(refused) == 4, refused
    unknown, resend, review, export = refused
    assert ">complete-study<" in unknown and "1.2.3.999" in unknown and "refused: no job for study" in unknown
    for line, action in ((resend, "resend"), (review, "review-accepted")):
        assert f">{action}<" in line and f"job/{job_id}" in line and study in line and "the node is stopping" in line
    assert "export/reviews" in export and "may not export patient identifiers" in export, export


def test_an_export_of_an_unknown_kind_is_refused_and_audited(node: Node) -> None:
    """A refused export is in the trail like a refused action: asking for a kind the node has none of (404)
    writes a minor-failure message naming the kind and why. (``radnode export`` refuses such a kind itself,
    from the registry's names, before asking the node.)"""
    with api(node, token_for(node, Role.ADMIN, "auditor")) as client:
        answer = client.get("/api/export/no-such-kind", params={"format": "csv"})
        assert client.get("/api/export/reviews").status_code == 200
    assert answer.status_code == 404 and "no export 'no-such-kind'" in answer.json()["detail"], answer.text
    trail = [line for line in node.audit.path.read_text().splitlines()  # type: ignore[union-attr]
             if "token:auditor" in line and "export/" in line]
    assert len(trail) == 2, trail
    refused, done = trail
    assert 'EventOutcomeIndicator="4"' in refused and ">export no-such-kind (csv)<" in refused, refused
    assert "export/no-such-kind" in refused and "refused: no export" in refused, refused
    assert 'EventOutcomeIndicator="0"' in done and "export/reviews" in done, done


def test_the_destinations_page_lists_egress_destinations_and_checks_one_live(node: Node, pacs: StoreSCP) -> None:
    with api(node, token_for(node, Role.VIEWER)) as viewer:
        assert viewer.get("/api/destinations").json() == [{"name": pacs.address, "kind": "dicom",
                                                           "address": pacs.address}]
        assert viewer.post("/api/destinations/check", params={"name": pacs.address}).status_code == 403
    with api(node, token_for(node, Role.OPERATOR)) as operator:
        checked = operator.post("/api/destinations/check", params={"name": pacs.address}).json()
        assert (checked["ok"], checked["detail"]) == (True, f"C-ECHO to {pacs.address}: status 0x0000")
        assert operator.post("/api/destinations/check", params={"name": "dicom:ELSEWHERE@10.0.0.9:104"}
                             ).status_code == 404, "only a destination egress has"


def test_the_rules_test_shows_header_values_only_to_roles_that_see_patient_data(
        tmp_path: Path, stand_in: list[str], pacs: StoreSCP) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: research-cohort\n    when: {PatientID: COHORT7}\n    forward: [PACS]\n"
                     "  - name: ct\n    when: {Modality: CT}\n    pipelines: [ct_tissue]\n")
    config = node_config(tmp_path, egress={"named_destinations": {"PACS": pacs.address}})
    with Node(config.model_copy(update={"rules": rules}), job_command=stand_in, poll_seconds=0.05) as node:
        write_study(tmp_path / "study", n=2, patient_id="SECRET-MRN-4711")
        job_id = _sent_and_done(node, tmp_path / "study")
        with api(node, token_for(node, Role.VIEWER)) as viewer:
            refused = viewer.post("/api/rules/test", params={"job_id": job_id})
        assert refused.status_code == 403 and "patient data" in refused.json()["detail"], refused.text
        assert "SECRET-MRN-4711" not in refused.text
        with api(node, token_for(node, Role.OPERATOR)) as operator:
            report = operator.post("/api/rules/test", params={"job_id": job_id}).json()["report"]
        assert "PatientID = 'COHORT7' not matched: 'SECRET-MRN-4711'" in report, "the report names header values"


def _free_texts_shown_to(node: Node, role: Role, job_id: int) -> tuple[dict, dict, dict]:
    """The job, the job list and the job's files as a token of ``role`` gets them from the API."""
    with api(node, token_for(node, role, f"reader-{role.value}")) as client:
        return (client.get(f"/api/jobs/{job_id}").json(), client.get("/api/jobs").json(),
                client.get(f"/api/jobs/{job_id}/files").json())


@pytest.fixture
def failed_with_notes(tmp_path: Path, stand_in: list[str],
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Node, int]]:
    """A node and a job whose pipeline failed quoting the patient's name on stderr, then was retried and
    cancelled by ``token:ops`` with notes naming the patient."""
    monkeypatch.setenv("STAND_IN_FAIL_WITHHELD1", "cannot read PatientName DOE^JANE")  # before the node's workers
    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        write_study(tmp_path / "study", n=2, patient_id="WITHHELD1")
        job_id = _sent_and_done(node, tmp_path / "study")
        with api(node, token_for(node, Role.OPERATOR, "ops")) as operator:
            operator.post("/api/queue/pause").raise_for_status()
            operator.post(f"/api/jobs/{job_id}/retry", json={"note": "ward of DOE^JANE called"}).raise_for_status()
            operator.post(f"/api/jobs/{job_id}/cancel", json={"note": "DOE^JANE moved"}).raise_for_status()
            operator.post("/api/queue/resume").raise_for_status()
        yield node, job_id


def test_stderr_and_operators_notes_are_withheld_from_roles_without_patient_data(
        failed_with_notes: tuple[Node, int]) -> None:
    """A pipeline's error output and the notes operators type can quote the patient: a viewer gets them as null,
    each named in the document's ``withheld``; an operator gets them as they are."""
    node, job_id = failed_with_notes
    job, listed, files = _free_texts_shown_to(node, Role.VIEWER, job_id)
    assert "DOE^JANE" not in str((job, listed, files)), (job, files)
    assert (job["reason"], job["withheld"], job["failure"]) == (None, ["reason"], "cancelled")
    assert (listed["jobs"][0]["reason"], listed["jobs"][0]["withheld"]) == (None, ["reason"])
    assert (files["stderr_tail"], files["withheld"]) == (None, ["stderr_tail"])
    by_kind = {e["kind"]: e for e in job["events"]}
    for kind in ("failed", "retry", "cancelled"):
        assert (by_kind[kind]["message"], by_kind[kind]["withheld"]) == (None, ["message"]), by_kind[kind]
    assert by_kind["received"]["message"] and by_kind["received"]["withheld"] == [], "the node's own lines stay"
    shown = subprocess.run([sys.executable, "-m", "radnode", "jobs", "show", str(job_id), "--url",
                            f"http://127.0.0.1:{node.api_port}"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RADNODE_TOKEN": token_for(node, Role.VIEWER, "cli-viewer")})
    assert "DOE^JANE" not in shown.stdout and "(withheld for your role)" in shown.stdout, shown.stdout + shown.stderr
    job, listed, files = _free_texts_shown_to(node, Role.OPERATOR, job_id)
    assert job["reason"] == "cancelled by token:ops: DOE^JANE moved" and job["withheld"] == []
    assert "cannot read PatientName DOE^JANE" in files["stderr_tail"] and files["withheld"] == []
    by_kind = {e["kind"]: e for e in job["events"]}
    assert "ward of DOE^JANE called" in by_kind["retry"]["message"] and by_kind["retry"]["withheld"] == []
    assert "PatientName DOE^JANE" in by_kind["failed"]["message"]


@pytest.mark.slow
def test_the_job_page_shows_withheld_for_your_role_to_a_viewer_in_chromium(
        failed_with_notes: tuple[Node, int], playwright_core: Path) -> None:
    node, job_id = failed_with_notes
    shown = {}
    for role in (Role.VIEWER, Role.OPERATOR):
        node.accounts.add_user(f"page-{role.value}", role, PASSWORD)
        browser = subprocess.run(
            ["node", str(Path(__file__).parent / "support" / "withheld_browser.cjs")], capture_output=True, text=True,
            timeout=180, env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core), "JOB_ID": str(job_id),
                              "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}", "CONSOLE_USER": f"page-{role.value}",
                              "CONSOLE_PASSWORD": PASSWORD})
        assert browser.returncode == 0, browser.stdout + browser.stderr
        shown[role] = json.loads(browser.stdout.strip().splitlines()[-1])
    assert shown[Role.VIEWER] == dict.fromkeys(("reason", "retry", "cancelled", "stderr"), "withheld for your role")
    assert shown[Role.OPERATOR]["reason"] == "cancelled by token:ops: DOE^JANE moved"
    assert "ward of DOE^JANE called" in shown[Role.OPERATOR]["retry"]
    assert "cannot read PatientName DOE^JANE" in shown[Role.OPERATOR]["stderr"]


def test_a_paused_queue_keeps_ingesting_and_starts_nothing_until_resumed(node: Node, tmp_path: Path) -> None:
    operator = token_for(node, Role.OPERATOR)
    with api(node, operator) as client:
        client.post("/api/queue/pause").raise_for_status()
        write_study(tmp_path / "study", n=2)
        assert storescu(node.port, tmp_path / "study").returncode == 0, "ingest continues while paused"
        wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.QUEUED)
        time.sleep(1.0)  # several scheduler rounds
        assert node.jobs()[0].state is JobState.QUEUED and node.jobs()[0].runs == 0
        client.post("/api/queue/resume").raise_for_status()
    assert final_job(node, node.jobs()[0].id).state is JobState.DONE


def test_a_study_still_arriving_is_forced_complete_and_a_queued_job_cancelled(tmp_path: Path,
                                                                               stand_in: list[str]) -> None:
    config = node_config(tmp_path, ingress={"host": "127.0.0.1", "port": 0, "study_idle_seconds": 3600,
                                            "association_grace_seconds": 3600})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        write_study(tmp_path / "study", n=2)
        assert storescu(node.port, tmp_path / "study").returncode == 0
        wait_until(lambda: len(node.jobs()) == 1)
        (job,) = node.jobs()
        assert job.state is JobState.RECEIVED, "the study waits (an hour of completeness grace)"
        with api(node, token_for(node, Role.OPERATOR, "ops")) as client:
            client.post("/api/queue/pause").raise_for_status()
            forced = client.post(f"/api/studies/{job.study_instance_uid}/complete", json={"note": "modality done"})
            assert forced.status_code == 200, forced.text
            assert node.job(job.id).state is JobState.QUEUED  # type: ignore[union-attr]
            cancelled = client.post(f"/api/jobs/{job.id}/cancel", json={"note": "wrong patient"})
            assert cancelled.status_code == 200 and "queued" in cancelled.json()["message"]
            client.post("/api/queue/resume").raise_for_status()
        final = node.job(job.id)
        assert final.state is JobState.FAILED and final.reason == "cancelled by token:ops: wrong patient"  # type: ignore[union-attr]
        queued = [e.message for e in node.events(job.id) if e.kind == "queued"]
        assert len(queued) == 1 and queued[0].endswith("forced complete by token:ops")
        assert [e.message for e in node.events(job.id) if e.kind == "forced-complete"] == [
            "forced complete by token:ops: modality done"], "the note in an event of its own"
        time.sleep(0.5)
        assert node.job(job.id).runs == 0, "a cancelled job never runs"  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_destination_down_past_its_retries_fails_the_job_and_one_resend_delivers_each_result_once(
        tmp_path: Path, stand_in: list[str]) -> None:
    port = free_port()  # the PACS is down: nothing listens here yet
    config = node_config(tmp_path, egress={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
                                           "max_attempts": 3, "retry_initial_seconds": 0.1, "retry_max_seconds": 0.2,
                                           "timeouts": {"connect_seconds": 2, "acse_seconds": 2, "dimse_seconds": 2,
                                                        "network_seconds": 2}})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        write_study(tmp_path / "study", n=2)
        job_id = _sent_and_done(node, tmp_path / "study")
        operator = token_for(node, Role.OPERATOR, "radiographer")
        with api(node, operator) as client:
            failed = client.get(f"/api/jobs/{job_id}").json()
            assert failed["state"] == "failed" and failed["failure"] == "delivery"
            assert "PACS" in failed["reason"] and all(d["state"] == "failed" for d in failed["deliveries"])
            results = sorted(d["object"] for d in failed["deliveries"])
            with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=port) as pacs:
                answer = client.post(f"/api/jobs/{job_id}/resend", json={"failed_only": True})
                assert answer.status_code == 200, answer.text
                assert final_job(node, job_id).state is JobState.DONE
                received = sorted(p for p in pacs.folder.rglob("*") if p.is_file())
                sop_uids = sorted(pydicom.dcmread(p).SOPInstanceUID for p in received)
            delivered = client.get(f"/api/jobs/{job_id}").json()["deliveries"]
            assert sorted(d["sent_uid"] for d in delivered) == sop_uids, "each delivery names the UID the PACS got"
            assert client.post(f"/api/jobs/{job_id}/resend", json={"failed_only": True}).status_code == 409
    assert len(received) == len(results) and len(set(sop_uids)) == len(sop_uids), "each result once"
    (resend,) = [e.message for e in node_events(config, job_id) if e.kind == "resend"]
    assert re.fullmatch(rf"token:radiographer re-sent {len(results)} undelivered deliver(y|ies) to every destination: "
                        r"no reason given", resend), resend


def node_events(config, job_id: int) -> list:  # type: ignore[no-untyped-def]
    from radnode.node.store import JobStore, store_target

    store = JobStore(store_target(config.data_dir, None))
    try:
        return store.events(job_id)
    finally:
        store.close()


@pytest.mark.slow
def test_a_failed_job_retried_after_its_missing_series_came_runs_on_every_received_instance(
        tmp_path: Path, stand_in: list[str], pacs: StoreSCP) -> None:
    config = node_config(tmp_path, ingress={"host": "127.0.0.1", "port": 0, "study_idle_seconds": 0.5,
                                            "late_instances": "ignore"},
                         egress={"destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]})
    files = write_study(tmp_path / "images", n=3)
    header_only = tmp_path / "header"
    header_only.mkdir()
    ds = pydicom.dcmread(files[0])
    del ds.PixelData  # a series without its images: the pipeline (the stand-in) fails on it
    ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(header_only / "header.dcm")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        job_id = _sent_and_done(node, header_only)
        assert node.job(job_id).state is JobState.FAILED  # type: ignore[union-attr]
        assert storescu(node.port, tmp_path / "images").returncode == 0  # the missing series, sent later
        wait_until(lambda: node.job(job_id).late_instances == 3)  # type: ignore[union-attr]
        with api(node, token_for(node, Role.OPERATOR)) as client:
            answer = client.post(f"/api/jobs/{job_id}/retry", json={"note": "series resent by the modality"})
            assert answer.status_code == 200 and "4 instance" in answer.json()["message"], answer.text
        job = final_job(node, job_id)
        assert job.state is JobState.DONE, job.reason
        assert (job.instances, job.runs) == (4, 2)
        inputs = (tmp_path / "data" / "jobs" / str(job_id) / "in")
        assert len(list(inputs.iterdir())) == 4
        assert [e.kind for e in node.events(job_id)].count("retry") == 1


def test_the_cli_lists_shows_resends_and_pauses_through_the_api_with_a_token(node: Node, tmp_path: Path) -> None:
    write_study(tmp_path / "study", n=2)
    job_id = _sent_and_done(node, tmp_path / "study")
    url = f"http://127.0.0.1:{node.api_port}"

    def radnode(*argv: str, role: Role = Role.OPERATOR) -> subprocess.CompletedProcess:
        token = token_for(node, role, f"cli-{role.value}-{time.monotonic_ns()}")
        return subprocess.run([sys.executable, "-m", "radnode", *argv, "--url", url], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "RADNODE_TOKEN": token})

    listed = radnode("jobs", "list")
    assert listed.returncode == 0 and re.search(rf"^\s*{job_id}\s+done\s+ct_tissue\s+routine .* P1 ", listed.stdout,
                                                re.M), listed.stdout + listed.stderr
    shown = radnode("jobs", "show", str(job_id))
    assert "deliveries:" in shown.stdout and "events:" in shown.stdout and "delivered" in shown.stdout
    refused = radnode("jobs", "resend", str(job_id), role=Role.VIEWER)
    assert refused.returncode == 2 and "403" in refused.stderr and "viewer" in refused.stderr
    resent = radnode("jobs", "resend", str(job_id), "--note", "from the CLI")
    assert resent.returncode == 0 and "queued" in resent.stdout, resent.stderr
    assert radnode("queue", "pause").stdout.startswith("queue paused")
    assert radnode("queue", "status").stdout.startswith("queue paused")
    assert radnode("queue", "resume").stdout.startswith("queue running")
    again = radnode("study", "complete", node.job(job_id).study_instance_uid)  # type: ignore[union-attr]
    assert again.returncode == 2 and "409" in again.stderr and "not receiving" in again.stderr
    assert any(e.kind == "resend" and "from the CLI" in e.message for e in node.events(job_id))
    unreachable = subprocess.run([sys.executable, "-m", "radnode", "jobs", "list", "--url", f"http://127.0.0.1:{free_port()}"],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "RADNODE_TOKEN": "rnt_x"})
    assert unreachable.returncode == 2 and "cannot reach the node" in unreachable.stderr


# ------------------------------------------------------------------------------------------------ browser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_operator_watches_a_study_arrive_and_finish_then_resends_a_result_in_chromium(
        tmp_path: Path, stand_in: list[str], pacs: StoreSCP, playwright_core: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS_BROWSER1", "2")  # long enough to be seen running
    files = write_study(tmp_path / "study", n=3, patient_id="BROWSER1")
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    config = node_config(tmp_path, egress={"destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                             "port": pacs.port}]})
    screenshot = REPO / ".cache" / "artifacts" / "console-job-page.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        node.accounts.add_user("olga", Role.OPERATOR, PASSWORD)
        browser = subprocess.Popen(
            ["node", str(Path(__file__).parent / "support" / "console_browser.cjs")], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core), "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}",
                 "STUDY_UID": study, "SCREENSHOT": str(screenshot), "CONSOLE_USER": "olga",
                 "CONSOLE_PASSWORD": PASSWORD})
        output: list[str] = []
        try:
            assert browser.stdout is not None
            for line in browser.stdout:
                output.append(line.rstrip())
                if line.startswith("READY"):
                    assert storescu(node.port, tmp_path / "study").returncode == 0
            assert browser.wait(timeout=180) == 0, "\n".join(output)
        finally:
            if browser.poll() is None:
                browser.kill()
        (job,) = node.jobs()
        resent = next((line.removeprefix("RESENT ") for line in output if line.startswith("RESENT ")), "")
        assert resent == f"{pacs.ae_title}@127.0.0.1:{pacs.port}", "\n".join(output)
        events = node.events(job.id)
        assert [e.message for e in events if e.kind == "resend"] == [f"olga re-sent 1 delivery to {resent}: no reason given"]
        assert [d.state for d in node.deliveries(job.id)] == ["done"]
    assert any("STEP the study appeared" in line for line in output)
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_an_operator_retries_a_job_without_the_instance_no_sender_can_correct_in_chromium(
        tmp_path: Path, stand_in: list[str], playwright_core: Path) -> None:
    """An instance without SOP Instance UID holds its study back (failure kind "refused"); on the job's page the
    operator retries without it, gives the reason the prompt asks for, and the job is done on the rest."""
    files = write_study(tmp_path / "study", n=3, patient_id="REFUSED1")
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(files[2])
    del ds.SOPInstanceUID
    ds.save_as(broken, enforce_file_format=False)
    files[2].unlink()
    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        node.accounts.add_user("olga", Role.OPERATOR, PASSWORD)
        assert storescu(node.port, tmp_path / "study").returncode == 0
        assert [status for status, _ in send_unparsed(node.port, [broken])] == [0xC000]
        job = final_job(node, 1)
        with api(node, token_for(node, Role.VIEWER)) as client:
            assert client.get(f"/api/jobs/{job.id}").json()["failure"] == "refused"
        browser = subprocess.run(
            ["node", str(Path(__file__).parent / "support" / "refused_browser.cjs")], capture_output=True, text=True,
            timeout=180, env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core), "JOB_ID": str(job.id),
                              "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}", "CONSOLE_USER": "olga",
                              "CONSOLE_PASSWORD": PASSWORD, "NOTE": "modality bug, series complete without it"})
        assert browser.returncode == 0, browser.stdout + browser.stderr
        done = final_job(node, job.id)
    assert done.state is JobState.DONE and done.instances == 2
    waived = next(line for line in browser.stdout.splitlines() if line.startswith("DONE "))
    assert "olga gave up on 1 refused instance(s) of the study (modality bug, series complete without it)" in waived


def test_a_flagged_job_leaves_the_review_worklist_once_marked_reviewed_by_an_operator(
        node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS_FLAGGED", "2")
    write_study(tmp_path / "study", n=2, patient_id="FLAGGED")
    assert storescu(node.port, tmp_path / "study").returncode == 0
    wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.RUNNING)
    job_id = node.jobs()[0].id
    assert node.store is not None  # the decision a run's manifest carries, recorded as the worker does
    assert node.store.record_review(job_id, True, ["lesion: mean uncertainty 0.471 > 0.2"])
    assert final_job(node, job_id).state is JobState.DONE
    worklist = {"needs_review": "true", "reviewed": "false"}
    with api(node, token_for(node, Role.OPERATOR, "dr-lee")) as client:
        assert [j["id"] for j in client.get("/api/jobs", params=worklist).json()["jobs"]] == [job_id]
        assert client.post(f"/api/jobs/{job_id}/review", json={"note": "checked the boundary"}).status_code == 200
        assert client.get("/api/jobs", params=worklist).json()["jobs"] == []
        assert client.get(f"/api/jobs/{job_id}").json()["reviewed_by"] == "token:dr-lee"
        assert client.post(f"/api/jobs/{job_id}/review").status_code == 200, "a second look is recorded too"
    reviewed = [e.message for e in node.events(job_id) if e.kind == "reviewed"]
    assert reviewed[0] == "reviewed by token:dr-lee: checked the boundary" and len(reviewed) == 2
