"""Hash chains over JSON audit records (the writer side).

Every sealed record carries five fields::

    chain  the writer's chain id (one per writing process, see below)
    seq    1, 2, 3, ... without gaps, across rotated files
    prev   the previous record's ``hash`` (``GENESIS`` for seq 1)
    alg    "sha256", or "hmac-sha256" when the chain has a key
    hash   hex digest of canonical(record): every field except ``hash``

``canonical`` is ``json.dumps(record without "hash", sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` in UTF-8: the digest covers the
record's *values*.  The line itself is written in one fixed form,
:func:`render` (sorted, compact, ASCII, ``hash`` last), which is a function
of those values; ``verify`` recomputes the digest from the parsed line *and*
requires the line to be byte for byte ``render`` of what it parsed
(:func:`is_rendered`), so the digest and that check together cover every
byte: a line with a repeated key, another key order, other spacing, other
``\\uXXXX`` or number spellings does not verify, even though its values may.

Files: the first record of every file is an ``audit.chain.start`` record
(:func:`start_record`) and a file that is rotated away ends with an
``audit.chain.rotate`` record (:func:`rotate_record`).  The chain simply
continues across files (``seq`` and ``prev`` run on), so deleting, reordering
or truncating files breaks it.  After a restart :func:`resume` continues the
chain of the file being appended to.

Several writers (worker processes) must not share a chain: each has its own
``chain`` id and its own file(s); a file holds the records of one chain only.

A :class:`Chain` is not thread-safe, and the order of ``seq`` must be the
order of the lines in the file: seal and write under the same lock (or in
the one writer thread).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

# The key file is read by the config too (popguard.schema.keyfile); re-exported here.
from popguard.schema.keyfile import MIN_KEY_BYTES as MIN_KEY_BYTES
from popguard.schema.keyfile import ChainError as ChainError
from popguard.schema.keyfile import KeyFileError as KeyFileError
from popguard.schema.keyfile import load_key as load_key
from popguard.trail.reader import DuplicateKeyError, parse_record

__all__ = [
    "ALG_HMAC",
    "ALG_SHA256",
    "CHAIN_FIELDS",
    "GENESIS",
    "MIN_KEY_BYTES",
    "ROTATE_EVENT",
    "START_EVENT",
    "Chain",
    "ChainError",
    "KeyFileError",
    "canonical",
    "digest",
    "is_rendered",
    "load_key",
    "make_hasher",
    "new_chain_id",
    "render",
    "resume",
    "rotate_record",
    "start_record",
]

#: ``prev`` of the first record of a chain.
GENESIS: Final = "0" * 64
ALG_SHA256: Final = "sha256"
ALG_HMAC: Final = "hmac-sha256"
START_EVENT: Final = "audit.chain.start"
ROTATE_EVENT: Final = "audit.chain.rotate"
#: The fields :meth:`Chain.seal` adds; a record must not carry them already.
CHAIN_FIELDS: Final = ("chain", "seq", "prev", "alg", "hash")

_RESERVED: Final = frozenset(CHAIN_FIELDS)
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def _no_default(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encoder(*, ascii_only: bool) -> Callable[[Mapping[str, Any]], str]:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), ...)``, faster.

    ``json.dumps`` with non-default arguments builds a new encoder on every
    call; this builds CPython's C encoder once (no circular-reference
    bookkeeping: records are trees).  The output is identical; a test holds
    it to ``json.dumps``.
    """
    try:
        from _json import encode_basestring, encode_basestring_ascii, make_encoder
    except ImportError:  # pragma: no cover - not CPython
        encoder = json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only, check_circular=False
        )
        return encoder.encode
    escape = encode_basestring_ascii if ascii_only else encode_basestring
    c_encoder = make_encoder(None, _no_default, escape, None, ":", ",", True, False, True)

    def encode(obj: Mapping[str, Any]) -> str:
        return "".join(c_encoder(obj, 0))

    return encode


_encode_json = _make_encoder(ascii_only=False)
_encode_ascii = _make_encoder(ascii_only=True)

#: The exact scalar types orjson writes as ``json.dumps`` does.  A float is
#: not one (orjson spells ``1e+16`` as ``1e16``), nor anything orjson
#: encodes that ``json`` refuses (datetime, UUID, dataclasses, subclasses).
_ORJSON_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _orjson_safe(value: Any) -> bool:
    """Whether orjson writes ``value`` (a dict, list or tuple) exactly as the
    canonical ``json.dumps`` does: a tree of the types above only."""
    items = value.values() if type(value) is dict else value
    for item in items:
        kind = type(item)
        if kind in _ORJSON_SCALARS:
            continue
        if kind is not dict and kind is not list and kind is not tuple:
            return False
        if not _orjson_safe(item):
            return False
    return True


def _encode_canonical(record: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``record`` (see :func:`canonical`).

    orjson writes the same text about five times faster than CPython's C
    encoder (an audit record: ~1 µs against ~5 µs, and the writer thread
    spent half its time here).  It is used only where it is known to agree
    byte for byte: a tree of dicts, lists and exact str/int/bool/None; not
    floats, nor any type ``json`` would refuse.  What it cannot write (an
    integer beyond 64 bits, a key that is not a string, a lone surrogate) is
    left to ``json`` too, which writes it or raises as it always did.  A
    test holds both to ``json.dumps`` (tests/trail/test_trail_chain.py).
    """
    if type(record) is dict and _orjson_safe(record):
        try:
            return orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode("utf-8")
        except TypeError:
            pass
    return _encode_json(record)


def _without_hash(record: Mapping[str, Any]) -> dict[str, Any]:
    if type(record) is dict and "hash" not in record:
        return record
    return {key: value for key, value in record.items() if key != "hash"}


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's ``hash`` is computed over.

    ``json.dumps(record without "hash", sort_keys=True, separators=(",", ":"),
    ensure_ascii=False).encode("utf-8")``.  Values must be JSON types (str,
    int, float, bool, None, list/tuple, dict with str keys); anything else is
    a ``TypeError``, never a silent ``repr``.
    """
    return _encode_canonical(_without_hash(record)).encode("utf-8")


def digest(data: bytes, key: bytes | None) -> str:
    """Hex SHA-256 of *data*, or hex HMAC-SHA256 under *key*."""
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.digest(key, data, "sha256").hex()


class _Hmac:
    """HMAC-SHA256 with the key schedule done once (RFC 2104).

    Copying the two pre-keyed SHA-256 states costs less than a new
    ``hmac.new`` per record; the result is the same (a test holds it to
    :func:`hmac.digest`).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def __call__(self, data: bytes) -> str:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_hasher(key: bytes | None) -> Callable[[bytes], str]:
    """A function from canonical bytes to the hex ``hash`` field."""
    return _sha256_hex if key is None else _Hmac(key)


def render(record: Mapping[str, Any]) -> str:
    """The fixed line form of a sealed record (without the newline).

    Sorted keys, no spaces, ASCII only (so CR, LF, U+2028 and friends inside
    values stay escaped and one record is always one line), and ``hash``
    last.  Writers must write this form (or :meth:`Chain.seal_line`'s, the
    same): ``verify`` requires it byte for byte.
    """
    return _render(_without_hash(record), record["hash"])


def _rendered_line(body: str, record: Mapping[str, Any], hash_value: str) -> str:
    """``render(record)``, given *body*, the canonical text of *record* less ``hash``.

    *hash_value* must be 64 hex digits (a valid ``hash``).
    """
    if _plain_ascii(body):
        return body[:-1] + ',"hash":"' + hash_value + '"}'
    return _render({k: v for k, v in record.items() if k != "hash"}, hash_value)


def is_rendered(line: bytes, record: Mapping[str, Any]) -> bool:
    """True if *line* (without its newline) is exactly ``render(record)``.

    *record* is what the line parsed to.  With the line's ``hash`` verified,
    this is what makes every byte count: a line that parses to the same
    values but is spelt differently (key order, spacing, escapes, numbers,
    a repeated key) is not the line the writer wrote.
    """
    try:
        expected = render(record)
    except (TypeError, ValueError, RecursionError):
        return False
    return line == expected.encode("ascii")


def _render(body_record: Mapping[str, Any], hash_value: Any) -> str:
    body = _encode_ascii(body_record)
    # The value as the encoder writes it: '{"":VALUE}' without its first 4
    # and last characters (the value is a hex string unless tampered with).
    tail = '"hash":' + _encode_ascii({"": hash_value})[4:-1] + "}"
    if body == "{}":
        return "{" + tail
    return body[:-1] + "," + tail


def _plain_ascii(text: str) -> bool:
    """True if the ASCII encoder would write *text* unchanged (DEL is escaped)."""
    return text.isascii() and "\x7f" not in text


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_chain_id() -> str:
    """A fresh random chain id (16 hex digits)."""
    return secrets.token_hex(8)


class Chain:
    """Seals records one after another into a hash chain.

    ``Chain(chain_id=new_chain_id())`` starts a new chain; ``prev`` and
    ``seq`` continue an existing one (``seq`` is the last sealed number; the
    next record gets ``seq + 1``).  With a *key* every ``hash`` is an
    HMAC-SHA256, so nobody without the key can forge or re-seal records.
    """

    __slots__ = ("_hasher", "_prev", "_seq", "alg", "chain_id", "keyed")

    def __init__(
        self,
        *,
        key: bytes | None = None,
        prev: str = GENESIS,
        seq: int = 0,
        chain_id: str,
    ) -> None:
        if not isinstance(chain_id, str) or not chain_id:
            raise ChainError("chain_id must be a non-empty string")
        if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
            raise ChainError("prev must be 64 lowercase hex digits")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ChainError("seq must be an int >= 0")
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise KeyFileError(f"an HMAC key needs at least {MIN_KEY_BYTES} bytes")
        self.chain_id = chain_id
        self.keyed = key is not None
        self.alg = ALG_HMAC if key is not None else ALG_SHA256
        self._hasher = make_hasher(key)
        self._prev = prev
        self._seq = seq

    @property
    def prev(self) -> str:
        """The ``hash`` of the last record sealed (the next record's ``prev``)."""
        return self._prev

    @property
    def seq(self) -> int:
        """The ``seq`` of the last record sealed (0 before the first)."""
        return self._seq

    def __repr__(self) -> str:
        return f"Chain(chain_id={self.chain_id!r}, seq={self._seq}, alg={self.alg!r})"

    def _link(self, record: dict[str, Any]) -> str:
        if not _RESERVED.isdisjoint(record.keys()):
            taken = sorted(_RESERVED.intersection(record.keys()))
            raise ChainError(f"record already has chain field(s) {taken}: sealed twice?")
        seq = self._seq + 1
        record["chain"] = self.chain_id
        record["seq"] = seq
        record["prev"] = self._prev
        record["alg"] = self.alg
        try:
            body = _encode_canonical(record)
            hash_value = self._hasher(body.encode("utf-8"))
        except BaseException:
            for name in CHAIN_FIELDS:
                record.pop(name, None)
            raise
        record["hash"] = hash_value
        self._seq = seq
        self._prev = hash_value
        return body

    def seal(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add ``chain``, ``seq``, ``prev``, ``alg`` and ``hash`` to *record*.

        Mutates and returns *record*.  Raises :class:`ChainError` if the
        record already has one of those fields (nothing is overwritten) and
        ``TypeError`` for a value JSON cannot represent; either way the
        chain does not advance.
        """
        self._link(record)
        return record

    def seal_line(self, record: dict[str, Any]) -> str:
        """:meth:`seal`, then :func:`render`: the line to write (no newline)."""
        body = self._link(record)
        return _rendered_line(body, record, record["hash"])


def start_record(
    chain: Chain, *, reason: str, previous_file: str | None, **fields: Any
) -> dict[str, Any]:
    """The sealed ``audit.chain.start`` record that opens a file.

    Its ``prev`` is the last record of the previous file (or ``GENESIS``),
    which links the files.  *reason*: ``"new"`` (a new chain), ``"rotate"``,
    ``"reopen"`` (after logrotate), ``"restart"`` (after :func:`resume`).
    Extra *fields* (``instance``, ``schema``) are added as given.  Write it
    as it is (e.g. with :func:`render`): it is sealed already.
    """
    record: dict[str, Any] = {"timestamp": _utc_now(), "level": "info", **fields}
    record.update(event=START_EVENT, reason=reason, previous_file=previous_file)
    return chain.seal(record)


def rotate_record(chain: Chain, next_file: str, **fields: Any) -> dict[str, Any]:
    """The sealed ``audit.chain.rotate`` record that closes a rotated file.

    It is the file's last line; the chain continues in *next_file*, whose
    first record is a :func:`start_record`.  Without it, ``verify`` treats a
    file followed by a later one as truncated when records are missing.
    """
    record: dict[str, Any] = {"timestamp": _utc_now(), "level": "info", **fields}
    record.update(event=ROTATE_EVENT, next_file=next_file)
    return chain.seal(record)


_TAIL_BLOCK = 8192
_MAX_TAIL_LINE = 1 << 20


def _last_line(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise ChainError(f"{os.fspath(path)}: cannot append to a compressed file")
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            raise ChainError(f"{os.fspath(path)}: empty file, nothing to resume")
        f.seek(end - 1)
        if f.read(1) != b"\n":
            raise ChainError(
                f"{os.fspath(path)}: the last line is incomplete (a crash during a write?); "
                "start a new file instead of appending to this one"
            )
        stop = end - 1  # the final newline
        pos = stop
        data = b""
        while True:
            cut = data.rfind(b"\n")
            if cut >= 0:
                return data[cut + 1 :]
            if pos == 0:
                return data
            if len(data) > _MAX_TAIL_LINE:
                raise ChainError(f"{os.fspath(path)}: the last line is too long")
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data


def resume(path: str | os.PathLike[str], *, key: bytes | None = None) -> Chain:
    """A chain that continues the one ending in the file at *path*.

    Reads only the end of the file.  The last line must be a sealed record
    whose ``hash`` verifies (under *key* if the chain is keyed), written
    exactly as :func:`render` writes it, without a repeated key -- what
    ``verify`` requires of it; otherwise :class:`ChainError` (the caller
    should then start a new file with a new chain rather than append to a
    damaged one).  ``FileNotFoundError`` if
    there is no file.  Good practice after resuming: write a
    ``start_record(chain, reason="restart", previous_file=None)``.
    """
    line = _last_line(path)
    where = f"{os.fspath(path)}: last line"
    try:
        record = parse_record(line)
    except DuplicateKeyError as exc:
        raise ChainError(f"{where} has a {exc} (an edited line)") from exc
    except ValueError as exc:  # not UTF-8, invalid JSON, not an object
        raise ChainError(f"{where} is not a sealed record ({exc})") from exc
    if "hash" not in record:
        raise ChainError(f"{where} is not a sealed record")
    chain_id, seq, hash_value, alg = (record.get(f) for f in ("chain", "seq", "hash", "alg"))
    if (
        not isinstance(chain_id, str)
        or not chain_id
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 1
        or not isinstance(hash_value, str)
        or not _HEX64.fullmatch(hash_value)
        or alg not in (ALG_SHA256, ALG_HMAC)
    ):
        raise ChainError(f"{where} has invalid chain fields")
    if alg == ALG_HMAC and key is None:
        raise ChainError(f"{where} is HMAC-sealed: a key is needed to continue the chain")
    if alg == ALG_SHA256 and key is not None:
        raise ChainError(f"{where} is sealed without a key: cannot continue it with one")
    try:
        expected = make_hasher(key)(canonical(record))
    except (TypeError, UnicodeEncodeError) as exc:  # a lone surrogate (\\ud800)
        raise ChainError(f"{where} does not verify: {exc}") from exc
    if not hmac.compare_digest(expected, hash_value):
        raise ChainError(f"{where} does not verify (altered record, or wrong key)")
    if not is_rendered(line, record):
        raise ChainError(
            f"{where} does not verify: its values do, but it is not written the way "
            "popguard writes lines (an edited line)"
        )
    return Chain(key=key, prev=hash_value, seq=seq, chain_id=chain_id)
