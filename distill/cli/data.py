"""`distill data pack|reindex|synth|synth-ijb|inspect`: pack, reindex, generate and inspect face datasets
(library: distill.data)."""

from __future__ import annotations

import os
import time

from distill.cli import help_values
from distill.utils.errors import ConfigError, DataFormatError


def _cmd_pack(args) -> int:
    from distill.data.pack import pack_image_tree

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataFormatError(f"{out}: is a file; `distill data pack` writes a folder (train.rec, train.idx, "
                              f"property): give a folder name")
    if os.path.exists(os.path.join(out, "train.rec")) and not args.force:
        raise DataFormatError(f"{out}: already holds train.rec; pass --force to overwrite it")
    if args.size < 16:
        raise DataFormatError(f"--size {args.size}: an aligned face needs at least 16 pixels a side (112 is "
                              f"insightface's)")
    info = pack_image_tree(args.src, out, quality=args.quality, progress=True, landmarks=args.landmarks, size=args.size)
    h, w = info["image_size"]
    print(f"packed {info['images']} images of {info['identities']} identities ({h}x{w}) into "
          f"{os.path.join(out, 'train.rec')}, train.idx, property")
    return 0


def _cmd_reindex(args) -> int:
    from distill.data.recordio_writer import rebuild_index

    rec = os.path.join(args.rec, "train.rec") if os.path.isdir(args.rec) else args.rec
    if not os.path.isfile(rec):
        raise DataFormatError(f"{rec}: RecordIO file not found")
    idx = os.path.splitext(rec)[0] + ".idx"
    if os.path.exists(idx) and not args.force:
        raise DataFormatError(f"{idx}: already exists; pass --force to rebuild it from {rec}")
    n, rule = rebuild_index(rec, idx)
    print(f"wrote {idx}: {n} records ({rule})")
    return 0


def _cmd_synth(args) -> int:
    from distill.data.synthetic import MANIFEST, VAL_BIN, ensure_synthetic, synthetic_is_current

    params = dict(ids=args.ids, images_per_id=args.images_per_id, size=args.size, pairs=args.pairs,
                  seed=args.seed, holdout_ids=args.holdout_ids)
    if synthetic_is_current(args.out, **params):
        print(f"{args.out} already holds this synthetic dataset ({MANIFEST} matches); nothing to do")
        return 0
    start = time.perf_counter()
    manifest = ensure_synthetic(args.out, workers=args.workers, progress=True, **params)
    seconds = time.perf_counter() - start
    p = manifest["params"]
    rendered = manifest["images"] + 2 * p["pairs"]
    print(f"wrote {args.out}: {manifest['images']} images of {p['ids']} identities ({p['size']}x{p['size']}) "
          f"in train.rec/.idx/property; {VAL_BIN}: {p['pairs']} pairs of {p['holdout_ids']} held-out identities. "
          f"{rendered} images in {seconds:.1f} s ({rendered / seconds:.0f} img/s)")
    return 0


def _cmd_synth_ijb(args) -> int:
    from distill.data.ijb import TARGETS
    from distill.data.synth_ijb import read_manifest as read_synth_ijb_manifest
    from distill.data.synth_ijb import synth_ijb_params, write_synthetic_ijb

    if args.target not in TARGETS:
        raise ConfigError(f"--target {args.target}: one of {', '.join(TARGETS)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"{args.out}: is a file; `distill data synth-ijb` writes a folder (loose_crop/, meta/): give "
                          f"a folder name")
    params = synth_ijb_params(args.templates, args.seed, args.target)
    stored = read_synth_ijb_manifest(args.out)
    if stored is not None and stored.get("params") == params and not args.force:
        print(f"{args.out} already holds this synthetic IJB set (synth_ijb.json matches); nothing to do")
        return 0
    start = time.perf_counter()
    m = write_synthetic_ijb(args.out, force=args.force or stored is not None, **params)
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}: {m['images']} images ({m['medias']} medias) in {m['templates']} templates of "
          f"{m['people']} people, {m['pairs']} template pairs ({m['genuine_pairs']} genuine), layout of "
          f"{params['target']}; {seconds:.1f} s. Evaluate: distill ijb MODEL --root {args.out} --target "
          f"{params['target']}")
    return 0


def _cmd_inspect(args) -> int:
    from distill.data.inspect import format_report, inspect_dataset

    print(format_report(inspect_dataset(args.path, grid=args.grid, rows=args.rows, cols=args.cols)))
    return 0


def add_commands(sub) -> None:
    parser = sub.add_parser("data", help="pack, reindex, generate (synth) and inspect face datasets")
    data_sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = data_sub.add_parser("pack", help="pack an identity-per-folder image tree into insightface train.rec/.idx")
    p.add_argument("src", help="folder with one sub-folder of images per identity (classes sorted by name)")
    p.add_argument("out", help="output folder for train.rec, train.idx and property")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for non-JPEG sources (JPEGs are kept as is)")
    p.add_argument("--force", action="store_true", help="overwrite an existing train.rec in OUT")
    p.add_argument("--landmarks", metavar="FILE",
                   help="align raw photos first: a text file of `relative/path x1 y1 ... x5 y5 [score]` lines "
                        "(5 points: eyes, nose, mouth corners), each image warped onto the ArcFace template")
    p.add_argument("--size", type=int, default=112, help="side of the aligned faces with --landmarks (default 112)")
    p.set_defaults(func=_cmd_pack)

    p = data_sub.add_parser("reindex", help="rebuild a missing train.idx by scanning train.rec")
    p.add_argument("rec", help="the .rec file or the folder holding train.rec")
    p.add_argument("--force", action="store_true", help="overwrite an existing .idx")
    p.set_defaults(func=_cmd_reindex)

    p = data_sub.add_parser("synth", help="generate synthetic face identities as insightface train.rec + a .bin")
    p.add_argument("out", help="output folder (created; replaced only if it holds an older synthetic dataset)")
    p.add_argument("--ids", type=int, default=1000, help="training identities (default 1000)")
    p.add_argument("--images-per-id", type=int, default=20, help="images per training identity (default 20)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--pairs", type=int, default=2000, help="verification pairs in synth_val.bin, even (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: same seed and sizes, same bytes (default 0)")
    p.add_argument("--holdout-ids", type=int, default=None,
                   help="held-out identities for the pairs (default max(10, ids/10)); never in train.rec")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: all CPUs)")
    p.set_defaults(func=_cmd_synth)

    p = data_sub.add_parser("synth-ijb", help="generate a synthetic IJB-B/IJB-C test set (insightface's layout)")
    p.add_argument("out", help="output folder: loose_crop/, meta/ and synth_ijb.json")
    p.add_argument("--templates", type=int, default=40, help="templates, two per person (default 40)")
    p.add_argument("--seed", type=int, default=0, help="same seed and sizes, same bytes (default 0)")
    help_values(p.add_argument("--target", default="IJBC", type=str.upper,
                               help="which set's layout to write: %(targets)s (meta files ijbc_* or ijbb_*; "
                                    "default IJBC)"), targets="distill.data.ijb:TARGETS")
    p.add_argument("--force", action="store_true", help="replace IJB files already in OUT")
    p.set_defaults(func=_cmd_synth_ijb)

    p = data_sub.add_parser("inspect", help="count images and identities of a dataset and draw a grid of samples")
    p.add_argument("path", help="folder with train.rec, a .rec file, a verification .bin, or an image folder tree")
    p.add_argument("--grid", default=None, help="write a PNG of samples here (rows = identities, columns = images)")
    p.add_argument("--rows", type=int, default=8, help="identities (or rows of pairs) in the grid (default 8)")
    p.add_argument("--cols", type=int, default=8, help="images per row in the grid (default 8)")
    p.set_defaults(func=_cmd_inspect)
