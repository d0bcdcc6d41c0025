"""The frozen encoder: stored tokens re-pool to open_clip's own embeddings; loading errors are one clear line."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipeline.encoder import (
    DEFAULT_MODEL,
    FrozenEncoder,
    _load_model,
    default_device,
    file_sha256,
    resolve_text_layer,
    shipped_weights,
)
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    torch.manual_seed(0)
    return FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"))


def _with_text_layer(encoder: FrozenEncoder, text_layer: int) -> FrozenEncoder:
    enc = FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"), text_layer=text_layer)
    enc.model.load_state_dict(encoder.model.state_dict())
    return enc


def _pixels(enc: FrozenEncoder, frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    return (x - enc.mean) / enc.std


def test_patch_tokens_repool_to_encode_image(encoder):
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    patch, cls_tok, emb = encoder.encode_frames(frames)
    assert patch.shape == (5, encoder.info.num_patches, encoder.info.patch_width) == (5, 64, 128)
    assert cls_tok.shape == (5, 128) and emb.shape == (5, encoder.info.embed_dim)
    v = encoder.model.visual
    tokens = torch.cat([cls_tok[:, None], patch], dim=1)  # [N, 1 + P, W]
    repooled = v.ln_post(tokens)[:, 0] @ v.proj  # class-token pooling, as open_clip's ViT does
    with torch.no_grad():
        reference = encoder.model.encode_image(_pixels(encoder, frames))
    torch.testing.assert_close(repooled, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb, reference)


def test_text_tokens_repool_to_encode_text(encoder):
    last = _with_text_layer(encoder, -1)  # the last block's tokens are what encode_text pools
    captions = ["a red circle moves to the left", "a blue square", "word " * 60]
    tokens, lengths, emb = last.encode_captions(captions)
    assert last.info.text_layer == 4 and tokens.shape == (3, 32, encoder.info.text_width)
    assert lengths[0] == 9 and lengths[2] == 32  # SOT + 7 words + EOT; the long one is cut at 32
    assert not tokens[0, lengths[0]:].any() and tokens[0, : lengths[0]].abs().sum(-1).min() > 0
    m = encoder.model
    repooled = m.ln_final(tokens)[torch.arange(3), torch.from_numpy(lengths) - 1] @ m.text_projection
    with torch.no_grad():
        reference = m.encode_text(open_clip.get_tokenizer(DEFAULT_MODEL)(captions))
    torch.testing.assert_close(repooled, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb, reference, rtol=1e-4, atol=1e-5)


def test_text_layer_0_is_token_plus_position_embeddings(encoder):
    assert encoder.info.text_layer == 0  # the shipped tiny model's default
    captions = ["a red circle moves to the left", "word " * 60]
    tokens, lengths, emb = encoder.encode_captions(captions)
    m = encoder.model
    ids = open_clip.get_tokenizer(DEFAULT_MODEL)(captions, context_length=32)  # [2, 32], EOT kept when cut
    with torch.no_grad():
        reference = m.token_embedding(ids) + m.positional_embedding[:32]  # [2, 32, W_text]
        reference[0, lengths[0]:] = 0
        torch.testing.assert_close(tokens, reference)
        torch.testing.assert_close(emb, m.encode_text(open_clip.get_tokenizer(DEFAULT_MODEL)(captions)),
                                   rtol=1e-4, atol=1e-5)  # the embedding is still the model's final one


def test_text_layers_differ_and_count_from_the_end(encoder):
    captions = ["a red circle moves to the left", "a blue square"]
    by_layer = {k: _with_text_layer(encoder, k).encode_captions(captions) for k in (1, 4, -1, -5)}
    assert torch.equal(by_layer[4][0], by_layer[-1][0])
    assert torch.equal(by_layer[-5][0], encoder.encode_captions(captions)[0])
    first, second = by_layer[-5][0], by_layer[1][0]
    assert not torch.allclose(first, second) and not torch.allclose(second, by_layer[4][0])
    for k in (1, 4):
        torch.testing.assert_close(by_layer[k][2], by_layer[-5][2])  # the embedding does not depend on the layer
    assert not second[0, 9:].any() and second[0, :9].abs().sum(-1).min() > 0  # padding still zeroed


@pytest.mark.parametrize("text_layer", [0, 2, -1])
def test_captions_cut_short_run_the_text_tower_over_their_positions_only_with_the_same_result(text_layer):
    import contextlib

    short = FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"), max_text_tokens=12, text_layer=text_layer)
    captions = ["a red circle moves to the left", "word " * 40, "a blue square above a green star"]
    seen = []
    short.model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    tokens, lengths, emb = short.encode_captions(captions)
    assert seen == [12]  # 12 of the context's 32 positions
    assert short.model.positional_embedding.shape[0] == short.model.attn_mask.shape[0] == 32  # put back
    whole = contextlib.contextmanager(lambda n: iter([short.info.context_length]))  # the whole context, as before
    short._text_positions = whole
    ref_tokens, ref_lengths, ref_emb = short.encode_captions(captions)
    assert seen == [12, 32] and (lengths == ref_lengths).all()
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)  # only float rounding: another matmul shape
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)


def test_more_text_tokens_than_the_model_reads_are_capped_with_a_warning(caplog):
    capped = FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"), max_text_tokens=40)
    assert capped.max_text_tokens == capped.info.context_length == 32
    assert f"--max-text-tokens 40: {DEFAULT_MODEL} reads at most 32 tokens a caption; keeping 32" in caplog.text


def test_text_layer_default_and_range():
    assert resolve_text_layer(DEFAULT_MODEL, None, 4) == 0
    assert resolve_text_layer("ViT-B-32", None, 12) == 12  # real CLIP keeps the last block
    assert resolve_text_layer("ViT-B-32", -1, 12) == 12 and resolve_text_layer("ViT-B-32", -13, 12) == 0
    for bad in (5, -6):
        message = rf"--text-layer {bad} out of range: {DEFAULT_MODEL} has 4 text blocks"
        with pytest.raises(UserError, match=message) as err:
            FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"), text_layer=bad)
        assert "\n" not in str(err.value)


def test_truncation_is_counted(encoder):
    _, lengths, truncated = encoder.tokenize(["short one", "long " * 40])
    assert truncated.tolist() == [False, True] and lengths.tolist() == [4, 32]


def test_patch_layer_picks_another_block(encoder):
    enc = FrozenEncoder(DEFAULT_MODEL, device=torch.device("cpu"), patch_layer=1)
    enc.model.load_state_dict(encoder.model.state_dict())
    frames = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    last, _, emb_last = encoder.encode_frames(frames)
    second, _, emb_second = enc.encode_frames(frames)
    assert enc.info.patch_layer == 1 and not torch.allclose(last, second)
    torch.testing.assert_close(emb_last, emb_second)  # the embedding is still the model's final one


def test_local_checkpoint_loads_and_is_recorded(encoder, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    loaded = FrozenEncoder(DEFAULT_MODEL, pretrained=str(path), device=torch.device("cpu"))
    assert loaded.info.pretrained == str(path) and loaded.info.pretrained_sha256 == file_sha256(path)
    frames = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded.encode_frames(frames)[2], encoder.encode_frames(frames)[2])


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING):  # the shipped weights are the default; random init is asked for by name
        enc = FrozenEncoder(DEFAULT_MODEL, pretrained="random", device=torch.device("cpu"))
    assert "RANDOM WEIGHTS: model CrossTVR-Tiny with random weights, as --pretrained random asks" in caplog.text
    assert "'openai'" not in caplog.text and enc.info.pretrained == ""  # no advice to take what it cannot load


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("No-Such-Model", None, "unknown open_clip model 'No-Such-Model'"),
        (DEFAULT_MODEL, "missing/ckpt.safetensors", "checkpoint file not found"),
        # a mistyped suffix: it was "could not load pretrained weights ...; without network access pass a local
        # checkpoint", to one who had passed a local checkpoint
        (DEFAULT_MODEL, "pipeline/weights/CrossTVR-Tiny.safetensor", "CrossTVR-Tiny.safetensor: checkpoint file not "
                                                                      "found; pass --pretrained an existing file"),
        (DEFAULT_MODEL, "no-such-tag", "pass a local checkpoint: --pretrained"),
        # Hugging Face text sides, refused from the config before any download
        ("roberta-ViT-B-32", None, "model 'roberta-ViT-B-32' has no CLIP-style text tower"),
        ("ViT-L-14-CLIPA", None, "model 'ViT-L-14-CLIPA' has no CLIP-style text tower"),
    ],
)
def test_loading_errors_are_one_line(model, pretrained, message):
    with pytest.raises(UserError, match=message) as err:
        FrozenEncoder(model, pretrained=pretrained, device=torch.device("cpu"))
    assert "\n" not in str(err.value)


class _Payload:
    """Pickled, it opens a file when unpickled: what weights_only=True must refuse to run."""

    def __init__(self, target) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch says so of the planted payload
@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("notes.txt", lambda p: p.write_text("a caption file, not weights\n"), r"\w+Error"),  # as torch.load says
        ("empty.pt", lambda p: p.write_bytes(b""), "EOFError"),
        ("payload.pt", lambda p: p.write_bytes(pickle.dumps(_Payload(p.with_name("PWNED")))), "UnpicklingError"),
    ],
)
def test_a_local_file_that_is_no_checkpoint_is_one_line(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(UserError) as err:
        FrozenEncoder(DEFAULT_MODEL, pretrained=str(path), device=torch.device("cpu"))
    assert re.fullmatch(rf"{re.escape(str(path))}: not a checkpoint open_clip can load for {DEFAULT_MODEL} "
                        rf"\({reason}[^\n]*\); pass a \.pt/\.safetensors checkpoint of that model or a --pretrained tag",
                        str(err.value)), str(err.value)
    assert not (tmp_path / "PWNED").exists()  # loaded weights_only: the pickled call never ran


def test_a_checkpoint_of_another_model_or_in_torchscript_says_so(tmp_path, recwarn):
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match=r"not a checkpoint open_clip can load for CrossTVR-Tiny \(RuntimeError: .*"
                                        r"Missing key\(s\) in state_dict: .*\.\.\.\); pass a \.pt"):
        FrozenEncoder(DEFAULT_MODEL, pretrained=str(other), device=torch.device("cpu"))
    # the shipped tiny weights for ViT-B-32: open_clip fails resizing position embeddings ("not implemented for
    # 'Half'") before it compares any shape; the first tensor that does not fit is named instead
    with pytest.raises(UserError, match=r"for ViT-B-32-quickgelu \(NotImplementedError: .* size mismatch for "
                                        r"\S+: \[\d+(, \d+)*\] in the checkpoint, \[\d+(, \d+)*\] in the model"):
        FrozenEncoder("ViT-B-32-quickgelu", pretrained=str(shipped_weights(DEFAULT_MODEL)), device=torch.device("cpu"))
    scripted = tmp_path / "ViT-B-32.pt"  # as OpenAI's own files are: a TorchScript archive
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    recwarn.clear()
    with pytest.raises(UserError, match=r"ViT-B-32.pt: a TorchScript archive .* convert it to a state dict first"):
        FrozenEncoder(DEFAULT_MODEL, pretrained=str(scripted), device=torch.device("cpu"))
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]  # the refusal alone says it


def test_openai_weights_need_the_quickgelu_model():
    from pipeline.encoder import check_activation

    with pytest.raises(UserError, match=r"--pretrained openai was trained with QuickGELU activations, but --model "
                                        r"ViT-B-32 uses GELU: pass --model ViT-B-32-quickgelu"):
        FrozenEncoder("ViT-B-32", pretrained="openai", device=torch.device("cpu"))  # refused before any download
    check_activation("ViT-B-32-quickgelu", "openai")  # the right pair
    check_activation("ViT-B-32", "laion2b_s34b_b79k")  # LAION's weights: GELU
    with pytest.raises(UserError, match="pass --model ViT-B-32-quickgelu$"):
        check_activation("ViT-B-32", "laion400m_e32")  # LAION-400M's OpenCLIP weights: QuickGELU too


def test_text_tower_without_resblocks_is_refused(monkeypatch):
    def hf_text_tower(model_name, pretrained):
        model = _load_model(model_name, pretrained)
        model.transformer = torch.nn.Module()  # as a Hugging Face text encoder: no .resblocks
        return model

    monkeypatch.setattr("pipeline.encoder._load_model", hf_text_tower)
    with pytest.raises(UserError, match=f"model '{DEFAULT_MODEL}' has no CLIP-style text tower") as err:
        FrozenEncoder(DEFAULT_MODEL, pretrained="random", device=torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("local_rank", "index"), [(None, 0), ("3", 3)])
def test_default_device_is_this_ranks_gpu(monkeypatch, local_rank, index):
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)  # torchrun's GPU index of this process on its node
    assert default_device() == torch.device("cuda", index)
    assert picked == [torch.device("cuda", index)]


def test_default_device_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) without CUDA"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_hubs_retry_chatter_shows_only_with_verbose(verbose):
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    # what an offline tag download prints 24 times through the hub's own handler, before our one-line error
    code = (f"import cli; cli.main.callback(verbose={verbose}); import huggingface_hub.utils.logging as h; "
            "h.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    env = {k: v for k, v in subprocess_env().items() if k != "HF_HUB_VERBOSITY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("Retrying in 1s" in out.stderr) == verbose, out.stderr



@pytest.mark.parametrize("offline", ["", "1"])
def test_a_tag_says_before_the_hubs_retries_how_to_skip_them(monkeypatch, caplog, offline):
    import open_clip

    def no_network(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_network)
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match="could not load pretrained weights 'openai'"):
        FrozenEncoder("ViT-B-32-quickgelu", "openai", device=torch.device("cpu"))
    said = "without network the hub retries for about a minute; HF_HUB_OFFLINE=1 fails at once" in caplog.text
    assert said == (offline == "")  # told while waiting; not when the hub is already told it is offline
