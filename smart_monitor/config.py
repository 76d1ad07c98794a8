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

from smart_monitor.triggers import KINDS, base_kind, kind_of

__all__ = ["Config", "ConfigError", "load_config", "redact_url", "run_name"]


# Every number has a range (FAULTS.md #49, #62): a config that validates must also run.
# Durations are capped at a day: a bigger one is a typo, and 1e300 seconds overflows
# every wait the daemon makes; and they have a floor, _TICK, as a poll every 1e-9 s is
# a core spinning. Windows and counts are held in memory (1e20 is no window, it is a
# crash or an overflow); steps are bounded by what a run could reach; thresholds and
# shares by what could ever fire.
_DAY = 86_400.0
_TICK = 0.01
_WINDOW = 100_000
_STEPS = 1_000_000_000
_Z = 1000.0
_PCT = 1e6
_RATIO = 1e6


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
    window: int = Field(20, ge=2, le=_WINDOW)
    warmup: int = Field(20, ge=2, le=_WINDOW)
    threshold: float = Field(8.0, gt=0, le=_Z)
    critical: float = Field(10.0, gt=0, le=_Z)
    min_rel_std: float = Field(0.01, ge=0, le=_RATIO)
    min_rise: float = Field(0.05, ge=0, le=_RATIO)
    relearn: int = Field(5, ge=1, le=_WINDOW)
    direction: Literal["up", "both"] = "up"


class LrZScoreConfig(_Windowed):
    enabled: bool = True
    window: int = Field(20, ge=2, le=_WINDOW)
    warmup: int = Field(10, ge=2, le=_WINDOW)
    threshold: float = Field(6.0, gt=0, le=_Z)
    critical: float = Field(10.0, gt=0, le=_Z)
    min_rel_std: float = Field(0.05, ge=0, le=_RATIO)
    planned_drop: float = Field(0.1, ge=0, le=1)
    schedule: Literal["decay", "cyclic"] = "decay"


class LossSpikeConfig(_Windowed):
    enabled: bool = True
    window: int = Field(20, ge=2, le=_WINDOW)
    warmup: int = Field(10, ge=2, le=_WINDOW)
    threshold_pct: float = Field(150.0, gt=0, le=_PCT)
    min_rise: float = Field(0.05, ge=0, le=_RATIO)
    min_robust_z: float = Field(6.0, ge=0, le=_Z)
    relearn: int = Field(5, ge=1, le=_WINDOW)


class DivergenceConfig(_Section):
    enabled: bool = True
    window: int = Field(25, ge=1, le=_WINDOW)
    warmup: int = Field(50, ge=1, le=_WINDOW)
    factor: float = Field(1.5, gt=1, le=_RATIO)
    min_rise: float = Field(0.05, ge=0, le=_RATIO)
    patience: int = Field(10, ge=1, le=_WINDOW)


class NonFiniteConfig(_Section):
    enabled: bool = True
    grad_norm_repeat_steps: int = Field(50, ge=1, le=_STEPS)


class BestModelConfig(_Section):
    enabled: bool = True
    min_delta: float = Field(1e-4, ge=0, le=_RATIO)
    min_rel_delta: float = Field(0.01, ge=0, le=1)
    min_steps: int = Field(0, ge=0, le=_STEPS)
    train_alpha: float = Field(0.02, gt=0, le=1)
    train_min_steps: int = Field(500, ge=1, le=_STEPS)


class AccuracyDropConfig(_Section):
    enabled: bool = True
    threshold_pct: float = Field(6.0, gt=0, le=100)
    noise_k: float = Field(2.5, ge=0, le=_Z)


class OverfittingConfig(_Section):
    enabled: bool = True
    patience: int = Field(3, ge=1, le=_WINDOW)
    min_delta: float = Field(0.0, ge=0, le=_RATIO)
    min_rel_delta: float = Field(0.05, ge=0, le=_RATIO)
    noise_k: float = Field(1.0, ge=0, le=_Z)
    train_alpha: float = Field(0.2, gt=0, le=1)
    train_tolerance: float = Field(0.0, ge=0, le=_RATIO)


class NotLearningConfig(_Section):
    enabled: bool = True
    min_records: int = Field(50, ge=3, le=_STEPS)
    window: int = Field(5, ge=1, le=_WINDOW)
    min_rel_drop: float = Field(0.05, ge=0, le=_RATIO)
    noise_k: float = Field(2.0, ge=0, le=_Z)
    trend_t: float = Field(3.0, ge=0, le=_RATIO)
    min_evals: int = Field(8, ge=2, le=_WINDOW)
    min_gain_pct: float = Field(1.0, ge=0, le=100)
    zero_lr: float = Field(1e-10, ge=0, le=_RATIO)


class TextureConfig(_Section):
    enabled: bool = True
    min_ratio: float = Field(1.8, ge=1, le=_RATIO)
    min_z: float = Field(30.0, gt=0, le=_Z)
    rare_steps: int = Field(2000, ge=0, le=_STEPS)


class PredictionsConfig(_Section):
    enabled: bool = True
    high_loss: float = Field(2.0, gt=0, le=_RATIO)
    low_loss: float = Field(0.15, ge=0, le=_RATIO)
    inverted_window: int = Field(64, ge=4, le=_WINDOW)
    inverted_min_each: int = Field(6, ge=2, le=_WINDOW)
    inverted_alpha: float = Field(1e-4, gt=0, lt=1)


class ConflictingLabelsConfig(_Section):
    enabled: bool = True
    max_prompts: int = Field(10000, ge=1, le=_WINDOW * 10)


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
    cooldown_steps: int = Field(200, ge=0, le=_STEPS)
    recovery_steps: int = Field(100, ge=0, le=_STEPS)
    recovery_records: int = Field(10, ge=1, le=_WINDOW)
    recurring_after: int = Field(3, ge=1, le=_WINDOW)
    recurring_steps: int = Field(10000, ge=1, le=_STEPS)
    recurring_snapshots: int = Field(3, ge=0, le=_WINDOW)
    history: int = Field(100, ge=1, le=_WINDOW)
    recent_examples: int = Field(20, ge=0, le=1000)


class RecordsConfig(_Section):
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"lr": "learning_rate", "global_step": "step"}
    )
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1 << 30)
    # The main train loss's tag or column; empty: by the series rule (smart_monitor/series.py)
    loss: str = ""


class SourceConfig(_Section):
    """How ``metrics_file`` is read: by what the path holds (``auto``), or forced.
    ``quiet_seconds``: a TensorBoard step still being gathered is complete once its
    file has been quiet this long (the next step's first scalar completes it sooner)."""

    format: Literal["auto", "jsonl", "tensorboard", "csv"] = "auto"
    quiet_seconds: float = Field(2.0, ge=_TICK, le=3600)


class SnapshotConfig(_Section):
    mode: Literal["auto", "hardlink", "copy"] = "auto"
    checkpoint_wait_seconds: float = Field(30.0, ge=0, le=_DAY)
    max_count: int = Field(0, ge=0, le=_WINDOW * 10)
    max_bytes: int = Field(0, ge=0, le=1 << 60)
    # The disk budget (outputs/retention.py says how the defaults were chosen); 0: off.
    max_share: float = Field(0.10, ge=0, le=1)
    min_free_share: float = Field(0.15, ge=0, lt=1)
    keep_best: int = Field(3, ge=1, le=1000)


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
    poll_interval: float = Field(1.0, ge=_TICK, le=_DAY)
    reconcile_seconds: float = Field(10.0, ge=_TICK, le=_DAY)


class StateConfig(_Section):
    save_interval_seconds: float = Field(5.0, ge=_TICK, le=_DAY)


class CheckpointScanConfig(_Windowed):
    """The optional scan of each new checkpoint's weights (safetensors, off the main
    loop): NaN/Inf tensors, and a jump in the global weight norm, scored as the z of
    its relative change against the changes between earlier checkpoints."""

    enabled: bool = False
    window: int = Field(10, ge=2, le=_WINDOW)
    warmup: int = Field(3, ge=2, le=_WINDOW)
    threshold: float = Field(6.0, gt=0, le=_Z)
    critical: float = Field(10.0, gt=0, le=_Z)
    min_std: float = Field(0.001, gt=0, le=_RATIO)


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
        unknown = [n for n in names if base_kind(kind_of(n)) not in KINDS]
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


class AlertmanagerActionConfig(ActionConfig):
    """Each incident as an alert to Alertmanager's v2 API, at every URL (an HA pair is
    posted to both); re-sent every ``resend_seconds`` while the incident is open, and
    resolved (``endsAt``) when it recovers. Alertmanager groups, silences and routes."""

    urls: list[str] = Field(default_factory=list)
    on_severity: ActionSeverity = "warning"
    resend_seconds: float = Field(60.0, ge=1, le=_DAY)

    @field_serializer("urls", when_used="json")
    def _redacted(self, urls: list[str]) -> list[str]:
        return [redact_url(u) for u in urls]

    @field_validator("urls")
    @classmethod
    def _http_only(cls, urls: list[str]) -> list[str]:
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError("each url must start with http:// or https://")
        return urls


class ActionsConfig(_Section):
    timeout_seconds: float = Field(10.0, gt=0, le=_DAY)
    queue_size: int = Field(100, ge=1, le=_WINDOW)
    retries: int = Field(2, ge=0, le=10)  # for 5xx and refused connections
    retry_backoff_seconds: float = Field(1.0, gt=0, le=600)
    stop_file: StopFileActionConfig = StopFileActionConfig()
    signal: SignalActionConfig = SignalActionConfig()
    command: CommandActionConfig = CommandActionConfig()
    webhook: WebhookActionConfig = WebhookActionConfig()
    alertmanager: AlertmanagerActionConfig = AlertmanagerActionConfig()


class MetricsConfig(_Section):
    """``run``: the ``run`` label of every metric and alert, so one Prometheus tells many
    monitors apart ("": the run folder's name, ``run_name``)."""

    port: int = Field(0, ge=0, le=65535)
    address: str = "127.0.0.1"
    run: str = ""


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


def run_name(config: Config) -> str:
    """The run's name: ``[metrics] run``, else the folder of its checkpoints, else the
    folder holding its metrics file (a metrics folder: its own name)."""
    if config.metrics.run:
        return config.metrics.run
    if config.checkpoint_dir is not None:
        return config.checkpoint_dir.resolve().name or "run"
    if config.metrics_file is not None:
        path = config.metrics_file.resolve()
        return (path if path.is_dir() else path.parent).name or "run"
    return "run"


class ConfigError(Exception):
    """One line naming the key; the CLI prints it and exits 2."""


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Read ``path`` (optional), apply command-line overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            # a BOM is how some editors (Notepad) mark UTF-8; TOML has no other use for it
            data = tomllib.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
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
        bounds = _allowed_range(err["loc"])
        if bounds:  # out of range, or a number too big to parse (1e20 for an int)
            msg += f" (allowed: {bounds})"
        raise ConfigError(f"{key}: {msg}") from None


def _allowed_range(loc: tuple[int | str, ...]) -> str:
    """The range a number at ``loc`` must lie in, as ``"2 <= x <= 100000"``; "" when
    ``loc`` is not a bounded field.

    >>> _allowed_range(("policy", "history")), _allowed_range(("watch", "poll_interval"))
    ('1 <= history <= 100000', '0.01 <= poll_interval <= 86400.0')
    """
    model: Any = Config
    field = None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        field = fields[part]
        model = field.annotation
    if field is None:
        return ""
    low = high = ""
    for m in field.metadata:
        for attr, side in (("ge", "<="), ("gt", "<")):
            if getattr(m, attr, None) is not None:
                low = f"{getattr(m, attr)} {side} "
        for attr, side in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                high = f" {side} {getattr(m, attr)}"
    return f"{low}{loc[-1]}{high}" if low or high else ""
