"""popguard.config: YAML loading, located errors, and command-line overrides."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

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
    fields = Config.__dataclass_fields__
    assert partial.shutdown_grace == fields["shutdown_grace"].default


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
