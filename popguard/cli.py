"""The ``popguard`` command line.

``popguard serve``         run the proxy (from a config file, flags, or both;
                           flags win)
``popguard check-config``  validate a config file, errors as file:line:col, and
                           check this host: listen addresses, the audit directory
``popguard config schema`` the JSON Schema of the config (or a policy) file,
                           for editors (docs/configuration.md)
``popguard demo``          the proxy in front of the bundled demo upstream,
                           on loopback, with sample mail (``make run``)
``popguard demo-upstream`` only the demo POP3 server (a test and demo tool)
``popguard audit``         verify, query and report on an audit trail
                           (``popguard.trail.cli``)
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence

import prometheus_client
import trio

from popguard import __version__
from popguard.audit import AuditLog, open_audit_log_from_config
from popguard.config import (
    COMMAND_LINE,
    Address,
    Config,
    ConfigError,
    ConfigIssue,
    PartialConfig,
    Workers,
    admin_listen_flag,
    build_config,
    read_config,
    workers_flag,
)
from popguard.metrics import Metrics
from popguard.ops_cli import register as register_ops_commands
from popguard.policy.cli import add_policy_commands
from popguard.policy.load import Issue, PolicyError, load_policies
from popguard.policy.model import PolicySet
from popguard.retention import RetentionStore
from popguard.schema.config_models import ConfigFile
from popguard.schema.nodes import load_yaml, mark_position
from popguard.schema.policy_models import PolicyFile
from popguard.shell.server import (
    Endpoint,
    ListenerSpec,
    ProxyServer,
    ServerSettings,
    serve,
)
from popguard.shell.workers import (
    ListenerSockets,
    Supervisor,
    WorkerRole,
    bind_reuseport,
    cpu_count,
    parse_worker_arg,
    worker_admin_address,
    worker_audit_file,
    worker_command,
)
from popguard.trail.chain import KeyFileError
from popguard.trail.cli import add_audit_commands

DEMO_LISTEN = "127.0.0.1:1110"
#: The JSON Schema dialect pydantic writes.
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def settings_from_config(
    config: Config, fds: Mapping[str, tuple[int, ...]] | None = None
) -> ServerSettings:
    """*fds*: listening sockets inherited from a supervising parent, by listener."""
    fds = fds or {}
    return ServerSettings(
        listeners=tuple(
            ListenerSpec(
                listener.name,
                Endpoint(listener.address.host, listener.address.port),
                listener.tls,
                listener.proxy_protocol,
                listener.send_proxy,
                fds.get(listener.name, ()),
            )
            for listener in config.listeners
        ),
        upstream_tls=config.upstream.tls,
        upstream=Endpoint(config.upstream.address.host, config.upstream.address.port),
        connect_timeout=config.upstream.connect_timeout,
        greeting_timeout=config.upstream.greeting_timeout,
        idle_timeout=config.session.idle_timeout,
        login_timeout=config.session.login_timeout,
        idle_notice=config.session.idle_notice,
        shutdown_grace=config.shutdown_grace,
        limits=config.limits,
        message_identity=config.audit.message_identity,
        content_digests=config.audit.content_digests,
        identity=config.identity,
        retention=RetentionStore(config.retention_store) if config.retention_store else None,
        shared_state=config.shared_state,
    )


def _print_issues(issues: Sequence[ConfigIssue | Issue]) -> None:
    for issue in issues:
        print(issue, file=sys.stderr)


def _add_serve_flags(parser: argparse.ArgumentParser, *, upstream: bool = True) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config file (see popguard.example.yaml)"
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="address to accept POP3 clients on; repeat for several; IPv6 as [::1]:1110. "
        "Replaces the config file's listeners.",
    )
    if upstream:
        parser.add_argument("--upstream", metavar="HOST:PORT", help="the POP3 server to relay to")
    parser.add_argument(
        "--audit-file", metavar="FILE", help="append audit records to FILE as JSON lines"
    )
    parser.add_argument(
        "--shared-state",
        metavar="URL",
        help="count limits and failed logins in this store, shared by every popguard: "
        "redis://HOST:PORT/DB, rediss://..., unix:///PATH (docs/shared-state.md)",
    )
    parser.add_argument(
        "--retention-dir",
        metavar="DIR",
        help="the retention store: messages under a retain policy are archived here "
        "before their DELE (docs/retention.md)",
    )
    parser.add_argument(
        "--tls",
        metavar="{none,implicit,starttls}",
        help="TLS toward clients on the --listen listeners: implicit (POP3S, RFC 8314) "
        "or starttls (STLS offered, RFC 2595); see docs/tls.md",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain for --tls")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key (unencrypted) for --tls")
    if upstream:
        parser.add_argument(
            "--upstream-tls",
            metavar="{none,implicit,starttls}",
            help="TLS toward the upstream (never falls back to plaintext)",
        )
        parser.add_argument(
            "--upstream-ca-file",
            metavar="FILE",
            help="CA bundle to verify the upstream with (default: the system store)",
        )
        parser.add_argument(
            "--upstream-server-name",
            metavar="NAME",
            help="name to verify and send as SNI (default: the upstream host)",
        )
        parser.add_argument(
            "--upstream-tls-insecure",
            action="store_true",
            default=None,
            help="do not verify the upstream's certificate (logged as a warning)",
        )
    parser.add_argument(
        "--policies",
        metavar="DIR",
        help="directory of policy files (*.yaml, see docs/policies.md); default: the "
        "config's policies: key, else ./policies if it exists, else no policies",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="close a session silent this long, without QUIT (default 600, RFC 1939 §3)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="give up connecting to the upstream after this long (default 10)",
    )
    parser.add_argument(
        "--login-timeout",
        type=float,
        metavar="SECONDS",
        help="close a session not logged in this long after it connected, without QUIT "
        "(default 60; 0: no limit)",
    )
    parser.add_argument(
        "--greeting-timeout",
        type=float,
        metavar="SECONDS",
        help="give up on an upstream that sends no greeting this long after the "
        "connection (default 30)",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="after binding the listeners, run as this user (start as root to use "
        "ports 110/995); the audit file is opened before, as the starting user",
    )
    parser.add_argument(
        "--group", metavar="NAME", help="with --user: run as this group (default: the user's)"
    )
    parser.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9110); overrides "
        "the config's admin.listen; default: off",
    )
    parser.add_argument(
        "--workers",
        type=_workers_arg,
        metavar="N|auto",
        help="worker processes on the same listeners (SO_REUSEPORT), under a parent that "
        "restarts them; 'auto': one per CPU; overrides the config's workers: (default 1: "
        "a single process)",
    )
    # Internal: how the supervising parent starts a worker (shell/workers.py).
    parser.add_argument("--worker", type=_worker_role, help=argparse.SUPPRESS)
    parser.add_argument(
        "--inherit-listener", action="append", default=[], type=_inherited, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print readable audit events on stderr (default on)",
    )


def _workers_arg(text: str) -> Workers:
    """``--workers``, validated by ``workers:``'s model (a usage error if invalid)."""
    try:
        return workers_flag(text)
    except ConfigError as exc:
        message = exc.errors[0].message.removeprefix("--workers: ")
        raise argparse.ArgumentTypeError(message) from None


def _worker_role(text: str) -> WorkerRole:
    try:
        return parse_worker_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _inherited(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, fds = text.partition("=")
    try:
        return name, tuple(int(fd) for fd in fds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FD,FD, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popguard",
        description="A transparent POP3 proxy and audit gateway.",
    )
    parser.add_argument("--version", action="version", version=f"popguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve_parser = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy in front of an upstream POP3 server until SIGTERM or "
        "SIGINT (a second signal skips the grace period). SIGHUP or SIGUSR1 reopens the "
        "audit file (after logrotate). Flags override the config file.",
    )
    _add_serve_flags(serve_parser)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file; print each problem as file:line:column. "
        "Exits 1 on errors, 0 otherwise (warnings included).",
    )
    check.add_argument("--config", "-c", metavar="FILE", required=True)
    check.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="check this admin address instead of the config's admin.listen, as serve "
        "--admin-listen would use it",
    )

    demo = commands.add_parser(
        "demo",
        help="run the proxy in front of the bundled demo upstream",
        description="Start the bundled demo POP3 server (sample mail, user demo/demo) on a "
        "loopback port and popguard in front of it. A test and demo tool.",
    )
    _add_serve_flags(demo, upstream=False)
    demo.set_defaults(audit_file="audit.jsonl")

    demo_up = commands.add_parser(
        "demo-upstream",
        help="run only the bundled demo POP3 server",
        description="Serve the demo mail store on loopback. A test and demo tool, not a "
        "mail server.",
    )
    demo_up.add_argument("--listen", default="127.0.0.1:21110", metavar="HOST:PORT")

    config_parser = commands.add_parser(
        "config",
        help="about the config file format",
        description="Tools for the config file (and the policy files).",
    )
    config_commands = config_parser.add_subparsers(
        dest="config_command", metavar="COMMAND", required=True
    )
    schema = config_commands.add_parser(
        "schema",
        help="print the JSON Schema of the config file",
        description="Print the JSON Schema of the config file (or, with --policy, of a "
        "policy file), for editors: see docs/configuration.md.",
    )
    schema.add_argument("--policy", action="store_true", help="the schema of a policy file instead")

    add_audit_commands(commands)
    add_policy_commands(commands)
    register_ops_commands(commands)
    return parser


def _resolve(args: argparse.Namespace, *, upstream: str | None) -> Config:
    base: PartialConfig | None = None
    warnings: list[ConfigIssue] = []
    if args.config:
        base, warnings = read_config(args.config)
    config, more = build_config(
        base=base,
        listen=args.listen,
        upstream=upstream,
        audit_file=args.audit_file,
        idle_timeout=args.idle_timeout,
        connect_timeout=args.connect_timeout,
        login_timeout=args.login_timeout,
        greeting_timeout=args.greeting_timeout,
        console=args.console,
        listen_tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        upstream_tls=getattr(args, "upstream_tls", None),
        upstream_ca_file=getattr(args, "upstream_ca_file", None),
        upstream_server_name=getattr(args, "upstream_server_name", None),
        upstream_tls_verify=False if getattr(args, "upstream_tls_insecure", None) else None,
        workers=args.workers,
        retention_dir=getattr(args, "retention_dir", None),
        shared_state_url=getattr(args, "shared_state", None),
    )
    _print_issues([*warnings, *more])
    return config


class Policies:
    """The policy directory in use, loaded once at startup and again on SIGHUP."""

    def __init__(self, directory: str | None, config: Config) -> None:
        self.directory = os.path.abspath(directory) if directory else None
        self._listeners = [listener.name for listener in config.listeners]
        self._identity = config.identity
        self.initial: PolicySet | None = None
        if self.directory is not None:
            self.initial, warnings = self._load()
            if config.retention_store is None:
                warnings.extend(_retain_without_store(self.initial))
            _print_issues(warnings)

    def _load(self) -> tuple[PolicySet, list[Issue]]:
        assert self.directory is not None
        return load_policies(self.directory, listeners=self._listeners, identity=self._identity)

    def load(self) -> PolicySet:
        return self._load()[0]


def _retain_without_store(policies: PolicySet) -> list[Issue]:
    """Warnings for ``retain: true`` rules when no retention store is configured."""
    return [
        Issue(
            rule.file,
            rule.line,
            1,
            f"rule {rule.name!r} sets retain, but no retention store is configured "
            "(retention.store or --retention-dir): every DELE it covers will be refused",
            "warning",
        )
        for rule in policies.rules
        if rule.settings.get("retain") is True and rule.mode == "enforce"
    ]


def _policies(args: argparse.Namespace, config: Config) -> Policies:
    """``--policies``, else the config's ``policies:``, else ./policies if present."""
    directory = args.policies or config.policies
    if directory is None and os.path.isdir("policies"):
        directory = "policies"
    return Policies(directory, config)


async def _serve_until_signal(
    config: Config,
    audit: AuditLog,
    policies: Policies,
    metrics: Metrics | None,
    admin: tuple[str, int] | None,
    dropper: Callable[[], None] | None = None,
    worker: WorkerRole | None = None,
    fds: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    await serve(
        settings_from_config(config, fds),
        audit,
        policies=policies.initial,
        policy_loader=policies.load if policies.directory else None,
        metrics=metrics,
        admin=admin,
        after_bind=dropper,
        worker=worker,
    )


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running proxy.

    Everything loaded at startup (modules, config) is moved out of the
    collector's sight (``gc.freeze``), and the youngest generation is
    collected every 20,000 allocations instead of 700: a session's objects
    are short-lived and freed by reference counting, so frequent young
    collections only cost CPU (measured ~9% of the CPU per session).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _resolve(args, upstream=args.upstream)
    policies = _policies(args, config)
    admin = _admin_address(args)
    if admin is None and config.admin_listen is not None:
        admin = (config.admin_listen.host, config.admin_listen.port)
    role: WorkerRole | None = args.worker
    fds: dict[str, tuple[int, ...]] = dict(args.inherit_listener)
    if role is None:
        workers = config.workers  # --workers applied, and validated, by build_config
        count = cpu_count() if workers == "auto" else workers
        if count > 1:
            return _supervise(args, config, count)
    else:
        config = _as_worker(config, role, fds)
        if admin is not None:
            admin = worker_admin_address(admin, role.index)  # the parent has admin.listen
    metrics = None
    if admin is not None:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        metrics = Metrics()
    audit = open_audit_log_from_config(
        config.audit,
        worker=role.index if role is not None else None,
        extra_sinks=[metrics.sink] if metrics is not None else (),
    )
    if metrics is not None:
        audit.observe_writes(metrics.observe_audit_write)
    _tune_gc()
    try:
        dropper = _privilege_dropper(args.user, args.group)
        trio.run(_serve_until_signal, config, audit, policies, metrics, admin, dropper, role, fds)
    finally:
        audit.close()
    return 0


def _as_worker(config: Config, role: WorkerRole, fds: Mapping[str, tuple[int, ...]]) -> Config:
    """A worker's config: its own audit file; checks every listener was handed down."""
    missing = [listener.name for listener in config.listeners if listener.name not in fds]
    if missing:
        raise SystemExit(f"popguard: worker {role.index}: no socket for listener(s) {missing}")
    audit = config.audit
    if audit.file:
        audit = dataclasses.replace(audit, file=worker_audit_file(audit.file, role.index))
    return dataclasses.replace(config, audit=audit)


def _supervise(args: argparse.Namespace, config: Config, workers: int) -> int:
    """The parent of ``workers`` worker processes (see popguard.shell.workers)."""
    admin = _admin_address(args)  # the parent serves the admin address itself
    if admin is None and config.admin_listen is not None:
        admin = (config.admin_listen.host, config.admin_listen.port)
    bound: list[ListenerSockets] = []
    try:
        for listener in config.listeners:
            address = listener.address
            bound.append(bind_reuseport(listener.name, address.host, address.port, workers))
        audit = open_audit_log_from_config(config.audit, worker=0)
    except BaseException:
        for sockets in bound:
            sockets.close()
        raise
    supervisor = Supervisor(
        worker_command(args.raw_argv), bound, audit, workers=workers, admin=admin
    )
    try:
        return trio.run(supervisor.run)
    finally:
        for sockets in bound:
            sockets.close()
        audit.close()


def _privilege_dropper(user: str | None, group: str | None) -> Callable[[], None] | None:
    """What serve calls once every socket is bound: become ``user``:``group``."""
    if user is None:
        if group is not None:
            raise SystemExit("popguard: --group needs --user")
        return None
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as exc:
        raise SystemExit(f"popguard: no such user or group: {exc.args[0]}") from exc
    uid = entry.pw_uid

    def drop() -> None:
        if os.getuid() == uid and os.getgid() == gid:
            return
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SystemExit("popguard: could not drop privileges")

    return drop


def _admin_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """``--admin-listen``, validated as the config's ``admin.listen``; exit 2 if invalid."""
    if not args.admin_listen:
        return None
    try:
        address = admin_listen_flag(args.admin_listen)
    except ConfigError as exc:
        _print_issues(exc.issues)
        raise SystemExit(2) from exc
    return (address.host, address.port)


def cmd_config(args: argparse.Namespace) -> int:
    """``popguard config schema [--policy]``: the JSON Schema, on standard output."""
    model = PolicyFile if args.policy else ConfigFile
    name = "policy file" if args.policy else "config file"
    schema = {
        "$schema": JSON_SCHEMA_DIALECT,
        **model.model_json_schema(by_alias=True),
        "title": f"popguard {name}",
    }
    print(json.dumps(schema, indent=2, ensure_ascii=False))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    flag = _admin_address(args)
    try:
        partial, warnings = read_config(args.config)
    except ConfigError as exc:
        _print_issues(exc.issues)
        return 1
    if flag is not None:
        warning = _admin_exposure_warning("--admin-listen", Address(*flag), COMMAND_LINE, (0, 0))
    elif partial.admin_listen is not None:
        where = _yaml_position(args.config, ("admin", "listen"))
        warning = _admin_exposure_warning("admin.listen", partial.admin_listen, args.config, where)
    else:
        warning = None
    host = _host_issues(args.config, partial, flag)
    _print_issues([*warnings, *([warning] if warning is not None else []), *host])
    if any(issue.severity == "error" for issue in host):
        return 1
    print(f"{args.config}: OK")
    return 0


def _host_issues(
    path: str, partial: PartialConfig, admin_flag: tuple[str, int] | None
) -> list[ConfigIssue]:
    """What check-config can know of this host without serving (errors, located).

    Every listen address (and the admin address) must be one this host can
    bind: each is bind-tested on port 0.  The audit file's directory must
    exist and be writable (or the file itself be writable).
    """
    issues: list[ConfigIssue] = []

    def error(keys: Sequence[str | int], message: str) -> None:
        line, column = _yaml_position(path, keys)
        issues.append(ConfigIssue(path, line, column, message))

    for index, listener in enumerate(partial.listeners):
        problem = _bind_problem(listener.address)
        if problem is not None:
            error(("listeners", index, "listen"), f"listeners[{index}].listen: {problem}")
    if admin_flag is None and partial.admin_listen is not None:
        problem = _bind_problem(partial.admin_listen)
        if problem is not None:
            error(("admin", "listen"), f"admin.listen: {problem}")
    elif admin_flag is not None:
        problem = _bind_problem(Address(*admin_flag))
        if problem is not None:
            issues.append(ConfigIssue(COMMAND_LINE, 0, 0, f"--admin-listen: {problem}"))
    if partial.audit.file is not None:
        problem = _audit_file_problem(partial.audit.file)
        if problem is not None:
            error(("audit", "file"), f"audit.file: {problem}")
    if partial.retention_store is not None:
        problem = _store_problem(partial.retention_store)
        if problem is not None:
            error(("retention", "store"), f"retention.store: {problem}")
    return issues


def _bind_problem(address: Address) -> str | None:
    """Why this host cannot listen on *address*'s host, or None (a bind to port 0)."""
    family = socket.AF_INET
    if address.host.lower() != "localhost" and ipaddress.ip_address(address.host).version == 6:
        family = socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address.host, 0))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{address.host} is not an address of this host ({exc.strerror})"
        return f"cannot listen on {address.host}: {exc.strerror or exc}"
    return None


def _audit_file_problem(file: str) -> str | None:
    """Why popguard could not append to the audit file *file*, or None."""
    directory = os.path.dirname(file) or "."
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist (create it, or change audit.file)"
    if os.path.exists(file):
        if os.path.isdir(file):
            return f"{file} is a directory"
        if not os.access(file, os.W_OK):
            return f"{file} is not writable by this user"
    elif not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create {file}: the directory {directory} is not writable by this user"
    return None


def _store_problem(store: str) -> str | None:
    """Why popguard could not archive into the retention store *store*, or None."""
    if os.path.exists(store):
        if not os.path.isdir(store):
            return f"{store} is not a directory"
        if not os.access(store, os.W_OK | os.X_OK):
            return f"{store} is not writable by this user"
        return None
    parent = os.path.dirname(store.rstrip(os.sep)) or "."
    if not os.path.isdir(parent):
        return f"the directory {parent} does not exist (create it, or change retention.store)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {store}: {parent} is not writable by this user"
    return None


def _is_loopback_host(host: str) -> bool:
    """Whether a listen host (an IP literal or ``localhost``) is loopback only.

    127.0.0.0/8, ::1, ``localhost`` and IPv4-mapped loopback (::ffff:127.0.0.1)
    are; the wildcards 0.0.0.0 and :: (every address) are not.
    """
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _admin_exposure_warning(
    where: str, address: Address, file: str, position: tuple[int, int]
) -> ConfigIssue | None:
    """A warning when the admin listener would be reachable from other hosts."""
    if _is_loopback_host(address.host):
        return None
    try:
        wildcard = ipaddress.ip_address(address.host).is_unspecified
    except ValueError:
        wildcard = False
    scope = "binds every address of this host" if wildcard else "is not a loopback address"
    message = (
        f"{where}: {address} {scope}: the admin endpoint has no authentication and "
        "exposes metrics and health (/metrics, /healthz, /readyz) to anyone who can reach "
        f"it; bind it to loopback (127.0.0.1:{address.port} or [::1]:{address.port}), or "
        "firewall the port so that only your scraper and load balancer reach it"
    )
    line, column = position
    return ConfigIssue(file, line, column, message, "warning")


def _yaml_position(path: str, keys: Sequence[str | int]) -> tuple[int, int]:
    """Where the value at ``keys`` (keys and list indexes) is in a YAML file; (0, 0) if unknown.

    Only for locating an issue in a file :func:`read_config` already accepted.
    """
    loaded = load_yaml(path, "config file")
    if loaded.document is None:
        return (0, 0)
    node = loaded.document.values.get(tuple(keys))
    return mark_position(node.start_mark if node is not None else None)


async def _demo(args: argparse.Namespace) -> None:
    from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store

    demo = DemoUpstream(sample_store())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(demo.serve, "127.0.0.1", 0)
        upstream = f"127.0.0.1:{bound_port(listeners)}"
        if not args.listen:
            args.listen = [DEMO_LISTEN]
        config = _resolve(args, upstream=upstream)
        policies = _policies(args, config)
        audit = open_audit_log_from_config(config.audit)
        settings = settings_from_config(config)

        async def proxy(task_status: trio.TaskStatus[ProxyServer]) -> None:
            try:
                await serve(
                    settings,
                    audit,
                    policies=policies.initial,
                    policy_loader=policies.load if policies.directory else None,
                    task_status=task_status,
                )
            finally:
                audit.close()
                nursery.cancel_scope.cancel()  # the demo upstream goes with it

        server: ProxyServer = await nursery.start(proxy)
        endpoint = next(iter(server.bound.values()))[0]
        _print_banner(endpoint, upstream, config.audit.file)


def _print_banner(endpoint: Endpoint, upstream: str, audit_file: str | None) -> None:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    url = f"pop3://demo:demo@{host}:{endpoint.port}"
    lines = [
        "",
        f"popguard {__version__} is relaying POP3 on {endpoint} to the demo upstream "
        f"on {upstream}.",
        "Try it from another terminal:",
        f"  curl {url}/                 # list the messages",
        f"  curl {url}/1                # retrieve message 1",
        f"  curl {url}/1 -X DELE -I     # delete message 1 (commits on QUIT)",
    ]
    if audit_file:
        lines.append(f"Audit records: on this console, and as JSON lines in {audit_file}")
    lines += ["Stop with Ctrl-C.", ""]
    print("\n".join(lines), file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.workers not in (None, 1):
        print("popguard: demo runs a single process; use serve for --workers", file=sys.stderr)
        return 2
    return _run_demo(_demo, args)


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in *error*, its exception groups flattened."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _run_demo(
    function: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace
) -> int:
    """``trio.run`` for the demo tools: Ctrl-C or a port in use is one line, not a traceback.

    trio raises them wrapped in exception groups (its nurseries' strict
    groups), which :func:`main`'s handlers do not see.
    """
    try:
        trio.run(function, args)
    except BaseException as exc:
        leaves = _leaves(exc)
        errors = [leaf for leaf in leaves if isinstance(leaf, OSError)]
        if errors and all(isinstance(leaf, OSError | KeyboardInterrupt) for leaf in leaves):
            print(f"popguard: {errors[0].strerror or errors[0]}", file=sys.stderr)
            return 1
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        raise
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from popguard.config import parse_listen_address
    from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store

    try:
        address = parse_listen_address(args.listen)
    except ValueError as exc:
        print(f"popguard: --listen: {exc}", file=sys.stderr)
        return 2

    async def main(_: argparse.Namespace) -> None:
        demo = DemoUpstream(sample_store())
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(demo.serve, address.host, address.port)
            print(
                f"demo upstream on {address.host}:{bound_port(listeners)} "
                "(users demo/demo, alice/alicepw)",
                file=sys.stderr,
                flush=True,
            )

    return _run_demo(main, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    if args.command in ("audit", "policy", "sessions", "kick"):
        # The trail tools report their own errors and exit codes (2: I/O).
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            return 130
    handlers = {
        "serve": cmd_serve,
        "check-config": cmd_check_config,
        "config": cmd_config,
        "demo": cmd_demo,
        "demo-upstream": cmd_demo_upstream,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        _print_issues(exc.issues)
        return 2
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyFileError as exc:
        print(f"popguard: audit.hmac_key_file: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"popguard: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
