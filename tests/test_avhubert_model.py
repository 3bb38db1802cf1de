"""AV-HuBERT model: sizes, fairseq key names, padding invariance, masking, modality dropout, gradient scaling."""

from __future__ import annotations

import pytest
import torch

from av2av_lightning.models.avhubert import AUDIO_DIM, AVHubert, AVHubertConfig
from av2av_lightning.models.masking import sample_spans

DETERMINISTIC = {"dropout": 0.0, "attention_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0}


def tiny(**overrides) -> AVHubert:
    torch.manual_seed(0)
    return AVHubert(AVHubertConfig.tiny(**{**DETERMINISTIC, **overrides}))


def batch(lengths: list[int], frames: int | None = None, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Random audio/video with *garbage* in the padding, which the model must ignore."""
    generator = torch.Generator().manual_seed(seed)
    frames = frames or max(lengths)
    audio = torch.randn(len(lengths), frames, AUDIO_DIM, generator=generator)
    video = torch.randn(len(lengths), 1, frames, 88, 88, generator=generator)
    padding_mask = torch.arange(frames)[None] >= torch.tensor(lengths)[:, None]
    return audio, video, padding_mask


def test_published_sizes():
    """Encoder + front-ends + prediction head; the head (final_proj, 100-class label embeddings) is < 0.3 M."""
    for preset, published in (("base", 103e6), ("large", 325e6)):
        with torch.device("meta"):
            model = AVHubert(getattr(AVHubertConfig, preset)())
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - published) / published < 0.03, (preset, count)


def test_fairseq_state_dict_names():
    model = tiny()
    keys = set(model.state_dict())
    for key in [
        "feature_extractor_audio.proj.weight",
        "feature_extractor_video.proj.weight",
        "feature_extractor_video.resnet.frontend3D.0.weight",
        "feature_extractor_video.resnet.frontend3D.1.running_mean",
        "feature_extractor_video.resnet.frontend3D.2.weight",
        "feature_extractor_video.resnet.trunk.layer1.0.conv1.weight",
        "feature_extractor_video.resnet.trunk.layer2.0.downsample.0.weight",
        "feature_extractor_video.resnet.trunk.layer4.0.relu2.weight",
        "layer_norm.weight",
        "post_extract_proj.weight",
        "mask_emb",
        "encoder.pos_conv.0.bias",
        "encoder.pos_conv.0.parametrizations.weight.original0",  # fairseq weight_g
        "encoder.pos_conv.0.parametrizations.weight.original1",  # fairseq weight_v
        "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.3.self_attn.out_proj.bias",
        "encoder.layers.0.self_attn_layer_norm.weight",
        "encoder.layers.0.fc1.weight",
        "encoder.layers.0.fc2.weight",
        "encoder.layers.0.final_layer_norm.weight",
        "encoder.layer_norm.weight",
        "final_proj.weight",
        "label_embs_concat",
    ]:
        assert key in keys, key
    state = model.state_dict()
    assert state["encoder.pos_conv.0.parametrizations.weight.original0"].shape == (1, 1, 32)
    assert state["layer_norm.weight"].shape == (256,)
    assert state["post_extract_proj.weight"].shape == (128, 256)
    assert state["label_embs_concat"].shape == (50, 64)
    assert state["feature_extractor_video.proj.weight"].shape == (128, 128)  # 8 x resnet_width


def test_tiny_forward_backward_shapes():
    model = AVHubert(AVHubertConfig.tiny(num_classes=[50, 30])).train()
    audio, video, padding_mask = batch([20, 13])
    out = model(audio, video, padding_mask)
    assert out.features.shape == (2, 20, 128)
    assert [tuple(logits.shape) for logits in out.logits] == [(2, 20, 50), (2, 20, 30)]
    assert out.logits[0].abs().max() <= 1 / model.config.logit_temp + 1e-4
    assert out.mask_indices.shape == (2, 20) and out.mask_indices.any()
    assert torch.equal(out.padding_mask, padding_mask) and out.feature_penalty.dim() == 0
    valid = out.mask_indices & ~padding_mask
    targets = [torch.randint(0, 50, (int(valid.sum()),)), torch.randint(0, 30, (int(valid.sum()),))]
    loss = sum(torch.nn.functional.cross_entropy(lg[valid], t) for lg, t in zip(out.logits, targets))
    (loss + 10 * out.feature_penalty).backward()
    assert model.feature_extractor_video.resnet.frontend3D[0].weight.grad.abs().sum() > 0
    assert model.label_embs_concat.grad is not None and torch.isfinite(model.mask_emb.grad).all()


def test_padding_invariance():
    model = tiny().eval()
    audio, video, padding_mask = batch([20, 13])
    with torch.no_grad():
        together = model(audio, video, padding_mask, mask=False)
        alone = model(audio[1:, :13], video[1:, :, :13], mask=False)
    torch.testing.assert_close(together.features[1, :13], alone.features[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(together.logits[0][1, :13], alone.logits[0][0], atol=1e-4, rtol=0)


def test_missing_modality_is_zero_features_and_eval_semantics():
    model = tiny(modality_dropout=0.5).train()
    audio, video, padding_mask = batch([12, 9])
    both, _ = model.extract_features(audio, video, padding_mask)
    audio_only, mask_out = model.extract_features(audio=audio, padding_mask=padding_mask)
    video_only, _ = model.extract_features(video=video, padding_mask=padding_mask)
    assert model.training and torch.equal(mask_out, padding_mask)
    assert both.shape == audio_only.shape == video_only.shape == (2, 12, 128)
    assert not torch.allclose(both, audio_only) and not torch.allclose(both, video_only)
    assert torch.equal(both, model.extract_features(audio, video, padding_mask)[0])  # no randomness at all
    with torch.no_grad():  # a silenced front-end is exactly a missing modality
        model.feature_extractor_video.proj.weight.zero_()
        model.feature_extractor_video.proj.bias.zero_()
    torch.testing.assert_close(model.extract_features(audio, video, padding_mask)[0], audio_only)


def test_layer_selection():
    model = tiny().eval()
    audio, video, padding_mask = batch([10, 10])
    with torch.no_grad():
        outputs = [model.extract_features(audio, video, padding_mask, layer=k)[0] for k in range(5)]
        last = model.extract_features(audio, video, padding_mask)[0]
        fused = torch.cat([model.feature_extractor_audio(audio), model.feature_extractor_video(video)], -1)
        x = model.post_extract_proj(model.layer_norm(fused))
        x = x + model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(outputs[0], x)
    for earlier, later in zip(outputs, outputs[1:]):
        assert not torch.allclose(earlier, later)
    torch.testing.assert_close(last, model.encoder.layer_norm(outputs[4]))
    with pytest.raises(ValueError):
        model.extract_features(audio, video, padding_mask, layer=5)


def test_span_statistics():
    torch.manual_seed(0)
    lengths = torch.randint(50, 200, (400,))
    spans = sample_spans(lengths, prob=0.1, span=5, min_spans=2)
    mask = spans.to_mask(200)
    assert not mask[torch.arange(200)[None] >= lengths[:, None]].any()
    assert abs(mask.sum().item() / lengths.sum().item() - 0.1) < 0.02  # overlaps make it slightly < prob
    assert all(len(starts) >= 2 for starts in spans.starts)
    few = sample_spans(lengths, prob=1e-4, span=1, min_spans=2).to_mask(200)
    assert (few.sum(1) == 2).all()
    short = sample_spans(torch.tensor([3, 0]), prob=0.8, span=10, min_spans=2)
    assert short.to_mask(4).tolist() == [[True, True, True, False], [False] * 4]


def test_feature_masking_never_on_padding_and_uses_mask_emb():
    model = tiny().train()
    audio, video, padding_mask = batch([30, 12, 25])
    seen = {}
    model.encoder.register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
    out = model(audio, video, padding_mask)
    assert out.mask_indices.any() and not (out.mask_indices & padding_mask).any()
    assert (out.mask_indices.sum(1) >= model.config.mask_length_audio).all()
    torch.testing.assert_close(seen["x"][out.mask_indices], model.mask_emb.expand(int(out.mask_indices.sum()), -1))
    assert not torch.isclose(seen["x"][~out.mask_indices], model.mask_emb).all(-1).any()
    assert not model(audio, video, padding_mask, mask=False).mask_indices.any()


def test_input_masking():
    model = tiny(mask_type="input", mask_same_spans=False, mask_prob_image=0.3, mask_length_image=5).train()
    assert model.mask_emb.shape == (AUDIO_DIM,)
    audio, video, padding_mask = batch([30, 18])
    seen = {}
    model.feature_extractor_audio.register_forward_pre_hook(lambda _, args: seen.update(audio=args[0]))
    model.feature_extractor_video.register_forward_pre_hook(lambda _, args: seen.update(video=args[0]))
    torch.manual_seed(3)
    out = model(audio, video, padding_mask)
    audio_masked = (seen["audio"] != audio).any(-1)
    assert audio_masked.any() and not (audio_masked & padding_mask).any()
    torch.testing.assert_close(seen["audio"][audio_masked], model.mask_emb.expand(int(audio_masked.sum()), -1))
    video_masked = (
        (seen["video"] != video.masked_fill(padding_mask[:, None, :, None, None], 0)).flatten(3).any(-1)[:, 0]
    )
    assert video_masked.any() and not (video_masked & padding_mask).any()
    assert torch.equal(out.mask_indices, audio_masked | video_masked)
    for row, length in enumerate([30, 18]):
        originals = video[row, 0, :length].flatten(1)
        for frame in video_masked[row].nonzero().flatten().tolist():
            replaced = seen["video"][row, 0, frame].flatten()
            matches = (originals == replaced).all(-1).nonzero().flatten().tolist()
            assert matches and frame not in matches  # a real frame of the same clip, from elsewhere


def test_input_masking_same_spans():
    model = tiny(mask_type="input").train()
    audio, video, padding_mask = batch([24])
    seen = {}
    model.feature_extractor_video.register_forward_pre_hook(lambda _, args: seen.update(video=args[0]))
    out = model(audio, video, padding_mask)
    assert torch.equal((seen["video"] != video).flatten(3).any(-1)[:, 0], out.mask_indices)


@pytest.mark.parametrize("audio_dropout", [1.0, 0.0])
def test_modality_dropout(audio_dropout):
    model = tiny(modality_dropout=1.0, audio_dropout=audio_dropout).train()
    audio, video, padding_mask = batch([14, 10])
    dropped = model(audio, video, padding_mask, mask=False).features
    kept = {"video": video} if audio_dropout else {"audio": audio}
    torch.testing.assert_close(dropped, model(padding_mask=padding_mask, mask=False, **kept).features)
    model.eval()
    both = model(audio, video, padding_mask, mask=False).features
    assert not torch.allclose(both, model(padding_mask=padding_mask, mask=False, **kept).features)


def front_end_grads(model: AVHubert) -> list[torch.Tensor | None]:
    audio, video, padding_mask = batch([8, 6])
    model.zero_grad(set_to_none=True)
    model(audio, video, padding_mask, mask=False).features.pow(2).sum().backward()
    assert model.encoder.layers[0].fc1.weight.grad is not None
    return [p.grad for p in [*model.feature_extractor_audio.parameters(), *model.feature_extractor_video.parameters()]]


def test_feature_grad_mult():
    full = tiny(feature_grad_mult=1.0).eval()
    reference = front_end_grads(full)
    for scale in (0.1, 0.0):
        scaled = tiny(feature_grad_mult=scale).eval()
        scaled.load_state_dict(full.state_dict())
        grads = front_end_grads(scaled)
        if scale == 0:
            assert all(grad is None for grad in grads)
        else:
            for grad, ref in zip(grads, reference):
                torch.testing.assert_close(grad, scale * ref)


def test_config_validation():
    with pytest.raises(ValueError, match="one set of spans"):
        AVHubertConfig(mask_prob_image=0.3)
    with pytest.raises(ValueError, match="fusion"):
        AVHubertConfig(fusion="sum")
    add = AVHubert(AVHubertConfig.tiny(fusion="add"))
    assert add.layer_norm.weight.shape == (128,) and "post_extract_proj.weight" not in add.state_dict()
    assert AVHubertConfig.large().mask_type == "input" and AVHubertConfig.base().layers == 12
