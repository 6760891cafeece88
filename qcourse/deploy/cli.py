"""``python -m qcourse.deploy {export,run}``: the command line (:func:`main`).

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qcourse import _checks
from qcourse.deploy.course import (
    course_model,
)
from qcourse.deploy.layers import (
    DeployModel,
)
from qcourse.deploy.litert import (
    to_tflite,
)
from qcourse.deploy.onnx import (
    to_onnx,
)
from qcourse.deploy.predict import (
    RUNTIME_ARITHMETIC,
    RUNTIMES,
    predict_codes,
)

__all__ = [
    "main",
]

# --------------------------------------------------------------------------- command line


def _layout_text(model: DeployModel) -> str:
    if len(model.input_shape) == 1:
        f = model.input_shape[0]
        return (f"model.onnx and model.tflite both take float32 of shape (N, {f}) (one row of "
                f"{f} pixel values per image, each the 0..16 intensity divided by 16, row-major "
                f"8x8) and return int8 codes of "
                f"shape (N, {model.output_shape[0]}).")
    c, h, w = model.input_shape
    return (f"model.onnx takes float32 NCHW images of shape (N, {c}, {h}, {w}); model.tflite "
            f"takes float32 NHWC images of shape (N, {h}, {w}, {c}). Both return the last "
            f"layer's int8 codes.")


def _help_epilog() -> str:
    shape = "(N, 64)"
    try:
        model, _, _ = course_model()
        layout = _layout_text(model)
        shape = str(("N", *model.input_shape)).replace("'", "")
    except Exception as exc:  # noqa: BLE001 - help must print even if training fails
        layout = f"(the course model could not be built: {exc})"
    return (f"Input layouts: {layout}\n\n`run` reads X.npy: float32 images of shape {shape} in "
            f"the course's layout (for images NCHW, whichever runtime is named) and writes "
            f"Y.npy: int8 codes, qcourse's prediction of that runtime's output.\n\nRuntimes: "
            + "; ".join(f"{rt} (convolutions: {_function_name(rt, 'conv')}, fully connected: "
                        f"{_function_name(rt, 'dense')})" for rt in RUNTIMES))


def _function_name(runtime: str, step: str) -> str:
    return RUNTIME_ARITHMETIC[runtime][step].split(":")[0].split(" (")[0]


def main(argv=None) -> int:
    """``python -m qcourse.deploy {export,run}``; see ``--help``.

    ``argv``: the arguments (a list of strings; None reads ``sys.argv``).  Arguments argparse
    refuses end the program with its message and status 2 (``SystemExit``)."""
    if argv is not None:
        for i, arg in enumerate(_checks.check_sequence(argv, "argv")):
            _checks.check_instance(arg, f"argv[{i}]", str, "a string")
    parser = argparse.ArgumentParser(
        prog="python -m qcourse.deploy",
        description="Export the course's trained integer network to ONNX and LiteRT, and "
                    "predict the int8 codes each runtime returns, with qcourse's arithmetic.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write DIR/model.onnx and DIR/model.tflite",
                        epilog=_help_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ex.add_argument("--form", choices=("qoperator", "qdq"), default="qoperator",
                    help="ONNX form (default: qoperator)")
    rn = sub.add_parser("run", help="predict a runtime's output codes for X.npy",
                        epilog=_help_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rn.add_argument("--runtime", required=True, choices=RUNTIMES)
    rn.add_argument("--inputs", required=True, type=Path, help="X.npy, float32 images")
    rn.add_argument("--out", required=True, type=Path, help="Y.npy to write (int8 codes)")
    args = parser.parse_args(argv)
    model, _, _ = course_model()
    if args.command == "export":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model.onnx").write_bytes(to_onnx(model, args.form).SerializeToString())
        (args.out / "model.tflite").write_bytes(to_tflite(model))
        print(f"wrote {args.out / 'model.onnx'} and {args.out / 'model.tflite'}")
        print(_layout_text(model))
        return 0
    try:
        X = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as exc:
        parser.error(f"--inputs {args.inputs}: cannot read a .npy array ({exc})")
    try:
        Y = predict_codes(model, X, args.runtime)
    except (TypeError, ValueError) as exc:
        parser.error(f"--inputs {args.inputs}: {exc}")
    np.save(args.out, Y)
    print(f"wrote {args.out}: int8 codes of shape {Y.shape} predicted for {args.runtime}")
    return 0
