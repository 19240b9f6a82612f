"""verify(): intact trails pass; each kind of tampering is found, with its line."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from trail_helpers import (
    KEY,
    read_lines,
    rotated_trail,
    seal_lines,
    session_records,
    sink_style,
    structlog_style,
    write_lines,
)

from popguard.trail.chain import Chain, canonical, render
from popguard.trail.verify import Checkpoint, Kind, VerifyReport, order_rotated, verify

OTHER_KEY = b"not-the-key-not-the-key-not-the-key!"


def one_file(
    tmp_path: Path, n: int = 50, *, key: bytes | None = None, renderer=render
) -> tuple[Path, list[str]]:
    path = tmp_path / "audit.jsonl"
    lines = seal_lines(Chain(key=key, chain_id="w1"), session_records(n), renderer=renderer)
    write_lines(path, lines)
    return path, lines


def check(paths: list[Path] | Path, *, key: bytes | None = None, **kwargs: object) -> VerifyReport:
    if isinstance(paths, Path):
        paths = [paths]
    return verify([str(p) for p in paths], key=key, **kwargs)  # type: ignore[arg-type]


def expect(report: VerifyReport, kind: Kind, path: Path, line: int) -> None:
    assert report.problem is not None, "tampering not detected"
    assert (report.problem.kind, report.problem.file, report.problem.line) == (
        kind,
        str(path),
        line,
    ), str(report.problem)
    assert report.exit_status == 1


def reseal(line: str, key: bytes | None = None, **changes: object) -> str:
    """What an attacker without the key can do: edit, then recompute plain sha256
    (and write the line the way popguard does, so only the chain can tell)."""
    record = json.loads(line)
    record.update(changes)
    record["alg"] = "sha256"
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    return render(record)


# --------------------------------------------------------------------------
# Intact trails
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
@pytest.mark.parametrize(
    "renderer", [render, sink_style, structlog_style], ids=["render", "sink", "structlog"]
)
def test_a_long_chain_verifies(tmp_path: Path, key: bytes | None, renderer) -> None:
    path, lines = one_file(tmp_path, 5000, key=key, renderer=renderer)
    # Lines another renderer wrote verify on their values only (strict=False).
    report = check(path, key=key, strict=renderer is render)
    assert report.ok, report.problem
    assert report.exit_status == 0
    assert report.records == 5001
    (summary,) = report.chains
    assert (summary.chain_id, summary.first_seq, summary.last_seq) == ("w1", 1, 5001)
    assert summary.from_genesis
    assert summary.last_hash == json.loads(lines[-1])["hash"]
    assert str(summary.checkpoint) == f"w1:5001:{summary.last_hash}"


def test_render_lines_verify_and_other_renderings_only_on_their_values(tmp_path: Path) -> None:
    path, _ = one_file(tmp_path, 20)
    assert check(path).ok
    assert check(path, strict=True).ok
    path, _ = one_file(tmp_path, 20, renderer=sink_style)
    expect(check(path), Kind.NONCANONICAL, path, 1)  # strict is the default
    expect(check(path, strict=True), Kind.NONCANONICAL, path, 1)
    assert check(path, strict=False).ok


def test_rotation_across_three_files_one_gzipped(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path, key=KEY)
    assert paths[0].name == "audit.jsonl.2.gz"
    with gzip.open(paths[0]) as f:
        assert f.readline().startswith(b"{")
    report = check(paths, key=KEY, strict=True)
    assert report.ok, report.problem
    assert report.records == 3 * 20 + 3 + 2  # records, start records, rotate records
    assert report.chains[0].files == [str(p) for p in paths]


def test_newest_file_alone_verifies_and_says_where_it_starts(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    report = check(paths[-1:])
    assert report.ok, report.problem
    (summary,) = report.chains
    assert not summary.from_genesis
    assert summary.first_seq == 45  # after two files of start + 20 + rotate


def test_older_files_alone_note_the_missing_newer_file(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    report = check(paths[:2])
    assert report.ok, report.problem
    assert any("rotation" in note for note in report.notes)


def test_empty_files_are_transparent(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert check([paths[0], empty, paths[1], paths[2], empty]).ok


def test_several_chains_are_verified_each_on_its_own(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in "abc"}
    for directory in dirs.values():
        directory.mkdir()
    a = rotated_trail(dirs["a"], chain_id="A")
    b = rotated_trail(dirs["b"], chain_id="B", key=KEY)
    c = rotated_trail(dirs["c"], chain_id="C")

    report = check([a[0], c[0], a[1], c[1], a[2], c[2]])
    assert report.ok, report.problem
    assert [s.chain_id for s in report.chains] == ["A", "C"]
    assert report.records == 2 * 65

    # B is keyed: with no key that is a usage error, not tampering.
    report = check([a[0], b[0], a[1], b[1], a[2], b[2]])
    assert report.problem is not None
    assert report.problem.kind is Kind.KEY_REQUIRED
    assert report.exit_status == 2


# --------------------------------------------------------------------------
# Tampering within a file
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_an_edited_field_is_found(tmp_path: Path, key: bytes | None) -> None:
    path, lines = one_file(tmp_path, key=key)
    record = json.loads(lines[9])
    record["user"] = "mallory"
    lines[9] = render(record)
    write_lines(path, lines)
    expect(check(path, key=key), Kind.ALTERED, path, 10)


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_a_deleted_line_is_found(tmp_path: Path, key: bytes | None) -> None:
    path, lines = one_file(tmp_path, key=key)
    del lines[20]
    write_lines(path, lines)
    report = check(path, key=key)
    expect(report, Kind.DELETED, path, 21)
    assert "seq 21" in report.problem.detail  # type: ignore[union-attr]


def test_several_deleted_lines_are_counted(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    del lines[20:25]
    write_lines(path, lines)
    report = check(path)
    expect(report, Kind.DELETED, path, 21)
    assert "5 records missing" in report.problem.detail  # type: ignore[union-attr]


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_two_swapped_lines_are_found(tmp_path: Path, key: bytes | None) -> None:
    path, lines = one_file(tmp_path, key=key)
    lines[30], lines[31] = lines[31], lines[30]
    write_lines(path, lines)
    expect(check(path, key=key), Kind.REORDERED, path, 31)


def test_a_line_moved_back_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    moved = lines.pop(10)
    lines.insert(30, moved)
    write_lines(path, lines)
    report = check(path)
    assert report.problem is not None
    assert report.problem.line == 11


def test_swapping_the_first_two_lines_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    lines[0], lines[1] = lines[1], lines[0]
    write_lines(path, lines)
    expect(check(path), Kind.REORDERED, path, 1)


def test_a_duplicated_line_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    lines.insert(15, lines[14])
    write_lines(path, lines)
    expect(check(path), Kind.INSERTED, path, 16)


def test_forged_plain_sha256_line_in_a_keyed_chain_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path, key=KEY)
    before = json.loads(lines[11])
    forged = {
        "event": "deletions.committed",
        "user": "alice",
        "messages": [{"msg": 1, "uidl": "x", "size": 1}],
        "chain": before["chain"],
        "seq": before["seq"] + 1,
        "prev": before["hash"],
        "alg": "hmac-sha256",  # claims HMAC; the forger can only compute sha256
    }
    forged["hash"] = hashlib.sha256(canonical(forged)).hexdigest()
    lines.insert(12, json.dumps(forged))
    write_lines(path, lines)
    expect(check(path, key=KEY), Kind.INSERTED, path, 13)

    forged["alg"] = "sha256"  # the honest downgrade is found just the same
    forged["hash"] = hashlib.sha256(canonical(forged)).hexdigest()
    lines[12] = json.dumps(forged)
    write_lines(path, lines)
    expect(check(path, key=KEY), Kind.INSERTED, path, 13)


def test_forged_line_appended_to_a_keyed_chain_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path, key=KEY)
    last = json.loads(lines[-1])
    forged = {"event": "x", "chain": "w1", "seq": last["seq"] + 1, "prev": last["hash"]}
    lines.append(reseal(json.dumps(forged)))
    write_lines(path, lines)
    expect(check(path, key=KEY), Kind.INSERTED, path, len(lines))


def test_keyed_chain_rewritten_from_a_point_is_found(tmp_path: Path) -> None:
    """A forger without the key re-seals everything after an edit: still caught."""
    path, lines = one_file(tmp_path, key=KEY)
    chain = Chain(chain_id="w1", prev=json.loads(lines[19])["hash"], seq=20)
    rewritten = []
    for line in lines[20:]:
        record = json.loads(line)
        for field in ("chain", "seq", "prev", "alg", "hash"):
            record.pop(field)
        record["user"] = "mallory"
        rewritten.append(render(chain.seal(record)))
    write_lines(path, lines[:20] + rewritten)
    report = check(path, key=KEY)
    expect(report, Kind.ALTERED, path, 21)
    assert "plain sha256" in report.problem.detail  # type: ignore[union-attr]


def test_unkeyed_chain_insertion_with_recomputed_hash_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    before = json.loads(lines[11])
    forged = {"event": "x", "chain": "w1", "seq": before["seq"] + 1, "prev": before["hash"]}
    lines.insert(12, reseal(json.dumps(forged)))
    write_lines(path, lines)
    expect(check(path), Kind.INSERTED, path, 13)


def test_unkeyed_chain_edit_with_recomputed_hash_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    lines[11] = reseal(lines[11], user="mallory")
    write_lines(path, lines)
    expect(check(path), Kind.ALTERED, path, 12)


def test_a_second_record_with_the_same_seq_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    last = json.loads(lines[11])
    forged = {"event": "x", "chain": "w1", "seq": last["seq"], "prev": last["hash"]}
    lines.insert(12, reseal(json.dumps(forged)))
    write_lines(path, lines)
    report = check(path)
    expect(report, Kind.INSERTED, path, 13)
    assert "second record with seq 12" in report.problem.detail  # type: ignore[union-attr]


def test_truncated_last_line_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    write_lines(path, lines, newline_at_end=False)
    expect(check(path), Kind.TRUNCATED, path, len(lines))


def test_complete_last_line_without_newline_is_truncated(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    write_lines(path, lines, newline_at_end=False)
    report = check(path)
    expect(report, Kind.TRUNCATED, path, len(lines))
    assert "without a newline" in report.problem.detail  # type: ignore[union-attr]
    assert check(path, strict=False).ok  # the values are all there


def test_malformed_blank_and_overlong_lines_are_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    write_lines(path, [*lines[:5], "{not json", *lines[5:]])
    expect(check(path), Kind.MALFORMED, path, 6)
    write_lines(path, [*lines[:5], "", *lines[5:]])
    expect(check(path), Kind.MALFORMED, path, 6)
    write_lines(path, [*lines[:5], "[1, 2]", *lines[5:]])
    expect(check(path), Kind.MALFORMED, path, 6)
    write_lines(path, [*lines[:5], "x" * (2 << 20), *lines[5:]])
    expect(check(path), Kind.MALFORMED, path, 6)
    path.write_bytes(b"\n".join([*(x.encode() for x in lines[:5]), b"\xff\xfe{}", b""]))
    expect(check(path), Kind.MALFORMED, path, 6)


def test_unchained_records_are_reported(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    write_lines(path, [*lines[:7], '{"event": "session.opened", "client": "x"}', *lines[7:]])
    report = check(path)
    expect(report, Kind.UNCHAINED, path, 8)
    assert "session.opened" in report.problem.detail  # type: ignore[union-attr]


def test_invalid_chain_fields_are_altered(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    record = json.loads(lines[3])
    record["seq"] = "4"
    write_lines(path, [*lines[:3], json.dumps(record), *lines[4:]])
    expect(check(path), Kind.ALTERED, path, 4)


def test_a_record_of_another_chain_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    stranger = seal_lines(Chain(chain_id="w2"), session_records(1))[1]
    write_lines(path, [*lines[:10], stranger, *lines[10:]])
    expect(check(path), Kind.MIXED_CHAIN, path, 11)


def test_the_head_of_the_first_file_cut_off_is_found(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    write_lines(path, lines[3:])
    expect(check(path), Kind.DELETED, path, 1)


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def test_wrong_key_is_reported_on_the_first_record(tmp_path: Path) -> None:
    path, _ = one_file(tmp_path, key=KEY)
    report = check(path, key=OTHER_KEY)
    expect(report, Kind.WRONG_KEY, path, 1)


def test_altered_first_record_is_not_mistaken_for_a_wrong_key(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path, key=KEY)
    record = json.loads(lines[0])
    record["reason"] = "other"
    write_lines(path, [render(record), *lines[1:]])
    expect(check(path, key=KEY), Kind.ALTERED, path, 1)


def test_a_key_given_for_an_unkeyed_trail_is_reported(tmp_path: Path) -> None:
    path, _ = one_file(tmp_path)
    expect(check(path, key=KEY), Kind.UNKEYED, path, 1)


def test_a_keyed_trail_without_the_key_is_a_usage_error(tmp_path: Path) -> None:
    path, _ = one_file(tmp_path, key=KEY)
    report = check(path)
    assert report.problem is not None
    assert report.problem.kind is Kind.KEY_REQUIRED
    assert report.exit_status == 2


# --------------------------------------------------------------------------
# Across files
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [(1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1)],
    ids=lambda o: "".join(map(str, o)),
)
def test_files_out_of_order_are_found(tmp_path: Path, order: tuple[int, int, int]) -> None:
    paths = rotated_trail(tmp_path)
    given = [paths[i] for i in order]
    first_break = next(i for i in range(1, 3) if order[i] != order[i - 1] + 1)
    expect(check(given), Kind.OUT_OF_ORDER, given[first_break], 1)


def test_a_missing_middle_file_is_found(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    expect(check([paths[0], paths[2]]), Kind.OUT_OF_ORDER, paths[2], 1)


def test_a_rotated_file_with_its_end_cut_off_is_found(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path, gzip_oldest=False)
    middle = read_lines(paths[1])
    write_lines(paths[1], middle[:-4])  # the rotate record and 3 records before it
    report = check(paths)
    expect(report, Kind.TRUNCATED, paths[1], len(middle) - 3)
    assert "4 records" in report.problem.detail  # type: ignore[union-attr]


def test_a_rotated_file_with_only_its_rotate_record_cut_off_is_found(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path, gzip_oldest=False)
    first = read_lines(paths[0])
    write_lines(paths[0], first[:-1])
    expect(check(paths), Kind.TRUNCATED, paths[0], len(first))


def test_a_later_file_with_its_start_record_removed_is_found(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path, gzip_oldest=False)
    newest = read_lines(paths[2])
    write_lines(paths[2], newest[1:])
    expect(check(paths), Kind.DELETED, paths[2], 1)


def test_a_truncated_gzip_file_is_found(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) - 20])
    report = check(paths)
    assert report.problem is not None
    assert report.problem.kind is Kind.TRUNCATED
    assert report.problem.file == str(paths[0])


def test_checkpoint_catches_the_newest_file_cut_short(tmp_path: Path) -> None:
    """Cutting the tail of the newest file leaves a valid chain; a checkpoint
    taken earlier (and kept elsewhere) still catches it."""
    path, lines = one_file(tmp_path)
    checkpoint = check(path).chains[0].checkpoint
    write_lines(path, lines[:-5])
    assert check(path).ok  # undetectable by the chain alone
    report = check(path, checkpoints=[checkpoint])
    expect(report, Kind.TRUNCATED, path, len(lines) - 4)


def test_checkpoint_catches_a_plain_chain_rewritten_whole(tmp_path: Path) -> None:
    path, lines = one_file(tmp_path)
    middle = json.loads(lines[25])
    checkpoint = Checkpoint("w1", middle["seq"], middle["hash"])
    chain = Chain(chain_id="w1")
    rewritten = []
    for line in lines:
        record = json.loads(line)
        for field in ("chain", "seq", "prev", "alg", "hash"):
            record.pop(field)
        if record.get("user") == "alice":
            record["user"] = "mallory"
        rewritten.append(render(chain.seal(record)))
    write_lines(path, rewritten)
    assert check(path).ok
    expect(check(path, checkpoints=[checkpoint]), Kind.ALTERED, path, 26)


def test_checkpoint_parsing() -> None:
    text = "w1:42:" + "ab" * 32
    assert str(Checkpoint.parse(text)) == text
    assert Checkpoint.parse("with:colon:7:" + "AB" * 32).chain_id == "with:colon"
    for bad in ("w1:x:" + "ab" * 32, "w1:42:abc", "42:" + "ab" * 32, ""):
        with pytest.raises(ValueError, match=r"CHAIN:SEQ:HASH|64 hex"):
            Checkpoint.parse(bad)


def test_report_to_json(tmp_path: Path) -> None:
    path, _ = one_file(tmp_path, 5)
    data = check(path).to_json()
    assert data["ok"] is True
    assert data["records"] == 6
    assert data["chains"][0]["from_genesis"] is True
    json.dumps(data)


# --------------------------------------------------------------------------
# Rotated names
# --------------------------------------------------------------------------


def test_order_rotated_puts_oldest_first() -> None:
    given = [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.10.gz",
        "audit.jsonl.2.gz",
        "w2.jsonl.1",
        "w2.jsonl",
    ]
    assert order_rotated(given) == [
        "audit.jsonl.10.gz",
        "audit.jsonl.2.gz",
        "audit.jsonl.1",
        "audit.jsonl",
        "w2.jsonl.1",
        "w2.jsonl",
    ]
    dated = ["audit.jsonl", "audit.jsonl-20261126", "audit.jsonl-20261124.gz"]
    assert order_rotated(dated) == [
        "audit.jsonl-20261124.gz",
        "audit.jsonl-20261126",
        "audit.jsonl",
    ]
    assert order_rotated(["/var/log/p/audit.jsonl", "/var/log/p/audit.jsonl.1"]) == [
        "/var/log/p/audit.jsonl.1",
        "/var/log/p/audit.jsonl",
    ]
