"""The one TOML file, validated by pydantic; unknown keys are refused.

``config/smart_monitor.toml`` documents every key with its default; a test keeps the
two in step.
"""

from __future__ import annotations

import signal as signal_module
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from smart_monitor.triggers import KINDS, kind_of

__all__ = ["Config", "ConfigError", "load_config", "redact_url"]


# Durations are capped at a day: a bigger one is a typo, and 1e300 seconds overflows
# every wait the daemon makes (a config that validates must also run: FAULTS.md #49).
_DAY = 86_400.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Windowed(_Section):
    """A detector that learns a window before it may fire: a warm-up longer than the
    window would never end, and a critical level under the threshold would make every
    firing critical; both silently change what the section configures."""

    window: int  # each subclass gives the defaults
    warmup: int

    @model_validator(mode="after")
    def _consistent(self) -> _Windowed:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        threshold, critical = getattr(self, "threshold", None), getattr(self, "critical", None)
        if threshold is not None and critical is not None and critical < threshold:
            raise ValueError(f"critical ({critical}) must not be below threshold ({threshold})")
        return self


class LossZScoreConfig(_Windowed):
    enabled: bool = True
    window: int = Field(20, ge=2)
    warmup: int = Field(20, ge=2)
    threshold: float = Field(8.0, gt=0)
    critical: float = Field(10.0, gt=0)
    min_rel_std: float = Field(0.01, ge=0)
    min_rise: float = Field(0.05, ge=0)
    relearn: int = Field(5, ge=1)
    direction: Literal["up", "both"] = "up"


class LrZScoreConfig(_Windowed):
    enabled: bool = True
    window: int = Field(20, ge=2)
    warmup: int = Field(10, ge=2)
    threshold: float = Field(6.0, gt=0)
    critical: float = Field(10.0, gt=0)
    min_rel_std: float = Field(0.05, ge=0)
    planned_drop: float = Field(0.1, ge=0, le=1)
    schedule: Literal["decay", "cyclic"] = "decay"


class LossSpikeConfig(_Windowed):
    enabled: bool = True
    window: int = Field(20, ge=2)
    warmup: int = Field(10, ge=2)
    threshold_pct: float = Field(150.0, gt=0)
    min_rise: float = Field(0.05, ge=0)
    min_robust_z: float = Field(6.0, ge=0)
    relearn: int = Field(5, ge=1)


class DivergenceConfig(_Section):
    enabled: bool = True
    window: int = Field(25, ge=1)
    warmup: int = Field(50, ge=1)
    factor: float = Field(1.5, gt=1)
    min_rise: float = Field(0.05, ge=0)
    patience: int = Field(10, ge=1)


class NonFiniteConfig(_Section):
    enabled: bool = True
    grad_norm_repeat_steps: int = Field(50, ge=1)


class BestModelConfig(_Section):
    enabled: bool = True
    min_delta: float = Field(1e-4, ge=0)
    min_rel_delta: float = Field(0.01, ge=0)
    min_steps: int = Field(0, ge=0)
    train_alpha: float = Field(0.02, gt=0, le=1)
    train_min_steps: int = Field(500, ge=1)


class AccuracyDropConfig(_Section):
    enabled: bool = True
    threshold_pct: float = Field(6.0, gt=0)
    noise_k: float = Field(2.5, ge=0)


class OverfittingConfig(_Section):
    enabled: bool = True
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)
    min_rel_delta: float = Field(0.05, ge=0)
    noise_k: float = Field(1.0, ge=0)
    train_alpha: float = Field(0.2, gt=0, le=1)
    train_tolerance: float = Field(0.05, ge=0)


class NotLearningConfig(_Section):
    enabled: bool = True
    min_records: int = Field(50, ge=3)
    window: int = Field(5, ge=1)
    min_rel_drop: float = Field(0.05, ge=0)
    noise_k: float = Field(2.0, ge=0)
    trend_t: float = Field(3.0, ge=0)
    min_evals: int = Field(8, ge=2)
    min_gain_pct: float = Field(1.0, ge=0)
    zero_lr: float = Field(1e-10, ge=0)


class TextureConfig(_Section):
    enabled: bool = True
    min_ratio: float = Field(1.8, ge=1)
    min_z: float = Field(30.0, gt=0)
    rare_steps: int = Field(2000, ge=0)


class PredictionsConfig(_Section):
    enabled: bool = True
    high_loss: float = Field(2.0, gt=0)
    low_loss: float = Field(0.15, ge=0)
    inverted_window: int = Field(64, ge=4)
    inverted_min_each: int = Field(6, ge=2)
    inverted_alpha: float = Field(1e-4, gt=0, lt=1)


class ConflictingLabelsConfig(_Section):
    enabled: bool = True
    max_prompts: int = Field(10000, ge=1)


class DetectorsConfig(_Section):
    loss_zscore: LossZScoreConfig = LossZScoreConfig()
    lr_zscore: LrZScoreConfig = LrZScoreConfig()
    loss_spike: LossSpikeConfig = LossSpikeConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    nonfinite: NonFiniteConfig = NonFiniteConfig()
    best_model: BestModelConfig = BestModelConfig()
    accuracy_drop: AccuracyDropConfig = AccuracyDropConfig()
    overfitting: OverfittingConfig = OverfittingConfig()
    not_learning: NotLearningConfig = NotLearningConfig()
    texture: TextureConfig = TextureConfig()
    predictions: PredictionsConfig = PredictionsConfig()
    conflicting_labels: ConflictingLabelsConfig = ConflictingLabelsConfig()


class PolicyConfig(_Section):
    cooldown_steps: int = Field(200, ge=0)
    recovery_steps: int = Field(100, ge=0)
    recovery_records: int = Field(10, ge=1)
    recurring_after: int = Field(3, ge=1)
    recurring_steps: int = Field(10000, ge=1)
    recurring_snapshots: int = Field(3, ge=0)
    history: int = Field(100, ge=1)
    recent_examples: int = Field(20, ge=0)


class RecordsConfig(_Section):
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"lr": "learning_rate", "global_step": "step"}
    )
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class SourceConfig(_Section):
    """How ``metrics_file`` is read: by what the path holds (``auto``), or forced.
    ``quiet_seconds``: a TensorBoard step still being gathered is complete once its
    file has been quiet this long (the next step's first scalar completes it sooner)."""

    format: Literal["auto", "jsonl", "tensorboard", "csv"] = "auto"
    quiet_seconds: float = Field(2.0, gt=0, le=3600)


class SnapshotConfig(_Section):
    mode: Literal["auto", "hardlink", "copy"] = "auto"
    checkpoint_wait_seconds: float = Field(30.0, ge=0, le=_DAY)
    max_count: int = Field(0, ge=0)
    max_bytes: int = Field(0, ge=0)
    # The disk budget (outputs/retention.py says how the defaults were chosen); 0: off.
    max_share: float = Field(0.10, ge=0, le=1)
    min_free_share: float = Field(0.15, ge=0, lt=1)
    keep_best: int = Field(3, ge=1)


class CheckpointsConfig(_Section):
    pattern: str = "checkpoint-{step}"
    marker: str = "trainer_state.json"
    settle_seconds: float = Field(30.0, ge=0, le=_DAY)

    @field_validator("pattern")
    @classmethod
    def _one_step(cls, pattern: str) -> str:
        """The step names the checkpoint: exactly one ``{step}``, at most one ``{epoch}``,
        and a plain name (the pattern matches entries of ``checkpoint_dir``)."""
        if pattern.count("{step}") != 1 or pattern.count("{epoch}") > 1:
            raise ValueError("must hold {step} exactly once (and {epoch} at most once)")
        if "/" in pattern or pattern.replace("{step}", "").replace("{epoch}", "").count("{"):
            raise ValueError("only {step} and {epoch} may stand in braces; no '/'")
        return pattern


class WatchConfig(_Section):
    backend: Literal["auto", "inotify", "polling"] = "auto"
    poll_interval: float = Field(1.0, gt=0, le=_DAY)
    reconcile_seconds: float = Field(10.0, gt=0, le=_DAY)


class StateConfig(_Section):
    save_interval_seconds: float = Field(5.0, gt=0, le=_DAY)


class CheckpointScanConfig(_Windowed):
    """The optional scan of each new checkpoint's weights (safetensors, off the main
    loop): NaN/Inf tensors, and a jump in the global weight norm, scored as the z of
    its relative change against the changes between earlier checkpoints."""

    enabled: bool = False
    window: int = Field(10, ge=2)
    warmup: int = Field(3, ge=2)
    threshold: float = Field(6.0, gt=0)
    critical: float = Field(10.0, gt=0)
    min_std: float = Field(0.001, gt=0)


ActionSeverity = Literal["info", "warning", "critical", "never"]


class ActionConfig(_Section):
    """When an action runs: a snapshot decision (made or failed) whose trigger kind is in
    ``on_triggers``, or whose severity is at least ``on_severity``."""

    on_triggers: list[str] = Field(default_factory=list)
    on_severity: ActionSeverity = "critical"

    @field_validator("on_triggers")
    @classmethod
    def _known_kinds(cls, names: list[str]) -> list[str]:
        """A misspelt kind would never match: the action would silently never run."""
        unknown = [n for n in names if kind_of(n) not in KINDS]
        if unknown:
            raise ValueError(f"unknown trigger {unknown[0]!r} (kinds: {', '.join(sorted(KINDS))})")
        return names


class StopFileActionConfig(ActionConfig):
    path: Path | None = None


class SignalActionConfig(ActionConfig):
    pidfile: Path | None = None
    signal: str = "SIGTERM"

    @model_validator(mode="after")
    def _known_signal(self) -> SignalActionConfig:
        if self.signal not in signal_module.Signals.__members__:  # SIG_IGN is no signal
            raise ValueError(f"unknown signal {self.signal!r}")
        return self


class CommandActionConfig(ActionConfig):
    argv: list[str] = Field(default_factory=list)


def redact_url(url: str) -> str:
    """A webhook URL without what makes it a secret (a Slack hook's path is its key,
    some carry a token in the query or a password before the host): the scheme and
    host stay, so a reader still sees where pages go (FAULTS.md #41)."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/<redacted>"


class WebhookActionConfig(ActionConfig):
    url: str = ""
    on_severity: ActionSeverity = "warning"

    @field_serializer("url", when_used="json")
    def _redacted(self, url: str) -> str:
        """What ``metadata.json`` keeps: every JSON dump of the config goes through here."""
        return redact_url(url)

    @model_validator(mode="after")
    def _http_only(self) -> WebhookActionConfig:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class ActionsConfig(_Section):
    timeout_seconds: float = Field(10.0, gt=0, le=_DAY)
    queue_size: int = Field(100, ge=1)
    retries: int = Field(2, ge=0, le=10)  # for 5xx and refused connections
    retry_backoff_seconds: float = Field(1.0, gt=0, le=600)
    stop_file: StopFileActionConfig = StopFileActionConfig()
    signal: SignalActionConfig = SignalActionConfig()
    command: CommandActionConfig = CommandActionConfig()
    webhook: WebhookActionConfig = WebhookActionConfig()


class MetricsConfig(_Section):
    port: int = Field(0, ge=0, le=65535)
    address: str = "127.0.0.1"


class Config(_Section):
    metrics_file: Path | None = None
    checkpoint_dir: Path | None = None
    snapshot_dir: Path = Path("snapshots")
    log_dir: Path = Path("logs")
    state_dir: Path = Path("state")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    records: RecordsConfig = RecordsConfig()
    source: SourceConfig = SourceConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    policy: PolicyConfig = PolicyConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    checkpoints: CheckpointsConfig = CheckpointsConfig()
    watch: WatchConfig = WatchConfig()
    state: StateConfig = StateConfig()
    checkpoint_scan: CheckpointScanConfig = CheckpointScanConfig()
    actions: ActionsConfig = ActionsConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator(
        "metrics_file", "checkpoint_dir", "snapshot_dir", "log_dir", "state_dir", mode="before"
    )
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        """``""`` would be the working folder, where start-up removes ``.tmp-*``."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _snapshots_outside_trainer_glob(self) -> Config:
        """The trainer globs ``checkpoint-*`` in its folder and would rotate or resume
        from a snapshot folder placed there (FAULTS.md #27)."""
        if self.checkpoint_dir is None:
            return self
        ck = self.checkpoint_dir.resolve()
        snap = self.snapshot_dir.resolve()
        inside = snap.is_relative_to(ck) and snap != ck
        if snap == ck or (inside and snap.relative_to(ck).parts[0].startswith("checkpoint-")):
            raise ValueError(
                "snapshot_dir must not be the checkpoint folder or a checkpoint-* folder inside it"
            )
        return self


class ConfigError(Exception):
    """One line naming the key; the CLI prints it and exits 2."""


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Read ``path`` (optional), apply command-line overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        raise ConfigError(f"{key}: {msg}") from None
