"""Model specs and what the stages write about them: hub downloads, relative paths, model cards, config help."""

import hashlib
import json
import shutil
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import CORPUS, pair_row, point_config_at_code, publish_artifact

from creditflow.flows.config import ConfigError, explain, load_config
from creditflow.tasks.models.model_card import write_card


@pytest.mark.parametrize(
    ("datasets", "pipeline_tag", "dataset"),
    [
        (["acme/prefs@" + "d" * 40, "creditflow:curate/abc"], "text-generation", "acme/prefs"),
        (["file:/data/prefs.jsonl", "creditflow:curate/abc"], "text-classification", "creditflow:curate/abc"),
    ],
)
def test_model_cards_parse_as_hub_model_cards(tmp_path, datasets, pipeline_tag, dataset):
    """The Hub's own parser reads the card: its model-index names a dataset (the hub one, else the curate digest)."""
    from huggingface_hub import ModelCard

    write_card(
        tmp_path,
        title="Reward model",
        summary="s",
        base_model="acme/tiny-lm@" + "c" * 40,
        datasets=datasets,
        tags=["x"],
        metadata={"method": "m"},
        metrics={"accuracy": 0.75},
        config={"stage": {}},
        pipeline_tag=pipeline_tag,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # huggingface_hub warns (and drops the results) on metadata it cannot parse
        card = ModelCard.load(tmp_path / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.metric_name, result.metric_value) == (dataset, "accuracy", 0.75)
    assert card.data.pipeline_tag == pipeline_tag and card.data.base_model == "acme/tiny-lm"


# ---------------------------------------------------------------------------------------------------------
# Hub downloads


def _fake_hub(repos: dict[str, dict[str, bytes]]) -> ThreadingHTTPServer:
    """A local HTTP server answering the Hub API calls ``snapshot_download`` makes (revision, tree, resolve) for
    ``repos`` (id -> {path: bytes}); ``server.requested`` collects the files fetched."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bytes | None):
            path = self.path.split("?")[0]
            status, headers = 404, {}
            for repo, files in repos.items():
                commit = hashlib.sha1(repo.encode()).hexdigest()
                if path.startswith(f"/api/models/{repo}/revision/"):
                    status, body = 200, json.dumps({"id": repo, "sha": commit}).encode()
                elif path.startswith(f"/api/models/{repo}/tree/"):
                    tree = [{"type": "file", "path": f, "size": len(b), "oid": "0" * 40} for f, b in files.items()]
                    status, body = 200, json.dumps(tree).encode()
                elif path.startswith(f"/{repo}/resolve/") and path.split("/", 5)[-1] in files:
                    name = path.split("/", 5)[-1]
                    status, body = 200, files[name]
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(files[name]).hexdigest()}"'}
                    server.requested.add(f"{repo}/{name}")
                else:
                    continue
                break
            body = body or b"{}"
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_GET = do_HEAD = lambda self: self._answer(None)  # noqa: E731

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requested = set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_models_download_only_what_from_pretrained_reads(tmp_path, monkeypatch):
    """A hub repo's other formats (original/ checkpoints, ONNX, GGUF, flax) stay on the Hub; PyTorch pickles come
    only when a repo has no safetensors; offline, the same snapshot is found in the cache."""
    from huggingface_hub import constants

    from creditflow.tasks.models.hub import hub_snapshot

    common = {"config.json": b"{}", "tokenizer.json": b"{}", "README.md": b"card", "merges.txt": b"m"}
    server = _fake_hub(
        {
            "acme/safe": {
                **common,
                "model.safetensors": b"s",
                "pytorch_model.bin": b"b",
                "original/consolidated.00.pth": b"p",
                "onnx/model.onnx": b"o",
                "model.Q4.gguf": b"g",
            },
            "acme/old": {**common, "pytorch_model.bin": b"b", "flax_model.msgpack": b"f"},
        }
    )
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import, from the tests' offline defaults
    try:
        folders = {repo: hub_snapshot(repo) for repo in ("acme/safe", "acme/old")}
    finally:
        server.shutdown()
    assert server.requested == {f"acme/safe/{f}" for f in [*common, "model.safetensors"]} | {
        f"acme/old/{f}" for f in [*common, "pytorch_model.bin"]
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert {repo: hub_snapshot(repo) for repo in folders} == folders


# ---------------------------------------------------------------------------------------------------------
# Config files


def test_model_and_data_paths_in_a_config_file_are_relative_to_that_file(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "c.yaml").write_text(
        "reference_model: ./models/policy\n"
        "curate: {tokenizer: ../tok, sources: [{path: data/p.jsonl}, {hf: acme/prefs}]}\n"
        "reward_model: {base_model: ./models/rm}\n"
        "audit: {probe: probe.jsonl}\n"
    )
    monkeypatch.chdir(tmp_path)  # not where the config lives
    cfg = load_config(recipes / "c.yaml")
    assert cfg.reference_model == str(recipes / "models" / "policy")
    assert cfg.reward_model.base_model == str(recipes / "models" / "rm")
    assert cfg.curate.tokenizer == str(tmp_path / "tok") and cfg.curate.sources[0].path == str(recipes / "data/p.jsonl")
    assert cfg.audit.probe == str(recipes / "probe.jsonl")
    assert cfg.curate.sources[1].hf == "acme/prefs"  # hub ids and named models stay as written
    (recipes / "c.yaml").write_text("reference_model: acme/tiny-lm\nreward_model: {base_model: minilm}\n")
    cfg = load_config(recipes / "c.yaml")
    assert (cfg.reference_model, cfg.reward_model.base_model) == ("acme/tiny-lm", "minilm")


def test_every_config_key_has_help_text():
    assert [key for key, _, description in explain() if not description.strip()] == []


@pytest.mark.parametrize(
    "key",
    [
        "compute.gpus_per_worker",
        "compute.cpus_per_worker",
        "reward_model.center_rewards_coefficient",
        "policy.max_grad_norm",
        "policy.lora.alpha",
        "rl.kl_target",
        "rl.max_grad_norm",
        "rl.lora.alpha",
    ],
)
def test_floats_bounded_on_one_side_refuse_infinity(key):
    with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
        load_config(None, {**({key.rsplit(".", 1)[0]: {}} if ".lora." in key else {}), key: float("inf")})


# ---------------------------------------------------------------------------------------------------------
# Models that ship their own code: trust_remote_code

CUSTOM_CONFIG = """from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture(scope="module")
def custom_code_lm(tmp_path_factory):
    """A tiny Llama whose config.json sends transformers to modelling code in the folder (``auto_map``), as a hub
    model with its own architecture does: transformers has no ``custom-llama`` of its own."""
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tmp_path_factory.mktemp("custom") / "custom-lm", CORPUS)
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    auto_map = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    point_config_at_code(folder, "custom-llama", "CustomForCausalLM", auto_map)
    return folder


def _token_rewards_context(root, reference, trust_remote_code: bool):
    """The token-reward stage's context as flows/stages.py builds it: two curated pairs, contrastive scoring."""
    from creditflow.storage.tracking import Run
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.configs import TokenRewardsConfig
    from creditflow.tasks.data import schema as S
    from creditflow.tasks.stage import StageContext

    workspace = Workspace.resolve(root)
    pairs = [
        pair_row(
            [{"role": "user", "content": f"Question {i}: how was the trip?"}],
            [{"role": "assistant", "content": f"It was lovely {i}"}],
            [{"role": "assistant", "content": f"It was awful {i}."}],
            i,
        )
        for i in range(2)
    ]
    curate = publish_artifact(workspace.store, "curate", "c", {"pairs": S.rows_to_table(pairs, S.PAIRS_SCHEMA)})
    run = Run.start(workspace, "trust-remote-code", "token_rewards")
    writer = workspace.store.writer("token_rewards", "t")
    return StageContext(
        config=TokenRewardsConfig(max_length=64),
        workspace=workspace,
        upstream={"curate": curate},
        writer=writer,
        run=run,
        progress=False,
        stage="token_rewards",
        fingerprint="t",
        reference_model=str(reference),
        trust_remote_code=trust_remote_code,
    )


def test_custom_code_models_load_only_with_trust_remote_code(custom_code_lm, tmp_path, caplog):
    """Off (the default), the stage refuses the model with the config key to set; on, the folder's own classes
    load, and the stage warns once naming the folder and tags its MLflow run."""
    import torch

    from creditflow.tasks.models.loading import load_reference_model
    from creditflow.tasks.recipes.token_rewards import compute_token_rewards

    refused = _token_rewards_context(tmp_path / "off", custom_code_lm, trust_remote_code=False)
    with pytest.raises(ValueError, match=r"custom code(.|\n)*set `trust_remote_code: true` in the pipeline config"):
        compute_token_rewards(refused)

    trusted = _token_rewards_context(tmp_path / "on", custom_code_lm, trust_remote_code=True)
    with caplog.at_level("WARNING", logger="creditflow.tasks.stage"):
        metrics = compute_token_rewards(trusted)
    assert metrics["contrastive.rows_computed"] == 4
    assert caplog.text.count("trust_remote_code is on") == 1
    warning = "token_rewards: trust_remote_code is on: transformers may run the Python files shipped in"
    assert f"{warning} {custom_code_lm}\n" in caplog.text
    refused_tags, trusted_tags = (ctx.run.client.get_run(ctx.run.run_id).data.tags for ctx in (refused, trusted))
    assert trusted_tags["creditflow.trust_remote_code"] == "true"
    assert "creditflow.trust_remote_code" not in refused_tags
    model = load_reference_model(custom_code_lm, torch.device("cpu"), torch.float32, trust_remote_code=True)
    assert type(model).__name__ == "CustomForCausalLM"  # the folder's code ran, not transformers' Llama


def test_trust_remote_code_is_in_no_fingerprint_but_the_shipped_code_is(custom_code_lm, tmp_path):
    from creditflow.flows.stages import plan_stage
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.models.resolve import model_fingerprint

    store = Workspace.resolve(tmp_path / "ws").store
    upstream = {stage: publish_artifact(store, stage, stage[0] * 24, {}) for stage in ("curate", "reward_model")}
    plans = [
        plan_stage("token_rewards", load_config(None, {"reference_model": str(custom_code_lm), **extra}), upstream)
        for extra in ({}, {"trust_remote_code": True})
    ]
    assert plans[0].fingerprint == plans[1].fingerprint  # a model loads or it does not: no row changes
    assert [plan.trust_remote_code for plan in plans] == [False, True]  # but the key reaches the stage's context
    assert "trust_remote_code" not in json.dumps([plans[1].config, plans[1].inputs])
    # The code the key lets run is part of the model: editing it is a new network, so a cache miss.
    copy = shutil.copytree(custom_code_lm, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(custom_code_lm)
    (copy / "modeling_custom.py").write_text(CUSTOM_MODEL + "    # edited\n")
    assert model_fingerprint(copy) != model_fingerprint(custom_code_lm)
