"""``verify`` covers the exact bytes of every line, by default.

The files here are written by popguard's real writer (``AuditLog`` with a
``FileSink``), keyed and not, and then edited the ways an attacker (or a
careless tool) would: a duplicate ``"user"`` key in front of the real one
(JSON readers that keep the first of two keys read the forgery, Python keeps
the last), keys reordered, whitespace added, escapes and numbers respelled.
Each must fail the default ``verify`` with a clear kind at the right line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trail_helpers import KEY, key_file

from popguard.audit import AuditLog
from popguard.sinks.file import FileSink
from popguard.trail.chain import ChainError, is_rendered, resume
from popguard.trail.cli import main
from popguard.trail.query import Filter, query
from popguard.trail.reader import DuplicateKeyError, SkipLog, parse_record
from popguard.trail.report import build_report
from popguard.trail.verify import Kind, VerifyReport, verify

ALGS = pytest.mark.parametrize("keyed", [False, True], ids=["sha256", "hmac"])


def _write_trail(path: Path, key: bytes | None) -> bytes:
    """A trail as popguard writes it: its start record, then four session records."""
    log = AuditLog([FileSink(path, key=key, fsync="never")], instance="popguard")
    try:
        common = {"session": "8c1d2e3f4a5b6c7d", "client": "192.0.2.10:51234"}
        log.event("auth.succeeded", user="alice", mechanism="USER", **common)
        log.event(
            "message.retrieved",
            user="alice",
            command="RETR",
            msg=1,
            uidl="UID-A1",
            size=1001,
            elapsed=0.25,
            realname="d\u00e4vid",
            **common,
        )
        log.event(
            "deletions.committed",
            user="alice",
            messages=[{"msg": 1, "uidl": "UID-A1", "size": 1001}],
            **common,
        )
        log.event("session.closed", user="alice", reason="quit", **common)
    finally:
        log.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def trails(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, bytes]:
    directory = tmp_path_factory.mktemp("exact")
    return {
        keyed: _write_trail(directory / f"written-{keyed}.jsonl", KEY if keyed else None)
        for keyed in (False, True)
    }


def _lines(blob: bytes) -> list[bytes]:
    assert blob.endswith(b"\n")
    return blob[:-1].split(b"\n")


def _line_of(lines: list[bytes], event: str) -> int:
    """The 0-based index of the line with *event*."""
    marker = b'"event":"' + event.encode() + b'"'
    (index,) = [i for i, line in enumerate(lines) if marker in line]
    return index


def _check(tmp_path: Path, blob: bytes, keyed: bool) -> tuple[Path, VerifyReport]:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(blob)
    return path, verify([str(path)], key=KEY if keyed else None)


def _expect(report: VerifyReport, kind: Kind, path: Path, line: int) -> str:
    problem = report.problem
    assert problem is not None, "the edit went unnoticed"
    assert (problem.kind, problem.file, problem.line) == (kind, str(path), line), str(problem)
    assert report.exit_status == 1
    assert str(problem).startswith(f"{path}:{line}: {kind}: ")
    return problem.detail


# --------------------------------------------------------------------------
# The untouched file
# --------------------------------------------------------------------------


@ALGS
def test_an_untouched_trail_verifies(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool
) -> None:
    blob = trails[keyed]
    lines = _lines(blob)
    assert len(lines) == 5
    assert all(is_rendered(line, parse_record(line)) for line in lines)
    # What the edits below work on:
    assert b"d\\u00e4vid" in blob
    assert b'"elapsed":0.25' in blob
    path, report = _check(tmp_path, blob, keyed)
    assert report.ok, report.problem
    assert report.records == 5
    # Strict is the default, and strict=True means the same.
    assert verify([str(path)], key=KEY if keyed else None, strict=True).ok


# --------------------------------------------------------------------------
# Duplicate keys
# --------------------------------------------------------------------------


def _prepend_user(line: bytes) -> bytes:
    return b'{"user":"mallory",' + line[1:]


def _append_user(line: bytes) -> bytes:
    return line[:-1] + b',"user":"mallory"}'


def _escaped_user(line: bytes) -> bytes:
    return b'{"\\u0075ser":"mallory",' + line[1:]


def _nested_size(line: bytes) -> bytes:
    assert line.count(b'"size":1001,"uidl"') == 1
    return line.replace(b'"size":1001,"uidl"', b'"size":9999,"size":1001,"uidl"')


@ALGS
@pytest.mark.parametrize(
    ("edit", "event", "key"),
    [
        pytest.param(_prepend_user, "auth.succeeded", "user", id="first-wins-forgery"),
        pytest.param(_append_user, "auth.succeeded", "user", id="last-wins-forgery"),
        pytest.param(_escaped_user, "auth.succeeded", "user", id="key-spelt-with-escape"),
        pytest.param(_nested_size, "deletions.committed", "size", id="inside-messages"),
    ],
)
def test_a_duplicate_key_is_refused(
    tmp_path: Path,
    trails: dict[bool, bytes],
    keyed: bool,
    edit: Callable[[bytes], bytes],
    event: str,
    key: str,
) -> None:
    lines = _lines(trails[keyed])
    index = _line_of(lines, event)
    lines[index] = edit(lines[index])
    path, report = _check(tmp_path, b"\n".join(lines) + b"\n", keyed)
    detail = _expect(report, Kind.DUPLICATE_KEY, path, index + 1)
    assert f"duplicate key {key!r}" in detail
    assert report.records == index  # everything before it verified


@ALGS
def test_the_forgery_fails_the_cli_too_with_or_without_strict(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _lines(trails[keyed])
    lines[1] = _prepend_user(lines[1])
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    keys = ["--key-file", str(key_file(tmp_path))] if keyed else []
    for strict in ([], ["--strict"]):
        status = main(["audit", "verify", *keys, *strict, str(path)])
        out, _ = capsys.readouterr()
        assert status == 1, out
        assert out.startswith(f"FAIL {path}:2: duplicate_key: duplicate key 'user'")


# --------------------------------------------------------------------------
# Respellings: the same values, other bytes
# --------------------------------------------------------------------------


def _reordered(line: bytes) -> bytes:
    record = json.loads(line)
    return json.dumps(dict(reversed(record.items())), separators=(",", ":")).encode()


def _swap_first_two(line: bytes) -> bytes:
    assert line.startswith(b'{"alg":')
    alg, chain, rest = line[1:].split(b",", 2)
    return b"{" + chain + b"," + alg + b"," + rest


def _respell(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(line: bytes) -> bytes:
        assert line.count(old) == 1, (old, line)
        return line.replace(old, new)

    return edit


RETRIEVED = "message.retrieved"
RESPELLINGS = [
    pytest.param(_reordered, id="keys-reversed"),
    pytest.param(_swap_first_two, id="two-keys-swapped"),
    pytest.param(_respell(b'"user":"alice"', b'"user": "alice"'), id="space-after-colon"),
    pytest.param(_respell(b'{"alg"', b'{ "alg"'), id="space-after-brace"),
    pytest.param(lambda line: line + b" ", id="trailing-space"),
    pytest.param(lambda line: line + b"\r", id="carriage-return"),
    pytest.param(lambda line: b"\t" + line, id="leading-tab"),
    pytest.param(_respell(b"UID-A1", b"UID-\\u00411"), id="A-as-u0041"),
    pytest.param(_respell(b"d\\u00e4vid", b"d\\u00E4vid"), id="escape-upper-hex"),
    pytest.param(_respell(b"d\\u00e4vid", "d\u00e4vid".encode()), id="escape-as-utf8"),
    pytest.param(_respell(b'"level":"info"', b'"level":"\\u0069nfo"'), id="escaped-letter"),
    pytest.param(_respell(b'"alg":"', b'"\\u0061lg":"'), id="key-spelt-with-escape"),
    pytest.param(_respell(b'"elapsed":0.25', b'"elapsed":2.5e-1'), id="float-exponent"),
    pytest.param(_respell(b'"elapsed":0.25', b'"elapsed":0.250'), id="float-trailing-zero"),
    pytest.param(_respell(b'"elapsed":0.25', b'"elapsed":25E-2'), id="float-upper-E"),
]


@ALGS
@pytest.mark.parametrize("edit", RESPELLINGS)
def test_a_respelling_of_the_same_values_is_noncanonical(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool, edit: Callable[[bytes], bytes]
) -> None:
    lines = _lines(trails[keyed])
    index = _line_of(lines, RETRIEVED)
    changed = edit(lines[index])
    assert changed != lines[index]
    assert json.loads(changed) == json.loads(lines[index]), "meant to keep the values"
    lines[index] = changed
    path, report = _check(tmp_path, b"\n".join(lines) + b"\n", keyed)
    detail = _expect(report, Kind.NONCANONICAL, path, index + 1)
    assert "first difference at byte" in detail
    # Only the explicit values-only check lets it pass.
    assert verify([str(path)], key=KEY if keyed else None, strict=False).ok


NUMBER_CHANGES = [
    pytest.param(b'"msg":1,', b'"msg":1.0,', id="int-as-1.0"),
    pytest.param(b'"msg":1,', b'"msg":1e0,', id="int-as-1e0"),
    pytest.param(b'"size":1001,', b'"size":1001.0,', id="int-as-float"),
    pytest.param(b'"schema":1,', b'"schema":1E0,', id="schema-as-1E0"),
]


@ALGS
@pytest.mark.parametrize(("old", "new"), NUMBER_CHANGES)
def test_an_integer_spelt_as_a_float_is_altered(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool, old: bytes, new: bytes
) -> None:
    # 1, 1.0 and 1e0 are equal numbers to Python but not the same JSON value
    # (int vs float): the hash, over the canonical form, already differs.
    lines = _lines(trails[keyed])
    index = _line_of(lines, RETRIEVED)
    lines[index] = _respell(old, new)(lines[index])
    path, report = _check(tmp_path, b"\n".join(lines) + b"\n", keyed)
    _expect(report, Kind.ALTERED, path, index + 1)


@ALGS
def test_a_missing_final_newline_is_truncated(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool
) -> None:
    blob = trails[keyed]
    path, report = _check(tmp_path, blob[:-1], keyed)
    detail = _expect(report, Kind.TRUNCATED, path, 5)
    assert "without a newline" in detail


# --------------------------------------------------------------------------
# Any single byte
# --------------------------------------------------------------------------


#: Bytes that mean something in JSON (whitespace, structure, escapes, number
#: parts, hex digits), drawn often; any byte at all is drawn too.
_JSON_BYTES = sorted(set(b' \t\r\n"\\/,:{}[]0123456789.+-eEuUaAfFtn'))
BYTES = st.one_of(st.sampled_from(_JSON_BYTES), st.integers(0, 255))


def _mutate(original: bytes, how: str, position: int, byte: int) -> bytes:
    """*original* with one byte replaced, inserted or deleted.

    *position* counts from the end when negative; it wraps around the file.
    """
    if how == "insert":
        at = position % (len(original) + 1)
        return original[:at] + bytes([byte]) + original[at:]
    at = position % len(original)
    if how == "delete":
        return original[:at] + original[at + 1 :]
    if original[at] == byte:
        byte = (byte + 1) % 256
    return original[:at] + bytes([byte]) + original[at + 1 :]


@ALGS
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    how=st.sampled_from(["replace", "insert", "delete"]),
    position=st.integers(-4096, 4095),
    byte=BYTES,
)
# Edits the values-only check could not see: each keeps every record's values.
@example(how="delete", position=-1, byte=0)  # the final newline
@example(how="replace", position=-1, byte=ord(" "))  # the final newline, as a space
@example(how="insert", position=-2, byte=ord(" "))  # a space at the end of the last line
@example(how="insert", position=-2, byte=ord("\r"))  # CRLF
@example(how="insert", position=1, byte=ord(" "))  # '{ "alg"'
@example(how="insert", position=7, byte=ord("\t"))  # '{"alg":\t"sha256"'
def test_any_single_byte_change_fails_verify(
    tmp_path: Path, trails: dict[bool, bytes], keyed: bool, how: str, position: int, byte: int
) -> None:
    changed = _mutate(trails[keyed], how, position, byte)
    path = tmp_path / f"mutated-{keyed}.jsonl"
    path.write_bytes(changed)
    report = verify([str(path)], key=KEY if keyed else None)
    assert report.problem is not None, f"{how} {byte:#04x} at {position} went unnoticed"
    assert report.exit_status == 1, str(report.problem)


# --------------------------------------------------------------------------
# query, report and resume read no duplicate-key line
# --------------------------------------------------------------------------


FORGERIES = pytest.mark.parametrize(
    "forge",
    [
        pytest.param(_prepend_user, id="first-wins-forgery"),
        pytest.param(_append_user, id="last-wins-forgery"),
    ],
)


def _forged_trail(
    tmp_path: Path, trails: dict[bool, bytes], forge: Callable[[bytes], bytes] = _prepend_user
) -> tuple[Path, int]:
    lines = _lines(trails[True])
    index = _line_of(lines, "auth.succeeded")
    lines[index] = forge(lines[index])
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, index + 1


def test_parse_record_refuses_duplicate_keys_at_any_depth() -> None:
    with pytest.raises(DuplicateKeyError) as info:
        parse_record(b'{"a":1,"b":{"c":[{"d":1,"d":2}]}}')
    assert info.value.key == "d"
    with pytest.raises(DuplicateKeyError):
        parse_record(b'{"user":"a","\\u0075ser":"b"}')
    assert parse_record(b'{"a":{"x":1},"b":{"x":1}}') == {"a": {"x": 1}, "b": {"x": 1}}


@FORGERIES
def test_query_and_report_leave_out_a_duplicate_key_line(
    tmp_path: Path, trails: dict[bool, bytes], forge: Callable[[bytes], bytes]
) -> None:
    path, line = _forged_trail(tmp_path, trails, forge)
    skips = SkipLog()
    users = [r.get("user") for _, r in query([str(path)], Filter(), skips=skips)]
    assert "mallory" not in users
    assert (skips.count, skips.ambiguous) == (1, 1)
    assert skips.samples[0].line == line
    assert "duplicate key 'user'" in skips.samples[0].reason
    assert list(query([str(path)], Filter(users=("mallory",)))) == []

    skips = SkipLog()
    report = build_report([str(path)], skips=skips)
    assert skips.ambiguous == 1
    ((user, day),) = report  # neither alice's login nor mallory's is counted
    assert user == "alice"
    assert report[user, day].logins == 0
    assert report[user, day].retrieved == 1


@FORGERIES
@pytest.mark.parametrize("command", ["query", "report"])
def test_query_and_report_exit_1_on_a_duplicate_key_line(
    tmp_path: Path,
    trails: dict[bool, bytes],
    forge: Callable[[bytes], bytes],
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, line = _forged_trail(tmp_path, trails, forge)
    status = main(["audit", command, str(path)])
    out, err = capsys.readouterr()
    assert status == 1
    assert "mallory" not in out
    assert f"skipped {path}:{line}: duplicate key 'user'" in err
    assert "1 line with a duplicate key left out" in err

    path.write_bytes(trails[True])  # the untouched trail
    assert main(["audit", command, str(path)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        pytest.param(_prepend_user, "duplicate key 'user'", id="duplicate-key"),
        pytest.param(
            _respell(b'"user":"alice"', b'"user": "alice"'), "not written the way", id="respelled"
        ),
    ],
)
def test_resume_refuses_a_last_line_that_verify_would_refuse(
    tmp_path: Path, trails: dict[bool, bytes], edit: Callable[[bytes], bytes], why: str
) -> None:
    lines = _lines(trails[True])
    path = tmp_path / "audit.jsonl"
    path.write_bytes(trails[True])
    assert resume(path, key=KEY).seq == 5
    lines[-1] = edit(lines[-1])
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ChainError, match=why):
        resume(path, key=KEY)
