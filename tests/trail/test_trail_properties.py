"""Property: any single-byte change to a sealed file is detected.

With lines in ``render`` form, by default (``strict=True``) every change is
found.  With ``strict=False`` the chain protects the records' *values* only:
a change is found unless every record parses to exactly what was sealed
(``\\u00e9`` vs ``\\u00E9``, ``1e5`` vs ``1E5``) -- a different spelling of
the same record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trail_helpers import KEY, seal_lines, session_records, sink_style

from popguard.trail.chain import Chain, render
from popguard.trail.verify import verify

# Values that give the escapes and numbers a renderer may spell several ways.
EXTRA = {"event": "x.note", "note": "caf\u00e9 \u2028 \x7f tab\t", "ratio": 1.5e-07, "n": 10**20}


def _sealed(key: bytes | None, renderer) -> bytes:  # type: ignore[no-untyped-def]
    records = [*session_records(10, seed=3), EXTRA]
    lines = seal_lines(Chain(key=key, chain_id="w1"), records, renderer=renderer)
    return ("\n".join(lines) + "\n").encode("ascii")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


SEALED = {
    (key is not None, name): _sealed(key, renderer)
    for key in (None, KEY)
    for name, renderer in (("render", render), ("sink", sink_style))
}


def _mutate(data: st.DataObject, original: bytes) -> bytes:
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    old = original[position]
    new = data.draw(st.integers(0, 255).filter(lambda b: b != old), label="new byte")
    return original[:position] + bytes([new]) + original[position + 1 :]


def _records(blob: bytes) -> list[object] | None:
    """The values in a file (a last line may lack its newline)."""
    try:
        return [json.loads(line) for line in blob.decode("utf-8").split("\n") if line.strip()]
    except ValueError:
        return None


@pytest.mark.parametrize("keyed", [False, True], ids=["sha256", "hmac"])
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_strict_verify_detects_any_single_byte_change(
    workdir: Path, keyed: bool, data: st.DataObject
) -> None:
    original = SEALED[keyed, "render"]
    changed = _mutate(data, original)
    path = workdir / f"strict-{keyed}.jsonl"
    path.write_bytes(changed)
    report = verify([str(path)], key=KEY if keyed else None)  # strict by default
    assert report.problem is not None, "a changed byte went unnoticed"
    assert report.exit_status == 1


@pytest.mark.parametrize("keyed", [False, True], ids=["sha256", "hmac"])
@pytest.mark.parametrize("renderer", ["render", "sink"])
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_values_only_verify_detects_any_single_byte_change_to_a_value(
    workdir: Path, keyed: bool, renderer: str, data: st.DataObject
) -> None:
    original = SEALED[keyed, renderer]
    changed = _mutate(data, original)
    path = workdir / f"values-{keyed}-{renderer}.jsonl"
    path.write_bytes(changed)
    report = verify([str(path)], key=KEY if keyed else None, strict=False)
    if report.ok:
        assert _records(changed) == _records(original), "a changed value went unnoticed"
    else:
        assert report.exit_status == 1


def test_the_sealed_samples_verify(workdir: Path) -> None:
    for (keyed, _name), blob in SEALED.items():
        path = workdir / "sample.jsonl"
        path.write_bytes(blob)
        report = verify([str(path)], key=KEY if keyed else None, strict=_name == "render")
        assert report.ok, report.problem


def test_a_respelling_of_the_same_values_is_found_unless_values_only(workdir: Path) -> None:
    original = SEALED[False, "render"]
    assert b"caf\\u00e9" in original
    respelled = original.replace(b"caf\\u00e9", b"caf\\u00E9")
    path = workdir / "respelled.jsonl"
    path.write_bytes(respelled)
    for report in (verify([str(path)], key=None), verify([str(path)], key=None, strict=True)):
        assert report.problem is not None
        assert report.problem.kind == "noncanonical"
        assert report.problem.line == 12
    # The same record, spelt differently: only the values-only check passes it.
    assert verify([str(path)], key=None, strict=False).ok
