"""Stage two: train the first stage and the reranker from cached tensors only (no decoding, no CLIP)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline import files
from pipeline.cache import FeatureCache, first_mismatch
from pipeline.encoder import autocast, default_device
from pipeline.errors import UserError, cut, first_line
from pipeline.files import check_output_path, held_lock, kept_checkpoint, save_checkpoint, write_text_atomic
from reranker.data import RERANKER_TEXT_ARRAYS, SplitFeatures, to_device
from reranker.model import CrossTVR, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of `cli.py train-reranker`; saved resolved as config.json in the run folder."""

    cache: str = ""
    run: str = ""
    split: str = "train"
    val_split: str = "val"
    epochs: int = 12  # passes over the videos as anchors (each anchor brings its hard negatives)
    batch_size: int = 32  # captions (one per video) per step
    hard_negatives: int = 1  # the caption's top first-stage candidates, its own video excluded
    neighbour_negatives: int = 1  # the videos nearest to the caption's own video in the first stage (its twins)
    batch_negatives: int = 2  # videos of other anchors' groups in the step (easy negatives; no extra reads)
    lr: float = 2e-3  # reranker
    first_stage_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # steps; the hard-negative bank is refreshed at the same steps
    top_k: int = 15  # for validation
    seed: int = 0
    temporal: str = "mean"
    spatial: str = "flat"  # measured best on the synthetic set (docs/benchmarks.md); attention is the paper's
    share_attention: bool = False
    dim: int = 128
    patch_pool: int = 2  # reduced to 1 when it does not divide the cache's patch grid or leaves a 1 x 1 grid
    n_queries: int = 4
    heads: int = 4
    layers: int = 1
    score_weight: float = 0.05  # final score = logit + first-stage cosine / this: validation's, evaluate's default
    allow_partial: bool = False


def default_run_path() -> Path:
    """runs/<timestamp>: where a run goes without --run."""
    return Path(f"runs/{time.strftime('%Y%m%d-%H%M%S')}")


def model_config_for(cache: FeatureCache, cfg: TrainConfig) -> ModelConfig:
    """The model's widths come from the cache; the rest from the training options."""
    a = cache.attrs
    grid = math.isqrt(a["num_patches"])
    try:
        return ModelConfig(
            embed_dim=a["embed_dim"], patch_width=a["patch_width"], text_width=a["text_width"], frames=a["frames"],
            patches=a["num_patches"], patch_pool=cfg.patch_pool if grid % cfg.patch_pool == 0 and grid > cfg.patch_pool else 1,
            temporal=cfg.temporal, spatial=cfg.spatial, share_attention=cfg.share_attention,
            dim=cfg.dim, n_queries=cfg.n_queries, heads=cfg.heads, layers=cfg.layers, score_weight=cfg.score_weight,
        )
    except ValueError as e:  # e.g. --dim not divisible by --heads, --queries 0
        raise UserError(f"train-reranker options: {e}") from None


def cache_signature(cache: FeatureCache) -> dict:
    """What a trained model depends on in its cache: evaluating on a cache that differs here is refused."""
    keys = ("model", "pretrained", "pretrained_sha256", "frames", "image_size", "patch_layer", "text_layer",
            "max_text_tokens", "num_patches", "patch_width", "text_width", "embed_dim")
    return {k: cache.attrs.get(k) for k in keys}  # text_layer: None in caches older than --text-layer


def check_compatible(trained_on: dict, cache: FeatureCache, run: Path,
                     fix: str = "evaluate it on a cache made with the same model and settings") -> None:
    """Refuse a run trained on a cache made with another model, weights or dimensions."""
    here = cache_signature(cache)
    key = first_mismatch(trained_on, here, trained_on)
    if key is not None:
        raise UserError(f"{run}: trained on a cache with {key}={trained_on[key]!r}, but {cache.path} has "
                        f"{here.get(key)!r}; {fix}")


def split_signature(feats: SplitFeatures) -> dict:
    """Which videos and captions a run trains on: a resumed run must see the same ones (its plan of steps and its
    learning-rate schedule are theirs)."""
    digest = hashlib.sha256(feats.videos.astype(np.int64).tobytes() + feats.texts.astype(np.int64).tobytes())
    return {"videos": feats.n_videos, "captions": feats.n_texts, "sha256": digest.hexdigest()}


# -- checkpoints ----------------------------------------------------------------------------------
# save_checkpoint (atomic, the one before kept as .prev.pt) lives in pipeline.files, shared with pretrain-tiny.
def load_checkpoint(path: Path) -> dict:
    """pipeline.files.load_checkpoint, refusing in the words of a run folder."""
    other = "--checkpoint last (evaluate, search) reads last.pt, or " if path.name == "best.pt" else ""
    return files.load_checkpoint(path, f"{other}train again into a new --run")


def run_config(run: Path) -> dict:
    """A run folder's config.json, refused in one line when it is missing or damaged."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise UserError(f"{run}: not a training run (no config.json); pass --run the folder train-reranker wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        config["cache"]
    except (ValueError, KeyError, TypeError) as e:  # torn or edited by hand: the run cannot be read
        raise UserError(f"{path}: damaged ({first_line(e)}); restore it, or train again into a new --run") from None
    return config


def _check_new_run(run: Path) -> None:
    """Refuse a new run where it would overwrite a config.json or log.jsonl that no run wrote (--run a dataset's
    folder, say); over a run killed before its first checkpoint (its own config.json) it starts again."""
    if not (run / "config.json").exists() and not (run / "log.jsonl").exists():
        return
    try:
        run_config(run)
    except UserError:
        raise UserError(f"{run}: holds a config.json or log.jsonl that is not a train-reranker run's, which a new run "
                        "would overwrite; pass --run a new or empty folder") from None


def recorded_cache(run: Path, config: dict) -> Path:
    """The cache a run was trained on, as its config.json records it; refused in one line when that is a relative
    path that is not here (it is relative to the folder training ran in, as `make demo` records it)."""
    recorded = Path(config["cache"])
    if not recorded.is_absolute() and not recorded.exists():
        raise UserError(f"{recorded}: the cache {run} was trained on, relative to the folder training ran in, is "
                        "not here; run from that folder or pass --cache")
    return recorded


def load_model(run: Path, which: str = "best") -> tuple[CrossTVR, dict]:
    """A trained model from a run folder (best.pt or last.pt) and its run config."""
    run = Path(run)
    run_config(run)
    path = run / f"{which}.pt"
    if kept_checkpoint(path) is None:
        when = "at the end of the first epoch" if which == "best" else "every --checkpoint-every steps"
        raise UserError(f"{path}: no checkpoint yet (it is written {when}); wait for the run, or continue it with "
                        "train-reranker --resume once it has one")
    state = load_checkpoint(path)
    try:
        model = CrossTVR(ModelConfig(**state["model_config"]))
    except TypeError as e:  # a config field this version does not know
        raise _other_version(path, str(e)) from None
    _restore(model, state["model"], path)
    return model.eval(), state


def _other_version(path: Path, detail: str) -> UserError:
    return UserError(f"{path}: made by another version of crosstvr's model ({cut(detail)}); "
                     "train again into a new --run or use the version that wrote it")


def _restore(model: CrossTVR, weights: dict, path: Path) -> None:
    """load_state_dict, with a checkpoint of another model version refused in one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing / unexpected keys or other shapes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise _other_version(path, lines[1] if len(lines) > 1 else lines[0]) from None


# -- the loop -------------------------------------------------------------------------------------
def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def negatives_per_anchor(cfg: TrainConfig) -> int:
    return cfg.hard_negatives + cfg.neighbour_negatives


def anchors_per_step(cfg: TrainConfig) -> int:
    """Captions (one per video) a step starts from; each brings its negatives into a group of 1 + N."""
    return max(2, cfg.batch_size // (1 + negatives_per_anchor(cfg)))


def _any_caption(feats: SplitFeatures, video: int, rng: np.random.Generator) -> int:
    """One of the video's captions, drawn uniformly."""
    captions = feats.captions_of[video]
    return captions[rng.integers(len(captions))]


def _epoch_plan(feats: SplitFeatures, cfg: TrainConfig, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Steps of anchors: (video positions, one caption position per video), shuffled from (seed, epoch).

    Each anchor later brings its negatives into a group (anchors_per_step).
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(feats.n_videos)
    usable = order[feats.has_captions[order]]
    anchors = anchors_per_step(cfg)
    steps = max(1, len(usable) // anchors)
    plan = []
    for s in range(steps):
        vids = usable[s * anchors: (s + 1) * anchors]
        caps = np.array([_any_caption(feats, v, rng) for v in vids])
        plan.append((vids, caps))
    return plan


@torch.no_grad()
def video_bank(model: CrossTVR, feats: SplitFeatures, device: torch.device, block: int = 512) -> torch.Tensor:
    """First-stage embeddings of every video of the split [V, E], streamed from the cache in blocks.

    Float32 on every device, as is the caption side: the first stage is small, and bf16 rounding (~4e-3 on a
    cosine) would reorder near-tied candidates and keep zero-shot from equalling CLIP's own cosine."""
    parts = []
    for lo in range(0, feats.n_videos, block):
        fe, fm = feats.read_frame_embeds(np.arange(lo, min(lo + block, feats.n_videos)))
        parts.append(model.first_stage.encode_video(fe.to(device).float(), fm.to(device)).cpu())
    return torch.cat(parts)


@torch.no_grad()
def _mine_groups(model, feats, bank, caps, vids, cfg, device, rng) -> tuple[np.ndarray, np.ndarray]:
    """Each anchor's group: its video, the videos nearest to it and the caption's top candidates (first stage
    as it is now, its own video never), each with one of its own captions: videos [A, 1+N], captions [A, 1+N].

    The nearest videos are what mean pooling cannot tell apart (a time-reversed or colour-swapped twin):
    exactly the pairs the reranker exists for. Caption candidates alone rarely hold them while the first
    stage is weak.
    """
    anchors = torch.arange(len(vids))
    taken = torch.zeros(len(vids), bank.shape[0], dtype=torch.bool)
    taken[anchors, torch.from_numpy(vids)] = True
    taken[:, torch.from_numpy(~feats.has_captions)] = True  # a negative brings one of its captions (--allow-partial)
    negs = []
    if cfg.neighbour_negatives:
        near = bank[torch.from_numpy(vids)] @ bank.T  # [A, V]
        negs.append(near.masked_fill(taken, -math.inf).topk(cfg.neighbour_negatives, dim=1).indices)
        taken[anchors[:, None], negs[-1]] = True
    if cfg.hard_negatives:
        text = feats.read_text_embeds(caps).to(device).float()
        sims = model.first_stage.encode_text(text).float().cpu() @ bank.T  # [A, V]
        negs.append(sims.masked_fill(taken, -math.inf).topk(cfg.hard_negatives, dim=1).indices)
    negs = torch.cat(negs, 1).numpy()  # [A, N]
    neg_caps = np.array([[_any_caption(feats, u, rng) for u in row] for row in negs])
    return np.concatenate([vids[:, None], negs], 1), np.concatenate([caps[:, None], neg_caps], 1)


def _read_step(feats: SplitFeatures, videos: np.ndarray, captions: np.ndarray, video_inputs: tuple[str, ...]) -> dict:
    """What one step uses and nothing more, read from the cache (runs in a prefetch thread): the reranker's
    inputs (`video_inputs`, Reranker.video_inputs) of every video and caption of the groups [A, G], the first
    stage's embeddings of the anchors (column 0) only."""
    return {"texts": feats.read_texts(captions.reshape(-1), RERANKER_TEXT_ARRAYS),
            "videos": feats.read_videos(videos.reshape(-1), video_inputs),
            "anchor_text_embeds": feats.read_text_embeds(captions[:, 0]),
            "anchor_frame_embeds": feats.read_videos(videos[:, 0], ("frame_embeds",))["frame_embeds"],
            "video_ids": videos, "caption_ids": captions}


def _pairs(A: int, G: int, batch_negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption rows, video rows) of the pairs a step scores, rows of its A groups of G.

    Within a group every caption meets every video: these come first, caption by caption (_forward reads the
    first A * G * G logits as each caption against its group's G videos). Then each caption meets
    `batch_negatives` videos of other groups: for k = 1..n, the (row + k) mod G-th member of the k-th next group,
    so its n videos come from n different groups (n is capped at A - 1). Groups are shuffled, so these are random
    videos: easy negatives, which teach the reranker what the first stage already knows (a named object missing,
    say) without any extra read.
    """
    i, j = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    base = (torch.arange(A) * G)[:, None]
    text_rows, video_rows = (base + i.reshape(1, -1)).reshape(-1), (base + j.reshape(1, -1)).reshape(-1)
    n = min(batch_negatives, A - 1)
    if n > 0:
        rows = torch.arange(A * G).repeat_interleave(n)
        k = torch.arange(1, n + 1).repeat(A * G)
        other = (rows // G + k) % A * G + (rows + k) % G
        text_rows, video_rows = torch.cat([text_rows, rows]), torch.cat([video_rows, other])
    return text_rows, video_rows


def _forward(model: CrossTVR, batch: dict, device: torch.device, batch_negatives: int) -> tuple[torch.Tensor, dict]:
    """First-stage InfoNCE over the anchors, and the reranker's matching loss on the step's pairs (_pairs).

    Within a group every caption meets every video: each video is a positive once and a negative for
    the others' captions, so the reranker cannot win by scoring videos (or captions) on their own.
    """
    A, G = batch["video_ids"].shape  # anchors, group size 1 + N
    t, v = to_device(batch["texts"], device), to_device(batch["videos"], device)  # fp16 -> float32 on the device
    anchors = to_device({k: batch[f"anchor_{k}"] for k in ("text_embeds", "frame_embeds")}, device)
    anchor = torch.arange(A, device=device) * G  # rows of the anchors' own caption and video
    fs = model.first_stage
    contrastive = fs.contrastive_loss(fs.encode_text(anchors["text_embeds"]),
                                      fs.encode_video(anchors["frame_embeds"], v["frame_mask"][anchor]))
    r = model.reranker
    queries, qmask = r.encode_queries(t["text_tokens"], t["text_lengths"])  # [A*G, Q+L, D]
    frames = r.encode_frames(v.get("patch_tokens"), v.get("cls_tokens"))  # per video, shared by its pairs
    text_rows, video_rows = _pairs(A, G, batch_negatives)
    ids = torch.from_numpy(batch["video_ids"].reshape(-1))
    positive = (ids[text_rows] == ids[video_rows]).to(device)  # the diagonal (a repeated video counts too)
    text_rows, video_rows = text_rows.to(device), video_rows.to(device)
    logits = r.match(queries[text_rows], qmask[text_rows], frames[video_rows], v["frame_mask"][video_rows])
    matching = model.matching_loss(logits[positive], logits[~positive])
    per_caption = logits[: A * G * G].float().view(A * G, G)  # each caption against its group's videos
    diag = per_caption[torch.arange(A * G), torch.arange(A * G) % G]
    stats = {"contrastive": contrastive.item(), "matching": matching.item(),
             "logit_spread": per_caption.std(dim=1).mean().item(),
             "pos_above_negs": ((diag[:, None] > per_caption).sum(1).float() / max(G - 1, 1)).mean().item()}
    return contrastive + matching, stats


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size) under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA; else (0, 1).

    device is default_device(), which is already this rank's GPU (LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _average_gradients(model: torch.nn.Module, share: float) -> None:
    """Data parallelism: every rank steps with the mean of all ranks' gradients (what DDP's all-reduce does), each
    rank's weighted by its share of the step's anchors, so that a step whose anchors do not divide evenly (5 on 2
    ranks: 3 and 2) gets the gradient of its mean loss over all of them, as on one process. All of them are
    flattened into one all-reduce, as DDP's buckets are: one call per parameter tensor (54 of them) took 37 ms a step
    with gloo between 2 CPU processes, one call 5 ms."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]) * share
    dist.all_reduce(flat)
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def _average_scalars(values: dict[str, float], share: float, device: torch.device) -> dict[str, float]:
    """A step's logged figures (loss, stats) as their mean over every process's anchors, weighted as the gradients
    are: each process's figures are over its own share of the step."""
    import torch.distributed as dist

    flat = torch.tensor(list(values.values()), dtype=torch.float64, device=device) * share
    dist.all_reduce(flat)
    return dict(zip(values, flat.tolist()))


def _drop_log_after(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step`, the checkpoint a resume starts from: the steps after it run
    again and are logged again (a line cut short by the kill goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(kept))


@contextmanager
def deterministic() -> Iterator[None]:
    """torch's deterministic algorithms inside, the caller's setting restored after.

    A step indexes each video's encoding once for every caption that meets it, and the backward of indexing with
    repeated rows sums those gradients in whatever order the threads finish: on 2 CPU threads two runs of one seed
    were 1e-4 apart in their weights after 70 steps. With them, one seed and one thread count give one run (one
    thread gave one run before too, and gives the same one now).
    warn_only: an op without a deterministic kernel (on CUDA) warns instead of stopping the run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a run; returns the run folder holding config.json, log.jsonl, last.pt and best.pt.

    Under torchrun every rank takes its share of each step's batch and gradients are averaged across
    ranks; rank 0 alone validates and writes the log and checkpoints. One seed gives the same weights on any run
    with the same thread count (see deterministic).
    """
    with deterministic(), ExitStack() as held:
        return _train(cfg, resume, progress, held)


def _resumed_config(run: Path, cache: str) -> TrainConfig:
    """The options run started with, to resume it; cache (--cache) may name its cache where the recorded path is not."""
    if not (run / "config.json").is_file():
        raise UserError(f"{run}: nothing to resume (no config.json); start it without --resume")
    if kept_checkpoint(run / "last.pt") is None:
        raise UserError(f"{run}: nothing to resume yet (killed before its first checkpoint); run the same command "
                        "without --resume to start it again")
    saved = run_config(run)
    saved.setdefault("batch_negatives", 0)  # a run started before the option trained without them
    if not cache:
        recorded_cache(run, saved)
    elif Path(saved["cache"]).exists() and Path(cache).resolve() != Path(saved["cache"]).resolve():
        raise UserError(f"{run}: the run trains on {saved['cache']}, not {cache}; drop --cache or start a new --run")
    else:  # its own cache, or the one named where the recorded path is not (relative to another folder, moved):
        saved["cache"] = cache  # its features and split are checked against the checkpoint's
    return TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})


def _train(cfg: TrainConfig, resume: bool, progress: bool, held: ExitStack) -> Path:
    """train's work; `held` keeps the run folder's lock until it returns."""
    from reranker.evaluate import evaluate_split

    device = default_device()
    rank, world = _distributed(device)
    run = Path(cfg.run) if cfg.run else default_run_path()
    check_output_path(run, "--run", folder=True)
    if resume:
        cfg = _resumed_config(run, cfg.cache)
    elif kept_checkpoint(run / "last.pt") is not None:
        raise UserError(f"{run}: a run is already there; pass --resume to continue it or another --run")
    else:
        _check_new_run(run)
    cache = FeatureCache(Path(cfg.cache))
    if not resume:
        cache.check_outside(run, "--run")  # the cache given as --run, say
    feats = SplitFeatures.open(cache, cfg.split, cfg.allow_partial)
    val, no_val = None, f"no '{cfg.val_split}' split in {cache.path}" if cfg.val_split else "validation off"
    if cfg.val_split and cfg.val_split in set(cache.video_split().tolist()):
        try:
            val = SplitFeatures.open(cache, cfg.val_split, cfg.allow_partial)
        except UserError as e:
            if not cfg.allow_partial:
                raise
            no_val = str(e)
    if val is None and rank == 0:
        log.warning("no validation (%s): best.pt is the latest epoch's weights", no_val)
    if cfg.split == "test" and rank == 0:
        log.warning("training on the 'test' split: retrieval metrics on it afterwards measure memorisation")
    videos = int(feats.has_captions.sum())  # with captions: those a step can use
    if videos < 2:
        raise UserError(f"{cache.path}: split '{cfg.split}' has {videos} video(s) with captions; training needs at least 2")
    n_neg = negatives_per_anchor(cfg)
    if min(cfg.hard_negatives, cfg.neighbour_negatives) < 0 or not 1 <= n_neg < videos:
        raise UserError(f"--hard-negatives {cfg.hard_negatives} + --neighbour-negatives {cfg.neighbour_negatives}: "
                        f"need 1 <= the sum < {videos} videos of '{cfg.split}', neither negative")
    asked, cfg.batch_size = cfg.batch_size, min(cfg.batch_size, videos)
    if anchors_per_step(cfg) < 2 * world:  # each process's InfoNCE needs two of its own
        need = 2 * world * (1 + n_neg)
        fix = (f"pass --batch-size {need} or more" if videos >= need else
               f"'{cfg.split}' has {videos} videos with captions, too few for that: use fewer processes or negatives")
        capped = f" (capped at the split's {videos} videos)" if asked > videos else ""
        raise UserError(f"--batch-size {asked}{capped} starts a step from {anchors_per_step(cfg)} captions ({n_neg} "
                        f"negatives each), fewer than 2 for each of the {world} torchrun processes; {fix}")

    torch.manual_seed(cfg.seed)
    model = CrossTVR(model_config_for(cache, cfg)).to(device)
    if model.config.patch_pool != cfg.patch_pool and rank == 0:
        grid = math.isqrt(model.config.patches)
        log.warning("--patch-pool %d does not divide the %d x %d patch grid (or leaves 1 x 1): the reranker reads all "
                    "%d patches of a frame", cfg.patch_pool, grid, grid, model.config.patches)
    opt = torch.optim.AdamW([
        {"params": model.first_stage.parameters(), "lr": cfg.first_stage_lr, "base_lr": cfg.first_stage_lr},
        {"params": model.reranker.parameters(), "lr": cfg.lr, "base_lr": cfg.lr},
    ], weight_decay=cfg.weight_decay)
    steps_per_epoch = len(_epoch_plan(feats, cfg, 0))
    total = cfg.epochs * steps_per_epoch
    step, best, last_score = 0, -math.inf, None  # last_score: the last epoch's validation score (see below)
    signatures = {"cache_signature": cache_signature(cache), "split": split_signature(feats)}  # kept in checkpoints
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        # one trainer a run folder: two would write one log and alternate checkpoints (the same command started twice)
        held.enter_context(held_lock(run / ".lock", True, f"{run}: another train-reranker is training in this run "
                                     "folder; wait for it to finish, or pass another --run"))
    if resume:
        state = load_checkpoint(run / "last.pt")
        started = state.get("world", world)  # runs older than it do not record it
        if started != world:
            how = f"with torchrun --nproc_per_node {started}" if started > 1 else "in one process, without torchrun"
            raise UserError(f"{run}: started with {started} process(es), resumed with {world}; each step's shares and "
                            f"the negatives' random draws depend on it: resume it {how}")
        check_compatible(state["cache_signature"], cache, run, "a resumed run trains on the features it started on: "
                         "start a new --run")
        started_on, now = state.get("split"), signatures["split"]  # runs older than it do not record it
        if started_on is not None and started_on != now:
            raise UserError(f"{run}: started on {started_on['videos']} videos / {started_on['captions']} captions of "
                            f"'{cfg.split}', {cache.path} now holds {now['videos']} / {now['captions']} (extraction "
                            "went on, or the cache was rebuilt); a resumed run must see the same ones: start a new --run")
        _restore(model, state["model"], run / "last.pt")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, best = state["step"], state["best"]
        last_score = state.get("last_score")  # absent from runs started before it was kept
        log.info("resuming %s at step %d of %d", run, step, total)
        if rank == 0:
            _drop_log_after(run / "log.jsonl", step)
    elif rank == 0:
        write_text_atomic(run / "config.json",
                          json.dumps({**asdict(cfg), "run": str(run), "model": asdict(model.config)}, indent=2))
    log.info("training on %d videos / %d captions of '%s', %d steps, device %s, params %s", feats.n_videos,
             feats.n_texts, cfg.split, total, device, model.num_params())

    def checkpoint(name: str) -> None:
        if rank != 0:
            return
        state = {"model": model.state_dict(), "step": step, "best": best, "last_score": last_score,
                 "torch_rng": torch.get_rng_state(), "model_config": asdict(model.config), "world": world,
                 **signatures}
        if name == "last.pt":  # what a resume needs; best.pt is only evaluated (AdamW's moments: twice the weights)
            state["optimizer"] = opt.state_dict()
        save_checkpoint(run / name, state)

    logf = open(run / "log.jsonl", "a" if resume else "w") if rank == 0 else open(os.devnull, "w")
    plans: dict[int, list] = {}

    def plan_of(g: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of step g's batch: (video positions, caption positions)."""
        epoch, s = divmod(g, steps_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = _epoch_plan(feats, cfg, epoch)
        vids, caps = plans[epoch][s]
        return vids[rank::world], caps[rank::world]

    def share_of(g: int) -> float:
        """This rank's share of step g's anchors (plan_of has built the step's epoch plan)."""
        epoch, s = divmod(g, steps_per_epoch)
        return len(plan_of(g)[0]) / len(plans[epoch][s][0])

    reader = ThreadPoolExecutor(1)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    t0, samples, pending, negatives = time.time(), 0, {}, {}
    while step < total:
        if step % cfg.checkpoint_every == 0 or not negatives:
            # Hard negatives for the next checkpoint_every steps are mined at once, from the first stage
            # as it is now, at fixed steps (the checkpoint steps): a resumed run mines exactly the same ones.
            model.eval()
            bank = video_bank(model, feats, device)
            upto = min(total, (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
            negatives = {g: _mine_groups(model, feats, bank, plan_of(g)[1], plan_of(g)[0], cfg,
                                         device, np.random.default_rng([cfg.seed, g, rank]))
                         for g in range(step, upto)}
        for g in (step, step + 1):  # read this step and prefetch the next while this one computes
            if g in negatives and g not in pending:
                pending[g] = reader.submit(_read_step, feats, *negatives[g], model.reranker.video_inputs)
        batch = pending.pop(step).result()
        vids = plan_of(step)[0]
        epoch = step // steps_per_epoch
        model.train()
        factor = _lr_factor(step, cfg.warmup_steps, total)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        with autocast(device):
            loss, stats = _forward(model, batch, device, cfg.batch_negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        share = share_of(step) if world > 1 else 1.0
        logged = {"loss": loss.item(), **stats}
        if world > 1:  # the step's gradient and figures over every process's anchors, not this process's share
            _average_gradients(model, share)
            logged = _average_scalars(logged, share, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        samples += round(len(vids) / share)
        rate = samples / max(time.time() - t0, 1e-9)
        logf.write(json.dumps({"step": step, "epoch": epoch, **logged, "lr": cfg.lr * factor,
                               "samples_per_s": rate}) + "\n")
        bar.set_postfix(loss=f"{logged['loss']:.3f}", spread=f"{logged['logit_spread']:.3f}", sps=f"{rate:.0f}")
        bar.update(1)
        if step % steps_per_epoch == 0 and rank == 0:
            results = evaluate_split(model, val, min(cfg.top_k, val.n_videos), device, v2t=False) if val else {}
            metrics = results.get("two_stage", {}).get("t2v")
            logf.write(json.dumps({"epoch": epoch, "step": step, "val_two_stage_t2v": metrics,
                                   "val_rerank_logit_spread": results.get("rerank_logit_spread")}) + "\n")
            if metrics is None:
                # Nothing to choose by: a training loss says how well the model fits its training pairs, not how
                # well it retrieves (and one step's loss, which chose before, is mostly the noise of its batch).
                checkpoint("best.pt")
            else:
                # best.pt: the epoch whose validation R@1, averaged with the epoch's before, is highest. On a small
                # validation split one lucky epoch early in training won otherwise: make demo kept epoch 4 of 12
                # (validation 56.9, the last 55.9), test t2v R@1 44.8 where the last epoch's weights give 50.0.
                score = metrics["R@1"]
                selection = score if last_score is None else (score + last_score) / 2
                last_score = score
                if selection > best:
                    best = selection
                    checkpoint("best.pt")
        if step % cfg.checkpoint_every == 0 or step == total:
            logf.flush()
            checkpoint("last.pt")  # only at bank-refresh steps: the state a resume needs to mine alike
    bar.close()
    logf.close()
    reader.shutdown()
    if not (run / "best.pt").exists():
        checkpoint("best.pt")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank returns before rank 0 has written the final checkpoints
    return run
