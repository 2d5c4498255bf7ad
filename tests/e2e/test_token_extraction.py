"""Which token the filter uses, checked against Synapse itself.

tests/data/token_cases.json lists every token-extraction case with the filter's outcome (the
Rust unit test `request::tests::tokens_are_the_ones_synapse_authenticates` holds the filter to
it) and Synapse's. Here:

- Synapse 1.163.2's own `get_access_token_from_request`, over a real Twisted request built from
  each case, must give the recorded outcome, and the filter's "valid" must be exactly the token
  Synapse authenticates (no process needed: Synapse and Twisted are imported from the venv).
- Through the real Envoy + filter and the real Synapse, the query forms Synapse decodes
  (`access%5Ftoken=`, `%61ccess_token=`, `;`, a second `access_token`) are served as the
  expected user AND routed to that user's worker; the forms Synapse refuses get its 401 and the
  fallback key without a whoami callout.
"""

from __future__ import annotations

import io
import json
import secrets
import time

import pytest

from msrtest.env import REPO
from msrtest.matrix import FALLBACK_KEY, SLIDING_SYNC_PATH, SYNC_PATH

CASES = json.loads((REPO / "tests" / "data" / "token_cases.json").read_text())
MAX_TOKEN_LEN = 4096  # request::MAX_TOKEN_LEN


def synapse_token(method: bytes, uri: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""):
    """What Synapse's `get_access_token_from_request` makes of a request: ("token", str),
    ("error", message) or ("exception", type name). The request is a real Twisted
    `http.Request` fed through `requestReceived`, so `request.args` is built by Twisted itself
    (query string, and a form-encoded POST body)."""
    from synapse.api.auth.base import BaseAuth
    from synapse.api.errors import MissingClientTokenError
    from twisted.web import http
    from twisted.web.test.requesthelper import DummyChannel

    request = http.Request(DummyChannel())
    for name, value in headers:
        # Twisted strips spaces and tabs around a received header value.
        request.requestHeaders.addRawHeader(name, value.strip(b" \t"))
    request.content = io.BytesIO(body)
    request.content.seek(0, io.SEEK_END)
    request.process = lambda: None  # only the argument parsing is wanted
    request.requestReceived(method, uri, b"HTTP/1.1")
    try:
        return "token", BaseAuth.get_access_token_from_request(request)
    except MissingClientTokenError as e:
        return "error", e.msg
    except Exception as e:
        return "exception", type(e).__name__


def resolvable(token: str) -> bool:
    """A token the filter can send to whoami: 1..MAX_TOKEN_LEN bytes of visible ASCII."""
    return 0 < len(token) <= MAX_TOKEN_LEN and all(0x21 <= ord(c) <= 0x7E for c in token)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['authorization']!r}|{c['query']!r}")
def test_the_case_table_is_what_synapse_does(case):
    uri = SYNC_PATH.encode()
    if case["query"] is not None:
        uri += b"?" + case["query"].encode()
    auth = case["authorization"]
    headers = [] if auth is None else [(b"Authorization", auth.encode("latin-1"))]
    kind, value = synapse_token(b"GET", uri, headers)
    assert {kind: value} == case["synapse"]
    # The filter resolves exactly the tokens Synapse authenticates, and nothing else.
    synapse_resolves = kind == "token" and resolvable(value)
    assert (case["filter"] == "valid") == synapse_resolves, case
    if synapse_resolves:
        assert case["bytes"] == value


def test_synapse_takes_a_form_encoded_post_body_token_over_the_query():
    """Why `request::request_token` distrusts a query token on a form-encoded POST: Twisted
    merges the body into `request.args` and its `access_token` replaces the query's."""
    body = b'{"conn_id":"&access_token=from_body&"}'
    form = [(b"Content-Type", b"application/x-www-form-urlencoded")]
    uri = f"{SLIDING_SYNC_PATH}?access_token=from_query".encode()
    assert synapse_token(b"POST", uri, form, body) == ("token", "from_body")
    # Not for a JSON content type, nor for a GET.
    json_type = [(b"Content-Type", b"application/json")]
    assert synapse_token(b"POST", uri, json_type, body) == ("token", "from_query")
    assert synapse_token(b"GET", uri, form, body) == ("token", "from_query")
    # With a header, a body token is "mixing": 401.
    both = [*form, (b"Authorization", b"Bearer from_header")]
    assert synapse_token(b"POST", SLIDING_SYNC_PATH.encode(), both, body)[0] == "error"


# --- through the real Envoy and Synapse ------------------------------------------------------


@pytest.fixture(scope="module")
def two_users(make_user, envoy):
    """Two users whose plain `Authorization: Bearer` syncs land on different workers."""
    first = None
    for _ in range(30):  # P(30 users all on one of 3 workers) is far below 1e-6
        user = make_user("tok", n_devices=2)
        r = envoy.sync(user.devices[0].token)
        assert r.status == 200, r.body[:200]
        user.worker = envoy.worker_of(r)
        if first is None:
            first = user
        elif user.worker != first.worker:
            return first, user
    pytest.fail("30 users all landed on one worker")


def send(envoy, path: str, headers=(), method: str = "GET", body: bytes | None = None):
    """One request through Envoy with its own user agent, so Synapse's log line is findable."""
    agent = f"token-extraction/{secrets.token_hex(4)}"
    r = envoy.request(method, path, [("User-Agent", agent), *headers], body)
    return r, agent


def served_as(synapse, agent: str, path: str) -> str:
    """The requester Synapse recorded for the request with user agent `agent`."""
    return synapse.wait_for_processed(agent, path)[-1].requester


@pytest.mark.parametrize(
    "query",
    [
        "timeout=0&access%5Ftoken={a}",
        "timeout=0&access%5ftoken={a}",
        "%61ccess_token={a}&timeout=0",
        "timeout=0;access_token={a}",
        "access%5Ftoken={a}&access_token={b}&timeout=0",
        "access_token={a}&%61ccess_token={b}&timeout=0",
        "access_token&access_token={a}&timeout=0",
    ],
)
def test_decoded_query_tokens_are_served_and_routed_as_synapse_reads_them(
    query, two_users, envoy, e2e_stack
):
    alice, bob = two_users
    # Alice's second device: the worker must follow the user, not only the token.
    path = f"{SYNC_PATH}?" + query.format(a=alice.devices[1].token, b=bob.devices[0].token)
    r, agent = send(envoy, path)
    assert r.status == 200, r.body[:200]
    assert served_as(e2e_stack.synapse, agent, SYNC_PATH) == alice.user_id
    assert envoy.worker_of(r) == alice.worker, "routed by another token than Synapse served"
    assert envoy.log_entry(r.request_id)["user"] == alice.user_id


def whoami_calls(envoy) -> int:
    return envoy.stats()["cluster.synapse_whoami.upstream_rq_total"]


@pytest.mark.parametrize(
    "query, headers, errcode",
    [
        # Header and query both: "Mixing Authorization headers and access_token query parameters".
        ("timeout=0&access_token={a}", [("Authorization", "Bearer {b}")], "M_MISSING_TOKEN"),
        ("timeout=0&access%5Ftoken={a}", [("Authorization", "Bearer {b}")], "M_MISSING_TOKEN"),
        ("timeout=0&access_token=", [("Authorization", "Bearer {a}")], "M_MISSING_TOKEN"),
        # Two Authorization headers: "Too many Authorization headers" (or, joined, invalid).
        (
            "timeout=0",
            [("Authorization", "Bearer {a}"), ("Authorization", "Bearer {b}")],
            "M_MISSING_TOKEN",
        ),
        # Not exactly `Bearer <token>`: "Invalid Authorization header".
        ("timeout=0", [("Authorization", "Bearer  {a}")], "M_MISSING_TOKEN"),
        ("timeout=0", [("Authorization", "Bearer ")], "M_MISSING_TOKEN"),
        ("timeout=0", [("Authorization", "Basic {a}")], "M_MISSING_TOKEN"),
        # A blank first access_token is the one Synapse uses: unknown token.
        ("access_token=&access_token={a}&timeout=0", [], "M_UNKNOWN_TOKEN"),
        ("timeout=0&access_token=a+b", [], "M_UNKNOWN_TOKEN"),
    ],
)
def test_requests_synapse_refuses_get_the_fallback_key_without_whoami(
    query, headers, errcode, two_users, envoy
):
    alice, bob = two_users
    fill = {"a": alice.devices[1].token, "b": bob.devices[0].token}
    before = whoami_calls(envoy)
    r, _ = send(
        envoy,
        f"{SYNC_PATH}?{query.format(**fill)}",
        [(n, v.format(**fill)) for n, v in headers],
    )
    assert r.status == 401 and r.json()["errcode"] == errcode, r.body[:200]
    assert FALLBACK_KEY.match(envoy.log_entry(r.request_id)["user"] or "")
    assert whoami_calls(envoy) == before, "a whoami callout for a request Synapse refuses"


def test_a_non_utf8_token_gets_the_fallback_key(envoy):
    """Bytes over 0x7f in `Authorization`: Envoy forwards them, Synapse cannot decode the token
    (it fails the request), the filter routes with the fallback key and calls no whoami."""
    before = whoami_calls(envoy)
    conn_headers = [("Authorization", "Bearer caf\xe9\xff")]  # sent as latin-1 bytes
    r, _ = send(envoy, f"{SYNC_PATH}?timeout=0", conn_headers)
    assert r.status != 200
    assert FALLBACK_KEY.match(envoy.log_entry(r.request_id)["user"] or "")
    assert whoami_calls(envoy) == before


def test_a_64_kib_authorization_header_is_refused_by_envoy_before_the_filter(envoy):
    """Envoy's default header limit (60 KiB) answers 431 itself: the filter never sees it."""
    time.sleep(1.5)  # earlier tests' counts reach Envoy on the filter's one-second tick
    before = envoy.prometheus()["matrix_sync_router_requests"]
    r, _ = send(envoy, f"{SYNC_PATH}?timeout=0", [("Authorization", "Bearer " + "t" * 65536)])
    assert r.status == 431, r.status
    time.sleep(1.5)  # the filter flushes its counters on its one-second tick
    assert envoy.prometheus()["matrix_sync_router_requests"] == before


def test_a_form_encoded_post_body_token_is_not_routed_by_the_query_token(
    two_users, envoy, e2e_stack
):
    """Synapse serves the body's token (see the unit check above); routing by the query's
    token would let a client place one user's sync on another user's worker."""
    alice, bob = two_users
    body = json.dumps({"conn_id": f"&access_token={alice.devices[1].token}&"}).encode()
    r, agent = send(
        envoy,
        f"{SLIDING_SYNC_PATH}?timeout=0&access_token={bob.devices[0].token}",
        [("Content-Type", "application/x-www-form-urlencoded")],
        "POST",
        body,
    )
    assert served_as(e2e_stack.synapse, agent, SLIDING_SYNC_PATH) == alice.user_id, r.body[:200]
    assert envoy.log_entry(r.request_id)["user"] != bob.user_id
