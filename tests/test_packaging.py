"""The Grafana dashboard and the Prometheus rules in ``packaging/`` (docs/operations.md).

* ``promtool check rules`` passes on the rules, and on every PromQL
  expression of the dashboard (written out as recording rules);
* ``promtool test rules`` passes: each alert fires on the series it is
  about, and not on look-alikes;
* every metric name the dashboard and the rules use, and every
  ``label="value"`` they select on, exists in the ``/metrics`` of a real
  popguard process that served a few sessions (login ok and failed, RETR,
  TOP denied and dry-run, DELE then QUIT, a client gone without QUIT, POP3S,
  a broken TLS handshake, a failing syslog sink, an upstream gone).

promtool is Debian's ``prometheus`` package; without it the promtool tests
skip, except in CI where they fail (tests/ci.py).
"""

from __future__ import annotations

import contextlib
import json
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ci import needs_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "packaging" / "grafana" / "popguard-dashboard.json"
RULES = ROOT / "packaging" / "prometheus" / "popguard-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "popguard-rules.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = needs_tool(PROMTOOL, "promtool (Debian package prometheus)")

#: Series Prometheus makes itself for every target; no /metrics serves them.
SCRAPE_SERIES = frozenset({"up"})
#: What the dashboard's Grafana variables stand for when promtool checks it.
GRAFANA_VARIABLES = {
    "job": ".+",
    "instance": ".+",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}
SEVERITIES = frozenset({"critical", "warning"})
#: Grafana's dashboard grid is 24 columns wide.
GRID_WIDTH = 24

#: How long the live test waits for popguard to start, or for a count to show.
STARTUP_TIMEOUT = 20.0
METRICS_TIMEOUT = 10.0


# -- reading PromQL -------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: A name not followed by "(" (a function or an aggregation) and not part of
#: a number (1e3) or a duration (offset 5m).
_NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan", "by", "without", "on", "ignoring",
     "group_left", "group_right"}
)  # fmt: skip
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def equality_matchers(expr: str) -> set[tuple[str, str, str]]:
    """``(metric, label, value)`` for each ``metric{label="value"}`` in ``expr``."""
    found = set()
    for metric, body in _SELECTOR.findall(_without_strings_outside_braces(expr)):
        for label, op, value in _MATCHER.findall(body):
            if op == "=":
                found.add((metric, label, value))
    return found


def _without_strings_outside_braces(expr: str) -> str:
    # Label values are inside braces; strings elsewhere (label_replace's
    # arguments) must not look like selectors.
    parts = re.split(r"(\{[^}]*\})", expr)
    return "".join(p if p.startswith("{") else _STRING.sub('""', p) for p in parts)


def substitute_grafana_variables(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job) (rate(popguard_logins_total{result="failed"}[5m]))',
         {"popguard_logins_total"}),
        ("popguard:a:rate5m > 0.1 unless on (job) popguard:a:rate5m <= 3 * (b offset 5m)",
         {"popguard:a:rate5m", "b"}),
        ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m]))) / sum without (le) (y_sum)",
         {"x_bucket", "y_sum"}),
        ("up == 0 and on (instance, job) max_over_time(popguard_build_info[1h])",
         {"up", "popguard_build_info"}),
        ('count(popguard_typo{a="sum(b)"} == 1e3) or vector(0)', {"popguard_typo"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_equality_matchers_are_read_from_promql() -> None:
    expr = (
        'a{x="1", y=~"2|3", z!="4"} + b{w = "5"} + label_replace(c, "d", "$1", "e", "{f=\\"6\\"}")'
    )
    assert equality_matchers(expr) == {("a", "x", "1"), ("b", "w", "5")}


# -- the files --------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' queries and the variables' selectors."""
    exprs = [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: not a label_values() query: {query}"
        exprs.append(match.group(1))
    return exprs


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def used_metric_names() -> set[str]:
    """Every metric the dashboard and the rules read (not the ones the rules record)."""
    exprs = [rule["expr"] for rule in load_rules()] + dashboard_expressions(load_dashboard())
    names = set().union(*(metric_names(substitute_grafana_variables(e)) for e in exprs))
    return names - recorded_names() - SCRAPE_SERIES


def used_equality_matchers() -> set[tuple[str, str, str]]:
    exprs = [rule["expr"] for rule in load_rules()] + dashboard_expressions(load_dashboard())
    found = set().union(*(equality_matchers(e) for e in exprs))
    return {m for m in found if m[0] not in recorded_names() and "$" not in m[2]}


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is not installed (Debian package prometheus)"
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown staying silent"
    assert firing | silent <= alerts


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    anchors = {
        re.sub(r"[^\w-]", "", heading.strip().lower().replace(" ", "-"))
        for heading in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(encoding="utf-8"), re.M)
    }
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert alerts
    for rule in alerts:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["description"].strip(), rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"no section {rule['alert']} in {OPERATIONS.name}"


@needs_promtool
def test_dashboard_expressions_pass_promtool_check(tmp_path: Path) -> None:
    exprs = [substitute_grafana_variables(e) for e in dashboard_expressions(load_dashboard())]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_dashboard_imports_with_a_datasource_input_and_filters_by_job_and_instance() -> None:
    dashboard = load_dashboard()
    (source,) = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert dashboard["id"] is None
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["job", "instance"]
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = []
    cells: set[tuple[int, int]] = set()
    for panel in dashboard_panels(dashboard["panels"]):
        ids.append(panel["id"])
        pos = panel["gridPos"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert pos["x"] + pos["w"] <= GRID_WIDTH, f"{panel['title']} is too wide"
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
            # Every query follows the variables: one worker, or all of them.
            assert '=~"$job"' in target["expr"], target["expr"]
            assert '=~"$instance"' in target["expr"], target["expr"]
    assert len(ids) == len(set(ids))


# -- a live popguard ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LivePopguard:
    proc: subprocess.Popen[bytes]
    plain: int
    pop3s: int
    admin: int
    stderr: Path

    def scrape(self) -> dict[str, list[dict[str, str]]]:
        """Sample name -> the label sets it is exposed with."""
        url = f"http://127.0.0.1:{self.admin}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
        samples: dict[str, list[dict[str, str]]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append({**sample.labels, "": str(sample.value)})
        return samples

    def value(self, name: str, **labels: str) -> float:
        total = 0.0
        for found in self.scrape().get(name, []):
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(found[""])
        return total

    def wait_value(self, predicate: Callable[[float], bool], name: str, **labels: str) -> float:
        deadline = time.monotonic() + METRICS_TIMEOUT
        while True:
            value = self.value(name, **labels)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.05)


def start_process(argv: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_listening(port: int, proc: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, stderr.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {stderr.read_text(errors='replace')}")


POLICY = """\
rules:
  - name: alice-no-top
    match: {user: alice}
    set: {deny_commands: [TOP]}
  - name: demo-no-top-trial
    mode: dry-run
    match: {user: demo}
    set: {deny_commands: [TOP]}
"""


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def live(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[LivePopguard, subprocess.Popen[bytes]]]:
    """popguard (plain and POP3S listeners, admin, a policy, a syslog sink
    nobody listens for) in front of the demo upstream, both real processes."""
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "10-test.yaml").write_text(POLICY)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for _attempt in range(5):
            upstream_port, plain, pop3s, admin, syslog = (free_port() for _ in range(5))
            upstream_err = tmp_path / "upstream.stderr"
            upstream = start_process(
                [sys.executable, "-m", "popguard", "demo-upstream", "--listen",
                 f"127.0.0.1:{upstream_port}"],
                upstream_err,
            )  # fmt: skip
            started.append(upstream)
            config = tmp_path / "popguard.yaml"
            config.write_text(
                f"""\
listeners:
  - name: plain
    listen: "127.0.0.1:{plain}"
  - name: pop3s
    listen: "127.0.0.1:{pop3s}"
    tls: implicit
    cert: {cert_file}
    key: {key_file}
upstream:
  address: "127.0.0.1:{upstream_port}"
audit:
  file: {tmp_path / "audit.jsonl"}
  console: false
  syslog:
    - address: "127.0.0.1:{syslog}"
      transport: tcp
policies: {tmp_path / "policies"}
admin:
  listen: "127.0.0.1:{admin}"
"""
            )
            err = tmp_path / "popguard.stderr"
            proc = start_process(
                [sys.executable, "-m", "popguard", "serve", "--config", str(config)], err
            )
            started.append(proc)
            try:
                wait_listening(upstream_port, upstream, upstream_err)
                wait_listening(admin, proc, err)
            except AssertionError:
                if "in use" in err.read_text() + upstream_err.read_text():
                    for process in started:
                        stop_process(process)
                    continue  # another test took a port first
                raise
            yield LivePopguard(proc, plain, pop3s, admin, err), upstream
            return
        raise AssertionError("no free ports after 5 attempts")
    finally:
        for process in started:
            stop_process(process)


def pop(port: int) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", port, timeout=10)


def drive_sessions(proxy: LivePopguard, ca: trustme.CA) -> None:
    """The sessions the dashboard is about, from Python's own POP3 client."""
    # Login, RETR, a TOP the dry-run rule would deny, QUIT.
    client = pop(proxy.plain)
    client.user("demo")
    client.pass_("demo")
    assert client.retr(1)[0].startswith(b"+OK")
    assert client.top(1, 0)[0].startswith(b"+OK")
    client.quit()
    # A failed login.
    client = pop(proxy.plain)
    client.user("demo")
    with pytest.raises(poplib.error_proto):
        client.pass_("not the password")
    client.quit()
    # A TOP the policy denies, then DELE and QUIT: committed.
    client = pop(proxy.plain)
    client.user("alice")
    client.pass_("alicepw")
    with pytest.raises(poplib.error_proto, match="TOP"):
        client.top(1, 0)
    client.dele(1)
    client.quit()
    # DELE, then the client goes away without QUIT: discarded.
    client = pop(proxy.plain)
    client.user("demo")
    client.pass_("demo")
    client.dele(2)
    client.close()
    # POP3S.
    context = ssl.create_default_context()
    ca.configure_trust(context)
    secure = poplib.POP3_SSL("127.0.0.1", proxy.pop3s, timeout=10, context=context)
    secure.user("demo")
    secure.pass_("demo")
    secure.quit()
    # Not TLS at all on the POP3S port: a failed handshake.
    with socket.create_connection(("127.0.0.1", proxy.pop3s), timeout=10) as sock:
        sock.sendall(b"USER demo\r\n" * 100)
        with contextlib.suppress(ConnectionResetError):  # popguard closes it either way
            while sock.recv(4096):
                pass


def test_every_metric_the_dashboard_and_rules_use_is_in_a_live_metrics(
    live: tuple[LivePopguard, subprocess.Popen[bytes]], ca: trustme.CA
) -> None:
    proxy, upstream = live
    drive_sessions(proxy, ca)
    # A session held open, logged in, while /metrics is read.
    held = pop(proxy.plain)
    held.user("demo")
    held.pass_("demo")
    try:
        assert proxy.wait_value(lambda v: v == 1, "popguard_sessions_logged_in") == 1
        assert proxy.value("popguard_sessions_active") == 1
    finally:
        held.quit()
    assert proxy.wait_value(lambda v: v == 0, "popguard_sessions_logged_in") == 0

    # The upstream goes away: the next client is told, and it is counted.
    stop_process(upstream)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        pop(proxy.plain)  # the greeting is popguard's -ERR

    wait = proxy.wait_value
    assert wait(lambda v: v == 1, "popguard_upstream_errors_total", kind="unreachable") == 1
    assert proxy.value("popguard_upstream_connections_total", result="failed") == 1
    assert proxy.value("popguard_deletions_total", fate="committed") == 1
    assert proxy.value("popguard_deletions_total", fate="discarded") == 1
    assert proxy.value("popguard_logins_total", result="failed", mechanism="USER") == 1
    assert proxy.value("popguard_logins_total", result="ok") == 5
    assert proxy.value("popguard_messages_retrieved_total", command="RETR") == 1
    assert proxy.value("popguard_policy_denials_total", rule="alice-no-top") == 1
    assert proxy.value("popguard_policy_dry_runs_total", rule="demo-no-top-trial") == 1
    assert proxy.value("popguard_tls_sessions_total", side="client") == 1
    assert wait(lambda v: v == 1, "popguard_tls_handshake_failures_total", side="client") == 1
    assert proxy.value("popguard_tls_handshake_failures_total", side="upstream") == 0
    # Nobody listens for syslog: that sink fails, the file does not.
    assert wait(lambda v: v >= 1, "popguard_audit_sink_failures_total") >= 1
    health = {s["sink"]: s[""] for s in proxy.scrape()["popguard_audit_sink_healthy"]}
    assert sorted(health.values()) == ["0.0", "1.0"], health
    assert proxy.value("process_cpu_seconds_total") > 0

    samples = proxy.scrape()
    used = used_metric_names()
    assert {"popguard_sessions_total", "process_cpu_seconds_total"} <= used  # sanity
    missing = sorted(used - samples.keys())
    assert not missing, f"not in /metrics: {missing}"
    for metric, label, value in sorted(used_equality_matchers()):
        values = {labels.get(label) for labels in samples[metric]}
        assert value in values, f'{metric}{{{label}="{value}"}}: /metrics has {values}'
