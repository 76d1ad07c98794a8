"""What each trigger means and what to do about it: one table, reviewed like code.

Every trigger family a detector can fire has one entry: what the trigger says, its
likely causes (most likely first, from the seed's "What it means" and from what
practitioners report), the checks to make in order, and the action (stop, watch, roll
back or keep). ``explain.py`` makes an entry specific with a snapshot's own figures;
``smart-monitor explain TRIGGER`` prints it without a snapshot. Text lives here and
nowhere else, so a reviewer reads every word a person is told at 3 a.m. in one place.

A trigger name resolves to its family by ``family_of``: its number dropped, then the
family itself, a name stem (``overfitting_from_20000``), or, for a trigger on another
loss series (``val_cls_loss_nonfinite``), the same without the series' prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from smart_monitor.triggers import kind_of

__all__ = ["ENTRIES", "Entry", "family_of", "lookup"]


@dataclass(frozen=True, slots=True)
class Entry:
    """``action`` starts with its verdict (stop, watch, roll back, keep);
    ``if_critical`` replaces it, and ``critical_causes`` the causes, when the snapshot
    is critical: the detector has seen the problem stay or repeat, which makes a
    one-off cause unlikely. ``names``: the name stems of the family's triggers when
    they differ from the family."""

    family: str
    what: str
    causes: tuple[str, ...]
    checks: tuple[str, ...]
    action: str
    if_critical: str = ""
    names: tuple[str, ...] = ()
    critical_causes: tuple[str, ...] = ()


_LOSS_SPIKE_CAUSES = (
    "a bad batch (corrupt, mislabelled or out-of-domain samples, an unusually long "
    "sequence): then the loss is back on trend within a few records",
    "learning rate too high: the start of a divergence",
    "a scheduler reset after a resume (the LR back at its warm-up or peak value)",
    "a data order change: a new epoch, shard or data mix",
    "fp16/bf16 overflow or loss-scale trouble",
)
_LOSS_SPIKE_CHECKS = (
    "Did the loss come back on trend in the next few records? Then it was one batch: "
    "note the step to find its samples.",
    "Compare the LR at this step with the LR before it (lr_history).",
    "Look at the grad norm at this step: a spike with the loss means a large update.",
    "Check whether the step is an epoch boundary, a resume or a new data shard.",
)
_STAYS_UP_CAUSES = (
    "learning rate too high: the start of a divergence",
    "a scheduler reset after a resume (the LR back at its warm-up or peak value)",
    "a data order or mix change: a new shard, a sampler that started over, a corrupt file",
    "fp16/bf16 overflow or loss-scale trouble",
    "optimizer state lost on a resume (Adam's moments reset at a high LR)",
)
_ONE_BATCH = (
    "watch: a one-batch spike that comes back on trend needs nothing; look at the "
    "samples of that step if it recurs."
)
_STAYS_UP = (
    "roll back: the loss did not come back; stop the run, find the cause (LR, schedule, "
    "data) and resume from the pinned checkpoint."
)

# Most serious first: with several triggers in one snapshot, the first one's entry
# leads its explanation (an LR jump before the loss spike it causes).
ENTRIES: tuple[Entry, ...] = (
    Entry(
        "loss_nonfinite",
        "The loss is NaN or infinite: the weights after this step are likely damaged, "
        "and every later step trains on them.",
        (
            "learning rate too high: the loss grew until it overflowed",
            "fp16 overflow the loss scaler could not absorb (bf16 or fp32 avoid it)",
            "a bad batch: an empty sequence, every label masked (-100) so the mean "
            "divides by zero, NaN or inf in the inputs",
            "a numerically unsafe op: log(0), sqrt of a negative, a division by a zero "
            "norm, softmax over a row of -inf",
            "a scheduler reset after a resume that put the LR back at its peak",
        ),
        (
            "Find the first non-finite step: was the loss rising before it (LR, "
            "divergence) or finite until one record (a bad batch, an overflow)?",
            "Look at the grad norm and the LR at and just before that step: a grad norm "
            "growing over records means too high an LR; a sudden one, one batch.",
            "Run `smart-monitor inspect` on the pinned checkpoint: finite weights make "
            "it a safe point to roll back to.",
            "Re-run the batch of this step alone with "
            "torch.autograd.set_detect_anomaly(True) to find the op.",
            "In fp16: try bf16, or watch the loss scale (one that keeps falling).",
        ),
        "stop: a non-finite loss does not heal; stop the run, fix the cause and resume "
        "from the pinned checkpoint.",
    ),
    Entry(
        "weights_nonfinite",
        "The checkpoint's weights hold NaN or infinite values: it is not a usable model.",
        (
            "a non-finite update was applied (an fp16 overflow not skipped, a NaN loss)",
            "learning rate too high: the weights blew up",
            "a corrupt save (the disk filled during the write)",
        ),
        (
            "`smart-monitor inspect` the checkpoint: which tensors, which layer first.",
            "Find the first non-finite loss or grad norm before this checkpoint in the log.",
            "Check the previous checkpoint: finite weights make it the rollback point.",
        ),
        "stop: never resume from this checkpoint; roll back to the newest one with "
        "finite weights.",
    ),
    Entry(
        "grad_norm_nonfinite",
        "The gradient norm is NaN or infinite at this step.",
        (
            "fp16 loss-scaling overflow: the scaler skips the step and lowers its scale "
            "(harmless when isolated)",
            "gradients exploding under too high an LR: it repeats, and the loss follows",
            "a bad batch that makes the backward pass overflow",
            "a numerically unsafe op in the backward pass (a norm or sqrt at 0, log of 0)",
        ),
        (
            "Does it repeat? One step in an fp16 run, with the loss on trend after it, "
            "is the loss scaler at work.",
            "Is the loss finite? HF hides a NaN loss from its log by default, so the "
            "grad norm may be the only sign.",
            "Watch the loss and the LR over the next records: a rising loss means real "
            "divergence.",
            "If it repeats: lower the LR, clip gradients (max_grad_norm), or move from "
            "fp16 to bf16.",
        ),
        "watch: the loss scaler skips an isolated overflow; nothing to do while the loss "
        "stays on trend.",
        "stop: repeated non-finite gradients (or a non-finite loss with them) damage the "
        "weights; stop, fix the cause and resume from the pinned checkpoint.",
        critical_causes=(
            "gradients exploding under too high an LR",
            "a run of bad data (a corrupt shard) that makes the backward pass overflow",
            "fp16 range exhausted: the loss scaler keeps overflowing (bf16 avoids it)",
            "a numerically unsafe op in the backward pass (a norm or sqrt at 0, log of 0)",
        ),
    ),
    Entry(
        "inverted_loss_pattern",
        "Over recent examples, right answers cost significantly more than wrong ones: "
        "the loss rewards the wrong thing.",
        (
            "labels shifted or swapped: golden answers attached to the wrong prompts",
            "a loss or tokenization bug that scores other tokens than the answer",
            "label noise: a large share of the golden answers is wrong",
            "the match test is inverted or broken",
        ),
        (
            "Check the golden labels of a few right and a few wrong examples by hand.",
            "Check the data pipeline for a shift between prompts and answers (one list "
            "shuffled, the other not).",
            "Recompute the loss of one right and one wrong example by hand.",
        ),
        "stop: stop training and check the labels; training on teaches the wrong answers.",
    ),
    Entry(
        "divergence_detected",
        "The smoothed loss has stayed far above its best for a sustained stretch: "
        "training is going the wrong way, not one bad batch.",
        (
            "learning rate too high for this stage of training (no warm-up, or no decay)",
            "a scheduler reset after a resume that put the LR back at its peak",
            "a data order or mix change: a new shard, a sampler that started over, a "
            "corrupt file",
            "optimizer state lost on a resume (Adam's moments reset at a high LR)",
            "fp16/bf16 precision running out as the weights grow",
        ),
        (
            "Compare the LR now with the LR before the rise (lr_history): a jump or a "
            "restarted schedule points to the scheduler.",
            "Find where the rise began in loss_history and what changed then: a resume, "
            "an epoch boundary, a new data shard.",
            "Look at the grad norm: growing over records means too high an LR.",
            "Check the eval loss: rising too means the model really is getting worse.",
        ),
        "roll back: resume from the pinned checkpoint (taken before the rise) with a "
        "lower LR or the schedule fixed.",
    ),
    Entry(
        "lr_zscore",
        "The learning rate left its schedule: the change is no warm-up, planned decay "
        "or plateau cut.",
        (
            "a scheduler reset after a resume (scheduler state not restored: the LR back "
            "at warm-up or peak)",
            "a resume from the wrong checkpoint or with a changed config",
            "a code or config change mid-run (a new LR, scheduler or total step count)",
            "a cyclic or restarting schedule (cosine with restarts, one-cycle): then it "
            "is planned",
            "a manual LR override or an optimizer rebuilt mid-run",
        ),
        (
            "Compare the LR before and after (lr_history) with the schedule you set.",
            "Did the trainer resume just before (a `Trainer restarted` log line)? Was "
            "the scheduler state restored (HF: scheduler.pt in the checkpoint)?",
            "Watch the loss over the next records: an LR jump shows in the loss within "
            "tens of steps.",
            "If the schedule is cyclic on purpose, set [detectors.lr_zscore] "
            'schedule = "cyclic".',
        ),
        "watch: if the loss stays on trend the change may be harmless; fix the schedule "
        "for the next run.",
        "roll back: an LR jump of this size usually breaks the run; stop, fix the "
        "scheduler and resume from the pinned checkpoint.",
    ),
    Entry(
        "loss_zscore",
        "The loss is far outside its recent spread.",
        _LOSS_SPIKE_CAUSES,
        _LOSS_SPIKE_CHECKS,
        _ONE_BATCH,
        _STAYS_UP,
        critical_causes=_STAYS_UP_CAUSES,
    ),
    Entry(
        "loss_spike",
        "The loss rose well above its recent median.",
        _LOSS_SPIKE_CAUSES,
        _LOSS_SPIKE_CHECKS,
        _ONE_BATCH,
        _STAYS_UP,
        critical_causes=_STAYS_UP_CAUSES,
    ),
    Entry(
        "not_learning",
        "After many records the train loss has not left its starting level beyond its "
        "noise, eval accuracy has not moved, or the LR has been about zero: the run is "
        "not learning.",
        (
            "learning rate too low or zero (a misconfigured schedule, a warm-up longer "
            "than the run, an LR cut to zero)",
            "frozen weights: no parameter requires grad (a wrong LoRA/PEFT set-up, an "
            "optimizer built on other parameters)",
            "labels disconnected from inputs: a pairing bug, every label masked, a "
            "constant target",
            "learning rate too high from the start: the loss bounces without progress",
            "a broken loss: a detached tensor, a wrong reduction",
        ),
        (
            "Print the LR the optimizer really uses, not the one in the config.",
            "Count the trainable parameters and check that the optimizer holds them.",
            "Overfit one small batch: a model that cannot memorise 8 samples has a bug, "
            "not a tuning problem.",
            "Check a few batches' labels against their inputs.",
        ),
        "stop: fix the set-up; more steps will not help a run that does not learn.",
        names=("not_learning",),
    ),
    Entry(
        "overfitting",
        "The eval loss (or metric) has been worse than its best for several evaluations "
        "while the train loss is flat or falling: the model fits the training set at the "
        "expense of held-out data.",
        (
            "training for too long for the size of the data set",
            "too little regularisation (dropout, weight decay, augmentation)",
            "too large a model or LR for the data (fine-tuning)",
            "train and eval data from different distributions",
            "duplicated samples in the training set",
        ),
        (
            "Confirm on the eval curve (`smart-monitor report`) that the rise is steady, "
            "not one noisy evaluation.",
            "Check that the train loss still falls: a flat train loss with a rising eval "
            "loss may be a data shift instead.",
            "Evaluate or deploy the best model's snapshot, not the latest weights.",
            "Next run: stop early at the best step (HF load_best_model_at_end with "
            "EarlyStoppingCallback), or add regularisation or data.",
        ),
        "stop when convenient: more steps make the model worse on held-out data; keep "
        "the best model's snapshot.",
        names=("overfitting_from",),
    ),
    Entry(
        "accuracy_drop",
        "Accuracy fell well below its best.",
        (
            "overfitting: the model fits the training set at the expense of held-out data",
            "LR too high, or a schedule change, knocking the model out of a good region",
            "a change in the eval set or eval code (split, tokenizer, prompt format)",
            "forgetting during fine-tuning (a new data mix)",
            "label noise in the newest training data",
        ),
        (
            "Compare with the eval loss at the same steps: both worse is a worse model; "
            "accuracy alone may be noise on a small eval set.",
            "Check the train loss: still falling while accuracy drops is overfitting.",
            "Check that the eval set and the eval code did not change.",
            "Look at the LR around the best step and now.",
        ),
        "watch: if the next evaluations stay down, use the best model's snapshot rather "
        "than the latest weights.",
    ),
    Entry(
        "weight_norm_zscore",
        "The global weight norm changed between two checkpoints far more than it usually "
        "does.",
        (
            "a large update: LR too high, or a gradient spike that clipping did not catch",
            "a weight-decay or optimizer change",
            "a resume that loaded other weights (another run's checkpoint, a partial load)",
        ),
        (
            "`smart-monitor inspect CHECKPOINT --against PREVIOUS`: which layers moved most.",
            "Look at the loss and the grad norm between the two checkpoints.",
            "Check the trainer's log for a resume between them.",
        ),
        "watch: if the loss is fine the model may just be moving; if not, roll back to "
        "the pinned checkpoint.",
    ),
    Entry(
        "perfect_answer_high_loss",
        "An example's answer matches the golden answer, yet its loss is high.",
        (
            "a loss or tokenization bug: the loss scores other tokens than the answer "
            "(labels shifted twice, padding not masked, misaligned labels)",
            "a loose match (normalised text) against a loss on the exact tokens",
            "a prompt or answer template that differs between training and evaluation",
            "a right answer by luck (short, common), with low confidence",
        ),
        (
            "Recompute this example's loss by hand: the golden answer's tokens only, "
            "labels shifted once, prompt and padding masked with -100.",
            "Compare the tokenization of the golden and the model answer (spaces, EOS, "
            "special tokens).",
            "Do other matching examples have a high loss too? One is an outlier, many "
            "a bug.",
        ),
        "watch: one example is a hint; if several show it, stop and check the loss "
        "function before training further.",
    ),
    Entry(
        "wrong_answer_low_loss",
        "An example's answer is wrong, yet its loss is low: the model scores the golden "
        "answer well but generates something else.",
        (
            "an answer-matching bug: format, whitespace, case or an extra EOS makes a "
            "right answer look wrong",
            "a decoding problem (max length, stop tokens, sampling) while the "
            "teacher-forced loss is fine",
            "a wrong golden answer that the model learnt",
            "a loss averaged over the prompt too, which hides a wrong answer",
        ),
        (
            "Compare the model's and the golden answer character by character.",
            "Check the decoding settings (max_new_tokens, stop tokens, temperature).",
            "Check that the loss masks the prompt, so that it scores the answer only.",
            "Check the golden label itself.",
        ),
        "watch: fix the matching or the decoding if it is a bug; the training itself "
        "may be fine.",
    ),
    Entry(
        "conflicting_labels",
        "The same prompt came with two different golden answers.",
        (
            "duplicated samples with different labels (label noise)",
            "a data join or shuffle that pairs prompts with the wrong answers",
            "a prompt whose answer is legitimately ambiguous",
        ),
        (
            "Find the prompt in the training data and count its answers.",
            "If many prompts conflict, check how the pipeline pairs prompts and answers.",
            "Decide which label is right and clean the data.",
        ),
        "watch: clean the data for the next run; a few conflicts are noise, many a "
        "pipeline bug.",
    ),
    Entry(
        "best_model_loss",
        "A new best loss: the model is the best so far by this measure.",
        (
            "training is making progress (the expected case)",
            "from the smoothed train loss when no eval loss is logged: it also falls "
            "while the model memorises",
        ),
        (
            "If the source is the train loss, log an eval loss: a train-loss best is no "
            "generalisation best.",
            "Keep this snapshot if later ones show overfitting or divergence: it is the "
            "one to resume from or deploy.",
        ),
        "keep: nothing to do; the newest best-model snapshot is never removed by "
        "retention.",
    ),
    Entry(
        "MULTIPLE_TRIGGERS",
        "Several detectors fired at one step: independent signals agree that something "
        "happened.",
        (
            "one event seen by several detectors (a spike is both a z-score and a "
            "percentage rise)",
            "a real break: non-finite values, an LR jump and a loss spike together",
        ),
        (
            "Read the first trigger's meaning: it is the most serious.",
            "Check the LR and the grad norm at this step.",
        ),
        "watch: two triggers of one problem (a z-score and a spike) are one event.",
        "roll back: three or more triggers at one step mean roll back to the last good "
        "checkpoint, the pinned one.",
    ),
)

_BY_FAMILY = {e.family: e for e in ENTRIES}
_BY_STEM = {stem: e for e in ENTRIES for stem in (e.family, *e.names)}


def family_of(name: str) -> str | None:
    """The family of a trigger name, a family name or a stats label; None if unknown.

    >>> family_of("loss_zscore_43.20"), family_of("overfitting_from_20000")
    ('loss_zscore', 'overfitting')
    >>> family_of("val_cls_loss_nonfinite"), family_of("train_gen_loss_spike_87.3pct")
    ('loss_nonfinite', 'loss_spike')
    >>> family_of("loss_spike_*"), family_of("no_such_thing")
    ('loss_spike', None)
    """
    name = name.removesuffix("_*")
    parts = name.split("_")
    for i in range(len(parts)):  # without a series' prefix, the shortest prefix first
        stem = kind_of("_".join(parts[i:]))
        if stem in _BY_STEM:
            return _BY_STEM[stem].family
    return None


def lookup(name: str) -> Entry | None:
    """The entry of a trigger name or family (``family_of``)."""
    family = family_of(name)
    return None if family is None else _BY_FAMILY[family]
