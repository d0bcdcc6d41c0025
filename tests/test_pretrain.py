"""Pretraining the tiny CLIP: shipped weights load as an open_clip checkpoint, match their checksum, are the default."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import pipeline.encoder as encoder_module
from pipeline.encoder import DEFAULT_MODEL, WEIGHTS_DIR, FrozenEncoder, file_sha256, register_model_configs
from pipeline.errors import UserError
from pipeline.pretrain import binding_twin, make_batch, pretrain_tiny
from pipeline.synthetic import sample_frame_scene

SHIPPED = WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors"


def _sidecar_digest(path) -> str:
    return path.with_name(path.name + ".sha256").read_text().split()[0]


def test_shipped_weights_load_through_open_clip_and_match_their_checksum():
    assert SHIPPED.is_file(), "run `python cli.py pretrain-tiny` (see docs/pretrain.md)"
    assert file_sha256(SHIPPED) == _sidecar_digest(SHIPPED)
    register_model_configs()
    model = open_clip.create_model(DEFAULT_MODEL, pretrained=str(SHIPPED))  # open_clip's own loading path
    state = load_file(str(SHIPPED))
    assert all(v.dtype == torch.float16 for v in state.values())
    torch.testing.assert_close(model.visual.proj, state["visual.proj"].float())
    assert SHIPPED.stat().st_size < 10_000_000


def test_default_encoder_uses_the_shipped_weights():
    enc = FrozenEncoder(device=torch.device("cpu"))
    assert enc.info.pretrained == str(SHIPPED) and enc.info.pretrained_sha256 == file_sha256(SHIPPED)
    assert FrozenEncoder(pretrained="random", device=torch.device("cpu")).info.pretrained == ""


def test_short_run_writes_a_small_loadable_fp16_file(tmp_path):
    path = pretrain_tiny(tmp_path / "w.safetensors", steps=3, batch_size=8, seed=1, progress=False)
    assert path.stat().st_size < 10_000_000 and file_sha256(path) == _sidecar_digest(path)
    assert all(v.dtype == torch.float16 for v in load_file(str(path)).values())
    enc = FrozenEncoder(pretrained=str(path), device=torch.device("cpu"))
    assert enc.info.pretrained_sha256 == file_sha256(path)
    for bad, says in ((tmp_path, "is a folder; pass --out a file path"), (path / "w.safetensors", "is a file, not")):
        with pytest.raises(UserError, match=says):  # before the training it would lose (a traceback after it before)
            pretrain_tiny(bad, steps=10**6, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.safetensors.sha256"]


def test_binding_twins_swap_two_objects_and_batches_have_patch_labels():
    rng = np.random.default_rng(0)
    scene = next(s for s in (sample_frame_scene(rng) for _ in range(50)) if len(s.objects) >= 2)
    twin = binding_twin(scene, rng)
    assert twin is not None and sorted(map(str, twin.objects)) != sorted(map(str, scene.objects))
    frames, captions, colour, shape = make_batch(np.random.default_rng(1), 16, 64, 8, twin_rate=1.0)
    assert frames.shape == (16, 64, 64, 3) and len(captions) == 16 and colour.shape == shape.shape == (16, 64)


def test_checksum_mismatch_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / f"{DEFAULT_MODEL}.safetensors").write_bytes(b"not the shipped weights")
    (tmp_path / f"{DEFAULT_MODEL}.safetensors.sha256").write_text("0" * 64 + "\n")
    monkeypatch.setattr(encoder_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(UserError, match="SHA-256 does not match") as err:
        FrozenEncoder(device=torch.device("cpu"))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
