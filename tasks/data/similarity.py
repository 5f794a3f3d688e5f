"""Near-duplicate prompts and benchmark contamination, the two text-similarity checks of curation.

Near-duplicates: MinHash signatures of each distinct prompt's word 3-gram shingles (lowercased, punctuation
dropped), cut into LSH bands with datasketch's optimal (bands, rows) for the Jaccard ``threshold``.
Prompts that share a band key are candidates; a candidate pair whose signatures agree on at least ``threshold`` of
their positions (the MinHash estimate of the Jaccard similarity) is a near-duplicate pair, and the connected
components of those pairs are the near-duplicate groups. The signatures and band keys go to files, and the
signatures are read back for the candidate pairs only.

Contamination: the word n-grams (13 by default, the usual choice since GPT-3) of benchmark prompts; a prompt that
contains one of them is contaminated. A benchmark item shorter than n words is matched as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datasketch import MinHashLSH
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.data.ingest import read_rows
from creditflow.tasks.data.key_map import CompactKeyMap
from creditflow.tasks.data.schema import ID_BYTES

NUM_PERM = 128
_PERM_CHUNK = 16
_PAIR_CHUNK = 4096
MAX_BUCKET_PAIRS_WINDOW = 64  # how many bucket neighbours each prompt is compared with (NearDuplicateIndex.groups)
_MIX = tuple(np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9))  # odd 64-bit mixers
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased words, punctuation and whitespace dropped: what both checks compare."""
    return _WORD.findall(text.lower())


class PromptSketch:
    """MinHash signatures and LSH band keys of prompts, a batch at a time in numpy.

    A shingle's hash combines its three words' xxh32 hashes; permutation i maps a hash x to the high 32 bits of
    a_i * x + b_i (mod 2^64), multiply-shift hashing (Dietzfelbinger et al. 1997), with (a_i, b_i) drawn from a
    fixed seed. The (bands, rows) split is datasketch's ``MinHashLSH`` optimum for ``threshold``."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.bands, self.rows = lsh.b, lsh.r
        rng = np.random.default_rng(1)
        self._a = (rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64) * 2 + 1)[:, None]  # odd multipliers
        self._b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)[:, None]
        self._band_mix = rng.integers(0, 2**63, self.rows, dtype=np.uint64) * 2 + 1

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), NUM_PERM) uint32: each text's MinHash signature over its word 3-gram shingles."""
        if not texts:
            return np.zeros((0, NUM_PERM), dtype=np.uint32)
        tokens, counts = [], []
        for text in texts:  # a text under 3 words is padded with empty words: one shingle of all it has
            found = words(text)
            found += [""] * (SHINGLE_WORDS - len(found))
            tokens += found
            counts.append(len(found))
        vocabulary, inverse = np.unique(np.array(tokens), return_inverse=True)  # hash each distinct word once
        word_hash = np.fromiter((xxhash.xxh32_intdigest(w.encode()) for w in vocabulary), np.uint64, len(vocabulary))
        h = word_hash[inverse]
        shingles = np.asarray(counts) - (SHINGLE_WORDS - 1)
        starts = np.cumsum(shingles) - shingles  # each text's first shingle
        # shingle j of text i starts at word j + (words before text i) = j-th shingle overall + 2 * i
        position = np.arange(shingles.sum()) + (SHINGLE_WORDS - 1) * np.repeat(np.arange(len(texts)), shingles)
        out = np.empty((len(texts), NUM_PERM), dtype=np.uint32)
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
            values = (h[position] * _MIX[0] + h[position + 1] * _MIX[1] + h[position + 2] * _MIX[2]) >> np.uint64(16)
            for lo in range(0, NUM_PERM, _PERM_CHUNK):  # a few permutations at a time: the temporaries stay small
                a, b = self._a[lo : lo + _PERM_CHUNK], self._b[lo : lo + _PERM_CHUNK]
                permuted = (a * values[None, :] + b) >> np.uint64(32)
                out[:, lo : lo + _PERM_CHUNK] = np.minimum.reduceat(permuted, starts, axis=1).T
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: a 64-bit key of each band of each signature (its rows' values, mixed)."""
        bands = signatures[:, : self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (bands.astype(np.uint64) * self._band_mix).sum(axis=2, dtype=np.uint64)


class NearDuplicateIndex:
    """Distinct prompts in order of first sight; :meth:`groups` links the near-duplicates among them. Per prompt it
    keeps about 18 bytes in memory (tasks/data/key_map.py); its id, signature and band keys go to files beside
    ``signatures_path``, each band's keys in a file of its own so :meth:`groups` reads one band at a time."""

    def __init__(self, sketch: PromptSketch, signatures_path: Path):
        self.sketch = sketch
        self.count = 0
        self.sealed = False
        self._index = CompactKeyMap(ID_BYTES)  # prompt id -> its index in order of first sight
        self._folder = signatures_path.parent
        self._path = signatures_path
        self._file = open(signatures_path, "wb")
        self._ids = open(self._folder / "prompt_ids.bin", "wb")
        self._bands = [open(self._band_path(band), "wb") for band in range(sketch.bands)]

    def _band_path(self, band: int) -> Path:
        return self._folder / f"{self._path.stem}.band{band}.bin"

    def add(self, prompt_ids: list[str], signatures: np.ndarray) -> list[int]:
        """Each prompt's index; new prompts' signatures are kept (a prompt id always has the same signature)."""
        if self.sealed:
            raise RuntimeError("NearDuplicateIndex.add after seal(): the index is complete")
        keys = [bytes.fromhex(prompt_id) for prompt_id in prompt_ids]
        indices, new_rows = self._index.setdefault_many(keys, lambda _, n: self.count + n)
        if new_rows:
            self.count += len(new_rows)
            kept = signatures[new_rows]
            self._file.write(np.ascontiguousarray(kept).tobytes())
            self._ids.write(b"".join(keys[row] for row in new_rows))
            for band, keys_of_band in zip(self._bands, self.sketch.band_keys(kept).T):
                band.write(np.ascontiguousarray(keys_of_band).tobytes())
        return indices

    def seal(self) -> None:
        """No prompt is added after this: the files are complete and the lookups' memory is freed. Call it before
        :meth:`prompt_ids` and :meth:`groups`."""
        for file in (self._file, self._ids, *self._bands):
            file.close()
        del self._index
        self.sealed = True

    def _require_sealed(self, what: str) -> None:
        if not self.sealed:  # before seal() the files may be partly written: the answer would be silently wrong
            raise RuntimeError(f"NearDuplicateIndex.{what} before seal(): the index files are not complete")

    def prompt_ids(self) -> Iterator[str]:
        """Every distinct prompt id (hex), in order of first sight (after :meth:`seal`)."""
        self._require_sealed("prompt_ids")
        if self.count == 0:  # an empty file cannot be mapped
            return iter(())
        raw = np.memmap(self._folder / "prompt_ids.bin", dtype=np.uint8, mode="r", shape=(self.count, ID_BYTES))
        return (row.tobytes().hex() for row in raw)

    def groups(self) -> np.ndarray:
        """Each prompt's group: the index of the first-seen prompt of its near-duplicate component (after
        :meth:`seal`).

        Every pair of prompts in a band's bucket is compared (or already linked through near-duplicates between
        them), so the groups do not depend on the order prompts came in. The bound: in a bucket of more than
        ``MAX_BUCKET_PAIRS_WINDOW + 1`` prompts, each is compared with the next ``MAX_BUCKET_PAIRS_WINDOW`` only (in
        order of first sight), which keeps the work linear in the prompts; such a bucket is in practice one
        template's prompts, linked through those comparisons."""
        self._require_sealed("groups")
        n = self.count
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        signatures = np.memmap(self._path, dtype=np.uint32, mode="r", shape=(n, NUM_PERM))
        left, right = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for band in range(self.sketch.bands):
            keys = np.fromfile(self._band_path(band), dtype=np.uint64)
            order = np.argsort(keys, kind="stable")  # a bucket's prompts side by side, in order of first sight
            keys = keys[order]
            chained = np.zeros(n, dtype=bool)  # sorted position i is a near-duplicate of position i + 1
            unchained = None  # how many positions before each are not chained to their next
            for offset in range(1, MAX_BUCKET_PAIRS_WINDOW + 1):
                start = np.flatnonzero(keys[offset:] == keys[:-offset])  # equal ends of a sorted run: one bucket
                if len(start) == 0:
                    break  # no bucket has more than `offset` prompts
                if offset > 1:  # a pair joined through a chain of near-duplicate neighbours is in one group already
                    if unchained is None:
                        unchained = np.concatenate([np.zeros(1, np.int32), np.cumsum(~chained, dtype=np.int32)])
                    start = start[unchained[start + offset] > unchained[start]]
                start = start[self._similar(signatures, order[start], order[start + offset])]
                if offset == 1:
                    chained[start] = True
                left.append(order[start])
                right.append(order[start + offset])
        a, b = np.concatenate(left), np.concatenate(right)
        group = np.arange(n, dtype=np.int64)  # a prompt with no near-duplicate is its own group
        # The components of the linked prompts only: a graph over all n would cost several n-sized arrays.
        linked, ends = np.unique(np.concatenate([a, b]), return_inverse=True)  # linked is sorted
        m = len(linked)
        graph = coo_matrix((np.ones(len(a)), (ends[: len(a)], ends[len(a) :])), shape=(m, m))
        _, labels = connected_components(graph, directed=False)
        first = np.full(labels.max() + 1 if m else 0, n, dtype=np.int64)
        np.minimum.at(first, labels, linked)
        group[linked] = first[labels]
        return group

    def _similar(self, signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether each pair's signatures agree on at least ``threshold`` of their positions."""
        agree = [np.zeros(0)]
        for i in range(0, len(a), _PAIR_CHUNK):  # a chunk of pairs' signatures in memory at a time
            agree.append(np.mean(signatures[a[i : i + _PAIR_CHUNK]] == signatures[b[i : i + _PAIR_CHUNK]], axis=1))
        return np.concatenate(agree) >= self.sketch.threshold


@dataclass(frozen=True)
class BenchmarkItem:
    file: str
    location: str
    text: str


class Contamination:
    """The n-grams of benchmark prompt files (any file curation reads; the prompt is the first field of
    ``prompt``, ``instruction``, ``question`` or ``turns`` a row has, the first turn of ``turns``)."""

    FIELDS = ("prompt", "instruction", "question", "turns")

    def __init__(self, files: list[str], n: int):
        self.n = n
        self.grams: dict[int, BenchmarkItem] = {}
        self.short: dict[int, dict[int, BenchmarkItem]] = {}  # items under n words, by length
        for file in files:
            _, rows = read_rows(SourceConfig(path=file))
            for location, row in rows:
                item = BenchmarkItem(file, location, _benchmark_text(row, file, location))
                tokens = words(item.text)
                if not tokens:
                    continue
                if len(tokens) < n:
                    self.short.setdefault(len(tokens), {}).setdefault(_gram_key(tokens), item)
                for i in range(len(tokens) - n + 1):
                    self.grams.setdefault(_gram_key(tokens[i : i + n]), item)

    def match(self, text: str) -> BenchmarkItem | None:
        """The benchmark item ``text`` shares an n-gram with (or contains whole), if any."""
        tokens = words(text)
        for length, grams in [(self.n, self.grams), *self.short.items()]:
            for i in range(len(tokens) - length + 1):
                item = grams.get(_gram_key(tokens[i : i + length]))
                if item is not None:
                    return item
        return None


def _gram_key(tokens: list[str]) -> int:
    return xxhash.xxh64_intdigest(" ".join(tokens).encode())


def _benchmark_text(row: dict[str, Any], file: str, location: str) -> str:
    for field in Contamination.FIELDS:
        value = row.get(field)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:  # MT-Bench's turns (strings), Arena-Hard's ({content}): the first
            first = value[0]  # a later turn follows up on the first, it is not a prompt of its own
            return first["content"] if isinstance(first, dict) else str(first)
    raise MalformedInputError(
        file, location, None, f"no benchmark prompt: expected one of {list(Contamination.FIELDS)}"
    )
