"""One scrape target for a host: the supervisor's /metrics merges its workers'.

A real ``popguard serve --workers 2`` in front of the real Dovecot; the
parent's admin listener serves every worker's metrics, each sample
labelled ``worker``, as one valid exposition (checked with promtool where
it is installed, and by Prometheus's own parser).
"""

from __future__ import annotations

import poplib
import shutil
import socket
import subprocess
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.ci import needs_tool
from tests.integration.conftest import free_loopback_port

READY = "popguard.workers.ready"
PROMTOOL = shutil.which("promtool")


def three_free_ports() -> int:
    """A port p with p+1 and p+2 free too: the parent's admin, then worker N's at p+N."""
    while True:
        admin = free_loopback_port()
        try:
            with (
                socket.create_server(("127.0.0.1", admin + 1)),
                socket.create_server(("127.0.0.1", admin + 2)),
            ):
                return admin
        except OSError:
            continue


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


@needs_tool(PROMTOOL, "promtool (Debian package prometheus)")
def test_the_parent_serves_every_workers_metrics_labelled(
    dovecot, mailbox, make_messages, popguard_process
):
    box = mailbox(make_messages(1, seed=181))
    admin = three_free_ports()
    proxy = popguard_process("--workers", "2", "--admin-listen", f"127.0.0.1:{admin}", ready=READY)
    sessions = 12
    for _ in range(sessions):
        client = poplib.POP3(*proxy.address, timeout=30)
        client.user(box.user)
        client.pass_(box.password)
        client.stat()
        client.quit()

    deadline = time.monotonic() + 10
    while True:  # a session's last record may still be on its way to the metrics
        text = scrape(admin)
        families = {family.name: family for family in text_string_to_metric_families(text)}
        quits = [
            sample
            for sample in families["popguard_sessions"].samples
            if sample.name == "popguard_sessions_total" and sample.labels.get("outcome") == "quit"
        ]
        if sum(sample.value for sample in quits) >= sessions or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(sample.labels["worker"] for sample in quits) == ["1", "2"]
    # Each worker's own figure, and the host's as their sum.
    per_worker = {index: scrape(admin + index) for index in (1, 2)}
    for index, own in per_worker.items():
        own_quit = next(
            sample.value
            for family in text_string_to_metric_families(own)
            for sample in family.samples
            if sample.name == "popguard_sessions_total" and sample.labels.get("outcome") == "quit"
        )
        merged = next(s.value for s in quits if s.labels["worker"] == str(index))
        assert merged == own_quit
    assert sum(sample.value for sample in quits) == sessions
    # A family appears once, with every worker's samples: the exposition is valid.
    assert text.count("# TYPE popguard_sessions_total counter") == 1
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
