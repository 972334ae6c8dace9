"""process.max_hosts's count of the hosts a worker holds (processors/host_cap.py)."""

from __future__ import annotations

from processors.host_cap import HostCap


def test_past_the_cap_only_hosts_already_held_are_admitted():
    exported: list[int] = []
    cap = HostCap(2, lambda: {"a"}, exported.append)
    assert cap.admits("b")
    cap.add("b")
    assert not cap.admits("c")  # full: a new host is refused ...
    assert cap.admits("a") and cap.admits("b")  # ... the ones held are not
    cap.add("b")  # (a host's later records change nothing)
    assert cap.held() == {"a", "b"}
    assert exported == [1, 2]


def test_a_host_refused_elsewhere_holds_no_place_and_a_forgotten_one_frees_its_own():
    cap = HostCap(1, lambda: (), lambda n: None)
    assert cap.admits("a")  # admitted, but its record was then refused: never added
    assert cap.admits("b")
    cap.add("b")
    assert not cap.admits("a")
    cap.drop("b")
    assert cap.admits("a")


def test_after_a_rebalance_the_hosts_are_counted_again_from_the_worker():
    now_held = {"a", "b"}
    counted = []

    def count():
        counted.append(1)
        return now_held

    exported: list[int] = []
    cap = HostCap(2, count, exported.append)
    assert not cap.admits("c") and not cap.admits("d")
    assert len(counted) == 1  # counted once, not per record
    now_held = {"a"}  # a partition went to another worker
    cap.recount()
    assert cap.admits("c")
    assert exported == [2, 1]
    assert cap.held() == {"a"}  # (the set counted is a copy: the worker's own is not changed)
    cap.add("c")
    assert now_held == {"a"}
