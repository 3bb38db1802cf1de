"""A seeded synthetic talking face, drawn from mouth parameters in two views.

`render_face` returns a 96x96 RGB face crop (what a Wav2Lip-style renderer sees) and a
96x96 grayscale mouth region (what AV-HuBERT sees). Both are renderings of one geometric
model in "face pixels" (the face crop's own pixel grid): the face view samples it 1:1,
the lip view through a zoom centred on the mouth, normalised to the mouth width as a
landmark-based mouth crop would be. Shapes are implicit (signed distances with a
one-pixel soft edge), evaluated with numpy over whole pixel grids.

Speed comes from splitting the picture: everything but the mouth is static for a
speaker, so it is drawn once (cached per identity) together with its spatial gradients
and its eyes-closed difference; a frame is then one weighted sum of those layers
(static + head shift x gradient + blink x difference, all scaled by brightness), and
only the mouth box is drawn per frame. About 10 ms for 75 frames of both views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from data_prep.corpus.visemes import MOUTH_PARAMS

SIZE = 96
FPS = 25
LIP_MOUTH_HALF_WIDTH = 22.0  # lip-view pixels from the mouth centre to a corner at rest
LIP_MOUTH_Y = 44.0  # lip-view row of the mouth centre: nose tip above, chin below, eyes out of view
_PAD = 6  # extra pixels rendered around each view so the head can move
_MAX_SHIFT = _PAD - 1.5  # view pixels; leaves room for the rounding and the gradient stencil
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601
_INTERIOR = np.array([48.0, 18.0, 24.0], dtype=np.float32)  # mouth cavity: luma ~30, always "dark"
_TEETH = np.array([236.0, 232.0, 218.0], dtype=np.float32)
_TONGUE = np.array([196.0, 92.0, 104.0], dtype=np.float32)
_OPEN, _WIDTH, _ROUND, _TEETH_P, _TONGUE_P = (
    MOUTH_PARAMS.index(name) for name in ("open", "width", "round", "teeth", "tongue")
)

_SKIN_TONES = np.array([[238, 205, 182], [214, 168, 135], [180, 128, 95], [140, 96, 70]], dtype=np.float32)
_HAIR_COLOURS = np.array(
    [[28, 24, 22], [82, 56, 38], [196, 164, 110], [150, 72, 40], [168, 166, 160]], dtype=np.float32
)
_IRIS_COLOURS = np.array(
    [[92, 60, 36], [70, 110, 160], [80, 120, 80], [120, 100, 60], [110, 120, 130]], dtype=np.float32
)
_HAIR_STYLES = ("short", "long", "fringe", "receding")


@dataclass(frozen=True)
class FaceIdentity:
    """One speaker's face: geometry in face-crop pixels and colours in RGB 0-255."""

    head_centre: tuple[float, float]
    head_axes: tuple[float, float]  # half width, half height of the skull ellipse
    jaw_taper: float  # 0: round jaw, larger: narrower chin
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str
    hairline: float  # y of the hairline at the centre
    eye_y: float
    eye_spacing: float  # half distance between the eye centres
    eye_size: float  # half width of an eye
    iris: tuple[float, float, float]
    brow_thickness: float
    nose_tip_y: float
    nose_width: float
    mouth_centre: tuple[float, float]
    mouth_half_width: float
    lip_thickness: tuple[float, float]  # upper, lower
    lip: tuple[float, float, float]
    background: tuple[float, float, float]


def make_identity(seed: int) -> FaceIdentity:
    """A random but plausible face; the same seed always gives the same face."""
    rng = np.random.default_rng([seed, 0xFACE])
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    low = int(tone)
    skin = _SKIN_TONES[low] + (tone - low) * (_SKIN_TONES[min(low + 1, len(_SKIN_TONES) - 1)] - _SKIN_TONES[low])
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 255)
    lip = (skin + rng.uniform(0.3, 0.6) * (np.array([190.0, 88.0, 96.0]) - skin)) * rng.uniform(0.88, 0.98)
    head_w, head_h = rng.uniform(33, 39), rng.uniform(45, 50)
    centre = (48 + rng.uniform(-1, 1), 43 + rng.uniform(-1.5, 1.5))
    eye_y = centre[1] - rng.uniform(3, 7)
    nose_tip_y = eye_y + rng.uniform(17, 21)
    mouth_y = nose_tip_y + rng.uniform(9, 11.5)
    return FaceIdentity(
        head_centre=centre,
        head_axes=(head_w, max(head_h, mouth_y + 17 - centre[1])),
        jaw_taper=rng.uniform(0.25, 0.5),
        skin=tuple(skin.round(1)),
        hair=tuple(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.1)),
        hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
        hairline=centre[1] - head_h * rng.uniform(0.62, 0.78),
        eye_y=eye_y,
        eye_spacing=rng.uniform(13, 16),
        eye_size=rng.uniform(5, 6.5),
        iris=tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]),
        brow_thickness=rng.uniform(1.2, 2.6),
        nose_tip_y=nose_tip_y,
        nose_width=rng.uniform(5, 7.5),
        mouth_centre=(centre[0], mouth_y),
        mouth_half_width=rng.uniform(10, 13),
        lip_thickness=(rng.uniform(1.6, 2.6), rng.uniform(2.2, 3.4)),
        lip=tuple(np.clip(lip, 0, 255).round(1)),
        background=tuple(rng.uniform(85, 210, 3).round(1)),
    )


# ---------------------------------------------------------------------------------------
# Implicit shapes


def _ellipse_distance(x, y, cx, cy, ax, ay):
    """Approximate signed distance (in face pixels) to an ellipse: first-order, exact on the axes."""
    u, v = (x - cx) / ax, (y - cy) / ay
    k = np.sqrt(u * u + v * v) + 1e-6
    gradient = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) / k + 1e-6
    return (k - 1) / gradient


def _inside(distance, pixel):
    """Soft coverage of the region distance < 0, one output pixel wide at the edge."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _paint(image, coverage, colour):
    image += coverage[..., None] * (np.asarray(colour, dtype=np.float32) - image)


def _static_layer(ident: FaceIdentity, x, y, pixel, eyes_closed: bool, with_eyes: bool = True):
    """Everything but the mouth at world points (x, y); `pixel` is one output pixel in world units.

    The lip view leaves the eyes out: its top edge can graze the lower eyelids, and a mouth
    ROI must not blink.
    """
    cx, cy = ident.head_centre
    ax, ay = ident.head_axes
    skin = np.asarray(ident.skin, dtype=np.float32)
    hair = np.asarray(ident.hair, dtype=np.float32)
    image = np.empty(x.shape + (3,), dtype=np.float32)
    image[:] = ident.background
    image *= (1.0 - 0.15 * ((y - 48) / 96) ** 2)[..., None]  # a little vignetting

    if ident.hair_style == "long":
        hair_back = _inside(np.maximum(_ellipse_distance(x, y, cx, cy - 2, ax + 6, ay + 2), y - cy - 0.3 * ay), pixel)
        _paint(image, hair_back, hair * 0.85)
    _paint(image, _inside(np.maximum(np.abs(x - cx) - 0.52 * ax, cy + 0.3 * ay - y), pixel), skin * 0.78)  # neck
    for side in (-1, 1):
        _paint(image, _inside(_ellipse_distance(x, y, cx + side * ax * 0.97, ident.eye_y + 6, 4, 8), pixel), skin * 0.9)

    # Head: an ellipse whose lower half narrows towards the chin.
    below = np.clip((y - cy) / ay, 0, 1)
    head_x = cx + (x - cx) / (1 - ident.jaw_taper * below**2)
    head = _inside(_ellipse_distance(head_x, y, cx, cy, ax, ay), pixel)
    relief = 1.0 - 0.22 * np.clip(((x - cx) / ax) ** 2, 0, 1) - 0.08 * np.clip((y - cy) / ay, 0, 1) ** 2
    _paint(image, head, skin * relief[..., None])

    if ident.hair_style != "receding":
        line = ident.hairline + 10 * ((x - cx) / ax) ** 2
        if ident.hair_style == "fringe":
            line = line + 6 + 2 * np.sin((x - cx) * 0.9)
        top = _inside(np.maximum(y - line, _ellipse_distance(x, y, cx, cy, ax + 1.5, ay + 1)), pixel)
        _paint(image, top, hair)

    # Nose: shaded sides of the bridge, a soft tip, two nostrils (never "dark": luma > 60).
    tip = ident.nose_tip_y
    nose_w = ident.nose_width
    along = np.clip((y - ident.eye_y) / (tip - ident.eye_y), 0, 1)
    for side in (-1, 1):
        ridge = np.abs(x - (cx + side * (1.5 + 0.45 * nose_w * along))) - 0.8
        shade = _inside(np.maximum(ridge, np.abs(y - (ident.eye_y + tip) / 2) - (tip - ident.eye_y) / 2), pixel)
        _paint(image, shade * 0.35, skin * 0.7)
        nostril = _inside(_ellipse_distance(x, y, cx + side * nose_w * 0.42, tip + 1.2, 1.4, 0.8), pixel)
        _paint(image, nostril, skin * 0.72)
    _paint(image, _inside(_ellipse_distance(x, y, cx, tip - 1.5, nose_w * 0.45, 2.5), pixel) * 0.4, skin * 1.08)
    # Philtrum and the fold under the lower lip give the lip view some structure.
    mx, my = ident.mouth_centre
    philtrum = np.maximum(np.abs(x - mx) - 1.3, np.abs(y - (tip + my) / 2) - (my - tip) / 2 + 2)
    _paint(image, _inside(philtrum, pixel) * 0.25, skin * 0.8)
    fold = _ellipse_distance(x, y, mx, my + ident.lip_thickness[1] + 5, ident.mouth_half_width * 0.6, 1.5)
    _paint(image, _inside(fold, pixel) * 0.3, skin * 0.75)

    # Eyes and brows.
    for side in (-1, 1) if with_eyes else ():
        ex = cx + side * ident.eye_spacing
        ea, eb = ident.eye_size, ident.eye_size * 0.5
        eye = _ellipse_distance(x, y, ex, ident.eye_y, ea, eb)
        if eyes_closed:
            _paint(image, _inside(eye - 0.5, pixel), skin * 0.93)
            lash = np.maximum(
                np.abs(y - ident.eye_y - 0.3 * eb - 0.25 * ((x - ex) / ea) ** 2 * eb) - 0.5, np.abs(x - ex) - ea
            )
            _paint(image, _inside(lash, pixel), hair * 0.5)
        else:
            _paint(image, _inside(eye - 0.6, pixel), hair * 0.45)  # lashes / lid line
            _paint(image, _inside(eye, pixel), (236, 234, 228))
            iris = _inside(np.maximum(np.hypot(x - ex, y - ident.eye_y) - eb * 0.95, eye), pixel)
            _paint(image, iris, ident.iris)
            _paint(image, _inside(np.maximum(np.hypot(x - ex, y - ident.eye_y) - eb * 0.45, eye), pixel), (20, 18, 18))
        brow_y = ident.eye_y - 6.5 - 2 * (1 - ((x - ex) / (ea * 1.5)) ** 2)
        brow = np.maximum(np.abs(y - brow_y) - ident.brow_thickness / 2, np.abs(x - ex - side * 1.0) - ea * 1.4)
        _paint(image, _inside(brow, pixel), hair * 0.8)
    return image


# ---------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True)
class _View:
    """How a view maps its (padded) pixels to world points: world = origin + pixel * scale."""

    origin: tuple[float, float]
    scale: float  # world units per view pixel

    def grid(self):
        axis = np.arange(-_PAD, SIZE + _PAD, dtype=np.float32) + 0.5
        return np.meshgrid(self.origin[0] + axis * self.scale, self.origin[1] + axis * self.scale)


def _views(ident: FaceIdentity) -> tuple[_View, _View]:
    face = _View((0.0, 0.0), 1.0)
    scale = ident.mouth_half_width / LIP_MOUTH_HALF_WIDTH
    mx, my = ident.mouth_centre
    lip = _View((mx - SIZE / 2 * scale, my - LIP_MOUTH_Y * scale), scale)
    return face, lip


@lru_cache(maxsize=16)
def _bases(ident: FaceIdentity):
    """Per view: [static, d/dx, d/dy, eyes-closed difference] of the padded static layer.

    The face view keeps RGB, the lip view is converted to luma. The static layer is
    drawn with a slightly soft (1.3 px) edge so that first-order shifts stay clean.
    """
    result = []
    for view, gray in zip(_views(ident), (False, True)):
        x, y = view.grid()
        opened = _static_layer(ident, x, y, view.scale * 1.3, eyes_closed=False, with_eyes=not gray)
        closed = _static_layer(ident, x, y, view.scale * 1.3, eyes_closed=True, with_eyes=not gray)
        if gray:
            opened, closed = opened @ _LUMA, closed @ _LUMA
        grad_y, grad_x = np.gradient(opened, axis=(0, 1))
        result.append(np.stack([opened, grad_x, grad_y, closed - opened]).astype(np.float32))
    return tuple(result)


# ---------------------------------------------------------------------------------------
# Per-utterance variation


def _smooth_noise(rng, num_frames: int, std_frames: float) -> np.ndarray:
    """Unit-variance low-pass noise: sums of random sinusoids, deterministic and cheap."""
    t = np.arange(num_frames, dtype=np.float32)
    freqs = rng.uniform(0.3, 1.0, 4) / (2 * np.pi * std_frames)
    phases = rng.uniform(0, 2 * np.pi, 4)
    return (np.sin(t[:, None] * 2 * np.pi * freqs + phases) * np.sqrt(0.5)).sum(axis=1).astype(np.float32)


def _blinks(rng, num_frames: int) -> np.ndarray:
    """Eyelid closure per frame: about one blink every three seconds, each ~200 ms."""
    closure = np.zeros(num_frames, dtype=np.float32)
    profile = np.array([0.45, 1.0, 1.0, 0.6, 0.25], dtype=np.float32)
    start = int(rng.exponential(FPS * 3.0)) - 20
    while start < num_frames:
        if start >= 0:
            span = closure[start : start + len(profile)]
            np.maximum(span, profile[: len(span)], out=span)
        start += len(profile) + 5 + int(rng.exponential(FPS * 3.0))
    return closure


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of sensor-noise frames (std 1.8 grey levels); utterances draw frames from it."""
    return np.random.default_rng(601).normal(0, 1.8, (48, SIZE, SIZE, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Mouth


def _draw_mouth(ident: FaceIdentity, view: _View, mouth, shift, colours, image, brightness):
    """Composite lips, cavity, teeth and tongue into `image` [F, 96, 96, C] inside the mouth box.

    Every vertical extent is proportional to the identity's mouth width, so one set of
    mouth parameters gives the same shape (relative to the mouth) on every face. Only
    the box this utterance's mouth can reach is evaluated.
    """
    w0 = ident.mouth_half_width
    mx, my = ident.mouth_centre
    up_thick, lo_thick = ident.lip_thickness
    px = view.scale
    param = [mouth[:, i, None, None] for i in range(mouth.shape[1])]
    half_width = w0 * (0.82 + 0.3 * param[_WIDTH] - 0.28 * param[_ROUND])
    inner_half_width = half_width * (0.88 - 0.25 * param[_ROUND])
    pout = 1 + 0.45 * param[_ROUND]
    max_gap = w0 * 1.1 * float(mouth[:, _OPEN].max(initial=0))
    reach = np.abs(shift).max(axis=0, initial=0) + 1.5
    x0, x1 = mx - float(half_width.max(initial=w0)), mx + float(half_width.max(initial=w0))
    y0, y1 = my - 0.35 * max_gap - 1.45 * up_thick, my + 0.65 * max_gap + 1.45 * lo_thick
    cols = slice(
        max(0, int((x0 - view.origin[0]) / px - reach[0])),
        min(SIZE, int(np.ceil((x1 - view.origin[0]) / px + reach[0]))),
    )
    rows = slice(
        max(0, int((y0 - view.origin[1]) / px - reach[1])),
        min(SIZE, int(np.ceil((y1 - view.origin[1]) / px + reach[1]))),
    )
    # World coordinates relative to the (moving) mouth centre: [F, 1, W] and [F, H, 1].
    x = (view.origin[0] + (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5) * px - mx)[None, None, :]
    y = (view.origin[1] + (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5) * px - my)[None, :, None]
    x = x - shift[:, 0, None, None] * px
    y = y - shift[:, 1, None, None] * px

    gap = w0 * 1.1 * param[_OPEN] * np.clip(1 - (x / inner_half_width) ** 2, 0, 1) ** (0.9 - 0.45 * param[_ROUND])
    outline = np.sqrt(np.clip(1 - (x / half_width) ** 2, 0, 1))
    inner_top, inner_bottom = -0.35 * gap, 0.65 * gap
    top = inner_top - up_thick * pout * outline * (1 - 0.25 * np.exp(-((x / (0.12 * w0)) ** 2)))  # cupid's bow
    bottom = inner_bottom + lo_thick * pout * outline

    # Everything with a y dependence is [F, H, W]: keep those operations few and in place.
    rows_px = y * (1 / px)

    def below(edge):  # soft step, one pixel wide: 1 below the edge (larger y), 0 above
        step = rows_px - (edge * (1 / px) - 0.5)
        return np.clip(step, 0, 1, out=step)

    corners = np.clip((half_width - np.abs(x)) / px + 0.5, 0, 1)
    past_top, past_inner_top, past_inner_bottom = below(top), below(inner_top), below(inner_bottom)
    upper_lip = (past_top - past_inner_top) * corners
    cavity = (past_inner_top - past_inner_bottom) * corners
    lower_lip = (past_inner_bottom - below(bottom)) * corners
    # Closed lips still show where they meet.
    seam = np.abs(rows_px - inner_top * (1 / px))
    seam *= -px / (0.7 * px + 0.35)
    seam += 1
    np.clip(seam, 0, 1, out=seam)
    seam *= corners * outline
    seam *= 1 - cavity
    upper_lip *= 1 - seam  # the seam is drawn on the lips, not added to them
    lower_lip *= 1 - seam
    teeth_across = np.clip((0.7 * inner_half_width - np.abs(x)) / px + 0.5, 0, 1) * corners
    teeth = (past_inner_top - below(inner_top + w0 * 0.2 * param[_TEETH_P])) * teeth_across
    tongue_height = (w0 * 0.3 * param[_TONGUE_P] + 1e-3) / px
    tongue = (rows_px - inner_bottom * (1 / px)) / tongue_height
    tongue *= tongue
    tongue *= -3
    tongue += 3 * (1 - (x / (0.5 * inner_half_width)) ** 2)
    np.clip(tongue, 0, 1, out=tongue)
    tongue *= cavity
    tongue *= 1 - teeth

    # The regions partition the mouth: blend once with their summed coverage.
    lip = colours["lip"]
    regions = (
        (upper_lip, lip * 0.9),
        (lower_lip, lip * 1.04),
        (seam, lip * 0.62),
        (cavity, colours["interior"]),
        (teeth, colours["teeth"] - colours["interior"]),
        (tongue, colours["tongue"] - colours["interior"]),
    )
    keep = 1 - (upper_lip + lower_lip + cavity + seam)
    box = image[:, rows, cols]
    box *= keep[..., None]
    for channel in range(box.shape[-1]):
        mix = sum(coverage * float(colour[channel]) for coverage, colour in regions)
        mix *= brightness[:, None, None]
        box[..., channel] += mix


def render_face(identity: FaceIdentity, mouth: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Face crop uint8 [F, 96, 96, 3] RGB and lip view uint8 [F, 96, 96] grayscale.

    `seed` varies what differs between takes of one speaker: sub-pixel head drift and
    jitter (std ~0.3 face pixels; kept small because a mouth ROI is stabilised on
    landmarks, and any motion there competes with the articulation), blinks, a slight
    brightness change and sensor noise; the mouth follows `mouth` exactly.
    """
    mouth = np.asarray(mouth, dtype=np.float32).reshape(len(mouth), len(MOUTH_PARAMS))
    num_frames = len(mouth)
    if num_frames == 0:
        return np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8), np.zeros((0, SIZE, SIZE), dtype=np.uint8)
    rng = np.random.default_rng([seed, 0x5EED])
    drift = np.stack([_smooth_noise(rng, num_frames, 12) * 0.3, _smooth_noise(rng, num_frames, 15) * 0.22], axis=1)
    jitter = np.stack([_smooth_noise(rng, num_frames, 2) * 0.08 for _ in range(2)], axis=1)
    shift = drift + jitter  # face pixels
    blink = _blinks(rng, num_frames)
    brightness = (1 + rng.uniform(-0.05, 0.05) + 0.004 * _smooth_noise(rng, num_frames, 20)).astype(np.float32)
    noise_frames = rng.integers(len(_noise_bank()), size=num_frames)

    views = _views(identity)
    colours = {
        "lip": np.asarray(identity.lip, dtype=np.float32),
        "interior": _INTERIOR,
        "teeth": _TEETH,
        "tongue": _TONGUE,
    }
    outputs = []
    for view, basis in zip(views, _bases(identity)):
        view_shift = np.clip(shift / view.scale, -_MAX_SHIFT, _MAX_SHIFT)
        image = _shifted_static(basis, view_shift, blink, brightness)
        gray = basis.ndim == 3
        view_colours = {name: (c @ _LUMA).reshape(1) if gray else c for name, c in colours.items()}
        if gray:
            image = image[..., None]
        _draw_mouth(identity, view, mouth, view_shift, view_colours, image, brightness)
        channels = image.shape[-1]
        bank = _noise_bank()
        for frame, index in zip(image, noise_frames):
            frame += bank[index, ..., :channels]
        image += 0.5  # so that the truncating cast rounds
        np.clip(image, 0, 255, out=image)
        image = image.astype(np.uint8)
        outputs.append(image[..., 0] if gray else image)
    return outputs[0], outputs[1]


def _shifted_static(basis, shift, blink, brightness):
    """Static layer moved by `shift` view pixels per frame, with blinks and brightness, float32 [F, 96, 96(, C)].

    The integer part of the shift picks a window of the padded layer, the fractional part
    (|f| <= 0.5) is a first-order Taylor step along the gradients; runs of frames sharing an
    integer offset are one weighted sum of the bases.
    """
    num_frames = len(shift)
    whole = np.round(shift).astype(int)
    frac = shift - whole
    coefficients = np.stack(
        [brightness, -frac[:, 0] * brightness, -frac[:, 1] * brightness, blink * brightness], axis=1
    ).astype(np.float32)
    out = np.empty((num_frames, SIZE, SIZE) + basis.shape[3:], dtype=np.float32)
    flat = out.reshape(num_frames, -1)
    # Runs of consecutive frames with one integer offset (the motion is smooth, so runs are long).
    changes = np.flatnonzero(np.any(whole[1:] != whole[:-1], axis=1)) + 1
    for first, last in zip(np.r_[0, changes], np.r_[changes, num_frames]):
        dx, dy = whole[first]
        window = basis[:, _PAD - dy : _PAD - dy + SIZE, _PAD - dx : _PAD - dx + SIZE].reshape(len(basis), -1)
        # einsum rather than `@`: BLAS is slow for an inner dimension of 4.
        np.einsum("fk,kn->fn", coefficients[first:last], window, out=flat[first:last])
    return out
