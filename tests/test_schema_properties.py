"""No input ends in a traceback: any text as a config or policy file, any flags.

Each property feeds arbitrary input to the loaders and demands one of two
outcomes: a configuration (or policy set), or issues that all carry the
file and a position (line 0 only for what has no place in the file).  The
cases issue #12 names as tracebacks are kept as ``@example``.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from popguard.cli import _resolve, build_parser, main
from popguard.config import COMMAND_LINE, ConfigError, ConfigIssue, load_config, read_config
from popguard.policy.load import PolicyError, load_policies

#: Issues that concern the whole file (or the flags) and so have no line.
WHOLE_FILE = ("no listener configured", "no upstream configured")

TRACEBACKS = [
    "session: {idle_timeout: !!int abc}\n",
    "limits: {max_pipelined: !!int abc}\n",
    "workers: !!int abc\n",
    "audit: {queue_size: !!int abc}\n",
    "session: {idle_timeout: !!float x}\n",
    "limits: {max_pipelined: !!int ''}\n",
    "session: {idle_notice: !!bool maybe}\n",
    "session:\n" + "  " + "[" * 500 + "]" * 500 + "\n",
    "a: " + "{a: " * 500 + "}" * 500 + "\n",
    "- " * 500 + "x\n",
    "listeners: &a [*a]\n",
    "a: &a {b: *a}\n",
    "session: {idle_timeout: " + "9" * 400 + "}\n",
    "workers: " + "9" * 5000 + "\n",
]

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_yamlish = st.text(
    alphabet=st.sampled_from(list("listenrsupamdio_:- {}[],'\"\n #@*&!%|>0123456789.~tTfF")),
    max_size=200,
)

CONFIG_KEYS = [
    "listeners", "upstream", "session", "limits", "shutdown", "audit", "policies", "admin",
    "workers", "identity", "listen", "name", "tls", "cert", "key", "sni", "address",
    "connect_timeout", "idle_timeout", "idle_notice", "login_timeout", "max_pipelined",
    "grace_period", "file", "syslog", "transport", "max_message", "proxy_protocol", "trusted",
    "timeout", "case", "master_separator", "fsync", "queue_size", "tls_min_version",
]  # fmt: skip
POLICY_KEYS = [
    "rules", "name", "mode", "match", "set", "user", "claimed_user", "client", "listener",
    "tls", "access", "deny_commands", "deny_reply", "auth_mechanisms", "require_tls",
    "idle_timeout", "max_session", "max_sessions_total", "login_throttle", "failures",
    "window", "block", "by",
]  # fmt: skip

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:1110", "[::1]:110", "auto", "implicit", "DELE", "10.0.0.0/8"]),
)


def _documents(keys: list[str]) -> st.SearchStrategy[object]:
    """YAML-ish structures whose keys are mostly the schema's own."""
    key = st.one_of(st.sampled_from(keys), st.text(alphabet=string.ascii_lowercase, max_size=8))
    return st.recursive(
        _leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=5)
        ),
        max_leaves=25,
    )


def _outcome_config(path: Path, *, complete: bool) -> list[ConfigIssue]:
    """The issues of loading *path* (warnings when it loads); asserts they are located."""
    failed: ConfigError | None = None
    try:
        _, issues = load_config(path) if complete else read_config(path)
    except ConfigError as exc:
        failed, issues = exc, list(exc.issues)
    if failed is not None:
        assert failed.errors, "a ConfigError without an error"
    for issue in issues:
        assert issue.file == str(path), issue
        assert issue.severity in ("error", "warning")
        if issue.line == 0:
            assert issue.message.startswith(WHOLE_FILE), issue
        else:
            assert issue.line >= 1, issue
            assert issue.column >= 1, issue
    return issues


def _outcome_policy(directory: Path) -> None:
    failed: PolicyError | None = None
    try:
        _, issues = load_policies(str(directory))
    except PolicyError as exc:
        failed, issues = exc, list(exc.issues)
    if failed is not None:
        assert failed.errors, "a PolicyError without an error"
    for issue in issues:
        assert issue.file.startswith(str(directory)), issue
        assert issue.line >= 1, issue
        assert issue.column >= 1, issue


def _write(directory: Path, text: str, name: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


# --------------------------------------------------------------------------
# Any text
# --------------------------------------------------------------------------


def _with_examples(test: object) -> object:
    for text in TRACEBACKS:
        test = example(text=text)(test)  # type: ignore[operator]
    return test


@SETTINGS
@given(text=st.one_of(_yamlish, st.text(max_size=120)))
@_with_examples
def test_any_text_as_a_config_file(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    directory = tmp_path_factory.mktemp("c")
    path = _write(directory, text, "popguard.yaml")
    _outcome_config(path, complete=False)
    _outcome_config(path, complete=True)


@SETTINGS
@given(text=st.one_of(_yamlish, st.text(max_size=120)))
@_with_examples
def test_any_text_as_a_policy_file(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    directory = tmp_path_factory.mktemp("p")
    _write(directory, text.replace("session", "rules"), "10-x.yaml")
    _outcome_policy(directory)


@pytest.mark.parametrize("text", TRACEBACKS)
def test_the_named_tracebacks_are_located_errors(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, "popguard.yaml")
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert all(issue.line >= 1 for issue in info.value.errors), str(info.value)


# --------------------------------------------------------------------------
# Structures near the schema
# --------------------------------------------------------------------------


@SETTINGS
@given(document=_documents(CONFIG_KEYS))
@example(document={"session": {"idle_timeout": float("nan")}})
@example(document={"listeners": [{"listen": "127.0.0.1:1110", "sni": {"a": None}}]})
def test_any_structure_as_a_config_file(
    tmp_path_factory: pytest.TempPathFactory, document: object
) -> None:
    directory = tmp_path_factory.mktemp("c")
    path = _write(directory, yaml.safe_dump(document), "popguard.yaml")
    _outcome_config(path, complete=True)


@SETTINGS
@given(document=_documents(POLICY_KEYS))
@example(document={"rules": [{"name": "r", "set": {"login_throttle": {}}}]})
@example(document={"rules": [{"name": "r", "match": {"user": 5}, "set": None}]})
def test_any_structure_as_a_policy_file(
    tmp_path_factory: pytest.TempPathFactory, document: object
) -> None:
    directory = tmp_path_factory.mktemp("p")
    _write(directory, yaml.safe_dump(document), "10-x.yaml")
    _outcome_policy(directory)


# --------------------------------------------------------------------------
# Command-line arguments
# --------------------------------------------------------------------------

_argument = st.one_of(
    st.sampled_from(
        ["127.0.0.1:1110", "[::1]:0", "auto", "0", "-1", "nan", "inf", "1e400", "", "x", "implicit"]
    ),
    st.text(max_size=20),
)
SERVE_FLAGS = [
    "--listen", "--upstream", "--audit-file", "--tls", "--tls-cert", "--tls-key",
    "--upstream-tls", "--upstream-ca-file", "--upstream-server-name", "--idle-timeout",
    "--connect-timeout", "--login-timeout", "--greeting-timeout", "--workers", "--admin-listen",
]  # fmt: skip


@SETTINGS
@given(
    flags=st.lists(st.tuples(st.sampled_from(SERVE_FLAGS), _argument), max_size=6),
    insecure=st.booleans(),
)
@example(flags=[("--idle-timeout", "nan"), ("--listen", "127.0.0.1:1")], insecure=False)
@example(flags=[("--workers", "0")], insecure=True)
def test_serve_flags_give_a_config_or_located_issues(
    flags: list[tuple[str, str]], insecure: bool
) -> None:
    """What ``serve`` would run with: a Config, or issues naming the flags; never a traceback.

    The flags are resolved as ``serve`` resolves them (``_resolve``), and
    nothing is served.
    """
    argv = ["serve", *[part for flag, value in flags for part in (flag, value)]]
    if insecure:
        argv.append("--upstream-tls-insecure")
    usage: SystemExit | None = None
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse refuses some values itself (exit 2)
        usage = exc
    if usage is not None:
        assert usage.code == 2
        return
    failed: ConfigError | None = None
    try:
        _resolve(args, upstream=args.upstream)
    except ConfigError as exc:
        failed = exc
    if failed is not None:
        assert failed.errors
        assert all(issue.file == COMMAND_LINE for issue in failed.issues)
        assert all(issue.line == 0 for issue in failed.issues)


@SETTINGS
@given(
    text=st.one_of(_yamlish, st.text(max_size=60)),
    extra=st.lists(
        st.one_of(st.sampled_from(["--admin-listen", "--config", "-c"]), _argument), max_size=4
    ),
)
@example(text="workers: !!int abc\n", extra=[])
@example(text="admin: {listen: '0.0.0.0:9'}\n", extra=["--admin-listen", "x"])
@example(text="", extra=["--config", "\x00"])  # a NUL in the path (found by hypothesis)
def test_check_config_returns_an_exit_code(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    text: str,
    extra: list[str],
) -> None:
    path = _write(tmp_path_factory.mktemp("c"), text, "popguard.yaml")
    code: object
    try:
        code = main(["check-config", "--config", str(path), *extra])
    except SystemExit as exc:  # a usage error (argparse, or --admin-listen's check)
        code = exc.code
    assert code in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


@SETTINGS
@given(
    command=st.sampled_from([["policy", "check"], ["policy", "explain"], ["config", "schema"]]),
    policy=st.one_of(_yamlish, st.text(max_size=60)),
    config=st.one_of(_yamlish, st.text(max_size=60)),
    extra=st.lists(
        st.one_of(
            st.sampled_from(
                ["--config", "--user", "--claimed-user", "--client", "--listener", "--tls",
                 "--policy", "--format", "json", "DIR", "CONFIG"]
            ),
            _argument,
        ),
        max_size=5,
    ),
)  # fmt: skip
@example(command=["policy", "check"], policy="rules: !!int abc\n", config="", extra=["DIR"])
@example(
    command=["policy", "explain"], policy="", config="policies: 5\n", extra=["--config", "CONFIG"]
)
def test_the_file_commands_return_an_exit_code(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    policy: str,
    config: str,
    extra: list[str],
) -> None:
    """``policy check|explain`` and ``config schema``, with any files and arguments."""
    directory = tmp_path_factory.mktemp("cmd")
    _write(directory, policy, "10-x.yaml")
    config_path = _write(directory, config, "popguard.yaml")
    names = {"DIR": str(directory), "CONFIG": str(config_path)}
    argv = [*command, *[names.get(part, part) for part in extra]]
    code: object
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a usage error
        code = exc.code
    assert code in (0, 1, 2)
    assert "Traceback" not in capsys.readouterr().err
