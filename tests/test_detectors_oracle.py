"""The streaming maths against a batch oracle: after every update, numpy over the same
window must give the same statistics and the same decisions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from smart_monitor.config import (
    AccuracyDropConfig,
    BestModelConfig,
    ConflictingLabelsConfig,
    DivergenceConfig,
    LossSpikeConfig,
    LossZScoreConfig,
    LrZScoreConfig,
    NonFiniteConfig,
    PredictionsConfig,
)
from smart_monitor.detectors.evaluation import AccuracyDrop, BestModel
from smart_monitor.detectors.labels import ConflictingLabels
from smart_monitor.detectors.loss import Divergence, LossSpike, NonFinite
from smart_monitor.detectors.predictions import (
    InvertedLossPattern,
    PredictionOutliers,
    mann_whitney_p,
)
from smart_monitor.detectors.zscore import LossZScore, LrZScore
from smart_monitor.records import EvalRecord, ExampleRecord, TrainRecord
from smart_monitor.stats import RollingMedian, RollingWindow


def noisy_losses(seed: int, n: int = 1500) -> list[float]:
    """A decaying loss with noise, spikes, level shifts and NaNs: every branch."""
    rng = random.Random(seed)
    out = []
    level = 2.0
    for i in range(n):
        level = max(0.3, level * 0.999)
        if i in (600, 1100):
            level *= 1.8
        x = level * math.exp(rng.gauss(0, 0.05))
        if rng.random() < 0.02:
            x *= rng.uniform(1.5, 6.0)
        if rng.random() < 0.005:
            x = math.nan
        out.append(x)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_rolling_window_matches_numpy_after_every_update(seed: int) -> None:
    rng = random.Random(seed)
    w = RollingWindow(17)
    values: list[tuple[int, float]] = []
    for step in range(2000):
        v = rng.lognormvariate(0, 1) * 10 ** rng.randint(-6, 3)
        w.add(step, v)
        values = [*values, (step, v)][-17:]
        if step % 500 == 499:  # a trainer restart drops the points after step - 9
            w.rewind(step - 9)
            values = [p for p in values if p[0] <= step - 9]
        ref = np.array([v for _, v in values])
        assert w.mean == pytest.approx(ref.mean(), rel=1e-9, abs=1e-12)
        assert w.std == pytest.approx(ref.std(), rel=1e-6, abs=1e-9 * max(1.0, ref.max()))


def test_rolling_window_catastrophic_cancellation() -> None:
    """Values of 1e6 +- 1e-3: a naive sum of squares loses every digit of the std."""
    w = RollingWindow(50)
    rng = random.Random(1)
    ref = []
    for i in range(5000):
        v = 1e6 + rng.gauss(0, 1e-3)
        w.add(i, v)
        ref.append(v)
    assert w.std == pytest.approx(np.std(ref[-50:]), rel=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_rolling_median_matches_numpy_after_every_update(seed: int) -> None:
    rng = random.Random(seed)
    m = RollingMedian(11)
    values: list[float] = []
    for step in range(800):
        v = round(rng.gauss(0, 1), 2)  # ties on purpose
        m.add(step, v)
        values.append(v)
        ref = np.array(values[-11:])
        assert m.median == np.median(ref)
        assert m.mad == pytest.approx(np.median(np.abs(ref - np.median(ref))))


def test_loss_zscore_matches_numpy_oracle() -> None:
    cfg = LossZScoreConfig(window=30, warmup=10, threshold=4.0, relearn=4)
    d = LossZScore(cfg)
    accepted: list[float] = []
    streak: list[float] = []
    scale = None
    for step, x in enumerate(noisy_losses(0)):
        got = d.update(TrainRecord(step, x, None, None, {}))
        if not math.isfinite(x):
            assert not got
            continue
        if len(accepted[-cfg.window :]) < cfg.warmup:
            accepted.append(x)
            assert not got
            continue
        win = np.array(accepted[-cfg.window :])
        scale = abs(win.mean()) if scale is None else scale
        z = (x - win.mean()) / max(win.std(), cfg.min_rel_std * abs(win.mean()), 1e-12)
        fire = z > cfg.threshold and abs(x - win.mean()) > cfg.min_rise * scale
        assert [t.step for t in got] == ([step] if fire else []), step
        if fire:
            assert got[0].details["z"] == pytest.approx(z, rel=1e-6)
            streak.append(x)
            if len(streak) >= cfg.relearn:
                accepted += streak
                streak = []
        else:
            streak = []
            accepted.append(x)


def test_loss_spike_matches_numpy_oracle() -> None:
    cfg = LossSpikeConfig(window=15, warmup=8, threshold_pct=40.0, min_robust_z=3.0, relearn=3)
    d = LossSpike(cfg)
    accepted: list[float] = []
    streak: list[float] = []
    scale = None
    fired = 0
    for step, x in enumerate(noisy_losses(1)):
        got = d.update(TrainRecord(step, x, None, None, {}))
        if not math.isfinite(x):
            continue
        win = np.array(accepted[-cfg.window :])
        if len(win) < cfg.warmup:
            accepted.append(x)
            continue
        med = float(np.median(win))
        scale = abs(med) if scale is None else scale
        mad = float(np.median(np.abs(win - med)))
        pct = (x / med - 1) * 100
        fire = (
            pct > cfg.threshold_pct
            and x - med > cfg.min_rise * scale
            and x - med > cfg.min_robust_z * 1.4826 * mad
        )
        assert [t.step for t in got] == ([step] if fire else []), step
        if fire:
            fired += 1
            assert got[0].details["pct"] == pytest.approx(pct)
            streak.append(x)
            if len(streak) >= cfg.relearn:
                accepted += streak
                streak = []
        else:
            streak = []
            accepted.append(x)
    assert fired > 5


def test_divergence_matches_numpy_oracle() -> None:
    cfg = DivergenceConfig(window=9, warmup=20, factor=1.3, patience=4)
    d = Divergence(cfg)
    finite: list[float] = []
    best, scale, above, armed = math.inf, None, 0, True
    fired = 0
    for step, x in enumerate(noisy_losses(2)):
        got = d.update(TrainRecord(step, x, None, None, {}))
        if not math.isfinite(x):
            continue
        finite.append(x)
        if len(finite) < cfg.warmup:
            continue
        window = np.array(finite[-cfg.window :])
        level = float(np.median(window))
        # the median's standard error, from the window's MAD, times 6 (loss.py _NOISE_SE)
        noise = 6.0 * 1.2533 * 1.4826 * float(np.median(abs(window - level))) / len(window) ** 0.5
        scale = abs(level) if scale is None else scale
        if (
            0 < best < math.inf
            and level > best * cfg.factor
            and level - best > max(cfg.min_rise * scale, noise)
        ):
            above += 1
            fire = above >= cfg.patience and armed
            armed = armed and not fire
        else:
            above, armed, fire = 0, True, False
            best = min(best, level)
        fired += fire
        assert [t.step for t in got] == ([step] if fire else []), step
    assert fired >= 2


def test_lr_zscore_matches_numpy_oracle() -> None:
    cfg = LrZScoreConfig(window=12, warmup=5)
    d = LrZScore(cfg)
    rng = random.Random(4)
    rates: list[float] = []
    last: tuple[int, float] | None = None
    held: tuple[int, float] | None = None
    fired = 0

    def z_of(step: int, lr: float, since: tuple[int, float]) -> float:
        win = np.array(rates[-cfg.window :])
        dt = step - since[0]
        std = max(win.std(), cfg.min_rel_std * abs(since[1]) / dt, 1e-30)
        return float(((lr - since[1]) / dt - win.mean()) / std)

    for step in range(1, 3000, 3):
        lr = 1e-4 * 0.5 * (1 + math.cos(math.pi * step / 3000)) + 1e-6
        if rng.random() < 0.01:
            lr *= rng.choice((10.0, 0.01, 3.0))
        got = d.update(TrainRecord(step, None, lr, None, {}))
        if last is None:
            last = (step, lr)
            continue
        fire = False
        if len(rates[-cfg.window :]) < cfg.warmup:
            rates.append((lr - last[1]) / (step - last[0]))
            last = (step, lr)
        elif abs(z_of(step, lr, last)) <= cfg.threshold:
            rates.append((lr - last[1]) / (step - last[0]))
            last, held = (step, lr), None
        elif held is not None and abs(z_of(step, lr, held)) <= cfg.threshold:
            rates.append((lr - held[1]) / (step - held[0]))
            last, held = (step, lr), None
        else:
            fire, held = True, (step, lr)
        fired += fire
        assert [t.step for t in got] == ([step] if fire else []), step
    assert fired >= 5


def test_nonfinite_matches_numpy_isfinite() -> None:
    d = NonFinite(NonFiniteConfig())
    rng = random.Random(5)
    for step in range(2000):
        loss = rng.choice([0.5, math.nan, math.inf, -math.inf, None] + [0.7] * 20)
        grad = rng.choice([1.0, math.nan, math.inf, None] + [1.0] * 20)
        kinds = {t.kind for t in d.update(TrainRecord(step, loss, None, grad, {}))}
        want = set()
        if loss is not None and not np.isfinite(loss):
            want.add("loss_nonfinite")
        if grad is not None and not np.isfinite(grad):
            want.add("grad_norm_nonfinite")
        assert kinds == want


def _numpy_mann_whitney_p(high: list[float], low: list[float]) -> float:
    values = np.array(high + low)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2)[inverse]
    n1, n2 = len(high), len(low)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ((counts**3 - counts).sum()) / (n * (n - 1)))
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_inverted_pattern_matches_numpy_mann_whitney() -> None:
    cfg = PredictionsConfig(inverted_window=40, inverted_min_each=6, inverted_alpha=1e-3)
    d = InvertedLossPattern(cfg)
    rng = random.Random(6)
    window: list[tuple[bool, float]] = []
    active, fired = False, 0
    for i in range(1500):
        inverted = (i // 300) % 2 == 1
        ok = rng.random() < 0.6
        loss = round(rng.lognormvariate(math.log(1.5 if ok == inverted else 0.3), 0.5), 2)
        got = d.update(ExampleRecord(i, f"q{i}", "a", "a" if ok else "b", ok, loss, {}))
        window = [*window, (ok, loss)][-cfg.inverted_window :]
        right = [v for o, v in window if o]
        wrong = [v for o, v in window if not o]
        fire = False
        if min(len(right), len(wrong)) >= cfg.inverted_min_each:
            p = _numpy_mann_whitney_p(right, wrong)
            assert mann_whitney_p(right, wrong) == pytest.approx(p, rel=1e-9, abs=1e-300)
            if p >= cfg.inverted_alpha:
                active = False
            elif not active:
                active = fire = True
        fired += fire
        assert bool(got) == fire, i
    assert fired >= 2


def test_conflicting_labels_match_a_dict_of_sets() -> None:
    d = ConflictingLabels(ConflictingLabelsConfig(max_prompts=1000))
    rng = random.Random(7)
    seen: dict[str, set[str]] = {}
    for i in range(3000):
        prompt, golden = f"q{rng.randrange(200)}", rng.choice(["a", "a", "a", "b", " A"])
        got = d.update(ExampleRecord(i, prompt, golden, "a", True, 0.1, {}))
        norm = golden.strip().casefold()
        want = prompt in seen and norm not in seen[prompt]
        seen.setdefault(prompt, set()).add(norm)
        assert bool(got) == want, i


def test_accuracy_drop_matches_numpy_running_max() -> None:
    cfg = AccuracyDropConfig(threshold_pct=5.0, noise_k=0.0)  # the running max alone
    d = AccuracyDrop(cfg)
    rng = random.Random(8)
    acc = np.clip(np.cumsum(rng.choices([0.01, -0.01, 0.0, -0.08, 0.07], k=400)) + 0.5, 0, 1)
    active = False
    for i, a in enumerate(acc):
        got = d.update(EvalRecord(i, None, float(a), {}))
        dropped = np.max(acc[: i + 1]) * 100 - a * 100 > cfg.threshold_pct
        fire = bool(dropped and not active and i > 0)
        active = bool(dropped)
        assert bool(got) == fire, i
        if fire:
            assert got[0].details["best"] == pytest.approx(np.max(acc[:i]) * 100)


def test_best_model_values_fall_by_the_margin_and_nothing_else_beats_them() -> None:
    cfg = BestModelConfig(min_rel_delta=0.02, min_steps=300)
    d = BestModel(cfg)
    rng = random.Random(9)
    losses = np.exp(np.cumsum(rng.choices([-0.03, -0.01, 0.0, 0.02], k=300))) * 2.0
    fired: list[tuple[int, float]] = []
    for i, v in enumerate(losses):
        fired += [
            (t.step, t.details["value"]) for t in d.update(EvalRecord(100 * i, float(v), None, {}))
        ]
    best, best_step = float(losses[0]), 0
    for step, value in fired:
        assert value < best - max(cfg.min_delta, cfg.min_rel_delta * best)
        assert step - best_step >= cfg.min_steps
        seen = losses[best_step // 100 + 1 : step // 100]  # evals between two bests
        margin = np.maximum(cfg.min_delta, cfg.min_rel_delta * best)
        late = seen[np.arange(best_step // 100 + 1, step // 100) * 100 - best_step >= cfg.min_steps]
        assert not np.any(late < best - margin), "a real improvement was skipped"
        best, best_step = value, step
    assert len(fired) >= 3


def test_prediction_outliers_match_numpy_thresholds() -> None:
    cfg = PredictionsConfig()
    d = PredictionOutliers(cfg)
    rng = np.random.default_rng(10)
    ok = rng.random(2000) < 0.6
    loss = np.round(rng.lognormal(np.where(ok, np.log(0.5), np.log(0.8)), 1.0), 3)
    got = [
        bool(d.update(ExampleRecord(1, "q", "a", "a", bool(o), float(v), {})))
        for o, v in zip(ok, loss, strict=True)
    ]
    want = (ok & (loss > cfg.high_loss)) | (~ok & (loss < cfg.low_loss))
    assert got == want.tolist() and 20 < want.sum() < 1000
