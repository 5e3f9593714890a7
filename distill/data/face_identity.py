"""What a synthetic person looks like: a random parametric identity per (seed, index), fixed for all its images.

An identity fixes the face's shape and colours: outline (width, squareness, jaw), skin tone, hair
style, colour and hairline, eye position, size, tilt and iris colour, brows, nose, mouth and lips,
ears, beard and moles. How one image of it looks (pose, expression, light ...) is face_render.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDENTITY_STREAM, IMAGE_STREAM = 0, 1  # the first entropy words after the seed

# Anchor colours (RGB) that random tones interpolate between or jitter around.
_SKIN = np.array([(255, 226, 200), (240, 196, 162), (224, 172, 132), (198, 138, 98),
                  (164, 106, 70), (120, 78, 50), (84, 56, 38)], np.float64)
_HAIR = np.array([(28, 24, 22), (58, 40, 28), (102, 68, 40), (150, 108, 66), (206, 170, 112),
                  (150, 62, 30), (150, 150, 150), (222, 220, 212)], np.float64)
_HAIR_P = np.array([0.24, 0.22, 0.17, 0.1, 0.09, 0.06, 0.07, 0.05])
_IRIS = np.array([(92, 56, 30), (44, 30, 20), (68, 110, 162), (78, 122, 80), (118, 128, 140),
                  (122, 96, 50)], np.float64)
_HAIR_STYLES = ("short", "fringe", "side_part", "long", "receding", "bald", "curly")


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed look of one person, in face units (face half-height 1, y pointing down, origin at the face centre)."""

    face_w: float      # half-width of the face
    squareness: float  # superellipse exponent of the outline: 2 round, higher squarer
    jaw: float         # how much the lower face narrows towards the chin
    skin: tuple
    hair: tuple
    hair_style: str
    hairline: float    # y of the hairline at the middle of the forehead
    hair_volume: float
    hair_phase: float  # where the bumps of a curly outline fall
    part: float        # side parting: which side the hairline drops on, and how far
    eye_y: float
    eye_dx: float      # half the distance between the eye centres
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_tilt: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lips: tuple
    ear: float
    beard: str         # none, moustache, goatee or full
    moles: tuple       # ((x, y), ...) small dark spots


def sample_identity(seed: int, index: int) -> FaceIdentity:
    """The identity `index` of dataset `seed`: the same arguments always give the same face."""
    rng = np.random.default_rng([int(seed), IDENTITY_STREAM, int(index)])
    u = rng.uniform
    t = u(0, len(_SKIN) - 1)
    lo = int(t)
    skin = _SKIN[lo] + (t - lo) * (_SKIN[min(lo + 1, len(_SKIN) - 1)] - _SKIN[lo]) + rng.normal(0, 6, 3)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * u(0.8, 1.15) + rng.normal(0, 8, 3)
    lips = skin * np.array([0.86, 0.58, 0.6]) + rng.normal(0, 8, 3)
    style = _HAIR_STYLES[rng.integers(len(_HAIR_STYLES))]
    beard = ("none", "none", "none", "none", "moustache", "goatee", "full")[rng.integers(7)]
    face_w = u(0.66, 0.88)
    n_moles = rng.choice(4, p=[0.55, 0.3, 0.1, 0.05])
    moles = tuple((float(u(-0.6, 0.6) * face_w), float(u(-0.3, 0.8))) for _ in range(n_moles))
    return FaceIdentity(
        face_w=face_w, squareness=u(2.0, 3.6), jaw=u(0.0, 0.4),
        skin=rgb(skin), hair=rgb(hair), hair_style=style,
        hairline=u(-0.78, -0.5) if style != "receding" else u(-0.95, -0.82),
        hair_volume=u(0.04, 0.2), hair_phase=u(0, 2 * np.pi), part=u(-1, 1),
        eye_y=u(-0.2, 0.02), eye_dx=u(0.27, 0.4), eye_w=u(0.1, 0.17), eye_h=u(0.035, 0.07),
        eye_tilt=u(-0.18, 0.18), iris=rgb(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)),
        brow_gap=u(0.1, 0.22), brow_thick=u(0.025, 0.07), brow_arch=u(-0.02, 0.07),
        brow_tilt=u(-0.12, 0.12), nose_len=u(0.22, 0.4), nose_w=u(0.07, 0.16),
        mouth_y=u(0.45, 0.62), mouth_w=u(0.16, 0.32), lip_thick=u(0.025, 0.07), lips=rgb(lips),
        ear=u(0.8, 1.25), beard=beard, moles=moles,
    )


def rgb(c) -> tuple:
    """A colour as PIL wants it: a tuple of three ints in 0..255."""
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def shade(c, k) -> tuple:
    return rgb(np.asarray(c, np.float64) * k)
