"""Verify an audit trail: one pass, constant memory, the first problem found.

:func:`verify` reads the files in the order given (oldest first;
:func:`order_rotated` sorts logrotate names), transparently gunzipping, and
checks every line:

* it is a JSON object (``malformed``; a broken last line is ``truncated``,
  and so is a last line without its newline);
* no object in it repeats a key (``duplicate_key``): JSON readers disagree
  on which of two values counts, so the line is refused before anything
  reads it;
* it is sealed (``unchained`` if it has no ``hash``) by the expected chain
  (``mixed_chain``);
* its ``hash`` matches its contents (``altered``; ``wrong_key`` when the
  very first record fails under the given key; ``unkeyed`` when a key is
  given but records are plain SHA-256; ``key_required`` when the records
  are HMAC-sealed and no key is given);
* its bytes are exactly those the writer writes for those contents,
  :func:`~popguard.trail.chain.render` (``noncanonical``).  The ``hash``
  covers the record's values, and ``render`` is a function of the values,
  so the two checks together cover every byte of the line: no respelling
  (key order, spacing, escapes, numbers) of a sealed record verifies;
* it links to the record before it: ``prev`` is that record's hash and
  ``seq`` is one more.  A break is classified by looking at the records
  around it: ``deleted`` (a gap in ``seq``), ``reordered``, ``inserted``
  (a duplicate, or a record the next one skips over), ``altered`` (the
  next record vouches for a different predecessor);
* files link too: each file begins with ``audit.chain.start`` whose
  ``prev`` is the previous file's last hash (``out_of_order``), a file
  followed by another ends with ``audit.chain.rotate`` (``truncated`` if
  records are missing at its end), and the first file of a chain begins
  with a start record (``deleted`` otherwise).

The line numbers are exact; the kind is the most likely explanation of what
is seen, since several edits can look alike.  Files of several chains (one
per writer) may be given together: they are grouped by chain id, in order.
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from popguard.trail.chain import (
    _HEX64,
    ALG_HMAC,
    ALG_SHA256,
    GENESIS,
    ROTATE_EVENT,
    START_EVENT,
    _encode_canonical,
    _rendered_line,
    make_hasher,
)
from popguard.trail.reader import (
    DuplicateKeyError,
    TrailReadError,
    iter_lines,
    order_rotated,
    parse_record,
)

__all__ = [
    "ChainSummary",
    "Checkpoint",
    "Kind",
    "Problem",
    "VerifyReport",
    "order_rotated",
    "verify",
]


class Kind(enum.StrEnum):
    """What a problem looks like."""

    ALTERED = "altered"
    DELETED = "deleted"
    REORDERED = "reordered"
    INSERTED = "inserted"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    WRONG_KEY = "wrong_key"
    UNKEYED = "unkeyed"
    OUT_OF_ORDER = "out_of_order"
    UNCHAINED = "unchained"
    MIXED_CHAIN = "mixed_chain"
    #: The values verify, but the line's bytes are not those the writer
    #: writes for them (``render``): spelt differently after sealing.
    NONCANONICAL = "noncanonical"
    #: An object in the line has a key twice: readers disagree on its value.
    DUPLICATE_KEY = "duplicate_key"
    #: A worker's trail is absent while the supervisor's says it ran.
    MISSING_WORKER = "missing_worker"
    #: Not tampering: the records are HMAC-sealed and no key was given.
    KEY_REQUIRED = "key_required"
    # ``--retention`` (popguard.trail.retention): what the records claim of
    # the retention store does not hold.
    #: A deletion under retention whose record names no archived copy.
    NOT_ARCHIVED = "not_archived"
    #: The copy a record names is not in the retention store.
    MISSING_COPY = "missing_copy"
    #: The copy's SHA-256 is not the record's ``digest``.
    CHANGED_COPY = "changed_copy"
    #: The copy is filed in another account's Maildir.
    MISPLACED_COPY = "misplaced_copy"


@dataclass(frozen=True, slots=True)
class Problem:
    kind: Kind
    file: str
    #: 1-based line number; one past the last line for a missing file end.
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A record known from elsewhere (``CHAIN:SEQ:HASH``), e.g. shipped off-host.

    Verifying against it detects what a chain alone cannot: the end of the
    newest file cut off after the checkpoint was taken, or (without a key) a
    chain rewritten from scratch.
    """

    chain_id: str
    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        parts = text.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            raise ValueError(f"not CHAIN:SEQ:HASH: {text!r}")
        hash_value = parts[2].lower()
        if not _HEX64.fullmatch(hash_value):
            raise ValueError(f"the hash must be 64 hex digits: {text!r}")
        return cls(parts[0], int(parts[1]), hash_value)

    def __str__(self) -> str:
        return f"{self.chain_id}:{self.seq}:{self.hash}"


@dataclass(slots=True)
class ChainSummary:
    """What was verified of one chain (up to the problem, if any)."""

    chain_id: str
    alg: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    first_seq: int = 0
    first_prev: str = GENESIS
    last_seq: int = 0
    last_hash: str = GENESIS
    #: The process that wrote its last record, with ``workers:`` (0: the
    #: supervisor), else None.
    worker: int | None = None
    #: In a supervisor's chain: the worker count of its last start.
    workers: int | None = None
    #: Where the supervisor's last start record is (file, line).
    workers_at: tuple[str, int] = ("", 0)

    @property
    def from_genesis(self) -> bool:
        """True if the files hold the chain from its first record."""
        return self.first_prev == GENESIS

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.chain_id, self.last_seq, self.last_hash)


@dataclass(slots=True)
class VerifyReport:
    problem: Problem | None
    files: int = 0
    records: int = 0
    chains: list[ChainSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def exit_status(self) -> int:
        """0 intact, 1 tampering (or damage) found, 2 a key is needed."""
        if self.problem is None:
            return 0
        return 2 if self.problem.kind is Kind.KEY_REQUIRED else 1

    def to_json(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "ok": self.ok,
            "problem": None
            if problem is None
            else {
                "kind": str(problem.kind),
                "file": problem.file,
                "line": problem.line,
                "detail": problem.detail,
            },
            "files": self.files,
            "records": self.records,
            "chains": [
                {
                    "chain": c.chain_id,
                    "alg": c.alg,
                    "files": c.files,
                    "records": c.records,
                    "first_seq": c.first_seq,
                    "first_prev": c.first_prev,
                    "from_genesis": c.from_genesis,
                    "last_seq": c.last_seq,
                    "last_hash": c.last_hash,
                    "checkpoint": str(c.checkpoint),
                    "worker": c.worker,
                }
                for c in self.chains
            ],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------
# The stream of lines the verifier walks
# --------------------------------------------------------------------------

_ALGS: Final = frozenset({ALG_SHA256, ALG_HMAC})
#: The supervisor's record of how many workers it runs (shell/workers.py).
WORKERS_EVENT: Final = "popguard.workers.started"


def _excerpt(data: bytes, start: int, width: int = 24) -> str:
    """``data[start:start+width]`` for a message, marked where it is cut."""
    text = data[start : start + width].decode("utf-8", "backslashreplace")
    return repr(("..." if start else "") + text + ("..." if len(data) > start + width else ""))


class _Found(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(slots=True)
class _Rec:
    """A parsed, sealed line; its digest check is computed on demand."""

    path: str
    line: int
    data: bytes
    record: dict[str, Any]
    body: bytes | None = None
    verified: bool | None = None

    @property
    def seq(self) -> int:
        value: int = self.record["seq"]
        return value

    @property
    def prev(self) -> str:
        value: str = self.record["prev"]
        return value

    @property
    def hash(self) -> str:
        value: str = self.record["hash"]
        return value

    @property
    def event(self) -> object:
        return self.record.get("event")


@dataclass(frozen=True, slots=True)
class _Eof:
    path: str
    last_line: int


@dataclass(frozen=True, slots=True)
class _Bad:
    problem: Problem


_Item = _Rec | _Eof | _Bad


def _invalid_chain_field(record: dict[str, Any]) -> str | None:
    chain_id = record.get("chain")
    if not isinstance(chain_id, str) or not chain_id:
        return "chain"
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "seq"
    prev = record.get("prev")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return "prev"
    if record.get("alg") not in _ALGS:
        return "alg"
    hash_value = record.get("hash")
    if not isinstance(hash_value, str) or not _HEX64.fullmatch(hash_value):
        return "hash"
    return None


def _items(paths: Sequence[str], exact: bool) -> Iterator[_Item]:
    for path in paths:
        last = 0
        try:
            for line in iter_lines(path):
                last = line.number
                yield _item(path, line.number, line.data, line.newline, line.overlong, exact)
        except TrailReadError as exc:
            kind = Kind.TRUNCATED if exc.truncated else Kind.MALFORMED
            yield _Bad(Problem(kind, path, exc.line, exc.detail))
            return
        yield _Eof(path, last)


def _item(path: str, number: int, data: bytes, newline: bool, overlong: bool, exact: bool) -> _Item:
    if overlong:
        return _Bad(Problem(Kind.MALFORMED, path, number, "line too long"))
    try:
        record = parse_record(data)
    except DuplicateKeyError as exc:
        detail = (
            f"{exc}: JSON readers disagree on which of its values counts (Python keeps "
            "the last, others the first); no writer makes such a line: it was edited"
        )
        return _Bad(Problem(Kind.DUPLICATE_KEY, path, number, detail))
    except ValueError as exc:
        if not newline:
            detail = f"the file ends in the middle of a line: {exc}"
            return _Bad(Problem(Kind.TRUNCATED, path, number, detail))
        if not data.strip():
            return _Bad(Problem(Kind.MALFORMED, path, number, "blank line"))
        return _Bad(Problem(Kind.MALFORMED, path, number, str(exc)))
    if exact and not newline:
        detail = (
            "the file ends without a newline after its last line "
            "(a write cut short, or the newline was removed)"
        )
        return _Bad(Problem(Kind.TRUNCATED, path, number, detail))
    if "hash" not in record:
        event = record.get("event")
        what = f" ({event})" if isinstance(event, str) else ""
        return _Bad(Problem(Kind.UNCHAINED, path, number, f"record is not sealed{what}"))
    invalid = _invalid_chain_field(record)
    if invalid is not None:
        return _Bad(Problem(Kind.ALTERED, path, number, f"invalid chain field {invalid!r}"))
    return _Rec(path, number, data, record)


class _Lookahead:
    """The item stream with a peek at the next records (past file ends)."""

    def __init__(self, items: Iterator[_Item]) -> None:
        self._items = items
        self._buffer: deque[_Item] = deque()

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> _Item:
        if self._buffer:
            return self._buffer.popleft()
        return next(self._items)

    def next_record(self) -> _Rec | None:
        """The next sealed record, unless a bad line or the end comes first."""
        index = 0
        while True:
            if index == len(self._buffer):
                try:
                    self._buffer.append(next(self._items))
                except StopIteration:
                    return None
            item = self._buffer[index]
            if isinstance(item, _Rec):
                return item
            if isinstance(item, _Bad):
                return None
            index += 1


# --------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------


def _first_chain_id(path: str) -> str | None:
    lines = iter_lines(path)
    try:
        line = next(lines, None)
    except TrailReadError:
        return None
    finally:
        lines.close()
    if line is None or line.overlong:
        return None
    try:
        record = parse_record(line.data)
    except ValueError:
        return None
    chain_id = record.get("chain")
    return chain_id if isinstance(chain_id, str) and chain_id else None


@dataclass(slots=True)
class _Group:
    chain_id: str | None
    paths: list[str]


def _group_by_chain(paths: Sequence[str]) -> list[_Group]:
    """Files grouped by the chain of their first record, in order.

    A file whose chain cannot be told (empty, or a bad first line) stays
    with the file before it, so its problems are found there.
    """
    groups: list[_Group] = []
    by_id: dict[str, _Group] = {}
    current: _Group | None = None
    for path in paths:
        chain_id = _first_chain_id(path)
        if chain_id is None:
            if current is None:
                current = _Group(None, [])
                groups.append(current)
        elif chain_id in by_id:
            current = by_id[chain_id]
        elif current is not None and current.chain_id is None:
            current.chain_id = chain_id  # the files before belonged to no chain
            by_id[chain_id] = current
        else:
            current = _Group(chain_id, [])
            groups.append(current)
            by_id[chain_id] = current
        current.paths.append(path)
    return groups


class _Verifier:
    def __init__(self, key: bytes | None, strict: bool, checkpoints: Sequence[Checkpoint]) -> None:
        self.key = key
        self.strict = strict
        self.hasher: Callable[[bytes], str] = make_hasher(key)
        self.checkpoints: dict[str, dict[int, str]] = {}
        for cp in checkpoints:
            self.checkpoints.setdefault(cp.chain_id, {})[cp.seq] = cp.hash
        self.report = VerifyReport(problem=None)

    # -- digests ------------------------------------------------------------

    def verified(self, rec: _Rec) -> bool:
        if rec.verified is None:
            record = rec.record
            hash_value = record.pop("hash")
            try:
                rec.body = _encode_canonical(record).encode("utf-8")
            except (UnicodeEncodeError, RecursionError, ValueError):
                rec.body = None  # a lone surrogate: no seal could have made this
            finally:
                record["hash"] = hash_value
            if rec.body is None or (record["alg"] == ALG_HMAC) != (self.key is not None):
                rec.verified = False
            else:
                rec.verified = hmac.compare_digest(self.hasher(rec.body), hash_value)
        return rec.verified

    def canonical_line(self, rec: _Rec) -> Problem | None:
        """``noncanonical`` unless the line is exactly ``render`` of its record.

        Called once the hash verified (``rec.body`` is the canonical text).
        """
        assert rec.body is not None
        expected = _rendered_line(rec.body.decode("utf-8"), rec.record, rec.hash).encode("ascii")
        found = rec.data
        if found == expected:
            return None
        at = next(
            (i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
            min(len(found), len(expected)),
        )
        start = max(0, at - 8)
        return Problem(
            Kind.NONCANONICAL,
            rec.path,
            rec.line,
            "the values verify, but the line is not written the way popguard writes it: "
            f"its bytes were changed after sealing (first difference at byte {at + 1}: "
            f"{_excerpt(found, start)} where the writer writes {_excerpt(expected, start)})",
        )

    # -- one chain ----------------------------------------------------------

    def run(self, paths: Sequence[str]) -> VerifyReport:
        report = self.report
        report.files = len(paths)
        seen: set[str] = set()
        try:
            for group in _group_by_chain(paths):
                summary = self.chain(group.chain_id, group.paths)
                if summary is not None:
                    seen.add(summary.chain_id)
            self.every_worker()
        except _Found as found:
            report.problem = found.problem
            return report
        for chain_id in self.checkpoints:
            if chain_id not in seen:
                report.notes.append(f"checkpoint for chain {chain_id} not checked: no such chain")
        return report

    def every_worker(self) -> None:
        """With several workers, each worker's chain must be among the files.

        Chains are per writer, so removing a worker's files whole leaves no
        gap in any chain; the supervisor's record of how many workers it
        started (``popguard.workers.started``) is what shows it.
        """
        present = {c.worker for c in self.report.chains}
        for summary in self.report.chains:
            if summary.worker != 0 or not summary.workers:
                continue
            missing = [i for i in range(1, summary.workers + 1) if i not in present]
            if missing:
                path, line = summary.workers_at
                raise _Found(
                    Problem(
                        Kind.MISSING_WORKER,
                        path,
                        line,
                        f"the supervisor started {summary.workers} workers, but no chain of "
                        f"worker(s) {', '.join(map(str, missing))} is among the files "
                        "(give every audit.wN file, or they were removed)",
                    )
                )

    def chain(self, expected_id: str | None, paths: Sequence[str]) -> ChainSummary | None:
        summary: ChainSummary | None = None
        prev2 = GENESIS  # the hash before the last one
        last: _Rec | None = None
        file_records = 0  # records in the current file so far
        # The last file with records before the current one: (path, last
        # line, its last record).
        prev_file: tuple[str, int, _Rec] | None = None
        last_line_of: tuple[str, int] = (paths[0], 0) if paths else ("", 0)
        checks = self.checkpoints.get(expected_id or "", {})
        items = _Lookahead(_items(paths, self.strict))
        for item in items:
            if isinstance(item, _Bad):
                raise _Found(item.problem)
            if isinstance(item, _Eof):
                last_line_of = (item.path, item.last_line)
                if file_records and last is not None:
                    prev_file = (item.path, item.last_line, last)
                file_records = 0
                continue
            rec = item
            record = rec.record
            if expected_id is None:
                expected_id = record["chain"]
                checks = self.checkpoints.get(expected_id, {})
            if record["alg"] == ALG_HMAC and self.key is None:
                raise _Found(
                    Problem(
                        Kind.KEY_REQUIRED,
                        rec.path,
                        rec.line,
                        "the records are HMAC-sealed: give the key (--key-file)",
                    )
                )
            if not self.verified(rec):
                raise _Found(self.bad_digest(rec, last, items))
            if record["chain"] != expected_id:
                raise _Found(
                    Problem(
                        Kind.MIXED_CHAIN,
                        rec.path,
                        rec.line,
                        f"record of chain {record['chain']!r} among chain {expected_id!r}: "
                        "a file holds one chain only",
                    )
                )
            if last is None:
                self.first(rec, items)
                summary = ChainSummary(
                    chain_id=record["chain"],
                    alg=record["alg"],
                    files=list(paths),
                    first_seq=rec.seq,
                    first_prev=rec.prev,
                )
                self.report.chains.append(summary)
            elif rec.prev != last.hash or rec.seq != last.seq + 1:
                if file_records == 0 and prev_file is not None:
                    raise _Found(self.bad_file_link(rec, last, prev_file))
                raise _Found(self.bad_link(rec, last, prev2, items))
            assert summary is not None
            expected_hash = checks.get(rec.seq)
            if expected_hash is not None and expected_hash != rec.hash:
                raise _Found(
                    Problem(
                        Kind.ALTERED,
                        rec.path,
                        rec.line,
                        f"seq {rec.seq} does not match the checkpoint: "
                        "this part of the chain was rewritten",
                    )
                )
            # Last: a line whose record is sound but whose bytes are not the
            # writer's (a respelling; or a forgery, whose link problem, if it
            # has one, was the more telling report above).
            if self.strict:
                noncanonical = self.canonical_line(rec)
                if noncanonical is not None:
                    raise _Found(noncanonical)
            # The chain's writer is that of its last record: a supervisor may
            # continue a single process's chain (an upgrade to workers: N),
            # and a single process may continue the supervisor's (a downgrade).
            worker = record.get("worker")
            summary.worker = (
                worker if isinstance(worker, int) and not isinstance(worker, bool) else None
            )
            if rec.event == WORKERS_EVENT and summary.worker == 0:
                count = record.get("workers")
                summary.workers = count if isinstance(count, int) else None
                summary.workers_at = (rec.path, rec.line)
            summary.records += 1
            summary.last_seq = rec.seq
            summary.last_hash = rec.hash
            self.report.records += 1
            prev2 = last.hash if last is not None else GENESIS
            last = rec
            file_records += 1
        if summary is not None:
            self.finish(summary, checks, last, last_line_of)
        return summary

    def first(self, rec: _Rec, items: _Lookahead) -> None:
        """The first record of a chain must open its file (or the chain)."""
        if rec.event == START_EVENT or (rec.prev == GENESIS and rec.seq == 1):
            return
        following = items.next_record()
        if following is not None and following.seq < rec.seq and self.verified(following):
            raise _Found(
                Problem(
                    Kind.REORDERED,
                    rec.path,
                    rec.line,
                    f"seq {rec.seq} comes before seq {following.seq}",
                )
            )
        raise _Found(
            Problem(
                Kind.DELETED,
                rec.path,
                rec.line,
                f"the chain's first file does not begin with an {START_EVENT} record "
                f"(it begins at seq {rec.seq}): its first records were removed",
            )
        )

    def finish(
        self,
        summary: ChainSummary,
        checks: dict[int, str],
        last: _Rec | None,
        end: tuple[str, int],
    ) -> None:
        for seq in sorted(checks):
            if seq > summary.last_seq:
                raise _Found(
                    Problem(
                        Kind.TRUNCATED,
                        end[0],
                        end[1] + 1,
                        f"the chain ends at seq {summary.last_seq}, but a checkpoint "
                        f"records seq {seq}: records were cut off the end",
                    )
                )
            if seq < summary.first_seq:
                self.report.notes.append(
                    f"checkpoint {summary.chain_id}:{seq} predates the files given; not checked"
                )
        if last is not None and last.event == ROTATE_EVENT:
            following = last.record.get("next_file")
            self.report.notes.append(
                f"chain {summary.chain_id}: {last.path} ends with a rotation to "
                f"{following!r}, which was not given"
            )

    # -- classifying a break ------------------------------------------------

    def bad_digest(self, rec: _Rec, last: _Rec | None, items: _Lookahead) -> Problem:
        plain = self.key is not None and rec.record["alg"] == ALG_SHA256
        following = items.next_record()
        following_ok = following is not None and self.verified(following)
        if last is None:
            if following_ok:
                return Problem(
                    Kind.ALTERED, rec.path, rec.line, "the hash does not match the record"
                )
            if plain:
                return Problem(
                    Kind.UNKEYED,
                    rec.path,
                    rec.line,
                    "a key was given but the records are sealed with plain sha256 "
                    "(written without a key, or forged)",
                )
            if self.key is not None:
                return Problem(
                    Kind.WRONG_KEY,
                    rec.path,
                    rec.line,
                    "the HMAC does not verify: wrong key (or the record was altered)",
                )
            return Problem(Kind.ALTERED, rec.path, rec.line, "the hash does not match the record")
        if (
            following is not None
            and following_ok
            and following.prev == last.hash
            and following.seq == last.seq + 1
        ):
            return Problem(
                Kind.INSERTED,
                rec.path,
                rec.line,
                "a record that does not verify, and the next record links past it",
            )
        if plain and following is None and rec.prev == last.hash and rec.seq == last.seq + 1:
            return Problem(
                Kind.INSERTED,
                rec.path,
                rec.line,
                "a record sealed with plain sha256 appended to a keyed chain",
            )
        detail = "the hash does not match the record"
        if plain:
            detail += " (sealed with plain sha256 although the chain is keyed: forged)"
        return Problem(Kind.ALTERED, rec.path, rec.line, detail)

    def bad_link(self, rec: _Rec, last: _Rec, prev2: str, items: _Lookahead) -> Problem:
        seq, want = rec.seq, last.seq + 1
        if rec.hash == last.hash:
            return Problem(
                Kind.INSERTED, rec.path, rec.line, f"a copy of the record at line {last.line}"
            )
        if seq == last.seq and rec.prev == prev2:
            return Problem(
                Kind.INSERTED,
                last.path,
                last.line,
                f"the record at line {rec.line} (seq {seq}) links past this one: "
                "this record does not belong here",
            )
        if seq == last.seq:
            return Problem(
                Kind.INSERTED,
                rec.path,
                rec.line,
                f"a second record with seq {seq} (the first is at line {last.line})",
            )
        if seq == want:
            return Problem(
                Kind.ALTERED,
                last.path,
                last.line,
                f"the record at line {rec.line} (seq {seq}) vouches for a different "
                "record here: this one was replaced",
            )
        if seq > want:
            following = items.next_record()
            if following is not None and last.seq < following.seq < seq:
                return Problem(
                    Kind.REORDERED,
                    rec.path,
                    rec.line,
                    f"seq {seq} comes before seq {following.seq} (expected seq {want})",
                )
            missing = seq - want
            span = f"seq {want}" if missing == 1 else f"seq {want}..{seq - 1}"
            return Problem(
                Kind.DELETED,
                rec.path,
                rec.line,
                f"{missing} record{'s' if missing > 1 else ''} missing before this line ({span})",
            )
        return Problem(
            Kind.REORDERED,
            rec.path,
            rec.line,
            f"seq {seq} comes after seq {last.seq} (expected seq {want})",
        )

    def bad_file_link(self, rec: _Rec, last: _Rec, prev_file: tuple[str, int, _Rec]) -> Problem:
        path, last_line, file_last = prev_file
        seq, want = rec.seq, last.seq + 1
        rotated = file_last.event == ROTATE_EVENT
        if not rotated and seq > want:
            missing = seq - want
            return Problem(
                Kind.TRUNCATED,
                path,
                last_line + 1,
                f"the file ends early: {missing} record{'s' if missing > 1 else ''} "
                f"(seq {want}..{seq - 1}) and its {ROTATE_EVENT} record are missing",
            )
        if rotated and seq > want and rec.event != START_EVENT:
            return Problem(
                Kind.DELETED,
                rec.path,
                rec.line,
                f"the file does not begin with an {START_EVENT} record: "
                f"its first records (seq {want}..{seq - 1}) were removed",
            )
        return Problem(
            Kind.OUT_OF_ORDER,
            rec.path,
            rec.line,
            f"this file starts at seq {seq} but {path} ends at seq {last.seq}: "
            "the files are out of order, or one is missing",
        )


def verify(
    paths: Sequence[str],
    *,
    key: bytes | None,
    strict: bool = True,
    checkpoints: Sequence[Checkpoint] = (),
) -> VerifyReport:
    """Verify the trail in *paths* (oldest first); report the first problem.

    *key*: the HMAC key, if the trail is keyed.  *checkpoints*: records known
    from elsewhere that the trail must contain.

    *strict* (the default, and what ``popguard audit verify`` always does):
    every line must be exactly what popguard's writer wrote,
    :func:`~popguard.trail.chain.render` of its record followed by a
    newline, so that any byte change at all is found.  ``strict=False`` only
    checks the records' *values*, for trails whose lines another JSON
    renderer wrote from :meth:`~popguard.trail.chain.Chain.seal`'d records:
    a respelling that keeps every value (``\\u00e9`` for ``\\u00E9``,
    another key order, a missing final newline) then goes unnoticed.  A
    repeated key is refused either way (``duplicate_key``).

    Reads each file once, line by line; memory does not grow with the size
    of the trail.  ``OSError`` for a file that cannot be read.
    """
    return _Verifier(key, strict, checkpoints).run(paths)
