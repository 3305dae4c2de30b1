"""Tests of agenthub, in the order of the module's sections.

HTTP behaviour goes through WebTest's TestApp; concurrency, keep-alive and
large streams go through a real threaded server on port 0.
"""

import base64
import functools
import hashlib
import http.client
import io
import json
import os
import random
import re
import socket
import subprocess
import sqlite3
import sys
import tarfile
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
import uuid
from html import escape as html_escape

import pytest
import webtest

import agenthub
from agenthub import Config, create_app

ANY_UUID = "00000000-0000-4000-8000-000000000000"
# Client secrets hashed at a lower scrypt cost in this process (each hash records its cost, so the
# check is the same code): the suite makes hundreds of clients, at ~60 ms a hash at full cost.
agenthub.SCRYPT_N = 2 ** 10


# -- fixtures ------------------------------------------------------------------------------------
#
# Every test that makes its app through ``make_app`` (or the fixtures over it) runs on both engines:
# SQLite in memory, and PostgreSQL when AGENTHUB_TEST_POSTGRES names a database (README, "Tests").
# There each app gets a schema of its own, emptied and reused by later tests of the same process.

POSTGRES = os.environ.get("AGENTHUB_TEST_POSTGRES", "")
ENGINES = ["sqlite", "postgresql"] if POSTGRES else ["sqlite"]


class PgSchemas:
    """Schemas of the test database, migrated once, emptied for each app that takes one."""

    free, made, conn = [], 0, None

    @classmethod
    def take(cls):
        import psycopg
        if cls.conn is None or cls.conn.closed:
            cls.conn = psycopg.connect(POSTGRES, autocommit=True)
        conn = cls.conn
        if cls.free:
            schema = cls.free.pop()
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename != 'agenthub_schema'",
                (schema,))]
            # DELETE, not TRUNCATE (which makes new files for every table and index); foreign keys
            # are not checked meanwhile (every table is emptied).
            conn.execute("SET session_replication_role = replica;"
                         + "".join(f"DELETE FROM {schema}.{t};" for t in tables)
                         + "SET session_replication_role = DEFAULT")
        else:
            cls.made += 1               # named per test worker: the next run empties and reuses them
            schema = f"t_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{cls.made}"
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
        return schema, POSTGRES + ("&" if "?" in POSTGRES else "?") + "options=" + \
            urllib.parse.quote(f"-c search_path={schema}")


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def make_app(engine, request):
    """``create_app`` with the tests' defaults (no purger); every app a test makes is closed after it,
    whether it passed or not (closing twice is harmless, so a test may also close its own early).
    On PostgreSQL a test that names an SQLite file (``db=``) is skipped: it tests that file; so is
    one marked ``sqlite_only`` (with its reason)."""
    made, schemas = [], []
    only = request.node.get_closest_marker("sqlite_only")
    if engine == "postgresql" and only:
        pytest.skip(only.args[0])

    def make(**overrides):
        overrides.setdefault("purge_interval", 0)
        overrides.setdefault("history_interval", 0)     # no background sampler: tests sample when they mean to
        if engine == "postgresql":
            if overrides.get("db") not in (None, ":memory:"):
                pytest.skip("tests an SQLite database file")
            schema, overrides["db"] = PgSchemas.take()
            schemas.append(schema)
            overrides.setdefault("secret_key", "test-key-" + "0" * 32)
        made.append(create_app(**overrides))
        return made[-1]
    yield make
    for app in made:
        app.close()
    PgSchemas.free.extend(schemas)


def needs_postgres():
    """Skip, with the one line (pytest -rs groups them) that says how to run these tests."""
    pytest.skip("PostgreSQL tests not run: set AGENTHUB_TEST_POSTGRES=postgresql://… (README, 'Tests')")


def test_postgresql_engine_runs_the_suite_when_configured():
    """Without AGENTHUB_TEST_POSTGRES the PostgreSQL half of the suite does not run (this skip says
    so once); with AGENTHUB_TEST_POSTGRES_REQUIRED=1 (CI) a missing database is a failure."""
    if not POSTGRES:
        if os.environ.get("AGENTHUB_TEST_POSTGRES_REQUIRED"):
            pytest.fail("AGENTHUB_TEST_POSTGRES_REQUIRED is set but AGENTHUB_TEST_POSTGRES is not")
        needs_postgres()
    import psycopg
    with psycopg.connect(POSTGRES, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


# == PostgreSQL: several agenthub processes on one database ========================================================

PG_KEY = "multi-process-key-" + "0" * 32


@pytest.fixture
def pg_hubs():
    """Start agenthub processes on one PostgreSQL schema: ``start(n, *flags)`` -> [(process, base URL)],
    plus an in-process app on the same database (same key) for tokens and direct checks."""
    if not POSTGRES:
        needs_postgres()
    schema, url = PgSchemas.take()
    procs, apps = [], []

    def start(n, *flags):
        started, new = [], []
        for _ in range(n):                                   # all starting at once, then each read
            new.append(subprocess.Popen([sys.executable, agenthub.__file__, "--db", url, "--port", "0", "--quiet",
                                         "--secret-key", PG_KEY, "--purge-interval", "0", "--history-interval",
                                         "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        procs.extend(new)
        for proc in new:
            line = proc.stdout.readline()
            assert "serving on http://" in line, proc.stderr.read() if proc.poll() is not None else line
            started.append((proc, line.split("serving on ")[1].split("/ ")[0]))
        return started

    def local(**overrides):
        apps.append(create_app(db=url, secret_key=PG_KEY, purge_interval=0, history_interval=0, quiet=True,
                               **overrides))
        return apps[-1]
    yield start, local
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for app in apps:
        app.close()
    PgSchemas.free.append(schema)


def test_three_processes_hand_each_of_2000_jobs_out_exactly_once(pg_hubs):
    """30 agents spread over three processes pop 2 000 jobs from one PostgreSQL database at once: each
    job exactly once, none left; and one agent asking each process in turn gets priority, then FIFO."""
    start, local = pg_hubs
    hubs = start(3)
    app = local()
    anonymous = app.hub.auth.identify(None)
    lead = agenthub.Identity("contributor", "lead", {"max_priority": {"*": 10}})
    with app.hub.db.write():                                    # one commit for the 2 000 submits
        urgent = {app.hub.jobs.submit({"job_queue": "mp", "job_priority": 5}, lead) for _ in range(30)}
        for _ in range(1970):
            app.hub.jobs.submit({"job_queue": "mp"}, anonymous)
    headers = token_headers(app, "agent", "mp-agents")
    got, errors, lock = [], [], threading.Lock()

    def agent(n):
        host = hubs[n % 3][1].split("//")[1]
        conn = http.client.HTTPConnection(host, timeout=30)
        mine = pop_until_empty(conn, "mp", {**headers, "Cookie": f"agent_name=mp{n}"}, errors)
        conn.close()
        with lock:
            got.extend(mine)
    agents = [threading.Thread(target=agent, args=(n,)) for n in range(30)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join()
    assert errors == []
    assert len(got) == 2000 and len(set(got)) == 2000
    assert app.hub.jobs.store.job_state_counts() == {"running": 2000}
    assigned = [r[0] for r in app.hub.db.read("SELECT job_id FROM job_events WHERE event_name = 'job_assigned'"
                                               " ORDER BY id")]
    assert len(assigned) == 2000 and urgent <= set(got)
    # Priority, then arrival, across processes: one agent asking each process in turn.
    with app.hub.db.write():
        normal = [app.hub.jobs.submit({"job_queue": "order"}, anonymous) for _ in range(4)]
        high = [app.hub.jobs.submit({"job_queue": "order", "job_priority": 5}, lead) for _ in range(3)]
    order = [json.loads(call_http(hubs[n % 3][1], "GET", "/v1/job?queue=order", None,
                                  {**headers, "Cookie": "agent_name=orderly"})[2])["job_id"] for n in range(7)]
    assert order == high + normal


def test_a_fire_on_one_process_wakes_a_watcher_parked_on_another(pg_hubs):
    start, local = pg_hubs
    (_, first), (_, _), (_, third) = start(3)
    event = json.loads(call_http(first, "PUT", "/v1/event/fire/deploy", b"v1")[2])
    status, headers, body = call_http(third, "GET", "/v1/event/list?name=deploy")
    index = headers["X-Consul-Index"]
    assert [e["ID"] for e in json.loads(body)] == [event["ID"]] and index == str(xor_index(event["ID"]))
    results = {}
    watcher = threading.Thread(target=lambda: results.update(answer=call_http(
        third, "GET", f"/v1/event/list?name=deploy&index={index}&wait=30s")))
    watcher.start()
    assert _wait_for(lambda: b"agenthub_event_watchers 1" in call_http(third, "GET", "/metrics")[2])
    second = json.loads(call_http(first, "PUT", "/v1/event/fire/deploy", b"v2")[2])
    watcher.join(timeout=30)
    status, headers, body = results["answer"]
    assert status == 200 and [e["ID"] for e in json.loads(body)] == [event["ID"], second["ID"]]
    assert headers["X-Consul-Index"] == str(xor_index(second["ID"]))
    assert [e["LTime"] for e in json.loads(body)] == [1, 2]                # one Lamport clock
    for base in (first, third):                                            # every process lists the same
        assert json.loads(call_http(base, "GET", "/v1/event/list?name=deploy")[2]) == json.loads(body)


def test_three_processes_deliver_each_gocd_state_change_once(pg_hubs):
    receiver = Receiver()
    try:
        start, local = pg_hubs
        hubs = start(3, "--gocd-webhook", receiver.url)
        app = local()
        headers = {**token_headers(app, "agent", "gocd-mp"), "Content-Type": "application/json"}
        for n, (_, base) in enumerate(hubs):                   # the agent talks to each process in turn
            call_http(base, "POST", "/v1/agents/data/mpagent", {"state": "waiting", "queues": ["g"]},
                      {**headers, "Cookie": "agent_name=mpagent"})
        job_id = json.loads(call_http(hubs[0][1], "POST", "/v1/job", {"job_queue": "g"})[2])["job_id"]
        assert call_http(hubs[1][1], "GET", "/v1/job?queue=g", None,
                         {**headers, "Cookie": "agent_name=mpagent"})[0] == 200          # Idle -> Building
        call_http(hubs[2][1], "POST", f"/v1/result/{job_id}", {"job_state": "complete"},
                  {**headers, "Cookie": "agent_name=mpagent"})                          # Building -> Idle
        # Every process records what it delivered: three changes, three deliveries, one each.
        assert _wait_for(lambda: len(app.hub.notifier.deliveries("mpagent")) >= 3)
        assert len(app.hub.notifier.deliveries("mpagent")) == 3
        states = [json.loads(r[3])["agent_state"] for r in receiver.requests]
        assert states == ["Idle", "Building", "Idle"]
    finally:
        receiver.close()


def test_gocd_notifications_outlive_the_processes_that_queued_them(pg_hubs):
    """Five state changes queued for a slow webhook; every process is killed (SIGKILL) after the first
    delivery; a new process delivers the rest from the outbox, in order (the one in flight may come
    twice: deliveries are at least once)."""
    receiver = Receiver(delay=0.3)
    try:
        start, local = pg_hubs
        hubs = start(3, "--gocd-webhook", receiver.url)
        app = local()
        headers = {**token_headers(app, "agent", "outbox"), "Content-Type": "application/json",
                   "Cookie": "agent_name=outboxer"}
        for state in ("waiting", "test", "waiting", "test", "waiting"):
            assert call_http(hubs[0][1], "POST", "/v1/agents/data/outboxer", {"state": state}, headers)[0] == 200
        assert _wait_for(lambda: receiver.requests)
        for proc, _ in hubs:
            proc.kill()
            proc.wait()
        start(1, "--gocd-webhook", receiver.url)

        def delivered():
            seen = {}
            for _, _, sent, body in receiver.requests:
                seen.setdefault(sent["X-Agenthub-Delivery"], json.loads(body)["agent_state"])
            return list(seen.values())
        assert _wait_for(lambda: len(delivered()) == 5, 30)
        assert delivered() == ["Idle", "Building", "Idle", "Building", "Idle"]
    finally:
        receiver.close()


def test_one_process_killed_mid_load_the_others_carry_on_and_nothing_is_lost(pg_hubs):
    """Agents on three processes take and finish 300 jobs; one process is killed with SIGKILL a third
    of the way through.  Its agents move to the others; a job whose answer died with the process is
    reclaimed when its agent asks again (--strand-seconds); every job ends complete, and no agent was
    ever handed a job another agent got."""
    start, local = pg_hubs
    hubs = start(3, "--strand-seconds", "1")
    app = local()
    with app.hub.db.write():
        for _ in range(300):
            app.hub.jobs.submit({"job_queue": "kill"}, app.hub.auth.identify(None))
    headers = token_headers(app, "agent", "kill-agents")
    received, finished, errors, lock = [], [], [], threading.Lock()
    alive = [base for _, base in hubs]

    def agent(n):
        name, target = f"k{n}", n % 3
        cookie = {**headers, "Cookie": f"agent_name={name}", "Content-Type": "application/json"}
        while True:
            base = alive[target % len(alive)]
            try:
                status, _, body = call_http(base, "GET", "/v1/job?queue=kill", None, cookie)
                if status == 200:
                    job_id = json.loads(body)["job_id"]
                    with lock:
                        received.append(job_id)
                    while True:                         # as the real agent does, until the result is in
                        try:
                            status = call_http(alive[target % len(alive)], "POST", f"/v1/result/{job_id}",
                                               {"job_state": "complete"}, cookie)[0]
                            break
                        except OSError:
                            target += 1
                    if status != 200:
                        errors.append(status)
                        return
                    with lock:
                        finished.append(job_id)
                elif status == 204:
                    if app.hub.jobs.store.job_state_counts().get("complete", 0) >= 300:
                        return
                    time.sleep(0.2)                    # a reclaimed job may come back: ask again
                else:
                    errors.append(status)
                    return
            except OSError:                            # the process went away under this request
                target += 1
    def run(n):
        try:
            agent(n)
        except Exception as exc:                       # a crashed agent thread fails the test
            errors.append(repr(exc))
    threads = [threading.Thread(target=run, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    assert _wait_for(lambda: len(finished) >= 100)
    victim, victim_base = hubs[1]
    victim.kill()                                      # SIGKILL: no shutdown, connections cut
    victim.wait()
    alive.remove(victim_base)
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert app.hub.jobs.store.job_state_counts() == {"complete": 300}
    assert len(set(received)) == 300 and len(received) == len(set(received))      # never handed out twice


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def anon(app):
    return webtest.TestApp(app)


def token_headers(app, role, client_id=None, **perms):
    """Make a client with ``role`` and return the Authorization header of a real access token."""
    client_id = client_id or f"{role}-{uuid.uuid4().hex[:6]}"
    secret = app.hub.auth.add_client(client_id, role)
    if perms:
        with app.hub.db.write() as db:
            for key, value in perms.items():
                db.execute(f"UPDATE clients SET {key} = ? WHERE client_id = ?", (json.dumps(value), client_id))
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    answer = webtest.TestApp(app).post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"})
    return {"Authorization": "Bearer " + answer.json["access_token"]}


class Client:
    """A TestApp that sends one identity's headers on every request."""

    def __init__(self, app, headers):
        self.test = webtest.TestApp(app)
        self.headers = headers

    def __getattr__(self, name):
        method = getattr(self.test, name)

        def call(*args, **kw):
            kw["headers"] = {**self.headers, **kw.get("headers", {})}
            return method(*args, **kw)
        return call


@pytest.fixture
def agent(app):
    """An authenticated agent named agent1 that listens on q1 (cookie set)."""
    client = Client(app, token_headers(app, "agent", "agent1"))
    client.post_json("/v1/agents/data/agent1", {"state": "waiting", "queues": ["q1", "q2"]})
    return client


@pytest.fixture
def admin(app):
    return Client(app, token_headers(app, "admin"))


def submit(client, **job):
    job.setdefault("job_queue", "q1")
    return client.post_json("/v1/job", job).json["job_id"]


@pytest.fixture
def server(make_app):
    """A real agenthub server on a free loopback port."""
    app = make_app()
    httpd = agenthub.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def call_http(base, method, path, body=None, headers=None):
    """One request with urllib; returns (status, headers, bytes)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if isinstance(body, (dict, list)):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


# == Configuration ==================================================================================

def test_config_from_env_reads_variables_and_overrides():
    config = Config.from_env({"AGENTHUB_DB": "/tmp/x.db", "AGENTHUB_PORT": "9000",
                              "AGENTHUB_REQUIRE_AUTH": "yes"}, port=9100)
    assert (config.db, config.port, config.require_auth) == ("/tmp/x.db", 9100, True)
    with pytest.raises(SystemExit, match="AGENTHUB_PORT"):
        Config.from_env({"AGENTHUB_PORT": "eighty"})


def test_iso_has_exactly_one_zone_designator():
    assert agenthub.iso(0) == "1970-01-01T00:00:00Z"
    assert agenthub.parse_iso("1970-01-01T00:00:10") == 10
    assert agenthub.parse_iso("1970-01-01T01:00:10+01:00") == 10


# == Storage ========================================================================================

def test_file_database_is_wal_and_migrated(tmp_path, make_app):
    path = str(tmp_path / "hub.db")
    app = make_app(db=path, purge_interval=0)
    submit(webtest.TestApp(app))
    app.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(agenthub.MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    # Reopening keeps the data and runs no migration twice.
    app = make_app(db=path, purge_interval=0)
    assert len(webtest.TestApp(app).get("/v1/job/search").json) == 1
    app.close()


def test_migrating_an_older_database_gives_existing_agents_their_ids(tmp_path, make_app):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for script in agenthub.MIGRATIONS[:3]:                     # a database from before the registry
        for statement in agenthub._split_sql(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO agents (name, state, queues, updated_at) VALUES ('old-agent', 'waiting', '[\"q\"]', ?)",
                 (time.time(),))
    conn.commit()
    conn.close()
    app = make_app(db=path, purge_interval=0)
    try:
        row = app.hub.registry.find("name", "old-agent")
        assert agenthub.PFID_PATTERN.match(row["pfid"]) and uuid.UUID(row["uuid"]) and row["tf"] == 1
        test = webtest.TestApp(app)
        assert test.get("/v1/agents/data/old-agent").json["state"] == "waiting"
        details = test.get(f"/api/v1/agent/{row['pfid']}").json["details"]
        assert details["name"] == "old-agent" and agenthub.PFID_PATTERN.match(details["environment_id"])
        job_id = submit(test, job_queue="q")
        agent = Client(app, token_headers(app, "agent", "old-agent"))
        assert agent.get("/v1/job?queue=q", headers={"Cookie": "agent_name=old-agent"}).json["job_id"] == job_id
        assert test.get(f"/api/v1/agent/{row['pfid']}").json["details"]["instance_counts"]["active"] == 1
        version = app.hub.db.read_one("PRAGMA user_version")[0]
        assert version == len(agenthub.MIGRATIONS)
    finally:
        app.close()


def test_migrating_jobs_of_an_older_database_makes_them_first_attempts(tmp_path, make_app):
    path = str(tmp_path / "v6.db")
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    for step in agenthub.MIGRATIONS[:6]:                        # a database of the previous release
        if callable(step):
            step(conn, agenthub.Database.ddl)
        else:
            for statement in agenthub._split_sql(step):
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    job_id, now = str(uuid.uuid4()), time.time()
    conn.execute("INSERT INTO jobs (job_id, created_at, started_at, job_queue, state, client_id, job_data,"
                 " result_status, agent_name) VALUES (?, ?, ?, 'q', 'complete', NULL, ?, '{\"test\": 0}', 'a1')",
                 (job_id, now - 60, now - 50, json.dumps({"job_queue": "q", "job_id": job_id})))
    conn.execute("INSERT INTO log_fragments (job_id, log_type, phase, fragment_number, timestamp, log_data,"
                 " inserted_at) VALUES (?, 'output', 'test', 0, ?, 'old log', ?)", (job_id, now, now))
    conn.commit()
    conn.close()
    app = make_app(db=path)
    test = webtest.TestApp(app)
    assert test.get(f"/v1/result/{job_id}/status").json == {"job_state": "complete", "test_status": 0}
    assert test.get(f"/v1/events/job/{job_id}").json == {"job_id": job_id, "events": []}
    submit(test, job_queue="q", job_id=job_id)
    assert test.get(f"/v1/result/{job_id}?attempt=1").json["test_output"] == "old log"
    assert [a["attempt"] for a in test.get(f"/v1/job/{job_id}/attempts").json] == [1, 2]


def test_failed_write_transaction_leaves_nothing(app):
    store = app.hub.db
    with pytest.raises(RuntimeError):
        with store.write() as db:
            db.execute("INSERT INTO restricted_queues (name) VALUES ('x')")
            raise RuntimeError("boom")
    assert store.read("SELECT * FROM restricted_queues") == []


@pytest.mark.parametrize("where", [":memory:", "file"])
def test_a_read_inside_a_write_sees_it_and_a_write_inside_a_write_joins_it(tmp_path, where, make_app):
    """Borrowing is re-entrant per thread: the same on :memory: (a pool of one) as on a file."""
    app = make_app(db=where if where == ":memory:" else str(tmp_path / "hub.db"), purge_interval=0)
    store = app.hub.db
    try:
        done = threading.Event()

        def work():
            with store.write() as db:
                db.execute("INSERT INTO restricted_queues (name) VALUES ('inner')")
                assert [r[0] for r in store.read("SELECT name FROM restricted_queues")] == ["inner"]
                with store.write() as again:
                    again.execute("INSERT INTO restricted_queues (name) VALUES ('nested')")
            done.set()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        assert done.wait(10), "a read inside a write never got a connection"
        assert sorted(r[0] for r in store.read("SELECT name FROM restricted_queues")) == ["inner", "nested"]
        with pytest.raises(RuntimeError):              # and a failing outer step undoes the nested one
            with store.write():
                with store.write() as again:
                    again.execute("INSERT INTO restricted_queues (name) VALUES ('undone')")
                raise RuntimeError("second step failed")
        assert "undone" not in [r[0] for r in store.read("SELECT name FROM restricted_queues")]
    finally:
        app.close()


def test_secret_key_is_kept_beside_the_database_not_in_it(tmp_path, make_app):
    path = str(tmp_path / "hub.db")
    first = make_app(db=path, purge_interval=0)
    key = first.hub.auth.key
    first.close()
    key_file = tmp_path / "hub.db.key"
    assert key_file.read_text().strip() == key and len(key) == 64
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert key.encode() not in (tmp_path / "hub.db").read_bytes()
    second = make_app(db=path, purge_interval=0)
    assert second.hub.auth.key == key
    second.close()
    configured = make_app(db=path, secret_key="given", purge_interval=0)
    assert configured.hub.auth.key == "given"
    configured.close()


# == Validation =====================================================================================

def test_integer_coercion_is_marshmallows():
    field = agenthub.Integer()
    assert field.load("10") == 10 and field.load(3.0) == 3
    for bad in (True, 1.5, "x", [], {}):
        with pytest.raises(agenthub.Invalid):
            field.load(bad)


@pytest.mark.parametrize("text,seconds", [("1800", 1800), ("30m", 1800), ("1h30m", 5400), ("2 days", 172800),
                                          ("4d", 345600), (90, 90), ("10sec", 10), ("1hour", 3600)])
def test_duration_strings(text, seconds):
    assert agenthub.Duration().load(text) == seconds


@pytest.mark.parametrize("bad", ["", "-5", -5, "5x", "h", "1h-2m", True])
def test_duration_rejects(bad):
    with pytest.raises(agenthub.Invalid, match="Invalid duration format"):
        agenthub.Duration().load(bad)


def test_url_field_needs_a_tld_or_ip():
    url = agenthub.URL()
    assert url.load("http://example.com/img") == "http://example.com/img"
    assert url.load("http://10.1.2.3:8000/x")
    with pytest.raises(agenthub.Invalid):
        url.load("http://x/img")


# == Auth ===========================================================================================

def test_client_secret_is_stored_hashed(app):
    secret = app.hub.auth.add_client("someone", "contributor", "a-secret-of-some-length")
    stored = app.hub.auth.store.get_client("someone")["secret_hash"]
    assert secret not in stored and stored.startswith("scrypt$")
    assert agenthub.check_secret(secret, stored) and not agenthub.check_secret("wrong", stored)


def test_token_and_refresh_flow(app, anon):
    secret = app.hub.auth.add_client("c1", "manager")
    basic = base64.b64encode(b"c1:" + secret.encode()).decode()
    answer = anon.post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"}).json
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 600
    assert len(answer["refresh_token"]) == 48 and answer["refresh_token"].isalnum()
    claims = agenthub.jwt_decode(answer["access_token"], app.hub.auth.key, 0, time.time())
    assert claims["sub"] == "access_token" and claims["permissions"]["role"] == "manager"
    assert claims["exp"] - claims["iat"] == 600
    # The database holds only a hash of the refresh token.
    stored = app.hub.db.read("SELECT token_hash FROM refresh_tokens")
    assert [r[0] for r in stored] == [hashlib.sha256(answer["refresh_token"].encode()).hexdigest()]
    refreshed = anon.post_json("/v1/oauth2/refresh", {"refresh_token": answer["refresh_token"]}).json
    assert set(refreshed) == {"access_token", "token_type", "expires_in"}


@pytest.mark.parametrize("header,message", [
    (None, "No authorization header specified"),
    ("Bearer abc", "Client id and key must be specified in authorization header"),
    ("Basic !!!", "Client id and key must be specified in authorization header"),
    ("Basic " + base64.b64encode(b"nobody:secret").decode(), "Invalid client id or client key"),
])
def test_token_errors_are_plain_text_401(anon, header, message):
    answer = anon.post("/v1/oauth2/token", headers={"Authorization": header} if header else {}, status=401)
    assert answer.text == message and answer.content_type == "text/html"


def test_wrong_secret_is_refused(app, anon):
    app.hub.auth.add_client("c2", "admin", "right-secret-1234567")
    basic = base64.b64encode(b"c2:wrong").decode()
    assert anon.post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"},
                     status=401).text == "Invalid client id or client key"


def test_refresh_errors(app, anon):
    assert anon.post_json("/v1/oauth2/refresh", {"refresh_token": "nope"}, status=400).json == {
        "detail": {}, "message": "Invalid refresh token."}
    assert "refresh_token" in anon.post_json("/v1/oauth2/refresh", {"refresh_token": {"$ne": 1}},
                                             status=422).json["detail"]["json"]
    anon.post_json("/v1/oauth2/refresh", {}, status=422)
    app.hub.auth.add_client("c3", "agent")
    token = app.hub.auth.refresh_token("c3", days=-1)
    assert anon.post_json("/v1/oauth2/refresh", {"refresh_token": token},
                          status=400).json["message"] == "Refresh token expired"
    token = app.hub.auth.refresh_token("c3")
    with app.hub.db.write() as db:
        db.execute("UPDATE refresh_tokens SET revoked = 1")
    assert anon.post_json("/v1/oauth2/refresh", {"refresh_token": token},
                          status=400).json["message"] == "Refresh token revoked."


def _token(app, **claims):
    now = int(time.time())
    base = {"exp": now + 600, "iat": now, "sub": "access_token",
            "permissions": {"client_id": "x", "role": "contributor"}}
    base.update(claims)
    return {"Authorization": "Bearer " + agenthub.jwt_encode({k: v for k, v in base.items() if v is not None},
                                                             app.hub.auth.key)}


def test_jwt_errors_answer_as_the_original(app, anon):
    now = int(time.time())
    cases = [
        (_token(app, exp=now - 10), 401, "Token has expired"),
        (_token(app, iat=now + 60), 401, "Token not yet valid"),
        (_token(app, sub=None), 403, "Token missing required claim: sub"),
        (_token(app, permissions={"role": "admin"}), 403, "Invalid Token"),   # the original: 500
        ({"Authorization": "Bearer not-a-token"}, 403, "Unable to decode token"),
        ({"Authorization": "Bearer " + agenthub.jwt_encode({"exp": now + 60, "iat": now, "sub": "a"}, "other")},
         403, "Invalid Token signature"),
    ]
    for headers, status, message in cases:
        assert anon.get("/v1/job/search", headers=headers, status=status).json["message"] == message
    # Within the leeway an expired token still works.
    anon.get("/v1/job/search", headers=_token(app, exp=now - 2), status=200)


# Every route of this issue with the roles that may call it (spec §2.1).
AMC, AMA, AGENT, ALL = agenthub.AMC, agenthub.AMA, agenthub.AGENT, agenthub.ROLES
ROUTES = [
    ("POST", "/v1/job", AMC), ("GET", "/v1/job?queue=q1", AGENT),
    ("GET", f"/v1/job/{ANY_UUID}", AMC), ("GET", f"/v1/job/{ANY_UUID}/attachments", AGENT),
    ("POST", f"/v1/job/{ANY_UUID}/attachments", AMC), ("GET", f"/v1/job/{ANY_UUID}/position", AMC),
    ("POST", f"/v1/job/{ANY_UUID}/action", AMC), ("GET", "/v1/job/search", AMC),
    ("POST", f"/v1/result/{ANY_UUID}", AGENT), ("GET", f"/v1/result/{ANY_UUID}", ALL),
    ("GET", f"/v1/result/{ANY_UUID}/status", ALL), ("GET", f"/v1/events/job/{ANY_UUID}", ALL),
    ("GET", f"/v1/job/{ANY_UUID}/estimate", AMC), ("GET", f"/v1/job/{ANY_UUID}/attempts", AMC),
    ("GET", "/v1/queues/summary", AMC),
    ("POST", f"/v1/result/{ANY_UUID}/log/output", AGENT), ("GET", f"/v1/result/{ANY_UUID}/log/serial", AMC),
    ("POST", f"/v1/result/{ANY_UUID}/artifact", AGENT), ("GET", f"/v1/result/{ANY_UUID}/artifact", AMC),
    ("GET", "/v1/agents/queues", AMC), ("POST", "/v1/agents/queues", AMA),
    ("GET", "/v1/agents/images/q1", AMC), ("POST", "/v1/agents/images", AMA),
    ("GET", "/v1/agents/data", AMC), ("GET", "/v1/agents/data/a1", ALL), ("POST", "/v1/agents/data/a1", AMA),
    ("POST", "/v1/agents/provision_logs/a1", AGENT), ("GET", "/v1/queues/wait_times", AMC),
    ("GET", "/v1/queues/q1/agents", AMC), ("GET", "/v1/queues/q1/jobs", AMC),
    ("POST", f"/v1/job/{ANY_UUID}/events", AGENT), ("POST", "/v1/oauth2/revoke", ("admin",)),
    ("GET", "/v1/restricted-queues", AMC), ("GET", "/v1/restricted-queues/q1", AMC),
    ("POST", "/v1/restricted-queues/q1", ("admin", "manager")),
    ("DELETE", "/v1/restricted-queues/q1", ("admin", "manager")),
    ("GET", "/v1/client-permissions", ("admin", "manager")),
    ("GET", "/v1/client-permissions/someone", ("admin", "manager")),
    ("PUT", "/v1/client-permissions/someone", ("admin", "manager")),
    ("DELETE", "/v1/client-permissions/someone", ("admin",)),
    ("PUT", "/v1/secrets/someone/a/b", ("contributor", "manager", "admin")),
    ("DELETE", "/v1/secrets/someone/a/b", ("contributor", "manager", "admin")),
]
PUBLIC = [("GET", "/v1"), ("POST", "/v1/oauth2/token"), ("POST", "/v1/oauth2/refresh")]


@pytest.fixture(scope="module", params=[False, True], ids=["default", "require-auth"])
def matrix(request):
    """One app per mode for the whole matrix, with an access token minted directly for each role."""
    app = create_app(require_auth=request.param, purge_interval=0, lost_contact_seconds=0)
    callers = {role: {"Authorization": "Bearer " + app.hub.auth.access_token({"client_id": f"{role}-m",
                                                                                "role": role})} for role in ALL}
    callers["anonymous"] = {}
    callers["not-bearer"] = {"Authorization": "Token abc"}
    yield webtest.TestApp(app), callers, request.param
    app.close()


@pytest.mark.parametrize("method,path,roles", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_role_matrix(matrix, method, path, roles):
    test, callers, require_auth = matrix
    for who, headers in callers.items():
        answer = test.request(path, method=method, headers=headers, expect_errors=True)
        allowed = who in roles or (who == "anonymous" and "contributor" in roles and not require_auth)
        if allowed:
            assert answer.status_int not in (401, 403) or "requires role" not in answer.text \
                and "Authentication is required" not in answer.text, (who, answer.text)
        elif require_auth and who in ("anonymous", "not-bearer"):
            assert answer.status_int == 401, (who, answer.status)
            assert answer.json["message"] == "Authentication is required for specified endpoint"
        else:
            assert answer.status_int == 403, (who, answer.status)
            assert answer.json["message"] == "Specified action requires role: " + ", ".join(roles)
    for method, path in PUBLIC:            # public in both modes: never a role error
        answer = test.request(path, method=method, expect_errors=True)
        assert "requires role" not in answer.text and "Authentication is required" not in answer.text


def test_require_auth_mode_refuses_anonymous(tmp_path, make_app):
    app = make_app(require_auth=True, purge_interval=0)
    test = webtest.TestApp(app)
    assert test.post_json("/v1/job", {"job_queue": "q"}, status=401).json["message"] == \
        "Authentication is required for specified endpoint"
    test.get("/v1/", status=200)                           # public stays public
    Client(app, token_headers(app, "contributor")).post_json("/v1/job", {"job_queue": "q"}, status=200)
    app.close()


# The README's table "Who may do what": every API × anonymous / wrong / right credential × both modes.
# Each row: (API, method, path, body, how a credential is sent, the right credential's role,
# expected status for (anonymous, wrong, right) in the default mode, then with --require-auth).
AUTH_TABLE = [
    ("testflinger", "POST", "/v1/job", {"job_queue": "q"}, "bearer", "contributor", (200, 403, 200), (401, 403, 200)),
    ("testflinger", "GET", "/v1/agents/data", None, "bearer", "contributor", (200, 403, 200), (401, 403, 200)),
    ("prefactor", "GET", "/api/v1/agent", None, "bearer", "contributor", (200, 200, 200), (401, 401, 200)),
    ("prefactor", "POST", "/api/v1/agent", {"details": {"name": "{uniq}"}}, "bearer", "manager",
     (200, 200, 200), (401, 401, 200)),
    ("prefactor", "POST", "/api/v1/agent_instance/register", {"agent_id": "{pfid}"}, "bearer", "agent",
     (200, 200, 200), (401, 401, 200)),
    ("rackspace", "POST", "/v2/p1/agents/a1/events", {"event": "startup"}, "x-auth-token", "agent",
     (401, 202, 202), (401, 401, 202)),
    ("rackspace", "GET", "/v2/p1/agents", None, "x-auth-token", "contributor", (401, 200, 200), (401, 401, 200)),
    ("consul", "PUT", "/v1/event/fire/deploy", None, "x-consul-token", "manager", (200, 403, 200), (403, 403, 200)),
    ("consul", "GET", "/v1/event/list", None, "x-consul-token", "agent", (200, 403, 200), (200, 403, 200)),
    ("gocd", "GET", "/api/server_health_messages", None, "bearer", "agent", (200, 200, 200), (401, 401, 200)),
    ("web", "GET", "/jobs", None, "none", None, (200, 200, 200), (303, 303, 303)),
]


@pytest.mark.parametrize("require_auth", [False, True], ids=["default", "require-auth"])
def test_auth_table(require_auth, make_app):
    app = make_app(require_auth=require_auth, lost_contact_seconds=0)
    test = webtest.TestApp(app)
    admin = token_headers(app, "admin")
    pfid = test.post_json("/api/v1/agent", {"details": {"name": "pf"}}, headers=admin).json["details"]["id"]
    wrong = agenthub.jwt_encode({"exp": int(time.time()) + 60, "iat": int(time.time()), "sub": "access_token",
                                 "permissions": {"client_id": "admin", "role": "admin"}}, "not-the-key")
    for api, method, path, body, how, role, default, closed in AUTH_TABLE:
        expected = closed if require_auth else default
        right = token_headers(app, role)["Authorization"][7:] if role else None
        for who, token in zip(("anonymous", "wrong", "right"), (None, wrong, right)):
            headers = {}
            if token and how == "bearer":
                headers["Authorization"] = "Bearer " + token
            elif token and how == "x-auth-token":
                headers.update({"X-Auth-Token": token, "X-Agent-Id": "a1"})
            elif token and how == "x-consul-token":
                headers["X-Consul-Token"] = token
            data = json.dumps(body).replace("{pfid}", pfid).replace("{uniq}", uuid.uuid4().hex).encode() if body is not None else b""
            answer = test.request(path, method=method, headers={**headers, "Content-Type": "application/json"},
                                  body=data, expect_errors=True)
            assert answer.status_int == expected[("anonymous", "wrong", "right").index(who)], \
                (api, method, path, who, answer.status, answer.text[:200])
    # A role below the one a write needs is refused in the API's own words.
    contributor = token_headers(app, "contributor")
    answer = test.post_json("/api/v1/agent", {"details": {"name": "u"}}, headers=contributor, expect_errors=True)
    assert answer.status_int == (403 if require_auth else 200)
    if require_auth:
        assert answer.json["code"] == "forbidden"
        answer = test.post_json("/v2/p1/agents/a1/events", {"event": "startup"}, status=403,
                                headers={"X-Auth-Token": contributor["Authorization"][7:], "X-Agent-Id": "a1"})
        assert answer.json == {"message": "Forbidden."}
        answer = test.put("/v1/event/fire/x", headers={"X-Consul-Token": contributor["Authorization"][7:]},
                          status=403)
        assert answer.text == "Permission denied" and answer.headers["X-Consul-Default-Acl-Policy"] == "deny"
        # Anonymous reads of the event list see nothing (Consul's default deny filters).
        assert test.get("/v1/event/list").json == []
    # A static --api-token closes /api/v1 in the default mode too, and client tokens still work there.
    if not require_auth:
        app2 = make_app(api_tokens="T1", rackspace_tokens="R1:p1")
        test2 = webtest.TestApp(app2)
        test2.get("/api/v1/agent", status=401)
        test2.get("/api/v1/agent", headers={"Authorization": "Bearer T1"}, status=200)
        test2.get("/api/v1/agent", headers=token_headers(app2, "contributor"), status=200)
        test2.get("/v2/p1/agents", headers={"X-Auth-Token": "R1"}, status=200)
        test2.get("/v2/p1/agents", headers={"X-Auth-Token": "x"}, status=401)
        test2.get("/v2/p1/agents", headers={"X-Auth-Token": token_headers(app2, "agent")["Authorization"][7:]},
                  status=200)


def test_serve_refuses_require_auth_without_clients_and_says_what_is_open(tmp_path):
    db = str(tmp_path / "hub.db")
    run = subprocess.run([sys.executable, agenthub.__file__, "--db", db, "--port", "0", "--require-auth"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "no client can log in" in run.stderr and "Traceback" not in run.stderr
    proc = subprocess.Popen([sys.executable, agenthub.__file__, "--db", db, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("agenthub: open to anyone who can reach it: /v1") and "/api/v1 (no --api-token)" in line
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# == Access control: client permissions, restricted queues, revoke, secrets, webhooks ===============================

def test_client_permissions_crud(app):
    admin = Client(app, token_headers(app, "admin", "boss"))
    answer = admin.put_json("/v1/client-permissions/ci-bot", {
        "client_secret": "a-long-enough-secret", "max_priority": {"*": 10, "lab": 50},
        "max_reservation_time": {"lab": 40000}, "role": "contributor", "email": "ci@example.com"})
    assert answer.text == "Created permissions for client 'ci-bot'" and answer.content_type == "text/html"
    assert admin.get("/v1/client-permissions/ci-bot").json == {
        "client_id": "ci-bot", "max_priority": {"*": 10, "lab": 50}, "max_reservation_time": {"lab": 40000},
        "role": "contributor", "email": "ci@example.com"}
    assert admin.put_json("/v1/client-permissions/ci-bot", {"max_priority": {"*": 3}}).text == \
        "Updated permissions for client 'ci-bot'"
    got = admin.get("/v1/client-permissions/ci-bot").json
    assert got["max_priority"] == {"*": 3} and got["email"] == "ci@example.com"     # merged
    listing = admin.get("/v1/client-permissions").json
    assert {c["client_id"] for c in listing} == {"boss", "ci-bot"}
    assert all("secret_hash" not in c and "client_secret" not in c for c in listing)
    # The secret set through the API works for logging in, and a new one replaces it.
    for secret in ("a-long-enough-secret", "another-long-secret"):
        if secret != "a-long-enough-secret":
            admin.put_json("/v1/client-permissions/ci-bot", {"client_secret": secret})
        basic = base64.b64encode(f"ci-bot:{secret}".encode()).decode()
        webtest.TestApp(app).post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"})
    basic = base64.b64encode(b"ci-bot:a-long-enough-secret").decode()
    webtest.TestApp(app).post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"}, status=401)
    assert admin.delete("/v1/client-permissions/ci-bot").text == "OK"
    assert admin.get("/v1/client-permissions/ci-bot", status=404).json["message"] == \
        "Error: Specified client_id does not exist."
    assert admin.delete("/v1/client-permissions/ci-bot", status=404).json["message"] == \
        "Error: Specified client_id does not exist."


@pytest.mark.parametrize("body,errors", [
    ({"client_secret": "short"}, {"client_secret": ["Shorter than minimum length 15."]}),
    ({"role": "king"}, {"role": ["Must be one of: admin, manager, contributor, agent."]}),
    ({"email": "nope"}, {"email": ["Not a valid email address."]}),
    ({"max_priority": {"*": "high"}}, {"max_priority": {"*": {"value": ["Not a valid integer."]}}}),
    ({"allowed_queues": ["x"]}, {"allowed_queues": ["Unknown field."]}),
])
def test_client_permissions_validation(app, body, errors):
    admin = Client(app, token_headers(app, "admin"))
    assert admin.put_json("/v1/client-permissions/x", body, status=422).json["detail"] == {"json": errors}


def test_client_permissions_role_hierarchy(app):
    manager = Client(app, token_headers(app, "manager", "mgr"))
    admin = Client(app, token_headers(app, "admin", "boss"))
    assert manager.put_json("/v1/client-permissions/new", {"role": "agent"}, status=400).json["message"] == \
        "Error: Missing client_secret in request body for new client"
    manager.put_json("/v1/client-permissions/new", {"client_secret": "x" * 15, "role": "manager"})
    assert manager.put_json("/v1/client-permissions/new", {"role": "admin"}, status=403).json["message"] == \
        "mgr has insufficient permissions to assign role 'admin' to client 'new'"
    admin.put_json("/v1/client-permissions/top", {"client_secret": "x" * 15, "role": "admin"})
    assert manager.put_json("/v1/client-permissions/top", {"max_priority": {"*": 1}}, status=403).json[
        "message"] == "mgr has insufficient permissions to modify client 'top'"
    for call in (admin.put_json("/v1/client-permissions/testflinger-admin", {"role": "agent"}, status=422),
                 admin.delete("/v1/client-permissions/testflinger-admin", status=422)):
        assert call.json["message"].startswith("Error: System admin client cannot by")
    manager.delete("/v1/client-permissions/new", status=403)


def test_new_permissions_apply_at_the_next_token(app):
    admin = Client(app, token_headers(app, "admin"))
    admin.put_json("/v1/client-permissions/ci", {"client_secret": "s" * 15})
    basic = {"Authorization": "Basic " + base64.b64encode(b"ci:" + b"s" * 15).decode()}
    test = webtest.TestApp(app)
    old = {"Authorization": "Bearer " + test.post("/v1/oauth2/token", headers=basic).json["access_token"]}
    admin.put_json("/v1/client-permissions/ci", {"max_priority": {"*": 5}})
    test.post_json("/v1/job", {"job_queue": "q", "job_priority": 5}, headers=old, status=403)
    # A new token carries the new permissions.
    new = {"Authorization": "Bearer " + test.post("/v1/oauth2/token", headers=basic).json["access_token"]}
    test.post_json("/v1/job", {"job_queue": "q", "job_priority": 5}, headers=new, status=200)


def test_restricted_queues(app, agent):
    manager = Client(app, token_headers(app, "manager", "mgr"))
    anon = webtest.TestApp(app)
    app.hub.auth.add_client("team", "contributor")
    assert anon.get("/v1/restricted-queues").json == []
    assert manager.post_json("/v1/restricted-queues/q1", {"client_id": ""}, status=400).json["message"] == \
        "Error: Missing client ID."
    manager.post_json("/v1/restricted-queues/q1", {}, status=422)
    assert manager.post_json("/v1/restricted-queues/q1", {"client_id": "ghost"}, status=404).json["message"] == \
        "Error: Specified client_id does not exist."
    assert manager.post_json("/v1/restricted-queues/nowhere", {"client_id": "team"}, status=404).json[
        "message"] == "Error: No agent is associated with the specified queue."
    assert manager.post_json("/v1/restricted-queues/q1", {"client_id": "team"}).text == "OK"
    assert anon.get("/v1/restricted-queues").json == [{"queue": "q1", "owners": ["team"]}]
    assert anon.get("/v1/restricted-queues/q1").json == {"queue": "q1", "owners": ["team"]}
    assert anon.get("/v1/restricted-queues/q2", status=404).json["message"] == "Error: Restricted queue not found."
    assert anon.get("/v1/agents/data/agent1").json["restricted_to"] == {"q1": ["team"]}
    assert app.hub.auth.permissions("team")["allowed_queues"] == ["q1"]
    anon.post_json("/v1/job", {"job_queue": "q1"}, status=401)
    team = Client(app, token_headers(app, "contributor", "team"))
    submit(team, job_queue="q1")
    assert manager.delete_json("/v1/restricted-queues/q2", {"client_id": "team"}, status=404).json[
        "message"] == "Error: Restricted queue not found."
    assert manager.delete_json("/v1/restricted-queues/q1", {"client_id": ""}, status=400).status_int == 400
    assert manager.delete_json("/v1/restricted-queues/q1", {"client_id": "team"}).text == "OK"
    assert anon.get("/v1/restricted-queues").json == []
    assert app.hub.auth.permissions("team")["allowed_queues"] == []
    submit(anon, job_queue="q1")


def test_revoke_refresh_tokens(app):
    admin = Client(app, token_headers(app, "admin"))
    app.hub.auth.add_client("agent9", "agent")
    token = app.hub.auth.refresh_token("agent9")
    anon = webtest.TestApp(app)
    anon.post_json("/v1/oauth2/refresh", {"refresh_token": token})
    last = app.hub.db.read_one("SELECT last_accessed FROM refresh_tokens WHERE client_id = 'agent9'")[0]
    assert last > time.time() - 5
    assert admin.post_json("/v1/oauth2/revoke", {"refresh_token": token}).json == {"status": "OK"}
    assert anon.post_json("/v1/oauth2/refresh", {"refresh_token": token}, status=400).json["message"] == \
        "Refresh token revoked."
    assert admin.post_json("/v1/oauth2/revoke", {"refresh_token": token}, status=400).json["message"] == \
        "Refresh token has already been revoked"
    assert admin.post_json("/v1/oauth2/revoke", {"refresh_token": "zzz"}, status=400).json["message"] == \
        "Refresh token not found"
    admin.post_json("/v1/oauth2/revoke", {}, status=422)


@pytest.mark.parametrize("path", ["lab/token////", "lab/token/", "lab//token", "/lab"])
def test_secret_paths_with_empty_segments_or_trailing_slashes_are_refused(app, path):
    """The original answers 422 for these; the optional trailing slash of other routes must not loosen that."""
    alice = Client(app, token_headers(app, "contributor", "alice"))
    answer = alice.put_json(f"/v1/secrets/alice/{path}", {"value": "v"}, status=422)
    assert "not a valid path" in answer.json["message"]
    alice.delete(f"/v1/secrets/alice/{path}", status=422)


def test_secrets_lifecycle(app, anon):
    alice = Client(app, token_headers(app, "contributor", "alice"))
    bob = Client(app, token_headers(app, "contributor", "bob"))
    agent = Client(app, token_headers(app, "agent", "agent1"))
    agent.post_json("/v1/agents/data/agent1", {"queues": ["q1"]})
    answer = alice.put_json("/v1/secrets/alice/lab/token", {"value": "s3cr3t-value"})
    expires = agenthub.parse_iso(answer.json["expires_at"])
    assert abs(expires - (time.time() + 365 * 86400)) < 60
    assert alice.put_json("/v1/secrets/alice/lab/once", {"value": "one-time", "ephemeral": True}).json == {
        "expires_at": None}
    assert alice.put_json("/v1/secrets/alice/lab/forever", {"value": "v", "expire_after": None}).json == {
        "expires_at": None}
    # Stored encrypted: neither the value nor its bytes are in the row.
    stored = app.hub.db.read_one("SELECT value FROM secrets WHERE path = 'lab/token'")[0]
    assert b"s3cr3t-value" not in stored and stored != b"s3cr3t-value"
    job_id = submit(alice, test_data={"secrets": {"TOKEN": "lab/token", "ONCE": "lab/once"}})
    definition = alice.get(f"/v1/job/{job_id}").json
    assert definition["test_data"]["secrets"] == {"TOKEN": "lab/token", "ONCE": "lab/once"}    # paths only
    assert "s3cr3t" not in alice.get(f"/v1/result/{job_id}").text
    submit(alice, test_data={"secrets": {"ONCE": "lab/once"}})
    popped = agent.get("/v1/job?queue=q1").json
    assert popped["test_data"]["secrets"] == {"TOKEN": "s3cr3t-value", "ONCE": "one-time"}
    assert popped["client_id"] == "alice"
    second = agent.get("/v1/job?queue=q1").json            # the single-use secret is gone
    assert second["test_data"]["secrets"] == {"ONCE": ""}
    # Errors.
    assert bob.put_json("/v1/secrets/alice/lab/token", {"value": "x"}, status=403).json["message"] == \
        "'alice' doesn't match authenticated client id"
    assert anon.put_json("/v1/secrets/alice/lab/token", {"value": "x"}, status=401).json["message"].startswith(
        "A login (known client_id) is required")
    alice.put_json("/v1/secrets/alice/bad path", {"value": "x"}, status=422)
    alice.put_json("/v1/secrets/alice/a//b", {"value": "x"}, status=422)
    alice.put_json("/v1/secrets/alice/a", {"value": ""}, status=422)
    assert alice.put_json("/v1/secrets/alice/a", {"value": "x", "ephemeral": True, "expire_after": 5},
                          status=422).json["detail"]["json"]["_schema"] == [
        "Provide either 'ephemeral' or 'expire_after', not both."]
    alice.put_json("/v1/secrets/alice/a", {"value": "x", "expire_after": 0}, status=422)
    # Expiry and delete.
    alice.put_json("/v1/secrets/alice/short", {"value": "x", "expire_after": 1})
    with app.hub.db.write() as db:
        db.execute("UPDATE secrets SET expires_at = ? WHERE path = 'short'", (time.time() - 1,))
    assert alice.post_json("/v1/job", {"job_queue": "q1", "test_data": {"secrets": {"S": "short"}}},
                           status=422).json["message"] == "Inaccessible secret paths: short"
    assert alice.delete("/v1/secrets/alice/lab/token").text == "OK"
    assert alice.post_json("/v1/job", {"job_queue": "q1", "test_data": {"secrets": {"T": "lab/token"}}},
                           status=422).status_int == 422
    bob.delete("/v1/secrets/alice/lab/forever", status=403)


def test_secret_box_rejects_tampering():
    box = agenthub.SecretBox("key")
    sealed = box.seal("alice", "p", "value \u00e9")
    assert box.open("alice", "p", sealed) == "value \u00e9"
    assert box.open("bob", "p", sealed) is None and box.open("alice", "q", sealed) is None
    assert agenthub.SecretBox("other").open("alice", "p", sealed) is None
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert box.open("alice", "p", flipped) is None
    assert box.seal("alice", "p", "value") != box.seal("alice", "p", "value")          # fresh nonce


class Receiver:
    """A tiny local HTTP server that records requests and answers as told."""

    def __init__(self, status=200, body=b"received", delay=0, location=None):
        import http.server
        self.requests, outer = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path, dict(self.headers), data))
                time.sleep(delay)
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_PUT = do_POST = do_GET = _any

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda request, address: None     # clients that time out are expected
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _events_body(url):
    return {"agent_id": "agent1", "job_queue": "q1", "job_status_webhook": url,
            "events": [{"event_name": "job_start", "timestamp": "2026-11-24T03:00:00+00:00",
                        "detail": "http://hub/jobs/x"}]}


@pytest.mark.parametrize("status,body,expect_status,expect_text", [
    (200, b"thanks", 200, "thanks"), (201, b"made", 201, "made"), (404, b"no such hook", 404, "no such hook"),
    (401, b"who?", 500, None), (403, b"no", 500, None),
])
def test_job_status_webhook_forwarding(status, body, expect_status, expect_text, make_app):
    receiver = Receiver(status, body)
    app = make_app(webhook_url=receiver.url + "/base", webhook_auth="hook-secret", purge_interval=0)
    try:
        anon = webtest.TestApp(app)
        agent = Client(app, token_headers(app, "agent", "agent1"))
        job_id = submit(anon, job_status_webhook=receiver.url + "/hooks/job")
        answer = agent.post_json(f"/v1/job/{job_id}/events", _events_body(receiver.url + "/hooks/job"),
                                 status=expect_status)
        if expect_text is None:
            assert answer.json["message"] == "Webhook authentication failed"
        else:
            assert answer.text == expect_text
        method, path, headers, data = receiver.requests[0]
        assert (method, path) == ("PUT", "/hooks/job")
        assert headers["Authorization"] == "Bearer hook-secret"
        assert json.loads(data) == {k: v for k, v in _events_body("").items() if k != "job_status_webhook"}
    finally:
        app.close()
        receiver.close()


def test_job_status_webhook_errors(make_app):
    slow = Receiver(delay=5)
    redirect = Receiver(status=302, body=b"moved", location="http://example.com/elsewhere")
    app = make_app(webhook_url=slow.url, purge_interval=0, webhook_timeout=0.3)
    try:
        anon = webtest.TestApp(app)
        agent = Client(app, token_headers(app, "agent", "agent1"))
        job_id = submit(anon)
        assert agent.post_json(f"/v1/job/{job_id}/events", _events_body(slow.url + "/x"), status=504).json[
            "message"] == "Webhook Timeout"
        assert agent.post_json(f"/v1/job/{job_id}/events", _events_body("http://example.com/x"),
                               status=403).json["message"] == "Invalid job_status_webhook URL specified"
        assert agent.post_json(f"/v1/job/{ANY_UUID}/events", _events_body(slow.url), status=404).json[
            "message"] == "Job not found"
        agent.post_json("/v1/job/bad/events", _events_body(slow.url), status=400)
        agent.post_json(f"/v1/job/{job_id}/events", {**_events_body(slow.url), "job_status_webhook": "x"},
                        status=422)
        agent.post_json(f"/v1/job/{job_id}/events", {**_events_body(slow.url), "extra": 1}, status=422)
        # A closed port: unreachable (after one retry).
        import socket
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        app.hub.config.webhook_url = closed
        assert agent.post_json(f"/v1/job/{job_id}/events", _events_body(closed + "/x"), status=502).json[
            "message"] == "Webhook unreachable"
        # A redirect is passed back, not followed.
        app.hub.config.webhook_url = redirect.url
        answer = agent.post_json(f"/v1/job/{job_id}/events", _events_body(redirect.url + "/x"), status=302)
        assert answer.text == "moved" and len(redirect.requests) == 1
        app.hub.config.webhook_url = ""
        assert agent.post_json(f"/v1/job/{job_id}/events", _events_body(redirect.url), status=500).json[
            "message"] == "Webhook URL not configured"
    finally:
        app.close()
        slow.close()
        redirect.close()


def test_a_receiver_that_does_not_speak_http_is_unreachable(make_app):
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def babble():
        for _ in range(2):                 # the first attempt and the retry
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"this is not HTTP\r\n\r\n")
            conn.close()
    threading.Thread(target=babble, daemon=True).start()
    app = make_app(webhook_url=url, purge_interval=0)
    try:
        agent = Client(app, token_headers(app, "agent", "agent1"))
        job_id = submit(webtest.TestApp(app))
        assert agent.post_json(f"/v1/job/{job_id}/events", _events_body(url + "/x"), status=502).json[
            "message"] == "Webhook unreachable"
    finally:
        app.close()
        listener.close()


def test_a_slow_webhook_does_not_block_other_requests(server):
    app, base = server
    slow = Receiver(delay=1)
    app.hub.config.webhook_url = slow.url
    headers = token_headers(app, "agent", "agent1")
    job_id = json.loads(call_http(base, "POST", "/v1/job", {"job_queue": "q"})[2])["job_id"]
    done = {}
    thread = threading.Thread(target=lambda: done.update(answer=call_http(
        base, "POST", f"/v1/job/{job_id}/events", _events_body(slow.url + "/h"), headers)))
    thread.start()
    assert _wait_for(lambda: slow.requests)          # the hub now waits on the receiver ...
    assert call_http(base, "GET", "/v1/")[0] == 200 and "answer" not in done    # ... and still answers
    thread.join()
    assert done["answer"][0] == 200
    slow.close()


# == Jobs: submit ===================================================================================

def test_submit_stores_the_whole_job(anon):
    job = {"job_queue": "q1", "name": "n", "tags": ["a", "b"], "global_timeout": "100", "debug": True,
           "provision_data": {"distro": "noble"}, "firmware_update_data": {"any": ["thing"]},
           "test_data": {"test_cmds": "true", "test_username": "u", "test_password": "p"},
           "allocate_data": {"allocate": True}, "reserve_data": {"ssh_keys": ["lp:me"], "timeout": "1h30m"},
           "job_status_webhook": "http://example.com/hook", "parent_job_id": "p"}
    job_id = anon.post_json("/v1/job", job).json["job_id"]
    assert uuid.UUID(job_id).version == 4
    stored = anon.get(f"/v1/job/{job_id}").json
    assert stored["global_timeout"] == 100 and stored["reserve_data"]["timeout"] == 5400
    assert stored["exclude_agents"] == [] and stored["job_id"] == job_id
    assert {k: v for k, v in stored.items() if k not in ("global_timeout", "reserve_data", "exclude_agents",
                                                          "job_id")} == \
        {k: v for k, v in job.items() if k not in ("global_timeout", "reserve_data")}


@pytest.mark.parametrize("body,errors", [
    (None, {"job_queue": ["Missing data for required field."]}),
    ({"job_queue": ""}, {"job_queue": ["Shorter than minimum length 1."]}),
    ({"job_queue": "q", "extra": 1}, {"extra": ["Unknown field."]}),
    ({"job_queue": 5}, {"job_queue": ["Not a valid string."]}),
    ({"job_queue": "q", "job_priority": "high"}, {"job_priority": ["Not a valid integer."]}),
    ({"job_queue": "q", "tags": ["a", 3]}, {"tags": {"1": ["Not a valid string."]}}),
    ({"job_queue": "q", "test_data": {"secrets": {"1BAD": "x"}}},
     {"test_data": {"secrets": {"1BAD": {"key": ["String does not match expected pattern."]}}}}),
    ({"job_queue": "q", "test_data": {"bogus": 1}}, {"test_data": {"bogus": ["Unknown field."]}}),
    ({"job_queue": "q", "test_data": "x"}, {"test_data": {"_schema": ["Invalid input type."]}}),
    ({"job_queue": "q", "reserve_data": {"ssh_keys": ["me"]}},
     {"reserve_data": {"ssh_keys": {"0": ["String does not match expected pattern."]}}}),
    ({"job_queue": "q", "reserve_data": {"timeout": "-5"}},
     {"reserve_data": {"timeout": ["Invalid duration format: Duration cannot be negative"]}}),
    ({"job_queue": "q", "provision_data": {"url": "http://x/y"}},
     {"provision_data": {"_schema": ["Invalid provision data schema."]}}),
    ({"job_queue": "q", "provision_data": {"jobs": []}},
     {"provision_data": {"_schema": ["Invalid provision data schema."]}}),
    ({"job_queue": "q", "job_id": 5}, {"job_id": ["Not a valid string."]}),
    ({"job_queue": "q", "exclude_agents": "a"}, {"exclude_agents": ["Not a valid list."]}),
    ([1, 2], {"_schema": ["Invalid input type."]}),
])
def test_submit_validation_errors(anon, body, errors):
    if body is None:
        answer = anon.post("/v1/job", status=422)
    else:
        answer = anon.post_json("/v1/job", body, status=422)
    assert answer.json == {"detail": {"json": errors}, "message": "Validation error"}


def test_submit_with_malformed_json_is_a_validation_error(anon):
    answer = anon.post("/v1/job", "{not json", content_type="application/json", status=422)
    assert answer.json["detail"]["json"] == {"job_queue": ["Missing data for required field."]}


@pytest.mark.parametrize("provision", [
    None, {}, {"url": "http://example.com/x.img"}, {"jobs": [{"job_queue": "a"}]},
    {"use_attachment": "img", "media": "usb"}, {"skip": True}, {"token_file": "t"},
    {"preset": "p", "url": "http://example.com/x"}, {"provision_plan": {"a": 1}, "urls": ["http://example.com/a"]},
    {"url": "http://example.com/x", "robot_tasks": ["t"], "live_image": False, "wait_until_ssh": True},
    {"alloem_url": "http://example.com/x", "robot_tasks": ["t"]}, {"preset": "p", "oem": "x"},
])
def test_each_provision_schema_is_accepted(anon, provision):
    job_id = submit(anon, provision_data=provision)
    assert anon.get(f"/v1/job/{job_id}").json["provision_data"] == provision


def test_submit_job_id_rules(anon):
    assert anon.post_json("/v1/job", {"job_queue": "q", "job_id": "nope"}, status=400).json == {
        "detail": {}, "message": "Invalid job_id specified"}
    assert uuid.UUID(submit(anon, job_id=""))
    given = str(uuid.uuid4())
    assert submit(anon, job_id=given.upper()) == given          # stored canonically


def test_submit_exclude_agents_needs_an_allowed_agent(anon, agent):
    message = "There are no agents on the specified queue that are allowed to run this job"
    assert anon.post_json("/v1/job", {"job_queue": "q1", "exclude_agents": ["agent1"]},
                          status=422).json["message"] == message
    assert anon.post_json("/v1/job", {"job_queue": "nobody", "exclude_agents": ["x"]},
                          status=422).json["message"] == message
    submit(anon, exclude_agents=["someone-else"])


def test_submit_with_secrets_needs_a_client_and_live_paths(app, anon):
    job = {"job_queue": "q", "test_data": {"secrets": {"A": "x/y", "B": "a/b", "C": "x/y"}}}
    assert anon.post_json("/v1/job", job, status=422).json["message"] == "Missing client ID (user not authenticated)"
    user = Client(app, token_headers(app, "contributor", "alice"))
    assert user.post_json("/v1/job", job, status=422).json["message"] == "Inaccessible secret paths: a/b, x/y"
    user.put_json("/v1/secrets/alice/x/y", {"value": "1"})
    assert user.post_json("/v1/job", job, status=422).json["message"] == "Inaccessible secret paths: a/b"
    user.put_json("/v1/secrets/alice/a/b", {"value": "2"})
    submit(user, **job)


def test_priority_permissions(app, anon):
    assert anon.post_json("/v1/job", {"job_queue": "q", "job_priority": 5}, status=401).json["message"] == \
        "Authentication required for setting priority: 5"
    user = Client(app, token_headers(app, "contributor", max_priority={"q": 10, "*": 2}))
    submit(user, job_queue="q", job_priority=10)
    submit(user, job_queue="other", job_priority=2)
    assert user.post_json("/v1/job", {"job_queue": "other", "job_priority": 3}, status=403).json["message"] == \
        "Not enough permissions to push to other with priority 3"


def test_reservation_permissions(app, anon):
    submit(anon, reserve_data={"timeout": "6h"})
    submit(anon, reserve_data={"timeout": None})          # the original answers 500 here
    assert anon.post_json("/v1/job", {"job_queue": "q", "reserve_data": {"timeout": "7h"}},
                          status=401).json["message"] == "Authentication required for setting timeout: 25200"
    user = Client(app, token_headers(app, "contributor", max_reservation_time={"q": 30000}))
    submit(user, job_queue="q", reserve_data={"timeout": 30000})
    assert user.post_json("/v1/job", {"job_queue": "r", "reserve_data": {"timeout": 30000}},
                          status=403).json["message"] == "Not enough permissions to push to r with reservation " \
                                                         "timeout 30000"


def test_restricted_queue_permissions(app, anon):
    with app.hub.db.write() as db:
        db.execute("INSERT INTO restricted_queues (name) VALUES ('secret-q')")
    assert anon.post_json("/v1/job", {"job_queue": "secret-q"}, status=401).json["message"] == \
        "Authentication required to push to restricted queue: secret-q"
    outsider = Client(app, token_headers(app, "contributor"))
    assert outsider.post_json("/v1/job", {"job_queue": "secret-q"}, status=403).json["message"] == \
        "Not enough permissions to push to the restricted queue: secret-q"
    owner = Client(app, token_headers(app, "contributor", allowed_queues=["secret-q"]))
    submit(owner, job_queue="secret-q")


# == Jobs: pop ======================================================================================

def test_pop_errors(app, anon, agent):
    assert anon.get("/v1/job?queue=q1", status=403).json["message"] == "Specified action requires role: agent"
    assert agent.get("/v1/job", status=400).json["message"] == "No queue(s) specified in request"
    cookieless = Client(app, agent.headers)
    assert cookieless.get("/v1/job?queue=q1", status=401).json["message"] == "Agent not identified"
    answer = agent.get("/v1/job?queue=q1", status=204)
    assert answer.body == b""


def test_pop_order_priority_then_fifo_across_queues(app, anon, agent):
    user = Client(app, token_headers(app, "contributor", max_priority={"*": 100}))
    first = submit(anon, job_queue="q2")
    second = submit(anon, job_queue="q1")
    urgent = submit(user, job_queue="q1", job_priority=50)
    third = submit(anon, job_queue="q2")
    submit(anon, job_queue="elsewhere")
    order = [agent.get("/v1/job?queue=q2&queue=q1").json["job_id"] for _ in range(4)]
    assert order == [urgent, first, second, third]
    agent.get("/v1/job?queue=q2&queue=q1", status=204)


def test_a_job_its_agent_never_reported_on_is_requeued_once_then_cancelled(make_app, anon):
    app = make_app(strand_seconds=1e-6)                   # "long ago" is now, for the test
    test = webtest.TestApp(app)
    agent = Client(app, token_headers(app, "agent", "agent1"))
    agent.post_json("/v1/agents/data/agent1", {"queues": ["q1"]})
    first, second = submit(test), submit(test)
    assert agent.get("/v1/job?queue=q1").json["job_id"] == first    # ... and the answer was lost
    # Asking again without a word on the first: it goes back to the head of the queue, and is handed out again.
    assert agent.get("/v1/job?queue=q1").json["job_id"] == first
    assert test.get(f"/v1/result/{first}").json == {"job_state": "running", "agenthub_strands": 1}
    # Lost a second time: cancelled, and the next job is handed out.
    assert agent.get("/v1/job?queue=q1").json["job_id"] == second
    assert test.get(f"/v1/result/{first}").json == {"job_state": "cancelled", "agenthub_strands": 2}
    instances = {i["job_id"]: i["status"] for i in test.get("/api/v1/agent_instance").json["summaries"]}
    assert instances[first] == "failed" and instances[second] == "active"
    # A job the agent reports on is never touched, however long it runs.
    agent.post_json(f"/v1/result/{second}", {"job_state": "setup"})
    third = submit(test)
    assert agent.get("/v1/job?queue=q1").json["job_id"] == third
    assert test.get(f"/v1/result/{second}").json["job_state"] == "setup"


def test_a_job_held_by_an_agent_that_lost_contact_without_a_word_is_requeued(make_app):
    app = make_app(strand_seconds=1e-6, lost_contact_seconds=1)       # the sweep runs every second
    test = webtest.TestApp(app)
    agent = Client(app, token_headers(app, "agent", "agent1"))
    agent.post_json("/v1/agents/data/agent1", {"queues": ["q1"]})
    silent, reported = submit(test), submit(test)
    assert agent.get("/v1/job?queue=q1").json["job_id"] == silent
    other = Client(app, token_headers(app, "agent", "agent2"))
    other.post_json("/v1/agents/data/agent2", {"queues": ["q1"]})
    assert other.get("/v1/job?queue=q1", headers={"Cookie": "agent_name=agent2"}).json["job_id"] == reported
    other.post_json(f"/v1/result/{reported}", {"job_state": "test"})
    # Both agents fall silent: the job nobody heard of goes back to the queue, the reported one stays.
    assert _wait_for(lambda: test.get(f"/v1/result/{silent}").json["job_state"] == "waiting")
    assert test.get(f"/v1/result/{silent}").json["agenthub_strands"] == 1
    assert test.get(f"/v1/result/{reported}").json == {"job_state": "test"}


def test_without_the_strand_delay_quick_repeated_pops_keep_their_jobs(anon, agent):
    jobs = [submit(anon) for _ in range(3)]
    assert [agent.get("/v1/job?queue=q1").json["job_id"] for _ in range(3)] == jobs     # 60 s by default


def test_pop_marks_running_and_returns_the_job(anon, agent):
    job_id = submit(anon, tags=["x"])
    job = agent.get("/v1/job?queue=q1").json
    assert job["job_id"] == job_id and job["tags"] == ["x"] and job["exclude_agents"] == []
    assert job["started_at"].endswith("Z") and job["started_at"].count("Z") == 1 and "+" not in job["started_at"]
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "running"}


def test_pop_skips_excluded_agents_and_jobs_awaiting_attachments(app, anon, agent):
    other = Client(app, token_headers(app, "agent", "agent2"))
    other.post_json("/v1/agents/data/agent2", {"queues": ["q1"]})
    excluded = submit(anon, exclude_agents=["agent1"])
    gated = submit(anon, test_data={"attachments": [{"agent": "a.txt"}]})
    agent.get("/v1/job?queue=q1", status=204)
    assert other.get("/v1/job?queue=q1").json["job_id"] == excluded
    anon.post(f"/v1/job/{gated}/attachments", upload_files=[("file", "a.tar.gz", b"data")])
    job = agent.get("/v1/job?queue=q1").json
    assert job["job_id"] == gated and job["attachments_status"] == "complete"


def test_pop_shows_client_id_and_blanks_secrets(app):
    user = Client(app, token_headers(app, "contributor", "submitter"))
    with app.hub.db.write() as db:
        job = {"job_id": ANY_UUID, "created_at": time.time(), "job_priority": 0, "job_queue": "q1",
               "attachments_status": None, "exclude_agents": [], "client_id": "submitter",
               "job_data": {"job_queue": "q1", "test_data": {"secrets": {"TOKEN": "a/b"}}}}
        app.hub.jobs.store.insert_job(db, job)
    agent = Client(app, token_headers(app, "agent", "agent1"))
    agent.post_json("/v1/agents/data/agent1", {"queues": ["q1"]})
    popped = agent.get("/v1/job?queue=q1").json
    assert popped["client_id"] == "submitter" and popped["test_data"]["secrets"] == {"TOKEN": ""}   # unreadable
    assert "client_id" not in user.get(f"/v1/job/{ANY_UUID}").json


# == Jobs: read, position, cancel, search ================================================================

def test_get_job_errors(anon):
    assert anon.get("/v1/job/xyz", status=400).json["message"] == "Invalid job_id specified"
    assert anon.get(f"/v1/job/{ANY_UUID}", status=204).body == b""


def test_position(anon, agent):
    first, second = submit(anon), submit(anon)
    assert anon.get(f"/v1/job/{second}/position").text == "1"
    assert anon.get(f"/v1/job/{first}/position").text == "0"
    agent.get("/v1/job?queue=q1")
    assert anon.get(f"/v1/job/{second}/position").text == "0"
    assert anon.get(f"/v1/job/{first}/position", status=410).text == "Job not found or already started\n"
    anon.get("/v1/job/zzz/position", status=400)


def test_cancel(anon, agent):
    waiting, running = submit(anon), submit(anon)
    agent.get("/v1/job?queue=q1")           # takes `waiting`; swap names for clarity
    running, waiting = waiting, running
    for job_id in (waiting, running):
        assert anon.post_json(f"/v1/job/{job_id}/action", {"action": "cancel"}).text == "OK"
        assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "cancelled"
    answer = anon.post_json(f"/v1/job/{waiting}/action", {"action": "cancel"}, status=400)
    assert answer.text == "The job is already completed or cancelled"
    anon.post_json(f"/v1/job/{ANY_UUID}/action", {"action": "cancel"}, status=400)
    assert anon.post_json("/v1/job/bad/action", {"action": "cancel"}, status=400).text == "Invalid job id\n"
    assert anon.post_json(f"/v1/job/{waiting}/action", {"action": "stop"}, status=422).json["detail"] == {
        "json": {"action": ["Must be one of: cancel."]}}
    # The agent's final "complete" does not overwrite a cancel (the original lets it: #673).
    agent.post_json(f"/v1/result/{running}", {"job_state": "complete", "status": {"test": 247}})
    result = anon.get(f"/v1/result/{running}").json
    assert result["job_state"] == "cancelled" and result["test_status"] == 247
    agent.get("/v1/job?queue=q1", status=204)       # a cancelled waiting job is never handed out


# -- what the Testflinger server gained after 1.5.0 (spec testflinger-2026.md) --------------------

DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def job_events(client, job_id):
    answer = client.get(f"/v1/events/job/{job_id}").json
    assert answer["job_id"] == job_id
    for event in answer["events"]:
        assert set(event["timestamp"]) == {"$date"} and DATE.match(event["timestamp"]["$date"])
        assert isinstance(event["detail"], str)
    return answer["events"]


def test_result_status_is_the_state_and_exit_codes_only(anon, agent):
    assert anon.get("/v1/result/nope/status", status=400).json == {"detail": {}, "message": "Invalid job_id specified"}
    unknown = anon.get(f"/v1/result/{ANY_UUID}/status", status=204)
    assert unknown.body == b""
    job_id = submit(anon)
    assert anon.get(f"/v1/result/{job_id}/status").json == {"job_state": "waiting"}
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z",
                                                         "phase": "setup", "log_data": "long text"})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "cleanup", "status": {"setup": 0, "provision": 1},
                                             "device_info": {"ip": "10.0.0.1"}})
    # Agents read it too (their check_job_state); no output, serial or device_info.
    for client in (anon, agent):
        assert client.get(f"/v1/result/{job_id}/status").json == {
            "setup_status": 0, "provision_status": 1, "job_state": "cleanup"}
    # The log endpoint answers 200 for an unknown job (never 204), as the original.
    assert anon.get(f"/v1/result/{ANY_UUID}/log/output").status_int == 200


def test_job_events_record_the_life_of_a_job(app, anon, agent):
    manager = Client(app, token_headers(app, "manager", "boss"))
    assert anon.get("/v1/events/job/nope", status=404).json == {"detail": {}, "message": "Job not found"}
    assert anon.get(f"/v1/events/job/{ANY_UUID}", status=404).json == {"detail": {}, "message": "Job not found"}
    job_id = manager.post_json("/v1/job", {"job_queue": "q1"}).json["job_id"]
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "setup"})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "setup"})                  # the same state: nothing new
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "provision", "status": {"setup": 0}})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "cleanup", "status": {"setup": 0, "provision": 0,
                                                                                 "test": 3}})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"setup": 0, "provision": 0,
                                                                                  "test": 3, "cleanup": 0}})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "completed"})              # completed once only
    events = job_events(anon, job_id)
    assert [(e["event_name"], e["message"], e.get("phase"), e.get("status")) for e in events] == [
        ("job_submitted", "Job submitted by user boss into queue q1.", None, None),
        ("job_assigned", "Job assigned to agent agent1.", None, None),
        ("job_phase_started", "Phase setup started.", "setup", None),
        ("job_phase_completed", "Phase setup completed with exit code 0", "setup", 0),   # completions first
        ("job_phase_started", "Phase provision started.", "provision", None),
        ("job_phase_completed", "Phase provision completed with exit code 0", "provision", 0),
        ("job_phase_completed", "Phase test completed with exit code 3", "test", 3),
        ("job_phase_started", "Phase cleanup started.", "cleanup", None),
        ("job_phase_completed", "Phase cleanup completed with exit code 0", "cleanup", 0),
        ("job_completed", "Job completed.", None, None)]
    assert [e["timestamp"]["$date"] for e in events] == sorted(e["timestamp"]["$date"] for e in events)
    assert agent.get(f"/v1/events/job/{job_id.upper()}").json["events"] == events    # any role, any case
    # A cancel names who asked; an agent reporting "cancelled" adds nothing.
    other = submit(anon)
    anon.post_json(f"/v1/job/{other}/action", {"action": "cancel"})
    agent.post_json(f"/v1/result/{other}", {"job_state": "cancelled"})
    assert [e["message"] for e in job_events(anon, other)] == [
        "Job submitted by user anonymous into queue q1.", "Job cancellation requested by user anonymous."]


def test_the_server_keeps_the_agent_job_link(app, anon, agent):
    contributor = Client(app, token_headers(app, "contributor", "ci-bot-kernel"))
    job_id = contributor.post_json("/v1/job", {"job_queue": "q1"}).json["job_id"]
    assert "client_id" not in anon.get(f"/v1/job/{job_id}").json          # kept, but not shown
    idle = anon.get("/v1/agents/data/agent1").json
    assert "job_id" not in idle and "submitted_by" not in idle
    assert agent.get("/v1/job?queue=q1").json["job_id"] == job_id
    running = anon.get("/v1/agents/data/agent1").json
    assert (running["job_id"], running["submitted_by"]) == (job_id, "ci-bot-kernel")
    listed = {a["name"]: a for a in anon.get("/v1/agents/data").json}
    assert listed["agent1"]["submitted_by"] == "ci-bot-kernel"
    assert anon.get("/v1/queues/q1/agents").json[0]["submitted_by"] == "ci-bot-kernel"
    agent.post_json("/v1/agents/data/agent1", {"state": "provision"})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "provision", "agent_id": "agent1"})
    assert anon.get("/v1/agents/data/agent1").json["job_id"] == job_id      # other states leave it
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete"})
    done = anon.get("/v1/agents/data/agent1").json
    # Freed; and an agent whose job ended is no longer shown as provisioning (Testflinger #1110).
    assert "job_id" not in done and "submitted_by" not in done and done["state"] == "waiting"
    # A cancel frees the agent too; a second cancel changes nothing.
    second = submit(anon)
    agent.get("/v1/job?queue=q1")
    assert anon.get("/v1/agents/data/agent1").json["submitted_by"] is None      # anonymous
    assert anon.post_json(f"/v1/job/{second}/action", {"action": "cancel"}).text == "OK"
    assert "job_id" not in anon.get("/v1/agents/data/agent1").json
    assert anon.post_json(f"/v1/job/{second}/action", {"action": "cancel"}, status=400).text == \
        "The job is already completed or cancelled"


def test_resubmitting_a_job_id(app, anon, agent):
    owner = Client(app, token_headers(app, "contributor", "owner"))
    stranger = Client(app, token_headers(app, "contributor", "stranger"))
    job_id = owner.post_json("/v1/job", {"job_queue": "q1", "name": "first"}).json["job_id"]
    before = app.hub.jobs.get(job_id)
    # Waiting: the same id back, nothing changes (a retried submit).
    assert owner.post_json("/v1/job", {"job_queue": "q1", "job_id": job_id, "name": "other"}).json == {"job_id": job_id}
    assert dict(app.hub.jobs.get(job_id)) == dict(before)
    assert anon.get(f"/v1/job/{job_id}").json["name"] == "first"
    # Running: refused, clearly.
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "test"})
    message = owner.post_json("/v1/job", {"job_queue": "q1", "job_id": job_id}, status=409).json["message"]
    assert message == (f"Job {job_id} is still running (state test); cancel it or wait for it to finish before"
                       " submitting it again")
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z",
                                                         "phase": "test", "log_data": "first run\n"})
    agent.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "a.tar.gz", b"artifact one")])
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"test": 1}})
    # Finished: another client may not re-queue it; its owner (or a manager) may, as the next attempt.
    stranger.post_json("/v1/job", {"job_queue": "q1", "job_id": job_id}, status=403)
    waiting_before = submit(anon)
    assert owner.post_json("/v1/job", {"job_queue": "q1", "job_id": job_id, "name": "again"}).json == {
        "job_id": job_id}
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "waiting"}
    assert anon.get(f"/v1/job/{job_id}").json["name"] == "again"
    assert anon.get(f"/v1/job/{job_id}/position").text == "1"                     # at the back of the queue
    assert app.hub.jobs.get(job_id)["created_at"] > before["created_at"]
    # The first attempt stays readable: results, logs, artifact.
    first = anon.get(f"/v1/result/{job_id}?attempt=1").json
    assert first["job_state"] == "complete" and first["test_status"] == 1 and first["test_output"] == "first run\n"
    assert anon.get(f"/v1/result/{job_id}/status?attempt=1").json == {"job_state": "complete", "test_status": 1}
    assert anon.get(f"/v1/result/{job_id}/log/output?attempt=1").json["output"]["test"]["log_data"] == "first run\n"
    assert anon.get(f"/v1/result/{job_id}/log/output").json["output"]["test"]["log_data"] == ""
    assert anon.get(f"/v1/result/{job_id}/artifact?attempt=1").body == b"artifact one"
    anon.get(f"/v1/result/{job_id}/artifact", status=204)
    anon.get(f"/v1/result/{job_id}?attempt=3", status=204)
    assert anon.get(f"/v1/result/{job_id}?attempt=0", status=422).json["detail"] == {
        "query": {"attempt": ["Must be greater than or equal to 1."]}}
    attempts = anon.get(f"/v1/job/{job_id}/attempts").json
    assert [(a["attempt"], a["job_state"], a["agent"], a["submitted_by"], a["ended_by"]) for a in attempts] == [
        (1, "complete", "agent1", "owner", "resubmitted"), (2, "waiting", None, "owner", None)]
    anon.get(f"/v1/job/{ANY_UUID}/attempts", status=204)
    events = job_events(anon, job_id)
    assert events[-1]["event_name"] == "job_resubmitted" and events[-1]["attempt"] == 2
    assert events[-1]["message"] == "Job resubmitted by user owner: attempt 2 is waiting in queue q1."
    # The second attempt runs like any job, after the one that was waiting before it.
    assert agent.get("/v1/job?queue=q1").json["job_id"] == waiting_before
    assert agent.get("/v1/job?queue=q1").json["job_id"] == job_id
    assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "running"


def test_a_failed_provision_is_retried_on_another_agent_when_asked(make_app):
    app = make_app(provision_retries=1)
    anon = webtest.TestApp(app)
    agents = {}
    for name in ("agent1", "agent2"):
        agents[name] = Client(app, {**token_headers(app, "agent", name), "Cookie": f"agent_name={name}"})
        agents[name].post_json(f"/v1/agents/data/{name}", {"state": "waiting", "queues": ["q1"]})
    job_id = submit(anon, name="flaky")

    def run_and_fail_provision(name):
        assert agents[name].get("/v1/job?queue=q1").json["job_id"] == job_id
        agents[name].post_json(f"/v1/agents/data/{name}", {"state": "provision"})
        agents[name].post_json(f"/v1/result/{job_id}", {"job_state": "provision", "status": {"setup": 0}})
        agents[name].post_json(f"/v1/result/{job_id}", {"job_state": "complete",
                                                        "status": {"setup": 0, "provision": 1}})
    run_and_fail_provision("agent1")
    # Attempt 2 waits, without agent1; the failure is in agent1's history though it posted no provision log.
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "waiting"}
    assert anon.get(f"/v1/job/{job_id}").json["exclude_agents"] == ["agent1"]
    history = app.hub.jobs.provision_logs("agent1")
    assert [(h["job_id"], h["exit_code"], h["recorded_by"]) for h in history] == [(job_id, 1, "result")]
    assert anon.get("/v1/agents/data/agent1").json["state"] == "waiting"       # not shown as provisioning
    agents["agent1"].get("/v1/job?queue=q1", status=204)
    retried = job_events(anon, job_id)[-1]
    assert (retried["event_name"], retried["attempt"]) == ("job_retried", 2)
    assert retried["message"] == ("Provisioning failed on agent agent1: attempt 2 is waiting in queue q1 (provision"
                                  " retry 1 of 1); agent agent1 is excluded.")
    # The agent's own provision log replaces the one recorded for it, without counting twice.
    agents["agent1"].post_json("/v1/agents/provision_logs/agent1", {"job_id": job_id, "exit_code": 1,
                                                                    "detail": "flash failed"})
    assert [(h["detail"], h["recorded_by"]) for h in app.hub.jobs.provision_logs("agent1")] == [
        ("flash failed", "agent")]
    assert anon.get("/v1/agents/data/agent1").json["provision_streak_count"] == 1
    # The retry fails too: no retries left, the job stays finished.
    run_and_fail_provision("agent2")
    assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "complete"
    assert [a["ended_by"] for a in anon.get(f"/v1/job/{job_id}/attempts").json] == ["retried", None]


def test_no_provision_retry_without_the_setting_or_another_agent(make_app):
    for retries, agents_on_queue in ((0, 2), (3, 1)):
        app = make_app(provision_retries=retries)
        anon = webtest.TestApp(app)
        for n in range(agents_on_queue):
            Client(app, token_headers(app, "agent", f"a{n}")).post_json(f"/v1/agents/data/a{n}", {"queues": ["q1"]})
        agent = Client(app, {**token_headers(app, "agent", "a0"), "Cookie": "agent_name=a0"})
        job_id = submit(anon)
        agent.get("/v1/job?queue=q1")
        agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"provision": 2}})
        assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "complete"
        last = job_events(anon, job_id)[-1]["message"]
        assert last == ("Job completed." if retries == 0 else
                        "Provisioning failed on agent a0; not retried: no other agent serves queue q1.")


def test_an_agent_still_stopping_a_cancelled_attempt_cannot_touch_the_next_one(app, anon, agent):
    job_id = submit(anon)
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "provision"})
    anon.post_json(f"/v1/job/{job_id}/action", {"action": "cancel"})
    submit(anon, job_id=job_id)                                       # attempt 2, waiting
    # The old run goes on (provision is not interrupted), then cleans up and closes: all dropped.
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z",
                                                         "phase": "cleanup", "log_data": "OLD RUN"})
    assert agent.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "a.tgz", b"OLD")]).text == "OK"
    assert agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"test": 247}}).text == "OK"
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "waiting"}
    anon.get(f"/v1/result/{job_id}/artifact", status=204)
    other = Client(app, {**token_headers(app, "agent", "agent2"), "Cookie": "agent_name=agent2"})
    other.post_json("/v1/agents/data/agent2", {"queues": ["q1"]})
    assert other.get("/v1/job?queue=q1").json["job_id"] == job_id
    # Once agent2 runs it, agent1's late reports are still not taken for it.
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete"})
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "running"}
    other.post_json(f"/v1/result/{job_id}", {"job_state": "setup"})
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "setup"}


def test_a_repeated_final_result_does_not_use_up_a_provision_retry(make_app):
    app = make_app(provision_retries=2)
    anon = webtest.TestApp(app)
    for name in ("a1", "a2", "a3"):
        Client(app, token_headers(app, "agent", name)).post_json(f"/v1/agents/data/{name}", {"queues": ["q1"]})
    agent = Client(app, {**token_headers(app, "agent", "a1"), "Cookie": "agent_name=a1"})
    job_id = submit(anon)
    agent.get("/v1/job?queue=q1")
    for _ in range(2):                               # the agent re-sends a result that seemed lost
        agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"provision": 1}})
    assert [(a["attempt"], a["job_state"]) for a in anon.get(f"/v1/job/{job_id}/attempts").json] == [
        (1, "complete"), (2, "waiting")]


def test_a_cancelled_job_tells_each_phase_once_and_never_completes(anon, agent):
    job_id = submit(anon)
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "test"})
    anon.post_json(f"/v1/job/{job_id}/action", {"action": "cancel"})
    for state in ("cleanup", "cleanup", "complete", "complete"):
        agent.post_json(f"/v1/result/{job_id}", {"job_state": state})
    assert [e["event_name"] for e in job_events(anon, job_id)] == [
        "job_submitted", "job_assigned", "job_phase_started", "job_cancelled", "job_phase_started"]


def test_resubmitting_a_job_as_shown_runs_with_its_attachments(anon, agent):
    job_id = submit(anon, test_data={"attachments": [{"agent": "file.bin"}]})
    anon.post(f"/v1/job/{job_id}/attachments", upload_files=[("file", "a.tgz", b"ATTACHED")])
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete"})
    shown = anon.get(f"/v1/job/{job_id}").json
    assert anon.post_json("/v1/job", shown).json == {"job_id": job_id}
    assert agent.get("/v1/job?queue=q1").json["job_id"] == job_id
    assert agent.get(f"/v1/job/{job_id}/attachments").body == b"ATTACHED"


def test_each_attempt_has_its_own_provision_history_entry(anon, agent):
    job_id = submit(anon)
    for attempt in (1, 2):
        if attempt == 2:
            submit(anon, job_id=job_id)
        agent.get("/v1/job?queue=q1")
        agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"provision": 5}})
    agent.post_json("/v1/agents/provision_logs/agent1", {"job_id": job_id, "exit_code": 5, "detail": "second"})
    history = anon.app.hub.jobs.provision_logs("agent1")
    assert [(h["attempt"], h["recorded_by"]) for h in history] == [(1, "result"), (2, "agent")]
    assert anon.get("/v1/agents/data/agent1").json["provision_streak_count"] == 2


def test_the_purge_takes_a_jobs_attempts_events_and_logs_with_it(make_app, monkeypatch):
    app = make_app(retention_days=1)
    anon = webtest.TestApp(app)
    agent = Client(app, {**token_headers(app, "agent", "agent1"), "Cookie": "agent_name=agent1"})
    agent.post_json("/v1/agents/data/agent1", {"queues": ["q1"]})
    old_waiting, done = submit(anon), str(uuid.uuid4())
    with app.hub.db.write() as db:
        db.execute("UPDATE jobs SET job_queue = 'q9'")                # out of the agent's way
    submit(anon, job_id=done)
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{done}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00Z",
                                                      "phase": "test", "log_data": "old"})
    agent.post_json(f"/v1/result/{done}", {"job_state": "complete"})
    submit(anon, job_id=done)
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{done}", {"job_state": "complete"})
    monkeypatch.setattr(agenthub, "utcnow", lambda: time.time() + 2 * 86400)
    app.hub.jobs.purge()
    monkeypatch.undo()
    assert job_events(anon, old_waiting)[0]["event_name"] == "job_submitted"      # a waiting job keeps all
    anon.get(f"/v1/events/job/{done}", status=404)
    submit(anon, job_id=done)                                           # a new job under the old id
    assert [e["event_name"] for e in job_events(anon, done)] == ["job_submitted"]
    assert anon.get(f"/v1/result/{done}/log/output").json["output"]["test"]["log_data"] == ""
    assert [a["attempt"] for a in anon.get(f"/v1/job/{done}/attempts").json] == [1]


def test_an_agent_with_a_huge_queue_list_breaks_no_page(app, anon):
    agent = Client(app, {**token_headers(app, "agent", "wide"), "Cookie": "agent_name=wide"})
    queues = ["q1"] + [f"x{n}" for n in range(40000)]
    agent.post_json("/v1/agents/data/wide", {"queues": queues})
    job_id = submit(anon)
    assert anon.get(f"/v1/job/{job_id}/estimate").json["agents"] == ["wide"]
    assert len(anon.get("/v1/agents/data/wide").json["queues"]) == 40001
    anon.get(f"/jobs/{job_id}")


def test_estimated_start_of_a_waiting_job(make_app, monkeypatch):
    clock = [1_800_000_000.0]
    monkeypatch.setattr(agenthub, "utcnow", lambda: clock[0])
    app = make_app(lost_contact_seconds=0)
    anon = webtest.TestApp(app)
    agents = {}
    for name, queues in (("a1", ["q1"]), ("a2", ["q1", "q2"]), ("a3", ["q1"])):
        agents[name] = Client(app, {**token_headers(app, "agent", name), "Cookie": f"agent_name={name}"})
        agents[name].post_json(f"/v1/agents/data/{name}", {"state": "waiting", "queues": queues})
    agents["a3"].post_json("/v1/agents/data/a3", {"state": "offline"})         # not in the pool
    lonely = submit(anon, job_queue="q1", exclude_agents=["a1", "a2"])
    assert anon.get(f"/v1/job/{lonely}/estimate").json["reason"] == \
        "no online agent that may run this job serves queue q1"
    anon.post_json(f"/v1/job/{lonely}/action", {"action": "cancel"})
    first, second, third = submit(anon), submit(anon), submit(anon)
    for job_id in (first, second):                  # two idle agents: no history needed
        assert anon.get(f"/v1/job/{job_id}/estimate").json["estimated_wait_seconds"] == 0
    assert anon.get(f"/v1/job/{third}/estimate").json["reason"] == "no completed job yet to learn run times from"
    for job_id in (first, second, third):
        anon.post_json(f"/v1/job/{job_id}/action", {"action": "cancel"})

    def run(queue_name, seconds, name):
        job_id = submit(anon, job_queue=queue_name)
        assert agents[name].get(f"/v1/job?queue={queue_name}").json["job_id"] == job_id
        clock[0] += seconds
        agents[name].post_json(f"/v1/result/{job_id}", {"job_state": "complete"})
    # History: q1 jobs ran 10, 30 and 20 s (median 20), a q2 job 5 s.
    for queue_name, seconds, name in (("q1", 10, "a1"), ("q1", 30, "a1"), ("q1", 20, "a2"), ("q2", 5, "a2")):
        run(queue_name, seconds, name)
    busy = submit(anon)
    agents["a1"].get("/v1/job?queue=q1")
    clock[0] += 5                                   # a1 has run `busy` for 5 s: 15 s to go
    submit(anon, job_queue="q2"), submit(anon)
    job_id = submit(anon)
    estimate = anon.get(f"/v1/job/{job_id}/estimate").json
    # a2 (free) takes the q2 job (5 s), then the q1 one (20 s): free after 25 s; a1 is free after 15.
    assert {k: estimate[k] for k in ("job_state", "job_queue", "position", "agents", "jobs_ahead", "busy_agents",
                                     "run_seconds", "estimated_wait_seconds")} == {
        "job_state": "waiting", "job_queue": "q1", "position": 1, "agents": ["a1", "a2"], "jobs_ahead": 2,
        "busy_agents": 1, "run_seconds": {"q1": 20.0, "q2": 5.0}, "estimated_wait_seconds": 15}
    assert estimate["estimated_start"] == agenthub.iso(clock[0] + 15) and estimate["method"]
    # A q2 backlog that only a2 can take does not hold up a q1 job that a1 (or a3, offline) serves.
    for _ in range(5):
        submit(anon, job_queue="q2")
    late = submit(anon)
    assert anon.get(f"/v1/job/{late}/estimate").json["estimated_wait_seconds"] == 15 + 20
    anon.get(f"/v1/job/{busy}/estimate", status=410)
    assert anon.get(f"/v1/job/{ANY_UUID}/estimate", status=410).text == "Job not found or already started\n"


def test_queue_summary_of_the_queues_an_agent_serves(anon, agent):
    submit(anon, job_queue="q1"), submit(anon, job_queue="q2"), submit(anon, job_queue="q3")
    agent.get("/v1/job?queue=q1")
    summary = anon.get("/v1/queues/summary?agent=agent1").json
    assert [(q["name"], q["agents"], q["waiting"], q["running"]) for q in summary] == [
        ("q1", ["agent1"], 0, 1), ("q2", ["agent1"], 1, 0)]
    assert [q["name"] for q in anon.get("/v1/queues/summary").json] == ["q1", "q2", "q3"]
    assert [q["waiting"] for q in anon.get("/v1/queues/summary?queue=q3&queue=q9").json] == [1, 0]
    assert anon.get("/v1/queues/summary?agent=ghost", status=404).json["message"] == "Agent not found"
    assert anon.get("/v1/queues/summary?color=red", status=422).json["detail"] == {
        "query": {"color": ["Unknown field."]}}


def test_search(anon, agent):
    a = submit(anon, tags=["x", "y"])
    b = submit(anon, tags=["x"])
    c = submit(anon)
    agent.get("/v1/job?queue=q1")
    anon.post_json(f"/v1/job/{c}/action", {"action": "cancel"})

    def ids(query):
        return [j["job_id"] for j in anon.get("/v1/job/search" + query).json]
    assert ids("") == [a, b, c]
    assert ids("?tags=x") == [a, b] and ids("?tags=x&tags=y&match=all") == [a]
    assert ids("?tags=y&tags=z") == [a] and ids("?tags=x&tags=z&match=all") == []
    assert ids("?state=active") == [a, b] and ids("?state=cancelled") == [c]
    assert ids("?state=running") == [a] and ids("?state=waiting") == [b]
    assert ids("?state=active&state=cancelled") == [a, b]
    assert ids("?limit=1&offset=1") == [b]
    row = anon.get("/v1/job/search?state=waiting").json[0]
    assert set(row) == {"job_id", "created_at", "job_state"} and row["job_state"] == "waiting"
    assert anon.get("/v1/job/search?match=some", status=422).json["detail"] == {
        "query": {"match": ["Must be one of: any, all."]}}
    assert "0" in anon.get("/v1/job/search?state=bogus", status=422).json["detail"]["query"]["state"]
    anon.get("/v1/job/search?limit=-1", status=422)


# == Results and logs =================================================================================

def test_results_round_trip(anon, agent):
    job_id = submit(anon)
    assert anon.get(f"/v1/result/{job_id}").json == {"job_state": "waiting"}
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "setup"})
    agent.post_json(f"/v1/result/{job_id}", {"status": {"setup": 0}, "device_info": {"ip": "1.2.3.4"}})
    agent.post_json(f"/v1/result/{job_id}", {"status": {"setup": 0, "test": 1}, "job_state": "complete"})
    for n, (phase, kind, text) in enumerate([("setup", "output", "a"), ("test", "output", "b"),
                                              ("test", "serial", "s"), ("test", "output", "c")]):
        agent.post_json(f"/v1/result/{job_id}/log/{kind}", {"fragment_number": n, "phase": phase,
                                                             "timestamp": "2026-01-01T00:00:00", "log_data": text})
    assert anon.get(f"/v1/result/{job_id}").json == {
        "job_state": "complete", "device_info": {"ip": "1.2.3.4"}, "setup_status": 0, "setup_output": "a",
        "test_status": 1, "test_output": "bc", "test_serial": "s"}
    assert list(anon.get(f"/v1/result/{job_id}").json)[:2] == ["job_state", "device_info"]


def test_result_errors(anon, agent):
    assert agent.post_json(f"/v1/result/{ANY_UUID}", {"job_state": "x"}).text == "OK"   # unknown: no-op
    anon.get(f"/v1/result/{ANY_UUID}", status=204)
    assert agent.post_json(f"/v1/result/{ANY_UUID}", {"status": {"bogus": 1}}, status=422).json["detail"] == {
        "json": {"status": {"bogus": {"key": ["Must be one of: setup, provision, firmware_update, test, "
                                              "allocate, reserve, cleanup."]}}}}
    agent.post_json(f"/v1/result/{ANY_UUID}", {"what": 1}, status=422)
    agent.post_json("/v1/result/nope", {}, status=400)
    big = b'{"device_info": {"x": "' + b"a" * (16 * 1024 * 1024) + b'"}}'
    assert agent.post(f"/v1/result/{ANY_UUID}", big, content_type="application/json",
                      status=413).json["message"] == "Payload too large"


def test_log_fragments_and_queries(anon, agent):
    job_id = submit(anon)
    stamps = ["2026-01-01T00:00:00Z", "2026-01-01T00:00:10+00:00", "2026-01-01T00:00:20"]
    for n, (phase, stamp) in enumerate(zip(["setup", "test", "test"], stamps)):
        agent.post_json(f"/v1/result/{job_id}/log/output",
                        {"fragment_number": n, "timestamp": stamp, "phase": phase, "log_data": f"<{n}>"})
    logs = anon.get(f"/v1/result/{job_id}/log/output").json["output"]
    assert list(logs) == list(agenthub.PHASES)
    assert logs["setup"] == {"last_fragment_number": 0, "log_data": "<0>"}
    assert logs["test"] == {"last_fragment_number": 2, "log_data": "<1><2>"}
    assert logs["cleanup"] == {"last_fragment_number": -1, "log_data": ""}
    assert anon.get(f"/v1/result/{job_id}/log/output?start_fragment=2").json["output"]["test"]["log_data"] == "<2>"
    assert anon.get(f"/v1/result/{job_id}/log/output?phase=test").json == {
        "output": {"test": {"last_fragment_number": 2, "log_data": "<1><2>"}}}
    assert anon.get(f"/v1/result/{job_id}/log/output?start_timestamp=2026-01-01T00:00:05"
                    ).json["output"]["test"]["log_data"] == "<1><2>"
    assert anon.get(f"/v1/result/{job_id}/log/serial?phase=test").json == {
        "serial": {"test": {"last_fragment_number": -1, "log_data": ""}}}
    assert anon.get(f"/v1/result/{job_id}/log/output?start_fragment=-1", status=400).json == {
        "detail": {}, "message": {"start_fragment": ["Must be greater than or equal to 0."]}}
    anon.get(f"/v1/result/{job_id}/log/output?phase=nope", status=400)


def test_log_post_errors(agent):
    good = {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00", "phase": "test", "log_data": "x"}
    agent.post_json(f"/v1/result/{ANY_UUID}/log/output", {**good, "timestamp": "yesterday"}, status=422)
    agent.post_json(f"/v1/result/{ANY_UUID}/log/output", {**good, "phase": "lunch"}, status=422)
    agent.post_json(f"/v1/result/{ANY_UUID}/log/output", {k: v for k, v in good.items() if k != "log_data"},
                    status=422)
    agent.post_json("/v1/result/bad/log/output", good, status=400)
    # The original crashes (500) on an unknown log type; it is an unknown URL here.
    answer = agent.post_json(f"/v1/result/{ANY_UUID}/log/console", good, status=404)
    assert answer.text.startswith("Not found: 404 Not Found")


# == Artifacts and attachments ========================================================================

def _tarball(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_artifact_round_trip(anon, agent):
    job_id = submit(anon)
    anon.get(f"/v1/result/{job_id}/artifact", status=204)
    first = _tarball({"artifacts/a.txt": b"one"})
    second = _tarball({"artifacts/a.txt": b"two" * 500000})
    for data in (first, second):
        assert agent.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "file", data)]).text == "OK"
    answer = anon.get(f"/v1/result/{job_id}/artifact")
    assert answer.body == second                                 # newest version wins
    assert answer.headers["Content-Type"] == "application/x-tar"
    assert answer.headers["Content-Disposition"] == "inline; filename=artifact.tar.gz"
    assert answer.headers["Content-Length"] == str(len(second))
    assert len(agent.test.app.hub.db.read("SELECT id FROM files")) == 1


@pytest.mark.sqlite_only("SQLite's memory-mapped reads (--mmap-mib)")
@pytest.mark.parametrize("mmap_mib", [0, 1, 256])
def test_artifacts_read_back_whole_with_and_without_memory_mapped_reads(make_app, tmp_path, mmap_mib):
    """--mmap-mib 0 reads every page with a system call, 1 maps only the start of the file (the
    artifact's pages lie partly beyond it), 256 maps all of it: the bytes come back the same."""
    app = make_app(db=str(tmp_path / "hub.db"), mmap_mib=mmap_mib)
    with app.hub.db.connection() as conn:
        assert conn.execute("PRAGMA mmap_size").fetchone()[0] == mmap_mib * 1024 * 1024
    test = webtest.TestApp(app)
    job_id = test.post_json("/v1/job", {"job_queue": "q"}).json["job_id"]
    data = os.urandom(3 * 1024 * 1024 + 5)
    test.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "file", data)],
              headers=token_headers(app, "agent", "a1"))
    assert test.get(f"/v1/result/{job_id}/artifact").body == data


def test_artifact_errors(agent):
    assert agent.post(f"/v1/result/{ANY_UUID}/artifact", upload_files=[("other", "f", b"x")],
                      status=400).json == {"detail": {}, "message": "Bad Request"}
    agent.post(f"/v1/result/{ANY_UUID}/artifact", b"plain", status=400)
    assert agent.post("/v1/result/bad/artifact", upload_files=[("file", "f", b"x")],
                      status=400).text == "Invalid job id\n"
    truncated = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nabc")
    agent.post(f"/v1/result/{ANY_UUID}/artifact", truncated, content_type="multipart/form-data; boundary=XX",
               status=400)
    assert agent.test.app.hub.db.read("SELECT id FROM files") == []      # nothing half-stored


def test_multipart_with_several_parts(agent, anon):
    job_id = submit(anon)
    agent.post(f"/v1/result/{job_id}/artifact", {"note": "hello"},
               upload_files=[("other", "o.bin", b"o" * 300000), ("file", "file", b"\r\n--x" * 100000)])
    assert anon.get(f"/v1/result/{job_id}/artifact").body == b"\r\n--x" * 100000


def test_attachments(anon, agent):
    plain = submit(anon)
    job_id = submit(anon, provision_data={"attachments": [{"agent": "a"}], "use_attachment": "a"})
    assert anon.get(f"/v1/job/{job_id}").json["provision_data"]["use_attachment"] == "a"
    assert anon.post(f"/v1/job/{plain}/attachments", upload_files=[("file", "a.tgz", b"x")],
                     status=422).text == f"Job {plain} not awaiting attachments\n"
    assert anon.post(f"/v1/job/{ANY_UUID}/attachments", upload_files=[("file", "a.tgz", b"x")],
                     status=422).text == f"Job {ANY_UUID} is not valid\n"
    anon.post("/v1/job/nope/attachments", upload_files=[("file", "a.tgz", b"x")], status=400)
    anon.post(f"/v1/job/{job_id}/attachments", upload_files=[("nofile", "a.tgz", b"x")], status=400)
    agent.get(f"/v1/job/{job_id}/attachments", status=204)
    assert anon.post(f"/v1/job/{job_id}/attachments", upload_files=[("file", "a.tgz", b"first")]).text == "OK"
    assert anon.post(f"/v1/job/{job_id}/attachments", upload_files=[("file", "a.tgz", b"second")]).text == "OK"
    answer = agent.get(f"/v1/job/{job_id}/attachments")
    assert answer.body == b"first" and answer.headers["Content-Type"] == "application/gzip"
    agent.get("/v1/job/nope/attachments", status=400)


# == Agents, queues, images ===========================================================================

def test_agent_data(app, anon, agent):
    answer = agent.post_json("/v1/agents/data/agent9", {"state": "waiting", "queues": ["q9"],
                                                        "location": "lab", "log": ["l1", "l2"]})
    assert answer.json == {"status": "OK"}
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("agent_name=agent9") and "HttpOnly" in cookie and "Path=/" in cookie
    assert "samesite=strict" in cookie.lower()
    data = anon.get("/v1/agents/data/agent9").json
    assert data["state"] == "waiting" and data["queues"] == ["q9"] and data["restricted_to"] == {}
    assert "log" not in data and data["updated_at"].endswith("Z")
    agent.post_json("/v1/agents/data/agent9", {"log": [f"x{i}" for i in range(150)], "comment": ""})
    stored = json.loads(app.hub.registry.find("name", "agent9")["log"])
    assert len(stored) == 100 and stored[-1] == "x149"
    assert anon.get("/v1/agents/data/agent9").json["location"] == "lab"    # fields merge
    assert anon.get("/v1/agents/data/ghost", status=404).json == {}
    assert [a["name"] for a in anon.get("/v1/agents/data").json] == ["agent1", "agent9"]
    agent.post_json("/v1/agents/data/agent9", {"queues": "q9"}, status=422)
    agent.post_json("/v1/agents/data/agent9", {"name": "x"}, status=422)


def test_restricted_to_lists_owners(app, anon, agent):
    app.hub.auth.add_client("owner", "contributor")
    with app.hub.db.write() as db:
        db.execute("INSERT INTO restricted_queues (name) VALUES ('q2')")
        db.execute("UPDATE clients SET allowed_queues = '[\"q2\"]' WHERE client_id = 'owner'")
    assert anon.get("/v1/agents/data/agent1").json["restricted_to"] == {"q2": ["owner"]}


def test_provision_logs_and_streaks(app, anon, agent):
    assert agent.post_json("/v1/agents/provision_logs/ghost", {"job_id": "j", "exit_code": 0},
                           status=404).json == {"detail": {}, "message": "Agent not found"}   # JSON since #1253
    for code in (0, 0, 1):
        agent.post_json("/v1/agents/provision_logs/agent1", {"job_id": "j", "exit_code": code, "detail": "d"})
    data = anon.get("/v1/agents/data/agent1").json
    assert (data["provision_streak_type"], data["provision_streak_count"]) == ("fail", 1)
    assert len(app.hub.jobs.provision_logs("agent1")) == 3
    assert len(app.hub.jobs.provision_logs("ghost")) == 1       # kept, as the original does
    agent.post_json("/v1/agents/provision_logs/agent1", {"job_id": "j"}, status=422)


def test_queues_and_images(anon, agent):
    assert anon.get("/v1/agents/queues").json == {}
    agent.post_json("/v1/agents/queues", {"q1": "first", "q2": "second"})
    agent.post_json("/v1/agents/queues", {"q1": "renamed"})
    assert anon.get("/v1/agents/queues").json == {"q1": "renamed", "q2": "second"}
    assert agent.post_json("/v1/agents/queues", {"q3": 5}, status=422).json["detail"]["json"] == {
        "_schema": ["Description for queue 'q3' must be a string"]}
    agent.post_json("/v1/agents/queues", {"": "x"}, status=422)
    agent.post_json("/v1/agents/images", {"q1": {"core22": "url: http://example.com/c.img"}})
    assert anon.get("/v1/agents/images/q1").json == {"core22": "url: http://example.com/c.img"}
    assert anon.get("/v1/agents/images/q9").json == {}
    for bad in ({"q1": "x"}, {"q1": {"$x": "y"}}, {"q1": {"a.b": "y"}}, {"q1": {"a": 1}}):
        agent.post_json("/v1/agents/images", bad, status=422)


def test_queue_agents_and_jobs(anon, agent):
    assert anon.get("/v1/queues/nope/agents", status=404).json["message"] == "Queue 'nope' does not exist."
    agents = anon.get("/v1/queues/q1/agents").json
    assert agents == [{"name": "agent1", "state": "waiting", "queues": ["q1", "q2"]}]
    anon.get("/v1/queues/q1/jobs", status=204)
    ids = [submit(anon) for _ in range(3)]
    jobs = anon.get("/v1/queues/q1/jobs").json
    assert [j["job_id"] for j in jobs] == ids and set(jobs[0]) == {"job_id", "created_at", "job_state",
                                                                   "job_queue"}
    assert [j["job_id"] for j in anon.get("/v1/queues/q1/jobs?limit=2&offset=1").json] == ids[1:]
    anon.get("/v1/queues/q1/jobs?limit=x", status=422)


def test_wait_times(app, anon, agent):
    assert anon.get("/v1/queues/wait_times").json == {}
    with app.hub.db.write() as db:
        for n in (1, 2, 3, 4, 5):
            db.execute("INSERT INTO wait_times (queue, seconds, popped_at) VALUES ('a', ?, ?)", (n, time.time()))
        db.execute("INSERT INTO wait_times (queue, seconds, popped_at) VALUES ('b', ?, ?)",
                   (90000, time.time()))          # 25 hours: whole days are kept (the original drops them)
    times = anon.get("/v1/queues/wait_times").json
    assert times["a"]["50"] == 3 and times["a"]["5"] == pytest.approx(1.2) and times["b"]["95"] == 90000
    assert list(anon.get("/v1/queues/wait_times?queue=b").json) == ["b"]
    job_id = submit(anon)
    with app.hub.db.write() as db:             # it waited 3.7 s: recorded as 3, as the original does
        db.execute("UPDATE jobs SET created_at = created_at - 3.7 WHERE job_id = ?", (job_id,))
    agent.get("/v1/job?queue=q1")
    assert anon.get("/v1/queues/wait_times?queue=q1").json["q1"]["50"] == 3


def test_percentiles_match_the_spec():
    assert agenthub.percentiles([1, 2, 3, 4, 5])["50"] == 3
    assert agenthub.percentiles([10, 20, 30, 40, 50])["50"] == 30
    assert agenthub.percentiles([7]) == {"5": 7, "10": 7, "50": 7, "90": 7, "95": 7}


# == HTTP conventions ===================================================================================

def test_http_conventions(anon):
    assert anon.get("/v1").text.startswith("Testflinger Server v")
    assert anon.get("/v1/").text == anon.get("/v1").text
    assert anon.get("/v1/job/search/").status_int == 200
    answer = anon.get("/v1/nothing-here", status=404)
    assert answer.text.startswith("Not found: 404 Not Found: The requested URL was not found")
    assert anon.put("/v1/job", status=405).json == {"detail": {}, "message": "Method Not Allowed"}
    anon.post("/oidc/auth-init", status=404)


# == Purge ================================================================================================

def test_purge_keeps_waiting_jobs(app, anon, agent):
    old_waiting, old_done, fresh = submit(anon), submit(anon), submit(anon)
    agent.get("/v1/job?queue=q1")                     # old_waiting is popped: rename for clarity
    old_done, old_waiting = old_waiting, old_done
    agent.post_json(f"/v1/result/{old_done}/log/output", {"fragment_number": 0, "phase": "test",
                                                          "timestamp": "2026-01-01T00:00:00", "log_data": "x"})
    agent.post_json(f"/v1/result/{old_done}", {"job_state": "complete"})   # an agent running a job is kept
    long_ago = time.time() - 8 * 86400
    with app.hub.db.write() as db:
        db.execute("UPDATE jobs SET created_at = ? WHERE job_id IN (?, ?)", (long_ago, old_waiting, old_done))
        db.execute("UPDATE log_fragments SET inserted_at = ?", (long_ago,))
        db.execute("UPDATE agents SET updated_at = ?", (long_ago,))
    assert app.hub.jobs.purge() == 1
    anon.get(f"/v1/job/{old_done}", status=204)
    assert anon.get(f"/v1/job/{old_waiting}").json["job_id"] == old_waiting
    anon.get(f"/v1/job/{fresh}", status=200)
    assert app.hub.db.read("SELECT * FROM log_fragments") == []
    anon.get("/v1/agents/data/agent1", status=404)


# == Real server: concurrency, keep-alive, large files, the agent's sequence ===================================

def test_concurrent_pops_hand_out_each_job_once(server):
    app, base = server
    headers = token_headers(app, "agent", "racer")
    for _ in range(120):
        call_http(base, "POST", "/v1/job", {"job_queue": "race"})
    got, errors = [], []

    def worker(n):
        conn = http.client.HTTPConnection(base.split("//")[1])
        name = f"racer{n}"
        conn.request("POST", f"/v1/agents/data/{name}", json.dumps({"queues": ["race"]}),
                     {**headers, "Content-Type": "application/json"})
        conn.getresponse().read()
        got.extend(pop_until_empty(conn, "race", {**headers, "Cookie": f"agent_name={name}"}, errors))
        conn.close()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 120 and len(set(got)) == 120


def pop_until_empty(conn, queue, headers, errors):
    """The job ids an agent pops from ``queue`` on ``conn`` until it is told 204; another status
    goes into ``errors`` and stops it."""
    ids = []
    while True:
        conn.request("GET", f"/v1/job?queue={queue}", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 204:
            return ids
        if resp.status != 200:
            errors.append((resp.status, body[:200]))
            return ids
        ids.append(json.loads(body)["job_id"])


def test_keep_alive_serves_many_requests_on_one_connection(server):
    app, base = server
    conn = http.client.HTTPConnection(base.split("//")[1])
    for _ in range(5):
        conn.request("GET", "/v1/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().startswith(b"Testflinger")
    # A request whose body the route never read does not poison the next one.
    conn.request("POST", "/v1/oauth2/token", body=b"x" * 5000)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 401
    conn.request("GET", "/v1/")
    assert conn.getresponse().status == 200
    conn.close()


def test_expect_100_continue_is_answered_before_the_body(server):
    import socket
    app, base = server
    host, port = base.split("//")[1].split(":")
    body = json.dumps({"job_queue": "q"}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    sock.sendall(f"POST /v1/job HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    interim = b""
    while b"\r\n\r\n" not in interim:          # no body sent yet: the server must speak first
        interim += sock.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100")
    sock.sendall(body)
    answer = b""
    while b"job_id" not in answer:
        answer += sock.recv(4096)
    assert b" 200 " in answer.split(b"\r\n")[0]
    sock.close()


def test_chunked_request_bodies(server):
    app, base = server
    conn = http.client.HTTPConnection(base.split("//")[1])
    conn.request("POST", "/v1/job", body=iter([b'{"job_queue": ', b'"chunky"}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    job_id = json.loads(resp.read())["job_id"]
    assert resp.status == 200
    conn.close()
    agent = token_headers(app, "agent", "chunker")
    data = os.urandom(300000)
    parts = [b'--B\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n', data, b"\r\n--B--\r\n"]
    conn = http.client.HTTPConnection(base.split("//")[1])
    conn.request("POST", f"/v1/result/{job_id}/artifact", body=iter(parts), encode_chunked=True,
                 headers={**agent, "Content-Type": "multipart/form-data; boundary=B"})
    assert conn.getresponse().read() == b"OK"
    conn.close()
    assert call_http(base, "GET", f"/v1/result/{job_id}/artifact")[2] == data


def test_a_slow_request_does_not_stall_others(server):
    app, base = server
    host, port = base.split("//")[1].split(":")
    stalled = http.client.HTTPConnection(host, int(port))
    stalled.putrequest("POST", "/v1/job")
    stalled.putheader("Content-Length", "1000")
    stalled.endheaders()
    stalled.send(b"{")                                # the rest never comes
    assert call_http(base, "GET", "/v1/")[0] == 200
    stalled.close()


def _serve(app, threads):
    """The built-in server with ``threads`` workers, running; (server, (host, port))."""
    httpd = agenthub.make_server(app, "127.0.0.1", 0, threads=threads)
    app.hub.server = httpd
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, ("127.0.0.1", httpd.server_address[1])


def test_idle_connections_parked_watchers_and_slow_heads_hold_no_worker(make_app):
    """Two workers serve 300 kept-alive connections, 100 of them parked watchers, while two heads
    and two small bodies trickle in that never end: no thread per connection, and nobody waits
    for the slow ones."""
    app = make_app(purge_interval=0, history_interval=0)
    httpd, (host, port) = _serve(app, threads=2)
    try:
        clients = [http.client.HTTPConnection(host, port) for _ in range(300)]
        for conn in clients:
            conn.request("GET", "/v1/")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read().startswith(b"Testflinger")
        threads = threading.active_count()
        slow = [socket.create_connection((host, port)) for _ in range(2)]          # as many as the workers
        for sock in slow:
            sock.sendall(b"GET /v1/ HTTP/1.1\r\nHost: localhost\r\n")                # ... and the head never ends
        slow += [socket.create_connection((host, port)) for _ in range(2)]
        for sock in slow[2:]:                                                       # ... the body never ends
            sock.sendall(b'POST /v1/job HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 100\r\n\r\n{"job_queue": ')
        first = json.loads(call_http(f"http://{host}:{port}", "PUT", "/v1/event/fire/w", b"1")[2])
        index = xor_index(first["ID"])
        for conn in clients[:100]:
            conn.request("GET", f"/v1/event/list?name=w&index={index}&wait=60s")
        assert _wait_for(lambda: app.hub.watchers.parked() == 100)
        for conn in clients[100:]:                                                  # still answered, on two workers
            conn.request("GET", "/v1/agents/data")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) == []
        assert threading.active_count() <= threads               # no thread per connection
        from prometheus_client.parser import text_string_to_metric_families
        families = {f.name: f for f in text_string_to_metric_families(
            call_http(f"http://{host}:{port}", "GET", "/metrics")[2].decode())}
        assert sample(families, "agenthub_http_connections") >= 305          # 300 + 4 slow + this one
        second = json.loads(call_http(f"http://{host}:{port}", "PUT", "/v1/event/fire/w", b"2")[2])
        for conn in clients[:100]:
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("X-Consul-Index") == str(xor_index(second["ID"]))
            assert [e["ID"] for e in json.loads(resp.read())] == [first["ID"], second["ID"]]
        for conn in clients:
            conn.close()
        for sock in slow:
            sock.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_head_sent_a_byte_at_a_time_and_pipelined_requests_are_answered_in_order(make_app):
    app = make_app(purge_interval=0, history_interval=0)
    httpd, address = _serve(app, threads=1)
    try:
        with socket.create_connection(address) as sock:
            for byte in b"GET /v1/ HTTP/1.1\r\nHost: localhost\r\n\r\n":
                sock.sendall(bytes([byte]))
            reply = sock.makefile("rb")
            assert reply.readline().startswith(b"HTTP/1.1 200")
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /v1/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
                         b"POST /v1/job HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 17\r\n\r\n{\"job_queue\":\"p\"}"
                         b"GET /v1/queues/summary HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = sock.makefile("rb").read()                 # to the end: the last one closes
        answers = reply.split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"200", b"200", b"200"]
        assert b"Testflinger" in answers[0] and b"job_id" in answers[1] and b'"p"' in answers[2]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_body_declared_and_never_sent_holds_the_only_worker_for_a_second_at_most(make_app):
    """A small body (up to BODY_AHEAD) is awaited by the selector with the head: no worker at all.
    A larger one goes to a worker at once; what the route leaves unread may take a second to
    arrive, then the connection is dropped."""
    app = make_app()
    httpd, address = _serve(app, threads=1)
    base = f"http://{address[0]}:{address[1]}"
    try:
        with socket.create_connection(address) as small, socket.create_connection(address) as large:
            small.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n")
            assert call_http(base, "GET", "/healthz")[0] == 200           # the only worker is free
            small.setblocking(False)
            with pytest.raises(BlockingIOError):
                small.recv(1)                                            # ... and the head waits for its body
            large.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
            assert large.makefile("rb").readline().startswith(b"HTTP/1.1 200")   # answered, body unread
            assert call_http(base, "GET", "/healthz")[0] == 200           # the worker dropped the stalled one
            assert large.recv(1) == b""                                  # ... closing its connection
            small.setblocking(True)
            small.sendall(b"0123456789")                                 # the body at last: answered
            assert small.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        with socket.create_connection(address) as client:              # whitespace around the value
            client.sendall(b"PUT /v1/event/fire/spaced HTTP/1.1\r\nHost: localhost\r\nContent-Length:\t2 \r\n\r\n{}")
            assert client.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        for odd in (b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n0\r\n\r\n",
                    b"Content-Length: 5\r\nContent-Length: 10\r\n\r\n{}"):
            with socket.create_connection(address) as client:          # refused at once, not awaited
                client.sendall(b"PUT /v1/event/fire/odd HTTP/1.1\r\nHost: localhost\r\n" + odd)
                assert client.makefile("rb").readline().startswith(b"HTTP/1.1 400")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_large_artifact_streams_with_flat_memory(server):
    """64 MiB up and down through a real server; Python's allocations stay far below the file size."""
    app, base = server
    agent_headers = token_headers(app, "agent", "big")
    size, block = 64 * 1024 * 1024, bytes(range(256)) * 4096      # 1 MiB blocks
    boundary = "agenthubtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n"
            "Content-Type: application/x-gzip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    host = base.split("//")[1]
    tracemalloc.start()
    try:
        conn = http.client.HTTPConnection(host)
        conn.putrequest("POST", f"/v1/result/{ANY_UUID}/artifact")
        conn.putheader("Authorization", agent_headers["Authorization"])
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        for _ in range(size // len(block)):
            conn.send(block)
        conn.send(tail)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"OK")
        digest = hashlib.sha256()
        conn.request("GET", f"/v1/result/{ANY_UUID}/artifact")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == str(size)
        received = 0
        while chunk := resp.read(1024 * 1024):
            digest.update(chunk)
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert received == size and digest.hexdigest() == expected.hexdigest()
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_the_agents_request_sequence_for_a_whole_job(server, tmp_path):
    """Replays spec §8.3 against a real server, cookies and bearer token as the agent sends them."""
    app, base = server
    app.hub.auth.add_client("agent7", "agent")
    refresh = app.hub.auth.refresh_token("agent7")
    job_id = call_http(base, "POST", "/v1/job", {"job_queue": "lab", "provision_data": {"url": "http://example.com/i"},
                                            "test_data": {"test_cmds": "true"}})[2]
    job_id = json.loads(job_id)["job_id"]
    conn = http.client.HTTPConnection(base.split("//")[1])
    cookie = {}

    def call(method, path, body=None, raw=None, content_type="application/json"):
        headers = {"Authorization": f"Bearer {token}"}
        if cookie:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookie.items())
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if data is not None:
            headers["Content-Type"] = content_type
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.getheader("Set-Cookie"):
            key, value = resp.getheader("Set-Cookie").split(";")[0].split("=", 1)
            cookie[key] = value
        return resp.status, payload

    status, body = call_http(base, "POST", "/v1/oauth2/refresh", {"refresh_token": refresh})[::2]
    token = json.loads(body)["access_token"]
    assert call("POST", "/v1/agents/data/agent7", {"state": "waiting", "comment": ""})[0] == 200
    assert cookie["agent_name"] == "agent7"
    assert call("POST", "/v1/agents/queues", {"lab": "the lab"})[0] == 200
    assert call("POST", "/v1/agents/images", {"lab": {"noble": "url: http://example.com/n"}})[0] == 200
    assert call("POST", "/v1/agents/data/agent7", {"location": "here", "queues": ["lab"],
                                                   "provision_type": "noprovision"})[0] == 200
    assert call("GET", "/v1")[0] == 200
    status, body = call("GET", "/v1/agents/data/agent7")
    agent = json.loads(body)
    assert agent["state"] == "waiting" and agent["restricted_to"] == {}
    agenthub.parse_iso(agent["updated_at"])
    status, body = call("GET", "/v1/job?queue=lab")
    assert status == 200 and json.loads(body)["job_id"] == job_id
    assert call("POST", "/v1/agents/data/agent7", {"job_id": job_id})[0] == 200
    statuses, fragment = {}, 0
    for phase in ("setup", "provision", "firmware_update", "test", "allocate", "reserve"):
        assert json.loads(call("GET", f"/v1/result/{job_id}")[1])["job_state"] != "cancelled"
        call("GET", "/v1/agents/data/agent7")
        call("GET", "/v1/agents/data/agent7")
        assert call("POST", f"/v1/result/{job_id}", {"job_state": phase})[0] == 200
        assert call("POST", "/v1/agents/data/agent7", {"state": phase, "comment": ""})[0] == 200
        if phase in ("setup", "provision", "test"):
            assert call("POST", f"/v1/result/{job_id}/log/output",
                        {"fragment_number": fragment, "timestamp": "2026-11-24T03:00:00.123456+00:00",
                         "phase": phase, "log_data": f"{phase} ran\n"})[0] == 200
            fragment += 1
            statuses[phase] = 0
            assert call("POST", f"/v1/result/{job_id}", {"status": statuses})[0] == 200
        if phase == "provision":
            assert call("POST", "/v1/agents/provision_logs/agent7",
                        {"job_id": job_id, "exit_code": 0, "detail": "provision_success"})[0] == 200
    statuses["cleanup"] = 0
    call("POST", f"/v1/result/{job_id}/log/output", {"fragment_number": fragment, "timestamp":
                                                      "2026-11-24T03:00:01+00:00", "phase": "cleanup",
                                                      "log_data": "clean\n"})
    tarball = _tarball({"artifacts/report.txt": b"all good"})
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n"
            b"Content-Type: application/x-gzip\r\n\r\n" + tarball + b"\r\n--B--\r\n")
    assert call("POST", f"/v1/result/{job_id}/artifact", raw=body,
                content_type="multipart/form-data; boundary=B") == (200, b"OK")
    assert call("POST", f"/v1/result/{job_id}", {"status": statuses, "job_state": "complete"})[0] == 200
    assert call("POST", "/v1/agents/data/agent7", {"job_id": ""})[0] == 200
    assert call("POST", "/v1/agents/data/agent7", {"state": "waiting", "comment": ""})[0] == 200
    assert call("GET", "/v1/job?queue=lab")[0] == 204
    conn.close()
    # What the CLI sees afterwards.
    result = json.loads(call_http(base, "GET", f"/v1/result/{job_id}")[2])
    assert result["job_state"] == "complete" and result["test_output"] == "test ran\n"
    assert result["provision_status"] == 0 and result["cleanup_output"] == "clean\n"
    assert call_http(base, "GET", f"/v1/result/{job_id}/artifact")[2] == tarball
    agent = json.loads(call_http(base, "GET", "/v1/agents/data/agent7")[2])
    assert agent["job_id"] == "" and agent["provision_streak_type"] == "pass"


# == Consul events ====================================================================================================

def fire(test, name, body=b"", status=200, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return test.put(f"/v1/event/fire/{name}" + (f"?{query}" if query else ""), body, status=status)


def xor_index(event_id):
    digits = event_id.replace("-", "")
    return int(digits[:16], 16) ^ int(digits[16:], 16)


def test_index_formula_test_vector():
    assert agenthub.Event("cb9a81ad-fff6-52ac-92a7-5f70687805ec", "x").index == 6430540886266763072


def test_fire_answers_the_event_in_consuls_field_order(anon):
    answer = fire(anon, "test", b"test", node="Node", service="foo", tag="bar")
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Consul-Default-Acl-Policy"] == "allow"
    assert "X-Consul-Index" not in answer.headers
    assert not answer.text.endswith("\n")
    event = json.loads(answer.text)
    assert list(event) == ["ID", "Name", "Payload", "NodeFilter", "ServiceFilter", "TagFilter", "Version", "LTime"]
    assert event["Name"] == "test" and base64.b64decode(event["Payload"]) == b"test"
    assert (event["NodeFilter"], event["ServiceFilter"], event["TagFilter"]) == ("Node", "foo", "bar")
    assert (event["Version"], event["LTime"]) == (1, 0) and uuid.UUID(event["ID"])
    assert fire(anon, "empty").json["Payload"] is None
    pretty = anon.put("/v1/event/fire/p?pretty").text
    assert pretty.endswith("\n") and '\n    "ID"' in pretty


def test_fire_names_may_hold_slashes_and_escapes(anon):
    assert fire(anon, "x%20y/z").json["Name"] == "x y/z"
    assert fire(anon, "caf%C3%A9").json["Name"] == "caf\u00e9"
    assert fire(anon, "trailing/").json["Name"] == "trailing/"


def test_binary_payload_round_trips(anon):
    blob = bytes(range(256))[:200]
    fire(anon, "bin", blob)
    assert base64.b64decode(anon.get("/v1/event/list?name=bin").json[0]["Payload"]) == blob


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PATCH"])
def test_fire_wrong_method(anon, method):
    answer = anon.request("/v1/event/fire/x", method=method, status=405)
    assert answer.text == f"method {method} not allowed" and answer.headers["Allow"] == "OPTIONS,PUT"
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.headers["X-Consul-Default-Acl-Policy"] == "allow"


def test_event_routing_edges(anon):
    answer = anon.request("/v1/event/fire/x", method="OPTIONS")
    assert answer.body == b"" and answer.headers["Allow"] == "OPTIONS,PUT"
    assert anon.request("/v1/event/list", method="OPTIONS").headers["Allow"] == "OPTIONS,GET"
    answer = anon.put("/v1/event/list", status=405)
    assert answer.text == "method PUT not allowed" and answer.headers["Allow"] == "OPTIONS,GET"
    assert anon.put("/v1/event/fire/", status=400).text == "Missing name"
    assert anon.put("/v1/event/fire", status=301).headers["Location"].endswith("/v1/event/fire/")
    for path in ("/v1/event/list/", "/v1/event/nope", "/v1/event/fire-x"):
        answer = anon.get(path, status=404)
        assert answer.text == "Invalid URL path: not a recognized HTTP API endpoint\n"
        assert answer.headers["X-Consul-Default-Acl-Policy"] == "allow"


@pytest.mark.parametrize("params,text", [
    ({"tag": "v1"}, "Cannot provide tag filter without service filter"),
    ({"node": "%5B"}, "Invalid node filter: error parsing regexp: "),
    ({"service": "a(%3F%3Db)"}, "Invalid service filter: error parsing regexp: invalid or unsupported Perl syntax"),
    ({"service": "web", "tag": "(a)%5C1"}, "Invalid tag filter: error parsing regexp: invalid escape sequence"),
    ({"node": "a%2B%2B"}, "Invalid node filter: error parsing regexp: invalid nested repetition operator"),
    ({"dc": "dc9"}, "No path to datacenter"),
])
def test_fire_bad_filters_are_400_not_500(anon, params, text):
    answer = fire(anon, "x", status=400, **params)
    assert answer.text.startswith(text) and answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert anon.get("/v1/event/list").json == []            # nothing stored


def test_fire_size_limit_is_413(app, anon, make_app):
    fire(anon, "n", b"x" * 511)
    answer = fire(anon, "n", b"x" * 512, status=413)
    assert answer.text == "error broadcasting event: user event exceeds configured limit of 512 bytes before encoding"
    small = make_app(event_max_bytes=10, purge_interval=0)
    fire(webtest.TestApp(small), "abcde", b"x" * 6, status=413)
    small.close()


def test_list_order_filter_and_index(anon):
    assert anon.get("/v1/event/list").json == []
    assert anon.get("/v1/event/list").headers["X-Consul-Index"] == "1"
    ids = [fire(anon, n).json["ID"] for n in ("foo", "bar", "foo", "foo", "bar")]
    listing = anon.get("/v1/event/list")
    assert [e["ID"] for e in listing.json] == ids
    assert [e["LTime"] for e in listing.json] == [1, 2, 3, 4, 5]
    assert listing.headers["X-Consul-Index"] == str(xor_index(ids[-1]))
    only_foo = anon.get("/v1/event/list?name=foo")
    assert [e["ID"] for e in only_foo.json] == [ids[0], ids[2], ids[3]]
    assert only_foo.headers["X-Consul-Index"] == str(xor_index(ids[3]))
    assert anon.get("/v1/event/list?name=fo").json == []
    assert anon.get("/v1/event/list?dc=anything").status_int == 200


def test_ring_keeps_the_newest_256(anon):
    ids = [fire(anon, f"e{n}").json["ID"] for n in range(260)]
    listing = anon.get("/v1/event/list").json
    assert len(listing) == 256 and [e["ID"] for e in listing] == ids[4:]
    assert listing[0]["LTime"] == 5 and listing[-1]["LTime"] == 260


def test_rexec_is_never_buffered(anon):
    assert fire(anon, "_rexec").status_int == 200
    fire(anon, "_other")
    assert [e["Name"] for e in anon.get("/v1/event/list").json] == ["_other"]


@pytest.mark.parametrize("query,text", [("wait=10", "Invalid wait time"), ("wait=abc", "Invalid wait time"),
                                        ("index=-1", "Invalid index"), ("index=x", "Invalid index"),
                                        (f"index={2 ** 64}", "Invalid index"),
                                        ("wait=bad&index=bad", "Invalid wait time")])
def test_list_bad_blocking_parameters(anon, query, text):
    assert anon.get(f"/v1/event/list?{query}", status=400).text == text


# Every form Go's time.ParseDuration takes, with its value, and forms it refuses.
GO_DURATIONS = {"0": 0, "+0": 0, "-0": 0, "0s": 0, "1m30s": 90, "500ms": 0.5, "1.5h": 5400, "-1.5h": -5400,
                "+5s": 5, "2h45m": 9900, "1h1h": 7200, "1s1m": 61, ".5s": 0.5, "5.s": 5, "1000ns": 1e-6,
                "1000us": 1e-3, "1000\u00b5s": 1e-3, "1000\u03bcs": 1e-3, "1.0000000001s": 1, "1.5ns": 1e-9,
                "2562047h": 2562047 * 3600, "9223372036854775807ns": 9223372036854775807e-9,
                "-9223372036854775808ns": -9223372036854775808e-9}
GO_DURATIONS.update({"1." + "0" * 5000 + "s": 1, "0" * 4400 + "1s": 1,
                     "0.3333333333333333333333h": 1200,              # the fraction scaled in float64, as Go
                     "0.9999999999999999999999999ns": 1e-9})
GO_BAD_DURATIONS = ("", "10", "s", ".s", "-.s", "+", "-", "1x", "1h2", "1 s", " 1s", "1H", "1sec", "1e3s", "00",
                    "1hh", "1.2.3s", "9223372036854775808ns", "2562048h", "-9223372036854775809ns", "\uff11s",
                    "1\u00b5", "\u00b5s")


def test_go_durations():
    for text, seconds in GO_DURATIONS.items():
        assert agenthub.parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-12), text
    for bad in GO_BAD_DURATIONS:
        with pytest.raises(ValueError):
            agenthub.parse_go_duration(bad)


def test_every_go_duration_form_is_a_wait_time(anon):
    fire(anon, "a")
    index = anon.get("/v1/event/list").headers["X-Consul-Index"]
    for text in GO_DURATIONS:                        # a stale index answers at once, whatever the wait
        assert anon.get("/v1/event/list", {"index": int(index) + 1, "wait": text}).status_int == 200
    for text in GO_BAD_DURATIONS[1:]:
        assert anon.get("/v1/event/list", {"index": 1, "wait": text}, status=400).text == "Invalid wait time"


def test_list_returns_at_once_when_the_index_differs(anon):
    fire(anon, "a")
    # A stale or made-up index never blocks (pure equality test), even with a long wait.
    assert len(anon.get("/v1/event/list?index=12345&wait=10m").json) == 1


def test_hub_views_filter_by_stored_filters(anon):
    fire(anon, "all")
    fire(anon, "web-only", service="web")
    fire(anon, "node-a", node="node-a.*")
    fire(anon, "web-v2", service="web", tag="v2")

    def names(query=""):
        return [e["Name"] for e in anon.get("/v1/event/list" + query).json]
    assert names() == ["all", "web-only", "node-a", "web-v2"]         # without a view: the whole buffer
    assert names("?node=node-a1") == ["all", "web-only", "node-a", "web-v2"]
    assert names("?node=node-b") == ["all", "web-only", "web-v2"]
    assert names("?service=web") == ["all", "web-only", "node-a", "web-v2"]
    assert names("?service=db") == ["all", "node-a"]
    assert names("?service=web&tag=v1") == ["all", "web-only", "node-a"]
    answer = anon.get("/v1/event/list?service=db")
    assert answer.headers["X-Consul-Index"] == str(xor_index(answer.json[-1]["ID"]))


@pytest.fixture
def acl_app(make_app):
    app = make_app(event_acl_default="deny")
    secrets = {"deployer": app.hub.event_acl.add_token("deployer", read=[""], write=["deploy"]),
               "reader": app.hub.event_acl.add_token("reader", read=["deploy"], write=[])}
    yield app, secrets
    app.close()


def test_event_acl_fire(acl_app):
    app, secrets = acl_app
    test = webtest.TestApp(app)
    answer = fire(test, "deploy", status=403)
    assert answer.text == "Permission denied" and answer.headers["X-Consul-Default-Acl-Policy"] == "deny"
    fire(test, "deploy-web", token=secrets["deployer"])
    test.put("/v1/event/fire/deploy", headers={"X-Consul-Token": secrets["deployer"]})
    test.put("/v1/event/fire/deploy", headers={"Authorization": f"Bearer {secrets['deployer']}"})
    assert fire(test, "other", token=secrets["deployer"], status=403).text == "Permission denied"
    assert fire(test, "deploy", token=secrets["reader"], status=403).text == "Permission denied"
    assert fire(test, "deploy", token="no-such-token", status=403).text == "ACL not found"
    # ?token= wins over the header.
    test.put(f"/v1/event/fire/deploy?token={secrets['reader']}", headers={"X-Consul-Token": secrets["deployer"]},
             status=403)


def test_event_acl_list(acl_app):
    app, secrets = acl_app
    test = webtest.TestApp(app)
    fire(test, "deploy", token=secrets["deployer"])
    app.hub.events.buffer.fire("secret-thing", None)           # fired by someone with rights
    anonymous = test.get("/v1/event/list")
    assert anonymous.json == [] and "X-Consul-Results-Filtered-By-ACLs" not in anonymous.headers
    assert anonymous.headers["X-Consul-Index"] == "1"
    reader = test.get(f"/v1/event/list?token={secrets['reader']}")
    assert [e["Name"] for e in reader.json] == ["deploy"]
    assert reader.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    everything = test.get("/v1/event/list", headers={"X-Consul-Token": secrets["deployer"]})
    assert len(everything.json) == 2 and "X-Consul-Results-Filtered-By-ACLs" not in everything.headers
    assert test.get("/v1/event/list?token=bogus", status=403).text == "ACL not found"


def test_event_token_secrets_are_stored_hashed(acl_app):
    app, secrets = acl_app
    stored = [r["token_hash"] for r in app.hub.db.read("SELECT token_hash FROM event_tokens")]
    assert secrets["deployer"] not in stored
    assert hashlib.sha256(secrets["deployer"].encode()).hexdigest() in stored


def test_restart_keeps_ids_ltime_and_index(tmp_path, make_app):
    path = str(tmp_path / "events.db")
    first = make_app(db=path, purge_interval=0)
    test = webtest.TestApp(first)
    fired = [fire(test, f"e{n}").json["ID"] for n in range(3)]
    before = test.get("/v1/event/list")
    first.close()
    second = make_app(db=path, purge_interval=0)
    test = webtest.TestApp(second)
    after = test.get("/v1/event/list")
    assert after.json == before.json and [e["ID"] for e in after.json] == fired
    assert after.headers["X-Consul-Index"] == before.headers["X-Consul-Index"]
    fire(test, "next")
    assert test.get("/v1/event/list").json[-1]["LTime"] == 4
    second.close()
    small = make_app(db=path, event_buffer_size=2, purge_interval=0)   # a smaller ring keeps the newest
    assert [e["LTime"] for e in webtest.TestApp(small).get("/v1/event/list").json] == [3, 4]
    small.close()


def test_blocking_list_wakes_on_a_new_event(server):
    app, base = server
    first = json.loads(call_http(base, "PUT", "/v1/event/fire/test", b"1")[2])
    index = xor_index(first["ID"])
    results = {}

    def watcher(key, query):
        status, headers, body = call_http(base, "GET", f"/v1/event/list?{query}")
        results[key] = (status, headers["X-Consul-Index"], json.loads(body))
    watchers = [threading.Thread(target=watcher, args=("all", f"index={index}&wait=30s")),
                threading.Thread(target=watcher, args=("named", f"name=test&index={index}&wait=30s"))]
    for thread in watchers:
        thread.start()
    assert _wait_for(lambda: app.hub.watchers.parked() == 2)        # both are blocked now
    call_http(base, "PUT", "/v1/event/fire/other", b"")       # wakes "named" but its index is unchanged
    second = json.loads(call_http(base, "PUT", "/v1/event/fire/test", b"2")[2])
    for thread in watchers:
        thread.join(timeout=30)
    status, new_index, events = results["named"]
    assert status == 200 and [e["ID"] for e in events] == [first["ID"], second["ID"]]
    assert new_index == str(xor_index(second["ID"]))
    status, new_index, events = results["all"]
    assert status == 200 and events[-1]["Name"] in ("other", "test") and new_index != str(index)


def test_blocking_queries_are_capped_per_client_and_in_total(make_app):
    app = make_app(max_watchers_per_client=2, max_watchers=3)
    httpd = agenthub.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        index = xor_index(json.loads(call_http(base, "PUT", "/v1/event/fire/test", b"1")[2])["ID"])
        results = []
        watchers = [threading.Thread(target=lambda: results.append(
            call_http(base, "GET", f"/v1/event/list?index={index}&wait=30s")[0])) for _ in range(2)]
        for thread in watchers:
            thread.start()
        assert _wait_for(lambda: app.hub.watchers.parked() == 2)
        status, headers, body = call_http(base, "GET", f"/v1/event/list?index={index}&wait=30s")
        assert status == 429 and body == b"Your IP is issuing too many concurrent connections, please rate limit your calls"
        assert headers["Retry-After"] == "1" and headers["X-Consul-Default-Acl-Policy"] == "allow"
        assert call_http(base, "GET", "/v1/event/list")[0] == 200           # a query that does not block is served
        call_http(base, "PUT", "/v1/event/fire/test", b"2")
        for thread in watchers:
            thread.join(timeout=30)
        assert results == [200, 200]
        # The slots came back: a new watcher parks again.
        late = threading.Thread(target=lambda: results.append(call_http(base, "GET", "/v1/event/list?index=1&wait=1s")[0]))
        late.start()
        late.join(timeout=30)
        assert results[-1] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
    slots = agenthub.WatcherSlots(total=3, per_client=2)
    for addr in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        slots.take(addr)
    with pytest.raises(agenthub.ApiError):
        slots.take("10.0.0.4")                                                # the total
    slots.give_back("10.0.0.1")
    slots.take("10.0.0.4")


def test_blocking_list_times_out_with_the_same_index(server):
    app, base = server
    event = json.loads(call_http(base, "PUT", "/v1/event/fire/test", b"")[2])
    index = xor_index(event["ID"])
    status, headers, body = call_http(base, "GET", f"/v1/event/list?index={index}&wait=200ms")
    assert status == 200 and headers["X-Consul-Index"] == str(index) and len(json.loads(body)) == 1


def test_blocking_on_an_empty_list_waits_for_the_first_event(server):
    app, base = server
    results = {}
    thread = threading.Thread(target=lambda: results.update(
        answer=call_http(base, "GET", "/v1/event/list?name=first&index=1&wait=30s")))
    thread.start()
    assert _wait_for(lambda: app.hub.watchers.parked() == 1)
    event = json.loads(call_http(base, "PUT", "/v1/event/fire/first", b"")[2])
    thread.join(timeout=30)
    status, headers, body = results["answer"]
    assert [e["ID"] for e in json.loads(body)] == [event["ID"]]


def test_many_parked_watchers_are_answered_by_one_fire_and_keep_their_connections(server):
    import socket
    app, base = server
    host, port = base.split("//")[1].split(":")
    first = json.loads(call_http(base, "PUT", "/v1/event/fire/w", b"1")[2])
    index = xor_index(first["ID"])
    request = f"GET /v1/event/list?name=w&index={index}&wait=60s HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    clients = [http.client.HTTPConnection(host, int(port)) for _ in range(50)]
    for conn in clients:
        conn.request("GET", f"/v1/event/list?name=w&index={index}&wait=60s")
    gone = socket.create_connection((host, int(port)))
    gone.sendall(request)
    assert _wait_for(lambda: app.hub.watchers.parked() == 51)      # all parked, none answered yet
    gone.close()                                                         # one client goes away meanwhile
    second = json.loads(call_http(base, "PUT", "/v1/event/fire/w", b"2")[2])
    for conn in clients:
        resp = conn.getresponse()
        events = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("X-Consul-Index") == str(xor_index(second["ID"]))
        assert [e["ID"] for e in events] == [first["ID"], second["ID"]]
        assert resp.getheader("X-Consul-Default-Acl-Policy") == "allow"
        conn.request("GET", "/v1/event/list?name=w")                     # the connection is still usable
        again = conn.getresponse()
        assert again.status == 200 and len(json.loads(again.read())) == 2
        conn.close()
    assert app.hub.watchers.parked() == 0


def test_closing_the_app_answers_parked_watchers(make_app):
    app = make_app(purge_interval=0)
    httpd = agenthub.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        event = json.loads(call_http(base, "PUT", "/v1/event/fire/x", b"")[2])
        results = {}
        thread = threading.Thread(target=lambda: results.update(answer=call_http(
            base, "GET", f"/v1/event/list?index={xor_index(event['ID'])}&wait=10m")))
        thread.start()
        assert _wait_for(lambda: app.hub.watchers.parked() == 1)
        app.close()
        thread.join(timeout=30)
        status, headers, body = results["answer"]
        assert status == 200 and headers["X-Consul-Index"] == str(xor_index(event["ID"]))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_blocking_without_agenthubs_server_waits_in_the_request_thread(anon):
    event = fire(anon, "x").json
    answer = anon.get(f"/v1/event/list?index={xor_index(event['ID'])}&wait=100ms")     # WebTest: no parking
    assert answer.headers["X-Consul-Index"] == str(xor_index(event["ID"])) and len(answer.json) == 1


def test_concurrent_fires_lose_nothing(server):
    app, base = server

    def worker(n):
        for i in range(20):
            call_http(base, "PUT", f"/v1/event/fire/w{n}", str(i).encode())
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = json.loads(call_http(base, "GET", "/v1/event/list")[2])
    assert len(events) == 160 and [e["LTime"] for e in events] == list(range(1, 161))
    assert len({e["ID"] for e in events}) == 160


def test_add_event_token_command(tmp_path, capsys, make_app):
    db = str(tmp_path / "hub.db")
    assert agenthub.main(["add-event-token", "ops", "--write", "deploy", "--read", "", "--db", db]) == 0
    secret = capsys.readouterr().out.split("secret: ")[1].split()[0]
    app = make_app(db=db, event_acl_default="deny", purge_interval=0)
    fire(webtest.TestApp(app), "deploy-x", token=secret)
    app.close()
    assert agenthub.main(["add-event-token", "ops", "--db", ":memory:"]) == 2


# == Agent registry: Prefactor /api/v1 ===============================================================================

def pf_create(test, name, **details):
    return test.post_json("/api/v1/agent", {"details": {"name": name, **details}}).json["details"]


def test_pfid_format():
    assert agenthub._b32(1234567890000, 10) + agenthub._b32(123456789, 6) == "013xrzp12g3nqk8n"
    clock = agenthub.PfidClock(123456789)
    made = [clock() for _ in range(500)]
    assert made == sorted(made) and len(set(made)) == 500          # k-sortable within one hub
    pfid = agenthub.new_pfid(123456789)
    assert agenthub.PFID_PATTERN.match(pfid) and agenthub.pfid_partition(pfid) == 123456789
    assert agenthub.pfid_partition("013xrzp12g3nqk8nx0y2vfkg4s3jp2qr") == 123456789
    assert agenthub.pfid_partition("not-a-pfid") is None


def test_prefactor_create_and_fetch(anon):
    answer = anon.post_json("/api/v1/agent", {"details": {"name": "My Agent", "description": "d"}})
    assert answer.content_type == "application/json" and answer.json["status"] == "success"
    agent = answer.json["details"]
    assert list(agent) == sorted(agent)
    assert agent["type"] == "agent" and agent["status"] == "pending" and agent["name"] == "My Agent"
    assert agent["current_version_id"] is None and agent["inserted_at"] == agent["updated_at"]
    assert agent["instance_counts"] == {"active": 0, "cancelled": 0, "complete": 0, "failed": 0, "finished": 0,
                                        "pending": 0, "total": 0}
    assert agent["available_actions"] == {"delete": True, "reinstate": False, "retire": True, "update": True}
    assert agenthub.pfid_partition(agent["id"]) == 123456789
    assert anon.get(f"/api/v1/agent/{agent['id']}").json["details"] == agent
    assert anon.get(f"/api/v1/agent/show?agent_id={agent['id']}").json["details"] == agent
    other_env = agenthub.new_pfid(5)
    assert anon.get(f"/api/v1/agent/{agent['id']}?environment_id={other_env}").json["details"][
        "instance_counts"]["total"] == 0
    given = "013xrzp12g3nqk8nx0y2vfkg4s3jp2qr"
    assert pf_create(anon, "Given", id=given, external_identifier="ext-1")["id"] == given
    assert anon.get("/api/v1/agent/show?external_identifier=ext-1").json["details"]["id"] == given
    assert anon.get("/api/v1/ping").json == {"status": "success", "details": {"token_type": "api"}}


@pytest.mark.parametrize("body,errors", [
    ({}, {"details": ["can't be blank"]}),
    ({"details": "x"}, {"details": ["can't be blank"]}),
    ({"details": {}}, {"details.name": ["can't be blank"]}),
    ({"details": {"name": "  "}}, {"details.name": ["can't be blank"]}),
    ({"details": {"name": 5}}, {"details.name": ["is invalid"]}),
    ({"details": {"name": "x" * 256}}, {"details.name": ["should be at most 255 character(s)"]}),
    ({"details": {"name": "taken"}}, {"details.name": ["has already been taken"]}),
    ({"details": {"name": "n", "environment_id": "nope"}}, {"details.environment_id": ["is invalid"]}),
    ({"details": {"name": "n", "id": "01m85wfsa4000000000000000000000a"}}, {"details.id": ["is invalid"]}),
    ({"details": {"name": "n", "description": 3}}, {"details.description": ["is invalid"]}),
    ({"details": {"name": "n"}, "idempotency_key": "k" * 65}, {"idempotency_key": [
        "should be at most 64 character(s)"]}),
])
def test_prefactor_create_validation(anon, body, errors):
    pf_create(anon, "taken")
    answer = anon.post_json("/api/v1/agent", body, status=422)
    assert answer.json == {"status": "error", "code": "validation_errors", "message": "Validation failed",
                           "errors": errors}


def test_prefactor_errors(anon):
    assert anon.post("/api/v1/agent", "{nope", content_type="application/json", status=400).json["code"] == \
        "bad_request"
    anon.post_json("/api/v1/agent", [1], status=400)
    assert anon.get("/api/v1/agent/not-a-pfid", status=400).json["message"] == "Invalid agent_id"
    assert anon.get(f"/api/v1/agent/{agenthub.new_pfid(123456789)}", status=404).json == {
        "status": "error", "code": "not_found", "message": "Agent not found"}
    assert anon.get("/api/v1/nothing", status=404).json["code"] == "not_found"
    assert anon.patch("/api/v1/agent", status=405).json["code"] == "method_not_allowed"
    anon.get("/api/v1/agent/show", status=422)
    anon.get("/api/v1/agent/show?agent_id=a&external_identifier=b", status=422)


def test_prefactor_bearer_tokens(make_app):
    app = make_app(api_tokens="tok-1,tok-2", purge_interval=0)
    test = webtest.TestApp(app)
    assert test.get("/api/v1/ping", status=401).json["code"] == "unauthorized"
    assert test.get("/api/v1/ping", headers={"Authorization": "Basic x"}, status=401).json["code"] == "unauthorized"
    assert test.get("/api/v1/ping", headers={"Authorization": "Bearer nope"}, status=401).json["code"] == \
        "bad_authtoken"
    test.get("/api/v1/ping", headers={"Authorization": "Bearer tok-2"}, status=200)
    app.close()


def test_prefactor_list_pagination_and_sorting(anon, make_app):
    made = [pf_create(anon, name) for name in ("delta", "alpha", "charlie", "bravo", "echo")]

    def listing(query=""):
        return anon.get("/api/v1/agent" + query).json
    whole = listing()
    assert set(whole) == {"status", "summaries", "pagination", "sorting"}
    assert [a["id"] for a in whole["summaries"]] == [a["id"] for a in reversed(made)]        # -id: newest first
    assert whole["sorting"] == {"field": "id", "direction": "desc"}
    assert all("instance_counts" not in a and "available_actions" in a for a in whole["summaries"])
    page = listing("?sorting=name&pagination[offset]=2&pagination[page_size]=2")
    assert [a["name"] for a in page["summaries"]] == ["charlie", "delta"]
    assert page["pagination"] == {"item_count": 5, "item_start": 3, "item_end": 4, "page_index": 2, "page_count": 3,
                                  "page_offset": 2, "page_size": 2, "next_page_offset": 4, "previous_page_offset": 0}
    last = listing("?sorting=-name&pagination[offset]=4&pagination[page_size]=2")
    assert [a["name"] for a in last["summaries"]] == ["alpha"]
    assert last["pagination"]["next_page_offset"] is None and last["pagination"]["previous_page_offset"] == 2
    past = listing("?pagination[offset]=10&pagination[page_size]=3")
    assert past["summaries"] == [] and past["pagination"]["item_start"] == 0 and past["pagination"]["item_end"] == 0
    assert past["pagination"]["page_index"] == 4 and past["pagination"]["page_count"] == 2
    assert listing("?pagination[offset]=1")["pagination"]["previous_page_offset"] == 0
    assert listing("?team_id=t1")["summaries"] == []
    env = made[0]["environment_id"]
    assert len(listing(f"?environment_id={env}")["summaries"]) == 5
    assert listing(f"?environment_id={agenthub.new_pfid(9)}")["summaries"] == []
    empty = webtest.TestApp(make_app(purge_interval=0)).get("/api/v1/agent").json
    assert empty["summaries"] == [] and empty["pagination"]["page_count"] == 0
    for bad in ("sorting=title", "sorting=--id", "pagination[page_size]=0", "pagination[page_size]=101",
                "pagination[offset]=-1", "pagination[offset]=x", "environment_id=zzz"):
        answer = anon.get(f"/api/v1/agent?{bad}", status=422)
        assert answer.json["code"] == "validation_errors" and list(answer.json["errors"])[0] == bad.split("=")[0]


def test_prefactor_update_retire_reinstate_delete(app, anon):
    agent = pf_create(anon, "worker")
    path = f"/api/v1/agent/{agent['id']}"
    assert anon.put_json(path, {"details": {}}).json["details"]["updated_at"] == agent["updated_at"]
    version = agenthub.new_pfid(1)
    updated = anon.put_json(path, {"details": {"name": "worker-2", "description": None,
                                               "current_version_id": version, "status": "active"}}).json["details"]
    assert (updated["name"], updated["current_version_id"], updated["status"]) == ("worker-2", version, "pending")
    anon.put_json(path, {"details": {"current_version_id": "bad"}}, status=422)
    anon.put_json(path, {}, status=422)
    pf_create(anon, "other")
    anon.put_json(path, {"details": {"name": "other"}}, status=422)
    retired = anon.post(f"{path}/retire").json["details"]
    assert retired["status"] == "retired"
    assert retired["available_actions"] == {"delete": True, "reinstate": True, "retire": False, "update": False}
    assert anon.post_json(f"{path}/retire", {}, status=409).json == {
        "status": "error", "code": "conflict", "message": "Agent cannot be retired in its current state (retired)"}
    anon.put_json(path, {"details": {"name": "x"}}, status=409)
    assert anon.post(f"{path}/reinstate").json["details"]["status"] == "pending"
    anon.post(f"{path}/reinstate", status=409)
    anon.post(f"{path}/retire", "[1]", content_type="application/json", status=400)
    deleted = anon.delete(path).json["details"]
    assert deleted["name"] == "worker-2"
    anon.get(path, status=404)


AVAILABLE_ACTIONS = [
    # status, running → update, retire, reinstate, delete
    ("pending", False, (True, True, False, True)),
    ("active", False, (True, True, False, True)),
    ("active", True, (True, True, False, False)),
    ("dormant", False, (True, True, False, True)),
    ("dormant", True, (True, True, False, False)),
    ("retired", False, (False, False, True, True)),
    ("retired", True, (False, False, True, False)),
]


@pytest.mark.parametrize("status,running,flags", AVAILABLE_ACTIONS)
def test_available_actions_table(status, running, flags):
    now = 1_000_000.0
    row = {"last_seen_at": None, "shutdown_at": None, "state": None, "tf": 0, "retired": int(status == "retired")}
    counts = {}
    if status == "active":
        row["last_seen_at"] = now
    if status == "dormant":
        row["last_seen_at"] = now - 1000
        counts["complete"] = 1
    if running:
        counts["pending"] = 1
    view = agenthub.derive_agent(row, counts, False, now, 300)
    if not (status == "dormant" and running):               # a pending instance makes a dormant agent active
        assert view.status == status
    assert (view.actions["update"], view.actions["retire"], view.actions["reinstate"], view.actions["delete"]) == flags


def test_prefactor_instances(anon):
    agent = pf_create(anon, "runner")
    body = {"agent_id": agent["id"], "agent_version": {"name": "v1"}, "agent_schema_version": {"s": 1},
            "update_current_version": True}
    inst = anon.post_json("/api/v1/agent_instance/register", body).json["details"]
    assert inst["type"] == "agent_instance" and inst["status"] == "pending" and inst["agent_id"] == agent["id"]
    assert all(agenthub.PFID_PATTERN.match(inst[k]) for k in ("id", "account_id", "agent_version_id",
                                                               "agent_deployment_id", "environment_id"))
    again = anon.post_json("/api/v1/agent_instance/register", body).json["details"]
    assert again["agent_version_id"] == inst["agent_version_id"]
    assert again["agent_deployment_id"] == inst["agent_deployment_id"]
    fetched = anon.get(f"/api/v1/agent/{agent['id']}").json["details"]
    assert fetched["current_version_id"] == inst["agent_version_id"] and fetched["status"] == "active"
    assert fetched["instance_counts"]["pending"] == 2 and fetched["available_actions"]["delete"] is False
    started = anon.post_json(f"/api/v1/agent_instance/{inst['id']}/start",
                             {"timestamp": "2026-11-24T03:12:45.123456+00:00"}).json["details"]
    assert started["status"] == "active" and started["started_at"] == "2026-11-24T03:12:45Z"
    anon.post_json(f"/api/v1/agent_instance/{inst['id']}/start", {}, status=409)
    done = anon.post_json(f"/api/v1/agent_instance/{inst['id']}/finish", {"status": "failed"}).json["details"]
    assert done["status"] == "failed" and done["finished_at"]
    assert anon.post(f"/api/v1/agent_instance/{inst['id']}/finish", status=409).json["code"] == "conflict"
    anon.post_json(f"/api/v1/agent_instance/{again['id']}/finish", {"status": "bogus"}, status=422)
    assert anon.post(f"/api/v1/agent_instance/{again['id']}/finish").json["details"]["status"] == "complete"
    counts = anon.get(f"/api/v1/agent/{agent['id']}").json["details"]["instance_counts"]
    assert counts == {"active": 0, "cancelled": 0, "complete": 1, "failed": 1, "finished": 2, "pending": 0,
                      "total": 2}
    listing = anon.get(f"/api/v1/agent_instance?agent_id={agent['id']}").json
    assert len(listing["summaries"]) == 2 and listing["pagination"]["item_count"] == 2
    assert anon.get(f"/api/v1/agent_instance/{inst['id']}").json["details"]["status"] == "failed"
    anon.get(f"/api/v1/agent_instance/{agenthub.new_pfid(123456789)}", status=404)
    anon.post_json("/api/v1/agent_instance/register", {}, status=422)
    anon.post_json("/api/v1/agent_instance/register", {"agent_id": agenthub.new_pfid(123456789)}, status=404)
    anon.post(f"/api/v1/agent/{agent['id']}/retire")
    anon.post_json("/api/v1/agent_instance/register", body, status=409)


def test_idempotency_keys_replay_the_first_answer(anon):
    first = anon.post_json("/api/v1/agent", {"details": {"name": "once"}, "idempotency_key": "k1"}).json
    again = anon.post_json("/api/v1/agent", {"details": {"name": "once"}, "idempotency_key": "k1"}).json
    assert again == first
    header = anon.post_json("/api/v1/agent", {"details": {"name": "twice"}}, headers={"Idempotency-Key": "k2"}).json
    assert anon.post_json("/api/v1/agent", {"details": {"name": "twice"}},
                          headers={"Idempotency-Key": "k2"}).json == header
    anon.post_json("/api/v1/agent", {"details": {"name": "once"}}, status=422)      # without a key: taken


# == Agent registry: Rackspace v2 ======================================================================================

RS = {"X-Auth-Token": "0f6e9f63600142f0a970911583522217"}
AGENT_UUID = "8f135b4f-7a69-4b8a-947f-5e80d772fd97"


def rs_event(test, agent_id, body, caller=None, project="110011", status=202, **headers):
    return test.post_json(f"/v2/{project}/agents/{agent_id}/events", body,
                          headers={**RS, "X-Agent-Id": caller or agent_id, **headers}, status=status)


def test_rackspace_startup_that_creates_an_agent_announces_once(anon, app):
    """One request is one change (agents.md §4.2): the new agent's first announcement is its end state."""
    rs_event(anon, AGENT_UUID, {"event": "startup"})
    announced = [json.loads(base64.b64decode(e["Payload"])) for e in anon.get("/v1/event/list?name=agent-status").json]
    assert [(a["agent_config_state"], a["agent_state"], a["build_state"]) for a in announced] == \
        [("Enabled", "Idle", "Idle")]


@pytest.mark.sqlite_only("SQLite's group commit (PostgreSQL's writers commit side by side)")
def test_a_thread_that_reads_then_writes_on_an_in_memory_database_never_deadlocks_with_a_writer():
    """``:memory:`` has one connection.  A thread holding it (a read, the readiness probe) then
    writes, while another writer has begun: the writer used to take the writer lock, then wait for
    the connection, and the two waited for each other for ever."""
    db = agenthub.Database(":memory:")
    holding, go, done = threading.Event(), threading.Event(), []

    def insert(key):
        with db.write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (key,))
        done.append(key)

    def reader_then_writer():
        with db.connection():
            holding.set()
            go.wait(10)
            insert("reader")
    first = threading.Thread(target=reader_then_writer, daemon=True)
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=insert, args=("writer",), daemon=True)
    second.start()

    def waits_for_the_connection():
        frame = sys._current_frames().get(second.ident)
        while frame is not None and frame.f_code.co_name != "_acquire":
            frame = frame.f_back
        return frame is not None
    assert _wait_for(waits_for_the_connection)
    go.set()                                       # the writer waits for the connection: read on
    first.join(10)
    second.join(10)
    assert sorted(done) == ["reader", "writer"]    # (deadlocked, the two daemon threads stay blocked)
    db.close()


class _QueuedWriters:
    """Writers of the group-commit tests, on an SQLite file: each inserts its key into settings,
    with an after-commit hook, then runs its own further step (which may fail).  ``batch`` holds
    the first one inside its transaction until the others have queued up behind it."""

    def __init__(self, path):
        self.path, self.db = path, agenthub.Database(path)
        self.hooks, self.outcomes = [], {}
        self.inside, self.release = threading.Event(), threading.Event()

    def seen(self, key):
        with sqlite3.connect(self.path) as conn:
            return conn.execute("SELECT count(*) FROM settings WHERE key = ?", (key,)).fetchone()[0] == 1

    def write(self, key, hold=False, then=None):
        try:
            with self.db.write() as conn:
                conn.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (key,))
                self.db.after_commit(lambda: self.hooks.append(key))
                if hold:
                    self.inside.set()
                    self.release.wait(10)
                if then is not None:
                    then(conn)
            self.outcomes[key] = ("ok", self.seen(key))      # committed before the writer returned?
        except (ValueError, agenthub.ApiError) as exc:
            self.outcomes[key] = exc

    def batch(self, *queued):
        """``write("a")`` held, then ``write(key, then=step)`` for each (key, step) of ``queued``."""
        first = threading.Thread(target=self.write, args=("a",), kwargs={"hold": True})
        first.start()
        assert self.inside.wait(10)
        threads = [threading.Thread(target=self.write, args=(key,), kwargs={"then": step}) for key, step in queued]
        for number, thread in enumerate(threads, start=1):
            thread.start()
            assert _wait_for(lambda: self.db._waiting == number)     # queued behind the first writer
        self.release.set()
        for thread in [first] + threads:
            thread.join(10)


def test_writers_that_queue_up_share_one_commit_and_a_failing_one_undoes_only_its_own_steps(tmp_path):
    writers = _QueuedWriters(str(tmp_path / "group.db"))
    other = sqlite3.connect(writers.path)                 # another connection sees each commit once

    def commits():
        return other.execute("PRAGMA data_version").fetchone()[0]

    def fail(conn):
        raise ValueError("b")
    try:
        before = commits()
        writers.batch(("b", fail), ("c", None))
        assert commits() == before + 1                          # three writers, one commit
        outcomes = writers.outcomes
        assert outcomes["a"] == outcomes["c"] == ("ok", True) and isinstance(outcomes["b"], ValueError)
        assert not writers.seen("b")                            # the failed one's step is undone ...
        assert writers.hooks == ["a", "c"]                      # ... and its hook never runs
        writers.write("d")                                      # the writer is free again
        assert outcomes["d"] == ("ok", True) and commits() == before + 2
    finally:
        other.close()
        writers.db.close()


def test_a_writer_that_fills_the_disk_inside_a_shared_commit_fails_every_writer_of_it_with_507(tmp_path):
    """SQLite rolls a whole transaction back on SQLITE_FULL, the steps of the writers before
    included: each of them is refused (507), none sees its change, and the writer is free again."""
    writers = _QueuedWriters(str(tmp_path / "full.db"))

    def fill(conn):                                    # a real SQLITE_FULL: the file may not grow further
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 1}")
        try:
            conn.execute("INSERT INTO settings (key, value) VALUES ('big', ?)", ("x" * 500000,))
        finally:
            conn.execute("PRAGMA max_page_count = 1073741823")
    try:
        writers.batch(("b", fill), ("c", None))
        status = {key: getattr(outcome, "status", outcome) for key, outcome in writers.outcomes.items()}
        assert status["a"] == status["b"] == 507                # the batch a and b were in is lost
        assert status["c"] in (("ok", True), 507)               # c was in it too, or began the next one
        assert not writers.seen("a") and not writers.seen("b") and writers.seen("c") == (status["c"] != 507)
        assert writers.hooks == (["c"] if status["c"] != 507 else [])
        writers.write("d")                                      # the writer is free again
        assert writers.outcomes["d"] == ("ok", True)
    finally:
        writers.db.close()


def test_a_pop_is_one_commit_with_the_state_change_it_causes_and_a_failed_one_announces_nothing(
        app, anon, agent):
    """The agent's sign of life, the job, its instance, its events and the Idle -> Building
    announcement commit together; a pop that fails takes its announcement with it."""
    def writes():
        return sample(scrape(anon), "agenthub_database_write_seconds", "_count")

    def announced():
        return [json.loads(base64.b64decode(e["Payload"]))["agent_state"]
                for e in anon.get("/v1/event/list?name=agent-status").json]
    first, second = submit(anon), submit(anon)
    before, states = writes(), announced()
    with pytest.raises(RuntimeError):
        with app.hub.db.write():                             # a pop inside a change that fails later
            assert app.hub.jobs.pop(["q1"], "agent1")["job_id"] == first
            raise RuntimeError("a later step fails")
    assert announced() == states and anon.get(f"/v1/result/{first}").json["job_state"] == "waiting"
    assert writes() == before                                               # rolled back: nothing committed
    assert agent.get("/v1/job?queue=q1").json["job_id"] == first
    assert writes() == before + 1                                           # one commit for all of it
    assert announced() == states + ["Building"]
    assert anon.get(f"/v1/result/{second}").json["job_state"] == "waiting"


def test_a_failing_step_of_a_registry_change_leaves_nothing_half_made(anon, app, monkeypatch):
    agent = pf_create(anon, "atomic")
    version = {"name": "v9"}

    def broken(values):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(app.hub.registry.store, "add_instance", broken)       # the last step of register fails
    with pytest.raises(sqlite3.OperationalError):
        app.hub.registry.register_instance(agent["id"], version, {}, update_current=True)
    monkeypatch.undo()
    after = anon.get(f"/api/v1/agent/{agent['id']}").json["details"]
    assert after["current_version_id"] is None and after["instance_counts"]["total"] == 0
    inst = anon.post_json("/api/v1/agent_instance/register", {"agent_id": agent["id"], "agent_version": version,
                                                               "update_current_version": True}).json["details"]
    assert anon.get(f"/api/v1/agent/{agent['id']}").json["details"]["current_version_id"] == inst["agent_version_id"]


def test_an_idempotency_key_still_in_use_answers_409(anon, app):
    """The key is claimed in the transaction that checks it: a repeat while the first runs cannot run twice."""
    scope, runs = "POST /api/v1/agent -", []

    def first():
        runs.append(1)
        with pytest.raises(agenthub.ApiError) as refused:
            app.hub.idempotency.run(scope, "k", lambda: runs.append(2))
        assert refused.value.status == 409
        return 200, "{}"
    assert app.hub.idempotency.run(scope, "k", first) == (200, "{}")
    assert app.hub.idempotency.run(scope, "k", lambda: runs.append(3)) == (200, "{}") and runs == [1]


def test_rackspace_startup_creates_and_reports(anon):
    answer = rs_event(anon, AGENT_UUID, {"event": "startup"})
    assert answer.body == b"" and answer.status_int == 202
    assert anon.get(f"/v2/110011/agents/{AGENT_UUID.upper()}/status", headers=RS).json == {"busy": False,
                                                                                            "online": True}
    agent = anon.get(f"/v2/110011/agents/{AGENT_UUID}", headers=RS).json
    assert agent["id"] == AGENT_UUID and agent["enabled"] is True and agent["project_id"] == "110011"
    assert [link["rel"] for link in agent["links"]] == ["self", "events", "status"]
    assert [a["id"] for a in anon.get("/v2/110011/agents", headers=RS).json["agents"]] == [AGENT_UUID]
    assert anon.get("/v2/110011/agents?host_machine_id=5", headers=RS).json == {"agents": []}
    rs_event(anon, AGENT_UUID, {"event": "shutdown"})
    assert anon.get(f"/v2/110011/agents/{AGENT_UUID}/status", headers=RS).json == {"busy": False, "online": False}
    feed = anon.get(f"/v2/110011/agents/{AGENT_UUID}/events", headers=RS).json
    assert [e["event"] for e in feed["events"]] == ["agent_startup", "agent_shutdown"]
    assert feed["events"][0]["time"].endswith("Z") and feed["events"][0]["agent"]["id"] == AGENT_UUID
    assert "marker=" in feed["links"][0]["href"] and feed["links"][0]["rel"] == "next"
    newer = anon.get(f"/v2/110011/agents/{AGENT_UUID}/events?marker={feed['events'][0]['id']}", headers=RS).json
    assert [e["event"] for e in newer["events"]] == ["agent_shutdown"]
    assert anon.get(f"/v2/110011/agents/{AGENT_UUID}/events?marker=999", headers=RS).json == {"events": []}
    project = anon.get("/v2/110011/events", headers=RS).json["events"]
    assert [e["event"] for e in project] == ["agent_shutdown", "agent_startup"]        # newest first


def test_rackspace_event_errors(anon):
    assert anon.post_json(f"/v2/1/agents/{AGENT_UUID}/events", {"event": "startup"}, status=401).json == {
        "message": "Unauthorized."}
    answer = anon.post_json(f"/v2/1/agents/{AGENT_UUID}/events", {"event": "startup"}, headers=RS, status=400)
    assert answer.json == {"message": "Validation failed.", "errors": ["X-Agent-Id header is required."]}
    assert rs_event(anon, AGENT_UUID, {"event": "startup"}, caller="someone-else", status=403).json["message"] == \
        "X-Agent-Id does not match the agent in the request URI."
    assert rs_event(anon, AGENT_UUID, {}, status=400).json["errors"] == ["event is required."]
    assert rs_event(anon, AGENT_UUID, {"event": "Startup"}, status=400).json["errors"] == [
        "event must be one of: startup, shutdown, agent_activate."]
    anon.post(f"/v2/1/agents/{AGENT_UUID}/events", "[]", headers={**RS, "X-Agent-Id": AGENT_UUID},
              content_type="application/json", status=400)
    assert rs_event(anon, AGENT_UUID, {"event": "shutdown"}, status=404).json == {"message": "Agent not found."}
    rs_event(anon, AGENT_UUID, {"event": "startup"})
    assert rs_event(anon, AGENT_UUID, {"event": "startup"}, project="other", status=404).json["message"] == \
        "Agent not found."
    assert anon.get(f"/v2/other/agents/{AGENT_UUID}/status", headers=RS, status=404).status_int == 404
    assert rs_event(anon, AGENT_UUID, {"event": "agent_activate", "mode": "fast"}, status=400).json["errors"] == [
        "mode must be one of: idle, active, real_time."]
    anon.get("/v2/110011/events?limit=0", headers=RS, status=400)
    anon.get("/v2/110011/events?sort_dir=up", headers=RS, status=400)


def test_rackspace_project_events_and_tokens(make_app):
    app = make_app(rackspace_tokens="tok-a:110011,tok-b", purge_interval=0)
    test = webtest.TestApp(app)
    for project, agent in (("110011", "a1"), ("220022", "b1")):
        test.post_json(f"/v2/{project}/agents/{agent}/events", {"event": "startup"},
                       headers={"X-Auth-Token": "tok-b", "X-Agent-Id": agent})
    test.post_json("/v2/110011/events", {}, headers={"X-Auth-Token": "nope"}, status=401)
    assert test.post_json("/v2/110011/events", {"event": "other"}, headers={"X-Auth-Token": "tok-a"},
                          status=400).json["errors"] == ["event must be agent_activate."]
    test.post_json("/v2/110011/events", {"event": "agent_activate", "mode": "real_time"},
                   headers={"X-Auth-Token": "tok-a"}, status=202)
    assert app.hub.registry.find("name", "a1")["activation_mode"] == "real_time"
    assert app.hub.registry.find("name", "b1")["activation_mode"] is None
    test.post_json("/v2/events", {"event": "agent_activate", "mode": "active"}, headers={"X-Auth-Token": "tok-a"},
                   status=202)                               # the seed's path: the token's project
    assert app.hub.registry.find("name", "b1")["activation_mode"] is None
    test.post_json("/v2/events", {"event": "agent_activate", "mode": "idle"}, headers={"X-Auth-Token": "tok-b"},
                   status=202)                               # an unbound token: every project
    assert {app.hub.registry.find("name", n)["activation_mode"] for n in ("a1", "b1")} == {"idle"}
    feed = test.get("/v2/110011/events", headers={"X-Auth-Token": "tok-a"}).json["events"]
    assert feed[0]["event"] == "agent_activate" and feed[0]["mode"] == "idle"
    app.close()


# == Agent registry: one record across every API ==================================================================

def test_one_agent_through_every_api(app, anon):
    tf_agent = Client(app, token_headers(app, "agent", "agent-00"))
    tf_agent.post_json("/v1/agents/data/agent-00", {"state": "waiting", "queues": ["lab"]})
    rs_event(anon, "agent-00", {"event": "startup"})
    assert anon.post_json("/api/v1/agent", {"details": {"name": "agent-00"}}, status=422).json["errors"] == {
        "details.name": ["has already been taken"]}
    summaries = anon.get("/api/v1/agent").json["summaries"]
    assert [s["name"] for s in summaries] == ["agent-00"] and summaries[0]["status"] == "active"
    pfid = summaries[0]["id"]
    rs = anon.get("/v2/110011/agents/agent-00", headers=RS).json
    assert rs["name"] == "agent-00" and anon.get("/v1/agents/data/agent-00").json["state"] == "waiting"
    # A job taken and finished moves the counts.
    job_id = submit(anon, job_queue="lab")
    tf_agent.get("/v1/job?queue=lab")
    counts = anon.get(f"/api/v1/agent/{pfid}").json["details"]["instance_counts"]
    assert counts["active"] == 1 and counts["total"] == 1
    assert anon.get("/v2/110011/agents/agent-00/status", headers=RS).json == {"busy": True, "online": True}
    instances = anon.get(f"/api/v1/agent_instance?agent_id={pfid}").json["summaries"]
    assert instances[0]["job_id"] == job_id and instances[0]["status"] == "active"
    tf_agent.post_json(f"/v1/result/{job_id}", {"status": {"test": 0}, "job_state": "complete"})
    counts = anon.get(f"/api/v1/agent/{pfid}").json["details"]["instance_counts"]
    assert counts["complete"] == 1 and counts["active"] == 0 and counts["finished"] == 1
    # A failing phase makes a failed instance; a cancelled one a cancelled instance.
    for outcome, (status, cancel) in {"failed": ({"test": 1}, False), "cancelled": ({"test": 0}, True)}.items():
        job_id = submit(anon, job_queue="lab")
        tf_agent.get("/v1/job?queue=lab")
        if cancel:
            anon.post_json(f"/v1/job/{job_id}/action", {"action": "cancel"})
        tf_agent.post_json(f"/v1/result/{job_id}", {"status": status, "job_state": "complete"})
        assert anon.get(f"/api/v1/agent/{pfid}").json["details"]["instance_counts"][outcome] == 1
    # Retire blocks jobs and Rackspace startup; reads say offline; reinstate undoes it.
    anon.post(f"/api/v1/agent/{pfid}/retire")
    submit(anon, job_queue="lab")
    tf_agent.get("/v1/job?queue=lab", status=204)
    assert rs_event(anon, "agent-00", {"event": "startup"}, status=409).json == {"message": "Agent is retired."}
    data = anon.get("/v1/agents/data/agent-00").json
    assert (data["state"], data["comment"]) == ("offline", "retired")
    assert anon.get("/v2/110011/agents/agent-00", headers=RS).json["enabled"] is False
    assert anon.put_json(f"/api/v1/agent/{pfid}", {"details": {"name": "x"}}, status=409).json["code"] == "conflict"
    anon.post(f"/api/v1/agent/{pfid}/reinstate")
    assert anon.get("/v1/agents/data/agent-00").json["state"] == "waiting"
    assert tf_agent.get("/v1/job?queue=lab").status_int == 200
    assert anon.put_json(f"/api/v1/agent/{pfid}", {"details": {"name": "renamed"}}, status=409).json["message"] == \
        "Agent name is managed by Testflinger"
    # Delete removes it everywhere (a running instance blocks it first).
    assert anon.delete(f"/api/v1/agent/{pfid}", status=409).json["code"] == "conflict"
    tf_agent.post_json("/v1/agents/data/agent-00", {"job_id": ""})        # abandons the run: failed
    anon.delete(f"/api/v1/agent/{pfid}")
    anon.get("/v1/agents/data/agent-00", status=404)
    anon.get("/v2/110011/agents/agent-00", headers=RS, status=404)


def test_prefactor_only_agents_stay_out_of_testflinger_lists(anon):
    pf_create(anon, "pf-only")
    assert anon.get("/v1/agents/data").json == []
    anon.get("/v1/agents/data/pf-only", status=404)


def test_gocd_state_derivation():
    now = 1_000_000.0
    base = {"last_seen_at": now, "shutdown_at": None, "state": "waiting", "tf": 1, "retired": 0}
    cases = [
        ({}, {}, False, ["Enabled", "Idle", "Idle"], "active"),
        ({"state": "test"}, {}, False, ["Enabled", "Building", "Building"], "active"),
        ({}, {"active": 1}, False, ["Enabled", "Building", "Building"], "active"),
        ({}, {"active": 1}, True, ["Enabled", "Building", "Cancelled"], "active"),
        ({"state": "maintenance"}, {}, False, ["Disabled", "Idle", "Idle"], "active"),
        ({"retired": 1}, {}, False, ["Disabled", "Idle", "Idle"], "retired"),
        ({"shutdown_at": now}, {}, False, ["Enabled", "Unknown", "Unknown"], "dormant"),
        ({"last_seen_at": now - 300}, {}, False, ["Enabled", "LostContact", "Unknown"], "dormant"),
        ({"last_seen_at": now - 300}, {"active": 1}, False, ["Enabled", "LostContact", "Unknown"], "active"),
        ({"last_seen_at": None, "tf": 0}, {}, False, ["Enabled", "Missing", "Unknown"], "pending"),
    ]
    for change, counts, cancel, expected, status in cases:
        view = agenthub.derive_agent({**base, **change}, counts, cancel, now, 300)
        assert (view.gocd_tuple, view.status) == (expected, status), change


def test_gocd_time_and_body():
    assert agenthub.iso(1518676288.998, 3, "+0000") == "2018-02-15T06:31:28.998+0000"
    assert agenthub.iso(1518676288.998) == "2018-02-15T06:31:28Z"
    assert agenthub.iso(1518676288.5, 6) == "2018-02-15T06:31:28.500000Z"
    assert agenthub.iso(1518676288, zone="+00:00") == "2018-02-15T06:31:28+00:00"
    row = {"uuid": "u", "name": "h", "last_ip": None}
    view = agenthub.AgentView("Enabled", "Cancelled", "active", {})
    body = agenthub.gocd_body(row, view, 1518676288.998)
    assert body == ('{"uuid":"u","host_name":"h","is_elastic":false,"ip_address":null,"operating_system":null,'
                    '"free_space":"Unknown","agent_config_state":"Enabled","agent_state":"Building",'
                    '"build_state":"Cancelled","transition_time":"2018-02-15T06:31:28.998+0000"}')


def _wait_for(predicate, seconds=15):
    """Poll a condition on a real server (bounded; the outcome, not the time, is what is asserted)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_gocd_notifications_idle_building_idle_then_lost_contact(make_app):
    receiver = Receiver(200, b'{"status": "success", "messages": []}')
    app = make_app(gocd_webhooks=receiver.url + "/gocd", gocd_webhook_auth="g-token", lost_contact_seconds=1,
                     purge_interval=0)
    try:
        anon = webtest.TestApp(app)
        agent = Client(app, token_headers(app, "agent", "agent7"))
        agent.post_json("/v1/agents/data/agent7", {"state": "waiting", "queues": ["lab"]})
        job_id = submit(anon, job_queue="lab")
        agent.get("/v1/job?queue=lab")
        agent.post_json(f"/v1/result/{job_id}", {"status": {"test": 0}, "job_state": "complete"})
        agent.post_json("/v1/agents/data/agent7", {"job_id": "", "state": "waiting"})

        def states():
            return [json.loads(r[3])["agent_state"] for r in receiver.requests]
        assert _wait_for(lambda: states()[:3] == ["Idle", "Building", "Idle"])
        assert _wait_for(lambda: "LostContact" in states())          # the sweep, after 1 s of silence
        method, path, headers, data = receiver.requests[0]
        assert (method, path) == ("POST", "/gocd") and headers["Authorization"] == "Bearer g-token"
        assert headers["Content-Type"] == "application/json" and headers["X-Agenthub-Notification"] == "agent-status"
        body = json.loads(data)
        assert list(body) == ["uuid", "host_name", "is_elastic", "ip_address", "operating_system", "free_space",
                              "agent_config_state", "agent_state", "build_state", "transition_time"]
        assert body["host_name"] == "agent7" and body["uuid"] == app.hub.registry.find("name", "agent7")["uuid"]
        assert (body["agent_config_state"], body["agent_state"], body["build_state"]) == ("Enabled", "Idle", "Idle")
        assert json.dumps(body, separators=(",", ":")).encode() == data          # compact, in this key order
        events = anon.get("/v1/event/list?name=agent-status&node=agent7").json
        assert [json.loads(base64.b64decode(e["Payload"]))["agent_state"] for e in events][:3] == [
            "Idle", "Building", "Idle"]
        assert events[0]["NodeFilter"] == "^agent7$"
        assert _wait_for(lambda: len(app.hub.notifier.deliveries()) >= 4)
        assert {d["outcome"] for d in app.hub.notifier.deliveries()} == {"success"}
        assert anon.get("/api/server_health_messages").json == []
        # Contact again: back from LostContact.
        agent.get("/v1/agents/data/agent7", headers={"Cookie": "agent_name=agent7"})
        assert _wait_for(lambda: states()[-1] == "Idle")
    finally:
        app.close()
        receiver.close()


def test_gocd_worker_survives_an_unusable_webhook_url(make_app):
    app = make_app(gocd_webhooks="not-a-url", purge_interval=0, lost_contact_seconds=0,
                     gocd_retry_delays=(0.01, 0.01))
    try:
        agent = Client(app, token_headers(app, "agent", "a1"))
        agent.post_json("/v1/agents/data/a1", {"state": "waiting"})
        agent.post_json("/v1/agents/data/a1", {"state": "test"})
        assert _wait_for(lambda: len(app.hub.notifier.deliveries()) == 2)       # the second still went through
        assert {d["outcome"] for d in app.hub.notifier.deliveries()} == {"error"}
    finally:
        app.close()


@pytest.mark.parametrize("status,body,outcome,detail", [
    (200, b'{"status": "failure", "messages": ["disk full", "try later"]}', "failure", "disk full, try later"),
    (200, b"", "success", None),
    (200, b"not json", "error", "Unable to de-serialize json response."),
    (200, b"[" * 5000 + b"]" * 5000, "error", "Unable to de-serialize json response."),
    (200, b'{"messages": []}', "error", "Notify result 'status' is a required field"),
    (404, b"no such plugin", "error", "It returned code '404' and the following response: 'no such plugin'"),
    (302, b"moved", "error", "It returned code '302'"),
])
def test_gocd_delivery_outcomes(status, body, outcome, detail, make_app):
    receiver = Receiver(status, body, location="http://127.0.0.1:1/elsewhere")
    app = make_app(gocd_webhooks=receiver.url, purge_interval=0, lost_contact_seconds=0)
    try:
        Client(app, token_headers(app, "agent", "a1")).post_json("/v1/agents/data/a1", {"state": "waiting"})
        assert _wait_for(lambda: app.hub.notifier.deliveries())
        delivery = app.hub.notifier.deliveries()[0]
        assert delivery["outcome"] == outcome and len(receiver.requests) == 1     # a redirect is not followed
        health = webtest.TestApp(app).get("/api/server_health_messages").json
        if detail is None:
            assert health == []
        else:
            assert health[0]["message"] == f"Notification update failed for webhook: {receiver.url}"
            assert detail in health[0]["detail"] and health[0]["level"] == "ERROR"
            assert health[0]["time"].endswith("Z")
    finally:
        app.close()
        receiver.close()


class FlakyReceiver(Receiver):
    """Answers 500 the first time, then success."""

    def __init__(self):
        super().__init__(200, b'{"status": "success"}')
        outer = self
        handler = self.httpd.RequestHandlerClass
        original = handler._any

        def flaky(handler_self):
            if not outer.requests:
                handler_self.rfile.read(int(handler_self.headers.get("Content-Length") or 0))
                outer.requests.append(("failed",))
                handler_self.send_response(500)
                handler_self.send_header("Content-Length", "0")
                handler_self.end_headers()
                return
            original(handler_self)
        handler.do_POST = flaky


def test_gocd_retries_a_500_then_succeeds_and_clears_health(make_app):
    receiver = FlakyReceiver()
    app = make_app(gocd_webhooks=receiver.url, purge_interval=0, lost_contact_seconds=0,
                     gocd_retry_delays=(0.1, 0.1))
    try:
        Client(app, token_headers(app, "agent", "a1")).post_json("/v1/agents/data/a1", {"state": "waiting"})
        assert _wait_for(lambda: app.hub.notifier.deliveries())
        delivery = app.hub.notifier.deliveries()[0]
        assert (delivery["outcome"], delivery["attempts"]) == ("success", 2) and len(receiver.requests) == 2
        assert receiver.requests[1][2]["X-Agenthub-Delivery"] == delivery["delivery_uuid"]
        assert webtest.TestApp(app).get("/api/server_health_messages").json == []
    finally:
        app.close()
        receiver.close()


def test_gocd_timeout_is_recorded_and_never_slows_the_api(make_app):
    receiver = Receiver(delay=0.6)
    app = make_app(gocd_webhooks=receiver.url, purge_interval=0, lost_contact_seconds=0, gocd_timeout=0.15,
                   gocd_retry_delays=(0.05, 0.05), shutdown_grace=0.2)
    try:
        agent = Client(app, token_headers(app, "agent", "a1"))
        for state in ("waiting", "test", "waiting", "test"):
            agent.post_json("/v1/agents/data/a1", {"state": state})       # answered while the receiver hangs
        assert _wait_for(lambda: len(app.hub.notifier.deliveries()) >= 1)
        delivery = app.hub.notifier.deliveries()[-1]
        assert delivery["outcome"] == "error" and delivery["attempts"] == 3
        assert "timed out" in json.loads(delivery["messages"])[0]
        assert webtest.TestApp(app).get("/api/server_health_messages").json[0]["level"] == "ERROR"
    finally:
        app.close()
        receiver.close()


def test_gocd_queued_deliveries_are_recorded_on_close(tmp_path, make_app):
    receiver = Receiver(delay=1)
    db = str(tmp_path / "hub.db")
    app = make_app(db=db, gocd_webhooks=receiver.url, purge_interval=0, lost_contact_seconds=0, gocd_timeout=0.5,
                     gocd_retry_delays=())
    agent = Client(app, token_headers(app, "agent", "a1"))
    for state in ("waiting", "test", "waiting", "test", "waiting"):
        agent.post_json("/v1/agents/data/a1", {"state": state})
    app.hub.notifier.close(drain_seconds=0)
    app.close()
    reopened = make_app(db=db, purge_interval=0, lost_contact_seconds=0)
    outcomes = [r["outcome"] for r in reopened.hub.notifier.deliveries()]
    reopened.close()
    receiver.close()
    assert len(outcomes) == 5 and "undelivered" in outcomes


# == Web UI ===========================================================================================================

def _running_job(app):
    """A job taken by agent1 with one log fragment, and the agent client."""
    agent = Client(app, token_headers(app, "agent", "agent1"))
    agent.post_json("/v1/agents/data/agent1", {"state": "waiting", "queues": ["lab"], "location": "rack <3>"})
    job_id = submit(webtest.TestApp(app), job_queue="lab", name="<script>alert(1)</script>", tags=["nightly"])
    agent.get("/v1/job?queue=lab")
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "test", "status": {"setup": 0}})
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-11-24T04:00:00",
                                                        "phase": "setup", "log_data": "setting up <b>\n"})
    return agent, job_id


def test_web_pages_render_and_link(app, anon):
    agent, job_id = _running_job(app)
    fire(anon, "deploy", b"v1.2.3")
    fire(anon, "blob", b"\x00\xff")
    overview = anon.get("/")
    assert overview.content_type == "text/html" and "Overview" in overview.text
    assert "Building" in overview.text and "deploy" in overview.text and "base64:AP8=" in overview.text
    jobs = overview.click(href="/jobs\\?state=test")
    assert job_id in jobs.text
    job = jobs.click(href=f"/jobs/{job_id}$")
    assert "setting up &lt;b&gt;" in job.text and re.search(r'<th>Agent</th><td>\s*<a href="/agents/agent1">', job.text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in job.text and "<script>alert(1)" not in job.text
    agent_page = job.click(href="/agents/agent1")
    assert "rack &lt;3&gt;" in agent_page.text and "Enabled / Building / Building" in agent_page.text
    assert job_id in agent_page.text
    queue_page = agent_page.click(href="/queues/lab", index=0)
    assert "agent1" in queue_page.text and job_id in queue_page.text
    assert "lab" in anon.get("/queues").text
    assert "agent1" in anon.get("/agents").text
    events = anon.get("/events")
    assert events.text.index("blob") < events.text.index("deploy")              # newest first
    assert "deploy" not in anon.get("/events?name=blob").text


def test_web_job_page_shows_activity_attempts_and_who(app, anon):
    owner = Client(app, token_headers(app, "contributor", "kernel-ci"))
    agent = Client(app, {**token_headers(app, "agent", "agent1"), "Cookie": "agent_name=agent1"})
    agent.post_json("/v1/agents/data/agent1", {"state": "waiting", "queues": ["lab", "spare"]})
    job_id = owner.post_json("/v1/job", {"job_queue": "lab"}).json["job_id"]
    submit(anon, job_queue="spare")
    agent.get("/v1/job?queue=lab")
    # The agent page: the job it runs, who submitted it, and its queues' counts.
    page = anon.get("/agents/agent1").text
    assert re.search(rf'id="agent-job">\s*<a href="/jobs/{job_id}"><code>{job_id}</code></a> submitted by kernel-ci',
                     page)
    rows = re.findall(r"<tr><td><a href=\"/queues/(\w+)\">\w+</a></td><td>(\d+)</td><td>(\d+)</td>", page)
    assert rows == [("lab", "0", "1"), ("spare", "1", "0")]
    assert "kernel-ci" in anon.get("/agents").text and "kernel-ci" in anon.get("/jobs").text
    assert "kernel-ci" in anon.get("/queues/lab").text
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "provision", "status": {"setup": 0}})
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-11-24T04:00:00",
                                                        "phase": "provision", "log_data": "first try\n"})
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"setup": 0, "provision": 4}})
    owner.post_json("/v1/job", {"job_queue": "lab", "job_id": job_id})         # attempt 2
    page = anon.get(f"/jobs/{job_id}").text
    activity = re.findall(r'<tr><td>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)</td><td><span class="icon icon-(\w+)"[^>]*>[^<]*</span> '
                          r'([^<\n]+)', page)
    assert [(kind, message) for _, kind, message in activity] == [
        ("info", "Job submitted by user kernel-ci into queue lab."), ("info", "Job assigned to agent agent1."),
        ("success", "Phase setup completed with exit code 0"), ("info", "Phase provision started."),
        ("error", "Phase provision completed with exit code 4"), ("info", "Job completed."),
        ("info", "Job resubmitted by user kernel-ci: attempt 2 is waiting in queue lab.")]
    assert "<th>Submitted by</th><td>kernel-ci</td>" in page and "<th>Attempt</th><td>2 of 2</td>" in page
    assert re.search(r'id="estimate">\s*\S+Z \(in about 0 s\)', page)            # agent1 is free again
    assert "first try" not in page
    first = anon.get(f"/jobs/{job_id}").click(href=r"\?attempt=1$")
    assert "first try" in first.text and "This is attempt 1" in first.text and "<th>Attempt</th><td>1 of 2</td>" in first.text
    assert anon.get(f"/jobs/{job_id}/log/output?attempt=1").text == "first try\n"
    anon.get(f"/jobs/{job_id}?attempt=7", status=404)
    quiet = anon.get(f"/jobs/{submit(anon, job_queue='lab')}").text
    assert "No events available for this job." not in quiet                      # it has its submission


def test_web_jobs_filters_and_pagination(app, anon):
    ids = [submit(anon, job_queue="q-a" if n % 2 else "q-b", tags=["odd" if n % 2 else "even"]) for n in range(120)]
    first = anon.get("/jobs")
    assert "120 jobs" in first.text and "page 1 of 3" in first.text and ids[-1] in first.text
    assert ids[0] not in first.text
    last = first.click(href="page=2").click(href="page=3")
    assert "page 3 of 3" in last.text and ids[0] in last.text and ids[-1] not in last.text
    only_a = anon.get("/jobs?queue=q-a")
    assert "60 jobs" in only_a.text and ids[-1] in only_a.text and ids[-2] not in only_a.text   # n=119 is q-a
    assert "60 jobs" in anon.get("/jobs?tag=even").text
    assert "0 jobs" in anon.get("/jobs?state=complete").text
    assert "page 1 of 3" in anon.get("/jobs?page=0").text and "page 1 of 3" in anon.get("/jobs?page=x").text


def test_web_not_found_pages(anon):
    for path in ("/jobs/nope", f"/jobs/{ANY_UUID}", "/agents/ghost", "/queues/none", "/nothing/here",
                 f"/jobs/{ANY_UUID}/artifact", f"/jobs/{ANY_UUID}/cancel"):
        answer = anon.get(path, status=404)
        assert "Not found" in answer.text and answer.content_type == "text/html" and 'href="/"' in answer.text


def csrf_of(test, path="/login"):
    """The CSRF token a page's forms carry for this browser (WebTest keeps its cookies)."""
    return re.search(r'name="csrf" value="([^"]+)"', test.get(path).text).group(1)


def test_web_cancel_form(app, anon):
    agent, job_id = _running_job(app)
    confirm = anon.get(f"/jobs/{job_id}").click(href="/cancel")
    assert "Yes, cancel the job" in confirm.text
    done = confirm.form.submit().follow()
    assert "Cancel requested." in done.text and "cancelled" in done.text
    assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "cancelled"
    assert anon.post(f"/jobs/{job_id}/cancel", {"csrf": csrf_of(anon)}, status=400)          # already cancelled
    assert "Cancel job" not in anon.get(f"/jobs/{job_id}").text


def test_web_artifact_download(app, anon):
    agent, job_id = _running_job(app)
    agent.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "file", b"tarball-bytes")])
    page = anon.get(f"/jobs/{job_id}")
    assert page.click(href="/artifact").body == b"tarball-bytes"


def test_web_live_log_endpoint(app, anon):
    agent, job_id = _running_job(app)
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 1, "timestamp": "2026-11-24T04:00:01",
                                                        "phase": "test", "log_data": "new line\n"})
    data = anon.get(f"/jobs/{job_id}/logs.json?output=1&serial=0").json
    assert data["job_state"] == "test" and data["status"] == {"setup": 0}
    assert data["output"]["test"] == {"last_fragment_number": 1, "log_data": "new line\n", "cut": False}
    assert data["output"]["setup"]["log_data"] == ""
    anon.get(f"/jobs/{ANY_UUID}/logs.json", status=404)


def test_the_job_page_of_a_huge_log_stays_small_and_the_whole_log_downloads(app, anon):
    """12 MB of output (200 times the part shown): the page shows the last 64 KiB of it and links the whole log, streamed."""
    agent, job_id = _running_job(app)
    line = ("x" * 99 + "\n") * 10240                       # 1 MiB... of 100-character lines
    for n in range(12):
        agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": n, "timestamp": "2026-11-24T04:00:01",
                                                            "phase": "test", "log_data": f"{n:06d}" + line[6:]})
    page = anon.get(f"/jobs/{job_id}")
    assert len(page.body) < 200 * 1024 and "Only the end of this log is shown" in page.text
    assert f"/jobs/{job_id}/log/output?phase=test" in page.text
    live = anon.get(f"/jobs/{job_id}/logs.json?output=0&serial=0").json["output"]["test"]
    assert live["cut"] and len(live["log_data"]) == agenthub.WEB_LOG_TAIL and live["last_fragment_number"] == 11
    whole = anon.get(f"/jobs/{job_id}/log/output?phase=test")
    assert whole.content_type == "text/plain" and int(whole.headers["Content-Length"]) == 12 * len(line)
    assert len(whole.body) == 12 * len(line) and whole.body.startswith(b"000000x") and b"000011x" in whole.body
    assert anon.get(f"/jobs/{job_id}/log/serial").body == b""
    anon.get(f"/jobs/{job_id}/log/output?phase=nope", status=404)


def test_web_require_auth_login_and_roles(make_app):
    app = make_app(require_auth=True, purge_interval=0)
    try:
        test = webtest.TestApp(app)
        secret = app.hub.auth.add_client("viewer", "contributor", "viewer-secret-123")
        app.hub.auth.add_client("bot", "agent", "agent-secret-1234")
        answer = test.get("/jobs?state=waiting", status=303)
        assert "/login?next=" in answer.headers["Location"]
        form = answer.follow().form
        form["client_id"], form["secret"] = "viewer", "wrong"
        assert "Unknown client id or wrong secret." in form.submit(status=401).text
        form = test.get("/login?next=/jobs").form
        form["client_id"], form["secret"] = "viewer", secret
        logged_in = form.submit(status=303)
        cookie = logged_in.headers["Set-Cookie"]
        assert "agenthub_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        jobs = logged_in.follow()
        assert "Jobs" in jobs.text and "viewer" in jobs.text
        test.post("/logout", {"csrf": csrf_of(test, "/jobs")}, status=303)
        test.get("/jobs", status=303)
        bot = test.get("/login").form
        bot["client_id"], bot["secret"] = "bot", "agent-secret-1234"
        bot.submit()
        refused = test.get("/jobs", status=403)
        assert "needs one of the roles admin, manager, contributor" in refused.text
        evil = test.get("/login").form
        evil["client_id"], evil["secret"], evil["next"] = "viewer", secret, "//evil.example.com/"
        assert evil.submit(status=303).headers["Location"].endswith("/")
    finally:
        app.close()


# == Security of the pages and the boundary (issue 13) ===========================================================

def test_csrf_tokens_guard_every_form(app, anon):
    job_id = submit(anon)
    cancel = f"/jobs/{job_id}/cancel"
    anon.post(cancel, status=403)                                      # no token
    anon.post(cancel, {"csrf": "0" * 40}, status=403)                  # a made-up one
    other = webtest.TestApp(app)
    anon.post(cancel, {"csrf": csrf_of(other)}, status=403)            # another browser's token
    assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "waiting"
    form = anon.get(cancel).form
    assert form["csrf"].value == csrf_of(anon)
    form.submit(status=303)
    assert anon.get(f"/v1/result/{job_id}").json["job_state"] == "cancelled"
    # Login CSRF: a login form posted from elsewhere (no token of this browser) is refused.
    app.hub.auth.add_client("viewer", "contributor", "viewer-secret-123")
    fresh = webtest.TestApp(app)
    fresh.post("/login", {"client_id": "viewer", "secret": "viewer-secret-123"}, status=403)
    assert "agenthub_session" not in fresh.cookies


def test_writes_from_another_origin_are_refused_on_every_api(anon, app):
    pf = pf_create(anon, "victim")
    for path, style in ((f"/api/v1/agent/{pf['id']}/retire", "prefactor"), ("/v1/job", "testflinger"),
                        ("/v2/p1/agents/a1/events", "rackspace"), ("/v1/event/fire/x", "consul")):
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost:8001"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
            method = "PUT" if style == "consul" else "POST"
            answer = anon.request(path, method=method, headers={**headers, "Content-Type": "application/json",
                                                                 "X-Auth-Token": "t"}, body=b"{}", expect_errors=True)
            assert answer.status_int == 403, (path, headers, answer.status)
            assert "Cross-" in answer.text
    assert anon.get(f"/api/v1/agent/{pf['id']}").json["details"]["status"] == pf["status"] != "retired"
    # The hub's own origin, and clients that send no Origin, are served.
    anon.post_json("/v1/job", {"job_queue": "q"}, headers={"Origin": "http://localhost"}, status=200)
    anon.post_json("/v1/job", {"job_queue": "q"}, headers={"Origin": "http://localhost:80",
                                                            "Sec-Fetch-Site": "same-origin"}, status=200)
    anon.get("/v1/agents/data", headers={"Origin": "http://evil.example"}, status=200)   # reads are not writes


@pytest.mark.parametrize("target", ["/\\evil.example", "/\t/evil.example", "//evil.example", "https://evil.example",
                                    "/\\/evil.example", " //evil.example", "/\n/evil.example", "\\\\evil.example",
                                    "http:/evil.example", "/%09/evil.example"])
def test_login_goes_only_to_a_path_on_this_hub(target, make_app):
    app = make_app(require_auth=True)
    app.hub.auth.add_client("viewer", "contributor", "viewer-secret-123")
    test = webtest.TestApp(app)
    form = test.get("/login?next=" + urllib.parse.quote(target)).form
    form["client_id"], form["secret"] = "viewer", "viewer-secret-123"
    location = form.submit(status=303).headers["Location"]
    path = urllib.parse.urlsplit(location)
    assert path.netloc in ("", "localhost", "localhost:80") and not path.path.startswith("//") and "\\" not in location
    assert location.endswith("/") or target == "/%09/evil.example"
    assert agenthub.safe_next(target) == ("/%09/evil.example" if target == "/%09/evil.example" else "/")
    assert agenthub.safe_next("/jobs?state=waiting") == "/jobs?state=waiting"


def test_a_foreign_host_name_is_refused(make_app):
    app = make_app()
    for headers in ({"Host": "evil.example"}, {"Host": "evil.example:80"}, {"X-Forwarded-Host": "evil.example"}):
        status, _, body, _ = wsgi_call(app, "GET", "/v1/agents/data", headers=headers)
        assert status == 400 and b"not a name of this hub" in body
        assert wsgi_call(app, "GET", "/jobs", headers=headers)[0] == 400
    for host in ("localhost", "127.0.0.1:8000", "[::1]:80", "lab.localhost"):
        assert wsgi_call(app, "GET", "/v1/agents/data", headers={"Host": host})[0] == 200
    named = make_app(allowed_hosts="lab.example.org, .corp.example")
    for host, status in (("lab.example.org", 200), ("LAB.example.org.", 200), ("x.corp.example:8000", 200),
                         ("corp.example", 200), ("evil.example", 400), ("example.org", 400)):
        assert wsgi_call(named, "GET", "/v1/agents/data", headers={"Host": host})[0] == status, host
    assert wsgi_call(make_app(allowed_hosts="*"), "GET", "/v1/agents/data", headers={"Host": "x.y"})[0] == 200


def test_security_headers(anon):
    page = anon.get("/jobs")
    csp = page.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<style nonce="{nonce}">' in page.text and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    job_id = submit(anon)
    job = anon.get(f"/jobs/{job_id}")
    script_nonce = re.search(r"'nonce-([^']+)'", job.headers["Content-Security-Policy"]).group(1)
    assert f'<script nonce="{script_nonce}">' in job.text
    assert anon.get(f"/jobs/{job_id}").headers["Content-Security-Policy"] != job.headers["Content-Security-Policy"]
    api = anon.get("/v1/agents/data")
    assert api.headers["X-Content-Type-Options"] == "nosniff"


def test_web_sessions_live_on_the_server(make_app, tmp_path):
    db = str(tmp_path / "hub.db")
    app = make_app(db=db, require_auth=True)
    app.hub.auth.add_client("viewer", "contributor", "viewer-secret-123")

    def login(test, secret="viewer-secret-123", **headers):
        form = test.get("/login", headers=headers).form
        form["client_id"], form["secret"] = "viewer", secret
        return form.submit(status=303, headers=headers)
    test = webtest.TestApp(app)
    first = login(test)
    value = test.cookies["agenthub_session"]
    assert "Secure" not in first.headers["Set-Cookie"]
    # The cookie is a random id, not a refresh token, and the database has only its hash.
    webtest.TestApp(app).post("/v1/oauth2/refresh", json.dumps({"refresh_token": value}),
                              headers={"Content-Type": "application/json"}, status=400)
    with sqlite3.connect(db) as conn:
        stored = [r[0] for r in conn.execute("SELECT id_hash FROM web_sessions")]
    assert stored == [hashlib.sha256(value.encode()).hexdigest()]
    # A new login rotates the id: the old one no longer opens a page.
    login(test)
    assert test.cookies["agenthub_session"] != value
    stale = webtest.TestApp(app)
    stale.set_cookie("agenthub_session", value)
    stale.get("/jobs", status=303)
    test.get("/jobs", status=200)
    # Logging out ends it on the server, whoever still holds the cookie.
    kept = test.cookies["agenthub_session"]
    test.post("/logout", {"csrf": csrf_of(test, "/jobs")}, status=303)
    stale.set_cookie("agenthub_session", kept)
    stale.get("/jobs", status=303)
    # A new secret ends every session of the client; Secure when asked for or over https.
    login(test)
    app.hub.auth.add_client("viewer", None, "viewer-secret-456")
    test.get("/jobs", status=303)
    over_https = webtest.TestApp(app, extra_environ={"wsgi.url_scheme": "https", "HTTP_HOST": "localhost:443"})
    assert "Secure" in login(over_https, "viewer-secret-456").headers["Set-Cookie"]
    secure = make_app(require_auth=True, secure_cookies=True)
    secure.hub.auth.add_client("viewer", "contributor", "viewer-secret-123")
    behind_tls = webtest.TestApp(secure, extra_environ={"wsgi.url_scheme": "https", "HTTP_HOST": "localhost:443"})
    assert "Secure" in login(behind_tls).headers["Set-Cookie"]


def test_login_costs_the_same_for_unknown_ids_and_backs_off(app):
    app.hub.auth.add_client("known", "contributor", "the-right-secret-1")
    test = webtest.TestApp(app)

    def attempt(client_id, secret, addr):
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        start = time.perf_counter()
        answer = test.post("/v1/oauth2/token", headers={"Authorization": "Basic " + basic},
                           extra_environ={"REMOTE_ADDR": addr}, expect_errors=True)
        return answer, time.perf_counter() - start
    agenthub._decoy_hash()
    unknown = sorted(attempt(f"nobody-{n}", "x", f"10.0.0.{n}")[1] for n in range(5))
    known = sorted(attempt("known", "wrong", f"10.0.1.{n}")[1] for n in range(4))
    # The original answered an unknown id 80x faster than a known one; here both check a hash.
    assert unknown[2] > known[1] / 3, (unknown, known)
    # A fifth failure for the client id: the next attempt waits, even with the right secret.
    assert attempt("known", "wrong", "10.0.2.1")[0].status_int == 401
    answer = attempt("known", "the-right-secret-1", "10.0.2.2")[0]
    assert answer.status_int == 429 and int(answer.headers["Retry-After"]) >= 1
    assert "Too many failed logins" in answer.text
    # Per address too: one address guessing many ids is slowed down.
    for n in range(5):
        assert attempt(f"guess-{n}", "x", "10.0.3.1")[0].status_int == 401
    assert attempt("guess-9", "x", "10.0.3.1")[0].status_int == 429
    # The web form backs off the same way.
    page = test.get("/login", extra_environ={"REMOTE_ADDR": "10.0.3.1"}).form
    page["client_id"], page["secret"] = "known", "x"
    assert page.submit(status=429, extra_environ={"REMOTE_ADDR": "10.0.3.1"}).headers["Retry-After"]


def test_nothing_secret_is_stored_in_plain_text_and_files_are_private(tmp_path, make_app):
    db = str(tmp_path / "hub.db")
    app = make_app(db=db, api_tokens="the-api-token-T")
    test = webtest.TestApp(app)
    headers = {"Authorization": "Bearer the-api-token-T", "Idempotency-Key": "key-123"}
    first = test.post_json("/api/v1/agent", {"details": {"name": "idem"}}, headers=headers)
    assert test.post_json("/api/v1/agent", {"details": {"name": "idem"}}, headers=headers).json == first.json
    secret = app.hub.auth.add_client("c", "contributor", "plain-secret-value")
    refresh = app.hub.auth.refresh_token("c")
    app.close()
    for name in (db, db + "-wal"):
        if os.path.exists(name):
            data = open(name, "rb").read()
            for plain in (b"the-api-token-T", b"key-123", secret.encode(), refresh.encode()):
                assert plain not in data, (name, plain)
    for suffix in ("", "-wal", "-shm", ".key", ".lock"):
        if os.path.exists(db + suffix):
            assert os.stat(db + suffix).st_mode & 0o777 == 0o600, suffix
    # An existing database readable by others is made private when agenthub opens it.
    os.chmod(db, 0o644)
    make_app(db=db).close()
    assert os.stat(db).st_mode & 0o777 == 0o600


def test_add_client_command(tmp_path, capsys):
    db = str(tmp_path / "hub.db")
    assert agenthub.main(["add-client", "lab-admin", "--role", "admin", "--db", db, "--secret", "s1-long-enough"]) == 0
    token_file = tmp_path / "etc" / "token.json"
    # A missing token-file directory is one line, before anything is written.
    assert agenthub.main(["add-client", "lab-admin", "--db", db, "--token-file", str(token_file)]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "Traceback" not in err
    auth = agenthub.Auth(agenthub.AuthStore(agenthub.Database(db)), agenthub.Config(db=db))
    assert auth.check_login("lab-admin", "s1-long-enough")
    old_refresh = auth.refresh_token("lab-admin")
    token_file.parent.mkdir()
    token_file.write_text("{}")
    os.chmod(token_file, 0o644)
    # Re-running without --role keeps the role; the new secret revokes the old tokens.
    assert agenthub.main(["add-client", "lab-admin", "--db", db, "--token-file", str(token_file)]) == 0
    out = capsys.readouterr().out
    assert "role: admin" in out and "revoked: 1 refresh token(s)" in out
    assert auth.permissions("lab-admin")["role"] == "admin"
    with pytest.raises(agenthub.ApiError, match="revoked"):
        auth.refresh_permissions(old_refresh)
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    assert auth.refresh_permissions(json.loads(token_file.read_text())["refresh_token"])["role"] == "admin"
    assert agenthub.main(["add-client", "lab-admin", "--db", db, "--role", "manager"]) == 0
    assert auth.permissions("lab-admin")["role"] == "manager"
    assert agenthub.main(["add-client", "new-one", "--db", db]) == 0
    assert "role: contributor" in capsys.readouterr().out
    auth.store.db.close()


def test_web_pages_of_an_empty_hub(anon):
    for path in ("/", "/jobs", "/agents", "/queues", "/events"):
        assert anon.get(path).status_int == 200


class Chromium:
    """Debian's headless Chromium driven over --remote-debugging-pipe (DevTools protocol, stdlib only)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1200,1000"]

    def __init__(self, binary, profile):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads commands on fd 3 and writes answers on fd 4.
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=lambda: (os.dup2(to_browser_r, 3), os.dup2(from_browser_w, 4)))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next = b"", 0

    def call(self, method, session=None, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 65536)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer["result"]

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, session, expression):
        return self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, session, path):
        kind = "jpeg" if path.endswith(".jpg") else "png"
        data = self.call("Page.captureScreenshot", session, format=kind,
                         **({"quality": 80} if kind == "jpeg" else {}))["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        self.proc.wait(timeout=10)


def _chromium_binary():
    import shutil
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium_binary() is None, reason="no chromium on this machine (Debian package 'chromium')")
@pytest.mark.sqlite_only("a browser test: the pages' data is checked on both engines by WebTest")
def test_browser_follows_a_running_jobs_log(server, tmp_path):
    app, base = server
    agent, job_id = _running_job(app)
    browser = Chromium(_chromium_binary(), str(tmp_path / "profile"))
    try:
        page = browser.open(f"{base}/jobs/{job_id}")

        def text(element_id):          # "" until the job page (not the first about:blank) is there
            return browser.evaluate(page, f"(document.getElementById('{element_id}') || {{}}).textContent || ''")
        assert _wait_for(lambda: "setting up" in text("output-setup"), seconds=20)
        assert text("output-test") == ""
        # The agent sends a new fragment; the open page shows it without being reloaded.
        agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 1, "phase": "test",
                                                            "timestamp": "2026-11-24T04:00:05",
                                                            "log_data": "fresh fragment from the agent\n"})
        agent.post_json(f"/v1/result/{job_id}", {"status": {"setup": 0, "test": 0}})
        assert _wait_for(lambda: "fresh fragment" in text("output-test"), seconds=20)
        assert text("status-test") == "0"
        assert browser.evaluate(page, "performance.getEntriesByType('navigation').length") == 1   # never reloaded
        shots = os.environ.get("AGENTHUB_SCREENSHOTS", str(tmp_path))
        os.makedirs(shots, exist_ok=True)
        browser.screenshot(page, os.path.join(shots, "job.png"))
        overview = browser.open(f"{base}/")
        assert _wait_for(lambda: (browser.evaluate(overview, "document.title") or "").startswith("Overview"))
        browser.screenshot(overview, os.path.join(shots, "overview.png"))
        assert os.path.getsize(os.path.join(shots, "job.png")) > 1000
    finally:
        browser.close()


EVIL_PAGE = """<!doctype html><html><body>
<iframe name="a"></iframe><iframe name="b"></iframe>
<form id="cancel" method="post" action="{base}/jobs/{job_id}/cancel" target="a"><input name="csrf" value="guess"></form>
<form id="retire" method="post" action="{base}/api/v1/agent/{pfid}/retire" target="b" enctype="text/plain">
<input name="{{}}" value=""></form>
<script>
window.loaded = 0;
document.querySelectorAll("iframe").forEach(function (f) {{ f.onload = function () {{ window.loaded += 1; }}; }});
document.getElementById("cancel").submit();
document.getElementById("retire").submit();
</script></body></html>"""


@pytest.mark.sqlite_only("a browser test: the pages' data is checked on both engines by WebTest")
def test_browser_a_page_on_another_origin_cannot_cancel_or_retire(make_app, tmp_path):
    """A real Chromium opens an attacker's page (another port of the same host) that auto-posts the job
    page's cancel form and a Prefactor retire; both reach the hub and are refused, nothing changes."""
    import http.server
    app = make_app()
    seen = []

    def observed(environ, start_response):               # records what reached the hub, and its answer
        def start(status, headers, exc_info=None):
            seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], status[:3]))
            return start_response(status, headers, exc_info)
        return app(environ, start)
    hub = agenthub.make_server(observed, "127.0.0.1", 0)
    threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{hub.server_address[1]}"
    test = webtest.TestApp(app)
    job_id = submit(test)
    pf = pf_create(test, "victim")
    page = EVIL_PAGE.format(base=base, job_id=job_id, pfid=pf["id"]).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, args=(0.05,), daemon=True).start()
    browser = Chromium(_chromium_binary(), str(tmp_path / "profile"))
    try:
        tab = browser.open(f"http://127.0.0.1:{evil.server_address[1]}/")
        assert _wait_for(lambda: (browser.evaluate(tab, "window.loaded || 0") or 0) >= 2, seconds=20)
        posts = [entry for entry in seen if entry[0] == "POST"]
        assert sorted(posts) == sorted([("POST", f"/api/v1/agent/{pf['id']}/retire", "403"),
                                        ("POST", f"/jobs/{job_id}/cancel", "403")])
        assert test.get(f"/v1/result/{job_id}").json["job_state"] == "waiting"
        assert test.get(f"/api/v1/agent/{pf['id']}").json["details"]["status"] == pf["status"] != "retired"
    finally:
        browser.close()
        evil.shutdown()
        hub.shutdown()
        hub.server_close()


# == Bad input never answers 5xx ======================================================================================
#
# A seeded generator sends every input class of the request boundary to every route of every API, anonymously
# and with each role's token: header bytes that are not UTF-8 (credentials, cookies, tokens), bad Content-Length
# and Transfer-Encoding, raw bodies that are not JSON, one leaf at a time of a valid body replaced by a hostile
# value (lone surrogates, 64-bit overflow, NaN, 1e999, deep nesting, huge numbers, long strings, odd keys), odd
# multipart, hostile query strings (regex bombs, overflowing integers, bytes that are not UTF-8), odd methods,
# and over-long or undecodable paths.  Requests go straight to the WSGI app with a hand-made environ, so every
# byte is under the test's control and nothing (not even WebTest's lint) cleans it up first.

SURROGATE = "\ud800"
HOSTILE_VALUES = [SURROGATE, "a\udfffb", {SURROGATE: 1}, 2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 30, -1, 0, 1.5,
                  "x" * 70000, "", None, [], {}, True, "\x00", "../..", "<script>alert(1)</script>", "😀" * 50,
                  [[[[]]]], "%ff", "a/b/", "9" * 30, "1e999", "-0", "NaN", "2026-13-45T99:99:99Z", "\u00b2", "\u0663",
                  "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]
RAW_VALUES = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"1." + b"0" * 5000,
              b'"\\ud800"', b'"\\udc00x"', b'"\xff\xfe"', b'"\xed\xa0\x80"', b"[" * 100 + b"]" * 100,
              b"[" * 100000 + b"]" * 100000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"123456789012345678901234567890"]
RAW_BODIES = [b"", b"{", b"null", b"[]", b"123", b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b"[" * 200000,
              b'{"a":1,"a":2}', b"{}" * 3, b'"str"', b"true"]
SAMPLE_BODIES = {
    ("POST", "/v1/job"): {"job_queue": "q", "name": "n", "tags": ["t"], "provision_data": {"distro": "jammy"},
                          "test_data": {"test_cmds": "echo", "secrets": {"A": "a/b"}}, "job_priority": 1,
                          "reserve_data": {"ssh_keys": ["lp:x"], "timeout": 60}, "global_timeout": 100,
                          "exclude_agents": ["z"], "job_id": None, "parent_job_id": "p"},
    ("POST", "/v1/job/<job_id>/action"): {"action": "cancel"},
    ("POST", "/v1/result/<job_id>"): {"status": {"setup": 0}, "device_info": {"a": 1}, "job_state": "setup"},
    ("POST", "/v1/result/<job_id>/log/<log_type:re:output|serial>"): {
        "fragment_number": 0, "timestamp": "2026-01-01T00:00:00+00:00", "phase": "setup", "log_data": "x"},
    ("POST", "/v1/agents/queues"): {"q": "desc"},
    ("POST", "/v1/agents/images"): {"q": {"img": "url"}},
    ("POST", "/v1/agents/data/<agent_name>"): {"state": "waiting", "queues": ["q"], "location": "l", "job_id": "",
                                               "provision_type": "noprovision", "comment": "c", "log": ["l"],
                                               "identifier": "i"},
    ("POST", "/v1/agents/provision_logs/<agent_name>"): {"job_id": "j", "exit_code": 0, "detail": "d"},
    ("POST", "/v1/oauth2/refresh"): {"refresh_token": "x"},
    ("POST", "/v1/oauth2/revoke"): {"refresh_token": "x"},
    ("POST", "/v1/job/<job_id>/events"): {"agent_id": "a", "job_queue": "q", "job_status_webhook": "http://x.co/",
                                          "events": [{"event_name": "job_start", "timestamp": "t", "detail": "d"}]},
    ("POST", "/v1/restricted-queues/<queue_name>"): {"client_id": "c"},
    ("PUT", "/v1/client-permissions/<client_id>"): {"client_secret": "s" * 20, "max_priority": {"q": 1},
                                                    "max_reservation_time": {"q": 100}, "role": "contributor",
                                                    "email": "a@b.co", "allowed_queues": ["q"]},
    ("PUT", "/v1/secrets/<client_id>/<path:path>"): {"value": "v", "expire_after": 10},
    ("POST", "/api/v1/agent"): {"details": {"name": "n", "description": "d", "environment_id": None,
                                            "external_identifier": "x"}, "idempotency_key": "k"},
    ("PUT", "/api/v1/agent/<agent_id>"): {"details": {"name": "n2", "description": "d"}},
    ("POST", "/api/v1/agent_instance/register"): {"agent_id": "PFID", "agent_version": {"name": "v"},
                                                  "agent_schema_version": {"a": 1}, "update_current_version": True},
    ("POST", "/api/v1/agent_instance/<instance_id>/start"): {"idempotency_key": "k2"},
    ("POST", "/api/v1/agent_instance/<instance_id>/finish"): {"status": "complete", "idempotency_key": "k3"},
    ("POST", "/v2/<project_id>/agents/<agent_id>/events"): {"event": "startup", "timestamp": "2026-01-01T00:00:00Z",
                                                            "mode": "idle"},
    ("POST", "/v2/<project_id>/events"): {"event": "agent_activate", "mode": "idle", "agents": ["ag"]},
    ("POST", "/v2/events"): {"event": "agent_activate", "mode": "idle", "agents": ["ag"]},
}
HOSTILE_QUERIES = [
    "state=x&tags=%ff&limit=-5&offset=abc&match=x", "limit=99999999999999999999&offset=9223372036854775808",
    "start_fragment=99999999999999999999&start_timestamp=garbage&phase=x", "start_fragment=-1",
    "start_timestamp=9999-12-31T23:59:59Z", "index=18446744073709551616&wait=1x", "wait=99999999999h&index=1",
    "wait=1e9s", "name=%ff%fe&node=%ff", "node=(a%2B)%2B%24&name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "node=" + "(" * 5000, "service=(a*)*b&tag=x", "node=a{1000}{1000}", "node=(?P<x>a)(?P=x)", "node=%5Cp%7BGreek%7D",
    "pagination%5Boffset%5D=-1&pagination%5Bpage_size%5D=999999999999999999999",
    "pagination%5Boffset%5D=99999999999999999999", "sorting=---", "sorting=%ff", "marker=" + "9" * 40,
    "limit=0&marker=x&sort_dir=x", "page=-3&queue=%ff&state=%00", "page=99999999999999999999",
    "queue=" + "q" * 5000, "tag=" + "t" * 3000 + "&state=waiting", "next=//evil&next=%ff", "token=%ff",
    "a=" * 2000, "=%%%", "%ff=%ff", "pretty&index=1&wait=1ms", "x=" + "y" * 20000,
    # digits that str.isdigit() accepts and int() refuses, or that are not ASCII
    "index=%C2%B2&wait=%C2%B2s", "limit=%C2%B2&marker=%C2%B2&offset=%D9%A3", "page=%C2%B2&output=%C2%B2&serial=%C2%B2",
    "output=99999999999999999999&serial=-1", "start_fragment=%C2%B2&start_timestamp=0001-01-01T00:00:00%2B23:59",
    # bytes sent raw, not %-escaped
    "node=\xff&name=\xc3\xa9", "name=\xed\xa0\x80", "node=(.|a)*c", "node=a*a*a*a*a*c", "node=(a%3F){128}",
    "node=" + "a" * 200 + "&service=" + "b" * 200]
ODD_METHODS = ["PATCH", "OPTIONS", "HEAD", "PROPFIND", "TRACE", "CONNECT", "get", "X" * 100]
BAD_CONTENT_LENGTHS = ["abc", "-1", "1e3", " 5", "99999999999999999999999", "10", "+4", "0x10", "5, 5", "\xb2",
                       "\u0663"]


def wsgi_call(app, method, path, query="", headers=None, body=b"", environ=None):
    """One request straight into the WSGI app: (status, headers, body, what it logged)."""
    errors = io.StringIO()
    env = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
           "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": errors,
           "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
           "CONTENT_LENGTH": str(len(body))}
    for key, value in (headers or {}).items():
        key = key.upper().replace("-", "_")
        env[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    env.update(environ or {})
    started = {}

    def start_response(status, response_headers, exc_info=None):
        started["status"], started["headers"] = status, dict(response_headers)
    chunks = app(env, start_response)
    data = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return int(started["status"][:3]), started["headers"], data, errors.getvalue()


def _mutations(sample, rng):
    """(where, body) with one leaf or key of ``sample`` replaced by a hostile value or raw JSON text."""
    trails = []

    def walk(node, trail):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)
                           if isinstance(node, list) else ()):
            trails.append(trail + (key,))
            walk(value, trail + (key,))
    walk(sample, ())
    for trail in trails:
        for _ in range(2):
            copy = json.loads(json.dumps(sample))
            parent = functools.reduce(lambda node, step: node[step], trail[:-1], copy)
            if rng.random() < 0.5:
                parent[trail[-1]] = "@@RAW@@"
                yield trail, json.dumps(copy).encode().replace(b'"@@RAW@@"', rng.choice(RAW_VALUES))
            else:
                parent[trail[-1]] = rng.choice(HOSTILE_VALUES)
                yield trail, json.dumps(copy).encode()
        if isinstance(trail[-1], str):
            copy = json.loads(json.dumps(sample))
            parent = functools.reduce(lambda node, step: node[step], trail[:-1], copy)
            parent[rng.choice([SURROGATE, "", "x" * 5000, "$x", "a.b"])] = parent.pop(trail[-1])
            yield trail + ("<key>",), json.dumps(copy).encode()


def _multipart_bodies(rng):
    b = "XyZ"
    ok = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.tgz\"\r\n"
          f"Content-Type: application/octet-stream\r\n\r\nDATA\r\n--{b}--\r\n").encode()
    multipart = f"multipart/form-data; boundary={b}"
    return [("ok", multipart, ok), ("no boundary", "multipart/form-data", ok),
            ("empty boundary", "multipart/form-data; boundary=", ok),
            ("odd boundary", 'multipart/form-data; boundary="a b;c"', ok),
            ("long boundary", "multipart/form-data; boundary=" + "b" * 5000, ok),
            ("latin-1 boundary", "multipart/form-data; boundary=\xff\xfe", ok),
            ("unterminated", multipart, ok[:-10]), ("no close", multipart, ok.replace(f"--{b}--".encode(), b"")),
            ("bad part header", multipart, ok.replace(b"Content-Type", b"\xff\xfe\x00")),
            ("huge part header", multipart, ok.replace(b"Content-Type", b"X" * 100000)),
            ("no header end", multipart, f"--{b}\r\nContent-Disposition: x".encode()),
            ("unquoted name", multipart, ok.replace(b'name="file"', b"name=file")),
            ("latin-1 name", multipart, ok.replace(b'name="file"', b'name="\xff"')),
            ("many parts", multipart, (f"--{b}\r\n\r\nx\r\n" * 2000 + f"--{b}--").encode()),
            ("garbage", multipart, bytes(rng.randrange(256) for _ in range(500))),
            ("nested", multipart, ok.replace(b"DATA", ok)),
            ("form bytes", "application/x-www-form-urlencoded", b"next=%ff%fe&client_id=\xff"),
            ("form fields", "application/x-www-form-urlencoded", b"&".join([b"a=1"] * 5000))]


def _hostile_credentials(app, roles):
    """Header sets: each role's real token, then credentials made of bytes that are not UTF-8, oversized or
    malformed, and tokens signed with the hub's own key whose claims are hostile."""
    sets = [("anonymous", {})] + list(roles.items())
    for value in ["\xff\xfe", "é", "\x00", "x" * 10000, " ", ""]:
        sets += [("bearer bytes", {"Authorization": "Bearer " + value}),
                 ("basic bytes", {"Authorization": "Basic " + value}),
                 ("raw authorization", {"Authorization": value}),
                 ("cookie bytes", {"Cookie": f"agent_name={value}; agenthub_session={value}"}),
                 ("token bytes", {"X-Auth-Token": value, "X-Agent-Id": value, "X-Consul-Token": value,
                                  "Idempotency-Key": value})]
    for raw in (b"\xff:\xfe", b"nocolon", b":", b"a:\xed\xa0\x80", b"x" * 3000 + b":y"):
        sets.append(("basic base64", {"Authorization": "Basic " + base64.b64encode(raw).decode()}))
    for host in ("[", "::1]", "a b", "x" * 300 + ":99999999", "\xff"):
        sets.append(("odd host", {"Host": host, "X-Forwarded-Host": host}))
    sets += [("odd forwarding", {"X-Forwarded-For": "<b>x</b>" + "x" * 7000, "X-Forwarded-Proto": "javascript",
                                 "X-Forwarded-Host": "[::1"}),
             ("escaped cookie", {"Cookie": 'agent_name="lab\\054rack\\351"; agent_name="x\\"'}),
             ("basic not base64", {"Authorization": "Basic !!!==="}),
             ("odd cookies", {"Cookie": 'agent_name="unterminated; a=b=c; ;;; agenthub_session="\\"'})]
    now = int(agenthub.utcnow())
    for claims in [
            {"exp": 10 ** 30, "iat": now, "sub": "access_token", "permissions": {"client_id": SURROGATE,
                                                                                  "role": "admin"}},
            {"exp": 2 ** 64, "iat": -2 ** 64, "sub": "access_token",
             "permissions": {"client_id": "c", "role": "contributor", "max_priority": {"q": 10 ** 30},
                             "allowed_queues": 5, "max_reservation_time": "x"}},
            {"exp": now + 99, "iat": now, "sub": "access_token",
             "permissions": {"client_id": "c", "role": ["admin"], "max_priority": [], "allowed_queues": [{"a": 1}],
                             "max_reservation_time": {"q": "x"}}},
            {"exp": now + 99, "iat": now, "sub": 5, "permissions": {"client_id": "x" * 5000, "role": "agent"}},
            {"exp": float(now + 99), "iat": 1e300, "sub": "access_token", "permissions": {"client_id": "c"}}]:
        sets.append(("hostile signed token", {"Authorization": "Bearer " + agenthub.jwt_encode(claims, app.hub.auth.key)}))
    deep = base64.urlsafe_b64encode(b"[" * 50000).decode().rstrip("=")
    sets.append(("deep token header", {"Authorization": f"Bearer {deep}.{deep}.x"}))
    return sets


def fuzz_every_route(app, seed):
    """Send the input classes to every route; returns (requests sent, failures)."""
    rng = random.Random(seed)
    test = webtest.TestApp(app)
    roles = {role: token_headers(app, role) for role in ("admin", "manager", "contributor")}
    roles["agent"] = {**token_headers(app, "agent", "ag"), "Cookie": "agent_name=ag"}
    closed = app.hub.config.require_auth
    for headers in roles.values():           # so that /v2 requests get past authentication too
        headers.update({"X-Auth-Token": headers["Authorization"][7:] if closed else "t", "X-Agent-Id": "zz"})
    test.post_json("/v1/agents/data/ag", {"queues": ["q"]}, headers=roles["agent"])
    job_id = test.post_json("/v1/job", {"job_queue": "q"}, headers=roles["admin"]).json["job_id"]
    pfid = test.post_json("/api/v1/agent", {"details": {"name": "pfa"}}, headers=roles["admin"]).json["details"]["id"]
    values = {"job_id": [job_id, "x", "%00", "9" * 5000], "agent_name": ["ag", "\xf0\x9f\x98\x80", "\xff", "a" * 5000],
              "queue_name": ["q", "\xc3\xa9", "\xff\xfe"], "log_type": ["output", "serial"], "client_id": ["nobody", "\xff"],
              "path": ["a/b", "..", "a//b", "\xff/x"], "name": ["n", "%00", "a/b/", "\xff", "x" * 600],
              "agent_id": [pfid, "zz", "0" * 32, "\xff"], "instance_id": ["x", pfid], "project_id": ["p1", "\xff"]}
    credentials = _hostile_credentials(app, roles)
    multiparts = _multipart_bodies(rng)
    failures, sent = [], 0

    def send(kind, method, path, query="", headers=None, body=b"", environ=None):
        nonlocal sent
        sent += 1
        status, answer_headers, data, log = wsgi_call(app, method, path, query, headers, body, environ)
        if (status >= 500 and b"Webhook URL not configured" not in data) or "Traceback" in log \
                or b"Traceback" in data or b"Error(" in data or "X-Request-Id" not in answer_headers:
            failures.append((kind, method, path[:100], query[:60], status, data[:200], log[-400:]))

    def fill(rule):
        return re.sub(r"<(\w+)(?::[^>]*)?>", lambda m: rng.choice(values.get(m.group(1), ["x"])), rule)

    for route in app.routes:
        for method in (("GET", "POST", "PUT", "DELETE") if route.method == "ANY" else (route.method,)):
            sample = SAMPLE_BODIES.get((method, route.rule))
            body = json.dumps(sample).encode() if sample else b""
            for kind, headers in credentials:
                send("credentials: " + kind, method, fill(route.rule), "",
                     {**headers, "Content-Type": "application/json"}, body)
            for query in HOSTILE_QUERIES:
                send("query", method, fill(route.rule), query, rng.choice(list(roles.values())))
                send("query", method, fill(route.rule), query, {"X-Auth-Token": "t"})
            for length in BAD_CONTENT_LENGTHS:
                send("content-length " + length, method, fill(route.rule), "",
                     {**rng.choice(list(roles.values())), "Content-Type": "application/json"}, b"{}",
                     {"CONTENT_LENGTH": length})
            send("chunked with a length", method, fill(route.rule), "", {"Transfer-Encoding": "chunked"},
                 b"2\r\n{}\r\n0\r\n\r\n", {"CONTENT_LENGTH": "5"})
            send("broken chunks", method, fill(route.rule), "", {"Transfer-Encoding": "chunked", **roles["admin"]},
                 b"zz\r\n{}\r\n", {"CONTENT_LENGTH": ""})
            send("unknown coding", method, fill(route.rule), "", {"Transfer-Encoding": "gzip, chunked"}, b"{}")
            for odd in ODD_METHODS:
                send("method", odd, fill(route.rule))
            for path in ("/" + "a" * 100000, fill(route.rule) + "/" + "x" * 20000, fill(route.rule) + "\xff\xfe",
                         fill(route.rule) + "\x00", fill(route.rule) + "\xed\xa0\x80"):
                send("path", method, path)
            if method == "GET":
                continue
            for raw in RAW_BODIES:
                send("raw body", method, fill(route.rule), "",
                     {**rng.choice(list(roles.values()) + [{}]), "Content-Type": "application/json"}, raw)
            for trail, mutated in _mutations(sample or {}, rng):
                for who in (*roles.values(), {}):
                    send("leaf " + "/".join(map(str, trail)), method, fill(route.rule), "",
                         {**who, "Content-Type": "application/json"}, mutated)
            for kind, content_type, data in multiparts:
                send("multipart: " + kind, method, fill(route.rule), "",
                     {**rng.choice(list(roles.values())), "Content-Type": content_type}, data)
    # Afterwards every page and listing still answers (a stored value never breaks a read).
    pages = () if app.hub.config.require_auth else (   # the pages would ask for a login
        "/", "/jobs", "/jobs?queue=q", "/agents", "/agents/ag", "/queues", "/queues/q", "/events", f"/jobs/{job_id}",
        f"/jobs/{job_id}/logs.json?output=99999999999999999999")
    for page in pages + ("/v1/job/search", "/v1/agents/data", "/v1/queues/q/jobs", "/v1/agents/queues",
                 "/api/v1/agent", "/api/v1/agent_instance", "/api/server_health_messages", "/v1/event/list"):
        status, _, data, _ = wsgi_call(app, "GET", page.split("?")[0], page.partition("?")[2], roles["admin"]
                                       if not page.startswith("/v1/event") else {})
        if status != 200:
            failures.append(("page afterwards", "GET", page, "", status, data[:200], ""))
    status, _, data, _ = wsgi_call(app, "GET", "/v2/p1/agents", "", {"X-Auth-Token": roles["admin"]["X-Auth-Token"]})
    if status != 200:
        failures.append(("page afterwards", "GET", "/v2/p1/agents", "", status, data[:200], ""))
    return sent, failures


# WebTest's client-side cookie jar trips over the (correctly quoted) cookie of an emoji agent name.
@pytest.mark.filterwarnings("ignore:http.cookiejar bug")
@pytest.mark.parametrize("seed, require_auth", [(1, False), (2, True)])
def test_no_route_answers_500_to_hostile_input(seed, require_auth, make_app, engine):
    """Every route of every API, every input class, anonymous and with each role: never a 5xx (but the
    contract's own "Webhook URL not configured"), no exception text in a body, nothing in the log, an
    X-Request-Id on every answer, and every page still answers afterwards."""
    if engine == "postgresql" and require_auth:
        pytest.skip("on PostgreSQL the open variant runs (most input reaches the database there)")
    # No blocking event query may wait here (a valid index would hold the sweep for the wait): the cap of
    # zero answers them 429 after their parameters were read.
    app = make_app(purge_interval=0, lost_contact_seconds=0, require_auth=require_auth, max_watchers=0)
    try:
        sent, failures = fuzz_every_route(app, seed)
    finally:
        app.close()
    assert failures == [] and sent > 10000, (sent, failures[:5])


def test_nul_characters_and_their_json_escape_on_both_engines(app, anon, agent):
    """A literal backslash-u0000 in text is kept as it is; a NUL in a JSON string is kept (escaped in the
    stored JSON), and the tag searches that read that JSON in SQL still work."""
    job_id = submit(anon, name="a\x00b", tags=["t\x00", "plain"], job_queue="q1")
    assert [j["job_id"] for j in anon.get("/v1/job/search?tags=plain").json] == [job_id]
    assert anon.get("/jobs?tag=plain").status_int == 200
    agent.get("/v1/job?queue=q1")
    text = "literal \\u0000 stays"
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00",
                                                         "phase": "test", "log_data": text})
    assert anon.get(f"/v1/result/{job_id}").json["test_output"] == text
    assert anon.get(f"/v1/job/{job_id}").json["name"] == "a\x00b"    # JSON keeps it escaped, on both


def test_hostile_values_are_refused_in_each_apis_style_and_pages_show_the_rest_escaped(app, anon, agent):
    """The poisoned-name case: a lone surrogate never gets in (4xx in the API's style), and a value that
    does get in (markup, odd characters) is shown escaped on every listing and page that shows it."""
    answer = anon.post("/v1/job", json.dumps({"job_queue": "q", "name": SURROGATE}),
                       headers={"Content-Type": "application/json"}, status=400)
    assert answer.json == {"detail": {}, "message": "Invalid JSON body: a string holds a lone surrogate"}
    agent.post("/v1/agents/data/agent1", json.dumps({"location": "a\udfff"}), status=400)
    answer = anon.post("/api/v1/agent", json.dumps({"details": {"name": SURROGATE}}), status=400)
    assert answer.json["status"] == "error" and answer.json["code"] == "bad_request"
    answer = anon.post("/v2/p1/agents/a1/events", json.dumps({"event": "startup", "note": SURROGATE}),
                       headers={"X-Auth-Token": "t", "X-Agent-Id": "a1"}, status=400)
    assert "lone surrogate" in answer.json["message"]
    answer = anon.put("/v1/event/fire/deploy?node=%ed%a0%80", status=400)
    assert answer.text == "The query string is not valid UTF-8"
    anon.put("/v1/event/fire/%ed%a0%80", status=400)
    shown = "<b>x</b>\u2028 é 😀"
    job_id = submit(anon, name=shown, tags=[shown])
    anon.post_json("/api/v1/agent", {"details": {"name": "<i>pf</i>"}})
    for page in ("/jobs", "/jobs?queue=q1", "/queues/q1", f"/jobs/{job_id}", "/", "/agents", "/queues"):
        text = anon.get(page, status=200).text
        assert "<b>x</b>" not in text and "<i>pf</i>" not in text
    assert "&lt;b&gt;x&lt;/b&gt;" in anon.get("/jobs").text
    assert anon.get("/v1/job/search", params={"tags": shown}).json[0]["job_id"] == job_id


def test_text_an_older_version_stored_reads_back_escaped(tmp_path, make_app):
    """A job name stored as "\\ud800" by an older agenthub (SQLite's json_extract turns it into bytes that are
    not UTF-8) is listed with the bad bytes escaped instead of failing every listing that shows it."""
    db = str(tmp_path / "old.db")
    app = make_app(db=db, purge_interval=0)
    job_id = submit(webtest.TestApp(app), name="placeholder")
    app.close()
    with sqlite3.connect(db) as conn:         # what a previous version let through
        conn.execute("UPDATE jobs SET job_data = ? WHERE job_id = ?",
                     ('{"job_queue": "q1", "name": "\\ud800"}', job_id))
    app = make_app(db=db, purge_interval=0)
    test = webtest.TestApp(app)
    for page in ("/jobs", "/jobs?queue=q1", "/queues/q1", f"/jobs/{job_id}"):
        assert test.get(page, status=200)
    assert "\\xed\\xa0\\x80" in test.get("/jobs").text
    assert test.get("/v1/queues/q1/jobs", status=200)
    app.close()


@pytest.mark.parametrize("text, refused", [
    ("[" * 64 + "]" * 64, False), ("[" * 65 + "]" * 65, True), ('{"a":' * 70 + "1" + "}" * 70, True),
    ("[" * 5000 + "]" * 5000, True), (str(2 ** 63 - 1), False), (str(-2 ** 63), False), (str(2 ** 63), True),
    ("1" * 5000, True), ("NaN", True), ("-Infinity", True), ("1e999", True), ("1.5e300", False),
    ('"\\ud83d\\ude00"', False), ('"\\ud83d"', True), ('{"\\udc00": 1}', True), ('"\\\\ud800"', False),
    ('{"a": [1, {"b": "\\ud800x"}]}', True)])
def test_strict_json(text, refused):
    if refused:
        with pytest.raises(agenthub.JsonRefused):
            agenthub.load_json(text.encode())
    else:
        assert agenthub.load_json(text.encode()) == json.loads(text)


def test_json_that_is_not_utf8_is_not_json():
    with pytest.raises(ValueError):
        agenthub.load_json(b'"\xed\xa0\x80"')


@pytest.mark.parametrize("path, expect", [
    ("/v1/job", b'"message":"Invalid Content-Length header"'), ("/v1/event/list", b"Invalid Content-Length header"),
    ("/api/v1/agent", b'"code":"bad_request"'), ("/v2/p/agents", b'{"message":"Invalid Content-Length header"}'),
    ("/jobs", b"<!doctype html>")])
def test_the_boundary_answers_in_each_apis_style(app, path, expect):
    status, headers, body, log = wsgi_call(app, "POST", path, headers={"Content-Type": "application/json"},
                                           body=b"{}", environ={"CONTENT_LENGTH": "12abc"})
    assert status == 400 and expect in body and headers["X-Request-Id"] and log == ""
    assert wsgi_call(app, "GET", path + "/" + "x" * 20000)[0] == 414
    assert wsgi_call(app, "GET", path, headers={"X-Big": "y" * 33000})[0] == 431
    assert wsgi_call(app, "GET", path, headers={"X-" + str(n): "y" * 30000 for n in range(3)})[0] == 431
    assert wsgi_call(app, "GET", path, "a=%ff")[0] == 400
    assert wsgi_call(app, "POST", path, headers={"Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n",
                     environ={"CONTENT_LENGTH": "5"})[0] == 400


def test_a_credential_that_is_not_utf8_is_a_bad_credential(app):
    status, _, body, _ = wsgi_call(app, "GET", "/v1/job/search", headers={"Authorization": "Bearer \xff\xfe"})
    assert status == 401 and json.loads(body)["message"].startswith("Invalid credentials")
    status, _, body, _ = wsgi_call(app, "GET", "/v1/event/list", headers={"X-Consul-Token": "\xff"})
    assert (status, body) == (403, b"ACL not found")
    status, _, body, _ = wsgi_call(app, "GET", "/v2/p/agents", headers={"X-Auth-Token": "t\xe9\xff"})
    assert status == 401
    status, _, body, _ = wsgi_call(app, "POST", "/api/v1/agent", headers={"Idempotency-Key": "\xc3"},
                                   body=b'{"details": {"name": "n"}}')
    assert status == 401 and json.loads(body)["code"] == "unauthorized"
    # A cookie that is not UTF-8 is no cookie: the agent is not identified, the page is anonymous.
    agent = token_headers(app, "agent", "ag")
    status, _, body, _ = wsgi_call(app, "GET", "/v1/job", "queue=q", {**agent, "Cookie": "agent_name=\xff"})
    assert status == 401 and b"Agent not identified" in body
    assert wsgi_call(app, "GET", "/jobs", headers={"Cookie": "agenthub_session=\xff\xfe"})[0] == 200
    # ... and a UTF-8 cookie is read as UTF-8 (not as latin-1).
    status, _, _, _ = wsgi_call(app, "POST", "/v1/agents/data/\xc3\xa9", headers={**agent, "Content-Type": "application/json",
                                "Cookie": "agent_name=\xc3\xa9"}, body=b'{"queues": ["q"]}')
    assert status == 200 and webtest.TestApp(app).get("/v1/agents/data").json[0]["name"] == "é"


@pytest.mark.parametrize("style, path, text", [
    ("consul", "/v1/event/boom", b"Internal server error (request id "),
    ("tf", "/v1/boom", b"Unhandled Exception: internal"),
    ("gocd", "/api/server_health_messages/boom", b'"message":"Internal server error (request id '),
    ("prefactor", "/api/v1/boom", b'"code":"internal_error"'), ("rackspace", "/v2/boom", b'{"message":"Internal server error'),
    ("web", "/boom", b"Something went wrong"), ("ops", "/opsboom", b'"message":"Internal server error (request id ')])
def test_a_crash_answers_generically_with_the_request_id_and_is_logged_once(make_app, style, path, text):
    app = make_app(quiet=True)

    def boom():
        raise RuntimeError("secret detail")
    api = next(s for s in app.styles if s.name == style)
    api.route("GET", path, roles=None)(boom) if style in ("tf", "web") else api.route("GET", path)(boom)
    status, headers, body, log = wsgi_call(app, "GET", path, headers={"X-Auth-Token": "t"})
    assert status == 500 and text in body and b"secret detail" not in body and b"RuntimeError" not in body
    rid = headers["X-Request-Id"]
    assert rid.encode() in body
    assert log.count(rid) == 1 and log.count("Traceback") == 1 and "secret detail" in log


def test_a_multipart_boundary_out_of_rfc_limits_is_refused(app, anon):
    job_id = submit(anon)
    agent = token_headers(app, "agent", "ag")
    for content_type in ("multipart/form-data; boundary=" + "b" * 71, "multipart/form-data; boundary=",
                         'multipart/form-data; boundary="\xc3\xa9"'):
        status, _, body, _ = wsgi_call(app, "POST", f"/v1/result/{job_id}/artifact",
                                       headers={**agent, "Content-Type": content_type}, body=b"--x--")
        assert (status, json.loads(body)["message"]) == (400, "Invalid multipart boundary")


def test_review_findings_on_the_boundary(app, anon):
    """Each answered 500, broke a later read, or misread valid input before."""
    agent = token_headers(app, "agent", "ag")
    # digits that str.isdigit() accepts and int() refuses
    assert wsgi_call(app, "GET", "/v1/event/list", "index=%C2%B2")[0] == 400
    assert wsgi_call(app, "POST", "/v1/job", headers={"Content-Type": "application/json"}, body=b"{}",
                     environ={"CONTENT_LENGTH": "\xb2"})[0] == 400
    assert anon.post_json("/v1/job", {"job_queue": "q", "reserve_data": {"timeout": "\u00b2"}}, status=422)
    # a start time whose UTC date is outside the calendar is refused, so the listing keeps working
    pf = pf_create(anon, "timely")
    inst = anon.post_json("/api/v1/agent_instance/register", {"agent_id": pf["id"]}).json["details"]
    anon.post_json(f"/api/v1/agent_instance/{inst['id']}/start", {"timestamp": "9999-12-31T23:59:59-23:59"},
                   status=422)
    assert anon.get("/api/v1/agent_instance").json["status"] == "success"
    # Host and forwarding headers
    assert wsgi_call(app, "GET", "/jobs", headers={"Host": "["})[0] == 400
    assert wsgi_call(app, "POST", "/v1/job", headers={"X-Forwarded-Host": "::1]"}, body=b"{}")[0] == 400
    wsgi_call(app, "POST", "/v1/agents/data/ag", headers={**agent, "X-Forwarded-For": "<b>x</b>",
                                                          "Content-Type": "application/json"}, body=b"{}")
    assert app.hub.registry.find("name", "ag")["last_ip"] == "127.0.0.1"        # the peer, not the header
    assert wsgi_call(app, "GET", f"/jobs/{submit(anon)}/logs.json", "output=99999999999999999999")[0] == 200
    # raw UTF-8 in a query is read as UTF-8
    anon.put("/v1/event/fire/caf%C3%A9")
    status, _, body, _ = wsgi_call(app, "GET", "/v1/event/list", "name=caf\xc3\xa9")
    assert status == 200 and [e["Name"] for e in json.loads(body)] == ["café"]
    assert wsgi_call(app, "GET", "/v1/event/list", "name=\xff")[0] == 400
    # the cookie Bottle itself writes for a name with "," is read back as that name
    answer = wsgi_call(app, "POST", "/v1/agents/data/lab,rack1", headers={**agent, "Content-Type": "application/json"},
                       body=b'{"queues": ["q9"]}')
    cookie = answer[1]["Set-Cookie"].split(";")[0]
    assert cookie == 'agent_name="lab\\054rack1"'
    job_id = submit(anon, job_queue="q9")
    assert json.loads(wsgi_call(app, "GET", "/v1/job", "queue=q9", {**agent, "Cookie": cookie})[2])["job_id"] == job_id
    assert [i["agent_id"] for i in anon.get("/api/v1/agent_instance").json["summaries"]
            if i.get("job_id") == job_id] == [app.hub.registry.find("name", "lab,rack1")["pfid"]]
    # a UTF-8 byte order mark, and a token with many permissions
    assert wsgi_call(app, "POST", "/v1/job", headers={"Content-Type": "application/json"},
                     body=b'\xef\xbb\xbf{"job_queue": "q"}')[0] == 200
    many = {f"queue-{n}": 10 for n in range(250)}
    big = token_headers(app, "contributor", "big", max_priority=many, max_reservation_time=many)
    assert len(big["Authorization"]) > 8192
    anon.post_json("/v1/job", {"job_queue": "queue-1"}, headers=big, status=200)


def test_web_login_reads_utf8_forms(tmp_path, make_app):
    app = make_app(db=str(tmp_path / "hub.db"), require_auth=True, purge_interval=0)
    try:
        secret = app.hub.auth.add_client("café", "contributor")
        test = webtest.TestApp(app)
        body = "client_id=café&secret=" + urllib.parse.quote(secret) + "&next=/jobs&csrf=" + csrf_of(test)
        answer = test.post("/login", body.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"},
                           status=303)
        assert answer.headers["Location"].endswith("/jobs")
        assert test.post("/login", b"", status=403)                # an empty form lacks its CSRF token: no 415
    finally:
        app.close()


def test_an_idempotency_claim_of_a_request_that_died_frees_its_key(app, monkeypatch):
    idem = app.hub.idempotency
    idem.store.claim_idempotency(agenthub._sha256("POST /x -"), agenthub._sha256("k"), agenthub.utcnow(), 0, 0)
    with pytest.raises(agenthub.ApiError):
        idem.run("POST /x -", "k", lambda: (200, "{}"))
    monkeypatch.setattr(agenthub, "utcnow", lambda: time.time() + idem.CLAIM_TTL + 1)
    assert idem.run("POST /x -", "k", lambda: (201, "{}")) == (201, "{}")


def test_event_filters_that_could_backtrack_for_ever_are_refused(anon):
    answer = anon.put("/v1/event/fire/x?node=(a%2B)%2B%24", status=400)
    assert "nested repetition" in answer.text
    assert "longer than" in anon.put("/v1/event/fire/x?node=" + "a" * 300, status=400).text
    assert "unterminated subpattern" in anon.put("/v1/event/fire/x?node=" + "(" * 200, status=400).text
    anon.put("/v1/event/fire/x?node=web-.*", status=200)


def test_protocol_limits_on_a_real_server(server):
    app, base = server
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 414")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /v1 HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 431")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /v1 HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"y" * 33000 + b"\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 431")
    with socket.create_connection((host, int(port))) as sock:
        # A Content-Length that is not a number: 400, and the connection closes (the body's end is unknown).
        sock.sendall(b"POST /v1/job HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1x\r\n\r\nGET /v1 HTTP/1.1\r\n\r\n")
        reply = sock.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1


# == Application and command line ==================================================================================

def test_many_apps_are_independent(make_app):
    one, two = make_app(purge_interval=0), make_app(purge_interval=0)
    submit(webtest.TestApp(one))
    assert webtest.TestApp(two).get("/v1/job/search").json == []
    one.close()
    two.close()


def test_lazy_wsgi_application_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTHUB_DB", str(tmp_path / "lazy.db"))
    monkeypatch.setenv("AGENTHUB_PURGE_INTERVAL", "0")
    monkeypatch.setattr(agenthub, "_application", None)
    test = webtest.TestApp(agenthub.application)
    test.post_json("/v1/job", {"job_queue": "q"})
    assert (tmp_path / "lazy.db").exists()
    agenthub.close_application()
    assert agenthub._application is None


def test_add_client_writes_a_token_file_the_agent_can_use(tmp_path, capsys, make_app):
    db, token_file = str(tmp_path / "hub.db"), tmp_path / "agent.token"
    assert agenthub.main(["add-client", "lab-agent", "--role", "agent", "--db", db,
                          "--token-file", str(token_file)]) == 0
    printed = capsys.readouterr().out
    assert "secret: " in printed and "role: agent" in printed
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    refresh = json.loads(token_file.read_text())["refresh_token"]
    app = make_app(db=db, purge_interval=0)
    test = webtest.TestApp(app)
    access = test.post_json("/v1/oauth2/refresh", {"refresh_token": refresh}).json["access_token"]
    test.get("/v1/job?queue=q", headers={"Authorization": f"Bearer {access}", "Cookie": "agent_name=lab-agent"},
             status=204)
    secret = printed.split("secret: ")[1].split()[0]
    basic = base64.b64encode(f"lab-agent:{secret}".encode()).decode()
    test.post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"}, status=200)
    app.close()


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert agenthub.main(["--db", str(tmp_path / "missing" / "x.db"), "--port", "0"]) == 1
    assert "agenthub: database" in capsys.readouterr().err
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert agenthub.main(["--db", str(tmp_path / "x.db"), "--port", str(taken.getsockname()[1])]) == 1
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    finally:
        taken.close()


def test_a_database_from_a_newer_agenthub_is_refused(tmp_path, capsys):
    db = str(tmp_path / "new.db")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 999")
    assert agenthub.main(["--db", db, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"database schema 999 is newer than this agenthub ({len(agenthub.MIGRATIONS)})" in err
    with sqlite3.connect(db) as conn:                      # and nothing was written to it
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 999


def test_a_second_process_on_the_same_database_refuses_to_start(tmp_path):
    db = str(tmp_path / "hub.db")
    first = subprocess.Popen([sys.executable, agenthub.__file__, "--db", db, "--port", "0", "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on" in first.stdout.readline()
        second = subprocess.run([sys.executable, agenthub.__file__, "--db", db, "--port", "0"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and second.stderr.count("\n") == 1
        assert f"is already served by pid {first.pid} on " in second.stderr
        assert agenthub.main(["add-client", "c1", "--db", db]) == 0     # management commands still work
    finally:
        first.terminate()
        first.wait(timeout=30)
    app = create_app(db=db, purge_interval=0)         # the lock died with the process
    app.close()


def test_sigterm_answers_parked_watchers_records_queued_notifications_and_exits_cleanly(tmp_path):
    import signal
    receiver = Receiver(delay=1)                          # a slow GoCD webhook: notifications queue up
    db = str(tmp_path / "hub.db")
    proc = subprocess.Popen([sys.executable, agenthub.__file__, "--db", db, "--port", "0", "--quiet",
                             "--gocd-webhook", receiver.url, "--shutdown-grace", "0.5", "--purge-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = re.search(r"http://[\d.]+:\d+", proc.stdout.readline()).group(0)
        host, port = base[7:].split(":")
        for n in range(4):                                 # four state changes for the slow receiver
            call_http(base, "POST", "/api/v1/agent", {"details": {"name": f"a{n}"}})
        event = json.loads(call_http(base, "PUT", "/v1/event/fire/deploy", b"x")[2])
        watcher = http.client.HTTPConnection(host, int(port), timeout=30)
        watcher.request("GET", "/v1/event/list?name=deploy")        # proves the connection is served ...
        assert watcher.getresponse().read()
        watcher.request("GET", f"/v1/event/list?name=deploy&index={xor_index(event['ID'])}&wait=60s")  # ... parks
        assert _wait_for(lambda: receiver.requests)
        # The watcher is parked (the hub says so), and only then the signal comes.
        assert _wait_for(lambda: b"\nagenthub_event_watchers 1\n" in call_http(base, "GET", "/metrics")[2])
        proc.send_signal(signal.SIGTERM)
        answer = watcher.getresponse()
        assert answer.status == 200 and [e["ID"] for e in json.loads(answer.read())] == [event["ID"]]
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert "SIGTERM: stopped accepting connections" in log and "answered 1 parked watcher(s)" in log
        assert "database closed; stopped" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.close()
    app = create_app(db=db, purge_interval=0, lost_contact_seconds=0)
    outcomes = [d["outcome"] for d in app.hub.notifier.deliveries()]
    app.close()
    assert len(outcomes) == 4 and "undelivered" in outcomes       # none vanished


def test_sigterm_lets_an_upload_in_flight_finish(tmp_path):
    import signal
    db, token_file = str(tmp_path / "hub.db"), str(tmp_path / "agent.token")
    assert agenthub.main(["add-client", "agent1", "--role", "agent", "--db", db, "--token-file", token_file]) == 0
    proc = subprocess.Popen([sys.executable, agenthub.__file__, "--db", db, "--port", "0", "--quiet",
                             "--shutdown-grace", "20", "--purge-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = re.search(r"http://[\d.]+:\d+", proc.stdout.readline()).group(0)
        host, port = base[7:].split(":")
        refresh = json.loads(open(token_file).read())["refresh_token"]
        access = json.loads(call_http(base, "POST", "/v1/oauth2/refresh", {"refresh_token": refresh})[2])["access_token"]
        job_id = json.loads(call_http(base, "POST", "/v1/job", {"job_queue": "q"})[2])["job_id"]
        head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.tgz\"\r\n\r\n")
        data, tail = b"x" * (4 * 1024 * 1024), b"\r\n--b--\r\n"
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(f"POST /v1/result/{job_id}/artifact HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {access}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     f"Content-Length: {len(head) + len(data) + len(tail)}\r\nExpect: 100-continue\r\n\r\n".encode())
        reply = sock.makefile("rb")
        assert reply.readline().startswith(b"HTTP/1.1 100") and reply.readline() == b"\r\n"   # it is being served
        sock.sendall(head + data[:len(data) // 2])               # half of it is in ...
        proc.send_signal(signal.SIGTERM)
        assert _wait_for(lambda: "stopped accepting" in _read_available(proc.stderr))   # ... the shutdown began
        sock.sendall(data[len(data) // 2:] + tail)               # ... and the rest arrives within the grace
        assert reply.readline().startswith(b"HTTP/1.1 200")
        sock.close()
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in _read_available(proc.stderr, final=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    app = create_app(db=db, purge_interval=0, lost_contact_seconds=0)
    size, chunks = app.hub.jobs.open_file(job_id, "artifact")
    assert size == len(data) and b"".join(chunks) == data          # whole, not half-written
    app.close()


_stderr_seen = {}


def _read_available(stream, final=False):
    """What a subprocess has written to ``stream`` so far (without blocking; with ``final``, to its
    end), accumulated.  It reads the pipe itself: a text stream's readline may keep later lines in
    its buffer, where select() no longer sees them."""
    import select
    seen = _stderr_seen.setdefault(stream, [])
    while final or select.select([stream.fileno()], [], [], 0)[0]:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            break
        seen.append(chunk)
    return b"".join(seen).decode(errors="replace")


def test_requests_during_a_shutdown_answer_503_in_each_apis_style(app):
    app.hub.stopped_at = time.monotonic()
    assert wsgi_call(app, "GET", "/v1/job/search")[:3:2] == (503, b'{"detail":{},"message":"agenthub is shutting down"}\n')
    assert wsgi_call(app, "GET", "/v1/event/list")[:3:2] == (503, b"agenthub is shutting down")
    assert json.loads(wsgi_call(app, "GET", "/api/v1/agent")[2])["message"] == "agenthub is shutting down"
    app.hub.stopped_at = None
    app.hub.db.close()                                    # the grace ran out: the database is closed
    status, _, body, log = wsgi_call(app, "GET", "/v1/job/search")
    assert (status, json.loads(body)["message"], log) == (503, "agenthub is shutting down", "")


def test_a_full_database_refuses_writes_with_507_keeps_reads_and_recovers(make_app, capsys, engine):
    if engine == "postgresql":
        pytest.skip("fills an SQLite database (PRAGMA max_page_count); PostgreSQL's disk-full maps to 507 too")
    app = make_app()
    test = webtest.TestApp(app)
    job_id = submit(test)
    agent_headers = token_headers(app, "agent", "ag")
    pages = app.hub.db.read_one("PRAGMA page_count")[0]
    app.hub.db.read(f"PRAGMA max_page_count = {pages + 2}")     # SQLite's own limit: the database is full
    refused = []
    for _ in range(5):
        answer = test.post_json("/v1/job", {"job_queue": "q1", "test_data": {"test_cmds": "x" * 20000}},
                                expect_errors=True)
        refused.append((answer.status_int, answer.json["message"]))
    assert refused[-1] == (507, "Insufficient storage: agenthub's database or disk is full")
    answer = test.post_json("/api/v1/agent", {"details": {"name": "n", "description": "d" * 20000}}, status=507)
    assert answer.json["code"] == "insufficient_storage"
    assert test.get(f"/v1/job/{job_id}").json["job_id"] == job_id and test.get("/jobs").status_int == 200
    assert capsys.readouterr().err.count("writes answer 507") == 1     # one line for the whole episode
    app.hub.db.read(f"PRAGMA max_page_count = {app.hub.db.read_one('PRAGMA page_count')[0] + 40}")
    answer = test.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "a.tgz", b"z" * (3 * 1024 * 1024))],
                       headers=agent_headers, expect_errors=True)
    assert answer.status_int == 507                               # the upload ran out of room half-way ...
    assert test.get(f"/v1/result/{job_id}/artifact", status=204)    # ... and left nothing behind
    assert app.hub.db.read("SELECT count(*) FROM files")[0][0] == 0
    app.hub.db.read("PRAGMA max_page_count = 1073741823")        # space again: no restart needed
    submit(test)
    err = capsys.readouterr().err
    assert "takes writes again" in err and "Traceback" not in err


def test_uploads_a_previous_run_left_unfinished_are_dropped_at_start(tmp_path, make_app, capsys):
    db = str(tmp_path / "hub.db")
    app = make_app(db=db)
    job_id = submit(webtest.TestApp(app))
    app.hub.jobs.store.begin_file(job_id, "artifact", time.time())        # a crash left this half-way
    app.close()
    make_app(db=db)
    assert "dropped 1 upload(s) a previous run left unfinished" in capsys.readouterr().err


def test_an_unreadable_key_file_is_one_line(tmp_path, capsys):
    db = str(tmp_path / "hub.db")
    os.mkdir(db + ".key")                                 # unreadable as a file, even for root
    assert agenthub.main(["--db", db, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"agenthub: key file {db}.key: ") and err.count("\n") == 1


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        agenthub.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--db", "--server", "--secret-key", "--require-auth", "--retention-days",
                 "--purge-interval", "--role", "--token-file", "--jobs", "--artifact-mib", "--shutdown-grace",
                 "--strand-seconds"):
        assert flag in text


# -- operations: metrics, health, logs (issue 16) -----------------------------------------------------

def scrape(client, **kw):
    """GET /metrics parsed by Prometheus's own text parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families
    answer = client.get("/metrics", **kw)
    assert answer.content_type == "text/plain" and "version=0.0.4" in answer.headers["Content-Type"]
    return {family.name: family for family in text_string_to_metric_families(answer.text)}


def sample(families, name, suffix="", **labels):
    family = families[name]
    found = [s.value for s in family.samples if s.name == name + suffix
             and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


def test_metrics_are_prometheus_text_and_move_with_the_work(app, anon, agent):
    before = scrape(anon)
    for family in ("agenthub_http_requests", "agenthub_http_request_duration_seconds", "agenthub_jobs",
                   "agenthub_jobs_submitted", "agenthub_jobs_popped", "agenthub_jobs_finished",
                   "agenthub_queue_wait_seconds", "agenthub_agents", "agenthub_agents_lifecycle",
                   "agenthub_webhook_deliveries", "agenthub_webhook_queue_depth", "agenthub_events_fired",
                   "agenthub_event_watchers", "agenthub_database_bytes", "agenthub_database_write_seconds",
                   "process_cpu_seconds", "process_resident_memory_bytes", "agenthub_threads", "agenthub_build_info"):
        assert family in before, family
    assert sample(before, "agenthub_jobs_submitted", "_total") == 0
    weird = 'q"uo\\te\nline'                                    # label escaping, read back by the parser
    job_ids = [submit(anon, job_queue="q1"), submit(anon, job_queue="q1"), submit(anon, job_queue=weird)]
    agent.get("/v1/job?queue=q1")
    agent.post_json(f"/v1/result/{job_ids[0]}", {"job_state": "complete"})
    anon.put("/v1/event/fire/deploy", "v1")
    after = scrape(anon)
    assert sample(after, "agenthub_jobs_submitted", "_total") == 3
    assert sample(after, "agenthub_jobs_popped", "_total") == 1
    assert sample(after, "agenthub_jobs_finished", "_total", state="complete") == 1
    assert sample(after, "agenthub_jobs", queue="q1", state="waiting") == 1
    assert sample(after, "agenthub_jobs", queue="q1", state="complete") == 1
    assert sample(after, "agenthub_jobs", queue=weird, state="waiting") == 1
    assert sample(after, "agenthub_queue_wait_seconds", "_count", queue="q1") == 1
    assert sample(after, "agenthub_queue_wait_seconds", "_bucket", queue="q1", le="+Inf") == 1
    assert sample(after, "agenthub_events_fired", "_total", source="api") == 1
    assert sample(after, "agenthub_agents", config_state="Enabled", agent_state="Idle") == 1
    assert sample(after, "agenthub_agents_lifecycle", status="active") == 1
    assert sample(after, "agenthub_http_requests", "_total", api="tf", route="/v1/job", method="POST",
                  code="2xx") == 3
    assert sample(after, "agenthub_http_request_duration_seconds", "_count", api="tf", route="/v1/job") == 4
    assert sample(after, "agenthub_http_requests", "_total", api="ops", route="/metrics", code="2xx") == 1
    assert sample(after, "agenthub_database_write_seconds", "_count") > sample(before,
                                                                               "agenthub_database_write_seconds",
                                                                               "_count")
    anon.get("/nothing/here", status=404)
    assert sample(scrape(anon), "agenthub_http_requests", "_total", route="(unmatched)", code="4xx") == 1


def test_metrics_need_a_credential_when_asked(make_app):
    closed = webtest.TestApp(make_app(metrics_tokens="s3cret,other"))
    assert closed.get("/metrics", status=401).json == {
        "status": "error", "message": "GET /metrics needs a --metrics-token as a bearer token"}
    closed.get("/metrics", headers={"Authorization": "Bearer wrong"}, status=401)
    scrape(closed, headers={"Authorization": "Bearer other"})
    app = make_app(require_auth=True)
    strict = webtest.TestApp(app)
    strict.get("/metrics", status=401)
    strict.get("/metrics", headers=token_headers(app, "contributor"), status=403)
    scrape(strict, headers=token_headers(app, "manager"))
    assert strict.get("/healthz").json["status"] == "alive"                 # health is always open
    assert strict.get("/readyz").json["status"] == "ready"


def test_a_file_hub_reports_its_database_files_and_connections(tmp_path, make_app):
    app = make_app(db=str(tmp_path / "hub.db"))
    httpd = agenthub.make_server(app, "127.0.0.1", 0)
    app.hub.server = httpd
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        from prometheus_client.parser import text_string_to_metric_families
        conn = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=10)
        conn.request("GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(conn.getresponse().read().decode())}
        assert sample(families, "agenthub_database_bytes", file="main") > 0
        assert sample(families, "agenthub_database_bytes", file="wal") >= 0
        assert sample(families, "agenthub_http_connections") >= 1                # this one
        conn.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_health_and_readiness(app, anon):
    assert anon.get("/healthz").json["status"] == "alive"
    ready = anon.get("/readyz").json
    assert ready == {"status": "ready", "checks": {"database": "writable", "workers": "alive", "shutdown": "no"}}
    # The database starts refusing writes as a read-only one does (SQLite: attempt to write a readonly
    # database; PostgreSQL: cannot execute INSERT in a read-only transaction).
    sqlite = app.hub.db.engine == "sqlite"
    with app.hub.db.connection() as conn:
        conn.execute("PRAGMA query_only = ON" if sqlite else "SET default_transaction_read_only = on")
        refused = anon.get("/readyz", status=503).json
        conn.execute("PRAGMA query_only = OFF" if sqlite else "SET default_transaction_read_only = off")
    assert refused["status"] == "not ready" and ("readonly" if sqlite else "read-only") in refused["checks"]["database"]
    assert anon.get("/healthz").status_int == 200                              # alive all the same
    # Shutting down: not ready, with what was checked.
    app.hub.stopped_at = time.monotonic() - 1
    down = anon.get("/readyz", status=503).json
    assert down["checks"]["shutdown"] == "in progress" and down["status"] == "not ready"
    app.hub.stopped_at = None
    app.close()
    assert "stopped:" in webtest.TestApp(app).get("/readyz", status=503).json["checks"]["workers"]


def test_log_lines_are_one_line_each_text_or_json(make_app, capsys):
    text_app = webtest.TestApp(make_app())
    text_app.get("/v1/agents/data", headers={"X-Forwarded-For": "x"})
    text_app.get("/v1/x%0Aforged", status=400)
    lines = [line for line in capsys.readouterr().err.splitlines() if '"GET ' in line]
    assert len(lines) == 2 and " 200 " in lines[0] and "tf /v1/agents/data" in lines[0]
    assert "\\x0aforged" in lines[1]                                          # no forged second line
    app = make_app(log_format="json")
    client = Client(app, token_headers(app, "manager", "ops-person"))
    client.get("/v1/agents/data")
    app.hub.jobs.purge()
    agenthub.log("something happened", "warning", detail="d")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    access = [e for e in entries if e["message"] == "request" and e["path"] == "/v1/agents/data"]
    assert access and {k: access[0][k] for k in ("method", "status", "api", "route", "client_id")} == {
        "method": "GET", "status": 200, "api": "tf", "route": "/v1/agents/data", "client_id": "ops-person"}
    assert access[0]["request_id"] and access[0]["duration_ms"] >= 0 and access[0]["time"].endswith("Z")
    assert {"level": "warning", "message": "something happened", "detail": "d"}.items() <= entries[-1].items()
    agenthub._LOG["json"] = False


def test_a_parked_blocking_query_is_logged_when_it_ends_with_the_time_it_was_held(make_app, capsys):
    """One access-log line per blocking query, written when its answer goes out (200, with the
    wait it was held for) or when its client leaves (499), not when it was parked."""
    app = make_app(log_format="json")
    httpd, (host, port) = _serve(app, threads=2)
    base = f"http://{host}:{port}"
    lines = []

    def list_lines():
        lines.extend(json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{"))
        return [e for e in lines if e.get("path") == "/v1/event/list"]
    try:
        index = xor_index(json.loads(call_http(base, "PUT", "/v1/event/fire/held", b"")[2])["ID"])
        assert call_http(base, "GET", f"/v1/event/list?index={index}&wait=300ms")[0] == 200
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"GET /v1/event/list?index={index}&wait=60s HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            assert _wait_for(lambda: app.hub.watchers.parked() == 1)
        assert _wait_for(lambda: len(list_lines()) == 2)
        answered, left = list_lines()
        assert answered["status"] == 200 and answered["duration_ms"] >= 300        # held for its wait
        assert answered["route"] == "/v1/event/list" and answered["api"] == "consul"
        assert left["status"] == 499 and left["request_id"] != answered["request_id"]
        # Waits so short the answer may go out before the route has returned: still one line each.
        conn = http.client.HTTPConnection(host, port)
        for _ in range(30):
            conn.request("GET", f"/v1/event/list?index={index}&wait=1ms")
            assert conn.getresponse().read() and True
        conn.close()
        assert _wait_for(lambda: len(list_lines()) == 32)
        assert len({line["request_id"] for line in list_lines()}) == 32
    finally:
        httpd.shutdown()
        httpd.server_close()
        agenthub._LOG["json"] = False


def test_keep_alive_blocking_queries_answered_before_or_after_parking_are_each_answered_once(make_app):
    """A wait so short that the Watchers thread answers while the worker is still in the route, or
    just after it parked the connection: the client's next request on the same connection goes to
    one worker, once (a connection given back twice used to reach two workers, and one of them
    dropped it)."""
    app = make_app()
    httpd, (host, port) = _serve(app, threads=2)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("PUT", "/v1/event/fire/held", b"")
        conn.getresponse().read()
        conn.request("GET", "/v1/event/list")
        answer = conn.getresponse()
        index, events = answer.headers["X-Consul-Index"], json.loads(answer.read())
        for _ in range(500):
            conn.request("GET", f"/v1/event/list?index={index}&wait=1ms")
            answer = conn.getresponse()
            assert (answer.status, json.loads(answer.read())) == (200, events)
        conn.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_many_keep_alive_clients_pipelining_after_short_blocking_queries_are_each_answered(make_app):
    """Sixty connections each send a blocking query that ends at once and a request behind it, over
    and over: a parked connection is given back by its worker and again by its answer, and only the
    second may hand it on (the first, handled late, once gave it to a second worker or to the
    selector while a worker read from it, and the client waited for ever)."""
    app = make_app()
    httpd, (host, port) = _serve(app, threads=2)
    try:
        call_http(f"http://{host}:{port}", "PUT", "/v1/event/fire/held", b"")
        index = call_http(f"http://{host}:{port}", "GET", "/v1/event/list")[1]["X-Consul-Index"]
        ask = (f"GET /v1/event/list?index={index}&wait=1ms HTTP/1.1\r\nHost: localhost\r\n\r\n"
               "GET /v1/event/list HTTP/1.1\r\nHost: localhost\r\n\r\n").encode()
        answered, failed = [], []

        def client(number):
            try:
                with socket.create_connection((host, port), timeout=10) as sock:
                    answers = sock.makefile("rb")
                    for round_ in range(12):
                        sock.sendall(ask)
                        for _ in range(2):
                            status, body = _read_answer(answers)     # (a cut body would not parse)
                            assert status.startswith(b"HTTP/1.1 200") and isinstance(json.loads(body), list)
                            answered.append(number)
                        time.sleep(random.random() / 10)      # idle, as agents are between polls
            except Exception as exc:
                failed.append(repr(exc))
        threads = [threading.Thread(target=client, args=(number,)) for number in range(60)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failed == [] and len(answered) == 60 * 12 * 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def _read_answer(answers):
    """Status line and body of one HTTP/1.1 answer read from a socket file."""
    status, length = answers.readline(), 0
    while (line := answers.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, answers.read(length)


def _large_answers(host, port):
    """Fill a hub's ring (``event_max_bytes=20000``) with large events; return a connection and a
    blocking query that parks on the ring (answered with ~6.5 MB, more than loopback sockets hold)."""
    feeder = http.client.HTTPConnection(host, port, timeout=10)
    for _ in range(256):
        feeder.request("PUT", "/v1/event/fire/big", b"x" * 19000)
        assert feeder.getresponse().read()
    feeder.request("GET", "/v1/event/list")
    answer = feeder.getresponse()
    index = answer.headers["X-Consul-Index"]
    assert len(answer.read()) > 6000000
    return feeder, f"GET /v1/event/list?index={index}&wait=60s HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def _parked_slow_reader(host, port, ask):
    """A client with a small receive buffer that sends ``ask`` and reads nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(ask)
    return sock


def test_a_graceful_shutdown_finishes_a_large_answer_its_watcher_reads_late(make_app):
    """Stopping answers the parked watchers (as Consul does on leave); the rest of an answer the
    socket did not take counts as in flight, so the shutdown waits for it (--shutdown-grace)
    instead of closing the connection halfway through."""
    app = make_app(event_max_bytes=20000, shutdown_grace=20)
    httpd, (host, port) = _serve(app, threads=2)
    feeder, ask = _large_answers(host, port)
    feeder.close()
    sock = _parked_slow_reader(host, port, ask)
    assert _wait_for(lambda: app.hub.watchers.parked() == 1)
    stopping = threading.Thread(target=agenthub.graceful_shutdown, args=(app, httpd, "test"))
    stopping.start()
    assert _wait_for(lambda: app.hub.watchers.parked() == 0 and httpd.in_flight == 1)
    assert stopping.is_alive()                                  # waiting for the answer to go out
    sock.settimeout(20)
    status, body = _read_answer(sock.makefile("rb"))
    assert status.startswith(b"HTTP/1.1 200") and len(json.loads(body)) == 256
    stopping.join(20)
    assert not stopping.is_alive() and httpd.in_flight == 0
    sock.close()


def test_watchers_that_do_not_read_their_answers_hold_up_no_other_watcher_and_no_worker(make_app):
    """The Watchers thread writes what a socket takes at once; the selector writes the rest of a
    large answer as its client reads it.  Writing all of it there held every other watcher back
    for the socket's timeout (60 s); writing it on a worker held the workers."""
    app = make_app(event_max_bytes=20000)
    httpd, (host, port) = _serve(app, threads=2)
    try:
        feeder, ask = _large_answers(host, port)
        stalled = []
        for number in range(1, 4):                               # more of them than workers
            stalled.append(_parked_slow_reader(host, port, ask))  # parked first, answered first: not read
            assert _wait_for(lambda: app.hub.watchers.parked() == number)
        reader = socket.create_connection((host, port), timeout=20)
        reader.sendall(ask)
        assert _wait_for(lambda: app.hub.watchers.parked() == 4)
        feeder.request("PUT", "/v1/event/fire/big", b"y")
        assert feeder.getresponse().read()
        status, body = _read_answer(reader.makefile("rb"))      # answered, though the others are not read
        assert status.startswith(b"HTTP/1.1 200") and len(json.loads(body)) == 256
        feeder.request("GET", "/v1/event/list?name=none")       # and the workers are free
        assert feeder.getresponse().read() == b"[]"
        assert _wait_for(lambda: httpd.in_flight == 3)           # a graceful shutdown waits for these answers
        for sock in stalled:
            sock.settimeout(20)
            answers = sock.makefile("rb")
            assert _read_answer(answers) == (status, body)       # the whole answer, when it reads at last
            sock.sendall(b"GET /v1/event/list?name=none HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _read_answer(answers) == (status, b"[]")      # ... and its connection still serves
            sock.close()
        assert _wait_for(lambda: httpd.in_flight == 0)
        reader.close()
        feeder.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_version_flag(capsys):
    assert agenthub.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"agenthub {agenthub.__version__}"


def test_backup_of_a_live_hub_restores_to_a_hub_serving_the_same_jobs(tmp_path, make_app, capsys):
    path = str(tmp_path / "live.db")
    app = make_app(db=path)
    test = webtest.TestApp(app)
    owner = Client(app, token_headers(app, "contributor", "owner"))
    owner.put_json("/v1/secrets/owner/db/pass", {"value": "hunter2"})
    first = [submit(test) for _ in range(20)]
    stop, written = threading.Event(), []

    def writer():                                      # the hub keeps taking writes meanwhile
        client = webtest.TestApp(app)
        while not stop.is_set():
            written.append(submit(client))
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert _wait_for(lambda: len(written) > 5)
        assert agenthub.main(["backup", str(tmp_path / "copy.db"), "--db", path]) == 0
    finally:
        stop.set()
        thread.join()
    printed = capsys.readouterr().out
    assert "integrity ok" in printed and f"key: {tmp_path / 'copy.db'}.key" in printed
    assert os.stat(tmp_path / "copy.db").st_mode & 0o777 == 0o600
    assert agenthub.main(["backup", str(tmp_path / "copy.db"), "--db", path]) == 1     # never overwrites
    # Restoring over the served database is refused; into a fresh place it works.
    assert agenthub.main(["restore", str(tmp_path / "copy.db"), "--db", path]) == 1
    assert "already served by" in capsys.readouterr().err
    restored = str(tmp_path / "restored.db")
    assert agenthub.main(["restore", str(tmp_path / "copy.db"), "--db", restored]) == 0
    assert "integrity ok" in capsys.readouterr().out
    assert agenthub.main(["restore", str(tmp_path / "copy.db"), "--db", restored]) == 1    # holds jobs now
    assert "--force" in capsys.readouterr().err
    again = make_app(db=restored)
    copy = webtest.TestApp(again)
    ids = {j["job_id"] for j in copy.get("/v1/job/search?state=waiting").json}
    assert set(first) <= ids and len(ids) >= 20 + 5 and ids <= set(first) | set(written)
    # The key came along: the secrets it encrypted still open.
    assert again.hub.secrets.resolve("owner", {"P": "db/pass"}) == {"P": "hunter2"}


def test_restore_refuses_what_is_not_a_sound_backup(tmp_path, capsys):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert agenthub.main(["restore", str(junk), "--db", str(tmp_path / "x.db")]) == 1
    assert "not a usable database" in capsys.readouterr().err
    assert agenthub.main(["backup", str(tmp_path / "y.db"), "--db", str(tmp_path / "none.db")]) == 1


def test_options_may_come_before_the_command(tmp_path, capsys):
    db = str(tmp_path / "h.db")
    assert agenthub.main(["--db", db, "add-client", "early", "--role", "manager"]) == 0
    assert "role: manager" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        agenthub.main(["serve", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: agenthub serve") and "unrecognized arguments: --bogus" in err


def test_the_openapi_document_is_valid_and_names_every_route(app, anon):
    from openapi_spec_validator import validate
    doc = anon.get("/openapi.json").json
    validate(doc)                                            # against the OpenAPI 3.1 schema
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    for route in app.routes:
        path, _ = agenthub._openapi_path(route.rule)
        methods = {m for p, m in operations if p == path}
        assert methods, f"{route.rule} is missing"
        assert route.method == "ANY" or route.method.lower() in methods, (route.method, route.rule)
    # Made from the schemas that validate: what POST /v1/job refuses is what the document says.
    job = doc["paths"]["/v1/job"]["post"]
    schema = job["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["job_queue"] and schema["properties"]["job_queue"]["minLength"] == 1
    assert schema["additionalProperties"] is False and "Roles: admin, manager, contributor." in job["description"]
    log = doc["paths"]["/v1/result/{job_id}/log/{log_type}"]["get"]
    assert {p["name"] for p in log["parameters"]} == {"job_id", "log_type", "start_fragment", "start_timestamp",
                                                      "phase", "attempt"}
    assert [p for p in log["parameters"] if p["name"] == "log_type"][0]["schema"]["enum"] == ["output", "serial"]
    assert doc["paths"]["/v1/event/fire/{name}"]["put"]["responses"]["4XX"]["content"]["text/plain"]
    assert anon.post_json("/v1/job", {"job_queue": ""}, status=422).json["detail"]["json"]["job_queue"]


def test_the_docs_page_lists_every_operation_offline(anon):
    doc = anon.get("/openapi.json").json
    page = anon.get("/docs")
    assert page.content_type == "text/html" and "default-src 'none'" in page.headers["Content-Security-Policy"]
    for path, item in doc["paths"].items():
        for method in item:
            assert f'<span class="m {method}">{method.upper()}</span> <code>{path}</code>' in page.text
    assert "<script" not in page.text and "http://" not in page.text.replace("http://www.w3.org", "")


def test_a_queue_name_with_slashes_links_to_its_page(app, anon, agent):
    for name in ("team/lab", "odd/", "a b?c#d"):
        submit(anon, job_queue=name)
        listing = anon.get("/queues")
        page = listing.click(href="/queues/" + urllib.parse.quote(name, safe="") + "$")
        assert f"<h1>Queue {html_escape(name)}</h1>" in page.text


# -- the web pages a lab lives in (issue 17) ----------------------------------------------------------

def seed_lab(app):
    """A hub with passed, failed, provision-failed, cancelled, running and waiting jobs; idle, building and
    lost agents; and a day of history (queue samples, agent state changes, jobs finished through the day)."""
    anon = webtest.TestApp(app)
    agents = {}
    for name in ("idle-1", "busy-1", "lost-1"):
        agents[name] = Client(app, {**token_headers(app, "agent", name), "Cookie": f"agent_name={name}"})
        agents[name].post_json(f"/v1/agents/data/{name}", {"state": "waiting", "queues": ["lab"]})
    runner = agents["busy-1"]
    outcomes = {"passed": {"setup": 0, "provision": 0, "test": 0}, "failed": {"setup": 0, "provision": 0, "test": 1},
                "provision": {"setup": 0, "provision": 3}}
    ids = {}
    for key, status in outcomes.items():
        ids[key] = submit(anon, job_queue="lab", name=f"{key} job")
        runner.get("/v1/job?queue=lab")
        runner.post_json(f"/v1/result/{ids[key]}", {"job_state": "complete", "status": status})
    ids["cancelled"] = submit(anon, job_queue="lab", name="cancelled job")
    anon.post_json(f"/v1/job/{ids['cancelled']}/action", {"action": "cancel"})
    ids["running"] = submit(anon, job_queue="lab", name="running job")
    runner.get("/v1/job?queue=lab")
    runner.post_json(f"/v1/result/{ids['running']}", {"job_state": "test", "status": {"setup": 0}})
    ids["waiting"] = submit(anon, job_queue="lab", name="waiting job")
    now = time.time()
    with app.hub.db.write() as db:
        # A day of history: finished jobs spread over it, samples every half hour, state changes.
        for hour in range(24):
            job_id = str(uuid.uuid4())
            status = json.dumps({"test": hour % 3 == 0})
            db.execute("INSERT INTO jobs (job_id, created_at, started_at, finished_at, job_queue, state, job_data,"
                       " result_status, agent_name) VALUES (?, ?, ?, ?, 'lab', 'complete', '{}', ?, 'idle-1')",
                       (job_id, now - hour * 3600 - 900, now - hour * 3600 - 600, now - hour * 3600 - 60, status))
        db.executemany("INSERT INTO queue_samples (queue, time, waiting, running) VALUES ('lab', ?, ?, ?)",
                       [(now - n * 1800, (n * 7) % 5, n % 2) for n in range(48)])
        db.executemany("INSERT INTO wait_times (queue, seconds, popped_at) VALUES ('lab', ?, ?)",
                       [((n * 37) % 600, now - n * 1500) for n in range(50)])
        for name in ("idle-1", "busy-1"):
            db.executemany("INSERT INTO agent_states (agent_name, time, state) VALUES (?, ?, ?)",
                           [(name, now - 86400 + n * 3 * 3600, json.dumps(
                               [["Enabled", "Idle", "Idle"], ["Enabled", "Building", "Building"],
                                ["Enabled", "LostContact", "Unknown"]][n % 3])) for n in range(8)])
        db.execute("UPDATE agents SET last_seen_at = ? WHERE name = 'lost-1'", (now - 3600,))
    app.hub.registry.sweep()
    anon.put("/v1/event/fire/deploy", "v1.2.3")
    anon.put("/v1/event/fire/blob", b"\x00\x01bin")
    return ids


def test_web_outcomes_times_and_charts(make_app):
    app = make_app(history_interval=0)
    ids = seed_lab(app)
    anon = webtest.TestApp(app)
    jobs = anon.get("/jobs").text
    badges = dict(re.findall(r'<tr><td><a href="/jobs/([0-9a-f-]{36})">.*?data-outcome="([\w-]+)"', jobs, re.S))
    assert badges[ids["passed"]] == "passed" and badges[ids["failed"]] == "failed"
    assert badges[ids["provision"]] == "provision-failed" and badges[ids["cancelled"]] == "cancelled"
    assert re.search(r'data-outcome="failed">failed in test<', jobs)
    assert re.search(r'<time datetime="[^"]+Z" title="[^"]+Z">(just now|\d+ s ago)</time>', jobs)
    failed = anon.get(f"/jobs/{ids['failed']}").text
    assert 'id="job-outcome" data-outcome="failed">failed in test<' in failed
    assert '<td id="status-test" class="code-bad">1</td>' in failed
    assert 'id="row-reserve" class="empty"' in failed and 'id="serial-log" class="empty"' in failed
    overview = anon.get("/").text
    assert overview.count('<rect x=') > 24 and "Jobs finished per hour" in overview
    assert '<code>lost-1: Enabled / LostContact / Unknown</code>' in overview or "LostContact" in overview
    queue = anon.get("/queues/lab").text
    assert queue.count("<polyline") == 2 and queue.count("<circle") == 50 + 4       # seeded, and 4 real pops
    agent = anon.get("/agents/busy-1").text
    assert agent.count('fill="#3f7fdf"><title>Building') >= 2 and 'id="history"' in agent
    week = anon.get("/agents/busy-1?days=7").text
    assert "State, last 7 days" in week
    events = anon.get("/events").text
    assert "base64:AAFiaW4=" in events and "v1.2.3" in events
    assert "data-live=\"5\"" in overview and "X-Agenthub-Fragment" in overview
    fragment = anon.get("/jobs", headers={"X-Agenthub-Fragment": "main"}).text
    assert fragment.startswith("<h1>Jobs</h1>") and "<html" not in fragment


@pytest.mark.sqlite_only("a browser test: the pages' data is checked on both engines by WebTest")
def test_browser_pages_at_desk_and_phone_width_in_both_schemes(make_app, tmp_path):
    if _chromium_binary() is None:
        pytest.skip("no chromium on this machine (Debian package 'chromium')")
    app = make_app(history_interval=0)
    ids = seed_lab(app)
    httpd = agenthub.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    shots = os.environ.get("AGENTHUB_SCREENSHOTS", str(tmp_path / "shots"))
    os.makedirs(shots, exist_ok=True)
    browser = Chromium(_chromium_binary(), str(tmp_path / "profile"))
    try:
        page = browser.open("about:blank")
        pages = {"overview": "/", "jobs": "/jobs", "job-failed": f"/jobs/{ids['failed']}", "agents": "/agents",
                 "agent": "/agents/busy-1", "queues": "/queues", "queue": "/queues/lab", "events": "/events",
                 "docs": "/docs"}
        for width in (1280, 390):
            browser.call("Emulation.setDeviceMetricsOverride", page, width=width, height=900, deviceScaleFactor=1,
                         mobile=width < 500)
            for name, path in pages.items():
                browser.call("Page.navigate", page, url=base + path)
                assert _wait_for(lambda: browser.evaluate(
                    page, f"document.readyState === 'complete' && location.pathname === {json.dumps(path)}"))
                for scheme in ("light", "dark"):        # the same page, re-styled without a reload
                    browser.call("Emulation.setEmulatedMedia", page,
                                 features=[{"name": "prefers-color-scheme", "value": scheme}])
                    overflow = browser.evaluate(page, "document.documentElement.scrollWidth - window.innerWidth")
                    assert overflow <= 0, (name, width, scheme, overflow)      # nothing wider than the screen
                    browser.screenshot(page, os.path.join(shots, f"{name}-{width}-{scheme}.png"))
        # A failed job's badge says so, and a list follows a job's change without a reload.
        browser.call("Page.navigate", page, url=base + "/jobs")
        assert _wait_for(lambda: browser.evaluate(page, "document.readyState === 'complete' && location.pathname === '/jobs'"))
        def badge(job_id):
            return (f"((document.querySelector('a[href=\"/jobs/{job_id}\"]') || {{closest: () => null}})"
                    f".closest('tr') || {{querySelector: () => ({{}})}}).querySelector('[data-outcome]').textContent")
        assert browser.evaluate(page, badge(ids["failed"])) == "failed in test"
        running = badge(ids["running"])
        assert browser.evaluate(page, running) == "test"
        agent = Client(app, {**token_headers(app, "agent", "busy-1"), "Cookie": "agent_name=busy-1"})
        agent.post_json(f"/v1/result/{ids['running']}", {"job_state": "complete", "status": {"setup": 0, "test": 0}})
        # The page refreshes every 5 s, and at once when it becomes visible again: say it did.
        browser.evaluate(page, "document.dispatchEvent(new Event('visibilitychange'))")
        assert _wait_for(lambda: browser.evaluate(page, running) == "passed", seconds=20)
        assert browser.evaluate(page, "performance.getEntriesByType('navigation').length") == 1   # never reloaded
    finally:
        browser.close()
        httpd.shutdown()
        httpd.server_close()


def test_backup_and_restore_edges(tmp_path, make_app, capsys):
    path = str(tmp_path / "hub.db")
    make_app(db=path).close()
    assert agenthub.main(["backup", str(tmp_path / "nodir" / "b.db"), "--db", path]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "nodir").exists()
    (tmp_path / "b.db.key").write_text("stale")
    os.chmod(tmp_path / "b.db.key", 0o644)
    assert agenthub.main(["backup", str(tmp_path / "b.db"), "--db", path]) == 0
    assert not (tmp_path / "b.db-wal").exists() and not (tmp_path / "b.db-shm").exists()
    assert os.stat(tmp_path / "b.db.key").st_mode & 0o777 == 0o600
    assert (tmp_path / "b.db.key").read_text() == (tmp_path / "hub.db.key").read_text()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(os.urandom(100000))
    assert agenthub.main(["restore", str(tmp_path / "b.db"), "--db", str(corrupt)]) == 1     # needs --force
    assert agenthub.main(["restore", str(tmp_path / "b.db"), "--db", str(corrupt), "--force"]) == 0
    assert agenthub._integrity(str(corrupt))[2] == "ok"
    other = sqlite3.connect(str(tmp_path / "other.sqlite"))
    other.execute("CREATE TABLE t (x)")
    other.close()
    capsys.readouterr()
    assert agenthub.main(["restore", str(tmp_path / "other.sqlite"), "--db", str(tmp_path / "n.db")]) == 1
    assert "not a sound agenthub backup" in capsys.readouterr().err


def test_operations_edges(make_app, capsys):
    app = make_app(host="0.0.0.0", gocd_webhooks="http://user:pw@127.0.0.1:9/hook?token=abc")
    anon = webtest.TestApp(app)
    assert anon.get("/healthz", headers={"Host": "10.1.2.3:8080"}).json["status"] == "alive"   # probes by IP
    anon.get("/v1/agents/data", headers={"Host": "10.1.2.3:8080"}, status=400)                # the rest: no
    text = anon.get("/metrics").text
    assert 'webhook="http://127.0.0.1:9/hook"' in text and "pw" not in text and "abc" not in text
    agenthub.log('forged" 200 x\u2028next')
    assert 'forged\\x22 200 x\\u2028next' in capsys.readouterr().err
    assert agenthub.main(["serve", "--db", ":memory:", "--metrics-token", ""]) == 1
    assert "--metrics-token is empty" in capsys.readouterr().err
    assert agenthub.main(["serve", "--db", ":memory:", "--log-format", "text", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"agenthub {agenthub.__version__}"


def test_the_agents_page_is_paged(app, anon):
    with app.hub.db.write() as db:
        for n in range(250):
            db.execute("INSERT INTO agents (name, updated_at, pfid, uuid, origin) VALUES (?, 0, ?, ?, 'prefactor')",
                       (f"agent-{n:03d}", agenthub.new_pfid(agenthub.PFID_DEFAULT_PARTITION), str(uuid.uuid4())))
    first = anon.get("/agents").text
    assert "250 agents" in first and "page 1 of 3" in first and "agent-099" in first and "agent-100" not in first
    last = anon.get("/agents?page=3").text
    assert "agent-249" in last and "agent-199" not in last and "next →" not in last
    assert "page 3 of 3" in anon.get("/agents?page=99").text


def test_migrate_copies_an_sqlite_database_into_postgresql(tmp_path, capsys):
    """`agenthub migrate --from hub.db --to postgresql://…`: jobs, results, logs, artifacts, agents,
    clients (who can still log in), secrets (with the key file's key), user events and their order."""
    if not POSTGRES:
        needs_postgres()
    path = str(tmp_path / "hub.db")
    app = create_app(db=path, purge_interval=0, history_interval=0, quiet=True)
    admin = Client(app, token_headers(app, "admin", "boss"))
    agent = Client(app, token_headers(app, "agent", "mover"))
    agent.post_json("/v1/agents/data/mover", {"state": "waiting", "queues": ["m"]})
    admin.put_json("/v1/client-permissions/ci", {"client_secret": "a-long-enough-secret", "role": "contributor"})
    admin.put("/v1/secrets/boss/db/password", json.dumps({"value": "s3cret"}),
              headers={"Content-Type": "application/json"})
    job_id = admin.post_json("/v1/job", {"job_queue": "m", "name": "moved", "tags": ["t"],
                                         "test_data": {"secrets": {"PW": "db/password"}}}).json["job_id"]
    waiting = admin.post_json("/v1/job", {"job_queue": "m"}).json["job_id"]
    popped = agent.get("/v1/job?queue=m").json
    assert popped["job_id"] == job_id and popped["test_data"]["secrets"] == {"PW": "s3cret"}
    agent.post_json(f"/v1/result/{job_id}/log/output", {"fragment_number": 0, "timestamp": "2026-01-01T00:00:00",
                                                         "phase": "test", "log_data": "hello\x00 log"})
    data = os.urandom(3 * 1024 * 1024 + 5)
    agent.post(f"/v1/result/{job_id}/artifact", upload_files=[("file", "a.tgz", data)])
    agent.post_json(f"/v1/result/{job_id}", {"job_state": "complete", "status": {"test": 0}})
    anon = webtest.TestApp(app)
    for n in range(3):
        anon.put("/v1/event/fire/deploy", f"v{n}".encode())
    events_before = anon.get("/v1/event/list").json
    result_before = anon.get(f"/v1/result/{job_id}").json
    app.close()

    schema, url = PgSchemas.take()
    try:
        assert agenthub.main(["migrate", "--from", path, "--to", url]) == 0
        out = capsys.readouterr().out
        assert "copied" in out and "file_chunks 4" in out and f"{path}.key" in out
        with open(path + ".key") as fh:
            key = fh.read().strip()
        moved = create_app(db=url, secret_key=key, purge_interval=0, history_interval=0, quiet=True)
        try:
            anon = webtest.TestApp(moved)
            assert anon.get("/v1/event/list").json == events_before
            after = anon.get(f"/v1/result/{job_id}").json
            assert after == {**result_before, "test_output": "hello\ufffd log"}   # (PostgreSQL text holds no NUL)
            assert anon.get(f"/v1/result/{job_id}/artifact").body == data
            assert anon.get(f"/v1/result/{waiting}").json["job_state"] == "waiting"
            assert [a["name"] for a in anon.get("/v1/agents/data").json] == ["mover"]
            basic = base64.b64encode(b"ci:a-long-enough-secret").decode()
            assert anon.post("/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"}).json["access_token"]
            assert moved.hub.secrets.resolve("boss", {"PW": "db/password"}) == {"PW": "s3cret"}
            new = anon.post_json("/v1/job", {"job_queue": "m"}).json["job_id"]     # ids go on after the copy
            assert anon.get(f"/v1/job/{new}/position").text == "1"
            anon.put("/v1/event/fire/deploy", b"v3")
            last = max(e["LTime"] for e in events_before)
            assert [e["LTime"] for e in anon.get("/v1/event/list").json][-2:] == [last, last + 1]
        finally:
            moved.close()
        assert agenthub.main(["migrate", "--from", path, "--to", url]) == 1         # never into data
        assert "already holds data" in capsys.readouterr().err
    finally:
        PgSchemas.free.append(schema)


def test_a_blocking_query_whose_client_left_frees_its_slot_at_once(make_app):
    """As Consul does: a watcher that disconnects stops counting against its address's limit."""
    app = make_app(max_watchers_per_client=2)
    httpd, (host, port) = _serve(app, threads=2)
    base = f"http://{host}:{port}"
    try:
        index = xor_index(json.loads(call_http(base, "PUT", "/v1/event/fire/gone", b"1")[2])["ID"])
        request = f"GET /v1/event/list?name=gone&index={index}&wait=60s HTTP/1.1\r\nHost: localhost\r\n\r\n"
        for _ in range(3):                           # more than the limit, one after the other
            with socket.create_connection((host, port)) as sock:
                sock.sendall(request.encode())
                assert _wait_for(lambda: app.hub.watchers.parked() == 1)
            assert _wait_for(lambda: app.hub.watchers.parked() == 0)        # gone with its client
        results = {}
        watcher = threading.Thread(target=lambda: results.update(answer=call_http(
            base, "GET", f"/v1/event/list?name=gone&index={index}&wait=30s")))
        watcher.start()
        assert _wait_for(lambda: app.hub.watchers.parked() == 1)
        second = json.loads(call_http(base, "PUT", "/v1/event/fire/gone", b"2")[2])
        watcher.join(timeout=30)
        status, headers, body = results["answer"]
        assert status == 200 and json.loads(body)[-1]["ID"] == second["ID"]
    finally:
        httpd.shutdown()
        httpd.server_close()
