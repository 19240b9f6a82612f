"""popguard.config: YAML loading, located errors, and command-line overrides."""

from __future__ import annotations

import os
import re
import ssl
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from popguard.cli import settings_from_config
from popguard.config import (
    COMMAND_LINE,
    Address,
    AuditConfig,
    Config,
    ConfigError,
    ConfigIssue,
    ListenerConfig,
    PartialConfig,
    SessionConfig,
    SyslogTarget,
    UpstreamConfig,
    build_config,
    load_config,
    parse_address,
    parse_listen_address,
    read_config,
)
from popguard.core.limits import Limits
from popguard.shell.server import ServerSettings
from popguard.shell.tls import (
    CertKey,
    ListenerTLS,
    UpstreamTLS,
    client_context,
    legacy_warnings,
    server_context,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "popguard.example.yaml"

# A minimal complete file; tests append sections after it (it is 5 lines).
MINIMAL = """\
listeners:
  - listen: "127.0.0.1:1110"
upstream:
  address: "127.0.0.1:110"
  connect_timeout: 10
"""


def write(tmp_path: Path, text: str, name: str = "popguard.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return list(info.value.errors)


def positions(path: Path) -> list[tuple[int, int]]:
    return [(issue.line, issue.column) for issue in errors(path)]


# --------------------------------------------------------------------------
# A valid file
# --------------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - name: pop3
            listen: "127.0.0.1:1110"
          - listen: "[::1]:1110"
          - listen: localhost:2110
        upstream:
          address: mail.example.com:110
          connect_timeout: 2.5
        session:
          idle_timeout: 900
          idle_notice: false
        limits:
          max_command_line: 512
          max_server_status_line: 512
          max_sasl_line: 8192
          max_listing_line: 1024
          max_bad_commands: 3
          max_pipelined: 8
        shutdown:
          grace_period: 0
        audit:
          file: logs/audit.jsonl
          console: no
        policies: policies/
        """,
    )
    config, warnings = load_config(path)
    assert warnings == []
    assert config == Config(
        listeners=(
            ListenerConfig("pop3", Address("127.0.0.1", 1110)),
            ListenerConfig("listener-1", Address("::1", 1110)),
            ListenerConfig("listener-2", Address("localhost", 2110)),
        ),
        upstream=UpstreamConfig(Address("mail.example.com", 110), 2.5),
        session=SessionConfig(idle_timeout=900.0, idle_notice=False),
        limits=Limits(
            max_command_line=512,
            max_server_status_line=512,
            max_sasl_line=8192,
            max_listing_line=1024,
            max_bad_commands=3,
            max_pipelined=8,
        ),
        shutdown_grace=0.0,
        audit=AuditConfig(file=str(tmp_path / "logs" / "audit.jsonl"), console=False),
        policies=str(tmp_path / "policies"),
    )
    assert isinstance(config.upstream.connect_timeout, float)
    assert isinstance(config.session.idle_timeout, float)


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    config, warnings = load_config(write(tmp_path, MINIMAL))
    assert warnings == []
    assert config.listeners == (ListenerConfig("listener-0", Address("127.0.0.1", 1110)),)
    assert config.upstream == UpstreamConfig(Address("127.0.0.1", 110), 10.0)
    assert config.session == SessionConfig()
    assert config.limits == Limits()
    assert config.shutdown_grace == 10.0
    assert config.audit == AuditConfig()
    assert config.policies is None


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    # A section whose keys are all commented out is null in YAML.
    config, _ = load_config(write(tmp_path, MINIMAL + "session:\nlimits:\naudit:\nshutdown:\n"))
    assert config.session == SessionConfig()
    assert config.limits == Limits()


def test_example_file_loads_cleanly() -> None:
    config, warnings = load_config(EXAMPLE)
    assert warnings == []
    assert config.listeners == (ListenerConfig("pop3", Address("127.0.0.1", 1110)),)
    assert config.upstream == UpstreamConfig(Address("127.0.0.1", 110))
    # The example documents the defaults, so it must not drift from them.
    assert config.session == SessionConfig()
    assert config.limits == Limits()
    assert config.shutdown_grace == Config.__dataclass_fields__["shutdown_grace"].default
    assert config.audit == AuditConfig()
    assert config.policies is None


def test_example_file_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = ["name:", "listen:", "address:", "connect_timeout:", "idle_timeout:"]
    keys += ["idle_notice:", "grace_period:", "file:", "console:", "policies:"]
    keys += ["login_timeout:", "greeting_timeout:"]
    keys += [f"{name}:" for name in Limits.__dataclass_fields__]
    for key in keys:
        assert key in text


# --------------------------------------------------------------------------
# Errors carry the right line and column
# --------------------------------------------------------------------------

ERROR_CASES = [
    # (appended to MINIMAL, line, column, message fragment) -- MINIMAL is 5 lines
    ("session:\n  idle_timeout: '600'\n", 7, 17, "expected a number of seconds, got a string"),
    ("session:\n  idle_timeout: 0\n", 7, 17, "must be greater than 0"),
    ("session:\n  idle_timeout: .inf\n", 7, 17, "finite"),
    ("session:\n  idle_notice: 1\n", 7, 16, "expected true or false, got an integer"),
    ("session:\n  idle_notice: 'true'\n", 7, 16, "expected true or false, got a string"),
    ("audit:\n  console: null\n", 7, 12, "expected true or false, got null"),
    ("limits:\n  max_command_line: 254\n", 7, 21, "at least 255 (RFC 2449"),
    ("limits:\n  max_server_status_line: 511\n", 7, 27, "at least 512"),
    ("limits:\n  max_pipelined: 0\n", 7, 18, "at least 1"),
    ("limits:\n  max_pipelined: 8.0\n", 7, 18, "expected an integer, got a float"),
    ("limits:\n  max_pipelined: true\n", 7, 18, "expected an integer, got a boolean"),
    ("limits:\n  max_pipelined: '8'\n", 7, 18, "write numbers without quotes"),
    ("shutdown:\n  grace_period: -1\n", 7, 17, "must be at least 0"),
    ("shutdown:\n  grace_period: 1e3\n", 7, 17, "YAML 1.1 reads this as a string"),
    ("audit:\n  file: ''\n", 7, 9, "empty path"),
    ("audit:\n  file: [a, b]\n", 7, 9, "expected a string, got a list"),
    ("policies: 5\n", 6, 11, "put it in quotes"),
    ("session: 5\n", 6, 10, "session: expected a mapping, got an integer"),
    ("limits:\n  max_pipelined: 4\n  max_pipelined: 5\n", 8, 3, "duplicate key 'max_pipelined'"),
    ("limits:\n  <<: {max_pipelined: 4}\n", 7, 3, "merge keys"),
    ("limits:\n  1: 4\n", 7, 3, "keys must be strings"),
    ("audit:\n  console: true\n  colour: true\n", 8, 3, "unknown key 'colour'"),
]


@pytest.mark.parametrize(("extra", "line", "column", "fragment"), ERROR_CASES)
def test_error_location(tmp_path: Path, extra: str, line: int, column: int, fragment: str) -> None:
    found = errors(write(tmp_path, MINIMAL + extra))
    assert len(found) == 1, found
    assert (found[0].line, found[0].column) == (line, column)
    assert fragment in found[0].message
    assert found[0].severity == "error"
    assert found[0].file == str(tmp_path / "popguard.yaml")


def test_listener_and_upstream_error_locations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "127.0.0.1:0"
          - listen: mail.example.com:110
          - name: "has space"
            listen: "127.0.0.1:1111"
          - name: a
          - listen: 1110
          - "127.0.0.1:1112"
          - name: b
            listen: "127.0.0.1:1113"
          - name: b
            listen: "127.0.0.1:1114"
          - listen: "127.0.0.1:1113"
        upstream:
          address: "*:110"
          connect_timeout: -3
        """,
    )
    found = errors(path)
    assert [(issue.line, issue.column) for issue in found] == [
        (2, 13),  # port 0
        (3, 13),  # DNS name for a listener
        (4, 11),  # invalid name
        (6, 5),  # listener without 'listen': points at the item
        (7, 13),  # an integer, not a string
        (8, 5),  # a string, not a mapping
        (11, 11),  # duplicate name
        (13, 13),  # duplicate address
        (15, 12),  # invalid upstream host
        (16, 20),  # negative timeout
    ]
    messages = [issue.message for issue in found]
    assert "out of range 1-65535" in messages[0]
    assert "literal IP address or 'localhost'" in messages[1]
    assert "invalid name 'has space'" in messages[2]
    assert "listeners[3]: missing required key 'listen'" in messages[3]
    assert "expected a string, got an integer '1110'" in messages[4]
    assert "listeners[5]: expected a mapping" in messages[5]
    assert "duplicate listener name 'b'; already used on line 9" in messages[6]
    assert "already used by listener 'b' (line 10)" in messages[7]
    assert "upstream.address: invalid address '*:110'" in messages[8]
    assert "upstream.connect_timeout: must be greater than 0" in messages[9]


def test_all_errors_are_collected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "127.0.0.1:99999"
        upstream:
          address: "127.0.0.1"
        sesion:
          idle_timeout: 60
        limits:
          max_command_line: 100
          max_sasl_line: "big"
        audit:
          console: maybe
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    issues = info.value.issues
    assert [(i.line, i.severity) for i in issues] == [
        (2, "error"),
        (4, "error"),
        (5, "error"),
        (8, "error"),
        (9, "error"),
        (11, "error"),
    ]
    text = str(info.value)
    assert len(text.splitlines()) == 6
    assert text.splitlines()[0].startswith(f"{path}:2:13: error: listeners[0].listen:")


def test_warnings_travel_with_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "session:\n  idle_timeout: 60\n  idle_notice: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [(i.line, i.severity) for i in info.value.issues] == [(7, "warning"), (8, "error")]
    assert len(info.value.errors) == 1


# --------------------------------------------------------------------------
# Unknown keys
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line", "column", "message"),
    [
        ("sesion:\n  idle_timeout: 9\n", 6, 1, "top-level key 'sesion' (did you mean 'session'?)"),
        ("Limits: {}\n", 6, 1, "unknown top-level key 'Limits' (did you mean 'limits'?)"),
        ("session:\n  idle_timout: 9\n", 7, 3, "session: unknown key 'idle_timout' (did you mean"),
        ("limits:\n  max_command_length: 300\n", 7, 3, "(did you mean 'max_command_line'?)"),
        ("idle_timeout: 900\n", 6, 1, "(did you mean 'session.idle_timeout'?)"),
        ("upstream2:\n", 6, 1, "(did you mean 'upstream'?)"),
        ("session:\n  address: x\n", 7, 3, "(did you mean 'upstream.address'?)"),
        ("audit:\n  policies: x\n", 7, 3, "('policies' is a top-level section)"),
        ("zzz: 1\n", 6, 1, "unknown top-level key 'zzz' (valid keys: listeners, upstream,"),
    ],
)  # fmt: skip
def test_unknown_key(tmp_path: Path, extra: str, line: int, column: int, message: str) -> None:
    found = errors(write(tmp_path, MINIMAL + extra))
    assert [(issue.line, issue.column) for issue in found] == [(line, column)]
    assert message in found[0].message


# --------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:110", Address("127.0.0.1", 110)),
        ("[::1]:1110", Address("::1", 1110)),
        ("[2001:db8::1]:995", Address("2001:db8::1", 995)),
        ("[fe80::1%eth0]:110", Address("fe80::1%eth0", 110)),
        ("mail.example.com:110", Address("mail.example.com", 110)),
        ("mail.example.com.:110", Address("mail.example.com.", 110)),
        ("localhost:65535", Address("localhost", 65535)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty address"),
        ("127.0.0.1", "missing port"),
        ("::1:110", "IPv6 addresses must be written in brackets"),
        ("[::1]", "missing port after ']'"),
        ("[::1:110", "missing ']'"),
        ("[127.0.0.1]:110", "brackets are only for IPv6"),
        (":110", "missing host"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:http", "must be a number"),
        ("host:+1", "must be a number"),
        ("300.1.1.1:110", "invalid IPv4 address"),
        ("127.1:110", "invalid IPv4 address"),
        ("bad_-.example:110", "invalid host name"),
        ("-bad.example:110", "invalid host name"),
        ("*:110", "invalid host name"),
        (" host:110", "whitespace"),
    ],
)
def test_parse_address_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_address(text)


def test_parse_listen_address() -> None:
    assert parse_listen_address("[::]:110") == Address("::", 110)
    assert parse_listen_address("LocalHost:110") == Address("localhost", 110)
    with pytest.raises(ValueError, match="literal IP address or 'localhost'"):
        parse_listen_address("mail.example.com:110")
    with pytest.raises(ValueError, match=r"use 0\.0\.0\.0"):
        parse_listen_address("*:110")


def test_ipv6_in_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "[::]:1110"
          - listen: "[::1]:1111"
        upstream:
          address: "[2001:db8::25]:110"
        """,
    )
    config, _ = load_config(path)
    assert [str(listener.address) for listener in config.listeners] == ["[::]:1110", "[::1]:1111"]
    assert config.upstream.address == Address("2001:db8::25", 110)


def test_ipv6_duplicate_detected_despite_spelling(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "[::1]:1110"
          - listen: "[0:0::1]:1110"
        upstream:
          address: "[::1]:110"
        """,
    )
    found = errors(path)
    assert [(i.line, i.column) for i in found] == [(3, 13)]
    assert "already used" in found[0].message


def test_unbracketed_ipv6_in_file(tmp_path: Path) -> None:
    found = errors(write(tmp_path, MINIMAL.replace('"127.0.0.1:110"', '"::1:110"')))
    assert [(i.line, i.column) for i in found] == [(4, 12)]
    assert "must be written in brackets" in found[0].message


def test_unquoted_ipv6_is_a_syntax_error_with_a_hint(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "listeners:\n  - listen: [::1]:1110\n"))
    assert len(found) == 1
    assert found[0].line == 2
    assert found[0].message.startswith("YAML syntax error:")
    assert 'quote IPv6 addresses, e.g. "[::1]:1110"' in found[0].message


# --------------------------------------------------------------------------
# Files that are not valid YAML or not there
# --------------------------------------------------------------------------


def test_yaml_syntax_error_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "127.0.0.1:1110"
        upstream:
          address: "127.0.0.1:110"
           connect_timeout: 10
        """,
    )
    found = errors(path)
    assert len(found) == 1
    assert (found[0].line, found[0].column) == (5, 4)
    assert found[0].message == (
        "YAML syntax error: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping started on line 4)"
    )
    assert str(found[0]).startswith(f"{path}:5:4: error: YAML syntax error:")


def test_yaml_syntax_error_mapping_value(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "upstream:\n  address: 127.0.0.1:110\n   connect_timeout: 10\n"))
    assert [(i.line, i.column) for i in found] == [(3, 19)]
    assert found[0].message == "YAML syntax error: mapping values are not allowed here"


def test_yaml_unclosed_quote(tmp_path: Path) -> None:
    found = errors(write(tmp_path, MINIMAL + 'audit:\n  file: "audit.jsonl\n'))
    assert len(found) == 1
    assert found[0].line in (7, 8)  # PyYAML reports the end of the scan
    assert "YAML syntax error" in found[0].message


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "listeners:\n\t- listen: x\n"))
    assert [(i.line, i.column) for i in found] == [(2, 1)]


def test_multiple_documents_rejected(tmp_path: Path) -> None:
    found = errors(write(tmp_path, MINIMAL + "---\nsession: {}\n"))
    assert [i.line for i in found] == [6]
    assert "single document" in found[0].message


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_bytes(MINIMAL.encode() + b"policies: \xff\n")
    found = errors(path)
    assert [(i.line, i.column) for i in found] == [(6, 11)]
    assert "UTF-8" in found[0].message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.column) == (str(path), 0, 0)
    assert "cannot read config file" in issue.message
    assert str(issue) == f"{path}: error: {issue.message}"
    with pytest.raises(ConfigError):
        read_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "- listen: x\n"))
    assert [(i.line, i.column) for i in found] == [(1, 1)]
    assert "expected a mapping, got a list" in found[0].message


# --------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------


def test_short_idle_timeout_warns_but_loads(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "session:\n  idle_timeout: 599.5\n")
    config, warnings = load_config(path)
    assert config.session.idle_timeout == 599.5
    assert len(warnings) == 1
    (warning,) = warnings
    assert (warning.line, warning.column, warning.severity) == (7, 17, "warning")
    assert "RFC 1939" in warning.message
    assert "10 minutes" in warning.message
    assert str(warning).startswith(f"{path}:7:17: warning: session.idle_timeout")


def test_idle_timeout_of_600_does_not_warn(tmp_path: Path) -> None:
    _, warnings = load_config(write(tmp_path, MINIMAL + "session:\n  idle_timeout: 600\n"))
    assert warnings == []


# --------------------------------------------------------------------------
# Missing listener / upstream
# --------------------------------------------------------------------------


def test_load_requires_listener_and_upstream(tmp_path: Path) -> None:
    path = write(tmp_path, "session:\n  idle_timeout: 900\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    messages = [(i.line, i.message) for i in info.value.issues]
    assert messages == [
        (0, "no listener configured: add a 'listeners:' section"),
        (0, "no upstream configured: add an 'upstream:' section"),
    ]


def test_load_empty_file(tmp_path: Path) -> None:
    assert len(errors(write(tmp_path, ""))) == 2


def test_upstream_without_address(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - listen: "127.0.0.1:1110"
        upstream:
          connect_timeout: 3
        """,
    )
    found = errors(path)
    assert [(i.line, i.column, i.message) for i in found] == [
        (4, 3, "upstream: missing required key 'address'")
    ]


def test_empty_listener_list(tmp_path: Path) -> None:
    found = errors(write(tmp_path, MINIMAL.replace('  - listen: "127.0.0.1:1110"\n', "  []\n")))
    assert [(i.line, i.column) for i in found] == [(2, 3)]
    assert "the list is empty" in found[0].message


def test_null_listeners_is_missing(tmp_path: Path) -> None:
    found = errors(write(tmp_path, MINIMAL.replace('  - listen: "127.0.0.1:1110"\n', "")))
    assert [(i.line, i.column, i.message) for i in found] == [
        (1, 1, "listeners: no listener configured")
    ]


def test_read_config_accepts_a_partial_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  connect_timeout: 3\nsession:\n  idle_timeout: 60\n")
    partial, warnings = read_config(path)
    assert partial.listeners == ()
    assert partial.upstream_address is None
    assert partial.connect_timeout == 3.0
    assert partial.source == str(path)
    assert [w.line for w in warnings] == [4]
    config, more = build_config(base=partial, listen=["127.0.0.1:1110"], upstream="[::1]:110")
    assert more == []
    assert config.listeners == (ListenerConfig("cli-0", Address("127.0.0.1", 1110)),)
    assert config.upstream == UpstreamConfig(Address("::1", 110), 3.0)
    assert config.session.idle_timeout == 60.0


def test_build_config_requires_listener_and_upstream(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(base=None)
    issues = info.value.issues
    assert [(i.file, i.line, i.column) for i in issues] == [(COMMAND_LINE, 0, 0)] * 2
    assert "--listen" in issues[0].message
    assert "--upstream" in issues[1].message
    assert str(info.value).splitlines()[0].startswith("<command line>: error: no listener")

    partial, _ = read_config(write(tmp_path, "session: {}\n"))
    with pytest.raises(ConfigError) as info:
        build_config(base=partial, listen=["127.0.0.1:1110"])
    (issue,) = info.value.issues
    assert issue.message.startswith("no upstream configured")
    assert str(tmp_path / "popguard.yaml") in issue.message


# --------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------


def test_overrides_win_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + "session:\n  idle_timeout: 900\n  idle_notice: false\n"
        + "audit:\n  file: a.jsonl\n  console: true\n"
        + "limits:\n  max_pipelined: 4\n",
    )
    base, _ = load_config(path)
    monkeypatch.chdir(tmp_path / ".")
    config, warnings = build_config(
        base=base,
        listen=["[::1]:2110", "0.0.0.0:2110"],
        upstream="pop.example.net:995",
        audit_file="cli.jsonl",
        idle_timeout=1200,
        connect_timeout=1.5,
        console=False,
    )
    assert warnings == []
    assert config.listeners == (
        ListenerConfig("cli-0", Address("::1", 2110)),
        ListenerConfig("cli-1", Address("0.0.0.0", 2110)),
    )
    assert config.upstream == UpstreamConfig(Address("pop.example.net", 995), 1.5)
    assert config.session == SessionConfig(idle_timeout=1200.0, idle_notice=False)
    assert config.audit == AuditConfig(file=os.path.join(os.getcwd(), "cli.jsonl"), console=False)
    assert config.limits.max_pipelined == 4  # untouched by flags


def test_no_overrides_keeps_file(tmp_path: Path) -> None:
    base, _ = load_config(write(tmp_path, MINIMAL))
    config, warnings = build_config(base=base)
    assert config == base
    assert warnings == []
    partial, _ = read_config(tmp_path / "popguard.yaml")
    assert build_config(base=partial)[0] == base


def test_build_config_from_flags_only() -> None:
    config, warnings = build_config(
        base=None, listen=["localhost:1110"], upstream="127.0.0.1:110", idle_timeout=30
    )
    assert config.listeners == (ListenerConfig("cli-0", Address("localhost", 1110)),)
    assert config.session.idle_timeout == 30.0
    assert [(w.file, w.line, w.severity) for w in warnings] == [(COMMAND_LINE, 0, "warning")]
    assert "--idle-timeout" in warnings[0].message
    assert "RFC 1939" in warnings[0].message


def test_invalid_flags_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            base=None,
            listen=["mail.example.com:110", "127.0.0.1:1", "127.0.0.1:1"],
            upstream="127.0.0.1",
            audit_file="",
            idle_timeout=0,
            connect_timeout=float("nan"),
        )
    messages = [i.message for i in info.value.issues]
    assert all(i.file == COMMAND_LINE and i.line == 0 for i in info.value.issues)
    assert [m.split(":")[0] for m in messages] == [
        "--listen",
        "--listen",
        "--upstream",
        "--connect-timeout",
        "--idle-timeout",
        "--audit-file",
    ]
    assert "given twice" in messages[1]
    # The flags were given, so "no listener/upstream configured" is not added.
    assert not any("configured" in m for m in messages)


def test_partial_config_defaults_match_config() -> None:
    partial = PartialConfig()
    assert partial.connect_timeout == UpstreamConfig(Address("h", 1)).connect_timeout
    assert partial.greeting_timeout == UpstreamConfig(Address("h", 1)).greeting_timeout
    fields = Config.__dataclass_fields__
    assert partial.shutdown_grace == fields["shutdown_grace"].default


# --------------------------------------------------------------------------
# Time limits before login: session.login_timeout, upstream.greeting_timeout
# --------------------------------------------------------------------------


def test_login_and_greeting_timeout_defaults(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, MINIMAL))
    assert config.session.login_timeout == 60.0
    assert config.upstream.greeting_timeout == 30.0
    settings = settings_from_config(config)
    assert (settings.login_timeout, settings.greeting_timeout) == (60.0, 30.0)
    # ServerSettings' own defaults are the same as the file's.
    fields = ServerSettings.__dataclass_fields__
    assert fields["login_timeout"].default == SessionConfig().login_timeout
    assert fields["greeting_timeout"].default == UpstreamConfig(Address("h", 1)).greeting_timeout


def test_login_and_greeting_timeouts_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "  greeting_timeout: 7.5\nsession:\n  login_timeout: 45\n",
    )
    config, warnings = load_config(path)
    assert warnings == []
    assert config.upstream == UpstreamConfig(
        Address("127.0.0.1", 110), connect_timeout=10.0, greeting_timeout=7.5
    )
    assert config.session == SessionConfig(login_timeout=45.0)
    assert isinstance(config.session.login_timeout, float)
    settings = settings_from_config(config)
    assert (settings.login_timeout, settings.greeting_timeout) == (45.0, 7.5)


def test_login_timeout_zero_means_no_limit(tmp_path: Path) -> None:
    config, warnings = load_config(write(tmp_path, MINIMAL + "session:\n  login_timeout: 0\n"))
    assert warnings == []
    assert config.session.login_timeout == 0.0


@pytest.mark.parametrize(
    ("extra", "line", "column", "fragment"),
    [
        # MINIMAL ends inside the upstream mapping, on line 5.
        ("  greeting_timeout: 0\n", 6, 21, "upstream.greeting_timeout: must be greater than 0"),
        ("  greeting_timeout: -1\n", 6, 21, "upstream.greeting_timeout: must be greater than 0"),
        ("  greeting_timeout: '30'\n", 6, 21, "write numbers without quotes"),
        ("  greeting_timeout: .inf\n", 6, 21, "finite"),
        ("  greeting_timeout: null\n", 6, 21, "expected a number of seconds, got null"),
        ("session:\n  login_timeout: -1\n", 7, 18, "session.login_timeout: must be at least 0"),
        ("session:\n  login_timeout: null\n", 7, 18, "got null; write 0 for no limit"),
        ("session:\n  login_timeout: true\n", 7, 18, "expected a number of seconds, got a bool"),
        ("session:\n  login_timeout: .nan\n", 7, 18, "finite"),
        ("session:\n  login_timout: 5\n", 7, 3, "(did you mean 'login_timeout'?)"),
        ("session:\n  greeting_timeout: 5\n", 7, 3, "'upstream.greeting_timeout'"),
    ],
)  # fmt: skip
def test_login_and_greeting_timeout_errors(
    tmp_path: Path, extra: str, line: int, column: int, fragment: str
) -> None:
    found = errors(write(tmp_path, MINIMAL + extra))
    assert len(found) == 1, found
    assert (found[0].line, found[0].column) == (line, column)
    assert fragment in found[0].message
    assert found[0].severity == "error"


def test_login_and_greeting_timeout_flags_win(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "  greeting_timeout: 20\nsession:\n  login_timeout: 45\n  idle_notice: false\n",
    )
    base, _ = load_config(path)
    config, warnings = build_config(base=base, login_timeout=0, greeting_timeout=2.5)
    assert warnings == []
    assert config.session == SessionConfig(idle_notice=False, login_timeout=0.0)
    assert config.upstream.greeting_timeout == 2.5
    assert config.upstream.connect_timeout == 10.0
    # Other flags keep the file's values (--idle-timeout used to rebuild the section).
    config, _ = build_config(base=base, idle_timeout=900, connect_timeout=3)
    assert config.session == SessionConfig(
        idle_timeout=900.0, idle_notice=False, login_timeout=45.0
    )
    assert config.upstream.greeting_timeout == 20.0
    partial, _ = read_config(path)
    assert build_config(base=partial)[0].upstream.greeting_timeout == 20.0


def test_invalid_login_and_greeting_timeout_flags() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            base=None,
            listen=["127.0.0.1:1110"],
            upstream="127.0.0.1:110",
            login_timeout=-1,
            greeting_timeout=0,
        )
    messages = [i.message for i in info.value.issues]
    assert messages == [
        "--greeting-timeout: must be greater than 0 seconds, got 0",
        "--login-timeout: must be at least 0 seconds, got -1",
    ]


def test_serve_flags_reach_the_server_settings(tmp_path: Path) -> None:
    from popguard.cli import _resolve, build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--listen",
            "127.0.0.1:1110",
            "--upstream",
            "127.0.0.1:110",
            "--login-timeout",
            "12.5",
            "--greeting-timeout",
            "4",
        ]
    )
    settings = settings_from_config(_resolve(args, upstream=args.upstream))
    assert (settings.login_timeout, settings.greeting_timeout) == (12.5, 4.0)


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "popguard"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(conf_dir, MINIMAL + "audit:\n  file: ../log/audit.jsonl\npolicies: policies/\n")
    monkeypatch.chdir(elsewhere)
    # Load through a relative path, from a different working directory.
    config, _ = load_config(os.path.relpath(conf_dir / "popguard.yaml"))
    assert config.audit.file == str(tmp_path / "etc" / "log" / "audit.jsonl")
    assert config.policies == str(conf_dir / "policies")


def test_absolute_audit_path_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "audit.jsonl"
    config, _ = load_config(write(tmp_path, MINIMAL + f"audit:\n  file: '{target}'\n"))
    assert config.audit.file == str(target)


def test_null_audit_file(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, MINIMAL + "audit:\n  file: null\n  console: false\n"))
    assert config.audit == AuditConfig(file=None, console=False)


# --------------------------------------------------------------------------
# The data types
# --------------------------------------------------------------------------


def test_issue_and_error_formatting() -> None:
    issue = ConfigIssue("p.yaml", 3, 7, "bad", "error")
    assert str(issue) == "p.yaml:3:7: error: bad"
    warning = ConfigIssue("p.yaml", 4, 1, "hm", "warning")
    error = ConfigError([issue, warning])
    assert str(error) == "p.yaml:3:7: error: bad\np.yaml:4:1: warning: hm"
    assert error.issues == (issue, warning)
    assert error.errors == (issue,)


def test_config_types_are_frozen() -> None:
    address = Address("::1", 110)
    with pytest.raises(AttributeError):
        address.port = 1  # type: ignore[misc]
    assert not hasattr(address, "__dict__")
    assert str(address) == "[::1]:110"
    assert str(Address("10.0.0.1", 110)) == "10.0.0.1:110"


# --------------------------------------------------------------------------
# audit: delivery keys (sinks, fsync, failure policy, syslog targets)
# --------------------------------------------------------------------------


def test_audit_delivery_keys(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "audit.key"
    key.parent.mkdir()
    key.write_text("k" * 64 + "\n")
    key.chmod(0o600)
    path = write(
        tmp_path,
        MINIMAL
        + """\
audit:
  file: audit.jsonl
  console: false
  stdout: yes
  fsync: always
  fsync_interval_ms: 200
  queue_size: 500
  on_failure: fail-closed
  durable_timeout_ms: 250
  hmac_key_file: keys/audit.key
  syslog:
    - address: "127.0.0.1:514"
    - address: "[::1]:6514"
      transport: tcp
      facility: local3
      max_message: 4096
      sd_id: "audit@12345"
""",
    )
    config, warnings = load_config(path)
    assert warnings == []
    assert config.audit == AuditConfig(
        file=str(tmp_path / "audit.jsonl"),
        console=False,
        stdout=True,
        fsync="always",
        fsync_interval_ms=200,
        queue_size=500,
        on_failure="fail-closed",
        durable_timeout_ms=250,
        hmac_key_file=str(key),
        syslog=(
            SyslogTarget(Address("127.0.0.1", 514), "udp", "auth", 2048, "popguard@32473"),
            SyslogTarget(Address("::1", 6514), "tcp", "local3", 4096, "audit@12345"),
        ),
    )


def test_audit_defaults_change_nothing(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, MINIMAL + "audit:\n  file: a.jsonl\n"))
    assert config.audit == AuditConfig(file=str(tmp_path / "a.jsonl"))
    assert config.audit.console
    assert not config.audit.stdout
    assert config.audit.syslog == ()
    assert config.audit.on_failure == "fail-open"


def test_tcp_syslog_default_max_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + 'audit:\n  syslog:\n    - address: "log.example.com:601"\n      transport: tcp\n',
    )
    config, _ = load_config(path)
    assert config.audit.syslog == (
        SyslogTarget(Address("log.example.com", 601), "tcp", "auth", 8192),
    )


def test_empty_syslog_list(tmp_path: Path) -> None:
    for text in ("audit:\n  syslog: []\n", "audit:\n  syslog:\n"):
        config, warnings = load_config(write(tmp_path, MINIMAL + text))
        assert config.audit.syslog == ()
        assert warnings == []


AUDIT_ERROR_CASES = [
    # (appended to MINIMAL, line, column, message fragment) -- MINIMAL is 5 lines
    ("audit:\n  fsync: sometimes\n", 7, 10, "expected one of always, interval, never"),
    ("audit:\n  fsync: alway\n", 7, 10, "did you mean 'always'?"),
    ("audit:\n  fsync: no\n", 7, 10, "got a boolean 'no'"),
    ("audit:\n  fsync_interval_ms: 0\n", 7, 22, "must be at least 1"),
    ("audit:\n  fsync_interval_ms: 0.5\n", 7, 22, "expected an integer, got a float"),
    ("audit:\n  queue_size: 0\n", 7, 15, "audit.queue_size: must be at least 1"),
    ("audit:\n  queue_size: '100'\n", 7, 15, "write numbers without quotes"),
    ("audit:\n  stdout: 1\n", 7, 11, "expected true or false"),
    ("audit:\n  on_failure: fail-close\n", 7, 15, "did you mean 'fail-closed'?"),
    ("audit:\n  durable_timeout_ms: -1\n", 7, 23, "must be at least 1"),
    ("audit:\n  hmac_key_file: ''\n", 7, 18, "empty path"),
    ("audit:\n  hmac_key_file: missing.key\n", 7, 18, "cannot open key file"),
    ("audit:\n  syslog: 127.0.0.1:514\n", 7, 11, "expected a list of syslog targets"),
    ("audit:\n  syslog:\n    - transport: udp\n", 8, 7, "missing required key 'address'"),
    ("audit:\n  syslog:\n    - 127.0.0.1:514\n", 8, 7, "expected a mapping"),
    ("audit:\n  syslog:\n    - address: 514\n", 8, 16, "expected a string"),
    ("audit:\n  syslog:\n    - address: localhost\n", 8, 16, "missing port"),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      transport: tls\n",
        9,
        18,
        "expected one of udp, tcp, got 'tls'",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      facility: local8\n",
        9,
        17,
        "got 'local8' (did you mean 'local7'?)",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      facility: 4\n",
        9,
        17,
        "got an integer",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      max_message: 100\n",
        9,
        20,
        "at least 480 (RFC 5426",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      max_message: 70000\n",
        9,
        20,
        "at most 65507",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      sd_id: 'has space@1'\n",
        9,
        14,
        "invalid SD-ID",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      sd_id: 'x@y'\n",
        9,
        14,
        "NAME@ENTERPRISE-NUMBER",
    ),
    (
        "audit:\n  syslog:\n    - address: 'h:514'\n      port: 514\n",
        9,
        7,
        "audit.syslog[0]: unknown key 'port'",
    ),
]


@pytest.mark.parametrize(("extra", "line", "column", "fragment"), AUDIT_ERROR_CASES)
def test_audit_error_location(
    tmp_path: Path, extra: str, line: int, column: int, fragment: str
) -> None:
    found = errors(write(tmp_path, MINIMAL + extra))
    assert len(found) == 1, found
    assert (found[0].line, found[0].column) == (line, column)
    assert fragment in found[0].message


def test_tcp_syslog_accepts_large_messages(tmp_path: Path) -> None:
    text = "audit:\n  syslog:\n    - address: 'h:514'\n      transport: tcp\n"
    config, _ = load_config(write(tmp_path, MINIMAL + text + "      max_message: 70000\n"))
    assert config.audit.syslog[0].max_message == 70000
    found = errors(write(tmp_path, MINIMAL + text + "      max_message: 2000000\n"))
    assert "at most 1048576" in found[0].message


def test_hmac_key_file_must_not_be_readable_by_others(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    key.write_text("k" * 64)
    key.chmod(0o644)
    found = errors(write(tmp_path, MINIMAL + "audit:\n  hmac_key_file: audit.key\n"))
    assert (found[0].line, found[0].column) == (7, 18)
    assert "chmod 600" in found[0].message
    key.chmod(0o600)
    key.write_text("short")
    found = errors(write(tmp_path, MINIMAL + "audit:\n  hmac_key_file: audit.key\n"))
    assert "at least 32" in found[0].message


@pytest.mark.parametrize(
    ("extra", "line", "fragment"),
    [
        ("audit:\n  fsync: always\n", 7, "audit.fsync has no effect without audit.file"),
        ("audit:\n  on_failure: fail-closed\n", 7, "fail-closed has no effect"),
        (
            "audit:\n  file: a.jsonl\n  fsync: never\n  fsync_interval_ms: 50\n",
            9,
            "fsync_interval_ms has no effect with fsync: never",
        ),
        (
            "audit:\n  syslog:\n    - address: '10.0.0.1:514'\n    - address: '10.0.0.1:514'\n",
            9,
            "every record would be sent twice",
        ),
    ],
)
def test_audit_warnings(tmp_path: Path, extra: str, line: int, fragment: str) -> None:
    _, warnings = load_config(write(tmp_path, MINIMAL + extra))
    assert len(warnings) == 1, warnings
    assert warnings[0].severity == "warning"
    assert warnings[0].line == line
    assert fragment in warnings[0].message


def test_audit_file_flag_keeps_the_other_audit_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "audit:\n  file: a.jsonl\n  fsync: always\n  on_failure: fail-closed\n",
    )
    base, _ = load_config(path)
    config, _ = build_config(base=base, audit_file=str(tmp_path / "b.jsonl"), console=False)
    assert config.audit == AuditConfig(
        file=str(tmp_path / "b.jsonl"), console=False, fsync="always", on_failure="fail-closed"
    )


def test_example_file_mentions_every_audit_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in AuditConfig.__dataclass_fields__:
        assert f"{name}:" in text
    for name in SyslogTarget.__dataclass_fields__:
        assert f"{name}:" in text


# --------------------------------------------------------------------------
# TLS: listeners (toward clients) and the upstream
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """Real certificates and keys (trustme), and some broken files."""

    ca: Path  # the CA's certificate
    cert: Path  # localhost's certificate chain
    key: Path  # its key
    other_cert: Path  # another name's certificate...
    other_key: Path  # ...and key, which does not match ``cert``
    combined: Path  # localhost's key and chain in one file
    encrypted_key: Path  # ``key`` protected with a passphrase
    junk: Path  # not PEM at all


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    trustme = pytest.importorskip("trustme")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    other = ca.issue_cert("other.example.org")
    pki = PKI(
        ca=directory / "ca.pem",
        cert=directory / "localhost.crt",
        key=directory / "localhost.key",
        other_cert=directory / "other.crt",
        other_key=directory / "other.key",
        combined=directory / "localhost.pem",
        encrypted_key=directory / "encrypted.key",
        junk=directory / "junk.txt",
    )
    ca.cert_pem.write_to_path(str(pki.ca))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(pki.cert), append=True)
    leaf.private_key_pem.write_to_path(str(pki.key))
    for blob in other.cert_chain_pems:
        blob.write_to_path(str(pki.other_cert), append=True)
    other.private_key_pem.write_to_path(str(pki.other_key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pki.combined))
    private_key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    pki.encrypted_key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    pki.junk.write_text("hello, not a certificate\n")
    return pki


def locate(text: str, needle: str) -> tuple[int, int]:
    """The 1-based line and column of *needle*'s first occurrence in *text*."""
    index = text.index(needle)
    return (text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1)


def with_listener(lines: str, upstream: str = "") -> str:
    """A complete file whose one listener has *lines* (indented 4) added."""
    return (
        'listeners:\n  - listen: "127.0.0.1:1110"\n'
        + textwrap.indent(textwrap.dedent(lines), "    ")
        + 'upstream:\n  address: "127.0.0.1:110"\n'
        + textwrap.indent(textwrap.dedent(upstream), "  ")
    )


def test_tls_defaults(tmp_path: Path) -> None:
    config, warnings = load_config(write(tmp_path, MINIMAL))
    assert warnings == []
    assert config.listeners[0].tls == ListenerTLS()
    assert config.listeners[0].tls.mode == "none"
    assert config.upstream.tls == UpstreamTLS()
    assert UpstreamTLS().verify is True
    assert UpstreamTLS().min_version == ListenerTLS().min_version == "TLSv1.2"
    assert PartialConfig().upstream_tls == UpstreamTLS()


def test_listener_tls_keys(tmp_path: Path, pki: PKI) -> None:
    text = f"""\
        listeners:
          - name: pop3s
            listen: "127.0.0.1:1995"
            tls: implicit
            cert: '{pki.cert}'
            key: '{pki.key}'
            sni:
              other.example.org:
                cert: '{pki.other_cert}'
                key: '{pki.other_key}'
              Mail.Example.NET: {{cert: '{pki.combined}', key: '{pki.combined}'}}
            tls_min_version: TLSv1.3
          - name: pop3
            listen: "127.0.0.1:1110"
            tls: starttls
            cert: '{pki.combined}'
            key: '{pki.combined}'
          - name: plain
            listen: "127.0.0.1:1111"
            tls: none
        upstream:
          address: "127.0.0.1:110"
        """
    config, warnings = load_config(write(tmp_path, text))
    assert warnings == []
    pop3s, pop3, plain = config.listeners
    assert pop3s.tls == ListenerTLS(
        mode="implicit",
        cert=CertKey(str(pki.cert), str(pki.key)),
        sni={
            "other.example.org": CertKey(str(pki.other_cert), str(pki.other_key)),
            "Mail.Example.NET": CertKey(str(pki.combined), str(pki.combined)),
        },
        min_version="TLSv1.3",
    )
    assert pop3.tls == ListenerTLS(
        mode="starttls", cert=CertKey(str(pki.combined), str(pki.combined))
    )
    assert plain.tls == ListenerTLS()


def test_listener_tls_paths_are_relative_to_the_config_file(
    tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "tls").mkdir(parents=True)
    for source in (pki.cert, pki.key, pki.ca):
        (conf_dir / "tls" / source.name).write_bytes(source.read_bytes())
    write(
        conf_dir,
        with_listener(
            """\
            tls: implicit
            cert: tls/localhost.crt
            key: tls/localhost.key
            """,
            "tls: implicit\nca_file: tls/ca.pem\n",
        ),
    )
    monkeypatch.chdir(tmp_path)
    config, _ = load_config("etc/popguard.yaml")
    assert config.listeners[0].tls.cert == CertKey(
        str(conf_dir / "tls" / "localhost.crt"), str(conf_dir / "tls" / "localhost.key")
    )
    assert config.upstream.tls.ca_file == str(conf_dir / "tls" / "ca.pem")


def test_listener_tls_loads_into_a_server_context(tmp_path: Path, pki: PKI) -> None:
    """What the loader accepts, popguard.shell.tls can build a context from."""
    text = with_listener(f"tls: implicit\ncert: '{pki.cert}'\nkey: '{pki.key}'\n")
    config, _ = load_config(write(tmp_path, text))
    context = server_context(config.listeners[0].tls)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def one_error(path: Path) -> ConfigIssue:
    found = errors(path)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("lines", "needle", "fragment"),
    [
        (
            "tls: yes\n",
            "yes",
            "listeners[0].tls: expected one of none, implicit, starttls, got a boolean",
        ),
        ("tls: implict\n", "implict", "got 'implict' (did you mean 'implicit'?)"),
        (
            "tls: implicit\n",
            "implicit",
            "listeners[0]: missing 'cert' and 'key' (PEM files), required with tls: implicit",
        ),
        (
            "tls: starttls\ncert: '{cert}'\n",
            "starttls",
            "missing 'key' (a PEM private key file), required with tls: starttls",
        ),
        ("tls: implicit\nkey: '{key}'\n", "implicit", "missing 'cert' (a PEM certificate file)"),
        ("tls: implicit\ncert: null\nkey: '{key}'\n", "implicit", "missing 'cert'"),
        (
            "tls: implicit\ncert: '{missing}'\nkey: '{key}'\n",
            "'{missing}'",
            "listeners[0].cert: cannot read {missing}: No such file or directory",
        ),
        (
            "tls: implicit\ncert: '{cert}'\nkey: '{missing}'\n",
            "'{missing}'",
            "listeners[0].key: cannot read {missing}: No such file",
        ),
        (
            "tls: implicit\ncert: '{dir}'\nkey: '{key}'\n",
            "'{dir}'",
            "listeners[0].cert: cannot read {dir}: Is a directory",
        ),
        ("tls: implicit\ncert: ''\nkey: '{key}'\n", "''", "listeners[0].cert: empty path"),
        ("tls: implicit\ncert: 5\nkey: '{key}'\n", "5", "listeners[0].cert: expected a string"),
        (
            "tls: implicit\ncert: '{junk}'\nkey: '{key}'\n",
            "'{junk}'",
            "listeners[0].cert: {junk} holds no PEM certificate",
        ),
        ("tls: implicit\ncert: '{key}'\nkey: '{key}'\n", "'{key}'", "holds no PEM certificate"),
        (
            "tls: implicit\ncert: '{cert}'\nkey: '{junk}'\n",
            "'{junk}'",
            "listeners[0].key: {junk} holds no PEM private key",
        ),
        ("tls: implicit\ncert: '{cert}'\nkey: '{cert}'\n", "key: ", "holds no PEM private key"),
        (
            "tls: implicit\ncert: '{cert}'\nkey: '{other_key}'\n",
            "'{cert}'",
            "listeners[0].cert: the certificate {cert} does not match the key {other_key}",
        ),
        (
            "tls: implicit\ncert: '{cert}'\nkey: '{encrypted_key}'\n",
            "'{encrypted_key}'",
            "listeners[0].key: {encrypted_key} is encrypted (it needs a passphrase)",
        ),
        (
            "tls_min_version: TLSv1.1\n",
            "TLSv1.1",
            "listeners[0].tls_min_version: TLSv1.1 is not allowed toward clients: RFC 8996",
        ),
        ("tls_min_version: TLSv1\n", "TLSv1", "TLSv1 is not allowed toward clients"),
        ("tls_min_version: 1.2\n", "1.2", "expected one of TLSv1.2, TLSv1.3, got a float"),
        ("tls_min_version: tlsv1.3\n", "tlsv1.3", "(did you mean 'TLSv1.3'?)"),
        (
            "tls_verify: false\n",
            "tls_verify",
            "unknown key 'tls_verify' (did you mean 'upstream.tls_verify'?)",
        ),
        ("sni: []\n", "[]", "listeners[0].sni: expected a mapping, got a list"),
    ],
)
def test_listener_tls_errors(
    tmp_path: Path, pki: PKI, lines: str, needle: str, fragment: str
) -> None:
    names = {
        "cert": pki.cert,
        "key": pki.key,
        "other_key": pki.other_key,
        "encrypted_key": pki.encrypted_key,
        "junk": pki.junk,
        "missing": tmp_path / "nope.pem",
        "dir": tmp_path,
    }
    text = with_listener(lines.format(**names))
    issue = one_error(write(tmp_path, text))
    # `needle` locates the value (or key) the error must point at.
    needle = needle.format(**names)
    if needle.startswith("key: "):
        line, column = locate(text, needle)
        column += len("key: ")
    else:
        line, column = locate(text, needle)
    assert (issue.line, issue.column) == (line, column), issue
    assert fragment.format(**names) in issue.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_key(tmp_path: Path, pki: PKI) -> None:
    key = tmp_path / "private.key"
    key.write_bytes(pki.key.read_bytes())
    key.chmod(0)
    text = with_listener(f"tls: implicit\ncert: '{pki.cert}'\nkey: '{key}'\n")
    issue = one_error(write(tmp_path, text))
    assert issue.message == f"listeners[0].key: cannot read {key}: Permission denied"
    assert (issue.line, issue.column) == locate(text, f"'{key}'")


def test_sni_errors(tmp_path: Path, pki: PKI) -> None:
    pair = f"{{cert: '{pki.cert}', key: '{pki.key}'}}"
    text = f"""\
        listeners:
          - listen: "127.0.0.1:1995"
            tls: implicit
            cert: '{pki.cert}'
            key: '{pki.key}'
            sni:
              "*.example.org": {pair}
              192.0.2.1: {pair}
              mail.example.org.: {pair}
              a.example.org: {pair}
              A.Example.Org: {pair}
              b.example.org: {{cert: '{pki.cert}'}}
              c.example.org:
              d.example.org: {{cert: '{pki.cert}', key: '{pki.other_key}'}}
              e.example.org: {{cert: '{pki.cert}', key: '{pki.key}', chain: x}}
              "bad name": {pair}
        upstream:
          address: "127.0.0.1:110"
        """
    found = errors(write(tmp_path, text))
    assert [(issue.line, issue.message) for issue in found] == [
        (
            7,
            "listeners[0].sni: wildcard '*.example.org' is not supported: SNI names are "
            "matched exactly; list each name (a wildcard certificate may serve several)",
        ),
        (8, "listeners[0].sni: '192.0.2.1' is an IP address: SNI never carries one (RFC 6066 §3)"),
        (
            9,
            "listeners[0].sni: write 'mail.example.org.' without the trailing dot (RFC 6066 §3)",
        ),
        (
            11,
            "listeners[0].sni: 'A.Example.Org' is given twice (names are case-insensitive; "
            "first on line 10)",
        ),
        (
            12,
            "listeners[0].sni.b.example.org: missing 'key' (a PEM private key file), "
            "required for each SNI name",
        ),
        (
            13,
            "listeners[0].sni.c.example.org: missing 'cert' and 'key' (PEM files), "
            "required for each SNI name",
        ),
        (
            14,
            f"listeners[0].sni.d.example.org.cert: the certificate {pki.cert} does not "
            f"match the key {pki.other_key}",
        ),
        (
            15,
            "listeners[0].sni.e.example.org: unknown key 'chain' (valid keys: cert, key)",
        ),
        (16, "listeners[0].sni: invalid host name 'bad name'"),
    ]


def test_tls_settings_without_tls_warn(tmp_path: Path, pki: PKI) -> None:
    text = with_listener(
        f"""\
        cert: '{pki.cert}'
        key: '{pki.junk}'
        sni: {{a.example.org: {{cert: '{pki.cert}', key: '{pki.other_key}'}}}}
        tls_min_version: TLSv1.3
        """
    )
    config, warnings = load_config(write(tmp_path, text))
    assert config.listeners[0].tls == ListenerTLS()
    # The files are not checked: they are not used.
    assert [(w.line, w.column, w.severity) for w in warnings] == [
        (3, 5, "warning"),
        (4, 5, "warning"),
        (5, 5, "warning"),
        (6, 5, "warning"),
    ]
    assert warnings[0].message == (
        "listeners[0].cert: cert/key ignored without tls; set listeners[0].tls "
        "to implicit or starttls to use them"
    )
    assert "listeners[0].key: cert/key ignored without tls" in warnings[1].message
    assert "listeners[0].sni: cert/key ignored without tls" in warnings[2].message
    assert warnings[3].message == "listeners[0].tls_min_version has no effect without tls"
    # Writing the defaults out warns about nothing.
    plain = with_listener("tls: none\ncert: null\nsni: {}\ntls_min_version: TLSv1.2\n")
    assert load_config(write(tmp_path, plain, "plain.yaml"))[1] == []


def test_listener_with_tls_errors_reports_the_others_too(tmp_path: Path, pki: PKI) -> None:
    text = f"""\
        listeners:
          - listen: "127.0.0.1:99999"
            tls: implicit
          - listen: "127.0.0.1:1110"
            tls: starttls
            cert: '{pki.cert}'
            key: '{pki.other_key}'
        upstream:
          address: "127.0.0.1:110"
          tls: maybe
        """
    found = errors(write(tmp_path, text))
    assert [issue.line for issue in found] == [2, 3, 6, 10]


# -- the upstream --------------------------------------------------------------


def test_upstream_tls_keys(tmp_path: Path, pki: PKI) -> None:
    text = with_listener(
        "",
        f"""\
        tls: starttls
        ca_file: '{pki.ca}'
        server_name: pop.example.org
        tls_verify: true
        tls_min_version: TLSv1.3
        """,
    )
    config, warnings = load_config(write(tmp_path, text))
    assert warnings == []
    assert config.upstream.tls == UpstreamTLS(
        mode="starttls",
        ca_file=str(pki.ca),
        server_name="pop.example.org",
        verify=True,
        min_version="TLSv1.3",
    )
    assert legacy_warnings(config.upstream.tls) == []
    assert client_context(config.upstream.tls).minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("name", ["192.0.2.7", "2001:db8::7", "pop3.example.org"])
def test_upstream_server_name_may_be_an_address(tmp_path: Path, name: str) -> None:
    text = with_listener("", f"tls: implicit\nserver_name: '{name}'\n")
    config, _ = load_config(write(tmp_path, text))
    assert config.upstream.tls.server_name == name


def test_upstream_tls_verify_off_warns(tmp_path: Path) -> None:
    text = with_listener("", "tls: implicit\ntls_verify: false\n")
    config, warnings = load_config(write(tmp_path, text))
    assert config.upstream.tls == UpstreamTLS(mode="implicit", verify=False)
    assert [(w.line, w.column, w.severity) for w in warnings] == [(6, 15, "warning")]
    assert warnings[0].message == (
        "upstream.tls_verify: certificate verification is off: anyone on the path "
        "can read the mail and passwords"
    )
    # popguard.shell.tls warns about the same at startup.
    assert legacy_warnings(config.upstream.tls) != []


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
def test_upstream_legacy_tls_version_warns(tmp_path: Path, version: str) -> None:
    text = with_listener("", f"tls: implicit\ntls_min_version: {version}\n")
    config, warnings = load_config(write(tmp_path, text))
    assert config.upstream.tls.min_version == version
    assert [(w.line, w.column) for w in warnings] == [(6, 20)]
    assert warnings[0].severity == "warning"
    assert "upstream.tls_min_version: legacy TLS version allowed for the upstream" in (
        warnings[0].message
    )
    assert version in warnings[0].message
    assert legacy_warnings(config.upstream.tls) != []


def test_upstream_ca_file_unused_without_verification(tmp_path: Path, pki: PKI) -> None:
    text = with_listener("", f"tls: implicit\nca_file: '{pki.ca}'\ntls_verify: no\n")
    _, warnings = load_config(write(tmp_path, text))
    assert [(w.line, w.message) for w in warnings] == [
        (6, "upstream.ca_file has no effect with tls_verify: false"),
        (7, "upstream.tls_verify: certificate verification is off: anyone on the path "
            "can read the mail and passwords"),
    ]  # fmt: skip


def test_upstream_tls_keys_without_tls_warn(tmp_path: Path, pki: PKI) -> None:
    text = with_listener(
        "",
        f"""\
        ca_file: '{pki.ca}'
        server_name: pop.example.org
        tls_verify: false
        tls_min_version: TLSv1
        """,
    )
    config, warnings = load_config(write(tmp_path, text))
    assert config.upstream.tls.mode == "none"
    assert [(w.line, w.column, w.severity) for w in warnings] == [
        (5, 3, "warning"),
        (6, 3, "warning"),
        (7, 3, "warning"),
        (8, 3, "warning"),
    ]
    assert warnings[0].message == (
        "upstream.ca_file has no effect without upstream.tls (implicit or starttls)"
    )
    assert warnings[2].message.startswith("upstream.tls_verify has no effect")
    # With no TLS there is nothing weakened to warn about.
    assert not any("verification is off" in w.message for w in warnings)
    # The defaults, written out, warn about nothing.
    defaults = with_listener(
        "", "tls: none\nca_file: null\nserver_name: null\ntls_verify: true\n"
        "tls_min_version: TLSv1.2\n",
    )  # fmt: skip
    assert load_config(write(tmp_path, defaults, "defaults.yaml"))[1] == []


@pytest.mark.parametrize(
    ("lines", "needle", "fragment"),
    [
        (
            "tls: STARTTLS\n",
            "STARTTLS",
            "upstream.tls: expected one of none, implicit, starttls, got 'STARTTLS' (did",
        ),
        (
            "tls: implicit\nca_file: '{missing}'\n",
            "'{missing}'",
            "upstream.ca_file: cannot read {missing}: No such file or directory",
        ),
        (
            "tls: implicit\nca_file: '{junk}'\n",
            "'{junk}'",
            "upstream.ca_file: {junk} holds no PEM certificate",
        ),
        (
            "tls: implicit\nca_file: '{key}'\n",
            "'{key}'",
            "upstream.ca_file: {key} holds no PEM certificate",
        ),
        ("ca_file: '{missing}'\n", "'{missing}'", "cannot read"),  # checked even without tls
        (
            "tls: implicit\nserver_name: 'a b'\n",
            "'a b'",
            "upstream.server_name: invalid host name 'a b'",
        ),
        (
            "tls: implicit\nserver_name: 12345\n",
            "12345",
            "upstream.server_name: expected a string, got an integer '12345'; put it in quotes",
        ),
        (
            "tls: implicit\ntls_verify: 'no'\n",
            "'no'",
            "upstream.tls_verify: expected true or false, got a string",
        ),
        (
            "tls: implicit\ntls_min_version: SSLv3\n",
            "SSLv3",
            "expected one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, got 'SSLv3'",
        ),
        (
            "cert: x.pem\n",
            "cert",
            "upstream: unknown key 'cert' (did you mean 'listeners[N].cert'? it is set per",
        ),
        ("tls_verfy: true\n", "tls_verfy", "(did you mean 'tls_verify'?)"),
    ],
)
def test_upstream_tls_errors(
    tmp_path: Path, pki: PKI, lines: str, needle: str, fragment: str
) -> None:
    names = {"missing": tmp_path / "nope.pem", "junk": pki.junk, "key": pki.key}
    text = with_listener("", lines.format(**names))
    issue = one_error(write(tmp_path, text))
    assert (issue.line, issue.column) == locate(text, needle.format(**names))
    assert fragment.format(**names) in issue.message


def test_tls_errors_read_as_file_line_column(tmp_path: Path, pki: PKI) -> None:
    """What ``popguard check-config`` prints (it calls read_config)."""
    text = with_listener(f"tls: implicit\ncert: '{pki.cert}'\nkey: '{pki.other_key}'\n")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert str(info.value) == (
        f"{path}:4:11: error: listeners[0].cert: the certificate {pki.cert} "
        f"does not match the key {pki.other_key}"
    )


def test_check_config_prints_tls_errors(
    tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    from popguard.cli import main

    text = with_listener(
        f"tls: starttls\ncert: '{pki.junk}'\nkey: '{pki.key}'\n",
        "tls: implicit\ntls_verify: false\n",
    )
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:4:11: error: listeners[0].cert: {pki.junk} holds no PEM certificate "
        "('-----BEGIN CERTIFICATE-----')",
        f"{path}:9:15: warning: upstream.tls_verify: certificate verification is off: "
        "anyone on the path can read the mail and passwords",
    ]


# -- command-line flags --------------------------------------------------------


def test_listen_tls_flags(tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pki.cert.parent)
    config, warnings = build_config(
        base=None,
        listen=["127.0.0.1:1995", "[::1]:1995"],
        upstream="127.0.0.1:110",
        listen_tls="implicit",
        tls_cert=pki.cert.name,
        tls_key=pki.key.name,
    )
    assert warnings == []
    tls = ListenerTLS(mode="implicit", cert=CertKey(str(pki.cert), str(pki.key)))
    assert [listener.tls for listener in config.listeners] == [tls, tls]
    config, _ = build_config(
        base=None, listen=["127.0.0.1:1110"], upstream="127.0.0.1:110", listen_tls="none"
    )
    assert config.listeners[0].tls == ListenerTLS()


def test_listen_flags_replace_the_files_tls_listeners(tmp_path: Path, pki: PKI) -> None:
    text = with_listener(f"tls: implicit\ncert: '{pki.cert}'\nkey: '{pki.key}'\n")
    base, _ = load_config(write(tmp_path, text))
    assert base.listeners[0].tls.mode == "implicit"
    kept, _ = build_config(base=base)
    assert kept.listeners == base.listeners
    replaced, _ = build_config(base=base, listen=["127.0.0.1:2110"])
    assert replaced.listeners[0].tls == ListenerTLS()


LISTEN = ["127.0.0.1:1"]


@pytest.mark.parametrize(
    ("flags", "messages"),
    [
        (
            {"listen_tls": "implicit"},
            ["--tls, --tls-cert, --tls-key: the TLS flags apply to the --listen listeners"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "implicit", "tls_cert": None, "tls_key": None},
            ["--tls implicit: missing --tls-cert FILE and --tls-key FILE"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "starttls", "tls_key": None},
            ["--tls starttls: missing --tls-key FILE"],
        ),
        (
            {"listen": LISTEN, "listen_tls": None},
            ["--tls-cert and --tls-key need --tls implicit or --tls starttls"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "none"},
            ["--tls-cert and --tls-key need --tls implicit or --tls starttls"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "pop3s"},
            ["--tls: expected one of none, implicit, starttls, got 'pop3s'"],
        ),
        ({"listen": LISTEN, "listen_tls": "implicit", "tls_cert": ""}, ["--tls-cert: empty path"]),
        (
            {"listen": LISTEN, "listen_tls": "implicit", "tls_key": "{other_key}"},
            ["--tls-cert: the certificate {cert} does not match the key {other_key}"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "implicit", "tls_cert": "{junk}"},
            ["--tls-cert: {junk} holds no PEM certificate"],
        ),
        (
            {"listen": LISTEN, "listen_tls": "implicit", "tls_key": "{encrypted_key}"},
            ["--tls-key: {encrypted_key} is encrypted"],
        ),
        (
            {"upstream_tls": "tls"},
            ["--upstream-tls: expected one of none, implicit, starttls, got 'tls'"],
        ),
        ({"upstream_ca_file": "{junk}"}, ["--upstream-ca-file: {junk} holds no PEM certificate"]),
        ({"upstream_ca_file": ""}, ["--upstream-ca-file: empty path"]),
        ({"upstream_server_name": "a..b"}, ["--upstream-server-name: invalid host name 'a..b'"]),
    ],
)
def test_tls_flag_errors(pki: PKI, flags: dict[str, object], messages: list[str]) -> None:
    names = {
        "cert": pki.cert,
        "other_key": pki.other_key,
        "junk": pki.junk,
        "encrypted_key": pki.encrypted_key,
    }
    arguments: dict[str, object] = {"listen": [], "upstream": "127.0.0.1:110"}
    if "listen_tls" in flags:
        arguments.update(tls_cert=str(pki.cert), tls_key=str(pki.key))
    arguments.update(flags)
    if not arguments["listen"]:
        arguments["base"] = PartialConfig(listeners=(ListenerConfig("a", Address("127.0.0.1", 1)),))
    else:
        arguments["base"] = None
    for name, value in arguments.items():
        if isinstance(value, str):
            arguments[name] = value.format(**names)
    with pytest.raises(ConfigError) as info:
        build_config(**arguments)  # type: ignore[arg-type]
    found = [issue.message for issue in info.value.errors]
    assert len(found) == len(messages), found
    for message, expected in zip(found, messages, strict=True):
        assert message.startswith(expected.format(**names)), message
    assert all(issue.file == COMMAND_LINE for issue in info.value.issues)


def test_upstream_tls_flags_override_the_file(
    tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = with_listener("", f"tls: implicit\nserver_name: file.example.org\nca_file: '{pki.ca}'\n")
    partial, _ = read_config(write(tmp_path, text))
    assert partial.upstream_tls.mode == "implicit"
    config, warnings = build_config(base=partial, upstream_tls="starttls")
    assert warnings == []
    assert config.upstream.tls == UpstreamTLS(
        mode="starttls", ca_file=str(pki.ca), server_name="file.example.org"
    )
    monkeypatch.chdir(pki.ca.parent)
    config, warnings = build_config(
        base=partial,
        upstream="pop.example.net:995",
        upstream_ca_file=pki.ca.name,
        upstream_server_name="cli.example.org",
        upstream_tls_verify=False,
    )
    assert config.upstream.tls == UpstreamTLS(
        mode="implicit", ca_file=str(pki.ca), server_name="cli.example.org", verify=False
    )
    assert [(w.file, w.severity, w.message) for w in warnings] == [
        (
            COMMAND_LINE,
            "warning",
            "--upstream-tls-insecure: certificate verification is off: anyone on the "
            "path can read the mail and passwords",
        )
    ]
    # A Config as the base keeps its upstream TLS too.
    base, _ = load_config(tmp_path / "popguard.yaml")
    assert build_config(base=base)[0] == base
    assert build_config(base=base, upstream_tls="none")[0].upstream.tls.mode == "none"


def test_upstream_tls_flags_without_tls_warn(pki: PKI) -> None:
    config, warnings = build_config(
        base=None,
        listen=["127.0.0.1:1110"],
        upstream="127.0.0.1:110",
        upstream_ca_file=str(pki.ca),
        upstream_server_name="pop.example.org",
        upstream_tls_verify=False,
    )
    assert config.upstream.tls.mode == "none"
    assert [w.message.split(" ")[0] for w in warnings] == [
        "--upstream-ca-file",
        "--upstream-server-name",
        "--upstream-tls-insecure",
    ]
    assert all("has no effect without TLS to the upstream" in w.message for w in warnings)
    config, warnings = build_config(
        base=None,
        listen=["127.0.0.1:1110"],
        upstream="127.0.0.1:995",
        upstream_tls="implicit",
        upstream_tls_verify=True,
    )
    assert config.upstream.tls == UpstreamTLS(mode="implicit")
    assert warnings == []


def test_example_file_documents_tls() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in ("tls:", "cert:", "key:", "sni:", "tls_min_version:", "ca_file:"):
        assert key in text
    for key in ("server_name:", "tls_verify:"):
        assert key in text
    for reference in ("RFC 8314", "RFC 2595", "RFC 8996", "995"):
        assert reference in text
    for flag in ("--tls ", "--tls-cert", "--tls-key", "--upstream-tls", "--upstream-ca-file"):
        assert flag in text
    for flag in ("--upstream-server-name", "--upstream-tls-insecure"):
        assert flag in text
    config, _ = load_config(EXAMPLE)
    assert all(listener.tls == ListenerTLS() for listener in config.listeners)
    assert config.upstream.tls == UpstreamTLS()


# --------------------------------------------------------------------------
# PROXY protocol on listeners
# --------------------------------------------------------------------------


def test_proxy_protocol_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        listeners:
          - name: lb
            listen: "127.0.0.1:1110"
            proxy_protocol: {trusted: ["10.0.0.5/32", "2001:db8::/32"], required: false, timeout: 3}
            send_proxy: v2
        upstream: {address: "127.0.0.1:110"}
        """,
    )
    config, _ = read_config(str(path))
    (listener,) = config.listeners
    assert listener.send_proxy == "v2"
    proxy = listener.proxy_protocol
    assert proxy is not None
    assert [str(n) for n in proxy.trusted] == ["10.0.0.5/32", "2001:db8::/32"]
    assert (proxy.required, proxy.timeout) == (False, 3.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{required: true}", "missing required key 'trusted'"),
        ('{trusted: ["10.0.0.5/24"]}', "has host bits set"),
        ('{trusted: ["10.0.0.5/32"], timeout: 1}', "at least 3 seconds"),
        ('{trusted: ["10.0.0.5/32"], trused: 1}', "trused"),
    ],
)
def test_proxy_protocol_errors(tmp_path: Path, value: str, message: str) -> None:
    path = write(
        tmp_path,
        f"""
        listeners:
          - listen: "127.0.0.1:1110"
            proxy_protocol: {value}
        upstream: {{address: "127.0.0.1:110"}}
        """,
    )
    found = errors(path)
    assert any(message in issue.message and issue.line == 4 for issue in found), found


def test_admin_listen(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        listeners: [{listen: "127.0.0.1:1110"}]
        upstream: {address: "127.0.0.1:110"}
        admin: {listen: "127.0.0.1:9110"}
        """,
    )
    config, _ = load_config(path)
    assert config.admin_listen is not None
    assert (config.admin_listen.host, config.admin_listen.port) == ("127.0.0.1", 9110)
    bad = write(
        tmp_path,
        """
        listeners: [{listen: "127.0.0.1:1110"}]
        upstream: {address: "127.0.0.1:110"}
        admin: {listen: "nowhere"}
        """,
        "bad.yaml",
    )
    assert any("admin.listen" in issue.message for issue in errors(bad))


# --------------------------------------------------------------------------
# workers:
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", 1),
        ("workers: 1\n", 1),
        ("workers: 4\n", 4),
        ("workers: 256\n", 256),
        ("workers: auto\n", "auto"),
    ],
)
def test_workers(tmp_path: Path, extra: str, expected: object) -> None:
    config, warnings = load_config(write(tmp_path, MINIMAL + extra))
    assert config.workers == expected
    if expected == 1:
        assert warnings == []
    else:
        # Without shared state, limits count per worker: said once, at the key.
        assert [(w.line, w.severity) for w in warnings] == [(6, "warning")]
        assert "count per worker without shared_state" in warnings[0].message
    shared = "shared_state: {url: 'redis://127.0.0.1:6379/0'}\n"
    config, warnings = load_config(write(tmp_path, MINIMAL + extra + shared))
    assert config.shared_state is not None
    assert config.shared_state.url == "redis://127.0.0.1:6379/0"
    assert warnings == []


WORKERS_ERRORS = [
    # (the value, on line 6 column 10; a fragment of the message)
    ("0", "workers: must be at least 1 (one process at least; or 'auto'), got 0"),
    ("-2", "workers: must be at least 1"),
    ("257", "workers: at most 256, got 257"),
    ("100000", "workers: at most 256, got 100000"),
    ("2.5", "workers: expected an integer, got a float"),
    ("true", "workers: expected an integer, got a boolean"),
    ("'4'", "workers: expected one of auto, got '4'"),
    ("fast", "workers: expected one of auto, got 'fast'"),
    ("Auto", "(did you mean 'auto'?)"),
    ("[2]", "workers: expected an integer, got a list"),
    ("null", "workers: expected an integer, got null"),
]


@pytest.mark.parametrize(("value", "message"), WORKERS_ERRORS)
def test_workers_errors(tmp_path: Path, value: str, message: str) -> None:
    found = errors(write(tmp_path, MINIMAL + f"workers: {value}\n"))
    assert [(issue.line, issue.column) for issue in found] == [(6, 10)], found
    assert message in found[0].message, found[0].message
    assert found[0].severity == "error"


def test_workers_errors_are_reported_with_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "workers: 0\nsession:\n  idle_timeout: 0\n")
    assert positions(path) == [(6, 10), (8, 17)]


def test_workers_in_a_partial_file_and_flags(tmp_path: Path) -> None:
    """A file with only ``workers:``; listeners and upstream from flags."""
    partial, warnings = read_config(write(tmp_path, "workers: 3\n"))
    assert [w.message.split(" ")[0] for w in warnings] == ["limits"]
    assert partial.workers == 3
    config, _ = build_config(base=partial, listen=["127.0.0.1:1110"], upstream="127.0.0.1:110")
    assert config.workers == 3
    # A flag value wins over the file's.
    config, _ = build_config(
        base=partial, listen=["127.0.0.1:1110"], upstream="127.0.0.1:110", workers="auto"
    )
    assert config.workers == "auto"
    # No file: one process.
    config, _ = build_config(base=None, listen=["127.0.0.1:1110"], upstream="127.0.0.1:110")
    assert config.workers == 1


def test_workers_survive_rebuilding_a_config(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, MINIMAL + "workers: auto\n"))
    rebuilt, _ = build_config(base=config, idle_timeout=900)
    assert rebuilt.workers == "auto"
    rebuilt, _ = build_config(base=config, workers=2)
    assert rebuilt.workers == 2


def test_example_file_documents_workers() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"^#?\s*workers:", text, re.MULTILINE), "workers: is not in the example"
    config, _ = load_config(EXAMPLE)
    assert config.workers == 1  # the example keeps the default
