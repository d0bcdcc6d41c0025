"""`search`: a free-text query through the cache's own frozen text encoder, then both stages."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import cli
from pipeline.cache import FeatureCache
from pipeline.encoder import DEFAULT_MODEL, FrozenEncoder, shipped_weights
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, run_extract
from reranker.search import search
from reranker.train import TrainConfig, train
from tests.conftest import make_feature_cache


@pytest.fixture
def setup(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in FrozenEncoder(DEFAULT_MODEL).model.state_dict().items()}, str(weights))
    cache = run_extract(ExtractConfig(dataset="manifest", data_root=tiny_dataset, cache=tmp_path / "c.zarr",
                                      pretrained=str(weights), progress=False)).cache
    run = train(TrainConfig(cache=str(cache), run=str(tmp_path / "run"), split="test", val_split="", epochs=1,
                            batch_size=2, hard_negatives=1, neighbour_negatives=0, dim=32, heads=2, n_queries=2), progress=False)
    return cache, run, weights


def test_search_ranks_candidates_first_by_final_score(setup, caplog):
    cache, run, _ = setup
    with caplog.at_level("WARNING"):
        search(cache, run, "clip number 3 " * 20, top=2)  # 60 words: longer than the 32 tokens kept of a caption
    assert "the query is longer than the 32 tokens the cache keeps of a caption" in caplog.text
    hits = search(cache, run, "clip number 3 with noise", top=5, top_k=2)
    assert len(hits) == 5 and len({h.video for h in hits}) == 5
    assert [h.final is not None for h in hits] == [True, True, False, False, False]
    assert hits[0].final >= hits[1].final
    assert hits[2].first_stage >= hits[3].first_stage >= hits[4].first_stage
    ids = FeatureCache(cache).video_ids().tolist()
    assert all(h.video in ids and h.path.endswith(h.video) for h in hits)
    result = CliRunner().invoke(cli.main, ["search", "clip number 3", "--cache", str(cache), "--run", str(run), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 4
    empty = CliRunner().invoke(cli.main, ["search", "  ", "--cache", str(cache), "--run", str(run)])
    assert empty.exit_code == 2 and "search: the query is empty" in empty.output


def test_search_refuses_other_weights(setup, tmp_path):
    cache, run, weights = setup
    other = make_feature_cache(tmp_path / "other.zarr", {"test": 4}, frames=6)
    with pytest.raises(UserError, match=r"trained on a cache with .*; search a cache made with the same model"):
        search(other, run, "anything")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="differs from the one"):
        search(cache, run, "anything")


def test_a_moved_checkout_searches_with_its_shipped_weights(tiny_dataset, tmp_path):
    # a cache and run made in another checkout name its shipped weights by a path that is gone here
    elsewhere = tmp_path / "old checkout" / "CrossTVR-Tiny.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy(shipped_weights(DEFAULT_MODEL), elsewhere)
    cache = run_extract(ExtractConfig(dataset="manifest", data_root=tiny_dataset, cache=tmp_path / "c.zarr",
                                      pretrained=str(elsewhere), progress=False)).cache
    run = train(TrainConfig(cache=str(cache), run=str(tmp_path / "run"), split="test", val_split="", epochs=1,
                            batch_size=2, hard_negatives=1, neighbour_negatives=0, dim=32, heads=2, n_queries=2),
                progress=False)
    shutil.rmtree(elsewhere.parent)
    hits = search(cache, run, "clip number 3", top=3, top_k=2)
    assert len(hits) == 3 and hits[0].final is not None


def test_weights_that_are_gone_are_named_and_a_relative_path_is_recorded_whole(setup, tiny_dataset, tmp_path,
                                                                               monkeypatch):
    cache, run, weights = setup
    assert FeatureCache(cache).attrs["pretrained"] == str(weights.resolve())
    monkeypatch.chdir(weights.parent)
    relative = run_extract(ExtractConfig(dataset="manifest", data_root=tiny_dataset, cache=tmp_path / "r.zarr",
                                         pretrained=weights.name, progress=False)).cache
    assert FeatureCache(relative).attrs["pretrained"] == str(weights.resolve())  # found from any folder
    weights.unlink()  # not the shipped weights' bytes: nothing may stand in for them
    with pytest.raises(UserError, match=f"{weights.resolve()}: the encoder weights .* are not there"):
        search(cache, run, "anything")


def test_weights_of_a_tag_that_do_not_load_give_a_fix_search_has(setup, tmp_path, monkeypatch):
    import open_clip

    cache, _, _ = setup
    tagged = tmp_path / "tagged.zarr"
    shutil.copytree(cache, tagged)  # as extract with --pretrained <tag> records it: a name, no checksum
    FeatureCache(tagged, mode="r+").group.attrs.update({"pretrained": "openai", "pretrained_sha256": ""})
    run = train(TrainConfig(cache=str(tagged), run=str(tmp_path / "tagged_run"), split="test", val_split="", epochs=1,
                            batch_size=2, hard_negatives=1, neighbour_negatives=0, dim=32, heads=2, n_queries=2),
                progress=False)

    def no_network(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_network)
    result = CliRunner().invoke(cli.main, ["search", "a red circle", "--run", str(run), "--cache", str(tagged)])
    assert result.exit_code == 2  # it said "pass a local checkpoint: --pretrained ...", an option search has not
    assert result.output == (f"error: {tagged}: built with the encoder weights 'openai', which did not load here to "
                             "encode the query (Failed to download weights for tag 'openai'); run search where "
                             "open_clip can download them or has them cached\n"), result.output


def test_score_weight_weighs_the_cosine_in_the_final_score(setup):
    cache, run, _ = setup
    own, other = (search(cache, run, "clip number 3 with noise", top=4, top_k=4, score_weight=w) for w in (None, 0.3))
    assert {h.video for h in own} == {h.video for h in other}  # the same top 4, re-scored
    cosine, final = {h.video: h.first_stage for h in own}, {h.video: h.final for h in own}
    for h in other:  # the same logit plus the cosine over 0.3 instead of over the run's 0.05
        assert h.final == pytest.approx(final[h.video] + cosine[h.video] * (1 / 0.3 - 1 / 0.05), abs=1e-5)
    flag = CliRunner().invoke(cli.main, ["search", "clip number 3 with noise", "--cache", str(cache), "--run", str(run),
                                         "--top", "4", "--top-k", "4", "--score-weight", "0.3"])
    assert flag.exit_code == 0, flag.output
    assert [line.split()[1] for line in flag.output.splitlines()[1:]] == [f"{h.final:.3f}" for h in other]


def test_checkpoint_last_searches_with_last_pt(setup):
    cache, run, _ = setup
    args = ["search", "clip number 3", "--cache", str(cache), "--run", str(run), "--top", "3"]
    before = CliRunner().invoke(cli.main, args)
    assert before.exit_code == 0, before.output
    (run / "best.pt").write_bytes(b"torn")  # and no best.prev.pt: its advice named an option search did not have
    (run / "best.prev.pt").unlink(missing_ok=True)
    torn = CliRunner().invoke(cli.main, args)
    assert torn.exit_code == 2 and "--checkpoint last (evaluate, search) reads last.pt" in torn.output, torn.output
    last = CliRunner().invoke(cli.main, args + ["--checkpoint", "last"])
    assert last.exit_code == 0 and last.output == before.output, last.output  # one epoch: best.pt held last's weights
