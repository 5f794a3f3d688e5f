"""Near-duplicate prompts and benchmark contamination, the two text-similarity checks of curation.

Near-duplicates: MinHash signatures (datasketch) of each distinct prompt's word 3-gram shingles (lowercased,
punctuation dropped), cut into LSH bands with datasketch's optimal (bands, rows) for the Jaccard ``threshold``.
Prompts that share a band key are candidates; a candidate pair whose signatures agree on at least ``threshold`` of
their positions (the MinHash estimate of the Jaccard similarity) is a near-duplicate pair, and the connected
components of those pairs are the near-duplicate groups. In memory stay only the band keys (8 bytes per band per
prompt); the signatures go to a file and are read back for the candidate pairs only.

Contamination: the word n-grams (13 by default, the usual choice since GPT-3) of benchmark prompts; a prompt that
contains one of them is contaminated. A benchmark item shorter than n words is matched as a whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.data.ingest import read_rows
from creditflow.tasks.data.schema import Messages

NUM_PERM = 128
SCHEME = "affine32"  # datasketch 2's: 32-bit hash values
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased words, punctuation and whitespace dropped: what both checks compare."""
    return _WORD.findall(text.lower())


def prompt_text(prompt: Messages) -> str:
    return "\n".join(m["content"] for m in prompt)


class PromptSketch:
    """MinHash signatures and LSH band keys of prompts; deterministic across processes (xxhash, fixed seed)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.bands, self.rows = lsh.b, lsh.r
        self._permutations = MinHash(num_perm=NUM_PERM, seed=1, scheme=SCHEME).permutations

    def signature(self, text: str) -> np.ndarray:
        tokens = words(text)
        shingles = [" ".join(tokens[i : i + SHINGLE_WORDS]) for i in range(max(len(tokens) - SHINGLE_WORDS + 1, 1))]
        sketch = MinHash(
            num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest, permutations=self._permutations, scheme=SCHEME
        )
        sketch.update_batch([s.encode() for s in shingles])
        return np.asarray(sketch.hashvalues, dtype=np.uint32)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        return np.array(
            [
                xxhash.xxh64_intdigest(signature[b * self.rows : (b + 1) * self.rows].tobytes())
                for b in range(self.bands)
            ],
            dtype=np.uint64,
        )


class NearDuplicateIndex:
    """Distinct prompts in order of first sight; :meth:`groups` links the near-duplicates among them."""

    def __init__(self, sketch: PromptSketch, signatures_path: Path):
        self.sketch = sketch
        self.index: dict[bytes, int] = {}  # prompt id (10 bytes) -> its index in order of first sight
        self._keys: list[np.ndarray] = []
        self._path = signatures_path
        self._file = open(signatures_path, "wb")

    def add(self, prompt_id: str, signature: np.ndarray) -> int:
        """The prompt's index; a new prompt's signature is kept (the same prompt id always has the same one)."""
        key = bytes.fromhex(prompt_id)
        found = self.index.get(key)
        if found is not None:
            return found
        self.index[key] = len(self.index)
        self._keys.append(self.sketch.band_keys(signature))
        self._file.write(signature.tobytes())
        return self.index[key]

    def groups(self) -> np.ndarray:
        """Each prompt's group: the index of the first-seen prompt of its near-duplicate component."""
        self._file.close()
        n = len(self.index)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        keys = np.stack(self._keys)
        signatures = np.memmap(self._path, dtype=np.uint32, mode="r", shape=(n, NUM_PERM))
        left, right = [], []
        for band in range(keys.shape[1]):
            order = np.argsort(keys[:, band], kind="stable")
            same = keys[order[1:], band] == keys[order[:-1], band]  # neighbours in one bucket: a chain through it
            left.append(order[:-1][same])
            right.append(order[1:][same])
        a, b = np.concatenate(left), np.concatenate(right)
        if len(a):
            agree = np.array([np.mean(signatures[i] == signatures[j]) for i, j in zip(a, b)])
            a, b = a[agree >= self.sketch.threshold], b[agree >= self.sketch.threshold]
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        first = np.full(labels.max() + 1, n, dtype=np.int64)
        np.minimum.at(first, labels, np.arange(n))
        return first[labels]


@dataclass(frozen=True)
class BenchmarkItem:
    file: str
    location: str
    text: str


class Contamination:
    """The n-grams of benchmark prompt files (any file curation reads; the prompt is the first field of
    ``prompt``, ``instruction``, ``question`` or ``turns`` a row has)."""

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
        if isinstance(value, list) and value:  # MT-Bench's turns (strings), Arena-Hard's ({content})
            return "\n".join(v["content"] if isinstance(v, dict) else str(v) for v in value)
    raise MalformedInputError(
        file, location, None, f"no benchmark prompt: expected one of {list(Contamination.FIELDS)}"
    )
