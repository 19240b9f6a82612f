"""The config and command line for retention, shared state and content digests.

``retention.store`` / ``--retention-dir`` (and check-config's check of it),
the warning for ``retain`` rules without a store, ``shared_state:`` /
``--shared-state`` (a password never in the URL), and
``audit.content_digests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popguard.cli import Policies, main
from popguard.config import ConfigError, build_config, load_config

MINIMAL = 'listeners: [{listen: "127.0.0.1:1110"}]\nupstream: {address: "127.0.0.1:110"}\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "popguard.yaml"
    path.write_text(MINIMAL + text)
    return path


def test_the_retention_store_comes_from_the_file_or_the_flag(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, "retention: {store: archive}\n"))
    assert config.retention_store == str(tmp_path / "archive")  # relative to the file
    flagged, _ = build_config(base=config, retention_dir=str(tmp_path / "other"))
    assert flagged.retention_store == str(tmp_path / "other")


def test_check_config_says_when_the_retention_store_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "blocker").write_text("a file, not a directory")
    path = write(tmp_path, "retention: {store: blocker}\n")
    assert main(["check-config", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3:" in err
    assert "retention.store:" in err
    assert "is not a directory" in err
    missing = write(tmp_path, "retention: {store: no/such/parent/archive}\n")
    assert main(["check-config", "-c", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err
    fine = write(tmp_path, "retention: {store: archive}\n")
    assert main(["check-config", "-c", str(fine)]) == 0


def test_an_enforced_retain_rule_without_a_store_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "keep.yaml").write_text(
        "rules:\n"
        "  - name: keep\n    match: {user: alice}\n    set: {retain: true}\n"
        "  - name: trial\n    mode: dry-run\n    match: {user: bob}\n    set: {retain: true}\n"
    )
    config, _ = load_config(write(tmp_path, ""))
    Policies(str(policies), config)
    err = capsys.readouterr().err
    assert "rule 'keep' sets retain, but no retention store is configured" in err
    assert "rule 'trial' sets retain" not in err  # a dry run archives nothing anyway
    with_store, _ = load_config(write(tmp_path, "retention: {store: archive}\n"))
    Policies(str(policies), with_store)
    assert "retain" not in capsys.readouterr().err


def test_shared_state_from_the_file_and_the_flag(tmp_path: Path) -> None:
    config, warnings = load_config(
        write(
            tmp_path,
            "workers: 2\nshared_state:\n  url: redis://127.0.0.1:6379/0\n"
            "  on_failure: fail-closed\n  lease_seconds: 10\n",
        )
    )
    assert warnings == []
    assert config.shared_state is not None
    assert (config.shared_state.on_failure, config.shared_state.lease_seconds) == (
        "fail-closed",
        10.0,
    )
    flagged, _ = build_config(base=config, shared_state_url="unix:///run/redis.sock")
    assert flagged.shared_state is not None
    assert flagged.shared_state.url == "unix:///run/redis.sock"
    assert flagged.shared_state.on_failure == "fail-closed"  # the rest from the file


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://user:secret@127.0.0.1:6379/0", "put the password in password_file"),
        ("http://127.0.0.1:6379", "expected redis://HOST:PORT/DB"),
    ],
)
def test_a_shared_state_url_popguard_refuses(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(base=None, listen=["127.0.0.1:1110"], upstream="127.0.0.1:110",
                     shared_state_url=url)  # fmt: skip
    text = " ".join(issue.message for issue in error.value.issues)
    assert "--shared-state" in text
    assert message in text
    assert "secret" not in text


def test_content_digests_can_be_turned_off(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, ""))
    assert config.audit.content_digests is True
    config, _ = load_config(write(tmp_path, "audit: {content_digests: false}\n"))
    assert config.audit.content_digests is False
