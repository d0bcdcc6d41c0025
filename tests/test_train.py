"""Stage two: training from the cache only, checkpoints, resume, refusals."""

from __future__ import annotations

import fcntl
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.cache import FeatureCache
from pipeline.errors import UserError
from reranker.data import SplitFeatures
from reranker.train import TrainConfig, load_checkpoint, load_model, save_checkpoint, train
from tests.conftest import ROOT, interrupt_call, make_feature_cache, subprocess_env


def _cfg(cache, run, **kw) -> TrainConfig:
    base = dict(cache=str(cache), run=str(run), epochs=1, batch_size=8, hard_negatives=1, dim=32, heads=2,
                n_queries=2, checkpoint_every=3, warmup_steps=2, top_k=5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def cache(tmp_path):
    return make_feature_cache(tmp_path / "c.zarr", {"train": 16, "val": 6, "test": 6})


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _interrupt_step(monkeypatch, n: int) -> None:
    """Training's n-th step raises KeyboardInterrupt (a kill or a Ctrl-C) instead of running."""
    interrupt_call(monkeypatch, "reranker.train._forward", n)


def _validation_gives(monkeypatch, scores: list[float]) -> None:
    """Each validation of training (one an epoch) returns the next of these two-stage t2v R@1 scores."""
    import reranker.evaluate

    left = iter(scores)
    r1 = lambda *a, **k: {"two_stage": {"t2v": {"R@1": next(left)}}, "rerank_logit_spread": 1.0}  # noqa: E731
    monkeypatch.setattr(reranker.evaluate, "evaluate_split", r1)


def _grad_norm(params) -> float:
    """The L2 norm of all these parameters' gradients together."""
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


@pytest.fixture
def optimizer_steps():
    """What every optimizer step sees just before it steps: each group's learning rate and the global gradient
    norm."""
    steps = []

    def record(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        steps.append({"lrs": [g["lr"] for g in opt.param_groups], "grad_norm": _grad_norm(params)})

    handle = register_optimizer_step_pre_hook(record)
    yield steps
    handle.remove()


def test_training_reads_only_the_cache_and_the_loss_decreases(cache, tmp_path, monkeypatch):
    import pipeline.decode
    import pipeline.encoder

    def forbidden(*a, **k):
        raise AssertionError("training must not decode videos or run the encoder")

    monkeypatch.setattr(pipeline.decode, "decode_video", forbidden)
    monkeypatch.setattr(pipeline.encoder.FrozenEncoder, "__init__", forbidden)
    run = train(_cfg(cache, tmp_path / "run", epochs=12, checkpoint_every=8), progress=False)
    steps = [r for r in _log(run) if "loss" in r]
    assert len(steps) == 12 * 8  # batch 8 = 2 anchors (+ 1 hard and 1 neighbour negative each); 16 train videos = 8 steps
    first, last = np.mean([s["loss"] for s in steps[:4]]), np.mean([s["loss"] for s in steps[-4:]])
    assert last < first - 0.1, (first, last)
    assert all(k in steps[0] for k in ("contrastive", "matching", "lr", "logit_spread", "samples_per_s"))
    val = [r for r in _log(run) if "val_two_stage_t2v" in r]
    assert len(val) == 12 and set(val[0]["val_two_stage_t2v"]) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
    assert all(r["val_rerank_logit_spread"] > 0 for r in val)  # the collapse signal, within the top-K
    for name in ("config.json", "last.pt", "best.pt"):
        assert (run / name).is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["hard_negatives"] == 1 and config["neighbour_negatives"] == 1


@pytest.mark.parametrize("started_before_batch_negatives", [False, True])
def test_resume_after_a_kill_gives_the_same_weights(cache, tmp_path, monkeypatch, started_before_batch_negatives):
    kw = {"batch_negatives": 0} if started_before_batch_negatives else {}
    full = train(_cfg(cache, tmp_path / "full", **kw), progress=False)
    import reranker.train as T

    original = T._forward
    _interrupt_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(cache, tmp_path / "killed", **kw), progress=False)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 3  # the last checkpoint before the kill
    monkeypatch.setattr(T, "_forward", original)
    if started_before_batch_negatives:  # its config.json predates the option: it must resume without them
        path = tmp_path / "killed" / "config.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "batch_negatives"}))
    with open(tmp_path / "killed" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line the kill cut short
    train(TrainConfig(run=str(tmp_path / "killed")), resume=True, progress=False)
    # the log reads as the uninterrupted run's: step 4 ran twice but is logged once, the cut line is gone
    assert [r["step"] for r in _log(tmp_path / "killed")] == [r["step"] for r in _log(full)]
    a = load_checkpoint(full / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_one_seed_gives_the_same_weights_on_two_threads(tmp_path, monkeypatch):
    # Big enough that the backward of a step's indexing (each video once per caption that meets it) runs on both
    # threads: without deterministic algorithms, each of five tries of these four runs had runs apart.
    cache = make_feature_cache(tmp_path / "c.zarr", {"train": 48, "val": 6}, frames=8, patches=16, width=64)
    import reranker.train as T

    original, enabled = T._forward, []

    def spy(*args, **kwargs):
        enabled.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "_forward", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [train(_cfg(cache, tmp_path / f"run{i}", batch_size=16, dim=64), progress=False) for i in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert enabled and all(enabled) and not torch.are_deterministic_algorithms_enabled()  # the caller's setting back
    first = load_checkpoint(runs[0] / "last.pt")["model"]
    for run in runs[1:]:
        weights = load_checkpoint(run / "last.pt")["model"]
        for k in first:
            torch.testing.assert_close(weights[k], first[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("damage", [lambda b: b[:20], lambda b: b""], ids=["truncated", "empty"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, caplog, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    path.write_bytes(damage(path.read_bytes()))  # an empty one was an IndexError traceback
    assert load_checkpoint(path)["step"] == 1
    assert "damaged" in caplog.text
    # moved aside: the next save keeps the good step 1 as last.prev.pt, not the damaged file (a kill right after
    # that save left a run that could neither resume nor start again)
    assert not path.exists() and (tmp_path / "last.damaged.pt").exists()
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(tmp_path / "last.prev.pt")["step"] == 1


def test_an_unloadable_checkpoint_says_what_to_do_in_one_sentence(tmp_path):
    for name, fix in (("last.pt", "; train again into a new --run"),
                      ("best.pt", "; --checkpoint last (evaluate, search) reads last.pt, or train again into a new --run")):
        (tmp_path / name).write_bytes(b"not a checkpoint")  # and no .prev.pt to fall back to
        with pytest.raises(UserError) as e:
            load_checkpoint(tmp_path / name)
        assert str(e.value).endswith(fix), str(e.value)  # was "...; or train again" for last.pt


def test_a_torn_config_or_a_resume_before_the_first_checkpoint_is_one_line(cache, tmp_path):
    run = train(_cfg(cache, tmp_path / "run"), progress=False)
    (run / "config.json").write_text('{"cache": ')
    for call in (lambda: load_model(run), lambda: train(TrainConfig(run=str(run)), resume=True, progress=False)):
        with pytest.raises(UserError, match=r"config.json: damaged \(.*\); restore it, or train again into a new"):
            call()
    fresh = tmp_path / "fresh"  # killed before its first checkpoint: a config.json and no last.pt
    fresh.mkdir()
    (fresh / "config.json").write_text("{}")
    with pytest.raises(UserError, match="nothing to resume yet .*; run the same command without --resume"):
        train(TrainConfig(run=str(fresh)), resume=True, progress=False)


def test_checkpoint_with_pickled_payload_is_refused(tmp_path, caplog):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"model": Payload()}, tmp_path / "last.pt")
    with pytest.raises(UserError, match="no loadable checkpoint"):
        load_checkpoint(tmp_path / "last.pt")
    assert not (tmp_path / "PWNED").exists()
    # torch's reason is a long line ("Weights only load failed. This file can still be loaded, ..."): cut visibly
    # (messages as logged: caplog.text drops the terminal codes torch puts in that line)
    reason = re.search(r"last.pt is damaged or unsafe \((.*)\); refused", "\n".join(caplog.messages))[1]
    assert reason.startswith("Weights only load failed") and len(reason) == 120 and reason.endswith("..."), reason


def test_checkpoint_of_another_model_version_is_refused_in_one_line(cache, tmp_path):
    run = train(_cfg(cache, tmp_path / "run", epochs=1), progress=False)
    state = load_checkpoint(run / "last.pt")
    weights = dict(state["model"])
    weights.pop("reranker.head.1.weight")  # as if the run came from a version whose model had other parts
    save_checkpoint(run / "best.pt", {**state, "model": weights})
    with pytest.raises(UserError, match=r"best.pt: made by another version .*reranker.head.1.weight.*train again"):
        load_model(run)
    save_checkpoint(run / "last.pt", {**state, "model_config": {**state["model_config"], "knob": 1}})
    with pytest.raises(UserError, match=r"last.pt: made by another version .*knob"):
        load_model(run, "last")
    long = "knob_" + "x" * 200  # a long reason is cut visibly, as first_line cuts: it was cut silently at 160
    save_checkpoint(run / "last.pt", {**state, "model_config": {**state["model_config"], long: 1}})
    with pytest.raises(UserError) as e:
        load_model(run, "last")
    assert re.search(r"model \((.*)\); train again", str(e.value))[1].endswith("x...") and "x" * 200 not in str(e.value)
    save_checkpoint(run / "last.pt", {**state, "model": weights})
    # it said "retrain with train-reranker (without --resume)", which this --run refuses: "a run is already there"
    with pytest.raises(UserError, match=r"last.pt: made by another version .*; train again into a new --run or use"):
        train(_cfg(cache, run, epochs=2), resume=True, progress=False)


def test_refusals(tmp_path):
    partial = make_feature_cache(tmp_path / "p.zarr", {"train": 6}, finish=False)
    with pytest.raises(UserError, match="extraction unfinished.*--allow-partial"):
        train(_cfg(partial, tmp_path / "r1"), progress=False)
    no_train = make_feature_cache(tmp_path / "t.zarr", {"test": 6})
    with pytest.raises(UserError, match="split 'train' has no videos"):
        train(_cfg(no_train, tmp_path / "r2"), progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(run=str(tmp_path / "absent")), resume=True, progress=False)
    with pytest.raises(UserError, match="not a training run"):
        load_model(tmp_path)
    done = make_feature_cache(tmp_path / "d.zarr", {"train": 6})
    for hard, neighbour in ((0, 0), (1, -1), (3, 3)):  # none at all, a negative count, not fewer than 6 videos
        with pytest.raises(UserError, match=r"--hard-negatives .* --neighbour-negatives .* need 1 <= the sum < 6"):
            train(_cfg(done, tmp_path / "r3", hard_negatives=hard, neighbour_negatives=neighbour), progress=False)
    assert not (tmp_path / "r3" / "last.pt").exists()


def test_without_a_val_split_best_is_the_latest_epoch(cache, tmp_path, monkeypatch, caplog):
    import reranker.train as T

    saved, original = [], T.save_checkpoint

    def recording(path, state):
        saved.append((path.name, state["step"]))
        original(path, state)

    monkeypatch.setattr(T, "save_checkpoint", recording)
    run = train(_cfg(cache, tmp_path / "run", val_split="", epochs=3), progress=False)
    assert [r["val_two_stage_t2v"] for r in _log(run) if "val_two_stage_t2v" in r] == [None] * 3
    assert [step for name, step in saved if name == "best.pt"] == [8, 16, 24]  # every epoch's end: a kill keeps one
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert "optimizer" in last and "optimizer" not in best  # best.pt is evaluated, never resumed
    assert "no validation (validation off): best.pt is the latest epoch's weights" in caplog.text


def test_best_is_the_epoch_whose_validation_averaged_with_the_one_before_is_highest(cache, tmp_path, monkeypatch):
    # epoch 1 alone is the highest; averaged with the epoch before: 10, 30, 35, 30, 42.5
    _validation_gives(monkeypatch, [10.0, 50.0, 20.0, 40.0, 45.0])
    run = train(_cfg(cache, tmp_path / "run", epochs=5), progress=False)
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == 5 * 8 and best["best"] == 42.5


def test_the_learning_rate_warms_up_then_follows_a_half_cosine(cache, tmp_path, optimizer_steps):
    cfg = _cfg(cache, tmp_path / "run", epochs=2, warmup_steps=4, val_split="")
    run = train(cfg, progress=False)
    total, warmup = 2 * 8, 4  # 16 train videos, 2 anchors a step: 8 steps an epoch

    def factor(i: int) -> float:  # step i (from 0): up to the full rate in `warmup` steps, then half a cosine to 0
        return (i + 1) / warmup if i < warmup else (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) / 2

    expected = np.array([factor(i) for i in range(total)])  # 0.25, 0.5, 0.75, 1, 1, 0.98, ..., 0.017
    np.testing.assert_allclose([r["lr"] for r in _log(run) if "loss" in r], cfg.lr * expected, rtol=1e-12)
    np.testing.assert_allclose([s["lrs"] for s in optimizer_steps], np.outer(expected, [cfg.first_stage_lr, cfg.lr]),
                               rtol=1e-12)  # both parameter groups, each from its own base rate


def test_gradients_are_clipped_before_each_step(cache, tmp_path, monkeypatch, optimizer_steps):
    clip, unclipped, original = 1e-3, [], torch.nn.utils.clip_grad_norm_

    def measured(parameters, *args, **kwargs):
        parameters = list(parameters)
        unclipped.append(_grad_norm(parameters))
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", measured)
    train(_cfg(cache, tmp_path / "run", grad_clip=clip, val_split=""), progress=False)
    norms = [s["grad_norm"] for s in optimizer_steps]
    assert len(norms) == 8 and max(norms) <= clip * (1 + 1e-5), norms
    assert max(unclipped) > clip  # there was something to clip


@pytest.mark.parametrize("scores, best_step, best", [
    ([50.0, 50.0, 10.0], 8, 50.0),  # averaged 50, 50, 30: epoch 1 stays best; forgetting its 50 takes epoch 3
    ([10.0, 60.0, 20.0], 24, 40.0),  # averaged 10, 35, 40: epoch 3 wins only averaged with epoch 2's 60
], ids=["best_kept", "last_score_kept"])
def test_resume_keeps_what_chooses_the_best_checkpoint(cache, tmp_path, monkeypatch, scores, best_step, best):
    import reranker.train as T

    kw = dict(epochs=3, checkpoint_every=8)  # 8 steps an epoch: last.pt at each epoch's end
    _validation_gives(monkeypatch, scores)
    full = train(_cfg(cache, tmp_path / "full", **kw), progress=False)
    original = T._forward
    _validation_gives(monkeypatch, scores)  # one sequence for the killed run and its resume
    _interrupt_step(monkeypatch, 17)  # epoch 3's first step
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(cache, tmp_path / "killed", **kw), progress=False)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 16
    monkeypatch.setattr(T, "_forward", original)
    train(TrainConfig(run=str(tmp_path / "killed")), resume=True, progress=False)
    for run in (full, tmp_path / "killed"):
        state = load_checkpoint(run / "best.pt")
        assert (state["step"], state["best"]) == (best_step, best), run.name


def test_each_epoch_is_a_seeded_shuffle_of_the_videos_with_captions(cache):
    import dataclasses

    from pipeline.cache import PENDING
    from reranker.train import _epoch_plan

    FeatureCache(cache, mode="r+").group["text_chunk_status"][0] = PENDING  # captions of train0..train7 pending
    feats = SplitFeatures.open(FeatureCache(cache), "train", allow_partial=True)
    cfg = _cfg(cache, "unused")  # 2 anchors a step

    def anchors(seed: int, epoch: int) -> np.ndarray:
        plan = _epoch_plan(feats, dataclasses.replace(cfg, seed=seed), epoch)
        videos, captions = (np.concatenate(part) for part in zip(*plan))
        assert np.array_equal(feats.text_video[captions], videos)  # each anchor's caption is one of its video's
        return videos

    order = anchors(0, 0)
    assert sorted(order.tolist()) == list(range(8, 16))  # every video with captions, once
    assert not np.array_equal(order, np.sort(order))
    assert np.array_equal(anchors(0, 0), order)  # one (seed, epoch), one order: a resumed run replays it
    assert not np.array_equal(anchors(0, 1), order) and not np.array_equal(anchors(1, 0), order)


def test_training_on_the_test_split_warns(cache, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        train(_cfg(cache, tmp_path / "run", split="test", val_split="", batch_size=6), progress=False)
    assert "training on the 'test' split: retrieval metrics on it afterwards measure memorisation" in caplog.text


def test_allow_partial_trains_on_the_videos_whose_captions_are_done(cache, tmp_path, caplog):
    from pipeline.cache import PENDING, FeatureCache

    FeatureCache(cache, mode="r+").group["text_chunk_status"][0] = PENDING  # captions of train0..train7 pending
    with pytest.raises(UserError, match="extraction unfinished.*captions pending.*--allow-partial"):
        train(_cfg(cache, tmp_path / "refused"), progress=False)
    assert SplitFeatures.open(FeatureCache(cache), "test").n_texts == 12  # other splits are whole: not refused
    run = train(_cfg(cache, tmp_path / "partial", allow_partial=True, epochs=3), progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 3 * 4  # the 8 videos with captions, 2 anchors a step
    # an extract stopped during the train split leaves val with nothing done: training goes on without validation
    writable = FeatureCache(cache, mode="r+")
    writable.mark_pending([{"video": "", "index": i} for i in range(16, 22)])  # the 6 val videos
    run = train(_cfg(cache, tmp_path / "no_val", allow_partial=True), progress=False)
    assert [r["val_two_stage_t2v"] for r in _log(run) if "val_two_stage_t2v" in r] == [None]
    assert "no validation" in caplog.text and "split 'val' has no extracted videos" in caplog.text


def test_torchrun_processes_need_two_anchors_each(cache, tmp_path, monkeypatch):
    import reranker.train as T

    monkeypatch.setattr(T, "_distributed", lambda device: (0, 2))
    with pytest.raises(UserError, match=r"--batch-size 8 starts a step from 2 captions \(2 negatives each\), fewer than 2 "
                                        r"for each of the 2 torchrun processes; pass --batch-size 12 or more"):
        train(_cfg(cache, tmp_path / "run"), progress=False)
    # 16 videos cannot give 4 processes 2 anchors with 2 negatives each (24 videos): a bigger batch cannot help
    monkeypatch.setattr(T, "_distributed", lambda device: (0, 4))
    with pytest.raises(UserError, match=r"--batch-size 100 \(capped at the split's 16 videos\) .*; 'train' has 16 "
                                        r"videos with captions, too few for that: "
                                        r"use fewer processes or negatives"):
        train(_cfg(cache, tmp_path / "run", batch_size=100), progress=False)


def test_resume_refuses_a_cache_that_changed_under_the_run(cache, tmp_path):
    run = train(_cfg(cache, tmp_path / "run"), progress=False)
    writable = FeatureCache(cache, mode="r+")
    writable.write_failure(0, "replaced by a broken file")  # the split loses a video: another plan of steps
    with pytest.raises(UserError, match=r"started on 16 videos / 32 captions of 'train', .* now holds 15 / 30 .*"
                                        r"a resumed run must see the same ones: start a new --run"):
        train(TrainConfig(run=str(run)), resume=True, progress=False)
    shutil.rmtree(cache)
    make_feature_cache(cache, {"train": 16, "val": 6, "test": 6}, frames=6)  # rebuilt with other settings
    with pytest.raises(UserError, match=r"trained on a cache with frames=4, but .* has 6; a resumed run trains on the "
                                        r"features it started on: start a new --run"):
        train(TrainConfig(run=str(run)), resume=True, progress=False)


def test_cli_refusals_are_one_line(cache, tmp_path):
    from click.testing import CliRunner

    import cli

    run = tmp_path / "run"
    bad = CliRunner().invoke(cli.main, ["train-reranker", "--cache", str(cache), "--run", str(run), "--checkpoint-every", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--checkpoint-every'" in bad.output and not run.exists()
    train(_cfg(cache, run), progress=False)
    changed = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume", "--epochs", "3", "--lr", "1"])
    assert changed.exit_code == 2
    assert "--resume continues the run with the options it started with (its config.json); drop --epochs, --lr" in changed.output
    same = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume", "--cache", str(cache)])
    assert same.exit_code == 0, same.output  # as `make demo` resumes: the run's own cache may be named
    other = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume", "--cache", str(tmp_path)])
    assert other.exit_code == 2 and f"the run trains on {cache}, not {tmp_path}; drop --cache" in other.output
    (run / "best.pt").unlink()
    (run / "best.prev.pt").unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"best.pt: no checkpoint yet .*train-reranker --resume"):
        load_model(run)


def test_a_new_run_never_overwrites_files_no_run_wrote(cache, tmp_path):
    theirs = tmp_path / "experiment"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model": "bert-base", "lr": 3e-5}')  # another program's: it was overwritten
    with pytest.raises(UserError, match=r"experiment: holds a config.json or log.jsonl that is not a train-reranker "
                                        r"run's, which a new run would overwrite; pass --run a new or empty folder"):
        train(_cfg(cache, theirs), progress=False)
    assert (theirs / "config.json").read_text() == '{"model": "bert-base", "lr": 3e-5}'
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json"]
    run = train(_cfg(cache, tmp_path / "run"), progress=False)
    for name in ("last.pt", "last.prev.pt", "best.pt", "best.prev.pt"):  # killed before its first checkpoint
        (run / name).unlink(missing_ok=True)
    assert train(_cfg(cache, run), progress=False) == run  # its own config.json: started again
    assert (run / "last.pt").is_file()


def test_one_trainer_a_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:  # what a running train-reranker holds for its whole run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"run: another train-reranker is training in this run folder; wait for it "
                                            r"to finish, or pass another --run"):
            train(_cfg(cache, run), progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # refused before it wrote
    first = train(_cfg(cache, run), progress=False)
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another train-reranker is training in this run folder"):
            train(TrainConfig(run=str(run)), resume=True, progress=False)
    assert first == run and (run / "last.pt").is_file()


def test_a_run_inside_its_cache_is_refused_before_it_writes(cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in cache.iterdir())
    for run in ("c.zarr", "c.zarr/run"):  # the cache given as --run too: training wrote its run into the cache
        result = CliRunner().invoke(cli.main, ["train-reranker", "--cache", "c.zarr", "--run", run, "--epochs", "1"])
        assert result.exit_code == 2 and result.output == (f"error: {run}: lies inside the cache c.zarr, and `extract "
                                                           "--overwrite` would delete it with the cache; pass --run a "
                                                           "path outside it\n"), result.output
    assert sorted(p.name for p in cache.iterdir()) == before


def test_a_run_recorded_with_a_relative_cache_resumes_from_another_folder(cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.chdir(cache.parent)  # as `make demo` trains: the cache named relative to the folder it runs in
    run = tmp_path / "run"
    train(_cfg(cache.name, run), progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lost = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume"])
    assert lost.exit_code == 2 and lost.output == (f"error: {cache.name}: the cache {run} was trained on, relative to "
                                                   "the folder training ran in, is not here; run from that folder or "
                                                   "pass --cache\n"), lost.output
    named = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume", "--cache", str(cache)])
    assert named.exit_code == 0, named.output  # before: "the run trains on <relative>, not <cache>; drop --cache"
    assert json.loads((run / "config.json").read_text())["cache"] == cache.name


def test_reranker_size_options_reach_the_run_and_bad_ones_are_one_line(cache, tmp_path):
    from click.testing import CliRunner

    import cli

    base = ["train-reranker", "--cache", str(cache), "--epochs", "1", "--batch-size", "8", "--checkpoint-every", "4"]
    run = tmp_path / "sized"
    result = CliRunner().invoke(cli.main, base + ["--run", str(run), "--spatial", "attention", "--dim", "48",
                                                  "--heads", "3", "--queries", "5", "--layers", "2",
                                                  "--score-weight", "0.2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert (saved["dim"], saved["heads"], saved["n_queries"], saved["layers"]) == (48, 3, 5, 2)
    assert saved["score_weight"] == load_model(run)[0].config.score_weight == 0.2  # evaluate's default for the run
    model = load_model(run)[0].reranker
    assert model.queries.shape == (5, 48) and len(model.spatial_blocks) == len(model.temporal_blocks) == 2
    assert model.spatial_blocks[0].cross.heads == 3
    grid4 = make_feature_cache(tmp_path / "grid4.zarr", {"train": 16}, patches=16)  # 4 x 4 patches
    for pool, keys in ((2, 4), (1, 16)):
        run = tmp_path / f"pool{pool}"
        flags = ["--patch-pool", "1"] if pool == 1 else []  # default 2
        result = CliRunner().invoke(cli.main, ["train-reranker", "--cache", str(grid4), "--run", str(run), "--epochs", "1",
                                               "--batch-size", "8", "--spatial", "attention", "--dim", "32"] + flags)
        assert result.exit_code == 0, result.output
        model = load_model(run)[0].reranker
        assert model.config.patch_pool == pool and model.patch_pos.shape[0] == keys
    for flags, says in ((["--dim", "30", "--heads", "4"], "error: --dim 30 is not divisible by --heads 4; pick a "
                                                          "multiple of it (e.g. --dim 28)"),
                        (["--layers", "0"], "Invalid value for '--layers'"),
                        (["--queries", "0"], "Invalid value for '--queries'"),
                        (["--seed", "-1"], "Invalid value for '--seed'"),  # a traceback from numpy before
                        (["--lr", "0"], "Invalid value for '--lr'"),  # trained without learning before
                        (["--score-weight", "0"], "Invalid value for '--score-weight'"),
                        (["--hard-negatives", "-1"], "Invalid value for '--hard-negatives'")):
        bad = tmp_path / f"bad{flags[1]}"
        result = CliRunner().invoke(cli.main, base + ["--run", str(bad)] + flags)
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
        assert not bad.exists()  # refused before anything is written
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for run in (a_file, a_file / "run"):
        result = CliRunner().invoke(cli.main, base + ["--run", str(run)])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert f"error: {run}: " in result.output and "pass --run a folder path" in result.output
    assert a_file.read_text() == "mine"


def test_share_attention_without_spatial_attention_names_the_options(cache, tmp_path):
    from click.testing import CliRunner

    import cli

    for spatial in ([], ["--spatial", "cls"]):
        run = tmp_path / f"shared{len(spatial)}"
        result = CliRunner().invoke(cli.main, ["train-reranker", "--cache", str(cache), "--run", str(run),
                                               "--share-attention", *spatial])
        assert result.exit_code == 2 and not run.exists()
        assert result.output == ("error: --share-attention needs --spatial attention (there is nothing to share "
                                 f"with --spatial {spatial[1] if spatial else 'flat'})\n")


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    run = tmp_path / "run"
    _interrupt_step(monkeypatch, 5)
    result = CliRunner().invoke(cli.main, ["train-reranker", "--cache", str(cache), "--run", str(run), "--epochs", "1",
                                           "--batch-size", "8", "--dim", "32", "--heads", "2",
                                           "--checkpoint-every", "3"])
    assert result.exit_code == 130
    assert result.output.endswith(  # after the progress bar's last line
        f"\ninterrupted: the last checkpoint is in {run}; continue with train-reranker --run {run} --resume\n")
    resumed = CliRunner().invoke(cli.main, ["train-reranker", "--run", str(run), "--resume"])  # as the line says
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(run / "last.pt")["step"] == _log(run)[-1]["step"] > 5


def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    def interrupted(cfg, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr("reranker.train.train", interrupted)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli.main, ["train-reranker", "--cache", str(tmp_path / "c.zarr"), "--run", str(run)])
    assert result.exit_code == 130
    assert result.output == f"\ninterrupted: no checkpoint in {run} yet; run the same command to start again\n"


def test_gradient_averaging_puts_each_mean_back_in_its_own_gradient(tmp_path):
    import torch.distributed as dist

    from reranker.train import _average_gradients, _average_scalars

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 5))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[1].bias.grad = None  # a parameter without a gradient is left out and stays without one
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    # a one-process group: the all-reduce sums one copy, so each gradient must come back weighted by the rank's share
    # of the step's anchors (3 of 5 here: the ranks' shares sum to one, so the sum is the mean over all anchors)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _average_gradients(model, share=3 / 5)
        logged = _average_scalars({"loss": 2.5, "logit_spread": 0.5}, 3 / 5, torch.device("cpu"))  # likewise
    finally:
        dist.destroy_process_group()
    for p, g in zip(model.parameters(), before, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g * (3 / 5))
    assert logged == pytest.approx({"loss": 1.5, "logit_spread": 0.3}, rel=1e-12)


def test_resume_refuses_another_process_count(cache, tmp_path, monkeypatch):
    import reranker.train as T

    run = train(_cfg(cache, tmp_path / "run", batch_size=12), progress=False)  # one process
    monkeypatch.setattr(T, "_distributed", lambda device: (0, 2))  # resumed as one of two torchrun processes
    with pytest.raises(UserError, match=r"started with 1 process\(es\), resumed with 2; .*resume it in one process"):
        train(TrainConfig(run=str(run)), resume=True, progress=False)


def test_two_process_gloo_run_takes_the_expected_steps(cache, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "--",
           str(ROOT / "cli.py"), "train-reranker", "--cache", str(cache), "--run", str(run), "--epochs", "3",
           "--batch-size", "12", "--checkpoint-every", "4"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in _log(run) if "loss" in r]
    assert [s["step"] for s in steps] == list(range(1, 3 * 4 + 1))  # 16 videos / 4 anchors = 4 steps an epoch
    assert all(s["contrastive"] > 0 for s in steps)  # rank 0's 2 anchors: a real InfoNCE, not one caption alone
    assert load_checkpoint(run / "last.pt")["step"] == 12


def test_mining_takes_the_nearest_video_and_then_the_captions_top_candidate(tmp_path):
    """Group = anchor, the video nearest to it in the first stage, then the caption's best other candidate."""
    from reranker.data import SplitFeatures, to_device
    from reranker.model import CrossTVR
    from reranker.train import _mine_groups, model_config_for, video_bank

    cfg = TrainConfig(hard_negatives=1, neighbour_negatives=1)
    cache = FeatureCache(make_feature_cache(tmp_path / "c.zarr", {"train": 8}))
    feats = SplitFeatures.open(cache, "train")
    model = CrossTVR(model_config_for(cache, cfg)).eval()
    device = torch.device("cpu")
    bank = video_bank(model, feats, device)
    vids = np.array([0, 5])
    caps = np.array([feats.captions_of[0][1], feats.captions_of[5][0]])
    groups, group_caps = _mine_groups(model, feats, bank, caps, vids, cfg, device, np.random.default_rng(0))

    text = model.first_stage.encode_text(to_device(feats.read_texts(caps), device)["text_embeds"])
    for row, (v, c) in enumerate(zip(vids, caps)):
        near = (bank @ bank[v]).numpy()
        near[v] = -np.inf
        neighbour = int(near.argmax())
        sims = (bank @ text[row]).detach().numpy()
        sims[[v, neighbour]] = -np.inf
        assert groups[row].tolist() == [v, neighbour, int(sims.argmax())]
        assert group_caps[row, 0] == c
        assert [feats.text_video[t] for t in group_caps[row]] == groups[row].tolist()  # each video's own caption


@pytest.mark.parametrize("spatial, frame_arrays", [("flat", {"patch_tokens"}), ("cls", {"cls_tokens"}),
                                                   ("attention", {"patch_tokens", "cls_tokens"})])
def test_a_step_reads_only_what_it_uses(cache, spatial, frame_arrays, monkeypatch):
    """The reranker's inputs for every video and caption of the groups; first-stage embeddings for the anchors only."""
    import zarr

    import reranker.data as data
    from reranker.data import SplitFeatures
    from reranker.model import CrossTVR
    from reranker.train import _forward, _read_step, model_config_for

    store = FeatureCache(cache)
    feats = SplitFeatures.open(store, "train")
    model = CrossTVR(model_config_for(store, _cfg(cache, "unused", spatial=spatial)))
    reads, original = [], data._read
    monkeypatch.setattr(data, "_read", lambda arr, index: (reads.append((arr.basename, len(index))), original(arr, index))[1])
    videos = np.array([[0, 3, 7], [5, 1, 2]])  # 2 anchors (column 0), 2 negatives each
    captions = np.array([[feats.captions_of[v][-1] for v in row] for row in videos])
    batch = _read_step(feats, videos, captions, model.reranker.video_inputs)
    assert set(batch["videos"]) == frame_arrays | {"frame_mask"} and set(batch["texts"]) == {"text_tokens", "text_lengths"}

    # frame masks and caption lengths come from memory (SplitFeatures holds them), not a chunk read per row
    assert sorted(reads) == sorted([(a, 6) for a in frame_arrays | {"text_tokens"}]
                                   + [("frame_embeds", 2), ("text_embeds", 2)])
    monkeypatch.setattr(data, "_read", original)
    everything_v, everything_t = feats.read_videos(videos.reshape(-1)), feats.read_texts(captions.reshape(-1))
    stored = zarr.open_group(cache, mode="r")  # independent of SplitFeatures: the arrays as extract wrote them
    rows_v, rows_t = feats.videos[videos.reshape(-1)], feats.texts[captions.reshape(-1)]
    assert np.array_equal(batch["videos"]["frame_mask"].numpy(), stored["frame_mask"][:][rows_v])
    assert np.array_equal(batch["texts"]["text_lengths"].numpy(), stored["text_lengths"][:][rows_t])
    for name, value in batch["videos"].items():
        assert torch.equal(value, everything_v[name])
    for name, value in batch["texts"].items():
        assert torch.equal(value, everything_t[name])
    assert torch.equal(batch["anchor_frame_embeds"], everything_v["frame_embeds"][[0, 3]])
    assert torch.equal(batch["anchor_text_embeds"], everything_t["text_embeds"][[0, 3]])
    loss, stats = _forward(model, batch, torch.device("cpu"), TrainConfig.batch_negatives)
    assert loss.isfinite() and stats["logit_spread"] >= 0


def test_patch_pool_keeps_at_least_a_2x2_grid(tmp_path):
    from reranker.train import model_config_for

    def pool(patches):
        path = make_feature_cache(tmp_path / f"p{patches}.zarr", {"train": 2}, patches=patches)
        return model_config_for(FeatureCache(path), _cfg(path, "unused")).patch_pool

    # 2 x 2 pooled to 1 x 1 would leave nothing after centring; 3 x 3 is not divisible; 4 x 4 -> 2 x 2
    assert (pool(4), pool(9), pool(16)) == (1, 1, 2)


def test_a_patch_pool_that_cannot_apply_is_warned_about(tmp_path, caplog):
    grid3 = make_feature_cache(tmp_path / "g3.zarr", {"train": 8}, patches=9)
    train(_cfg(grid3, tmp_path / "run", val_split="", spatial="attention"), progress=False)
    assert "--patch-pool 2 does not divide the 3 x 3 patch grid (or leaves 1 x 1): the reranker reads all 9" in caplog.text


@pytest.mark.parametrize("A, G, n", [(5, 3, 2), (4, 2, 3), (3, 3, 5), (2, 4, 0)])
def test_a_step_pairs_each_caption_with_its_group_and_with_videos_of_other_groups(A, G, n):
    from reranker.train import _pairs

    text_rows, video_rows = _pairs(A, G, n)
    pairs = list(zip(text_rows.tolist(), video_rows.tolist()))
    assert len(pairs) == len(set(pairs))  # no pair scored twice
    # the group pairs first, caption by caption: _forward views the first A * G * G logits as [A * G, G]
    assert pairs[: A * G * G] == [(row, row // G * G + j) for row in range(A * G) for j in range(G)]
    used = min(n, A - 1)
    for row in range(A * G):
        group = row // G
        videos = [v for t, v in pairs if t == row]
        assert sorted(v for v in videos if v // G == group) == list(range(group * G, group * G + G))
        others = [v // G for v in videos if v // G != group]
        assert len(others) == used == len(set(others))  # each from another group
    assert len(pairs) == A * G * (G + used)
