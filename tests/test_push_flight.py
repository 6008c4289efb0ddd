"""The scheduler of `push --concurrency` (`_Flight`): reference order without head-of-line blocking,
and the first error stopping new sends. Real threads; sends are plain functions that record when
they ran (the engines' tests in test_push_concurrency.py check the same order end to end)."""
from __future__ import annotations

import threading
from typing import Any

import pytest

from ruxo_fhir.sync.push import _Flight

WAIT = 10  # seconds: a bound for every wait, never reached when the scheduler is right


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid}


def _case(cid: str, pid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"}}


class Sends:
    """Send functions that log start and end, and can be held until released."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def send(self, name: str, *, hold: bool = False, error: BaseException | None = None) -> Any:
        gate = self.gates.setdefault(name, threading.Event())
        started = self.started.setdefault(name, threading.Event())
        if not hold:
            gate.set()
        else:  # a scheduler that blocks on a held bundle fails the test after WAIT, never hangs
            release = threading.Timer(WAIT, gate.set)
            release.daemon = True
            release.start()

        def run() -> None:
            with self.lock:
                self.log.append(f"start {name}")
            started.set()
            assert gate.wait(WAIT)
            with self.lock:
                self.log.append(f"end {name}")
            if error is not None:
                raise error

        return run


def test_a_bundle_waits_for_the_one_holding_what_it_references_and_others_overtake_it() -> None:
    sends = Sends()
    with _Flight(2) as flight:
        flight.submit([_patient("p1")], sends.send("A", hold=True))
        flight.submit([_case("c1", "p1")], sends.send("B"))  # references A's Patient: waits
        flight.submit([_case("c2", "p2")], sends.send("C", hold=True))  # references nothing in flight
        assert sends.started["C"].wait(WAIT)  # sent although B, given before it, still waits
        assert not sends.started["B"].is_set()
        assert flight.holds(["Condition/c1"]) and flight.busy()
        sends.gates["A"].set()
        assert sends.started["B"].wait(WAIT)
        sends.gates["C"].set()
        flight.finish()
        assert not flight.busy() and not flight.holds(["Patient/p1", "Condition/c1", "Condition/c2"])
    log = sends.log
    assert log.index("start C") < log.index("end A") < log.index("start B")


def test_no_more_than_limit_in_flight() -> None:
    sends = Sends()
    running = 0
    peak = 0
    lock = threading.Lock()

    def counted(inner: Any) -> Any:
        def run() -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                inner()
            finally:
                with lock:
                    running -= 1
        return run

    with _Flight(3) as flight:
        for i in range(20):
            flight.submit([_case(f"c{i}", f"p{i}")], counted(sends.send(f"S{i}")))
        flight.finish()
    assert 1 <= peak <= 3
    assert sorted(x for x in sends.log if x.startswith("end")) == sorted(f"end S{i}" for i in range(20))


def test_the_first_error_drops_waiting_bundles_lets_sent_ones_land_and_is_raised_once() -> None:
    sends = Sends()
    flight = _Flight(2)
    flight.submit([_patient("p1")], sends.send("A", hold=True, error=RuntimeError("refused")))
    flight.submit([_case("c1", "p1")], sends.send("B"))  # waits for A, then A fails: never sent
    flight.submit([_case("c2", "p2")], sends.send("C", hold=True))  # in flight when A fails
    assert sends.started["C"].wait(WAIT)
    sends.gates["A"].set()
    landed = threading.Timer(0.2, sends.gates["C"].set)
    landed.start()
    with pytest.raises(RuntimeError, match="refused"):
        flight.finish()
    assert "end C" in sends.log  # the bundle already sent finished before the error was raised
    assert "start B" not in sends.log
    assert not flight.busy() and not flight.holds(["Condition/c1"])
    flight.finish()  # raised once: the flight is empty and clean now
    flight.submit([_case("c3", "p1")], sends.send("D"))  # and takes new bundles (a restarted window)
    flight.finish()
    assert "end D" in sends.log
    flight.__exit__(None, None, None)


def test_an_error_surfaces_at_the_next_submit() -> None:
    sends = Sends()
    with pytest.raises(ValueError, match="bad"), _Flight(1) as flight:
        flight.submit([_patient("p1")], sends.send("A", error=ValueError("bad")))
        assert sends.started["A"].wait(WAIT)
        for i in range(50):  # one of these meets the error (the first send has failed by then)
            flight.submit([_case(f"c{i}", f"q{i}")], sends.send(f"S{i}"))
    assert "end A" in sends.log


def test_a_resource_given_twice_is_written_in_the_order_given() -> None:
    sends = Sends()
    with _Flight(4) as flight:
        flight.submit([_patient("p1")], sends.send("A", hold=True))
        flight.submit([_patient("p1")], sends.send("B"))  # the same resource again: after A, never before
        flight.submit([_case("c9", "p9")], sends.send("C"))
        assert sends.started["C"].wait(WAIT)
        assert not sends.started["B"].is_set()
        sends.gates["A"].set()
        flight.finish()
    assert sends.log.index("end A") < sends.log.index("start B")


def test_an_error_in_the_deciding_thread_sends_nothing_new_and_lets_sent_bundles_land() -> None:
    sends = Sends()
    with pytest.raises(KeyboardInterrupt), _Flight(2) as flight:
        flight.submit([_patient("p1")], sends.send("A", hold=True))
        flight.submit([_case("c1", "p1")], sends.send("B"))  # waits for A
        assert sends.started["A"].wait(WAIT)
        threading.Timer(0.2, sends.gates["A"].set).start()
        raise KeyboardInterrupt
    assert "end A" in sends.log and "start B" not in sends.log
