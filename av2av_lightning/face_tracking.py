"""Real footage: find the face in every frame, cut the crops the pipeline expects, and paste the result back.

The pipeline works on prepared crops (a 96x96 RGB face and a 96x96 gray mouth view, as the corpus and the
converters store them). An ordinary video is brought there as the reference preprocessing does (AV-HuBERT's
``align_mouth``): 68 dlib landmarks per frame (HOG face detector + the shape predictor that the
``face-recognition-models`` package ships, so nothing downloads), frames where detection failed filled from their
neighbours, a centred moving average over time, then per frame a similarity transform of five stable points (eye
corners, nose tip) onto a fixed template:

- the **face crop** is the 96x96 template frame; the template is the corpus faces' own mean landmarks, so real
  footage is framed as the face renderer was trained;
- the **mouth crop** is the same aligned frame zoomed by `LIP_ZOOM` around the smoothed mouth centre (landmarks
  48-67), i.e. a fixed-size patch of the aligned face centred on the mouth, at the corpus lip view's scale.

`FaceTrack.paste` maps rendered 96x96 faces back through the inverse transform and blends them into the original
frames with a feathered mask over the lower face, so the output keeps the original resolution.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import av
import numpy as np

from data_prep.converters.media import decode_video, to_gray

FACE_SIZE = 96
LANDMARKS = 68
STABLE_POINTS = (36, 39, 42, 45, 33)  # outer/inner eye corners and the nose tip: they do not move with speech
MOUTH = slice(48, 68)
# Mean dlib landmarks of 40 corpus faces (data_prep.corpus.face, seeds 0-39), made left-right symmetric; pixel-index
# coordinates of the 96x96 face crop, rows in STABLE_POINTS order.
TEMPLATE = np.array([[27.2, 37.8], [39.4, 38.8], [55.6, 38.8], [67.8, 37.8], [47.5, 58.9]])
LIP_ZOOM = 1.88  # mouth-view pixels per face-crop pixel: the corpus lip view (22 px per mean mouth half-width 11.7)
LIP_CENTRE = (47.5, 45.3)  # where the landmark mouth centre sits in the corpus lip view
SMOOTH_FRAMES = 13  # centred moving average, +-6 frames as the reference's window margin of 12
PREPARED_MAX_SIZE = 224  # the largest face-centred crop a published corpus ships (LRS3); anything bigger is footage
DETECT_MAX_SIDE = 640  # frames are decimated to at most this many pixels for the detector (speed)
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
MULTI_FACE_SHARE = 0.5  # several faces in more than this share of the frames with a face needs --face-index
FOLLOW_SHARE = 0.5  # a face moves less than half its width between frames: a farther detection is someone else

__all__ = [
    "FACE_SIZE",
    "MOUTH",
    "PREPARED_MAX_SIZE",
    "STABLE_POINTS",
    "TEMPLATE",
    "DlibLandmarker",
    "FaceTrack",
    "Landmarker",
    "default_landmarker",
    "fill_gaps",
    "is_footage",
    "lower_face_weight",
    "pick_faces",
    "predictor_path",
    "similarity",
    "smooth",
    "track_faces",
    "warp",
]


# ---------------------------------------------------------------------------- landmarks


class Landmarker(Protocol):
    """Landmarks [68, 2] (x, y in pixels) of every face found in one RGB frame [H, W, 3]."""

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]: ...


def predictor_path() -> Path:
    """The 68-point shape predictor inside the installed ``face_recognition_models`` package.

    Found without importing the package: its ``__init__`` needs ``pkg_resources``, which current setuptools lacks.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(spec.origin).parent / "models" / PREDICTOR_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{PREDICTOR_FILE}: not found; real footage needs pip install face-recognition-models")
    return path


class DlibLandmarker:
    """dlib's HOG frontal-face detector on a decimated frame, then the 68-point predictor on the full frame."""

    def __init__(self, upsample: int = 0, max_side: int = DETECT_MAX_SIDE) -> None:
        try:
            import dlib
        except ImportError:
            raise ImportError("real footage needs dlib: pip install dlib-bin face-recognition-models") from None
        self._rect = dlib.rectangle
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path()))
        self.upsample = upsample
        self.max_side = max_side

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:
        step = max(1, -(-max(frame.shape[:2]) // self.max_side))
        small = np.ascontiguousarray(frame[::step, ::step])
        faces = []
        for box in self.detector(small, self.upsample):
            rect = self._rect(box.left() * step, box.top() * step, box.right() * step, box.bottom() * step)
            shape = self.predictor(frame, rect)
            faces.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64))
        return faces


@lru_cache(maxsize=1)
def default_landmarker() -> DlibLandmarker:
    """Loaded once per process: the predictor file is 100 MB."""
    return DlibLandmarker()


def _size(points: np.ndarray) -> float:
    extent = points.max(axis=0) - points.min(axis=0)
    return float(extent[0] * extent[1])


def _follow(faces: list[np.ndarray], last: np.ndarray) -> np.ndarray | None:
    """The detection that continues the face ``last``: the one whose centre is nearest, if within its reach."""
    if not faces:
        return None
    distances = [float(np.linalg.norm(face.mean(axis=0) - last.mean(axis=0))) for face in faces]
    nearest = int(np.argmin(distances))
    return faces[nearest] if distances[nearest] <= FOLLOW_SHARE * np.sqrt(_size(last)) else None


def pick_faces(found: list[list[np.ndarray]], name: str, face_index: int | None = None) -> np.ndarray:
    """One face per frame -> landmarks [F, 68, 2], NaN where that face was not found.

    The face is chosen by size (``face_index``, 0 = largest) in the first frame that shows that many, then followed
    by position through the clip, forwards and backwards: in each frame, the detection nearest to where it was,
    within half its width (else a gap). Ranking every frame anew would jump between two faces of similar size.
    Without ``face_index`` a clip must show one face: stray extra detections in a minority of frames are dropped,
    but several faces in most frames is an error asking for a choice.
    """
    counts = np.array([len(faces) for faces in found])
    with_face = int((counts > 0).sum())
    if with_face == 0:
        raise ValueError(f"{name}: no face found in any of its {len(found)} frames")
    if face_index is None:
        crowded = int((counts > 1).sum())
        if crowded > MULTI_FACE_SHARE * with_face:
            raise ValueError(
                f"{name}: {counts.max()} faces in {crowded} of {len(found)} frames; "
                "choose one with --face-index (0 = largest)"
            )
        face_index = 0
    if face_index < 0 or face_index >= counts.max():
        raise ValueError(f"{name}: --face-index {face_index}, but no frame shows more than {counts.max()} face(s)")
    track = np.full((len(found), LANDMARKS, 2), np.nan)
    anchor = next(frame for frame, faces in enumerate(found) if len(faces) > face_index)
    track[anchor] = sorted(found[anchor], key=_size, reverse=True)[face_index]
    for frames in (range(anchor + 1, len(found)), range(anchor - 1, -1, -1)):
        last = track[anchor]
        for frame in frames:
            face = _follow(found[frame], last)
            if face is not None:
                track[frame] = last = face
    return track


def fill_gaps(track: np.ndarray) -> np.ndarray:
    """Frames without landmarks (NaN) linearly interpolated from the nearest frames with them (held at the ends)."""
    known = ~np.isnan(track).any(axis=(1, 2))
    if known.all():
        return track
    frames = np.arange(len(track))
    flat = track.reshape(len(track), -1)
    filled = np.stack([np.interp(frames, frames[known], column[known]) for column in flat.T], axis=1)
    return filled.reshape(track.shape)


def smooth(track: np.ndarray, window: int = SMOOTH_FRAMES) -> np.ndarray:
    """Centred moving average over ``window`` frames; near the ends the window shrinks to stay centred, so a still
    face stays exactly where it is and linear motion is not delayed."""
    half = window // 2
    cumulative = np.concatenate([np.zeros((1, *track.shape[1:])), np.cumsum(track, axis=0)])
    frames = np.arange(len(track))
    reach = np.minimum(np.minimum(frames, len(track) - 1 - frames), half)
    total = cumulative[frames + reach + 1] - cumulative[frames - reach]
    return total / (2 * reach + 1)[:, None, None]


# ---------------------------------------------------------------------------- geometry


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking points [N, 2] onto [N, 2], as a 2x3 matrix."""
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    system = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def _invert(affine: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(affine[:, :2])
    return np.concatenate([linear, -linear @ affine[:, 2:]], axis=1)


def _apply(affine: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return affine[0, 0] * x + affine[0, 1] * y + affine[0, 2], affine[1, 0] * x + affine[1, 1] * y + affine[1, 2]


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``image`` [H, W, C] sampled at pixel-index positions (edges repeated outside), float32 [..., C]."""
    height, width = image.shape[:2]
    x = np.clip(x, 0, width - 1)
    y = np.clip(y, 0, height - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros(x.shape, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros(y.shape, np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    pixels = image.astype(np.float32, copy=False)
    top = pixels[y0, x0] * (1 - fx) + pixels[y0, x1] * fx
    bottom = pixels[y1, x0] * (1 - fx) + pixels[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def warp(image: np.ndarray, affine: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` view of ``image`` [H, W, 3] that ``affine`` (image -> view pixels) defines, uint8."""
    v, u = np.mgrid[:size, :size].astype(np.float64)
    x, y = _apply(_invert(affine), u, v)
    return np.clip(np.rint(_bilinear(image, x, y)), 0, 255).astype(np.uint8)


def lower_face_weight(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Paste-back weight at face-crop positions: 1 over mouth, cheeks and chin, fading to 0 over ~8 px towards the
    eyes and the crop's edges (an ellipse around the lower face; outside the crop it is 0)."""
    radius = np.hypot((u - 47.5) / 34.0, (v - 68.0) / 26.0)
    return np.clip((1.0 - radius) / 0.25, 0.0, 1.0)


# ---------------------------------------------------------------------------- the track


@dataclass
class FaceTrack:
    """One face through a clip at 25 fps: the original RGB ``frames`` [F, H, W, 3], the smoothed ``landmarks``
    [F, 68, 2] and per frame the 2x3 transforms from the frame to the face crop and to the mouth crop."""

    frames: np.ndarray
    landmarks: np.ndarray
    face_affine: np.ndarray
    lip_affine: np.ndarray

    @classmethod
    def from_landmarks(cls, frames: np.ndarray, landmarks: np.ndarray) -> FaceTrack:
        """The crops' transforms from (already smoothed) landmarks."""
        face = np.stack([similarity(points[list(STABLE_POINTS)], TEMPLATE) for points in landmarks])
        lip = np.empty_like(face)
        for frame, (affine, points) in enumerate(zip(face, landmarks)):
            centre = np.array(_apply(affine, *points[MOUTH].mean(axis=0)))
            lip[frame, :, :2] = LIP_ZOOM * affine[:, :2]
            lip[frame, :, 2] = LIP_ZOOM * (affine[:, 2] - centre) + LIP_CENTRE
        return cls(frames, landmarks, face, lip)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the original frames."""
        return self.frames.shape[1], self.frames.shape[2]

    def face_crops(self) -> np.ndarray:
        """RGB face crops [F, 96, 96, 3], as the corpus stores them."""
        return np.stack([warp(frame, affine) for frame, affine in zip(self.frames, self.face_affine)])

    def mouth_crops(self) -> np.ndarray:
        """Gray mouth crops [F, 96, 96], as the corpus stores them (the encoder centre-crops 88)."""
        return np.stack([to_gray(warp(frame, affine)) for frame, affine in zip(self.frames, self.lip_affine)])

    def paste(self, faces: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Original frames ``indices`` with the 96x96 ``faces`` [N, 96, 96, 3] blended over their lower face."""
        out = self.frames[indices].copy()
        height, width = self.frame_size
        edge = np.array([0.0, FACE_SIZE - 1.0])
        for image, face, source in zip(out, faces, indices):
            inverse = _invert(self.face_affine[source])
            x, y = _apply(inverse, *np.meshgrid(edge, edge))  # the crop's corners in the frame
            x0, x1 = max(int(np.floor(x.min())), 0), min(int(np.ceil(x.max())) + 1, width)
            y0, y1 = max(int(np.floor(y.min())), 0), min(int(np.ceil(y.max())) + 1, height)
            if x1 <= x0 or y1 <= y0:
                continue
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
            u, v = _apply(self.face_affine[source], xs, ys)
            inside = (u >= 0) & (u <= FACE_SIZE - 1) & (v >= 0) & (v <= FACE_SIZE - 1)
            weight = (lower_face_weight(u, v) * inside)[..., None]
            region = image[y0:y1, x0:x1].astype(np.float32)
            blended = region + weight * (_bilinear(face, u, v) - region)
            image[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out


# ---------------------------------------------------------------------------- from a file


def is_footage(path: Path) -> bool:
    """Whether a video's frames are larger than any prepared face crop (then its face has to be found)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return max(stream.codec_context.width, stream.codec_context.height) > PREPARED_MAX_SIZE
    except (av.FFmpegError, IndexError):
        return False  # unreadable or no video: the readers name the problem


def track_faces(
    path: Path, face_index: int | None = None, landmarker: Landmarker | None = None, window: int = SMOOTH_FRAMES
) -> FaceTrack:
    """Decode ``path`` at 25 fps, find one face's landmarks in every frame, fill gaps and smooth them over time."""
    landmarker = landmarker or default_landmarker()
    decoded, _ = decode_video(path, lambda _, rgb: (rgb, landmarker(rgb)))
    track = pick_faces([faces for _, faces in decoded], str(path), face_index)
    return FaceTrack.from_landmarks(np.stack([rgb for rgb, _ in decoded]), smooth(fill_gaps(track), window))
