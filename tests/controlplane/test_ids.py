"""Public ids sort in creation order, even for ids made in the same millisecond."""

from __future__ import annotations

import threading

from controlplane.core.ids import new_id


def test_a_burst_of_ids_sorts_in_the_order_they_were_made() -> None:
    made = [new_id("x") for _ in range(5000)]  # many share a millisecond
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(len(i) == len("x_") + 26 for i in made)


def test_ids_made_on_several_threads_are_unique() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def make(bucket: list[str]) -> None:
        bucket.extend(new_id("x") for _ in range(2000))

    threads = [threading.Thread(target=make, args=(b,)) for b in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for bucket in out for i in bucket]
    assert len(set(every)) == len(every)
    assert all(bucket == sorted(bucket) for bucket in out)
