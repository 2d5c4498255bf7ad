"""No access token, nor any 8-character piece of one, in anything the filter makes observable.

One Envoy runs with every component at `trace` (so the filter's own log lines at every level
reach the log) and gets the bad-input scenarios of issue 9 with known tokens: real ones from
Synapse logins and crafted ones. Then everything observable is scanned:

- Envoy's log, split into records by component: the `wasm` records (the filter's own lines and
  Envoy's Wasm host) must hold no token piece. Envoy's own components print request headers at
  debug level, Authorization included — that is Envoy's doing, outside the filter; the test
  asserts it finds them (a positive control: the scan does see tokens where they are).
- /stats, /stats?format=json, /stats/prometheus and the access log: nothing.
- The headers Envoy sent upstream (its router's `router decoding headers` dumps: the sync
  workers and whoami): a token only where the client put it (`authorization` and the query in
  `:path`), never in the hash-key header or any other header.
Shared data is covered by the harness (tests/harness/tests/suite/privacy.rs).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time

import pytest

from msrtest.matrix import FALLBACK_KEY, SLIDING_SYNC_PATH, SYNC_PATH

GRAM = 8  # the length of a token piece that must not leak
# Envoy's default log format: [time][thread][level][component] [file:line] message
RECORD = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:.]+\]\[\d+\]\[(\w+)\]\[([\w-]+)\] ", re.M)
HEADER_LINE = re.compile(rb"^'([^']*)', '(.*)'$")


def crafted(n: int, prefix: str = "") -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def pieces(tokens: list[bytes]) -> set[bytes]:
    """Every GRAM-byte substring of every token."""
    return {t[i : i + GRAM] for t in tokens for i in range(len(t) - GRAM + 1)}


def leaks(haystack: bytes, grams: set[bytes]) -> set[bytes]:
    """The token pieces found in `haystack`."""
    return {haystack[i : i + GRAM] for i in range(len(haystack) - GRAM + 1)} & grams


def records(log: bytes) -> list[tuple[bytes, bytes]]:
    """Envoy's log as (component, whole record including continuation lines)."""
    starts = list(RECORD.finditer(log))
    out = []
    for m, nxt in zip(starts, [*starts[1:], None], strict=True):
        out.append((m[2], log[m.start() : nxt.start() if nxt else len(log)]))
    return out


@pytest.fixture(scope="module")
def traced(e2e_stack):
    return e2e_stack.add_envoy("trace", log_args=("--log-level", "trace"))


@pytest.fixture(scope="module")
def tokens(make_user):
    alice, bob = make_user("hyg", n_devices=2), make_user("hyg", n_devices=1)
    chunk = crafted(64)
    return {
        "alice": alice.devices[0].token,
        "alice2": alice.devices[1].token,
        "bob": bob.devices[0].token,
        "unknown": crafted(20, "syt_aHlnaWVuZQ_") + "_0abcde",
        "mas": crafted(30, "mat_") + "_" + crafted(6),
        "long": crafted(4096),
        "huge": chunk * 1024,  # 64 KiB, over Envoy's 60 KiB header limit
        "control": crafted(24),
        "latin1": crafted(24),
        "users": [alice.user_id, bob.user_id],
    }


def scenarios(t: dict) -> list[tuple[str, str, list[tuple[str, str]], bytes | None]]:
    """(method, path, headers, body) of every bad-input case, each with known tokens."""
    sync = SYNC_PATH

    def auth(token):
        return [("Authorization", f"Bearer {token}")]

    return [
        ("GET", f"{sync}?timeout=0", auth(t["alice"]), None),
        ("GET", f"{sync}?timeout=0", auth(t["alice"]), None),  # a cache hit
        ("GET", f"{sync}?timeout=0&access_token={t['alice']}", [], None),
        ("GET", f"{sync}?timeout=0&access%5Ftoken={t['alice2']}", [], None),
        ("GET", f"{sync}?%61ccess_token={t['alice2']}&access_token={t['bob']}&timeout=0", [], None),
        ("GET", f"{sync}?timeout=0;access_token={t['bob']}", [], None),
        ("GET", f"{sync}?access_token={t['alice']}&access_token={t['bob']}&timeout=0", [], None),
        ("GET", f"{sync}?timeout=0&access_token={t['bob']}", auth(t["alice"]), None),
        ("GET", f"{sync}?timeout=0", auth(t["alice"]) + auth(t["bob"]), None),
        ("GET", f"{sync}?timeout=0", [("Authorization", "Bearer " + t["huge"])], None),
        ("GET", f"{sync}?timeout=0", [("Authorization", "Bearer ")], None),
        ("GET", f"{sync}?timeout=0&access_token=", [], None),
        ("GET", f"{sync}?timeout=0", [("Authorization", f"Bearer {t['latin1']}\xe9\xff")], None),
        ("GET", f"{sync}?timeout=0", [("Authorization", f"bearer {t['alice']}")], None),
        ("GET", f"{sync}?timeout=0", [("Authorization", f"Bearer  {t['alice']}")], None),
        ("GET", f"{sync}?timeout=0", auth(t["unknown"]), None),
        ("GET", f"{sync}?timeout=0", auth(t["unknown"]), None),  # a negative-cache hit
        ("GET", f"{sync}?timeout=0&access_token={t['mas']}", [], None),
        ("GET", f"{sync}?timeout=0", auth(t["long"]), None),
        ("GET", f"{sync}?timeout=0&access_token={t['control']}%0D%0AX-Evil:%201", [], None),
        # Spoofed hash-key headers, in any case, repeated, holding a token, with and without one.
        ("GET", f"{sync}?timeout=0", [*auth(t["alice"]), ("X-User-Identifier", t["bob"])], None),
        (
            "GET",
            f"{sync}?timeout=0",
            [("x-user-identifier", t["bob"]), ("X-USER-IDENTIFIER", t["alice"])],
            None,
        ),
        (
            "GET",
            f"{sync}?timeout=0&access_token={t['bob']}",
            [("X-User-Identifier", t["users"][0]), ("x-user-identifier", t["alice2"])],
            None,
        ),
        # A form-encoded POST whose body carries a token.
        (
            "POST",
            f"{SLIDING_SYNC_PATH}?timeout=0&access_token={t['bob']}",
            [("Content-Type", "application/x-www-form-urlencoded")],
            json.dumps({"conn_id": f"&access_token={t['alice2']}&"}).encode(),
        ),
    ]


@pytest.fixture(scope="module")
def observed(traced, tokens):
    """Runs every scenario through the traced Envoy; returns what it made observable."""
    cases = scenarios(tokens)
    responses = [traced.request(m, path, headers, body) for m, path, headers, body in cases]
    for r in responses:
        if r.status != 431:  # refused by Envoy's codec: no request ID
            traced.log_entry(r.request_id)  # waits until the access log has it
    time.sleep(0.5)  # and a little more for Envoy's own log lines
    statuses = [r.status for r in responses]
    return {
        "scenarios": cases,
        "statuses": statuses,
        "log": traced.log.read_bytes(),
        "access_log": traced.access_log.read_bytes(),
        "stats": traced.admin("/stats").body + traced.admin("/stats?format=json").body,
        "prometheus": traced.admin("/stats/prometheus").body,
    }


@pytest.fixture(scope="module")
def grams(tokens):
    return pieces([v.encode() for k, v in tokens.items() if k != "users"])


def test_every_scenario_was_answered(observed, tokens):
    """Every scenario got an HTTP answer (none broke the proxy); the only 431 is the 64 KiB
    header, refused by Envoy's own header limit before the filter."""
    huge = [any(tokens["huge"] in v for _, v in h) for _, _, h, _ in observed["scenarios"]]
    assert [s == 431 for s in observed["statuses"]] == huge, observed["statuses"]
    assert all(200 <= s < 600 for s in observed["statuses"])
    assert 200 in observed["statuses"] and 401 in observed["statuses"]


def test_no_token_piece_in_the_filters_log_lines(observed, grams):
    wasm = [r for c, r in records(observed["log"]) if c == b"wasm"]
    own = [r for r in wasm if b"wasm log" in r]
    assert own, "no log line of the filter at trace level: is the log level applied?"
    found = {g for r in wasm for g in leaks(r, grams)}
    assert not found, f"token pieces in the wasm log records: {sorted(found)[:5]}"


def test_envoys_own_header_dumps_do_show_tokens(observed, tokens, grams):
    """Positive control, and a fact for operators: Envoy's own components print request
    headers (Authorization included) at debug level, and the same scan finds them there."""
    dumps = [(c, r) for c, r in records(observed["log"]) if b"request headers complete" in r]
    assert {c for c, _ in dumps} == {b"http"}, "Envoy's HTTP component prints the headers"
    found = {g for _, r in dumps for g in leaks(r, grams)}
    assert tokens["alice"][:GRAM].encode() in found and tokens["bob"][-GRAM:].encode() in found


def test_no_token_piece_in_stats_or_the_access_log(observed, grams):
    for what in ("stats", "prometheus", "access_log"):
        found = leaks(observed[what], grams)
        assert not found, f"token pieces in {what}: {sorted(found)[:5]}"


def upstream_header_dumps(log: bytes) -> list[list[tuple[bytes, bytes]]]:
    """The header lists of Envoy's `router decoding headers` records: what went upstream."""
    dumps = []
    for component, record in records(log):
        if component == b"router" and b"router decoding headers" in record:
            lines = record.split(b"\n")[1:]
            dumps.append([m.groups() for line in lines if (m := HEADER_LINE.match(line))])
    return dumps


def test_tokens_reach_upstream_only_where_the_client_put_them(observed, grams, tokens):
    dumps = upstream_header_dumps(observed["log"])
    assert len(dumps) >= 10, "Envoy's router dumps not found in the trace log"
    seen_in_authorization = False
    for headers in dumps:
        for name, value in headers:
            found = leaks(value, grams)
            if name == b"authorization":
                seen_in_authorization |= bool(found)
            elif name != b":path":
                assert not found, f"token pieces in upstream header {name!r}: {value[:80]!r}"
        keys = [v for n, v in headers if n == b"x-user-identifier"]
        assert len(keys) <= 1, f"several hash keys sent upstream: {keys}"
        for key in keys:
            assert key.startswith(b"@") or FALLBACK_KEY.match(key.decode()), key
    assert seen_in_authorization, "no Authorization seen upstream: the dump parser is broken"
