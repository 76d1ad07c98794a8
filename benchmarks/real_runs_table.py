"""The table of docs/detection-real-runs.md: every real run in ../shared/real-runs
(the HF ``trainer_state.json`` files, ``dev/``, ``dev-lm/`` and ``dev-tb/``) through
``replay`` with the default config, next to what its README says.

    .venv/bin/python benchmarks/real_runs_table.py           # print the table
    .venv/bin/python benchmarks/real_runs_table.py --write   # put it in the doc
    .venv/bin/python benchmarks/real_runs_table.py --check   # exit 1 if the doc is stale

Columns: records read; detections at warning and at critical (every detection, logged
or summed up); anomaly snapshots made (best models apart) and best-model snapshots made
(thinned within a burst of improvements; ``run``'s budget keeps the weights of
``keep_best`` of them);
the conclusions drawn (``overfitting_from_<step>``, ``not_learning_<records>``, with the
step they came at). tests/test_real_runs_table.py holds the expectations.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from smart_monitor.config import Config
from smart_monitor.events import Detected, Event
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay

ROOT = Path(__file__).resolve().parents[1]
REAL_RUNS = ROOT.parent / "shared" / "real-runs"
DOC = ROOT / "docs" / "detection-real-runs.md"
BEGIN, END = "<!-- real-runs-table -->", "<!-- /real-runs-table -->"
CONCLUSIONS = ("overfitting", "not_learning")

# What each README says a careful person sees, in a few words; "clean" items must get
# no warning and no critical.
README: dict[str, str] = {
    "AriesChen-UPC__GeoLLM__final.json": "SFT to loss 0.003, mild blips: clean",
    "ChenguangYang96UCR__KG-LLM__outputs.json": "grad_norm NaN at 1, 2, 6 (fp16)",
    "Fujump__qlora__output.json": "epoch drops, late bumps: benign",
    "Hahaazaza__Neiro__final.json": "memorises (loss 2e-4); eval loss 0.515 at 2600 -> 0.92",
    "HangerYang__Star__final.json": "smooth loss, grad-norm spikes: no loss alarm",
    "O5-7__chat_glm2_in4_LIL_prefix__final.json": "clean",
    "P4P4N1CK__whisper-large-v2-japanese-5k-steps__final.json":
        "loss to 2e-4; eval loss 0.32 -> 0.42, WER 0.79 -> 0.74",
    "TheUn4given123jkbkjs__Viettel_Race_2026__final.json": "clean, noisy",
    "aigoncharov__trainer_state_viz__final.json": "overfitting: eval_g*_loss rise from epoch 1",
    "akhmetvaleev-ruslan__bashkir-language-audio2text__final.json": "clean",
    "hsc748NLP__NSLLM__final.json": "clean loss, one grad-norm spike",
    "ijinyu1113__Learned-Remasking-Policy-for-dLLM__ckpt2000.json": "RL, loss about 0: clean",
    "suzushi-tw__luojiu-7b-base__final.json": "clean",
    "syGOAT__Mistral-v0.2-Translator-bf16__final.json": "clean",
    "CooperBigFoot__CAMELS-CH__version_17_metrics.jsonl": "clean; flat eval never improves",
    "KellerJordan__modded-nanogpt__2024-10-13_llmc_main.jsonl": "clean, LR rounds to 0",
    "KellerJordan__modded-nanogpt__2024-11-10_ScaleShortcuts_4897c987.jsonl":
        "one-batch spikes up to 1.8x, each back at once",
    "KellerJordan__modded-nanogpt__2024-11-14_QuantizedFP4_433c1732.jsonl":
        "one-batch spikes up to 1.56x",
    "openai__parameter-golf__GDN_baseline_seq8192.jsonl": "two runs in one file: restart",
    "pypi-data__pypi-mirror-359__nlpia2_GRU_10ep.jsonl": "divergence at 10349-10549",
    "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl": "clean",
    "pypi-data__pypi-mirror-359__nlpia2_RNN_RELU_2l_12ep.jsonl": "NaN from step 200",
    "pypi-data__pypi-mirror-359__nlpia2_RNN_TANH_2l_12ep.jsonl":
        "never learns: worse than uniform for 5 epochs",
    "xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl":
        "clean; eval +1.7 % in epoch 3 (mild)",
    "KellerJordan__modded-nanogpt__2024-10-09_SOAP_5bdc3988.jsonl": "healthy texture: clean",
    "KellerJordan__modded-nanogpt__2024-11-03_UntieEmbed_d6b50d71.jsonl":
        "healthy texture: clean",
    "KellerJordan__modded-nanogpt__2024-12-04_ValueEmbed_00008ea0.jsonl":
        "healthy texture: clean",
    "hengjiUSTC__learn-llm__log_mix_layer10_attenH8_kvH8.jsonl": "healthy, smooth: clean",
    "tyler-romero__nanogpt-speedrun__2dbf7fa6.jsonl": "healthy, 9 blips >= 1.4x: clean",
    "T01_keras_overfit": "overfitting from epoch 7, best at 6",
    "T02_keras_never_learns": "not learning",
    "T03_keras_two_fits_one_logdir": "restart; run 2 overfits from epoch 7",
    "T04_keras_finetune_clean": "clean",
    "T05_yolov5_clean": "clean (info: epoch-7 dip)",
    "T06_yolov5_resumed_lr_replanned": "resumes; LR breaks at 17, 112; 1.5x step-up",
    "T07_yolov8_clean": "clean",
    "T08_yolov8_val_inf_nan_collapse": "val loss explodes, inf, NaN; mAP collapse",
    "T09_yolov8_appended_restart_nan": "appended restart; NaN in last record",
    "T10_yolov8_single_epoch_val_nan": "val NaN at epoch 8 only (warning)",
    "T11_yolov8_val_divergence": "val diverges from 13-14; stale values",
    "T12_lightning_tft_tensorboard": "val_loss worse from 1323 (warning), LR halved",
    "T13_lightning_csv_overfit": "overfitting from epoch 3, best at step 372",
    "T14_lightning_csv_lr_monitor": "no loss alarm; LR phase change (info)",
    "T15_lightning_csv_wgan": "no loss alarm (GAN)",
    "T16_summarywriter_add_scalars": "clean",
    "T17_detectron2_restarts_lr_rewarmup": "restarts; LR break at 319",
    "T18_hf_trainer_shared_logdir": "run A overfits (best 3125), run C (best 1564)",
    "T19_hf_trainer_train_only": "clean, monotone; no eval",
    "T20_detectron2_noisy_start": "spikes 1.7-2.4x at 139, 299, 399, 939",
}


@dataclass(frozen=True)
class Row:
    folder: str
    name: str
    records: int
    warnings: int
    criticals: int
    snapshots: int
    best_models: int
    conclusions: tuple[tuple[str, int], ...]

    def cells(self) -> list[str]:
        said = ", ".join(f"`{n}` @{s}" for n, s in self.conclusions) or "-"
        return [
            f"{self.folder}{self.name}", str(self.records), str(self.warnings),
            str(self.criticals), str(self.snapshots), str(self.best_models), said,
            README.get(self.name, "?"),
        ]


def items() -> list[tuple[str, Path]]:
    """(folder prefix, path) of every real run, in the table's order."""
    out = [("", p) for p in sorted(REAL_RUNS.glob("*.json"))]
    for folder in ("dev", "dev-lm"):
        out += [(f"{folder}/", p) for p in sorted((REAL_RUNS / folder).glob("*.jsonl"))]
    out += [("dev-tb/", p) for p in sorted((REAL_RUNS / "dev-tb").iterdir()) if p.is_dir()]
    return out


def run_one(folder: str, path: Path) -> Row:
    """``replay`` of one run into a scratch folder, with the default config."""
    found: Counter[str] = Counter()
    conclusions: list[tuple[str, int]] = []

    def listen(event: Event) -> None:
        if isinstance(event, Detected):
            found[event.severity] += 1

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        config = Config(
            snapshot_dir=out / "snapshots", log_dir=out / "logs", state_dir=out / "state"
        )
        log, daily = make_logger(config.log_dir, stderr=None)
        engine = replay(config, path, log, progress=False, listeners=[listen])
        if daily is not None:
            daily.close()
        snapshots = best = 0
        for _, meta in engine.writer.published():
            kinds = {str(t) for t in meta.get("triggers", [])}
            if not all(t.startswith("best_model_loss") for t in kinds):
                snapshots += 1
            else:
                best += 1
        for line in "".join(p.read_text() for p in sorted(config.log_dir.glob("*.log"))).split(
            "\n"
        ):
            if " Detected anomaly " in line and any(f"trigger={c}" in line for c in CONCLUSIONS):
                fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
                conclusions.append((fields["trigger"], int(fields["step"])))
    return Row(
        folder, path.name, engine.counts["records"], found["warning"], found["critical"],
        snapshots, best, tuple(conclusions),
    )


def table(rows: list[Row]) -> str:
    head = ["run", "records", "warnings", "criticals", "snapshots", "best models",
            "conclusions", "README says"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def build() -> list[Row]:
    return [run_one(folder, path) for folder, path in items()]


def in_doc(text: str) -> str:
    """The table as the doc holds it (between its markers)."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into the doc")
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args()
    text = table(build())
    doc = DOC.read_text()
    if args.write:
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(f"{doc[:start]}\n{text}\n{doc[end:]}")
    elif args.check:
        if in_doc(doc) != text:
            print(f"{DOC} is stale: run {Path(__file__).name} --write", file=sys.stderr)
            return 1
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
