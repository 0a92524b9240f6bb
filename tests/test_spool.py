"""The on-disk result spool: order, bounds, torn writes, restarts, one owner per folder."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import ConfigError
from node.mqtt.spool import Spool

messages = st.lists(
    st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=3000)), max_size=60
)


def replay(spool: Spool) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for segment in spool.seal():
        out.extend(spool.read(segment))
        spool.discard(segment)
    return out


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=messages, segment_bytes=st.integers(64, 20_000))
def test_replay_gives_back_every_message_in_order(
    tmp_path_factory: pytest.TempPathFactory, batch: list[tuple[str, bytes]], segment_bytes: int
) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool"), 10**9, segment_bytes=segment_bytes)
    for topic, payload in batch:
        assert spool.append(topic, payload)
    assert spool.stats().messages == len(batch)
    assert replay(spool) == batch
    assert spool.stats().messages == 0
    assert spool.stats().bytes == 0
    spool.close()


def test_a_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    taken = 0
    while spool.append("imu/s/motifs", b"x" * 90):
        taken += 1
    assert taken == 1000 // (10 + 12 + 90)
    before = spool.stats()
    assert not spool.append("imu/s/motifs", b"x" * 90)
    assert spool.stats() == before
    assert before.bytes <= 1000
    replay(spool)
    assert spool.append("imu/s/motifs", b"x" * 90)  # room again once replayed
    spool.close()


def test_a_new_process_finds_what_an_earlier_one_left(tmp_path: Path) -> None:
    first = Spool(tmp_path, 10**6, segment_bytes=200)
    for i in range(10):
        first.append("t", f"m{i}".encode())
    first.close()
    second = Spool(tmp_path, 10**6, segment_bytes=200)
    assert second.stats().messages == 10
    second.append("t", b"m10")
    assert [p for _, p in replay(second)] == [f"m{i}".encode() for i in range(11)]
    second.close()


def test_a_torn_last_record_ends_the_segment_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, 10**6)
    for i in range(3):
        spool.append("t", f"m{i}".encode())
    spool.close()
    segment = next(tmp_path.glob("*.spool"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-2])  # power cut in the middle of the last write
    again = Spool(tmp_path, 10**6)
    assert [p for _, p in replay(again)] == [b"m0", b"m1"]
    assert "torn record" in caplog.text
    again.close()


def test_a_corrupted_record_is_not_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append("t", b"good")
    spool.append("t", b"flipped")
    spool.close()
    segment = next(tmp_path.glob("*.spool"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = Spool(tmp_path, 10**6)
    assert replay(again) == [("t", b"good")]
    again.close()


def test_two_processes_cannot_share_a_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path, 10**6)
    with pytest.raises(ConfigError, match="in use by another node process"):
        Spool(tmp_path, 10**6)
    first.close()
    Spool(tmp_path, 10**6).close()  # free again


def test_a_closed_spool_takes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.close()
    assert not spool.append("t", b"late")
    assert list(tmp_path.glob("*.spool")) == []


def test_a_failed_write_refuses_that_message_and_loses_no_other(tmp_path: Path) -> None:
    """A real EFBIG from the kernel (a file-size limit) stands in for a full disk."""
    spool = Spool(tmp_path, 10**6)
    assert spool.append("t", b"a" * 1000)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2500, hard))
    try:
        taken = [spool.append("t", bytes([98 + i]) * 1000) for i in range(3)]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert taken == [True, False, True]  # the second would pass 2,500 bytes: refused
    assert spool.stats().messages == 3
    assert [p[:1] for _, p in replay(spool)] == [b"a", b"b", b"d"]
    spool.close()
