"""The compact key map behind curation's dedupe and prompt indices: the same answers as a dict, across merges."""

import random

import pytest

from creditflow.tasks.data.key_map import CompactKeyMap


def test_the_map_answers_as_a_dict_does_across_merges():
    rng = random.Random(0)
    compact, reference = CompactKeyMap(10, merge_every=64), {}
    pool = [rng.randbytes(10) for _ in range(2000)]
    pool += [key[:8] + b"\0\0" for key in pool[:50]] + [b"\0" * 10, b"\0" * 9 + b"\1"]  # trailing zero bytes
    for batch in range(60):
        keys = rng.sample(pool, 40)
        assert compact.get_many(keys) == [reference.get(key) for key in keys]
        new = [key for key in dict.fromkeys(keys) if key not in reference]
        values = [batch * 1000 + i for i in range(len(new))]
        compact.put_many(new, values)
        reference.update(zip(new, values))
        assert len(compact) == len(reference)
    assert sum(len(run) > 0 for run in compact._keys) > 1 and len(compact._recent) < 64  # merged, into runs
    assert compact.get_many(pool) == [reference.get(key) for key in pool]


def test_setdefault_many_adds_each_absent_key_once_in_order():
    compact = CompactKeyMap(2, merge_every=2)
    compact.put_many([b"aa", b"bb"], [7, 8])  # merged into the sorted arrays
    compact.put_many([b"cc"], [9])  # still in the dict
    made = []

    def make_value(row: int, n: int) -> int:
        made.append((row, n))
        return 100 + n

    values, new_rows = compact.setdefault_many([b"dd", b"aa", b"dd", b"cc", b"ee"], make_value)
    assert values == [100, 7, 100, 9, 101]  # a key repeated in the batch is new once
    assert new_rows == [0, 4] and made == [(0, 0), (4, 1)]
    assert compact.get_many([b"dd", b"ee"]) == [100, 101] and len(compact) == 5


def test_a_key_of_another_width_is_refused():
    with pytest.raises(ValueError, match="10 bytes"):
        CompactKeyMap(10).put_many([b"short"], [1])
