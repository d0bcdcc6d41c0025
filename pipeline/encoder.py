"""The frozen open_clip encoder: per-frame patch tokens and embeddings, per-caption text tokens and embeddings."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import UserError, cut
from pipeline.files import file_sha256

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # weights we pretrain ourselves (cli.py pretrain-tiny), shipped
DEFAULT_MODEL = "CrossTVR-Tiny"
RANDOM = "random"  # pretrained="random": random init on purpose (tests, ablations), still warned about
# Measured (see docs/benchmarks.md): the shipped tiny model's text blocks smear word identity, its input tokens keep it.
DEFAULT_TEXT_LAYER = {DEFAULT_MODEL: 0}


def register_model_configs() -> None:
    """Make the project's architectures (model_configs/*.json) known to open_clip by name."""
    import open_clip

    if DEFAULT_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def default_device() -> torch.device:
    """This process's GPU when CUDA is present (LOCAL_RANK under torchrun, else GPU 0), else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)  # bare "cuda" tensors and NCCL then use this rank's GPU too
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_text_layer(model_name: str, text_layer: int | None, n_blocks: int) -> int:
    """Text tokens after how many of the n_blocks text blocks (0..n_blocks); None = the model's default, -1 = last."""
    if text_layer is None:
        text_layer = DEFAULT_TEXT_LAYER.get(model_name, -1)
    if not -(n_blocks + 1) <= text_layer <= n_blocks:
        raise UserError(f"--text-layer {text_layer} out of range: {model_name} has {n_blocks} text blocks "
                        f"(0 = token embeddings .. {n_blocks} = last, or -{n_blocks + 1}..-1)")
    return text_layer % (n_blocks + 1)


def shipped_weights(model_name: str) -> Path | None:
    """The checksum-verified weights shipped in pipeline/weights/ for model_name, or None if none ship."""
    path = WEIGHTS_DIR / f"{model_name}.safetensors"
    if not path.is_file():
        return None
    sidecar = path.with_name(path.name + ".sha256")
    expected = sidecar.read_text().split()[0] if sidecar.is_file() else "(no sidecar)"
    if file_sha256(path) != expected:
        raise UserError(
            f"{path}: SHA-256 does not match {sidecar.name}; restore both files (git checkout pipeline/weights/) "
            f"or rebuild them with `python cli.py pretrain-tiny`"
        )
    return path


@dataclass(frozen=True)
class EncoderInfo:
    """What the cache records about the encoder, and the shapes it produces."""

    model: str
    pretrained: str  # open_clip tag, local checkpoint path, or "" for random weights
    pretrained_sha256: str  # checksum of a local checkpoint, else ""
    image_size: int
    patch_layer: int
    text_layer: int  # text tokens after this many text blocks: 0 = token + position embeddings, n_blocks = last
    num_patches: int  # P: grid patches per frame (the class token is stored apart)
    patch_width: int  # W: width of the vision transformer
    text_width: int  # W_text: width of the text transformer
    embed_dim: int  # E: joint embedding space
    context_length: int


class WeightsNotLoaded(UserError):
    """Pretrained weights that did not load (a tag without network access, say); reason: open_clip's why, in short.
    Its message's fix names extract's --pretrained: a command without that option says its own."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _no_clip_text(model_name: str) -> UserError:
    """The refusal for a text tower that is not open_clip's own transformer with the CLIP tokenizer."""
    return UserError(
        f"model '{model_name}' has no CLIP-style text tower: text tokens need open_clip's text transformer and "
        "CLIP tokenizer (e.g. ViT-B-32), not a Hugging Face text encoder or tokenizer"
    )


def check_activation(model_name: str, tag: str) -> None:
    """Refuse an open_clip tag whose weights were trained with another activation than model_name's config.

    OpenAI's CLIP weights were trained with QuickGELU: loaded into ViT-B-32 (GELU) rather than ViT-B-32-quickgelu they
    run, and give features that are off (open_clip only warns). A local checkpoint cannot say which it needs: the
    README tells which model name goes with OpenAI's files.
    """
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg:  # not a tag open_clip knows for this model: its loader says so
        return
    wants, has = bool(tag_cfg.get("quick_gelu", False)), bool(open_clip.get_model_config(model_name).get("quick_gelu"))
    if wants != has:
        name = {True: "QuickGELU", False: "GELU"}
        other = f"{model_name}-quickgelu" if wants else model_name.removesuffix("-quickgelu")
        raise UserError(f"--pretrained {tag} was trained with {name[wants]} activations, but --model {model_name} uses "
                        f"{name[has]}: pass --model {other}")


def _load_model(model_name: str, pretrained: str | None):
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model '{model_name}': see open_clip.list_models() "
            f"(e.g. ViT-B-32, ViT-L-14) or the project's {DEFAULT_MODEL}"
        )
    # Refused before loading: open_clip would build a Hugging Face tokenizer (no .encode), which needs
    # transformers and a download.
    if open_clip.get_model_config(model_name)["text_cfg"].get("hf_tokenizer_name"):
        raise _no_clip_text(model_name)
    # a path (open_clip's tags hold no "/") or a checkpoint's file name: a typo in it is not a tag to download
    looks_like_a_file = bool(pretrained) and ("/" in pretrained
                                              or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_a_file and not Path(pretrained).is_file():
        raise UserError(f"{pretrained}: checkpoint file not found; pass --pretrained an existing file or an open_clip tag")
    if pretrained and not Path(pretrained).is_file():
        check_activation(model_name, pretrained)
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", ""):
            log.info("--pretrained %s: from the local hub cache or a download (without network the hub retries for "
                     "about a minute; HF_HUB_OFFLINE=1 fails at once)", pretrained)
    try:
        # weights_only (open_clip's default, kept explicit): a local .pt is read without running pickled code
        with warnings.catch_warnings():  # torch's own words on a TorchScript file: the refusal below says it in one
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None,
                                                                weights_only=True)
    except Exception as e:  # noqa: BLE001 - any download, lookup or load failure is one line
        lines = str(e).strip().splitlines()
        reason = lines[0].split(". ")[0] if lines else type(e).__name__
        if pretrained and Path(pretrained).is_file():  # torch.load says only "101" of a text file: name the type too
            if "TorchScript" in str(e):
                raise UserError(f"{pretrained}: a TorchScript archive (OpenAI's original CLIP files are), which is not "
                                "read here; convert it to a state dict first (README: With a real CLIP)") from None
            # a checkpoint of another architecture: the first key that does not fit says which (open_clip may stop
            # before comparing them, e.g. resizing position embeddings, with an error that says nothing of it)
            detail = next((ln.strip() for ln in lines[1:] if "size mismatch" in ln or "Missing key" in ln), "") \
                or _first_misfit(model_name, Path(pretrained))
            reason = type(e).__name__ + (f": {reason}" if reason != type(e).__name__ else "")
            sep = " " if reason.endswith(":") else "; "  # "...state_dict for CLIP:" runs on into its key
            reason += f"{sep}{cut(detail, 120)}" if detail else ""
            raise UserError(f"{pretrained}: not a checkpoint open_clip can load for {model_name} ({reason}); "
                            "pass a .pt/.safetensors checkpoint of that model or a --pretrained tag") from None
        raise WeightsNotLoaded(
            f"could not load pretrained weights '{pretrained}' for {model_name} ({reason}); without network access "
            f"pass a local checkpoint: --pretrained /path/to/{model_name}.safetensors (or .bin/.pt)", reason
        ) from None
    return model


def _first_misfit(model_name: str, path: Path) -> str:
    """The first tensor of model_name that the checkpoint at path lacks or holds in another shape ("" if none, or if
    the file cannot be read as a state dict): what a checkpoint of another model gets wrong."""
    import open_clip

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - not a state dict: the loader's own words stand
        return ""
    shapes = {k.removeprefix("module."): v for k, v in shapes.items()}
    for key, tensor in open_clip.create_model(model_name).state_dict().items():
        if key not in shapes:
            return f"Missing key {key}"
        if shapes[key] != tuple(tensor.shape):
            return f"size mismatch for {key}: {list(shapes[key])} in the checkpoint, {list(tensor.shape)} in the model"
    return ""


class FrozenEncoder:
    """A frozen open_clip ViT run once per frame and caption, exposing the tokens the model really uses."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        device: torch.device | None = None,
        patch_layer: int = -1,
        text_layer: int | None = None,
        max_text_tokens: int = 32,
    ) -> None:
        import open_clip

        self.device = device or default_device()
        if pretrained is None and (shipped := shipped_weights(model_name)) is not None:
            pretrained = str(shipped)  # our own pretrained weights; an explicit --pretrained wins
        asked_random = pretrained == RANDOM
        if asked_random:
            pretrained = None
        model = _load_model(model_name, pretrained)
        if not pretrained:
            log.warning("RANDOM WEIGHTS: model %s %s; its features carry no meaning%s", model_name,
                        "with random weights, as --pretrained random asks" if asked_random else
                        "has no --pretrained weights", "" if asked_random else
                        " (pass an open_clip tag such as 'openai' or a local checkpoint path)")
        else:
            log.info("encoder %s with pretrained weights '%s'", model_name, pretrained)
        visual = getattr(model, "visual", None)
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise UserError(f"model '{model_name}' has no ViT image tower; patch tokens need a ViT (e.g. ViT-B-32)")
        text_transformer = getattr(getattr(model, "text", model), "transformer", None)  # CustomTextCLIP: in .text
        if not hasattr(text_transformer, "resblocks"):
            raise _no_clip_text(model_name)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.visual = self.model.visual
        self.text_transformer = text_transformer
        n_blocks = len(self.visual.transformer.resblocks)
        if not -n_blocks <= patch_layer < n_blocks:
            raise UserError(f"--patch-layer {patch_layer} out of range: {model_name} has {n_blocks} visual blocks")
        text_layer = resolve_text_layer(model_name, text_layer, len(self.text_transformer.resblocks))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        image_size = int(size if isinstance(size, int) else size[0])
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        context_length = int(self.tokenizer.context_length)
        if max_text_tokens > context_length:
            log.warning("--max-text-tokens %d: %s reads at most %d tokens a caption; keeping %d", max_text_tokens,
                        model_name, context_length, context_length)
        self.max_text_tokens = min(max_text_tokens, context_length)
        local = bool(pretrained) and Path(pretrained).is_file()
        self.info = EncoderInfo(
            model=model_name,
            # a local file by its absolute path, so that a cache names it wherever the command ran from
            pretrained=str(Path(pretrained).resolve() if local else pretrained or ""),
            pretrained_sha256=file_sha256(Path(pretrained)) if local else "",
            image_size=image_size,
            patch_layer=patch_layer % n_blocks,
            text_layer=text_layer,
            num_patches=int(self.visual.positional_embedding.shape[0]) - 1,
            patch_width=int(self.visual.class_embedding.shape[-1]),
            text_width=int(self.text_transformer.width),
            embed_dim=int(self.model.embed_dim if hasattr(self.model, "embed_dim") else self.visual.output_dim),
            context_length=context_length,
        )

    @staticmethod
    def _capture(module: torch.nn.Module, batch_first: bool, before: bool = False):
        """Forward hook storing a block's output (before=True: its input) as [B, L, W]."""
        store: dict[str, torch.Tensor] = {}

        def keep(x):
            x = x[0] if isinstance(x, tuple) else x
            store["x"] = x if batch_first else x.transpose(0, 1)

        if before:
            return store, module.register_forward_pre_hook(lambda _mod, args: keep(args[0]))
        return store, module.register_forward_hook(lambda _mod, _inp, out: keep(out))

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 frames [N, S, S, 3] -> patch tokens [N, P, W], class tokens [N, W], embeddings [N, E] (float32, CPU)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std  # [N, 3, S, S]
        block = self.visual.transformer.resblocks[self.info.patch_layer]
        store, handle = self._capture(block, self.visual.transformer.batch_first)
        try:
            with autocast(self.device):
                emb = self.model.encode_image(x)
        finally:
            handle.remove()
        tokens = store["x"].float()  # [N, 1 + P, W]
        return tokens[:, 1:].cpu(), tokens[:, 0].cpu(), emb.float().cpu()

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Token ids [N, context] truncated to max_text_tokens, valid lengths [N] and whether each was truncated."""
        short = self.tokenizer(captions, context_length=self.max_text_tokens)  # EOT kept at the end when cut
        full_lengths = np.array([len(self.tokenizer.encode(c)) + 2 for c in captions], dtype=np.int64)
        ids = torch.zeros(len(captions), self.info.context_length, dtype=torch.long)
        ids[:, : self.max_text_tokens] = short
        lengths = np.minimum(full_lengths, self.max_text_tokens)
        return ids, lengths, full_lengths > self.max_text_tokens

    @contextlib.contextmanager
    def _text_positions(self, n: int) -> Iterator[int]:
        """Inside, open_clip's text tower runs over its first n positions only; yields how many it runs over.

        Its attention is causal, so the first n tokens, and the embedding pooled at the end-of-text token (within
        them: captions are cut at max_text_tokens), are what the whole context gives (to float rounding), at
        n / context of the cost:
        for 32 of CLIP's 77 positions, caption encoding on a CPU is 2.6 times faster. A tower without a causal
        mask, or not laid out as open_clip's CLIP (positional_embedding, attn_mask), runs over its whole context.
        """
        m, context = self.model, self.info.context_length
        pos, mask = getattr(m, "positional_embedding", None), getattr(m, "attn_mask", None)
        causal = (pos is not None and isinstance(mask, torch.Tensor) and mask.shape == (context, context)
                  and bool(torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1))))
        if not causal or n >= context:
            yield context
            return
        m.positional_embedding, m.attn_mask = torch.nn.Parameter(pos[:n], requires_grad=False), mask[:n, :n]
        try:
            yield n
        finally:
            m.positional_embedding, m.attn_mask = pos, mask

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """Captions -> text tokens [N, L, W_text] after info.text_layer blocks (L = max_text_tokens), lengths, embeddings."""
        ids, lengths, _ = self.tokenize(captions)
        # A causal text transformer: positions before L never see the padding after them, so
        # these tokens and this embedding are exactly what open_clip computes for the (cut) caption.
        blocks, k = self.text_transformer.resblocks, self.info.text_layer
        store, handle = self._capture(blocks[min(k, len(blocks) - 1)], self.text_transformer.batch_first,
                                      before=k < len(blocks))
        try:
            with autocast(self.device), self._text_positions(self.max_text_tokens) as n:
                emb = self.model.encode_text(ids[:, :n].to(self.device))
        finally:
            handle.remove()
        tokens = store["x"][:, : self.max_text_tokens].float().cpu()
        positions = torch.arange(self.max_text_tokens)[None, :, None]
        tokens = tokens.masked_fill(positions >= torch.from_numpy(lengths)[:, None, None], 0.0)
        return tokens, lengths, emb.float().cpu()
