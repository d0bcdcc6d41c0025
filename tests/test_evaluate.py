"""Evaluation: the JSON schema, two-stage ranking contract, saved matrices, refusals, and the CLI."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from pipeline.cache import FeatureCache
from pipeline.encoder import default_device
from pipeline.errors import UserError
from reranker import metrics as M
from reranker.data import SplitFeatures
from reranker.evaluate import EvalConfig, _rerank_pairs, evaluate_split, first_stage_sims, rerank, run_evaluate
from reranker.train import TrainConfig, load_model, train
from tests.conftest import make_feature_cache

KEYS = {"R@1", "R@5", "R@10", "MdR", "MnR"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cache = make_feature_cache(tmp / "c.zarr", {"train": 12, "test": 10}, captions=3)
    run = train(TrainConfig(cache=str(cache), run=str(tmp / "run"), epochs=2, batch_size=6, dim=32, heads=2,
                            n_queries=2, val_split=""), progress=False)
    return tmp, cache, run


def test_json_schema_and_saved_matrices_reproduce_it(trained):
    tmp, cache, run = trained
    results, where = run_evaluate(EvalConfig(cache=cache, run=run, top_k=4, out=tmp / "m.json", save_sims=tmp / "sims"))
    saved = json.loads((tmp / "m.json").read_text())
    assert saved == results
    assert set(saved) == {"split", "n_videos", "n_texts", "top_k", "top_k_v2t", "first_stage", "two_stage",
                          "rerank_logit_spread", "cache", "checkpoint", "score_weight"}
    assert saved["checkpoint"] == "best.pt" and saved["top_k_v2t"] == 4 and saved["score_weight"] == 0.05
    assert (saved["split"], saved["n_videos"], saved["n_texts"], saved["top_k"], saved["cache"]) == ("test", 10, 30, 4,
                                                                                                     str(cache))
    for stage in ("first_stage", "two_stage"):
        assert set(saved[stage]) == {"t2v", "v2t"} and set(saved[stage]["t2v"]) == KEYS
    first = np.load(tmp / "sims" / "first_stage_sims.npy")
    two = np.load(tmp / "sims" / "two_stage_sims.npy")
    two_v2t = np.load(tmp / "sims" / "two_stage_v2t_sims.npy")
    truth = np.load(tmp / "sims" / "text_to_video.npy")
    assert first.dtype == np.float32 and first.shape == two.shape == two_v2t.shape == (30, 10)
    assert truth.dtype == np.int64 and truth.tolist() == np.repeat(np.arange(10), 3).tolist()
    assert M.t2v_metrics(first, truth) == saved["first_stage"]["t2v"]
    assert M.v2t_metrics(first, truth, 10) == saved["first_stage"]["v2t"]
    assert M.t2v_metrics(two, truth) == saved["two_stage"]["t2v"]
    assert M.v2t_metrics(two_v2t, truth, 10) == saved["two_stage"]["v2t"]
    # two-stage: the top-K first-stage candidates sit above every other video, the rest keep first-stage order
    cand = M.topk_candidates(first, 4)
    for q in range(30):
        others = np.setdiff1d(np.arange(10), cand[q])
        assert two[q, cand[q]].min() > two[q, others].max()
        order_first = others[np.argsort(-first[q, others], kind="stable")]
        assert np.all(np.diff(two[q, order_first]) <= 0)
    # the collapse signal: the reranker's own logits, each caption against its top-K candidates
    device = default_device()  # evaluate's own: bf16 on CUDA rounds differently from CPU float32
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    logits = _rerank_pairs(model.to(device), feats, np.repeat(np.arange(30), 4), cand.reshape(-1), device)
    assert saved["rerank_logit_spread"] == pytest.approx(logits.reshape(30, 4).std(axis=1).mean(), rel=1e-4)
    assert saved["rerank_logit_spread"] > 0
    assert (tmp / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(where["seconds"]) == {"first_stage", "two_stage"}


def test_evaluation_shows_the_pairs_it_reranks_and_validation_does_not(trained, capsys):
    tmp, cache, run = trained
    run_evaluate(EvalConfig(cache=cache, run=run, top_k=4, out=tmp / "bars.json"))
    bars = capsys.readouterr().err
    # every caption's 4 candidates, then every video's 4: long on a real split (MSVD test: 27,763 captions)
    assert "rerank t2v: 100%" in bars and "120/120" in bars and "rerank v2t: 100%" in bars and "40/40" in bars
    evaluate_split(load_model(run)[0], SplitFeatures.open(FeatureCache(cache), "test"), 4)  # inside training's bar
    assert "rerank" not in capsys.readouterr().err


def test_validation_leaves_out_only_the_two_stage_v2t(trained):
    _, cache, run = trained
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    both = evaluate_split(model, feats, 4)
    t2v_only = evaluate_split(model, feats, 4, v2t=False)
    assert set(t2v_only["two_stage"]) == {"t2v"}
    assert t2v_only["two_stage"]["t2v"] == both["two_stage"]["t2v"]
    assert t2v_only["first_stage"] == both["first_stage"]
    assert t2v_only["rerank_logit_spread"] == both["rerank_logit_spread"]


def test_rerank_pairs_scores_every_pair_whatever_the_blocks(trained):
    _, cache, run = trained
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    rng = np.random.default_rng(0)
    text_pos, video_pos = rng.integers(0, 30, 200), rng.integers(0, 10, 200)
    cpu = torch.device("cpu")
    whole = _rerank_pairs(model, feats, text_pos, video_pos, cpu)
    blocked = _rerank_pairs(model, feats, text_pos, video_pos, cpu, videos_per_block=3, pairs_per_batch=7)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)
    r = model.reranker
    for i in range(0, 200, 25):  # each pair on its own through the reranker's forward
        t, v = feats.read_texts(text_pos[i:i + 1]), feats.read_videos(video_pos[i:i + 1])
        with torch.no_grad():
            alone = r(t["text_tokens"].float(), t["text_lengths"], v["patch_tokens"].float(), v["cls_tokens"].float(),
                      v["frame_mask"])
        assert whole[i] == pytest.approx(alone.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16_autocast_as_on_cuda"])
def test_zero_shot_equals_raw_clip_cosine(trained, monkeypatch, bf16):
    tmp, cache, _ = trained
    if bf16:  # what a CUDA device runs under: the first stage must stay float32 even there
        for module in ("reranker.train", "reranker.evaluate"):
            monkeypatch.setattr(f"{module}.autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    results, _ = run_evaluate(EvalConfig(cache=cache, zero_shot=True, out=tmp / "zs.json", save_sims=tmp / "zs"))
    assert "two_stage" not in results
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    fe = feats.read_frame_embeds(np.arange(feats.n_videos))[0].float()  # stored fp16
    frames = fe.numpy() / np.linalg.norm(fe.numpy(), axis=-1, keepdims=True)
    video = frames.mean(axis=1)
    video /= np.linalg.norm(video, axis=-1, keepdims=True)
    text = feats.all_text_embeds().float().numpy()
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.load(tmp / "zs" / "first_stage_sims.npy"), text @ video.T, atol=1e-5)


def test_top_k_beyond_the_split_reranks_all_its_videos(trained, caplog):
    tmp, cache, run = trained
    with caplog.at_level(logging.INFO, logger="reranker.evaluate"):
        results, where = run_evaluate(EvalConfig(cache=cache, run=run, top_k=15, out=tmp / "k15.json"))
    assert "--top-k 15 > 10 videos in 'test': reranking all 10" in caplog.messages
    assert results["top_k"] == json.loads((tmp / "k15.json").read_text())["top_k"] == 10  # the K actually used
    every, _ = run_evaluate(EvalConfig(cache=cache, run=run, top_k=10, out=tmp / "k10.json"))
    assert results["two_stage"]["t2v"] == every["two_stage"]["t2v"]
    # a video's candidates are captions: 30 of them, so video-to-text re-scores the 15 asked for, not 10
    assert (results["top_k_v2t"], every["top_k_v2t"]) == (15, 10)
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    device = default_device()
    first = first_stage_sims(model.to(device), feats, device)
    cand, final, _ = rerank(model, feats, first, 15, device, videos_are_queries=True)
    expected = M.v2t_metrics(M.two_stage_scores(first.T, cand, final).T, feats.text_video, 10)
    assert results["two_stage"]["v2t"] == pytest.approx(expected)


def test_one_candidate_has_no_spread(trained):
    _, cache, run = trained
    model, _ = load_model(run)
    results = evaluate_split(model, SplitFeatures.open(FeatureCache(cache), "test"), 1)
    assert results["rerank_logit_spread"] is None  # not 0.0, which would read as a collapsed reranker


def test_zero_shot_report_goes_beside_the_runs_own(trained):
    tmp, cache, run = trained
    trained_report = run_evaluate(EvalConfig(cache=cache, run=run, top_k=4))[0]
    results, where = run_evaluate(EvalConfig(cache=cache, run=run, zero_shot=True))
    assert where["json"] == str(run / "eval_test_zeroshot.json") and where["plot"] == str(run / "eval_test_zeroshot.png")
    assert json.loads((run / "eval_test.json").read_text()) == trained_report  # not replaced
    assert results["zero_shot"] is True and "top_k" not in results and "two_stage" not in results
    result = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(cache), "--zero-shot", "--out", str(tmp / "z.json")])
    assert result.exit_code == 0 and "test: 10 videos, 30 captions, zero-shot" in result.output, result.output


def test_videos_that_failed_extraction_are_counted_where_the_metrics_are(trained, tmp_path, caplog):
    import shutil

    tmp, cache, run = trained
    broken = tmp_path / "c.zarr"
    shutil.copytree(cache, broken)
    c = FeatureCache(broken)
    test_rows = np.flatnonzero(c.video_split() == "test")
    for i in test_rows[:2]:
        c.write_failure(int(i), "moov atom not found")
    with caplog.at_level(logging.WARNING, logger="reranker.data"):
        results, _ = run_evaluate(EvalConfig(cache=broken, run=run, top_k=4, out=tmp_path / "m.json"))
    assert (results["n_videos"], results["n_texts"], results["n_videos_failed"], results["n_texts_failed"]) == (8, 24, 2, 6)
    assert json.loads((tmp_path / "m.json").read_text())["n_videos_failed"] == 2
    assert any("2 video(s) of split 'test' failed extraction and are left out with their 6 caption(s)" in m
               for m in caplog.messages)
    result = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(broken), "--run", str(run), "--top-k", "4",
                                           "--out", str(tmp_path / "cli.json")])
    assert result.exit_code == 0 and "test: 8 videos (2 more failed extraction: left out), 24 captions" in result.output


def test_a_split_whose_videos_all_failed_says_so_in_every_command(trained, tmp_path):
    tmp, cache, run = trained
    broken = tmp_path / "c.zarr"
    shutil.copytree(cache, broken)
    c = FeatureCache(broken)
    for i in range(c.n_videos):
        c.write_failure(i, "moov atom not found")
    says = (f"error: {broken}: split 'test' has no extracted videos with captions: all 10 of its videos failed "
            f"extraction (`python cli.py info --cache {broken}` lists why); fix or replace those files, then run your "
            "extract command again\n")  # it said "run `extract` first", which had run
    for command in (["evaluate", "--run", str(run)], ["evaluate", "--zero-shot"],
                    ["train-reranker", "--split", "test", "--run", str(tmp_path / "r")]):
        result = CliRunner().invoke(cli.main, [*command, "--cache", str(broken)])
        assert result.exit_code == 2 and result.output == says, result.output
    result = CliRunner().invoke(cli.main, ["search", "a red circle", "--run", str(run), "--cache", str(broken)])
    assert result.exit_code == 2 and result.output == says.replace("split 'test'", "the cache").replace("10", "22")


def test_refusals(trained, tmp_path):
    tmp, cache, run = trained
    model, _ = load_model(run)
    with pytest.raises(UserError, match="--top-k 11: split 'test' has only 10"):  # the API does not clamp
        evaluate_split(model, SplitFeatures.open(FeatureCache(cache), "test"), 11)
    with pytest.raises(UserError, match="split 'val' has no videos"):
        run_evaluate(EvalConfig(cache=cache, run=run, split="val"))
    other = make_feature_cache(tmp_path / "o.zarr", {"test": 5}, frames=6)
    with pytest.raises(UserError, match="trained on a cache with frames=4"):
        run_evaluate(EvalConfig(cache=other, run=run, top_k=3))


def test_cli_prints_the_table(trained):
    tmp, cache, run = trained
    result = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(cache), "--run", str(run), "--top-k", "3",
                                           "--out", str(tmp / "cli.json")])
    assert result.exit_code == 0, result.output
    assert "first_stage" in result.output and "two_stage" in result.output and "cli.png" in result.output
    wide = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(cache), "--run", str(run), "--top-k", "50",
                                         "--out", str(tmp / "wide.json")])
    assert wide.exit_code == 0 and "test: 10 videos, 30 captions, top-K 10, score weight 0.05" in wide.output, wide.output
    zero = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(cache), "--run", str(run), "--top-k", "0"])
    assert zero.exit_code == 2 and "Invalid value for '--top-k'" in zero.output


def test_checkpoint_last_evaluates_last_pt_into_its_own_json(trained, monkeypatch):
    import reranker.evaluate

    _, cache, run = trained
    loaded, original = [], reranker.evaluate.load_model
    monkeypatch.setattr(reranker.evaluate, "load_model", lambda r, which: loaded.append(which) or original(r, which))
    result = CliRunner().invoke(cli.main, ["evaluate", "--cache", str(cache), "--run", str(run), "--top-k", "4",
                                           "--checkpoint", "last"])
    assert result.exit_code == 0, result.output
    assert loaded == ["last"]
    saved = json.loads((run / "eval_test_last.json").read_text())  # beside eval_test.json, not over it
    model, _ = original(run, "last")
    expected = evaluate_split(model, SplitFeatures.open(FeatureCache(cache), "test"), 4)
    assert saved["checkpoint"] == "last.pt" and saved["two_stage"] == expected["two_stage"]
    bad = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--checkpoint", "first"])
    assert bad.exit_code == 2 and "Invalid value for '--checkpoint'" in bad.output


def test_score_weight_weighs_the_stages_into_a_report_of_its_own(trained):
    _, cache, run = trained
    base = ["evaluate", "--cache", str(cache), "--run", str(run), "--top-k", "4"]
    default = CliRunner().invoke(cli.main, base)
    assert default.exit_code == 0, default.output
    own = json.loads((run / "eval_test.json").read_text())
    # the cosine decides alone within the top 4: two-stage ranks are the first stage's
    tiny = CliRunner().invoke(cli.main, base + ["--score-weight", "1e-9"])
    assert tiny.exit_code == 0 and "score weight 1e-09" in tiny.output, tiny.output
    saved = json.loads((run / "eval_test_w1e-09.json").read_text())  # beside eval_test.json, not over it
    assert saved["score_weight"] == 1e-9 and saved["two_stage"] == saved["first_stage"] != own["two_stage"]
    assert json.loads((run / "eval_test.json").read_text()) == own
    same = CliRunner().invoke(cli.main, base + ["--score-weight", "0.05"])  # the run's own: its own report
    assert same.exit_code == 0 and json.loads((run / "eval_test.json").read_text())["two_stage"] == own["two_stage"]
    for flags, says in ((["--score-weight", "0"], "Invalid value for '--score-weight'"),
                        (["--zero-shot", "--score-weight", "0.1"], "--zero-shot has no reranker")):
        bad = CliRunner().invoke(cli.main, base + flags)
        assert bad.exit_code == 2 and says in bad.output, bad.output


def test_without_cache_the_cli_takes_the_runs_own(trained, tmp_path, monkeypatch):
    _, cache, run = trained
    monkeypatch.chdir(tmp_path)  # a newer cache under ./cache/ that the run was not trained on
    make_feature_cache(tmp_path / "cache" / "other" / "x.zarr", {"test": 12}, captions=3, seed=5)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--top-k", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["cache"] == str(cache) and json.loads(out.read_text())["n_videos"] == 10


def test_cli_refuses_bad_paths_in_one_line_before_the_work(trained, tmp_path, monkeypatch):
    import reranker.evaluate

    _, cache, run = trained
    monkeypatch.setattr(reranker.evaluate, "_evaluate", lambda *a: pytest.fail("evaluated before refusing"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    base = ["evaluate", "--cache", str(cache), "--run", str(run)]
    for extra, says in (
        (["--out", str(tmp_path)], f"{tmp_path}: is a folder; pass --out a file path"),
        (["--out", str(a_file / "m.json")], f"{a_file} is a file, not a folder; pass --out a file path in a folder"),
        (["--save-sims", str(a_file)], f"{a_file}: is a file; pass --save-sims a folder path"),
        # in the cache's folder, where `extract --overwrite` deletes them: written there before
        (["--out", str(cache / "m.json")], f"{cache / 'm.json'}: lies inside the cache {cache}, and `extract "
                                           "--overwrite` would delete it with the cache; pass --out a path outside it"),
        (["--save-sims", str(cache / "sims")], f"{cache / 'sims'}: lies inside the cache {cache}, and `extract "
                                               "--overwrite` would delete it with the cache; pass --save-sims a path"),
    ):
        result = CliRunner().invoke(cli.main, base + extra)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and says in result.output, result.output
    assert a_file.read_text() == "mine" and not list(tmp_path.glob(".*.part"))
    nowhere = CliRunner().invoke(cli.main, ["evaluate", "--run", str(tmp_path / "nope")])  # blamed the cache before
    assert nowhere.exit_code == 2 and "nope: not a training run (no config.json)" in nowhere.output, nowhere.output


def test_a_stopped_save_sims_leaves_no_mixed_set_and_no_report(trained, tmp_path, monkeypatch):
    import reranker.evaluate

    _, cache, run = trained
    sims, out = tmp_path / "sims", tmp_path / "m.json"
    run_evaluate(EvalConfig(cache=cache, run=run, top_k=4, out=out, save_sims=sims))
    before = {p.name: p.read_bytes() for p in sims.iterdir()}
    assert sorted(before) == sorted(reranker.evaluate.SIMS)
    out.unlink()
    saved, original = [], reranker.evaluate._atomic_save

    def killed_at_the_second(path, array):
        if saved:
            raise KeyboardInterrupt
        saved.append(path.name)
        original(path, array)

    monkeypatch.setattr(reranker.evaluate, "_atomic_save", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(EvalConfig(cache=cache, run=run, top_k=3, out=out, save_sims=sims))
    # the first matrix of the new set, none of the old set beside it, no temp file, and no report claiming them
    assert sorted(p.name for p in sims.iterdir()) == ["first_stage_sims.npy"] and not out.exists()


def test_a_run_names_its_relative_cache_from_another_folder(trained, tmp_path, monkeypatch):
    _, cache, run = trained
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["cache"] = "cache/synthetic/demo.zarr"  # as `make demo` trains, from the checkout's root
    (moved / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(moved)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert ("cache/synthetic/demo.zarr: the cache " in result.output
            and "relative to the folder training ran in, is not here; run from that folder or pass --cache" in result.output)
    ok = CliRunner().invoke(cli.main, ["evaluate", "--run", str(moved), "--cache", str(cache), "--top-k", "3"])
    assert ok.exit_code == 0, ok.output
    (moved / "best.pt").write_bytes(b"torn")
    (moved / "best.prev.pt").unlink(missing_ok=True)
    torn = CliRunner().invoke(cli.main, ["evaluate", "--run", str(moved), "--cache", str(cache)])
    assert torn.exit_code == 2 and "--checkpoint last (evaluate, search) reads last.pt" in torn.output, torn.output


def test_a_run_and_a_cache_have_the_same_weights_by_content_wherever_they_lie():
    from pipeline.cache import first_mismatch

    def same_weights(a, b):
        return first_mismatch(a, b, ("pretrained", "pretrained_sha256")) is None

    a = {"pretrained": "/old/checkout/w.safetensors", "pretrained_sha256": "d7dd"}
    assert same_weights(a, {"pretrained": "/new/clone/w.safetensors", "pretrained_sha256": "d7dd"})
    assert not same_weights(a, {"pretrained": "/old/checkout/w.safetensors", "pretrained_sha256": "0000"})
    assert same_weights({"pretrained": "openai", "pretrained_sha256": ""}, {"pretrained": "openai", "pretrained_sha256": ""})
    assert not same_weights({"pretrained": "openai", "pretrained_sha256": ""}, {"pretrained": "laion2b", "pretrained_sha256": ""})


def test_the_truth_loses_ties_at_the_top_k_cut_in_both_directions(trained, monkeypatch):
    import reranker.evaluate

    _, cache, run = trained
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    monkeypatch.setattr(reranker.evaluate, "first_stage_sims", lambda *a: np.zeros((30, 10), np.float32))
    scored, original = [], reranker.evaluate._rerank_pairs
    monkeypatch.setattr(reranker.evaluate, "_rerank_pairs",
                        lambda m, f, text_pos, video_pos, *a, **k: scored.append((text_pos, video_pos))
                        or original(m, f, text_pos, video_pos, *a, **k))
    results = evaluate_split(model, feats, 4)
    (t2v_texts, t2v_videos), (v2t_texts, v2t_videos) = scored  # the captions' candidates, then the videos'
    assert len(t2v_texts) == 30 * 4 and len(v2t_videos) == 10 * 4
    assert not np.any(feats.text_video[t2v_texts] == t2v_videos)  # no caption re-scored against its own video
    assert not np.any(feats.text_video[v2t_texts] == v2t_videos)  # no video re-scored against its own captions
    # Every score ties, so every candidate is a wrong item and the right one ties with every other non-candidate
    # below them: each caption's video and each video's best caption rank N = 10 of 10 videos.
    worst = {"R@1": 0.0, "R@5": 0.0, "R@10": 100.0, "MdR": 10.0, "MnR": 10.0}
    assert results["two_stage"] == {"t2v": worst, "v2t": worst}


@pytest.mark.parametrize("score_weight", [None, 0.3], ids=["the run's weight", "another"])
@pytest.mark.parametrize("videos_are_queries", [False, True], ids=["t2v", "v2t"])
def test_candidates_are_ordered_by_logit_plus_cosine_over_the_weight(trained, videos_are_queries, score_weight):
    from reranker.evaluate import _evaluate

    _, cache, run = trained
    device = default_device()
    model, _ = load_model(run)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    ev = _evaluate(model.to(device), feats, 4, device, zero_shot=False, score_weight=score_weight)
    assert ev.results["score_weight"] == (score_weight or 0.05)
    first, two = (ev.first.T, ev.two_stage_v2t.T) if videos_are_queries else (ev.first, ev.two_stage_t2v)
    candidates = np.stack([np.flatnonzero(row > 0) for row in two])  # re-scored items get the codes 1..K
    cosine = np.take_along_axis(first, candidates, axis=1).astype(np.float64)
    # in first-stage order, as evaluation scores them: the same batches, so the same logits on any device
    order = np.argsort(-cosine, axis=1, kind="stable")
    candidates, cosine = np.take_along_axis(candidates, order, axis=1), np.take_along_axis(cosine, order, axis=1)
    query = np.repeat(np.arange(len(two)), 4)
    text_pos, video_pos = (candidates.reshape(-1), query) if videos_are_queries else (query, candidates.reshape(-1))
    logits = _rerank_pairs(model, feats, text_pos, video_pos, device).astype(np.float64).reshape(-1, 4)
    final = logits + cosine / (score_weight or model.config.score_weight)
    ranked = lambda scores: np.argsort(np.argsort(scores, axis=1), axis=1) + 1  # noqa: E731 - 1 for the lowest
    assert np.array_equal(np.take_along_axis(two, candidates, axis=1), ranked(final))
    assert not np.array_equal(ranked(final), ranked(logits))  # the cosine reorders some query's candidates


def test_reads_address_the_split_by_position_not_by_cache_index(tmp_path):
    import zarr

    cache = make_feature_cache(tmp_path / "c.zarr", {"train": 12, "test": 10}, captions=3, partial_masks=True)
    feats = SplitFeatures.open(FeatureCache(cache), "test")
    stored = zarr.open_group(cache, mode="r")  # the arrays as written, read without SplitFeatures
    videos = np.flatnonzero(stored["video_split"][:] == "test")  # cache rows 12..21, after the train videos
    texts = np.flatnonzero(np.isin(stored["text_video"][:], videos))
    masks, lengths = stored["frame_mask"][:][videos], stored["text_lengths"][:][texts]
    assert 0 < masks.sum() < masks.size and len(set(lengths.tolist())) > 1  # positions are told apart by them
    rng = np.random.default_rng(0)
    text_pos, video_pos = rng.integers(0, 30, 45), rng.integers(0, 10, 15)  # more draws than items: repeats
    t = feats.read_texts(text_pos)
    assert np.array_equal(t["text_lengths"].numpy(), lengths[text_pos])
    assert np.array_equal(t["text_tokens"].numpy(), stored["text_tokens"][:][texts[text_pos]])
    assert np.array_equal(feats.read_videos(video_pos)["frame_mask"].numpy(), masks[video_pos])
