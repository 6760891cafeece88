"""Make ``qcourse/data/cnn_digits.npz``: the trained course CNN, ReLU6 and ReLU twins.

    python -m qcourse.data.make_cnn                # train both (a few minutes), write the file
    python -m qcourse.data.make_cnn --check        # train and compare with the shipped file
    python -m qcourse.data.make_cnn --epochs-run 1 --check   # the first epoch only (seconds)

Recipe (:func:`qcourse.cnn.train_cnn`): :func:`qcourse.cnn.course_cnn` with seed 0, the digits'
training split (seed 0), Adam with learning rate 0.01 on a cosine schedule over 30 epochs,
batches of 32, L2 weight decay 0.003 on everything but the depthwise filters.  BLAS runs on one
thread (the script re-executes itself with ``OPENBLAS_NUM_THREADS=1`` and friends), so that the
float32 sums are done in the same order every run; the same machine type then gives the same
bytes.  The file stores every parameter and batch-norm statistic as ``"<activation>/<name>"``
and, under ``"check/<activation>/epoch1"``, a SHA-256 of the state after the first epoch, so
that a quick run can be compared with the shipped one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

RECIPE = {"epochs": 30, "lr": 1e-2, "weight_decay": 3e-3, "batch_size": 32, "seed": 0}
ACTIVATIONS = ("relu6", "relu")
DEFAULT_OUT = Path(__file__).with_name("cnn_digits.npz")


def state_digest(state: dict) -> str:
    """SHA-256 over the names, shapes and bytes of a state dict, in sorted order."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def train_one(activation: str, stop_after: int | None = None, progress: bool = False):
    """The recipe for one activation; returns (state dict, digest after the first epoch)."""
    from qcourse.cnn import course_cnn, digits_images, train_cnn

    X, y = digits_images("train", seed=0)
    model = course_cnn(activation, seed=RECIPE["seed"])
    kwargs = {k: RECIPE[k] for k in ("epochs", "lr", "weight_decay", "batch_size", "seed")}
    train_cnn(model, X, y, progress=progress, stop_after=1, **kwargs)
    first = state_digest(model.state_dict())
    if stop_after is None or stop_after > 1:
        model = course_cnn(activation, seed=RECIPE["seed"])
        train_cnn(model, X, y, progress=progress, stop_after=stop_after, **kwargs)
    return model.state_dict(), first


def _single_threaded() -> bool:
    return all(os.environ.get(v) == "1" for v in _THREAD_VARS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcourse.data.make_cnn",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the weights (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="compare with --out instead of writing it (exit 1 if different)")
    parser.add_argument("--epochs-run", type=int, default=None,
                        help="stop after this many epochs of the schedule (with --check, 1 "
                             "compares the first-epoch digests only)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if not _single_threaded():
        env = dict(os.environ, **{v: "1" for v in _THREAD_VARS})
        cmd = [sys.executable, "-m", "qcourse.data.make_cnn", *(argv or sys.argv[1:])]
        os.execve(sys.executable, cmd, env)
    import numpy as np

    made = {}
    for act in ACTIVATIONS:
        state, first = train_one(act, args.epochs_run, args.progress)
        made[act] = (state, first)
    if args.check:
        with np.load(args.out) as shipped:
            ok = True
            for act, (state, first) in made.items():
                want = str(shipped[f"check/{act}/epoch1"])
                if first != want:
                    print(f"{act}: first-epoch digest {first} != shipped {want}")
                    ok = False
                if args.epochs_run is None:
                    for name, arr in state.items():
                        if not np.array_equal(arr, shipped[f"{act}/{name}"]):
                            print(f"{act}/{name} differs from the shipped weights")
                            ok = False
            print("reproduced exactly" if ok else "NOT reproduced")
            return 0 if ok else 1
    if args.epochs_run is not None:
        parser.error("--epochs-run without --check would write a partly trained model")
    arrays = {f"{act}/{name}": arr for act, (state, _) in made.items()
              for name, arr in state.items()}
    arrays.update({f"check/{act}/epoch1": np.array(first) for act, (_, first) in made.items()})
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
