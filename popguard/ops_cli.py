"""``popguard sessions`` and ``popguard kick``: the live sessions, from the admin listener.

Like Dovecot's ``doveadm who`` and ``doveadm kick``: ``sessions`` prints a
table of the sessions open now (or their JSON), ``kick`` ends sessions by id
or by account.  Both talk HTTP to the admin listener (``GET /sessions``,
``POST /sessions/ID/close``; see ``popguard.shell.admin``), of a single
process or of the supervisor of ``workers: N``, which answers for every
worker.  A kicked session ends *without* QUIT, so the server deletes
nothing; the trail records who asked and why.

Where the admin listener is: ``--admin URL``, else the config's
``admin.listen`` (``-c FILE``), else ``http://127.0.0.1:9110``.  ``--user``
names an account: with ``-c`` it is canonicalised with the config's
``identity:`` rules (``ALICE`` finds alice's sessions on Dovecot's default
rules); without, it must be the account exactly as ``sessions`` shows it.

Exit status: 0 success, 1 the admin listener could not be reached or
answered with an error, a worker did not answer (the list is incomplete),
or ``kick`` found nothing to end; 2 usage or config error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, Final, TextIO

from popguard.config import ConfigError, read_config
from popguard.core.identity import IdentityRules
from popguard.shell.admin import CSRF_HEADER, DEFAULT_ADMIN_ADDRESS

__all__ = ["cmd_kick", "cmd_sessions", "register"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: Seconds to wait for the admin listener (a close waits for the session to
#: end, up to 5 s; a supervisor asks each worker, up to 10 s).
HTTP_TIMEOUT: Final = 30.0

#: The table's columns: heading, and the field it shows.
_COLUMNS: Final = (
    ("ID", "id"),
    ("ACCOUNT", "account"),
    ("STATE", "state"),
    ("CLIENT", "client"),
    ("LISTENER", "listener"),
    ("TLS", "tls"),
    ("SINCE", "since"),
    ("IDLE", "idle_seconds"),
    ("FROM-CLIENT", "bytes_from_client"),
    ("TO-CLIENT", "bytes_to_client"),
    ("MARKED", "marked"),
)
_WORKER_COLUMN: Final = ("WORKER", "worker")


class AdminError(Exception):
    """The admin listener could not be reached, or answered with an error."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sessions`` and ``kick``; each sets ``func(args) -> int``."""
    sessions = commands.add_parser(
        "sessions",
        help="list the live sessions (like doveadm who)",
        description="List the sessions open now, from the admin listener (of the "
        "supervisor, with workers: N). Exit 1 if it cannot be reached or a worker did "
        "not answer.",
    )
    _add_admin_flags(sessions)
    sessions.add_argument("--user", metavar="ACCOUNT", help="only this account's sessions")
    sessions.add_argument("--json", action="store_true", help="print the JSON document")
    sessions.set_defaults(func=cmd_sessions)

    kick = commands.add_parser(
        "kick",
        help="end live sessions without QUIT (like doveadm kick)",
        description="End sessions by id, or every session of an account, without QUIT: "
        "the server deletes nothing (marks are discarded). The audit trail records who "
        "asked (this client's address) and the reason. Exit 1 if nothing was ended.",
    )
    _add_admin_flags(kick)
    kick.add_argument("ids", nargs="*", metavar="ID", help="session ids, as sessions shows")
    kick.add_argument("--user", metavar="ACCOUNT", help="every session of this account")
    kick.add_argument(
        "--reason", metavar="TEXT", help="why, for the audit trail (at most 200 characters)"
    )
    kick.set_defaults(func=cmd_kick)


def _add_admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="URL",
        help="the admin listener, e.g. http://127.0.0.1:9110 (default: the config's "
        "admin.listen with -c, else http://127.0.0.1:9110)",
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="popguard's config: its admin.listen, and identity: rules for --user",
    )


# -- the commands -------------------------------------------------------------


def cmd_sessions(args: argparse.Namespace) -> int:
    try:
        admin, identity = _where(args)
        document = _list(admin, _account(args.user, identity))
    except (AdminError, ConfigError) as exc:
        return _fail(exc)
    if args.json:
        json.dump(document, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        write_table(document.get("sessions", []), sys.stdout)
    return _warn_incomplete(document)


def cmd_kick(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.user):
        print("popguard kick: give session ids or --user, not both", file=sys.stderr)
        return EXIT_USAGE
    try:
        admin, identity = _where(args)
        ids = list(args.ids)
        status = EXIT_OK
        if args.user:
            document = _list(admin, _account(args.user, identity))
            ids = [str(session["id"]) for session in document.get("sessions", [])]
            status = _warn_incomplete(document)
            if not ids:
                print(f"popguard kick: no session of {args.user}", file=sys.stderr)
                return EXIT_FAILED
        kicked = 0
        for session_id in ids:
            code, answer = _close(admin, session_id, args.reason)
            if code == 200:
                kicked += 1
                print(_kicked_line(session_id, answer))
            else:
                error = answer.get("error", f"HTTP {code}")
                print(f"popguard kick: {session_id}: {error}", file=sys.stderr)
    except (AdminError, ConfigError) as exc:
        return _fail(exc)
    return status if kicked == len(ids) else EXIT_FAILED


def _kicked_line(session_id: str, answer: dict[str, Any]) -> str:
    session = answer.get("session", {})
    account = session.get("account") or "-"
    state = "closed" if answer.get("closed") else "closing"
    return f"kicked {session_id} {account} {session.get('client', '-')} ({state})"


def _fail(exc: Exception) -> int:
    if isinstance(exc, ConfigError):
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_USAGE
    print(f"popguard: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _warn_incomplete(document: dict[str, Any]) -> int:
    """A supervisor's list lacks the workers that did not answer: say so, exit 1."""
    if document.get("complete", True):
        return EXIT_OK
    for worker in document.get("workers", []):
        if not worker.get("ok"):
            print(f"popguard: incomplete: {worker.get('error')}", file=sys.stderr)
    return EXIT_FAILED


# -- where, and who -------------------------------------------------------------


def _where(args: argparse.Namespace) -> tuple[str, IdentityRules | None]:
    """The admin listener's base URL, and the config's identity rules (if -c)."""
    identity = None
    admin: str | None = args.admin
    if args.config:
        partial, _warnings = read_config(args.config)
        identity = partial.identity
        if admin is None:
            if partial.admin_listen is None:
                raise AdminError(f"{args.config} has no admin.listen; give --admin URL")
            admin = _url(partial.admin_listen.host, partial.admin_listen.port)
    if admin is None:
        admin = _url(*DEFAULT_ADMIN_ADDRESS)
    if "://" not in admin:
        admin = f"http://{admin}"
    if urllib.parse.urlsplit(admin).scheme not in ("http", "https"):
        raise AdminError(f"--admin: expected an http:// URL, got {admin!r}")
    return admin.rstrip("/"), identity


def _url(host: str, port: int) -> str:
    """The URL of a listener bound to ``host``: a wildcard is reached on loopback."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        host = "::1" if ip.version == 6 else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _account(user: str | None, identity: IdentityRules | None) -> str | None:
    """``--user`` as an account: canonical with the config's rules, else as given."""
    if user is None or identity is None:
        return user
    return identity.canonical(user)


# -- HTTP -------------------------------------------------------------------------

#: No proxy from the environment: the admin listener is local or on a
#: management network, and kicks must not pass through an HTTP proxy.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _list(admin: str, user: str | None) -> dict[str, Any]:
    query = f"?{urllib.parse.urlencode({'user': user})}" if user else ""
    code, document = _call(_request(f"{admin}/sessions{query}"))
    if code != 200:
        raise AdminError(f"{admin}/sessions: HTTP {code}: {document.get('error', '')}")
    return document


def _close(admin: str, session_id: str, reason: str | None) -> tuple[int, dict[str, Any]]:
    path = urllib.parse.quote(session_id, safe="")
    query = f"?{urllib.parse.urlencode({'reason': reason})}" if reason else ""
    request = _request(
        f"{admin}/sessions/{path}/close{query}", data=b"", method="POST", headers={CSRF_HEADER: "1"}
    )
    return _call(request)


def _request(url: str, **options: Any) -> urllib.request.Request:
    # The scheme is http or https: _where checks the URL it builds on.
    return urllib.request.Request(url, **options)  # noqa: S310


def _call(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    """(status, the JSON answer); AdminError if there is no JSON answer."""
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT) as reply:
            code, body = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AdminError(
            f"cannot reach the admin listener at {request.full_url}: {reason}"
        ) from None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        raise AdminError(f"{request.full_url}: HTTP {code}: {text or 'no JSON answer'}")
    return code, document


# -- the table ----------------------------------------------------------------------


def write_table(sessions: Sequence[dict[str, Any]], out: TextIO) -> None:
    """One line per session under a heading, columns aligned (like doveadm who)."""
    columns = list(_COLUMNS)
    if any(session.get("worker") is not None for session in sessions):
        columns.insert(1, _WORKER_COLUMN)
    rows = [[heading for heading, _ in columns]]
    rows += [[_cell(key, session.get(key)) for _, key in columns] for session in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        out.write("\n")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "tls":
        return "yes" if value else "no"
    if key == "idle_seconds":
        return _duration(float(value))
    if key.startswith("bytes_"):
        return _size(int(value))
    return str(value)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _size(octets: int) -> str:
    if octets < 1024:
        return f"{octets} B"
    value = octets / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
