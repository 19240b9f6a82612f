"""``popguard audit verify --retention DIR``: the trail's claims about the archive hold."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from trail_helpers import T0, read_lines, seal_lines, stamp, write_lines

from popguard.retention.store import Archived, RetentionStore
from popguard.trail.chain import Chain
from popguard.trail.cli import main
from popguard.trail.retention import RetentionSummary, check_retention
from popguard.trail.verify import Kind

Capture = pytest.CaptureFixture[str]

MESSAGES = {
    1: b"Subject: one\r\n\r\nfirst\r\n",
    2: b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n",
}
OTHER = b"Subject: bob's\r\n\r\nnot retained\r\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_copy(store: RetentionStore, account: str, uidl: str, data: bytes) -> Archived:
    writer = store.open(account, uidl)
    writer.write(data)
    return writer.commit(sha(data), len(data))


class Scenario:
    """A retained session of alice (two messages archived and deleted), and a
    session of bob without retention, sealed into one trail file."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "retention"
        self.store = RetentionStore(self.root)
        self.archived = {
            msg: store_copy(self.store, "alice", f"UID-{msg}", data)
            for msg, data in MESSAGES.items()
        }
        self.trail = tmp_path / "audit.jsonl"
        self.records: list[dict[str, Any]] = []
        self._when = T0

    def add(self, event: str, session: str, **fields: Any) -> None:
        self._when = self._when.replace(second=(self._when.second + 1) % 60)
        self.records.append(
            {
                "event": event,
                "timestamp": stamp(self._when),
                "level": "info",
                "session": session,
                **fields,
            }
        )

    def entry(self, msg: int) -> dict[str, Any]:
        data = MESSAGES[msg]
        return {
            "msg": msg,
            "uidl": f"UID-{msg}",
            "size": len(data),
            "digest": sha(data),
            "archived": self.archived[msg].path,
        }

    def standard(self) -> Scenario:
        self.add("session.opened", "s1", client="192.0.2.1:5000", listener="pop3")
        self.add("auth.succeeded", "s1", user="alice", mechanism="USER")
        self.add("retention.active", "s1", user="alice")
        for msg in MESSAGES:
            entry = self.entry(msg)
            self.add(
                "message.archived",
                "s1",
                user="alice",
                msg=msg,
                uidl=entry["uidl"],
                size=entry["size"],
                digest=entry["digest"],
                path=entry["archived"],
                stored=True,
            )
            self.add("dele.marked", "s1", user="alice", **entry)
        self.add("deletions.committed", "s1", user="alice", messages=[self.entry(1), self.entry(2)])
        self.add("session.closed", "s1", user="alice", reason="quit")
        # No retain policy for bob: his deletion names no copy, and that is fine.
        self.add("auth.succeeded", "s2", user="bob", mechanism="USER")
        self.add(
            "deletions.committed",
            "s2",
            user="bob",
            messages=[{"msg": 1, "uidl": "B1", "size": len(OTHER), "digest": sha(OTHER)}],
        )
        self.add("session.closed", "s2", user="bob", reason="quit")
        return self

    def write(self) -> list[str]:
        write_lines(self.trail, seal_lines(Chain(chain_id="w1"), self.records))
        return [str(self.trail)]

    def line_of(self, event: str, session: str = "s1", nth: int = 0) -> int:
        """The 1-based line of the *nth* *event* of *session* (the start record is line 1)."""
        found = [
            number
            for number, text in enumerate(read_lines(self.trail), start=1)
            if json.loads(text).get("event") == event and json.loads(text).get("session") == session
        ]
        return found[nth]


def run(args: list[str], capsys: Capture) -> tuple[int, str, str]:
    status = main(["audit", "verify", *args])
    out, err = capsys.readouterr()
    return status, out, err


def problems(files: list[str], root: Path) -> list[tuple[Kind, str, int]]:
    summary = RetentionSummary()
    return [(p.kind, p.file, p.line) for p in check_retention(files, root, summary)]


def test_an_intact_archive_verifies(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 0, out
    assert out.startswith(f"OK {len(scenario.records) + 1} records in 1 file\n")
    assert out.splitlines()[-1] == (
        "retention OK: 1 sessions under retention, 2 committed deletions, "
        "2 archive records, 2 copies read, 0 problems"
    )
    assert "FAIL" not in out


def test_a_missing_copy_is_found_at_every_record_that_names_it(
    tmp_path: Path, capsys: Capture
) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    os.unlink(scenario.root / scenario.archived[2].path)
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 1
    archived_line = scenario.line_of("message.archived", nth=1)
    committed_line = scenario.line_of("deletions.committed")
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails == [
        f"FAIL {files[0]}:{archived_line}: missing_copy: the archived message: its copy "
        f"'{scenario.archived[2].path}' is not in the retention store",
        f"FAIL {files[0]}:{committed_line}: missing_copy: message 2 (uidl 'UID-2'): its copy "
        f"'{scenario.archived[2].path}' is not in the retention store",
    ]
    assert out.splitlines()[-1].startswith("retention FAIL: ")
    assert out.splitlines()[-1].endswith(", 2 problems")


def test_a_changed_copy_is_found(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    copy = scenario.root / scenario.archived[1].path
    copy.write_bytes(copy.read_bytes().replace(b"first", b"forst"))
    assert problems(files, scenario.root) == [
        (Kind.CHANGED_COPY, files[0], scenario.line_of("message.archived", nth=0)),
        (Kind.CHANGED_COPY, files[0], scenario.line_of("deletions.committed")),
    ]
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 1
    assert f"has SHA-256 {sha(copy.read_bytes())}, the record says {sha(MESSAGES[1])}" in out


def test_a_deletion_without_its_archived_copy_is_found(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    committed = next(r for r in scenario.records if r["event"] == "deletions.committed")
    del committed["messages"][1]["archived"]
    files = scenario.write()
    line = scenario.line_of("deletions.committed")
    assert problems(files, scenario.root) == [(Kind.NOT_ARCHIVED, files[0], line)]
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 1
    assert (
        f"FAIL {files[0]}:{line}: not_archived: message 2 (uidl 'UID-2') was deleted under "
        "retention, and the record names no archived copy"
    ) in out.splitlines()


def test_a_deletion_without_digest_cannot_be_proved(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path).standard()
    committed = next(r for r in scenario.records if r["event"] == "deletions.committed")
    del committed["messages"][0]["digest"]
    files = scenario.write()
    assert problems(files, scenario.root) == [
        (Kind.NOT_ARCHIVED, files[0], scenario.line_of("deletions.committed"))
    ]


def test_without_retention_active_deletions_need_no_copy(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path).standard()
    scenario.records = [r for r in scenario.records if r["event"] != "retention.active"]
    committed = next(r for r in scenario.records if r["event"] == "deletions.committed")
    for entry in committed["messages"]:
        del entry["archived"]
    files = scenario.write()
    summary = RetentionSummary()
    assert list(check_retention(files, scenario.root, summary)) == []
    assert summary.sessions == 0
    assert summary.deletions == 0
    assert summary.archived == 2  # message.archived records are checked regardless


def test_a_copy_filed_under_another_account_is_found(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path).standard()
    bobs = store_copy(scenario.store, "bob", "UID-1", MESSAGES[1])
    committed = next(r for r in scenario.records if r["event"] == "deletions.committed")
    committed["messages"][0]["archived"] = bobs.path
    files = scenario.write()
    assert problems(files, scenario.root) == [
        (Kind.MISPLACED_COPY, files[0], scenario.line_of("deletions.committed"))
    ]


def test_a_path_outside_the_store_is_a_missing_copy(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path).standard()
    outside = tmp_path / "outside.eml"
    outside.write_bytes(MESSAGES[1])
    archived = next(r for r in scenario.records if r["event"] == "message.archived")
    archived["path"] = "alice/new/../../../outside.eml"
    files = scenario.write()
    assert problems(files, scenario.root) == [
        (Kind.MISSING_COPY, files[0], scenario.line_of("message.archived"))
    ]


def test_copies_a_reader_moved_to_cur_still_verify(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    for archived in scenario.archived.values():
        name = archived.path.rsplit("/", 1)[1]
        os.rename(scenario.root / archived.path, scenario.root / "alice" / "cur" / f"{name}:2,S")
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 0, out


def test_retention_spans_rotated_files(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path).standard()
    chain = Chain(chain_id="w1")
    split = 5  # retention.active in the older file, the deletions in the newer
    older = write_lines(
        tmp_path / "audit.jsonl.1",
        seal_lines(chain, scenario.records[:split], rotate_to="audit.jsonl"),
    )
    newer = write_lines(
        tmp_path / "audit.jsonl", seal_lines(chain, scenario.records[split:], start="rotate")
    )
    os.unlink(scenario.root / scenario.archived[1].path)
    found = problems([str(older), str(newer)], scenario.root)
    assert [(kind, Path(path).name) for kind, path, _line in found] == [
        (Kind.MISSING_COPY, "audit.jsonl.1"),  # its message.archived
        (Kind.MISSING_COPY, "audit.jsonl"),  # the deletions.committed
    ]
    # Given only the newer file, the session is not known to be retained:
    # only the message.archived records in it are checked.
    summary = RetentionSummary()
    assert list(check_retention([str(newer)], scenario.root, summary)) == []
    assert summary.sessions == 0


def test_a_tampered_chain_is_reported_before_any_retention_check(
    tmp_path: Path, capsys: Capture
) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    lines = read_lines(scenario.trail)
    lines[3] = lines[3].replace('"alice"', '"mallory"')
    write_lines(scenario.trail, lines)
    os.unlink(scenario.root / scenario.archived[1].path)
    status, out, _err = run(["--retention", str(scenario.root), *files], capsys)
    assert status == 1
    assert out.startswith(f"FAIL {files[0]}:4: altered: ")
    assert "retention" not in out
    assert "missing_copy" not in out


def test_without_the_flag_verify_does_not_look_at_the_archive(
    tmp_path: Path, capsys: Capture
) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    os.unlink(scenario.root / scenario.archived[1].path)
    status, out, _err = run(files, capsys)
    assert status == 0
    assert out.startswith(f"OK {len(scenario.records) + 1} records in 1 file\n")
    assert "retention" not in out


def test_json_output(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    os.unlink(scenario.root / scenario.archived[2].path)
    status, out, _err = run(["--format", "json", "--retention", str(scenario.root), *files], capsys)
    assert status == 1
    document = json.loads(out)
    assert document["ok"] is False
    assert document["problem"] is None  # the chain itself is intact
    retention = document["retention"]
    assert retention["ok"] is False
    assert retention["sessions"] == 1
    assert retention["deletions"] == 2
    assert retention["problems"] == 2
    assert [(d["kind"], d["line"]) for d in retention["details"]] == [
        ("missing_copy", scenario.line_of("message.archived", nth=1)),
        ("missing_copy", scenario.line_of("deletions.committed")),
    ]


def test_a_missing_store_is_a_usage_error(tmp_path: Path, capsys: Capture) -> None:
    scenario = Scenario(tmp_path).standard()
    files = scenario.write()
    status, out, err = run(["--retention", str(tmp_path / "nowhere"), *files], capsys)
    assert status == 2
    assert "not a directory" in err
    assert not (tmp_path / "nowhere").exists()
    assert out == ""
