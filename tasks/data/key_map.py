"""A map from fixed-width byte keys to int64 values in about ``width + 8`` bytes an entry, for curation's per-pair
and per-prompt state (exact dedupe, prompt indices). A Python dict of 10-byte keys takes about 120 bytes an entry,
which at 10M pairs is gigabytes; here the entries live in two sorted numpy arrays, and the latest ones in a small
dict until it is merged in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MERGE_EVERY = 1 << 16  # entries held in the dict before they go into the sorted arrays


class CompactKeyMap:
    """Fixed-width bytes -> int64. Keys are compared as numpy ``S<width>`` strings: every key must be exactly
    ``width`` bytes (trailing zero bytes then still tell keys apart)."""

    def __init__(self, width: int, merge_every: int = MERGE_EVERY):
        self.width, self.merge_every = width, merge_every
        self._keys = np.zeros(0, dtype=f"S{width}")
        self._values = np.zeros(0, dtype=np.int64)
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def get_many(self, keys: Sequence[bytes]) -> list[int | None]:
        """Each key's value, or None where it is absent."""
        found: list[int | None] = [self._recent.get(key) for key in keys]
        if len(self._keys) and len(keys):
            probe = np.array(keys, dtype=self._keys.dtype)
            at = np.minimum(np.searchsorted(self._keys, probe), len(self._keys) - 1)
            for row in np.flatnonzero(self._keys[at] == probe):
                found[row] = int(self._values[at[row]])
        return found

    def put_many(self, keys: Sequence[bytes], values: Sequence[int]) -> None:
        """Add absent keys (a key already present must not be put again)."""
        if any(len(key) != self.width for key in keys):
            raise ValueError(f"every key must be {self.width} bytes")
        self._recent.update(zip(keys, values, strict=True))
        if len(self._recent) >= self.merge_every:
            self._merge()

    def setdefault_many(
        self, keys: Sequence[bytes], make_value: Callable[[int, int], int]
    ) -> tuple[list[int], list[int]]:
        """Each key's value, the absent ones added in order: the n-th new key, at row r of ``keys``, gets
        ``make_value(r, n)``; a key repeated in ``keys`` is new only at its first row. Returns (the values, the rows
        whose key was new)."""
        values: list[int] = []
        new_rows: list[int] = []
        new: dict[bytes, int] = {}
        for row, (key, value) in enumerate(zip(keys, self.get_many(keys))):
            value = new.get(key) if value is None else value
            if value is None:
                value = new[key] = make_value(row, len(new))
                new_rows.append(row)
            values.append(value)
        self.put_many(list(new), list(new.values()))
        return values, new_rows

    def _merge(self) -> None:
        keys = np.array(list(self._recent), dtype=self._keys.dtype)
        values = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        at = np.searchsorted(self._keys, keys)  # one O(n) insert of the whole sorted batch
        self._keys, self._values = np.insert(self._keys, at, keys), np.insert(self._values, at, values)
        self._recent = {}
