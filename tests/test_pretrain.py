"""Pretraining the tiny CLIP: shipped weights load as an open_clip checkpoint, match their checksum, are the default;
a run killed or stopped with Ctrl-C resumes to the same bits."""

from __future__ import annotations

import fcntl
import shlex

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import pipeline.encoder as encoder_module
from pipeline.encoder import DEFAULT_MODEL, WEIGHTS_DIR, FrozenEncoder, file_sha256, register_model_configs
from pipeline.errors import UserError
from pipeline.files import load_checkpoint, previous_checkpoint
from pipeline.pretrain import binding_twin, checkpoint_path, make_batch, pretrain_tiny, save_weights
from pipeline.synthetic import sample_frame_scene
from tests.conftest import interrupt_call

SHIPPED = WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors"


def _sidecar(path):
    return path.with_name(path.name + ".sha256")


def _sidecar_digest(path) -> str:
    return _sidecar(path).read_text().split()[0]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.safetensors.lock", "w.safetensors.sha256"]


def test_one_pretraining_an_out(tmp_path):
    out = tmp_path / "w.safetensors"
    with open(tmp_path / "w.safetensors.lock", "w") as held:  # what a running pretrain-tiny holds for its whole run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"w.safetensors: another pretrain-tiny is writing these weights; wait for "
                                            r"it to finish, or choose another --out"):
            pretrain_tiny(out, steps=2, batch_size=8, checkpoint_every=1, progress=False)
        assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors.lock"]  # refused before it wrote
    assert pretrain_tiny(out, steps=2, batch_size=8, checkpoint_every=1, progress=False) == out


def test_the_same_weights_always_make_the_same_file(tmp_path):
    # safetensors writes its metadata map in a random order: with two keys, two saves differed half of the time
    # (so did a run and its resumed twin)
    model = torch.nn.Linear(3, 2)
    files = {save_weights(model, tmp_path / str(i) / "w.safetensors").read_bytes() for i in range(8)}
    assert len(files) == 1


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


# A short run, as the CLI's options; kills below come at the 6th batch drawn (step 5), after the checkpoint at 4.
RUN = {"steps": 6, "batch_size": 8, "seed": 1}
RUN_ARGS = ["--steps", "6", "--batch-size", "8", "--seed", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of RUN never stopped (and never checkpointed): what a resumed run must end with, bit for bit."""
    return pretrain_tiny(tmp_path_factory.mktemp("full") / "w.safetensors", progress=False, **RUN)


@pytest.fixture
def killed(tmp_path, monkeypatch):
    """`cli.py pretrain-tiny` of RUN with a checkpoint every 2 steps, stopped by a Ctrl-C in step 5 (step 4 ran after
    the last checkpoint and is lost): (its --out, what the CLI printed)."""
    from click.testing import CliRunner

    import cli

    out = tmp_path / "new" / "w.safetensors"  # in a folder the run makes
    interrupt_call(monkeypatch, "pipeline.pretrain.make_batch", 6)
    result = CliRunner().invoke(cli.main, ["pretrain-tiny", "--out", str(out), *RUN_ARGS, "--checkpoint-every", "2"])
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    return out, result


def test_resume_after_a_kill_gives_the_same_weights(killed, uninterrupted):
    out, _ = killed
    ckpt = checkpoint_path(out)
    assert load_checkpoint(ckpt, "")["step"] == 4 and load_checkpoint(previous_checkpoint(ckpt), "")["step"] == 2
    assert not out.exists()
    pretrain_tiny(out, progress=False, resume=True, **RUN)
    for mine, theirs in ((out, uninterrupted), (_sidecar(out), _sidecar(uninterrupted))):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    kept = ["w.safetensors", "w.safetensors.lock", "w.safetensors.sha256"]
    assert sorted(p.name for p in out.parent.iterdir()) == kept  # checkpoints gone


def test_ctrl_c_says_where_the_checkpoint_is_and_the_command_that_continues_it(killed, uninterrupted):
    from click.testing import CliRunner

    import cli

    out, result = killed
    again = f"pretrain-tiny --out {out} --steps 6 --batch-size 8 --seed 1 --resume"
    assert result.output.endswith(  # after the progress bar's last line
        f"\ninterrupted: the last checkpoint is {checkpoint_path(out)}; continue with {again}\n")
    resumed = CliRunner().invoke(cli.main, shlex.split(again))  # as the line says
    assert resumed.exit_code == 0 and f"wrote {out}\n" in resumed.output, resumed.output
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    interrupt_call(monkeypatch, "pipeline.pretrain.pretrain_tiny", 1)
    result = CliRunner().invoke(cli.main, ["pretrain-tiny", "--out", str(tmp_path / "w.safetensors")])
    assert result.exit_code == 130
    assert result.output == ("\ninterrupted: no checkpoint yet (the first comes after 100 steps); run the same "
                             "command to start again\n")


def test_a_resume_with_other_options_or_a_start_over_a_checkpoint_is_refused_in_one_line(killed, tmp_path):
    out, _ = killed
    ckpt = checkpoint_path(out)
    before = ckpt.read_bytes()
    refusals = [
        ({}, f"{ckpt}: an unfinished pretraining's checkpoint is there; pass --resume to continue it, or delete it"),
        *((dict(resume=True, **{key: value}), f"{ckpt}: started with {flag} {RUN[key]}, resumed with {flag} {value}; "
           "resume with the options it started with, or delete it to start again")
          for key, flag, value in (("steps", "--steps", 7), ("batch_size", "--batch-size", 16), ("seed", "--seed", 2))),
    ]
    for change, line in refusals:
        with pytest.raises(UserError) as err:
            pretrain_tiny(out, progress=False, **{**RUN, **change})
        assert str(err.value) == line
    assert ckpt.read_bytes() == before and not out.exists()  # refused before any work
    other = tmp_path / "other.safetensors"
    with pytest.raises(UserError) as err:
        pretrain_tiny(other, progress=False, resume=True, **RUN)
    assert str(err.value) == (f"{checkpoint_path(other)}: no checkpoint to resume (none written yet, or the run "
                              "finished); run without --resume")


def test_cli_default_out_is_the_shipped_weights_from_any_folder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    seen = {}
    monkeypatch.setattr("pipeline.pretrain.pretrain_tiny", lambda out, **kw: seen.setdefault("out", out))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli.main, ["pretrain-tiny"]).exit_code == 0
    assert seen["out"] == SHIPPED and SHIPPED.is_absolute()
