"""Tests for reranker.model: zero-shot first stage, shapes and masking, and toy tasks that only a
working spatial or temporal cross attention can solve."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from reranker.model import CrossTVR, FirstStage, ModelConfig, Reranker

W = WT = E = 32  # patch, text and joint widths of the toy tensors
L = 8  # max text tokens


def small_config(**overrides) -> ModelConfig:
    base = dict(
        embed_dim=E, patch_width=W, text_width=WT, frames=4, patches=9, dim=32, heads=2, n_queries=2,
        layers=1, temporal_heads=2, temporal_layers=1,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomise_head(model: Reranker) -> Reranker:
    """The matching head starts at zero (every logit 0); give it weights so logits depend on inputs."""
    torch.nn.init.normal_(model.head[1].weight)
    return model


def random_inputs(cfg: ModelConfig, B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T, P = cfg.frames, cfg.patches
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    text = torch.randn(B, L, WT, generator=g) * (torch.arange(L)[None, :, None] < lengths[:, None, None])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T // 2 :] = False  # one video with padded slots
    return dict(
        text_tokens=text,
        text_lengths=lengths,
        patch_tokens=torch.randn(B, T, P, W, generator=g),
        cls_tokens=torch.randn(B, T, W, generator=g),
        frame_mask=mask,
    )


# ----------------------------------------------------------------------------- config


def test_config_is_json_and_validated():
    cfg = small_config(temporal="transformer", share_attention=True)
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError):
        small_config(spatial="patches")
    with pytest.raises(ValueError):
        small_config(temporal="lstm")
    with pytest.raises(ValueError):
        small_config(spatial="cls", share_attention=True)
    # pooling a 2 x 2 grid to one patch: centring it would leave the reranker nothing of the video
    with pytest.raises(ValueError, match="one patch per frame"):
        ModelConfig(patches=4, patch_pool=2, spatial="flat")
    assert ModelConfig(patches=4, patch_pool=2, spatial="cls").patch_pool == 2  # cls reads no patches


# ----------------------------------------------------------------------------- first stage


def zero_shot_cosine(text_embeds, frame_embeds, frame_mask):
    """Independent zero-shot CLIP: mean of the normalized valid frame embeddings vs the caption."""
    videos = []
    for frames, mask in zip(frame_embeds, frame_mask):
        valid = [f / f.norm() for f, m in zip(frames, mask) if m]
        v = sum(valid) / len(valid)
        videos.append(v / v.norm())
    videos = torch.stack(videos)
    texts = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return texts @ videos.T


@pytest.mark.parametrize("temporal", ["mean", "transformer"])
def test_first_stage_is_zero_shot_clip_at_init(temporal):
    torch.manual_seed(0)
    cfg = small_config(temporal=temporal, frames=6)
    stage = FirstStage(cfg)
    frame_embeds = torch.randn(5, 6, E) * 3  # CLIP embeddings are not unit norm
    mask = torch.rand(5, 6) > 0.4
    mask[:, 0] = True
    text_embeds = torch.randn(7, E) * 2

    sim = stage(text_embeds, frame_embeds, mask)  # [N, B]
    assert sim.shape == (7, 5)
    torch.testing.assert_close(sim, zero_shot_cosine(text_embeds, frame_embeds, mask), atol=1e-5, rtol=0)
    video = stage.encode_video(frame_embeds, mask)
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(stage.encode_text(text_embeds).norm(dim=-1), torch.ones(7))

    # padded frames are ignored, whatever they hold
    changed = torch.where(mask[..., None], frame_embeds, torch.randn_like(frame_embeds) * 100)
    torch.testing.assert_close(stage.encode_video(changed, mask), video, atol=1e-6, rtol=0)


def test_first_stage_transformer_trains_away_from_zero_shot():
    torch.manual_seed(0)
    stage = FirstStage(small_config(temporal="transformer"))
    frames, mask = torch.randn(8, 4, E), torch.ones(8, 4, dtype=torch.bool)
    text = torch.randn(8, E)
    before = stage(text, frames, mask).detach()
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    for _ in range(3):
        loss = stage.contrastive_loss(stage.encode_text(text), stage.encode_video(frames, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stage.temporal_out.weight.abs().sum() > 0  # the zero-initialised branch does get gradient
    assert not torch.allclose(stage(text, frames, mask), before)


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways over [N, N] logits whose diagonal holds the matching pairs."""
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_contrastive_loss_and_temperature():
    stage = FirstStage(small_config())
    assert math.isclose(stage.scale().item(), 1 / 0.07, rel_tol=1e-5)
    t, v = F.normalize(torch.randn(6, E), dim=-1), F.normalize(torch.randn(6, E), dim=-1)
    torch.testing.assert_close(stage.contrastive_loss(t, v), symmetric_cross_entropy((t @ v.T) / 0.07),
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        stage.logit_scale.fill_(10.0)
    assert stage.scale().item() == 100.0  # clamped like CLIP


def test_contrastive_loss_uses_the_learnable_temperature():
    torch.manual_seed(0)
    stage = FirstStage(small_config())
    t, v = F.normalize(torch.randn(6, E), dim=-1), F.normalize(torch.randn(6, E), dim=-1)
    with torch.no_grad():
        stage.logit_scale.fill_(math.log(20))
    loss = stage.contrastive_loss(t, v)
    torch.testing.assert_close(loss, symmetric_cross_entropy(20 * t @ v.T), atol=1e-5, rtol=1e-5)
    loss.backward()
    # the temperature learns: its gradient is that of the same loss taken through exp(log 20) independently
    log_scale = torch.tensor(math.log(20), requires_grad=True)
    symmetric_cross_entropy(log_scale.exp() * t @ v.T).backward()
    assert stage.logit_scale.grad != 0
    torch.testing.assert_close(stage.logit_scale.grad, log_scale.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        stage.logit_scale.fill_(math.log(1000))  # above logit_scale_max: the loss is taken at 100
    torch.testing.assert_close(stage.contrastive_loss(t, v), symmetric_cross_entropy(100 * t @ v.T),
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- reranker


@pytest.mark.parametrize(
    "spatial,share", [("attention", False), ("attention", True), ("cls", False), ("flat", False)]
)
def test_reranker_shapes_and_candidate_scoring(spatial, share):
    torch.manual_seed(0)
    cfg = small_config(spatial=spatial, share_attention=share)
    model = randomise_head(Reranker(cfg)).eval()
    x = random_inputs(cfg, B=5)
    logits = model(**x)
    assert logits.shape == (5,) and torch.isfinite(logits).all()

    frames = model.encode_frames(x["patch_tokens"], x["cls_tokens"])
    assert frames.summary.shape == (5, 4, 32)  # one token per frame
    # attention: each spatial block's keys and values of [class token, 9 patches], projected once per video
    assert [k.shape for k in frames.keys] == ([(5, 4, 1 + 9, 2 * 32)] * cfg.layers if spatial == "attention" else [])
    picked = frames[[3, 0]]
    assert torch.equal(picked.summary, frames.summary[[3, 0]])
    assert all(torch.equal(a, b[[3, 0]]) for a, b in zip(picked.keys, frames.keys, strict=True))

    # one caption against K=5 candidates == the same caption repeated on 5 paired rows
    K = 5
    scores = model.score_candidates(
        x["text_tokens"][2], x["text_lengths"][2], x["patch_tokens"], x["cls_tokens"], x["frame_mask"]
    )
    rows = model(
        x["text_tokens"][2:3].expand(K, -1, -1), x["text_lengths"][2:3].expand(K),
        x["patch_tokens"], x["cls_tokens"], x["frame_mask"],
    )
    assert scores.shape == (K,)
    torch.testing.assert_close(scores, rows, atol=1e-5, rtol=1e-5)


def test_share_attention_has_fewer_parameters_and_no_aliases():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    shared, separate = Reranker(small_config(share_attention=True)), Reranker(small_config())
    assert count(shared) < count(separate)
    # one module registered twice would give state_dict aliases, which safetensors refuses
    state = shared.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)


@pytest.mark.parametrize("spatial", ["attention", "cls", "flat"])
def test_padding_does_not_change_the_logit(spatial):
    torch.manual_seed(0)
    cfg = small_config(spatial=spatial)
    model = randomise_head(Reranker(cfg)).eval()
    x = random_inputs(cfg, B=4)
    before = model(**x)

    y = dict(x)
    text_valid = torch.arange(L)[None, :, None] < x["text_lengths"][:, None, None]
    y["text_tokens"] = torch.where(text_valid, x["text_tokens"], torch.randn_like(x["text_tokens"]) * 10)
    m = x["frame_mask"]
    y["patch_tokens"] = torch.where(m[..., None, None], x["patch_tokens"], torch.randn_like(x["patch_tokens"]) * 10)
    y["cls_tokens"] = torch.where(m[..., None], x["cls_tokens"], torch.randn_like(x["cls_tokens"]) * 10)
    torch.testing.assert_close(model(**y), before, atol=1e-5, rtol=1e-5)

    # a caption padded to a longer L gives the same logit as its tight version
    z = dict(x, text_tokens=torch.cat([x["text_tokens"], torch.randn(4, 3, WT)], dim=1))
    torch.testing.assert_close(model(**z), before, atol=1e-5, rtol=1e-5)


def test_text_tokens_are_mixed_with_their_neighbours_only():
    torch.manual_seed(0)
    model = Reranker(small_config()).eval()
    x = {"text_tokens": torch.randn(1, L, WT), "text_lengths": torch.tensor([L])}
    Q = model.config.n_queries
    before = model.encode_queries(x["text_tokens"], x["text_lengths"])[0][0, Q:]  # [L, D]
    changed = x["text_tokens"].clone()
    changed[0, 4] = torch.randn(WT)  # token 4: it and its neighbours 3 and 5 move, nothing else
    after = model.encode_queries(changed, x["text_lengths"])[0][0, Q:]
    moved = (after - before).norm(dim=-1) > 1e-6
    assert moved.tolist() == [i in (3, 4, 5) for i in range(L)]
    # padding past the caption never reaches its last token
    x["text_lengths"] = torch.tensor([5])
    short = model.encode_queries(x["text_tokens"], x["text_lengths"])[0][0, Q:]
    padded = x["text_tokens"].index_fill(1, torch.tensor([5, 6, 7]), 9.0)
    torch.testing.assert_close(model.encode_queries(padded, x["text_lengths"])[0][0, Q:Q + 5], short[:5])


def test_frame_order_is_visible_at_init():
    # the lesson of std-1 temporal positions: a video and its time-reversed twin must differ
    torch.manual_seed(0)
    cfg = small_config()
    model = randomise_head(Reranker(cfg)).eval()
    x = random_inputs(cfg, B=4)
    x["frame_mask"][:] = True
    flipped = dict(x, patch_tokens=x["patch_tokens"].flip(1), cls_tokens=x["cls_tokens"].flip(1))
    assert (model(**x) - model(**flipped)).abs().min() > 1e-3


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    cfg = small_config(temporal="transformer")
    model = CrossTVR(cfg)
    randomise_head(model.reranker)
    x = random_inputs(cfg, B=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.reranker(**x)
        video = model.first_stage.encode_video(torch.randn(3, 4, E), x["frame_mask"])
    assert torch.isfinite(logits.float()).all() and torch.isfinite(video.float()).all()


# ----------------------------------------------------------------------------- CrossTVR


def test_final_score_and_matching_loss():
    model = CrossTVR(small_config())
    cos, logit = torch.tensor([0.30, 0.25]), torch.tensor([1.0, -2.0])
    torch.testing.assert_close(model.final_score(cos, logit), logit + cos / 0.05)
    torch.testing.assert_close(model.final_score(cos, logit, weight=0.5), logit + cos / 0.5)

    pos, neg = torch.tensor([2.0, -1.0]), torch.tensor([[0.5, -3.0], [1.0, 0.0]])
    expected = torch.cat([F.softplus(-pos), F.softplus(neg.flatten())]).mean()  # BCE with labels 1 / 0
    torch.testing.assert_close(model.matching_loss(pos, neg), expected)


def test_matching_loss_decreases_on_a_tiny_fixed_batch():
    torch.manual_seed(0)
    cfg = small_config()
    model = CrossTVR(cfg)
    x = random_inputs(cfg, B=8)
    opt = torch.optim.AdamW(model.reranker.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        logits = model.reranker(**x)
        loss = model.matching_loss(logits[:4], logits[4:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("spatial", ["attention", "cls", "flat"])
def test_text_and_video_sides_get_gradient_from_the_first_step(spatial):
    """With the head at zero, only the alignment term carries the caption-video interaction at step 0:
    both the text projection and the video side must receive gradient (they got none before it)."""
    torch.manual_seed(0)
    cfg = small_config(spatial=spatial)
    reranker = Reranker(cfg)
    x = random_inputs(cfg, B=6)
    logits = reranker(**x)
    F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0, 0, 1, 0, 0])).backward()
    video_side = getattr(reranker, {"attention": "patch_proj", "cls": "cls_proj", "flat": "flat_mlp"}[spatial])
    video_side = video_side[0] if spatial == "flat" else video_side
    assert reranker.text_proj.weight.grad.abs().sum() > 0
    assert video_side.weight.grad.abs().sum() > 0
    assert logits.std() > 0  # the alignment term already depends on the pair


# ----------------------------------------------------------------------------- toy tasks
#
# Synthetic stand-ins for the cache. Patch tokens look like a frozen ViT's last block: a large
# per-frame vector shared by all patches (cosine ~0.98 within a frame) plus small per-patch detail;
# "objects" are fixed feature vectors added to one patch. Text tokens carry a position code, as
# CLIP's do, and the EOT token summarises the caption in an order-aware way.


class ToyWorld:
    """The fixed vocabulary shared by training and held-out pairs."""

    def __init__(self, n_objects: int = 3, patches: int = 9, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n_objects, self.P = n_objects, patches
        self.obj_feat = F.normalize(torch.randn(n_objects, W, generator=g), dim=-1) * 2.0
        self.obj_word = torch.randn(n_objects, WT, generator=g)
        self.pos_word = torch.randn(patches, WT, generator=g)
        self.text_pos = torch.randn(L, WT, generator=g)
        self.sot, self.eot = torch.randn(2, WT, generator=g)
        self.mix = torch.randn(2, WT, WT, generator=g) / WT**0.5

    def captions(self, w1: torch.Tensor, w2: torch.Tensor, g: torch.Generator):
        """Two content words [n, Wt] each -> text tokens [n, L, Wt] and lengths [n]."""
        n = w1.shape[0]
        eot = self.eot + w1 @ self.mix[0].T + w2 @ self.mix[1].T  # [n, Wt]
        filler = torch.randn(n, WT, generator=g) * 0.5
        fill = torch.rand(n, generator=g) < 0.5  # half the captions get one extra word first
        tokens = torch.zeros(n, L, WT)
        tokens[:, 0] = self.sot
        f = fill[:, None]
        tokens[:, 1] = torch.where(f, filler, w1)
        tokens[:, 2] = torch.where(f, w1, w2)
        tokens[:, 3] = torch.where(f, w2, eot)
        tokens[:, 4] = torch.where(f, eot, torch.zeros(()))
        lengths = 4 + fill.long()
        tokens = tokens + self.text_pos * (torch.arange(L)[None, :] < lengths[:, None])[..., None]
        return tokens, lengths

    def frames(self, n: int, T: int, g: torch.Generator):
        shared = torch.randn(n, T, 1, W, generator=g) * 3.0
        patches = shared + 0.3 * torch.randn(n, T, self.P, W, generator=g)  # [n, T, P, W]
        return patches, torch.randn(n, T, W, generator=g), torch.randn(n, T, E, generator=g)

    def place(self, obj: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Object features [.., W] put at patch index where [..] -> [.., P, W]."""
        return F.one_hot(where, self.P)[..., None].float() * self.obj_feat[obj][..., None, :]


def spatial_pairs(world: ToyWorld, n: int, T: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Caption "object o at patch p". The positive has o at p in one frame k; its hard negative is
    the same video with o at another patch of frame k. Other frames hold other objects anywhere."""
    idx = lambda hi, shape=(n,): torch.randint(hi, shape, generator=g)  # noqa: E731
    o, p, k = idx(world.n_objects), idx(world.P), idx(T)
    q = (p + 1 + idx(world.P - 1)) % world.P  # another patch
    patches, cls, embeds = world.frames(n, T, g)
    distractor = (o[:, None] + 1 + idx(world.n_objects - 1, (n, T))) % world.n_objects  # never o
    in_k = F.one_hot(k, T).bool()  # [n, T]
    patches = patches + world.place(distractor, idx(world.P, (n, T))) * ~in_k[..., None, None]
    cls = cls + in_k[..., None] * world.obj_feat[o][:, None]  # the class token knows o, not where
    target = in_k[..., None, None]
    pos = patches + target * world.place(o, p)[:, None]
    neg = patches + target * world.place(o, q)[:, None]
    text, lengths = world.captions(world.obj_word[o], world.pos_word[p], g)
    mask = torch.ones(n, T, dtype=torch.bool)
    return dict(text=text, lengths=lengths, pos_patch=pos, neg_patch=neg, pos_cls=cls, neg_cls=cls,
                pos_embeds=embeds, neg_embeds=embeds, mask=mask)


def temporal_pairs(world: ToyWorld, n: int, T: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Caption "a, then b". The positive shows a in an earlier frame than b; the negative is the
    same frames played backwards. Videos have 3..T valid frames; padded slots hold noise."""
    a = torch.randint(world.n_objects, (n,), generator=g)
    b = (a + 1 + torch.randint(world.n_objects - 1, (n,), generator=g)) % world.n_objects
    n_valid = torch.randint(3, T + 1, (n,), generator=g)
    first = (torch.rand(n, generator=g) * n_valid).long()
    second = (first + 1 + (torch.rand(n, generator=g) * (n_valid - 1)).long()) % n_valid
    i, j = torch.minimum(first, second), torch.maximum(first, second)
    patches, cls, embeds = world.frames(n, T, g)
    for t, obj in ((i, a), (j, b)):
        at = F.one_hot(t, T).bool()  # [n, T]
        where = torch.randint(world.P, (n, T), generator=g)
        patches = patches + at[..., None, None] * world.place(obj[:, None].expand(n, T), where)
        cls = cls + at[..., None] * world.obj_feat[obj][:, None]
        embeds = embeds + at[..., None] * world.obj_feat[obj][:, None]
    slots = torch.arange(T)[None, :]
    mask = slots < n_valid[:, None]
    backwards = torch.where(mask, n_valid[:, None] - 1 - slots, slots)  # [n, T]
    rev = lambda x: torch.gather(x, 1, backwards.view(n, T, *[1] * (x.dim() - 2)).expand_as(x))  # noqa: E731
    text, lengths = world.captions(world.obj_word[a], world.obj_word[b], g)
    return dict(text=text, lengths=lengths, pos_patch=patches, neg_patch=rev(patches), pos_cls=cls,
                neg_cls=rev(cls), pos_embeds=embeds, neg_embeds=rev(embeds), mask=mask)


def rerank_pairs(model: CrossTVR, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of each caption with its positive and with its negative video."""
    n = batch["text"].shape[0]
    logits = model.reranker(
        batch["text"].repeat(2, 1, 1), batch["lengths"].repeat(2),
        torch.cat([batch["pos_patch"], batch["neg_patch"]]), torch.cat([batch["pos_cls"], batch["neg_cls"]]),
        batch["mask"].repeat(2, 1),
    )
    return logits[:n], logits[n:]


def first_stage_pairs(model: CrossTVR, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    fs = model.first_stage
    text = fs.encode_text(torch.randn(batch["text"].shape[0], E))
    pos = (text * fs.encode_video(batch["pos_embeds"], batch["mask"])).sum(-1)
    neg = (text * fs.encode_video(batch["neg_embeds"], batch["mask"])).sum(-1)
    return pos, neg


def train_on_toy(model: CrossTVR, make_pairs, steps: int = 400, n: int = 48, lr: float = 2e-3) -> float:
    """AdamW on fresh toy pairs each step (positive + its hard negative); returns the last loss."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.reranker.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        pos, neg = rerank_pairs(model, make_pairs(n, g))
        loss = model.matching_loss(pos, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_spatial_attention_finds_where_the_object_is(one_thread):
    torch.manual_seed(0)
    world, T = ToyWorld(), 3
    model = CrossTVR(small_config(frames=T, patches=world.P))
    make = lambda n, g: spatial_pairs(world, n, T, g)  # noqa: E731
    held_out = make(256, torch.Generator().manual_seed(999))

    with torch.no_grad():
        fs_pos, fs_neg = first_stage_pairs(model, held_out)
    assert torch.equal(fs_pos, fs_neg)  # mean pooling of frame embeddings cannot tell them apart

    baseline = CrossTVR(small_config(frames=T, patches=world.P, spatial="cls"))
    randomise_head(baseline.reranker)
    with torch.no_grad():
        cls_pos, cls_neg = rerank_pairs(baseline, held_out)
    assert torch.equal(cls_pos, cls_neg)  # nor can a reranker that only sees class tokens

    train_on_toy(model, make)
    with torch.no_grad():
        pos, neg = rerank_pairs(model.eval(), held_out)
    accuracy = (pos > neg).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.slow
def test_temporal_attention_finds_the_order(one_thread):
    torch.manual_seed(0)
    world, T = ToyWorld(), 4
    model = CrossTVR(small_config(frames=T, patches=world.P))
    make = lambda n, g: temporal_pairs(world, n, T, g)  # noqa: E731
    held_out = make(256, torch.Generator().manual_seed(999))

    with torch.no_grad():
        fs_pos, fs_neg = first_stage_pairs(model, held_out)
    torch.testing.assert_close(fs_pos, fs_neg, atol=1e-6, rtol=0)  # same frames, another order

    train_on_toy(model, make)
    with torch.no_grad():
        pos, neg = rerank_pairs(model.eval(), held_out)
    accuracy = (pos > neg).float().mean().item()
    assert accuracy > 0.9, accuracy
