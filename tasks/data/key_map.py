"""A map from fixed-width byte keys to int64 values in about ``width + 8`` bytes an entry, for curation's per-pair
and per-prompt state (exact dedupe, prompt indices). A Python dict of 10-byte keys takes about 120 bytes an entry,
which at 10M pairs is gigabytes; here the entries live in sorted numpy arrays, and the latest ones in a small dict
until it is merged in. The sorted entries are split into runs by their first key byte's high bits, so a merge
copies one run at a time, not the whole map (a merge into one array held the old and the grown copy at once).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np

MERGE_EVERY = 1 << 16  # entries held in the dict before they go into the sorted arrays
RUN_BITS = 4  # 16 runs: a merge's transient copy is a sixteenth of the map (keys are content digests: uniform)


class CompactKeyMap:
    """Fixed-width bytes -> int64. Keys are compared as numpy ``S<width>`` strings: every key must be exactly
    ``width`` bytes (trailing zero bytes then still tell keys apart)."""

    def __init__(self, width: int, merge_every: int = MERGE_EVERY):
        self.width, self.merge_every = width, merge_every
        self._dtype = np.dtype(f"S{width}")
        self._keys = [np.zeros(0, dtype=self._dtype) for _ in range(1 << RUN_BITS)]
        self._values = [np.zeros(0, dtype=np.int64) for _ in range(1 << RUN_BITS)]
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return sum(map(len, self._keys)) + len(self._recent)

    def _runs(self, keys: np.ndarray) -> np.ndarray:
        """Each key's run: its first byte's high bits (``keys`` is an ``S<width>`` array: width bytes apiece)."""
        return np.frombuffer(keys.tobytes(), dtype=np.uint8)[:: self.width] >> (8 - RUN_BITS)

    def get_many(self, keys: Sequence[bytes]) -> list[int | None]:
        """Each key's value, or None where it is absent."""
        found: list[int | None] = [self._recent.get(key) for key in keys]
        if len(keys) and len(self) > len(self._recent):
            probe = np.array(keys, dtype=self._dtype)
            runs = self._runs(probe)
            for run in np.unique(runs):
                stored, rows = self._keys[run], np.flatnonzero(runs == run)
                if not len(stored):
                    continue
                at = np.minimum(np.searchsorted(stored, probe[rows]), len(stored) - 1)
                for hit in np.flatnonzero(stored[at] == probe[rows]):
                    found[rows[hit]] = int(self._values[run][at[hit]])
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
        keys = np.array(list(self._recent), dtype=self._dtype)
        values = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        runs = self._runs(keys)  # sorted keys: each run's new entries are one sorted slice
        present, starts = np.unique(runs, return_index=True)
        for run, start, stop in zip(present, starts, [*starts[1:], len(runs)]):
            at = np.searchsorted(self._keys[run], keys[start:stop])  # one O(run) insert of the run's new entries
            self._keys[run] = np.insert(self._keys[run], at, keys[start:stop])
            self._values[run] = np.insert(self._values[run], at, values[start:stop])
        self._recent = {}


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op without it). The map's runs are
    small enough to live on malloc's heap, and a heap keeps what is freed in its middle: without this, a map that is
    gone still counts in the process's peak through the next pass."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
