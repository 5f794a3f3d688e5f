"""Stage 3 recipe: token rewards for every (pair, side, source), computed incrementally through the content-keyed
shard cache (storage/token_cache.py).

A cache row's key covers the source, the prompt and completion messages, and the knobs that change its values:
for ``contrastive`` the reference model's weights digest, the tokenizer fingerprint, the two template digests,
max_length / max_prompt_length / truncation, the dtype and the code version of the modules that compute it; for
``abc`` the reward model's weights digest, its tokenizer, its max_length, beta, the dtype and the code version.
Only keys absent from the cache are computed, so adding pairs computes only the new ones.

The stage output ``token_rewards`` has one row per requested (pair_id, side, source), assembled from the cache:

    pair_id, side, source, key, n_tokens, token_ids list<int32>, char_start/char_end list<int32>,
    rewards list<float32>, ref_logps list<float32> (null for abc)

``contrastive`` rows are on the policy's completion tokens (``tokenization.encode_pair`` ids, EOS included);
``abc`` rows are on the reward model's response tokens: ``attention_credit.project_to_policy`` moves them onto the
policy's.
char_start/char_end are each token's span in ``schema.completion_text(completion)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from creditflow.storage.token_cache import CACHE_SCHEMA, TokenCache, row_key
from creditflow.tasks.config_base import ComputeConfig
from creditflow.tasks.configs import TokenRewardsConfig
from creditflow.tasks.credit import attention_credit, contrastive
from creditflow.tasks.credit.source import Source, SourceModels
from creditflow.tasks.credit.token_view import heatmap_figure, heatmap_html
from creditflow.tasks.data.schema import SIDES, Messages
from creditflow.tasks.infer.distributed import map_shards, uses_ray
from creditflow.tasks.models.precision import REFERENCE_PRECISION_FILE, resolve_device

if TYPE_CHECKING:  # importing it imports MLflow, which Ray workers building a source never need
    from creditflow.tasks.stage import StageContext

logger = logging.getLogger(__name__)
TRUNCATION_WARNING = 0.05  # warn when more than this share of the computed rows were cut
OUTPUT_SCHEMA = pa.schema([("pair_id", pa.string()), ("side", pa.string()), *CACHE_SCHEMA])
# The token-reward sources, by reference. The stage's code digest leaves out the modules of the sources a config
# does not ask for (flows/registry.py reads this table), and each source's cache rows are keyed by the code its
# own module reaches.
SOURCES = {"contrastive": contrastive.contrastive_source, "abc": attention_credit.abc_source}


# ---------------------------------------------------------------------------------------------------------
# Sources: what a row's key depends on and how its values are computed


# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_token_rewards(ctx: StageContext) -> dict[str, float]:
    """Compute the missing cache rows of every requested source, then write ``token_rewards`` from the cache.

    Pairs come from the on-policy stage when it ran, else from curation. Metrics per source and in total:
    ``rows_computed`` / ``rows_reused`` count distinct cache keys computed now / found in the cache (the proof of
    incrementality), ``tokens_per_s`` the non-pad tokens through the model per second of compute.
    """
    config: TokenRewardsConfig = ctx.config
    pairs = ctx.read_upstream("onpolicy" if "onpolicy" in ctx.upstream else "curate", "pairs")
    pair_ids, sides, prompts, completions = side_requests(pairs)
    cache = TokenCache.for_workspace(ctx.workspace)

    metrics: dict[str, float] = {"pairs": pairs.num_rows}
    sources, keys = [], []
    rm_folder, rm_max_length = _reward_model_folder(ctx) if "abc" in config.sources else (None, None)
    # One warning for the stage; the flag rides in each source's build arguments, so Ray actors get it too.
    trust = ctx.remote_code_allowed(*(rm_folder if name == "abc" else ctx.reference_model for name in config.sources))
    for name in config.sources:
        models = {"reference_model": ctx.reference_model}
        if name == "abc":
            models = {"reward_model_dir": str(rm_folder), "rm_max_length": rm_max_length}
        build = partial(build_source, name, config.model_dump(mode="json"), **models, trust_remote_code=trust)
        source = build()
        run = compute_missing(
            cache, source, prompts, completions, config.rows_per_shard, ctx.progress, ctx.compute, build
        )
        sources.append(source)
        keys.append(run.keys)
        metrics.update(
            {
                f"{name}.rows_computed": run.computed,
                f"{name}.rows_reused": run.reused,
                f"{name}.forward_tokens": run.forward_tokens,
                f"{name}.seconds": run.seconds,
                f"{name}.tokens_per_s": run.forward_tokens / run.seconds if run.computed else 0.0,
                f"{name}.rows_truncated": run.truncated,
            }
        )
    metrics["rows_computed"] = sum(metrics[f"{s.name}.rows_computed"] for s in sources)
    metrics["rows_reused"] = sum(metrics[f"{s.name}.rows_reused"] for s in sources)

    table = assemble(cache, pair_ids, sides, [s.name for s in sources], keys)
    ctx.writer.write_table("token_rewards", table)
    for source in sources:
        if source.name == "contrastive":  # the policy stage warns when it computes at another precision
            ctx.writer.write_json(REFERENCE_PRECISION_FILE, {"reference_logps": source.knobs["dtype"]})
    metrics["rows"] = table.num_rows
    metrics.update(reward_summary(table))
    _log_heatmaps(ctx, table, sources, config.heatmap_pairs)
    return metrics


@dataclass
class SourceRun:
    keys: list[str]  # one per request
    computed: int
    reused: int
    forward_tokens: int
    seconds: float
    truncated: int = 0  # computed rows whose prompt or completion max_length / max_prompt_length cut


def build_source(
    name: str,
    config: dict[str, Any],
    reference_model: str | None = None,
    reward_model_dir: str | None = None,
    rm_max_length: int | None = None,
    trust_remote_code: bool = False,
) -> Source:
    """The source ``name`` on this process's device: picklable arguments, so a Ray worker can build its own."""
    settings = TokenRewardsConfig.model_validate(config)
    models = SourceModels(reference_model, reward_model_dir, rm_max_length)
    return SOURCES[name](settings, resolve_device(settings.device), models, trust_remote_code)


def source_worker(build: Callable[[], Source]) -> Callable[[list], list[dict[str, Any]]]:
    """What a Ray actor runs: the source ``build`` makes, scoring one shard of items at a time."""
    source = build()
    return lambda items: source.score(items, None)


def _forward_tokens(items: list) -> int:
    return sum(item.n_forward_tokens for item in items)


def compute_missing(
    cache: TokenCache,
    source: Source,
    prompts: list[Messages],
    completions: list[Messages],
    rows_per_shard: int,
    progress: bool = True,
    compute: ComputeConfig | None = None,
    build: Callable[[], Source] | None = None,
) -> SourceRun:
    """Compute and cache the rows of ``source`` whose keys are not cached yet; a shard is written per chunk. With a
    Ray ``compute`` the shards are scored by actors that each ``build`` the source (tasks/infer/distributed.py)."""
    keys = [row_key(source.name, source.knobs, p, c) for p, c in zip(prompts, completions)]
    missing = cache.missing_keys(keys)
    if not missing:
        return SourceRun(keys, 0, len(set(keys)), 0, 0.0)
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    todo = [first[k] for k in missing]
    # Tokenize everything first: a row that cannot be encoded fails the run before any compute.
    items = source.encode([prompts[i] for i in todo], [completions[i] for i in todo])
    order = sorted(range(len(items)), key=lambda j: -items[j].n_forward_tokens)  # similar lengths share a shard
    total = _forward_tokens(items)
    started = time.perf_counter()
    chunks = [order[start : start + rows_per_shard] for start in range(0, len(order), rows_per_shard)]

    def write(index: int, rows: list[dict[str, Any]]) -> None:
        cache.write_shard([{**row, "key": missing[j], "source": source.name} for j, row in zip(chunks[index], rows)])

    with tqdm(total=total, unit="tok", desc=f"token rewards ({source.name})", disable=not progress) as bar:
        if uses_ray(compute):
            shards = [[items[j] for j in chunk] for chunk in chunks]
            map_shards(shards, partial(source_worker, build), compute, write, bar, weigh=_forward_tokens)
        else:  # not map_shards' local path: this source is loaded already, and its bar moves per batch
            for index, chunk in enumerate(chunks):
                write(index, source.score([items[j] for j in chunk], bar))
    seconds = time.perf_counter() - started
    truncated = sum(getattr(item, "truncated", False) for item in items)
    if truncated > TRUNCATION_WARNING * len(items):
        logger.warning(
            "token_rewards (%s): truncation cut %d of %d rows; raise token_rewards.max_length / max_prompt_length "
            "or drop long rows with curate.rules.max_length",
            source.name,
            truncated,
            len(items),
        )
    return SourceRun(keys, len(missing), len(set(keys)) - len(missing), total, seconds, truncated)


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


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
    """The reward model (a trained ``model/``, every file checked against its manifest, or the pretrained one) and
    its max_length."""
    folder = ctx.reward_model_folder()
    manifest = ctx.upstream["reward_model"]
    for name in (name for name in manifest.outputs if name.startswith("model/")):
        ctx.workspace.store.file(manifest, name)  # raises on a missing or edited file
    return folder, int(manifest.config["max_length"])


def assemble(
    cache: TokenCache, pair_ids: list[str], sides: list[str], source_names: list[str], keys: list[list[str]]
) -> pa.Table:
    """The stage output: cache rows for every (pair, side, source), ordered pair by pair, side, then source."""
    order = [(i, s) for i in range(len(pair_ids)) for s in range(len(source_names))]
    rows = cache.read_rows([keys[s][i] for i, s in order])
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
    sample = set(list(dict.fromkeys(table.column("pair_id").to_pylist()))[:n_pairs])
    if not sample:
        return
    for source in sources:
        rows = [r for r in table.filter(pc.equal(table["source"], source.name)).to_pylist() if r["pair_id"] in sample]
        ctx.run.log_text(heatmap_html(rows, source.tokenizer), f"token_rewards/heatmap_{source.name}.html")
        ctx.run.log_figure(heatmap_figure(rows), f"token_rewards/heatmap_{source.name}.png")
