import os
import tempfile

from creditflow.flows.env import apply_defaults

# Hermetic Prefect: its own home (DB, profiles) per test session, no user server, no remote MLflow.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="creditflow-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("CREDITFLOW_WORKSPACE", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
apply_defaults()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


# ---------------------------------------------------------------------------------------------------------
# Shared tiny models and artifacts

CORPUS = ["the quick brown fox jumps over the lazy dog", "a helpful answer is correct and concise"] * 20


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny Llama causal LM with a tokenizer trained on ``CORPUS``, built once per session."""
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), CORPUS)


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


@pytest.fixture
def one_thread():
    """Tiny-model kernels are too small to split: one intra-op thread is faster, and immune to the spin-waiting that
    makes two OpenMP threads crawl when other processes share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def publish_artifact(store, stage: str, fingerprint: str, tables: dict, config: dict | None = None, **fields):
    """Publish ``tables`` (name -> pyarrow table) as a ``stage`` artifact, for tests that start mid-pipeline."""
    writer = store.writer(stage, fingerprint)
    for name, table in tables.items():
        writer.write_table(name, table)
    fields = {"inputs": {}, "code_version": "t", **fields}
    return store.publish(writer, stage=stage, fingerprint=fingerprint, config=config or {}, **fields)


@pytest.fixture
def publish():
    return publish_artifact


def pair_row(prompt: list[dict], chosen: list[dict], rejected: list[dict], row: int, split: str = "train") -> dict:
    """A curated pair (tasks/data/schema.py's PAIRS_SCHEMA) of the given prompt, chosen and rejected messages."""
    from creditflow.tasks.data import schema as S

    return {
        "pair_id": S.pair_id(prompt, chosen, rejected),
        "prompt_id": S.prompt_id(prompt),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": "test",
        "source_row": str(row),
        "split": split,
    }


class Interrupt(Exception):
    """What :func:`stop_at` raises: a training run killed right after a step."""


def stop_at(step: int):
    """An ``on_step`` callback that interrupts the run when it reaches ``step``."""

    def callback(current: int, metrics: dict) -> None:
        if current == step:
            raise Interrupt

    return callback


def workers_started() -> set[str]:
    """Names of every shard worker this Ray cluster has started, alive or dead (RayWorkers kills its actors when done):
    an equality with the local run proves nothing unless these grew. Read from the GCS actor table, since
    ray.util.state.list_actors needs the dashboard, which the dev install leaves out (ray is pinned to 2.60)."""
    from ray._private.state import actors

    from creditflow.tasks.infer.distributed import ACTOR_PREFIX, ShardWorker

    return {
        actor["Name"]
        for actor in actors().values()
        if actor["ActorClassName"] == ShardWorker.__name__ and actor["Name"].startswith(ACTOR_PREFIX)
    }


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray cluster, started by the test module that asks for it and shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, namespace="creditflow", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def train_reward_model(*args, **kwargs):
    """(tokenizer, model, per-epoch eval history) of one RewardModelTrainer run: the tests' shorthand."""
    from creditflow.tasks.recipes.reward_model import RewardModelTrainer

    trainer = RewardModelTrainer(*args, **kwargs)
    history = trainer.train()
    return trainer.tokenizer, trainer.model, history


@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory):
    """A folder with one tiny lm-evaluation-harness task on a local file (tests/data/lm_eval): two-way cloze on the
    test corpus, so the harness runs offline."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "lm_eval" / "tiny_cloze.jsonl"
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "tiny_cloze.yaml").write_text(
        "task: creditflow_tiny_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def point_config_at_code(folder, model_type: str, architecture: str, auto_map: dict) -> None:
    """Rewrite ``folder``'s config.json so transformers loads the modelling code shipped in the folder (``auto_map``),
    as a hub model with its own architecture does."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type=model_type, architectures=[architecture], auto_map=auto_map)
    path.write_text(json.dumps(config))
