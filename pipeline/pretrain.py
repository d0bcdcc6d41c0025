"""Pretrain the tiny CLIP (CrossTVR-Tiny) from scratch on single synthetic frames, and probe what it learned.

Offline we cannot download CLIP weights, and a random tiny encoder gives meaningless features. So we
train the same open_clip architecture contrastively on frames rendered on the fly (pipeline/synthetic.py:
shapes, colours, sizes, positions; never motion or order, which the reranker must learn from video).

Two additions to plain CLIP, both aimed at what the benchmark asks of the frozen features:
- binding twins: for half the multi-object scenes the batch also holds a twin whose two objects swap
  colours or positions, each with a caption that is false for the other; only a text encoder that reads
  word order ("red circle and blue square" vs "blue circle and red square") can tell them apart.
- a per-patch auxiliary head (thrown away after training) predicts the colour and shape under each
  patch, so the last-layer patch tokens the cache stores say what is where instead of echoing the frame.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.encoder import DEFAULT_MODEL, WEIGHTS_DIR, register_model_configs
from pipeline.errors import UserError
from pipeline.files import (check_output_path, file_sha256, held_lock, kept_checkpoint, load_checkpoint,
                            previous_checkpoint, save_checkpoint, write_text_atomic, written_atomically)
from pipeline.synthetic import BACKGROUND, COLOURS, SHAPES, Scene, frame_captions, render_frame, sample_frame_scene

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors"
COLOUR_NAMES = tuple(COLOURS)
# Seeds: the benchmark seeds default_rng with small integers (seed, group, ...); pretraining draws step
# `s` from default_rng([10**6 + seed, s]) and the probes from default_rng([2 * 10**6, i]), so none of
# the three ever share a stream.
TRAIN_SEED_BASE = 10**6
PROBE_SEED_BASE = 2 * 10**6


# ----------------------------------------------------------------------------- data


def binding_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with two objects' colours (or positions) swapped; None for a single object."""
    if len(scene.objects) < 2:
        return None
    i, j = (int(k) for k in rng.permutation(len(scene.objects))[:2])
    a, b = scene.objects[i], scene.objects[j]
    objs = list(scene.objects)
    if rng.random() < 0.5:
        objs[i], objs[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    else:
        objs[i], objs[j] = replace(a, position=b.position), replace(b, position=a.position)
    return Scene(tuple(objs))


def _patch_labels(frame: np.ndarray, scene: Scene, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour (0 = background, 1.. = COLOURS) and shape (0 = background, 1.. = SHAPES) under each patch centre [P]."""
    c = patch // 2
    centres = frame[c - 1 :: patch, c - 1 :: patch].astype(np.int64)  # [g, g, 3], pixel next to the centre
    palette = np.array([BACKGROUND] + [COLOURS[n] for n in COLOUR_NAMES], dtype=np.int64)  # [7, 3]
    colour = ((centres[:, :, None] - palette) ** 2).sum(-1).argmin(-1).reshape(-1)  # [P]
    shape_of = np.zeros(len(palette), dtype=np.int64)
    for o in scene.objects:  # colours are distinct within a scene, so the colour names the object
        shape_of[1 + COLOUR_NAMES.index(o.colour)] = 1 + SHAPES.index(o.shape)
    return colour, shape_of[colour]


def make_batch(rng: np.random.Generator, batch_size: int, size: int, patch: int, twin_rate: float = 0.5):
    """batch_size frames [B, S, S, 3] uint8, one caption each, per-patch colour and shape labels [B, P]."""
    frames, captions, colours, shapes = [], [], [], []
    while len(frames) < batch_size:
        scene = sample_frame_scene(rng)
        twin = binding_twin(scene, rng) if rng.random() < twin_rate and len(frames) + 2 <= batch_size else None
        pair = [(scene, twin), (twin, scene)] if twin is not None else [(scene, None)]
        for s, other in pair:
            # `against` keeps only captions that are false for the twin.
            texts = frame_captions(s, rng, against=other) or frame_captions(s, rng)
            frame = render_frame(s, size)
            colour, shape = _patch_labels(frame, s, patch)
            frames.append(frame)
            captions.append(texts[int(rng.integers(len(texts)))])
            colours.append(colour)
            shapes.append(shape)
    return np.stack(frames), captions, torch.from_numpy(np.stack(colours)), torch.from_numpy(np.stack(shapes))


def to_pixels(frames: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> normalised [N, 3, S, S], exactly as FrozenEncoder.encode_frames does."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- model


def _create(model_name: str):
    import open_clip

    register_model_configs()
    model = open_clip.create_model(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return model, open_clip.get_tokenizer(model_name), mean, std


def _image_tower(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frame embeddings [B, E] and last-layer patch tokens [B, P, W] (what the cache stores)."""
    store = {}
    handle = model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
    try:
        emb = model.encode_image(x, normalize=True)
    finally:
        handle.remove()
    tokens = store["x"] if model.visual.transformer.batch_first else store["x"].transpose(0, 1)
    return emb, tokens[:, 1:]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (normalised embeddings [B, E])."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, B]
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def save_weights(model: torch.nn.Module, out: Path) -> Path:
    """fp16 safetensors written atomically (written_atomically), with a `<file>.sha256` sidecar."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with written_atomically(out, "{}.tmp") as tmp:
        # One metadata key: safetensors writes the map in a random order, so with two ("model" too) the same weights
        # made files with other bytes half of the time, and a resumed run could not be checked against its twin.
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files private to the user; these weights ship
    digest = file_sha256(out)
    sidecar = out.with_name(out.name + ".sha256")
    write_text_atomic(sidecar, f"{digest}  {out.name}\n")
    return out


# ----------------------------------------------------------------------------- training


def checkpoint_path(out: Path) -> Path:
    """Where a pretraining into `out` keeps its checkpoint until the weights are written: `<out>.ckpt.pt`."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt.pt")


# How a resume that differs is named to the user: the CLI's options by their flags, the rest by keyword.
_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "seed": "--seed"}


def _resume_state(ckpt: Path, resume: bool, options: dict) -> dict | None:
    """The checkpoint to continue from (None: start afresh), or one line saying why not. Read before the model is
    built, so that a refusal costs nothing."""
    found = kept_checkpoint(ckpt)
    if not resume:
        if found is not None:
            raise UserError(f"{found}: an unfinished pretraining's checkpoint is there; pass --resume to continue it, "
                            "or delete it")
        return None
    if found is None:
        raise UserError(f"{ckpt}: no checkpoint to resume (none written yet, or the run finished); "
                        "run without --resume")
    state = load_checkpoint(ckpt, "delete it and run without --resume to start again")
    for key, now in options.items():
        then = state["options"].get(key)
        if then != now:
            name = _FLAGS.get(key, key)
            raise UserError(f"{ckpt}: started with {name} {then}, resumed with {name} {now}; resume with the options "
                            "it started with, or delete it to start again")
    return state


def pretrain_tiny(
    out: Path = DEFAULT_WEIGHTS,
    steps: int = 2000,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 5e-4,
    warmup: int = 50,
    weight_decay: float = 0.05,
    patch_loss: float = 0.5,
    threads: int = 2,
    progress: bool = True,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> Path:
    """Train CrossTVR-Tiny contrastively from scratch on rendered frames; save fp16 safetensors to `out`.

    Every `checkpoint_every` steps the model, the patch head, AdamW, the schedule, the step and torch's RNG (the
    pixel noise; step s's frames and captions come from default_rng([10**6 + seed, s]), which needs no state) go to
    checkpoint_path(out), atomically; `resume` continues from it and ends with the same bits as a run never
    stopped (same options and thread count). The checkpoint is removed once the weights are written.
    """
    if steps < 1 or batch_size < 2:
        raise UserError(f"--steps {steps} / --batch-size {batch_size}: need at least 1 step and 2 frames per batch")
    if checkpoint_every < 1:
        raise UserError(f"--checkpoint-every {checkpoint_every}: need at least 1 step between checkpoints")
    out = Path(out)
    check_output_path(out, "--out", folder=False)  # before the training it would lose
    out.parent.mkdir(parents=True, exist_ok=True)  # --out's folder may not be there yet
    # one pretraining an --out: two would alternate one checkpoint and write one file
    with held_lock(out.with_name(out.name + ".lock"), True, f"{out}: another pretrain-tiny is writing these weights; "
                   "wait for it to finish, or choose another --out"):
        ckpt = checkpoint_path(out)
        # What the bits of the result depend on; a resume with any other value would make other weights.
        options = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "warmup": warmup,
                   "weight_decay": weight_decay, "patch_loss": patch_loss, "threads": threads}
        state = _resume_state(ckpt, resume, options)
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model, tokenizer, mean, std = _create(DEFAULT_MODEL)
        size = int(model.visual.image_size[0])
        patch = int(model.visual.patch_size[0])
        width = int(model.visual.class_embedding.shape[-1])
        head = torch.nn.Linear(width, 1 + len(COLOURS) + 1 + len(SHAPES))  # per-patch colour and shape logits
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n] + [head.weight]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)] + [head.bias]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)

        def schedule(s: int) -> float:  # linear warm-up, then cosine to zero
            if s < warmup:
                return (s + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        first = 0
        if state is not None:
            model.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            first = state["step"]
            log.info("resuming %s at step %d of %d", ckpt, first, steps)
        model.train()
        start = time.time()
        bar = tqdm(range(first, steps), initial=first, total=steps, desc="pretrain", disable=not progress,
                   mininterval=10)
        for step in bar:
            rng = np.random.default_rng([TRAIN_SEED_BASE + seed, step])  # disjoint from the benchmark's seeds
            frames, captions, colour, shape = make_batch(rng, batch_size, size, patch)
            x = to_pixels(frames, mean, std)
            x = x + 0.02 / std * torch.randn_like(x)  # a little pixel noise: benchmark frames come through h264
            img, tokens = _image_tower(model, x)
            txt = model.encode_text(tokenizer(captions), normalize=True)
            loss_clip = clip_loss(img, txt, model.logit_scale)
            logits = head(tokens)  # [B, P, 7 + 5]
            n_col = 1 + len(COLOURS)
            loss_patch = F.cross_entropy(logits[..., :n_col].flatten(0, 1), colour.flatten()) + F.cross_entropy(
                logits[..., n_col:].flatten(0, 1), shape.flatten())
            loss = loss_clip + patch_loss * loss_patch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(clip=f"{loss_clip.item():.3f}", patch=f"{loss_patch.item():.3f}",
                                scale=f"{model.logit_scale.exp().item():.1f}")
                log.info("step %d/%d clip %.4f patch %.4f scale %.1f lr %.2e %.2f s/step", step, steps,
                         loss_clip.item(), loss_patch.item(), model.logit_scale.exp().item(), sched.get_last_lr()[0],
                         (time.time() - start) / (step + 1 - first))
            done = step + 1
            if done % checkpoint_every == 0 and done < steps:
                save_checkpoint(ckpt, {"model": model.state_dict(), "head": head.state_dict(),
                                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": done,
                                       "torch_rng": torch.get_rng_state(), "options": options})
        path = save_weights(model.eval(), out)
        for p in (ckpt, previous_checkpoint(ckpt)):  # the weights are whole: nothing is left to resume
            p.unlink(missing_ok=True)
        log.info("wrote %s (%.1f MB, %.1f min)", path, path.stat().st_size / 1e6, (time.time() - start) / 60)
        return path


# ----------------------------------------------------------------------------- probes


def _swap_colours(caption: str, a: str, b: str) -> str:
    return re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, caption)


def _probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
           steps: int = 300) -> float:
    """Test accuracy of a logistic regression fit on standardised frozen features (full-batch Adam)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    n_class = int(max(train_y.max(), test_y.max())) + 1
    lin = torch.nn.Linear(train_x.shape[1], n_class)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(test_x).argmax(-1) == test_y).float().mean())


def _grid_pool(patch: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """Patch tokens [N, P, W] averaged over a cells x cells grid and flattened [N, cells^2 W]: where, at probe cost."""
    n, p, w = patch.shape
    g = int(math.isqrt(p))
    x = patch.transpose(1, 2).reshape(n, w, g, g)
    return F.adaptive_avg_pool2d(x, cells).flatten(1)


def frame_probe_report(weights: str | Path | None, frames: int = 2000, retrieval: int = 1000, seed: int = 0) -> dict:
    """Held-out frame i2t R@1, linear probes on frozen features, patch-token diversity, twin-caption cosine."""
    from pipeline.encoder import FrozenEncoder

    torch.manual_seed(seed)
    enc = FrozenEncoder(DEFAULT_MODEL, pretrained=str(weights) if weights else "random", device=torch.device("cpu"))
    size = enc.info.image_size
    scenes, images, captions = [], [], []
    for i in range(frames):
        rng = np.random.default_rng([PROBE_SEED_BASE + seed, i])  # held out: never drawn in pretraining
        scene = sample_frame_scene(rng)
        scenes.append(scene)
        images.append(render_frame(scene, size))
        texts = frame_captions(scene, rng)
        captions.append(texts[int(rng.integers(len(texts)))])
    images = np.stack(images)
    patch, emb = [], []
    for k in range(0, frames, 250):
        p, _, e = enc.encode_frames(images[k : k + 250])
        patch.append(p)
        emb.append(e)
    patch, emb = torch.cat(patch), F.normalize(torch.cat(emb), dim=-1)  # [N, P, W], [N, E]
    _, _, txt = enc.encode_captions(captions[:retrieval])
    txt = F.normalize(txt, dim=-1)
    sims = emb[:retrieval] @ txt.T  # [N, N]
    # A caption can be true of another frame too ("a red circle"); count a hit when the top caption is the frame's own.
    r1_i2t = float((sims.argmax(1) == torch.arange(retrieval)).float().mean())
    r1_t2i = float((sims.argmax(0) == torch.arange(retrieval)).float().mean())

    # Within-frame cosine of last-layer patch tokens (raw, and after removing the dataset mean token).
    def within(t: torch.Tensor) -> float:
        t = F.normalize(t, dim=-1)
        g = t @ t.transpose(1, 2)  # [N, P, P]
        n = t.shape[1]
        return float(((g.sum((1, 2)) - n) / (n * (n - 1))).mean())

    cos_raw = within(patch[:500])
    cos_centred = within(patch[:500] - patch.mean((0, 1)))

    # Linear probes: one-object frames for colour/shape/size/position; for every frame, what sits in each cell.
    features = {
        "frame embedding": emb,
        "mean patch token": patch.mean(1),
        "patch tokens (centred, 4x4 grid)": _grid_pool(patch - patch.mean(1, keepdim=True)),
    }
    split = int(0.7 * frames)
    single = torch.tensor([len(s.objects) == 1 for s in scenes])
    targets = {
        "colour": [COLOUR_NAMES.index(s.objects[0].colour) for s in scenes],
        "shape": [SHAPES.index(s.objects[0].shape) for s in scenes],
        "size": [("small", "large").index(s.objects[0].size) for s in scenes],
        "position": [("left", "right", "top", "bottom", "center").index(s.objects[0].position) for s in scenes],
    }
    cells = ("left", "right", "top", "bottom", "center")
    colour_at = {c: [1 + next((COLOUR_NAMES.index(o.colour) for o in s.objects if o.position == c), -1) for s in scenes]
                 for c in cells}  # 0 = empty cell
    probes: dict[str, dict[str, float]] = {}
    idx = torch.arange(frames)
    tr_single, te_single = idx[:split][single[:split]], idx[split:][single[split:]]
    for fname, f in features.items():
        row = {}
        for tname, y in targets.items():
            y = torch.tensor(y)
            row[f"{tname} (1 object)"] = _probe(f[tr_single], y[tr_single], f[te_single], y[te_single])
        accs = []
        for c in cells:
            y = torch.tensor(colour_at[c])
            accs.append(_probe(f[:split], y[:split], f[split:], y[split:]))
        row["colour at each cell (1-3 objects)"] = float(np.mean(accs))
        probes[fname] = row

    # Twin captions that swap the colours of two objects: a word-order-aware text encoder keeps them apart.
    pairs = []
    for s, cap in zip(scenes, captions):
        named = [o.colour for o in s.objects if re.search(rf"\b{o.colour}\b", cap)]
        if len(named) >= 2:
            pairs.append((cap, _swap_colours(cap, named[0], named[1])))
        if len(pairs) == 300:
            break
    _, _, a = enc.encode_captions([p[0] for p in pairs])
    _, _, b = enc.encode_captions([p[1] for p in pairs])
    twin_cos = float(F.cosine_similarity(a, b).mean())
    # ...and whether the right frame prefers its caption over the swapped twin.
    frame_of = {cap: k for k, cap in enumerate(captions)}
    e = emb[[frame_of[p[0]] for p in pairs]]
    twin_acc = float(((e * F.normalize(a, dim=-1)).sum(-1) > (e * F.normalize(b, dim=-1)).sum(-1)).float().mean())

    report = {
        "weights": enc.info.pretrained or "random",
        "weights_sha256": enc.info.pretrained_sha256,
        "frames": frames,
        "retrieval": retrieval,
        "i2t_r1": r1_i2t,
        "t2i_r1": r1_t2i,
        "patch_cosine_within_frame": cos_raw,
        "patch_cosine_within_frame_centred": cos_centred,
        "twin_caption_cosine": twin_cos,
        "twin_caption_pairs": len(pairs),
        "frame_prefers_true_caption_over_twin": twin_acc,
        "probes": probes,
    }
    log.info("\n%s", format_report(report))
    return report


def format_report(report: dict) -> str:
    """The probe report as markdown tables."""
    lines = [
        f"weights: `{report['weights']}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| held-out frame i2t R@1 ({report['retrieval']} frames, 1 caption each) | {report['i2t_r1']:.3f} |",
        f"| held-out frame t2i R@1 | {report['t2i_r1']:.3f} |",
        f"| mean within-frame cosine of last-layer patch tokens | {report['patch_cosine_within_frame']:.3f} |",
        f"| same, after removing the dataset-mean token | {report['patch_cosine_within_frame_centred']:.3f} |",
        f"| cosine of twin captions that swap two colours ({report['twin_caption_pairs']} pairs) | "
        f"{report['twin_caption_cosine']:.3f} |",
        "| frame scores its caption above the colour-swapped twin | "
        f"{report['frame_prefers_true_caption_over_twin']:.3f} |",
        "",
    ]
    cols = list(next(iter(report["probes"].values())))
    lines.append("| linear probe accuracy | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for fname, row in report["probes"].items():
        lines.append(f"| {fname} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
