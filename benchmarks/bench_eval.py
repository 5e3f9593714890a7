"""Time distill.eval.verification.verification_metrics on 6,000 random pairs against a plain-loop reference.

The reference is the protocol written the straightforward way (a Python loop over 10 folds x 400
thresholds, `np.less(dist, threshold)` each time), the way insightface computes it; the run checks
both give the same accuracies and prints the time of each and their ratio. One thread for numpy and
torch so the figure means "one core".

    .venv/bin/python benchmarks/bench_eval.py [--pairs 6000] [--repeat 20] [--json]
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported, or its BLAS pool is already sized

import argparse
import json
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run

from distill.eval.verification import THRESHOLDS, _fold_sizes, pair_distances, verification_metrics


def reference_accuracies(dist, issame, n_folds=10):
    """Per-fold accuracies and best thresholds from pair distances, with loops as insightface does."""
    issame = np.asarray(issame, dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(_fold_sizes(issame.size, n_folds))])
    indices = np.arange(issame.size)

    def accuracy(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(predict & same)
        tn = np.sum(~predict & ~same)
        return float(tp + tn) / d.size

    accuracies, best_thresholds = [], []
    for f in range(n_folds):
        test = indices[bounds[f]:bounds[f + 1]]
        train = np.setdiff1d(indices, test)
        acc_train = [accuracy(t, dist[train], issame[train]) for t in THRESHOLDS]
        best = int(np.argmax(acc_train))
        accuracies.append(accuracy(THRESHOLDS[best], dist[test], issame[test]))
        best_thresholds.append(THRESHOLDS[best])
    return np.array(accuracies), np.array(best_thresholds)


def random_pairs(n_pairs, dim=512, seed=0):
    """Embeddings where genuine pairs share an identity vector, so accuracies are neither 0.5 nor 1."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    first = rng.standard_normal((n_pairs, dim))
    second = np.where(issame[:, None], first + 7.0 * rng.standard_normal((n_pairs, dim)),
                      rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim), dtype=np.float32)
    emb[0::2], emb[1::2] = first, second
    flip = (emb + 0.3 * rng.standard_normal(emb.shape)).astype(np.float32)
    return emb, flip, issame


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=count(20), default=6000, help="verification pairs (default 6000, as LFW)")
    parser.add_argument("--dim", type=count(1), default=512, help="embedding size (default 512)")
    parser.add_argument("--repeat", type=count(1), default=20, help="runs of the vectorised version (best kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    emb, flip, issame = random_pairs(args.pairs, args.dim)
    metrics = verification_metrics(emb, flip, issame)
    ref_acc, ref_thr = reference_accuracies(pair_distances(emb, flip), issame)
    agree = metrics["acc_mean"] == float(np.mean(ref_acc)) and metrics["acc_std"] == float(np.std(ref_acc)) \
        and metrics["threshold"] == float(np.mean(ref_thr))

    fast_ms = best_time(lambda: verification_metrics(emb, flip, issame), args.repeat)
    loop_ms = best_time(lambda: reference_accuracies(pair_distances(emb, flip), issame), 3)
    result = {"pairs": args.pairs, "dim": args.dim, "threads": 1, "vectorised_ms": round(fast_ms, 2),
              "loop_ms": round(loop_ms, 1), "ratio": round(loop_ms / fast_ms, 1), "same_result": agree,
              "acc_mean": metrics["acc_mean"]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"verification_metrics, {args.pairs} pairs x {args.dim}-d, 1 thread: "
              f"{fast_ms:.2f} ms (best of {args.repeat})")
        print(f"loop reference: {loop_ms:.1f} ms  ->  {loop_ms / fast_ms:.0f}x faster; "
              f"same accuracies: {agree} (acc {metrics['acc_mean']:.5f})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(run(main, "bench_eval"))
