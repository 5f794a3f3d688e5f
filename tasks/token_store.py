"""Stage 3: token rewards for every (pair, side, source), computed incrementally through a content-keyed cache.

Cache: ``<workspace>/cache/token_rewards/shard-<uuid>.parquet``, shared by every config and run. A row's key is

    sha256( source, prompt messages, completion messages, knobs )

where the knobs are everything else that changes its values: for ``contrastive`` the reference model's weights
digest, the tokenizer fingerprint, the two template digests, max_length / max_prompt_length / truncation, the dtype
and the code version of the modules that compute it; for ``abc`` the reward model's weights digest, its tokenizer,
its max_length, beta, the dtype and the code version. Only keys absent from the cache are computed, so adding pairs
computes only the new ones, and a run that dies keeps every shard it finished: shards are written (temporary file,
then rename) as soon as their rows are done.

The stage output ``token_rewards`` has one row per requested (pair_id, side, source), assembled from the cache:

    pair_id, side, source, key, n_tokens, token_ids list<int32>, char_start/char_end list<int32>,
    rewards list<float32>, ref_logps list<float32> (null for abc)

``contrastive`` rows are on the policy's completion tokens (``tokenization.encode_pair`` ids, EOS included);
``abc`` rows are on the reward model's response tokens: use ``abc.project_to_policy`` to move them onto the policy's.
char_start/char_end are each token's span in ``schema.completion_text(completion)``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from creditflow.storage.hashing import code_version, sha256_json, sha256_text
from creditflow.storage.workspace import Workspace
from creditflow.tasks import abc, logprobs, schema, token_rewards, tokenization
from creditflow.tasks.schema import Messages
from creditflow.tasks.stage import StageContext
from creditflow.tasks.token_rewards import TokenRewardsConfig, resolve_device, resolve_dtype

SIDES = ("chosen", "rejected")
CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("char_start", pa.list_(pa.int32())),
        ("char_end", pa.list_(pa.int32())),
        ("rewards", pa.list_(pa.float32())),
        ("ref_logps", pa.list_(pa.float32())),
    ]
)
OUTPUT_SCHEMA = pa.schema([("pair_id", pa.string()), ("side", pa.string()), *CACHE_SCHEMA])
_STALE_TMP_SECONDS = 3600  # a shard takes seconds to write; older temporary files belong to dead runs


class TokenCacheError(RuntimeError):
    """A cache shard is missing or unreadable."""


class TokenStore:
    """Append-only Parquet shards of cache rows, looked up by key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for tmp in self.root.glob(".tmp-*"):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink(missing_ok=True)

    @classmethod
    def for_workspace(cls, workspace: Workspace) -> "TokenStore":
        return cls(workspace.root / "cache" / "token_rewards")

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet"))

    def index(self) -> dict[str, Path]:
        """key -> the shard holding it (the first one, if a key was computed twice by concurrent runs)."""
        index: dict[str, Path] = {}
        for shard in self.shards():
            for key in _read_shard(shard, columns=["key"]).column("key").to_pylist():
                index.setdefault(key, shard)
        return index

    def missing_keys(self, keys: list[str], index: dict[str, Path] | None = None) -> list[str]:
        """The distinct ``keys`` not in the cache, in first-seen order."""
        index = self.index() if index is None else index
        return [k for k in dict.fromkeys(keys) if k not in index]

    def write_shard(self, rows: list[dict[str, Any]]) -> Path:
        """Write rows as one new shard, atomically: a reader sees the whole shard or none of it."""
        name = f"shard-{uuid.uuid4().hex}.parquet"
        tmp = self.root / f".tmp-{name}"
        pq.write_table(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), tmp, compression="zstd")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, self.root / name)
        return self.root / name

    def read_rows(self, keys: list[str], index: dict[str, Path] | None = None) -> pa.Table:
        """Cache rows for ``keys``, in that order (repeats allowed). Every key must be cached."""
        if not keys:
            return CACHE_SCHEMA.empty_table()
        index = self.index() if index is None else index
        absent = [k for k in keys if k not in index]
        if absent:
            raise KeyError(f"{len(absent)} keys are not in the token-reward cache {self.root}, e.g. {absent[0]}")
        wanted_by_shard: dict[Path, set[str]] = {}
        for key in keys:
            wanted_by_shard.setdefault(index[key], set()).add(key)
        parts = []
        for shard, wanted in wanted_by_shard.items():
            table = _read_shard(shard)
            # A shard holds each key once (it is written from distinct missing keys).
            parts.append(table.filter(pc.is_in(table.column("key"), pa.array(sorted(wanted)))))
        table = pa.concat_tables(parts)
        position = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        return table.take([position[k] for k in keys])


def _read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise TokenCacheError(f"{path}: token-reward cache shard is missing (deleted while in use?); rerun the stage")
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise TokenCacheError(
            f"{path}: corrupted token-reward cache shard ({exc}); delete it to recompute its rows"
        ) from exc
    expected = CACHE_SCHEMA if columns is None else pa.schema([CACHE_SCHEMA.field(c) for c in columns])
    if not table.schema.equals(expected):
        raise TokenCacheError(f"{path}: not a token-reward cache shard (schema {table.schema})")
    return table


# ---------------------------------------------------------------------------------------------------------
# Sources: what a row's key depends on and how its values are computed


def row_key(source: str, knobs: dict[str, Any], prompt: Messages, completion: Messages) -> str:
    """Content key of one cache row. Messages are hashed verbatim: whitespace changes token ids."""
    messages = [[(m["role"], m["content"]) for m in turns] for turns in (prompt, completion)]
    return sha256_json({"source": source, "knobs": knobs, "messages": messages})


@dataclass
class Source:
    name: str
    knobs: dict[str, Any]  # every input besides the messages that changes this source's rows
    tokenizer: Any  # decodes this source's token ids
    encode: Callable[[list[Messages], list[Messages]], list]  # -> items with .n_forward_tokens
    score: Callable[[list, Any], list[dict[str, Any]]]  # (items, progress) -> cache rows without key/source


def contrastive_source(config: TokenRewardsConfig, device, dtype) -> Source:
    """T-REG contrastive prompting on the reference model ``config.model`` (its tokenizer is the policy's)."""
    from creditflow.tasks.models import model_fingerprint, resolve_model

    folder = resolve_model(config.model)
    tokenizer = tokenization.load_tokenizer(str(folder))
    knobs = {
        "model": model_fingerprint(folder),
        "tokenizer": tokenization.tokenizer_fingerprint(tokenizer),
        "better_template": sha256_text(config.better_template),
        "worse_template": sha256_text(config.worse_template),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "truncation": config.truncation,
        "dtype": str(dtype),
        "code": code_version((tokenization, logprobs, token_rewards, schema)),
    }
    model = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def score(items: list[token_rewards.ContrastiveItem], progress) -> list[dict[str, Any]]:
        nonlocal model
        if model is None:  # loaded on first use: a fully cached run never loads it
            model = token_rewards.load_reference_model(folder, device, dtype)
        results = token_rewards.score_contrastive(model, items, config.batch_size, pad_id, progress)
        return [
            {
                "n_tokens": len(item.completion_ids),
                "token_ids": item.completion_ids,
                "char_start": item.char_start,
                "char_end": item.char_end,
                "rewards": result.rewards,
                "ref_logps": result.ref_logps,
            }
            for item, result in zip(items, results)
        ]

    return Source(
        "contrastive", knobs, tokenizer, lambda p, c: token_rewards.encode_contrastive(tokenizer, p, c, config), score
    )


def abc_source(config: TokenRewardsConfig, folder: Path, rm_max_length: int, device, dtype) -> Source:
    """ABC on the reward model in ``folder`` (the reward-model stage's ``model/``)."""
    from creditflow.tasks.models import model_fingerprint

    tokenizer, model = abc.load_abc_model(folder, device, dtype)
    max_length = config.abc_max_length or rm_max_length
    knobs = {
        "reward_model": model_fingerprint(folder),
        "tokenizer": tokenization.tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "beta": config.abc_beta,
        "dtype": str(dtype),
        "code": code_version((abc, schema)),
    }

    def encode(prompts: list[Messages], completions: list[Messages]) -> list[abc.AbcItem]:
        return [abc.encode_for_abc(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]

    def score(items: list[abc.AbcItem], progress) -> list[dict[str, Any]]:
        results = abc.score_abc(model, items, config.abc_beta, config.batch_size, tokenizer.pad_token_id, progress)
        return [
            {
                "n_tokens": len(item.response_positions),
                "token_ids": item.response_ids,
                "char_start": item.char_start,
                "char_end": item.char_end,
                "rewards": result.rewards,
                "ref_logps": None,
            }
            for item, result in zip(items, results)
        ]

    return Source("abc", knobs, tokenizer, encode, score)


@dataclass
class SourceRun:
    keys: list[str]  # one per request
    computed: int
    reused: int
    forward_tokens: int
    seconds: float


def compute_missing(
    store: TokenStore,
    source: Source,
    prompts: list[Messages],
    completions: list[Messages],
    rows_per_shard: int,
    progress: bool = True,
) -> SourceRun:
    """Compute and cache the rows of ``source`` whose keys are not cached yet; a shard is written per chunk."""
    keys = [row_key(source.name, source.knobs, p, c) for p, c in zip(prompts, completions)]
    missing = store.missing_keys(keys)
    if not missing:
        return SourceRun(keys, 0, len(set(keys)), 0, 0.0)
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    todo = [first[k] for k in missing]
    # Tokenize everything first: a row that cannot be encoded fails the run before any compute.
    items = source.encode([prompts[i] for i in todo], [completions[i] for i in todo])
    order = sorted(range(len(items)), key=lambda j: -items[j].n_forward_tokens)  # similar lengths share a shard
    total = sum(item.n_forward_tokens for item in items)
    started = time.perf_counter()
    with tqdm(total=total, unit="tok", desc=f"token rewards ({source.name})", disable=not progress) as bar:
        for start in range(0, len(order), rows_per_shard):
            chunk = order[start : start + rows_per_shard]
            rows = source.score([items[j] for j in chunk], bar)
            store.write_shard([{**row, "key": missing[j], "source": source.name} for j, row in zip(chunk, rows)])
    seconds = time.perf_counter() - started
    return SourceRun(keys, len(missing), len(set(keys)) - len(missing), total, seconds)


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def input_digests(config: TokenRewardsConfig) -> dict[str, Any]:
    """Stage-fingerprint inputs outside the artifact store: the reference model and its tokenizer."""
    if "contrastive" not in config.sources:
        return {}
    from creditflow.tasks.models import model_fingerprint, resolve_model

    folder = resolve_model(config.model)
    tokenizer = tokenization.load_tokenizer(str(folder))
    return {"model": model_fingerprint(folder), "tokenizer": tokenization.tokenizer_fingerprint(tokenizer)}


def side_requests(pairs: pa.Table) -> tuple[list[str], list[str], list[Messages], list[Messages]]:
    """(pair_id, side, prompt, completion) columns: chosen and rejected of every pair, pair by pair."""
    pair_ids, sides, prompts, completions = [], [], [], []
    columns = pairs.select(["pair_id", "prompt", *SIDES]).to_pylist()
    for row in columns:
        for side in SIDES:
            pair_ids.append(row["pair_id"])
            sides.append(side)
            prompts.append(row["prompt"])
            completions.append(row[side])
    return pair_ids, sides, prompts, completions


def _reward_model_folder(ctx: StageContext) -> tuple[Path, int]:
    """The reward-model stage's ``model/`` folder (every file checked against its manifest) and its max_length."""
    if "reward_model" not in ctx.upstream:
        raise ValueError("token_rewards.sources includes 'abc', which needs the reward_model stage upstream")
    manifest = ctx.upstream["reward_model"]
    model_files = [name for name in manifest.outputs if name.startswith("model/")]
    if not model_files:
        raise ValueError(f"reward_model artifact {manifest.fingerprint} has no model/ folder")
    for name in model_files:
        ctx.workspace.store.file(manifest, name)  # raises on a missing or edited file
    return ctx.upstream_dir("reward_model") / "model", int(manifest.config["max_length"])


def compute_token_rewards(ctx: StageContext) -> dict[str, float]:
    """Compute the missing cache rows of every requested source, then write ``token_rewards`` from the cache.

    Pairs come from the on-policy stage when it ran, else from curation. Metrics per source and in total:
    ``rows_computed`` / ``rows_reused`` count distinct cache keys computed now / found in the cache (the proof of
    incrementality), ``tokens_per_s`` the non-pad tokens through the model per second of compute.
    """
    config: TokenRewardsConfig = ctx.config
    pairs = ctx.read_upstream("onpolicy" if "onpolicy" in ctx.upstream else "curate", "pairs")
    pair_ids, sides, prompts, completions = side_requests(pairs)
    store = TokenStore.for_workspace(ctx.workspace)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    metrics: dict[str, float] = {"pairs": pairs.num_rows}
    sources, keys = [], []
    for name in config.sources:
        if name == "contrastive":
            source = contrastive_source(config, device, dtype)
        else:
            folder, rm_max_length = _reward_model_folder(ctx)
            source = abc_source(config, folder, rm_max_length, device, dtype)
        run = compute_missing(store, source, prompts, completions, config.rows_per_shard, ctx.progress)
        sources.append(source)
        keys.append(run.keys)
        metrics.update(
            {
                f"{name}.rows_computed": run.computed,
                f"{name}.rows_reused": run.reused,
                f"{name}.forward_tokens": run.forward_tokens,
                f"{name}.seconds": run.seconds,
                f"{name}.tokens_per_s": run.forward_tokens / run.seconds if run.computed else 0.0,
            }
        )
    metrics["rows_computed"] = sum(metrics[f"{s.name}.rows_computed"] for s in sources)
    metrics["rows_reused"] = sum(metrics[f"{s.name}.rows_reused"] for s in sources)

    table = assemble(store, pair_ids, sides, [s.name for s in sources], keys)
    ctx.writer.write_table("token_rewards", table)
    metrics["rows"] = table.num_rows
    metrics.update(reward_summary(table))
    _log_heatmaps(ctx, table, sources, config.heatmap_pairs)
    return metrics


def assemble(
    store: TokenStore, pair_ids: list[str], sides: list[str], source_names: list[str], keys: list[list[str]]
) -> pa.Table:
    """The stage output: cache rows for every (pair, side, source), ordered pair by pair, side, then source."""
    order = [(i, s) for i in range(len(pair_ids)) for s in range(len(source_names))]
    rows = store.read_rows([keys[s][i] for i, s in order])
    columns = {
        "pair_id": pa.array([pair_ids[i] for i, _ in order], pa.string()),
        "side": pa.array([sides[i] for i, _ in order], pa.string()),
    }
    return pa.table({**columns, **{name: rows.column(name) for name in CACHE_SCHEMA.names}}, schema=OUTPUT_SCHEMA)


def reward_summary(table: pa.Table) -> dict[str, float]:
    """Mean token reward per source and side: chosen above rejected is the first sanity check."""
    summary = {}
    for source in pc.unique(table.column("source")).to_pylist():
        for side in SIDES:
            subset = table.filter(pc.and_(pc.equal(table["source"], source), pc.equal(table["side"], side)))
            values = pc.list_flatten(subset.column("rewards"))
            summary[f"{source}.mean_token_reward_{side}"] = float(pc.mean(values).as_py() or 0.0)
    return summary


def _log_heatmaps(ctx: StageContext, table: pa.Table, sources: list[Source], n_pairs: int) -> None:
    from creditflow.tasks.token_view import heatmap_figure, heatmap_html

    sample = set(list(dict.fromkeys(table.column("pair_id").to_pylist()))[:n_pairs])
    if not sample:
        return
    for source in sources:
        rows = [r for r in table.filter(pc.equal(table["source"], source.name)).to_pylist() if r["pair_id"] in sample]
        ctx.run.log_text(heatmap_html(rows, source.tokenizer), f"token_rewards/heatmap_{source.name}.html")
        ctx.run.log_figure(heatmap_figure(rows), f"token_rewards/heatmap_{source.name}.png")
