"""`cli.py search`: a free-text query through the frozen text encoder, then both stages over the cached videos."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import FeatureCache
from pipeline.encoder import FrozenEncoder, WeightsNotLoaded, autocast, default_device, shipped_weights
from pipeline.errors import UserError
from pipeline.files import file_sha256
from reranker.data import SplitFeatures, to_device
from reranker.train import check_compatible, load_model, video_bank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One ranked video: its id and path, the first-stage cosine and the final two-stage score (None outside top-K)."""

    video: str
    path: str
    first_stage: float
    final: float | None


def query_encoder(cache: FeatureCache) -> FrozenEncoder:
    """The frozen text encoder the cache was built with; refused when those weights cannot be had again."""
    a = cache.attrs
    if not a["pretrained"]:
        raise UserError(f"{cache.path}: built with random encoder weights, which cannot be reproduced to encode a "
                        "query; rebuild the cache with --pretrained (or the shipped default weights)")
    weights = a["pretrained"]
    if a["pretrained_sha256"] and not Path(weights).is_file():
        shipped = shipped_weights(a["model"])
        if shipped is None or file_sha256(shipped) != a["pretrained_sha256"]:
            raise UserError(f"{weights}: the encoder weights {cache.path} was built with are not there (a relative "
                            "path is from the folder extract ran in); put them back, or run from that folder")
        weights = str(shipped)  # the shipped weights of a moved or re-cloned checkout: the same bytes
    # The query's text tokens must come from the block the cache's did; caches older than text_layer stored the last.
    try:
        encoder = FrozenEncoder(a["model"], weights, patch_layer=a["patch_layer"],
                                text_layer=a.get("text_layer", -1), max_text_tokens=a["max_text_tokens"])
    except WeightsNotLoaded as e:  # its fix is extract's --pretrained, which search has not: these weights or none
        raise UserError(f"{cache.path}: built with the encoder weights '{weights}', which did not load here to encode "
                        f"the query ({e.reason}); run search where open_clip can download them or has them cached"
                        ) from None
    if encoder.info.pretrained_sha256 != a["pretrained_sha256"]:
        raise UserError(f"{encoder.info.pretrained}: checkpoint differs from the one {cache.path} was built with "
                        f"({a['pretrained']}); put those weights back at that path, or rebuild the cache")
    return encoder


@torch.no_grad()
def search(cache_path: Path, run: Path, query: str, top: int = 10, top_k: int = 15, checkpoint: str = "best",
           score_weight: float | None = None) -> list[Hit]:
    """Rank every extracted video of the cache for a text query: first stage, then top-K re-scored by the run's
    best.pt or last.pt (checkpoint 'best' or 'last'), with the final score's weight the run's unless given."""
    if not query.strip():
        raise UserError("search: the query is empty; pass the text to search for, e.g. \"a red circle moves left\"")
    cache = FeatureCache(cache_path)
    model, state = load_model(run, checkpoint)
    check_compatible(state["cache_signature"], cache, run, "search a cache made with the same model and settings "
                     "(without --cache: the one it was trained on)")
    feats = SplitFeatures.open(cache, None, allow_partial=True)
    device = default_device()
    model = model.to(device)
    encoder = query_encoder(cache)
    if encoder.tokenize([query])[2][0]:
        log.warning("the query is longer than the %d tokens the cache keeps of a caption; only its start is searched",
                    encoder.max_text_tokens)
    tokens, lengths, emb = encoder.encode_captions([query])
    tokens, emb = tokens.half().float(), emb.half().float()  # as the cache stores a caption's: the same scores
    bank = video_bank(model, feats, device)  # [V, E]
    first = (model.first_stage.encode_text(emb.to(device).float()).cpu() @ bank.T)[0]  # [V], float32 like the bank
    k = min(top_k, feats.n_videos)
    candidates = first.topk(k).indices.numpy()
    v = to_device(feats.read_videos(candidates, model.reranker.video_inputs), device)
    with autocast(device):
        logits = model.reranker.score_candidates(tokens[0].to(device), int(lengths[0]), v.get("patch_tokens"),
                                                 v.get("cls_tokens"), v["frame_mask"]).float().cpu()
    final = model.final_score(first[candidates].double(), logits.double(), score_weight).numpy()
    ranked = list(candidates[np.argsort(-final, kind="stable")])
    rest = np.argsort(-first.numpy(), kind="stable")
    reranked = set(candidates.tolist())
    ranked += [i for i in rest[: top + k] if i not in reranked]
    final_of = dict(zip(candidates.tolist(), final.tolist()))
    ids, paths = cache["video_ids"], cache["video_paths"]
    return [Hit(str(ids[feats.videos[i]]), str(paths[feats.videos[i]]), float(first[i]), final_of.get(int(i)))
            for i in ranked[:top]]
