"""Policy: incidents (one problem, one snapshot, a recovery line), cooldowns, severity,
MULTIPLE_TRIGGERS; and the incident block the pipeline puts in metadata.json."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from smart_monitor.config import Config, PolicyConfig
from smart_monitor.pipeline import Pipeline
from smart_monitor.policy import MULTIPLE, Policy
from smart_monitor.records import ExampleRecord, TrainRecord
from smart_monitor.triggers import Severity, Trigger


def spike(step: int, z: float = 9.0, kind: str = "loss_zscore") -> Trigger:
    sev = Severity.CRITICAL if z > 10 else Severity.WARNING
    return Trigger(kind, f"{kind}_{z:.2f}", sev, step, {"z": z})


def test_consecutive_detections_are_one_incident_escalated_once() -> None:
    """A warning spike opens the incident (a snapshot); the first critical detection in
    it escalates (a second snapshot: the moment an action is due); the rest are counted
    quietly, the peak kept."""
    p = Policy(PolicyConfig(recovery_steps=100, recovery_records=1, cooldown_steps=0))
    first = p.decide(1000, [spike(1000)])
    assert first.snapshot and first.incidents[0].id == "loss_spike@1000"
    escalated = p.decide(1010, [spike(1010, 12.0)])
    assert escalated.severity is Severity.CRITICAL
    assert escalated.incidents[0].id == "loss_spike@1000"
    peak = p.decide(1050, [spike(1050, 30.0)])
    assert not peak.snapshot and len(peak.suppressed) == 1, "a new peak is news: logged"
    d = p.decide(1120, [spike(1120, 9.5)])
    assert not d.snapshot and not d.suppressed and len(d.quiet) == 1
    assert p.observe(1200) == []  # 80 steps after the last detection: still open
    (done,) = p.observe(1221)
    assert (done.started, done.peak_step, done.last, done.detections) == (1000, 1050, 1120, 4)
    assert (done.peak_trigger, done.severity) == ("loss_zscore_30.00", "critical")
    assert done.block()["transient"] is False
    again = p.decide(1400, [spike(1400)])
    assert again.snapshot, "a new incident after recovery makes its own snapshot"


def test_sparse_logging_broken_run_stays_one_incident() -> None:
    """Logged every 200 steps and NaN throughout: 100 steps without a detection pass
    between two records, but not 10 records: one incident, one snapshot."""
    p = Policy(PolicyConfig())
    nan = [Trigger("loss_nonfinite", "loss_nonfinite", Severity.CRITICAL, s) for s in
           range(200, 200 * 170, 200)]
    decisions = []
    for t in nan:
        assert p.observe(t.step) == []
        decisions.append(p.decide(t.step, [t]))
    assert sum(bool(d.snapshot) for d in decisions) == 1
    assert sum(len(d.suppressed) for d in decisions) == 0  # quiet: counted, not logged
    notes = [n for d in decisions for n in d.notes]
    assert [(n.event, n.fields["detections"]) for n in notes] == [
        ("Incident ongoing", 10), ("Incident ongoing", 100)
    ]
    closed = [i for k in range(1, 11) for i in p.observe(200 * 170 + 200 * k)]
    assert [(i.detections, i.started) for i in closed] == [(len(nan), 200)]


def test_recurring_transients_are_capped_per_episode() -> None:
    """Forty one-batch spikes over 20,000 steps: each an incident that recovers, all
    one recurring episode with three snapshots and one note per order of magnitude."""
    p = Policy(PolicyConfig())
    snaps, notes = 0, []
    for k in range(40):
        step = 500 * k + 100
        for s in range(step - 20, step):
            p.observe(s)
        d = p.decide(step, [spike(step), spike(step, kind="loss_spike")])
        snaps += bool(d.snapshot)
        notes += d.notes
        assert len(d.suppressed) + len(d.snapshot) == 2  # every spike is still logged
        for s in range(step + 1, step + 200):
            p.observe(s)
    assert snaps == 3
    assert [(n.event, n.fields["count"]) for n in notes] == [
        ("Recurring loss spikes", 3), ("Recurring loss spikes", 10)
    ]
    critical = p.decide(30000, [spike(30000, 12.0)])
    assert critical.snapshot, "a critical loss incident is not capped by the episode"


def test_loss_zscore_and_loss_spike_are_one_problem_lr_another() -> None:
    p = Policy(PolicyConfig())
    d = p.decide(
        500,
        [
            spike(500),
            Trigger("loss_spike", "loss_spike_210.0pct", Severity.WARNING, 500, {"pct": 210.0}),
        ],
    )
    assert d.name == MULTIPLE and len(d.snapshot) == 2 and len(d.incidents) == 1
    lr = p.decide(510, [Trigger("lr_zscore", "lr_zscore_40.00", Severity.CRITICAL, 510)])
    assert lr.snapshot and lr.incidents[0].problem == "lr_zscore"


def test_cooldown_holds_a_new_incident_of_the_same_problem() -> None:
    p = Policy(PolicyConfig(recovery_steps=10, recovery_records=1, cooldown_steps=200))
    assert p.decide(100, [spike(100)]).snapshot
    assert p.observe(150)
    d = p.decide(160, [spike(160)])
    assert not d.snapshot and d.suppressed


def test_an_open_conclusion_never_holds_the_bulk_path() -> None:
    """A conclusion's incident never closes (observe keeps it open), so it must never be
    due: else every train record after it would go through ``process`` one by one (a
    run concluded not learning replayed ten times slower)."""
    p = Policy(PolicyConfig(recovery_steps=10, recovery_records=1))
    conclusion = Trigger("not_learning", "not_learning_100", Severity.WARNING, 100)
    assert p.decide(100, [conclusion]).snapshot
    steps = np.arange(200, 1200, dtype=np.int64)
    assert not p.observe(199) and p.open  # open for good
    assert p.first_due(steps) == len(steps)
    assert p.decide(300, [spike(300)]).snapshot  # a spike's incident is due as before
    assert p.first_due(steps) == int(steps.searchsorted(300 + 10 + 1))


def test_best_model_is_never_grouped_into_an_incident() -> None:
    p = Policy(PolicyConfig(cooldown_steps=0))
    best = [
        Trigger("best_model_loss", f"best_model_loss_0.{9 - i}", Severity.INFO, 500 * i)
        for i in range(1, 4)
    ]
    assert all(p.decide(t.step, [t]).snapshot for t in best)
    assert not p.open


def test_severity_three_triggers_is_critical() -> None:
    p = Policy(PolicyConfig())
    ts = [
        spike(7),
        Trigger("lr_zscore", "lr_zscore_7.00", Severity.WARNING, 7),
        Trigger("grad_norm_nonfinite", "grad_norm_nonfinite", Severity.WARNING, 7),
    ]
    assert p.decide(7, ts).severity is Severity.CRITICAL


def test_policy_resume_gives_the_same_decisions() -> None:
    rng = random.Random(0)
    steps = sorted(rng.sample(range(10, 5000), 200))
    events = [
        (s, [spike(s, rng.uniform(6, 20), rng.choice(["loss_zscore", "lr_zscore"]))]) for s in steps
    ]

    def run(p: Policy, evs: list[tuple[int, list[Trigger]]]) -> list[object]:
        out: list[object] = []
        for s, ts in evs:
            out += [(i.id, i.peak_step, i.detections) for i in p.observe(s)]
            d = p.decide(s, ts)
            out.append((s, d.name, len(d.suppressed)))
        return out

    whole = run(Policy(PolicyConfig()), events)
    for cut in (1, 57, 150):
        first = Policy(PolicyConfig())
        got = run(first, events[:cut])
        second = Policy(PolicyConfig())
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert got + run(second, events[cut:]) == whole


def test_rewind_forgets_incidents_opened_after_the_restart_point() -> None:
    p = Policy(PolicyConfig())
    p.decide(100, [spike(100)])
    p.decide(900, [spike(900, kind="lr_zscore")])
    p.rewind(500)
    assert set(p.open) == {"loss_spike"}


def loss(step: int, value: float) -> TrainRecord:
    return TrainRecord(step, value, 1e-4, 1.0, {"step": step, "loss": value})


def test_pipeline_metadata_gets_an_incident_block_and_recovery_outcome() -> None:
    pipe = Pipeline(Config())
    outcomes = [pipe.process(loss(s, 2.0 - 0.002 * s + 0.01 * (s % 3))) for s in range(1, 200)]
    assert not any(outcomes)
    first = pipe.process(loss(200, 4.0))
    assert first is not None and first.snapshot is not None
    (z,) = [t.details["z"] for t in first.triggers if t.kind == "loss_zscore"]
    assert first.snapshot.metadata["z_scores"]["loss"] == round(z, 4)
    block = first.snapshot.metadata["incident"]
    assert (block["problem"], block["started"], block["status"]) == ("loss_spike", 200, "open")
    second = pipe.process(loss(201, 5.0))
    assert second is not None and second.snapshot is None and not second.quiet
    assert second.suppressed == second.triggers  # a new peak: logged, no second snapshot
    third = pipe.process(loss(202, 4.5))
    assert third is not None and third.quiet == third.triggers  # below the peak: counted
    recovered = [o for s in range(203, 400) if (o := pipe.process(loss(s, 1.0))) is not None]
    (o,) = recovered
    (incident,) = o.extra["recovered"]
    assert (incident.started, incident.peak_step, incident.last) == (200, 201, 202)
    assert o.step == 303


def test_pipeline_metadata_names_both_conflicting_answers() -> None:
    pipe = Pipeline(Config())
    pipe.process(ExampleRecord(10, "2+2?", "4", "4", True, 0.2, {}))
    out = pipe.process(ExampleRecord(20, "2+2?", "5", "4", False, 0.9, {}))
    assert out is not None and out.snapshot is not None
    meta = out.snapshot.metadata
    assert meta["triggers"] == ["conflicting_labels"]
    assert meta["conflicting_labels"]["answers"] == ["4", "5"]


@pytest.mark.parametrize("gap", [0, 1, 50])
def test_recovery_steps_zero_or_more(gap: int) -> None:
    p = Policy(PolicyConfig(recovery_steps=gap, recovery_records=1, cooldown_steps=0))
    p.decide(10, [spike(10)])
    assert p.observe(10 + gap) == []
    assert len(p.observe(11 + gap)) == 1
