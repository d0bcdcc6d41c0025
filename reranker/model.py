"""The CrossTVR model in one file: first stage and decoupled cross-attention reranker.

Everything here works on the frozen CLIP outputs stored in the cache, never on pixels:

- FirstStage: projections of frame and caption embeddings, temporal pooling ('mean' = CLIP4Clip
  meanP, 'transformer' = CLIP4Clip seqTransf), cosine similarity and the symmetric InfoNCE loss.
  At initialisation it IS zero-shot CLIP retrieval (identity projections, zero residual branch).
- Reranker: the query set (the caption's text tokens, each mixed with its neighbours, plus a few
  learnable queries) first attends to the patch tokens of each frame separately (spatial cross
  attention -> one token per frame: what the queries read there), then across time (temporal
  cross attention) to those readings and to a caption-independent summary of each frame; one
  logit per (caption, video) pair is a matching head on the pooled query set plus an alignment
  term (each query against what it read from the video), which gives the interaction a
  first-order gradient from the first step.
- CrossTVR: both, built from one ModelConfig, with the final score and the matching loss.

Shape letters: B pairs or videos, N captions, T frame slots, P patches per frame (no CLS),
W patch width, L text tokens, Wt text width, E joint embedding width, D reranker width,
Q learnable queries, K candidate videos of one caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPORAL_MODES = ("mean", "transformer")
SPATIAL_MODES = ("attention", "cls", "flat")


@dataclass
class ModelConfig:
    """All hyperparameters of CrossTVR; plain values so dataclasses.asdict(config) is JSON."""

    # widths of the frozen CLIP outputs in the cache
    embed_dim: int = 512  # E: joint image-text embedding
    patch_width: int = 768  # W: vision transformer width (patch and class tokens)
    text_width: int = 512  # Wt: text transformer width
    frames: int = 12  # T: frame slots per video
    patches: int = 49  # P: grid patches per frame, class token excluded
    patch_pool: int = 1  # average k x k neighbouring patches before the spatial stage (keys / k^2)
    spatial_queries: str = "learned"  # per frame: 'learned' (the Q queries, caption-aware) | 'all' (+ text tokens)
    # first stage
    temporal: str = "mean"  # 'mean' (meanP) | 'transformer' (seqTransf)
    temporal_layers: int = 4
    temporal_heads: int = 8
    logit_scale_init: float = math.log(1 / 0.07)  # as CLIP
    logit_scale_max: float = 100.0
    # reranker
    spatial: str = "attention"  # 'attention' (product) | 'cls' | 'flat' (baselines)
    share_attention: bool = False  # one set of blocks for the spatial and temporal stages
    dim: int = 256  # D
    n_queries: int = 4  # Q learnable queries, always valid members of the query set
    heads: int = 4
    layers: int = 1  # cross-attention blocks per stage
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pos_init_std: float = 1.0  # patch and temporal position embeddings; 0.02 hid frame order
    align_scale_init: float = 10.0  # learnable weight of the query/answer alignment term (see Reranker.match)
    # final score = rerank_logit + first_stage_cos / score_weight
    score_weight: float = 0.05

    def __post_init__(self) -> None:
        if self.temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, got {self.temporal!r}")
        if self.spatial not in SPATIAL_MODES:
            raise ValueError(f"spatial must be one of {SPATIAL_MODES}, got {self.spatial!r}")
        if self.share_attention and self.spatial != "attention":
            raise ValueError("share_attention needs spatial='attention' (there is nothing to share)")
        if min(self.dim, self.heads, self.layers) < 1:
            raise ValueError(f"dim, heads and layers must be >= 1, got {self.dim}, {self.heads}, {self.layers}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.temporal == "transformer" and self.embed_dim % self.temporal_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by temporal_heads {self.temporal_heads}")
        grid = math.isqrt(self.patches)
        if self.patch_pool < 1 or grid * grid != self.patches and self.patch_pool > 1 or grid % self.patch_pool:
            raise ValueError(f"patch_pool {self.patch_pool} must divide the patch grid side {grid} (P={self.patches})")
        if self.spatial != "cls" and self.patches // self.patch_pool**2 < 2:
            # centring a frame's only patch leaves zeros: the reranker would never see the video
            raise ValueError(f"patch_pool {self.patch_pool} leaves one patch per frame (P={self.patches}); need at least 2")
        if self.spatial_queries not in ("learned", "all"):
            raise ValueError(f"spatial_queries must be 'learned' or 'all', got {self.spatial_queries!r}")
        if self.n_queries < 1:
            raise ValueError("n_queries must be >= 1: the learnable queries keep every attention row non-empty")
        if self.score_weight <= 0:
            raise ValueError("score_weight must be > 0")


# ----------------------------------------------------------------------------- building blocks


class Attention(nn.Module):
    """Multi-head attention of queries over a context; key_mask [B, M] is True where a key counts."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, self.kv(context), key_mask)

    def attend(self, x: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention to keys and values already projected (self.kv of the context [B, M, 2D]): contexts shared by
        several query sets are projected once."""
        B, N, D = x.shape
        M = kv.shape[1]
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)  # [B, h, N, D/h]
        k, v = kv.split(D, dim=-1)
        k = k.view(B, M, h, D // h).transpose(1, 2)  # [B, h, M, D/h]
        v = v.view(B, M, h, D // h).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, M]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class SelfBlock(nn.Module):
    """Pre-norm transformer block (the first stage's temporal transformer)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.ln_2(x))


class CrossBlock(nn.Module):
    """Pre-norm block: the query set talks among itself, then attends to the keys, then an MLP.

    Self attention first lets every query (the learnable ones included) carry the whole caption
    into its own cross attention, so a query can look for "the dog on the left" at once; on the
    toy tasks this learned more reliably than cross attention first. Callers run talk, keys_values and
    look in turn: the spatial stage talks once per caption, not once per frame, and the temporal stage
    keeps what each query said (after talk) for the alignment term.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads, dropout)
        self.ln_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def talk(self, x: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Self attention within the query set."""
        h = self.ln_self(x)
        return x + self.self_attn(h, h, query_mask)

    def keys_values(self, context: torch.Tensor) -> torch.Tensor:
        """The cross attention's keys and values of a context [..., M, D] -> [..., M, 2D]."""
        return self.cross.kv(self.ln_kv(context))

    def look(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross attention to keys and values (what keys_values made of the context), then the MLP:
        (new query states, what each query read from the keys)."""
        answer = self.cross.attend(self.ln_q(x), kv, kv_mask)
        x = x + answer
        return x + self.mlp(self.ln_mlp(x)), answer


def _init_weights(module: nn.Module) -> None:
    """Linears and convolutions N(0, 1/fan_in) with zero bias, so every activation starts at unit scale.

    nanoGPT's N(0, 0.02) left attention uniform and the video-dependent part of the residual
    stream tiny next to what AdamW's first steps add: the reranker sat at loss ln 2.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)  # fan_in: in_features (x kernel size)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, C] over the slots where mask [B, T] is True -> [B, C]."""
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))  # padded slots may hold anything
    return x.sum(1) / mask.sum(1, keepdim=True).to(x.dtype)


def pool_patches(patch_tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Average k x k neighbouring patches of the square grid: [B, T, P, W] -> [B, T, P / k^2, W].

    Fewer keys make the spatial stage k^2 times cheaper; a 4 x 4 grid still tells left from right.
    """
    if k == 1:
        return patch_tokens
    B, T, P, W = patch_tokens.shape
    g = math.isqrt(P)
    x = patch_tokens.reshape(B, T, g // k, k, g // k, k, W).mean(dim=(3, 5))  # [B, T, g/k, g/k, W]
    return x.reshape(B, T, (g // k) ** 2, W)


def centre_patches(patch_tokens: torch.Tensor) -> torch.Tensor:
    """Subtract each frame's mean patch token: [B, T, P, W] -> [B, T, P, W].

    Last-block patch tokens of a frozen ViT are nearly identical within a frame (mean cosine
    0.98); what tells one patch from another is the small residual around the frame's mean.
    """
    return patch_tokens - patch_tokens.mean(dim=-2, keepdim=True)


# ----------------------------------------------------------------------------- first stage


class FirstStage(nn.Module):
    """Candidate selection: cosine similarity of projected, temporally pooled CLIP embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E = config.embed_dim
        self.video_proj = nn.Linear(E, E, bias=False)
        self.text_proj = nn.Linear(E, E, bias=False)
        if config.temporal == "transformer":
            self.temporal_ln_in = nn.LayerNorm(E)
            self.frame_pos = nn.Parameter(torch.zeros(config.frames, E))
            self.temporal_blocks = nn.ModuleList(
                SelfBlock(E, config.temporal_heads, config.mlp_ratio, config.dropout) for _ in range(config.temporal_layers)
            )
            self.temporal_ln_out = nn.LayerNorm(E)
            self.temporal_out = nn.Linear(E, E)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero-shot CLIP exactly: identity projections, zero output of the temporal branch."""
        _init_weights(self)
        nn.init.eye_(self.video_proj.weight)
        nn.init.eye_(self.text_proj.weight)
        if self.config.temporal == "transformer":
            nn.init.normal_(self.frame_pos, std=self.config.pos_init_std)
            nn.init.zeros_(self.temporal_out.weight)
            nn.init.zeros_(self.temporal_out.bias)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.logit_scale_init)

    def encode_video(self, frame_embeds: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Frame embeddings [B, T, E] and mask [B, T] -> unit-norm video embeddings [B, E]."""
        x = self.video_proj(frame_embeds)  # [B, T, E]
        if self.config.temporal == "transformer":
            T = x.shape[1]
            h = self.temporal_ln_in(x) + self.frame_pos[:T]  # CLIP embeddings are not normalised
            for block in self.temporal_blocks:
                h = block(h, frame_mask)
            x = x + self.temporal_out(self.temporal_ln_out(h))  # residual as seqTransf; zero at init
        x = F.normalize(x, dim=-1)
        return F.normalize(masked_mean(x, frame_mask), dim=-1)  # [B, E]

    def encode_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Caption embeddings [N, E] -> unit-norm [N, E]."""
        return F.normalize(self.text_proj(text_embeds), dim=-1)

    def forward(self, text_embeds: torch.Tensor, frame_embeds: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every caption with every video: [N, B]."""
        return self.encode_text(text_embeds) @ self.encode_video(frame_embeds, frame_mask).T

    def scale(self) -> torch.Tensor:
        """Learnable inverse temperature, clamped like CLIP's."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def contrastive_loss(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of N matching (caption, video) embeddings [N, E]."""
        logits = self.scale() * text_emb.float() @ video_emb.float().T  # [N, N]
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ----------------------------------------------------------------------------- reranker


@dataclass
class EncodedFrames:
    """The caption-independent part of the spatial stage for B videos (Reranker.encode_frames), computed once
    per video and shared by every caption that meets it; `frames[rows]` picks videos."""

    summary: torch.Tensor  # [B, T, D]: one token per frame
    keys: tuple[torch.Tensor, ...] = ()  # 'attention': per spatial block, its projected keys/values [B, T, M, 2D]

    def __getitem__(self, rows) -> "EncodedFrames":
        return EncodedFrames(self.summary[rows], tuple(k[rows] for k in self.keys))

    @staticmethod
    def cat(parts: list["EncodedFrames"]) -> "EncodedFrames":
        """The videos of several parts, in order, as one."""
        return EncodedFrames(torch.cat([p.summary for p in parts]),
                             tuple(torch.cat(keys) for keys in zip(*(p.keys for p in parts))))


class Reranker(nn.Module):
    """Decoupled spatial/temporal cross attention from a caption's query set to a video."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, W = config.dim, config.patch_width
        block = lambda: CrossBlock(D, config.heads, config.mlp_ratio, config.dropout)  # noqa: E731

        # query set: projected text tokens + learnable queries
        self.text_ln = nn.LayerNorm(config.text_width)
        self.text_proj = nn.Linear(config.text_width, D)
        self.queries = nn.Parameter(torch.zeros(config.n_queries, D))
        # each text token mixed with its two neighbours (see encode_queries)
        self.text_mix = nn.Conv1d(D, D, kernel_size=3, padding=1)

        # spatial stage: frame -> one frame token
        pooled = config.patches // config.patch_pool**2  # patches per frame after pooling
        if config.spatial in ("attention", "cls"):
            self.cls_ln = nn.LayerNorm(W)
            self.cls_proj = nn.Linear(W, D)
        if config.spatial in ("attention", "flat"):
            # the frame's summary: its centred patches, in place, through an MLP
            self.flat_ln = nn.LayerNorm(W)
            self.flat_mlp = nn.Sequential(nn.Linear(pooled * W, D), nn.GELU(), nn.Linear(D, D))
        if config.spatial == "attention":
            # keys: the class token and the centred patches (+ position, so left/right is visible)
            self.patch_ln = nn.LayerNorm(W)
            self.patch_proj = nn.Linear(W, D)
            self.patch_pos = nn.Parameter(torch.zeros(pooled, D))
            self.spatial_blocks = nn.ModuleList(block() for _ in range(config.layers))
            # the readings join the frame summaries as temporal keys of their own, marked by a type embedding
            self.read_ln = nn.LayerNorm(D)
            self.read_type = nn.Parameter(torch.zeros(D))

        # temporal stage: the query set attends across the frame tokens
        self.frame_ln = nn.LayerNorm(D)
        # change tokens (see match): a type embedding tells them from the frame summaries
        self.change_ln = nn.LayerNorm(D)
        self.change_type = nn.Parameter(torch.zeros(D))
        self.frame_pos = nn.Parameter(torch.zeros(config.frames, D))
        if not config.share_attention:
            self.temporal_blocks = nn.ModuleList(block() for _ in range(config.layers))

        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 1))
        # alignment: each query's own text against what it read from the video (see match)
        self.align_text = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))
        self.align_video = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))
        self.align_scale = nn.Parameter(torch.tensor(config.align_scale_init))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_weights(self)
        # a zero head starts every logit at 0: its first gradient is the features' correlation with
        # the label, instead of a push to silence random logits that also silenced the features
        nn.init.zeros_(self.head[1].weight)
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.frame_pos, std=self.config.pos_init_std)
        nn.init.normal_(self.change_type, std=self.config.pos_init_std)
        if self.config.spatial == "attention":
            nn.init.normal_(self.patch_pos, std=self.config.pos_init_std)
            nn.init.normal_(self.read_type, std=self.config.pos_init_std)

    def _temporal_blocks(self) -> nn.ModuleList:
        # sharing by lookup, not by registering one module twice, keeps state_dict free of aliases
        return self.spatial_blocks if self.config.share_attention else self.temporal_blocks

    def encode_queries(self, text_tokens: torch.Tensor, text_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens [B, L, Wt], lengths [B] -> query set [B, Q+L', D] and its mask [B, Q+L'].

        L' = the longest caption in the batch: the padding past it would only cost compute. Each projected text
        token gets a residual mix of itself and its two neighbours (a width-3 convolution; padding is zeroed
        first, so it never leaks in): "blue" and "triangle" side by side become one phrase before any attention,
        which early text tokens (word and position embeddings only) do not do on their own (measured on the
        synthetic set: t2v R@1 +1.7, +1.0, +1.5 on seeds 0, 1, 7; docs/benchmarks.md).
        """
        B = text_tokens.shape[0]
        L = int(text_lengths.max().clamp(min=1, max=text_tokens.shape[1]))
        text = self.text_proj(self.text_ln(text_tokens[:, :L]))  # [B, L', D]
        text_mask = torch.arange(L, device=text_tokens.device)[None, :] < text_lengths[:, None]  # [B, L']
        text = text.masked_fill(~text_mask[..., None], 0.0)
        text = text + self.text_mix(F.gelu(text).transpose(1, 2)).transpose(1, 2)  # [B, L', D]
        learned = self.queries.to(text.dtype).expand(B, -1, -1)  # [B, Q, D]
        queries = torch.cat([learned, text], dim=1)  # [B, Q+L', D]
        mask = torch.cat([torch.ones(B, learned.shape[1], dtype=torch.bool, device=text_mask.device), text_mask], dim=1)
        return queries, mask

    @property
    def video_inputs(self) -> tuple[str, ...]:
        """The cached video arrays this reranker reads; loaders read nothing else (patch tokens are most of
        a video's bytes, and 'cls' does not need them)."""
        frames = {"cls": ("cls_tokens",), "flat": ("patch_tokens",)}.get(self.config.spatial, ("patch_tokens", "cls_tokens"))
        return frames + ("frame_mask",)

    def encode_frames(self, patch_tokens: torch.Tensor | None, cls_tokens: torch.Tensor | None) -> EncodedFrames:
        """Caption-independent part of the spatial stage, computed once per video whatever meets it.

        Every mode: a summary token per frame ('cls': the projected class token; 'flat' and 'attention':
        the frame's centred patches, in place, through an MLP). 'attention' also: each spatial block's
        keys and values of [class token, centred patches + position] [B, T, 1+P, 2D], projected here once
        instead of once per (caption, video) pair. The input a mode does not read (see video_inputs) may be None.
        """
        spatial = self.config.spatial
        if spatial == "cls":
            return EncodedFrames(self.cls_proj(self.cls_ln(cls_tokens)))  # [B, T, D]
        centred = centre_patches(pool_patches(patch_tokens, self.config.patch_pool))  # [B, T, P/k^2, W]
        summary = self.flat_mlp(self.flat_ln(centred).flatten(2))  # [B, T, P*W] -> [B, T, D]
        if spatial == "flat":
            return EncodedFrames(summary)
        patches = self.patch_proj(self.patch_ln(centred)) + self.patch_pos[: centred.shape[2]]  # [B, T, P, D]
        cls = self.cls_proj(self.cls_ln(cls_tokens))  # [B, T, D]
        keys = torch.cat([cls[:, :, None], patches], dim=2)  # [B, T, 1+P, D]
        return EncodedFrames(summary, tuple(block.keys_values(keys) for block in self.spatial_blocks))

    def read_frames(self, queries: torch.Tensor, query_mask: torch.Tensor, frames: EncodedFrames) -> torch.Tensor:
        """Spatial stage of 'attention' -> one reading per frame [B, T, D]: what the query set read from each
        frame by cross attention to its patches (the caption decides where to look)."""
        B, T, M, D2 = frames.keys[0].shape
        D = D2 // 2
        # The first block's self attention sees the same query set for every frame: compute it once
        # per pair, then give every frame its own copy (the spatial stage's main cost otherwise).
        x = self.spatial_blocks[0].talk(queries, query_mask)  # [B, N, D]
        x_mask = query_mask
        if self.config.spatial_queries == "learned":
            # Only the learnable queries, which have just read the whole caption, look at each frame:
            # per-frame cost no longer grows with the caption's length.
            x, x_mask = x[:, : self.config.n_queries], query_mask[:, : self.config.n_queries]
        N = x.shape[1]
        x = x[:, None].expand(B, T, N, D).reshape(B * T, N, D)
        x_mask = x_mask[:, None].expand(B, T, N).reshape(B * T, N)
        for i, (block, kv) in enumerate(zip(self.spatial_blocks, frames.keys)):
            if i > 0:
                x = block.talk(x, x_mask)
            x = block.look(x, kv.reshape(B * T, M, D2), None)[0]  # [B*T, N, D]
        return masked_mean(x, x_mask).view(B, T, D)  # every valid query's answer, pooled

    def match(
        self, queries: torch.Tensor, query_mask: torch.Tensor, frames: EncodedFrames, frame_mask: torch.Tensor
    ) -> torch.Tensor:
        """Query sets [B, Q+L, D] against encoded frames (see encode_frames) -> logits [B].

        Temporal keys: each frame's summary, each change from one frame to the next and, for 'attention', each
        frame's reading (read_frames), all with the frame's position.

        logit = head(mean of the final query states) + align_scale * mean over the valid queries of
        cos(query in the caption's context, what it read from the video in the last temporal cross
        attention). The head alone sees text and video only through a product the network has to build
        first: from a zero head its gradient is second order and the reranker sat at the prior loss, even
        against random negatives. The alignment term is first order in both sides (a word that finds what
        it says scores high), so it learns from the first step, while the head adds what it can. Its text
        side is each query after the block's self attention, not the bare token: "ball" in "first a ball,
        then a box" and in "a box, then a ball" must expect different things (measured on the synthetic
        set: t2v R@1 42.3 -> 45.3, direction twins 46.2 -> 57.5; docs/benchmarks.md).
        """
        T = frames.summary.shape[1]
        pos = self.frame_pos[:T].to(frames.summary.dtype)
        # LayerNorm + std-1 positions: without them the reranker collapsed and could not see order
        kv, kv_mask = self.frame_ln(frames.summary) + pos, frame_mask  # [B, T, D], [B, T]
        # Change tokens: each frame's summary minus the previous one's, at the frame's position. An object that
        # appears, vanishes or moves is one key at one time, instead of a difference the query set has to
        # find between two keys (measured on the synthetic set: t2v R@1 +1.2 to +3.9 on 3 seeds, direction
        # twins the most; docs/benchmarks.md).
        change = self.change_ln(frames.summary[:, 1:] - frames.summary[:, :-1]) + pos[1:] + self.change_type
        kv = torch.cat([kv, change], dim=1)  # [B, 2T-1, D]
        kv_mask = torch.cat([kv_mask, frame_mask[:, 1:] & frame_mask[:, :-1]], dim=1)
        if frames.keys:
            # 'attention': each frame's reading is a key of its own beside the frame's summary, not added to it
            # (added, it blurred the summary's motion: direction twins 48.8 vs 57.5 for flat; docs/benchmarks.md)
            reading = self.read_ln(self.read_frames(queries, query_mask, frames)) + pos + self.read_type
            kv, kv_mask = torch.cat([kv, reading], dim=1), torch.cat([kv_mask, frame_mask], dim=1)  # [B, 3T-1, ...]
        x = queries
        for block in self._temporal_blocks():
            said = block.talk(x, query_mask)  # each query in the caption's context
            x, answer = block.look(said, block.keys_values(kv), kv_mask)  # [B, Q+L, D] each
        align = (F.normalize(self.align_text(said), dim=-1) * F.normalize(self.align_video(answer), dim=-1)).sum(-1)
        align = masked_mean(align[..., None], query_mask).squeeze(-1)  # [B]
        return self.head(masked_mean(x, query_mask)).squeeze(-1) + self.align_scale * align  # [B]

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_lengths: torch.Tensor,
        patch_tokens: torch.Tensor,
        cls_tokens: torch.Tensor,
        frame_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One matching logit for each of B (caption, video) rows: [B]."""
        queries, query_mask = self.encode_queries(text_tokens, text_lengths)
        return self.match(queries, query_mask, self.encode_frames(patch_tokens, cls_tokens), frame_mask)

    def score_candidates(
        self,
        text_tokens: torch.Tensor,
        text_length: torch.Tensor | int,
        patch_tokens: torch.Tensor | None,
        cls_tokens: torch.Tensor | None,
        frame_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One caption (tokens [L, Wt], length) against K candidate videos ([K, T, P, W], ...) -> logits [K].

        The caption is encoded once and broadcast over the candidates.
        """
        K = frame_mask.shape[0]
        length = torch.as_tensor(text_length, device=text_tokens.device).reshape(1)
        queries, query_mask = self.encode_queries(text_tokens[None], length)  # [1, Q+L, D]
        frames = self.encode_frames(patch_tokens, cls_tokens)
        return self.match(queries.expand(K, -1, -1), query_mask.expand(K, -1), frames, frame_mask)


# ----------------------------------------------------------------------------- CrossTVR


class CrossTVR(nn.Module):
    """First stage + reranker, built from one ModelConfig.

    Retrieval: the first stage's cosine picks the top_k candidates of a caption; the reranker
    scores each candidate, and the final score combines both (see final_score).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.first_stage = FirstStage(config)
        self.reranker = Reranker(config)

    def final_score(
        self, first_stage_cos: torch.Tensor, rerank_logit: torch.Tensor, weight: float | None = None
    ) -> torch.Tensor:
        """Final score = rerank_logit + first_stage_cos / weight (weight defaults to config.score_weight, 0.05).

        The weight is a temperature on the cosine: 0.05 puts a cosine gap of 0.01 on the same
        footing as a reranker logit gap of 0.2; a large weight lets the reranker decide alone.
        """
        weight = self.config.score_weight if weight is None else weight
        return rerank_logit + first_stage_cos / weight

    @staticmethod
    def matching_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over all pairs: positives labelled 1, negatives 0 (any shapes)."""
        logits = torch.cat([pos_logits.flatten(), neg_logits.flatten()]).float()
        labels = torch.cat([torch.ones_like(pos_logits.flatten()), torch.zeros_like(neg_logits.flatten())]).float()
        return F.binary_cross_entropy_with_logits(logits, labels)

    def num_params(self) -> dict[str, int]:
        """Trainable parameter counts of each part and in total."""
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        return {"first_stage": count(self.first_stage), "reranker": count(self.reranker), "total": count(self)}
