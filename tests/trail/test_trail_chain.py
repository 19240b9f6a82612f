"""The writer side of the hash chain: sealing, keys, start/rotate, resume."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trail_helpers import KEY, key_file, seal_lines, session_records, write_lines

from popguard.trail import chain as chain_module
from popguard.trail.chain import (
    ALG_HMAC,
    ALG_SHA256,
    GENESIS,
    ROTATE_EVENT,
    START_EVENT,
    Chain,
    ChainError,
    KeyFileError,
    canonical,
    load_key,
    new_chain_id,
    render,
    resume,
    rotate_record,
    start_record,
)
from popguard.trail.verify import verify

# JSON values as json.loads gives them back (no tuples, no NaN: NaN != NaN).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
records = st.dictionaries(
    st.text().filter(lambda k: k not in {"chain", "seq", "prev", "alg", "hash"}),
    json_values,
    max_size=8,
)


def _spec(record: dict[str, object]) -> bytes:
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _encodable(record: dict[str, object]) -> bool:
    try:
        _spec(record)
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


@given(records.filter(_encodable), st.text(alphabet="0123456789abcdef", max_size=64))
def test_canonical_is_exactly_the_specified_json(record: dict[str, object], hash_: str) -> None:
    assert canonical(record) == _spec(record)
    assert canonical({**record, "hash": hash_}) == _spec(record)


# What audit records hold: no floats, integers within 64 bits.  These take
# orjson's path (see chain._encode_canonical), which must agree byte for byte.
orjson_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), orjson_values, max_size=8).filter(_encodable))
def test_canonical_of_plain_records_takes_orjson_and_agrees(record: dict[str, object]) -> None:
    assert chain_module._orjson_safe(record)
    assert canonical(record) == _spec(record)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e16, b"1e+16"),
        (1e-05, b"1e-05"),
        (0.1, b"0.1"),
        (2**64, b"18446744073709551616"),
        (-(2**63) - 1, b"-9223372036854775809"),
    ],
)
def test_canonical_spells_numbers_as_json_does(value: object, text: bytes) -> None:
    # orjson would write 1e16 and refuse integers beyond 64 bits: json's path.
    assert canonical({"n": value}) == b'{"n":' + text + b"}"
    assert canonical({"n": [value]}) == b'{"n":[' + text + b"]}"


def test_canonical_writes_subclasses_and_odd_keys_as_json_does() -> None:
    class Kind(enum.IntEnum):
        ONE = 1

    class Name(enum.StrEnum):
        X = "x"

    for record in ({"k": Kind.ONE}, {"k": Name.X}, {"k": {"1": [Kind.ONE]}}):
        assert not chain_module._orjson_safe(record)
        assert canonical(record) == _spec(record)
    assert canonical({"k": {1: True}}) == b'{"k":{"1":true}}'  # json's own spelling


@dataclasses.dataclass
class _Thing:
    name: str


@pytest.mark.parametrize(
    "value",
    [
        object(),
        datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC),
        datetime.date(2026, 12, 7),
        uuid.UUID(int=7),
        _Thing("x"),
        [object()],
        {"inner": {"when": datetime.datetime(2026, 12, 7)}},
    ],
    ids=["object", "datetime", "date", "uuid", "dataclass", "in-list", "nested"],
)
def test_canonical_refuses_what_json_cannot_say(value: object) -> None:
    # orjson would write every one of these: canonical must not.
    with pytest.raises(TypeError):
        canonical({"when": value})


def test_seal_adds_the_chain_fields() -> None:
    chain = Chain(chain_id="w1")
    first = chain.seal({"event": "session.opened"})
    second = chain.seal({"event": "session.closed"})
    assert first["chain"] == "w1"
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["prev"] == GENESIS
    assert second["prev"] == first["hash"]
    assert first["alg"] == ALG_SHA256
    assert first["hash"] == hashlib.sha256(canonical(first)).hexdigest()
    assert (chain.seq, chain.prev) == (2, second["hash"])


def test_seal_with_a_key_is_hmac_sha256() -> None:
    chain = Chain(key=KEY, chain_id="w1")
    record = chain.seal({"event": "auth.succeeded", "user": "alice"})
    assert record["alg"] == ALG_HMAC
    assert record["hash"] == hmac.new(KEY, canonical(record), "sha256").hexdigest()
    long_key = bytes(range(256)) * 2  # longer than the SHA-256 block
    record = Chain(key=long_key, chain_id="w1").seal({"event": "x"})
    assert record["hash"] == hmac.new(long_key, canonical(record), "sha256").hexdigest()


def test_chain_continues_from_given_prev_and_seq() -> None:
    prev = "ab" * 32
    record = Chain(prev=prev, seq=41, chain_id="w1").seal({"event": "x"})
    assert (record["seq"], record["prev"]) == (42, prev)


@given(records.filter(_encodable))
@settings(max_examples=200)
def test_seal_line_is_render_of_the_sealed_record(record: dict[str, object]) -> None:
    a, b = Chain(key=KEY, chain_id="w"), Chain(key=KEY, chain_id="w")
    line = a.seal_line(dict(record))
    sealed = b.seal(dict(record))
    assert line == render(sealed)
    assert line.isascii()
    assert "\n" not in line
    assert "\u2028" not in line
    assert json.loads(line) == sealed
    assert line.endswith(f',"hash":"{sealed["hash"]}"}}')


def test_a_record_is_sealed_once_only() -> None:
    chain = Chain(chain_id="w1")
    record = chain.seal({"event": "x"})
    with pytest.raises(ChainError, match="sealed twice"):
        chain.seal(record)
    with pytest.raises(ChainError):
        chain.seal({"event": "x", "seq": 7})  # a field the chain owns
    assert chain.seq == 1


def test_an_unencodable_record_does_not_advance_the_chain() -> None:
    chain = Chain(chain_id="w1")
    record: dict[str, object] = {"event": "x", "when": object()}
    with pytest.raises(TypeError):
        chain.seal(record)
    assert chain.seq == 0
    assert set(record) == {"event", "when"}
    assert chain.seal({"event": "y"})["seq"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chain_id": ""},
        {"chain_id": "w", "prev": "xyz"},
        {"chain_id": "w", "prev": "AB" * 32},
        {"chain_id": "w", "seq": -1},
        {"chain_id": "w", "key": b"short"},
    ],
)
def test_chain_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ChainError):
        Chain(**kwargs)  # type: ignore[arg-type]


def test_new_chain_ids_differ() -> None:
    assert len({new_chain_id() for _ in range(100)}) == 100


def test_start_and_rotate_records() -> None:
    chain = Chain(chain_id="w1")
    start = start_record(chain, reason="new", previous_file=None, instance="popguard")
    middle = chain.seal({"event": "x"})
    rotate = rotate_record(chain, "audit.jsonl")
    assert start["event"] == START_EVENT
    assert (start["reason"], start["previous_file"], start["instance"]) == ("new", None, "popguard")
    assert start["prev"] == GENESIS
    assert start["timestamp"].endswith("Z")
    assert rotate["event"] == ROTATE_EVENT
    assert rotate["next_file"] == "audit.jsonl"
    assert rotate["prev"] == middle["hash"]
    # The next file's start record links to the rotate record.
    following = start_record(chain, reason="rotate", previous_file="audit.jsonl.1")
    assert following["prev"] == rotate["hash"]
    assert following["seq"] == rotate["seq"] + 1
    # Extra fields cannot change what the record is.
    assert start_record(chain, reason="r", previous_file=None, event="other")["event"] == (
        START_EVENT
    )


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def test_load_key_strips_one_trailing_newline(tmp_path: Path) -> None:
    assert load_key(key_file(tmp_path)) == KEY
    crlf = tmp_path / "crlf.key"
    crlf.write_bytes(KEY + b"\r\n")
    crlf.chmod(0o600)
    assert load_key(crlf) == KEY


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_load_key_accepts_private_files(tmp_path: Path, mode: int) -> None:
    assert load_key(key_file(tmp_path, mode=mode)) == KEY


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o620, 0o666])
def test_load_key_refuses_files_others_can_use(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, mode=mode)
    with pytest.raises(KeyFileError, match="accessible to others") as info:
        load_key(path)
    assert "chmod 600" in str(info.value)


def test_load_key_refuses_short_keys_symlinks_and_directories(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="at least 32"):
        load_key(key_file(tmp_path, key=b"x" * 31))
    real = key_file(tmp_path)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError):
        load_key(link)
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_key(directory)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_key(tmp_path / "missing.key")


# --------------------------------------------------------------------------
# Resume after a restart
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_resume_continues_the_chain_across_a_restart(tmp_path: Path, key: bytes | None) -> None:
    path = tmp_path / "audit.jsonl"
    records = session_records(30)
    chain = Chain(key=key, chain_id="w1")
    lines = seal_lines(chain, [next(records) for _ in range(10)])
    write_lines(path, lines)

    resumed = resume(path, key=key)
    assert (resumed.chain_id, resumed.seq, resumed.prev) == ("w1", chain.seq, chain.prev)
    more = seal_lines(resumed, [next(records) for _ in range(10)], start="restart")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(more) + "\n")
    report = verify([str(path)], key=key)
    assert report.ok, report.problem
    assert report.records == 22


def test_resume_reads_only_the_tail_of_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain = Chain(chain_id="w1")
    write_lines(path, seal_lines(chain, session_records(3000)))
    resumed = resume(path)
    assert resumed.seq == 3001


def test_resume_a_single_line_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain = Chain(chain_id="w1")
    write_lines(path, seal_lines(chain, []))
    assert resume(path).seq == 1


def test_resume_refuses_damaged_or_unsuitable_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain = Chain(key=KEY, chain_id="w1")
    lines = seal_lines(chain, session_records(5))

    write_lines(path, lines, newline_at_end=False)
    with pytest.raises(ChainError, match="incomplete"):
        resume(path, key=KEY)

    forged = json.loads(lines[-1])
    forged["level"] = "debug"
    write_lines(path, [*lines[:-1], json.dumps(forged)])
    with pytest.raises(ChainError, match="does not verify"):
        resume(path, key=KEY)

    write_lines(path, lines)
    with pytest.raises(ChainError, match="key is needed"):
        resume(path)
    with pytest.raises(ChainError, match="does not verify"):
        resume(path, key=b"another key that is long enough!!")

    write_lines(path, [*lines, '{"event": "not sealed"}'])
    with pytest.raises(ChainError, match="not a sealed record"):
        resume(path, key=KEY)

    path.write_bytes(b"")
    with pytest.raises(ChainError, match="empty"):
        resume(path, key=KEY)

    gz = write_lines(tmp_path / "audit.jsonl.1.gz", lines)
    with pytest.raises(ChainError, match="compressed"):
        resume(gz, key=KEY)

    with pytest.raises(FileNotFoundError):
        resume(tmp_path / "missing.jsonl")


def test_resume_refuses_adding_a_key_to_an_unkeyed_chain(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "audit.jsonl", seal_lines(Chain(chain_id="w"), []))
    with pytest.raises(ChainError, match="without a key"):
        resume(path, key=KEY)


# --------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_seal_cost_per_record(key: bytes | None, capsys: pytest.CaptureFixture[str]) -> None:
    """Sealing runs for every audit record: it must stay in the microseconds."""
    batch = list(session_records(2000))
    best = float("inf")
    for _ in range(5):
        chain = Chain(key=key, chain_id="w1")
        copies = [dict(record) for record in batch]
        began = time.perf_counter()
        for record in copies:
            chain.seal(record)
        best = min(best, (time.perf_counter() - began) / len(copies))
    with capsys.disabled():
        print(f"\nseal ({'hmac' if key else 'sha256'}): {best * 1e6:.1f} us/record", end=" ")
    # Generous: a loaded CI machine; the point is "microseconds, not milliseconds".
    assert best < 200e-6, f"{best * 1e6:.1f} us per record"
