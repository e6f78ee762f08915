"""Checkpoints that cannot be trusted are never used, and a failed save loses nothing: corrupted,
truncated or missing files are found by their checksums before loading, and a full disk during a
save leaves the older checkpoints as they were. Real runs, real files, a real full filesystem."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose, tiny_overrides
from feedsr.runtime.checkpoint import CheckpointError, checkpoint_path, latest_valid_checkpoint, verify
from feedsr.train.trainer import run


def _damage(path: Path, how: str) -> Path:
    """Damage the largest file of a checkpoint folder; returns it."""
    target = max((p for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    return target


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_found_and_the_run_falls_back(synthetic_dir, tmp_path, capsys, how):
    settings = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=3", "model.dropout=0.1",
                "trainer.max_steps=4"]
    straight = run(compose(tiny_overrides(synthetic_dir, tmp_path, "straight") + settings))
    overrides = tiny_overrides(synthetic_dir, tmp_path, "run") + settings
    run(compose(overrides))
    damaged = _damage(checkpoint_path(tmp_path / "run", 4), how)
    assert verify(checkpoint_path(tmp_path / "run", 4)) is not None
    capsys.readouterr()
    resumed = run(compose(overrides))
    out = capsys.readouterr().out
    assert f"WARNING: not resuming from a damaged checkpoint: {damaged}" in out
    assert "step-3 at step 3" in out
    assert resumed.losses == straight.losses[3:]  # step 4 again, exactly as uninterrupted
    # evaluation refuses the damaged folder by name (it was re-saved by the resumed run: damage it again)
    again = _damage(checkpoint_path(tmp_path / "run", 4), how)
    out = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint",
                          str(checkpoint_path(tmp_path / "run", 4))], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and str(again) in out.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 1.4 MB filesystem: room for two or three checkpoints of the tiny model, not more."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_save_loses_nothing(synthetic_dir, tmp_path, small_disk):
    overrides = tiny_overrides(synthetic_dir, small_disk, "full") + [
        "trainer.max_steps=30", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=5"]
    with pytest.raises(CheckpointError, match=r"saving failed: .*step-(\d+): no space left on the device; "
                                              r"the partial step-\d+ was removed") as err:
        run(compose(overrides))
    failed = int(str(err.value).split("step-")[1].split(":")[0])
    run_dir = small_disk / "full"
    assert not checkpoint_path(run_dir, failed).exists()  # the partial folder is gone
    newest, problems = latest_valid_checkpoint(run_dir)
    assert newest == checkpoint_path(run_dir, failed - 1) and problems == []  # and the rest verifies


def test_torch_saves_short_write_on_a_full_disk_is_named_as_such(small_disk):
    """torch.save reports a full disk as a RuntimeError without an error code ("unexpected pos");
    the message used to pass that through instead of saying the disk was full."""
    import torch

    from feedsr.runtime.checkpoint import _attempt

    folder = small_disk / "step-1"
    folder.mkdir()
    (small_disk / "filler").write_bytes(b"\0" * (1400 * 1024 - 300 * 1024))  # leave ~300 kB
    error = _attempt(folder, lambda: torch.save(torch.zeros(200_000), folder / "rank-0.pt"))  # 800 kB
    assert error == f"{folder}: no space left on the device"


def test_checkpoint_from_before_context_norm_loads_as_a_raw_context_model(synthetic_dir, tmp_path):
    """A run saved before model.context_norm existed (no buffers, no config key) is scored as it
    was trained: on raw context. Loading it into a model that standardises is refused."""
    import torch
    import torch.distributed.checkpoint as dcp
    import yaml

    from feedsr.eval.trained import load_trained
    from feedsr.model import build_model
    from feedsr.runtime.checkpoint import load_sharded, write_marker

    result = run(compose(tiny_overrides(synthetic_dir, tmp_path, "old") + [
        "trainer.max_steps=2", "model.context_norm=false"]))
    new = load_trained(result.run_dir)
    # the same weights as an old run would hold them: no context_norm buffers, no config key
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    del config["model"]["context_norm"]
    (result.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    old = result.run_dir / "checkpoints" / "step-9"
    weights = {k: v for k, v in new.model.state_dict().items() if "context_norm" not in k}
    dcp.save({"model": weights}, checkpoint_id=old / "sharded")
    write_marker(old, 9, 1)
    loaded = load_trained(old)
    assert not loaded.model.context_norm.enabled
    for key, value in new.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)
    standardising = build_model(dataclasses.replace(loaded.config.model, context_norm=True), loaded.spec,
                                loaded.config.data.max_seq_len)
    with pytest.raises(CheckpointError, match="saved before feedsr standardised the context features"):
        load_sharded(old, standardising, None)
