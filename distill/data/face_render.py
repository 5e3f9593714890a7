"""Render one image of a synthetic identity (face_identity.py) under random pose, expression, light and occlusion.

Each image draws a fresh nuisance: head pose (yaw/pitch/roll as a rotation of 3-D feature points, so
a turned head moves the nose more than the outline), scale and shift, expression (smile, open mouth, raised
brows, blink, gaze), background and clothes, lighting (gradient, brightness, contrast, colour cast), blur,
sensor noise and now and then an occluder (sunglasses, a mask, a random patch). Recognition has to see through
all of that.

Only numpy and PIL: shapes are polygons drawn with PIL at 2-4x the output size and box-reduced
(anti-aliasing for free); light, blur and noise are applied at the output size. Everything draws
from `np.random.default_rng([seed, stream, ...])`, so an image depends only on its own indices and
can be rendered in any process, in any order, with identical bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from distill.data.face_identity import IMAGE_STREAM, FaceIdentity, rgb, sample_identity, shade
from distill.data.images import encode_jpeg

# Bump when a change alters the pixels: cached datasets (synth.json) written by an older renderer are redone.
RENDERER_VERSION = 1


def _arc(cx, cy, rx, ry, a0=0.0, a1=2 * np.pi, n=24) -> np.ndarray:
    a = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


_U12 = np.linspace(-1, 1, 12)
_U14 = np.linspace(-1, 1, 14)
_CIRCLE16 = _arc(0, 0, 1, 1, n=16)
_CIRCLE10 = _arc(0, 0, 1, 1, n=10)


# Expression parameters, in this order, that move the dynamic shapes; every dynamic point is linear in them.
_EXPRESSION = ("smile", "mouth_open", "brow_raise", "eye_h", "gaze_x", "gaze_y")


class _Face:
    """An identity turned into geometry once, so an image costs a few array operations.

    Shapes that never change between images (body, face, nose, beard, hair) are kept as 3-D points
    (x, y, depth). Shapes that move with expression (mouth, eyes, lids, brows) are linear in the
    expression parameters: points = base + sum_k param_k * direction_k, with depth fixed at the
    neutral face. `draw_list` names, in painting order, each shape's point count, colour, line width
    (0: filled polygon) and the condition under which it is drawn (None: always)."""

    def __init__(self, f: FaceIdentity):
        self.f = f
        self.outline = self._outline()
        self.back = []   # (points3, colour, width): drawn under the expression
        self.front = []  # drawn over it: the hair on top of the head
        self.moving = []  # (base xy, {parameter index: direction xy}, lift, colour, width, condition)
        self._body()
        self._nose()
        self._hair_top()
        self._mouth()
        self._eyes_and_brows()
        base = np.concatenate([m[0] for m in self.moving])
        self.base = base
        self.directions = np.zeros((len(_EXPRESSION),) + base.shape)
        start = 0
        for xy, dirs, *_ in self.moving:
            for k, d in dirs.items():
                self.directions[k, start:start + len(xy)] = d
            start += len(xy)
        lifts = np.repeat([m[2] for m in self.moving], [len(m[0]) for m in self.moving])
        self.moving_z = self.depth(base, lifts)
        self.static_back = np.concatenate([s[0] for s in self.back])
        self.static_front = np.concatenate([s[0] for s in self.front]) if self.front else np.zeros((0, 3))
        self.draw_list = ([(len(s[0]), s[1], s[2], None) for s in self.back]
                          + [(len(m[0]), m[3], m[4], m[5]) for m in self.moving]
                          + [(len(s[0]), s[1], s[2], None) for s in self.front])

    def depth(self, xy, lift) -> np.ndarray:
        """z of the face surface under each point: a rounded head, so central features move most with yaw."""
        x, y = xy[:, 0] / (self.f.face_w * 1.05), xy[:, 1] / 1.1
        return 0.55 * np.sqrt(np.clip(1 - x * x - 0.35 * y * y, 0, 1)) + lift

    def on_face(self, xy, lift) -> np.ndarray:
        return np.concatenate([xy, self.depth(xy, lift)[:, None]], 1)

    @staticmethod
    def flat(xy, z) -> np.ndarray:
        return np.concatenate([xy, np.full((len(xy), 1), z)], 1)

    def points(self, expression) -> np.ndarray:
        """Every point of the face in painting order, (N, 3), for one expression vector (see _EXPRESSION)."""
        moving = self.base + np.tensordot(expression, self.directions, axes=1)
        return np.concatenate([self.static_back, np.concatenate([moving, self.moving_z[:, None]], 1),
                               self.static_front])

    def _outline(self, n=48) -> np.ndarray:
        f = self.f
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = np.cos(a), np.sin(a)
        e = 2.0 / f.squareness
        x = f.face_w * np.sign(c) * np.abs(c) ** e
        y = np.sign(s) * np.abs(s) ** e
        return np.stack([x * (1 - f.jaw * np.clip(y, 0, 1) ** 2), y], 1)

    def _body(self):
        f, back = self.f, self.back
        back.append((self.flat(np.array([(-f.face_w * 0.45, 0.5), (f.face_w * 0.45, 0.5), (f.face_w * 0.55, 1.5),
                                          (-f.face_w * 0.55, 1.5)]), -0.3), shade(f.skin, 0.82), 0))
        if f.hair_style == "long":
            w = f.face_w * (1.25 + f.hair_volume)
            top = _arc(0, -0.05, w, 1.15 + f.hair_volume, np.pi, 2 * np.pi, 20)
            back.append((self.flat(np.concatenate([[(-w, 1.15)], top, [(w, 1.15)]]), -0.4), f.hair, 0))
        for s in (-1, 1):
            ear = _arc(s * f.face_w * 0.98, f.eye_y + 0.12, 0.09 * f.ear, 0.19 * f.ear, n=14)
            back.append((self.flat(ear, -0.1), shade(f.skin, 0.9), 0))
        back.append((self.flat(self.outline, 0.0), f.skin, 0))
        for x, y in f.moles:
            back.append((self.on_face(_arc(x, y, 0.022, 0.022, n=8), 0.01), shade(f.skin, 0.45), 0))
        colour = shade(f.hair, 0.9)
        if f.beard == "full":
            low = self.outline[self.outline[:, 1] > f.mouth_y - 0.25]
            low = low[np.argsort(np.arctan2(low[:, 1], low[:, 0]))]
            back.append((self.on_face(low, 0.01), colour, 0))
        if f.beard in ("moustache", "full"):
            y = f.mouth_y - f.lip_thick - 0.02 + 0.04 * _U12 ** 2
            band = np.concatenate([np.stack([_U12 * f.mouth_w * 1.1, y - 0.06], 1),
                                   np.stack([_U12[::-1] * f.mouth_w * 1.15, y[::-1] + 0.01], 1)])
            back.append((self.on_face(band, 0.05), colour, 0))
        if f.beard == "goatee":
            back.append((self.on_face(_arc(0, f.mouth_y + 0.2, f.mouth_w * 0.55, 0.13, n=16), 0.02), colour, 0))

    def _nose(self):
        f = self.f
        tip_y = f.eye_y + f.nose_len + 0.08
        ridge = np.array([(0.02, f.eye_y + 0.06), (0.03, tip_y - 0.05), (f.nose_w * 0.9, tip_y + 0.02),
                          (0, tip_y + 0.05), (-f.nose_w * 0.9, tip_y + 0.02), (-0.01, tip_y - 0.05)])
        self.back.append((self.on_face(ridge, 0.08), shade(f.skin, 0.84), 0))
        for side in (-1, 1):
            nostril = _arc(side * f.nose_w * 0.5, tip_y + 0.02, f.nose_w * 0.28, 0.022, n=10)
            self.back.append((self.on_face(nostril, 0.12), shade(f.skin, 0.45), 0))

    def _hair_top(self):
        f = self.f
        if f.hair_style == "bald":
            return
        vol = f.hair_volume
        a = np.linspace(np.pi * 1.03, np.pi * 1.97, 28)
        r = np.ones_like(a)
        if f.hair_style == "curly":
            r = r + 0.06 * np.sin(9 * a + f.hair_phase) + 0.06
        outer = np.stack([f.face_w * (1.04 + vol) * r * np.cos(a), -0.08 + (1.02 + vol) * r * np.sin(a)], 1)
        # The hairline runs from the right temple back to the left one.
        xs = np.linspace(outer[-1, 0], outer[0, 0], 16)
        v = xs / (f.face_w * 1.05)
        side_y = -0.3 if f.hair_style == "receding" else -0.12
        hl = f.hairline + (side_y - f.hairline) * v ** 4
        if f.hair_style == "fringe":
            hl = hl + 0.18
        elif f.hair_style == "side_part":
            hl = hl + 0.12 * np.clip(f.part * v + 0.3, 0, 1.3)
        elif f.hair_style == "receding":  # bare temples: an M-shaped hairline
            hl = hl - 0.2 * np.exp(-((np.abs(v) - 0.55) ** 2) / 0.03)
        self.front.append((self.flat(np.concatenate([outer, np.stack([xs, hl], 1)]), 0.05), f.hair, 0))

    def _mouth(self):
        """Lips, the open mouth and the line between the lips; a smile widens the mouth and lifts its corners."""
        f, u = self.f, _U14
        smile, open_ = _EXPRESSION.index("smile"), _EXPRESSION.index("mouth_open")
        bulge = (1 - u ** 2) ** 0.7
        zero = np.zeros_like(u)
        x, x_smile = u * f.mouth_w, 0.12 * u * f.mouth_w
        mid_smile = 0.02 - 0.07 * u ** 2  # how the lip line moves per unit of smile

        def curve(y, y_open, reverse=False):
            base, d_smile, d_open = np.stack([x, y], 1), np.stack([x_smile, mid_smile], 1), np.stack([zero, y_open], 1)
            if reverse:
                base, d_smile, d_open = base[::-1], d_smile[::-1], d_open[::-1]
            return base, d_smile, d_open

        upper = curve(f.mouth_y - f.lip_thick * bulge * (1 - 0.25 * np.exp(-(u * 6) ** 2)), -bulge)
        lower = curve(f.mouth_y + f.lip_thick * 1.25 * bulge, bulge, reverse=True)
        inner_top, inner_bottom = curve(f.mouth_y + zero, -bulge), curve(f.mouth_y + zero, bulge, reverse=True)
        line = curve(f.mouth_y + zero, zero)

        def shape(*parts):
            return (np.concatenate([p[0] for p in parts]),
                    {smile: np.concatenate([p[1] for p in parts]), open_: np.concatenate([p[2] for p in parts])})

        self.moving.append((*shape(upper, lower), 0.04, f.lips, 0, None))
        self.moving.append((*shape(inner_top, inner_bottom), 0.045, (70, 24, 26), 0, "mouth_open"))
        self.moving.append((*shape(line), 0.05, shade(f.lips, 0.55), 0.012, None))

    def _eyes_and_brows(self):
        """Each eye outline is `base + eye_h * direction` (the tilt is a fixed rotation); skin lids above and
        below the opening trim the iris, so a blink is a small eye_h. The iris follows the gaze."""
        f = self.f
        h_k, gx_k, gy_k, raise_k = (_EXPRESSION.index(n) for n in ("eye_h", "gaze_x", "gaze_y", "brow_raise"))
        prof_top, prof_bottom = -(1 - _U12 ** 2) ** 0.7, 0.8 * (1 - _U12 ** 2) ** 0.8
        zero12 = np.zeros(12)
        r = min(f.eye_w * 0.55, f.eye_h * 1.05)
        lash, brow_colour = shade(f.hair, 0.5), shade(f.hair, 0.75)
        for side in (-1, 1):
            centre = np.array([side * f.eye_dx, f.eye_y])
            tilt = f.eye_tilt * side  # the outer corner lifts on both eyes when eye_tilt > 0
            rot = np.array([[np.cos(tilt), np.sin(tilt)], [-np.sin(tilt), np.cos(tilt)]])
            dx = np.stack([_U12 * f.eye_w, zero12], 1)
            top, top_dir = centre + dx @ rot.T, np.stack([zero12, prof_top], 1) @ rot.T
            bottom, bottom_dir = centre + dx[::-1] @ rot.T, np.stack([zero12, prof_bottom[::-1]], 1) @ rot.T
            self.moving.append((np.concatenate([top, bottom]), {h_k: np.concatenate([top_dir, bottom_dir])},
                                0.0, (236, 232, 226), 0, None))
            for radius, colour in ((r, f.iris), (0.45 * r, (16, 12, 12))):
                circle = centre + radius * _CIRCLE16
                gaze = {gx_k: np.tile((f.eye_w * 0.35, 0.0), (16, 1)), gy_k: np.tile((0.0, f.eye_h * 0.3), (16, 1))}
                self.moving.append((circle, gaze, 0.01, colour, 0, "eyes_open"))
            lid_up = np.concatenate([top, top[::-1] + (0, -2.2 * f.eye_h)])
            lid_low = np.concatenate([bottom, bottom[::-1] + (0, 1.6 * f.eye_h)])
            self.moving.append((lid_up, {h_k: np.concatenate([top_dir, top_dir[::-1]])}, 0.015, f.skin, 0, None))
            self.moving.append((lid_low, {h_k: np.concatenate([bottom_dir, bottom_dir[::-1]])}, 0.015, f.skin, 0, None))
            self.moving.append((top, {h_k: top_dir}, 0.02, lash, 0.018, None))
            # Brow: u runs from the inner to the outer end; the outer end thins out.
            bx = side * (f.eye_dx + _U12 * f.eye_w * 1.25)
            by = f.eye_y - f.eye_h - f.brow_gap - f.brow_arch * (1 - _U12 ** 2) + f.brow_tilt * _U12 * 0.3
            half = 0.5 * f.brow_thick * (1 - 0.45 * np.clip(_U12 - 0.2, 0, None))
            brow = np.concatenate([np.stack([bx, by - half], 1), np.stack([bx, by + half], 1)[::-1]])
            self.moving.append((brow, {raise_k: np.tile((0.0, -1.0), (24, 1))}, 0.02, brow_colour, 0, None))

    def occluder(self, rng, kind: int) -> list:
        f = self.f
        if kind == 0:  # sunglasses: two dark lenses and a bridge
            colour = rgb(rng.uniform(5, 60, 3))
            lenses = [(self.on_face(_arc(s * f.eye_dx, f.eye_y, f.eye_w * 1.5, f.eye_w * 1.05, n=16), 0.06), colour, 0)
                      for s in (-1, 1)]
            bridge = np.array([(-f.eye_dx + f.eye_w, f.eye_y - 0.03), (f.eye_dx - f.eye_w, f.eye_y - 0.03)])
            return lenses + [(self.on_face(bridge, 0.06), colour, 0.025)]
        # kind 1: a surgical mask over nose and mouth
        top = f.eye_y + f.nose_len * 0.55
        w = f.face_w * 1.02
        shape = np.concatenate([np.stack([_U12 * w, top + 0.05 * _U12 ** 2], 1),
                                np.stack([_U12[::-1] * w * 0.8, np.full(12, 0.98)], 1)])
        colour = rgb(np.array([(200, 220, 235), (235, 235, 235), (40, 40, 46)][rng.integers(3)]) + rng.normal(0, 8, 3))
        return [(self.on_face(shape, 0.08), colour, 0)]


def _projection(pose, side: int):
    """Matrix and offset taking face points (x, y, z) to canvas pixels: rotate the head, project orthographically."""
    yaw, pitch, roll, scale, tx, ty = pose
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    unit = 0.42 * side * scale
    return (rz @ rx @ ry)[:2].T * unit, np.array([side * (0.5 + tx), side * (0.52 + ty)]), unit


# Nuisance of one image: each name is a uniform draw in [low, high), all drawn in one call (scalar
# draws cost more than the arithmetic). p_* are probabilities compared against their threshold.
_NUISANCE = {
    "yaw": (-0.45, 0.45), "pitch": (-0.2, 0.2), "roll": (-0.18, 0.18), "scale": (0.85, 1.12),
    "tx": (-0.07, 0.07), "ty": (-0.07, 0.07),
    "smile": (-0.3, 1.0), "p_open": (0, 1), "mouth_open": (0.0, 0.025), "brow_raise": (-0.03, 0.06),
    "p_blink": (0, 1), "eye_open": (0.7, 1.15), "gaze_x": (-1, 1), "gaze_y": (-1, 1),
    "clutter": (0, 4), "p_occluder": (0, 1), "occluder": (0, 3),
    "blur": (0, 1.1), "light_angle": (0, 2 * np.pi), "light_slope": (0, 0.5), "brightness": (0.6, 1.3),
    "contrast": (0.65, 1.2), "noise": (0, 9), "noise_x": (0, 1), "noise_y": (0, 1),
}
_LOW = np.array([v[0] for v in _NUISANCE.values()])
_SPAN = np.array([v[1] - v[0] for v in _NUISANCE.values()])

_GRIDS: dict = {}
_NOISE: dict = {}


def _grid(size: int):
    if size not in _GRIDS:
        g = np.linspace(-1, 1, size, dtype=np.float32)
        _GRIDS[size] = (g[None, :, None], g[:, None, None])
    return _GRIDS[size]


def _noise_field(size: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise, twice the image side; each image takes a crop at a random
    offset. Drawing 37k fresh normals per image cost as much as drawing the whole face."""
    if size not in _NOISE:
        _NOISE[size] = np.random.default_rng(20240601).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    return _NOISE[size]


def render_face(face, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One image (size×size×3 uint8 RGB) of `face` (a FaceIdentity, or its prepared geometry), nuisance from `rng`."""
    face = face if isinstance(face, _Face) else _Face(face)
    n = dict(zip(_NUISANCE, (_LOW + _SPAN * rng.random(len(_NUISANCE))).tolist(), strict=True))
    pose = (n["yaw"], n["pitch"], n["roll"], n["scale"], n["tx"], n["ty"])
    mouth_open = n["mouth_open"] if n["p_open"] < 0.35 else 0.0
    eye_open = 0.1 if n["p_blink"] < 0.08 else n["eye_open"]
    occluder = int(n["occluder"]) if n["p_occluder"] < 0.2 else -1
    colours = rng.integers(20, 236, (6, 3)).tolist()  # background, clothes, up to 3 clutter shapes, a patch

    ss = max(2, -(-128 // size))  # draw at >= ~128 px, so small outputs still anti-alias well
    side = size * ss
    canvas = Image.new("RGB", (side, side), tuple(colours[0]))
    draw = ImageDraw.Draw(canvas)
    boxes = rng.random((4, 4)) * (1.2, 1.2, 0.5, 0.5) + (-0.2, -0.2, 0.1, 0.1)
    for i in range(int(n["clutter"])):  # background objects, so that the background is not one flat colour
        x, y, w, h = boxes[i] * side
        draw.ellipse([x, y, x + w, y + h], fill=tuple(colours[2 + i]))

    body = _Face.flat(np.array([(-2.2, 1.9), (-1.3, 1.12), (1.3, 1.12), (2.2, 1.9)]), -0.5)
    expression = np.array([n["smile"], mouth_open, n["brow_raise"], face.f.eye_h * eye_open, n["gaze_x"], n["gaze_y"]])
    drawn = {None: True, "mouth_open": mouth_open > 0, "eyes_open": eye_open > 0.25}
    shapes = [(4, tuple(colours[1]), 0, None)] + face.draw_list
    parts = [body, face.points(expression)]
    if 0 <= occluder < 2:
        extra = face.occluder(rng, occluder)
        shapes += [(len(p), c, w, None) for p, c, w in extra]
        parts += [p for p, _, _ in extra]
    proj, origin, unit = _projection(pose, side)
    flat = (np.concatenate(parts) @ proj + origin).ravel().tolist()
    start = 0
    for count, colour, width, condition in shapes:
        end = start + 2 * count
        if drawn[condition] and width:
            draw.line(flat[start:end], fill=colour, width=max(1, int(round(width * unit))), joint="curve")
        elif drawn[condition]:
            draw.polygon(flat[start:end], fill=colour)
        start = end
    if occluder == 2:  # something in front of the camera: a random patch anywhere
        x, y, w, h = boxes[3] * side
        draw.rectangle([x, y, x + w, y + h], fill=tuple(colours[5]))

    img = canvas.reduce(ss)
    blur = n["blur"] * size / 112
    if blur > 0.3:  # defocus; a box kernel is closer to a lens's disc than a Gaussian, and 3x cheaper
        img = img.filter(ImageFilter.BoxBlur(blur))
    # Contrast around mid-grey and a colour cast per channel: one lookup table, applied by PIL.
    cast = 1 + 0.08 * rng.standard_normal(3)
    levels = np.arange(256.0)
    lut = np.clip(((levels - 128) * n["contrast"] + 128)[None, :] * cast[:, None], 0, 255)
    img = img.point(lut.astype(np.uint8).ravel().tolist())
    # Light from one side: brightness times a linear gradient; then sensor noise.
    gx, gy = _grid(size)
    slope = n["light_slope"]
    gain = np.float32(n["brightness"]) * (1 + np.float32(slope * np.cos(n["light_angle"])) * gx
                                          + np.float32(slope * np.sin(n["light_angle"])) * gy)
    oy, ox = int(n["noise_y"] * size), int(n["noise_x"] * size)
    arr = np.asarray(img, np.float32) * gain
    arr += np.float32(n["noise"]) * _noise_field(size)[oy:oy + size, ox:ox + size]
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def face_landmarks(face, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """The 5 landmarks (5 x 2, x y in output pixels, pixel centres at integers) of the image that
    `render_face(face, rng', size)` draws, `rng'` a generator in the same state as `rng`: eye centres
    (left, right as seen), nose tip, mouth corners (left, right), the order of insightface's detectors.

    Re-draws the image's pose and expression (the renderer's first draw) and projects those points as
    the renderer projects its shapes; it draws no pixels and changes nothing the renderer does."""
    face = face if isinstance(face, _Face) else _Face(face)
    f = face.f
    n = dict(zip(_NUISANCE, (_LOW + _SPAN * rng.random(len(_NUISANCE))).tolist(), strict=True))
    pose = (n["yaw"], n["pitch"], n["roll"], n["scale"], n["tx"], n["ty"])
    smile = n["smile"]
    corner_x = f.mouth_w * (1 + 0.12 * smile)  # _mouth: a smile widens the mouth ...
    corner_y = f.mouth_y - 0.05 * smile        # ... and lifts its corners (mid_smile at u = +-1)
    tip_y = f.eye_y + f.nose_len + 0.08
    xy = np.array([(-f.eye_dx, f.eye_y), (f.eye_dx, f.eye_y), (0.0, tip_y),
                   (-corner_x, corner_y), (corner_x, corner_y)])
    points = face.on_face(xy, np.array([0.01, 0.01, 0.08, 0.05, 0.05]))  # the lifts of iris, nose, lip line
    ss = max(2, -(-128 // size))
    proj, origin, _ = _projection(pose, size * ss)
    canvas = points @ proj + origin
    return (canvas - (ss - 1) / 2) / ss  # canvas pixel centres -> output pixel centres after reduce(ss)


def render_image(seed: int, identity: int, image: int, size: int = 112) -> np.ndarray:
    """Image `image` of identity `identity` in dataset `seed`, as H×W×3 uint8 RGB (same arguments, same pixels)."""
    rng = np.random.default_rng([int(seed), IMAGE_STREAM, int(identity), int(image)])
    return render_face(sample_identity(seed, identity), rng, size)


def render_jpegs(job) -> list:
    """Worker entry point: `(seed, size, quality, [(identity, image), ...])` -> JPEG bytes in the same order."""
    seed, size, quality, items = job
    faces = {}
    out = []
    for identity, image in items:
        if identity not in faces:
            faces[identity] = _Face(sample_identity(seed, identity))
        rng = np.random.default_rng([int(seed), IMAGE_STREAM, int(identity), int(image)])
        out.append(encode_jpeg(render_face(faces[identity], rng, size), quality=quality))
    return out
