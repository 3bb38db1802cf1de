"""Official AV-HuBERT (fairseq) checkpoints <-> :class:`AVHubert`, without fairseq, omegaconf or plain pickle.

A fairseq checkpoint is a ``torch.save`` file holding ``cfg`` (an omegaconf ``DictConfig`` or a dict; very old ones
an ``argparse.Namespace`` under ``args``), ``model`` (the state dict) and ``task_state`` (fairseq ``Dictionary``
objects, one per label set). Reading it needs those classes, so it is read in two steps:

1. ``torch.load(weights_only=True)``: enough for files written by :func:`save_fairseq_avhubert` (plain dicts only).
2. Only if torch refuses a global: ``torch.load`` with a restricted pickle module whose ``find_class`` is the whole
   security gate. It returns torch's tensor-rebuild functions, a few data types and numpy's array reconstruction,
   maps every ``fairseq.*``/``omegaconf.*`` class (and ``argparse.Namespace``) to an inert :class:`Stub` that only
   records its constructor arguments and pickled state, and refuses everything else (``os.system``, ``eval``,
   ``subprocess.Popen``, ``torch.storage._load_from_bytes`` ...) with ``pickle.UnpicklingError`` naming the global.
   torch requires ``weights_only=False`` together with a custom ``pickle_module``; this is safe because every
   global still goes through that ``find_class`` (torch's own wrapper only resolves ``*Storage`` names to its
   inert storage types before asking it). Consequently ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes step 2 fail.

Conversion rules: the state dict is our state dict up to the positional-conv weight norm (fairseq's old
``weight_g``/``weight_v`` = our parametrization's ``original0``/``original1``, same shapes, g is [1, 1, K]) and,
in fine-tuned checkpoints, the ``encoder.w2v_model.`` prefix. ``num_classes`` per label set is ``len(dictionary)``
as in fairseq, i.e. including fairseq's 4 special symbols (<s>, <pad>, </s>, <unk>): cluster ``k`` of a fairseq
model is row ``symbols.index(str(k))`` of its label set, usually ``k + 4`` (the symbols are returned in the info).
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import pickle
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import torch

from av2av_lightning.models.avhubert import AUDIO_DIM, AVHubert, AVHubertConfig

FINETUNED_PREFIX = "encoder.w2v_model."
POS_CONV = "encoder.pos_conv.0."
_RENAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}

# our AVHubertConfig field -> fairseq AVHubertConfig field
_FIELDS = {
    "embed_dim": "encoder_embed_dim",
    "layers": "encoder_layers",
    "ffn_dim": "encoder_ffn_embed_dim",
    "heads": "encoder_attention_heads",
    "fusion": "modality_fuse",
    "pos_conv_kernel": "conv_pos",
    "pos_conv_groups": "conv_pos_groups",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "dropout_input": "dropout_input",
    "dropout_features": "dropout_features",
    "layerdrop": "encoder_layerdrop",
    "feature_grad_mult": "feature_grad_mult",
    "mask_type": "masking_type",
    "mask_prob_audio": "mask_prob_audio",
    "mask_length_audio": "mask_length_audio",
    "mask_prob_image": "mask_prob_image",
    "mask_length_image": "mask_length_image",
    "modality_dropout": "modality_dropout",
    "audio_dropout": "audio_dropout",
    "final_dim": "final_dim",
    "logit_temp": "logit_temp",
}
# fairseq's defaults (av_hubert/avhubert/hubert.py), which fairseq itself applies to fields a cfg leaves out
_FAIRSEQ_DEFAULTS = {
    "encoder_embed_dim": 768,
    "encoder_layers": 12,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "modality_fuse": "concat",
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "encoder_layerdrop": 0.0,
    "feature_grad_mult": 1.0,
    "masking_type": "input",
    "mask_prob_audio": 0.65,
    "mask_length_audio": 10,
    "mask_prob_image": 0.65,
    "mask_length_image": 10,
    "modality_dropout": 0.0,
    "audio_dropout": 0.0,
    "final_dim": 0,
    "logit_temp": 0.1,
}
# architecture settings our model has exactly one value for: field -> (our value, fairseq default if absent)
_FIXED = {
    "layer_norm_first": (True, False),
    "audio_feat_dim": (AUDIO_DIM, AUDIO_DIM),
    "sub_encoder_layers": (0, 0),
    "resnet_relu_type": ("prelu", "prelu"),
    "sim_type": ("cosine", "cosine"),
    "target_glu": (False, False),
    "activation_fn": ("gelu", "gelu"),
}
# training-only behaviour fairseq can vary and our model does one way: field -> our behaviour
_TRAINING_ONLY = {"selection_type": "same_seq", "mask_selection": "static", "mask_channel_prob": 0.0}


class Stub:
    """Inert stand-in for a fairseq/omegaconf/argparse object: keeps constructor args and pickled state, runs
    nothing. Subclasses are made per global (:func:`stub_class`) so the original name stays visible."""

    args: tuple = ()
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Called by pickle's REDUCE (``cls(*args)``, e.g. enums); ``__new__`` already kept the args."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


@functools.cache
def stub_class(module: str, name: str) -> type[Stub]:
    return type(name, (Stub,), {"__module__": module, "__qualname__": name})


_STUB_NAMESPACES = ("fairseq", "omegaconf")
_DATA_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes"}
_TORCH_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}
_NUMPY = {"_reconstruct", "scalar"}


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` is an allowlist; see the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles name Python 2 modules (``__builtin__.long``); map them as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module.split(".")[0] in _STUB_NAMESPACES or (module, name) == ("argparse", "Namespace"):
            return stub_class(module, name)
        if module == "builtins" and name in _DATA_BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) in _TORCH_FUNCTIONS:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and (name in ("Size", "Tensor") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.nn.parameter", "Parameter"):
            return torch.nn.Parameter
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return getattr(collections, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
            return __import__("_codecs").encode
        if (module, name) == ("typing", "Any"):
            return typing.Any
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            import numpy

            if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
                return getattr(numpy, name)
            if module != "numpy" and name in _NUMPY:
                return getattr(numpy._core.multiarray, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not on the fairseq checkpoint allowlist")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="av2av_restricted_pickle", Unpickler=_RestrictedUnpickler, load=_restricted_load
)


def read_fairseq_checkpoint(path: str | Path) -> dict:
    """The checkpoint as plain Python: ``weights_only=True`` first, the restricted unpickler only if needed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(f"{path}: {error}") from error


def plain(obj: Any) -> Any:
    """Stubs -> plain data: DictConfig/ListConfig -> their ``_content``, value nodes -> ``_val``, enums -> their
    value, other objects (Namespace, Dictionary) -> their state dict. omegaconf's ``_parent`` links are dropped."""
    if isinstance(obj, Stub):
        state = obj.state
        if isinstance(state, dict):
            if "_content" in state:
                return plain(state["_content"])
            if "_val" in state:
                return plain(state["_val"])
            return {key: plain(value) for key, value in state.items()}
        return plain(obj.args[0]) if state is None and len(obj.args) == 1 else obj
    if isinstance(obj, dict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(value) for value in obj)
    return obj


def load_fairseq_avhubert(path: str | Path) -> tuple[AVHubert, dict]:
    """Builds an :class:`AVHubert` from a fairseq AV-HuBERT checkpoint (pretrained, or fine-tuned: then only the
    ``encoder.w2v_model.`` part is read, and ``final_proj``, which fine-tuning drops, keeps its fresh init).

    Returns the model and an info dict: ``cfg`` (plain model cfg), ``task`` (plain task cfg), ``symbols`` (per
    label set, or None when the checkpoint has no dictionaries), ``prefix``, ``fresh`` (keys not in the checkpoint)
    and ``not_reproduced`` (fairseq training settings this model does differently). Architecture settings it cannot
    represent, missing/unexpected keys or shape mismatches raise ``ValueError`` naming the file.
    """
    checkpoint = read_fairseq_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    state = checkpoint["model"]
    finetuned = any(key.startswith(FINETUNED_PREFIX) for key in state)
    prefix = FINETUNED_PREFIX if finetuned else ""
    model_cfg, task_cfg = _configs(checkpoint, finetuned)
    state = {_our_name(key[len(prefix) :]): value for key, value in state.items() if key.startswith(prefix)}
    for name, (ours, default) in _FIXED.items():
        if model_cfg.get(name, default) != ours:
            raise ValueError(f"{path}: {name}={model_cfg.get(name, default)!r} is not supported (only {ours!r})")

    values = {field: model_cfg.get(name, _FAIRSEQ_DEFAULTS[name]) for field, name in _FIELDS.items()}
    values["final_dim"] = values["final_dim"] if values["final_dim"] > 0 else values["embed_dim"]
    values["mask_same_spans"] = values["mask_type"] == "feature"  # fairseq draws audio/video spans apart otherwise
    symbols = None if finetuned else _symbols(checkpoint.get("task_state"))
    label_sets = len(symbols) if symbols else _label_set_count(task_cfg, model_cfg, state, values["final_dim"])
    if symbols:
        values["num_classes"] = [len(s) for s in symbols]
    elif "label_embs_concat" in state:
        rows = state["label_embs_concat"].shape[0]
        if rows % label_sets:
            raise ValueError(f"{path}: {rows} label embeddings do not split into {label_sets} label sets")
        values["num_classes"] = [rows // label_sets] * label_sets
    if not model_cfg.get("untie_final_proj", False) and label_sets > 1:
        # one projection shared by all label sets == the same projection repeated in each chunk of ours
        for key in ("final_proj.weight", "final_proj.bias"):
            if key in state:
                state[key] = torch.cat([state[key]] * label_sets)
    values.update(_resnet_shape(state))
    config = AVHubertConfig(**values)
    model = AVHubert(config)
    initial = model.state_dict()
    fresh = [key for key in initial if key.startswith("final_proj.") and key not in state] if prefix else []
    _check_keys(path, initial, state, fresh)
    model.load_state_dict({**{key: initial[key] for key in fresh}, **state}, strict=True)
    not_reproduced = {
        name: model_cfg[name] for name, ours in _TRAINING_ONLY.items() if model_cfg.get(name, ours) != ours
    }
    info = {
        "cfg": model_cfg,
        "task": task_cfg,
        "symbols": symbols,
        "prefix": prefix,
        "fresh": fresh,
        "not_reproduced": not_reproduced,
    }
    return model, info


def save_fairseq_avhubert(model: AVHubert, path: str | Path, cfg_extra: dict | None = None) -> None:
    """Writes ``model`` as a fairseq-layout checkpoint of plain dicts and tensors (readable with
    ``weights_only=True``): ``cfg`` = {"model": fairseq AVHubertConfig fields, "task": {"labels": ...}} deep-merged
    with ``cfg_extra`` (e.g. task settings the model does not know), ``model`` = state dict with fairseq names,
    ``task_state`` = {"dictionaries": [{"symbols": ["0", ..., str(C - 1)]}]}: class i is symbol str(i), no specials.

    fairseq itself expects a DictConfig and Dictionary objects; it can wrap the dict cfg with ``OmegaConf.create``
    (as its ``load_checkpoint_to_cpu`` does), but that and the dictionaries are not verified here (no fairseq).
    Settings fairseq cannot express (span sharing under input masking, ``mask_min_spans``) are warned about.
    """
    config = model.config
    unexpressed = []
    if config.mask_same_spans != (config.mask_type == "feature"):
        unexpressed.append(f"mask_same_spans={config.mask_same_spans}")
    if config.mask_min_spans != 2:
        unexpressed.append(f"mask_min_spans={config.mask_min_spans}")
    if unexpressed:
        warnings.warn(f"fairseq AV-HuBERT cannot express {', '.join(unexpressed)}; not saved", stacklevel=2)
    model_cfg = {"_name": "av_hubert", **{name: getattr(config, field) for field, name in _FIELDS.items()}}
    model_cfg.update({name: ours for name, (ours, _) in _FIXED.items()}, untie_final_proj=True)
    task_cfg = {"_name": "av_hubert_pretraining", "labels": [f"km{i}" for i in range(len(config.num_classes))]}
    cfg = _merge({"model": model_cfg, "task": task_cfg}, cfg_extra or {})
    state = {_fairseq_name(key): value.detach().clone() for key, value in model.state_dict().items()}
    dictionaries = [{"symbols": [str(i) for i in range(count)]} for count in config.num_classes]
    torch.save({"cfg": cfg, "model": state, "task_state": {"dictionaries": dictionaries}}, path)


def _configs(checkpoint: dict, finetuned: bool) -> tuple[dict, dict]:
    """(model cfg, task cfg) as plain dicts; a fine-tuned model's encoder cfg is ``cfg.model.w2v_args``."""
    cfg = plain(checkpoint.get("cfg"))
    if cfg is None:  # pre-hydra fairseq: one flat argparse Namespace
        args = plain(checkpoint.get("args")) or {}
        cfg = {"model": args, "task": args}
    model_cfg, task_cfg = cfg.get("model") or {}, cfg.get("task") or {}
    if finetuned and model_cfg.get("w2v_args"):
        w2v = model_cfg["w2v_args"]
        model_cfg, task_cfg = (w2v.get("model"), w2v.get("task")) if "model" in w2v else (w2v, w2v)
    return dict(model_cfg), dict(task_cfg or {})


def _symbols(task_state: Any) -> list[list[str]] | None:
    """Symbols of each label-set dictionary in ``task_state`` (fairseq Dictionary state or our plain dicts)."""
    dictionaries = plain(task_state or {}).get("dictionaries")
    if not dictionaries or not all(isinstance(d, dict) and "symbols" in d for d in dictionaries):
        return None
    return [list(d["symbols"]) for d in dictionaries]


def _label_set_count(task_cfg: dict, model_cfg: dict, state: dict, final_dim: int) -> int:
    """Without dictionaries: the task's label list, else the width of an untied ``final_proj``, else one."""
    if task_cfg.get("labels"):
        return len(task_cfg["labels"])
    if model_cfg.get("untie_final_proj", False) and "final_proj.weight" in state:
        return max(1, state["final_proj.weight"].shape[0] // final_dim)
    return 1


def _resnet_shape(state: dict) -> dict:
    """Trunk width and blocks per stage, read from the weights (fairseq's ResEncoder has no cfg fields for them)."""
    stem = state.get("feature_extractor_video.resnet.frontend3D.0.weight")
    if stem is None:
        return {}
    blocks = []
    for stage in range(1, 5):
        stage_prefix = f"feature_extractor_video.resnet.trunk.layer{stage}."
        blocks.append(len({key[len(stage_prefix) :].split(".")[0] for key in state if key.startswith(stage_prefix)}))
    return {"resnet_width": stem.shape[0], "resnet_layers": blocks}


def _check_keys(path: str | Path, expected: dict, state: dict, fresh: list[str]) -> None:
    """One-line ValueError with the first few missing/unexpected keys and shape mismatches."""
    missing = [key for key in expected if key not in state and key not in fresh]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {list(state[key].shape)} vs {list(expected[key].shape)}"
        for key in state
        if key in expected and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:4])}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if items
    ]
    if problems:
        raise ValueError(
            f"{path}: not an AV-HuBERT checkpoint of the architecture its cfg describes; " + "; ".join(problems)
        )


def _our_name(key: str) -> str:
    if key.startswith(POS_CONV) and key[len(POS_CONV) :] in _RENAMES:
        return POS_CONV + _RENAMES[key[len(POS_CONV) :]]
    return key


def _fairseq_name(key: str) -> str:
    for fairseq, ours in _RENAMES.items():
        if key == POS_CONV + ours:
            return POS_CONV + fairseq
    return key


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged
