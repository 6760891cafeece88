r"""Training, evaluating and shipping the language model of :mod:`qcourse.nn.lm`.

The text (:func:`lm_windows`, :func:`random_windows`), the loss (:func:`lm_loss`), training
with Adam and a tqdm bar (:func:`train_lm`), evaluation in bits per byte (:func:`evaluate_lm`),
the inputs of every linear layer (:func:`linear_inputs`, the calibration data of the
quantization chapters), and the shipped model: how it is trained (:class:`LMTraining`,
:func:`train_reference_lm`), written and read (:func:`save_lm`, :func:`load_lm`).

Sizes are bounded: at most :data:`qcourse._checks.MAX_STEPS` training steps in one call, and
batches of at most ``MAX_ELEMENTS`` (2**28) numbers in their largest activation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_STEPS,
    check_bool,
    check_instance,
    check_int,
    check_real,
    check_sequence,
    check_size,
    describe,
    float_array,
    int_array,
)
from qcourse.nn.core import Adam, Module, softmax_cross_entropy
from qcourse.nn.lm import VOCAB, LMConfig, TransformerLM, _check_ids, _rows_bound

__all__ = [
    "LMEvaluation",
    "LMTraining",
    "TrainedLM",
    "evaluate_lm",
    "linear_inputs",
    "lm_loss",
    "lm_windows",
    "load_lm",
    "random_windows",
    "save_lm",
    "shipped_lm_path",
    "train_lm",
    "train_reference_lm",
]


def _as_bytes_array(data, name: str = "data") -> np.ndarray:
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return data
    raise TypeError(f"{name} must be bytes or a 1-D uint8 array, got {describe(data)}")


def _check_length(length, arr: np.ndarray, name: str = "length") -> int:
    """A window length that ``arr`` (the text) holds at least one window of."""
    length = check_size(length, name, MAX_ELEMENTS)
    if arr.size < length + 1:
        raise ValueError(f"{name}={length} needs data of at least {length + 1} bytes, got "
                         f"{arr.size}")
    return length


def _batch_size(value, tokens: int, config: LMConfig | None = None, name: str = "batch_size"):
    """A batch size whose largest activation (logits, MLP, qkv or attention scores of ``tokens``
    positions) holds at most ``MAX_ELEMENTS`` numbers."""
    per_token = VOCAB if config is None else max(VOCAB, config.d_ff, 3 * config.d_model,
                                                 config.n_heads * tokens)
    return check_size(value, name, _rows_bound(tokens * per_token))


def lm_windows(data, length: int) -> np.ndarray:
    r"""Cut text into consecutive windows of ``length + 1`` bytes that overlap by one byte.

    Window :math:`i` is ``data[i*length : i*length + length + 1]``: its first ``length`` bytes are
    the input and its last ``length`` the targets, so every byte after the first is predicted
    exactly once (the last partial window is dropped).  Returns int64 (n_windows, length + 1).
    """
    arr = _as_bytes_array(data)
    length = _check_length(length, arr)
    n = (arr.size - 1) // length
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return arr[idx].astype(np.int64)


def random_windows(data, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` windows of ``length + 1`` bytes starting at offsets drawn from ``rng``
    (``batch * (length + 1)`` at most ``MAX_ELEMENTS``)."""
    arr = _as_bytes_array(data)
    length = _check_length(length, arr)
    batch = check_size(batch, "batch", _rows_bound(length + 1))
    check_instance(rng, "rng", np.random.Generator, "a numpy.random.Generator")
    starts = rng.integers(0, arr.size - length, size=batch)
    return arr[starts[:, None] + np.arange(length + 1)[None, :]].astype(np.int64)


def lm_loss(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean next-byte cross-entropy (nats) of logits (B, T, 256) and its gradient (B, T, 256).

    :func:`qcourse.nn.softmax_cross_entropy` on the (B*T) rows; ``targets`` (B, T) holds ints in
    [0, 256)."""
    logits = float_array(logits, "logits", ndim=3)
    targets = int_array(targets, "targets", 0, logits.shape[2] - 1)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have shape {logits.shape[:2]} (the logits' batch and "
                         f"tokens), got {targets.shape}")
    b, t, v = logits.shape
    loss, grad = softmax_cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t))
    return loss, grad.reshape(b, t, v)


class LMEvaluation(NamedTuple):
    """Held-out loss: nats per byte, bits per byte (nats / ln 2), perplexity (e^nats), bytes."""

    nats_per_byte: float
    bits_per_byte: float
    perplexity: float
    n_bytes: int


def evaluate_lm(model: Module, windows: np.ndarray, batch_size: int = 64) -> LMEvaluation:
    r"""Mean cross-entropy of ``model`` on ``windows`` (from :func:`lm_windows`), no training.

    ``model`` is a :class:`TransformerLM` (or anything mapping ids (B, T) to logits (B, T, 256),
    such as a copy with quantized layers).  Bits per byte :math:`= \bar\ell / \ln 2`, perplexity
    :math:`= e^{\bar\ell}` with :math:`\bar\ell` the mean loss in nats over every predicted byte.
    ``batch_size`` windows run at a time (at most ``MAX_ELEMENTS`` numbers in the largest
    activation of a batch).
    """
    if not callable(model):
        raise TypeError(f"model must be a TransformerLM or a callable from ids to logits, got "
                        f"{describe(model)}")
    config = model.config if isinstance(model, TransformerLM) else None
    windows = _check_ids(windows, "windows", None if config is None else config.max_len + 1)
    if windows.shape[1] < 2:
        raise ValueError("windows must hold at least two bytes each (input and target)")
    batch_size = _batch_size(batch_size, windows.shape[1] - 1, config)
    total = 0.0
    for s in range(0, windows.shape[0], batch_size):
        w = windows[s:s + batch_size]
        logits = np.asarray(model(w[:, :-1]), dtype=np.float64)
        if logits.shape != w[:, :-1].shape + (VOCAB,):
            raise ValueError(f"model must map ids {w[:, :-1].shape} to logits of shape "
                             f"{w[:, :-1].shape + (VOCAB,)}, got {logits.shape}")
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=-1))
        tgt = np.take_along_axis(z, w[:, 1:, None], axis=-1)[..., 0]
        total += float(np.sum(lse - tgt))
    n = windows.shape[0] * (windows.shape[1] - 1)
    nats = total / n
    return LMEvaluation(nats, nats / math.log(2), math.exp(nats), n)


def linear_inputs(model: TransformerLM, ids: np.ndarray, layers=None,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """What each linear layer receives on ``ids`` (B, T): ``{name: (B*T, in_features)}``.

    ``layers`` picks names from :meth:`TransformerLM.named_linears` (default: all of the blocks).
    Temporary forward pre-hooks record the inputs (the calibration data of SmoothQuant, GPTQ,
    AWQ); they are removed afterwards, even on error.  ``batch_size`` rows of ``ids`` run at a
    time (bounded as in :func:`evaluate_lm`).
    """
    check_instance(model, "model", TransformerLM, "a qcourse.nn.TransformerLM")
    ids = _check_ids(ids, max_len=model.config.max_len)
    batch_size = _batch_size(batch_size, ids.shape[1], model.config)
    available = dict(model.named_linears(include_head=True))
    names = ([n for n, _ in model.named_linears()] if layers is None
             else check_sequence(layers, "layers", min_len=1))
    for name in names:
        if not isinstance(name, str) or name not in available:
            raise ValueError(f"layers names {describe(name)}; the model's linear layers are "
                             f"{sorted(available)}")
    record: dict[str, list[np.ndarray]] = {name: [] for name in names}
    handles = []

    def make_hook(name):
        def hook(module, inp):
            record[name].append(np.array(inp, copy=True))
        return hook

    try:
        for name in names:
            handles.append(available[name].register_forward_pre_hook(make_hook(name)))
        for s in range(0, ids.shape[0], batch_size):
            model(ids[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: np.concatenate(parts) for name, parts in record.items()}


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _clip_gradients(params, max_norm: float) -> float:
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for _, g in params))
    if norm > max_norm:
        f = max_norm / norm
        for _, g in params:
            g *= g.dtype.type(f)
    return norm


def train_lm(model: TransformerLM, data, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
             warmup: int = 100, clip: float = 1.0, seed: int = 0, progress: bool = True,
             callback: Callable[[int, TransformerLM], None] | None = None) -> dict[str, list]:
    r"""Train ``model`` on the bytes ``data`` with Adam, next-byte cross-entropy.

    Each step draws ``batch_size`` windows of ``max_len + 1`` bytes at offsets from
    ``np.random.default_rng(seed)`` (:func:`random_windows`), runs forward, :func:`lm_loss`,
    backward, clips the gradient's global norm to ``clip``, and takes one Adam step with the
    learning rate warmed up linearly over ``warmup`` steps, then decayed along a cosine to a
    tenth of ``lr``.  Deterministic: the same arguments give bit-identical weights.
    ``callback(step, model)`` runs after steps ``0 .. steps-1`` (e.g. to record statistics).
    Returns ``{"loss": [...], "grad_norm": [...]}``, one entry per step; ``progress=True`` shows a
    tqdm bar.  Bounds: ``steps`` and ``warmup`` at most :data:`qcourse._checks.MAX_STEPS`,
    ``lr`` in (0, 1] (Adam moves each weight by about ``lr`` per step), ``clip`` > 0; a loss that
    stops being finite (diverged training) raises ValueError.
    """
    check_instance(model, "model", TransformerLM, "a qcourse.nn.TransformerLM")
    arr = _as_bytes_array(data)
    steps, batch_size, lr, warmup, clip, seed = _check_settings(
        model.config, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, clip=clip,
        seed=seed)
    progress = check_bool(progress, "progress")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or a function (step, model), got "
                        f"{describe(callback)}")
    t = model.config.max_len
    if arr.size <= t + 1:
        raise ValueError(f"data has {arr.size} bytes; training windows need {t + 2}")
    params = model.parameters()
    opt = Adam(params, lr=lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    history: dict[str, list] = {"loss": [], "grad_norm": []}
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        w = random_windows(arr, t, batch_size, rng)
        logits = model(w[:, :-1])
        loss, grad = lm_loss(logits, w[:, 1:])
        if not math.isfinite(loss):
            raise ValueError(f"training diverged: the loss is {loss} at step {step} with "
                             f"lr={lr} and clip={clip}; lower lr")
        model.backward(grad)
        norm = _clip_gradients(params, clip)
        opt.lr = _lr_at(step, steps, lr, warmup)
        opt.step()
        history["loss"].append(loss)
        history["grad_norm"].append(norm)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{loss / math.log(2):.3f}")
        if callback is not None:
            callback(step, model)
    bar.close()
    return history


def _check_settings(config: LMConfig, *, steps, batch_size, lr, warmup, clip, seed):
    """The settings of :func:`train_lm` (and :class:`LMTraining`), checked."""
    return (check_size(steps, "steps", MAX_STEPS),
            _batch_size(batch_size, config.max_len, config),
            check_real(lr, "lr", 0.0, 1.0, lo_open=True),
            check_int(warmup, "warmup", 0, MAX_STEPS),
            check_real(clip, "clip", 0.0, lo_open=True),
            check_int(seed, "seed", 0))


# --------------------------------------------------------------------------- the shipped model


class _TrainingFields(NamedTuple):
    config: LMConfig
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    clip: float
    probe_every: int
    probe_bytes: int


class LMTraining(_TrainingFields):
    """How the shipped model (``qcourse/data/lm.npz``) is trained: :func:`train_reference_lm`.

    ``probe_every`` steps, the held-out loss on the first ``probe_bytes`` held-out bytes and the
    per-channel abs-max of every linear layer's input are recorded (the transformer chapter
    plots how outlier channels appear).  Checked when made, as :func:`train_lm` checks its
    arguments; ``probe_every`` is 1 to ``MAX_STEPS``, ``probe_bytes`` from ``config.max_len``
    (one window) to ``MAX_ELEMENTS``.
    """

    __slots__ = ()

    def __new__(cls, config: LMConfig | None = None, seed: int = 0, steps: int = 2000,
                batch_size: int = 32, lr: float = 3e-3, warmup: int = 100, clip: float = 1.0,
                probe_every: int = 100, probe_bytes: int = 4096):
        config = LMConfig() if config is None else check_instance(
            config, "config", LMConfig, "a qcourse.nn.LMConfig")
        config = LMConfig(*config)
        steps, batch_size, lr, warmup, clip, seed = _check_settings(
            config, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, clip=clip,
            seed=seed)
        probe_every = check_size(probe_every, "probe_every", MAX_STEPS)
        probe_bytes = check_size(probe_bytes, "probe_bytes", MAX_ELEMENTS)
        if probe_bytes < config.max_len:
            raise ValueError(f"probe_bytes must be at least config.max_len = {config.max_len} "
                             f"(one window of held-out text), got {probe_bytes}")
        return super().__new__(cls, config, seed, steps, batch_size, lr, warmup, clip,
                               probe_every, probe_bytes)

    def _replace(self, **changes) -> LMTraining:
        return type(self)(**{**self._asdict(), **changes})


class TrainedLM(NamedTuple):
    """A trained model and its training record (what :func:`load_lm` returns).

    ``history`` holds arrays: ``train_loss`` (one per step, nats), ``probe_steps``,
    ``probe_heldout_bpb``, ``heldout_bpb`` (one entry: the whole held-out text, stored weights)
    and, per linear layer name, ``absmax/<name>`` of shape (n_probes, in_features).  ``meta``
    holds the Python and NumPy versions and the SHA-256 of the text the model was trained on
    (:func:`qcourse.datasets.pydoc_text_digest`).
    """

    model: TransformerLM
    training: LMTraining
    history: dict[str, np.ndarray]
    meta: dict[str, str]


def _round_weights(model: TransformerLM) -> None:
    """Round every parameter to float16 and back: the weights ship as float16."""
    for _, p in model.named_parameters():
        p[...] = p.astype(np.float16).astype(p.dtype)


def train_reference_lm(training: LMTraining, *, progress: bool = True) -> TrainedLM:
    """Train the course's language model on the training text, as the shipped file was made.

    ``training`` says how (``LMTraining()``: the shipped model's settings; minutes of CPU).
    Builds ``TransformerLM(training.config, seed=training.seed)``, runs :func:`train_lm` on
    ``qcourse.datasets.load_pydoc_text("train")`` with the settings in ``training``, records the
    probes described in :class:`LMTraining`, and finally rounds the weights to float16 (the
    stored precision; the model computes in float32).  Deterministic: ``python -m
    qcourse.data.make_lm`` reproduces ``qcourse/data/lm.npz`` byte for byte on the machine that
    made it.
    """
    from qcourse.datasets import load_pydoc_text, pydoc_text_digest

    training = LMTraining(*check_instance(training, "training", LMTraining,
                                          "a qcourse.nn.LMTraining (LMTraining() for the "
                                          "shipped model's settings)"))
    progress = check_bool(progress, "progress")
    model = TransformerLM(training.config, seed=training.seed)
    probe = lm_windows(load_pydoc_text("heldout")[:training.probe_bytes + 1],
                       training.config.max_len)
    names = [n for n, _ in model.named_linears()]
    steps_seen: list[int] = []
    bpb: list[float] = []
    absmax: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def probe_now(step: int, m: TransformerLM) -> None:
        inputs = linear_inputs(m, probe[:, :-1])
        for n in names:
            absmax[n].append(np.abs(inputs[n]).max(axis=0))
        steps_seen.append(step)
        bpb.append(evaluate_lm(m, probe).bits_per_byte)

    def record(step: int, m: TransformerLM) -> None:
        if (step + 1) % training.probe_every == 0 and step + 1 < training.steps:
            probe_now(step + 1, m)

    probe_now(0, model)
    hist = train_lm(model, load_pydoc_text("train"), steps=training.steps,
                    batch_size=training.batch_size, lr=training.lr, warmup=training.warmup,
                    clip=training.clip, seed=training.seed, progress=progress, callback=record)
    _round_weights(model)
    probe_now(training.steps, model)  # the last probe sees the stored weights
    heldout = evaluate_lm(model, lm_windows(load_pydoc_text("heldout"), training.config.max_len))
    history = {"train_loss": np.array(hist["loss"], dtype=np.float64),
               "probe_steps": np.array(steps_seen, dtype=np.int64),
               "probe_heldout_bpb": np.array(bpb, dtype=np.float64),
               "heldout_bpb": np.array([heldout.bits_per_byte])}
    for n in names:
        history[f"absmax/{n}"] = np.stack(absmax[n]).astype(np.float32)
    meta = {"python": ".".join(str(v) for v in __import__("sys").version_info[:3]),
            "text_sha256": pydoc_text_digest(), "numpy": np.__version__}
    return TrainedLM(model, training, history, meta)


def save_lm(path, trained: TrainedLM) -> None:
    """Write ``trained`` as an ``.npz`` whose bytes depend only on its contents.

    ``numpy.savez_compressed`` stamps each member with the current time; this writer fixes the
    timestamps (1980-01-01), so the same model gives the same file.  Parameters are stored as
    float16 under ``param/<name>``; settings and meta as JSON.
    """
    import io
    import json
    import zipfile

    path = _check_path(path)
    check_instance(trained, "trained", TrainedLM, "a qcourse.nn.TrainedLM")
    check_instance(trained.model, "trained.model", TransformerLM, "a qcourse.nn.TransformerLM")
    arrays: dict[str, np.ndarray] = {}
    for name, p in trained.model.named_parameters():
        arrays[f"param/{name}"] = p.astype(np.float16)
    for name, a in trained.history.items():
        arrays[f"history/{name}"] = np.asarray(a)
    settings = trained.training._asdict()
    settings["config"] = trained.training.config._asdict()
    arrays["settings"] = np.array(json.dumps(settings, sort_keys=True))
    arrays["meta"] = np.array(json.dumps(trained.meta, sort_keys=True))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def shipped_lm_path():
    """Where the trained model ships: ``qcourse/data/lm.npz`` (a path-like resource)."""
    from importlib import resources

    return resources.files("qcourse").joinpath("data").joinpath("lm.npz")


def _check_path(path, name: str = "path"):
    """A file name: a str or os.PathLike (not an int, which ``open`` takes for a file
    descriptor), not empty."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file name (str or os.PathLike), got {describe(path)}")
    if not os.fspath(path):
        raise ValueError(f"{name} must not be empty")
    return path


def load_lm(path=None) -> TrainedLM:
    """Read a model written by :func:`save_lm` (default: the shipped ``qcourse/data/lm.npz``).

    The float16 weights are loaded into a float32 :class:`TransformerLM`.  Each call returns a
    fresh model, so callers may modify it.  ``path`` is a str or os.PathLike; a path that names
    no file raises Python's ``FileNotFoundError``, a file that is not a model written by
    :func:`save_lm` a ValueError.
    """
    import json
    import zipfile

    if path is None:
        opener = shipped_lm_path().open("rb")
    else:
        opener = open(_check_path(path), "rb")
    with opener as fh:
        try:
            with np.load(fh, allow_pickle=False) as data:
                settings = json.loads(str(data["settings"]))
                meta = json.loads(str(data["meta"]))
                config = LMConfig(**settings.pop("config"))
                training = LMTraining(config=config, **settings)
                model = TransformerLM(config, seed=0)
                model.load_state_dict({k.removeprefix("param/"): data[k].astype(np.float32)
                                       for k in data.files if k.startswith("param/")})
                history = {k.removeprefix("history/"): np.array(data[k]) for k in data.files
                           if k.startswith("history/")}
        except (KeyError, ValueError, TypeError, AttributeError, EOFError,
                zipfile.BadZipFile) as exc:
            raise ValueError(f"path {path!r} is not a model written by save_lm: "
                             f"{type(exc).__name__}: {exc}") from None
    return TrainedLM(model, training, history, meta)
