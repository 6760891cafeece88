"""Make ``qcourse/data/lm.npz``, the trained language model of the transformer chapters.

    python -m qcourse.data.make_lm                  # train as shipped, write qcourse/data/lm.npz
    python -m qcourse.data.make_lm --out /tmp/lm.npz --check
                              # retrain into another file and compare it with the shipped one
    python -m qcourse.data.make_lm --steps 20 --out /tmp/short.npz   # a short run

Training is deterministic (``qcourse.nn.train_reference_lm``: seeded weights and batches, one BLAS
thread), and the file is written with fixed timestamps (``qcourse.nn.save_lm``), so on the
machine that made it the same command writes the same bytes.  The full run takes some minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from qcourse.nn.lm_training import (
    LMTraining,
    evaluate_lm,
    lm_windows,
    load_lm,
    save_lm,
    shipped_lm_path,
    train_reference_lm,
)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compare(made, shipped) -> list[str]:
    """Differences between two model files (empty when they hold the same arrays)."""
    a, b = load_lm(made), load_lm(shipped)
    problems = []
    if a.training != b.training:
        problems.append(f"settings differ: {a.training} vs {b.training}")
    if a.meta != b.meta:
        problems.append(f"meta differs: {a.meta} vs {b.meta}")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for name in sorted(set(sa) | set(sb)):
        if name not in sa or name not in sb or not np.array_equal(sa[name], sb[name]):
            problems.append(f"parameter {name} differs")
    for name in sorted(set(a.history) | set(b.history)):
        if name not in a.history or name not in b.history \
                or not np.array_equal(a.history[name], b.history[name]):
            problems.append(f"history {name} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcourse.data.make_lm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="where to write the .npz (default: the shipped qcourse/data/lm.npz)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train for this many steps instead of the shipped number")
    parser.add_argument("--check", action="store_true",
                        help="compare the file written with the shipped one; exit 1 if they differ")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    training = LMTraining()
    if args.steps is not None:
        training = training._replace(steps=args.steps,
                                     warmup=min(training.warmup, args.steps))
    out = Path(args.out) if args.out else Path(str(shipped_lm_path()))
    started = time.monotonic()
    trained = train_reference_lm(training, progress=not args.quiet)
    save_lm(out, trained)
    from qcourse.datasets import load_pydoc_text

    held = evaluate_lm(trained.model, lm_windows(load_pydoc_text("heldout"),
                                                 training.config.max_len))
    print(f"wrote {out} ({out.stat().st_size} bytes, sha256 {_sha256(out)}) in "
          f"{time.monotonic() - started:.0f} s; held-out {held.bits_per_byte:.4f} bits per byte, "
          f"perplexity {held.perplexity:.3f}")
    if args.check:
        shipped = Path(str(shipped_lm_path()))
        if out.resolve() == shipped.resolve():
            print("--check compares a new file with the shipped one: give --out elsewhere")
            return 2
        problems = compare(out, shipped)
        same_bytes = _sha256(out) == _sha256(shipped)
        if problems:
            print("differs from the shipped file:\n  " + "\n  ".join(problems))
            return 1
        print(f"same arrays as the shipped file; same bytes: {same_bytes}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
