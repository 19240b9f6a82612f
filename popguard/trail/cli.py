"""``popguard audit verify|query|report``: the audit trail tools.

The main CLI mounts them with ``add_audit_commands(commands)`` and calls
``args.func(args)``; standalone: ``python -m popguard.trail.cli audit ...``.

Exit status: 0 success (verify: the trail is intact), 1 verify (or
``report --html``) found tampering or damage (``verify --retention``: or a
deletion under retention without its intact copy), or query/report met a line
with a duplicate key (an edited line whose meaning depends on the JSON
reader: it is left out of the results, and named on stderr), 2 usage or I/O
error (including a key file that is missing, too short or readable by
others, and an HMAC-sealed trail given to verify without a key; ``report
--html`` writes its page all the same, marked "not verified").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

from popguard.retention.store import RetentionError
from popguard.trail.chain import ALG_SHA256, KeyFileError, load_key
from popguard.trail.html import build_page
from popguard.trail.query import (
    ClientMatcher,
    Filter,
    parse_digest,
    query,
    write_json,
    write_table,
)
from popguard.trail.reader import SkipLog, order_rotated, parse_time
from popguard.trail.report import Unusable, build_report
from popguard.trail.report import write_json as write_report_json
from popguard.trail.report import write_table as write_report_table
from popguard.trail.retention import RetentionSummary, check_retention
from popguard.trail.verify import Checkpoint, Kind, VerifyReport, verify

__all__ = ["add_audit_commands", "cmd_query", "cmd_report", "cmd_verify", "main"]

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
#: ``verify --retention --format json`` lists at most this many problems
#: (all are counted); the text format streams every one.
MAX_JSON_PROBLEMS = 1000

_T = TypeVar("_T")


def _argtype(parse: Callable[[str], _T], what: str) -> Callable[[str], _T]:
    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid {what}: {exc}") from None

    convert.__name__ = what  # argparse names the type in its messages
    return convert


def _add_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="audit files, plain or .gz; rotated files are put oldest first "
        "(audit.jsonl.2.gz audit.jsonl.1 audit.jsonl)",
    )
    parser.add_argument(
        "--as-given",
        action="store_true",
        help="read the files in the order given instead of sorting rotated names",
    )


def _add_period(parser: argparse.ArgumentParser) -> None:
    when = _argtype(parse_time, "time")
    parser.add_argument(
        "--since",
        type=when,
        metavar="ISO",
        help="records at or after this time (2026-11-26, 2026-11-26T08:00Z; UTC if no offset)",
    )
    parser.add_argument(
        "--until", type=when, metavar="ISO", help="records before this time (exclusive)"
    )


def _add_key(parser: argparse.ArgumentParser, *, purpose: str = "") -> None:
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"the HMAC key the trail was sealed with (mode 600 or 640){purpose}",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        type=_argtype(Checkpoint.parse, "checkpoint"),
        metavar="CHAIN:SEQ:HASH",
        help="a record known from elsewhere (an earlier verify, a copy shipped off-host) "
        f"that the trail must still contain; repeatable{purpose}",
    )


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify|query|report``; each sets ``func(args) -> int``."""
    audit = subparsers.add_parser(
        "audit",
        help="verify, search and summarise audit trails",
        description="Tools for popguard's JSON-lines audit trail: verify its hash chain, "
        "query records, report activity per user and day.",
    )
    commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify_parser = commands.add_parser(
        "verify",
        help="check the hash chain; report the first problem",
        description="Verify the hash chain over the files (oldest first) and report the "
        "first problem as FILE:LINE: KIND: DETAIL. With --retention DIR, then every "
        "problem with the archived copies. Exit 0 intact, 1 tampering or damage "
        "found, 2 usage or I/O error.",
    )
    _add_files(verify_parser)
    _add_key(verify_parser)
    verify_parser.add_argument(
        "--strict",
        action="store_true",
        help="accepted for compatibility: verify always requires every line byte for "
        "byte as popguard writes it (chain.render()); this flag changes nothing",
    )
    verify_parser.add_argument(
        "--retention",
        metavar="DIR",
        help="also check the retention store DIR once the chain verifies: every deletion "
        "committed under retention has its archived copy, and every copy the trail names "
        "is there with the SHA-256 the trail records (docs/retention.md)",
    )
    verify_parser.add_argument("--format", choices=("text", "json"), default="text")
    verify_parser.set_defaults(func=cmd_verify)

    query_parser = commands.add_parser(
        "query",
        help="print the records that match",
        description="Stream records from the files (oldest first) and print those that "
        "match every flag given; a flag given several times matches any of its values.",
    )
    _add_files(query_parser)
    query_parser.add_argument(
        "--user", action="append", default=[], metavar="USER", help="the user, exactly"
    )
    query_parser.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="EVENT",
        help="the event name; globs allowed ('deletions.*')",
    )
    query_parser.add_argument(
        "--uidl",
        action="append",
        default=[],
        metavar="UIDL",
        help="a message's UIDL (in uidl, or in any entry of messages)",
    )
    query_parser.add_argument(
        "--digest",
        action="append",
        default=[],
        type=_argtype(parse_digest, "digest"),
        metavar="HEX",
        help="a message's SHA-256, 64 hex digits (in digest, or in any entry of messages)",
    )
    query_parser.add_argument(
        "--client",
        action="append",
        default=[],
        type=_argtype(ClientMatcher.parse, "client"),
        metavar="ADDR|CIDR",
        help="the client address (192.0.2.7, 2001:db8::/32, 192.0.2.7:50123)",
    )
    query_parser.add_argument(
        "--session", action="append", default=[], metavar="ID", help="the session id"
    )
    _add_period(query_parser)
    query_parser.add_argument("--format", choices=("json", "table"), default="json")
    query_parser.set_defaults(func=cmd_query)

    report_parser = commands.add_parser(
        "report",
        help="logins, retrievals and deletions per user and UTC day",
        description="Count, per user and UTC day: logins, failed logins, messages "
        "retrieved, deletions committed, deletions discarded and policy denials. "
        "--html writes a self-contained compliance report instead: the chain "
        "verified, charts per day, a table per user, every deletion.",
    )
    _add_files(report_parser)
    _add_period(report_parser)
    report_parser.add_argument(
        "--user", action="append", default=[], metavar="USER", help="the user, exactly"
    )
    output = report_parser.add_mutually_exclusive_group()
    output.add_argument("--format", choices=("table", "json"), default="table")
    output.add_argument(
        "--html",
        metavar="OUT",
        help="write the compliance report to OUT (one HTML file, no external assets); "
        "exit 1 if the chain is found tampered or damaged",
    )
    _add_key(report_parser, purpose=" (with --html, to verify the chain)")
    report_parser.set_defaults(func=cmd_report)


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


def _files(args: argparse.Namespace) -> list[str]:
    """The files in reading order; each opened once so a bad name fails first."""
    files: list[str] = list(args.files)
    for path in files:
        with open(path, "rb"):
            pass
    return files if args.as_given else order_rotated(files)


def _error(command: str, message: str) -> int:
    print(f"popguard audit {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _io_error(command: str, exc: OSError) -> int:
    where = f"{exc.filename}: " if exc.filename else ""
    return _error(command, f"{where}{exc.strerror or exc}")


def _warn_skipped(command: str, skips: SkipLog) -> int:
    """Name the skipped lines on stderr; the exit status they call for.

    A line with a duplicate key is status 1: it was edited (no writer makes
    one), and another reader could take its other value, so the results
    given without it must not pass for complete.
    """
    if not skips.count:
        return EXIT_OK
    for item in skips.samples:
        print(f"popguard audit {command}: skipped {item}", file=sys.stderr)
    if skips.count > len(skips.samples):
        more = skips.count - len(skips.samples)
        print(f"popguard audit {command}: ... and {more} more", file=sys.stderr)
    if not skips.ambiguous:
        return EXIT_OK
    lines = "1 line" if skips.ambiguous == 1 else f"{skips.ambiguous} lines"
    print(
        f"popguard audit {command}: {lines} with a duplicate key left out: such a line "
        "was edited, and JSON readers disagree on its values; run popguard audit verify",
        file=sys.stderr,
    )
    return EXIT_TAMPERED


def _stdout_gone() -> int:
    """The reader went away (``| head``): stop quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = _key(args)
    except KeyFileError as exc:
        return _error("verify", str(exc))
    try:
        files = _files(args)
        # Always strict (exact bytes); --strict is kept as a no-op.
        report = verify(files, key=key, strict=True, checkpoints=args.checkpoint)
    except OSError as exc:
        return _io_error("verify", exc)
    if report.exit_status == EXIT_USAGE:
        assert report.problem is not None
        return _error("verify", str(report.problem))
    if args.retention is not None and report.ok:
        return _verify_retention(args, files, report)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_verify(report, sys.stdout)
    return report.exit_status


def _verify_retention(args: argparse.Namespace, files: list[str], report: VerifyReport) -> int:
    """``verify --retention DIR`` once the chain verified: check the store too.

    Text output streams one ``FAIL FILE:LINE: KIND: DETAIL`` line per
    problem after the chain's report; JSON adds a ``retention`` object.
    Only a chain that verified is checked against the store: the records
    of a tampered trail prove nothing.
    """
    if not os.path.isdir(args.retention):
        return _error("verify", f"{args.retention}: the retention store is not a directory")
    summary = RetentionSummary()
    problems: list[dict[str, Any]] = []
    text = args.format == "text"
    if text:
        _print_verify(report, sys.stdout)
    try:
        for problem in check_retention(files, args.retention, summary):
            if text:
                sys.stdout.write(f"FAIL {problem}\n")
            elif len(problems) < MAX_JSON_PROBLEMS:
                problems.append(
                    {
                        "kind": str(problem.kind),
                        "file": problem.file,
                        "line": problem.line,
                        "detail": problem.detail,
                    }
                )
    except RetentionError as exc:
        return _error("verify", f"{args.retention}: {exc.reason}")
    except OSError as exc:
        return _io_error("verify", exc)
    if text:
        verdict = "OK" if not summary.problems else "FAIL"
        sys.stdout.write(
            f"retention {verdict}: {summary.sessions} sessions under retention, "
            f"{summary.deletions} committed deletions, {summary.archived} archive records, "
            f"{summary.copies_read} copies read, {summary.problems} problems\n"
        )
    else:
        document = report.to_json()
        document["retention"] = {
            "ok": not summary.problems,
            **summary.to_json(),
            "details": problems,
        }
        document["ok"] = report.ok and not summary.problems
        print(json.dumps(document, indent=2))
    return EXIT_TAMPERED if summary.problems else EXIT_OK


def _key(args: argparse.Namespace) -> bytes | None:
    """The ``--key-file`` key, if one was given (``KeyFileError`` otherwise)."""
    return load_key(args.key_file) if args.key_file else None


def _print_verify(report: VerifyReport, out: TextIO) -> None:
    files = f"{report.files} file{'s' if report.files != 1 else ''}"
    if report.problem is not None:
        out.write(f"FAIL {report.problem}\n")
        out.write(f"({report.records} records verified before it, in {files})\n")
        return
    out.write(f"OK {report.records} records in {files}\n")
    for chain in report.chains:
        start = (
            "from its first record"
            if chain.from_genesis
            else f"continuing seq {chain.first_seq - 1} (older files not given)"
        )
        writer = ""
        if chain.worker is not None:
            writer = "supervisor, " if chain.worker == 0 else f"worker {chain.worker}, "
        out.write(
            f"chain {chain.chain_id} ({writer}{chain.alg}): "
            f"seq {chain.first_seq}..{chain.last_seq}, {start}\n"
        )
        out.write(f"checkpoint: {chain.checkpoint}\n")
        if chain.alg == ALG_SHA256:
            out.write(
                f"note: chain {chain.chain_id} is sealed without a key: anyone who can "
                "write the files can rewrite it whole; compare the checkpoint with a "
                "copy kept elsewhere\n"
            )
    for note in report.notes:
        out.write(f"note: {note}\n")


def _filter(args: argparse.Namespace) -> Filter:
    return Filter(
        users=tuple(args.user),
        events=tuple(args.event),
        uidls=tuple(args.uidl),
        digests=tuple(args.digest),
        clients=tuple(args.client),
        sessions=tuple(args.session),
        since=args.since,
        until=args.until,
    )


def cmd_query(args: argparse.Namespace) -> int:
    skips = SkipLog()
    try:
        rows = query(_files(args), _filter(args), skips=skips)
        if args.format == "table":
            write_table(rows, sys.stdout)
        else:
            write_json(rows, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as exc:
        return _io_error("query", exc)
    return _warn_skipped("query", skips)


def cmd_report(args: argparse.Namespace) -> int:
    if args.html is not None:
        return _report_html(args)
    if args.key_file or args.checkpoint:
        return _error("report", "--key-file and --checkpoint need --html")
    skips = SkipLog()
    undated = Unusable()
    try:
        report = build_report(
            _files(args),
            since=args.since,
            until=args.until,
            users=frozenset(args.user),
            skips=skips,
            undated=undated,
        )
    except OSError as exc:
        return _io_error("report", exc)
    try:
        if args.format == "json":
            write_report_json(report, sys.stdout)
        else:
            write_report_table(report, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_gone()
    status = _warn_skipped("report", skips)
    if undated.count:
        print(
            f"popguard audit report: {undated.count} records without a usable timestamp "
            "were not counted",
            file=sys.stderr,
        )
    return status


def _report_html(args: argparse.Namespace) -> int:
    """``report --html OUT``: verify, count, and write the page (atomically)."""
    try:
        key = _key(args)
    except KeyFileError as exc:
        return _error("report", str(exc))
    skips = SkipLog()
    target = os.path.abspath(args.html)
    try:
        files = _files(args)
        # Written next to OUT, then renamed: a failed run leaves no half page.
        # Mode 600, as tempfile makes it: the page names users.
        with tempfile.NamedTemporaryFile(
            "w",
            encoding="utf-8",
            dir=os.path.dirname(target),
            prefix=f".{os.path.basename(target)}.",
            suffix=".tmp",
            delete=False,
        ) as out:
            try:
                built = build_page(
                    files,
                    out,
                    key=key,
                    checkpoints=args.checkpoint,
                    since=args.since,
                    until=args.until,
                    users=frozenset(args.user),
                    skips=skips,
                    generated=datetime.datetime.now(datetime.UTC),
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(out.name)
                raise
        os.replace(out.name, target)
    except OSError as exc:
        return _io_error("report", exc)
    status = _warn_skipped("report", skips)
    problem = built.verification.problem
    if built.undated:
        print(
            f"popguard audit report: {built.undated} records without a usable timestamp "
            "were not counted",
            file=sys.stderr,
        )
    if problem is None:
        return status
    if problem.kind is Kind.KEY_REQUIRED:
        print(
            "popguard audit report: the chain is not verified (HMAC-sealed; give "
            "--key-file); the report says so",
            file=sys.stderr,
        )
        return status
    print(f"popguard audit report: chain verification FAILED: {problem}", file=sys.stderr)
    return EXIT_TAMPERED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popguard")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_audit_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
