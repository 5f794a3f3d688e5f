"""Pipeline configuration: a YAML file with one section per stage, loaded into typed dataclasses.

Unknown keys and wrong types are errors that name the key path (``curate.rules.max_lenght: unknown key``),
because a silently ignored typo would also be silently left out of the cache key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from creditflow.tasks.curate import CurateConfig
from creditflow.tasks.evaluate import EvaluateConfig
from creditflow.tasks.onpolicy import OnPolicyConfig
from creditflow.tasks.policy import PolicyConfig
from creditflow.tasks.reward_model import RewardModelConfig
from creditflow.tasks.token_rewards import TokenRewardsConfig


class ConfigError(ValueError):
    pass


@dataclass
class PipelineConfig:
    experiment: str = "creditflow"  # MLflow experiment name
    workspace: str | None = None  # overridden by --workspace / $CREDITFLOW_WORKSPACE
    curate: CurateConfig = field(default_factory=CurateConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    token_rewards: TokenRewardsConfig = field(default_factory=TokenRewardsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read YAML (relative source paths resolve against the file's folder) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _resolve_source_paths(data, path.parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return from_dict(PipelineConfig, data, where="")
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def config_from_dict(data: dict[str, Any] | None) -> PipelineConfig:
    return from_dict(PipelineConfig, data or {}, where="")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (
        isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")


def _resolve_source_paths(data: dict[str, Any], base: Path) -> None:
    """Source paths in a config file are relative to that file, not to the shell's working directory."""
    curate = data.get("curate")
    sources = curate.get("sources") if isinstance(curate, dict) else None
    for source in sources if isinstance(sources, list) else []:
        if (
            isinstance(source, dict)
            and isinstance(source.get("path"), str)
            and not Path(source["path"]).expanduser().is_absolute()
        ):
            source["path"] = str((base / source["path"]).resolve())
    tokenizer = curate.get("tokenizer") if isinstance(curate, dict) else None
    if isinstance(tokenizer, str) and tokenizer.startswith("."):
        curate["tokenizer"] = str((base / tokenizer).resolve())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value
