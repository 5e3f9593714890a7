"""A synthetic IJB-B/IJB-C test set in insightface's layout, so that `distill ijb` runs end to end without the real one.

    out/loose_crop/<k>.jpg                    a rendered face pasted, scaled, into a larger canvas
    out/meta/<t>_name_5pts_score.txt          its 5 landmarks in the canvas and a detector score in (0.5, 1]
    out/meta/<t>_face_tid_mid.txt             template id and media id of every image
    out/meta/<t>_template_pair_label.txt      every pair of templates, 1 when both show the same person
    out/synth_ijb.json                        the parameters (written last: its presence means "complete")

Templates come two per person (the last one alone when their number is odd). A template holds one
to three medias; a media is a still image or, about a third of the time, a "video" of two to four
frames. Template ids are random and not contiguous, media ids run on across templates, as in IJB.
People are synthetic identities (face_identity.py) numbered from IDENTITY_OFFSET, far from the
identities `distill data synth` trains on, so a model trained on those never saw these people.
Everything is a function of the seed: the same arguments write the same bytes.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from distill.data.face_identity import IMAGE_STREAM, sample_identity
from distill.data.face_render import RENDERER_VERSION, face_landmarks, render_face
from distill.data.ijb import IMAGE_DIR, META_DIR, TARGETS, meta_path
from distill.data.images import encode_jpeg
from distill.utils.atomic import atomic_write_json, read_json
from distill.utils.errors import ConfigError

MANIFEST = "synth_ijb.json"
IDENTITY_OFFSET = 1_000_000
RENDER_SIZE = 112
JPEG_QUALITY = 90
_LAYOUT_STREAM = 3  # entropy word after the seed (0, 1, 2: identities, images, verification pairs)
_FORMAT = "facedistill-synthetic-ijb"


def synth_ijb_params(templates: int = 40, seed: int = 0, target: str = "IJBC") -> dict:
    for key, value, low in (("templates", templates, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"synthetic IJB: {key} = {value!r}; it must be an integer >= {low}")
    if str(target).upper() not in TARGETS:
        raise ConfigError(f"synthetic IJB: target {target!r}; one of {', '.join(TARGETS)}")
    return {"templates": int(templates), "seed": int(seed), "target": str(target).upper()}


def _layout(params: dict):
    """Who is in which template, media and image: (template ids, subject per template, images) where each
    image is (template index, media id, image index within its person)."""
    rng = np.random.default_rng([params["seed"], _LAYOUT_STREAM])
    n = params["templates"]
    template_ids = np.sort(rng.choice(10 * n, n, replace=False)) + 1
    subjects = np.arange(n) // 2
    images, media_id, per_subject = [], 0, {}
    for t in range(n):
        for _ in range(int(rng.integers(1, 4))):
            media_id += 1
            frames = int(rng.integers(2, 5)) if rng.random() < 0.35 else 1
            for _ in range(frames):
                s = int(subjects[t])
                images.append((t, media_id, per_subject.get(s, 0)))
                per_subject[s] = per_subject.get(s, 0) + 1
    return template_ids, subjects, images


def _loose_crop(face, subject: int, image: int, seed: int, rng: np.random.Generator):
    """A rendered face scaled into a larger canvas of a flat colour, and its 5 landmarks there."""
    words = [seed, IMAGE_STREAM, IDENTITY_OFFSET + subject, image]
    rendered = render_face(face, np.random.default_rng(words), RENDER_SIZE)
    landmarks = face_landmarks(face, np.random.default_rng(words), RENDER_SIZE)
    side = int(round(RENDER_SIZE * rng.uniform(0.7, 1.3)))
    width, height = (int(round(side * m)) for m in rng.uniform(1.25, 1.8, 2))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    canvas.paste(Image.fromarray(rendered).resize((side, side), Image.BILINEAR), (left, top))
    # pixel centres: x -> (x + 0.5) * scale - 0.5 under the resize, then the paste offset
    scale = side / RENDER_SIZE
    landmarks = (landmarks + 0.5) * scale - 0.5 + np.array([left, top])
    return np.asarray(canvas), landmarks


def write_synthetic_ijb(out, templates: int = 40, seed: int = 0, target: str = "IJBC", force: bool = False) -> dict:
    """Write the synthetic set into `out` (see the module docstring); returns its manifest.

    An `out` that already holds IJB files is refused unless `force` (then they are replaced)."""
    params = synth_ijb_params(templates, seed, target)
    out = os.fspath(out)
    for name in (IMAGE_DIR, META_DIR, MANIFEST):
        if os.path.exists(os.path.join(out, name)) and not force:
            raise ConfigError(f"{out}: already holds {name}; choose another folder or pass --force to replace it")
    os.makedirs(os.path.join(out, IMAGE_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, META_DIR), exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))  # the manifest says "complete": not while files change
    template_ids, subjects, images = _layout(params)
    rng = np.random.default_rng([params["seed"], _LAYOUT_STREAM, 1])
    faces = {}
    landmark_lines, template_lines = [], []
    for k, (t, media, image) in enumerate(images):
        s = int(subjects[t])
        if s not in faces:
            faces[s] = sample_identity(params["seed"], IDENTITY_OFFSET + s)
        pixels, landmarks = _loose_crop(faces[s], s, image, params["seed"], rng)
        name = f"{k + 1}.jpg"
        with open(os.path.join(out, IMAGE_DIR, name), "wb") as f:
            f.write(encode_jpeg(pixels, quality=JPEG_QUALITY))
        score = max(0.5001, 1.0 - rng.uniform(0.0, 0.5))  # in (0.5, 1] also after rounding to 4 decimals
        landmark_lines.append(" ".join([name] + [f"{v:.3f}" for v in landmarks.ravel()] + [f"{score:.4f}"]))
        template_lines.append(f"{name} {template_ids[t]} {media}")
    first, second = np.triu_indices(len(template_ids), k=1)
    labels = (subjects[first] == subjects[second]).astype(int)
    pair_lines = [f"{a} {b} {c}" for a, b, c in zip(template_ids[first], template_ids[second], labels, strict=True)]
    for kind, lines in (("landmarks", landmark_lines), ("templates", template_lines), ("pairs", pair_lines)):
        with open(meta_path(out, params["target"], kind), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    manifest = {"format": _FORMAT, "params": params, "renderer_version": RENDERER_VERSION,
                "images": len(images), "medias": int(images[-1][1]), "templates": len(template_ids),
                "people": int(subjects.max()) + 1, "pairs": len(pair_lines), "genuine_pairs": int(labels.sum())}
    atomic_write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def read_manifest(out) -> dict | None:
    return read_json(os.path.join(os.fspath(out), MANIFEST))
