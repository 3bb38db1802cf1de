"""K-means cluster targets: fit on a seeded sample of utterances, label every split, write sidecars.

The HuBERT recipe: features of a fraction (~10 %) of the training utterances are clustered
with ``MiniBatchKMeans`` (k-means++ init, batch 10000, ``n_init`` 20, ``max_iter`` 100,
no reassignment), then every frame of every split is labelled with its nearest centroid.

`KMeansQuantizer` holds only the centroids and assigns labels in torch (batched, on any
device). It is saved as ``.npz`` (``centroids`` + a JSON ``header``: format, k, dim, feature
spec such as ``{"kind": "mfcc"}`` or ``{"kind": "layer", "layer": L, "checkpoint": path}``,
inertia, feature normalisation) and loaded with ``allow_pickle=False``: a label file never executes code.

A quantizer may normalise each utterance's features before clustering and labelling
(`normalize_utterance`): per-utterance mean and variance (removes speaker and channel
offsets) and/or unit length per frame (spherical k-means, the geometry the pretraining's
cosine logits score frames in). Measured on the demo corpus (k=50, validation PNMI): a
6,652-step tiny encoder's layer 3 gives 0.42 raw and 0.48 with both, above MFCC's 0.465,
while MFCC loses with either (0.40 with both), so layers default to ``utterance-cosine``
and MFCC to ``none``.

What is clustered is a `FeatureSource`: a function from decoded utterances to per-frame
features at ``rate`` Hz. `mfcc_source` gives iteration-1 features (100 Hz); `layer_source`
wraps a model layer of the previous iteration (25 Hz), given either per utterance
``fn(audio [T,104] | None, video [T,88,88] | None) -> [T,D]`` or per batch
``fn(audio [B,T,104] | None, video [B,T,88,88] | None, padding_mask [B,T]) -> [B,T,D]``;
`model_layer_source` adapts a model with AV-HuBERT's ``extract_features``.
Utterances are read straight from the tar shards (`iter_samples`), so fitting decodes
only the sampled utterances.

A layer source may add `WaveNoise` to every waveform before its audio features (units from
noisy speech); video-only input reads no audio, so noise never reaches it.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from tqdm import tqdm

from av2av_lightning.data.codecs import CorruptSampleError, decode_audio, decode_video
from av2av_lightning.data.features import audio_features
from av2av_lightning.data.noise import NOISE_TYPES, NoiseAugmenter
from av2av_lightning.data.pipeline import resolve_shards
from av2av_lightning.data.schema import (
    AUDIO_FIELD,
    LIP_FIELD,
    META_FIELD,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    SampleMeta,
    SchemaError,
)
from av2av_lightning.data.sidecar import SidecarWriter
from av2av_lightning.data.transforms import lip_transform
from data_prep.clustering.mfcc import MFCC_DIM, MFCC_RATE, mfcc_features

log = logging.getLogger(__name__)

QUANTIZER_FORMAT = "av2av-kmeans"
QUANTIZER_VERSION = 1
LABEL_DTYPE = "int16"
MODALITIES = ("av", "audio", "video")
FEATURE_NORMS = ("none", "utterance", "cosine", "utterance-cosine")

__all__ = [
    "ClusterSample",
    "FEATURE_NORMS",
    "WaveNoise",
    "build_targets",
    "FeatureSource",
    "KMeansQuantizer",
    "extract_features",
    "fit_kmeans",
    "fit_on_shards",
    "iter_metas",
    "iter_samples",
    "label_shards",
    "layer_source",
    "mfcc_source",
    "model_layer_source",
    "normalize_utterance",
    "sample_selector",
]


# ---------------------------------------------------------------------------- the quantizer


def check_norm(norm: str) -> str:
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature normalisation must be one of {', '.join(FEATURE_NORMS)}, got {norm!r}")
    return norm


def normalize_utterance(features: np.ndarray | torch.Tensor, norm: str) -> np.ndarray | torch.Tensor:
    """One utterance's ``[T, D]`` features as a quantizer with ``norm`` sees them (see the module docstring):
    ``utterance`` standardises each dimension over the utterance, ``cosine`` scales each frame to unit length,
    ``utterance-cosine`` does both in that order, ``none`` returns them as they are."""
    check_norm(norm)
    if norm == "none":
        return features
    if features.ndim != 2:
        raise ValueError(
            f"{norm} normalisation needs one utterance's features [T, D], got shape {tuple(features.shape)}"
        )
    feats = torch.as_tensor(features).float()
    if norm.startswith("utterance"):
        feats = (feats - feats.mean(0)) / (feats.std(0, unbiased=False) + 1e-5)
    if norm.endswith("cosine"):
        feats = F.normalize(feats, dim=1)
    return feats.numpy() if isinstance(features, np.ndarray) else feats


class KMeansQuantizer:
    """Nearest-centroid labelling with float32 centroids ``[k, D]``; see the module docstring for the file.

    ``norm`` is the per-utterance normalisation the centroids were fitted on; `__call__` applies it, `assign`
    labels features as given."""

    def __init__(
        self, centroids: np.ndarray, spec: dict | None = None, inertia: float | None = None, norm: str = "none"
    ) -> None:
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise ValueError(f"centroids must be [k, D] with k > 0, got shape {centroids.shape}")
        self.centroids = centroids
        self.spec = dict(spec or {})
        self.inertia = inertia  # mean squared distance of a (normalised) fitting frame to its centroid
        self.norm = check_norm(norm)
        self._on: dict[str, torch.Tensor] = {}

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def _centroids(self, device: torch.device) -> torch.Tensor:
        if str(device) not in self._on:
            self._on[str(device)] = torch.from_numpy(self.centroids).to(device)
        return self._on[str(device)]

    def assign(self, features: np.ndarray | torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Labels (int64, on the features' device) of ``[..., D]`` features, ``chunk`` frames at a time."""
        feats = torch.as_tensor(features)
        if feats.shape[-1] != self.dim:
            raise ValueError(f"features have dim {feats.shape[-1]}, the quantizer expects {self.dim}")
        flat = feats.reshape(-1, self.dim).float()
        centroids = self._centroids(flat.device)
        squared = centroids.pow(2).sum(1)
        labels = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            block = flat[start : start + chunk]
            # ||x - c||^2 up to the per-row constant ||x||^2, which does not change the argmin.
            labels[start : start + chunk] = (squared[None] - 2.0 * block @ centroids.T).argmin(1)
        return labels.reshape(feats.shape[:-1])

    def __call__(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Labels of one utterance's ``[T, D]`` features (any ``[..., D]`` when ``norm`` is ``none``), normalised
        as the centroids were fitted, as a numpy int64 array."""
        return self.assign(normalize_utterance(features, self.norm)).cpu().numpy()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        header = {
            "format": QUANTIZER_FORMAT,
            "version": QUANTIZER_VERSION,
            "k": self.k,
            "dim": self.dim,
            "spec": self.spec,
            "inertia": self.inertia,
            "norm": self.norm,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header)), centroids=self.centroids)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KMeansQuantizer:
        """Load a saved quantizer; anything else is a one-line ``ValueError`` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such k-means file")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not {"header", "centroids"} <= set(data.files):
                    raise ValueError("lacks header or centroids")
                header = json.loads(str(data["header"]))
                centroids = data["centroids"]
        except (OSError, ValueError, EOFError) as err:  # also zip and JSON errors (ValueError subclasses)
            raise ValueError(f"{path}: not a k-means quantizer file ({str(err).splitlines()[0]})") from None
        if not isinstance(header, dict) or header.get("format") != QUANTIZER_FORMAT:
            raise ValueError(f"{path}: not a k-means quantizer file (header format is not {QUANTIZER_FORMAT!r})")
        if header.get("version") != QUANTIZER_VERSION:
            raise ValueError(f"{path}: unsupported k-means file version {header.get('version')!r}")
        if centroids.shape != (header.get("k"), header.get("dim")) or centroids.dtype.kind != "f":
            raise ValueError(
                f"{path}: centroids {centroids.dtype}{list(centroids.shape)} do not match header k={header.get('k')}, "
                f"dim={header.get('dim')}"
            )
        norm = header.get("norm", "none")  # files written before normalisation existed
        if norm not in FEATURE_NORMS:
            raise ValueError(f"{path}: unknown feature normalisation {norm!r}, expected one of {FEATURE_NORMS}")
        return cls(centroids, header.get("spec"), header.get("inertia"), norm)

    def __repr__(self) -> str:
        return (
            f"KMeansQuantizer(k={self.k}, dim={self.dim}, norm={self.norm}, spec={self.spec}, inertia={self.inertia})"
        )


def fit_kmeans(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    batch_size: int = 10_000,
    n_init: int = 20,
    max_iter: int = 100,
    max_no_improvement: int = 100,
    spec: dict | None = None,
    norm: str = "none",
) -> KMeansQuantizer:
    """MiniBatchKMeans with HuBERT's settings on ``[N, D]`` features; ``inertia`` is per frame. ``norm`` records
    the per-utterance normalisation the features already had, so the quantizer applies it to what it labels."""
    from sklearn.cluster import MiniBatchKMeans

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"k-means needs features [N, D], got shape {features.shape}")
    if not 0 < k <= len(features):
        raise ValueError(f"k-means with k={k} needs at least k frames, got {len(features)}")
    if not np.isfinite(features).all():
        raise ValueError("k-means features contain NaN or inf")
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=max_iter,
        batch_size=batch_size,
        tol=0.0,
        max_no_improvement=max_no_improvement,
        init_size=None,
        n_init=n_init,
        reassignment_ratio=0.0,
        random_state=seed,
        compute_labels=True,
    )
    kmeans.fit(features)
    return KMeansQuantizer(kmeans.cluster_centers_, spec, float(kmeans.inertia_) / len(features), norm)


# ---------------------------------------------------------------------------- reading shards


@dataclass
class ClusterSample:
    """One decoded utterance: audio fitted to ``num_frames * 640`` samples, lip frames (uint8) if asked for."""

    meta: SampleMeta
    wave: np.ndarray
    lip: np.ndarray | None = None

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def num_frames(self) -> int:
        return self.meta.num_frames


def _fit_length(array: np.ndarray, length: int, repeat_last: bool) -> np.ndarray:
    if len(array) >= length:
        return array[:length]
    pad = (
        np.repeat(array[-1:], length - len(array), 0)
        if repeat_last
        else np.zeros((length - len(array),) + array.shape[1:], array.dtype)
    )
    return np.concatenate([array, pad])


def _raw_samples(shards, progress: bool, desc: str) -> Iterator[tuple[str, dict, SampleMeta]]:
    urls = resolve_shards(shards)

    def handler(exn: Exception) -> bool:
        log.warning("skipping unreadable shard data: %s", exn)
        return True

    with tqdm(desc=desc, unit="utt", disable=not progress, leave=False) as bar:
        for url in urls:
            for raw in wds.tarfile_samples([{"url": url}], handler=handler):
                key = raw.get("__key__", "<no key>")
                if not raw.get(META_FIELD):
                    log.warning("skipping sample %s in %s: no metadata", key, url)
                    continue
                try:
                    meta = SampleMeta.from_json(raw[META_FIELD], source=f"{url}:{key}")
                except SchemaError as err:
                    log.warning("skipping sample %s: %s", key, err)
                    continue
                bar.update()
                yield url, raw, meta


def iter_metas(shards, progress: bool = False) -> Iterator[SampleMeta]:
    """The metadata of every sample (nothing decoded): for phone alignments and counts."""
    for _, _, meta in _raw_samples(shards, progress, "metadata"):
        yield meta


def iter_samples(
    shards,
    select: Callable[[str], bool] | None = None,
    with_video: bool = False,
    progress: bool = False,
    desc: str = "samples",
) -> Iterator[ClusterSample]:
    """Decoded utterances of the shards in order; ``select(key)`` decides before decoding.

    Samples that do not decode are logged and skipped.

    Lengths follow the metadata's ``num_frames`` (the pipeline skips samples whose streams
    differ from it by more than its tolerance, and fits labels to the lip video's length).
    """
    for url, raw, meta in _raw_samples(shards, progress, desc):
        if select is not None and not select(meta.key):
            continue
        try:
            wave = decode_audio(raw.get(AUDIO_FIELD) or b"", name=f"{meta.key}.{AUDIO_FIELD}")
            lip = decode_video(raw.get(LIP_FIELD) or b"", name=f"{meta.key}.{LIP_FIELD}") if with_video else None
        except CorruptSampleError as err:
            log.warning("skipping sample %s in %s: %s", meta.key, url, err)
            continue
        if not np.isfinite(wave).all():
            log.warning("skipping sample %s in %s: non-finite audio", meta.key, url)
            continue
        wave = _fit_length(wave, meta.num_frames * SAMPLES_PER_FRAME, repeat_last=False)
        if lip is not None:
            lip = _fit_length(lip, meta.num_frames, repeat_last=True)
        yield ClusterSample(meta, wave, lip)


def sample_selector(fraction: float, seed: int) -> Callable[[str], bool]:
    """A seeded per-key coin (independent of shard order and count) that keeps about ``fraction`` of the keys."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sample fraction must be in (0, 1], got {fraction}")

    def select(key: str) -> bool:
        return fraction >= 1.0 or np.random.default_rng([seed, zlib.crc32(key.encode())]).random() < fraction

    return select


# ---------------------------------------------------------------------------- feature sources


@dataclass(frozen=True)
class WaveNoise:
    """Noise mixed into every waveform at ``snr_db`` (``type`` white or babble) before its audio features.

    Each sample's generator is seeded by ``(seed, crc32(key))``, so a clip read as A and as AV input gets the
    same noise, on every run. Babble sums ``talkers`` clean utterances read before it in the same pass (the
    `NoiseAugmenter` reservoir, fed with each clean wave after its mix), so it also depends on the shards and
    their order, which A and AV extraction share; the first utterance of a pass has no one to hear and gets
    white noise.
    """

    snr_db: float
    kind: str = "babble"
    talkers: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NOISE_TYPES:
            raise ValueError(f"noise type must be one of {', '.join(NOISE_TYPES)}, got {self.kind!r}")
        if not isinstance(self.snr_db, (int, float)) or not math.isfinite(self.snr_db):
            raise ValueError(f"noise SNR must be a finite number of dB, got {self.snr_db!r}")
        if self.talkers < 1:
            raise ValueError(f"babble needs at least one talker, got {self.talkers}")

    @property
    def spec(self) -> dict:
        """What the feature spec (quantizer and sidecar headers) records."""
        return {"snr_db": float(self.snr_db), "type": self.kind, "talkers": self.talkers, "seed": self.seed}

    def mix(self, samples: Iterable[ClusterSample]) -> Iterator[ClusterSample]:
        """The samples with noisy waves; each call is one pass with an empty babble reservoir."""
        augmenter = NoiseAugmenter(1.0, float(self.snr_db), (self.kind,), self.talkers)
        for sample in samples:
            rng = np.random.default_rng([self.seed, zlib.crc32(sample.key.encode())])
            noisy, _ = augmenter(sample.wave, rng)
            augmenter.observe(sample.wave, rng)
            yield replace(sample, wave=noisy)


@dataclass
class FeatureSource:
    """Per-frame features of decoded utterances, and how to describe them.

    Args:
        fn: ``list[ClusterSample] -> list[np.ndarray [frames, D]]`` (one array per sample,
            ``frames = num_frames * rate / 25``).
        rate: feature (and label) frames per second.
        spec: what the features are, stored in the quantizer header.
        needs_video: decode the lip video for ``fn``.
        batch_frames: video frames of samples handed to ``fn`` per call.
        noise: mixed into the waves before ``fn`` sees them (None: clean).
    """

    fn: Callable[[list[ClusterSample]], list[np.ndarray]]
    rate: float
    spec: dict = field(default_factory=dict)
    needs_video: bool = False
    batch_frames: int = 1
    noise: WaveNoise | None = None

    def frames(self, sample: ClusterSample) -> int:
        return int(round(sample.num_frames * self.rate / VIDEO_FPS))


def mfcc_source() -> FeatureSource:
    """Iteration-1 features: 39-dim MFCC + deltas at 100 Hz."""

    def fn(samples: list[ClusterSample]) -> list[np.ndarray]:
        return [mfcc_features(s.wave, s.num_frames).numpy() for s in samples]

    return FeatureSource(fn, MFCC_RATE, {"kind": "mfcc", "dim": MFCC_DIM, "rate": MFCC_RATE})


def layer_source(
    model_fn: Callable[..., torch.Tensor],
    layer: int,
    checkpoint: str | None = None,
    modality: str = "av",
    batched: bool = False,
    batch_frames: int = 2000,
    device: str | torch.device = "cpu",
    noise: WaveNoise | None = None,
) -> FeatureSource:
    """Later iterations: features of a layer of the previous model at 25 Hz.

    ``model_fn`` is called under ``torch.inference_mode`` with the model's inputs on ``device``:
    normalised audio features (`audio_features`, 104 dims) and centre-cropped normalised lips
    (`lip_transform`, 88x88). ``modality`` ``audio`` passes ``video=None``, ``video`` passes
    ``audio=None`` (the model's dropped-modality input); ``av`` passes both.

    - ``batched=False``: ``model_fn(audio [T,104] | None, video [T,88,88] | None) -> [T, D]``;
    - ``batched=True``: ``model_fn(audio [B,T,104] | None, video [B,T,88,88] | None,
      padding_mask [B,T] bool, True = padding) -> [B, T, D]``, with up to ``batch_frames``
      padded video frames per call.

    ``noise`` is mixed into the waveform before `audio_features` and recorded in the spec; video-only input
    reads no audio, so there it is dropped (and not recorded).

    ``layer`` and ``checkpoint`` only describe the features (quantizer header).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    use_audio, use_video = modality in ("av", "audio"), modality in ("av", "video")
    if noise is not None and not use_audio:
        log.info("video-only input reads no audio: the %s noise at %g dB does not apply", noise.kind, noise.snr_db)
        noise = None

    def inputs(sample: ClusterSample) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        audio = audio_features(torch.from_numpy(sample.wave), sample.num_frames) if use_audio else None
        video = lip_transform(sample.lip) if use_video else None
        return audio, video

    def check(out: torch.Tensor, frames: int, key: str) -> np.ndarray:
        if out.dim() != 2 or out.shape[0] != frames:
            raise ValueError(f"{key}: layer features have shape {tuple(out.shape)}, expected [{frames}, D]")
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def per_sample(samples: list[ClusterSample]) -> list[np.ndarray]:
        results = []
        for sample in samples:
            audio, video = inputs(sample)
            out = model_fn(None if audio is None else audio.to(device), None if video is None else video.to(device))
            results.append(check(torch.as_tensor(out), sample.num_frames, sample.key))
        return results

    @torch.inference_mode()
    def per_batch(samples: list[ClusterSample]) -> list[np.ndarray]:
        lengths = [s.num_frames for s in samples]
        longest = max(lengths)
        pairs = [inputs(s) for s in samples]

        def stack(items: list[torch.Tensor | None]) -> torch.Tensor | None:
            if items[0] is None:
                return None
            padded = [F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - len(x))) for x in items]
            return torch.stack(padded).to(device)

        mask = torch.arange(longest)[None] >= torch.tensor(lengths)[:, None]
        out = torch.as_tensor(model_fn(stack([a for a, _ in pairs]), stack([v for _, v in pairs]), mask.to(device)))
        if out.dim() != 3 or out.shape[:2] != (len(samples), longest):
            raise ValueError(
                f"batched layer features have shape {tuple(out.shape)}, expected [{len(samples)}, {longest}, D]"
            )
        return [check(out[i, :n], n, s.key) for i, (s, n) in enumerate(zip(samples, lengths))]

    spec = {"kind": "layer", "layer": int(layer), "checkpoint": checkpoint, "modality": modality, "rate": VIDEO_FPS}
    if noise is not None:
        spec["noise"] = noise.spec
    return FeatureSource(
        per_batch if batched else per_sample,
        VIDEO_FPS,
        spec,
        needs_video=use_video,
        batch_frames=batch_frames if batched else 1,
        noise=noise,
    )


def model_layer_source(
    model,
    layer: int,
    checkpoint: str | None = None,
    modality: str = "av",
    batch_frames: int = 2000,
    device: str | torch.device = "cpu",
    noise: WaveNoise | None = None,
) -> FeatureSource:
    """`layer_source` for a model with AV-HuBERT's ``extract_features(audio, video [B,1,T,H,W], padding_mask, layer=)``.

    The model is moved to ``device``; ``extract_features`` runs in eval behaviour (no masking
    or dropout), batched by ``batch_frames``.
    """
    model = model.to(device)

    def fn(audio, video, padding_mask):
        video = None if video is None else video.unsqueeze(1)
        return model.extract_features(audio, video, padding_mask, layer=layer)[0]

    return layer_source(
        fn, layer, checkpoint, modality, batched=True, batch_frames=batch_frames, device=device, noise=noise
    )


def _groups(samples: Iterable[ClusterSample], budget: int) -> Iterator[list[ClusterSample]]:
    """Consecutive samples whose padded size (longest x count) stays within ``budget`` video frames."""
    group: list[ClusterSample] = []
    for sample in samples:
        if group and max(sample.num_frames, *(s.num_frames for s in group)) * (len(group) + 1) > budget:
            yield group
            group = []
        group.append(sample)
    if group:
        yield group


def extract_features(
    shards,
    source: FeatureSource,
    select: Callable[[str], bool] | None = None,
    progress: bool = False,
    desc: str = "features",
) -> Iterator[tuple[SampleMeta, np.ndarray]]:
    """``(meta, features [frames, D])`` of every (selected) sample; features are fitted to ``source.frames``."""
    samples = iter_samples(shards, select, source.needs_video, progress, desc)
    if source.noise is not None:
        samples = source.noise.mix(samples)
    for group in _groups(samples, source.batch_frames):
        outputs = source.fn(group)
        if len(outputs) != len(group):
            raise ValueError(f"feature function returned {len(outputs)} arrays for {len(group)} samples")
        for sample, feats in zip(group, outputs):
            feats = np.asarray(feats, dtype=np.float32)
            if feats.ndim != 2:
                raise ValueError(f"{sample.key}: features must be [frames, D], got shape {feats.shape}")
            yield sample.meta, _fit_length(feats, source.frames(sample), repeat_last=True)


# ---------------------------------------------------------------------------- fit and label


def fit_on_shards(
    shards,
    source: FeatureSource,
    k: int,
    sample_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    norm: str = "none",
    **kmeans_options,
) -> KMeansQuantizer:
    """Fit k-means on a seeded ``sample_fraction`` of the utterances, each normalised with ``norm``;
    ``kmeans_options`` go to `fit_kmeans`."""
    check_norm(norm)
    selected = extract_features(shards, source, sample_selector(sample_fraction, seed), progress, "fit")
    parts = [normalize_utterance(f, norm) for _, f in selected]
    if not parts:
        raise ValueError(f"no utterance of {shards!r} was sampled for k-means (sample fraction {sample_fraction})")
    features = np.concatenate(parts)
    log.info("fitting k-means (k=%d) on %d frames of %d utterances", k, len(features), len(parts))
    return fit_kmeans(features, k, seed=seed, spec=source.spec, norm=norm, **kmeans_options)


def label_shards(
    shards,
    source: FeatureSource,
    quantizer: KMeansQuantizer,
    out: str | Path,
    name: str | None = None,
    progress: bool = False,
) -> Path:
    """Label every sample of ``shards`` and write one int16 sidecar at ``source.rate`` (returns its path)."""
    if quantizer.k > np.iinfo(LABEL_DTYPE).max + 1:
        raise ValueError(f"k={quantizer.k} does not fit the {LABEL_DTYPE} labels of a sidecar")
    writer = SidecarWriter(out, name or f"km{quantizer.k}", source.rate, LABEL_DTYPE)
    count = 0
    for meta, feats in extract_features(shards, source, progress=progress, desc=f"label {Path(out).name}"):
        writer.add(meta.key, quantizer(feats))
        count += 1
    if count == 0:
        raise ValueError(f"no readable sample in {shards!r} to label")
    return writer.close()


def build_targets(
    train_shards: str | Sequence[str],
    splits: dict[str, str | Sequence[str]],
    source: FeatureSource,
    out_dir: str | Path,
    k: int,
    sample_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    norm: str = "none",
    **kmeans_options,
) -> tuple[KMeansQuantizer, dict[str, Path]]:
    """Fit on ``train_shards``, save ``out_dir/kmeans.npz``, write ``out_dir/{split}.km{k}.npz`` for each split."""
    out_dir = Path(out_dir)
    quantizer = fit_on_shards(train_shards, source, k, sample_fraction, seed, progress, norm, **kmeans_options)
    quantizer.save(out_dir / "kmeans.npz")
    paths = {
        split: label_shards(pattern, source, quantizer, out_dir / f"{split}.km{k}.npz", progress=progress)
        for split, pattern in splits.items()
    }
    return quantizer, paths
