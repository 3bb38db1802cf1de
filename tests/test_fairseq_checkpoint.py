"""fairseq AV-HuBERT checkpoints: files in fairseq's pickled format (omegaconf/fairseq classes that cannot be
imported at load time) convert exactly; other architectures and malicious pickles are refused."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from av2av_lightning.models.avhubert import AUDIO_DIM, AVHubert, AVHubertConfig
from av2av_lightning.models.fairseq_checkpoint import (
    Stub,
    load_fairseq_avhubert,
    read_fairseq_checkpoint,
    save_fairseq_avhubert,
)

DETERMINISTIC = {"dropout": 0.0, "attention_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0}


# Stand-ins for the classes a real checkpoint pickles; their modules exist only while saving.
class DictConfig:
    def __init__(self, content: dict) -> None:
        self._metadata = None
        self._parent = None
        self._content = {key: AnyNode(value, self) for key, value in content.items()}


class AnyNode:
    def __init__(self, value, parent) -> None:
        self._metadata = None
        self._parent = parent  # omegaconf nodes point back at their container: a cycle the reader must not follow
        self._val = value


class Dictionary:
    def __init__(self, clusters: int) -> None:
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(clusters)]
        self.count = [1] * len(self.symbols)
        self.indices = {symbol: index for index, symbol in enumerate(self.symbols)}
        self.nspecial = 4


FAKE_MODULES = {
    "omegaconf.dictconfig": [DictConfig],
    "omegaconf.nodes": [AnyNode],
    "fairseq.data.dictionary": [Dictionary],
}


def fairseq_save(obj, path: Path, monkeypatch) -> None:
    """torch.save with the stand-in classes living in omegaconf/fairseq modules, which are gone afterwards."""
    with monkeypatch.context() as patch:
        for name in ("omegaconf", "fairseq", "fairseq.data", *FAKE_MODULES):
            module = types.ModuleType(name)
            for cls in FAKE_MODULES.get(name, []):
                patch.setattr(cls, "__module__", name)
                setattr(module, cls.__name__, cls)
            patch.setitem(sys.modules, name, module)
        torch.save(obj, path)
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules


def source_model(**overrides) -> AVHubert:
    torch.manual_seed(0)
    model = AVHubert(AVHubertConfig.tiny(**{**DETERMINISTIC, "num_classes": [54, 24], **overrides}))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so they must round-trip too
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def fairseq_state(model: AVHubert, prefix: str = "") -> dict:
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        state[prefix + key] = value.clone()
    return state


def fairseq_model_cfg(config: AVHubertConfig) -> dict:
    return {
        "_name": "av_hubert",
        "encoder_embed_dim": config.embed_dim,
        "encoder_layers": config.layers,
        "encoder_ffn_embed_dim": config.ffn_dim,
        "encoder_attention_heads": config.heads,
        "conv_pos": config.pos_conv_kernel,
        "conv_pos_groups": config.pos_conv_groups,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "dropout_input": 0.0,
        "encoder_layerdrop": 0.0,
        "feature_grad_mult": 0.1,
        "masking_type": "feature",
        "mask_prob_audio": 0.8,
        "mask_prob_image": 0.8,
        "modality_dropout": 0.5,
        "audio_dropout": 0.5,
        "modality_fuse": "concat",
        "final_dim": config.final_dim,
        "untie_final_proj": True,
        "layer_norm_first": True,
        "audio_feat_dim": 104,
        "selection_type": "same_other_seq",
        "label_rate": "${task.label_rate}",
    }


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 12, AUDIO_DIM, generator=generator), torch.randn(2, 1, 12, 88, 88, generator=generator)


def assert_same_state(model: AVHubert, source: AVHubert) -> None:
    expected = source.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_official_format_loads_exactly(tmp_path, monkeypatch):
    source = source_model()
    cfg = DictConfig(
        {"model": DictConfig(fairseq_model_cfg(source.config)), "task": DictConfig({"labels": ["a", "b"]})}
    )
    path = tmp_path / "avhubert.pt"
    checkpoint = {
        "cfg": cfg,
        "model": fairseq_state(source),
        "task_state": {"dictionaries": [Dictionary(50), Dictionary(20)]},
        "optimizer_history": [{"num_updates": 7}],
    }
    fairseq_save(checkpoint, path, monkeypatch)
    with pytest.raises(pickle.UnpicklingError):  # not loadable without the classes: the restricted path is used
        torch.load(path, weights_only=True)

    model, info = load_fairseq_avhubert(path)
    assert_same_state(model, source)
    config = model.config
    assert (config.embed_dim, config.layers, config.heads, config.ffn_dim) == (128, 4, 4, 512)
    assert (config.resnet_width, config.resnet_layers) == (16, [1, 1, 1, 1])
    assert (config.pos_conv_kernel, config.pos_conv_groups, config.final_dim) == (32, 8, 64)
    assert (config.mask_type, config.mask_same_spans, config.mask_prob_audio, config.feature_grad_mult) == (
        "feature",
        True,
        0.8,
        0.1,
    )
    assert (config.modality_dropout, config.audio_dropout, config.dropout_features) == (0.5, 0.5, 0.0)
    assert config.num_classes == [54, 24]  # len(fairseq Dictionary), specials included
    assert info["symbols"][1][:5] == ["<s>", "<pad>", "</s>", "<unk>", "0"]
    assert info["cfg"]["label_rate"] == "${task.label_rate}" and info["task"]["labels"] == ["a", "b"]
    assert info["not_reproduced"] == {"selection_type": "same_other_seq"} and info["fresh"] == []

    model.eval()
    audio, video = batch()
    with torch.no_grad():
        ours, theirs = model(audio, video, mask=False), source(audio, video, mask=False)
    assert torch.equal(ours.features, theirs.features)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


def test_round_trip_through_fairseq_layout(tmp_path):
    source = source_model(mask_type="input", mask_same_spans=False, mask_prob_image=0.3, mask_length_image=5)
    path = tmp_path / "ours.pt"
    save_fairseq_avhubert(source, path, cfg_extra={"task": {"label_rate": 25}, "common": {"seed": 1}})
    checkpoint = torch.load(path, weights_only=True)  # plain data only
    assert "encoder.pos_conv.0.weight_g" in checkpoint["model"] and checkpoint["cfg"]["task"]["label_rate"] == 25
    assert checkpoint["cfg"]["task"]["labels"] == ["km0", "km1"] and checkpoint["cfg"]["common"] == {"seed": 1}
    model, info = load_fairseq_avhubert(path)
    assert_same_state(model, source)
    assert model.config == source.config


def test_finetuned_layout_loads(tmp_path, monkeypatch):
    source = source_model(num_classes=[30])
    state = {k: v for k, v in fairseq_state(source, "encoder.w2v_model.").items() if ".final_proj." not in k}
    state["decoder.embed_tokens.weight"] = torch.zeros(10, 4)
    w2v_args = DictConfig(
        {"model": DictConfig(fairseq_model_cfg(source.config)), "task": DictConfig({"labels": ["km"]})}
    )
    cfg = DictConfig({"model": DictConfig({"_name": "av_hubert_seq2seq", "w2v_args": w2v_args})})
    path = tmp_path / "finetuned.pt"
    fairseq_save({"cfg": cfg, "model": state, "task_state": {"target_dictionary": Dictionary(3)}}, path, monkeypatch)

    model, info = load_fairseq_avhubert(path)
    assert info["prefix"] == "encoder.w2v_model." and info["fresh"] == ["final_proj.weight", "final_proj.bias"]
    assert model.config.num_classes == [30]
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("final_proj."):
            assert torch.equal(value, expected[key]), key


def test_old_args_namespace_and_tied_projection(tmp_path):
    """Pre-hydra checkpoints keep one argparse Namespace; a tied final_proj serves every label set."""
    import argparse

    source = source_model()
    state = fairseq_state(source)
    state["final_proj.weight"], state["final_proj.bias"] = (
        state["final_proj.weight"][:64],
        state["final_proj.bias"][:64],
    )
    args = argparse.Namespace(**{**fairseq_model_cfg(source.config), "untie_final_proj": False, "labels": ["a", "b"]})
    path = tmp_path / "old.pt"
    torch.save({"args": args, "cfg": None, "model": state}, path)
    model, info = load_fairseq_avhubert(path)
    assert info["symbols"] is None and model.config.num_classes == [39, 39]
    first, second = model.final_proj.weight.chunk(2)
    assert torch.equal(first, second) and torch.equal(first, source.final_proj.weight[:64])


@pytest.mark.parametrize("kind", ["wav2vec2", "embed_dim"])
def test_other_architecture_is_a_clear_error(tmp_path, kind):
    source = source_model()
    cfg = fairseq_model_cfg(source.config)
    if kind == "wav2vec2":
        state = {
            "feature_extractor.conv_layers.0.0.weight": torch.zeros(512, 1, 10),
            "encoder.pos_conv.0.weight_g": torch.zeros(1, 1, 32),
            "encoder.layers.0.fc1.weight": torch.zeros(512, 128),
        }
        cfg["_name"] = "wav2vec2"
    else:
        state, cfg["encoder_embed_dim"] = fairseq_state(source), 256
    path = tmp_path / f"{kind}.pt"
    torch.save({"cfg": {"model": cfg, "task": {}}, "model": state}, path)
    with pytest.raises(ValueError) as error:
        load_fairseq_avhubert(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    if kind == "wav2vec2":
        assert (
            "missing" in message and "unexpected" in message and "feature_extractor.conv_layers.0.0.weight" in message
        )
    else:
        assert "shape mismatch" in message and "[128, 104] vs [256, 104]" in message


def test_unsupported_architecture_setting(tmp_path):
    cfg = {**fairseq_model_cfg(source_model().config), "layer_norm_first": False}
    path = tmp_path / "postln.pt"
    torch.save({"cfg": {"model": cfg}, "model": fairseq_state(source_model())}, path)
    with pytest.raises(ValueError, match="layer_norm_first=False is not supported"):
        load_fairseq_avhubert(path)


class Exploit:
    def __init__(self, function, *args) -> None:
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (lambda marker: (os.system, f"touch {marker}"), "posix.system"),
        (lambda marker: (eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (lambda marker: (subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        (lambda marker: (getattr, "str", "upper"), "builtins.getattr"),
        (lambda marker: (torch.storage._load_from_bytes, b""), "torch.storage._load_from_bytes"),
    ],
)
def test_malicious_pickle_is_refused(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": None, "model": {"x": torch.ones(1)}, "extra_state": Exploit(*payload(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match=f"refused global {refused}"):
        read_fairseq_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match=str(path)):
        load_fairseq_avhubert(path)
    assert not marker.exists()


def test_stubs_are_inert(tmp_path, monkeypatch):
    """Unknown fairseq classes come back as stubs holding only their recorded state; nothing of theirs runs."""
    path = tmp_path / "dict.pt"
    fairseq_save({"task_state": {"dictionaries": [Dictionary(2)]}}, path, monkeypatch)
    stub = read_fairseq_checkpoint(path)["task_state"]["dictionaries"][0]
    assert isinstance(stub, Stub) and type(stub).__module__ == "fairseq.data.dictionary"
    assert stub.state["symbols"][-2:] == ["0", "1"] and not hasattr(stub, "symbols")
