#!/usr/bin/env python3
"""agenthub: one small hub for machines and processes that run jobs.

It speaks existing public HTTP APIs so that their real clients work unchanged:

* a job queue wire-compatible with the Testflinger server (``/v1/job`` …), so the
  real ``testflinger-cli`` and ``testflinger-agent`` submit, run, poll, cancel
  and fetch artifacts through it;
* Consul-style user events (``/v1/event/fire``, ``/v1/event/list``) with
  blocking queries, for py-consul and Consul watches;
* one agent registry behind Prefactor-style agent resources (``/api/v1``),
  Rackspace agent events (``/v2``) and GoCD ``agent-status`` webhooks;
* web pages for people.

The module is read top to bottom in the order data flows through it, like
``bottle.py``: configuration, errors and identifiers, storage (the only place
with SQL), validation, auth, secrets, webhooks, the job queue, the event
buffer, the agent registry, the HTTP boundary (every request passes it before
any API code runs), HTTP sections (one per API), the web UI, the application
factory, the threaded server, the command line and the benchmark.  Every section opens
with a banner comment.

Run it with ``python agenthub.py`` (see ``--help``); embed it with
``create_app(Config(...))``; or serve the lazily built WSGI ``application``.
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import hmac
import html
import http.client
import itertools
import json
import math
import os
import queue
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler

try:                                   # the regular-expression parser (Python 3.11+ / before)
    from re import _parser as _sre_parse
except ImportError:                    # pragma: no cover
    import sre_parse as _sre_parse

import bottle
from bottle import HTTPResponse, request

__version__ = "0.1.0"
PFID_DEFAULT_PARTITION = 123456789     # the partition of the Prefactor documentation's example ids


###############################################################################
# Configuration ###############################################################
###############################################################################

@dataclasses.dataclass
class Config:
    """Everything that can be set from flags or ``AGENTHUB_*`` variables.

    One object, passed to ``create_app``; tests build it directly.
    """

    db: str = ":memory:"
    host: str = "127.0.0.1"
    port: int = 8000
    server: str = "threaded"
    threads: int = 16               # the built-in server's workers (idle connections hold none)
    mmap_mib: int = 256             # SQLite: read this much of the database file through memory mapping; 0: off
    secret_key: str = ""            # signs tokens, encrypts secrets; if empty, kept in "<db>.key"
    require_auth: bool = False      # anonymous requests get 401 instead of "contributor"
    allowed_hosts: str = ""         # Host names answered besides loopback and the bound address ("*": any)
    secure_cookies: bool = False    # mark the web session cookie Secure (also when the request came over https)
    jwt_leeway: int = 5             # seconds of clock skew accepted on tokens
    access_token_seconds: int = 600
    refresh_token_days: int = 6
    retention_days: float = 7.0     # jobs, logs, files, agents, queues expire after this
    purge_interval: float = 600.0   # seconds between purges; 0 disables the purger
    max_json_bytes: int = 16 * 1024 * 1024   # larger JSON bodies answer 413
    quiet: bool = False             # no access log on stderr
    event_buffer_size: int = 256    # user events kept (Consul keeps 256)
    event_max_bytes: int = 512      # name + payload limit of one event (Serf's default)
    event_acl_default: str = "allow"   # policy for event requests without a token: allow | deny
    datacenter: str = "dc1"         # the only ?dc= the event API answers for
    webhook_url: str = ""           # the one base URL job-status webhooks may point at
    webhook_auth: str = ""          # sent as "Authorization: Bearer …" to that webhook
    lost_contact_seconds: float = 300.0   # silence after which an agent is LostContact
    gocd_webhooks: str = ""         # URLs that receive GoCD agent-status notifications
    gocd_webhook_auth: str = ""     # sent as "Authorization: Bearer …" with each notification
    webhook_timeout: float = 3.0    # seconds a job-status webhook may take to answer
    gocd_timeout: float = 5.0       # seconds one GoCD notification attempt may take
    gocd_retry_delays: tuple = (1.0, 4.0)   # waits before the retries of a failed notification
    api_tokens: str = ""            # bearer tokens of /api/v1 (comma-separated); empty: no auth
    rackspace_tokens: str = ""      # X-Auth-Token values of /v2 ("token" or "token:project"); empty: any
    pfid_partition: int = PFID_DEFAULT_PARTITION
    default_environment_id: str = ""   # PFID of agents not created through /api/v1; generated if empty
    activate_ttl: float = 600.0     # seconds an agent_activate mode lasts
    shutdown_grace: float = 10.0    # seconds requests in flight get to finish on SIGTERM/SIGINT
    strand_seconds: float = 60.0    # a job its agent never reported on for this long is reclaimed; 0: never
    provision_retries: int = 0      # a job whose provision failed is queued again (without that agent) this often
    history_interval: float = 300.0   # seconds between the queue samples the pages chart; 0: none
    max_watchers: int = 2048        # blocking event queries in progress at once (more answer 429)
    max_watchers_per_client: int = 256   # … from one client address
    bench_route: bool = False       # mount GET /_bench/ping (a trivial JSON route) for `bench`
    metrics_tokens: str = ""        # bearer tokens GET /metrics needs (comma-separated); empty: see README
    log_format: str = "text"        # text | json: one line per log entry either way

    ENV = {
        "db": "AGENTHUB_DB", "host": "AGENTHUB_HOST", "port": "AGENTHUB_PORT",
        "server": "AGENTHUB_SERVER", "threads": "AGENTHUB_THREADS", "mmap_mib": "AGENTHUB_MMAP_MIB",
        "secret_key": "AGENTHUB_SECRET_KEY",
        "require_auth": "AGENTHUB_REQUIRE_AUTH", "allowed_hosts": "AGENTHUB_ALLOWED_HOSTS",
        "secure_cookies": "AGENTHUB_SECURE_COOKIES", "jwt_leeway": "AGENTHUB_JWT_LEEWAY",
        "access_token_seconds": "AGENTHUB_ACCESS_TOKEN_SECONDS",
        "refresh_token_days": "AGENTHUB_REFRESH_TOKEN_DAYS",
        "retention_days": "AGENTHUB_RETENTION_DAYS",
        "purge_interval": "AGENTHUB_PURGE_INTERVAL",
        "max_json_bytes": "AGENTHUB_MAX_JSON_BYTES", "quiet": "AGENTHUB_QUIET",
        "event_buffer_size": "AGENTHUB_EVENT_BUFFER_SIZE", "event_max_bytes": "AGENTHUB_EVENT_MAX_BYTES",
        "event_acl_default": "AGENTHUB_EVENT_ACL_DEFAULT", "datacenter": "AGENTHUB_DATACENTER",
        "webhook_url": "AGENTHUB_WEBHOOK_URL", "webhook_auth": "AGENTHUB_WEBHOOK_AUTH",
        "lost_contact_seconds": "AGENTHUB_LOST_CONTACT_SECONDS", "gocd_webhooks": "AGENTHUB_GOCD_WEBHOOKS",
        "gocd_webhook_auth": "AGENTHUB_GOCD_WEBHOOK_AUTH", "api_tokens": "AGENTHUB_API_TOKENS",
        "rackspace_tokens": "AGENTHUB_RACKSPACE_TOKENS", "pfid_partition": "AGENTHUB_PFID_PARTITION",
        "default_environment_id": "AGENTHUB_DEFAULT_ENVIRONMENT_ID", "activate_ttl": "AGENTHUB_ACTIVATE_TTL",
        "shutdown_grace": "AGENTHUB_SHUTDOWN_GRACE", "strand_seconds": "AGENTHUB_STRAND_SECONDS",
        "provision_retries": "AGENTHUB_PROVISION_RETRIES", "history_interval": "AGENTHUB_HISTORY_INTERVAL",
        "max_watchers": "AGENTHUB_MAX_WATCHERS", "max_watchers_per_client": "AGENTHUB_MAX_WATCHERS_PER_CLIENT",
        "metrics_tokens": "AGENTHUB_METRICS_TOKENS", "log_format": "AGENTHUB_LOG_FORMAT",
    }

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Build a Config from ``AGENTHUB_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = cls.ENV.get(field.name)
            if name and name in environ:
                values[field.name] = _coerce(field.type, environ[name], name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _coerce(kind, text, name):
    """Turn an environment string into the field's type, or explain why not."""
    try:
        if kind in (bool, "bool"):
            if text.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
        return text
    except ValueError:
        raise SystemExit(f"agenthub: {name}={text!r} is not a valid {getattr(kind, '__name__', kind)}")


###############################################################################
# Errors and identifiers ######################################################
###############################################################################
#
# What every layer below shares: the one clock, the timestamp formats, the
# domain's refusal (ApiError, which each API renders in its own style), the
# limits on what is stored, and the ids (PFIDs, UUIDs).

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1     # what an SQLite INTEGER holds
AGENT_NAME_MAX = 200


def parse_uint(text, high=INT64_MAX):
    """A non-negative integer written in ASCII digits and at most ``high``, else None.
    (``str.isdigit`` also accepts "²", which ``int`` refuses, and ``int`` accepts other scripts.)"""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    value = int(text)
    return value if value <= high else None


def utcnow():
    """The one clock of the program: seconds since the epoch, UTC."""
    return time.time()


def iso(ts, digits=0, zone="Z"):
    """ISO-8601 in UTC with exactly one zone designator: every timestamp the hub writes.

    Seconds and "Z" by default (the original server renders aware datetimes as ``+00:00Z`` in one
    place, which the agent cannot parse); GoCD wants ``digits=3, zone="+0000"``, Rackspace's event
    feed ``digits=6`` and its agents ``zone="+00:00"``.
    """
    if ts is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None          # a time no calendar shows (stored by an older version): shown as unknown
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    return text + zone


def parse_iso(text):
    """Parse an ISO-8601 datetime (naive means UTC) into epoch seconds, or raise ValueError."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    value = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    try:
        # In UTC it must still be a date between years 1 and 9999, or it could never be shown again.
        value.astimezone(datetime.timezone.utc)
        return value.timestamp()
    except (OverflowError, OSError, ValueError):
        raise ValueError("out of range")


class StartupError(Exception):
    """The hub cannot start (a newer schema, a database another process serves): one line, exit 1."""


class ApiError(Exception):
    """A domain rule refused a request: an HTTP status and a message.

    Each HTTP section turns it into its own API's error style.
    """

    def __init__(self, status, message, text=False, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.text, self.code = status, message, text, code
        self.headers = headers or {}


# -- PFIDs: 10 chars of milliseconds, 6 of partition, 16 random, Crockford base32 ------------------

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
PFID_PATTERN = re.compile(r"^[0-7][0-9abcdefghjkmnpqrstvwxyz]{31}$")
UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def _b32(number, width):
    return "".join(CROCKFORD[(number >> (5 * i)) & 31] for i in reversed(range(width)))


def new_pfid(partition, ms=None):
    """A Prefactor id for a given millisecond (now when None), with a random part."""
    ms = int(time.time() * 1000) if ms is None else ms
    return _b32(ms, 10) + _b32(partition, 6) + _b32(secrets.randbits(80), 16)


class PfidClock:
    """K-sortable PFIDs of one hub: ids made in the same millisecond (or with a clock that stepped
    back) continue from the previous random part plus one, so they sort in the order they were made."""

    def __init__(self, partition):
        self.partition, self._last, self._lock = partition, (0, 0), threading.Lock()

    def __call__(self):
        with self._lock:
            ms, rand = int(time.time() * 1000), secrets.randbits(79)
            if ms <= self._last[0]:
                ms, rand = self._last[0], self._last[1] + 1
            self._last = (ms, rand)
        return _b32(ms, 10) + _b32(self.partition, 6) + _b32(rand, 16)


def pfid_partition(pfid):
    """The partition of a valid PFID, or None."""
    if not isinstance(pfid, str) or not PFID_PATTERN.match(pfid):
        return None
    value = 0
    for char in pfid[10:16]:
        value = value * 32 + CROCKFORD.index(char)
    return value


###############################################################################
# Telemetry and logs ##########################################################
###############################################################################
#
# What the hub counts as it runs (read by GET /metrics, rendered in the operations section) and
# how it writes its log lines: one line each, text or JSON (--log-format).

class Tally:
    """Thread-safe counters by label values: ``add(("q1", "waiting"))``; ``items()`` to read."""

    def __init__(self):
        self._lock, self._values = threading.Lock(), {}

    def add(self, labels=(), amount=1):
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def items(self):
        with self._lock:
            return sorted(self._values.items())


class Histogram:
    """Thread-safe cumulative histograms by label values (Prometheus's buckets, sum and count)."""

    def __init__(self, buckets):
        self.buckets, self._lock, self._values = tuple(buckets), threading.Lock(), {}

    def observe(self, value, labels=()):
        with self._lock:
            counts = self._values.get(labels)
            if counts is None:
                counts = self._values[labels] = [0] * len(self.buckets) + [0.0, 0]
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
            counts[-2] += value
            counts[-1] += 1

    def items(self):
        """[(labels, [cumulative count per bucket], sum, count)]."""
        with self._lock:
            return [(labels, list(c[:-2]), c[-2], c[-1]) for labels, c in sorted(self._values.items())]


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400)

_LOG = {"json": False}
_UNPRINTABLE = re.compile(r'[\x00-\x1f\x7f-\x9f\\"\u2028\u2029]')


def _printable(text):
    """A value for a text log line: control characters (a forged line break) escaped."""
    return _UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256 else "\\u%04x" % ord(m.group()),
                            str(text))


def log(message, level="info", stream=None, **fields):
    """One line of the application log on stderr: ``agenthub: message`` or, with --log-format
    json, a JSON object with time, level, message and ``fields``."""
    if _LOG["json"]:
        line = json.dumps({"time": iso(utcnow(), digits=3), "level": level, "message": message, **fields},
                          ensure_ascii=True, default=str)
    elif level == "error" and "Traceback" in message:
        # A traceback stays readable, each line marked so that none can pass for an access line.
        first, *rest = message.rstrip("\n").split("\n")
        line = "agenthub: " + _printable(first) + "".join("\nagenthub: | " + _printable(r) for r in rest)
    else:
        line = "agenthub: " + _printable(message)
    print(line, file=stream or sys.stderr, flush=True)


def access_log(environ, status, seconds, api, route):
    """One line of the access log per answered request."""
    identity = environ.get("agenthub.identity")
    client = getattr(identity, "client_id", None)
    fields = {"request_id": environ.get("agenthub.request_id"), "remote_addr": environ.get("REMOTE_ADDR"),
              "method": environ.get("REQUEST_METHOD"), "path": environ.get("PATH_INFO"),
              "status": status, "duration_ms": round(seconds * 1000, 2), "api": api, "route": route,
              "client_id": client}
    if _LOG["json"]:
        log("request", **fields)
        return
    print(f'{_printable(fields["remote_addr"] or "-")} {_printable(client or "-")} [{iso(utcnow())}] '
          f'"{_printable(fields["method"])} {_printable(fields["path"])}" {status} {fields["duration_ms"]}ms '
          f'{api} {_printable(route)} {fields["request_id"]}', file=sys.stderr, flush=True)


###############################################################################
# Storage #####################################################################
###############################################################################
#
# SQLite is the only store.  Every SQL statement of the program lives in this
# section, and no rule: the domain above decides, the stores only read and
# write.  One ``Database`` owns the connections and the writer; writes are
# serialised by one lock in the process (SQLite allows a single writer anyway,
# and its busy handler stalls for seconds under many writer threads), reads run
# in parallel on pooled WAL connections.  Over it, one store per domain, each a
# method per query: JobStore (jobs, logs, files, queues), AgentStore (the
# registry), DeliveryStore (GoCD deliveries), AuthStore (clients, tokens,
# restricted queues, secrets), EventStore (user events).  These are the seams a
# second storage engine plugs into.

MIGRATIONS = [
    # 1: the Testflinger job queue, its agents and auth.
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- arrival order: the FIFO tie-breaker
        job_id TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        started_at REAL,
        job_priority INTEGER NOT NULL DEFAULT 0,
        job_queue TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'waiting',
        attachments_status TEXT,
        exclude_agents TEXT NOT NULL DEFAULT '[]',
        client_id TEXT,
        job_data TEXT NOT NULL,                      -- the validated submission, as JSON
        result_status TEXT NOT NULL DEFAULT '{}',    -- {phase: exit code}
        device_info TEXT,
        agent_name TEXT                              -- who popped it
    );
    CREATE INDEX jobs_pop ON jobs (state, job_queue, job_priority DESC, seq);
    CREATE INDEX jobs_queue ON jobs (job_queue, seq);
    CREATE TABLE log_fragments (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        log_type TEXT NOT NULL,
        phase TEXT NOT NULL,
        fragment_number INTEGER NOT NULL,
        timestamp REAL NOT NULL,
        log_data TEXT NOT NULL,
        inserted_at REAL NOT NULL
    );
    CREATE INDEX log_fragments_job ON log_fragments (job_id, log_type, fragment_number);
    CREATE INDEX log_fragments_inserted ON log_fragments (inserted_at);
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,                          -- 'artifact' | 'attachments'
        size INTEGER NOT NULL DEFAULT 0,
        complete INTEGER NOT NULL DEFAULT 0,         -- 0 while the upload streams in
        uploaded_at REAL NOT NULL
    );
    CREATE INDEX files_job ON files (job_id, kind, complete, id);
    CREATE TABLE file_chunks (
        file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (file_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        state TEXT, queues TEXT, location TEXT, job_id TEXT, provision_type TEXT,
        identifier TEXT, comment TEXT,
        log TEXT NOT NULL DEFAULT '[]',
        provision_streak_type TEXT, provision_streak_count INTEGER,
        updated_at REAL NOT NULL
    );
    CREATE TABLE provision_logs (
        id INTEGER PRIMARY KEY,
        agent_name TEXT NOT NULL, job_id TEXT NOT NULL, exit_code INTEGER NOT NULL,
        detail TEXT, timestamp REAL NOT NULL
    );
    CREATE INDEX provision_logs_agent ON provision_logs (agent_name, id);
    CREATE TABLE advertised_queues (name TEXT PRIMARY KEY, description TEXT NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE queue_images (queue TEXT PRIMARY KEY, images TEXT NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE wait_times (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, seconds REAL NOT NULL, popped_at REAL NOT NULL);
    CREATE INDEX wait_times_queue ON wait_times (queue);
    CREATE TABLE restricted_queues (name TEXT PRIMARY KEY);
    CREATE TABLE clients (
        client_id TEXT PRIMARY KEY,
        secret_hash TEXT,
        role TEXT NOT NULL DEFAULT 'contributor',
        max_priority TEXT, allowed_queues TEXT, max_reservation_time TEXT, email TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE refresh_tokens (
        token_hash TEXT PRIMARY KEY,                 -- sha256 of the token: the db never holds it
        client_id TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
        issued_at REAL NOT NULL, expires_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        last_accessed REAL NOT NULL
    );
    """,
    # 2: Consul-style user events (the ring buffer survives restarts) and their ACL tokens.
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        payload BLOB,
        node_filter TEXT NOT NULL DEFAULT '',
        service_filter TEXT NOT NULL DEFAULT '',
        tag_filter TEXT NOT NULL DEFAULT '',
        ltime INTEGER NOT NULL,
        fired_at REAL NOT NULL
    );
    CREATE TABLE event_tokens (
        name TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,             -- sha256 of the secret
        read_prefixes TEXT NOT NULL DEFAULT '[]',
        write_prefixes TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL
    );
    """,
    # 3: the secrets store (values encrypted with a key that is not in the database).
    """
    CREATE TABLE secrets (
        client_id TEXT NOT NULL,
        path TEXT NOT NULL,
        value BLOB NOT NULL,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        expires_at REAL,
        created_at REAL NOT NULL,
        PRIMARY KEY (client_id, path)
    );
    """,
    # 4: the one agent registry (Testflinger, Prefactor, Rackspace, GoCD) — see _migrate_registry.
    lambda db, ddl: _migrate_registry(db, ddl),
    # 5: jobs handed out that never reached their agent (JobQueue.reclaim_stranded)
    """
    ALTER TABLE jobs ADD COLUMN strands INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: server-side web sessions; idempotency rows of earlier versions named the caller's token
    # in plain text (rows now hold hashes only): they are dropped (they live a day anyway).
    """
    CREATE TABLE web_sessions (
        id_hash TEXT PRIMARY KEY,                    -- sha256 of the cookie's value
        client_id TEXT NOT NULL, created_at REAL NOT NULL, last_seen_at REAL NOT NULL, expires_at REAL NOT NULL
    );
    CREATE INDEX web_sessions_client ON web_sessions (client_id);
    DELETE FROM idempotency;
    """,
    # 7: what the Testflinger server gained after 1.5.0 (spec testflinger-2026.md) and agenthub's
    # attempts: a job re-queued (re-submitted when finished, or retried after a failed provision)
    # keeps one row in ``jobs`` for its current attempt; earlier ones move to ``job_attempts``, and
    # their logs and artifacts stay, numbered by attempt.
    """
    ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN finished_at REAL;
    ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;   -- provision retries used so far
    ALTER TABLE log_fragments ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE files ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE provision_logs ADD COLUMN client_id TEXT;             -- who submitted the job
    ALTER TABLE provision_logs ADD COLUMN recorded_by TEXT NOT NULL DEFAULT 'agent';   -- 'agent' | 'result'
    ALTER TABLE provision_logs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;          -- of the job
    CREATE INDEX jobs_finished ON jobs (job_queue, finished_at);
    CREATE TABLE job_attempts (
        job_id TEXT NOT NULL, attempt INTEGER NOT NULL,
        created_at REAL NOT NULL, started_at REAL, finished_at REAL, state TEXT NOT NULL,
        job_queue TEXT NOT NULL, agent_name TEXT, client_id TEXT, job_data TEXT NOT NULL,
        result_status TEXT NOT NULL, device_info TEXT, strands INTEGER NOT NULL,
        ended_by TEXT NOT NULL,                      -- what started the next attempt: resubmitted | retried
        PRIMARY KEY (job_id, attempt)
    ) WITHOUT ROWID;
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL, attempt INTEGER NOT NULL,
        event_name TEXT NOT NULL, timestamp REAL NOT NULL, message TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '', status INTEGER, phase TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id, id);
    """,
    # 8: the history the pages chart: queues sampled every few minutes, each agent's state changes.
    """
    CREATE TABLE queue_samples (queue TEXT NOT NULL, time REAL NOT NULL, waiting INTEGER NOT NULL,
                                running INTEGER NOT NULL);
    CREATE INDEX queue_samples_queue ON queue_samples (queue, time);
    CREATE TABLE agent_states (id INTEGER PRIMARY KEY,
                               agent_name TEXT NOT NULL REFERENCES agents (name) ON UPDATE CASCADE ON DELETE CASCADE,
                               time REAL NOT NULL, state TEXT NOT NULL);   -- the announced GoCD tuple, as JSON
    CREATE INDEX agent_states_agent ON agent_states (agent_name, time);
    CREATE INDEX jobs_finished_at ON jobs (finished_at);
    CREATE INDEX wait_times_popped ON wait_times (queue, popped_at);
    CREATE INDEX jobs_agent ON jobs (agent_name, state, started_at);   -- an agent's old running jobs, every poll
    """,
    # 9: the GoCD notifications' outbox: written with the change they tell of, delivered once, in order.
    """
    CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_url TEXT NOT NULL, delivery_uuid TEXT NOT NULL,
                         agent_name TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL);
    CREATE INDEX outbox_webhook ON outbox (webhook_url, id);
    """,
]

REGISTRY_SQL = """
    ALTER TABLE agents ADD COLUMN pfid TEXT;
    ALTER TABLE agents ADD COLUMN uuid TEXT;
    ALTER TABLE agents ADD COLUMN origin TEXT NOT NULL DEFAULT 'testflinger';
    ALTER TABLE agents ADD COLUMN tf INTEGER NOT NULL DEFAULT 1;       -- has a Testflinger record
    ALTER TABLE agents ADD COLUMN description TEXT;
    ALTER TABLE agents ADD COLUMN external_identifier TEXT;
    ALTER TABLE agents ADD COLUMN environment_id TEXT;
    ALTER TABLE agents ADD COLUMN current_version_id TEXT;
    ALTER TABLE agents ADD COLUMN current_schema_version_id TEXT;
    ALTER TABLE agents ADD COLUMN project_id TEXT;
    ALTER TABLE agents ADD COLUMN retired INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_seen_at REAL;
    ALTER TABLE agents ADD COLUMN shutdown_at REAL;
    ALTER TABLE agents ADD COLUMN last_ip TEXT;
    ALTER TABLE agents ADD COLUMN activation_mode TEXT;
    ALTER TABLE agents ADD COLUMN activation_expires_at REAL;
    ALTER TABLE agents ADD COLUMN gocd_tuple TEXT;                      -- last announced state
    ALTER TABLE agents ADD COLUMN inserted_at REAL;
    ALTER TABLE agents ADD COLUMN record_updated_at REAL;               -- Prefactor's updated_at
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        pfid TEXT NOT NULL UNIQUE,
        agent_name TEXT NOT NULL REFERENCES agents (name) ON UPDATE CASCADE ON DELETE CASCADE,
        source TEXT NOT NULL,                        -- 'testflinger' (a job) | 'prefactor'
        job_id TEXT,
        environment_id TEXT NOT NULL,
        agent_version_id TEXT,
        status TEXT NOT NULL,                        -- pending active complete failed cancelled
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        inserted_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL
    );
    CREATE INDEX instances_agent ON instances (agent_name, status);
    CREATE INDEX instances_job ON instances (job_id);
    CREATE TABLE agent_versions (
        pfid TEXT PRIMARY KEY,
        agent_name TEXT NOT NULL REFERENCES agents (name) ON UPDATE CASCADE ON DELETE CASCADE,
        digest TEXT NOT NULL,                        -- sha256 of the registered version bodies
        schema_pfid TEXT NOT NULL,
        UNIQUE (agent_name, digest)
    );
    CREATE TABLE rackspace_events (
        id INTEGER PRIMARY KEY,
        agent_name TEXT NOT NULL REFERENCES agents (name) ON UPDATE CASCADE ON DELETE CASCADE,
        project_id TEXT NOT NULL, event TEXT NOT NULL, mode TEXT, request_id TEXT NOT NULL, time REAL NOT NULL
    );
    CREATE INDEX rackspace_events_agent ON rackspace_events (agent_name, id);
    CREATE INDEX rackspace_events_project ON rackspace_events (project_id, id);
    CREATE TABLE idempotency (
        scope TEXT NOT NULL, key TEXT NOT NULL, status INTEGER NOT NULL, body TEXT NOT NULL,
        created_at REAL NOT NULL, PRIMARY KEY (scope, key)
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        delivery_uuid TEXT NOT NULL, webhook_url TEXT NOT NULL, agent_name TEXT NOT NULL,
        body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL,                       -- success failure error expired undelivered
        http_status INTEGER, response_body TEXT, messages TEXT,
        created_at REAL NOT NULL, finished_at REAL NOT NULL
    );
    CREATE INDEX deliveries_webhook ON deliveries (webhook_url, id);
    CREATE INDEX deliveries_agent ON deliveries (agent_name, id);
    CREATE TABLE health (
        scope TEXT PRIMARY KEY, message TEXT NOT NULL, detail TEXT NOT NULL, level TEXT NOT NULL, time REAL NOT NULL
    );
"""


def _migrate_registry(db, ddl):
    """Turn the Testflinger agents table into the registry; existing agents get their ids."""
    for statement in _split_sql(REGISTRY_SQL):
        db.execute(ddl(statement))
    for row in db.execute("SELECT name, updated_at FROM agents").fetchall():
        db.execute("UPDATE agents SET pfid = ?, uuid = ?, inserted_at = ?, record_updated_at = ? WHERE name = ?",
                   (new_pfid(PFID_DEFAULT_PARTITION, int(row[1] * 1000)), str(uuid.uuid4()), row[1], row[1],
                    row[0]))
    db.execute("CREATE UNIQUE INDEX agents_pfid ON agents (pfid)")
    db.execute("CREATE UNIQUE INDEX agents_uuid ON agents (uuid)")


CHUNK_SIZE = 1024 * 1024   # bytes per stored file chunk and per streamed read


def _read_text(data):
    return data.decode("utf-8", "backslashreplace")


def private_files(path):
    """The database holds hashes, sealed secrets and job data: only its owner may read it.  A new
    file is created 0600 (SQLite gives its -wal and -shm files the database file's mode); group
    and other bits are taken off an existing database and its -wal/-shm files."""
    with contextlib.suppress(OSError):        # a missing directory is reported when SQLite opens it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):
            mode = os.stat(name).st_mode
            if mode & 0o077:
                os.chmod(name, mode & 0o700)


def open_database(url, threads=16, mmap_mib=0):
    """The Database for ``--db``: a ``postgresql://`` URL selects PostgreSQL (its pool sized for
    ``threads`` request threads and the hub's own), anything else is an SQLite file (or ``:memory:``)
    whose first ``mmap_mib`` MiB are read through memory mapping."""
    if is_postgres_url(url):
        return PostgresDatabase(url, pool_size=threads + 16)
    return Database(url, mmap_mib)


def is_postgres_url(url):
    return isinstance(url, str) and url.startswith(("postgresql://", "postgres://"))


class _Batch:
    """Writers sharing one SQLite transaction and its commit (``Database._write_grouped``)."""

    def __init__(self, conn):
        self.conn, self.size, self.hooks = conn, 0, []
        self.broken = None                 # an error that lost the whole transaction
        self.error = None                  # why the commit failed (after ``done``)
        self.done = threading.Event()


class Database:
    """The SQLite database (the embedded default engine): a pool of connections, ``write()``
    and the migrations.

    A file database gets WAL connections from a pool that grows on demand;
    ``:memory:`` is a single connection (an in-memory database is private to
    its connection) guarded like a pool of one.  ``write()`` is the one way
    to change data: it takes the process-wide writer lock and wraps the block
    in ``BEGIN IMMEDIATE … COMMIT``, so every multi-step change is one
    transaction.

    The few fragments of SQL that differ between engines are methods here
    (``in_list``, ``json_has``, …), overridden by PostgresDatabase; every
    other statement of this section is written once for both.
    """

    engine = "sqlite"
    BEGIN = ("BEGIN IMMEDIATE",)
    errors = (sqlite3.Error,)            # what a failing database raises (the loops survive these)
    skip_locked = ""                     # SQLite's single writer already hands each row out once
    same_as = "IS ?"                     # equal, NULL included (IS NOT DISTINCT FROM needs SQLite 3.39)
    single_process = True                # one server per file (ProcessLock): in-process caches are safe

    def __init__(self, path, mmap_mib=0):
        self._common(path)
        self.memory = path in (":memory:", "")
        self.mmap_bytes = max(0, min(int(mmap_mib), 1 << 20)) * 1024 * 1024    # at most 1 TiB
        self._idle = queue.LifoQueue()
        self._size = threading.BoundedSemaphore(1) if self.memory else None
        if not self.memory:
            private_files(path)
        self._migrate()

    def _common(self, path):
        """What every engine's Database holds besides its connections."""
        self.path = path
        self._write_lock = threading.Lock()
        self._batch, self._waiting, self._waiting_lock = None, 0, threading.Lock()   # group commit (SQLite)
        self._local = threading.local()          # the connection this thread holds, and whether it writes
        self._closed = False
        self._full = False                       # in a disk-full episode (logged once)
        self.write_seconds = Histogram(LATENCY_BUCKETS)     # time each write transaction held the writer

    def _migrate(self):
        with self.write() as db:
            version = self.schema_version(db)
            if version > len(MIGRATIONS):
                raise StartupError(f"database schema {version} is newer than this agenthub ({len(MIGRATIONS)}); "
                                   "upgrade agenthub")
            for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
                if callable(step):
                    step(db, self.ddl)
                else:
                    for statement in _split_sql(step):
                        db.execute(self.ddl(statement))
                self.set_schema_version(db, number)

    # -- what differs between the engines ---------------------------------------------------------
    def schema_version(self, db):
        return db.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, db, number):
        db.execute(f"PRAGMA user_version = {int(number)}")

    @staticmethod
    def ddl(statement):
        """A migration statement as this engine takes it (the migrations are written for SQLite)."""
        return statement

    @staticmethod
    def in_list(column):
        """``column`` is one of the values of a ``?`` bound to ``list_value(values)``."""
        return f"{column} IN (SELECT value FROM json_each(?))"

    @staticmethod
    def list_value(values):
        return json.dumps(list(values))

    @staticmethod
    def json_has(column, value="?"):
        """The JSON array stored in ``column`` holds ``value`` (false for NULL)."""
        return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE value = {value})"

    @staticmethod
    def json_elements(column, key):
        """A table of the elements (as ``value``) of the array at ``key`` of the JSON in ``column``."""
        return f"json_each({column}, '$.{key}')"

    @staticmethod
    def json_text(column, key):
        return f"json_extract({column}, '$.{key}')"

    @staticmethod
    def utf8_length(column):
        return f"length(CAST({column} AS BLOB))"

    @staticmethod
    def utf8_bytes(column):
        return f"CAST({column} AS BLOB)"

    def notify(self, db, channel):
        """Tell the other processes of this database, at commit, that ``channel`` moved (none here)."""

    def lock_events(self, db):
        """Serialise the transactions that add user events, to their commit (SQLite: its one writer)."""

    def hold(self, name):
        """A hold on ``name`` that one process at a time has (``acquire()`` is True while this one
        does; ``release()``).  One process per SQLite file: always this one."""
        return _Hold()

    def listen(self, channel, stop, changed):
        """Call ``changed()`` whenever another process notifies ``channel``, until ``stop`` is set
        (PostgreSQL; one process per SQLite file needs none)."""

    def _open(self):
        conn = sqlite3.connect(":memory:" if self.memory else self.path,
                               isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        # Text that is not UTF-8 (SQLite's JSON functions turn a JSON "\ud800" into such bytes, and
        # older agenthub versions stored it) reads back with its bad bytes escaped, never an error.
        conn.text_factory = _read_text
        conn.execute("PRAGMA foreign_keys = ON")
        if not self.memory:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Reads of the file's pages become copies from the page cache instead of a system call
            # per 4 KiB page (an artifact download reads 256 pages per MiB): several times faster.
            # The price, as SQLite documents: a disk that fails to read a page ends the process
            # (SIGBUS) instead of answering 503.  Mapped pages count in the RSS (they are the
            # kernel's page cache, not the process's memory); --mmap-mib 0 turns this off.
            conn.execute(f"PRAGMA mmap_size = {self.mmap_bytes}")
        return conn

    @contextlib.contextmanager
    def connection(self):
        """Borrow a connection for the length of the block.  A thread that already holds one gets
        the same one again, so a read inside a write sees the write and never waits for a second
        connection (the same on ``:memory:``, a pool of one, as on a file)."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        if self._closed:
            raise ApiError(503, "agenthub is shutting down")
        conn = self._acquire()
        self._local.conn = conn
        try:
            yield conn
        finally:
            self._local.conn = None
            self._release(conn)

    def _acquire(self):
        if self._size is not None:
            self._size.acquire()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            try:
                return self._open()
            except BaseException:
                if self._size is not None:
                    self._size.release()
                raise

    def _release(self, conn):
        try:
            if conn.in_transaction:
                conn.rollback()
            if self._closed or (not self.memory and self._idle.qsize() >= 32):
                if not self.memory:
                    conn.close()
            else:
                self._idle.put(conn)
        finally:
            if self._size is not None:
                self._size.release()

    GROUP = 16          # SQLite: up to this many writers' transactions share one commit (0: none)

    @contextlib.contextmanager
    def write(self, exclusive=True):
        """One write transaction, serialised with every other writer.  A write inside a write
        joins it: the steps of one domain operation commit (or roll back) together.

        On SQLite, writers that queue up behind each other share a commit (``_write_grouped``):
        a commit writes the WAL pages every writer touches (the job table, its indexes, the event
        ring), so one commit for several of them costs little more than one for each.

        ``exclusive=False`` (a pop): on a database several processes share, this transaction does
        not wait for the other processes' writers; it relies on row locks instead (SKIP LOCKED for
        the job, the rows it updates, the event lock of ``lock_events``).  SQLite has one writer."""
        if getattr(self._local, "writing", False):
            yield self._local.conn
            return
        if self.GROUP and not self.memory:
            with self._write_grouped() as conn:
                yield conn
            return
        # A shared database's non-exclusive transaction (a pop) does not wait for this process's
        # other writers either: its row locks are its serialisation.
        lock = self._write_lock if exclusive or self.single_process else contextlib.nullcontext()
        # ``:memory:`` has one connection: a writer takes it before the writer lock, as a thread
        # that reads, then writes, does (the other order deadlocks the two).  It has no group
        # commit either: a writer holds the only connection until it commits.
        with contextlib.ExitStack() as held:
            if self.memory:
                conn = held.enter_context(self.connection())
            held.enter_context(lock)
            if not self.memory:
                conn = held.enter_context(self.connection())
            self._local.writing, self._local.hooks = True, []
            try:
                try:
                    began = time.perf_counter()
                    for statement in (self.BEGIN if exclusive else self.BEGIN[:1]):
                        conn.execute(statement)
                    try:
                        yield conn
                    except BaseException:
                        conn.rollback()
                        raise
                    conn.commit()
                    self.write_seconds.observe(time.perf_counter() - began)
                except self.errors as exc:
                    raise self._refused(exc)
                self._writes_again()
            finally:
                self._local.writing = False
                hooks, self._local.hooks = self._local.hooks, []
            self._run_hooks(hooks)       # committed (a rollback raised above and skipped them)

    @contextlib.contextmanager
    def _write_grouped(self):
        """SQLite's writer, with group commit.  The first writer to take the writer lock begins
        the transaction (a *batch*).  When it is done and others wait for the lock, it does not
        commit: it hands the open transaction to the next one, which joins it in a savepoint (its
        failure undoes only its own steps), and so on, up to GROUP writers; the last commits for
        all of them, runs their after-commit hooks in order, and wakes them.  Nobody returns
        before the commit that holds its change, and a failed commit fails every writer in it."""
        with self._waiting_lock:
            self._waiting += 1
        self._write_lock.acquire()
        with self._waiting_lock:
            self._waiting -= 1
        locked, held, began = True, getattr(self._local, "conn", None), time.perf_counter()
        borrowed = contextlib.ExitStack()      # the first writer's connection, kept until the commit
        try:
            batch = self._batch
            if batch is None:
                conn = borrowed.enter_context(self.connection())
                try:
                    conn.execute(self.BEGIN[0])
                except self.errors as exc:
                    raise self._refused(exc)
                batch = self._batch = _Batch(conn)
            else:
                conn = batch.conn
                try:
                    conn.execute("SAVEPOINT joined")
                except self.errors as exc:     # the batch cannot go on: it fails, and frees its writers
                    batch.broken = batch.broken or exc
                    self._commit(batch)
                    raise self._refused(exc)
            first = batch.size == 0
            self._local.conn, self._local.writing, self._local.hooks = conn, True, []
            failure = None
            try:
                yield conn
            except BaseException as exc:
                failure = exc
            finally:
                self._local.writing = False
                hooks, self._local.hooks = self._local.hooks, []
            if failure is not None and first:
                self._batch = None             # nobody else is in it yet: all of it goes
                try:
                    conn.rollback()
                except self.errors:
                    pass
                raise self._refused(failure)
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (a full disk, an I/O error), earlier
                # writers' steps included: the batch is lost, and each of its writers is told so.
                batch.broken = batch.broken or (failure if isinstance(failure, self.errors) else
                                                ApiError(503, "agenthub's database rolled a change back; try again"))
            elif not first:
                try:
                    if failure is not None:
                        conn.execute("ROLLBACK TO joined")       # only this writer's steps
                    conn.execute("RELEASE joined")
                except self.errors as exc:
                    batch.broken = batch.broken or exc
            if failure is None:
                batch.hooks.extend(hooks)
            batch.size += 1
            if batch.broken is None and batch.size < self.GROUP and self._waiting:
                locked = False                 # the next writer joins; the last one commits
                self._write_lock.release()
                batch.done.wait()
            else:
                self._commit(batch)
            self.write_seconds.observe(time.perf_counter() - began)
            if batch.error is not None:
                raise self._refused(batch.error)
            if failure is not None:
                raise self._refused(failure)
        finally:
            self._local.conn = held
            if locked:
                self._write_lock.release()
            borrowed.close()

    def _commit(self, batch):
        """Commit ``batch`` (its writers hold or wait for the writer lock), then its hooks."""
        self._batch = None
        conn, error = batch.conn, batch.broken
        if error is None:
            try:
                conn.commit()
            except self.errors as exc:
                error = exc
        if error is not None:
            try:
                if conn.in_transaction:
                    conn.rollback()
            except self.errors:
                pass
        batch.error = error
        try:
            if error is None:
                self._writes_again()
                self._run_hooks(batch.hooks)
        finally:
            batch.done.set()

    def _refused(self, exc):
        """What a writer raises for ``exc``: a database refusal in the API's terms, else ``exc``."""
        if isinstance(exc, self.errors):
            refusal = self._refusal(exc)
            if refusal is not exc:
                refusal.__cause__ = exc
                return refusal
        return exc

    def _writes_again(self):
        if self._full:
            self._full = False
            log("the database takes writes again")

    @staticmethod
    def _run_hooks(hooks):
        for hook in hooks:
            try:
                hook()
            except Exception as exc:     # the change is made: one hook's failure stops no other
                log(f"an after-commit step failed: {exc!r}", "error")

    def after_commit(self, hook):
        """Run ``hook()`` once the write transaction in progress has committed — before the writer
        lock is released, so hooks run in commit order — and never if it rolls back.  This is how
        what others see outside the database (the event ring, notifications) follows the change
        without a second transaction.  A hook must not write.  Outside a write it runs at once."""
        if getattr(self._local, "writing", False):
            self._local.hooks.append(hook)
        else:
            hook()

    def _refusal(self, exc):
        """A full disk (or database) refuses writes with 507 and an I/O error with 503, in the API's
        style, while reads go on; the condition is logged once per episode, not once per request."""
        if not isinstance(exc, sqlite3.OperationalError):
            return exc
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "is full" in str(exc):
            if not self._full:
                self._full = True
                log(f"the database or its disk is full ({exc}); writes answer 507 until there is space again",
                    "error")
            return ApiError(507, "Insufficient storage: agenthub's database or disk is full")
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            log(f"database I/O error: {exc}", "error")
            return ApiError(503, "agenthub's database had an I/O error; try again")
        return exc

    def read(self, sql, args=()):
        with self.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def probe_write(self, now, wait=2.0):
        """A real write (GET /readyz): raises when the database refuses writes, or when the writer
        stays busy for ``wait`` seconds (a probe answers quickly, not after the 30 s busy timeout)."""
        if not self._write_lock.acquire(timeout=wait):
            raise ApiError(503, "the database writer is busy")
        self._write_lock.release()
        self._probe(now, wait)

    PROBE = ("INSERT INTO settings (key, value) VALUES ('ready_probe', ?) ON CONFLICT (key)"
             " DO UPDATE SET value = excluded.value")

    def _probe(self, now, wait):
        with self.connection() as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            try:
                with self.write() as db:
                    db.execute(self.PROBE, (str(now),))
            finally:
                conn.execute("PRAGMA busy_timeout = 30000")

    def file_sizes(self):
        """{"main": bytes, "wal": bytes} of a file database ({} in memory)."""
        if self.memory:
            return {}
        sizes = {}
        for name, path in (("main", self.path), ("wal", self.path + "-wal")):
            try:
                sizes[name] = os.path.getsize(path)
            except OSError:
                sizes[name] = 0
        return sizes

    def read_one(self, sql, args=()):
        with self.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def close(self):
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break


class _PgRow(tuple):
    """A PostgreSQL row as the stores read sqlite3.Row: by index, by column name, ``keys()``."""

    __slots__ = ()
    _names = {}

    def __getitem__(self, key):
        if key.__class__ is str:
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self):
        return list(self._names)


_PG_ROW_CLASSES = {}


def _pg_rows(cursor):
    """psycopg row factory: one _PgRow class per distinct column list, made once."""
    names = tuple(c.name for c in cursor.description or ())
    cls = _PG_ROW_CLASSES.get(names)
    if cls is None:
        cls = _PG_ROW_CLASSES[names] = type("Row", (_PgRow,), {"__slots__": (),
                                                               "_names": {n: i for i, n in enumerate(names)}})
    return cls


def _pg_value(value):
    """A parameter as PostgreSQL takes it.  Text cannot hold U+0000: it becomes U+FFFD, the
    replacement character.  Booleans go in as the 0/1 the schema's flag columns hold."""
    if value.__class__ is str:
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        return value
    if value is True or value is False:
        return int(value)
    return value


class _PgConnection:
    """A psycopg connection that takes this section's SQL as it is written (for SQLite): ``?``
    placeholders, ``executemany`` on the connection, autocommit with explicit transactions."""

    _translated = {}

    def __init__(self, conn):
        self.conn = conn

    @classmethod
    def _sql(cls, sql):
        found = cls._translated.get(sql)
        if found is None:
            # No statement of this section holds a literal "?"; a literal "%" is "%%" to psycopg
            # when there are parameters.
            found = cls._translated[sql] = sql.replace("%", "%%").replace("?", "%s")
        return found

    def execute(self, sql, args=()):
        if not args:
            return self.conn.execute(sql)
        return self.conn.execute(self._sql(sql), [_pg_value(v) for v in args])

    def executemany(self, sql, rows):
        with self.conn.cursor() as cursor:
            cursor.executemany(self._sql(sql), [[_pg_value(v) for v in row] for row in rows])
            return cursor

    def commit(self):
        self.conn.execute("COMMIT")

    def rollback(self):
        if not self.conn.closed:
            self.conn.execute("ROLLBACK")

    @property
    def in_transaction(self):
        return not self.conn.closed and self.conn.info.transaction_status != 0     # 0: idle

    def close(self):
        self.conn.close()


class PostgresDatabase(Database):
    """The PostgreSQL engine (``--db postgresql://…``; psycopg 3, ``pip install 'agenthub[postgres]'``),
    for a lab that outgrows one machine: several agenthub processes share one database.

    The same migrations make the same schema (``ddl`` maps SQLite's types: 64-bit integers, double
    precision times, bytea, identity keys, byte-order text).  Each write transaction takes one
    transaction-level advisory lock first, so writes are serialised across every process exactly
    as SQLite's single writer serialises them on one machine; reads run in parallel.  A pop also
    skips rows another transaction has locked (``FOR UPDATE SKIP LOCKED``), so it stays exactly
    once if a pop ever runs outside that lock.
    """

    engine = "postgresql"
    WRITER_LOCK = 0x61676e74687562        # "agnthub": the advisory lock every write transaction takes
    BEGIN = ("BEGIN", f"SELECT pg_advisory_xact_lock({WRITER_LOCK})")
    skip_locked = " FOR UPDATE SKIP LOCKED"
    same_as = "IS NOT DISTINCT FROM ?"
    single_process = False               # several processes share it: no in-process cache of what they change
    GROUP = 0                            # its writers run side by side (row locks), each with its commit

    def __init__(self, url, pool_size=32):
        """``pool_size``: connections at most (a thread beyond waits for one, then answers 503)."""
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise StartupError("a postgresql:// database needs psycopg 3 and its pool: "
                               "pip install 'agenthub[postgres]'")
        self._psycopg = psycopg
        self.errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self._common(url)
        self.memory = False
        numeric = _pg_numeric_loader(psycopg)

        def configure(conn):
            conn.adapters.register_loader("numeric", numeric)
        # psycopg_pool: connections made ahead, checked when they come back, replaced when broken
        # (a database restart costs the requests in flight, not the process).
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max(4, pool_size), timeout=30, open=False, configure=configure,
            kwargs={"autocommit": True, "row_factory": _pg_rows, "connect_timeout": 10}, name="agenthub")
        try:
            self.pool.open(wait=True, timeout=15)
            self._migrate()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            self.pool.close()
            raise StartupError(f"cannot use the PostgreSQL database {redact_url(url)}: {_first_line(exc)}")
        except BaseException:
            self.pool.close()
            raise

    def _acquire(self):
        try:
            return _PgConnection(self.pool.getconn())
        except self.errors as exc:
            log(f"no connection to {redact_url(self.path)}: {_first_line(exc)}", "error")
            raise ApiError(503, "agenthub's database cannot be reached; try again")

    def _release(self, conn):
        self.pool.putconn(conn.conn)           # the pool rolls back, or drops a broken connection

    def close(self):
        self._closed = True
        self.pool.close()

    def schema_version(self, db):
        db.execute("CREATE TABLE IF NOT EXISTS agenthub_schema (version BIGINT NOT NULL)")
        row = db.execute("SELECT version FROM agenthub_schema").fetchone()
        if row is None:
            db.execute("INSERT INTO agenthub_schema (version) VALUES (0)")
            return 0
        return row[0]

    def set_schema_version(self, db, number):
        db.execute("UPDATE agenthub_schema SET version = ?", (number,))

    _DDL = [(re.compile(r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
            (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
            (re.compile(r"\bBLOB\b"), "BYTEA"), (re.compile(r" WITHOUT ROWID\b"), ""),
            (re.compile(r"\bTEXT\b"), 'TEXT COLLATE "C"')]      # SQLite's order: by code point

    @classmethod
    def ddl(cls, statement):
        for pattern, replacement in cls._DDL:
            statement = pattern.sub(replacement, statement)
        return statement

    @staticmethod
    def in_list(column):
        return f"{column} = ANY(?)"

    @staticmethod
    def list_value(values):
        return [str(v) for v in values]

    @staticmethod
    def _jsonb(column):
        # jsonb refuses the escape \u0000 (a NUL it cannot hold): the stored JSON keeps it, and
        # these queries read it as U+FFFD.
        return f"replace({column}, '\\u0000', '\\ufffd')::jsonb"

    @classmethod
    def json_has(cls, column, value="?"):
        return f"coalesce({cls._jsonb(column)} @> jsonb_build_array(({value})::text), false)"

    @classmethod
    def json_elements(cls, column, key):
        return f"jsonb_array_elements_text({cls._jsonb(column)} -> '{key}') AS elements (value)"

    @classmethod
    def json_text(cls, column, key):
        return f"({cls._jsonb(column)} ->> '{key}')"

    @staticmethod
    def utf8_length(column):
        return f"octet_length({column})"

    @staticmethod
    def utf8_bytes(column):
        return f"convert_to({column}, 'UTF8')"

    def notify(self, db, channel):
        db.execute("SELECT pg_notify(?, '')", (channel,))

    EVENTS_LOCK = WRITER_LOCK + 1

    def hold(self, name):
        return _PgHold(self, name)

    def own_connection(self):
        """A connection outside the pool, for a LISTEN or a session lock (autocommit)."""
        return self._psycopg.connect(self.path, autocommit=True, connect_timeout=10)

    def lock_events(self, db):
        # Taken by every fire, also outside the writer lock (a pop's state change): Lamport times
        # and the events' order are assigned one transaction at a time, in commit order.
        db.execute(f"SELECT pg_advisory_xact_lock({self.EVENTS_LOCK})")

    def wake(self, channel):
        """A notification outside any transaction (every listener refreshes: harmless)."""
        with self.connection() as db:
            self.notify(db, channel)

    def listen(self, channel, stop, changed):
        """LISTEN on a connection of its own; after each notification, and after every (re)connect
        (notifications sent meanwhile are lost), ``changed()``."""
        psycopg, delay = self._psycopg, 0.5
        while not stop.is_set():
            try:
                with self.own_connection() as conn:
                    conn.execute(f"LISTEN {channel}")
                    changed()
                    delay = 0.5
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            changed()
            except (psycopg.Error, ApiError) as exc:
                if stop.is_set():
                    return
                log(f"listening for {channel} failed: {_first_line(exc)}; again in {delay:g} s", "warning")
                stop.wait(delay)
                delay = min(30.0, delay * 2)

    def _refusal(self, exc):
        errors = self._psycopg.errors
        if isinstance(exc, (errors.DiskFull, errors.OutOfMemory, errors.InsufficientResources)):
            if not self._full:
                self._full = True
                log(f"the database refuses writes ({_first_line(exc)}); writes answer 507 until it takes them"
                    " again", "error")
            return ApiError(507, "Insufficient storage: agenthub's database or disk is full")
        if isinstance(exc, self._psycopg.OperationalError):
            log(f"database error: {_first_line(exc)}", "error")
            return ApiError(503, "agenthub's database is unavailable; try again")
        return exc

    def _probe(self, now, wait):
        with self.connection() as conn:
            try:
                conn.execute("BEGIN")
                conn.execute(f"SET LOCAL lock_timeout = '{int(wait * 1000)}ms'")
                conn.execute(self.BEGIN[1])
                conn.execute(self.PROBE, (str(now),))
                conn.commit()
            except self.errors as exc:
                raise self._refusal(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.rollback()

    def file_sizes(self):
        """None here: pg_database_size() stats every file of the database on each scrape, and
        PostgreSQL's own exporters report its sizes."""
        return {}


class _Hold:
    def acquire(self):
        return True

    def release(self):
        pass


class _PgHold:
    """A session-level advisory lock on a connection of its own, kept for the tries: released with
    the hold, or when the process (or its connection) dies."""

    def __init__(self, db, name):
        self.db, self.name, self.conn, self.held = db, name, None, False

    def acquire(self):
        psycopg = self.db._psycopg
        try:
            if self.conn is None or self.conn.closed or self.conn.broken:
                self.release()
                self.conn = self.db.own_connection()
            if self.held:
                self.conn.execute("SELECT 1")              # still ours while the session lives
            else:
                self.held = self.conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                              (self.name,)).fetchone()[0]
            return self.held
        except psycopg.Error:
            self.release()
            return False

    def release(self):
        if self.conn is not None:
            with contextlib.suppress(self.db._psycopg.Error):
                self.conn.close()
        self.conn, self.held = None, False


def _pg_numeric_loader(psycopg):
    """numeric (what sum() of bigints is) read as int, or float when it has a fraction, like SQLite."""
    class NumericLoader(psycopg.adapt.Loader):
        def load(self, data):
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)
    return NumericLoader


def database_errors():
    """The errors any engine raises (psycopg's only when it is installed)."""
    try:
        import psycopg
        return (sqlite3.Error, psycopg.Error)
    except ImportError:
        return (sqlite3.Error,)


def redact_url(url):
    """A database URL fit for a log line: its password replaced."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _DomainStore:
    """Base of the per-domain stores: one query a method, over the one Database (its connections
    and its writer), so a domain operation that uses several of them is still one transaction."""

    def __init__(self, db):
        self.db = db

    def connection(self):
        return self.db.connection()

    def write(self, exclusive=True):
        return self.db.write(exclusive)

    def after_commit(self, hook):
        self.db.after_commit(hook)

    def read(self, sql, args=()):
        return self.db.read(sql, args)

    def read_one(self, sql, args=()):
        return self.db.read_one(sql, args)


class JobStore(_DomainStore):
    """Jobs, their results, logs and files, queues and images; the purge."""

    def insert_job(self, db, job):
        """Store a waiting job (a new one, or the next attempt of one just archived); it goes to the
        back of its queue."""
        db.execute(
            "INSERT INTO jobs (job_id, created_at, job_priority, job_queue, state, attachments_status,"
            " exclude_agents, client_id, job_data, attempt, retries) VALUES (?, ?, ?, ?, 'waiting', ?, ?, ?, ?, ?, ?)",
            (job["job_id"], job["created_at"], job["job_priority"], job["job_queue"],
             job["attachments_status"], json.dumps(job["exclude_agents"]), job["client_id"],
             json.dumps(job["job_data"]), job.get("attempt", 1), job.get("retries", 0)))

    def archive_job(self, db, job_id, ended_by):
        """Move a job's current attempt to ``job_attempts`` (its logs and files stay, numbered)."""
        db.execute("INSERT INTO job_attempts (job_id, attempt, created_at, started_at, finished_at, state, job_queue,"
                   " agent_name, client_id, job_data, result_status, device_info, strands, ended_by)"
                   " SELECT job_id, attempt, created_at, started_at, finished_at, state, job_queue, agent_name,"
                   " client_id, job_data, result_status, device_info, strands, ? FROM jobs WHERE job_id = ?",
                   (ended_by, job_id))
        db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def attempts(self, job_id):
        """The earlier attempts of a job, oldest first."""
        return self.read("SELECT * FROM job_attempts WHERE job_id = ? ORDER BY attempt", (job_id,))

    def get_attempt(self, job_id, attempt):
        """One attempt of a job, current or earlier, with the columns both tables share."""
        return self.read_one(
            "SELECT job_id, attempt, created_at, started_at, finished_at, state, job_queue, agent_name, client_id,"
            " job_data, result_status, device_info, strands FROM jobs WHERE job_id = ? AND attempt = ?"
            " UNION ALL SELECT job_id, attempt, created_at, started_at, finished_at, state, job_queue, agent_name,"
            " client_id, job_data, result_status, device_info, strands FROM job_attempts"
            " WHERE job_id = ? AND attempt = ?", (job_id, attempt, job_id, attempt))

    def add_job_events(self, db, job_id, attempt, events):
        db.executemany("INSERT INTO job_events (job_id, attempt, event_name, timestamp, message, detail, status,"
                       " phase) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(job_id, attempt, e["event_name"], e["timestamp"], e["message"], e.get("detail", ""),
                         e.get("status"), e.get("phase")) for e in events])

    def job_events(self, job_id):
        return self.read("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))

    def attempt_run_by(self, job_id, agent_name):
        """The newest attempt of a job that ``agent_name`` took, or None."""
        return self.read_one("SELECT max(attempt) FROM (SELECT attempt FROM jobs WHERE job_id = ? AND agent_name = ?"
                             " UNION ALL SELECT attempt FROM job_attempts WHERE job_id = ? AND agent_name = ?) AS runs",
                             (job_id, agent_name, job_id, agent_name))[0]

    def has_phase_event(self, job_id, attempt, phase):
        return self.read_one("SELECT 1 FROM job_events WHERE job_id = ? AND attempt = ? AND"
                             " event_name = 'job_phase_started' AND phase = ?", (job_id, attempt, phase)) is not None

    def run_times(self, queue_name, limit):
        """Seconds from start to finish of the newest completed jobs of a queue (None: of all),
        newest first."""
        done = ("SELECT finished_at, started_at FROM {} WHERE finished_at IS NOT NULL"
                " AND started_at IS NOT NULL AND state IN ('complete', 'completed')"
                + ("" if queue_name is None else " AND job_queue = ?"))
        return [r[0] for r in self.read(
            f"SELECT finished_at - started_at FROM ({done.format('jobs')} UNION ALL {done.format('job_attempts')})"
            " AS runs ORDER BY finished_at DESC LIMIT ?", (*((queue_name,) * 2 if queue_name is not None else ()),
                                                           limit))]

    def jobs_ahead(self, queues, priority, seq, limit):
        """(queue, excluded agents) of the waiting jobs that agents of ``queues`` may take before the
        job at (priority, seq), in the order they take them (pop_job's order)."""
        return self.read(
            f"SELECT job_queue, exclude_agents FROM jobs WHERE state = 'waiting' AND {self.db.in_list('job_queue')}"
            " AND (attachments_status IS NULL OR attachments_status = 'complete')"
            " AND (job_priority > ? OR (job_priority = ? AND seq < ?)) ORDER BY job_priority DESC, seq LIMIT ?",
            (self.db.list_value(queues), priority, priority, seq, limit))

    def running_on(self, agent_names):
        """(agent, queue, started_at) of the running jobs held by ``agent_names``."""
        return self.read(f"SELECT agent_name, job_queue, started_at FROM jobs WHERE {self.db.in_list('agent_name')}"
                         " AND state NOT IN ('waiting', 'cancelled', 'complete', 'completed')",
                         (self.db.list_value(agent_names),))

    def get_job(self, job_id):
        return self.read_one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))

    def pop_job(self, queues, agent_name, now):
        """Atomically take the best waiting job of ``queues`` for ``agent_name``.

        Highest priority first; equal priorities strictly first-in first-out
        (the original relies on MongoDB's natural order).  The wait time is
        recorded in the same transaction.
        """
        marks = ",".join("?" * len(queues))
        with self.write() as db:
            row = db.execute(
                f"UPDATE jobs SET state = 'running', started_at = ?, agent_name = ? WHERE seq = ("
                f" SELECT seq FROM jobs WHERE state = 'waiting' AND job_queue IN ({marks})"
                "  AND (attachments_status IS NULL OR attachments_status = 'complete')"
                f"  AND NOT {self.db.json_has('jobs.exclude_agents')}"
                # Several processes on PostgreSQL: a job another pop has locked is passed over, and
                # the outer condition re-checks that it still waits (each job handed out once).
                f"  ORDER BY job_priority DESC, seq ASC LIMIT 1{self.db.skip_locked}) AND state = 'waiting'"
                " RETURNING *",
                (now, agent_name, *queues, agent_name)).fetchone()
            if row is not None:
                # Whole seconds, as the original records them (int of the total; it also drops whole
                # days, a bug not copied: a 25-hour wait is 90000, not 3600).
                db.execute("INSERT INTO wait_times (queue, seconds, popped_at) VALUES (?, ?, ?)",
                           (row["job_queue"], int(now - row["created_at"]), now))
            return row

    def job_position(self, job_id):
        """Index of a waiting job among the waiting jobs of its queue, or None."""
        with self.connection() as db:
            row = db.execute("SELECT seq, job_queue, job_priority FROM jobs WHERE job_id = ? AND state = 'waiting'",
                             (job_id,)).fetchone()
            if row is None:
                return None
            return db.execute(
                "SELECT count(*) FROM jobs WHERE state = 'waiting' AND job_queue = ?"
                " AND (job_priority > ? OR (job_priority = ? AND seq < ?))",
                (row["job_queue"], row["job_priority"], row["job_priority"], row["seq"])).fetchone()[0]

    def waiting_job(self, job_id):
        """Where a waiting job stands: its row (seq, queue, priority), or None."""
        return self.read_one("SELECT * FROM jobs WHERE job_id = ? AND state = 'waiting'", (job_id,))

    def silent_jobs(self, agent_name, before):
        """Jobs handed to ``agent_name`` before ``before`` that it never reported on: still 'running'
        (no phase posted) and without a log fragment."""
        return self.read("SELECT job_id, strands FROM jobs WHERE state = 'running' AND agent_name = ?"
                         " AND started_at < ? AND NOT EXISTS (SELECT 1 FROM log_fragments"
                         " WHERE log_fragments.job_id = jobs.job_id AND log_fragments.attempt = jobs.attempt)"
                         + self.db.skip_locked, (agent_name, before))

    def requeue_job(self, job_id):
        """Back to waiting, in its original place in the queue (its arrival order is kept)."""
        with self.write() as db:
            db.execute("UPDATE jobs SET state = 'waiting', agent_name = NULL, started_at = NULL,"
                       " strands = strands + 1 WHERE job_id = ? AND state = 'running'", (job_id,))

    def strand_job(self, job_id, now):
        with self.write() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', strands = strands + 1, finished_at = ? WHERE job_id = ?"
                       " AND state = 'running'", (now, job_id))

    def cancel_job(self, job_id, now):
        """Flip an active job to cancelled (its running instance, if any, is marked); returns
        (changed, name of the agent holding it or None)."""
        with self.write() as db:
            cur = db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE job_id = ?"
                             " AND state NOT IN ('cancelled', 'complete', 'completed')", (now, job_id))
            held = db.execute("UPDATE instances SET cancel_requested = 1 WHERE job_id = ? AND status = 'active'"
                              " RETURNING agent_name", (job_id,)).fetchone() if cur.rowcount else None
            return cur.rowcount > 0, held[0] if held else None

    def complete_attachments(self, db, job_id):
        """Mark a job's attachments received; False when the job is gone or no longer waiting."""
        return db.execute("UPDATE jobs SET attachments_status = 'complete' WHERE job_id = ? AND state = 'waiting'",
                          (job_id,)).rowcount > 0

    def update_result(self, job_id, status=None, device_info=None, job_state=None, now=None, agent_id=None):
        """Replace the given parts of a job's result; a cancelled job stays cancelled.

        A final state finishes the job's instance: cancelled if a cancel was asked,
        failed if any phase exited non-zero, else complete.  Returns the name of
        the agent whose instance finished, or None.
        """
        with self.write() as db:
            if status is not None:
                db.execute("UPDATE jobs SET result_status = ? WHERE job_id = ?", (json.dumps(status), job_id))
            if device_info is not None:
                db.execute("UPDATE jobs SET device_info = ? WHERE job_id = ?", (json.dumps(device_info), job_id))
            if agent_id is not None:
                db.execute("UPDATE jobs SET agent_name = ? WHERE job_id = ?", (agent_id, job_id))
            if job_state is not None:
                db.execute("UPDATE jobs SET state = ? WHERE job_id = ? AND state != 'cancelled'",
                           (job_state, job_id))
            if job_state in ("complete", "completed", "cancelled"):
                db.execute("UPDATE jobs SET finished_at = coalesce(finished_at, ?) WHERE job_id = ?", (now, job_id))
            if job_state not in ("complete", "completed"):
                return None
            row = db.execute("SELECT result_status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            codes = json.loads(row[0]).values() if row else ()
            finished = db.execute(
                "UPDATE instances SET status = CASE WHEN cancel_requested <> 0 THEN 'cancelled' WHEN ? <> 0 THEN 'failed'"
                " ELSE 'complete' END, finished_at = ?, updated_at = ? WHERE job_id = ? AND status = 'active'"
                " RETURNING agent_name", (int(any(c != 0 for c in codes)), now, now, job_id)).fetchone()
            return finished[0] if finished else None

    def search_jobs(self, tags, match_all, states, limit, offset):
        where, args = [], []
        if tags:
            marks = ",".join("?" * len(tags))
            tags_of = self.db.json_elements("job_data", "tags")
            if match_all:
                where.append(f"(SELECT count(DISTINCT value) FROM {tags_of} WHERE value IN ({marks})) = ?")
                args += [*tags, len(set(tags))]
            else:
                where.append(f"EXISTS (SELECT 1 FROM {tags_of} WHERE value IN ({marks}))")
                args += tags
        if states is not None:
            if "active" in states:
                where.append("state NOT IN ('cancelled', 'complete', 'completed')")
            else:
                where.append(f"state IN ({','.join('?' * len(states))})")
                args += states
        sql = "SELECT job_id, created_at, state FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ? OFFSET ?"
        return self.read(sql, (*args, INT64_MAX if limit is None else limit, offset))

    def queue_jobs(self, queue_name, limit, offset):
        return self.read("SELECT job_id, created_at, state, job_queue FROM jobs WHERE job_queue = ?"
                         " ORDER BY seq LIMIT ? OFFSET ?", (queue_name, INT64_MAX if limit is None else limit, offset))

    def wait_times(self, queues):
        if queues:
            rows = self.read(f"SELECT queue, seconds FROM wait_times WHERE queue IN ({','.join('?' * len(queues))})"
                             " ORDER BY queue, seconds", queues)
        else:
            rows = self.read("SELECT queue, seconds FROM wait_times ORDER BY queue, seconds")
        grouped = {}
        for row in rows:
            grouped.setdefault(row["queue"], []).append(row["seconds"])
        return grouped

    # Logs and files belong to one attempt of their job: ``attempt`` None is the current one.
    _ATTEMPT = " AND attempt = coalesce(?, (SELECT attempt FROM jobs WHERE job_id = ?), 1)"

    def add_log_fragment(self, job_id, log_type, phase, number, timestamp, data, now):
        with self.write() as db:
            db.execute("INSERT INTO log_fragments (job_id, log_type, phase, fragment_number, timestamp,"
                       " log_data, inserted_at, attempt) VALUES (?, ?, ?, ?, ?, ?, ?,"
                       " coalesce((SELECT attempt FROM jobs WHERE job_id = ?), 1))",
                       (job_id, log_type, phase, number, timestamp, data, now, job_id))

    def log_fragments(self, job_id, log_type, start_fragment=0, start_timestamp=None, phase=None, attempt=None):
        sql = ("SELECT phase, fragment_number, log_data FROM log_fragments"
               " WHERE job_id = ? AND fragment_number >= ?" + self._ATTEMPT)
        args = [job_id, start_fragment, attempt, job_id]
        if log_type is not None:
            sql += " AND log_type = ?"
            args.append(log_type)
        if start_timestamp is not None:
            sql += " AND timestamp >= ?"
            args.append(start_timestamp)
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)
        return self.read(sql + " ORDER BY fragment_number, id", args)

    def log_tail(self, job_id, log_type, phase, start_fragment, limit, attempt=None):
        """The newest fragments of one phase's log (from ``start_fragment`` on) whose text reaches
        ``limit`` characters, oldest first, and whether older ones were left out."""
        rows, size = [], 0
        with self.connection() as conn:
            for row in conn.execute("SELECT fragment_number, log_data FROM log_fragments WHERE job_id = ? AND"
                                    " log_type = ? AND phase = ? AND fragment_number >= ?" + self._ATTEMPT +
                                    " ORDER BY fragment_number DESC, id DESC",
                                    (job_id, log_type, phase, start_fragment, attempt, job_id)):
                if size >= limit:
                    return rows[::-1], True
                rows.append(row)
                size += len(row[1])
        return rows[::-1], False

    def log_size(self, job_id, log_type, phase=None, attempt=None):
        """Bytes of a whole log (UTF-8), one phase or all."""
        row = self.read_one(f"SELECT coalesce(sum({self.db.utf8_length('log_data')}), 0) FROM log_fragments"
                            " WHERE job_id = ? AND log_type = ?" + ("" if phase is None else " AND phase = ?")
                            + self._ATTEMPT, (job_id, log_type, *(() if phase is None else (phase,)), attempt, job_id))
        return int(row[0])

    def log_batch(self, job_id, log_type, phase, after, limit=256, attempt=None):
        """Up to ``limit`` fragments after the (fragment_number, id) ``after``, as bytes, in order."""
        return self.read(f"SELECT fragment_number, id, {self.db.utf8_bytes('log_data')} FROM log_fragments"
                         " WHERE job_id = ? AND log_type = ?" + ("" if phase is None else " AND phase = ?")
                         + " AND (fragment_number, id) > (?, ?)" + self._ATTEMPT
                         + " ORDER BY fragment_number, id LIMIT ?",
                         (job_id, log_type, *(() if phase is None else (phase,)), *after, attempt, job_id, limit))

    def all_log_fragments(self, job_id, attempt=None):
        return self.read("SELECT log_type, phase, log_data FROM log_fragments WHERE job_id = ?" + self._ATTEMPT +
                         " ORDER BY fragment_number, id", (job_id, attempt, job_id))

    def begin_file(self, job_id, kind, now):
        with self.write() as db:
            return db.execute("INSERT INTO files (job_id, kind, uploaded_at, attempt) VALUES (?, ?, ?,"
                              " coalesce((SELECT attempt FROM jobs WHERE job_id = ?), 1)) RETURNING id",
                              (job_id, kind, now, job_id)).fetchone()[0]

    def add_file_chunk(self, file_id, seq, data):
        """One chunk per short transaction, so a slow upload never holds the writer lock; False when
        the file is gone (purged as abandoned while it was still arriving)."""
        with self.write() as db:
            return db.execute("INSERT INTO file_chunks (file_id, seq, data) SELECT ?, ?, ? WHERE EXISTS"
                              " (SELECT 1 FROM files WHERE id = ?)", (file_id, seq, data, file_id)).rowcount > 0

    def drop_incomplete_files(self):
        with self.write() as db:
            return db.execute("DELETE FROM files WHERE complete = 0").rowcount

    def drop_file(self, file_id):
        with self.write() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def finish_file(self, db, file_id, size):
        """Make an upload visible and drop the versions it replaces, in the caller's transaction."""
        row = db.execute("UPDATE files SET complete = 1, size = ? WHERE id = ? RETURNING job_id, kind, attempt",
                         (size, file_id)).fetchone()
        db.execute("DELETE FROM files WHERE job_id = ? AND kind = ? AND attempt = ? AND id != ?",
                   (row[0], row[1], row[2], file_id))

    def newest_file(self, job_id, kind, attempt=None, any_attempt=False):
        """The newest complete file of one attempt (``attempt`` None: the current one), or of any."""
        if any_attempt:
            return self.read_one("SELECT id, size FROM files WHERE job_id = ? AND kind = ? AND complete = 1"
                                 " ORDER BY id DESC LIMIT 1", (job_id, kind))
        return self.read_one("SELECT id, size FROM files WHERE job_id = ? AND kind = ? AND complete = 1"
                             + self._ATTEMPT + " ORDER BY id DESC LIMIT 1", (job_id, kind, attempt, job_id))

    def file_chunk(self, file_id, seq):
        row = self.read_one("SELECT data FROM file_chunks WHERE file_id = ? AND seq = ?", (file_id, seq))
        return None if row is None else row[0]

    def add_queue_samples(self, samples, now):
        with self.write() as db:
            db.executemany("INSERT INTO queue_samples (queue, time, waiting, running) VALUES (?, ?, ?, ?)",
                           [(q, now, c["waiting"], c["running"]) for q, c in samples.items()])

    def queue_samples(self, queue_name, since):
        return self.read("SELECT time, waiting, running FROM queue_samples WHERE queue = ? AND time >= ?"
                         " ORDER BY time", (queue_name, since))

    def waits_since(self, queue_name, since):
        return self.read("SELECT popped_at, seconds FROM wait_times WHERE queue = ? AND popped_at >= ?"
                         " ORDER BY popped_at", (queue_name, since))

    def finished_since(self, since):
        return self.read("SELECT finished_at, state, result_status FROM jobs WHERE finished_at >= ?", (since,))

    def submitters(self, job_ids):
        """{job_id: client_id} of these jobs (the ones that exist)."""
        if not job_ids:
            return {}
        return {r[0]: r[1] for r in self.read(f"SELECT job_id, client_id FROM jobs WHERE {self.db.in_list('job_id')}",
                                              (self.db.list_value(job_ids),))}

    def counts_by_queue(self):
        """{(queue, state): jobs} (the jobs_pop index covers it)."""
        return {(r[1], r[0]): r[2] for r in self.read("SELECT state, job_queue, count(*) FROM jobs GROUP BY 1, 2")}

    def job_state_counts(self):
        return {r[0]: r[1] for r in self.read("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")}

    def queue_activity(self):
        """{queue: {"waiting": n, "running": n}} over unfinished jobs."""
        out = {}
        for row in self.read("SELECT job_queue, state = 'waiting' AS waiting, count(*) FROM jobs"
                             " WHERE state NOT IN ('cancelled', 'complete', 'completed') GROUP BY 1, 2"):
            out.setdefault(row[0], {"waiting": 0, "running": 0})["waiting" if row[1] else "running"] = row[2]
        return out

    def jobs_page(self, state=None, queue_name=None, tag=None, agent_name=None, limit=50, offset=0):
        """(rows, total) of jobs newest first, filtered."""
        where, args = [], []
        for column, value in (("state", state), ("job_queue", queue_name), ("agent_name", agent_name)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if tag:
            where.append(f"EXISTS (SELECT 1 FROM {self.db.json_elements('job_data', 'tags')} WHERE value = ?)")
            args.append(tag)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self.connection() as db:
            total = db.execute(f"SELECT count(*) FROM jobs{clause}", args).fetchone()[0]
            rows = db.execute(f"SELECT job_id, created_at, started_at, finished_at, state, job_queue, job_priority,"
                              f" agent_name, client_id, attempt, result_status,"
                              f" {self.db.json_text('job_data', 'name')} AS name"
                              f" FROM jobs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                              (*args, limit, offset)).fetchall()
        return rows, total

    def upsert_advertised_queues(self, queues, now):
        with self.write() as db:
            db.executemany("INSERT INTO advertised_queues (name, description, updated_at) VALUES (?, ?, ?)"
                           " ON CONFLICT (name) DO UPDATE SET description = excluded.description,"
                           " updated_at = excluded.updated_at", [(k, v, now) for k, v in queues.items()])

    def advertised_queues(self):
        return self.read("SELECT name, description FROM advertised_queues ORDER BY name")

    def replace_images(self, images, now):
        with self.write() as db:
            db.executemany("INSERT INTO queue_images (queue, images, updated_at) VALUES (?, ?, ?)"
                           " ON CONFLICT (queue) DO UPDATE SET images = excluded.images,"
                           " updated_at = excluded.updated_at",
                           [(q, json.dumps(m), now) for q, m in images.items()])

    def images(self, queue_name):
        row = self.read_one("SELECT images FROM queue_images WHERE queue = ?", (queue_name,))
        return json.loads(row[0]) if row else {}

    def purge(self, now, cutoff, token_cutoff, stale_upload_cutoff):
        """Delete what expired before ``cutoff``; waiting jobs are kept however old they are."""
        with self.write() as db:
            done = db.execute("DELETE FROM jobs WHERE created_at < ? AND state != 'waiting' RETURNING job_id",
                              (cutoff,)).fetchall()
            # A job's earlier attempts, events, logs and files go with it (and none is left for a job
            # submitted later under the same id).
            gone = self.db.list_value([row[0] for row in done])
            for table in ("job_attempts", "job_events", "log_fragments", "files"):
                db.execute(f"DELETE FROM {table} WHERE {self.db.in_list('job_id')}", (gone,))
            db.execute("DELETE FROM log_fragments WHERE inserted_at < ?", (cutoff,))
            # Files expire with their age; an upload that never finished (client gone, crash)
            # is dropped after a day.
            db.execute("DELETE FROM files WHERE uploaded_at < ? OR (complete = 0 AND uploaded_at < ?)",
                       (cutoff, stale_upload_cutoff))
            db.execute("DELETE FROM agents WHERE origin = 'testflinger' AND updated_at < ? AND NOT EXISTS"
                       " (SELECT 1 FROM instances WHERE agent_name = agents.name AND status IN ('pending', 'active'))",
                       (cutoff,))
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - 86400,))
            db.execute("DELETE FROM advertised_queues WHERE updated_at < ?", (cutoff,))
            db.execute("DELETE FROM queue_images WHERE updated_at < ?", (cutoff,))
            db.execute("DELETE FROM wait_times WHERE popped_at < ?", (cutoff,))
            db.execute("DELETE FROM queue_samples WHERE time < ?", (cutoff,))
            db.execute("DELETE FROM agent_states WHERE time < ? AND id NOT IN (SELECT max(id) FROM agent_states"
                       " GROUP BY agent_name)", (cutoff,))          # each agent's last state stays
            db.execute("DELETE FROM refresh_tokens WHERE last_accessed < ?", (token_cutoff,))
            db.execute("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM secrets WHERE expires_at < ?", (now,))
            return len(done)


class AgentStore(_DomainStore):
    """The agent registry: agents (Testflinger's agent data too), instances, versions, Rackspace
    events, idempotency keys, settings."""

    AGENT_FIELDS = ("state", "queues", "location", "job_id", "provision_type", "identifier", "comment")

    def queue_exists(self, queue_name):
        """Whether an agent listens on the queue."""
        return self.read_one(f"SELECT 1 FROM agents WHERE {self.db.json_has('agents.queues')} LIMIT 1",
                             (queue_name,)) is not None

    def upsert_agent(self, name, fields, log, now, new_ids, ip):
        """Set the given Testflinger fields and log of an agent (creating it with ``new_ids`` when it
        is new), and record the contact."""
        with self.write() as db:
            values = {k: (json.dumps(v) if k == "queues" else v) for k, v in fields.items()}
            values.update(updated_at=now, log=json.dumps(log), tf=1, last_seen_at=now, last_ip=ip, shutdown_at=None)
            if db.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is None:
                values.update(name=name, origin="testflinger", inserted_at=now, record_updated_at=now, **new_ids)
                _insert(db, "agents", values)
            else:
                db.execute(f"UPDATE agents SET {_assignments(values)} WHERE name = ?", (*values.values(), name))

    def fail_job_instance(self, job_id, now):
        with self.write() as db:
            db.execute("UPDATE instances SET status = 'failed', finished_at = ?, updated_at = ?"
                       " WHERE job_id = ? AND status = 'active'", (now, now, job_id))

    def fail_active_instances(self, name, source, now):
        with self.write() as db:
            db.execute("UPDATE instances SET status = 'failed', finished_at = ?, updated_at = ?"
                       " WHERE agent_name = ? AND source = ? AND status = 'active'", (now, now, name, source))

    def get_agent(self, name):
        return self.read_one("SELECT * FROM agents WHERE name = ?", (name,))

    def list_agents(self, queue_name=None):
        """Agents with a Testflinger record (all, or those listening on ``queue_name``)."""
        if queue_name is None:
            return self.read("SELECT * FROM agents WHERE tf = 1 ORDER BY name")
        return self.read(f"SELECT * FROM agents WHERE tf = 1 AND {self.db.json_has('agents.queues')} ORDER BY name",
                         (queue_name,))

    def set_agent_job(self, db, name, job_id):
        """The job an agent runs (spec testflinger-2026 §2: the server keeps it, not the agent)."""
        db.execute("UPDATE agents SET job_id = ? WHERE name = ?", (job_id, name))

    def clear_agent_job(self, db, job_id, idle_from=()):
        """Unset ``job_id`` on the agent that runs it; an agent still reporting one of the states
        ``idle_from`` for it is shown as waiting for a job again.  Returns that agent's name."""
        marks = ",".join("?" * len(idle_from)) or "NULL"
        row = db.execute(f"UPDATE agents SET job_id = NULL, state = CASE WHEN state IN ({marks}) THEN 'waiting'"
                         f" ELSE state END WHERE job_id = ? RETURNING name", (*idle_from, job_id)).fetchone()
        return row[0] if row else None

    def job_provision_logged(self, agent_name, job_id, attempt):
        return self.read_one("SELECT 1 FROM provision_logs WHERE agent_name = ? AND job_id = ? AND attempt = ?",
                             (agent_name, job_id, attempt)) is not None

    def add_provision_log(self, agent_name, job_id, exit_code, detail, now, client_id=None, recorded_by="agent",
                          attempt=1):
        """Append a provision log entry (kept even for unknown agents, last 100) and update the
        agent's streak.  An agent's own entry replaces one agenthub recorded from the same attempt's
        result.  Returns False when the agent is unknown."""
        with self.write() as db:
            replaced = db.execute("DELETE FROM provision_logs WHERE agent_name = ? AND job_id = ? AND attempt = ?"
                                  " AND recorded_by = 'result'", (agent_name, job_id, attempt)).rowcount
            db.execute("INSERT INTO provision_logs (agent_name, job_id, exit_code, detail, timestamp, client_id,"
                       " recorded_by, attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (agent_name, job_id, exit_code, detail, now, client_id, recorded_by, attempt))
            db.execute("DELETE FROM provision_logs WHERE agent_name = ? AND id NOT IN (SELECT id FROM"
                       " provision_logs WHERE agent_name = ? ORDER BY id DESC LIMIT 100)", (agent_name, agent_name))
            agent = db.execute("SELECT provision_streak_type, provision_streak_count FROM agents WHERE name = ?",
                               (agent_name,)).fetchone()
            if agent is None:
                return False
            if replaced:                 # this provision is already counted in the streak
                return True
            kind = "pass" if exit_code == 0 else "fail"
            count = (agent["provision_streak_count"] or 0) + 1 if agent["provision_streak_type"] == kind else 1
            db.execute("UPDATE agents SET provision_streak_type = ?, provision_streak_count = ? WHERE name = ?",
                       (kind, count, agent_name))
            return True

    def provision_logs(self, agent_name):
        return self.read("SELECT job_id, exit_code, detail, timestamp, client_id, recorded_by, attempt"
                         " FROM provision_logs WHERE agent_name = ? ORDER BY id", (agent_name,))

    def setting(self, key, make_default):
        """Read a setting, storing ``make_default()`` the first time."""
        with self.write() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row:
                return row[0]
            value = make_default()
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (key, value))
            return value

    def claim_turn(self, job, now, gap):
        """Record ``now`` as the last round of ``job`` unless one was recorded less than ``gap``
        seconds ago; True when this caller took the round."""
        key = f"turn:{job}"
        with self.write() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row is not None and now - float(row[0]) < gap:
                return False
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = excluded.value", (key, repr(now)))
            return True

    def fill_environment(self, environment_id):
        with self.write() as db:
            db.execute("UPDATE agents SET environment_id = ? WHERE environment_id IS NULL", (environment_id,))

    def all_agents(self):
        return self.read("SELECT * FROM agents ORDER BY pfid")

    def agent_by(self, column, value):
        assert column in ("pfid", "uuid", "name", "external_identifier")
        return self.read_one(f"SELECT * FROM agents WHERE {column} = ?", (value,))

    def create_agent(self, values):
        with self.write() as db:
            _insert(db, "agents", values)

    def update_agent(self, name, values):
        """Set registry columns of one agent (a rename cascades to its instances)."""
        with self.write() as db:
            return db.execute(f"UPDATE agents SET {_assignments(values)} WHERE name = ?",
                              (*values.values(), name)).rowcount > 0

    def delete_agent(self, name):
        with self.write() as db:
            db.execute("DELETE FROM agents WHERE name = ?", (name,))

    def touch_agent(self, name, now, ip=None, shutdown=False):
        """Record a contact (or a graceful shutdown); False when the agent is unknown."""
        with self.write() as db:
            return db.execute("UPDATE agents SET last_seen_at = ?, last_ip = coalesce(?, last_ip),"
                              " shutdown_at = ? WHERE name = ?",
                              (now, ip, now if shutdown else None, name)).rowcount > 0

    def agent_states(self, name, since):
        """The agent's state changes from ``since`` on, led by the one in force at ``since``."""
        with self.connection() as db:
            before = db.execute("SELECT time, state FROM agent_states WHERE agent_name = ? AND time < ?"
                                " ORDER BY time DESC LIMIT 1", (name, since)).fetchall()
            return before + db.execute("SELECT time, state FROM agent_states WHERE agent_name = ? AND time >= ?"
                                       " ORDER BY time", (name, since)).fetchall()

    def announce_state(self, name, old, new, now):
        """Store the announced state tuple if it is still ``old`` (so only one thread announces), and
        record the change in the agent's state history, in one transaction."""
        with self.write() as db:
            if db.execute(f"UPDATE agents SET gocd_tuple = ? WHERE name = ? AND gocd_tuple {self.db.same_as}",
                          (new, name, old)).rowcount == 0:
                return False
            db.execute("INSERT INTO agent_states (agent_name, time, state) VALUES (?, ?, ?)", (name, now, new))
            return True

    def instance_summaries(self):
        """{agent: ({status: count}, cancel asked of its running instance)} of every agent, in one
        query (a page or a scrape of thousands of agents is not thousands of queries)."""
        out = {}
        for r in self.read("SELECT agent_name, status, count(*) AS n, max(cancel_requested) AS cancel"
                           " FROM instances GROUP BY agent_name, status"):
            counts, cancel = out.setdefault(r["agent_name"], ({}, [False]))
            counts[r["status"]] = r["n"]
            if r["status"] == "active" and r["cancel"]:
                cancel[0] = True
        return {name: (counts, cancel[0]) for name, (counts, cancel) in out.items()}

    def live_instances(self, name):
        """Like instance_summary, for the pending and active instances only (an index range, however
        many finished ones the agent has): all its GoCD state depends on."""
        rows = self.read("SELECT status, count(*) AS n, max(cancel_requested) AS cancel FROM instances"
                         " WHERE agent_name = ? AND status IN ('pending', 'active') GROUP BY status", (name,))
        return {r["status"]: r["n"] for r in rows}, any(r["cancel"] for r in rows if r["status"] == "active")

    def instance_summary(self, name):
        """({status: count}, whether the running instance was asked to cancel)."""
        rows = self.read("SELECT status, count(*) AS n, max(cancel_requested) AS cancel FROM instances"
                         " WHERE agent_name = ? GROUP BY status", (name,))
        return {r["status"]: r["n"] for r in rows}, any(r["cancel"] for r in rows if r["status"] == "active")

    def add_instance(self, values):
        with self.write() as db:
            _insert(db, "instances", values)

    def get_instance(self, pfid):
        return self.read_one("SELECT i.*, a.pfid AS agent_pfid FROM instances i JOIN agents a"
                             " ON a.name = i.agent_name WHERE i.pfid = ?", (pfid,))

    def move_instance(self, pfid, from_statuses, values):
        """Change an instance if its status is one of ``from_statuses``; False otherwise."""
        marks = ",".join("?" * len(from_statuses))
        with self.write() as db:
            return db.execute(f"UPDATE instances SET {_assignments(values)} WHERE pfid = ? AND status IN ({marks})",
                              (*values.values(), pfid, *from_statuses)).rowcount > 0

    def list_instances(self, name=None):
        sql = "SELECT i.*, a.pfid AS agent_pfid FROM instances i JOIN agents a ON a.name = i.agent_name"
        if name is None:
            return self.read(sql + " ORDER BY i.pfid DESC")
        return self.read(sql + " WHERE i.agent_name = ? ORDER BY i.pfid DESC", (name,))

    def agent_version(self, name, digest, make_ids):
        """The (version, schema version) ids registered for ``digest``, made once per digest."""
        with self.write() as db:
            row = db.execute("SELECT pfid, schema_pfid FROM agent_versions WHERE agent_name = ? AND digest = ?",
                             (name, digest)).fetchone()
            if row:
                return row[0], row[1]
            version, schema = make_ids()
            db.execute("INSERT INTO agent_versions (pfid, agent_name, digest, schema_pfid) VALUES (?, ?, ?, ?)",
                       (version, name, digest, schema))
            return version, schema

    def add_rackspace_event(self, names, project_id, event, mode, now):
        with self.write() as db:
            db.executemany("INSERT INTO rackspace_events (agent_name, project_id, event, mode, request_id, time)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           [(n, project_id, event, mode, str(uuid.uuid4()), now) for n in names])

    def rackspace_events(self, project_id, name, marker, limit, descending):
        sql = ("SELECT e.*, a.uuid AS agent_uuid FROM rackspace_events e JOIN agents a ON a.name = e.agent_name"
               " WHERE e.project_id = ?")
        args = [project_id]
        if name is not None:
            sql += " AND e.agent_name = ?"
            args.append(name)
        if marker is not None:
            sql += " AND e.id < ?" if descending else " AND e.id > ?"
            args.append(marker)
        sql += f" ORDER BY e.id {'DESC' if descending else 'ASC'} LIMIT ?"
        return self.read(sql, (*args, limit))

    def claim_idempotency(self, scope, key, now, since, claim_since):
        """The answer stored for (scope, key) after ``since`` (status 0: a claim made after
        ``claim_since``, still running), or None after claiming the key for the caller."""
        with self.write() as db:
            row = db.execute("SELECT status, body FROM idempotency WHERE scope = ? AND key = ? AND created_at > ?"
                             " AND (status != 0 OR created_at > ?)", (scope, key, since, claim_since)).fetchone()
            if row is None:
                db.execute("INSERT INTO idempotency (scope, key, status, body, created_at) VALUES (?, ?, 0, '', ?)"
                           " ON CONFLICT (scope, key) DO UPDATE SET status = excluded.status, body = excluded.body,"
                           " created_at = excluded.created_at", (scope, key, now))
            return row

    def forget_idempotency(self, scope, key):
        with self.write() as db:
            db.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND status = 0", (scope, key))

    def remember_answer(self, scope, key, status, body, now):
        with self.write() as db:
            db.execute("INSERT INTO idempotency (scope, key, status, body, created_at) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (scope, key) DO UPDATE SET status = excluded.status, body = excluded.body,"
                       " created_at = excluded.created_at", (scope, key, status, body, now))


class DeliveryStore(_DomainStore):
    """GoCD notifications: the outbox, the deliveries and the server health messages they leave."""

    def enqueue(self, rows):
        """(webhook_url, delivery_uuid, agent_name, body, created_at) rows into the outbox."""
        with self.write() as db:
            db.executemany("INSERT INTO outbox (webhook_url, delivery_uuid, agent_name, body, created_at)"
                           " VALUES (?, ?, ?, ?, ?)", rows)

    def next_delivery(self, url):
        return self.read_one("SELECT * FROM outbox WHERE webhook_url = ? ORDER BY id LIMIT 1", (url,))

    def outbox_depth(self):
        return {r[0]: r[1] for r in self.read("SELECT webhook_url, count(*) FROM outbox GROUP BY webhook_url")}

    def record_delivery(self, values, keep=1000, outbox_id=None):
        """Record one notification delivery (and take it out of the outbox); keep the newest ``keep``
        per webhook."""
        with self.write() as db:
            if outbox_id is not None:
                db.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))
            _insert(db, "deliveries", values)
            db.execute("DELETE FROM deliveries WHERE webhook_url = ? AND id <= (SELECT id FROM deliveries"
                       " WHERE webhook_url = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       (values["webhook_url"], values["webhook_url"], keep))

    def deliveries(self, agent_name=None, limit=100):
        if agent_name is None:
            return self.read("SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", (limit,))
        return self.read("SELECT * FROM deliveries WHERE agent_name = ? ORDER BY id DESC LIMIT ?", (agent_name, limit))

    def set_health(self, scope, message=None, detail="", level="ERROR", now=None):
        """Put (or with ``message`` None, clear) the health message of ``scope``."""
        with self.write() as db:
            if message is None:
                db.execute("DELETE FROM health WHERE scope = ?", (scope,))
            else:
                db.execute("INSERT INTO health (scope, message, detail, level, time) VALUES (?, ?, ?, ?, ?)"
                           " ON CONFLICT (scope) DO UPDATE SET message = excluded.message, detail = excluded.detail,"
                           " level = excluded.level, time = excluded.time", (scope, message, detail, level, now))

    def health(self):
        return self.read("SELECT * FROM health ORDER BY time DESC")


class AuthStore(_DomainStore):
    """Clients, refresh tokens, restricted queues and secrets.  The set of restricted queues, read
    on every submit and changed rarely, is cached here and dropped by the writes that change it (a
    generation count keeps a read that raced a write from caching the old set)."""

    def __init__(self, db):
        super().__init__(db)
        self._restricted, self._generation, self._cache_lock = None, 0, threading.Lock()

    def _forget_restricted(self):
        with self._cache_lock:
            self._restricted, self._generation = None, self._generation + 1

    def restricted_owners(self, queues):
        """{queue: [client ids allowed]} for the restricted ones among ``queues`` that have owners."""
        if not queues:
            return {}
        rows = self.read(
            "SELECT r.name AS queue, c.client_id FROM restricted_queues r"
            f" JOIN clients c ON {self.db.json_has('c.allowed_queues', 'r.name')}"
            f" WHERE {self.db.in_list('r.name')} ORDER BY r.name, c.client_id", (self.db.list_value(queues),))
        owners = {}
        for row in rows:
            owners.setdefault(row["queue"], []).append(row["client_id"])
        return owners

    def is_restricted(self, queue_name):
        if not self.db.single_process:       # another process may restrict it: no cache
            return self.read_one("SELECT 1 FROM restricted_queues WHERE name = ?", (queue_name,)) is not None
        cached = self._restricted
        if cached is None:
            generation = self._generation
            cached = frozenset(r[0] for r in self.read("SELECT name FROM restricted_queues"))
            with self._cache_lock:
                if generation == self._generation:
                    self._restricted = cached
        return queue_name in cached

    def upsert_client(self, client_id, secret_hash, role, now):
        with self.write() as db:
            db.execute("INSERT INTO clients (client_id, secret_hash, role, created_at) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (client_id) DO UPDATE SET secret_hash = excluded.secret_hash,"
                       " role = excluded.role", (client_id, secret_hash, role, now))

    def get_client(self, client_id):
        return self.read_one("SELECT * FROM clients WHERE client_id = ?", (client_id,))

    CLIENT_JSON = ("max_priority", "allowed_queues", "max_reservation_time")

    def list_clients(self):
        return self.read("SELECT * FROM clients ORDER BY client_id")

    def save_client(self, client_id, fields, now):
        """Create a client or merge ``fields`` into it (JSON columns encoded here)."""
        values = {k: (json.dumps(v) if k in self.CLIENT_JSON else v) for k, v in fields.items()}
        with self.write() as db:
            if db.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone() is None:
                db.execute("INSERT INTO clients (client_id, created_at) VALUES (?, ?)", (client_id, now))
            if values:
                db.execute(f"UPDATE clients SET {_assignments(values)} WHERE client_id = ?",
                           (*values.values(), client_id))

    def delete_client(self, client_id):
        with self.write() as db:
            db.execute("DELETE FROM web_sessions WHERE client_id = ?", (client_id,))
            return db.execute("DELETE FROM clients WHERE client_id = ?", (client_id,)).rowcount > 0

    def restricted_queues(self):
        return [r[0] for r in self.read("SELECT name FROM restricted_queues ORDER BY name")]

    def restrict_queue(self, queue_name, client_id):
        """Mark a queue restricted and let ``client_id`` use it, in one transaction."""
        with self.write() as db:
            db.execute("INSERT INTO restricted_queues (name) VALUES (?) ON CONFLICT DO NOTHING", (queue_name,))
            self._forget_restricted()
            row = db.execute("SELECT allowed_queues FROM clients WHERE client_id = ?", (client_id,)).fetchone()
            allowed = json.loads(row[0] or "[]")
            if queue_name not in allowed:
                db.execute("UPDATE clients SET allowed_queues = ? WHERE client_id = ?",
                           (json.dumps(allowed + [queue_name]), client_id))
        self._forget_restricted()                  # after the commit too: no read caches the old set

    def unrestrict_queue(self, queue_name, client_id):
        """Lift a queue's restriction for everybody and take it from ``client_id``'s allowed queues."""
        with self.write() as db:
            db.execute("DELETE FROM restricted_queues WHERE name = ?", (queue_name,))
            self._forget_restricted()
            row = db.execute("SELECT allowed_queues FROM clients WHERE client_id = ?", (client_id,)).fetchone()
            if row is not None:
                allowed = [q for q in json.loads(row[0] or "[]") if q != queue_name]
                db.execute("UPDATE clients SET allowed_queues = ? WHERE client_id = ?",
                           (json.dumps(allowed), client_id))
        self._forget_restricted()

    def revoke_refresh_token(self, token_hash):
        """'revoked', 'already' or None (unknown)."""
        with self.write() as db:
            row = db.execute("SELECT revoked FROM refresh_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                return None
            if row[0]:
                return "already"
            db.execute("UPDATE refresh_tokens SET revoked = 1 WHERE token_hash = ?", (token_hash,))
            return "revoked"

    def put_secret(self, client_id, path, value, ephemeral, expires_at, now):
        with self.write() as db:
            db.execute("INSERT INTO secrets (client_id, path, value, ephemeral, expires_at, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id, path) DO UPDATE SET"
                       " value = excluded.value, ephemeral = excluded.ephemeral,"
                       " expires_at = excluded.expires_at, created_at = excluded.created_at",
                       (client_id, path, value, int(ephemeral), expires_at, now))

    def delete_secret(self, client_id, path):
        with self.write() as db:
            db.execute("DELETE FROM secrets WHERE client_id = ? AND path = ?", (client_id, path))

    def live_secret_paths(self, client_id, paths, now):
        marks = ",".join("?" * len(paths))
        rows = self.read(f"SELECT path FROM secrets WHERE client_id = ? AND path IN ({marks})"
                         " AND (expires_at IS NULL OR expires_at > ?)", (client_id, *paths, now))
        return {r[0] for r in rows}

    def take_secrets(self, client_id, paths, now):
        """{path: stored value} of the live secrets among ``paths``; single-use ones are deleted
        in the same transaction, so two pops can never both read one."""
        marks = ",".join("?" * len(paths))
        with self.write() as db:
            rows = db.execute(f"SELECT path, value, ephemeral FROM secrets WHERE client_id = ? AND path IN"
                              f" ({marks}) AND (expires_at IS NULL OR expires_at > ?)",
                              (client_id, *paths, now)).fetchall()
            db.executemany("DELETE FROM secrets WHERE client_id = ? AND path = ?",
                           [(client_id, r["path"]) for r in rows if r["ephemeral"]])
            return {r["path"]: r["value"] for r in rows}

    def add_refresh_token(self, token_hash, client_id, issued_at, expires_at):
        with self.write() as db:
            db.execute("INSERT INTO refresh_tokens (token_hash, client_id, issued_at, expires_at, last_accessed)"
                       " VALUES (?, ?, ?, ?, ?)", (token_hash, client_id, issued_at, expires_at, issued_at))

    def revoke_client_tokens(self, client_id):
        """Revoke every refresh token and end every web session of a client (its secret changed)."""
        with self.write() as db:
            tokens = db.execute("UPDATE refresh_tokens SET revoked = 1 WHERE client_id = ? AND revoked = 0",
                                (client_id,)).rowcount
            sessions = db.execute("DELETE FROM web_sessions WHERE client_id = ?", (client_id,)).rowcount
            return tokens, sessions

    def add_session(self, id_hash, client_id, now, expires_at, replaces=None):
        """A new web session; the one it ``replaces`` (a hash) ends in the same transaction."""
        with self.write() as db:
            if replaces:
                db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (replaces,))
            db.execute("INSERT INTO web_sessions (id_hash, client_id, created_at, last_seen_at, expires_at)"
                       " VALUES (?, ?, ?, ?, ?)", (id_hash, client_id, now, now, expires_at))

    def get_session(self, id_hash, now):
        """A live session's row (its last use stamped at most once a minute), or None."""
        row = self.read_one("SELECT * FROM web_sessions WHERE id_hash = ? AND expires_at > ?", (id_hash, now))
        if row is not None and row["last_seen_at"] < now - 60:
            with self.write() as db:
                db.execute("UPDATE web_sessions SET last_seen_at = ? WHERE id_hash = ?", (now, id_hash))
        return row

    def end_session(self, id_hash):
        with self.write() as db:
            return db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,)).rowcount

    def use_refresh_token(self, token_hash, now):
        """Return the token row (after stamping last_accessed), or None if unknown."""
        with self.write() as db:
            return db.execute("UPDATE refresh_tokens SET last_accessed = ? WHERE token_hash = ? RETURNING *",
                              (now, token_hash)).fetchone()


EVENTS_CHANNEL = "agenthub_events"


class EventStore(_DomainStore):
    """User events and their ACL tokens."""

    def add_event(self, event, keep, now):
        """Store a fired event and drop all but the newest ``keep``, in one transaction."""
        with self.write() as db:
            db.execute("INSERT INTO events (id, name, payload, node_filter, service_filter, tag_filter, ltime,"
                       " fired_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (event.id, event.name, event.payload, event.node_filter, event.service_filter,
                        event.tag_filter, event.ltime, now))
            db.execute("DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC"
                       " LIMIT 1 OFFSET ?)", (keep,))
            self.db.notify(db, EVENTS_CHANNEL)      # the other processes read it (PostgreSQL)

    def newest_ltime(self):
        """The highest Lamport time stored, once no other transaction can add an event before this
        one commits."""
        with self.write() as db:
            self.db.lock_events(db)
            return db.execute("SELECT coalesce(max(ltime), 0) FROM events").fetchone()[0]

    def events_after(self, seq):
        """The events stored after ``seq``, oldest first (what other processes fired)."""
        return self.read("SELECT * FROM events WHERE seq > ? ORDER BY seq", (seq,))

    def newest_events(self, keep):
        """The newest ``keep`` events, oldest first, and the highest Lamport time ever stored."""
        with self.connection() as db:
            rows = db.execute("SELECT * FROM (SELECT * FROM events ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq",
                              (keep,)).fetchall()
            ltime = db.execute("SELECT coalesce(max(ltime), 0) FROM events").fetchone()[0]
        return rows, ltime

    def upsert_event_token(self, name, token_hash, read, write, now):
        with self.write() as db:
            db.execute("INSERT INTO event_tokens (name, token_hash, read_prefixes, write_prefixes, created_at)"
                       " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash,"
                       " read_prefixes = excluded.read_prefixes, write_prefixes = excluded.write_prefixes",
                       (name, token_hash, json.dumps(read), json.dumps(write), now))

    def event_token(self, token_hash):
        return self.read_one("SELECT * FROM event_tokens WHERE token_hash = ?", (token_hash,))


def _insert(db, table, values):
    """INSERT one row given as {column: value}."""
    return db.execute(f"INSERT INTO {table} ({','.join(values)}) VALUES ({','.join('?' * len(values))})",
                      tuple(values.values()))


def _assignments(values):
    """The SET clause for {column: value} (its parameters are ``values.values()``)."""
    return ", ".join(f"{column} = ?" for column in values)


def _split_sql(script):
    """Split a migration script into statements (no semicolons inside our literals)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


###############################################################################
# Validation ##################################################################
###############################################################################
#
# A small declarative toolkit: schemas are data (a dict of fields), and their
# errors come out as the nested field → [messages] maps that marshmallow, and
# so the Testflinger clients, use.  Other APIs reshape the same map.

MISSING = object()


class Invalid(Exception):
    """A value failed validation; ``errors`` is a list of messages or a nested map."""

    def __init__(self, errors):
        super().__init__(errors)
        self.errors = errors if isinstance(errors, (list, dict)) else [errors]


class Field:
    """Base field: required / allow_none / default handling and extra validators."""

    def __init__(self, required=False, allow_none=False, validate=(), default=MISSING):
        self.required, self.allow_none, self.default = required, allow_none, default
        self.validators = validate if isinstance(validate, (list, tuple)) else [validate]

    def load(self, value):
        if value is None:
            if self.allow_none:
                return None
            raise Invalid(["Field may not be null."])
        value = self.convert(value)
        messages = [m for check in self.validators for m in [check(value)] if m]
        if messages:
            raise Invalid(messages)
        return value

    def convert(self, value):
        return value

    TYPE = {}                   # this field's JSON Schema (GET /openapi.json); validators add to it

    def openapi(self):
        out = dict(self.TYPE)
        for check in self.validators:
            out.update(getattr(check, "openapi", {}))
        if self.allow_none:
            out = {"anyOf": [out, {"type": "null"}]} if "type" not in out else {
                **out, "type": [out["type"], "null"]}
        return out


class String(Field):
    TYPE = {"type": "string"}

    def convert(self, value):
        if not isinstance(value, str):
            raise Invalid(["Not a valid string."])
        return value


class Integer(Field):
    """Integers as marshmallow coerces them: "10" and 10.0 pass, bools and 1.5 do not."""

    TYPE = {"type": ["integer", "string"], "format": "int64", "pattern": r"^\s*[+-]?[0-9]+\s*$",
            "description": "an integer; a string of one is taken too (marshmallow's coercion)"}

    def convert(self, value):
        if isinstance(value, bool):
            raise Invalid(["Not a valid integer."])
        number = None
        if isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and len(value) <= 40:
            with contextlib.suppress(ValueError):
                number = int(value.strip())
        if number is None:
            raise Invalid(["Not a valid integer."])
        # Every integer is stored or compared in SQLite, whose integers are signed 64-bit.
        if not INT64_MIN <= number <= INT64_MAX:
            raise Invalid(["Number out of range."])
        return number


class Boolean(Field):
    TYPE = {"enum": [True, False, 1, 0, "true", "True", "TRUE", "t", "T", "on", "On", "ON", "yes", "Yes", "YES", "y",
                     "Y", "1", "false", "False", "FALSE", "f", "F", "off", "Off", "OFF", "no", "No", "NO", "n", "N", "0"]}
    TRUE = {True, "true", "True", "TRUE", "t", "T", "on", "On", "ON", "yes", "Yes", "YES", "y", "Y", "1"}
    FALSE = {False, "false", "False", "FALSE", "f", "F", "off", "Off", "OFF", "no", "No", "NO", "n", "N", "0"}

    def convert(self, value):
        with contextlib.suppress(TypeError):
            if value in self.TRUE and not isinstance(value, float):
                return True
            if value in self.FALSE and not isinstance(value, float):
                return False
        raise Invalid(["Not a valid boolean."])


class Patterned(String):
    """A string its class's PATTERN must match (else MESSAGE)."""

    PATTERN, MESSAGE = re.compile(""), "Not valid."

    def convert(self, value):
        value = super().convert(value)
        if not self.PATTERN.match(value):
            raise Invalid([self.MESSAGE])
        return value


class URL(Patterned):
    """An absolute http(s)/ftp URL whose host has a dot-separated TLD, is an IP or localhost."""

    TYPE = {"type": "string", "format": "uri"}

    PATTERN = re.compile(
        r"^(?:https?|ftps?)://(?:[^\s:@/]+(?::[^\s@/]*)?@)?"
        r"(?:(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\.?|localhost|"
        r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[0-9a-f:.]+\])(?::\d{1,5})?(?:[/?#]\S*)?$", re.I)

    MESSAGE = "Not a valid URL."


class Email(Patterned):
    """An address with a dotted domain."""

    TYPE = {"type": "string", "format": "email"}
    PATTERN = re.compile(r"^[^@\s]+@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", re.I)
    MESSAGE = "Not a valid email address."


class DateTime(Field):
    """ISO-8601 datetime, loaded as epoch seconds (naive means UTC)."""

    TYPE = {"type": "string", "description": "ISO 8601 date and time; without a zone it is UTC"}

    def convert(self, value):
        try:
            return parse_iso(value)
        except (ValueError, TypeError):
            raise Invalid(["Not a valid datetime."])


class Duration(Field):
    """Seconds as an int or a string like "90", "30m", "1h30m", "2 days"."""

    TYPE = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "examples": ["90", "30m", "1h30m"]}]}

    PART = re.compile(r"(\d+)\s*(secs?|mins?|hours?|days?|[smhd])")
    UNITS = {"s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
             "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}

    def convert(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise Invalid(["Invalid duration format: Duration cannot be negative"])
            return value
        if not isinstance(value, str):
            raise Invalid([f"Invalid duration format: Duration must be string or int, got {type(value)}"])
        text = value.strip().lower()
        if not text:
            raise Invalid(["Invalid duration format: Duration cannot be empty"])
        if text.startswith("-"):
            raise Invalid(["Invalid duration format: Duration cannot be negative"])
        number = parse_uint(text)
        if number is not None:
            return number
        parts = self.PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
            raise Invalid([f"Invalid duration format: Invalid duration format: '{text}'"])
        return sum(int(n) * self.UNITS[u] for n, u in parts)


class List(Field):
    def __init__(self, inner, **kw):
        super().__init__(**kw)
        self.inner = inner

    def openapi(self):
        out = {"type": "array", "items": self.inner.openapi()}
        for check in self.validators:
            limits = getattr(check, "openapi", {})
            out.update({k.replace("Length", "Items"): v for k, v in limits.items()})
        return out

    def convert(self, value):
        if not isinstance(value, list):
            raise Invalid(["Not a valid list."])
        out, errors = [], {}
        for index, item in enumerate(value):
            try:
                out.append(self.inner.load(item))
            except Invalid as exc:
                errors[str(index)] = exc.errors
        if errors:
            raise Invalid(errors)
        return out


class Dict(Field):
    """A mapping; ``keys``/``values`` fields validate its entries when given."""

    def __init__(self, keys=None, values=None, **kw):
        super().__init__(**kw)
        self.keys, self.values = keys, values

    def openapi(self):
        out = {"type": "object"}
        if self.keys:
            out["propertyNames"] = self.keys.openapi()
        if self.values:
            out["additionalProperties"] = self.values.openapi()
        return out

    def convert(self, value):
        if not isinstance(value, dict):
            raise Invalid(["Not a valid mapping type."])
        out, errors = {}, {}
        for key, item in value.items():
            try:
                key = self.keys.load(key) if self.keys else key
            except Invalid as exc:
                errors.setdefault(str(key), {})["key"] = exc.errors
            try:
                out[key] = self.values.load(item) if self.values else item
            except Invalid as exc:
                errors.setdefault(str(key), {})["value"] = exc.errors
        if errors:
            raise Invalid(errors)
        return out


class Nested(Field):
    def __init__(self, schema, **kw):
        super().__init__(**kw)
        self.schema = schema

    def convert(self, value):
        return self.schema.load(value)

    def openapi(self):
        return self.schema.openapi()


class Schema:
    """A dict of fields; rejects unknown keys unless ``unknown="include"``.

    ``checks`` are schema-level functions returning an error message or None.
    """

    def __init__(self, fields, unknown="raise", checks=(), doc=None):
        """``doc``: the JSON Schema of a schema whose rules are all in ``checks``."""
        self.fields, self.unknown, self.checks, self.doc = fields, unknown, checks, doc

    def openapi(self):
        """This schema as JSON Schema (OpenAPI 3.1): GET /openapi.json is made from the very objects
        that validate requests, so the two cannot drift apart."""
        if self.doc is not None:
            return self.doc
        out = {"type": "object", "properties": {name: field.openapi() for name, field in self.fields.items()}}
        required = [name for name, field in self.fields.items() if field.required]
        if required:
            out["required"] = required
        if self.unknown == "raise":
            out["additionalProperties"] = False
        notes = [getattr(check, "__doc__", None) for check in self.checks]
        if any(notes):
            out["description"] = " ".join(n.strip() for n in notes if n)
        return out

    def load(self, data):
        if not isinstance(data, dict):
            raise Invalid({"_schema": ["Invalid input type."]})
        out, errors = {}, {}
        for name, field in self.fields.items():
            if name not in data:
                if field.required:
                    errors[name] = ["Missing data for required field."]
                elif field.default is not MISSING:
                    out[name] = field.default() if callable(field.default) else field.default
                continue
            try:
                out[name] = field.load(data[name])
            except Invalid as exc:
                errors[name] = exc.errors
        for name in data:
            if name not in self.fields:
                if self.unknown == "raise":
                    errors[name] = ["Unknown field."]
                else:
                    out[name] = data[name]
        if not errors:
            messages = [m for check in self.checks for m in [check(out)] if m]
            if messages:
                errors["_schema"] = messages
        if errors:
            raise Invalid(errors)
        return out


class OneOfSchema(Field):
    """The first schema that loads wins; none → ``message`` at ``_schema``."""

    def __init__(self, schemas, message, **kw):
        super().__init__(**kw)
        self.schemas, self.message = schemas, message

    def convert(self, value):
        for schema in self.schemas:
            with contextlib.suppress(Invalid):
                return schema.load(value)
        raise Invalid({"_schema": [self.message]})

    def openapi(self):
        out = {"anyOf": [schema.openapi() for schema in self.schemas], "description": "the first that loads wins"}
        return {"anyOf": [out, {"type": "null"}]} if self.allow_none else out


def _described(check, **schema):
    """A validator that also says what it checks, as JSON Schema keywords."""
    check.openapi = schema
    return check


def one_of(*choices):
    """Validator: value must be one of ``choices`` (marshmallow's wording)."""
    text = "Must be one of: " + ", ".join(choices) + "."
    return _described(lambda value: None if value in choices else text, enum=list(choices))


def matches(pattern):
    regex = re.compile(pattern)
    return _described(lambda value: None if regex.match(value) else "String does not match expected pattern.",
                      pattern=pattern)


def length(min=None, max=None):
    def check(value):
        if min is not None and len(value) < min:
            return f"Shorter than minimum length {min}."
        if max is not None and len(value) > max:
            return f"Longer than maximum length {max}."
    limits = {"minLength": min, "maxLength": max}
    return _described(check, **{k: v for k, v in limits.items() if v is not None})


def at_least(low):
    return _described(lambda value: None if value >= low else f"Must be greater than or equal to {low}.",
                      minimum=low)


# -- strict JSON -------------------------------------------------------------------
#
# Every JSON document that arrives from outside (request bodies, token segments, webhook answers)
# is read here: nothing deeper than JSON_MAX_DEPTH, no NaN/Infinity, no number that does not fit
# (integers: SQLite's signed 64 bits), no lone surrogate — so nothing stored can break a later read.

JSON_MAX_DEPTH = 64             # nesting of arrays and objects
JSON_MAX_NUMBER = 40            # characters of one number literal
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    """Well-formed JSON that the hub does not accept (too deep, NaN, a lone surrogate, a huge number)."""


def _json_int(text):
    value = int(text) if len(text) <= 20 else None
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise JsonRefused("an integer does not fit in 64 bits")
    return value


def _json_float(text):
    value = float(text) if len(text) <= JSON_MAX_NUMBER else float("inf")
    if not math.isfinite(value):
        raise JsonRefused("a number is too long or too large")
    return value


def _json_constant(name):
    raise JsonRefused(f"{name} is not a JSON number")


def load_json(text):
    """Strict JSON: ValueError when it is not JSON, JsonRefused when it is JSON the hub refuses."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")        # strictly: json.loads(bytes) would let surrogates through
    if text.startswith("\ufeff"):
        text = text[1:]                    # a UTF-8 byte order mark, as json.loads(bytes) allowed
    try:
        value = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except RecursionError:
        raise JsonRefused(f"nested deeper than {JSON_MAX_DEPTH} levels")
    escapes = _SURROGATE_ESCAPE.search(text) is not None
    if escapes or text.count("[") + text.count("{") > JSON_MAX_DEPTH:      # cheap for the usual body
        stack = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node, (dict, list)):
                if depth > JSON_MAX_DEPTH:
                    raise JsonRefused(f"nested deeper than {JSON_MAX_DEPTH} levels")
                items = node.items() if isinstance(node, dict) else enumerate(node)
                for key, item in items:
                    if escapes and isinstance(key, str) and _SURROGATE.search(key):
                        raise JsonRefused("a string holds a lone surrogate")
                    stack.append((item, depth + 1))
            elif escapes and isinstance(node, str) and _SURROGATE.search(node):
                raise JsonRefused("a string holds a lone surrogate")
    return value


# -- Testflinger schemas --------------------------------------------------------------

PHASES = ("setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup")
SEARCH_STATES = ("setup", "provision", "firmware_update", "test", "allocate", "allocated", "reserve",
                 "cleanup", "cancelled", "completed", "active",
                 # accepted by agenthub, not by the original (spec §9): the real states
                 "waiting", "running", "complete")
ROLES = ("admin", "manager", "contributor", "agent")

ATTACHMENT = Schema({"agent": String(required=True), "device": String()})
ATTACHMENTS = List(Nested(ATTACHMENT))


def _requires_one_of(*names, exactly=False):
    def check(data):
        given = [n for n in names if data.get(n)]
        if not given:
            return ("One of 'url', 'urls', or a provision attachment must be provided." if exactly
                    else "Either 'url' or 'use_attachment' must be provided.")
        if exactly and len(given) > 1:
            return f"Provide only one boot image source; got multiple: {given}."
    return check


_IOT_BASE = {"provisioning_timeout": Integer(), "url": URL(), "urls": List(URL(), validate=length(min=1)),
             "attachments": List(Nested(ATTACHMENT), validate=length(max=1)), "agent_ssh_access": Boolean()}
_IOT_CHECK = (_requires_one_of("url", "urls", "attachments", exactly=True),)
_ROBOT = {"robot_tasks": List(String(), required=True), "robot_retries": Integer(),
          "provisioning_timeout": Integer()}

# Tried in this order; the first that loads wins (as the original's OneOfSchema).
PROVISION_SCHEMAS = [
    Schema({"url": URL(required=True)}),                                             # cm3
    Schema({"distro": String(), "kernel": String(), "user_data": String(),          # maas
            "disks": List(Dict()), "ephemeral": Boolean()}),
    Schema({"jobs": List(Dict(), required=True, validate=length(min=1))}),           # multi
    Schema({"url": URL(), "use_attachment": String(), "attachments": ATTACHMENTS,    # muxpi
            "create_user": Boolean(), "boot_check_url": String(),
            "media": String(validate=one_of("sd", "usb"))},
           checks=(_requires_one_of("url", "use_attachment"),)),
    Schema({"skip": Boolean(default=True)}),                                         # noprovision
    Schema({"url": URL(), "attachments": ATTACHMENTS, "token_file": String(),        # oem_autoinstall
            "user_data": String(), "redeploy_cfg": String(), "authorized_keys": String(),
            "control_host_iso_url": String(), "control_host_iso_type": String(),
            "update_user_data": Boolean()}),
    Schema({"url": URL(required=True)}),                                             # oem_script
    Schema({**_IOT_BASE, "ubuntu_sso_email": Email(), "provision_plan": Dict(required=True)},
           checks=_IOT_CHECK),                                                       # control_host_iot_custom
    Schema({**_IOT_BASE, "preset": String(required=True), "preset_kwargs": Dict()},
           checks=_IOT_CHECK),                                                       # control_host_iot_preset
    Schema({**_ROBOT, "url": URL(required=True), "autoinstall_storage_layout": String(),
            "ubuntu_sso_email": Email(), "autoinstall_base_user_data": String(),
            "autoinstall_oem": Boolean(), "cmdline_append": String()}),             # control_host_kvm_autoinstall
    Schema({**_ROBOT, "url": URL(required=True), "live_image": Boolean(required=True),
            "wait_until_ssh": Boolean(required=True)}),                              # control_host_kvm_generic
    Schema({**_ROBOT, "alloem_url": URL(required=True), "url": URL(), "oem": String()}),  # kvm_oem_2204
    Schema({"provisioning_timeout": Integer(), "alloem_url": URL(),                  # control_host_kvm_preset
            "autoinstall_base_user_data": String(), "autoinstall_oem": Boolean(),
            "autoinstall_storage_layout": String(), "cmdline_append": String(), "live_image": Boolean(),
            "oem": String(), "preset": String(required=True), "robot_tasks": List(String()),
            "ubuntu_sso_email": Email(), "url": URL(), "wait_until_ssh": Boolean()}),
]

JOB_SCHEMA = Schema({
    "job_id": String(), "parent_job_id": String(), "name": String(),
    "tags": List(String()),
    "job_queue": String(required=True, validate=length(min=1)),
    "global_timeout": Integer(), "output_timeout": Integer(), "allocation_timeout": Integer(),
    "provision_data": OneOfSchema(PROVISION_SCHEMAS, "Invalid provision data schema.", allow_none=True),
    "firmware_update_data": Dict(),
    "test_data": Nested(Schema({
        "test_cmds": String(), "attachments": ATTACHMENTS,
        "test_username": String(), "test_password": String(),
        "secrets": Dict(keys=String(validate=matches(r"^[a-zA-Z_][a-zA-Z0-9_]*$")),
                        values=String(validate=matches(r"^[a-zA-Z0-9_/-]+$"))),
    })),
    "allocate_data": Dict(),
    # A null timeout passes the original's schema and then crashes its permission check (500);
    # here null simply means "the default".
    "reserve_data": Nested(Schema({"ssh_keys": List(String(validate=matches(r"^(lp|gh):(\S+)$"))),
                                   "timeout": Duration(allow_none=True)})),
    "job_status_webhook": String(),
    "job_priority": Integer(),
    "exclude_agents": List(String(), default=list),
    "debug": Boolean(),
})
ACTION_SCHEMA = Schema({"action": String(required=True, validate=one_of("cancel"))})
RESULT_SCHEMA = Schema({"status": Dict(keys=String(validate=one_of(*PHASES)), values=Integer()),
                        "device_info": Dict(), "job_state": String(),
                        "agent_id": String()})                       # since Testflinger #1253
LOG_POST_SCHEMA = Schema({"fragment_number": Integer(required=True), "timestamp": DateTime(required=True),
                          "phase": String(required=True, validate=one_of(*PHASES)),
                          "log_data": String(required=True)})
LOG_QUERY_SCHEMA = Schema({"start_fragment": Integer(validate=at_least(0)), "start_timestamp": DateTime(),
                           "phase": String(validate=one_of(*PHASES)),
                           "attempt": Integer(validate=at_least(1))})         # an agenthub extension
ATTEMPT_QUERY_SCHEMA = Schema({"attempt": Integer(validate=at_least(1))})
SUMMARY_QUERY_SCHEMA = Schema({"queue": List(String()), "agent": String()})
SEARCH_SCHEMA = Schema({"tags": List(String()), "match": String(validate=one_of("any", "all")),
                        "state": List(String(validate=one_of(*SEARCH_STATES))),
                        "limit": Integer(validate=at_least(0)), "offset": Integer(validate=at_least(0))})
PAGE_SCHEMA = Schema({"limit": Integer(validate=at_least(0)), "offset": Integer(validate=at_least(0))})
AGENT_SCHEMA = Schema({"identifier": String(), "job_id": String(), "location": String(),
                       "log": List(String()), "provision_type": String(), "queues": List(String()),
                       "state": String(), "comment": String()})
PROVISION_LOG_SCHEMA = Schema({"job_id": String(required=True), "exit_code": Integer(required=True),
                               "detail": String()})
REFRESH_SCHEMA = Schema({"refresh_token": String(required=True, validate=length(min=1))})
CLIENT_PERMISSIONS_SCHEMA = Schema({
    "client_secret": String(validate=length(min=15)),
    "max_priority": Dict(keys=String(), values=Integer()),
    "max_reservation_time": Dict(keys=String(), values=Integer()),
    "role": String(validate=one_of(*ROLES)),
    "email": Email(),
})
RESTRICTED_QUEUE_SCHEMA = Schema({"client_id": String(required=True)})
SECRET_SCHEMA = Schema({"value": String(required=True, validate=length(min=1)),
                        "expire_after": Integer(allow_none=True, validate=at_least(1)),
                        "ephemeral": Boolean(default=False)},
                       checks=(lambda d: "Provide either 'ephemeral' or 'expire_after', not both."
                               if d.get("ephemeral") and d.get("expire_after") else None,))
STATUS_UPDATE_SCHEMA = Schema({
    "agent_id": String(), "job_queue": String(), "job_status_webhook": URL(required=True),
    "events": List(Nested(Schema({"event_name": String(required=True), "timestamp": String(required=True),
                                  "detail": String()}))),
})


def _queues_check(data):
    for key, value in data.items():
        if not key:
            return "Queue names must be non-empty strings"
        if not isinstance(value, str):
            return f"Description for queue '{key}' must be a string"


def _images_check(data):
    for queue_name, images in data.items():
        if not queue_name:
            return "Queue names must be non-empty strings"
        if not isinstance(images, dict):
            return f"Images for queue '{queue_name}' must be a dict"
        for name, provision in images.items():
            if not name or name.startswith("$") or "." in name or "\x00" in name:
                return (f"Names for queue '{queue_name}' must be non-empty strings,"
                        " must not start with '$', contain '.' or null bytes")
            if not isinstance(provision, str):
                return f"Provision data for image '{name}' in queue '{queue_name}' must be a string"


QUEUES_SCHEMA = Schema({}, unknown="include", checks=(_queues_check,), doc={
    "type": "object", "description": "queue name: its description", "propertyNames": {"minLength": 1},
    "additionalProperties": {"type": "string"}})
IMAGES_SCHEMA = Schema({}, unknown="include", checks=(_images_check,), doc={
    "type": "object", "description": "queue name: {image name: provision data or URL}",
    "additionalProperties": {"type": "object"}})


###############################################################################
# Auth ########################################################################
###############################################################################

SCRYPT_N = 2 ** 14        # scrypt's cost (~60 ms a hash here); each stored hash records its own


def hash_secret(secret):
    """A slow salted hash (scrypt) so a leaked database does not give away client secrets."""
    salt, n = secrets.token_bytes(16), SCRYPT_N
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=8, p=1, dklen=32)
    return f"scrypt${n}$8$1${salt.hex()}${digest.hex()}"


def check_secret(secret, stored):
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(digest) // 2)
    except (ValueError, AttributeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_encode(claims, key):
    """HS256 JSON Web Token, as PyJWT makes them."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(signature)}"


def jwt_decode(token, key, leeway, now):
    """Verify an HS256 token; raise ApiError with the original server's status and message."""
    try:
        head_b64, body_b64, sig_b64 = token.split(".")
        header = load_json(_unb64url(head_b64))
        claims = load_json(_unb64url(body_b64))
        signature = _unb64url(sig_b64)
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise ValueError("not an object")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(403, "Unable to decode token")
    if header.get("alg") != "HS256":
        raise ApiError(403, "Invalid Token")
    expected = hmac.new(key.encode(), f"{head_b64}.{body_b64}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise ApiError(403, "Invalid Token signature")
    for claim in ("exp", "iat", "sub"):
        if claim not in claims:
            raise ApiError(403, f"Token missing required claim: {claim}")
    return jwt_check_times(claims, leeway, now)


def jwt_check_times(claims, leeway, now):
    """The time rules of a signed token's claims (checked on every use)."""
    exp, iat = claims["exp"], claims["iat"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (exp, iat)):
        raise ApiError(403, "Invalid Token")
    if iat > now + leeway:
        raise ApiError(401, "Token not yet valid")
    if exp <= now - leeway:
        raise ApiError(401, "Token has expired")
    return claims


@dataclasses.dataclass
class Identity:
    """Who is calling: role None means "not allowed anywhere gated"."""

    role: str = None
    client_id: str = None
    permissions: dict = dataclasses.field(default_factory=dict)


def server_key(config):
    """The server's secret key: configured, or kept in ``<db>.key`` (mode 0600) beside the
    database — never in the database itself, which must not reveal the secrets it stores."""
    if config.secret_key:
        return config.secret_key
    if is_postgres_url(config.db):
        raise StartupError("with a PostgreSQL database give --secret-key (AGENTHUB_SECRET_KEY), the same to"
                           " every agenthub process: it signs the tokens and seals the secrets they all share")
    if config.db in (":memory:", ""):
        return secrets.token_hex(32)
    path = config.db + ".key"
    try:
        with open(path) as fh:
            key = fh.read().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"key file {path}: {exc.strerror or exc}")
    key = secrets.token_hex(32)
    try:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(key + "\n")
    except FileExistsError:            # another process made it first: use theirs
        with open(path) as fh:
            return fh.read().strip()
    return key


ROLE_RANK = {"agent": 0, "contributor": 1, "manager": 2, "admin": 3}


@functools.lru_cache(maxsize=1)
def _decoy_hash():
    """A hash no secret matches, checked for unknown client ids so that they cost what known ones do."""
    return hash_secret(secrets.token_urlsafe(24))


class LoginThrottle:
    """Back-off after failed logins, per client id and per address: FREE failures in a row are
    free, then each further attempt waits 2, 4, 8 … up to MAX_DELAY seconds after the last
    failure.  A success clears the client id's count; quiet for WINDOW seconds clears any count.
    Kept in memory (per process), bounded."""

    FREE, MAX_DELAY, WINDOW, LIMIT = 5, 300.0, 900.0, 10000

    def __init__(self):
        self._failures, self._lock = {}, threading.Lock()       # key → (count, last failure)

    def wait(self, keys, now):
        """Seconds until an attempt for ``keys`` is allowed (0: now)."""
        longest = 0.0
        with self._lock:
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                if count >= self.FREE and now - last < self.WINDOW:
                    longest = max(longest, last + min(2.0 ** (count - self.FREE + 1), self.MAX_DELAY) - now)
        return max(0.0, longest)

    def failed(self, keys, now):
        with self._lock:
            if len(self._failures) >= self.LIMIT:
                self._failures = {k: v for k, v in self._failures.items() if now - v[1] < self.WINDOW}
                if len(self._failures) >= self.LIMIT:
                    self._failures.clear()
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                self._failures[key] = (count + 1 if now - last < self.WINDOW else 1, now)

    def succeeded(self, keys):
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
SYSTEM_ADMIN = "testflinger-admin"


class Auth:
    """Clients, their secrets and tokens; the role of each request."""

    def __init__(self, store, config, key=None, agents=None):
        """``store``: clients, tokens, restricted queues; ``agents``: which queues exist."""
        self.store, self.config, self.agents = store, config, agents
        self.key = key or server_key(config)
        # Tokens whose signature was verified: an agent sends the same token for ten minutes, and
        # checking the signature once is enough (the times are still checked on every request).
        self._verified, self._verified_lock = {}, threading.Lock()
        self.throttle = LoginThrottle()

    def add_client(self, client_id, role=None, secret=None):
        """Create or reset a client (see ``reset_client``); returns its (new) secret."""
        return self.reset_client(client_id, role, secret)[0]

    def reset_client(self, client_id, role=None, secret=None):
        """Create a client, or give an existing one a new secret (keeping its role unless ``role``
        is given; its refresh tokens and web sessions are revoked).  Returns (secret, role, revoked)
        where revoked counts (refresh tokens, sessions)."""
        secret = secret or secrets.token_urlsafe(24)
        current = self.store.get_client(client_id)
        role = role or (current["role"] if current is not None and current["role"] else "contributor")
        self.store.upsert_client(client_id, hash_secret(secret), role, utcnow())
        revoked = self.store.revoke_client_tokens(client_id) if current is not None else (0, 0)
        return secret, role, revoked

    def permissions(self, client_id):
        row = self.store.get_client(client_id)
        if row is None:
            return None
        perms = {"client_id": row["client_id"], "role": row["role"]}
        for key in ("max_priority", "allowed_queues", "max_reservation_time"):
            if row[key] is not None:
                perms[key] = json.loads(row[key])
        if row["email"] is not None:
            perms["email"] = row["email"]
        return perms

    def access_token(self, permissions):
        now = int(utcnow())
        return jwt_encode({"exp": now + self.config.access_token_seconds, "iat": now,
                           "sub": "access_token", "permissions": permissions}, self.key)

    def refresh_token(self, client_id, days=None):
        """A 48-character opaque token; only its sha256 is stored."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        token = "".join(secrets.choice(alphabet) for _ in range(48))
        now = utcnow()
        days = self.config.refresh_token_days if days is None else days
        self.store.add_refresh_token(_sha256(token), client_id, now, now + days * 86400)
        return token

    def login(self, authorization, addr=None):
        """``POST /v1/oauth2/token``: HTTP Basic client credentials → token pair."""
        if not authorization:
            raise ApiError(401, "No authorization header specified", text=True)
        try:
            scheme, _, encoded = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise ValueError(scheme)
            client_id, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            if not sep or not client_id or not secret:
                raise ValueError("incomplete")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ApiError(401, "Client id and key must be specified in authorization header", text=True)
        return self.login_with(client_id, secret, addr)

    def check_login(self, client_id, secret, addr=None):
        """Whether the credentials match.  Unknown ids cost what known ones do (a decoy hash is
        checked); repeated failures per client id and per address back off (ApiError 429)."""
        keys = [("client", client_id)] + ([("addr", addr)] if addr else [])
        now = time.monotonic()
        wait = self.throttle.wait(keys, now)
        if wait:
            seconds = math.ceil(wait)
            raise ApiError(429, f"Too many failed logins: try again in {seconds} s", text=True,
                           headers={"Retry-After": str(seconds)})
        row = self.store.get_client(client_id)
        stored = row["secret_hash"] if row is not None and row["secret_hash"] else None
        matched = check_secret(secret, stored or _decoy_hash()) and stored is not None
        if matched:
            self.throttle.succeeded(keys[:1])
        else:
            self.throttle.failed(keys, now)
        return matched

    def login_with(self, client_id, secret, addr=None):
        """Client credentials → token pair (a 401 ApiError when they do not match)."""
        if not self.check_login(client_id, secret, addr):
            raise ApiError(401, "Invalid client id or client key", text=True)
        return {"access_token": self.access_token(self.permissions(client_id)), "token_type": "Bearer",
                "expires_in": self.config.access_token_seconds, "refresh_token": self.refresh_token(client_id)}

    def refresh(self, token):
        """``POST /v1/oauth2/refresh``: a stored refresh token → a new access token."""
        return {"access_token": self.access_token(self.refresh_permissions(token)), "token_type": "Bearer",
                "expires_in": self.config.access_token_seconds}

    def refresh_permissions(self, token):
        """The current permissions of a live refresh token's client (stamping its last use);
        ApiError(400) with the original's texts when it is unknown, revoked or expired."""
        now = utcnow()
        row = self.store.use_refresh_token(_sha256(token), now)
        if row is None:
            raise ApiError(400, "Invalid refresh token.")
        if row["revoked"]:
            raise ApiError(400, "Refresh token revoked.")
        if row["expires_at"] < now:
            raise ApiError(400, "Refresh token expired")
        permissions = self.permissions(row["client_id"])
        if permissions is None:
            raise ApiError(400, "Invalid refresh token.")
        return permissions

    def revoke(self, token):
        outcome = self.store.revoke_refresh_token(_sha256(token))
        if outcome is None:
            raise ApiError(400, "Refresh token not found")
        if outcome == "already":
            raise ApiError(400, "Refresh token has already been revoked")

    # -- client permissions (spec §2.5) --------------------------------------------

    def client_permissions(self, client_id=None):
        """One client's permissions (None if unknown), or every client's as a list."""
        rows = self.store.list_clients() if client_id is None else [self.store.get_client(client_id)]
        out = []
        for row in rows:
            if row is None:
                return None
            entry = {"client_id": row["client_id"]}
            for key in AuthStore.CLIENT_JSON:
                if row[key] is not None:
                    entry[key] = json.loads(row[key])
            entry["role"] = row["role"] or "contributor"
            if row["email"] is not None:
                entry["email"] = row["email"]
            out.append(entry)
        return out if client_id is None else out[0]

    def set_client_permissions(self, caller, client_id, data):
        """Create or update a client; a caller never acts above its own role."""
        if client_id == SYSTEM_ADMIN:
            raise ApiError(422, "Error: System admin client cannot by modified from API.")
        data = dict(data)
        secret = data.pop("client_secret", None)
        current = self.store.get_client(client_id)
        if current is None and not secret:
            raise ApiError(400, "Error: Missing client_secret in request body for new client")
        current_role = current["role"] if current is not None else "contributor"
        if ROLE_RANK[caller.role] < ROLE_RANK[current_role]:
            raise ApiError(403, f"{caller.client_id} has insufficient permissions to modify client '{client_id}'")
        new_role = data.get("role")
        if new_role and ROLE_RANK[caller.role] < ROLE_RANK[new_role]:
            raise ApiError(403, f"{caller.client_id} has insufficient permissions to assign role "
                                f"'{new_role}' to client '{client_id}'")
        if secret:
            data["secret_hash"] = hash_secret(secret)
        if current is None:
            data.setdefault("role", "contributor")
        self.store.save_client(client_id, data, utcnow())
        if secret and current is not None:
            self.store.revoke_client_tokens(client_id)        # a new secret ends what the old one began
        verb = "Created" if current is None else "Updated"
        return f"{verb} permissions for client '{client_id}'"

    def delete_client(self, client_id):
        if client_id == SYSTEM_ADMIN:
            raise ApiError(422, "Error: System admin client cannot by deleted from API.")
        if not self.store.delete_client(client_id):
            raise ApiError(404, "Error: Specified client_id does not exist.")

    # -- restricted queues ---------------------------------------------------------------

    def restricted_queues(self, queue_name=None):
        names = self.store.restricted_queues()
        if queue_name is not None:
            if queue_name not in names:
                raise ApiError(404, "Error: Restricted queue not found.")
            names = [queue_name]
        owners = self.store.restricted_owners(names)
        found = [{"queue": q, "owners": owners.get(q, [])} for q in names]
        return found if queue_name is None else found[0]

    def restrict_queue(self, queue_name, client_id):
        if not client_id:
            raise ApiError(400, "Error: Missing client ID.")
        if self.store.get_client(client_id) is None:
            raise ApiError(404, "Error: Specified client_id does not exist.")
        if not self.agents.queue_exists(queue_name):
            raise ApiError(404, "Error: No agent is associated with the specified queue.")
        self.store.restrict_queue(queue_name, client_id)

    def unrestrict_queue(self, queue_name, client_id):
        if not self.store.is_restricted(queue_name):
            raise ApiError(404, "Error: Restricted queue not found.")
        if not client_id:
            raise ApiError(400, "Error: Missing client ID.")
        self.store.unrestrict_queue(queue_name, client_id)

    def token_identity(self, token):
        """The client behind a Testflinger access token used on another API, or None when it is
        not one (unsigned, expired, without a known role)."""
        if not looks_like_jwt(token):
            return None
        try:
            identity = self.identify("Bearer " + token)
        except ApiError:
            return None
        return identity if identity.role is not None else None

    def anyone_can_log_in(self):
        """Whether some client has a secret (with --require-auth nothing works before one has)."""
        return any(row["secret_hash"] for row in self.store.list_clients())

    # -- web sessions: a random id in the cookie, its hash in the database ----------------

    def start_session(self, client_id, replaces=None):
        """A new session for ``client_id`` (the cookie value); the session ``replaces`` ends."""
        value, now = secrets.token_urlsafe(32), utcnow()
        self.store.add_session(_sha256(value), client_id, now, now + self.config.refresh_token_days * 86400,
                               _sha256(replaces) if replaces else None)
        return value

    def session_identity(self, value):
        """The identity behind a web session cookie, or None (unknown, ended, expired, client gone)."""
        if not value or len(value) > 128:
            return None
        row = self.store.get_session(_sha256(value), utcnow())
        permissions = self.permissions(row["client_id"]) if row is not None else None
        if permissions is None:
            return None
        return Identity(role=permissions["role"], client_id=permissions["client_id"], permissions=permissions)

    def end_session(self, value):
        if value and len(value) <= 128:
            self.store.end_session(_sha256(value))

    def csrf_token(self, binding):
        """The form token of a browser: a MAC of its session (or pre-session) cookie value."""
        return hmac.new(self.key.encode(), b"agenthub csrf\0" + binding.encode(), hashlib.sha256).hexdigest()[:40]

    def identify(self, authorization):
        """The caller's identity from the ``Authorization`` header (JWT errors raise ApiError)."""
        if not authorization:
            if self.config.require_auth:
                return Identity()
            return Identity(role="contributor")
        token, now = bearer_token(authorization), utcnow()
        if not token:
            return Identity()
        claims = self._verified.get(token)
        if claims is None:
            claims = jwt_decode(token, self.key, self.config.jwt_leeway, now)
            with self._verified_lock:
                if len(self._verified) >= 4096:
                    self._verified.clear()
                self._verified[token] = claims
        else:
            jwt_check_times(claims, self.config.jwt_leeway, now)
        permissions = claims.get("permissions")
        # The original crashes (500) on a token without permissions.client_id; it is refused here.
        if not isinstance(permissions, dict) or not isinstance(permissions.get("client_id"), str):
            raise ApiError(403, "Invalid Token")
        role = permissions.get("role", "contributor")
        role = role.lower() if isinstance(role, str) and role.lower() in ROLES else None
        return Identity(role=role, client_id=permissions["client_id"], permissions=permissions)

    def require(self, identity, roles):
        """Refuse the request unless the identity has one of ``roles`` (listed as the original does)."""
        if self.config.require_auth and identity.client_id is None:
            raise ApiError(401, "Authentication is required for specified endpoint")
        if identity.role not in roles:
            raise ApiError(403, "Specified action requires role: " + ", ".join(roles))


# -- Consul ACL tokens of the event API -------------------------------------------------

@dataclasses.dataclass
class EventToken:
    name: str
    read: list
    write: list

    def allows(self, access, event_name):
        prefixes = self.write if access == "write" else self.read + self.write   # write implies read
        return any(event_name.startswith(prefix) for prefix in prefixes)


class EventAcl:
    """Who may fire or read which events: tokens with name prefixes, then the default policy.
    A Testflinger client's access token is an ACL token too: manager/admin write (and read)
    every event, the other roles read every event.  ``--require-auth`` makes the default deny."""

    def __init__(self, store, default, clients=None):
        """``clients``: token → Identity or None (Auth.token_identity)."""
        self.store, self.default, self.clients = store, default, clients

    def add_token(self, name, read, write, secret=None):
        secret = secret or str(uuid.uuid4())
        self.store.upsert_event_token(name, _sha256(secret), list(read), list(write), utcnow())
        return secret

    def resolve(self, secret):
        """The token for ``secret`` (None when no token was given); unknown → ApiError 403."""
        if not secret:
            return None
        row = self.store.event_token(_sha256(secret))
        if row is None:
            identity = self.clients(secret) if self.clients and looks_like_jwt(secret) else None
            if identity is None:
                raise ApiError(403, "ACL not found")
            return EventToken("client:" + identity.client_id, [""], [""] if identity.role in MANAGE else [])
        return EventToken(row["name"], json.loads(row["read_prefixes"]), json.loads(row["write_prefixes"]))

    def allows(self, token, access, event_name):
        if token is not None and token.allows(access, event_name):
            return True
        return self.default == "allow"


# -- bearer tokens, Prefactor's API tokens, Rackspace's X-Auth-Token ------------------------

def bearer_token(authorization):
    """The token of an ``Authorization: Bearer …`` header (every API reads bearer tokens here), or None."""
    if authorization and authorization.startswith("Bearer "):
        return authorization[7:].strip() or None
    return None


# The one auth model (README "Who may do what"): Testflinger clients are credentials on every
# API, beside each API's own (Prefactor's --api-token, Rackspace's --rackspace-token, Consul ACL
# tokens).  An API is closed when --require-auth is on or when its own tokens are configured;
# a closed API needs a credential for everything but its public reads.  On the registry APIs a
# client's role decides: any role reads, agent/manager/admin report (instances, agent events),
# manager/admin manage agents; on the event API manager/admin fire and any role reads.

READ, REPORT, MANAGE = ROLES, ("admin", "manager", "agent"), ("admin", "manager")


def looks_like_jwt(token):
    return bool(token) and token.count(".") == 2


class ApiTokens:
    """Who may use the registry APIs and the GoCD health messages: Prefactor's bearer tokens
    (``--api-token``), Rackspace's ``X-Auth-Token`` values (``--rackspace-token token[:project]``)
    and, on both, Testflinger clients' access tokens."""

    def __init__(self, config, auth):
        self.config, self.auth = config, auth
        self.prefactor = {t.strip() for t in config.api_tokens.split(",") if t.strip()}
        self.rackspace = {}
        for entry in config.rackspace_tokens.split(","):
            token, _, project = entry.strip().partition(":")
            if token:
                self.rackspace[token] = project or None

    @property
    def prefactor_closed(self):
        return bool(self.prefactor) or self.config.require_auth

    @property
    def rackspace_closed(self):
        return bool(self.rackspace) or self.config.require_auth

    def check_prefactor(self, authorization, need):
        """Who is calling /api/v1, as an idempotency scope ('' in the open mode); 401/403
        ApiErrors in Prefactor's words.  ``need``: the roles a client's token must have."""
        if not self.prefactor_closed:
            return ""
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(401, "Missing or invalid Authorization header")
        if token in self.prefactor:
            return "token:" + _sha256(token)
        identity = self.auth.token_identity(token)
        if identity is None:
            raise ApiError(401, "Invalid API token", code="bad_authtoken")
        if identity.role not in need:
            raise ApiError(403, "This action requires one of the roles " + ", ".join(need))
        return "client:" + identity.client_id

    def rackspace_project(self, token, need):
        """The project a Rackspace token is bound to (None: any); 401 for a missing or unknown
        token, 403 for a client whose role is not in ``need``.  Open mode: any non-empty token."""
        token = token.strip()
        if not token:
            raise ApiError(401, "Unauthorized.")
        if token in self.rackspace:
            return self.rackspace[token]
        if not self.rackspace_closed:
            return None
        identity = self.auth.token_identity(token)
        if identity is None:
            raise ApiError(401, "Unauthorized.")
        if identity.role not in need:
            raise ApiError(403, "Forbidden.")
        return None

    def check_client(self, authorization):
        """The read-only pages of other APIs (GoCD's health messages): any client in the
        --require-auth mode, anyone otherwise."""
        if not self.config.require_auth:
            return
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(401, "Authentication is required")
        if self.auth.token_identity(token) is None:
            raise ApiError(401, "Invalid token")


def _sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


###############################################################################
# Secrets #####################################################################
###############################################################################
#
# Job secrets live in the database encrypted with a key derived from the
# server's secret key (kept outside the database).  Standard library only: an
# HMAC-SHA256 keystream (a stream cipher in counter mode) with a random nonce
# per value, and an HMAC-SHA256 tag over nonce, owner, path and ciphertext, so
# a value can be neither read nor swapped to another path without the key.

SECRET_PATH = re.compile(r"^[a-zA-Z0-9_-]+(?:/[a-zA-Z0-9_-]+)*$")
DEFAULT_SECRET_SECONDS = 365 * 86400


class SecretBox:
    def __init__(self, server_secret):
        root = server_secret.encode()
        self.enc_key = hmac.new(root, b"agenthub secrets: encryption", hashlib.sha256).digest()
        self.mac_key = hmac.new(root, b"agenthub secrets: authentication", hashlib.sha256).digest()

    def _stream(self, nonce, length):
        blocks = (hmac.new(self.enc_key, nonce + n.to_bytes(8, "big"), hashlib.sha256).digest()
                  for n in range((length + 31) // 32))
        return b"".join(blocks)[:length]

    def _tag(self, nonce, owner, path, ciphertext):
        label = json.dumps([owner, path]).encode()
        return hmac.new(self.mac_key, nonce + len(label).to_bytes(4, "big") + label + ciphertext,
                        hashlib.sha256).digest()

    def seal(self, owner, path, value):
        data, nonce = value.encode(), secrets.token_bytes(16)
        ciphertext = bytes(a ^ b for a, b in zip(data, self._stream(nonce, len(data))))
        return b"v1" + nonce + self._tag(nonce, owner, path, ciphertext) + ciphertext

    def open(self, owner, path, sealed):
        """The value, or None when the stored bytes fail their tag (tampered, or another key)."""
        if not sealed.startswith(b"v1") or len(sealed) < 50:
            return None
        nonce, tag, ciphertext = sealed[2:18], sealed[18:50], sealed[50:]
        if not hmac.compare_digest(tag, self._tag(nonce, owner, path, ciphertext)):
            return None
        return bytes(a ^ b for a, b in zip(ciphertext, self._stream(nonce, len(ciphertext)))).decode()


class Secrets:
    """The secrets store of spec §2.8, kept in the database."""

    def __init__(self, store, box):
        self.store, self.box = store, box

    def _check(self, identity, client_id, path):
        if not identity.client_id:
            raise ApiError(401, "A login (known client_id) is required to securely store information.")
        if client_id != identity.client_id:
            raise ApiError(403, f"'{client_id}' doesn't match authenticated client id")
        if not SECRET_PATH.match(path):
            raise ApiError(422, f"Invalid value '{path}', not a valid path. \nPaths must only contain "
                                "alphanumeric characters, hyphens (-), underscores (_), and forward slashes (/)."
                                " Additionally, paths must not start or end with a forward slash (/).")

    def write(self, identity, client_id, path, data):
        """Store a value; returns when it expires (None: never, or single use)."""
        self._check(identity, client_id, path)
        now = utcnow()
        ephemeral = data.get("ephemeral", False)
        after = data.get("expire_after", DEFAULT_SECRET_SECONDS)
        expires_at = None if ephemeral or after is None else now + after
        self.store.put_secret(client_id, path, self.box.seal(client_id, path, data["value"]), ephemeral,
                              expires_at, now)
        return expires_at

    def delete(self, identity, client_id, path):
        self._check(identity, client_id, path)
        self.store.delete_secret(client_id, path)

    def missing(self, client_id, paths):
        """The paths among ``paths`` that ``client_id`` has no live secret at."""
        live = self.store.live_secret_paths(client_id, list(paths), utcnow()) if paths else set()
        return sorted(set(paths) - live)

    def resolve(self, client_id, mapping):
        """{ENV: path} → {ENV: value}; whatever cannot be read becomes "" (never an error)."""
        if not client_id or not mapping:
            return dict.fromkeys(mapping, "")
        sealed = self.store.take_secrets(client_id, sorted(set(mapping.values())), utcnow())
        values = {path: self.box.open(client_id, path, blob) for path, blob in sealed.items()}
        return {env: values.get(path) or "" for env, path in mapping.items()}


###############################################################################
# Webhooks ####################################################################
###############################################################################
#
# Outgoing HTTP: one request with a timeout and without following redirects.
# The job-status proxy uses it (Job queue), and so do the GoCD notifications.

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is the receiver's answer, passed back as it is, never followed."""

    def redirect_request(self, *args, **kwargs):
        return None


_webhook_opener = urllib.request.build_opener(_NoRedirect)


def http_send(method, url, body, headers, timeout):
    """One HTTP request by urllib: (status, text).  Raises TimeoutError or OSError (unreachable)."""
    try:
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        with _webhook_opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:        # 4xx/5xx/3xx answers are answers
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise TimeoutError(str(exc.reason)) from exc
        raise OSError(str(exc.reason)) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise TimeoutError(str(exc)) from exc
    except (http.client.HTTPException, ValueError) as exc:
        # A receiver that does not speak HTTP, or a URL urllib cannot use: unreachable, as far as we know.
        raise OSError(f"{exc.__class__.__name__}: {exc}") from exc


###############################################################################
# Job queue ###################################################################
###############################################################################

def parse_job_id(text):
    """Canonical form of a job id, or None when Python's ``uuid.UUID`` rejects it."""
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError):
        return None


def percentiles(values):
    """Percentiles 5/10/50/90/95 by linear interpolation between closest ranks (values sorted)."""
    if not values:
        return {}
    n, out = len(values), {}
    for p in (5, 10, 50, 90, 95):
        idx = (n - 1) * p / 100
        lo = int(idx)
        out[str(p)] = (values[lo] * (lo + 1 - idx) + values[lo + 1] * (idx - lo)) if lo + 1 < n else values[lo]
    return out


# The original's AgentOut schema: what queue listings show of an agent (no identifier, no times).
AGENT_OUT_FIELDS = ("state", "queues", "location", "job_id", "provision_type", "comment")


def forward_job_status(config, job_url, payload):
    """PUT the agent's job events to the job's webhook (spec §5); (status, text) to answer with."""
    if not config.webhook_url:
        # A server without a webhook configured cannot serve this: the original's 500.
        raise ApiError(500, "Webhook URL not configured")
    allowed, given = urllib.parse.urlsplit(config.webhook_url), urllib.parse.urlsplit(job_url)
    if (given.scheme, given.netloc) != (allowed.scheme, allowed.netloc):
        raise ApiError(403, "Invalid job_status_webhook URL specified")
    headers = {"Content-Type": "application/json"}
    if config.webhook_auth:
        headers["Authorization"] = f"Bearer {config.webhook_auth}"
    body = json.dumps(payload).encode()
    for attempt in (1, 2):                       # one retry on a connection failure
        try:
            status, text = http_send("PUT", job_url, body, headers, timeout=config.webhook_timeout)
            break
        except TimeoutError:
            raise ApiError(504, "Webhook Timeout")
        except OSError:
            if attempt == 2:
                raise ApiError(502, "Webhook unreachable")
    if status in (401, 403):
        raise ApiError(500, "Webhook authentication failed")
    return status, text


# Job events (spec testflinger-2026 §4): the original's six, then agenthub's own (extensions the
# original clients show like any other event).  A placeholder without a value shows as <name>.
JOB_EVENT_TEXT = {
    "job_submitted": "Job submitted by user {client_id} into queue {queue_name}.",
    "job_assigned": "Job assigned to agent {agent_name}.",
    "job_phase_started": "Phase {phase} started.",
    "job_phase_completed": "Phase {phase} completed with exit code {status}",
    "job_completed": "Job completed.",
    "job_cancelled": "Job cancellation requested by user {client_id}.",
    "job_resubmitted": "Job resubmitted by user {client_id}: attempt {attempt} is waiting in queue {queue_name}.",
    "job_retried": "Provisioning failed on agent {agent_name}: attempt {attempt} is waiting in queue {queue_name}"
                   " (provision retry {retry} of {retries}); agent {agent_name} is excluded.",
    "job_not_retried": "Provisioning failed on agent {agent_name}; not retried: {reason}.",
    "job_requeued": "Job never reached agent {agent_name}; it is back in its place in queue {queue_name}.",
    "job_stranded": "Job never reached agent {agent_name}, for the second time; it is cancelled.",
}


class _Placeholders(dict):
    def __missing__(self, key):
        return f"<{key}>"


def job_event(name, now, detail="", status=None, phase=None, **values):
    """One job event as stored: the message is rendered when it happens."""
    shown = {k: v for k, v in values.items() if v is not None}
    if status is not None:
        shown["status"] = status
    if phase is not None:
        shown["phase"] = phase
    return {"event_name": name, "timestamp": now, "detail": detail, "status": status, "phase": phase,
            "message": JOB_EVENT_TEXT[name].format_map(_Placeholders(shown))}


def who(client_id):
    """A submitter as events name it.  The original formats a missing client as "None"; here an
    anonymous caller is named so."""
    return client_id or "anonymous"


def job_outcome(state, status):
    """What a job came to, from its state and its phases' exit codes: (key, words).  A finished job
    passed when every phase exited 0; a non-zero provision is a provisioning failure (the device,
    not the test); else it failed in its first phase that exited non-zero.  Unfinished jobs are
    their state."""
    if state == "cancelled":
        return "cancelled", "cancelled"
    if state not in ("complete", "completed"):
        return ("waiting", "waiting") if state == "waiting" else ("running", state)
    failed = [phase for phase in PHASES if status.get(phase)]
    if not failed:
        return "passed", "passed"
    if failed[0] == "provision":
        return "provision-failed", "provision failed"
    return "failed", f"failed in {failed[0]}"


def bson_date(ts):
    """A time as the original's jsonify writes a Mongo datetime (spec testflinger-2026: real clients
    read ``{"$date": …}``)."""
    return {"$date": iso(ts, digits=3)}


class JobQueue:
    """Testflinger jobs: submit, pop, cancel, results, logs, files, and what agents tell us."""

    ACTIVE_END = ("cancelled", "complete", "completed")

    def __init__(self, store, agents, access, config, secrets_store, registry):
        """``store``: jobs and files; ``agents``: the agents table; ``access``: restricted queues."""
        self.store, self.agent_store, self.access, self.config = store, agents, access, config
        self.secrets, self.registry = secrets_store, registry
        self.tally = Tally()                       # ("submitted",), ("popped",), ("finished", state)
        self.waits = Histogram(WAIT_BUCKETS)       # seconds a job waited before it was popped, by queue

    # -- jobs ----------------------------------------------------------------------

    def submit(self, data, identity):
        """Store a validated job; apply the rules of spec §2.2 in the original's order."""
        queue_name = data["job_queue"]
        if data.get("exclude_agents"):
            allowed = [a for a in self.agent_store.list_agents(queue_name) if a["name"] not in data["exclude_agents"]]
            if not allowed:
                raise ApiError(422, "There are no agents on the specified queue that are allowed to run this job")
        uses_secrets = "secrets" in data.get("test_data", {})
        if uses_secrets:
            if not identity.client_id:
                raise ApiError(422, "Missing client ID (user not authenticated)")
            missing = self.secrets.missing(identity.client_id, data["test_data"]["secrets"].values())
            if missing:
                raise ApiError(422, "Inaccessible secret paths: " + ", ".join(missing))
        job_id = parse_job_id(data["job_id"]) if data.get("job_id") else str(uuid.uuid4())
        if job_id is None:
            raise ApiError(400, "Invalid job_id specified")
        self.check_permissions(identity.permissions if identity.client_id else {}, data)
        has_attachments = any(isinstance(v, dict) and "attachments" in v
                              for k, v in data.items() if k.endswith("_data"))
        job_data = {**data, "job_id": job_id}
        reserve = job_data.get("reserve_data")
        if reserve is not None and reserve.get("timeout", 0) is None:
            del reserve["timeout"]
        now = utcnow()
        job = {"job_id": job_id, "created_at": now, "job_priority": data.get("job_priority", 0),
               "job_queue": queue_name, "attachments_status": "waiting" if has_attachments else None,
               "exclude_agents": data.get("exclude_agents", []), "client_id": identity.client_id,
               "job_data": job_data}
        with self.store.write() as db:
            current = self.store.get_job(job_id)
            if current is None:
                self.store.insert_job(db, job)
                self.store.add_job_events(db, job_id, 1, [job_event(
                    "job_submitted", now, client_id=who(identity.client_id), queue_name=queue_name)])
            else:
                self._resubmit(db, current, job, identity, now)
        self.tally.add(("submitted",))
        return job_id

    def _resubmit(self, db, current, job, identity, now):
        """A submit that names a job that exists.  The original stores a second document under the
        same id; here one id stays one job: still waiting, nothing changes (a retried submit); still
        running, 409; finished, the job is queued again as its next attempt, earlier attempts kept."""
        job_id, state = current["job_id"], current["state"]
        if state == "waiting":
            return
        if state not in self.ACTIVE_END:
            raise ApiError(409, f"Job {job_id} is still running (state {state}); cancel it or wait for it to"
                                " finish before submitting it again")
        if current["client_id"] not in (None, identity.client_id) and identity.role not in ("admin", "manager"):
            raise ApiError(403, f"Job {job_id} was submitted by another client")
        attempt = current["attempt"] + 1
        if job["attachments_status"] and current["attachments_status"] == "complete" \
                and self.store.newest_file(job_id, "attachments", any_attempt=True):
            job = {**job, "attachments_status": "complete"}     # it runs with the attachments already sent
        self.store.archive_job(db, job_id, "resubmitted")
        self.store.insert_job(db, {**job, "attempt": attempt})
        self.store.add_job_events(db, job_id, attempt, [job_event(
            "job_resubmitted", now, client_id=who(identity.client_id), attempt=attempt,
            queue_name=job["job_queue"])])

    def check_permissions(self, permissions, data):
        """Priority, restricted queue and reservation length against the token's permissions."""
        queue_name = data["job_queue"]
        priority = data.get("job_priority", 0)
        if priority != 0:
            if not permissions:
                raise ApiError(401, f"Authentication required for setting priority: {priority}")
            allowed = permissions.get("max_priority") or {}
            if priority > max(allowed.get("*", 0), allowed.get(queue_name, 0)):
                raise ApiError(403, f"Not enough permissions to push to {queue_name} with priority {priority}")
        if self.access.is_restricted(queue_name):
            if not permissions:
                raise ApiError(401, f"Authentication required to push to restricted queue: {queue_name}")
            if queue_name not in (permissions.get("allowed_queues") or []):
                raise ApiError(403, f"Not enough permissions to push to the restricted queue: {queue_name}")
        timeout = (data.get("reserve_data") or {}).get("timeout")
        timeout = 3600 if timeout is None else timeout
        if timeout > 6 * 3600:
            if not permissions:
                raise ApiError(401, f"Authentication required for setting timeout: {timeout}")
            allowed = permissions.get("max_reservation_time") or {}
            if timeout > max(allowed.get(queue_name, 0), allowed.get("*", 0)):
                raise ApiError(403, f"Not enough permissions to push to {queue_name} "
                                    f"with reservation timeout {timeout}")

    def reclaim_stranded(self, agent_name, now):
        """The stranded-job rule.  A Testflinger agent asks for a job only when it has none, and
        reports a phase as soon as it starts one.  So a job it was handed ``--strand-seconds`` ago
        (default 60) and never reported on (still 'running', no phase, no log) while it asks for
        another never reached it (its answer was lost, or the agent died at once): the job goes back
        to its place at the head of its queue, once; handed out and lost a second time, it is
        cancelled.  Either way its instance fails and the results say so (``agenthub_strands``).
        A job the agent reports on is never touched, however long it runs."""
        if self.config.strand_seconds <= 0:
            return 0
        with self.store.write() as db:
            # Read in the transaction: on a shared database the rows stay locked until it ends (a
            # sweep in another process passes over them).
            rows = self.store.silent_jobs(agent_name, now - self.config.strand_seconds)
            for row in rows:
                job = self.store.get_job(row["job_id"])
                if row["strands"] == 0:
                    self.store.requeue_job(row["job_id"])
                    event = job_event("job_requeued", now, agent_name=agent_name, queue_name=job["job_queue"])
                else:
                    self.store.strand_job(row["job_id"], now)
                    event = job_event("job_stranded", now, agent_name=agent_name)
                self.agent_store.fail_job_instance(row["job_id"], now)
                self.agent_store.clear_agent_job(db, row["job_id"])
                self.store.add_job_events(db, row["job_id"], job["attempt"], [event])
        return len(rows)

    def reclaim_from_lost_agents(self):
        """The same rule for an agent that went silent (LostContact) instead of asking again; a job
        it did report on stays as it is (the agent may come back with its results)."""
        now = utcnow()
        for row, view in self.registry.views(now=now):
            if row["tf"] and view.agent_state == "LostContact":
                with self.store.write():
                    reclaimed = self.reclaim_stranded(row["name"], now)
                if reclaimed:
                    self.registry.changed(row["name"])

    def pop(self, queues, agent_name, ip=None):
        """The next job of ``queues`` for the agent, or None — with the agent's sign of life and the
        state change it causes, in one write transaction (which, with several processes, does not
        wait for the others' writers: pops run in parallel, each job handed out once by row locks)."""
        now = utcnow()
        with self.store.write(exclusive=False) as db:
            self.reclaim_stranded(agent_name, now)
            agent = self.agent_store.get_agent(agent_name)
            row = None
            if agent is None or not agent["retired"]:             # a retired agent takes no jobs
                row = self.store.pop_job(list(dict.fromkeys(queues)), agent_name, now)
            if row is not None and agent is not None:
                # The job becomes a running instance of the agent that took it (the registry's view),
                # and the agent's job (newer agents no longer post it themselves).
                self.agent_store.add_instance({
                    "pfid": self.registry.new_pfid(), "agent_name": agent_name, "source": "testflinger",
                    "job_id": row["job_id"], "environment_id": agent["environment_id"], "status": "active",
                    "inserted_at": now, "updated_at": now, "started_at": now})
                self.agent_store.set_agent_job(db, agent_name, row["job_id"])
            if row is not None:
                self.store.add_job_events(db, row["job_id"], row["attempt"],
                                          [job_event("job_assigned", now, agent_name=agent_name)])
            heard = self.registry.contact(agent_name, ip, throttle=1.0, announce=False)
            if row is not None or heard:
                self.registry.changed(agent_name)    # e.g. it now holds a running instance: same commit
        if row is None:
            return None
        self.tally.add(("popped",))
        self.waits.observe(now - row["created_at"], (row["job_queue"],))
        job = json.loads(row["job_data"])
        job["job_id"] = row["job_id"]
        job["started_at"] = iso(row["started_at"])
        if row["attachments_status"]:
            job["attachments_status"] = row["attachments_status"]
        if "secrets" in job.get("test_data", {}):
            # Resolved only here, for the agent; unreadable ones become "" (the original's rule).
            if row["client_id"]:
                job["client_id"] = row["client_id"]
            job["test_data"]["secrets"] = self.secrets.resolve(row["client_id"], job["test_data"]["secrets"])
        return job

    def definition(self, job_id):
        row = self.store.get_job(job_id)
        if row is None:
            return None
        return {**json.loads(row["job_data"]), "job_id": row["job_id"]}

    def position(self, job_id):
        return self.store.job_position(job_id)

    def _takes_jobs(self, agent, now):
        view = self.registry.view(agent, now)
        return view.online and view.config == "Enabled"

    ESTIMATE_SAMPLES = 20          # the newest completed jobs of a queue that give its run time
    ESTIMATE_AHEAD = 5000          # jobs ahead simulated at most (beyond: "later than" this estimate)

    def estimate(self, job_id):
        """When a waiting job should start (Testflinger #858), and how that was worked out; None for
        a job that is not waiting.

        The agents that can take it are those serving its queue that are online, enabled and not
        excluded.  They take jobs in pop order (priority, then arrival) from every queue they serve,
        so the jobs ahead are the waiting ones of those queues that rank before this one (those still
        waiting for attachments cannot be taken yet and are skipped).  Each job is assumed to run as
        long as the median of its queue's newest completed jobs (of all queues while its own has
        none); a running job, that median less what it has run.  The jobs ahead go in order, each to
        the first free agent that serves its queue and is not excluded; this job starts when the
        first agent of its own pool is free.  Agents outside the pool that also serve those queues
        would make it earlier."""
        row = self.store.waiting_job(job_id)
        if row is None:
            return None
        now, queue_name = utcnow(), row["job_queue"]
        excluded = set(json.loads(row["exclude_agents"]))
        pool = [a for a in self.agent_store.list_agents(queue_name)
                if a["name"] not in excluded and self._takes_jobs(a, now)]
        out = {"job_id": job_id, "job_state": "waiting", "job_queue": queue_name,
               "position": self.store.job_position(job_id), "agents": [a["name"] for a in pool]}
        if not pool:
            return {**out, "estimated_start": None, "estimated_wait_seconds": None,
                    "reason": f"no online agent that may run this job serves queue {queue_name}"}
        medians = {}

        def typical(q):
            """Median run seconds of queue ``q`` (of every queue while it has none); inf: unknown,
            the agent is never known to be free again."""
            for key in (q, None):
                if key not in medians:
                    times = self.store.run_times(key, self.ESTIMATE_SAMPLES)
                    medians[key] = statistics.median(times) if times else None
                if medians[key] is not None:
                    return medians[key]
            return math.inf

        serves = {a["name"]: set(json.loads(a["queues"] or "[]")) for a in pool}
        ahead = self.store.jobs_ahead(sorted(set().union(*serves.values())), row["job_priority"], row["seq"],
                                      self.ESTIMATE_AHEAD)
        running = {r["agent_name"]: r for r in self.store.running_on(list(serves))}
        free = {}
        for name in serves:
            job = running.get(name)
            free[name] = now if job is None else now + max(0.0, typical(job["job_queue"])
                                                            - (now - (job["started_at"] or now)))
        for job in ahead:
            barred = set(json.loads(job["exclude_agents"]))
            able = [n for n in serves if job["job_queue"] in serves[n] and n not in barred]
            if able:
                first = min(able, key=free.__getitem__)
                free[first] += typical(job["job_queue"])
        start = min(free.values())
        out.update(jobs_ahead=len(ahead), busy_agents=len(running),
                   run_seconds={q: round(typical(q), 1) for q in sorted({j["job_queue"] for j in ahead} | {queue_name}
                                                                        | {r["job_queue"] for r in running.values()})
                                if typical(q) < math.inf})
        if start == math.inf:
            return {**out, "estimated_start": None, "estimated_wait_seconds": None,
                    "reason": "no completed job yet to learn run times from"}
        return {**out, "estimated_start": iso(start), "estimated_wait_seconds": int(start - now),
                "lower_bound": len(ahead) >= self.ESTIMATE_AHEAD,
                "method": "jobs ahead (pop order over the queues the agents serve) each handed to the first free"
                          " agent that serves its queue, each taking the median run time of its queue's last"
                          f" {self.ESTIMATE_SAMPLES} completed jobs; a job running past it is taken to end now"}

    def cancel(self, job_id, identity):
        """Cancel an unfinished job and free its agent; False when neither changed anything."""
        now = utcnow()
        with self.store.write() as db:
            changed, holder = self.store.cancel_job(job_id, now)
            freed = self.agent_store.clear_agent_job(db, job_id)
            if changed:
                self.store.add_job_events(db, job_id, self.store.get_job(job_id)["attempt"], [job_event(
                    "job_cancelled", now, client_id=who(identity.client_id))])
        for name in {holder, freed} - {None}:
            self.registry.changed(name)
        if changed:
            self.tally.add(("finished", "cancelled"))
        return changed or freed is not None

    def search(self, tags, match, states, limit=None, offset=0):
        rows = self.store.search_jobs(tags, match == "all", states, limit, offset)
        return [{"job_id": r["job_id"], "created_at": iso(r["created_at"]), "job_state": r["state"]}
                for r in rows]

    def queue_jobs(self, queue_name, limit=None, offset=0):
        return [{"job_id": r["job_id"], "created_at": iso(r["created_at"]), "job_state": r["state"],
                 "job_queue": r["job_queue"]} for r in self.store.queue_jobs(queue_name, limit, offset)]

    def get(self, job_id):
        """The job's row (state, queue, agent, times), or None."""
        return self.store.get_job(job_id)

    def page(self, state=None, queue_name=None, tag=None, agent_name=None, limit=50, offset=0):
        """(jobs, total) of the newest jobs matching the filters, for people: each with its outcome
        and how long it waited and ran (so far)."""
        rows, total = self.store.jobs_page(state, queue_name, tag, agent_name=agent_name, limit=limit, offset=offset)
        now = utcnow()
        return [self._for_people(row, now) for row in rows], total

    def for_people(self, row, now=None):
        """A job row (current or earlier attempt) with its outcome, waited and ran."""
        return self._for_people(row, utcnow() if now is None else now)

    def _for_people(self, row, now):
        job = dict(row)
        job["outcome"], job["outcome_text"] = job_outcome(row["state"], json.loads(row["result_status"]))
        started, finished = row["started_at"], row["finished_at"]
        job["waited"] = (started - row["created_at"]) if started else \
            (now - row["created_at"]) if row["state"] == "waiting" else None
        job["ran"] = ((finished or now) - started) if started else None
        return job

    def state_counts(self):
        return self.store.job_state_counts()

    def counts_by_queue(self):
        return self.store.counts_by_queue()

    def queue_activity(self):
        return self.store.queue_activity()

    def forward_status(self, job_id, data):
        """The agent's job events, forwarded to the job's status webhook (spec §5)."""
        if self.store.get_job(job_id) is None:
            raise ApiError(404, "Job not found")
        return forward_job_status(self.config, data.pop("job_status_webhook"), data)

    def wait_times(self, queues):
        return {q: percentiles(v) for q, v in self.store.wait_times(queues).items()}

    # -- results and logs ------------------------------------------------------------

    def reports_on_earlier_attempt(self, job_id, agent_name):
        """Whether an agent's report (result, log, artifact) is about an attempt that has ended: the
        job was queued again (re-submitted, retried, reclaimed), so it is waiting, which no agent
        can be running, or another agent has taken it since.  Such a report is dropped, answered as
        if taken: it would else finish or fill the new attempt (the agent of a cancelled job posts
        its closing result well after the cancel)."""
        return self._ended_attempt(self.store.get_job(job_id), agent_name)

    @staticmethod
    def _ended_attempt(row, agent_name):
        if row is None:
            return False
        if row["state"] == "waiting":
            return row["attempt"] > 1 or row["strands"] > 0
        return bool(agent_name and row["agent_name"] and row["agent_name"] != agent_name)

    def post_result(self, job_id, data, agent_name=None):
        """An agent's report: the result changes and the job's events, its agent freed when it ends,
        a failed provision in the agent's history, and a provision retry — one transaction."""
        now, state = utcnow(), data.get("job_state")
        with self.store.write() as db:
            before = self.store.get_job(job_id)
            if self._ended_attempt(before, agent_name):
                return
            finished = self.store.update_result(job_id, data.get("status"), data.get("device_info"), state, now,
                                                data.get("agent_id") or None)
            freed = None
            if before is not None:
                self.store.add_job_events(db, job_id, before["attempt"], self._result_events(before, data, now))
                if state in self.ACTIVE_END:
                    # Its agent no longer runs it; one still saying it is in a phase of it is idle again.
                    freed = self.agent_store.clear_agent_job(db, job_id, idle_from=PHASES)
                self._provision_outcome(db, before, data, now)
        if before is not None and state in ("complete", "completed") and before["state"] not in self.ACTIVE_END:
            self.tally.add(("finished", "complete"))
        for name in {finished, freed} - {None}:
            self.registry.changed(name)

    def _result_events(self, before, data, now):
        """Phase completions (new keys of ``status``) first, then the phase started or the end."""
        events, old = [], json.loads(before["result_status"])
        for phase, code in (data.get("status") or {}).items():
            if phase not in old:
                events.append(job_event("job_phase_completed", now, status=code, phase=phase))
        state = data.get("job_state")
        if before["state"] == "cancelled":
            # Its state stays "cancelled" whatever the agent reports while it stops (cleanup, its
            # closing "complete"), so each phase is told once and the job is never "completed".
            if state in PHASES and not self.store.has_phase_event(before["job_id"], before["attempt"], state):
                events.append(job_event("job_phase_started", now, phase=state))
        elif state in PHASES and state != before["state"]:
            events.append(job_event("job_phase_started", now, phase=state))
        elif state in ("complete", "completed") and before["state"] not in ("complete", "completed"):
            events.append(job_event("job_completed", now))
        return events

    def _provision_outcome(self, db, before, data, now):
        """A provision that exited non-zero goes into its agent's history even when the agent posted
        no provision log (Testflinger #1110); with ``--provision-retries``, a job that ends so is
        queued again as its next attempt, without that agent (#1143)."""
        status = data.get("status") or {}
        agent_name = data.get("agent_id") or before["agent_name"]
        code = status.get("provision")
        if code and agent_name and "provision" not in json.loads(before["result_status"]) \
                and not self.agent_store.job_provision_logged(agent_name, before["job_id"], before["attempt"]):
            self.agent_store.add_provision_log(agent_name, before["job_id"], code, "recorded from the job's"
                                               " provision_status", now, before["client_id"], "result",
                                               before["attempt"])
        after = self.store.get_job(before["job_id"])
        failed = json.loads(after["result_status"]).get("provision")
        if not failed or after["state"] not in ("complete", "completed") or before["state"] in self.ACTIVE_END \
                or before["retries"] >= self.config.provision_retries:
            return
        excluded = list(dict.fromkeys([*json.loads(after["exclude_agents"]), *([agent_name] if agent_name else [])]))
        others = [a for a in self.agent_store.list_agents(after["job_queue"]) if a["name"] not in excluded]
        if not others:
            self.store.add_job_events(db, after["job_id"], after["attempt"], [job_event(
                "job_not_retried", now, agent_name=agent_name,
                reason=f"no other agent serves queue {after['job_queue']}")])
            return
        job_data = {**json.loads(after["job_data"]), "exclude_agents": excluded}
        attempt, retry = after["attempt"] + 1, after["retries"] + 1
        self.store.archive_job(db, after["job_id"], "retried")
        self.store.insert_job(db, {
            "job_id": after["job_id"], "created_at": now, "job_priority": after["job_priority"],
            "job_queue": after["job_queue"], "attachments_status": after["attachments_status"],
            "exclude_agents": excluded, "client_id": after["client_id"], "job_data": job_data,
            "attempt": attempt, "retries": retry})
        self.store.add_job_events(db, after["job_id"], attempt, [job_event(
            "job_retried", now, agent_name=agent_name, attempt=attempt, queue_name=after["job_queue"], retry=retry,
            retries=self.config.provision_retries)])

    def attempt(self, job_id, number):
        """One attempt's row (current or earlier), or None."""
        return self.store.get_attempt(job_id, number)

    def _attempt_row(self, job_id, attempt=None):
        return self.store.get_job(job_id) if attempt is None else self.store.get_attempt(job_id, attempt)

    def status(self, job_id, attempt=None):
        """GET /v1/result/<id>/status (Testflinger #1285): the state and the phases' exit codes,
        never the logs; None for an unknown job."""
        row = self._attempt_row(job_id, attempt)
        if row is None:
            return None
        out = {"job_state": row["state"]} if row["state"] else {}
        status = json.loads(row["result_status"])
        out.update({f"{phase}_status": status[phase] for phase in PHASES if phase in status})
        return out

    def events(self, job_id):
        """The job's events, oldest first (spec testflinger-2026 §4), or None for an unknown job."""
        if self.store.get_job(job_id) is None:
            return None
        out = []
        for row in self.store.job_events(job_id):
            event = {"event_name": row["event_name"], "timestamp": bson_date(row["timestamp"]),
                     "message": row["message"], "detail": row["detail"], "attempt": row["attempt"]}
            if row["status"] is not None:
                event["status"] = row["status"]
            if row["phase"] is not None:
                event["phase"] = row["phase"]
            out.append(event)
        return out

    def attempts(self, job_id):
        """Every attempt of a job, oldest first (an agenthub extension), or None for an unknown job."""
        current = self.store.get_job(job_id)
        if current is None:
            return None
        rows = [*self.store.attempts(job_id), current]
        return [{"attempt": r["attempt"], "job_state": r["state"], "job_queue": r["job_queue"],
                 "created_at": iso(r["created_at"]), "started_at": iso(r["started_at"]),
                 "finished_at": iso(r["finished_at"]), "agent": r["agent_name"], "submitted_by": r["client_id"],
                 "status": json.loads(r["result_status"]),
                 "ended_by": r["ended_by"] if "ended_by" in r.keys() else None} for r in rows]

    def result(self, job_id, attempt=None):
        """The flat result of spec §2.3 (of one attempt, the current by default), or None."""
        row = self._attempt_row(job_id, attempt)
        if row is None:
            return None
        out = {"job_state": row["state"]}
        if row["strands"]:
            out["agenthub_strands"] = row["strands"]     # an agenthub extension: see reclaim_stranded
        if row["device_info"] is not None:
            out["device_info"] = json.loads(row["device_info"])
        status = json.loads(row["result_status"])
        logs = {}
        for frag in self.store.all_log_fragments(job_id, row["attempt"]):
            key = f"{frag['phase']}_{frag['log_type']}"
            logs[key] = logs.get(key, "") + frag["log_data"]
        for phase in PHASES:
            if phase in status:
                out[f"{phase}_status"] = status[phase]
            for kind in ("output", "serial"):
                if f"{phase}_{kind}" in logs:
                    out[f"{phase}_{kind}"] = logs[f"{phase}_{kind}"]
        return out

    def add_log(self, job_id, log_type, data, agent_name=None):
        with self.store.write():
            if self.reports_on_earlier_attempt(job_id, agent_name):
                return
            self.store.add_log_fragment(job_id, log_type, data["phase"], data["fragment_number"],
                                        data["timestamp"], data["log_data"], utcnow())

    def logs(self, job_id, log_type, start_fragment=0, start_timestamp=None, phase=None, attempt=None):
        phases = [phase] if phase else list(PHASES)
        out = {p: {"last_fragment_number": -1, "log_data": ""} for p in phases}
        for frag in self.store.log_fragments(job_id, log_type, start_fragment, start_timestamp, phase, attempt):
            entry = out[frag["phase"]]
            entry["last_fragment_number"] = max(entry["last_fragment_number"], frag["fragment_number"])
            entry["log_data"] += frag["log_data"]
        return {log_type: out}

    def log_tail(self, job_id, log_type, limit, start_fragment=0, attempt=None):
        """Like ``logs`` but bounded: at most the last ``limit`` characters of each phase, with
        ``cut`` saying whether earlier text was left out (the job page shows this)."""
        out = {}
        for phase in PHASES:
            rows, cut = self.store.log_tail(job_id, log_type, phase, start_fragment, limit, attempt)
            text = "".join(row[1] for row in rows)
            if len(text) > limit:
                text, cut = text[-limit:], True
            out[phase] = {"last_fragment_number": rows[-1][0] if rows else -1, "log_data": text, "cut": cut}
        return out

    def log_file(self, job_id, log_type, phase=None, attempt=None):
        """A whole log as (size, chunks) for streaming; memory stays flat whatever its size."""
        def chunks():
            after = (-(2 ** 63), -1)
            while True:
                rows = self.store.log_batch(job_id, log_type, phase, after, attempt=attempt)
                if not rows:
                    return
                after = (rows[-1][0], rows[-1][1])
                yield b"".join(row[2] for row in rows)
        return self.store.log_size(job_id, log_type, phase, attempt), chunks()

    # -- files -------------------------------------------------------------------------

    def check_attachments_upload(self, job_id):
        """None when an attachments upload may proceed; 'done' when already complete; else ApiError."""
        row = self.store.get_job(job_id)
        if row is None or row["state"] != "waiting":
            raise ApiError(422, f"Job {job_id} is not valid\n", text=True)
        if row["attachments_status"] is None:
            raise ApiError(422, f"Job {job_id} not awaiting attachments\n", text=True)
        return "done" if row["attachments_status"] == "complete" else None

    def save_file(self, job_id, kind, chunks):
        """Stream ``chunks`` into the database; the file appears whole or not at all.

        Each chunk is its own short transaction (a slow upload must not hold the
        writer lock); the file stays invisible until the final transaction marks
        it complete and drops the version it replaces.
        """
        file_id = self.store.begin_file(job_id, kind, utcnow())
        size = 0
        try:
            for seq, chunk in enumerate(chunks):
                if not self.store.add_file_chunk(file_id, seq, chunk):   # purged as abandoned meanwhile
                    raise ApiError(408, "Upload took too long")
                size += len(chunk)
            with self.store.write() as db:
                if kind == "attachments" and not self.store.complete_attachments(db, job_id):
                    raise ApiError(422, f"Job {job_id} is not valid\n", text=True)
                self.store.finish_file(db, file_id, size)
        except BaseException:
            self.store.drop_file(file_id)
            raise
        return size

    def drop_partial_uploads(self):
        """At start, before any request: uploads a previous run left unfinished (a crash, a full disk
        that also refused their cleanup) are dropped; none can still be arriving."""
        return self.store.drop_incomplete_files()

    def has_file(self, job_id, kind, attempt=None):
        return self.store.newest_file(job_id, kind, attempt, any_attempt=kind == "attachments") is not None

    def open_file(self, job_id, kind, attempt=None):
        """(size, chunk iterator) of the newest stored file, or None.  An artifact belongs to one
        attempt; the attachments are the job's (a retry runs with the ones already sent)."""
        row = self.store.newest_file(job_id, kind, attempt, any_attempt=kind == "attachments")
        if row is None:
            return None
        file_id = row["id"]

        def chunks():
            seq = 0
            while True:
                data = self.store.file_chunk(file_id, seq)
                if data is None:
                    return
                yield data
                seq += 1
        return row["size"], chunks()

    # -- agents, queues, images ------------------------------------------------------

    def post_agent(self, name, data, ip=None):
        if len(name) > AGENT_NAME_MAX:             # the name travels in the agent_name cookie
            raise ApiError(400, f"Agent name too long (at most {AGENT_NAME_MAX} characters)")
        fields = {k: v for k, v in data.items() if k in AgentStore.AGENT_FIELDS}
        now = utcnow()
        with self.agent_store.write():
            row = self.agent_store.get_agent(name)
            log = (json.loads(row["log"]) if row and row["log"] else []) + list(data.get("log", []))
            self.agent_store.upsert_agent(name, fields, log[-100:], now, self.registry.new_ids() if row is None else {},
                                          ip)
            if fields.get("job_id") == "":
                # Posting job_id "" while still holding a running job abandons it: that instance fails.
                self.agent_store.fail_active_instances(name, "testflinger", now)
        self.registry.changed(name)

    def agent(self, name, full=True):
        """An agent as GET /v1/agents/data/<name> shows it (``full``) or as queue listings do."""
        row = self.agent_store.get_agent(name)
        return None if row is None or not row["tf"] else self._agent_out(row, full, self._submitters([row]))

    def agents(self, queue_name=None, full=True):
        rows = self.agent_store.list_agents(queue_name)
        submitters = self._submitters(rows)
        return [self._agent_out(row, full, submitters) for row in rows]

    def _submitters(self, rows):
        """{job id: who submitted it} for the jobs these agents run (Testflinger #1288)."""
        return self.submitters([r["job_id"] for r in rows if r["job_id"]])

    def submitters(self, job_ids):
        return self.store.submitters(job_ids)

    def queue_agents(self, queue_name):
        """The agents listening on a queue that exists (404 otherwise)."""
        if not self.agent_store.queue_exists(queue_name):
            raise ApiError(404, f"Queue '{queue_name}' does not exist.")
        return self.agents(queue_name, full=False)

    def advertised_queues(self):
        return {r["name"]: r["description"] for r in self.store.advertised_queues()}

    def advertise_queues(self, descriptions):
        self.store.upsert_advertised_queues(descriptions, utcnow())

    def images(self, queue_name):
        return self.store.images(queue_name)

    def set_images(self, images):
        self.store.replace_images(images, utcnow())

    def provision_logs(self, agent_name):
        return self.agent_store.provision_logs(agent_name)

    def queue_summaries(self, names=None):
        """Every queue anyone knows of (advertised, served by an agent, or holding jobs), or those
        ``names``: its agents and how many jobs wait and run (Testflinger #870)."""
        advertised = self.advertised_queues()
        served = {}
        for agent in self.agent_store.list_agents():
            for q in json.loads(agent["queues"] or "[]"):
                served.setdefault(q, []).append(agent["name"])
        activity = self.store.queue_activity()
        waits = self.wait_times([])
        names = sorted(set(advertised) | set(served) | set(activity)) if names is None else sorted(set(names))
        return [{"name": n, "description": advertised.get(n, ""), "agents": served.get(n, []),
                 "waiting": activity.get(n, {}).get("waiting", 0), "running": activity.get(n, {}).get("running", 0),
                 "wait": waits.get(n, {})} for n in names]

    def _agent_out(self, row, full, submitters):
        """An agent as the original returns it: only the fields that were ever set; while it runs a
        job, ``submitted_by`` (null for an anonymous submitter)."""
        out = {"name": row["name"]}
        names = AgentStore.AGENT_FIELDS + ("updated_at", "provision_streak_type", "provision_streak_count") if full \
            else AGENT_OUT_FIELDS
        for key in names:
            value = row[key]
            if value is None:
                continue
            out[key] = json.loads(value) if key == "queues" else iso(value) if key == "updated_at" else value
        if row["retired"]:
            # Retired through /api/v1: reads say offline, the stored state is kept for reinstating.
            out["state"], out["comment"] = "offline", "retired"
        if row["job_id"] and row["job_id"] in submitters:
            out["submitted_by"] = submitters[row["job_id"]]
        if full:
            out["restricted_to"] = self.access.restricted_owners(out.get("queues", []))
        return out

    def provision_log(self, agent_name, data):
        """An agent's provision outcome; the entry names who submitted the job (for the pages)."""
        job = self.store.get_job(parse_job_id(data["job_id"]) or data["job_id"])
        attempt = self.store.attempt_run_by(job["job_id"], agent_name) if job else None
        if not self.agent_store.add_provision_log(agent_name, data["job_id"], data["exit_code"], data.get("detail"),
                                                  utcnow(), job["client_id"] if job else None,
                                                  attempt=attempt or (job["attempt"] if job else 1)):
            raise ApiError(404, "Agent not found")          # JSON since Testflinger #1253 (plain text in 1.5.0)
        self.registry.contact(agent_name)

    # -- history for the pages' charts --------------------------------------------------

    def sample_queues(self, now=None):
        """Record how many jobs wait and run in every known queue (the history thread, every few minutes)."""
        summaries = self.queue_summaries()
        self.store.add_queue_samples({q["name"]: q for q in summaries}, utcnow() if now is None else now)

    def queue_history(self, queue_name, since):
        """(samples [(time, waiting, running)], waits [(popped_at, seconds)]) of a queue since ``since``."""
        return ([tuple(r) for r in self.store.queue_samples(queue_name, since)],
                [tuple(r) for r in self.store.waits_since(queue_name, since)])

    def finished_per_hour(self, now, hours=24):
        """[{outcome: jobs}] per hour, oldest first, of the jobs that finished in the last ``hours``."""
        start = now - hours * 3600
        buckets = [collections.Counter() for _ in range(hours)]
        for row in self.store.finished_since(start):
            index = min(hours - 1, int((row["finished_at"] - start) // 3600))
            buckets[index][job_outcome(row["state"], json.loads(row["result_status"]))[0]] += 1
        return buckets

    def purge(self):
        now = utcnow()
        cutoff = now - self.config.retention_days * 86400
        return self.store.purge(now, cutoff, now - 90 * 86400, now - 86400)


###############################################################################
# Event buffer ################################################################
###############################################################################
#
# Consul-style user events: a ring of the newest N events, kept in memory as an
# immutable tuple (readers never lock) and in SQLite (a restart keeps IDs,
# Lamport times and indexes, so a reconnecting watcher does not see old events
# again: hashicorp/consul#571).  A threading.Condition wakes blocked queries.

@dataclasses.dataclass(frozen=True)
class Event:
    id: str
    name: str
    payload: bytes = None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    ltime: int = 0

    @property
    def index(self):
        """Consul's uuidToUint64: XOR of the two 64-bit halves of the ID."""
        digits = self.id.replace("-", "")
        return int(digits[:16], 16) ^ int(digits[16:], 16)

    def as_json(self, ltime=None):
        """The event in Consul's field order; ``ltime`` overrides (the fire answer says 0)."""
        return {"ID": self.id, "Name": self.name,
                "Payload": None if self.payload is None else base64.b64encode(self.payload).decode(),
                "NodeFilter": self.node_filter, "ServiceFilter": self.service_filter,
                "TagFilter": self.tag_filter, "Version": 1, "LTime": self.ltime if ltime is None else ltime}

    def visible_to(self, node=None, service=None, tag=None):
        """agenthub's hub views: an empty stored filter, or one that fully matches the given name."""
        for given, stored in ((node, self.node_filter), (service, self.service_filter), (tag, self.tag_filter)):
            if given is not None and stored and not _compiled(stored).fullmatch(given):
                return False
        return True


@functools.lru_cache(maxsize=1024)
def _compiled(pattern):
    return re.compile(pattern)


_RE2_REJECTS = [
    (re.compile(r"\(\?(?:=|!|<=|<!)"), "invalid or unsupported Perl syntax: look-around"),
    (re.compile(r"\(\?P?=|\(\?>"), "invalid or unsupported Perl syntax"),
    (re.compile(r"(?<!\\)\\[1-9]"), "invalid escape sequence: back-reference"),
    (re.compile(r"(?<!\\)[*+?}]\+"), "invalid nested repetition operator"),
]


REGEX_MAX = 256             # characters of one event filter
REGEX_REPEATS = 3           # unbounded or long repetitions in one filter
VIEW_NAME_MAX = 128         # characters of a name a hub view matches filters against


def re2_error(pattern):
    """Why Go's RE2 would refuse ``pattern`` (as Consul words it), or None.

    Python's ``re`` catches syntax errors; look-arounds, back-references, atomic
    groups and possessive quantifiers, which Python accepts and RE2 does not,
    are refused explicitly so Go clients see the same answer.  RE2 matches in
    linear time and Python's ``re`` backtracks, so agenthub also refuses what
    could take exponential or high polynomial time here (agenthub rules; Consul
    accepts all of these): a repetition of something that itself repeats
    (``(a+)+``) or of an alternation (``(.|a)*``: use a class, ``[ab]*``), more
    than REGEX_REPEATS repetitions (``a*a*a*a*``), and over REGEX_MAX characters.
    With hub-view names of at most VIEW_NAME_MAX characters, a match then stays
    within milliseconds.
    """
    for regex, reason in _RE2_REJECTS:
        if regex.search(pattern):
            return f"error parsing regexp: {reason}: `{pattern}`"
    if len(pattern) > REGEX_MAX:
        return f"error parsing regexp: expression longer than {REGEX_MAX} characters"
    try:
        parsed = _sre_parse.parse(pattern)
        if _nested_repeat(parsed):
            return f"error parsing regexp: nested repetition is refused by agenthub: `{pattern}`"
        if _count_repeats(parsed) > REGEX_REPEATS:
            return (f"error parsing regexp: more than {REGEX_REPEATS} repetitions are refused by agenthub: "
                    f"`{pattern}`")
        _compiled(pattern)
    except re.error as exc:
        return f"error parsing regexp: {exc.msg}: `{pattern}`"
    except RecursionError:
        return "error parsing regexp: expression nests too deeply"
    return None


def _subpatterns(op, arg):
    """The parsed sub-patterns of one regex node (groups, alternatives, assertions, repetitions)."""
    name = str(op)
    if name.endswith("_REPEAT"):
        return [arg[2]]
    if name == "SUBPATTERN":
        return [arg[-1]]
    if name == "BRANCH":
        return list(arg[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [arg[1]]
    return []


def _many(arg):
    return arg[1] is _sre_parse.MAXREPEAT or arg[1] > 1


def _variable(arg):
    """A repetition that can match different numbers of times (``*``, ``+``, ``?``, ``{1,3}``)."""
    return arg[0] != arg[1]


def _count_repeats(parsed):
    return sum((str(op).endswith("_REPEAT") and _variable(arg)) + sum(_count_repeats(p) for p in _subpatterns(op, arg))
               for op, arg in parsed)


def _has_branch(parsed):
    return any(str(op) == "BRANCH" or any(_has_branch(p) for p in _subpatterns(op, arg)) for op, arg in parsed)


def _nested_repeat(parsed, inside=False):
    """Whether a parsed pattern repeats (more than once) something that itself repeats, or an
    alternation."""
    for op, arg in parsed:
        name = str(op)
        if name.endswith("_REPEAT"):
            many = _many(arg)
            if many and _has_branch(arg[2]):
                return True
            if (_variable(arg) and inside) or _nested_repeat(arg[2], inside or many):
                return True
        elif name == "SUBPATTERN" and _nested_repeat(arg[-1], inside):
            return True
        elif name == "BRANCH" and any(_nested_repeat(branch, inside) for branch in arg[1]):
            return True
        elif name in ("ASSERT", "ASSERT_NOT") and _nested_repeat(arg[1], inside):
            return True
    return False


_GO_UNITS = {"ns": 1, "us": 10 ** 3, "µs": 10 ** 3, "μs": 10 ** 3, "ms": 10 ** 6, "s": 10 ** 9, "m": 60 * 10 ** 9,
             "h": 3600 * 10 ** 9}


def parse_go_duration(text):
    """Seconds from a Go ``time.ParseDuration`` string; ValueError where Go gives an error.

    Go's algorithm step by step (its leadingInt, leadingFraction and unit table): an optional sign,
    then "0" alone or numbers each with a unit (ns, us, µs U+00B5, μs U+03BC, ms, s, m, h) in any
    order and repeated ("1h1h" is 2h); a number has digits before or after its decimal point
    (".5s", "5.s", not ".s"); the fraction is scaled in float64 as Go does, its digits past 63 bits
    ignored; the total, in nanoseconds, must fit a signed 64-bit integer."""
    limit = 1 << 63
    negative, rest = (True, text[1:]) if text[:1] == "-" else (False, text[1:] if text[:1] == "+" else text)
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(text)
    total, pos, end = 0, 0, len(rest)
    while pos < end:
        if not (rest[pos] == "." or "0" <= rest[pos] <= "9"):
            raise ValueError(text)
        start, whole = pos, 0
        while pos < end and "0" <= rest[pos] <= "9":
            if whole > limit // 10:
                raise ValueError(text)
            whole = whole * 10 + ord(rest[pos]) - 48
            if whole > limit:
                raise ValueError(text)
            pos += 1
        digits_before = pos > start
        fraction, scale, digits_after = 0, 1.0, False
        if pos < end and rest[pos] == ".":
            pos += 1
            start, overflow = pos, False
            while pos < end and "0" <= rest[pos] <= "9":
                if not overflow:
                    bigger = fraction * 10 + ord(rest[pos]) - 48
                    if fraction > (limit - 1) // 10 or bigger > limit:
                        overflow = True
                    else:
                        fraction, scale = bigger, scale * 10
                pos += 1
            digits_after = pos > start
        if not (digits_before or digits_after):
            raise ValueError(text)
        start = pos
        while pos < end and not (rest[pos] == "." or "0" <= rest[pos] <= "9"):
            pos += 1
        unit = _GO_UNITS.get(rest[start:pos])
        if unit is None or whole > limit // unit:
            raise ValueError(text)
        value = whole * unit
        if fraction:
            value += int(float(fraction) * (float(unit) / scale))
            if value > limit:
                raise ValueError(text)
        total += value
        if total > limit:
            raise ValueError(text)
    if not negative and total > limit - 1:
        raise ValueError(text)
    return (-total if negative else total) / 1e9


class EventView:
    """One query's answer over one snapshot of the buffer: the events, the index, and
    whether the ACL removed some.  Its JSON is encoded once, however many watchers
    asked the same question and are woken by the same fire."""

    def __init__(self, events, filtered):
        self.events, self.filtered = events, filtered
        self.index = events[-1].index if events else 1
        self._json = None

    def json(self):
        if self._json is None:
            self._json = json.dumps([e.as_json() for e in self.events], separators=(",", ":")).encode()
        return self._json


class _Snapshot:
    """The buffer at one version, with the views already computed on it (by query key)."""

    __slots__ = ("events", "version", "views")

    def __init__(self, events, version):
        self.events, self.version, self.views = events, version, {}

    def view(self, key, select):
        found = self.views.get(key)
        if found is None:
            found = self.views[key] = select(self.events)
        return found


class EventBuffer:
    """The ring of the newest ``size`` events, persisted, with blocking reads."""

    MAX_WAIT = 600.0

    def __init__(self, store, size, max_bytes):
        self.store, self.size, self.max_bytes = store, size, max_bytes
        rows, self._ltime = store.newest_events(size)
        self._snapshot = _Snapshot(tuple(map(self._event, rows)), 0)
        self._last_seq = rows[-1]["seq"] if rows else 0
        self.shared = not store.db.single_process      # other processes fire into the same ring
        self._refreshing = threading.Lock()
        self._changed = threading.Condition()
        self.listeners = []            # called after every stored event (the Watchers thread)
        self.fired = Tally()           # by source: "api" (a PUT /v1/event/fire) or "hub" (its own)

    def validate(self, node, service, tag):
        """The filters' rules.  Consul answers 500 for these; they are bad input, so 400 here."""
        if tag and not service:
            raise ApiError(400, "Cannot provide tag filter without service filter")
        for label, pattern in (("node", node), ("service", service), ("tag", tag)):
            error = pattern and re2_error(pattern)
            if error:
                raise ApiError(400, f"Invalid {label} filter: {error}")

    def fire(self, name, payload, node="", service="", tag="", internal=False):
        """Store a new event and wake the watchers; returns it (with its stored LTime).
        ``internal`` events (the hub's own agent-status) skip the size limit of HTTP fires."""
        # Serf refuses more than 512 bytes with a 500; this is the client's doing, so 413.
        if not internal and len(name.encode()) + len(payload or b"") > self.max_bytes:
            raise ApiError(413, "error broadcasting event: user event exceeds configured limit of "
                                f"{self.max_bytes} bytes before encoding")
        # Inside the caller's write transaction when there is one (an agent's state change is
        # part of the change that caused it); the ring moves once it is committed.
        with self.store.write():
            # Shared: the highest stored time, under the event lock every process takes (a refresh
            # may move self._ltime meanwhile: the next time is computed locally).
            ltime = max(self._ltime, self.store.newest_ltime()) if self.shared else self._ltime
            event = Event(str(uuid.uuid4()), name, payload, node, service, tag, ltime + 1)
            if name != "_rexec":                    # Consul never buffers remote-exec events
                self.store.add_event(event, self.size, utcnow())
                self._ltime = max(self._ltime, ltime + 1)
            self.store.after_commit(functools.partial(self._publish, event, internal))
        return event

    @staticmethod
    def _event(row):
        return Event(row["id"], row["name"], row["payload"], row["node_filter"], row["service_filter"],
                     row["tag_filter"], row["ltime"])

    def refresh(self):
        """Read what was stored since the ring's newest event (by any process) into the ring; True
        when something was.  The ring is the database's: every process lists the same events
        with the same indexes."""
        # Read before taking the lock (which a hook holding a connection may wait for): rows another
        # refresh applied meanwhile are dropped under it.
        rows = self.store.events_after(self._last_seq)
        with self._refreshing:
            rows = [r for r in rows if r["seq"] > self._last_seq]
            if not rows:
                return False
            with self._changed:
                old = self._snapshot
                self._snapshot = _Snapshot((old.events + tuple(map(self._event, rows)))[-self.size:],
                                           old.version + 1)
                self._last_seq = rows[-1]["seq"]
                self._ltime = max(self._ltime, rows[-1]["ltime"])
                self._changed.notify_all()
            return True

    def follow(self, stop):
        """Keep the ring current with the other processes' fires (a hub thread, PostgreSQL)."""
        def changed():
            if self.refresh():
                for listener in self.listeners:
                    listener()
        self.store.db.listen(EVENTS_CHANNEL, stop, changed)

    def _publish(self, event, internal):
        """A committed event enters the ring; blocked queries wake."""
        if self.shared:
            self.refresh()              # in the database's order, with whatever others fired meanwhile
        elif event.name != "_rexec":
            with self._changed:
                old = self._snapshot
                self._snapshot = _Snapshot((old.events + (event,))[-self.size:], old.version + 1)
                self._changed.notify_all()
        self.fired.add(("hub" if internal else "api",))
        for listener in self.listeners:
            listener()

    def events(self):
        """The events, oldest first (an immutable tuple)."""
        return self._snapshot.events

    def deadline(self, wait):
        """The one deadline of a blocking query: ``wait`` seconds, default and cap 600 s."""
        wait = self.MAX_WAIT if wait is None or wait <= 0 else min(wait, self.MAX_WAIT)
        return time.monotonic() + wait

    def current(self):
        """The current snapshot (its events, version and shared views)."""
        return self._snapshot

    def _wait_for_change(self, version, timeout):
        """Block until the buffer moves past ``version`` or ``timeout`` seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self._snapshot.version != version, timeout)
            return self._snapshot

    def query(self, key, select, index=0, wait=None, park=False):
        """Consul's blocking query: ``select(events)`` makes the caller's EventView.

        ``key`` names the query (same key, same answer), so watchers asking the
        same question share one computed view per snapshot.  Returns at once
        unless ``index`` > 0 equals the current index; then waits for that index
        to change, or until one deadline (``wait``, default and cap 600 s), and
        answers with whatever is current then.  With ``park`` it does not wait:
        it returns a Watch for the Watchers thread to answer.

        On a database several processes share, the ring first catches up with what they stored
        (one indexed read): a client that fired on one process and lists on another sees its
        event, without waiting for the notification.
        """
        if self.shared and self.refresh():
            for listener in self.listeners:
                listener()
        snapshot = self._snapshot
        view = snapshot.view(key, select)
        if not index or view.index != index:
            return view
        deadline = self.deadline(wait)
        if park:
            return Watch(key, select, index, deadline)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return view
            newer = self._wait_for_change(snapshot.version, remaining)
            if newer is snapshot:
                continue
            snapshot = newer
            view = snapshot.view(key, select)
            if view.index != index:
                return view


class UserEvents:
    """The user-event rules: validation, then ACL, then the buffer (Consul's order)."""

    def __init__(self, buffer, acl, config):
        self.buffer, self.acl, self.config = buffer, acl, config

    def fire(self, secret, name, payload, dc=None, node="", service="", tag=""):
        if dc and dc != self.config.datacenter:
            raise ApiError(400, "No path to datacenter")   # Consul: 500 from the failed forward
        self.buffer.validate(node, service, tag)
        token = self.acl.resolve(secret)
        if not self.acl.allows(token, "write", name):
            raise ApiError(403, "Permission denied")
        return self.buffer.fire(name, payload, node, service, tag)

    def list(self, secret, name=None, index=0, wait=None, node=None, service=None, tag=None, park=False):
        """The caller's EventView, as a possibly blocking query.

        With ``park``, a query that would block is not waited for here: a Watch
        is returned instead, for the Watchers thread to answer (see Watchers).
        """
        for label, given in (("node", node), ("service", service), ("tag", tag)):
            if given and len(given) > VIEW_NAME_MAX:       # bounds the time any stored filter takes
                raise ApiError(400, f"Invalid {label}: longer than {VIEW_NAME_MAX} characters")
        token = self.acl.resolve(secret)

        def select(events):
            view = [e for e in events if (not name or e.name == name) and e.visible_to(node, service, tag)]
            allowed = [e for e in view if self.acl.allows(token, "read", e.name)]
            return EventView(allowed, token is not None and len(allowed) < len(view))
        key = (name, node, service, tag, token.name if token else None)
        return self.buffer.query(key, select, index, wait, park)


class Watch:
    """A blocking event-list query parked with the Watchers thread.

    ``answer(view)`` is set by the HTTP layer: it writes the whole HTTP answer
    for this request and may return what is left to do once every watcher woken
    with it is answered.  Exactly one party answers: ``claim()`` decides who.
    """

    def __init__(self, key, select, index, deadline):
        self.key, self.select, self.index, self.deadline = key, select, index, deadline
        self.answer = None
        self._claimed = threading.Lock()

    def claim(self):
        return self._claimed.acquire(blocking=False)


class WatcherSlots:
    """A cap on blocking queries in progress, in total and per client address: under a WSGI host
    that gives each request a thread, every blocked query holds one for up to 10 minutes."""

    def __init__(self, total, per_client):
        self.total, self.per_client = total, per_client
        self._held, self._lock = collections.Counter(), threading.Lock()

    def take(self, addr):
        """A slot for ``addr``, or ApiError 429 (Consul's answer to a client over its limit)."""
        with self._lock:
            if self._held[addr] >= self.per_client or sum(self._held.values()) >= self.total:
                raise ApiError(429, "Your IP is issuing too many concurrent connections, please rate limit your calls",
                               headers={"Retry-After": "1"})
            self._held[addr] += 1

    def give_back(self, addr):
        with self._lock:
            self._held[addr] -= 1
            if self._held[addr] <= 0:
                del self._held[addr]


class Watchers:
    """Answers every parked blocking query from one thread.

    A thousand watchers blocked on one name hold no thread (the built-in server
    deferred their requests) and, when an event arrives, one thread computes the
    shared view once and writes all the answers; a thread per watcher, woken to
    answer for itself, costs ~60–90 ms of thread switching on two cores before
    any work is done.
    """

    def __init__(self, buffer):
        self.buffer = buffer
        self._parked = []
        self._cond = threading.Condition()
        self._answering = threading.Lock()
        self._poked = False
        buffer.listeners.append(self.poke)

    def poke(self):
        with self._cond:
            self._poked = True
            self._cond.notify()

    def parked(self):
        """How many blocking queries are waiting now."""
        with self._cond:
            return len(self._parked)

    def forget(self, watch):
        """A parked query nobody waits for any more (its client left)."""
        with self._cond:
            self._parked = [w for w in self._parked if w is not watch]

    def park(self, watch):
        with self._cond:
            self._parked.append(watch)
            self._poked = True
            self._cond.notify()

    def run(self, stop):
        while not stop.is_set():
            with self._cond:
                soonest = min((w.deadline for w in self._parked), default=time.monotonic() + 1.0)
                self._cond.wait_for(lambda: self._poked or stop.is_set(),
                                    max(0.0, min(1.0, soonest - time.monotonic())))
                self._poked = False
                parked = list(self._parked)
            self._answer(parked, final=stop.is_set())

    def _answer(self, parked, final=False):
        # One pass at a time: ``close`` (a graceful shutdown) waits for a pass under way, whose
        # answers are then all handed over (and counted in flight) before the shutdown waits.
        with self._answering:
            self._answer_now(parked, final)

    def _answer_now(self, parked, final):
        snapshot, now, answered, finish = self.buffer.current(), time.monotonic(), [], []
        for watch in parked:
            view = snapshot.view(watch.key, watch.select)
            if final or view.index != watch.index or now >= watch.deadline:
                if watch.claim():
                    try:
                        finish.append(watch.answer(view))
                    except OSError:
                        pass                 # the client went away
                    except Exception as exc:  # never let one answer stop the others
                        log(f"answering a watcher failed: {exc!r}", "error")
                answered.append(watch)
        for then in finish:                  # what each answer left to do once all are written
            if callable(then):
                then()
        if answered:
            with self._cond:
                done = set(map(id, answered))
                self._parked = [w for w in self._parked if id(w) not in done]

    def close(self):
        """Answer whoever is still parked with what is current (the app is closing), and wake the
        thread so that it sees the stop at once."""
        with self._cond:
            parked, self._parked = list(self._parked), []
            self._poked = True
            self._cond.notify()
        self._answer(parked, final=True)


###############################################################################
# Agent registry ##############################################################
###############################################################################
#
# One record per agent, whichever API it came through (Testflinger name,
# Rackspace uuid, Prefactor PFID).  Every state the APIs show is derived from
# the same row (spec agents.md §5.3); after every change the GoCD state tuple
# is recomputed and, when it moved, announced to the webhooks and as a
# Consul-style "agent-status" user event.

INSTANCE_STATUSES = ("pending", "active", "complete", "failed", "cancelled")
TF_PHASES = set(PHASES)


@dataclasses.dataclass
class AgentView:
    """What every API says about one agent at one moment."""

    config: str                  # GoCD agent_config_state
    runtime: str                 # GoCD runtime status
    status: str                  # Prefactor lifecycle
    counts: dict

    @property
    def agent_state(self):
        return "Building" if self.runtime == "Cancelled" else self.runtime

    @property
    def build_state(self):
        return self.runtime if self.runtime in ("Idle", "Building", "Cancelled") else "Unknown"

    @property
    def gocd_tuple(self):
        return [self.config, self.agent_state, self.build_state]

    @property
    def running(self):
        return self.counts["pending"] + self.counts["active"] > 0

    @property
    def actions(self):
        retired = self.status == "retired"
        return {"delete": not self.running, "reinstate": retired, "retire": not retired, "update": not retired}

    @property
    def online(self):
        return self.runtime in ("Idle", "Building", "Cancelled")

    @property
    def busy(self):
        return self.runtime in ("Building", "Cancelled")


def derive_agent(row, counts, cancel_requested, now, lost_after):
    """The derived state of spec §5.3 from a registry row and its instance counts."""
    full = {status: counts.get(status, 0) for status in INSTANCE_STATUSES}
    full["finished"] = full["complete"] + full["failed"] + full["cancelled"]
    full["total"] = full["pending"] + full["active"] + full["finished"]
    heard = row["last_seen_at"] is not None
    down = row["shutdown_at"] is not None
    silent = heard and not down and lost_after > 0 and now - row["last_seen_at"] >= lost_after
    tf_state = row["state"] if row["tf"] else None
    config = "Disabled" if row["retired"] or tf_state in ("offline", "maintenance") else "Enabled"
    if not heard:
        runtime = "Missing"
    elif down:
        runtime = "Unknown"
    elif silent:
        runtime = "LostContact"
    elif full["active"] and cancel_requested:
        runtime = "Cancelled"
    elif full["active"] or tf_state in TF_PHASES:
        runtime = "Building"
    else:
        runtime = "Idle"
    running = full["pending"] + full["active"] > 0
    if row["retired"]:
        status = "retired"
    elif (heard and not down and not silent) or running:
        status = "active"
    elif not heard and full["total"] == 0:
        status = "pending"
    else:
        status = "dormant"
    return AgentView(config, runtime, status, full)


class Registry:
    """The agents of every API, their derived state and its announcements."""

    def __init__(self, store, config, notifier, events):
        self.store, self.config, self.notifier, self.events = store, config, notifier, events
        self._pfids = PfidClock(config.pfid_partition)
        self.environment_id = config.default_environment_id or store.setting(
            "default_environment_id", self.new_pfid)
        self.account_id = store.setting("account_id", self.new_pfid)
        store.fill_environment(self.environment_id)     # agents that predate the registry
        self._last_contact, self._contact_lock = {}, threading.Lock()    # name → last contact written

    def derived_pfid(self, *parts):
        """A PFID that is always the same for the same ``parts`` (deployments, job versions)."""
        digest = int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest(), "big")
        return _b32(digest >> 209, 10) + _b32(self.config.pfid_partition, 6) + _b32(digest & (2 ** 80 - 1), 16)

    def new_pfid(self):
        return self._pfids()

    def new_ids(self):
        return {"pfid": self.new_pfid(), "uuid": str(uuid.uuid4()), "environment_id": self.environment_id}

    def find(self, column, value):
        return self.store.agent_by(column, value)

    def all(self):
        return self.store.all_agents()

    def state_history(self, name, since, now=None):
        """[(start, end, state)] of an agent from ``since`` to now: Idle, Building, LostContact, or
        Offline (disabled, gone, never heard from)."""
        now = utcnow() if now is None else now
        changes = self.store.agent_states(name, since)
        spans = []
        for index, (time_, state) in enumerate(changes):
            config, agent_state, _ = json.loads(state)
            label = "Offline" if config == "Disabled" or agent_state in ("Missing", "Unknown") else agent_state
            end = changes[index + 1][0] if index + 1 < len(changes) else now
            spans.append((max(time_, since), end, label))
        return spans

    def views(self, rows=None, now=None):
        """[(row, view)] of these agents (all by default), their instances counted in one query."""
        rows = self.store.all_agents() if rows is None else rows
        now = utcnow() if now is None else now
        summaries = self.store.instance_summaries()
        return [(row, derive_agent(row, *summaries.get(row["name"], ({}, False)), now,
                                   self.config.lost_contact_seconds)) for row in rows]

    def view(self, row, now=None):
        counts, cancel = self.store.instance_summary(row["name"])
        return derive_agent(row, counts, cancel, utcnow() if now is None else now,
                            self.config.lost_contact_seconds)

    def changed(self, name, now=None, row=None):
        """Recompute one agent's GoCD state (from ``row`` when the caller just read it); announce it
        when it moved.  Returns nothing: the view it builds lacks the finished counts."""
        row = row or self.store.get_agent(name)
        if row is None:
            return None
        now = utcnow() if now is None else now
        live, cancel = self.store.live_instances(name)      # the tuple needs no finished-instance counts
        view = derive_agent(row, live, cancel, now, self.config.lost_contact_seconds)
        new = json.dumps(view.gocd_tuple)
        if new == row["gocd_tuple"]:
            return None
        # One transaction — the caller's when it calls inside one (a pop is one commit with the
        # state change it causes); the webhooks hear of it once it is committed.
        with self.store.write():
            if self.store.announce_state(name, row["gocd_tuple"], new, now):
                body = gocd_body(row, view, now)
                self.events.buffer.fire("agent-status", body.encode(), node=f"^{re.escape(name)}$", internal=True)
                self.notifier.announce(name, body)          # the outbox row commits with the change
        return None

    def contact(self, name, ip=None, shutdown=False, throttle=0.0, announce=True):
        """The agent was heard from (or said goodbye); a no-op for unknown names.  True when the
        contact was recorded (``announce=False``: the caller then calls ``changed`` itself).

        With ``throttle``, a contact less than that many seconds after the last
        recorded one is not written again (agents call many times a second)."""
        now = utcnow()
        with self._contact_lock:
            if throttle and now - self._last_contact.get(name, 0) < throttle:
                return False               # another request of this agent just recorded it
            if len(self._last_contact) >= 65536:
                self._last_contact.clear()     # bounded, whatever names callers make up
            self._last_contact[name] = now
        if self.store.touch_agent(name, now, ip, shutdown):
            if announce:
                self.changed(name)
            return True
        return False

    def sweep(self):
        """The lost-contact sweep: announce every agent whose state moved while nobody asked."""
        now = utcnow()
        for row in self.store.all_agents():
            self.changed(row["name"], now, row)

    def _create(self, name, origin, **values):
        """Insert a new agent from outside Testflinger (ids not given, None, are generated)."""
        now = utcnow()
        self.store.create_agent({"name": name, "origin": origin, "tf": 0, "updated_at": now, "inserted_at": now,
                                 "record_updated_at": now, **self.new_ids(),
                                 **{k: v for k, v in values.items() if v is not None}})
        return self.store.get_agent(name)

    def _touch(self, name, ip=None, shutdown=False):
        with self._contact_lock:
            now = self._last_contact[name] = utcnow()
        self.store.touch_agent(name, now, ip, shutdown)

    # -- Prefactor agents (spec agents.md §2); each change is one write transaction -----------------
    #
    # Announcements (``changed``) join the change's transaction when called inside it; the event
    # ring and the webhooks hear of them once it is committed (``after_commit``), so a
    # notification never tells of a change that was rolled back.  Lock order: the writer, then
    # the event buffer's.

    def agent(self, pfid):
        """The agent with this PFID: 400 for a malformed id, 404 for an unknown one."""
        if not PFID_PATTERN.match(pfid or ""):
            raise ApiError(400, "Invalid agent_id")
        row = self.find("pfid", pfid)
        if row is None:
            raise ApiError(404, "Agent not found")
        return row

    def _require(self, row, action, verb):
        """Refuse (409) an action the agent's available_actions do not allow (spec §2.5)."""
        view = self.view(row)
        if not view.actions[action]:
            raise ApiError(409, f"Agent cannot be {verb} in its current state ({view.status})")

    def create(self, name, origin, **values):
        """A new agent from outside Testflinger; ids not given (None) are generated."""
        with self.store.write():
            if values.get("pfid") and self.find("pfid", values["pfid"]) is not None:
                raise Invalid({"details.id": ["has already been taken"]})
            if self.find("name", name) is not None:
                raise Invalid({"details.name": ["has already been taken"]})
            self._create(name, origin, **values)
        self.changed(name)
        return self.store.get_agent(name)

    def update(self, pfid, values):
        """Change an agent's name, description or current version (already validated)."""
        with self.store.write():
            row = self.agent(pfid)
            if "name" in values and values["name"] != row["name"] and self.find("name", values["name"]):
                raise Invalid({"details.name": ["has already been taken"]})
            changed = {k: v for k, v in values.items() if row[k] != v}
            self._require(row, "update", "updated")
            if "name" in changed and row["tf"]:
                raise ApiError(409, "Agent name is managed by Testflinger")
            if changed:
                self.store.update_agent(row["name"], {**changed, "record_updated_at": utcnow()})
        return self.find("pfid", pfid)

    def set_retired(self, pfid, retired):
        """Retire or reinstate an agent (retired agents take no jobs and start no instances)."""
        with self.store.write():
            row = self.agent(pfid)
            self._require(row, "retire" if retired else "reinstate", "retired" if retired else "reinstated")
            self.store.update_agent(row["name"], {"retired": int(retired), "record_updated_at": utcnow()})
        self.changed(row["name"])
        return self.find("pfid", pfid)

    def delete(self, pfid):
        """Remove an agent everywhere; returns its row and view as they were just before."""
        with self.store.write():
            row = self.agent(pfid)
            self._require(row, "delete", "deleted")
            view = self.view(row)
            self.store.delete_agent(row["name"])
        return row, view

    # -- Prefactor instances: pending → active → complete | failed | cancelled --------------------

    def instance(self, pfid):
        inst = self.store.get_instance(pfid) if PFID_PATTERN.match(pfid or "") else None
        if inst is None:
            raise ApiError(404, "Agent instance not found")
        return inst

    def instances(self, agent_pfid=None):
        return self.store.list_instances(self.agent(agent_pfid)["name"] if agent_pfid else None)

    def register_instance(self, agent_pfid, version, schema_version, environment_id=None, pfid=None,
                          update_current=False):
        """A new pending instance of an agent that is not retired, with its version ids (one pair of
        ids per distinct version description)."""
        with self.store.write():
            row = self.agent(agent_pfid)
            if row["retired"]:
                raise ApiError(409, "Agent cannot register instances in its current state (retired)")
            if pfid and self.store.get_instance(pfid) is not None:
                raise Invalid({"id": ["has already been taken"]})
            digest = hashlib.sha256(json.dumps([version, schema_version], sort_keys=True).encode()).hexdigest()
            version_id, schema_id = self.store.agent_version(row["name"], digest,
                                                             lambda: (self.new_pfid(), self.new_pfid()))
            now = utcnow()
            if update_current:
                self.store.update_agent(row["name"], {"current_version_id": version_id,
                                                      "current_schema_version_id": schema_id,
                                                      "record_updated_at": now})
            pfid = pfid or self.new_pfid()
            self.store.add_instance({"pfid": pfid, "agent_name": row["name"], "source": "prefactor",
                                     "environment_id": environment_id or row["environment_id"],
                                     "agent_version_id": version_id, "status": "pending", "inserted_at": now,
                                     "updated_at": now})
            self._touch(row["name"])
        self.changed(row["name"])
        return self.store.get_instance(pfid)

    def start_instance(self, pfid, when):
        return self._move_instance(pfid, ("pending",), {"status": "active", "started_at": when},
                                   "Agent instance cannot be started in its current state ({})")

    def finish_instance(self, pfid, status, when):
        return self._move_instance(pfid, ("pending", "active"), {"status": status, "finished_at": when},
                                   "Agent instance is already in a terminal state ({})")

    def _move_instance(self, pfid, from_statuses, values, refusal):
        with self.store.write():
            inst = self.instance(pfid)
            if not self.store.move_instance(inst["pfid"], from_statuses, {**values, "updated_at": utcnow()}):
                raise ApiError(409, refusal.format(inst["status"]))
            self._touch(inst["agent_name"])
        self.changed(inst["agent_name"])
        return self.store.get_instance(inst["pfid"])

    # -- Rackspace agent events (spec agents.md §3) ------------------------------------------------

    def resolve(self, agent_id):
        """A Rackspace agent id: by uuid (any case), then by name."""
        row = self.find("uuid", agent_id.lower()) if UUID_TEXT.match(agent_id) else None
        return row or self.find("name", agent_id)

    def project_agent(self, project_id, agent_id):
        row = self.resolve(agent_id)
        if row is None or row["project_id"] != project_id:
            raise ApiError(404, "Agent not found.")
        return row

    def check_caller(self, caller, agent_id):
        """403 unless the agent that sends an event (``X-Agent-Id``) is the one it is about."""
        if UUID_TEXT.match(caller) and UUID_TEXT.match(agent_id):
            same = caller.lower() == agent_id.lower()
        else:
            same = caller == agent_id
        if not same:
            known_caller, known_target = self.resolve(caller), self.resolve(agent_id)
            if known_caller is None or known_target is None or known_caller["name"] != known_target["name"]:
                raise ApiError(403, "X-Agent-Id does not match the agent in the request URI.")

    def agent_event(self, project_id, agent_id, event, mode=None, ip=None):
        """``startup`` (creating the agent if needed, binding it to the project), ``shutdown`` or
        ``agent_activate``; one announcement of the end state."""
        with self.store.write():
            row = self.resolve(agent_id)
            if row is None:
                if event != "startup":
                    raise ApiError(404, "Agent not found.")
                row = self._create(agent_id, "rackspace", project_id=project_id,
                                   uuid=agent_id.lower() if UUID_TEXT.match(agent_id) else None)
            elif row["project_id"] not in (None, project_id):
                raise ApiError(404, "Agent not found.")
            if event == "startup" and row["retired"]:
                raise ApiError(409, "Agent is retired.")
            if row["project_id"] is None:
                self.store.update_agent(row["name"], {"project_id": project_id})
            if event == "agent_activate":
                self._activate([row["name"]], project_id, mode)
            else:
                self.store.add_rackspace_event([row["name"]], project_id, f"agent_{event}", None, utcnow())
            self._touch(row["name"], ip, shutdown=event == "shutdown")
        self.changed(row["name"])

    def activate_projects(self, project_id, mode):
        """``agent_activate`` for every agent of a project (None: of every project)."""
        with self.store.write():
            rows = [r for r in self.store.all_agents() if r["project_id"] is not None
                    and (project_id is None or r["project_id"] == project_id)]
            for pid in sorted({r["project_id"] for r in rows}):
                self._activate([r["name"] for r in rows if r["project_id"] == pid], pid, mode)

    def feed(self, project_id, name, marker, limit, descending):
        return self.store.rackspace_events(project_id, name, marker, limit, descending)

    def _activate(self, names, project_id, mode):
        expires = utcnow() + self.config.activate_ttl
        for name in names:
            self.store.update_agent(name, {"activation_mode": mode, "activation_expires_at": expires})
        self.store.add_rackspace_event(names, project_id, "agent_activate", mode, utcnow())


class Idempotency:
    """Writes made with an idempotency key (Prefactor's, spec agents.md §2.4): the first request
    runs, a repeat within a day gets the first answer again, and a repeat while the first is still
    running gets 409 (the key is claimed in the same transaction that checks it)."""

    TTL = 86400.0
    CLAIM_TTL = 300.0           # a claim whose request died (the process stopped) frees the key after this

    def __init__(self, store):
        self.store = store

    def run(self, scope, key, make):
        """(status, body) of ``make()``, run once per (scope, key) a day.  Only hashes of the scope
        (which names the caller) and of the key are stored."""
        scope, key, now = _sha256(scope), _sha256(key), utcnow()
        seen = self.store.claim_idempotency(scope, key, now, now - self.TTL, now - self.CLAIM_TTL)
        if seen is not None:
            if not seen["status"]:
                raise ApiError(409, "A request with this idempotency key is still being processed")
            return seen["status"], seen["body"]
        try:
            status, body = make()
        except BaseException:
            self.store.forget_idempotency(scope, key)
            raise
        self.store.remember_answer(scope, key, status, body, utcnow())
        return status, body


###############################################################################
# GoCD notifications ##########################################################
###############################################################################
#
# GoCD's agent-status notifications (spec agents.md §4.2): the body of one
# state change, and the Notifier that delivers them, one worker and FIFO queue
# per webhook, recording every delivery and failing webhooks as health
# messages (served by "HTTP: GoCD server health").

def gocd_body(row, view, now):
    """GoCD's agent-status request body: its keys, in its order, compact."""
    return json.dumps({
        "uuid": row["uuid"], "host_name": row["name"], "is_elastic": False, "ip_address": row["last_ip"],
        "operating_system": None, "free_space": "Unknown", "agent_config_state": view.config,
        "agent_state": view.agent_state, "build_state": view.build_state, "transition_time": iso(now, 3, "+0000"),
    }, separators=(",", ":"))


class Notifier:
    """GoCD agent-status deliveries (spec §4.2) through an outbox: a notification is a row written in
    the transaction of the change it tells of, and one worker per webhook delivers the rows in
    order, recording each delivery and removing its row in one transaction.  With several processes
    on one database, one process at a time delivers for a webhook (``hold``); if it dies, another
    takes over where it stopped (the delivery in flight may go out twice; none is lost).

    A dead or slow receiver only delays its own queue, never an API request.
    Every delivery is recorded; failures become server health messages.
    """

    TTL = 120.0

    def __init__(self, store, config):
        self.store, self.config = store, config
        self.urls = [u for u in re.split(r"[\s,]+", config.gocd_webhooks) if u]
        self._wake = {url: threading.Event() for url in self.urls}
        self._closing = threading.Event()
        self._drain_until = None
        self.outcomes = Tally()          # deliveries finished, by outcome

    def workers(self):
        return [(self._work, f"agenthub-gocd-{n}", url) for n, url in enumerate(self.urls)]

    def health(self):
        """GoCD's server health messages: the webhooks whose last delivery failed."""
        return self.store.health()

    def deliveries(self, agent_name=None, limit=100):
        return self.store.deliveries(agent_name, limit)

    def queued(self):
        """{webhook: notifications in the outbox}."""
        depth = self.store.outbox_depth()
        return {url: depth.get(url, 0) for url in self.urls}

    def announce(self, agent_name, body):
        """Queue the notification for every webhook, in the caller's transaction."""
        if not self.urls:
            return
        now = utcnow()
        with self.store.write():
            self.store.enqueue([(url, str(uuid.uuid4()), agent_name, body, now) for url in self.urls])
            self.store.after_commit(self.poke)

    def poke(self):
        """Something may be waiting in the outbox (a commit here, or another process's event)."""
        for wake in self._wake.values():
            wake.set()

    def close(self, drain_seconds=5.0):
        """Stop the workers: queued deliveries get ``drain_seconds`` to go out.  Then, on a database
        of one process, the rest are recorded as undelivered — none vanish silently; on a shared
        one they stay queued for the other processes."""
        deadline = time.monotonic() + drain_seconds
        if self._drain_until is None or deadline < self._drain_until:     # a second close never extends it
            self._drain_until = deadline
        self._closing.set()
        self.poke()

    def _drained(self):
        return self._drain_until is not None and time.monotonic() > self._drain_until

    def _work(self, url):
        wake, hold = self._wake[url], self.store.db.hold(f"agenthub gocd {url}")
        try:
            while True:
                try:
                    if not hold.acquire():                  # another process delivers for this webhook
                        if self._closing.wait(1.0):
                            return
                        continue
                    item = self.store.next_delivery(url)
                    if item is None:
                        if self._closing.is_set():
                            return
                        wake.wait(1.0)
                        wake.clear()
                        continue
                    if self._drained():
                        if self.store.db.single_process:
                            self._record(url, item, 0, "undelivered", None, None, [],
                                         "agenthub stopped before delivery")
                            continue
                        return
                    self._deliver(url, item)
                except Exception as exc:         # the worker must outlive any one delivery
                    log(f"notification to {url} failed: {exc!r}", "error")
                    if self._closing.wait(1.0) and self._drained():
                        return
        finally:
            hold.release()

    def _deliver(self, url, item):
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "agenthub",
                   "X-Agenthub-Notification": "agent-status", "X-Agenthub-Api-Version": "4.0",
                   "X-Agenthub-Delivery": item["delivery_uuid"]}
        if self.config.gocd_webhook_auth:
            headers["Authorization"] = f"Bearer {self.config.gocd_webhook_auth}"
        attempts, status, text, error = 0, None, None, None
        for delay in (0.0,) + tuple(self.config.gocd_retry_delays):
            if delay and self._closing.wait(delay) and self._drained():
                break
            if utcnow() - item["created_at"] > self.TTL:
                self._record(url, item, attempts, "expired", status, text, [], "Notification expired after 120 s")
                return
            attempts += 1
            try:
                status, text = http_send("POST", url, item["body"].encode(), headers, self.config.gocd_timeout)
                error = None
            except (TimeoutError, OSError) as exc:
                status, text, error = None, None, str(exc) or exc.__class__.__name__
                continue
            if status != 429 and status < 500:
                break
        self._record(url, item, attempts, *self._judge(status, text, error))

    @staticmethod
    def _judge(status, text, error):
        """(outcome, status, text, messages, error text) of an answer, by GoCD's rules."""
        if error is not None:
            return "error", None, None, [], error
        if not 200 <= status < 300:
            return ("error", status, text, [], "The webhook sent a response that could not be understood. It "
                    f"returned code '{status}' and the following response: '{(text or '')[:1000]}'")
        if not (text or "").strip():
            return "success", status, text, [], None           # leniency: a bodyless 2xx is success
        try:
            answer = load_json(text)
        except ValueError:
            return "error", status, text, [], "Unable to de-serialize json response. Invalid JSON"
        if not isinstance(answer, dict) or not isinstance(answer.get("status"), str) or not answer["status"]:
            return ("error", status, text, [],
                    "Unable to de-serialize json response. Notify result 'status' is a required field")
        messages = answer.get("messages", [])
        if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
            return ("error", status, text, [], "Unable to de-serialize json response. "
                    "Notify result 'messages' should be of type list of string")
        if answer["status"].lower() == "success":
            return "success", status, text, messages, None
        return "failure", status, text, messages, None

    def _record(self, url, item, attempts, outcome, status, text, messages, error):
        now = utcnow()
        self.outcomes.add((outcome,))
        self.store.record_delivery({
            "delivery_uuid": item["delivery_uuid"], "webhook_url": url, "agent_name": item["agent_name"],
            "body": item["body"],
            "attempts": attempts, "outcome": outcome, "http_status": status,
            "response_body": (text or "")[:4096] if text is not None else None,
            "messages": json.dumps(messages if outcome != "error" else [error]),
            "created_at": item["created_at"], "finished_at": now}, outbox_id=item["id"])
        scope = f"gocd:{url}"
        if outcome == "success":
            self.store.set_health(scope)
        else:
            detail = ", ".join(messages) if outcome == "failure" else (error or outcome)
            self.store.set_health(scope, f"Notification update failed for webhook: {url}", detail, "ERROR", now)


###############################################################################
# HTTP boundary ###############################################################
###############################################################################
#
# Every request passes here before any API code runs, whatever API it is for:
#
# * ``check_request`` (a Bottle ``before_request`` hook) refuses what no API
#   should see: a request target or headers over the limits (414/431), a path
#   or query string that is not UTF-8, a Content-Length that is not a number or
#   comes with a chunked body (400).  Header values that are not UTF-8 are made
#   readable (bad bytes replaced) and remembered, so that a credential made of
#   them is refused as a bad credential instead of raising somewhere later.
# * the readers below are the only way routes read a request: ``credential``,
#   ``cookie``, the query (re-decoded as UTF-8 once, here), ``form`` and
#   ``parse_body`` — JSON with limits on size, depth and numbers, without
#   NaN/Infinity or lone surrogates, so nothing stored can break a later read.
# * each API is an ``ApiStyle``: its prefix, how it authenticates, and how it
#   renders every error.  ``ApiStyle.route`` is the one route factory: a route
#   declares its style and never builds an error body or catches a generic
#   exception itself.  An unexpected exception answers 500 in the API's style
#   with a generic text and the request id (``X-Request-Id`` on every answer),
#   and is logged once, with that id.

MAX_TARGET = 16 * 1024          # path + query string (414 beyond)
MAX_HEADER = 32 * 1024          # one header value (431 beyond): a token with many permissions is ~18 KiB
MAX_HEADERS = 64 * 1024         # all header values together (431 beyond)
MAX_FORM = 64 * 1024            # a web form's urlencoded body (413 beyond)
MAX_QUERY_FIELDS = 1000
CREDENTIAL_HEADERS = ("HTTP_AUTHORIZATION", "HTTP_X_AUTH_TOKEN", "HTTP_X_CONSUL_TOKEN", "HTTP_X_AGENT_ID",
                      "HTTP_IDEMPOTENCY_KEY")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COOKIE_ESCAPE = re.compile(r"\\(?:([0-3][0-7][0-7])|(.))")
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class BadCredential(ApiError):
    """A credential header whose bytes are not UTF-8: each API refuses it as a bad credential."""

    def __init__(self, header):
        super().__init__(401, f"Invalid credentials: the {header} header is not valid UTF-8")
        self.header = header


def _utf8(text):
    """A WSGI (latin-1) string re-read as UTF-8, or None when its bytes are not UTF-8."""
    if text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_name(host):
    """The name part of a Host value that matched _HOST: no port, no brackets, lower case."""
    name = host[1:host.index("]")] if host.startswith("[") else host.partition(":")[0]
    return name.lower().rstrip(".")


class AllowedHosts:
    """The names the hub answers to in ``Host`` (and ``X-Forwarded-Host``): loopback names, the
    bound address (the machine's name when bound to every address) and ``--allowed-host`` values
    ("*" any name, ".example.org" that domain and every name under it).  A browser tricked by
    DNS rebinding sends the attacker's name and is refused."""

    def __init__(self, config):
        names = set(LOOPBACK_NAMES)
        if config.host in ("", "0.0.0.0", "::"):
            hostname = socket.gethostname().lower()
            names.update({hostname, hostname.partition(".")[0]})
        else:
            names.add(_host_name(config.host if ":" not in config.host else f"[{config.host}]"))
        extra = [n.strip().lower().rstrip(".") for n in config.allowed_hosts.split(",") if n.strip()]
        self.any = "*" in extra
        self.domains = tuple(n for n in extra if n.startswith("."))
        self.names = frozenset(names | {n for n in extra if not n.startswith(".")})

    def allows(self, host):
        name = _host_name(host)
        return self.any or name in self.names or name.endswith(".localhost") or \
            any(name.endswith(d) or name == d[1:] for d in self.domains)


def _origin_netloc(scheme, netloc):
    netloc = netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    return netloc[:-len(default)] if default and netloc.endswith(default) else netloc


def check_cross_site(environ):
    """A browser's write from another origin (a form another site auto-posts, a page on another
    port of this host) is refused on every API: browsers say where a request came from in
    ``Sec-Fetch-Site`` and ``Origin``; other clients send neither."""
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site and site not in ("same-origin", "none"):
        raise ApiError(403, "Cross-site request refused")
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return
    own = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST") or ""
    scheme = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
    parts = urllib.parse.urlsplit(origin) if origin != "null" else None
    if parts is None or parts.scheme not in ("http", "https") or \
            _origin_netloc(parts.scheme, parts.netloc) != _origin_netloc(scheme, own):
        raise ApiError(403, "Cross-origin request refused")


def check_request(environ, stopped_at=None, hosts=None):
    """Refuse (ApiError) or normalise one request before any route sees it.  ``stopped_at``: when a
    shutdown began (monotonic); a request received after it answers 503, one received before is served.
    ``hosts``: the AllowedHosts (None: any)."""
    if stopped_at is not None and environ.get("agenthub.received", time.monotonic()) >= stopped_at:
        raise ApiError(503, "agenthub is shutting down")
    # Bottle has already decoded PATH_INFO, dropping bytes that are not UTF-8: judge the raw path.
    path, query = environ.get("bottle.raw_path", environ.get("PATH_INFO", "")), environ.get("QUERY_STRING", "")
    if len(path) + len(query) > MAX_TARGET:
        raise ApiError(414, "Request-URI Too Long")
    decoded = _utf8(path)
    if decoded is None:
        raise ApiError(400, "The request path is not valid UTF-8")
    if _CONTROL.search(decoded):
        raise ApiError(400, "The request path contains control characters")
    total, bad = 0, set()
    for key in [k for k in environ if k.startswith("HTTP_") or k == "CONTENT_TYPE"]:
        value = environ[key]
        if not isinstance(value, str) or len(value) > MAX_HEADER:
            raise ApiError(431, "Request Header Fields Too Large")
        total += len(value)
        if _utf8(value) is None:
            bad.add(key)
            # Readable from now on (Bottle would raise on it), but never usable as a credential.
            environ[key] = value.encode("latin-1", "replace").decode("utf-8", "replace").encode().decode("latin-1")
    if total > MAX_HEADERS:
        raise ApiError(431, "Request Header Fields Too Large")
    environ["agenthub.bad_headers"] = bad
    # Bottle builds URLs (redirects, links) from these: a malformed one must not reach it.
    for key in ("HTTP_HOST", "HTTP_X_FORWARDED_HOST"):
        if key in environ and not _HOST.fullmatch(environ[key]):
            raise ApiError(400, "Invalid Host header")
        # Probes (kubelet, load balancers) address the hub by IP: the health answers tell nothing.
        if key in environ and hosts is not None and not hosts.allows(environ[key]) \
                and path not in ("/healthz", "/readyz"):
            raise ApiError(400, f"Host {_host_name(environ[key])!r} is not a name of this hub (see --allowed-host)")
    if environ.get("HTTP_X_FORWARDED_PROTO", "http") not in ("http", "https"):
        raise ApiError(400, "Invalid X-Forwarded-Proto header")
    if environ.get("REQUEST_METHOD") not in SAFE_METHODS:
        check_cross_site(environ)
    length = environ.get("CONTENT_LENGTH") or ""
    if length and parse_uint(length) is None:
        raise ApiError(400, "Invalid Content-Length header")
    coding = environ.get("HTTP_TRANSFER_ENCODING", "").strip().lower()
    if coding and coding != "chunked":
        raise ApiError(400, "Unsupported Transfer-Encoding (only chunked)")
    if coding and length:
        raise ApiError(400, "Content-Length and a chunked body together")
    try:
        text = _utf8(query)                 # bytes sent raw, not %-escaped, must be UTF-8 as well
        if text is None:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "raw query bytes")
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict",
                                       max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise ApiError(400, "The query string is not valid UTF-8")
    except ValueError:
        raise ApiError(400, "Too many query parameters")
    fields = bottle.FormsDict()
    fields.recode_unicode = False          # already UTF-8: getunicode() hands values over as they are
    for key, value in pairs:
        fields.append(key, value)
    environ["bottle.request.query"] = fields


def client_addr():
    """The address of the peer that sent the request.  ``X-Forwarded-For`` is not believed: any
    client can write it, and the address is stored and shown as the agent's."""
    return request.environ.get("REMOTE_ADDR") or None


def credential(name):
    """A credential header's value ('' when absent); BadCredential when its bytes were not UTF-8."""
    key = "HTTP_" + name.upper().replace("-", "_")
    if key in request.environ.get("agenthub.bad_headers", ()):
        raise BadCredential(name)
    return _utf8(request.environ.get(key, ""))          # the boundary made every header decodable


def cookie(name):
    """One cookie's value, or None; a Cookie header that is not UTF-8 counts as no cookie at all."""
    environ = request.environ
    jar = environ.get("agenthub.cookies")
    if jar is None:
        jar = environ["agenthub.cookies"] = {}
        if "HTTP_COOKIE" not in environ.get("agenthub.bad_headers", ()):
            for item in _utf8(environ.get("HTTP_COOKIE", "")).split(";"):
                key, sep, value = item.partition("=")
                value = value.strip()
                if len(value) > 1 and value[0] == value[-1] == '"':
                    # A quoted value, as Bottle's set_cookie writes "," or "é": \054, \351, \"
                    value = _COOKIE_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)) if m.group(1) else m.group(2),
                                               value[1:-1])
                if sep and key.strip():
                    jar[key.strip()] = value           # the last of a repeated name, as http.cookies
    return jar.get(name) or None


def form():
    """A web form (urlencoded, UTF-8) as a dict of its last values; anything else is refused."""
    data = body_stream().read(MAX_FORM + 1)
    if len(data) > MAX_FORM:
        raise ApiError(413, "Payload too large")
    if not data.strip():
        return {}
    if not (request.content_type or "").lower().startswith("application/x-www-form-urlencoded"):
        raise ApiError(415, "Forms must be sent as application/x-www-form-urlencoded")
    try:
        return dict(urllib.parse.parse_qsl(data.decode("utf-8"), keep_blank_values=True, encoding="utf-8",
                                           errors="strict", max_num_fields=MAX_QUERY_FIELDS))
    except UnicodeDecodeError:
        raise ApiError(400, "The form is not valid UTF-8")
    except ValueError:
        raise ApiError(400, "Too many form fields")


NO_BODY, NOT_JSON = object(), object()


def parse_body(limit):
    """The request body parsed as JSON, ``NO_BODY`` when it is empty, or ``NOT_JSON``; each
    API decides what those mean.  Larger than ``limit`` raises ApiError(413) unread; JSON the
    hub refuses (see ``load_json``) raises ApiError(400)."""
    if request.content_length > limit:
        raise ApiError(413, "Payload too large")
    data = body_stream().read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "Payload too large")
    if not data.strip():
        return NO_BODY
    try:
        return load_json(data)
    except JsonRefused as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}")
    except ValueError:
        return NOT_JSON


def body_stream():
    """The raw request body as a file-like object that stops at Content-Length."""
    if "chunked" in request.environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return request.body          # Bottle de-chunks into a spooled file (400 when malformed)
    return _Limited(request.environ["wsgi.input"], max(request.content_length, 0))


class _Limited:
    def __init__(self, stream, remaining):
        self.stream, self.remaining = stream, remaining

    def read(self, size):
        if self.remaining <= 0:
            return b""
        data = self.stream.read(min(size, self.remaining))
        self.remaining -= len(data)
        if not data:
            self.remaining = 0
        return data


# -- answers ---------------------------------------------------------------------------

def json_response(obj, status=200, headers=None):
    body = json.dumps(obj, separators=(",", ":")) + "\n"
    return HTTPResponse(body, status, {"Content-Type": "application/json", **(headers or {})})


def text_response(text, status=200, content_type="text/html; charset=utf-8", headers=None):
    return HTTPResponse(text, status, {"Content-Type": content_type, **(headers or {})})


def no_content():
    return HTTPResponse("", 204, {"Content-Type": "application/json"})


def stream_response(found, content_type, disposition=None):
    """A stored file ((size, chunks) from JobQueue.open_file) streamed with its length."""
    size, chunks = found
    headers = {"Content-Type": content_type, "Content-Length": str(size)}
    if disposition:
        headers["Content-Disposition"] = disposition
    return HTTPResponse(chunks, 200, headers)


# -- API styles and the route factory -------------------------------------------------------

class ApiStyle:
    """One API as the outside sees it: where it lives, how it authenticates, how it answers errors.

    Subclasses (one per HTTP section below) override ``error`` (every error body of the API is
    made there), ``refused`` (the API's own validation exceptions) and ``call`` (authentication
    and whatever each of its requests shares).  ``route`` registers a route in this style.
    """

    name = "web"
    prefix = ""                 # the paths this API answers: prefix itself and below it
    invalid = ()                # the API's own validation exceptions, turned into answers by refused()

    def __init__(self, app, hub):
        self.app, self.hub, self.config = app, hub, hub.config

    def owns(self, path):
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")

    def error(self, status, message=None):
        """Every error answer of this API."""
        return text_response((message or _status_text(status)) + "\n", status, "text/plain; charset=utf-8")

    def refused(self, exc):
        """An ApiError (or one of ``invalid``) as this API answers it."""
        return self.error(exc.status, exc.message)

    def call(self, func, kw, **options):
        """Run one route: authentication and what every request of the API shares go here."""
        return func(**kw)

    def crashed(self):
        """500 for an unexpected exception, logged once with the request id."""
        environ = request.environ
        log(f"request {environ.get('agenthub.request_id', '-')} {environ.get('REQUEST_METHOD')}"
            f" {environ.get('PATH_INFO')!r} failed:\n{traceback.format_exc()}", "error", environ["wsgi.errors"],
            request_id=environ.get("agenthub.request_id"))
        return self.crash_answer()

    def crash_answer(self):
        """The answer to a crash: a generic text with the request id, never the exception."""
        return self.error(500, f"Internal server error (request id {request.environ.get('agenthub.request_id')})")

    # What a route declares only for GET /openapi.json: ``summary`` (else the docstring's first line),
    # ``doc_body`` / ``doc_query`` (a Schema or a JSON Schema dict, where the route reads its input
    # by hand), ``answers`` ({status: description or (description, schema, media type)}),
    # ``doc_methods`` (the methods an ANY route serves).
    DOC_OPTIONS = ("summary", "doc_body", "doc_query", "answers", "doc_methods")

    def route(self, method, path, **options):
        doc = {k: options.pop(k) for k in self.DOC_OPTIONS if k in options}

        def decorate(func):
            self.app.documented.append({"method": method, "path": path, "style": self, "func": func,
                                        "options": options, **doc})

            def handler(**kw):
                try:
                    return self.call(func, kw, **options)
                except bottle.HTTPError as exc:           # Bottle's own refusals (a broken chunked body)
                    return self.error(exc.status_code)
                except HTTPResponse:
                    raise
                except (ApiError, *self.invalid) as exc:
                    answer = self.refused(exc)
                    for name, value in getattr(exc, "headers", {}).items():
                        answer.set_header(name, value)
                    return answer
                except Exception:
                    return self.crashed()
            self.app.route(path, method, handler, name=f"{self.name}:{method}:{path}")
            return func
        return decorate


def _status_text(status):
    return bottle.HTTP_CODES.get(status, "Error")


def install_boundary(app, styles):
    """Put ``check_request`` in front of every route and answer Bottle's own errors (no route,
    wrong method, a crash outside a route) in the style of the API whose prefix the path has."""

    def style_for(path):
        return next(style for style in styles if style.owns(path))

    @app.hook("before_request")
    def _boundary():
        environ = request.environ
        try:
            check_request(environ, app.hub.stopped_at, app.hub.allowed_hosts)
        except ApiError as exc:
            raise style_for(request.path).refused(exc)

    def errors(error):
        style = style_for(request.path)
        if error.status_code >= 500:
            answer = style.crash_answer()
        else:
            answer = style.error(error.status_code)
        if error.status_code == 405 and "Allow" in error.headers:
            answer.set_header("Allow", error.headers["Allow"])
        return answer
    app.default_error_handler = errors


class HubApp(bottle.Bottle):
    """The Bottle app of one hub: every answer carries the request's ``X-Request-Id``, is counted
    (API, route template, method, status class; time to the answer's start) and logged."""

    METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.requests = Tally()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.documented = []           # every route an ApiStyle registered, for GET /openapi.json

    def __call__(self, environ, start_response):
        rid = environ["agenthub.request_id"] = f"{self._rid_prefix}-{next(self._rid_counter):x}"
        began = time.perf_counter()

        def start(status, headers, exc_info=None):
            headers.extend((("X-Request-Id", rid), ("X-Content-Type-Options", "nosniff"),
                            ("Referrer-Policy", "same-origin")))
            self._count(environ, int(status[:3]), time.perf_counter() - began)
            return start_response(status, headers, exc_info)
        return self.wsgi(environ, start)

    def _count(self, environ, status, seconds):
        route = environ.get("bottle.route")
        if route is not None and route.name and ":" in route.name:
            api, template = route.name.split(":", 1)[0], route.rule
        else:
            path = environ.get("PATH_INFO", "")
            api = next((style.name for style in getattr(self, "styles", ()) if style.owns(path)), "web")
            template = route.rule if route is not None else "(unmatched)"
        method = environ.get("REQUEST_METHOD", "")
        self.requests.add((api, template, method if method in self.METHODS else "other", f"{status // 100}xx"))
        self.latency.observe(seconds, (api, template))
        if self.hub.config.quiet:
            return
        if environ.get("agenthub.parked"):
            # A parked blocking query is logged when its answer goes out, with the time it was held.
            # The answer may already have gone out (the Watchers thread): whichever of the two comes
            # second writes the line (setdefault is atomic).
            line = functools.partial(access_log, environ, api=api, route=template)
            ended = environ.setdefault("agenthub.log_meet", line)
            if ended is not line:
                line(**ended)
        else:
            access_log(environ, status, seconds, api, template)

    _rid_prefix = secrets.token_hex(3)
    _rid_counter = itertools.count(1)


# -- multipart ----------------------------------------------------------------------------

# RFC 2046 §5.1.1 allows 1-70 characters of a small set; clients also use "$" and the like, so any
# printable ASCII is taken (not ending in a space).
_BOUNDARY = re.compile(r"[ -~]{0,69}[!-~]")


def multipart_part(field, content_type, stream):
    """Find the part named ``field`` of a multipart/form-data body.

    Returns an iterator over its content in chunks of up to ``CHUNK_SIZE``
    bytes, reading ``stream`` as it goes, or None when the body is not
    multipart or has no such part.  Memory stays flat whatever the size.
    """
    match = re.search(r'boundary=(?:"([^"]*)"|([^;\s]*))', content_type or "")
    if not (content_type or "").lower().startswith("multipart/form-data") or not match:
        return None
    boundary = match.group(1) if match.group(1) is not None else match.group(2)
    if not _BOUNDARY.fullmatch(boundary):
        raise ApiError(400, "Invalid multipart boundary")
    scanner = _PartScanner(stream, boundary.encode("ascii"))
    for headers in scanner.parts():
        disposition = headers.get("content-disposition", "")
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition) or re.search(r'(?:^|;)\s*name=([^;\s]+)',
                                                                                disposition)
        if name and name.group(1) == field:
            return scanner.body()
        for _ in scanner.body():
            pass
    return None


class _PartScanner:
    """Splits a multipart body at its boundaries, a block at a time."""

    BLOCK = 256 * 1024

    def __init__(self, stream, boundary):
        self.stream, self.buf, self.eof = stream, b"", False
        self.delimiter = b"\r\n--" + boundary
        self.buf = b"\r\n"              # so the first boundary looks like every other one
        self.finished = False

    def _fill(self):
        if self.eof:
            return False
        data = self.stream.read(self.BLOCK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def parts(self):
        """Yield each part's headers (lower-cased names); the caller drains ``body()``."""
        while not self._find(self.delimiter):
            if not self._fill():
                return
        self.buf = self.buf[self.buf.index(self.delimiter) + len(self.delimiter):]
        while not self.finished:
            while len(self.buf) < 2 and self._fill():
                pass
            if self.buf[:2] != b"\r\n":
                return                   # "--" closes the body (or it is malformed)
            while b"\r\n\r\n" not in self.buf:
                if not self._fill() or len(self.buf) > 65536:
                    return
            head, self.buf = self.buf[2:].split(b"\r\n\r\n", 1)
            headers = {}
            for line in head.decode("utf-8", "replace").split("\r\n"):
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            yield headers

    def _find(self, needle):
        return needle in self.buf

    def body(self):
        """Yield the current part's content; stops at the next boundary."""
        pending = bytearray()
        keep = len(self.delimiter) + 1
        while True:
            index = self.buf.find(self.delimiter)
            if index >= 0:
                pending += self.buf[:index]
                self.buf = self.buf[index + len(self.delimiter):]
                break
            if len(self.buf) > keep:
                pending += self.buf[:-keep]
                self.buf = self.buf[-keep:]
            if len(pending) >= CHUNK_SIZE:
                yield bytes(pending[:CHUNK_SIZE])
                del pending[:CHUNK_SIZE]
            if not self._fill():
                self.finished = True
                raise ApiError(400, "Bad Request")        # body ended inside a part
        while len(pending) >= CHUNK_SIZE:
            yield bytes(pending[:CHUNK_SIZE])
            del pending[:CHUNK_SIZE]
        if pending:
            yield bytes(pending)


###############################################################################
# HTTP: Testflinger ###########################################################
###############################################################################
#
# Routes parse the request, call the job queue, and answer in the Testflinger
# server's styles (spec §1): JSON aborts ``{"detail": {}, "message": …}``,
# 422 validation maps, and plain-text bodies where the original sends text.

AMC = ("admin", "manager", "contributor")
AMA = ("admin", "manager", "agent")
AGENT = ("agent",)
ANY_ROLE = ROLES

TF_NOT_FOUND = ("Not found: 404 Not Found: The requested URL was not found on the server. If you entered "
                "the URL manually please check your spelling and try again.")


def tf_abort(status, message):
    return json_response({"detail": {}, "message": message}, status)


def tf_validation_error(errors, location="json"):
    return json_response({"detail": {location: errors}, "message": "Validation error"}, 422)


def tf_load(schema, data, location="json"):
    try:
        return schema.load(data)
    except Invalid as exc:
        raise tf_validation_error(exc.errors, location)


def tf_query():
    """Query parameters as marshmallow's webargs sees them: repeated keys become lists."""
    out = {}
    for key in request.query.keys():
        values = request.query.getall(key)
        out[key] = values if key in ("tags", "state", "queue") else values[-1]
    return out


def tf_job_id(job_id, text=False):
    """The canonical id, or the endpoint's 400 (JSON or plain text, as the original)."""
    canonical = parse_job_id(job_id)
    if canonical is None:
        raise ApiError(400, "Invalid job id\n", text=True) if text else ApiError(400, "Invalid job_id specified")
    return canonical


def read_json(limit):
    """Testflinger's reading: missing, empty or non-JSON bodies are ``{}`` (the original's rule)."""
    body = parse_body(limit)
    return {} if body is NO_BODY or body is NOT_JSON else body


class TestflingerStyle(ApiStyle):
    """The Testflinger server's answers (spec §1): JSON aborts ``{"detail": {}, "message": …}``,
    plain text where the original sends text, Flask's 404 text, and ``Unhandled Exception: …``
    for a 500 (here with a generic text and the request id, never the exception)."""

    name, prefix = "tf", "/v1"

    def error(self, status, message=None):
        if status == 404 and message is None:
            return text_response(TF_NOT_FOUND, 404)
        return tf_abort(status, message or _status_text(status))

    def crash_answer(self):
        return text_response(f"Unhandled Exception: internal server error "
                             f"(request id {request.environ.get('agenthub.request_id')})", 500)

    def refused(self, exc):
        return text_response(exc.message, exc.status) if exc.text else self.error(exc.status, exc.message)

    def call(self, func, kw, roles=None, body=None, query=None, body_limit=None, query_status=422, contact=True):
        """``roles`` gates the route: authentication first, then the role.  ``body`` / ``query``: the
        Schema the JSON body / the query is loaded with, passed as ``data`` / ``query`` (the same
        objects GET /openapi.json describes).  ``body_limit``: a larger body is refused unread (413).
        ``contact=False``: the route records the agent's sign of life itself, in its own transaction."""
        if roles is not None:
            auth = self.hub.auth
            identity = auth.identify(credential("Authorization"))
            auth.require(identity, roles)
            request.environ["agenthub.identity"] = identity
            agent_name = cookie("agent_name")
            if contact and agent_name and identity.role == "agent":
                # Whatever an agent asks is a sign of life (spec agents.md §5.2).
                self.hub.registry.contact(agent_name, client_addr(), throttle=1.0)
        if body is not None:
            if body_limit and request.content_length >= body_limit:
                raise ApiError(413, "Payload too large")
            kw["data"] = tf_load(body, read_json(body_limit or self.config.max_json_bytes))
        if query is not None:
            try:
                kw["query"] = query.load(tf_query())
            except Invalid as exc:
                if query_status == 400:
                    raise ApiError(400, exc.errors)
                raise tf_validation_error(exc.errors, "query")
        return func(**kw)


def install_testflinger(app, hub):
    """Mount the Testflinger v1 API on ``app``; returns its style."""
    jobs, auth = hub.jobs, hub.auth
    api = TestflingerStyle(app, hub)

    def route(method, path, roles=None, **options):
        return api.route(method, path, roles=roles, **options)

    # -- service ------------------------------------------------------------------

    @route("GET", "/v1")
    def home():
        """The server's name and version"""
        return text_response(f"Testflinger Server vagenthub-{__version__}")

    # -- jobs -----------------------------------------------------------------------

    @route("POST", "/v1/job", AMC, body=JOB_SCHEMA)
    def submit_job(data):
        """Submit a job (or re-submit a job_id: see the README)"""
        job_id = jobs.submit(data, request.environ["agenthub.identity"])
        return json_response({"job_id": job_id})

    @route("GET", "/v1/job", AGENT, contact=False,
           doc_query={"queue": {"type": "array", "items": {"type": "string"}}},
           answers={200: "The job, its secrets resolved", 204: "No job waits in these queues"})
    def pop_job():
        """An agent takes the next job of its queues (204: none)"""
        queues = request.query.getall("queue")
        if not queues:
            raise ApiError(400, "No queue(s) specified in request")
        agent_name = cookie("agent_name")
        if not agent_name:
            raise ApiError(401, "Agent not identified")
        job = jobs.pop(queues, agent_name, client_addr())
        return no_content() if job is None else json_response(job)

    @route("GET", "/v1/job/search", AMC, query=SEARCH_SCHEMA)
    def search_jobs(query):
        """Search jobs by tags and state"""
        return json_response(jobs.search(query.get("tags"), query.get("match", "any"), query.get("state"),
                                         query.get("limit"), query.get("offset", 0)))

    @route("GET", "/v1/job/<job_id>", AMC, answers={200: "The job's definition", 204: "No such job"})
    def get_job(job_id):
        """A job's definition (204: unknown job)"""
        job = jobs.definition(tf_job_id(job_id))
        return no_content() if job is None else json_response(job)

    @route("GET", "/v1/job/<job_id>/attachments", AGENT, answers={200: ("The archive", {}, "application/gzip"), 204: "None"})
    def get_attachments(job_id):
        """A job's attachments archive"""
        return send_file(tf_job_id(job_id, text=True), "attachments", "application/gzip")

    @route("POST", "/v1/job/<job_id>/attachments", AMC, doc_body=("multipart/form-data", {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "contentMediaType": "application/gzip"}}}))
    def post_attachments(job_id):
        """Upload a job's attachments (multipart field file)"""
        job_id = tf_job_id(job_id, text=True)
        if jobs.check_attachments_upload(job_id) == "done":
            return text_response("OK")
        return receive_file(job_id, "attachments")

    @route("GET", "/v1/job/<job_id>/position", AMC, answers={200: ("Jobs ahead", {"type": "string"}, "text/plain"), 410: "Not waiting"})
    def job_position(job_id):
        """How many jobs are ahead of a waiting job in its queue (410: not waiting)"""
        position = jobs.position(tf_job_id(job_id))
        if position is None:
            raise ApiError(410, "Job not found or already started\n", text=True)
        return text_response(str(position))

    # agenthub extensions: when a waiting job should start (Testflinger #858), and its attempts.
    @route("GET", "/v1/job/<job_id>/estimate", AMC, answers={200: "The estimate", 410: "Not waiting"})
    def job_estimate(job_id):
        """When a waiting job should start, and how that was worked out (an agenthub extension)"""
        estimate = jobs.estimate(tf_job_id(job_id))
        if estimate is None:
            raise ApiError(410, "Job not found or already started\n", text=True)
        return json_response(estimate)

    @route("GET", "/v1/job/<job_id>/attempts", AMC, answers={200: "The attempts", 204: "No such job"})
    def job_attempts(job_id):
        """Every attempt of a job (an agenthub extension)"""
        found = jobs.attempts(tf_job_id(job_id))
        return no_content() if found is None else json_response(found)

    @route("POST", "/v1/job/<job_id>/action", AMC, body=ACTION_SCHEMA)
    def job_action(data, job_id):
        """Cancel a job"""
        if not jobs.cancel(tf_job_id(job_id, text=True), request.environ["agenthub.identity"]):
            raise ApiError(400, "The job is already completed or cancelled", text=True)
        return text_response("OK")

    # -- results, logs, artifacts ------------------------------------------------------

    # The original validates, then checks the id, then refuses >= 16 MiB; the size is checked
    # first here so that a huge body is never read into memory just to be refused.
    @route("POST", "/v1/result/<job_id>", AGENT, body=RESULT_SCHEMA, body_limit=16 * 1024 * 1024)
    def post_result(data, job_id):
        """An agent reports a job's state, exit codes and device info"""
        jobs.post_result(tf_job_id(job_id), data, cookie("agent_name"))
        return text_response("OK")

    def attempt():
        """``?attempt=N``: one attempt of a job re-queued (an agenthub extension); None: the current."""
        return tf_load(ATTEMPT_QUERY_SCHEMA, {k: v for k, v in tf_query().items() if k == "attempt"},
                       "query").get("attempt")

    @route("GET", "/v1/result/<job_id>", ANY_ROLE, doc_query=ATTEMPT_QUERY_SCHEMA, answers={200: "The result", 204: "No such job or attempt"})
    def get_result(job_id):
        """A job's result: state, exit codes, logs, device info (?attempt=N: an earlier attempt)"""
        result = jobs.result(tf_job_id(job_id), attempt())
        return no_content() if result is None else json_response(result)

    @route("GET", "/v1/result/<job_id>/status", ANY_ROLE, doc_query=ATTEMPT_QUERY_SCHEMA, answers={200: "The result", 204: "No such job or attempt"})
    def get_status(job_id):
        """A job's state and exit codes only (204: unknown job)"""
        status = jobs.status(tf_job_id(job_id), attempt())
        return no_content() if status is None else json_response(status)

    @route("GET", "/v1/events/job/<job_id>", ANY_ROLE)
    def get_job_events(job_id):
        """A job's events, oldest first"""
        canonical = parse_job_id(job_id)
        events = None if canonical is None else jobs.events(canonical)
        if events is None:
            raise ApiError(404, "Job not found")            # an invalid id too (no 400 here)
        return json_response({"job_id": canonical, "events": events})

    # The original raises inside URL matching (a 500) for other log types; here they are unknown URLs.
    @route("POST", "/v1/result/<job_id>/log/<log_type:re:output|serial>", AGENT, body=LOG_POST_SCHEMA)
    def post_log(data, job_id, log_type):
        """An agent sends one fragment of a phase's log"""
        jobs.add_log(tf_job_id(job_id), log_type, data, cookie("agent_name"))
        return text_response("OK")

    @route("GET", "/v1/result/<job_id>/log/<log_type:re:output|serial>", AMC, query=LOG_QUERY_SCHEMA,
           query_status=400)
    def get_log(query, job_id, log_type):
        """A job's log, by phase, from a fragment or a time on"""
        return json_response(jobs.logs(tf_job_id(job_id), log_type, query.get("start_fragment", 0),
                                       query.get("start_timestamp"), query.get("phase"), query.get("attempt")))

    @route("POST", "/v1/result/<job_id>/artifact", AGENT, doc_body=("multipart/form-data", {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "contentMediaType": "application/gzip"}}}))
    def post_artifact(job_id):
        """An agent uploads a job's artifact (multipart field file)"""
        job_id = tf_job_id(job_id, text=True)
        if jobs.reports_on_earlier_attempt(job_id, cookie("agent_name")):
            for _ in iter(functools.partial(body_stream().read, CHUNK_SIZE), b""):
                pass                                 # read and dropped (see reports_on_earlier_attempt)
            return text_response("OK")
        return receive_file(job_id, "artifact")

    @route("GET", "/v1/result/<job_id>/artifact", AMC, doc_query=ATTEMPT_QUERY_SCHEMA, answers={200: ("The artifact", {}, "application/x-tar"), 204: "None"})
    def get_artifact(job_id):
        """A job's artifact (?attempt=N: an earlier attempt's)"""
        return send_file(tf_job_id(job_id, text=True), "artifact", "application/x-tar",
                         "inline; filename=artifact.tar.gz", attempt())

    def receive_file(job_id, kind):
        part = multipart_part("file", request.environ.get("CONTENT_TYPE", ""), body_stream())
        if part is None:
            raise ApiError(400, "Bad Request")
        jobs.save_file(job_id, kind, part)
        return text_response("OK")

    def send_file(job_id, kind, content_type, disposition=None, number=None):
        found = jobs.open_file(job_id, kind, number)
        return no_content() if found is None else stream_response(found, content_type, disposition)

    # -- agents, queues, images ----------------------------------------------------------

    @route("GET", "/v1/agents/queues", AMC)
    def get_queues():
        """The advertised queues and their descriptions"""
        return json_response(jobs.advertised_queues())

    @route("POST", "/v1/agents/queues", AMA, body=QUEUES_SCHEMA)
    def post_queues(data):
        """Advertise queues with their descriptions"""
        jobs.advertise_queues(data)
        return text_response("OK")

    @route("GET", "/v1/agents/images/<queue_name>", AMC)
    def get_images(queue_name):
        """The images a queue offers"""
        return json_response(jobs.images(queue_name))

    @route("POST", "/v1/agents/images", AMA, body=IMAGES_SCHEMA)
    def post_images(data):
        """Set the images each queue offers"""
        jobs.set_images(data)
        return text_response("OK")

    @route("GET", "/v1/agents/data", AMC)
    def list_agents():
        """Every Testflinger agent"""
        return json_response(jobs.agents())

    @route("GET", "/v1/agents/data/<agent_name>", ANY_ROLE)
    def get_agent(agent_name):
        """One Testflinger agent"""
        agent = jobs.agent(agent_name)
        return json_response({}, 404) if agent is None else json_response(agent)

    @route("POST", "/v1/agents/data/<agent_name>", AMA, body=AGENT_SCHEMA)
    def post_agent(data, agent_name):
        """An agent reports its state and queues (sets the agent_name cookie)"""
        jobs.post_agent(agent_name, data, client_addr())
        answer = json_response({"status": "OK"})
        answer.set_cookie("agent_name", agent_name, httponly=True, samesite="strict", path="/")
        return answer

    @route("POST", "/v1/agents/provision_logs/<agent_name>", AGENT, body=PROVISION_LOG_SCHEMA)
    def post_provision_log(data, agent_name):
        """An agent reports how a provision ended"""
        jobs.provision_log(agent_name, data)
        return text_response("OK")

    @route("GET", "/v1/queues/summary", AMC, query=SUMMARY_QUERY_SCHEMA)
    def queue_summary(query):
        """Agents and waiting/running counts of queues (an agenthub extension)

        The queues named by ?queue=, or those ?agent= serves, or every queue."""
        names = query.get("queue")
        if "agent" in query:
            agent = jobs.agent(query["agent"])
            if agent is None:
                raise ApiError(404, "Agent not found")
            names = sorted(set(names or []) | set(agent.get("queues", [])))
        return json_response(jobs.queue_summaries(names))

    @route("GET", "/v1/queues/wait_times", AMC, doc_query={"queue": {"type": "array", "items": {"type": "string"}}})
    def wait_times():
        """Wait-time percentiles of queues (?queue=, repeatable)"""
        return json_response(jobs.wait_times(request.query.getall("queue")))

    @route("GET", "/v1/queues/<queue_name>/agents", AMC, answers={200: "The agents", 204: "None"})
    def queue_agents(queue_name):
        """The agents of a queue"""
        agents = jobs.queue_agents(queue_name)
        return json_response(agents) if agents else no_content()

    @route("GET", "/v1/queues/<queue_name>/jobs", AMC, query=PAGE_SCHEMA)
    def queue_jobs(query, queue_name):
        """The jobs of a queue"""
        found = jobs.queue_jobs(queue_name, query.get("limit"), query.get("offset", 0))
        return json_response(found) if found else no_content()

    # -- oauth2 ---------------------------------------------------------------------------

    @route("POST", "/v1/oauth2/token")
    def oauth_token():
        """Log in with Basic client id and secret: an access and a refresh token"""
        return json_response(auth.login(credential("Authorization"), client_addr()))

    @route("POST", "/v1/oauth2/refresh", body=REFRESH_SCHEMA)
    def oauth_refresh(data):
        """A new access token for a refresh token"""
        return json_response(auth.refresh(data["refresh_token"]))

    @route("POST", "/v1/oauth2/revoke", ("admin",), body=REFRESH_SCHEMA)
    def oauth_revoke(data):
        """Revoke a refresh token"""
        auth.revoke(data["refresh_token"])
        return json_response({"status": "OK"})

    # -- job status webhook ------------------------------------------------------------

    @route("POST", "/v1/job/<job_id>/events", AGENT, body=STATUS_UPDATE_SCHEMA)
    def job_events(data, job_id):
        """Forward an agent's job events to the job's status webhook"""
        status, text = jobs.forward_status(tf_job_id(job_id), data)
        return HTTPResponse(text, status, {"Content-Type": "text/html; charset=utf-8"})

    # -- restricted queues and client permissions ------------------------------------------

    @route("GET", "/v1/restricted-queues", AMC)
    def restricted_queues():
        """The restricted queues and their clients"""
        return json_response(auth.restricted_queues())

    @route("GET", "/v1/restricted-queues/<queue_name>", AMC)
    def restricted_queue(queue_name):
        """One restricted queue and its clients"""
        return json_response(auth.restricted_queues(queue_name))

    @route("POST", "/v1/restricted-queues/<queue_name>", ("admin", "manager"), body=RESTRICTED_QUEUE_SCHEMA)
    def restrict_queue(data, queue_name):
        """Restrict a queue to a client"""
        auth.restrict_queue(queue_name, data["client_id"])
        return text_response("OK")

    @route("DELETE", "/v1/restricted-queues/<queue_name>", ("admin", "manager"), body=RESTRICTED_QUEUE_SCHEMA)
    def unrestrict_queue(data, queue_name):
        """Remove a client from a restricted queue"""
        auth.unrestrict_queue(queue_name, data["client_id"])
        return text_response("OK")

    @route("GET", "/v1/client-permissions", ("admin", "manager"))
    def all_client_permissions():
        """Every client's permissions"""
        return json_response(auth.client_permissions())

    @route("GET", "/v1/client-permissions/<client_id>", ("admin", "manager"))
    def client_permissions(client_id):
        """One client's permissions"""
        found = auth.client_permissions(client_id)
        if found is None:
            raise ApiError(404, "Error: Specified client_id does not exist.")
        return json_response(found)

    @route("PUT", "/v1/client-permissions/<client_id>", ("admin", "manager"), body=CLIENT_PERMISSIONS_SCHEMA)
    def set_client_permissions(data, client_id):
        """Create or change a client: secret, role, limits"""
        return text_response(auth.set_client_permissions(request.environ["agenthub.identity"], client_id, data))

    @route("DELETE", "/v1/client-permissions/<client_id>", ("admin",))
    def delete_client_permissions(client_id):
        """Delete a client"""
        auth.delete_client(client_id)
        return text_response("OK")

    # -- secrets ---------------------------------------------------------------------------------

    @route("PUT", "/v1/secrets/<client_id>/<path:path>", ("contributor", "manager", "admin"), body=SECRET_SCHEMA)
    def put_secret(data, client_id, path):
        """Store a secret under a path of a client"""
        expires = hub.secrets.write(request.environ["agenthub.identity"], client_id, path, data)
        return json_response({"expires_at": iso(expires)})

    @route("DELETE", "/v1/secrets/<client_id>/<path:path>", ("contributor", "manager", "admin"))
    def delete_secret(client_id, path):
        """Delete a secret"""
        hub.secrets.delete(request.environ["agenthub.identity"], client_id, path)
        return text_response("OK")

    return api


###############################################################################
# HTTP: Consul events #########################################################
###############################################################################
#
# Consul's user-event endpoints (spec consul.md): plain-text errors without a
# trailing newline, compact JSON, X-Consul-Default-Acl-Policy on every answer.

CONSUL_NOT_FOUND = "Invalid URL path: not a recognized HTTP API endpoint\n"


class ConsulStyle(ApiStyle):
    """Consul's answers: plain-text errors, ``X-Consul-Default-Acl-Policy`` on everything, and
    "ACL not found" (403) for a token that cannot be used."""

    name, prefix = "consul", "/v1/event"

    def headers(self, **extra):
        return {"X-Consul-Default-Acl-Policy": self.hub.event_acl.default, "Vary": "Accept-Encoding", **extra}

    def error(self, status, message=None, **extra):
        if message is None:
            message = CONSUL_NOT_FOUND if status == 404 else _status_text(status)
        return HTTPResponse(message, status, self.headers(**{"Content-Type": "text/plain; charset=utf-8"}, **extra))

    def refused(self, exc):
        return self.error(403, "ACL not found") if isinstance(exc, BadCredential) else \
            self.error(exc.status, exc.message)


def install_consul(app, hub):
    """Mount ``/v1/event/fire/<name>`` and ``/v1/event/list`` on ``app``; returns its style."""
    events, config = hub.events, hub.config
    api = ConsulStyle(app, hub)
    headers, error = api.headers, api.error

    def answer(obj, **extra):
        body = pretty_json(obj) if "pretty" in request.query else json.dumps(obj, separators=(",", ":"))
        return HTTPResponse(body, 200, headers(**{"Content-Type": "application/json"}, **extra))

    def pretty_json(obj):
        return json.dumps(obj, indent=4) + "\n"

    def list_body(view, pretty):
        """A list answer's body: the view's JSON, shared by every query that asked the same, or
        Consul's indented form (?pretty)."""
        return pretty_json([e.as_json() for e in view.events]).encode() if pretty else view.json()

    def method_guard(allowed):
        """None when the method is allowed; else Consul's OPTIONS or 405 answer."""
        allow = "OPTIONS," + allowed
        if request.method == "OPTIONS":
            return HTTPResponse("", 200, headers(Allow=allow))
        if request.method != allowed:
            return error(405, f"method {request.method} not allowed", Allow=allow)
        return None

    def token():
        return request.query.get("token") or credential("X-Consul-Token") or bearer_token(credential("Authorization"))

    def filters(*names):
        """Query values, None when absent (already UTF-8: the boundary decoded the query)."""
        return [request.query.get(n) for n in names]

    @api.route("ANY", "/v1/event/fire/<name:path>", doc_methods=("PUT",), doc_body=("application/octet-stream", {}), answers={200: "true or false"}, doc_query={"node": {"type": "string"}, "service": {"type": "string"}, "tag": {"type": "string"}, "dc": {"type": "string"}, "token": {"type": "string"}})
    def fire(name):
        """Fire a user event; the body is its payload (other methods: 405)"""
        refused = method_guard("PUT")
        if refused:
            return refused
        length = request.content_length
        if length > config.event_max_bytes:       # never read a body we are going to refuse
            raise ApiError(413, "error broadcasting event: user event exceeds configured limit of "
                              f"{config.event_max_bytes} bytes before encoding")
        # Consul reads the body only when Content-Length > 0: chunked bodies are ignored.
        payload = request.environ["wsgi.input"].read(length) if length > 0 else None
        dc, node, service, tag = filters("dc", "node", "service", "tag")
        event = events.fire(token(), name, payload or None, dc, node or "", service or "", tag or "")
        return answer(event.as_json(ltime=0))

    @api.route("ANY", "/v1/event/fire/", doc_methods=("PUT",))
    def fire_without_name():
        """Consul's answer to a fire without a name"""
        return method_guard("PUT") or error(400, "Missing name")

    @api.route("ANY", "/v1/event/fire", doc_methods=("PUT",), answers={301: "Moved to /v1/event/fire/"})
    def fire_redirect():
        """Consul's redirect to /v1/event/fire/"""
        # Go's ServeMux answers a path without its registered trailing slash with a redirect.
        return HTTPResponse("", 301, headers(Location="/v1/event/fire/"))

    @api.route("ANY", "/v1/event/list", doc_query={"name": {"type": "string"}, "node": {"type": "string"}, "service": {"type": "string"}, "tag": {"type": "string"}, "index": {"type": "string", "pattern": "^[0-9]+$"}, "wait": {"type": "string", "examples": ["5m", "30s"]}, "dc": {"type": "string"}, "token": {"type": "string"}})
    def list_events():
        """The newest events, filtered; a blocking query with ?index= and ?wait="""
        refused = method_guard("GET")
        if refused:
            return refused
        wait = index = None
        if request.query.get("wait"):
            try:
                wait = parse_go_duration(request.query.get("wait"))
            except ValueError:
                raise ApiError(400, "Invalid wait time")
        if request.query.get("index"):
            text = request.query.get("index")
            index = parse_uint(text, 2 ** 64 - 1)
            if index is None:
                raise ApiError(400, "Invalid index")
        name, node, service, tag = filters("name", "node", "service", "tag")
        park = "agenthub.defer" in request.environ          # only agenthub's own server can defer
        slot = client_addr() or "-" if index else None            # index > 0: a query that may block
        if slot is not None:
            hub.watcher_slots.take(slot)
        try:
            view = events.list(token(), name, index, wait, node or None, service or None, tag or None, park=park)
        except BaseException:
            if slot is not None:
                hub.watcher_slots.give_back(slot)
            raise
        if isinstance(view, Watch):
            return parked(view, slot)
        if slot is not None:
            hub.watcher_slots.give_back(slot)
        return HTTPResponse(list_body(view, "pretty" in request.query), 200,
                            headers(**{"Content-Type": "application/json"}, **list_headers(view)))

    def list_headers(view):
        extra = {"X-Consul-Index": str(view.index)}
        if view.filtered:
            extra["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return extra

    def parked(watch, slot):
        """Give the worker back at once; the Watchers thread writes this request's answer when the
        index moves or the wait ends (the blocking query of spec §4, answered from one thread for
        all watchers, with no thread held by any of them)."""
        environ = request.environ
        rid, pretty, answer_raw = environ.get("agenthub.request_id"), "pretty" in request.query, \
            environ["agenthub.answer_raw"]
        environ["agenthub.parked"] = True

        def logged(status):
            """The access log's line for this request, once it ends (499: the client went away)."""
            ended = {"status": status, "seconds": time.monotonic() - environ["agenthub.received"]}
            line = environ.setdefault("agenthub.log_meet", ended)     # (see HubApp._count)
            if line is not ended:
                line(**ended)

        def answer_now(view):
            hub.watcher_slots.give_back(slot)
            try:
                fields = headers(**{"Content-Type": "application/json", "X-Request-Id": rid}, **list_headers(view))
                body = list_body(view, pretty)
            except Exception as exc:           # answered all the same: a parked connection is never left
                log(f"answering a blocking query failed: {exc!r}", "error")
                logged(500)
                return answer_raw("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8"),
                                                               ("X-Request-Id", rid)], b"Internal Server Error\n")
            logged(200)
            return answer_raw("200 OK", list(fields.items()), body)

        def abandoned():
            """The client went away while parked: its slot is free at once (as Consul frees it)."""
            if not watch.claim():
                return False                   # being answered right now
            hub.watcher_slots.give_back(slot)
            hub.watchers.forget(watch)
            logged(499)
            return True
        watch.answer = answer_now
        environ["agenthub.defer"](abandoned)
        hub.watchers.park(watch)
        return HTTPResponse("")          # discarded: the answer is written by the Watchers thread

    @api.route("ANY", "/v1/event/<rest:path>")
    def unknown(rest):
        """Anything else under /v1/event: Consul's 404 and 405 texts"""
        raise ApiError(404, CONSUL_NOT_FOUND)

    return api


###############################################################################
# HTTP: Agents (Prefactor /api/v1) ############################################
###############################################################################
#
# Agent resources and their instances over the registry (spec agents.md §2).
# Envelopes {status, details} / {status, summaries, pagination, sorting};
# errors {status: "error", code, message[, errors]}.

PF_SORT_FIELDS = ("id", "name", "status", "last_seen")

# What GET /openapi.json says of the bodies /api/v1 reads by hand (Prefactor's own error shapes).
_PF_KEY = {"idempotency_key": {"type": "string", "maxLength": 64,
                               "description": "or the Idempotency-Key header: a repeat within a day gets the first answer"}}
PF_AGENT_BODY = {"type": "object", "required": ["details"], "properties": {**_PF_KEY, "details": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 255}, "description": {"type": ["string", "null"]},
                                     "environment_id": {"type": ["string", "null"]},
                                     "external_identifier": {"type": ["string", "null"]}, "id": {"type": "string"},
                                     "current_version_id": {"type": ["string", "null"]}}}}}
PF_IDEMPOTENT_BODY = {"type": "object", "properties": {**_PF_KEY, "timestamp": {"type": "string", "format": "date-time"}}}
PF_REGISTER_BODY = {"type": "object", "required": ["agent_id"], "properties": {
    **_PF_KEY, "agent_id": {"type": "string"}, "agent_version": {"type": "object"},
    "agent_schema_version": {"type": "object"}, "update_current_version": {"type": "boolean"},
    "environment_id": {"type": "string"}, "id": {"type": "string"}}}
PF_FINISH_BODY = {"type": "object", "required": ["status"], "properties": {
    **PF_IDEMPOTENT_BODY["properties"], "status": {"enum": ["complete", "failed", "cancelled"]}}}


def pf_error(status, code, message, errors=None):
    body = {"status": "error", "code": code, "message": message}
    if errors is not None:
        body["errors"] = errors
    return json_response(body, status)


def pf_page(query, total):
    """(offset, page size) from pagination[offset] / pagination[page_size], or Invalid."""
    errors, values = {}, {}
    for key, default, low, high in (("pagination[offset]", 0, 0, None), ("pagination[page_size]", 100, 1, 100)):
        text = query.get(key)
        if text is None or text == "":
            values[key] = default
            continue
        if not re.fullmatch(r"\d+", text) or int(text) < low or (high and int(text) > high):
            errors[key] = ["is invalid"]
        else:
            values[key] = int(text)
    if errors:
        raise Invalid(errors)
    return values["pagination[offset]"], values["pagination[page_size]"]


def pf_pagination(total, offset, size, shown):
    return {"item_count": total, "item_start": offset + 1 if shown else 0, "item_end": offset + shown if shown else 0,
            "page_index": offset // size + 1, "page_count": -(-total // size),
            "page_offset": offset, "page_size": size,
            "next_page_offset": offset + size if offset + size < total else None,
            "previous_page_offset": max(offset - size, 0) if offset > 0 else None}


class PrefactorStyle(ApiStyle):
    """Prefactor's answers: ``{status: "error", code, message[, errors]}``; bearer tokens when
    ``--api-token`` is set; idempotency keys on writes (body or ``Idempotency-Key``, 24 h)."""

    name, prefix = "prefactor", "/api"
    invalid = (Invalid,)
    CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
             405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 414: "uri_too_long",
             415: "unsupported_media_type", 422: "validation_errors", 431: "headers_too_large",
             503: "unavailable", 507: "insufficient_storage"}
    TEXTS = {404: "Not found", 405: "Method not allowed", 500: "Internal error"}

    def error(self, status, message=None, code=None):
        code = code or self.CODES.get(status, "internal_error" if status >= 500 else "bad_request")
        return pf_error(status, code, message or self.TEXTS.get(status) or _status_text(status))

    def refused(self, exc):
        if isinstance(exc, Invalid):
            return pf_error(422, "validation_errors", "Validation failed", exc.errors)
        return self.error(exc.status, exc.message, code=exc.code)

    def call(self, func, kw):
        method = request.method
        need = READ if method in ("GET", "HEAD") else \
            REPORT if request.path.startswith("/api/v1/agent_instance") else MANAGE
        caller = self.hub.api_tokens.check_prefactor(credential("Authorization"), need)
        if method in ("GET", "HEAD"):
            return func(**kw)
        body = self.body()
        key = (body.get("idempotency_key") if isinstance(body, dict) else None) or credential("Idempotency-Key")
        if key is not None and (not isinstance(key, str) or len(key) > 64):
            raise Invalid({"idempotency_key": ["should be at most 64 character(s)"]})
        if not key:
            return func(body, **kw)
        made = []

        def make():
            made.append(func(body, **kw))
            return made[0].status_code, made[0].body
        status, text = self.hub.idempotency.run(f"{method} {request.path} {caller}", key, make)
        return made[0] if made else HTTPResponse(text, status, {"Content-Type": "application/json"})

    def body(self):
        """The JSON body: none → {}; not JSON, or not an object → 400."""
        body = parse_body(self.config.max_json_bytes)
        if body is NO_BODY:
            return {}
        if body is NOT_JSON:
            raise ApiError(400, "Request body is not valid JSON")
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return body


def install_prefactor(app, hub):
    """Mount ``/api/v1`` on ``app``; returns its style."""
    registry, config = hub.registry, hub.config
    api = PrefactorStyle(app, hub)
    route = api.route

    def agent_json(row, view, counts=True, environment_id=None):
        out = {"available_actions": view.actions, "current_schema_version_id": row["current_schema_version_id"],
               "current_version_id": row["current_version_id"], "description": row["description"],
               "environment_id": row["environment_id"], "external_identifier": row["external_identifier"],
               "id": row["pfid"], "inserted_at": iso(row["inserted_at"]), "name": row["name"],
               "status": view.status, "type": "agent", "updated_at": iso(row["record_updated_at"])}
        if counts:
            out["instance_counts"] = dict(sorted(view.counts.items())) if environment_id in (
                None, "", row["environment_id"]) else {k: 0 for k in sorted(view.counts)}
        return dict(sorted(out.items()))

    def details(row, **kw):
        return json_response({"status": "success", "details": agent_json(row, registry.view(row), **kw)})

    def check_name(value, errors):
        """The form of a name; whether it is taken is the registry's to say, in its transaction."""
        if value is None or (isinstance(value, str) and not value.strip()):
            errors["details.name"] = ["can't be blank"]
        elif not isinstance(value, str):
            errors["details.name"] = ["is invalid"]
        elif len(value.strip()) > 255:
            errors["details.name"] = ["should be at most 255 character(s)"]

    def check_optional_pfid(value, key, errors, partition=None):
        if value is not None and (pfid_partition(value) is None or
                                  (partition is not None and pfid_partition(value) != partition)):
            errors[key] = ["is invalid"]

    @route("GET", "/api/v1/ping")
    def ping():
        """Check a token"""
        return json_response({"status": "success", "details": {"token_type": "api"}})

    @route("POST", "/api/v1/agent", doc_body=PF_AGENT_BODY)
    def create_agent(body):
        """Create an agent"""
        data = body.get("details")
        if not isinstance(data, dict):
            raise Invalid({"details": ["can't be blank"]})
        errors = {}
        check_name(data.get("name"), errors)
        check_optional_pfid(data.get("environment_id"), "details.environment_id", errors)
        check_optional_pfid(data.get("id"), "details.id", errors, config.pfid_partition)
        for key in ("description", "external_identifier"):
            if data.get(key) is not None and not isinstance(data[key], str):
                errors[f"details.{key}"] = ["is invalid"]
        if errors:
            raise Invalid(errors)
        row = registry.create(data["name"].strip(), "prefactor", pfid=data.get("id"),
                              environment_id=data.get("environment_id"), description=data.get("description"),
                              external_identifier=data.get("external_identifier"))
        return details(row)

    @route("GET", "/api/v1/agent", doc_query={"environment_id": {"type": "string"}, "sorting": {"type": "string", "examples": ["-id", "name"]}, "pagination[offset]": {"type": "integer"}, "pagination[page_size]": {"type": "integer"}})
    def list_agents():
        """List agents, paginated and sorted"""
        query = request.query
        env = query.get("environment_id")
        if env and pfid_partition(env) is None:
            raise Invalid({"environment_id": ["is invalid"]})
        sorting = query.get("sorting") or "-id"
        field = sorting.lstrip("-")
        if field not in PF_SORT_FIELDS or sorting.count("-") > 1:
            raise Invalid({"sorting": ["is invalid"]})
        rows = registry.all()
        if env:
            rows = [r for r in rows if r["environment_id"] == env]
        if any(query.get(k) for k in ("risk_profile_id", "team_id", "owner_person_id")):
            rows = []                       # agenthub keeps none of these, so nothing matches
        now = utcnow()
        views = registry.views(rows, now)
        descending = sorting.startswith("-")
        keyed = {"id": lambda rv: rv[0]["pfid"], "name": lambda rv: rv[0]["name"],
                 "status": lambda rv: rv[1].status, "last_seen": lambda rv: rv[0]["last_seen_at"] or 0}[field]
        views.sort(key=lambda rv: rv[0]["pfid"], reverse=descending)       # ties: by id, same direction
        views.sort(key=keyed, reverse=descending)
        offset, size = pf_page(query, len(views))
        page = views[offset:offset + size]
        return json_response({"status": "success",
                              "summaries": [agent_json(r, v, counts=False) for r, v in page],
                              "pagination": pf_pagination(len(views), offset, size, len(page)),
                              "sorting": {"field": field, "direction": "desc" if descending else "asc"}})

    @route("GET", "/api/v1/agent/show", doc_query={"agent_id": {"type": "string"}, "external_identifier": {"type": "string"}, "environment_id": {"type": "string"}})
    def show_agent():
        """Find an agent by id or external identifier"""
        by_id, by_ext = request.query.get("agent_id"), request.query.get("external_identifier")
        if bool(by_id) == bool(by_ext):
            raise Invalid({"agent_id": ["exactly one of agent_id or external_identifier is required"]})
        row = registry.agent(by_id) if by_id else registry.find("external_identifier", by_ext)
        if row is None:
            raise ApiError(404, "Agent not found")
        return details(row, environment_id=request.query.get("environment_id"))

    @route("GET", "/api/v1/agent/<agent_id>")
    def get_agent(agent_id):
        """One agent"""
        return details(registry.agent(agent_id), environment_id=request.query.get("environment_id"))

    @route("PUT", "/api/v1/agent/<agent_id>", doc_body=PF_AGENT_BODY)
    def update_agent(body, agent_id):
        """Change an agent's name, description or current version"""
        registry.agent(agent_id)
        data = body.get("details")
        if not isinstance(data, dict):
            raise Invalid({"details": ["can't be blank"]})
        errors, values = {}, {}
        if "name" in data:
            check_name(data["name"], errors)
            if not errors:
                values["name"] = data["name"].strip()
        if "description" in data:
            if data["description"] is not None and not isinstance(data["description"], str):
                errors["details.description"] = ["is invalid"]
            values["description"] = data["description"]
        if "current_version_id" in data:
            check_optional_pfid(data["current_version_id"], "details.current_version_id", errors)
            values["current_version_id"] = data["current_version_id"]
        if errors:
            raise Invalid(errors)
        return details(registry.update(agent_id, values))

    @route("POST", "/api/v1/agent/<agent_id>/retire", doc_body=PF_IDEMPOTENT_BODY)
    def retire_agent(body, agent_id):
        """Retire an agent (it takes no jobs)"""
        return details(registry.set_retired(agent_id, True))

    @route("POST", "/api/v1/agent/<agent_id>/reinstate", doc_body=PF_IDEMPOTENT_BODY)
    def reinstate_agent(body, agent_id):
        """Reinstate a retired agent"""
        return details(registry.set_retired(agent_id, False))

    @route("DELETE", "/api/v1/agent/<agent_id>")
    def delete_agent(body, agent_id):
        """Delete an agent"""
        row, view = registry.delete(agent_id)
        return json_response({"status": "success", "details": agent_json(row, view)})

    # -- instances --------------------------------------------------------------------------

    def instance_json(inst):
        version = inst["agent_version_id"] or registry.derived_pfid("job-version", inst["agent_pfid"])
        out = {"type": "agent_instance", "id": inst["pfid"], "account_id": registry.account_id,
               "agent_id": inst["agent_pfid"], "agent_version_id": version,
               "agent_deployment_id": registry.derived_pfid("deployment", inst["agent_pfid"], inst["environment_id"]),
               "environment_id": inst["environment_id"], "status": inst["status"],
               "inserted_at": iso(inst["inserted_at"]), "updated_at": iso(inst["updated_at"]),
               "started_at": iso(inst["started_at"]), "finished_at": iso(inst["finished_at"])}
        if inst["job_id"]:
            out["job_id"] = inst["job_id"]
        return out

    def timestamp(body):
        value = body.get("timestamp")
        if value is None:
            return utcnow()
        try:
            return parse_iso(value)
        except ValueError:
            raise Invalid({"timestamp": ["is invalid"]})

    @route("POST", "/api/v1/agent_instance/register", doc_body=PF_REGISTER_BODY)
    def register_instance(body):
        """Register an instance of an agent"""
        errors = {}
        if not body.get("agent_id"):
            errors["agent_id"] = ["can't be blank"]
        elif not isinstance(body["agent_id"], str):
            errors["agent_id"] = ["is invalid"]
        check_optional_pfid(body.get("environment_id"), "environment_id", errors)
        check_optional_pfid(body.get("id"), "id", errors, config.pfid_partition)
        for key in ("agent_version", "agent_schema_version"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                errors[key] = ["is invalid"]
        if errors:
            raise Invalid(errors)
        inst = registry.register_instance(body["agent_id"], body.get("agent_version"), body.get("agent_schema_version"),
                                          body.get("environment_id"), body.get("id"),
                                          bool(body.get("update_current_version")))
        return json_response({"status": "success", "details": instance_json(inst)})

    @route("POST", "/api/v1/agent_instance/<instance_id>/start", doc_body=PF_IDEMPOTENT_BODY)
    def start_instance(body, instance_id):
        """Start an instance"""
        registry.instance(instance_id)                   # 404 before the body's errors
        inst = registry.start_instance(instance_id, timestamp(body))
        return json_response({"status": "success", "details": instance_json(inst)})

    @route("POST", "/api/v1/agent_instance/<instance_id>/finish", doc_body=PF_FINISH_BODY)
    def finish_instance(body, instance_id):
        """Finish an instance"""
        registry.instance(instance_id)
        status = body.get("status") or "complete"
        if status not in ("complete", "failed", "cancelled"):
            raise Invalid({"status": ["is invalid"]})
        inst = registry.finish_instance(instance_id, status, timestamp(body))
        return json_response({"status": "success", "details": instance_json(inst)})

    @route("GET", "/api/v1/agent_instance/<instance_id>")
    def get_instance(instance_id):
        """One instance"""
        return json_response({"status": "success", "details": instance_json(registry.instance(instance_id))})

    @route("GET", "/api/v1/agent_instance", doc_query={"agent_id": {"type": "string"}})
    def list_instances():
        """List instances"""
        rows = registry.instances(request.query.get("agent_id"))
        offset, size = pf_page(request.query, len(rows))
        page = rows[offset:offset + size]
        return json_response({"status": "success", "summaries": [instance_json(r) for r in page],
                              "pagination": pf_pagination(len(rows), offset, size, len(page)),
                              "sorting": {"field": "id", "direction": "desc"}})

    return api


###############################################################################
# HTTP: Rackspace agent events ################################################
###############################################################################
#
# Cloud Backup v2 agent events over the registry (spec agents.md §3): 202 with
# an empty body on success, {"message"[, "errors"]} on failure.

RS_EVENTS = ("startup", "shutdown", "agent_activate")
RS_MODES = ("idle", "active", "real_time")
RS_EVENT_BODY = {"type": "object", "required": ["event"], "properties": {
    "event": {"enum": list(RS_EVENTS)}, "mode": {"enum": list(RS_MODES)},
    "agents": {"type": "array", "items": {"type": "string"}}, "timestamp": {"type": "string"}}}


class RsInvalid(Exception):
    """A Rackspace validation failure: 400 {"message": "Validation failed.", "errors": [text]}."""


def rs_error(status, message, errors=None):
    body = {"message": message}
    if errors is not None:
        body["errors"] = errors
    return json_response(body, status)


class RackspaceStyle(ApiStyle):
    """Rackspace's answers: ``{"message": …[, "errors": […]]}``; every request needs an
    ``X-Auth-Token`` (one of ``--rackspace-token`` when set, which may bind it to a project)."""

    name, prefix = "rackspace", "/v2"
    invalid = (RsInvalid,)
    TEXTS = {404: "Not found.", 405: "Method not allowed.", 500: "Internal error."}

    def error(self, status, message=None):
        return rs_error(status, message or self.TEXTS.get(status) or _status_text(status) + ".")

    def refused(self, exc):
        if isinstance(exc, RsInvalid):
            return rs_error(400, "Validation failed.", [str(exc)])
        return self.error(exc.status, exc.message)

    def call(self, func, kw):
        need = READ if request.method in ("GET", "HEAD") else REPORT
        request.environ["agenthub.rs_project"] = self.hub.api_tokens.rackspace_project(
            credential("X-Auth-Token"), need)
        return func(**kw)


def install_rackspace(app, hub):
    """Mount ``/v2/<project_id>/…`` (and the seed's literal ``/v2/events``) on ``app``; returns its style."""
    registry, config = hub.registry, hub.config
    api = RackspaceStyle(app, hub)
    route = api.route

    def body_json():
        body = parse_body(config.max_json_bytes)
        if not isinstance(body, dict):
            raise RsInvalid("Request body must be a JSON object.")
        return body

    def accepted():
        return HTTPResponse("", 202, {"Content-Type": "application/json"})

    def check_mode(body):
        if body.get("mode") not in RS_MODES:
            raise RsInvalid("mode must be one of: idle, active, real_time.")
        return body["mode"]

    @route("POST", "/v2/<project_id>/agents/<agent_id>/events", doc_body=RS_EVENT_BODY, answers={202: "Accepted"})
    def agent_events(project_id, agent_id):
        """An agent's startup, shutdown or activation (202)"""
        caller = credential("X-Agent-Id").strip()
        if not caller:
            raise RsInvalid("X-Agent-Id header is required.")
        registry.check_caller(caller, agent_id)
        body = body_json()
        event = body.get("event")
        if not event:
            raise RsInvalid("event is required.")
        if event not in RS_EVENTS:
            raise RsInvalid("event must be one of: startup, shutdown, agent_activate.")
        mode = check_mode(body) if event == "agent_activate" else None
        registry.agent_event(project_id, agent_id, event, mode, client_addr())
        return accepted()

    def project_events(project_id):
        body = body_json()
        if body.get("event") != "agent_activate":
            raise RsInvalid("event must be agent_activate.")
        registry.activate_projects(project_id, check_mode(body))
        return accepted()

    @route("POST", "/v2/<project_id>/events", doc_body=RS_EVENT_BODY, answers={202: "Accepted"})
    def post_project_events(project_id):
        """Activate the agents of a project (202)"""
        return project_events(project_id)

    @route("POST", "/v2/events", doc_body=RS_EVENT_BODY, answers={202: "Accepted"})
    def post_events_for_token():
        """Activate the agents of the token's project (202)"""
        # The seed's literal path: the project bound to the token, or every project's agents.
        return project_events(request.environ["agenthub.rs_project"])

    @route("GET", "/v2/<project_id>/agents/<agent_id>/status")
    def agent_status(project_id, agent_id):
        """Whether an agent is online and busy"""
        view = registry.view(registry.project_agent(project_id, agent_id))
        return json_response({"busy": view.busy, "online": view.online})

    def feed(project_id, name, default_dir):
        query = request.query
        limit_text, direction = query.get("limit", "100"), query.get("sort_dir", default_dir)
        if not 1 <= (parse_uint(limit_text) or 0) <= 1000:
            raise RsInvalid("limit must be an integer between 1 and 1000.")
        if direction not in ("asc", "desc"):
            raise RsInvalid("sort_dir must be asc or desc.")
        marker = query.get("marker")
        # An unknown marker (not an event id) reads as if absent.
        marker = parse_uint(marker or "")
        rows = registry.feed(project_id, name, marker, int(limit_text), direction == "desc")
        events = []
        for r in rows:
            item = {"id": str(r["id"]), "time": iso(r["time"], 6), "event": r["event"],
                "agent": {"id": r["agent_uuid"], "name": r["agent_name"]}, "request_id": r["request_id"]}
            if r["mode"]:
                item["mode"] = r["mode"]
            events.append(item)
        out = {"events": events}
        if events:
            params = {k: query.get(k) for k in query.keys() if k != "marker"}
            params["marker"] = events[-1]["id"]
            out["links"] = [{"href": request.url.split("?")[0] + "?" + urllib.parse.urlencode(params),
                             "rel": "next"}]
        return json_response(out)

    @route("GET", "/v2/<project_id>/agents/<agent_id>/events", doc_query={"marker": {"type": "string"}, "limit": {"type": "integer"}, "sort_dir": {"enum": ["asc", "desc"]}})
    def agent_feed(project_id, agent_id):
        """An agent's event feed"""
        return feed(project_id, registry.project_agent(project_id, agent_id)["name"], "asc")

    @route("GET", "/v2/<project_id>/events", doc_query={"marker": {"type": "string"}, "limit": {"type": "integer"}, "sort_dir": {"enum": ["asc", "desc"]}})
    def project_feed(project_id):
        """A project's event feed"""
        return feed(project_id, None, "desc")

    def rs_agent(row, view):
        base = request.url.split("/v2/")[0] + f"/v2/{row['project_id']}/agents/{row['uuid']}"
        return {"project_id": row["project_id"], "id": row["uuid"], "name": row["name"], "version": None,
                "enabled": view.config == "Enabled",
                "registered_time": iso(row["inserted_at"], zone="+00:00"),
                "links": [{"href": base, "rel": "self"}, {"href": base + "/events", "rel": "events"},
                          {"href": base + "/status", "rel": "status"}]}

    @route("GET", "/v2/<project_id>/agents/<agent_id>")
    def get_rs_agent(project_id, agent_id):
        """One agent of a project"""
        row = registry.project_agent(project_id, agent_id)
        return json_response(rs_agent(row, registry.view(row)))

    @route("GET", "/v2/<project_id>/agents")
    def list_rs_agents(project_id):
        """The agents of a project"""
        if request.query.get("host_machine_id"):
            return json_response({"agents": []})       # agenthub keeps no host data
        rows = [r for r in registry.all() if r["project_id"] == project_id]
        return json_response({"agents": [rs_agent(r, registry.view(r)) for r in rows]})

    return api


###############################################################################
# HTTP: GoCD server health ####################################################
###############################################################################
#
# GoCD's /api/server_health_messages: the webhooks whose last notification
# failed, as recorded by the Notifier (section "GoCD notifications").

class GocdStyle(ApiStyle):
    """GoCD's API errors: ``{"message": …}``."""

    name, prefix = "gocd", "/api/server_health_messages"

    def error(self, status, message=None):
        return json_response({"message": message or _status_text(status)}, status)

    def call(self, func, kw):
        self.hub.api_tokens.check_client(credential("Authorization"))
        return func(**kw)


def install_gocd(app, hub):
    """GoCD's server health messages: the failing webhooks (spec agents.md §4.2); returns its style."""
    api = GocdStyle(app, hub)

    @api.route("GET", "/api/server_health_messages")
    def health_messages():
        """GoCD server health messages: the failing notification webhooks"""
        return json_response([{"message": r["message"], "detail": r["detail"], "level": r["level"],
                               "time": iso(r["time"])} for r in hub.notifier.health()])

    return api


###############################################################################
# Web UI ######################################################################
###############################################################################
#
# Server-rendered pages for people (Bottle SimpleTemplate strings; {{…}} is
# HTML-escaped, {{!…}} only ever receives HTML rendered here).  No build step,
# no CDN: a little inline CSS, and a little plain JavaScript on the job page to
# follow its logs.  Every page works without JavaScript.

WEB_LOG_TAIL = 64 * 1024                  # characters of each phase's log the job page shows
WEB_SESSION = "agenthub_session"          # a server-side session's random id
WEB_PRESESSION = "agenthub_presession"    # binds the CSRF token of a browser that is not logged in
WEB_PAGE_SIZE = 50
WEB_AGENTS_PAGE = 100

WEB_LAYOUT = bottle.SimpleTemplate("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{{title}} · agenthub</title>
<style nonce="{{nonce}}">
:root{--fg:#1d2330;--bg:#f6f7f9;--card:#fff;--line:#e3e6ea;--head:#eef0f3;--muted:#68707d;--link:#1f5fbf;
--ok:#d5f0dc;--okfg:#14532d;--bad:#f7d7d7;--badfg:#7f1d1d;--wait:#fdf0c9;--waitfg:#713f12;--run:#d6e6fb;--runfg:#1e3a8a;
--grey:#e3e6ea;--greyfg:#374151;--pre:#10141c;--prefg:#e6e6e6}
@media (prefers-color-scheme: dark){:root{--fg:#e5e7eb;--bg:#0f141b;--card:#161d27;--line:#2a3441;--head:#1c2530;
--muted:#9aa4b2;--link:#7fb0ff;--ok:#173d25;--okfg:#b7f0c8;--bad:#4a1d1d;--badfg:#ffc9c9;--wait:#3f3210;--waitfg:#fde9a8;
--run:#1b2f52;--runfg:#c7dbff;--grey:#2a3441;--greyfg:#d1d5db;--pre:#05080c}}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:var(--fg);background:var(--bg)}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700}header .who{margin-left:auto;opacity:.8}
main{max-width:76em;margin:1.2em auto;padding:0 1.2em}h1{font-size:1.5em;overflow-wrap:anywhere}h2{font-size:1.15em;margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%;border:1px solid var(--line);background:var(--card)}
table{border-collapse:collapse;width:100%;background:var(--card)}th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid var(--line);vertical-align:top}
th,td code,td time,td .state,td.nw,.scroll td:first-child{white-space:nowrap}td.wrap{min-width:12em}
.scroll tr>:first-child{position:sticky;left:0;background:var(--card);z-index:1}
th,.scroll tr>th:first-child{background:var(--head);font-weight:600}a{color:var(--link)}code,pre{font:13px/1.4 ui-monospace,monospace}
pre{background:var(--pre);color:var(--prefg);padding:.8em;overflow:auto;max-height:32em;white-space:pre-wrap;overflow-wrap:anywhere}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{background:var(--card);border:1px solid var(--line);padding:.7em 1em;min-width:8em;color:inherit;text-decoration:none}
.card b{display:block;font-size:1.4em}.muted{color:var(--muted)}.empty{display:none}
.state{display:inline-block;padding:0 .5em;border-radius:.8em;background:var(--grey);color:var(--greyfg);font-size:.9em;white-space:nowrap}
.state-complete,.state-passed,.state-Idle,.state-active,.state-success{background:var(--ok);color:var(--okfg)}
.state-failed,.state-provision-failed,.state-LostContact,.state-error,.state-failure{background:var(--bad);color:var(--badfg)}
.state-waiting,.state-Missing,.state-pending{background:var(--wait);color:var(--waitfg)}
.state-running,.state-Building,.state-test,.state-setup,.state-provision,.state-cleanup,.state-reserve,.state-allocate,.state-firmware_update{background:var(--run);color:var(--runfg)}
.code-0{color:var(--okfg);font-weight:600}.code-bad{color:var(--badfg);font-weight:600}
form.inline{display:inline}button{font:inherit;padding:.3em .9em}.error{color:#c43}.notice{background:var(--run);color:var(--runfg);padding:.4em .7em}
.icon{display:inline-block;width:1.3em;text-align:center;font-weight:700}.icon-success{color:#1a9f47}.icon-error{color:#d43318}.icon-info{color:#3f7fdf}
.filters{display:flex;flex-wrap:wrap;gap:.4em}.filters input,.filters select{font:inherit;max-width:100%}.pager{margin:.8em 0}
.legend{font-size:.9em}.legend dt{font-weight:600;display:inline}.legend dd{display:inline;margin:0 1em 0 .3em}
svg.chart{max-width:100%;height:auto;background:var(--card);border:1px solid var(--line)}
svg.chart text{fill:var(--muted);font:11px system-ui,sans-serif}svg.chart .axis{stroke:var(--line)}
@media (max-width:600px){main{padding:0 .6em}body{font-size:14px}th,td{padding:.3em .4em}}
</style></head><body>
<header><a class="brand" href="/">agenthub</a><a href="/jobs">Jobs</a><a href="/agents">Agents</a>
<a href="/queues">Queues</a><a href="/events">Events</a>
% if who:
<span class="who">{{who}} <form class="inline" method="post" action="/logout"><input type="hidden" name="csrf" value="{{csrf}}"><button>Log out</button></form></span>
% end
</header><main id="main" data-live="{{live}}">{{!body}}</main>
% if live:
<script nonce="{{nonce}}">
(function () {
  // A list page refreshes in place every few seconds while it is visible (it works without this).
  var main = document.getElementById("main"), busy = false;
  function refresh() {
    if (document.hidden || busy) { return; }
    busy = true;
    fetch(location.href, {headers: {"X-Agenthub-Fragment": "main"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        if (!document.activeElement || !main.contains(document.activeElement) || document.activeElement === document.body) {
          main.innerHTML = html;
        }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  setInterval(refresh, {{live}} * 1000);
  document.addEventListener("visibilitychange", refresh);
})();
</script>
% end
</body></html>""")

WEB_PAGES = {name: bottle.SimpleTemplate(source) for name, source in {
    "overview": """<h1>Overview</h1>
<h2>Agents</h2><div class="cards">
% for state, count in agent_states:
<div class="card"><b>{{count}}</b><span class="state state-{{state}}">{{state}}</span></div>
% end
% if not agent_states:
<p class="muted">No agents yet.</p>
% end
</div>
<h2>Jobs</h2><div class="cards">
% for state, count in job_states.items():
<a class="card" href="/jobs?state={{state}}"><b>{{count}}</b><span class="state state-{{state}}">{{state}}</span></a>
% end
% if not job_states:
<p class="muted">No jobs yet.</p>
% end
</div>
<h2>Finished in the last 24 hours</h2><div class="cards">
% for key, label, count in finished_totals:
<a class="card" href="/jobs"><b>{{count}}</b><span class="state state-{{key}}">{{label}}</span></a>
% end
% if not finished_totals:
<p class="muted">No job finished in the last 24 hours.</p>
% end
</div>
<h2>Jobs finished per hour</h2>
{{!finished_chart}}
<h2>Queues with work</h2>
% if not queues:
<p class="muted">No job is waiting or running.</p>
% else:
<table><tr><th>Queue</th><th>Waiting</th><th>Running</th></tr>
% for name, counts in queues.items():
<tr><td><a href="/queues/{{quote(name)}}">{{name}}</a></td><td>{{counts["waiting"]}}</td><td>{{counts["running"]}}</td></tr>
% end
</table>
% end
<h2>Newest events</h2>
% if not events:
<p class="muted">No events yet.</p>
% else:
<table><tr><th>Name</th><th>What</th><th>LTime</th></tr>
% for event in events:
<tr><td>{{event.name}}</td><td class="wrap"><code>{{event_summary(event)[:160]}}</code></td><td>{{event.ltime}}</td></tr>
% end
</table>
% end
<h2>Server health</h2>
% if not health:
<p class="muted">All webhooks are delivering.</p>
% end
% for item in health:
<p class="error"><b>{{item["message"]}}</b>: {{item["detail"]}} <span class="muted">({{iso(item["time"])}})</span></p>
% end
""",
    "jobs": """<h1>Jobs</h1>
<form class="filters" method="get" action="/jobs">
<select name="state"><option value="">any state</option>
% for choice in states:
<option value="{{choice}}" {{"selected" if choice == state else ""}}>{{choice}}</option>
% end
</select><input name="queue" placeholder="queue" value="{{queue or ""}}"><input name="tag" placeholder="tag" value="{{tag or ""}}">
<button>Filter</button></form>
<p class="muted">{{total}} jobs</p>
% if not jobs:
<p class="muted">No jobs match. Submit one with <code>testflinger-cli submit job.yaml</code> or <code>POST /v1/job</code>.</p>
% else:
<table id="jobs"><tr><th>Job</th><th>Outcome</th><th>Name</th><th>Queue</th><th>Agent</th><th>Submitted by</th><th>Created</th><th>Waited</th><th>Ran</th></tr>
% for job in jobs:
<tr><td><a href="/jobs/{{job["job_id"]}}">{{!short(job["job_id"])}}</a></td>
<td class="nw"><span class="state state-{{job["outcome"]}}" data-outcome="{{job["outcome"]}}">{{job["outcome_text"]}}</span>{{" · attempt %d" % job["attempt"] if job["attempt"] > 1 else ""}}</td>
<td class="wrap">{{job["name"] or ""}}</td>
<td><a href="/queues/{{quote(job["job_queue"])}}">{{job["job_queue"]}}</a></td>
<td>
% if job["agent_name"]:
<a href="/agents/{{quote(job["agent_name"])}}">{{job["agent_name"]}}</a>
% end
</td><td>{{job["client_id"] or "anonymous"}}</td><td>{{!when(job["created_at"])}}</td><td>{{duration(job["waited"])}}</td><td>{{duration(job["ran"])}}</td></tr>
% end
</table>
% end
<p class="pager">
% if page > 1:
<a href="{{page_url(page - 1)}}">← newer</a>
% end
page {{page}} of {{pages}}
% if page < pages:
<a href="{{page_url(page + 1)}}">older →</a>
% end
</p>""",
    "job": """<h1>Job <code>{{job_id}}</code></h1>
% if not current:
<p class="notice">This is attempt {{shown["attempt"]}}, an earlier run of this job. <a href="/jobs/{{job_id}}">The current attempt</a></p>
% end
<p><span class="state state-{{outcome[0]}}" id="job-outcome" data-outcome="{{outcome[0]}}">{{outcome[1]}}</span>
State: <span class="state state-{{result["job_state"]}}" id="job-state">{{result["job_state"]}}</span>
% if position is not None:
· {{position}} {{"job" if position == 1 else "jobs"}} ahead of it in its queue
% end
% if has_artifact:
· <a href="/jobs/{{job_id}}/artifact{{suffix}}">download artifact</a>
% end
% if cancellable:
· <a href="/jobs/{{job_id}}/cancel">Cancel job…</a>
% end
</p>
% if notice:
<p class="error">{{notice}}</p>
% end
<table>
<tr><th>Queue</th><td><a href="/queues/{{quote(shown["job_queue"])}}">{{shown["job_queue"]}}</a></td></tr>
<tr><th>Agent</th><td>
% if shown["agent_name"]:
<a href="/agents/{{quote(shown["agent_name"])}}">{{shown["agent_name"]}}</a>
% else:
—
% end
</td></tr>
<tr><th>Submitted by</th><td>{{shown["client_id"] or "anonymous"}}</td></tr>
<tr><th>Attempt</th><td>{{shown["attempt"]}} of {{len(attempts)}}</td></tr>
<tr><th>Times</th><td>created {{!when(shown["created_at"])}} · waited {{duration(times["waited"])}}
% if shown["started_at"]:
· started {{!when(shown["started_at"])}} · ran {{duration(times["ran"])}}
% end
% if shown["finished_at"]:
· finished {{!when(shown["finished_at"])}}
% end
</td></tr>
% if estimate:
<tr><th>Estimated start</th><td id="estimate">
% if estimate["estimated_start"]:
{{estimate["estimated_start"]}} (in about {{duration(estimate["estimated_wait_seconds"])}})
<span class="muted">· {{estimate["jobs_ahead"]}} of the agents' jobs ahead of it, {{len(estimate["agents"])}} {{"agent" if len(estimate["agents"]) == 1 else "agents"}} ({{estimate["busy_agents"]}} busy); {{estimate["method"]}}</span>
% else:
unknown: {{estimate["reason"]}}
% end
</td></tr>
% end
</table>
<h2>Activity</h2>
<h3>Events</h3>
% if events:
<table id="activity"><tr><th>Time</th><th>Event</th></tr>
% for event in events:
<tr><td>{{clock(event["timestamp"])}}</td><td><span class="icon icon-{{event["kind"]}}" role="img" aria-label="{{event["kind"]}}" title="{{event["event_name"]}}">{{event["icon"]}}</span> {{event["message"]}}
% if event["detail"]:
<span class="muted">{{event["detail"]}}</span>
% end
</td></tr>
% end
</table>
% else:
<p class="muted">No events available for this job.</p>
% end
% if len(attempts) > 1:
<h2>Attempts</h2>
<table id="attempts"><tr><th>Attempt</th><th>State</th><th>Agent</th><th>Submitted by</th><th>Created</th><th>Started</th><th>Finished</th><th>Then</th></tr>
% for a in attempts:
<tr><td><a href="/jobs/{{job_id}}?attempt={{a["attempt"]}}">{{a["attempt"]}}</a></td><td><span class="state state-{{a["job_state"]}}">{{a["job_state"]}}</span></td>
<td>{{a["agent"] or "—"}}</td><td>{{a["submitted_by"] or "anonymous"}}</td><td>{{a["created_at"]}}</td><td>{{a["started_at"] or "—"}}</td><td>{{a["finished_at"] or "—"}}</td><td>{{a["ended_by"] or "current"}}</td></tr>
% end
</table>
% end
<h2>Phases</h2>
% ran = [phase for phase in phases if phase + "_status" in result or any(logs[k][phase]["log_data"] for k in logs)]
% if not ran:
<p class="muted" id="no-phases">No phase has run yet.</p>
% end
<table id="phases" class="{{"" if ran else "empty"}}"><tr><th>Phase</th><th>Exit status</th></tr>
% for phase in phases:
% code = result.get(phase + "_status")
<tr id="row-{{phase}}" class="{{"" if phase in ran else "empty"}}"><td>{{phase}}</td><td id="status-{{phase}}" class="{{"" if code is None else exit_class(code)}}">{{"—" if code is None else code}}</td></tr>
% end
</table>
% for kind in ("output", "serial"):
<div id="{{kind}}-log" class="{{"" if any(logs[kind][p]["log_data"] for p in phases) or (kind == "output" and cancellable) else "empty"}}">
<h2>{{kind.title()}} log <a class="muted" href="/jobs/{{job_id}}/log/{{kind}}{{suffix}}">(whole log as text)</a></h2>
% for phase in phases:
<section class="{{"" if logs[kind][phase]["log_data"] else "empty"}}" id="{{kind}}-{{phase}}-section"><h3>{{phase}}</h3>
<p class="muted {{"" if logs[kind][phase]["cut"] else "empty"}}" id="{{kind}}-{{phase}}-cut">Only the end of this log is shown: <a href="/jobs/{{job_id}}/log/{{kind}}?phase={{phase}}{{suffix.replace("?", "&")}}">the whole {{phase}} {{kind}} log</a></p>
<pre id="{{kind}}-{{phase}}" data-last="{{logs[kind][phase]["last_fragment_number"]}}">{{logs[kind][phase]["log_data"]}}</pre></section>
% end
</div>
% end
<h2>Definition</h2><pre>{{definition}}</pre>
<script nonce="{{nonce}}">
(function () {
  var done = ["complete", "completed", "cancelled"];
  var url = "/jobs/{{job_id}}/logs.json";
  var LIMIT = {{limit}};
  function next(kind) {
    var last = -1;
    document.querySelectorAll("pre[id^='" + kind + "-']").forEach(function (pre) {
      last = Math.max(last, parseInt(pre.dataset.last, 10));
    });
    return last + 1;
  }
  function poll() {
    fetch(url + "?output=" + next("output") + "&serial=" + next("serial"), {credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (data) {
        ["output", "serial"].forEach(function (kind) {
          Object.keys(data[kind]).forEach(function (phase) {
            var part = data[kind][phase];
            if (!part.log_data) { return; }
            var pre = document.getElementById(kind + "-" + phase);
            if (part.cut) {
              pre.textContent = part.log_data;
            } else {
              pre.textContent += part.log_data;
            }
            if (part.cut || pre.textContent.length > 2 * LIMIT) {
              pre.textContent = pre.textContent.slice(-LIMIT);
              document.getElementById(kind + "-" + phase + "-cut").className = "muted";
            }
            pre.dataset.last = part.last_fragment_number;
            document.getElementById(kind + "-" + phase + "-section").className = "";
            document.getElementById(kind + "-log").className = "";
            document.getElementById("row-" + phase).className = "";
            document.getElementById("phases").className = "";
          });
        });
        Object.keys(data.status).forEach(function (phase) {
          var cell = document.getElementById("status-" + phase);
          cell.textContent = data.status[phase];
          cell.className = data.status[phase] === 0 ? "code-0" : "code-bad";
          document.getElementById("row-" + phase).className = "";
          document.getElementById("phases").className = "";
        });
        var outcome = document.getElementById("job-outcome");
        outcome.textContent = data.outcome[1];
        outcome.className = "state state-" + data.outcome[0];
        outcome.dataset.outcome = data.outcome[0];
        var state = document.getElementById("job-state");
        state.textContent = data.job_state;
        state.className = "state state-" + data.job_state;
        if (done.indexOf(data.job_state) < 0) { setTimeout(poll, 1000); }
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  if ({{"true" if current else "false"}} && done.indexOf(document.getElementById("job-state").textContent) < 0) {
    setTimeout(poll, 1000);
  }
})();
</script>""",
    "cancel": """<h1>Cancel job <code>{{job_id}}</code>?</h1>
<p>The job is <span class="state state-{{state}}">{{state}}</span>. A running job is stopped by its agent at its next check.</p>
<form method="post" action="/jobs/{{job_id}}/cancel"><input type="hidden" name="csrf" value="{{csrf}}"><button>Yes, cancel the job</button> <a href="/jobs/{{job_id}}">No, keep it</a></form>""",
    "agents": """<h1>Agents</h1>
% if not agents:
<p class="muted">No agents yet. Start a Testflinger agent against this hub, or create one with <code>POST /api/v1/agent</code>.</p>
% else:
<table id="agents"><tr><th>Agent</th><th>State</th><th>Testflinger</th><th>Lifecycle</th><th>Last contact</th><th>Current job</th><th>Submitted by</th><th>Queues</th></tr>
% for row, view in agents:
<tr><td><a href="/agents/{{quote(row["name"])}}">{{row["name"]}}</a></td>
<td><span class="state state-{{view.agent_state}}" title="GoCD: {{view.config}} / {{view.agent_state}} / {{view.build_state}}">{{view.agent_state}}</span>{{"" if view.config == "Enabled" else " (disabled)"}}</td>
<td>{{row["state"] or "—"}}</td>
<td><span class="state state-{{view.status}}">{{view.status}}</span></td><td>{{!when(row["last_seen_at"]) if row["last_seen_at"] else "never"}}</td>
<td>
% if row["job_id"]:
<a href="/jobs/{{row["job_id"]}}">{{!short(row["job_id"])}}</a>
% end
</td><td>{{(submitters.get(row["job_id"]) or "anonymous") if row["job_id"] in submitters else "—"}}</td><td>{{", ".join(loads(row["queues"] or "[]"))}}</td></tr>
% end
</table>
<p class="pager">{{total}} agents
% if page > 1:
· <a href="/agents?page={{page - 1}}">← previous</a>
% end
· page {{page}} of {{pages}}
% if page < pages:
· <a href="/agents?page={{page + 1}}">next →</a>
% end
</p>
<dl class="legend muted"><dt>Idle</dt><dd>heard from, no job</dd><dt>Building</dt><dd>running a job</dd>
<dt>LostContact</dt><dd>silent for --lost-contact-seconds</dd><dt>Missing</dt><dd>never heard from</dd>
<dt>Unknown</dt><dd>said goodbye (shutdown)</dd><dt>disabled</dt><dd>offline, in maintenance or retired</dd>
<dt>Lifecycle</dt><dd>Prefactor's pending / active / dormant / retired</dd></dl>
% end""",
    "agent": """<h1>Agent {{row["name"]}}</h1>
<table>
<tr><th>Testflinger state</th><td>{{row["state"] or "—"}} {{row["comment"] or ""}}</td></tr>
<tr><th>GoCD state</th><td>{{view.config}} / {{view.agent_state}} / {{view.build_state}}</td></tr>
<tr><th>Lifecycle</th><td>{{view.status}}</td></tr>
<tr><th>Job</th><td id="agent-job">
% if row["job_id"]:
<a href="/jobs/{{row["job_id"]}}"><code>{{row["job_id"]}}</code></a> submitted by {{submitters.get(row["job_id"]) or "anonymous"}}
% else:
—
% end
</td></tr>
<tr><th>Last contact</th><td>{{iso(row["last_seen_at"]) or "never"}} {{row["last_ip"] or ""}}</td></tr>
<tr><th>Queues</th><td>
% for q in loads(row["queues"] or "[]"):
<a href="/queues/{{quote(q)}}">{{q}}</a>
% end
</td></tr>
<tr><th>Ids</th><td>PFID <code>{{row["pfid"]}}</code> · uuid <code>{{row["uuid"]}}</code>
% if row["project_id"]:
· project {{row["project_id"]}}
% end
</td></tr>
<tr><th>Location</th><td>{{row["location"] or ""}}</td></tr>
<tr><th>Provision streak</th><td>{{row["provision_streak_count"] or 0}} × {{row["provision_streak_type"] or "—"}}</td></tr>
<tr><th>Instances</th><td>{{", ".join(f"{k} {v}" for k, v in view.counts.items())}}</td></tr>
</table>
<h2>State</h2>
{{!state_chart}}
<p class="muted"><a href="?days=1">24 hours</a> · <a href="?days=7">7 days</a></p>
<h2>Its queues</h2>
<table id="agent-queues"><tr><th>Queue</th><th>Waiting</th><th>Running</th><th>Agents</th></tr>
% for q in queues:
<tr><td><a href="/queues/{{quote(q["name"])}}">{{q["name"]}}</a></td><td>{{q["waiting"]}}</td><td>{{q["running"]}}</td><td>{{len(q["agents"])}}</td></tr>
% end
</table>
<h2>Recent jobs</h2>
% if not jobs:
<p class="muted">This agent has run no job yet.</p>
% else:
<p class="muted" id="history">
% for job in reversed(jobs):
<a href="/jobs/{{job["job_id"]}}" class="state state-{{job["outcome"]}}" title="{{job["outcome_text"]}}">{{"✔" if job["outcome"] == "passed" else "✖" if "failed" in job["outcome"] else "·"}}</a>
% end
oldest → newest</p>
<table><tr><th>Job</th><th>Queue</th><th>Outcome</th><th>Created</th><th>Ran</th></tr>
% for job in jobs:
<tr><td><a href="/jobs/{{job["job_id"]}}">{{!short(job["job_id"])}}</a></td><td>{{job["job_queue"]}}</td><td><span class="state state-{{job["outcome"]}}">{{job["outcome_text"]}}</span></td><td>{{!when(job["created_at"])}}</td><td>{{duration(job["ran"])}}</td></tr>
% end
</table>
% end
<h2>Provision history</h2>
<table><tr><th>Time</th><th>Job</th><th>Submitted by</th><th>Exit code</th><th>Detail</th></tr>
% for entry in provisions:
<tr><td>{{iso(entry["timestamp"])}}</td><td><code>{{entry["job_id"]}}</code></td><td>{{entry["client_id"] or "anonymous"}}</td><td>{{entry["exit_code"]}}</td><td>{{entry["detail"] or ""}}
% if entry["recorded_by"] == "result":
<span class="muted">(the agent posted no provision log)</span>
% end
</td></tr>
% end
</table>
<h2>Notification deliveries</h2>
<table><tr><th>Time</th><th>Webhook</th><th>Outcome</th><th>Attempts</th><th>State sent</th></tr>
% for d in deliveries:
<tr><td>{{iso(d["finished_at"])}}</td><td>{{d["webhook_url"]}}</td><td>{{d["outcome"]}}</td><td>{{d["attempts"]}}</td><td>{{loads(d["body"])["agent_state"]}}</td></tr>
% end
</table>""",
    "queues": """<h1>Queues</h1>
<table><tr><th>Queue</th><th>Description</th><th>Agents</th><th>Waiting</th><th>Running</th><th>Wait p50</th><th>Wait p90</th></tr>
% for q in queues:
<tr><td><a href="/queues/{{quote(q["name"])}}">{{q["name"]}}</a></td><td>{{q["description"]}}</td><td>{{len(q["agents"])}}</td>
<td>{{q["waiting"]}}</td><td>{{q["running"]}}</td><td>{{duration(q["wait"].get("50"))}}</td><td>{{duration(q["wait"].get("90"))}}</td></tr>
% end
</table>
% if not queues:
<p class="muted">No queues yet.</p>
% end""",
    "queue": """<h1>Queue {{name}}</h1>
<p>{{description}}</p>
% if summary:
<p>{{summary["waiting"]}} waiting · {{summary["running"]}} running · wait p50 {{duration(summary["wait"].get("50"))}} · p90 {{duration(summary["wait"].get("90"))}}</p>
% end
<h2>Last 24 hours</h2>
{{!queue_chart}}
{{!wait_chart}}
<h2>Agents</h2>
% if not agents:
<p class="muted">No agent serves this queue: its jobs wait until one lists it in its <code>job_queues</code>.</p>
% else:
<table><tr><th>Agent</th><th>State</th></tr>
% for agent in agents:
<tr><td><a href="/agents/{{quote(agent["name"])}}">{{agent["name"]}}</a></td><td>{{agent.get("state", "")}}</td></tr>
% end
</table>
% end
<h2>Jobs</h2>
<p class="muted">{{total}} jobs · <a href="/jobs?queue={{quote(name)}}">all of them</a></p>
% if not jobs:
<p class="muted">No jobs in this queue yet.</p>
% else:
<table><tr><th>Job</th><th>Outcome</th><th>Agent</th><th>Submitted by</th><th>Created</th><th>Waited</th><th>Ran</th></tr>
% for job in jobs:
<tr><td><a href="/jobs/{{job["job_id"]}}">{{!short(job["job_id"])}}</a></td><td><span class="state state-{{job["outcome"]}}">{{job["outcome_text"]}}</span></td>
<td>{{job["agent_name"] or "—"}}</td><td>{{job["client_id"] or "anonymous"}}</td><td>{{!when(job["created_at"])}}</td><td>{{duration(job["waited"])}}</td><td>{{duration(job["ran"])}}</td></tr>
% end
</table>
% end""",
    "events": """<h1>Events</h1>
<form class="filters" method="get" action="/events"><input name="name" placeholder="event name" value="{{name or ""}}"><button>Filter</button></form>
% if not events:
<p class="muted">No events yet. Fire one with <code>curl -X PUT localhost:8000/v1/event/fire/deploy -d v1</code>.</p>
% else:
<table id="events"><tr><th>LTime</th><th>Name</th><th>Payload</th><th>Filters</th><th>ID</th></tr>
% for event in events:
<tr><td>{{event.ltime}}</td><td>{{event.name}}</td><td class="wrap"><code>{{event_summary(event)}}</code></td>
<td>{{" ".join(f for f in (event.node_filter, event.service_filter, event.tag_filter) if f)}}</td><td>{{!short(event.id)}}</td></tr>
% end
</table>
% end""",
    "login": """<h1>Log in</h1>
% if error:
<p class="error">{{error}}</p>
% end
<form method="post" action="/login"><input type="hidden" name="next" value="{{next}}"><input type="hidden" name="csrf" value="{{csrf}}">
<p><label>Client id <input name="client_id" autocomplete="username" required></label></p>
<p><label>Secret <input name="secret" type="password" autocomplete="current-password" required></label></p>
<p><button>Log in</button></p></form>""",
    "message": """<h1>{{heading}}</h1><p>{{text}}</p><p><a href="/">Back to the overview</a></p>""",
}.items()}


_UNPRINTED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def payload_text(payload):
    """An event payload for people: the text when it is printable UTF-8 (tabs and line breaks
    allowed), base64 otherwise (control bytes would show as boxes, or hide text)."""
    if payload is None:
        return ""
    try:
        text = payload.decode("utf-8")
        if not _UNPRINTED.search(text):
            return text
    except UnicodeDecodeError:
        pass
    return "base64:" + base64.b64encode(payload).decode()


def event_summary(event):
    """An event in one line: an agent-status event as the state change it announces."""
    if event.name == "agent-status" and event.payload:
        try:
            body = json.loads(event.payload)
            return (f"{body['host_name']}: {body['agent_config_state']} / {body['agent_state']} /"
                    f" {body['build_state']}")
        except (ValueError, KeyError, TypeError):
            pass
    return payload_text(event.payload)


def _clock(event_date):
    """A job event's time as the original's Activity table shows it."""
    return event_date["$date"][:19].replace("T", " ")


# The Activity table's icon of a job event: by its exit status, as the original's.
EVENT_ICONS = {"success": "\u2714", "error": "\u2716", "info": "\u2139"}


def _duration(seconds):
    """A span for people: "45 s", "3 min 5 s", "2 h 10 min", "3 d 4 h"."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if seconds >= size:
            rest = (seconds % size) // small
            return f"{seconds // size} {unit}" + (f" {rest} {small_unit}" if rest else "")
    return f"{seconds} s"


def _when(ts, now=None):
    """A moment as the cell shows it: relative, with the absolute time on hover (HTML, safe)."""
    if ts is None:
        return "—"
    stamp = iso(ts)
    if stamp is None:
        return "—"
    delta = (utcnow() if now is None else now) - ts
    text = "just now" if abs(delta) < 5 else f"{_duration(delta)} ago" if delta > 0 else f"in {_duration(-delta)}"
    return f'<time datetime="{stamp}" title="{stamp}">{text}</time>'


def _short(text, keep=8):
    """A long id shortened in the cell, the whole of it on hover and in the copy (HTML, safe)."""
    full = html.escape(str(text))
    shown = html.escape(str(text)[:keep]) + ("…" if len(str(text)) > keep else "")
    return f'<code title="{full}">{shown}</code>'


# -- charts: inline SVG made here, no script, no library ------------------------------------

CHART_COLORS = {"passed": "#2e9d55", "failed": "#d64545", "provision-failed": "#e0872e", "cancelled": "#8a94a3",
                "Idle": "#2e9d55", "Building": "#3f7fdf", "Cancelled": "#3f7fdf", "LostContact": "#d64545",
                "Offline": "#8a94a3", "waiting": "#c9a227", "running": "#3f7fdf", "wait": "#e0872e"}
CHART_W, CHART_H, CHART_PAD = 720, 150, 34


def _svg(title, inner, legend=()):
    keys = "".join(f'<rect x="{CHART_PAD + i * 110}" y="4" width="10" height="10" fill="{CHART_COLORS[k]}"/>'
                   f'<text x="{CHART_PAD + 14 + i * 110}" y="13">{html.escape(label)}</text>'
                   for i, (k, label) in enumerate(legend))
    return (f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" height="{CHART_H}" role="img"'
            f' aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>{keys}{inner}</svg>')


def _axes(start, end, top_label):
    """Frame, the y maximum and x ticks (hours or days back) of a chart from ``start`` to ``end``."""
    left, right, top, bottom = CHART_PAD, CHART_W - 8, 20, CHART_H - 18
    span = end - start
    step = 6 * 3600 if span <= 2 * 86400 else 86400
    ticks = []
    for n in range(int(span // step) + 1):
        x = right - (right - left) * n * step / span
        label = "now" if n == 0 else (f"-{n * step // 3600} h" if step < 86400 else f"-{n} d")
        ticks.append(f'<line class="axis" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}"/>'
                     f'<text x="{x - 12:.1f}" y="{CHART_H - 4}">{label}</text>')
    return (f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>'
            f'<text x="2" y="{top + 10}">{html.escape(top_label)}</text>' + "".join(ticks))


def _x(t, start, end):
    return CHART_PAD + (CHART_W - 8 - CHART_PAD) * (min(max(t, start), end) - start) / (end - start)


def _y(value, top_value):
    top, bottom = 20, CHART_H - 18
    return bottom - (bottom - top) * (value / top_value if top_value else 0)


def chart_finished(buckets, now):
    """Stacked bars: jobs finished per hour by outcome."""
    hours, start = len(buckets), now - len(buckets) * 3600
    peak = max((sum(b.values()) for b in buckets), default=0) or 1
    bars, width = [], (CHART_W - 8 - CHART_PAD) / hours
    for index, bucket in enumerate(buckets):
        base = 0
        for outcome in ("passed", "failed", "provision-failed", "cancelled"):
            count = bucket.get(outcome, 0)
            if count:
                y0, y1 = _y(base, peak), _y(base + count, peak)
                bars.append(f'<rect x="{CHART_PAD + index * width + 1:.1f}" y="{y1:.1f}" width="{width - 2:.1f}"'
                            f' height="{y0 - y1:.1f}" fill="{CHART_COLORS[outcome]}"><title>{count} {outcome}</title></rect>')
                base += count
    return _svg("Jobs finished per hour, last 24 hours", _axes(start, now, f"{peak}/h") + "".join(bars),
                (("passed", "passed"), ("failed", "failed"), ("provision-failed", "provision failed"),
                 ("cancelled", "cancelled")))


def chart_queue(samples, start, now):
    """Waiting and running jobs of a queue over time (steps between the samples)."""
    peak = max((max(w, r) for _, w, r in samples), default=0) or 1
    lines = []
    for column, key in ((1, "waiting"), (2, "running")):
        points = []
        for index, sample in enumerate(samples):
            x = _x(sample[0], start, now)
            if index:
                points.append(f"{x:.1f},{_y(samples[index - 1][column], peak):.1f}")
            points.append(f"{x:.1f},{_y(sample[column], peak):.1f}")
        if points:
            lines.append(f'<polyline fill="none" stroke="{CHART_COLORS[key]}" stroke-width="2" points="{" ".join(points)}"/>')
    return _svg("Jobs waiting and running, last 24 hours", _axes(start, now, f"{peak} jobs") + "".join(lines),
                (("waiting", "waiting"), ("running", "running")))


def chart_waits(waits, start, now):
    """Each job's wait before an agent took it, as a dot at the time it was taken."""
    peak = max((seconds for _, seconds in waits), default=0) or 1
    dots = "".join(f'<circle cx="{_x(t, start, now):.1f}" cy="{_y(seconds, peak):.1f}" r="2.5" fill="{CHART_COLORS["wait"]}">'
                   f'<title>{_duration(seconds)}</title></circle>' for t, seconds in waits[-2000:])
    return _svg("Wait of each job taken, last 24 hours", _axes(start, now, _duration(peak)) + dots)


def chart_states(spans, start, now, title):
    """An agent's state over time, one coloured band per state."""
    top, bottom = 30, CHART_H - 40
    bands = "".join(f'<rect x="{_x(a, start, now):.1f}" y="{top}" width="{max(0.5, _x(b, start, now) - _x(a, start, now)):.1f}"'
                    f' height="{bottom - top}" fill="{CHART_COLORS.get(state, "#8a94a3")}"><title>{html.escape(state)}'
                    f' {iso(a)} – {iso(b)}</title></rect>' for a, b, state in spans)
    if not spans:
        bands = f'<text x="{CHART_PAD}" y="{(top + bottom) // 2}">no state recorded in this time</text>'
    return _svg(title, _axes(start, now, "") + bands, (("Idle", "idle"), ("Building", "building"),
                                                        ("LostContact", "lost contact"), ("Offline", "offline")))


def _exit_class(code):
    return "code-0" if code == 0 else "code-bad"


WEB_HELPERS = {"iso": iso, "quote": functools.partial(urllib.parse.quote, safe=""), "loads": json.loads,
               "payload_text": payload_text, "clock": _clock,
               "duration": _duration, "when": _when, "short": _short, "exit_class": _exit_class,
               "event_summary": event_summary}


def web_page(title, template, identity=None, status=200, live=0, **values):
    """One page: the layout around a template, with a fresh CSP nonce for its inline style and
    script and the browser's CSRF token (WebStyle.call put it in the environ) for its forms.
    ``live``: seconds between the in-place refreshes of a list page, which asks for its <main>
    alone (``X-Agenthub-Fragment: main``)."""
    nonce, csrf = secrets.token_urlsafe(12), request.environ.get("agenthub.csrf", "")
    body = WEB_PAGES[template].render(**WEB_HELPERS, **values, nonce=nonce, csrf=csrf)
    # Every table scrolls sideways inside its own box: a phone never gets a page wider than itself.
    body = body.replace("<table", '<div class="scroll"><table').replace("</table>", "</table></div>")
    headers = {"Content-Type": "text/html; charset=utf-8", "X-Frame-Options": "DENY",
               "Content-Security-Policy": WEB_CSP.format(nonce=nonce), "Vary": "X-Agenthub-Fragment"}
    if request.get_header("X-Agenthub-Fragment") == "main":
        return HTTPResponse(body, status, headers)
    who = identity.client_id if identity is not None and identity.client_id else ""
    return HTTPResponse(WEB_LAYOUT.render(title=title, body=body, who=who, nonce=nonce, csrf=csrf, live=live),
                        status, headers)


# Pages load nothing from elsewhere, run only their own inline script, and are never framed.
WEB_CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
           "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def safe_next(target):
    """Where to go after logging in: a path on this hub, else "/" (never another host: no
    "//host", no backslash, which browsers read as a slash, no control characters or spaces,
    which browsers drop before reading what is left)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target \
            or " " in target or _CONTROL.search(target):
        return "/"
    parts = urllib.parse.urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def web_not_found(what="That page"):
    return web_page("Not found", "message", status=404, heading="Not found",
                    text=f"{what} does not exist (any more). Jobs and their logs are kept for a week.")


class WebStyle(ApiStyle):
    """The pages' answers: an HTML page for every error; anonymous callers in --require-auth mode
    go to the login form.  Every form carries a CSRF token bound to the browser: a MAC of its
    session cookie, or before a login of a random pre-session cookie (WEB_PRESESSION); a POST
    without the right one is refused before the route runs."""

    name, prefix = "web", ""

    def secure(self):
        return self.config.secure_cookies or request.urlparts.scheme == "https"

    def call(self, func, kw, roles=AMC):
        """``roles`` None: a public page (the login form).  Routes get the browser's identity
        first, and POST routes the form's fields (their CSRF token checked) second."""
        auth, environ = self.hub.auth, request.environ
        session = cookie(WEB_SESSION)
        signed_in = auth.session_identity(session)
        who = environ["agenthub.identity"] = signed_in or auth.identify(None)
        binding, fresh = (session, None) if signed_in else (cookie(WEB_PRESESSION), None)
        if not binding:
            binding = fresh = secrets.token_urlsafe(24)
        environ["agenthub.csrf"] = auth.csrf_token(binding)
        args = [who] if roles is not None else []
        if request.method == "POST":
            fields = form()
            if not hmac.compare_digest(str(fields.get("csrf", "")), environ["agenthub.csrf"]) or fresh:
                return web_page("Refused", "message", who, 403, heading="Refused",
                                text="This form was not sent from this hub's own page (or it is too old). "
                                     "Go back, reload the page and try again.")
            args.append(fields)
        if roles is not None and who.role not in roles:
            if who.client_id is None and self.config.require_auth:
                return bottle.redirect("/login?next=" + urllib.parse.quote(request.fullpath), 303)
            return web_page("Not allowed", "message", who, 403, heading="Not allowed",
                            text=f"This page needs one of the roles {', '.join(roles)}.")
        answer = func(*args, **kw)
        if fresh and isinstance(answer, HTTPResponse):
            answer.set_cookie(WEB_PRESESSION, fresh, httponly=True, samesite="strict", path="/", secure=self.secure())
        return answer

    def error(self, status, message=None):
        if status == 404 and message is None:
            return web_not_found()
        who = request.environ.get("agenthub.identity")
        heading = "Refused" if status < 500 else "Something went wrong"
        return web_page(heading, "message", who, status, heading=heading, text=message or _status_text(status))



def install_web(app, hub):
    """Mount the pages on ``app``; returns their style."""
    jobs, registry, auth, config = hub.jobs, hub.registry, hub.auth, hub.config
    api = WebStyle(app, hub)

    def page(path, roles=AMC, method="GET"):
        return api.route(method, path, roles=roles)

    @page("/")
    def overview(who):
        """Overview page"""
        states = collections.Counter(view.agent_state for _, view in registry.views())
        now = utcnow()
        hourly = jobs.finished_per_hour(now)
        totals = sum(hourly, collections.Counter())
        labels = (("passed", "passed"), ("failed", "failed"), ("provision-failed", "provision failed"),
                  ("cancelled", "cancelled"))
        return web_page("Overview", "overview", who, live=5, finished_chart=chart_finished(hourly, now),
                        finished_totals=[(k, label, totals[k]) for k, label in labels if totals[k]], agent_states=sorted(states.items()),
                        job_states=jobs.state_counts(), queues=jobs.queue_activity(),
                        events=list(reversed(hub.events.buffer.events()))[:10], health=hub.notifier.health())

    @page("/jobs")
    def jobs_list(who):
        """Jobs page: filter by state, queue and tag"""
        query = request.query
        state, queue_name, tag = query.get("state"), query.get("queue"), query.get("tag")
        number = parse_uint(query.page, 10 ** 9) or 1
        rows, total = jobs.page(state, queue_name, tag, limit=WEB_PAGE_SIZE, offset=(number - 1) * WEB_PAGE_SIZE)

        def page_url(n):
            params = {k: v for k, v in (("state", state), ("queue", queue_name), ("tag", tag)) if v}
            return "/jobs?" + urllib.parse.urlencode({**params, "page": n})
        return web_page("Jobs", "jobs", who, live=5, jobs=rows, total=total, page=number,
                        pages=max(1, -(-total // WEB_PAGE_SIZE)), page_url=page_url, state=state or "",
                        queue=queue_name, tag=tag, states=("waiting", "running") + PHASES + (
                            "allocated", "complete", "cancelled"))

    def job_or_none(job_id):
        canonical = parse_job_id(job_id)
        return (canonical, jobs.get(canonical)) if canonical else (None, None)

    @page("/jobs/<job_id>")
    def job_page(who, job_id):
        """A job's page: activity, attempts, phases, logs"""
        job_id, row = job_or_none(job_id)
        if row is None:
            return web_not_found("That job")
        number = parse_uint(request.query.get("attempt", ""), 10 ** 9)
        shown = jobs.attempt(job_id, number) if number and number != row["attempt"] else row
        if shown is None:
            return web_not_found("That attempt")
        current = shown is row
        number = None if current else shown["attempt"]
        logs = {kind: jobs.log_tail(job_id, kind, WEB_LOG_TAIL, attempt=number) for kind in ("output", "serial")}
        notice = "Cancel requested." if request.query.get("cancelled") else ""
        events = []
        for event in jobs.events(job_id):
            kind = "info" if "status" not in event else "success" if event["status"] == 0 else "error"
            events.append({**event, "kind": kind, "icon": EVENT_ICONS[kind]})
        result = jobs.result(job_id, number)
        people = jobs.for_people(shown)
        return web_page(f"Job {job_id}", "job", who, job_id=job_id, result=result, logs=logs,
                        outcome=(people["outcome"], people["outcome_text"]), times=people,
                        phases=PHASES, limit=WEB_LOG_TAIL, current=current, shown=shown,
                        suffix="" if current else f"?attempt={number}",
                        position=jobs.position(job_id) if current else None,
                        estimate=jobs.estimate(job_id) if current else None,
                        has_artifact=jobs.has_file(job_id, "artifact", number), attempts=jobs.attempts(job_id),
                        events=events, cancellable=current and row["state"] not in JobQueue.ACTIVE_END,
                        notice=notice, definition=json.dumps(json.loads(shown["job_data"]), indent=2, sort_keys=True))

    @page("/jobs/<job_id>/logs.json")
    def job_logs(who, job_id):
        """New log text of a job, for its page's live view"""
        job_id, row = job_or_none(job_id)
        if row is None:
            return json_response({"message": "Job not found"}, 404)
        def start(kind):
            text = request.query.get(kind, "0")
            return parse_uint(text) or 0
        result = jobs.result(job_id)
        people = jobs.for_people(row)
        return json_response({"job_state": result["job_state"], "outcome": [people["outcome"], people["outcome_text"]],
                              "status": {p: result[f"{p}_status"] for p in PHASES if f"{p}_status" in result},
                              **{kind: jobs.log_tail(job_id, kind, WEB_LOG_TAIL, start(kind))
                                 for kind in ("output", "serial")}})

    @page("/jobs/<job_id>/log/<kind:re:output|serial>")
    def job_log_text(who, job_id, kind):
        """A whole log as plain text"""
        """A whole log as plain text, streamed (the page shows only its tail)."""
        job_id, row = job_or_none(job_id)
        phase = request.query.get("phase") or None
        if row is None or (phase is not None and phase not in PHASES):
            return web_not_found("That log")
        number = parse_uint(request.query.get("attempt", ""), 10 ** 9) or None
        return stream_response(jobs.log_file(job_id, kind, phase, number), "text/plain; charset=utf-8")

    @page("/jobs/<job_id>/artifact")
    def job_artifact(who, job_id):
        """Download a job's artifact"""
        job_id, row = job_or_none(job_id)
        number = parse_uint(request.query.get("attempt", ""), 10 ** 9) or None
        found = jobs.open_file(job_id, "artifact", number) if row is not None else None
        if found is None:
            return web_not_found("That artifact")
        return stream_response(found, "application/x-tar", f"attachment; filename={job_id}-artifact.tar.gz")

    @page("/jobs/<job_id>/cancel")
    def cancel_form(who, job_id):
        """Confirm a cancel"""
        job_id, row = job_or_none(job_id)
        if row is None:
            return web_not_found("That job")
        return web_page("Cancel job", "cancel", who, job_id=job_id, state=row["state"])

    @page("/jobs/<job_id>/cancel", method="POST")
    def cancel_job(who, fields, job_id):
        """Cancel a job (a form with its CSRF token)"""
        job_id, row = job_or_none(job_id)
        if row is None:
            return web_not_found("That job")
        if not jobs.cancel(job_id, who):
            return web_page("Cancel job", "message", who, 400, heading="Not cancelled",
                            text="The job is already completed or cancelled.")
        return bottle.redirect(f"/jobs/{job_id}?cancelled=1", 303)

    @page("/agents")
    def agents_list(who):
        """Agents page"""
        every = sorted(registry.all(), key=lambda r: r["name"])
        pages = max(1, -(-len(every) // WEB_AGENTS_PAGE))
        number = min(parse_uint(request.query.page, 10 ** 9) or 1, pages)
        rows = every[(number - 1) * WEB_AGENTS_PAGE:number * WEB_AGENTS_PAGE]
        return web_page("Agents", "agents", who, live=5, agents=registry.views(rows, utcnow()),
                        submitters=jobs.submitters([r["job_id"] for r in rows if r["job_id"]]),
                        total=len(every), page=number, pages=pages)

    @page("/agents/<name>")
    def agent_page(who, name):
        """An agent's page"""
        row = registry.find("name", name)
        if row is None:
            return web_not_found("That agent")
        recent, _ = jobs.page(agent_name=name, limit=20)
        days = 7 if request.query.get("days") == "7" else 1
        now = utcnow()
        states = chart_states(registry.state_history(name, now - days * 86400, now), now - days * 86400, now,
                              f"State, last {'7 days' if days == 7 else '24 hours'}")
        return web_page(f"Agent {name}", "agent", who, row=row, view=registry.view(row), jobs=recent,
                        state_chart=states, days=days,
                        submitters=jobs.submitters([row["job_id"]] if row["job_id"] else []),
                        queues=jobs.queue_summaries(json.loads(row["queues"] or "[]")),
                        provisions=list(reversed(jobs.provision_logs(name))),
                        deliveries=hub.notifier.deliveries(name, 50))

    @page("/queues")
    def queues_list(who):
        """Queues page"""
        return web_page("Queues", "queues", who, live=5, queues=jobs.queue_summaries())

    @page("/queues/<name:path>")
    def queue_page(who, name):
        """A queue's page"""
        summary = next((q for q in jobs.queue_summaries() if q["name"] == name), None)
        rows, total = jobs.page(queue_name=name, limit=100)
        if summary is None and not total:
            return web_not_found("That queue")
        now = utcnow()
        samples, waits = jobs.queue_history(name, now - 86400)
        return web_page(f"Queue {name}", "queue", who, name=name, summary=summary,
                        description=(summary or {}).get("description", ""), agents=jobs.agents(name, full=False),
                        jobs=rows, total=total, queue_chart=chart_queue(samples, now - 86400, now),
                        wait_chart=chart_waits(waits, now - 86400, now))

    @page("/events")
    def events_page(who):
        """Events page"""
        name = request.query.get("name")
        events = [e for e in reversed(hub.events.buffer.events()) if not name or e.name == name]
        return web_page("Events", "events", who, events=events, name=name)

    @page("/login", roles=None)
    def login_form():
        """Login form"""
        return web_page("Log in", "login", error="", next=safe_next(request.query.get("next")))

    @page("/login", roles=None, method="POST")
    def login(fields):
        """Log in (client id and secret; a form with its CSRF token)"""
        target = safe_next(fields.get("next"))            # only ever back into agenthub
        client_id = fields.get("client_id") or ""
        try:
            matched = auth.check_login(client_id, fields.get("secret") or "", client_addr())
        except ApiError as exc:                            # backing off after repeated failures
            answer = web_page("Log in", "login", status=429, error=exc.message + ".", next=target)
            answer.set_header("Retry-After", exc.headers.get("Retry-After", "1"))
            return answer
        if not matched:
            return web_page("Log in", "login", status=401, error="Unknown client id or wrong secret.", next=target)
        # A new session id at every login (a session planted before it is not the one that logs in).
        session = auth.start_session(client_id, replaces=cookie(WEB_SESSION))
        answer = HTTPResponse(status=303, headers={"Location": target})
        answer.set_cookie(WEB_SESSION, session, httponly=True, samesite="strict", path="/",
                          max_age=int(config.refresh_token_days * 86400), secure=api.secure())
        return answer

    @page("/logout", roles=None, method="POST")
    def logout(fields):
        """Log out"""
        auth.end_session(cookie(WEB_SESSION))
        answer = HTTPResponse(status=303, headers={"Location": "/"})
        answer.delete_cookie(WEB_SESSION, path="/")
        return answer

    return api


###############################################################################
# HTTP: operations ############################################################
###############################################################################
#
# What a lab's usual tools read: GET /metrics (Prometheus text exposition 0.0.4), GET /healthz
# (the process answers), GET /readyz (the hub can do its work).  Metrics are open like the APIs in
# the default mode; with --metrics-token, or with --require-auth, they need a credential (README).

OPS_PATHS = ("/metrics", "/healthz", "/readyz", "/openapi.json", "/docs")
PROCESS_STARTED = time.time()


class OpsStyle(ApiStyle):
    """The operations routes: JSON errors ``{"status": "error", "message": …}``."""

    name = "ops"

    def owns(self, path):
        return path in OPS_PATHS

    def error(self, status, message=None):
        return json_response({"status": "error", "message": message or _status_text(status)}, status)

    def refused(self, exc):
        if exc.status == 503 and request.path == "/readyz":      # shutting down: still say what was checked
            return json_response(*readiness(self.hub))
        return super().refused(exc)


def readiness(hub):
    """(body, status) of GET /readyz: the database takes a write, the background threads live, no
    shutdown has begun."""
    checks, ready = {}, True
    try:
        hub.db.probe_write(utcnow())
        checks["database"] = "writable"
    except (*hub.db.errors, ApiError) as exc:
        checks["database"] = f"refuses writes: {getattr(exc, 'message', None) or exc}"
        ready = False
    dead = [thread.name for thread in hub._threads if not thread.is_alive()]
    checks["workers"] = "alive" if not dead else "stopped: " + ", ".join(dead)
    checks["shutdown"] = "no" if hub.stopped_at is None else "in progress"
    ready = ready and not dead and hub.stopped_at is None
    return {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503


class Exposition:
    """The Prometheus text format 0.0.4: ``# HELP``, ``# TYPE``, then the samples of each family."""

    def __init__(self):
        self.lines = []

    @staticmethod
    def _label(value):
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    @staticmethod
    def _value(value):
        if isinstance(value, float):
            if math.isnan(value):
                return "NaN"
            if math.isinf(value):
                return "+Inf" if value > 0 else "-Inf"
            return repr(value)
        return str(int(value))

    def _sample(self, name, names, values, value):
        labels = ",".join(f'{n}="{self._label(v)}"' for n, v in zip(names, values))
        self.lines.append(f"{name}{{{labels}}} {self._value(value)}" if labels else f"{name} {self._value(value)}")

    def family(self, name, kind, text, names=(), samples=()):
        """A counter or gauge: ``samples`` are (label values, value)."""
        self.lines.append(f"# HELP {name} {text.replace(chr(92), chr(92) * 2)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for values, value in samples:
            self._sample(name, names, values, value)

    def histogram(self, name, text, names, histogram):
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} histogram")
        for values, counts, total, count in histogram.items():
            for bound, seen in zip(histogram.buckets, counts):
                self._sample(f"{name}_bucket", (*names, "le"), (*values, self._value(float(bound))), seen)
            self._sample(f"{name}_bucket", (*names, "le"), (*values, "+Inf"), count)
            self._sample(f"{name}_sum", names, values, float(total))
            self._sample(f"{name}_count", names, values, count)

    def text(self):
        return "\n".join(self.lines) + "\n"


def _process_figures():
    """(cpu seconds, resident bytes, open file descriptors) of this process, where the system says."""
    times = os.times()
    rss = fds = None
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError):
        pass
    return times.user + times.system, rss, fds


def _public_url(url):
    """A webhook URL without what may be a credential (user, password, query)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def metrics_text(app):
    """Every family of GET /metrics, from the hub's tallies and a few cheap database counts."""
    hub, out = app.hub, Exposition()
    out.family("agenthub_build_info", "gauge", "The running agenthub.", ("version",), [((__version__,), 1)])
    out.family("agenthub_http_requests_total", "counter", "HTTP requests answered, by API, route template, method"
               " and status class.", ("api", "route", "method", "code"), app.requests.items())
    out.histogram("agenthub_http_request_duration_seconds", "Seconds from a request to the start of its answer.",
                  ("api", "route"), app.latency)
    jobs = hub.jobs.counts_by_queue()
    out.family("agenthub_jobs", "gauge", "Jobs stored, by queue and state.", ("queue", "state"),
               [((q, state), n) for (q, state), n in sorted(jobs.items())])
    tally = dict(hub.jobs.tally.items())
    for event in ("submitted", "popped"):
        out.family(f"agenthub_jobs_{event}_total", "counter", f"Jobs {event} since the process started.", (),
                   [((), tally.get((event,), 0))])
    out.family("agenthub_jobs_finished_total", "counter", "Jobs finished since the process started, by how.",
               ("state",), [((labels[1],), n) for labels, n in sorted(tally.items()) if labels[0] == "finished"])
    out.histogram("agenthub_queue_wait_seconds", "Seconds jobs waited in their queue before an agent took them.",
                  ("queue",), hub.jobs.waits)
    gocd, lifecycle = collections.Counter(), collections.Counter()
    now = utcnow()
    for row, view in hub.registry.views(now=now):
        gocd[(view.config, view.agent_state)] += 1
        lifecycle[(view.status,)] += 1
    out.family("agenthub_agents", "gauge", "Agents by GoCD config and runtime state.", ("config_state", "agent_state"),
               sorted(gocd.items()))
    out.family("agenthub_agents_lifecycle", "gauge", "Agents by Prefactor lifecycle status.", ("status",),
               sorted(lifecycle.items()))
    out.family("agenthub_webhook_deliveries_total", "counter", "GoCD notifications finished, by outcome.",
               ("outcome",), hub.notifier.outcomes.items())
    out.family("agenthub_webhook_queue_depth", "gauge", "GoCD notifications waiting to go out, by webhook.",
               ("webhook",), [((_public_url(url),), n) for url, n in sorted(hub.notifier.queued().items())])
    out.family("agenthub_events_fired_total", "counter", "User events fired, by source (api or the hub's own).",
               ("source",), hub.events.buffer.fired.items())
    out.family("agenthub_event_watchers", "gauge", "Blocking event queries parked now.", (),
               [((), hub.watchers.parked())])
    sizes = hub.db.file_sizes()
    out.family("agenthub_database_bytes", "gauge", "Size of the database files.", ("file",),
               [((name,), size) for name, size in sorted(sizes.items())])
    out.histogram("agenthub_database_write_seconds", "Seconds each write transaction held the writer.", (),
                  hub.db.write_seconds)
    cpu, rss, fds = _process_figures()
    out.family("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", (),
               [((), float(cpu))])
    if rss is not None:
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", (), [((), rss)])
        out.family("process_open_fds", "gauge", "Open file descriptors.", (), [((), fds)])
    out.family("process_start_time_seconds", "gauge", "Start time of the process since the epoch, in seconds.",
               (), [((), float(PROCESS_STARTED))])
    out.family("agenthub_threads", "gauge", "Python threads alive.", (), [((), threading.active_count())])
    server = getattr(hub, "server", None)
    if server is not None:
        out.family("agenthub_http_connections", "gauge", "Client connections open now.", (),
                   [((), server.connections)])
    return out.text()


# -- the OpenAPI document ---------------------------------------------------------------
#
# Made from what each route declares when it is registered (ApiStyle.route): its method and path,
# the Schema its body or query is loaded with (Testflinger's: the very objects that validate, so
# the document cannot drift), or, where an API reads its input by hand, the JSON Schema declared
# beside the route; each API's error body; the roles.

API_DOCS = {   # style name: (tag, description, security scheme, error media type, error schema)
    "tf": ("Testflinger", "The job queue, wire-compatible with the Testflinger server (/v1).", "bearer",
           "application/json", {"type": "object", "properties": {"message": {}, "detail": {"type": "object"}},
                                "required": ["message"]}),
    "consul": ("Consul events", "Consul-style user events (/v1/event).", "consulToken", "text/plain",
               {"type": "string"}),
    "prefactor": ("Agents (Prefactor)", "Agent resources in Prefactor's style (/api/v1).", "bearer",
                  "application/json", {"type": "object", "properties": {
                      "status": {"const": "error"}, "code": {"type": "string"}, "message": {"type": "string"},
                      "errors": {"type": "object"}}, "required": ["status", "code", "message"]}),
    "rackspace": ("Agent events (Rackspace)", "Rackspace Cloud Backup v2 style agent events (/v2).", "authToken",
                  "application/json", {"type": "object", "properties": {"message": {"type": "string"}}}),
    "gocd": ("GoCD server health", "The failing GoCD webhooks as GoCD server health messages.", "bearer",
             "application/json", {"type": "object", "properties": {"message": {"type": "string"}}}),
    "web": ("Web pages", "Pages for people (HTML).", "session", "text/html", {"type": "string"}),
    "ops": ("Service", "Health probes, Prometheus metrics and this description.", "bearer", "application/json",
            {"type": "object", "properties": {"status": {"const": "error"}, "message": {"type": "string"}}}),
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "A Testflinger client's access token"
               " (POST /v1/oauth2/token); /api/v1 also takes --api-token values, /metrics --metrics-token."},
    "consulToken": {"type": "apiKey", "in": "header", "name": "X-Consul-Token",
                    "description": "An event ACL token (agenthub add-event-token), or a client's access token;"
                                   " also ?token= or a bearer token."},
    "authToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token",
                  "description": "A --rackspace-token value, or a client's access token."},
    "session": {"type": "apiKey", "in": "cookie", "name": WEB_SESSION, "description": "The session of POST /login."},
}
_RULE_PART = re.compile(r"<([a-zA-Z_][a-zA-Z0-9_]*)(?::(re|path|int)(?::([^>]*))?)?>")


def _openapi_path(rule):
    """A Bottle rule as an OpenAPI path and its path parameters."""
    params = []

    def one(match):
        name, kind, pattern = match.groups()
        schema = {"type": "string"}
        if kind == "re" and pattern and re.fullmatch(r"[\w|-]+", pattern):
            schema["enum"] = pattern.split("|")
        elif kind == "re":
            schema["pattern"] = f"^(?:{pattern})$"
        params.append({"name": name, "in": "path", "required": True, "schema": schema,
                       **({"description": "may contain slashes"} if kind == "path" else {})})
        return "{" + name + "}"
    return _RULE_PART.sub(one, rule), params


def _query_parameters(schema):
    if isinstance(schema, Schema):
        return [{"name": name, "in": "query", "required": field.required,
                 "schema": field.openapi()} | ({"style": "form", "explode": True} if isinstance(field, List) else {})
                for name, field in schema.fields.items()]
    return [{"name": name, "in": "query", "schema": spec} for name, spec in (schema or {}).items()]


def _summary(entry):
    if entry.get("summary"):
        return entry["summary"]
    doc = (entry["func"].__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else entry["func"].__name__.replace("_", " ").capitalize()


def openapi_document(app):
    """OpenAPI 3.1 for every route registered through an ApiStyle."""
    paths, used_tags, operation_ids = {}, {}, collections.Counter()
    for entry in app.documented:
        style, options = entry["style"], entry["options"]
        tag, _, scheme, error_type, error_schema = API_DOCS[style.name]
        used_tags[tag] = style.name
        path, params = _openapi_path(entry["path"])
        methods = entry.get("doc_methods") or ((entry["method"],) if entry["method"] != "ANY" else ("GET",))
        for method in methods:
            base = f"{style.name}_{entry['func'].__name__}"
            operation_ids[base] += 1
            operation = {"tags": [tag], "summary": _summary(entry),
                         "operationId": base if operation_ids[base] == 1 else f"{base}_{method.lower()}",
                         "parameters": params + _query_parameters(options.get("query") or entry.get("doc_query"))}
            doc = (entry["func"].__doc__ or "").strip()
            if "\n" in doc:
                operation["description"] = " ".join(line.strip() for line in doc.splitlines()[1:] if line.strip())
            if options.get("roles") is not None:
                operation["description"] = (operation.get("description", "") + " Roles: " + ", ".join(
                    options["roles"]) + ".").strip()
            body = options.get("body") or entry.get("doc_body")
            if body is not None:
                media, body = body if isinstance(body, tuple) else ("application/json", body)
                operation["requestBody"] = {"required": True, "content": {media: {
                    "schema": body.openapi() if isinstance(body, Schema) else body}}}
            responses = {}
            for status, answer in (entry.get("answers") or {200: "OK"}).items():
                description, schema, media = (answer, None, None) if isinstance(answer, str) else (*answer, None)[:3]
                responses[str(status)] = {"description": description}
                if schema is not None:
                    responses[str(status)]["content"] = {media or "application/json": {"schema": schema}}
            for status, description in (("4XX", "Refused: the API's own error body"),
                                        ("5XX", "A fault: a generic text and the request id, never the exception")):
                responses[status] = {"description": description, "content": {error_type: {"schema": error_schema}}}
            operation["responses"] = responses
            operation["security"] = [{scheme: []}, {}]
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "agenthub", "version": __version__,
                 "description": "A hub for agents that run jobs: the Testflinger job queue, Consul-style user events,"
                                " an agent registry (Prefactor, Rackspace and GoCD styles) and web pages. Every"
                                " API answers errors in its own style. In the default mode anonymous callers are"
                                " let in where the README says; --require-auth closes every API."},
        "tags": [{"name": tag, "description": API_DOCS[name][1]} for tag, name in used_tags.items()],
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": SECURITY_SCHEMES},
    }


DOCS_PAGE = bottle.SimpleTemplate("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>API · agenthub</title><style nonce="{{nonce}}">
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:72em;padding:0 1.2em;color:#1d2330}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
code{font:13px ui-monospace,monospace}.m{font-weight:700;font-size:.85em;display:inline-block;min-width:4.5em}
.get{color:#1a7f37}.post{color:#1f5fbf}.put{color:#9a6700}.delete{color:#b42318}.muted{color:#68707d}
details{margin:.2em 0}pre{background:#f6f7f9;padding:.6em;overflow:auto;font-size:12px;max-height:30em}
td.nw{white-space:nowrap;width:24em}
@media (prefers-color-scheme: dark){body{background:#0f141b;color:#e5e7eb}pre{background:#161d27}a{color:#7fb0ff}
th,td{border-color:#2a3441}.get{color:#4cc07a}.post{color:#7fb0ff}.put{color:#e0b040}.delete{color:#ff8a80}}
@media (max-width:600px){body{padding:0 .5em}td{display:block;border:0}tr{display:block;border-bottom:1px solid #e3e6ea}
td.nw{width:auto;white-space:normal;overflow-wrap:anywhere}}
</style></head><body>
<h1>agenthub {{doc["info"]["version"]}} API</h1>
<p>{{doc["info"]["description"]}}</p>
<p>The whole description as OpenAPI 3.1: <a href="/openapi.json">/openapi.json</a>. {{count}} operations in
% for index, tag in enumerate(doc["tags"]):
{{", " if index else ""}}<a href="#api-{{index}}">{{tag["name"]}}</a>
% end
.</p>
% for index, tag in enumerate(doc["tags"]):
<h2 id="api-{{index}}">{{tag["name"]}}</h2><p class="muted">{{tag["description"]}}</p>
<table>
% for path, method, op in operations:
% if op["tags"][0] == tag["name"]:
<tr><td class="nw"><span class="m {{method}}">{{method.upper()}}</span> <code>{{path}}</code></td><td>{{op["summary"]}}
% if op.get("description"):
<br><span class="muted">{{op["description"]}}</span>
% end
% query = [p["name"] for p in op["parameters"] if p["in"] == "query"]
% if query:
<br><span class="muted">query: {{", ".join(query)}}</span>
% end
% for media, content in (op.get("requestBody") or {}).get("content", {}).items():
<details><summary>request body ({{media}})</summary><pre>{{dumps(content["schema"], indent=1)}}</pre></details>
% end
</td></tr>
% end
% end
</table>
% end
</body></html>""")


def install_ops(app, hub):
    """Mount GET /metrics, /healthz, /readyz, /openapi.json and /docs; returns their style."""
    api, config = OpsStyle(app, hub), hub.config
    tokens = [t for t in re.split(r"[\s,]+", config.metrics_tokens) if t]

    @api.route("GET", "/healthz")
    def healthz():
        """The process is alive"""
        return json_response({"status": "alive", "version": __version__,
                              "uptime_seconds": round(time.time() - PROCESS_STARTED, 3)})

    @api.route("GET", "/readyz")
    def readyz():
        """The hub can work: database writable, workers alive, not shutting down (503 when not)"""
        return json_response(*readiness(hub))

    @api.route("GET", "/metrics")
    def metrics():
        """Prometheus metrics (text exposition format 0.0.4)"""
        authorization = credential("Authorization")
        given = bearer_token(authorization)
        if tokens:
            if not given or not any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens):
                raise ApiError(401, "GET /metrics needs a --metrics-token as a bearer token",
                               headers={"WWW-Authenticate": "Bearer"})
        elif config.require_auth:
            identity = hub.auth.identify(authorization)
            hub.auth.require(identity, ("admin", "manager"))
        return text_response(metrics_text(app), content_type="text/plain; version=0.0.4; charset=utf-8")

    made = {}

    def document():
        if "doc" not in made:                  # the routes are all registered by the first request
            made["doc"] = openapi_document(app)
        return made["doc"]

    @api.route("GET", "/openapi.json")
    def openapi_json():
        """This document: every route of every API (OpenAPI 3.1)"""
        return json_response(document())

    @api.route("GET", "/docs")
    def docs():
        """The routes of every API, for people (works offline)"""
        doc = document()
        operations = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]
        nonce = secrets.token_urlsafe(12)
        page = DOCS_PAGE.render(doc=doc, operations=operations, count=len(operations), nonce=nonce, dumps=json.dumps)
        return text_response(page, headers={"Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'"})

    return api


###############################################################################
# Application #################################################################
###############################################################################

class ProcessLock:
    """One serving process per database file: an exclusive lock on ``<db>.lock`` that the system
    releases when the process ends, however it ends.  The file names the holder (pid and host)."""

    def __init__(self, path):
        self.path, self.fh = path, None
        try:
            import fcntl
        except ImportError:                    # pragma: no cover - not POSIX: no lock
            return
        try:
            fh = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
        except FileNotFoundError:
            raise StartupError(f"database {path[:-5]}: the directory {os.path.dirname(path) or '.'} does not exist")
        except OSError as exc:
            raise StartupError(f"database {path[:-5]}: cannot open {path}: {exc.strerror or exc}")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StartupError(f"database {path[:-5]} is already served by {holder}; run one agenthub process "
                               "per SQLite database (several processes need the PostgreSQL engine)")
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self.fh = fh

    def release(self):
        if self.fh is not None:
            self.fh.close()                    # closing the file drops the lock
            self.fh = None


class Hub:
    """Everything one app owns: config, store, domain services, background threads.

    Installed on its Bottle app as a plugin, so ``app.close()`` stops the
    threads and closes the database; ``app.hub`` reaches it from outside.
    """

    name = "agenthub"
    api = 2

    def __init__(self, config):
        self.config = config
        self.lock = ProcessLock(config.db + ".lock") \
            if config.db not in (":memory:", "") and not is_postgres_url(config.db) else None
        try:
            key = server_key(config)
            self.db = open_database(config.db, config.threads, config.mmap_mib)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise
        jobs, agents, access, events = JobStore(self.db), AgentStore(self.db), AuthStore(self.db), EventStore(self.db)
        self.auth = Auth(access, config, key, agents)
        self.api_tokens = ApiTokens(config, self.auth)
        self.allowed_hosts = AllowedHosts(config)
        self.secrets = Secrets(access, SecretBox(key))
        self.event_acl = EventAcl(events, "deny" if config.require_auth else config.event_acl_default,
                                  self.auth.token_identity)
        self.events = UserEvents(EventBuffer(events, config.event_buffer_size, config.event_max_bytes),
                                 self.event_acl, config)
        self.watchers = Watchers(self.events.buffer)
        self.watcher_slots = WatcherSlots(config.max_watchers, config.max_watchers_per_client)
        self.notifier = Notifier(DeliveryStore(self.db), config)
        # Another process's state change arrives as its agent-status event: its outbox row is due.
        self.events.buffer.listeners.append(self.notifier.poke)
        self.registry = Registry(agents, config, self.notifier, self.events)
        self.idempotency = Idempotency(agents)
        self.jobs = JobQueue(jobs, agents, access, config, self.secrets, self.registry)
        self._stop = threading.Event()
        self.stopped_at = None                 # monotonic time a shutdown began: later requests answer 503
        self._threads = []

    def start(self):
        # On a shared (PostgreSQL) database an unfinished upload may be another process's, still
        # arriving: those are left to the purge, which drops uploads unfinished after a day.
        dropped = self.jobs.drop_partial_uploads() if self.db.single_process else 0
        if dropped:
            log(f"dropped {dropped} upload(s) a previous run left unfinished")
        if not self.db.single_process:
            self._spawn(self.events.buffer.follow, "agenthub-events", self._stop)
        if self.config.purge_interval > 0:
            # Emulates the original's TTL indexes (spec §4.5), waiting jobs excepted.
            self._spawn(self._every, "agenthub-purge", "purge", self.config.purge_interval, self.jobs.purge)
        if self.config.lost_contact_seconds > 0:
            # Lost-contact detection (spec §5.6): a sweep every N/10 s, between 1 and 30 s.
            every = max(1.0, min(30.0, self.config.lost_contact_seconds / 10))
            self._spawn(self._every, "agenthub-sweep", "sweep", every, self._sweep)
        if self.config.history_interval > 0:
            # The pages' charts: one sample per queue every --history-interval s, the first at once.
            self._spawn(self._every, "agenthub-history", "history", self.config.history_interval,
                        self.jobs.sample_queues, True)
        for target, name, *args in self.notifier.workers():
            self._spawn(target, name, *args)
        self._spawn(self.watchers.run, "agenthub-watchers", self._stop)

    def open_apis(self):
        """What anyone who can reach the hub may do without a credential (printed at start)."""
        config, tokens = self.config, self.api_tokens
        if config.require_auth:
            return []
        found = ["/v1 (Testflinger: anonymous callers act as contributor)", "web pages (as contributor)"]
        if not tokens.prefactor:
            found.append("/api/v1 (no --api-token)")
        if not tokens.rackspace:
            found.append("/v2 (any X-Auth-Token)")
        if self.event_acl.default == "allow":
            found.append("/v1/event (ACL default policy allow)")
        return found

    def _spawn(self, target, name, *args):
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _every(self, job, interval, step, at_once=False):
        """Run ``step()`` every ``interval`` seconds (``at_once``: first now) until the hub stops, when
        it is this process's turn; a busy or failing database is logged, never fatal to the thread."""
        while at_once or not self._stop.wait(interval):
            at_once = False
            try:
                if self._my_turn(job, interval):
                    step()
            except (*self.db.errors, ApiError) as exc:
                if self._stop.is_set():
                    return                     # the hub closed under it
                log(f"{job} failed: {exc}", "error")

    def _sweep(self):
        self.registry.sweep()
        self.jobs.reclaim_from_lost_agents()

    def _my_turn(self, job, interval):
        """Whether this process runs this round of a periodic ``job``: always on SQLite (one process);
        on a shared database, the first process whose round comes ``interval`` / 2 after the last
        one anywhere, so the job runs about once per interval however many processes there are."""
        return self.db.single_process or self.registry.store.claim_turn(job, utcnow(), interval / 2)

    # Bottle plugin protocol
    def apply(self, callback, route):
        return callback

    def close(self):
        self._stop.set()
        if not self.db.single_process:
            with contextlib.suppress(*self.db.errors, ApiError):
                self.db.wake(EVENTS_CHANNEL)       # the listener sees the stop now, not in a second
        self.watchers.close()
        self.notifier.close(drain_seconds=min(5.0, self.config.shutdown_grace))
        for thread in self._threads:
            thread.join(timeout=10)
        self.db.close()
        if self.lock:
            self.lock.release()


def create_app(config=None, **overrides):
    """A fresh Bottle app with its own database, state and threads.

    ``create_app()`` gives an in-memory hub; ``create_app(Config(db=path))`` or
    ``create_app(db=path, require_auth=True)`` configure it.  Call
    ``app.close()`` when done.
    """
    config = dataclasses.replace(config or Config(), **overrides)
    hub = Hub(config)
    app = HubApp(catchall=True)
    app.hub = hub
    app.install(hub)
    app.styles = []               # most specific prefix first: unknown paths get the first owner's style
    install_boundary(app, app.styles)

    @app.hook("before_request")
    def _strip_trailing_slash():
        # Trailing slashes are optional everywhere (the original's strict_slashes=False).
        # Not on /v1/event/…: there a trailing slash is part of an event name, or a Consul 404; not on
        # /v1/secrets/…: there it is part of the secret's path, which must not end with one (422); not
        # on /queues/…: a queue's name may end with one.
        path = request.environ.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/") and not path.startswith(("/v1/event/", "/v1/secrets/", "/queues/")):
            request.environ["PATH_INFO"] = path.rstrip("/") or "/"

    _LOG["json"] = config.log_format == "json"
    app.styles.extend([install_ops(app, hub), install_consul(app, hub), install_testflinger(app, hub),
                       install_gocd(app, hub), install_prefactor(app, hub), install_rackspace(app, hub),
                       install_web(app, hub)])
    if config.bench_route:
        app.route("/_bench/ping", "GET", lambda: {"ok": True})
    hub.start()
    return app


_application = None
_application_lock = threading.Lock()


def close_application():
    """Close the lazily built ``application`` (call it from a WSGI host's shutdown hook): its
    queued notifications are drained or recorded, parked watchers answered, the database closed."""
    global _application
    with _application_lock:
        if _application is not None:
            _application.close()
            _application = None


def application(environ, start_response):
    """Module-level WSGI entry point, built on first use from ``AGENTHUB_*`` variables."""
    global _application
    if _application is None:
        with _application_lock:
            if _application is None:
                _application = create_app(Config.from_env())
    return _application(environ, start_response)


###############################################################################
# Server ######################################################################
###############################################################################
#
# The built-in server.  One selector thread owns every connection that is not
# being answered: it accepts, reads a request's head as it trickles in, and
# hands a connection whose head is complete to a bounded pool of worker
# threads.  A worker answers (and then any request already pipelined behind
# it) and gives the connection back.  So a thousand idle keep-alive agents are
# a thousand registered sockets, not a thousand threads, and a client that
# sends its head a byte at a time holds no worker at all; nor does one that
# trickles a small body (up to BODY_AHEAD bytes, the size of nearly every JSON
# request): the selector waits for it with the head.  A blocking event
# query gives its worker back too: the request is deferred
# (``environ["agenthub.defer"]``) and the Watchers thread writes its answer
# later (``environ["agenthub.answer_raw"]``), after which the connection
# returns to the selector.  HTTP/1.1 keep-alive is what the Testflinger
# agent's requests.Session and py-consul expect.

HEAD_LIMIT = 256 * 1024        # a head not complete by then goes to a worker, which answers 414/431
HEAD_SECONDS = 20.0            # a started head must be complete within this (with its body, if small)
BODY_AHEAD = 64 * 1024         # a body declared this small is read with the head, before a worker takes it
IDLE_SECONDS = 120.0           # idle keep-alive connections are closed after this
IO_SECONDS = 60.0              # one read or write of a request being answered may take this long


_date_cache = (0, "")


def _http_date():
    """The Date header's value, formatted once a second (formatting it costs ~10 µs)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def _nothing():
    pass


class _KeepAliveHandler(ServerHandler):
    http_version = "1.1"

    def send_preamble(self):
        """The status line and the Date header in one write (wsgiref formats the date anew each time)."""
        self._write(f"HTTP/1.1 {self.status}\r\nDate: {_http_date()}\r\n".encode("latin-1"))

    def finish_response(self):
        if self.request_handler.deferred:
            # The answer is (or will be) written by another thread (environ["agenthub.answer_raw"]):
            # drop what the application returned, write nothing.
            if hasattr(self.result, "close"):
                self.result.close()
            self.status = self.status or "200 OK"
            return
        super().finish_response()

    def cleanup_headers(self):
        super().cleanup_headers()
        status = int(self.status.split(" ", 1)[0])
        if "Content-Length" not in self.headers and status not in (204, 304) and status >= 200:
            self.request_handler.close_connection = True
        if self.request_handler.close_connection:
            self.headers["Connection"] = "close"


def _unwritten(pieces, written):
    """What is left of ``pieces`` (memoryviews) once ``written`` bytes of them went out."""
    for number, piece in enumerate(pieces):
        if written < len(piece):
            return [piece[written:], *pieces[number + 1:]] if written or number else pieces
        written -= len(piece)
    return []


class _Connection:
    """One client connection: its socket, what was read ahead of the current request, the
    answer being buffered, and its request handler.  A worker reads and writes through it
    like the files of a socketserver handler (``readline``, ``read``, ``write``, ``flush``)."""

    def __init__(self, server, sock, addr):
        self.server, self.sock, self.addr = server, sock, addr
        self.buffer = bytearray()
        self._out, self._out_len = [], 0
        self.since = time.monotonic()      # idle since / head started at
        self.lock = threading.Lock()       # orders a deferred answer against its worker
        self.parked = False                # deferred, the worker gone: the answer gives it back
        self.unwritten = []                # answered before its worker was done: the rest, for it
        self.outgoing = []                 # parked, answered: the rest the selector writes
        self.abandoned = None              # … and what to call if the client goes away meanwhile
        self.closed = False
        self.handler = _RequestHandler(self)

    # -- reading (a worker's, or the selector's while the head arrives) -------------------
    def _fill(self):
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def head_complete(self):
        return b"\n\r\n" in self.buffer or b"\n\n" in self.buffer or len(self.buffer) >= HEAD_LIMIT

    _LENGTH = re.compile(rb"\ncontent-length:[ \t]*(\d{1,9})[ \t]*(?=\r?\n)", re.IGNORECASE)
    _AT_ONCE = re.compile(rb"\n(?:expect|transfer-encoding):", re.IGNORECASE)

    def request_ready(self):
        """A worker may take this connection: its next request's head is complete, and so is its
        body when that is declared by one small Content-Length.  Anything odd in the head is the
        worker's to refuse."""
        if not self.head_complete():
            return False
        buffer, ends = self.buffer, []
        for mark, size in ((b"\n\r\n", 3), (b"\n\n", 2)):
            found = buffer.find(mark)
            if found >= 0:
                ends.append(found + size)
        if not ends:
            return True                        # too long a head: the worker answers 431
        end = min(ends)
        head = bytes(buffer[:end])
        # A body waiting for "100 Continue", a chunked one, several lengths or a large one: the
        # worker takes the request now (and refuses what is odd about it).
        lengths = self._LENGTH.findall(head)
        if len(lengths) != 1 or self._AT_ONCE.search(head) or int(lengths[0]) > BODY_AHEAD:
            return True
        return len(buffer) >= end + int(lengths[0])

    def readline(self, limit=-1):
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                size = end + 1
                break
            if 0 <= limit <= len(self.buffer):
                size = limit
                break
            start = len(self.buffer)
            if not self._fill():
                size = len(self.buffer)
                break
        if limit >= 0:
            size = min(size, limit)
        line = bytes(self.buffer[:size])
        del self.buffer[:size]
        return line

    def read(self, size=-1):
        """``size`` bytes, fewer only at the end of the stream (as a buffered file reads)."""
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(self.buffer)
            self.buffer.clear()
            return data
        if len(self.buffer) >= size:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        out = bytearray(size)
        have = len(self.buffer)
        out[:have] = self.buffer
        self.buffer.clear()
        with memoryview(out) as view:
            while have < size:
                got = self.sock.recv_into(view[have:], size - have)
                if not got:
                    break
                have += got
        del out[have:]
        return bytes(out)

    # -- writing: one system call per answer, large bodies straight through -------------------
    def write(self, data):
        if self._out_len + len(data) > 65536:
            self.flush()
            if len(data) >= 65536:
                self.sock.sendall(data)
                return
        self._out.append(bytes(data))
        self._out_len += len(data)

    def flush(self):
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_len = 0
            self.sock.sendall(data)

    def close(self):
        if not self.closed:
            self.closed = True
            if self.outgoing:                  # (only the selector thread writes or closes these)
                self.outgoing = []
                self.server.end()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server.connection_opened(-1)


class _RequestHandler(WSGIRequestHandler):
    """http.server's request parsing and wsgiref's WSGI environ, one request at a time on a
    ``_Connection`` (the socketserver life cycle — a handler per connection that loops on its
    own thread — is the selector's and the workers' job here)."""

    protocol_version = "HTTP/1.1"

    def __init__(self, conn):         # no BaseRequestHandler.__init__: it would handle at once
        self.conn = self.rfile = self.wfile = conn
        self.request = self.connection = conn.sock
        self.client_address, self.server = conn.addr, conn.server
        self.close_connection = False
        self.deferred = self.answered_raw = False

    def handle_one_request(self):
        self.deferred = self.answered_raw = False
        self.conn.abandoned = None
        self.raw_requestline = self.rfile.readline(65537)
        received = time.monotonic()
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            # Before parse_request there is no request version yet: send_error() cannot answer.
            body = b"414 Request-URI Too Long\n"
            self.wfile.write(b"HTTP/1.1 414 Request-URI Too Long\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.close_connection = True
            return
        if not self.parse_request():
            return
        environ = self.get_environ()
        environ["agenthub.received"] = received
        environ["agenthub.answer_raw"] = self.answer_raw
        environ["agenthub.defer"] = self.defer
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:                   # the body's end is ambiguous (RFC 9112 6.3): refused
            environ["CONTENT_LENGTH"] = ", ".join(lengths)
        if "CONTENT_LENGTH" in environ:        # (whitespace around a header's value is not part of it)
            environ["CONTENT_LENGTH"] = environ["CONTENT_LENGTH"].strip(" \t")
        declared = environ.get("CONTENT_LENGTH") or "0"
        length = parse_uint(declared)
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if length is None or (chunked and "CONTENT_LENGTH" in environ):
            length = 0
            self.close_connection = True       # the application refuses it (400); the body's end is unknown
        # A chunked body has no length: the application (Bottle) reads and de-chunks the raw stream.
        body = self.rfile if chunked else _Limited(self.rfile, length)
        handler = _KeepAliveHandler(body, self.wfile, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self
        self.server.begin()
        try:
            handler.run(self.server.get_app())
        finally:
            self.server.end()
        if chunked:
            self.close_connection = True       # we cannot tell whether all of it was read
        elif body.remaining:
            # A body the route did not read: discarded if it arrives within a second, else the
            # connection is dropped (cheaper than reading a large one; a client that never sends
            # what it declared holds no worker for long).
            if body.remaining > CHUNK_SIZE or not self._drain(body.remaining, 1.0):
                self.close_connection = True

    def _drain(self, remaining, seconds):
        conn = self.conn
        take = min(remaining, len(conn.buffer))
        del conn.buffer[:take]
        remaining -= take
        deadline = time.monotonic() + seconds
        try:
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                conn.sock.settimeout(left)
                data = conn.sock.recv(min(remaining, 65536))
                if not data:
                    return False
                remaining -= len(data)
            return True
        except OSError:
            return False
        finally:
            conn.sock.settimeout(IO_SECONDS)

    def handle_expect_100(self):
        """Send "100 Continue" at once: buffered, curl would wait a second before every upload."""
        super().handle_expect_100()
        self.wfile.flush()
        return True

    def defer(self, abandoned=None):
        """The application will answer this request later, from another thread, with
        ``answer_raw``: the worker goes back to the pool as soon as the application returns.
        Meanwhile the selector watches the connection: if the client goes away, ``abandoned()``
        is called; when it returns True (nobody will answer now) the connection is closed."""
        self.deferred = True
        self.conn.abandoned = abandoned

    def answer_raw(self, status, headers, body):
        """Answer this request now, from any thread: what the socket takes at once is written here;
        the rest of a large answer its client is slow to read is written by the selector thread
        (parked) or by the request's worker (still in the route), so one client that does not read
        never holds the thread answering every blocked watcher.  Returns ``resume``, which gives
        the connection back to the selector (or closes it): call it at once, or — answering a
        thousand blocked watchers from one thread — once all of them are written, so that the
        selector thread does not compete for the interpreter with the answers still to write."""
        lines = [f"HTTP/1.1 {status}", f"Date: {_http_date()}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers)]
        if self.close_connection:
            lines.append("Connection: close")
        conn = self.conn
        # The head and the body, which a thousand watchers' answers share: the rest of each is
        # kept as views of these, never as a copy per watcher.
        answer = [memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")), memoryview(body)]
        try:
            # The socket is non-blocking underneath its timeout; ``send`` would first wait for room.
            rest = _unwritten(answer, os.writev(conn.sock.fileno(), answer))
        except BlockingIOError:
            rest = answer
        except OSError:
            rest, self.close_connection = [], True
        with conn.lock:
            self.answered_raw = True
            parked = conn.parked
            if not parked:
                conn.unwritten = rest          # the worker, still in the route, writes it (``_serve``)
        # Parked, the connection stays so until ``resume``: till then the selector keeps what the
        # client sends next for later and hands the connection to no worker (it is still in the
        # selector, and given back once more by ``resume``).
        if not parked:
            return _nothing
        return functools.partial(self.server.give_back, conn, resumed=rest or True)

    def log_request(self, code="-", size="-"):
        """Nothing: the application writes the access log (with the request id, API and route)."""

    def log_message(self, format, *args):
        if not self.server.quiet:
            log(format % args, "warning")


class HubServer:
    """A keep-alive HTTP/1.1 WSGI server: one selector thread for the connections nobody is
    answering, ``threads`` workers for the ones that have a request (see the section's head).

    The life cycle follows socketserver's: ``serve_forever()`` until ``shutdown()`` (which stops
    accepting; open connections are still answered, e.g. with 503 during a graceful stop), then
    ``server_close()`` closes every connection and stops the threads."""

    quiet = False

    def __init__(self, app, host="127.0.0.1", port=0, threads=16, quiet=True):
        self.app, self.quiet, self.threads = app, quiet, max(1, int(threads))
        self.socket = socket.create_server((host, port), backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self.base_environ = {"SERVER_NAME": socket.getfqdn(self.server_address[0]),
                             "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PORT": str(self.server_address[1]),
                             "REMOTE_HOST": "", "CONTENT_LENGTH": "", "SCRIPT_NAME": ""}
        self.in_flight, self._idle = 0, threading.Condition()
        self.connections = 0           # open client connections (GET /metrics)
        self._selector = selectors.DefaultSelector()
        self._ready = queue.SimpleQueue()           # connections with a request, for the workers
        self._returned, self._returning = [], threading.Lock()   # connections given back, not yet watched
        self._waker, self._wake = socket.socketpair()
        self._waker.setblocking(False)
        self._wake.setblocking(False)
        self._accepting, self._closing = True, False
        self._accept_paused_until = 0.0                 # accept failed (no file descriptors): until then
        self._stopped = threading.Event()           # shutdown() was called: serve_forever returns
        self._loop_thread, self._workers, self._started = None, [], threading.Lock()

    # -- socketserver's interface, as the hub and the tests use it --------------------------------
    def get_app(self):
        return self.app

    def serve_forever(self, poll_interval=0.5):
        self.start()
        while not self._stopped.wait(poll_interval):     # (the main thread wakes for signal handlers)
            pass

    def start(self):
        """Start the selector thread and the workers (serve_forever does; idempotent)."""
        with self._started:
            if self._loop_thread is not None:
                return
            self._loop_thread = threading.Thread(target=self._loop, name="agenthub-selector", daemon=True)
            self._workers = [threading.Thread(target=self._work, name=f"agenthub-worker-{n}", daemon=True)
                             for n in range(self.threads)]
            for thread in [self._loop_thread, *self._workers]:
                thread.start()

    def shutdown(self):
        """Stop accepting connections and make serve_forever() return; open ones are still served."""
        self._accepting = False
        self._poke()
        self._stopped.set()

    def server_close(self):
        """Close the listening socket and every connection not being answered; stop the threads."""
        self._accepting, self._closing = False, True
        self._stopped.set()
        self._poke()
        if self._loop_thread is not None and self._loop_thread is not threading.current_thread():
            self._loop_thread.join(5)
        for _ in self._workers:
            self._ready.put(None)
        if self._loop_thread is None:
            for sock in (self.socket, self._waker, self._wake):
                sock.close()

    def connection_opened(self, change):
        with self._idle:
            self.connections += change

    def begin(self):
        with self._idle:
            self.in_flight += 1

    def end(self):
        with self._idle:
            self.in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no request is being answered; False when ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self.in_flight <= 0, timeout)

    def give_back(self, conn, resumed=False):
        """A worker (or a deferred answer) is done with ``conn``: back to the selector, or closed.
        ``resumed``: True for a parked connection's answer, or the list of what is left of it to
        write (the selector writes it as the client takes it, then unparks the connection)."""
        if (conn.handler.close_connection or self._closing) and conn.abandoned is None:
            conn.close()                       # (a deferred one may still be watched: the selector closes it)
            return
        if isinstance(resumed, list):
            self.begin()                       # counted before the hand-over: wait_idle must see it
        self._to_selector(conn, resumed)

    def _to_selector(self, conn, resumed=False):
        """Hand ``conn`` to the selector thread (the only one that touches the selector)."""
        with self._returning:
            self._returned.append((conn, resumed))
            if len(self._returned) > 1:
                return                 # the selector is poked already: a thousand answers, one wake-up
        self._poke()

    def _poke(self):
        try:
            self._wake.send(b"x")
        except (BlockingIOError, OSError):
            pass                       # already poked (the pipe is full) or closing

    # -- the selector thread ------------------------------------------------------------------------
    def _loop(self):
        selector = self._selector
        selector.register(self.socket, selectors.EVENT_READ, "accept")
        selector.register(self._waker, selectors.EVENT_READ, "wake")
        listening, next_sweep = True, time.monotonic() + 1.0
        try:
            while not self._closing:
                try:
                    listening, next_sweep = self._turn(selector, listening, next_sweep)
                except Exception as exc:        # the selector must outlive anything one turn meets
                    log(f"the server's selector: {exc!r}", "error")
        finally:
            with self._returning:
                returned, self._returned = self._returned, []
            for conn, resumed in returned:
                if isinstance(resumed, list):
                    self.end()
            for conn in [c for c, _ in returned] + [key.data for key in selector.get_map().values()]:
                if isinstance(conn, _Connection):
                    conn.close()
            selector.close()
            if listening:
                self.socket.close()
            self._waker.close()
            self._wake.close()

    def _turn(self, selector, listening, next_sweep):
        """One pass: what is readable, the connections given back, accepting, the sweep."""
        for key, events in selector.select(1.0):
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                try:
                    while self._waker.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif events & selectors.EVENT_WRITE:
                self._writable(key.data)       # (what it has to read waits for the next pass)
            else:
                self._readable(key.data)
        with self._returning:
            returned, self._returned = self._returned, []
        watched = selector.get_map()
        # Parked, then answered: given back twice (the worker parks it, the answer resumes it), in
        # one batch or two.  Only the resume unparks it, and each connection is handled once per
        # batch, or two workers could take it.
        batch = {}
        for conn, resumed in returned:
            batch[conn] = batch.get(conn, False) or resumed
        for conn, resumed in batch.items():
            if conn.closed:
                if isinstance(resumed, list):
                    self.end()
                continue
            registered = watched.get(conn.sock) is not None
            if isinstance(resumed, list):      # answered in part: the selector writes the rest
                conn.outgoing, conn.since = resumed, time.monotonic()
                interest = selectors.EVENT_WRITE | (selectors.EVENT_READ if len(conn.buffer) < HEAD_LIMIT else 0)
                if registered:
                    selector.modify(conn.sock, interest, conn)
                else:
                    selector.register(conn.sock, interest, conn)
                continue
            if resumed:                        # answered: what the client sent meanwhile is served now
                conn.parked = False
            if conn.parked:                    # waiting for a deferred answer: watched for EOF only
                if not registered:
                    selector.register(conn.sock, selectors.EVENT_READ, conn)
                continue
            self._hand_back(conn, registered)
        now = time.monotonic()
        if listening and self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            selector.register(self.socket, selectors.EVENT_READ, "accept")
        if listening and not self._accepting:
            if not self._accept_paused_until:
                selector.unregister(self.socket)
            self.socket.close()
            listening = False
        if now >= next_sweep:
            next_sweep = now + 1.0
            self._sweep(now)
        return listening, next_sweep

    def _accept(self):
        for _ in range(128):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:         # e.g. out of file descriptors: stop accepting for a second
                if not self._accept_paused_until:
                    log(f"accept failed: {exc}; not accepting for a second", "warning")
                self._accept_paused_until = time.monotonic() + 1.0
                self._selector.unregister(self.socket)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IO_SECONDS)
            self.connection_opened(1)
            conn = _Connection(self, sock, addr)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _hand_back(self, conn, registered):
        """``conn`` is the selector's again: closed, given to a worker (a request is already
        here), or watched for the next one."""
        selector = self._selector
        if conn.handler.close_connection or self._closing:
            if registered:
                selector.unregister(conn.sock)
            conn.close()
            return
        conn.since = time.monotonic()
        if conn.buffer and conn.request_ready():
            if registered:
                selector.unregister(conn.sock)
            self._ready.put(conn)              # pipelined: the next request is already here
        elif not registered:
            selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _writable(self, conn):
        """Write what the socket takes of a parked connection's answer; all of it written, the
        connection is unparked."""
        try:
            conn.outgoing = _unwritten(conn.outgoing, os.writev(conn.sock.fileno(), conn.outgoing))
        except BlockingIOError:
            return
        except OSError:                        # the client went away
            self._selector.unregister(conn.sock)
            conn.close()
            return
        conn.since = time.monotonic()          # (the sweep closes a write that stalls for IO_SECONDS)
        if conn.outgoing:
            return
        self.end()
        conn.parked = False
        if len(conn.buffer) < HEAD_LIMIT:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            self._hand_back(conn, True)
        else:                                  # (a head too large, read meanwhile: the worker answers 431)
            self._selector.unregister(conn.sock)
            self._hand_back(conn, False)

    def _readable(self, conn):
        """Read what has arrived of a head without blocking; complete, it goes to a worker."""
        try:
            data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if conn.parked:
            if not data and conn.outgoing:     # half-closed: the answer is still written, then closed
                conn.handler.close_connection = True
                self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                return
            if not data:                       # the client went away before its answer
                self._selector.unregister(conn.sock)
                if conn.abandoned is not None and conn.abandoned():
                    conn.close()               # (else the answer is being written: it closes it)
                return
            conn.buffer += data                # a request sent ahead: served after the answer
            if len(conn.buffer) >= HEAD_LIMIT:
                if conn.outgoing:              # read no more; the answer is still written
                    self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                else:
                    self._selector.unregister(conn.sock)
            return
        if not data:
            self._selector.unregister(conn.sock)
            conn.close()
            return
        if not conn.buffer:
            conn.since = time.monotonic()      # the head's clock starts with its first byte
        conn.buffer += data
        if conn.request_ready():
            self._selector.unregister(conn.sock)
            self._ready.put(conn)

    def _sweep(self, now):
        """Close idle connections after IDLE_SECONDS, and heads that trickle in too slowly."""
        for key in list(self._selector.get_map().values()):
            conn = key.data
            if not isinstance(conn, _Connection):
                continue
            if conn.outgoing:
                limit = IO_SECONDS             # an answer its client has not read for a minute
            elif conn.parked:
                continue
            else:
                limit = HEAD_SECONDS if conn.buffer else IDLE_SECONDS
            if now - conn.since > limit:
                self._selector.unregister(conn.sock)
                conn.close()

    # -- the workers --------------------------------------------------------------------------------
    def _work(self):
        while True:
            conn = self._ready.get()
            if conn is None:
                return
            try:
                self._serve(conn)
            except Exception as exc:           # never lose a worker
                log(f"serving a connection failed: {exc!r}", "error")
                conn.close()

    def _serve(self, conn):
        handler = conn.handler
        while True:
            try:
                handler.handle_one_request()
                if handler.deferred:
                    with conn.lock:
                        if not handler.answered_raw:
                            conn.parked = True     # the deferred answer gives the connection back;
                            self._to_selector(conn)        # meanwhile the selector watches it
                            return
                        rest, conn.unwritten = conn.unwritten, []
                    for piece in rest:             # answered already: what its socket did not take
                        conn.sock.sendall(piece)
                conn.flush()
            except (ConnectionError, TimeoutError, OSError):
                conn.close()
                return
            if handler.close_connection or self._closing:
                conn.close()
                return
            if not (conn.buffer and conn.request_ready()):
                break
        self.give_back(conn)


def make_server(app, host="127.0.0.1", port=0, quiet=True, threads=16):
    """The built-in keep-alive WSGI server bound to (host, port); port 0 picks a free one."""
    return HubServer(app, host, port, threads=threads, quiet=quiet)


###############################################################################
# Command line ################################################################
###############################################################################

def _serve_options(parser, env):
    parser.add_argument("--host", default=env.host, help="address to bind (default %(default)s; AGENTHUB_HOST)")
    parser.add_argument("--port", type=int, default=env.port, help="port (default %(default)s; AGENTHUB_PORT)")
    parser.add_argument("--server", default=env.server,
                        help="'threaded' (built in, default) or any server name Bottle knows, e.g. waitress,"
                             " cheroot (must be installed; AGENTHUB_SERVER)")
    parser.add_argument("--threads", type=int, default=env.threads,
                        help="worker threads of the built-in server (default %(default)s; AGENTHUB_THREADS). Idle"
                             " keep-alive connections and blocked event queries hold none; a request being"
                             " answered (an upload, a job-status webhook call) holds one")
    parser.add_argument("--mmap-mib", type=int, default=env.mmap_mib,
                        help="SQLite: read up to this many MiB of the database file through memory mapping"
                             " (default %(default)s; 0: off; AGENTHUB_MMAP_MIB). Faster reads, downloads above"
                             " all; a disk that cannot read a page then stops the process instead of answering"
                             " 503")
    parser.add_argument("--secret-key", default=env.secret_key,
                        help="default: generated once, kept in <db>.key (0600), never in the database. It signs"
                             " access tokens and encrypts secrets (AGENTHUB_SECRET_KEY). Required with a PostgreSQL"
                             " --db: the same on every process")
    parser.add_argument("--require-auth", action="store_true", default=env.require_auth,
                        help="every API needs a credential for all but its public reads (anonymous Testflinger"
                             " callers no longer act as 'contributor'); refuses to start while no client can log"
                             " in (AGENTHUB_REQUIRE_AUTH)")
    parser.add_argument("--jwt-leeway", type=int, default=env.jwt_leeway,
                        help="seconds of clock skew accepted on tokens (default %(default)s)")
    parser.add_argument("--access-token-seconds", type=int, default=env.access_token_seconds,
                        help="lifetime of access tokens (default %(default)s)")
    parser.add_argument("--refresh-token-days", type=float, default=env.refresh_token_days,
                        help="lifetime of refresh tokens from /v1/oauth2/token (default %(default)s)")
    parser.add_argument("--retention-days", type=float, default=env.retention_days,
                        help="finished jobs, logs, files, agents and queues are purged after this many"
                             " days; waiting jobs are kept (default %(default)s)")
    parser.add_argument("--purge-interval", type=float, default=env.purge_interval,
                        help="seconds between purges, 0 to disable (default %(default)s)")
    parser.add_argument("--max-json-bytes", type=int, default=env.max_json_bytes,
                        help="larger JSON bodies answer 413 (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", default=env.quiet, help="no access log")
    parser.add_argument("--metrics-token", action="append", metavar="TOKEN",
                        help="GET /metrics needs this bearer token (repeatable; AGENTHUB_METRICS_TOKENS). Without"
                             " one, /metrics is open, or with --require-auth needs an admin or manager client")
    parser.add_argument("--log-format", choices=("text", "json"), default=env.log_format,
                        help="access and application log lines on stderr: text or one JSON object each"
                             " (default %(default)s; AGENTHUB_LOG_FORMAT)")
    parser.add_argument("--provision-retries", type=int, default=env.provision_retries, metavar="N",
                        help="a job whose provision phase failed is queued again as its next attempt, without the"
                             " agent that failed, at most N times (default %(default)s: never;"
                             " AGENTHUB_PROVISION_RETRIES)")
    parser.add_argument("--history-interval", type=float, default=env.history_interval, metavar="SECONDS",
                        help="seconds between the queue samples the pages chart (default %(default)s; 0: none;"
                             " AGENTHUB_HISTORY_INTERVAL)")
    parser.add_argument("--strand-seconds", type=float, default=env.strand_seconds,
                        help="a job handed to an agent that reported nothing on it for this long, when the agent"
                             " asks for another, is requeued once, then cancelled; 0 disables (default"
                             " %(default)s; AGENTHUB_STRAND_SECONDS)")
    parser.add_argument("--shutdown-grace", type=float, default=env.shutdown_grace,
                        help="seconds requests in flight get to finish after SIGTERM or Ctrl-C; later ones"
                             " answer 503 (default %(default)s; AGENTHUB_SHUTDOWN_GRACE)")
    parser.add_argument("--event-buffer-size", type=int, default=env.event_buffer_size,
                        help="user events kept in the ring buffer (default %(default)s; AGENTHUB_EVENT_BUFFER_SIZE)")
    parser.add_argument("--event-max-bytes", type=int, default=env.event_max_bytes,
                        help="limit of an event's name + payload; more answers 413 (default %(default)s)")
    parser.add_argument("--max-watchers", type=int, default=env.max_watchers,
                        help="blocking event queries in progress at once; more answer 429 (default %(default)s;"
                             " AGENTHUB_MAX_WATCHERS). Under a WSGI host with a thread per request, keep it below"
                             " its threads")
    parser.add_argument("--max-watchers-per-client", type=int, default=env.max_watchers_per_client,
                        help="… from one client address (default %(default)s; AGENTHUB_MAX_WATCHERS_PER_CLIENT)")
    parser.add_argument("--allowed-host", action="append", metavar="NAME",
                        help="a Host name the hub answers besides loopback names and the bound address; repeatable;"
                             " '*' any, '.example.org' a domain (AGENTHUB_ALLOWED_HOSTS, comma-separated)")
    parser.add_argument("--secure-cookies", action="store_true", default=env.secure_cookies,
                        help="mark the web session cookie Secure (it is anyway over https; AGENTHUB_SECURE_COOKIES)")
    parser.add_argument("--event-acl-default", choices=("allow", "deny"), default=env.event_acl_default,
                        help="event policy for requests without a token, and for names no token prefix"
                             " covers (default %(default)s; AGENTHUB_EVENT_ACL_DEFAULT)")
    parser.add_argument("--webhook-url", default=env.webhook_url,
                        help="base URL (scheme, host, port) that jobs' job_status_webhook must point at;"
                             " unset: POST /v1/job/<id>/events answers 500 (AGENTHUB_WEBHOOK_URL)")
    parser.add_argument("--webhook-auth", default=env.webhook_auth,
                        help="bearer token sent to that webhook (AGENTHUB_WEBHOOK_AUTH)")
    parser.add_argument("--lost-contact-seconds", type=float, default=env.lost_contact_seconds,
                        help="silence after which an agent is LostContact; 0 turns detection off"
                             " (default %(default)s; AGENTHUB_LOST_CONTACT_SECONDS)")
    parser.add_argument("--gocd-webhook", action="append", metavar="URL",
                        help="receives GoCD agent-status notifications; repeatable (AGENTHUB_GOCD_WEBHOOKS,"
                             " comma-separated)")
    parser.add_argument("--gocd-webhook-auth", default=env.gocd_webhook_auth,
                        help="bearer token sent with each notification (AGENTHUB_GOCD_WEBHOOK_AUTH)")
    parser.add_argument("--api-token", action="append", metavar="TOKEN",
                        help="a bearer token accepted by /api/v1; repeatable; none: no auth there"
                             " (AGENTHUB_API_TOKENS, comma-separated)")
    parser.add_argument("--rackspace-token", action="append", metavar="TOKEN[:PROJECT]",
                        help="an X-Auth-Token accepted by /v2, optionally bound to a project; repeatable;"
                             " none: any token (AGENTHUB_RACKSPACE_TOKENS)")
    parser.add_argument("--pfid-partition", type=int, default=env.pfid_partition,
                        help="partition of the PFIDs agenthub makes (default %(default)s)")
    parser.add_argument("--default-environment-id", default=env.default_environment_id,
                        help="PFID environment of agents not created through /api/v1 (default: generated once)")
    parser.add_argument("--activate-ttl", type=float, default=env.activate_ttl,
                        help="seconds a Rackspace agent_activate mode lasts (default %(default)s)")
    parser.add_argument("--datacenter", default=env.datacenter,
                        help="the datacenter name ?dc= may give (default %(default)s)")
    parser.add_argument("--bench-route", action="store_true",
                        help="also serve GET /_bench/ping, the trivial JSON route `bench` compares against")


def build_parser(environ=None):
    env = Config.from_env(environ, db=(environ or os.environ).get("AGENTHUB_DB", "agenthub.db"))
    parser = argparse.ArgumentParser(
        prog="agenthub", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A hub for agents that run jobs: a Testflinger-compatible job queue on SQLite or PostgreSQL.\n"
                    "Without a command, `agenthub [options]` is `agenthub serve [options]`.")
    parser.add_argument("--version", action="version", version=f"agenthub {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server (the default command)")
    serve.add_argument("--db", default=env.db,
                       help="SQLite file, :memory:, or postgresql://user:password@host:port/database (several"
                            " processes; pip install 'agenthub[postgres]') (default %(default)s; AGENTHUB_DB)")
    _serve_options(serve, env)

    client = commands.add_parser("add-client", help="create or reset an API client and print its secret")
    client.add_argument("client_id", metavar="NAME")
    client.add_argument("--role", choices=ROLES,
                        help="a new client's role (default contributor); an existing client keeps its role unless"
                             " this is given")
    client.add_argument("--secret", help="use this secret (default: a random one, printed)")
    client.add_argument("--token-file", metavar="F",
                        help="also write {\"refresh_token\": …} to F, the file testflinger-agent --token-file reads")
    client.add_argument("--token-days", type=float, default=365,
                        help="lifetime of the token-file refresh token (default %(default)s)")
    client.add_argument("--db", default=env.db,
                        help="SQLite file or postgresql:// URL (default %(default)s; AGENTHUB_DB)")

    token = commands.add_parser("add-event-token", help="create or reset a user-event ACL token, print its secret")
    token.add_argument("token_name", metavar="NAME")
    token.add_argument("--read", nargs="*", default=[], metavar="PREFIX",
                       help="event-name prefixes it may list ('' = every name)")
    token.add_argument("--write", nargs="*", default=[], metavar="PREFIX",
                       help="event-name prefixes it may fire (and list)")
    token.add_argument("--secret", help="use this secret (default: a random UUID, printed)")
    token.add_argument("--db", default=env.db,
                       help="SQLite file or postgresql:// URL (default %(default)s; AGENTHUB_DB)")

    backup = commands.add_parser("backup", help="copy a live database (and its key file) consistently; the server"
                                                " keeps serving")
    backup.add_argument("dest", metavar="DEST", help="the copy to write (DEST.key gets the key file)")
    backup.add_argument("--db", default=env.db,
                        help="SQLite file (default %(default)s; AGENTHUB_DB); PostgreSQL: use pg_dump")

    restore = commands.add_parser("restore", help="check a backup and make it the database (the server must be"
                                                  " stopped)")
    restore.add_argument("source", metavar="BACKUP", help="a copy made by `agenthub backup`")
    restore.add_argument("--db", default=env.db, help="SQLite file to replace (default %(default)s; AGENTHUB_DB)")
    restore.add_argument("--force", action="store_true", help="replace a database that already holds data")

    migrate = commands.add_parser("migrate", help="copy an SQLite database into an empty PostgreSQL one (stop the"
                                                  " server first)")
    migrate.add_argument("--from", dest="source", required=True, metavar="FILE", help="the SQLite database")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL",
                         help="postgresql://user:password@host:port/database, created empty (or holding no data)")

    bench = commands.add_parser("bench", help="measure the hub on a real server and print figures")
    bench.add_argument("--db", metavar="URL", help="a PostgreSQL database to measure (in a schema of its own,"
                                                   " dropped afterwards); default: a fresh SQLite file")
    bench.add_argument("--processes", type=int, default=1,
                       help="server processes sharing the database (PostgreSQL; default %(default)s)")
    bench.add_argument("--jobs", type=int, default=2000, help="jobs to submit and pop (default %(default)s)")
    bench.add_argument("--clients", type=int, default=8, help="concurrent clients (default %(default)s)")
    bench.add_argument("--agents", type=int, default=200, help="simulated polling agents (default %(default)s)")
    bench.add_argument("--artifact-mib", type=int, default=256, help="artifact size (default %(default)s)")
    bench.add_argument("--watchers", type=int, default=1000,
                       help="blocked event watchers woken by one fire (default %(default)s)")
    bench.add_argument("--fleet", type=int, default=300,
                       help="agents on the Testflinger agent's idle loop in the fleet figure (default %(default)s)")
    bench.add_argument("--fleet-seconds", type=float, default=20,
                       help="how long the fleet runs (default %(default)s)")
    bench.add_argument("--part", choices=("all", "testflinger", "fleet", "events", "web"), default="all",
                       help="which figures to measure (default %(default)s)")

    parser.epilog = "\n".join(f"\n{'=' * 8} agenthub {name} {'=' * 8}\n{sub.format_help()}"
                              for name, sub in commands.choices.items())
    return parser, commands


def _command_first(argv, commands):
    """``agenthub --db X add-client NAME`` as ``agenthub add-client --db X NAME``: options may come
    before the command, as most tools accept (a value of an option is never taken for the command)."""
    valued = {option for sub in commands.choices.values() for action in sub._actions
              if action.nargs != 0 for option in action.option_strings}
    for index, word in enumerate(argv):
        if word in commands.choices and not (index and argv[index - 1] in valued):
            return [word, *argv[:index], *argv[index + 1:]]
        if word == "--":
            break
    return argv


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if "--version" in argv[:argv.index("--") if "--" in argv else len(argv)]:
        print(f"agenthub {__version__}")
        return 0
    argv = _command_first(argv, commands)
    if not argv or (argv[0] not in commands.choices and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args, extra = parser.parse_known_args(argv)
    if extra:                                  # in the command's own usage, not the top-level one
        commands.choices[args.command].error("unrecognized arguments: " + " ".join(extra))
    command = {"add-client": add_client_command, "add-event-token": add_event_token_command,
               "bench": bench_command, "backup": backup_command,
               "restore": restore_command, "migrate": migrate_command}.get(args.command, serve_command)
    try:
        return command(args)
    except StartupError as exc:
        print(f"agenthub: {exc}", file=sys.stderr)
        return 1
    except database_errors() as exc:
        print(f"agenthub: database {redact_url(str(getattr(args, 'db', '?')))}: {_first_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agenthub: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def serve_command(args):
    env_default = Config.from_env()
    config = Config(db=args.db, host=args.host, port=args.port, server=args.server, threads=args.threads,
                    mmap_mib=args.mmap_mib, secret_key=args.secret_key,
                    require_auth=args.require_auth, jwt_leeway=args.jwt_leeway,
                    access_token_seconds=args.access_token_seconds, refresh_token_days=args.refresh_token_days,
                    retention_days=args.retention_days, purge_interval=args.purge_interval,
                    max_json_bytes=args.max_json_bytes, quiet=args.quiet, bench_route=args.bench_route,
                    event_buffer_size=args.event_buffer_size, event_max_bytes=args.event_max_bytes,
                    event_acl_default=args.event_acl_default, datacenter=args.datacenter,
                    webhook_url=args.webhook_url, webhook_auth=args.webhook_auth,
                    lost_contact_seconds=args.lost_contact_seconds,
                    gocd_webhooks=",".join(args.gocd_webhook) if args.gocd_webhook else env_default.gocd_webhooks,
                    gocd_webhook_auth=args.gocd_webhook_auth,
                    api_tokens=",".join(args.api_token) if args.api_token else env_default.api_tokens,
                    rackspace_tokens=(",".join(args.rackspace_token) if args.rackspace_token
                                      else env_default.rackspace_tokens),
                    pfid_partition=args.pfid_partition, default_environment_id=args.default_environment_id,
                    activate_ttl=args.activate_ttl, shutdown_grace=args.shutdown_grace,
                    strand_seconds=args.strand_seconds, max_watchers=args.max_watchers,
                    provision_retries=args.provision_retries, log_format=args.log_format,
                    history_interval=args.history_interval,
                    metrics_tokens=(",".join(args.metrics_token) if args.metrics_token
                                    else env_default.metrics_tokens),
                    max_watchers_per_client=args.max_watchers_per_client, secure_cookies=args.secure_cookies,
                    allowed_hosts=(",".join(args.allowed_host) if args.allowed_host else env_default.allowed_hosts))
    if config.log_format not in ("text", "json"):
        print(f"agenthub: --log-format / AGENTHUB_LOG_FORMAT must be text or json, not {config.log_format!r}",
              file=sys.stderr)
        return 1
    if args.metrics_token and not all(token.strip() for token in args.metrics_token):
        print("agenthub: --metrics-token is empty (an unset variable?): it would leave /metrics open",
              file=sys.stderr)
        return 1
    app = create_app(config)
    try:
        if config.require_auth and not app.hub.auth.anyone_can_log_in():
            print("agenthub: --require-auth, but no client can log in: create one first with "
                  "`agenthub add-client NAME --role admin --db PATH`", file=sys.stderr)
            return 1
        opened = app.hub.open_apis()
        log(("open to anyone who can reach it: " + "; ".join(opened) + " (--require-auth closes them)")
            if opened else "--require-auth: every API needs a credential")
        if config.server != "threaded":
            bottle.run(app, server=config.server, host=config.host, port=config.port, quiet=config.quiet)
            return 0
        try:
            server = make_server(app, config.host, config.port, quiet=config.quiet, threads=config.threads)
        except OSError as exc:
            print(f"agenthub: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        app.hub.server = server
        print(f"agenthub {__version__} serving on http://{config.host}:{server.server_address[1]}/"
              f" (database {redact_url(config.db)})", flush=True)
        signals = []

        def on_signal(signum, frame):
            if not signals:                  # the first one starts the shutdown; serve_forever returns
                signals.append(signal.Signals(signum).name)
                threading.Thread(target=server.shutdown, daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        server.serve_forever()
        graceful_shutdown(app, server, signals[0] if signals else "stop")
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


def graceful_shutdown(app, server, reason):
    """SIGTERM or Ctrl-C: stop accepting, answer the parked watchers (as Consul does on leave), give the
    requests in flight ``--shutdown-grace`` seconds (new ones on kept-alive connections answer 503), then
    close the app: queued notifications get their drain and the rest are recorded as undelivered."""
    def say(text):
        log(text)
    hub = app.hub
    server.shutdown()                  # (serve_forever has returned: this is when it was asked to)
    hub.stopped_at = time.monotonic()
    say(f"{reason}: stopped accepting connections")
    parked = hub.watchers.parked()
    hub.watchers.close()
    say(f"answered {parked} parked watcher(s)")
    grace = hub.config.shutdown_grace
    if not server.wait_idle(grace):
        say(f"{server.in_flight} request(s) still running after {grace:g} s; they answer 503")
    server.server_close()
    app.close()
    say("database closed; stopped")


def _command_store(args, command):
    """The database a management command writes to; None (after saying why) for :memory:."""
    if args.db in (":memory:", ""):
        print(f"agenthub: {command} needs a database file (--db PATH)", file=sys.stderr)
        return None
    return open_database(args.db)


def _read_only(path, options="", **kwargs):
    """An SQLite connection that cannot write to the database file at ``path``."""
    return sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro{options}", uri=True, **kwargs)


def _integrity(path):
    """(schema version, jobs or None when it is no agenthub database, integrity_check's answer) of a
    database file, opened read-only (a copy no process writes: nothing is created beside it)."""
    conn = _read_only(path, "&immutable=1")
    try:
        checked = conn.execute("PRAGMA integrity_check").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        known = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0] if version and known else None
        return version, jobs, checked
    finally:
        conn.close()


def _copy_database(source_path, target_path):
    """SQLite's online backup API from a live database (one read transaction: a consistent snapshot)
    into a new private file, left in rollback-journal mode so that reading it creates nothing."""
    os.close(os.open(target_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    source = _read_only(source_path, timeout=30)
    target = sqlite3.connect(target_path)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = DELETE")
    finally:
        target.close()
        source.close()


def migrate_command(args):
    """``agenthub migrate --from hub.db --to postgresql://…``: every row of an SQLite database into an
    empty PostgreSQL one, in one transaction.  The source is read from a consistent copy (upgraded to
    this version's schema there, never in place); the key file stays the processes' --secret-key."""
    if not is_postgres_url(args.target):
        print("agenthub: migrate: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    if not os.path.isfile(args.source):
        print(f"agenthub: migrate: {args.source}: no such database file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, "source.db")
        _copy_database(args.source, copy)
        Database(copy).close()                        # the copy brought to this version's schema
        target = PostgresDatabase(args.target)
        try:
            counts = _copy_rows(copy, target)
        except StartupError as exc:
            print(f"agenthub: migrate: {exc}", file=sys.stderr)
            return 1
        finally:
            target.close()
    print(f"copied {sum(counts.values())} rows of {len(counts)} tables from {args.source} to "
          f"{redact_url(args.target)}: " + ", ".join(f"{t} {n}" for t, n in counts.items() if n))
    key = args.source + ".key"
    if os.path.exists(key):
        print(f"start every agenthub process on it with --secret-key set to the key in {key} (it signs the tokens"
              " and seals the secrets just copied)")
    return 0


def _copy_rows(path, target):
    """{table: rows} copied from the SQLite file at ``path`` into ``target``: parents before the
    tables that refer to them, file chunks a few at a time (memory stays flat), identity counters
    moved past the copied ids."""
    source = _read_only(path)
    source.text_factory = _read_text
    try:
        tables = [r[0] for r in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                               " AND name NOT LIKE 'sqlite%' ORDER BY name")]
        parents = {t: {r[2] for r in source.execute(f"PRAGMA foreign_key_list({t})")} - {t} for t in tables}
        ordered = []
        while len(ordered) < len(tables):
            ordered += [t for t in tables if t not in ordered and parents[t] <= set(ordered)]
        counts = {}
        with target.write() as db:
            for table in ordered:
                if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                    raise StartupError(f"{redact_url(target.path)} already holds data ({table}); migrate into"
                                       " an empty database (one no agenthub has served)")
            for table in ordered:
                cursor = source.execute(f"SELECT * FROM {table}")
                columns = [c[0] for c in cursor.description]
                insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                counts[table] = 0
                while True:
                    rows = cursor.fetchmany(8 if table == "file_chunks" else 500)
                    if not rows:
                        break
                    db.executemany(insert, rows)
                    counts[table] += len(rows)
            for table, column in db.execute("SELECT table_name, column_name FROM information_schema.columns"
                                            " WHERE table_schema = current_schema() AND is_identity = 'YES'"
                                            ).fetchall():
                db.execute(f"SELECT setval(pg_get_serial_sequence(?, ?), coalesce((SELECT max({column})"
                           f" FROM {table}), 0) + 1, false)", (table, column))
        return counts
    finally:
        source.close()


def _copy_key(source, target):
    with open(source, "rb") as fh:
        data = fh.read()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as out:
        os.fchmod(fd, 0o600)                   # an existing file keeps no wider mode
        out.write(data)


def backup_command(args):
    """A consistent copy of a live database while the server goes on serving, its key file beside
    it, and a check that the copy opens and passes integrity_check."""
    if is_postgres_url(args.db):
        print("agenthub: backup copies SQLite files; back a PostgreSQL database up with pg_dump (and keep the"
              " --secret-key with it)", file=sys.stderr)
        return 2
    if args.db in (":memory:", "") or not os.path.exists(args.db):
        print(f"agenthub: backup: no database file {args.db!r} (--db PATH)", file=sys.stderr)
        return 1
    dest = args.dest
    if os.path.exists(dest):
        print(f"agenthub: backup: {dest} exists; give a new file name", file=sys.stderr)
        return 1
    try:
        _copy_database(args.db, dest)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            if os.path.exists(dest) and os.path.getsize(dest) == 0:
                os.unlink(dest)                # nothing half-made is left to block a retry
        print(f"agenthub: backup: {dest}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    key = args.db + ".key"
    copied = os.path.exists(key)
    if copied:
        _copy_key(key, dest + ".key")
    version, jobs, checked = _integrity(dest)
    print(f"backup: {dest} ({os.path.getsize(dest)} bytes, schema {version}, {jobs} jobs), integrity {checked}")
    print(f"key: {dest}.key" if copied else "key: none beside the database (the key comes from --secret-key or"
                                             " AGENTHUB_SECRET_KEY: keep it with the backup)")
    return 0 if checked == "ok" else 1


def restore_command(args):
    """Check a backup (opens, integrity_check ok, an agenthub schema this version knows) and put it
    in place of ``--db`` with its key file: copied beside the target, then renamed over it, so even
    a corrupt database is replaced.  Refused while a server holds the database."""
    if is_postgres_url(args.db):
        print("agenthub: restore replaces SQLite files; restore a PostgreSQL database with pg_restore, or copy"
              " an SQLite backup into an empty one with `agenthub migrate`", file=sys.stderr)
        return 2
    if args.db in (":memory:", ""):
        print("agenthub: restore needs a database file (--db PATH)", file=sys.stderr)
        return 1
    try:
        version, jobs, checked = _integrity(args.source)
    except sqlite3.Error as exc:
        print(f"agenthub: restore: {args.source} is not a usable database: {exc}", file=sys.stderr)
        return 1
    if checked != "ok" or jobs is None or not 1 <= version <= len(MIGRATIONS):
        print(f"agenthub: restore: {args.source} is not a sound agenthub backup (integrity {checked},"
              f" schema {version}{'' if jobs is not None else ', no jobs table'})", file=sys.stderr)
        return 1
    key = args.source + ".key"
    if not os.path.exists(key) and os.path.exists(args.db + ".key"):
        print(f"agenthub: restore: {args.source} has no key file ({key}); the key of {args.db} would not open"
              " its secrets. Put the right key beside the backup first.", file=sys.stderr)
        return 1
    lock = ProcessLock(args.db + ".lock")        # StartupError (one line) while a server runs on it
    staging = f"{args.db}.restore-{os.getpid()}"
    try:
        if os.path.exists(args.db) and not args.force:
            try:
                held = _integrity(args.db)[1]
            except sqlite3.Error:
                held = "unreadable"
            if held:
                print(f"agenthub: restore: {args.db} already holds data; add --force to replace it", file=sys.stderr)
                return 1
        _copy_database(args.source, staging)
        os.replace(staging, args.db)
        for stale in (args.db + "-wal", args.db + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)                   # they belonged to the database just replaced
        if os.path.exists(key):
            _copy_key(key, args.db + ".key")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        lock.release()
    print(f"restored: {args.db} from {args.source} (schema {version}, {jobs} jobs, integrity ok)")
    return 0


def add_event_token_command(args):
    store = _command_store(args, "add-event-token")
    if store is None:
        return 2
    try:
        secret = EventAcl(EventStore(store), "deny").add_token(args.token_name, args.read, args.write, args.secret)
        print(f"name: {args.token_name}\nread: {' '.join(repr(p) for p in args.read) or '-'}\n"
              f"write: {' '.join(repr(p) for p in args.write) or '-'}\nsecret: {secret}")
    finally:
        store.close()
    return 0


def add_client_command(args):
    if args.token_file:                      # checked before anything is written
        folder = os.path.dirname(os.path.abspath(args.token_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            print(f"agenthub: add-client: cannot write the token file into {folder}: "
                  f"{'no such directory' if not os.path.isdir(folder) else 'permission denied'}", file=sys.stderr)
            return 2
    store = _command_store(args, "add-client")
    if store is None:
        return 2
    try:
        # The key signs access tokens, which this command makes none of: on PostgreSQL (where the
        # key is the processes' configuration, not a file) it is not asked for.
        auth = Auth(AuthStore(store), Config(db=args.db), key="-" if is_postgres_url(args.db) else None)
        secret, role, (tokens, sessions) = auth.reset_client(args.client_id, args.role, args.secret)
        print(f"client_id: {args.client_id}\nrole: {role}\nsecret: {secret}")
        if tokens or sessions:
            print(f"revoked: {tokens} refresh token(s) and {sessions} web session(s) of the old secret")
        if args.token_file:
            token = auth.refresh_token(args.client_id, days=args.token_days)
            fd = os.open(args.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)             # an existing file keeps its mode otherwise
            with open(fd, "w") as fh:
                json.dump({"refresh_token": token}, fh)
            print(f"token file: {args.token_file} (valid {args.token_days:g} days, mode 0600)")
    finally:
        store.close()
    return 0


###############################################################################
# Benchmark ###################################################################
###############################################################################
#
# `agenthub bench` starts a real server in a subprocess (its own interpreter,
# so the load generator does not share its GIL), drives it over loopback with
# keep-alive connections and prints figures.  Nothing here is asserted: the
# numbers are for people to read.

class _BenchServer:
    """``agenthub serve`` on free loopback ports: one process on a fresh SQLite file, or ``processes``
    on a fresh schema of a PostgreSQL database (dropped afterwards).  Each new connection goes to
    the next process; CPU, memory and thread figures are the first process's."""

    def __init__(self, workdir, db=None, processes=1):
        import subprocess
        self.schema, self.processes = None, max(1, processes)
        if db and is_postgres_url(db):
            import psycopg
            self.schema = f"agenthub_bench_{os.getpid()}"
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
                conn.execute(f"CREATE SCHEMA {self.schema}")
            self.base_url = db
            self.db = db + ("&" if "?" in db else "?") + "options=" + urllib.parse.quote(
                f"-c search_path={self.schema}")
            self.kind = f"PostgreSQL, {self.processes} process{'es' if self.processes > 1 else ''}"
        elif processes > 1:
            raise SystemExit("bench: several server processes need a PostgreSQL --db")
        else:
            self.db, self.kind = os.path.join(workdir, "bench.db"), "file database"
        store = open_database(self.db)
        auth = Auth(AuthStore(store), Config(db=self.db), key="-")
        self.secret = auth.add_client("bench-agent", "agent", "bench-agent-secret-000")
        store.close()
        key = secrets.token_hex(32)
        self.procs, self.ports, self._next = [], [], itertools.count()
        for _ in range(self.processes):
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", "--db", self.db, "--port", "0", "--quiet",
                 "--secret-key", key, "--bench-route", "--purge-interval", "0", "--max-watchers-per-client",
                 "100000", "--max-watchers", "100000"], stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            line = proc.stdout.readline()
            match = re.search(r"http://([\d.]+):(\d+)/", line)
            if not match:
                self.stop()
                raise SystemExit(f"bench: the server did not start: {line!r}")
            self.host = match.group(1)
            self.ports.append(int(match.group(2)))
        self.proc, self.port = self.procs[0], self.ports[0]

    def connection(self):
        import http.client
        port = self.ports[(os.getpid() + next(self._next)) % len(self.ports)]
        return http.client.HTTPConnection(self.host, port, timeout=120)

    def rss(self, key="VmRSS"):
        """Resident memory of the server process, in KiB (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def cpu(self):
        """CPU seconds (user + system) the server processes have used so far (Linux)."""
        total = 0
        for proc in self.procs:
            with open(f"/proc/{proc.pid}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)
        if self.schema:
            import psycopg
            with psycopg.connect(self.base_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def _request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body, headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def _load(server, clients, total, make):
    """``clients`` forked processes, one keep-alive connection each, share ``total`` requests.

    Processes, not threads: client threads would share one GIL and the load
    generator, not the server, would set the pace.  ``make(n, conn)`` performs
    request ``n`` and returns something picklable.  Returns (seconds, latencies, results).
    """
    import multiprocessing
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start_gate = context.Event()

    def worker(first):
        conn = server.connection()
        latencies, results = [], []
        start_gate.wait()
        for n in range(first, total, clients):
            begin = time.perf_counter()
            results.append(make(n, conn))
            latencies.append(time.perf_counter() - begin)
        conn.close()
        out.put((latencies, results))
    procs = [context.Process(target=worker, args=(i,)) for i in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.2)
    start = time.perf_counter()
    start_gate.set()
    latencies, results = [], []
    for _ in procs:
        lat, res = out.get()
        latencies += lat
        results += res
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    return elapsed, latencies, results


def _cpu_each(server, before, count):
    """(server CPU µs per request since ``before``, CPU now)."""
    now = server.cpu()
    return (now - before) / max(count, 1) * 1e6, now


def _pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round((len(values) - 1) * p / 100)))] if values else float("nan")


def bench_command(args):
    import tempfile
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as workdir:
        server = _BenchServer(workdir, args.db, args.processes)
        try:
            if args.part in ("all", "testflinger"):
                _bench_testflinger(server, args)
            if args.part in ("all", "fleet"):
                _bench_fleet(server, args)
            if args.part in ("all", "events"):
                _bench_events(server, args)
            if args.part in ("all", "web"):
                _bench_web(server, args)
        finally:
            server.stop()
    return 0


def _threads(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            return int(next(line.split()[1] for line in fh if line.startswith("Threads:")))
    except (OSError, StopIteration, ValueError):
        return None


def _bench_auth(server, conn):
    """The bench agent's Authorization header (a real login)."""
    basic = base64.b64encode(f"bench-agent:{server.secret}".encode()).decode()
    token = json.loads(_request(conn, "POST", "/v1/oauth2/token", headers={"Authorization": f"Basic {basic}"})[1])
    return {"Authorization": "Bearer " + token["access_token"]}


def _bench_fleet(server, args):
    """N agents on the Testflinger agent's idle loop, each every 10 s (spread out): GET /v1, its
    agent data read and posted, its queues posted, GET /v1/job.  Prints request p50/p99, the loop's
    p99, errors and the server's threads."""
    conn = server.connection()
    auth = {**_bench_auth(server, conn), "Content-Type": "application/json"}
    conn.close()
    lat, cycles, errors, lock, stop = [], [], [0], threading.Lock(), threading.Event()
    threads_seen = []

    def agent(n):
        name = f"fleet{n}"
        headers = {**auth, "Cookie": f"agent_name={name}"}
        data = json.dumps({"state": "waiting", "queues": [f"fleet{n % 20}"], "location": "bench"})
        c = server.connection()
        stop.wait(10.0 * n / args.fleet)                       # spread the fleet over the period
        while not stop.is_set():
            began = time.perf_counter()
            for method, path, body in (("GET", "/v1", None), ("GET", f"/v1/agents/data/{name}", None),
                                       ("POST", f"/v1/agents/data/{name}", data),
                                       ("POST", "/v1/agents/queues", json.dumps({f"fleet{n % 20}": "bench"})),
                                       ("GET", f"/v1/job?queue=fleet{n % 20}", None)):
                start = time.perf_counter()
                try:
                    status = _request(c, method, path, body, headers)[0]
                except OSError:
                    status = 0
                    c.close()
                    c = server.connection()
                with lock:
                    lat.append(time.perf_counter() - start)
                    if status not in (200, 204, 404):
                        errors[0] += 1
            with lock:
                cycles.append(time.perf_counter() - began)
            stop.wait(max(0.0, 10.0 - (time.perf_counter() - began)))
        c.close()
    workers = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(args.fleet)]
    for worker in workers:
        worker.start()
    deadline = time.time() + args.fleet_seconds
    while time.time() < deadline:
        threads_seen.append(_threads(server.proc.pid) or 0)
        time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    rate = len(lat) / args.fleet_seconds
    print(f"fleet    {args.fleet} agents, idle loop every 10 s: {rate:.0f} req/s  p50 {_pct(lat, 50) * 1000:.1f} ms"
          f"  p99 {_pct(lat, 99) * 1000:.1f} ms  loop p99 {_pct(cycles, 99) * 1000:.0f} ms  errors {errors[0]}"
          f"  server threads max {max(threads_seen or [0])}")


def _cpu_seconds(pid):
    """User + system CPU time a process has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bench_events(server, args):
    import selectors
    import socket
    print(f"agenthub {__version__} bench: user events, server pid {server.proc.pid}")
    fire_s, fire_lat, codes = _load(server, args.clients, args.jobs,
                                    lambda n, c: _request(c, "PUT", f"/v1/event/fire/bench-{n % 50}", b"payload")[0])
    print(f"fire     PUT /v1/event/fire    {args.jobs / fire_s:8.0f} events/s"
          f"  p50 {_pct(fire_lat, 50) * 1000:.1f} ms p99 {_pct(fire_lat, 99) * 1000:.1f} ms"
          f"  (non-200: {sum(1 for c in codes if c != 200)})")
    list_s, list_lat, _ = _load(server, args.clients, 500, lambda n, c: _request(c, "GET", "/v1/event/list")[0])
    print(f"list     GET /v1/event/list    {500 / list_s:8.0f} req/s  p50 {_pct(list_lat, 50) * 1000:.1f} ms"
          f" p99 {_pct(list_lat, 99) * 1000:.1f} ms  (full buffer)")

    # Watchers: each blocks on the current index of its own name, from one client thread via selectors.
    conn = server.connection()
    _request(conn, "PUT", "/v1/event/fire/watched", b"start")
    status, body, resp = _request(conn, "GET", "/v1/event/list?name=watched")
    index = resp.getheader("X-Consul-Index")
    request_bytes = (f"GET /v1/event/list?name=watched&index={index}&wait=120s HTTP/1.1\r\n"
                     f"Host: {server.host}\r\n\r\n").encode()
    sockets = []
    for n in range(args.watchers):                 # spread over the processes: a fire on one wakes all
        sock = socket.create_connection((server.host, server.ports[n % len(server.ports)]))
        sock.sendall(request_bytes)
        sockets.append(sock)
    time.sleep(2.0)                                 # let every watcher reach its wait
    cpu_before, wall_before = _cpu_seconds(server.proc.pid), time.perf_counter()
    time.sleep(3.0)
    idle_cpu = (_cpu_seconds(server.proc.pid) - cpu_before) / (time.perf_counter() - wall_before)
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    woke = []
    start = time.perf_counter()
    _request(conn, "PUT", "/v1/event/fire/watched", b"go")
    pending = len(sockets)
    while pending and time.perf_counter() - start < 60:
        for key, _ in selector.select(timeout=1):
            woke.append(time.perf_counter() - start)
            selector.unregister(key.fileobj)
            pending -= 1
    for sock in sockets:
        sock.close()
    conn.close()
    print(f"watchers {args.watchers} blocked   idle server CPU {idle_cpu:.1%} of a core;"
          f" fire -> response  p50 {_pct(woke, 50) * 1000:.1f} ms  p99 {_pct(woke, 99) * 1000:.1f} ms"
          f"  max {max(woke, default=float('nan')) * 1000:.1f} ms  (woke {len(woke)}/{args.watchers})")


def _bench_web(server, args):
    """The pages people open, and a Prometheus scrape, with at least 10 000 jobs in the database."""
    conn = server.connection()
    existing = json.loads(_request(conn, "GET", "/v1/job/search?limit=1000000")[1])
    missing = max(0, 10000 - len(existing))
    body = json.dumps({"job_queue": "web", "tags": ["bench-web"], "name": "a job for the web bench"})
    _load(server, args.clients, missing, lambda n, c: _request(c, "POST", "/v1/job", body,
                                                               {"Content-Type": "application/json"})[0])
    found = json.loads(_request(conn, "GET", "/v1/job/search?limit=1000000")[1])
    total = len(found)
    print(f"agenthub {__version__} bench: web pages with {total} jobs in the database")
    for path in ("/jobs", "/jobs?page=150", "/jobs?tag=bench-web&page=20", "/jobs?state=waiting&queue=web",
                 "/", "/queues", "/queues/web", f"/jobs/{found[0]['job_id']}", "/agents",
                 "/metrics"):
        times = []
        for _ in range(20):
            start = time.perf_counter()
            status = _request(conn, "GET", path)[0]
            times.append(time.perf_counter() - start)
        print(f"page     GET {path:28s} status {status}  p50 {_pct(times, 50) * 1000:6.1f} ms"
              f"  max {max(times) * 1000:6.1f} ms")
    conn.close()


def _bench_testflinger(server, args):
    conn = server.connection()
    auth = _bench_auth(server, conn)
    json_headers = {"Content-Type": "application/json"}
    print(f"agenthub {__version__} bench: server pid {server.proc.pid} on {server.host}:{server.port}, "
          f"{server.kind}, {os.cpu_count()} cores")

    # The ceiling: a trivial Bottle JSON route on the same server, same harness.
    # Each figure also shows the server's CPU time per request: on two cores the load generator
    # competes with the server, and the CPU figure moves less from run to run than the rates.
    cpu = server.cpu()
    ceiling_s, _, _ = _load(server, args.clients, args.jobs, lambda n, c: _request(c, "GET", "/_bench/ping")[0])
    ceiling, cpu = args.jobs / ceiling_s, _cpu_each(server, cpu, args.jobs)
    print(f"ceiling  GET /_bench/ping      {ceiling:8.0f} req/s  ({args.clients} clients, {args.jobs} requests)"
          f"  server CPU {cpu[0]:.0f} µs/request")

    # A realistic job, as people submit them.
    body = json.dumps({"job_queue": "bench", "name": "kernel smoke test", "tags": ["nightly", "kernel", "bench"],
                       "global_timeout": 14400, "output_timeout": 900, "provision_data": {"distro": "jammy"},
                       "test_data": {"test_cmds": "uname -a\nlsb_release -a\n./run-tests.sh --quick"}})
    # The popping agents are registered, as real ones are, and each takes one job, as a real one
    # does before it runs it (an agent holding hundreds of running jobs is no real load).
    _load(server, args.clients, args.jobs, lambda n, c: _request(
        c, "POST", f"/v1/agents/data/bench{n}", json.dumps({"state": "waiting", "queues": ["bench"]}),
        {**auth, **json_headers, "Cookie": f"agent_name=bench{n}"})[0])
    cpu = server.cpu()
    submit_s, submit_lat, codes = _load(server, args.clients, args.jobs,
                                        lambda n, c: _request(c, "POST", "/v1/job", body, json_headers)[0])
    submit, cpu = args.jobs / submit_s, _cpu_each(server, cpu, args.jobs)
    print(f"submit   POST /v1/job          {submit:8.0f} jobs/s {submit / ceiling:6.0%} of ceiling"
          f"  p50 {_pct(submit_lat, 50) * 1000:.1f} ms p99 {_pct(submit_lat, 99) * 1000:.1f} ms"
          f"  (non-200: {sum(1 for c in codes if c != 200)})  server CPU {cpu[0]:.0f} µs/job")

    def pop(n, c):
        status, payload, _ = _request(c, "GET", "/v1/job?queue=bench",
                                      headers={**auth, "Cookie": f"agent_name=bench{n}"})
        return json.loads(payload)["job_id"] if status == 200 else status
    cpu = server.cpu()
    pop_s, pop_lat, popped = _load(server, args.clients, args.jobs, pop)
    ids = [p for p in popped if isinstance(p, str)]
    pops, cpu = args.jobs / pop_s, _cpu_each(server, cpu, args.jobs)
    print(f"pop      GET /v1/job           {pops:8.0f} jobs/s {pops / ceiling:6.0%} of ceiling"
          f"  p50 {_pct(pop_lat, 50) * 1000:.1f} ms p99 {_pct(pop_lat, 99) * 1000:.1f} ms"
          f"  handed out {len(ids)}, distinct {len(set(ids))}, twice {len(ids) - len(set(ids))}"
          f"  server CPU {cpu[0]:.0f} µs/job")

    # 200 agents polling (each every 0.5 s, twenty times faster than the agent's default) while jobs arrive.
    polls, lock, stop = [], threading.Lock(), threading.Event()

    def agent(n):
        c = server.connection()
        headers = {**auth, "Cookie": f"agent_name=poller{n}"}
        while not stop.is_set():
            start = time.perf_counter()
            status = _request(c, "GET", f"/v1/job?queue=poll{n % 10}", headers=headers)[0]
            with lock:
                polls.append((time.perf_counter() - start, status))
            stop.wait(0.5)
        c.close()
    agents = [threading.Thread(target=agent, args=(n,)) for n in range(args.agents)]
    for thread in agents:
        thread.start()
    feeder = server.connection()
    deadline = time.time() + 8
    while time.time() < deadline:
        _request(feeder, "POST", "/v1/job", json.dumps({"job_queue": f"poll{int(time.time() * 10) % 10}"}),
                 json_headers)
        time.sleep(0.02)
    stop.set()
    for thread in agents:
        thread.join()
    lat = [p[0] for p in polls]
    print(f"polling  GET /v1/job x{args.agents} agents  p50 {_pct(lat, 50) * 1000:.1f} ms"
          f"  p99 {_pct(lat, 99) * 1000:.1f} ms  ({len(polls)} polls, {sum(1 for p in polls if p[1] == 200)}"
          f" got a job, errors {sum(1 for p in polls if p[1] not in (200, 204))})")

    # A large artifact up and down, with the server's resident memory sampled throughout.
    size = args.artifact_mib * 1024 * 1024
    block = os.urandom(1024 * 1024)
    job_id = str(uuid.uuid4())
    # RssAnon is the process's own memory; RssFile adds the database pages SQLite reads through
    # memory mapping (the kernel's page cache, bounded by --mmap-mib).
    peak, sampling = [server.rss(), server.rss("RssAnon")], threading.Event()
    base_rss, base_anon = peak

    def sample():
        while not sampling.is_set():
            peak[:] = max(peak[0], server.rss()), max(peak[1], server.rss("RssAnon"))
            sampling.wait(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n"
            "Content-Type: application/x-gzip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    start = time.perf_counter()
    conn.putrequest("POST", f"/v1/result/{job_id}/artifact")
    conn.putheader("Authorization", auth["Authorization"])
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + size + len(tail)))
    conn.endheaders()
    conn.send(head)
    for _ in range(args.artifact_mib):
        conn.send(block)
    conn.send(tail)
    resp = conn.getresponse()
    resp.read()
    up = time.perf_counter() - start
    start = time.perf_counter()
    conn.request("GET", f"/v1/result/{job_id}/artifact")
    resp = conn.getresponse()
    received = 0
    while chunk := resp.read(1024 * 1024):
        received += len(chunk)
    down = time.perf_counter() - start
    sampling.set()
    sampler.join()
    print(f"artifact {args.artifact_mib} MiB  upload {size / up / 2 ** 20:6.1f} MiB/s"
          f"  download {received / down / 2 ** 20:6.1f} MiB/s ({'complete' if received == size else f'{received} bytes!'})"
          f"  server RSS {base_rss / 1024:.0f} MiB -> peak {peak[0] / 1024:.0f} MiB, of which its own memory"
          f" (RssAnon) {base_anon / 1024:.0f} -> {peak[1] / 1024:.0f} MiB (growth {(peak[1] - base_anon) / 1024:.1f} MiB)")
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
