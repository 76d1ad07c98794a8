"""``smart-monitor inspect`` on real safetensors and torch files, checked against torch
computing the same figures over the whole state dict (the batch oracle)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from smart_monitor.forensics import compare_checkpoints, format_text, inspect_checkpoint
from smart_monitor.forensics import tensors as tensors_mod
from smart_monitor.forensics.inspection import layer_of
from smart_monitor.forensics.tensors import CheckpointError, checkpoint_files, iter_tensors

SMART_MONITOR = Path(sys.executable).with_name("smart-monitor")


def gpt2_state() -> dict[str, torch.Tensor]:
    """A real model's weights: a tiny GPT-2 built from its config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2,
                                       n_head=2))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied to wte: safetensors refuses shared storage
    return state


def oracle(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The figures, from torch over whole tensors."""
    floats = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    layers: dict[str, float] = {}
    for k, v in floats.items():
        finite = v[torch.isfinite(v)]
        layers[layer_of(k)] = layers.get(layer_of(k), 0.0) + float((finite**2).sum())
    return {
        "parameters": sum(v.numel() for v in floats.values()),
        "global_norm": math.sqrt(sum(layers.values())),
        "layers": {k: math.sqrt(v) for k, v in layers.items()},
    }


def assert_matches(ins: Any, expected: dict[str, Any]) -> None:
    assert ins.parameters == expected["parameters"]
    assert ins.global_norm == pytest.approx(expected["global_norm"], rel=1e-9)
    assert ins.layers.keys() == expected["layers"].keys()
    for k, v in expected["layers"].items():
        assert ins.layers[k] == pytest.approx(v, rel=1e-9), k


def hf_checkpoint(root: Path, state: dict[str, torch.Tensor], name: str = "checkpoint-100") -> Path:
    """An HF checkpoint folder: weights, and the files that are not weights."""
    ck = root / name
    ck.mkdir(parents=True)
    save_file(state, ck / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(10)}}}, ck / "optimizer.pt")
    torch.save({"python": 1}, ck / "rng_state.pth")
    (ck / "trainer_state.json").write_text('{"global_step": 100}')
    return ck


def test_reader_agrees_with_safetensors_on_every_dtype(tmp_path: Path) -> None:
    state = {
        "a.f32": torch.randn(3, 5),
        "a.f16": torch.randn(7).half(),
        "a.bf16": torch.randn(4, 4).bfloat16(),
        "a.f64": torch.randn(2).double(),
        "b.i64": torch.arange(6),
        "b.bool": torch.tensor([True, False]),
        "c.empty": torch.zeros(0, 3),
    }
    save_file(state, tmp_path / "m.safetensors")
    read = {t.name: t for t in iter_tensors([tmp_path / "m.safetensors"], "safetensors")}
    assert read.keys() == state.keys()
    for name, ref in state.items():
        t = read[name]
        assert t.shape == tuple(ref.shape)
        if t.is_float:
            got = np.concatenate([c.copy() for c in tensors_mod.float_chunks(t)] or [np.zeros(0)])
            np.testing.assert_array_equal(got, ref.double().reshape(-1).numpy())
        else:
            np.testing.assert_array_equal(np.asarray(t.data), ref.reshape(-1).numpy())


def test_hf_checkpoint_figures_match_torch(tmp_path: Path) -> None:
    state = gpt2_state()
    ck = hf_checkpoint(tmp_path, state)
    ins = inspect_checkpoint(ck)
    assert ins.format == "safetensors" and ins.files == ["model.safetensors"]
    assert ins.nonfinite == []
    assert_matches(ins, oracle(state))
    assert "transformer.h.1" in ins.layers and "transformer.wte" in ins.layers


def test_chunked_reduction_equals_whole_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors larger than a chunk are reduced piece by piece (bounded memory)."""
    state = gpt2_state()
    state["transformer.h.0.mlp.c_fc.weight"][3, :5] = float("nan")
    save_file(state, tmp_path / "model.safetensors")
    whole = inspect_checkpoint(tmp_path / "model.safetensors")
    monkeypatch.setattr(tensors_mod, "CHUNK", 7)
    chunked = inspect_checkpoint(tmp_path / "model.safetensors")
    assert chunked.nonfinite == whole.nonfinite
    assert chunked.global_norm == pytest.approx(whole.global_norm, rel=1e-12)
    assert_matches(chunked, oracle(state))


def test_injected_nan_and_inf_are_found_and_counted(tmp_path: Path) -> None:
    state = gpt2_state()
    state["transformer.h.1.attn.c_proj.weight"][0, :3] = float("nan")
    state["transformer.h.1.attn.c_proj.weight"][1, 0] = float("inf")
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"].bfloat16()
    state["transformer.wpe.weight"][2, 2] = float("-inf")
    ins = inspect_checkpoint(hf_checkpoint(tmp_path, state))
    found = {t["name"]: (t["nan"], t["inf"]) for t in ins.nonfinite}
    assert found == {"transformer.h.1.attn.c_proj.weight": (3, 1), "transformer.wpe.weight": (0, 1)}
    assert_matches(ins, oracle(state))  # norms over the finite values
    assert math.isfinite(ins.global_norm)


def test_torch_bin_reads_like_safetensors(tmp_path: Path) -> None:
    state = gpt2_state()
    st = inspect_checkpoint(hf_checkpoint(tmp_path, state))
    ck = tmp_path / "bin" / "checkpoint-100"
    ck.mkdir(parents=True)
    torch.save(state, ck / "pytorch_model.bin")
    torch.save({"lr": torch.tensor(1.0)}, ck / "optimizer.pt")  # not weights: ignored
    torch.save(state, ck / "training_args.bin")  # nor this
    ins = inspect_checkpoint(ck)
    assert ins.format == "torch" and ins.files == ["pytorch_model.bin"]
    assert (ins.parameters, ins.layers) == (st.parameters, st.layers)
    assert ins.global_norm == pytest.approx(st.global_norm, rel=1e-12)


def test_lightning_ckpt_uses_its_state_dict(tmp_path: Path) -> None:
    state = {"net.0.weight": torch.randn(4, 3), "net.0.bias": torch.randn(4)}
    state["net.0.bias"][1] = float("nan")
    path = tmp_path / "epoch=1-step=50.ckpt"
    torch.save({"epoch": 1, "global_step": 50, "state_dict": state,
                "optimizer_states": [{"state": {}}], "pytorch-lightning_version": "2.6"}, path)
    ins = inspect_checkpoint(path)
    assert ins.parameters == 16 and ins.tensors == 2
    assert ins.nonfinite == [{"name": "net.0.bias", "dtype": "F32", "shape": [4], "nan": 1,
                              "inf": 0}]


def test_sharded_safetensors_and_snapshot_folders(tmp_path: Path) -> None:
    state = gpt2_state()
    names = sorted(state)
    snap = tmp_path / "anomaly_20261129_170000_loss_zscore_9.00"
    (snap / "model").mkdir(parents=True)
    (snap / "metadata.json").write_text("{}")
    save_file({k: state[k] for k in names[:5]}, snap / "model" / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[5:]}, snap / "model" / "model-00002-of-00002.safetensors")
    fmt, files = checkpoint_files(snap)
    assert fmt == "safetensors" and len(files) == 2
    ins = inspect_checkpoint(snap)
    assert ins.tensors == len(state)
    assert_matches(ins, oracle(state))


def test_compare_ranks_the_layers_that_moved_most(tmp_path: Path) -> None:
    before = gpt2_state()
    after = {k: v.clone() for k, v in before.items()}
    for k in after:
        if k.startswith("transformer.h.1."):
            after[k] = after[k] * 3  # moved by 2x its norm
        elif k.startswith("transformer.h.0."):
            after[k] = after[k] * 1.1
    after["extra.weight"] = torch.ones(2)
    after["transformer.wpe.weight"] = torch.zeros(8, 16)  # new shape
    del after["transformer.ln_f.bias"]
    a, b = tmp_path / "a", tmp_path / "b"
    hf_checkpoint(a, after)
    hf_checkpoint(b, before)
    cmp = compare_checkpoints(a / "checkpoint-100", b / "checkpoint-100")
    top = cmp.changes[0]
    assert top.layer == "transformer.h.1"
    assert top.relative == pytest.approx(2.0, rel=1e-9)
    assert cmp.changes[1].layer == "transformer.h.0"
    assert cmp.changes[1].relative == pytest.approx(0.1, rel=1e-6)
    assert cmp.changes[2].relative == 0.0
    assert cmp.only_here == ["extra.weight"]
    assert cmp.only_there == ["transformer.ln_f.bias"]
    assert cmp.shape_mismatch == ["transformer.wpe.weight"]
    text = format_text(inspect_checkpoint(a / "checkpoint-100"), cmp)
    assert "moved most against" in text and "only there: transformer.ln_f.bias" in text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SMART_MONITOR), "inspect", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_json_and_exit_codes(tmp_path: Path) -> None:
    state = gpt2_state()
    good = hf_checkpoint(tmp_path / "good", state)
    bad_state = {k: v.clone() for k, v in state.items()}
    bad_state["transformer.h.0.ln_1.weight"][:] = float("nan")
    bad = hf_checkpoint(tmp_path / "bad", bad_state)

    ok = run_cli(str(good))
    assert ok.returncode == 0, ok.stderr
    assert "non-finite   none" in ok.stdout and "transformer.h.1" in ok.stdout

    res = run_cli(str(bad), "--against", str(good), "--json")
    assert res.returncode == 3, res.stderr  # non-finite tensors found
    out = json.loads(res.stdout)
    assert out["nonfinite"] == [{"name": "transformer.h.0.ln_1.weight", "dtype": "F32",
                                 "shape": [16], "nan": 16, "inf": 0}]
    assert out["parameters"] == oracle(state)["parameters"]
    assert out["against"]["changes"][0]["layer"] == "transformer.h.0"


def test_cli_says_what_is_wrong_with_unreadable_input(tmp_path: Path) -> None:
    missing = run_cli(str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
    empty = tmp_path / "checkpoint-1"
    empty.mkdir()
    (empty / "optimizer.pt").write_bytes(b"x")
    res = run_cli(str(empty))
    assert res.returncode == 1 and "no model weights" in res.stderr
    save_file({"w": torch.randn(100)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-40])  # cut short by a full disk
    res = run_cli(str(tmp_path / "t.safetensors"))
    assert res.returncode == 1 and "truncated" in res.stderr



@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x05\x00", "too short"),
        (b"\xff" * 8, "not a safetensors file"),
        ((4).to_bytes(8, "little") + b"[1] ", "header is not an object"),
        ((16).to_bytes(8, "little") + b'{"a": {"x": 1}} ', "bad header entry for tensor a"),
        ((4).to_bytes(8, "little") + b"\xff\xfe{}", "unreadable safetensors header"),
    ],
)
def test_a_damaged_header_is_one_clear_error(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(tmp_path / "model.safetensors")


def test_torch_file_without_torch_names_the_extra(tmp_path: Path) -> None:
    """The daemon's environment may lack torch: a .bin then asks for the extra."""
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from smart_monitor.forensics import inspect_checkpoint, CheckpointError\n"
        "try:\n"
        f"    inspect_checkpoint(Path({str(tmp_path)!r}))\n"
        "except CheckpointError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "install smart-monitor[torch]" in out


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model weights"):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_dtype_numpy_lacks_is_listed_not_guessed(tmp_path: Path, suffix: str) -> None:
    state = {"a.w": torch.randn(4), "b.w": torch.randn(8).to(torch.float8_e4m3fn)}
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    ins = inspect_checkpoint(path)
    assert ins.skipped == ["b.w"] and ins.parameters == 4 and list(ins.layers) == ["a"]
    assert "not reduced  1 tensor(s)" in format_text(ins)
