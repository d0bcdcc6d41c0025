"""Colour-shape binding: can a reranker tell a caption from the same caption with two colours swapped?

    python bench/binding.py --data-root data/synthetic --cache cache/synthetic/demo.zarr [--steps 600]
        [--variant flat:2 --variant attention:1 ...] [--quick]

"a red ball left of a blue box" and "a blue ball left of a red box" hold the same words; only which colour goes
with which shape differs. Each variant (`--spatial`:`patch_pool`) is a fresh reranker trained in memory, from
the cache's features, on the training split's captions against their colour-swapped variants (same video,
binary cross-entropy), then scored on the test split's: the % of captions whose logit beats their swap's
(chance: 50). The swapped captions are encoded by the cache's own frozen encoder; a swap is kept only when the
scene (clutter included) lacks one of the colour-shape pairs it names, so every swap is false. All variants
train on the same pairs, steps and seed, side by side in one run. Prints a table and a final JSON line
{variant: test %}.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch

from common import final, header, table  # common puts the repository on sys.path

from pipeline.cache import FeatureCache
from pipeline.encoder import FrozenEncoder
from pipeline.synthetic import COLOURS, SHAPE_WORDS, read_scenes
from reranker.data import SplitFeatures
from reranker.model import CrossTVR, Reranker
from reranker.search import query_encoder
from reranker.train import TrainConfig, model_config_for

SHAPE_OF = {word: shape for shape, words in SHAPE_WORDS.items() for word in words}


def swap_colours(caption: str) -> str | None:
    """The caption with its first two different colour words swapped; None when it names fewer than two colours."""
    words = re.findall(r"\w+|\W+", caption)
    at = [i for i, w in enumerate(words) if w in COLOURS]
    pair = next(((i, j) for n, i in enumerate(at) for j in at[n + 1:] if words[i] != words[j]), None)
    if pair is None:
        return None
    i, j = pair
    words[i], words[j] = words[j], words[i]
    return "".join(words)


def named_objects(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) of every colour word directly followed by a shape word: 'a red ball' -> ('red', 'circle')."""
    words = caption.split()
    return {(c, SHAPE_OF[s.strip(",")]) for c, s in zip(words, words[1:]) if c in COLOURS and s.strip(",") in SHAPE_OF}


def false_swap(caption: str, objects: set[tuple[str, str]]) -> str | None:
    """The caption's colour swap when it is false for a scene holding `objects` ((colour, shape) pairs), else None."""
    swap = swap_colours(caption)
    return swap if swap is not None and not named_objects(swap) <= objects else None


def binding_pairs(cache: FeatureCache, split: str, objects_of: dict[str, set]) -> tuple[SplitFeatures, np.ndarray, list[str]]:
    """The split's captions that have a false colour swap: (features, caption positions, swapped captions)."""
    feats = SplitFeatures.open(cache, split)
    captions, ids = cache["captions"][:], cache.video_ids()  # whole: per-caption zarr indexing decodes a chunk each
    rows, swapped = [], []
    for p, (t, v) in enumerate(zip(feats.texts, feats.videos[feats.text_video])):
        swap = false_swap(str(captions[t]), objects_of[str(ids[v])])
        if swap is not None:
            rows.append(p)
            swapped.append(swap)
    return feats, np.array(rows, dtype=np.int64), swapped


class Pairs:
    """One split's binding pairs in memory: caption tokens, swapped tokens, and their video's features."""

    def __init__(self, feats: SplitFeatures, rows: np.ndarray, swapped: list[str], encoder: FrozenEncoder,
                 video_inputs: tuple[str, ...]):
        text = feats.read_texts(rows, ("text_tokens", "text_lengths"))
        tokens, lengths, _ = encoder.encode_captions(swapped)
        self.tokens = (text["text_tokens"].float(), tokens.float())
        self.lengths = (text["text_lengths"], torch.from_numpy(np.asarray(lengths, dtype=np.int64)))
        self.video_of = torch.from_numpy(feats.text_video[rows].astype(np.int64))
        self.videos = {k: x.float() if x.is_floating_point() else x
                       for k, x in feats.read_videos(np.arange(feats.n_videos), video_inputs).items()}

    def __len__(self) -> int:
        return len(self.video_of)

    def logits(self, model: Reranker, idx: torch.Tensor, which: int) -> torch.Tensor:
        """Logits of the captions idx (which=0) or of their swaps (which=1) against their own videos."""
        v = {k: x[self.video_of[idx]] for k, x in self.videos.items()}
        return model(self.tokens[which][idx], self.lengths[which][idx], v.get("patch_tokens"), v.get("cls_tokens"),
                     v["frame_mask"])

    @torch.no_grad()
    def accuracy(self, model: Reranker, limit: int = 1000, block: int = 100) -> float:
        """% of (up to `limit`) captions scored above their swap."""
        model.eval()
        idx = torch.arange(min(limit, len(self)))
        wins = sum(int((self.logits(model, i, 0) > self.logits(model, i, 1)).sum()) for i in idx.split(block))
        model.train()
        return 100.0 * wins / len(idx)


def train_variant(cache: FeatureCache, spatial: str, pool: int, pairs: dict, steps: int, batch: int, seed: int) -> Reranker:
    cfg = TrainConfig(spatial=spatial, patch_pool=pool)
    torch.manual_seed(seed)
    model = Reranker(model_config_for(cache, cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    draw = torch.Generator().manual_seed(seed)
    train = pairs["train"]
    for _ in range(steps):
        idx = torch.randint(len(train), (batch,), generator=draw)
        loss = CrossTVR.matching_loss(train.logits(model, idx, 0), train.logits(model, idx, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", required=True, help="the make-synthetic folder the cache was extracted from")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--variant", action="append", help="SPATIAL:PATCH_POOL (default: flat and attention, pools 2 and 1)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="only flat:2 and attention:2, the defaults' patch pooling (steps stay: "
                                                          "at 300, attention was still at chance in 2 of 4 runs)")
    args = ap.parse_args()
    header("binding", args)
    default = ("flat:2", "attention:2") if args.quick else ("flat:2", "flat:1", "attention:2", "attention:1")
    variants = [(s, int(p)) for s, p in (v.split(":") for v in args.variant or default)]

    cache = FeatureCache(args.cache)
    encoder = query_encoder(cache)  # the weights and text block the cache's own captions were encoded with
    # clutter counts too: a swap naming an unnamed look-alike in the corner would be true
    objects_of = {row["video"]: {o.key for o in row["scene"].objects + row["scene"].clutter}
                  for row in read_scenes(args.data_root)}
    inputs = ("patch_tokens", "cls_tokens", "frame_mask")  # what every variant may read
    pairs = {split: Pairs(*binding_pairs(cache, split, objects_of), encoder, inputs) for split in ("train", "test")}
    print(f"binding pairs: train {len(pairs['train'])}, test {len(pairs['test'])}; {args.steps} steps of {args.batch}")

    rows, result = [], {}
    for spatial, pool in variants:
        t0 = time.time()
        model = train_variant(cache, spatial, pool, pairs, args.steps, args.batch, args.seed)
        keys = cache.attrs["num_patches"] // model.config.patch_pool**2
        train_acc, test_acc = pairs["train"].accuracy(model), pairs["test"].accuracy(model)
        name = f"{spatial}:{model.config.patch_pool}"
        rows.append([name, keys, train_acc, test_acc, time.time() - t0])
        result[name] = round(test_acc, 1)
    print(table(["variant (spatial:patch_pool)", "patches a frame", "train %", "test %", "seconds"], rows))
    final(result)


if __name__ == "__main__":
    main()
