"""When a sensor message is acknowledged (node/ingest/acks.py): once nothing in it can be lost."""

from __future__ import annotations

from node.ingest.acks import AckLedger


class Acks:
    """Acknowledgements that record themselves."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda: self.sent.append(name)


def test_a_whole_window_is_acknowledged_with_its_result_and_so_is_its_copy() -> None:
    ledger, acks = AckLedger(), Acks()
    done = ledger.window("s1", 7, acks("w7"))
    ledger.duplicate_window("s1", 7, acks("w7 copy"))
    assert acks.sent == []
    done()
    assert acks.sent == ["w7", "w7 copy"]
    ledger.duplicate_window("s1", 7, acks("late copy"))  # the original is done: at once
    assert acks.sent[-1] == "late copy"
    assert ledger.held() == 0


def test_runs_waiting_for_the_next_window_are_not_held() -> None:
    """Many sensors sending small runs must not hold more runs than the broker sends in flight
    (the review's deadlock): a run is held only by windows in work."""
    ledger, acks = AckLedger(), Acks()
    for sensor in range(12):
        ledger.samples(f"s{sensor}", 10, acks(f"s{sensor}:0-10"), restarted=True)
        ledger.release(f"s{sensor}")  # no window cut yet: samples wait in the windower
    assert len(acks.sent) == 12
    assert ledger.held() == 0


def test_a_run_in_a_window_in_work_is_held_until_the_window_is_done() -> None:
    ledger, acks = AckLedger(), Acks()
    ledger.samples("s", 60, acks("0-60"), restarted=True)
    ledger.release("s")
    ledger.samples("s", 120, acks("60-120"), restarted=False)
    first = ledger.cut("s", 0)  # window [0, 100) uses both runs
    ledger.release("s")
    assert acks.sent == ["0-60"]  # released before the cut: no window held it then
    ledger.samples("s", 160, acks("120-160"), restarted=False)
    second = ledger.cut("s", 50)  # window [50, 150)
    ledger.release("s")
    first()
    assert acks.sent == ["0-60"]  # 60-120 is also in the second window
    second()
    assert acks.sent == ["0-60", "60-120", "120-160"]
    assert ledger.held() == 0


def test_runs_of_an_old_stream_wait_only_for_its_own_windows() -> None:
    ledger, acks = AckLedger(), Acks()
    ledger.samples("s", 100, acks("old"), restarted=True)
    old = ledger.cut("s", 0)
    ledger.release("s")
    ledger.samples("s", 5010, acks("new"), restarted=True)  # a gap: the stream restarts
    ledger.release("s")
    assert acks.sent == ["new"]
    old()
    assert acks.sent == ["new", "old"]
