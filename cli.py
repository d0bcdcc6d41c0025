"""crosstvr command line: a thin layer that parses options into a config and calls a plain function."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

# Idle OpenMP threads that spin cost 2-4x on a busy CPU (bench/common.py, docs/benchmarks.md); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.errors import UserError  # noqa: E402


# Where open_clip and the hub live, found without importing them (that would slow every command's start).
_CHATTY = tuple(str(Path(spec.origin).parent) for spec in map(importlib.util.find_spec, ("open_clip", "huggingface_hub"))
                if spec and spec.origin)


def _friendly(fn):
    """Turn a UserError, or a file the system refuses, into one line on stderr and exit status 2, never a traceback;
    a Ctrl-C that the command does not describe itself into one line and exit status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.filename is None:  # not about a path the user gave: a bug to see whole
                raise
            _close_progress_bars()
            click.echo(f"error: {e.filename}: {e.strerror}; check that path (an existing folder where one is needed, "
                       "not a file), its permissions and the disk", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _interrupted("stopped before it finished; what it writes is written whole or not at all")

    return wrapper


def _close_progress_bars() -> None:
    """Close the progress bars an error left open (each prints where it stopped and ends its line), so that the
    error's line starts a line of its own rather than run on from the bar's."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of the bars still open
        bar.close()


def _interrupted(what: str) -> NoReturn:
    """Ctrl-C: one line saying what is kept and how to go on (not click's bare "Aborted!"), exit status 130."""
    # The leading newline ends the line that the terminal's ^C (or a progress bar) is on, as click's own "Aborted!".
    click.echo(f"\ninterrupted: {what}", err=True)
    sys.exit(130)  # 128 + SIGINT, as a shell reports it


@contextlib.contextmanager
def _one_line_usage(command: str):
    """click's own usage errors (a mistyped command or option, a value out of range) as one line like every other
    refusal, where click prints three: "Usage: ...", "Try ... --help", "Error: ..."."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:  # `python cli.py` alone: the help, as click shows it
        raise
    except click.UsageError as e:
        message = " ".join(e.format_message().split())  # click's suggestions come on a line of their own
        click.echo(f"error: {message} See `{command} --help`.", err=True)
        sys.exit(e.exit_code)


class _Command(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):  # the command's options
        with _one_line_usage(f"{parent.command_path} {info_name}" if parent else str(info_name)):
            return super().make_context(info_name, args, parent=parent, **extra)


class _Cli(click.Group):
    command_class = _Command

    def make_context(self, info_name, args, parent=None, **extra):  # the group's own options
        with _one_line_usage(str(info_name)):
            return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx, args):  # the command's name
        with _one_line_usage(ctx.command_path):
            return super().resolve_command(ctx, args)


@click.group(cls=_Cli)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """crosstvr: cached frozen-CLIP features and a CrossTVR reranker for text-video retrieval."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:  # open_clip and the hub log download chatter whose gist our own one-line messages carry
        handler.addFilter(lambda r: not r.pathname.startswith(_CHATTY) or r.levelno >= logging.CRITICAL)
        # the hub also prints through a handler of its own (offline: 24 lines of retries), quiet from its import on
        os.environ.setdefault("HF_HUB_VERBOSITY", "critical")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _resolve_cache(cache: Path | None, run: Path | None = None) -> Path:
    """--cache, else the cache the run (--run) was trained on, else the most recently written cache under cache/."""
    from pipeline.extract import CACHE_ROOT

    if cache is not None:
        return cache
    if run is not None:
        from reranker.train import recorded_cache, run_config

        return recorded_cache(run, run_config(run))
    found = sorted(CACHE_ROOT.glob("*/*.zarr"), key=lambda p: (p / "zarr.json").stat().st_mtime if (p / "zarr.json").exists() else 0)
    if not found:
        raise UserError(f"no cache under {CACHE_ROOT}/; run `python cli.py extract` first or pass --cache DIR")
    if len(found) > 1:
        click.echo(f"using the most recent cache {found[-1]} (pass --cache to choose)", err=True)
    return found[-1]


@main.command()
@click.option("--dataset", default="synthetic", show_default=True, help="msvd, msrvtt, manifest or synthetic.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Annotations and videos [default: data/<dataset>].")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: cache/<dataset>/<model>.zarr].")
@click.option("--model", default=None, help="open_clip model name [default: the shipped CrossTVR-Tiny].")
@click.option("--pretrained", default=None,
              help="open_clip tag (e.g. openai, with a -quickgelu model), a local checkpoint path, or 'random' "
                   "[default: the shipped weights of CrossTVR-Tiny; random for other models].")
@click.option("--frames", type=click.IntRange(min=1), default=12, show_default=True, help="Frames sampled uniformly per video.")
@click.option("--patch-layer", default=-1, show_default=True, help="Visual block whose patch tokens are stored.")
@click.option("--text-layer", type=int, default=None,
              help="Text tokens stored after this many text blocks (0 = token embeddings, -1 = last) "
                   "[default: 0 for the shipped CrossTVR-Tiny, -1 otherwise].")
# A tokenized caption holds at least its start and end tokens.
@click.option("--max-text-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Text tokens kept per caption.")
@click.option("--batch-videos", type=click.IntRange(min=1), default=8, show_default=True, help="Videos encoded per batch.")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Decoder threads running ahead of the encoder.")
@click.option("--shard", default=None, help="I/N: process a disjoint slice [default: RANK/WORLD_SIZE under torchrun].")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache and rebuild it.")
@click.option("--strict", is_flag=True, help="Exit non-zero when a video could not be decoded.")
@click.option("--repair", is_flag=True, help="Re-read every finished chunk and redo the videos/captions found damaged.")
@_friendly
def extract(dataset, data_root, cache, model, pretrained, frames, patch_layer, text_layer, max_text_tokens, batch_videos,
            workers, shard, overwrite, strict, repair) -> None:
    """Stage one: decode each video once, run the frozen encoder once, store features in a Zarr cache."""
    from pipeline.encoder import DEFAULT_MODEL
    from pipeline.extract import ExtractConfig, default_cache_path, run_extract

    model = model or DEFAULT_MODEL
    cache = cache or default_cache_path(dataset, model)
    cfg = ExtractConfig(dataset=dataset, data_root=data_root, cache=cache, model=model,
                        pretrained=pretrained, frames=frames, patch_layer=patch_layer, text_layer=text_layer,
                        max_text_tokens=max_text_tokens, batch_videos=batch_videos, workers=workers, shard=shard,
                        overwrite=overwrite, repair=repair)
    try:
        summary = run_extract(cfg)
    except KeyboardInterrupt:
        _interrupted(f"finished videos and caption chunks are kept in {cache}; run the same command to continue")
    if repair:
        records = any("records" in d for d in summary.repaired)
        click.echo(f"repaired {len(summary.repaired) - records} damaged video(s)/caption chunk(s)"
                   + (", and wrote the annotations' arrays again" if records else ""))
    click.echo(f"cache {summary.cache}: {summary.videos_done}/{summary.videos_total} videos done, "
               f"{summary.texts_done}/{summary.texts} captions done")
    if summary.failed:
        click.echo(f"{len(summary.failed)} video(s) could not be decoded:")
        for f in summary.failed:
            click.echo(f"  {f['video']}: {f['reason']}")
        if strict:
            sys.exit(1)


@main.command()
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: the most recent one].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verify", is_flag=True, help="Read every finished chunk back and list damaged ones (exit 1 if any).")
@_friendly
def info(cache, as_json, verify) -> None:
    """Videos done/total, captions, shapes, model, splits, failures and size of a cache."""
    from pipeline.cache import FeatureCache

    facts = FeatureCache(_resolve_cache(cache)).describe(verify=verify, progress=True)
    damaged = facts.get("damaged", [])
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        if damaged:
            sys.exit(1)
        return
    click.echo(f"cache        {facts['cache']} ({facts['bytes'] / 2**20:.1f} MiB)")
    click.echo(f"dataset      {facts['dataset']}")
    click.echo(f"model        {facts['model']}  weights: {facts['pretrained'] or 'RANDOM'}")
    text_layer = facts["text_layer"]
    text = ("text tokens of an unrecorded text block (cache predates --text-layer)" if text_layer is None
            else f"text tokens after {text_layer} text blocks")
    click.echo(f"frames       {facts['frames']} at {facts['image_size']} px, "
               f"patch tokens of block {facts['patch_layer']}, {text}")
    click.echo(f"videos       {facts['videos_done']}/{facts['videos_total']} done, {len(facts['failed'])} failed")
    click.echo(f"captions     {facts['texts']} ({facts['text_chunks_done']}/{facts['text_chunks_total']} chunks done, "
               f"{facts['texts_truncated']} truncated)")
    for name, counts in facts["splits"].items():
        click.echo(f"split {name:<6} {counts['videos']} videos, {counts['texts']} captions")
    for name, a in facts["arrays"].items():
        click.echo(f"array {name:<13} {a['shape']} {a['dtype']}")
    for f in facts["failed"]:
        click.echo(f"failed       {f['video']}: {f['reason']}")
    if verify:
        for d in damaged:
            what = (d["video"] if "video" in d else ", ".join(d["records"]) if "records" in d
                    else f"captions {d['captions'][0]}-{d['captions'][1] - 1}")
            click.echo(f"damaged      {what}: {d['reason']}")
        click.echo(f"verified     {len(damaged)} damaged"
                   + ("; re-run your extract command with --repair to redo them" if damaged else ""))
        if damaged:
            sys.exit(1)


@main.command("export-h5")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: the most recent one].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="HDF5 file to write.")
@_friendly
def export_h5_cmd(cache, out) -> None:
    """Write the cache's arrays into one HDF5 file."""
    from pipeline.cache import FeatureCache
    from pipeline.export import export_h5

    path = export_h5(FeatureCache(_resolve_cache(cache)), out)
    click.echo(f"wrote {path}")


@main.command("make-synthetic")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/synthetic"), show_default=True)
@click.option("--videos", default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)  # numpy seeds are non-negative
@click.option("--size", default=64, show_default=True, help="Frame size in pixels.")
@click.option("--seconds", default=2.0, show_default=True)
@click.option("--clutter", default=0, show_default=True,
              help="Unnamed look-alike objects in the corners of every video (0 to 4).")
@click.option("--overwrite", is_flag=True,
              help="Make the set again when --out holds one made with other options (caches extracted from it go "
                   "stale); without it that is refused. A set made with the same options is kept and completed.")
@_friendly
def make_synthetic_cmd(out, videos, seed, size, seconds, clutter, overwrite) -> None:
    """Render the synthetic fine-grained video set (mp4 files, manifest.csv, scenes.jsonl)."""
    from pipeline.synthetic import make_synthetic

    try:
        path = make_synthetic(out, videos=videos, seed=seed, size=size, seconds=seconds, clutter=clutter,
                              overwrite=overwrite)
    except KeyboardInterrupt:
        _interrupted(f"finished videos are kept in {out}; run the same command to continue")
    click.echo(f"synthetic set in {path}")


@main.command("train-reranker")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: the most recent one].")
@click.option("--run", type=click.Path(path_type=Path), help="Run folder [default: runs/<timestamp>].")
@click.option("--resume", is_flag=True, help="Continue the run in --run from its last checkpoint.")
@click.option("--split", default="train", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Captions and videos a step (anchors and their negatives).")
@click.option("--hard-negatives", type=click.IntRange(min=0), default=1, show_default=True,
              help="Negatives per caption from its top first-stage candidates.")
@click.option("--neighbour-negatives", type=click.IntRange(min=0), default=1, show_default=True,
              help="Negatives per caption from the videos nearest to its own video (near twins).")
@click.option("--batch-negatives", type=click.IntRange(min=0), default=2, show_default=True,
              help="Negatives per caption from other anchors' groups in the step: random videos, no extra reads.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--temporal", type=click.Choice(["mean", "transformer"]), default="mean", show_default=True)
@click.option("--spatial", type=click.Choice(["attention", "cls", "flat"]), default="flat", show_default=True,
              help="Frame tokens: flat (default, measured best), attention (the paper's spatial cross attention), cls.")
@click.option("--share-attention/--no-share-attention", default=False, show_default=True,
              help="One set of cross-attention blocks for the spatial and temporal stages (--spatial attention): "
                   "28% fewer reranker parameters, R@1 within noise of unshared (docs/benchmarks.md).")
@click.option("--dim", type=click.IntRange(min=1), default=128, show_default=True,
              help="Reranker width D (divisible by --heads).")
@click.option("--queries", type=click.IntRange(min=1), default=4, show_default=True,
              help="Learnable queries beside the caption's tokens.")
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True, help="Attention heads of the reranker.")
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True, help="Cross-attention blocks per stage.")
@click.option("--patch-pool", type=click.IntRange(min=1), default=2, show_default=True,
              help="Average k x k neighbouring patches before the reranker reads them (1 when k does not divide the "
                   "grid or would leave 1 x 1). 1 keeps every patch: slower, and what colour-shape binding needs "
                   "(bench/binding.py).")
@click.option("--score-weight", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="W of the final score, reranker logit + first-stage cosine / W: what validation ranks by (and so "
                   "best.pt) and evaluate's default. Smaller trusts the first stage more.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)  # numpy seeds are non-negative
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between checkpoints.")
@click.option("--allow-partial", is_flag=True, help="Train on a cache whose extraction is unfinished.")
@_friendly
def train_reranker(cache, run, resume, split, epochs, batch_size, hard_negatives, neighbour_negatives, batch_negatives,
                   lr, temporal, spatial, share_attention, dim, queries, heads, layers, patch_pool, score_weight, seed,
                   checkpoint_every, allow_partial) -> None:
    """Stage two: train the first stage and the reranker from cached tensors only."""
    from reranker.train import TrainConfig, default_run_path, train

    if resume and run is None:
        raise UserError("--resume needs --run DIR (the run to continue)")
    if resume:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in ctx.params if name not in ("run", "resume", "cache")
                 and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"{run}: --resume continues the run with the options it started with (its config.json); "
                            f"drop {', '.join(given)} or start a new --run")
    if dim % heads:  # ModelConfig refuses these too, but in its own field names
        raise UserError(f"--dim {dim} is not divisible by --heads {heads}; pick a multiple of it (e.g. "
                        f"--dim {dim // heads * heads or heads})")
    if share_attention and spatial != "attention":
        raise UserError(f"--share-attention needs --spatial attention "
                        f"(there is nothing to share with --spatial {spatial})")
    run = run or default_run_path()  # named here, so that a Ctrl-C can say where the run is
    cfg = TrainConfig(cache=str(_resolve_cache(cache)) if not resume else str(cache or ""), run=str(run), split=split,
                      epochs=epochs, batch_size=batch_size, hard_negatives=hard_negatives,
                      neighbour_negatives=neighbour_negatives, batch_negatives=batch_negatives, lr=lr, temporal=temporal,
                      spatial=spatial, share_attention=share_attention, dim=dim, n_queries=queries, heads=heads,
                      layers=layers, patch_pool=patch_pool, score_weight=score_weight, seed=seed,
                      checkpoint_every=checkpoint_every, allow_partial=allow_partial)
    try:
        path = train(cfg, resume=resume)
    except KeyboardInterrupt:
        _interrupted(f"the last checkpoint is in {run}; continue with train-reranker --run {run} --resume"
                     if (run / "last.pt").exists()
                     else f"no checkpoint in {run} yet; run the same command to start again")
    click.echo(f"run {path}: best.pt, last.pt, log.jsonl")


@main.command()
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: the one the run was trained on].")
@click.option("--run", type=click.Path(path_type=Path), help="A train-reranker run folder.")
@click.option("--split", default="test", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=15, show_default=True,
              help="Candidates re-scored by the reranker.")
@click.option("--out", type=click.Path(path_type=Path), help="Metrics JSON [default: <run>/eval_<split>.json].")
@click.option("--save-sims", type=click.Path(path_type=Path),
              help="Folder for the score matrices (.npy): first-stage cosines; the two-stage ones are per-query rank "
                   "codes, valid along one axis only (README, Evaluation).")
@click.option("--zero-shot", is_flag=True, help="Evaluate the untrained first stage (zero-shot CLIP).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The run's best.pt (by validation) or last.pt (the final epoch; JSON default eval_<split>_last.json).")
@click.option("--score-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="W of the final score, reranker logit + first-stage cosine / W, to weigh the two stages otherwise "
                   "without training again [default: the run's, 0.05 unless trained with another; JSON default "
                   "eval_<split>_w<W>.json].")
@_friendly
def evaluate(cache, run, split, top_k, out, save_sims, zero_shot, checkpoint, score_weight) -> None:
    """First-stage retrieval over a split, top-K re-scored by the reranker: R@1/5/10, MdR, MnR."""
    from reranker.evaluate import EvalConfig, run_evaluate
    from reranker.metrics import format_table

    cfg = EvalConfig(cache=_resolve_cache(cache, run), run=run, split=split, top_k=top_k, out=out, save_sims=save_sims,
                     zero_shot=zero_shot, checkpoint=checkpoint, score_weight=score_weight)
    results, where = run_evaluate(cfg)
    stages = {k: results[k] for k in ("first_stage", "two_stage") if k in results}
    failed = f" ({results['n_videos_failed']} more failed extraction: left out)" if "n_videos_failed" in results else ""
    k = f"top-K {results['top_k']}, score weight {results['score_weight']:g}" if "top_k" in results else "zero-shot"
    click.echo(f"{results['split']}: {results['n_videos']} videos{failed}, {results['n_texts']} captions, {k}")
    click.echo(format_table(stages))
    click.echo("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in where["seconds"].items()))
    click.echo(f"metrics {where['json']}\nplot    {where['plot']}")


@main.command()
@click.argument("query")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder [default: the one the run was trained on].")
@click.option("--run", type=click.Path(path_type=Path), required=True, help="A train-reranker run folder.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Videos to print.")
@click.option("--top-k", type=click.IntRange(min=1), default=15, show_default=True,
              help="Candidates re-scored by the reranker.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The run's best.pt (by validation) or last.pt (the final epoch).")
@click.option("--score-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="W of the final score, reranker logit + first-stage cosine / W [default: the run's].")
@_friendly
def search(query, cache, run, top, top_k, checkpoint, score_weight) -> None:
    """Rank the cached videos for a text QUERY with both stages."""
    from reranker.search import search as run_search

    hits = run_search(_resolve_cache(cache, run), run, query, top=top, top_k=top_k, checkpoint=checkpoint,
                      score_weight=score_weight)
    click.echo(f"{'rank':>4}  {'final':>8}  {'cosine':>7}  video")
    for rank, hit in enumerate(hits, 1):
        final = f"{hit.final:8.3f}" if hit.final is not None else f"{'-':>8}"
        click.echo(f"{rank:>4}  {final}  {hit.first_stage:7.3f}  {hit.video}  ({hit.path})")


@main.command("pretrain-tiny")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="fp16 safetensors file (a .sha256 sidecar is written next to it) [default: the shipped "
                   "pipeline/weights/CrossTVR-Tiny.safetensors of this checkout, from any folder].")
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between checkpoints (<out>.ckpt.pt, removed once the weights are written).")
@click.option("--resume", is_flag=True, help="Continue from --out's checkpoint (same --steps, --batch-size, --seed).")
@_friendly
def pretrain_tiny_cmd(out, steps, batch_size, seed, checkpoint_every, resume) -> None:
    """Pretrain the CrossTVR-Tiny CLIP from scratch on rendered synthetic frames (CPU; see docs/pretrain.md)."""
    import shlex

    from pipeline.files import kept_checkpoint
    from pipeline.pretrain import DEFAULT_WEIGHTS, checkpoint_path, pretrain_tiny

    out = out or DEFAULT_WEIGHTS  # beside pipeline/encoder.py, where the encoder looks for it, whatever the folder
    ckpt = checkpoint_path(out)
    try:
        path = pretrain_tiny(out, steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                             resume=resume)
    except KeyboardInterrupt:
        again = f"pretrain-tiny --out {shlex.quote(str(out))} --steps {steps} --batch-size {batch_size} --seed {seed}"
        kept = kept_checkpoint(ckpt)
        _interrupted(f"the last checkpoint is {kept}; continue with {again} --resume" if kept
                     else f"no checkpoint yet (the first comes after {checkpoint_every} steps); run the same "
                          "command to start again")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
