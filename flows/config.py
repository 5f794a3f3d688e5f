"""Pipeline configuration: a YAML file with one section per stage, validated by the pydantic models of
tasks/configs.py. Importing this module imports no torch, transformers, Prefect or MLflow, so ``creditflow config``
and a YAML typo answer at once.

Errors name the file and the key path (``c.yaml: curate.rules.max_lenght: unknown key (known: ...)``), because a
silently ignored typo would also be silently left out of the cache key. YAML floats follow YAML 1.2: ``1e-4`` is
a number (PyYAML alone reads it as a string).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from creditflow.storage.names import check_name
from creditflow.tasks.config_base import ComputeConfig, StrictConfig, precision_mode
from creditflow.tasks.configs import (
    AuditConfig,
    CurateConfig,
    EvaluateConfig,
    OnPolicyConfig,
    PolicyConfig,
    RewardModelConfig,
    RLConfig,
    TokenRewardsConfig,
    method_label,
)

# Keys that moved: the old spelling gets an error that says where the setting lives now.
MOVED_KEYS = {
    ("onpolicy", "policy"): "reference_model",
    ("token_rewards", "model"): "reference_model",
}


class ConfigError(ValueError):
    pass


class PipelineConfig(StrictConfig):
    experiment: str = Field("creditflow", description="MLflow experiment name.")
    workspace: str | None = Field(None, description="Overridden by --workspace / $CREDITFLOW_WORKSPACE.")
    reference_model: str = Field(
        "tiny-lm",
        description="pi_ref: samples on-policy pairs, scores contrastive token rewards, starts the policy, and is "
        "what evaluation compares against. A local folder, a hub id (org/name[@revision]) or a named model (smollm2, "
        "minilm, tiny-lm).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run the Python files shipped with the reference model, the RM backbone or the "
        "tokenizer (a config.json with an auto_map) and with the models trained from them, in every stage, torchrun "
        "worker and Ray actor. Off: such a model is refused. On: each stage that loads models logs a warning naming "
        "their folders and tags its MLflow run creditflow.trust_remote_code=true. In no fingerprint (a model loads or "
        "it does not); the code files are, with the weights.",
    )
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    token_rewards: TokenRewardsConfig = Field(default_factory=TokenRewardsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return check_name(value, "experiment")

    @model_validator(mode="after")
    def _reference_precision_follows_policy(self) -> "PipelineConfig":
        """token_rewards.dtype: auto scores the reference at the policy's precision (tasks/models/precision.py): the
        key is derived here, always, so a config dumped before its policy section changed cannot disagree."""
        mode = precision_mode(self.policy)
        self.token_rewards = self.token_rewards.model_copy(update={"policy_precision": mode})
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        for (section, key), new in MOVED_KEYS.items():
            if isinstance(data, dict) and isinstance(data.get(section), dict) and key in data[section]:
                raise ValueError(f"{section}.{key}: this key is now the top-level `{new}` (one model for every stage)")
        return data


# ---------------------------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 (PyYAML) wants a dot in a float ("1.0e-4"); YAML 1.2 also reads 1e-4, 1E+3 and .5 as numbers.
_YAML12_FLOAT = re.compile(
    r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
_INT = re.compile(r"^[-+]?[0-9]+$")


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    return int(text) if _INT.match(text) else loader.construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_number)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read YAML (relative source paths resolve against the file's folder) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _resolve_relative_paths(data, path.parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return validate(data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def validate(data: dict[str, Any] | None) -> PipelineConfig:
    """``data`` (a parsed YAML file, or a flow's JSON parameter) as a :class:`PipelineConfig`; ConfigError if bad."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


_TYPE_NAMES = {
    "float_type": "float",
    "int_type": "int",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``key.path: message``, in the words of the old hand-written checks."""
    kind, value = error["type"], error.get("input")
    loc = list(error["loc"])
    # An unknown key ends the loc as the user wrote it, even "Seed": only the parts before it can be union members.
    unknown = [loc.pop()] if kind == "extra_forbidden" else []
    loc = [part for part in loc if not _union_member(part)] + unknown
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc)) or "config"
    if kind == "extra_forbidden":
        return f"{where}: unknown key (known: {', '.join(_known_keys(loc[:-1]))})"
    if kind in _TYPE_NAMES:
        return f"{where}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    return message if not loc or message.startswith(where) else f"{where}: {message}"


def _union_member(part: Any) -> bool:
    """A loc part pydantic adds for a union member or validator ("str", "list[str]", "SourceConfig", "function-...")."""
    return isinstance(part, str) and (
        part[:1].isupper() or part == "str" or "[" in part or part.startswith("function-")
    )


def _known_keys(loc: list[Any]) -> list[str]:
    """The field names of the model at ``loc`` inside PipelineConfig."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = [t for t in _members(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return sorted(model.model_fields)


def _members(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    return [m for arg in args for m in _members(arg)] if args else [annotation]


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Paths in a config file are relative to that file, not to the shell's working directory."""
    curate = data.get("curate")
    sources = curate.get("sources") if isinstance(curate, dict) else None
    files = [(s, "path") for s in (sources if isinstance(sources, list) else []) if isinstance(s, dict)]
    benchmarks = curate.get("decontaminate") if isinstance(curate, dict) else None
    files += [(benchmarks, i) for i in range(len(benchmarks))] if isinstance(benchmarks, list) else []
    # A section that is not a mapping is left as it is, for validate() to name.
    sections = [(data.get("audit"), "probe"), (data.get("evaluate"), "lm_eval_include_path")]
    files += [(section, key) for section, key in sections if isinstance(section, dict)]
    for holder, key in files:
        path = holder[key] if isinstance(holder, list) else holder.get(key)
        if isinstance(path, str) and not Path(path).expanduser().is_absolute():
            holder[key] = str((base / path).resolve())
    # A model key also takes hub ids (org/name) and named models: only ./ or ../ marks a relative folder.
    reward_model = data.get("reward_model")
    for holder, key in [
        (data, "reference_model"),
        (curate, "tokenizer"),
        (reward_model, "base_model"),
        (reward_model, "pretrained"),
        (data.get("evaluate"), "judge"),
    ]:
        spec = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(spec, str) and spec.startswith("."):
            holder[key] = str((base / spec).resolve())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items; VALUE is YAML (so ``1e-4``, ``null`` and ``[a, b]`` work)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = parse_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a YAML value ({exc.problem})") from None
    return parsed


def explain(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) of every field, nested sections flattened: ``creditflow config --explain``."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [t for t in _members(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested and name != "sources":
            rows.extend(explain(nested[0], f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        elif isinstance(default, list):
            default = [d.model_dump(exclude_defaults=True) if isinstance(d, BaseModel) else d for d in default]
        rows.append((key, repr(default), field.description or ""))
    return rows


def default_run_name(cfg: PipelineConfig) -> str:
    """What tells runs apart in MLflow's list: method, T-REG weight and source, LoRA, seed."""
    label = method_label(cfg.policy.model_dump()).replace(" + T-REG (", "+t-reg(")
    lora = f" lora-r{cfg.policy.lora.r}" if cfg.policy.lora else ""
    return f"{label}{lora} seed={cfg.policy.seed}"


def data_needs(stage: str, metrics: dict[str, float], cfg: PipelineConfig) -> list[str]:
    """What later stages need of the pairs ``stage`` just produced: checked before the next stage starts, so a
    too-small dataset fails in seconds, not after the reward model has trained."""
    problems = []
    policy = cfg.policy
    need = (policy.num_processes * policy.nnodes - 1) * policy.batch_size + 1  # one micro-batch for every process
    if stage == "curate":
        if metrics.get("train_pairs", 0) == 0:
            problems.append("curate produced no train pairs (see the quarantine table for why rows were rejected)")
        if metrics.get("eval_prompts", 0) == 0:
            problems.append("curate produced no eval prompts, which evaluate needs: raise curate.eval_fraction")
        if not cfg.onpolicy.enabled and metrics.get("train_pairs", 0) < need:
            problems.append(
                f"policy needs {need} train pairs for {policy.num_processes} processes of batch "
                f"{policy.batch_size}; curate produced {int(metrics.get('train_pairs', 0))}"
            )
    if stage == "onpolicy" and metrics.get("pairs_out", 0) < need:
        problems.append(f"policy needs {need} train pairs; onpolicy produced {int(metrics.get('pairs_out', 0))}")
    return problems


def pipeline_needs(cfg: PipelineConfig) -> list[str]:
    """What the stages of this config need of each other, checked before the first stage runs."""
    problems = []
    if cfg.curate.eval_fraction == 0:
        problems.append("curate.eval_fraction is 0, but the evaluate stage needs held-out prompts: set it > 0")
    if cfg.policy.token_reward_source == "abc" and "abc" not in cfg.token_rewards.sources:
        problems.append("policy.token_reward_source is 'abc': add 'abc' to token_rewards.sources")
    if "contrastive" not in cfg.token_rewards.sources:
        problems.append("token_rewards.sources must include 'contrastive': its rows carry the reference log-probs")
    return problems
