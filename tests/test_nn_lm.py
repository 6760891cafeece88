"""The language model of qcourse.nn (qcourse/nn/lm.py, lm_training.py): gradients, caching, data,
training, the shipped weights and their reproduction.

Every backward is checked against central finite differences in float64.  The shipped model's
training is re-run for a few steps and compared with the losses recorded in the shipped file;
``QCOURSE_RETRAIN_LM=1`` re-runs the whole training and compares the file byte for byte.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest

from qcourse.datasets import load_pydoc_text, pydoc_text_digest, pydoc_topics
from qcourse.nn import (
    GELU,
    CausalSelfAttention,
    Embedding,
    KVCache,
    LayerNorm,
    LMConfig,
    LMTraining,
    TransformerBlock,
    TransformerLM,
    evaluate_lm,
    generate,
    linear_inputs,
    lm_loss,
    lm_windows,
    load_lm,
    random_windows,
    save_lm,
    shipped_lm_path,
    train_lm,
    train_reference_lm,
)

TINY = LMConfig(d_model=8, n_heads=2, n_layers=2, d_ff=16, max_len=6)


def numeric_grad(f, x: np.ndarray, idx, eps: float = 1e-6) -> float:
    old = x[idx]
    x[idx] = old + eps
    up = f()
    x[idx] = old - eps
    down = f()
    x[idx] = old
    return (up - down) / (2 * eps)


def check_input_grad(module, x: np.ndarray, seed: int = 0, n: int = 12):
    """d/dx of sum(module(x) * R) against finite differences at n random entries."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=module(x).shape)

    def f():
        return float(np.sum(module(x) * r))

    f()
    analytic = module.backward(r)
    for _ in range(n):
        idx = tuple(int(rng.integers(s)) for s in x.shape)
        num = numeric_grad(f, x, idx)
        assert math.isclose(analytic[idx], num, rel_tol=1e-5, abs_tol=1e-8), (idx, analytic[idx],
                                                                              num)


def test_layernorm_gelu_attention_block_input_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 8))
    ln = LayerNorm(8, dtype=np.float64)
    ln.weight[...] = rng.normal(size=8)
    ln.bias[...] = rng.normal(size=8)
    check_input_grad(ln, x.copy())
    check_input_grad(GELU(), rng.normal(size=(4, 7)) * 3)
    check_input_grad(CausalSelfAttention(8, 2, seed=3, std=0.5, dtype=np.float64), x.copy())
    check_input_grad(TransformerBlock(8, 2, 16, seed=4, dtype=np.float64), x.copy())


def test_every_parameter_gradient_of_the_model_matches_finite_differences():
    model = TransformerLM(TINY, seed=5, dtype=np.float64)
    rng = np.random.default_rng(6)
    for _, p in model.named_parameters():  # larger weights make every path matter
        p[...] = rng.normal(scale=0.3, size=p.shape)
    ids = rng.integers(0, 256, size=(3, 6))
    targets = rng.integers(0, 256, size=(3, 6))

    def loss():
        return lm_loss(model(ids), targets)[0]

    _, grad = lm_loss(model(ids), targets)
    model.backward(grad)
    grads = {name: g.copy() for (name, _), (_, g) in zip(model.named_parameters(),
                                                         model.parameters(), strict=True)}
    checked = 0
    for name, p in model.named_parameters():
        for _ in range(3):
            if name.startswith("tok_emb"):  # only rows that occur get a gradient
                idx = (int(ids[rng.integers(3), rng.integers(6)]), int(rng.integers(p.shape[1])))
            else:
                idx = tuple(int(rng.integers(s)) for s in p.shape)
            num = numeric_grad(loss, p, idx)
            assert math.isclose(grads[name][idx], num, rel_tol=1e-5, abs_tol=1e-9), (
                name, idx, grads[name][idx], num)
            checked += 1
    assert checked == 3 * len(model.named_parameters())


def test_gradient_check_catches_a_wrong_backward(monkeypatch):
    """The check above fails when a backward is wrong (GELU's derivative halved)."""
    real = GELU.backward
    monkeypatch.setattr(GELU, "backward", lambda self, g: 0.5 * real(self, g))
    with pytest.raises(AssertionError):
        check_input_grad(GELU(), np.random.default_rng(0).normal(size=(4, 7)))


def test_embedding_accumulates_repeated_rows():
    emb = Embedding(5, 3, dtype=np.float64)
    emb(np.array([[1, 1, 4]]))
    emb.backward(np.ones((1, 3, 3)))
    assert emb.grad_weight[1].tolist() == [2, 2, 2] and emb.grad_weight[4].tolist() == [1, 1, 1]
    assert not emb.grad_weight[[0, 2, 3]].any()


def test_attention_is_causal():
    attn = CausalSelfAttention(8, 2, seed=0, std=0.5, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(1, 5, 8))
    y = attn(x)
    x2 = x.copy()
    x2[0, 3:] += 10.0  # change the future of positions 0..2
    y2 = attn(x2)
    assert np.array_equal(y[0, :3], y2[0, :3]) and not np.allclose(y[0, 3:], y2[0, 3:])
    assert np.allclose(attn.probs.sum(-1), 1) and np.all(np.triu(attn.probs[0, 0], 1) == 0)


def test_cached_forward_equals_full_forward():
    model = TransformerLM(TINY, seed=2, dtype=np.float64)
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 6))
    full = model(ids)
    cache = KVCache(TINY.n_layers)
    parts = [model.forward_cached(ids[:, :2], cache)]
    parts += [model.forward_cached(ids[:, i:i + 1], cache) for i in range(2, 6)]
    assert np.allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length(0) == 6 and cache.keys(1).shape == (2, 2, 6, 4)
    assert cache.nbytes == 2 * 2 * (2 * 2 * 6 * 4) * 8


def test_generate_greedy_and_sampled_are_deterministic():
    model = load_lm().model
    a = generate(model, b"The ", 20)
    assert a == generate(model, b"The ", 20) and len(a) == 20
    s1 = generate(model, b"The ", 20, temperature=1.0, seed=3)
    assert s1 == generate(model, b"The ", 20, temperature=1.0, seed=3)
    # greedy through the cache is the argmax of the full forward, byte by byte
    ids = np.frombuffer(b"The " + a, np.uint8).astype(np.int64)[None, :]
    logits = model(ids[:, :-1])
    assert bytes(np.argmax(logits[0, 3:], axis=-1).astype(np.uint8)) == a
    assert generate(model, b"The ", 20, use_cache=False) == a
    with pytest.raises(ValueError, match="cache= needs use_cache=True"):
        generate(model, b"The ", 2, cache=KVCache(2), use_cache=False)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(prompt="text", n=3), TypeError, "prompt must be bytes"),
    (dict(prompt=b"", n=3), ValueError, "prompt must not be empty"),
    (dict(prompt=b"x", n=500), ValueError, "exceeds the context"),
    (dict(prompt=b"x", n=-1), ValueError, "n must be"),
    (dict(prompt=b"x", n=2, temperature=float("nan")), ValueError, "temperature"),
])
def test_generate_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        generate(TransformerLM(TINY._replace(max_len=16)), **kwargs)


def test_model_rejects_bad_ids():
    model = TransformerLM(TINY)
    with pytest.raises(TypeError, match="ids must have an integer dtype"):
        model(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"byte values in \[0, 255\]"):
        model(np.array([[1, 256]]))
    with pytest.raises(ValueError, match="more than the model's context"):
        model(np.zeros((1, 7), dtype=np.int64))
    with pytest.raises(ValueError, match="must be a multiple of n_heads"):
        CausalSelfAttention(10, 3)
    with pytest.raises(TypeError, match="config must be a qcourse.nn.LMConfig"):
        TransformerLM((8, 2, 2, 16, 6))


def test_text_split_by_topic():
    held, train = pydoc_topics("heldout"), pydoc_topics("train")
    assert held == pydoc_topics("all")[0::8] and not set(held) & set(train)
    assert sorted(held + train) == pydoc_topics("all")
    a, h, t = (load_pydoc_text(s) for s in ("all", "heldout", "train"))
    assert len(h) + len(t) == len(a) and 0.05 < len(h) / len(a) < 0.12
    from pydoc_data.topics import topics
    assert topics[held[0]].encode() in h and topics[held[0]].encode() not in t
    assert len(pydoc_text_digest()) == 64
    with pytest.raises(ValueError, match="split must be one of"):
        pydoc_topics("test")


def test_windows_predict_every_byte_once():
    w = lm_windows(b"abcdefghij", 3)
    assert w.tolist() == [[97, 98, 99, 100], [100, 101, 102, 103], [103, 104, 105, 106]]
    targets = w[:, 1:].ravel()
    assert bytes(targets.astype(np.uint8)) == b"bcdefghij"
    r = random_windows(b"abcdefghij", 3, 5, np.random.default_rng(0))
    assert r.shape == (5, 4) and np.all(np.diff(r, axis=1) == 1)
    with pytest.raises(ValueError, match="length=3 needs data of at least 4 bytes, got 2"):
        lm_windows(b"ab", 3)


def test_evaluate_uniform_model_is_eight_bits_per_byte():
    model = TransformerLM(TINY)
    model.head.weight[...] = 0
    model.head.bias[...] = 0
    e = evaluate_lm(model, lm_windows(b"some text here", 5))
    assert math.isclose(e.bits_per_byte, 8.0, rel_tol=1e-12)
    assert math.isclose(e.perplexity, 256.0, rel_tol=1e-9) and e.n_bytes == 10


def test_linear_inputs_are_what_each_layer_sees():
    model = TransformerLM(TINY, seed=1)
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 6))
    got = linear_inputs(model, ids, batch_size=2)
    assert [n for n, _ in model.named_linears()] == list(got)
    blk = model.blocks[1]
    model(ids)
    fc2_in = blk.mlp.act(blk.mlp.fc1(got["blocks.1.mlp.fc1"]))
    assert np.array_equal(got["blocks.1.mlp.fc2"], fc2_in)
    assert got["blocks.0.attn.qkv"].shape == (18, 8) and got["blocks.0.mlp.fc2"].shape == (18, 16)
    assert all(not m._forward_pre_hooks for _, m in model.named_linears())
    with pytest.raises(ValueError, match="linear layers are"):
        linear_inputs(model, ids, layers=["blocks.0.nope"])


def test_replace_linears_and_copy():
    model = TransformerLM(TINY, seed=1)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 6))
    before = model(ids)
    twin = model.copy()
    seen = []
    twin.replace_linears(lambda name, lin: seen.append(name) or lin, include_head=True)
    assert seen == [n for n, _ in model.named_linears(include_head=True)]
    twin.blocks[0].attn.qkv.weight[...] = 0
    assert np.array_equal(model(ids), before) and not np.allclose(twin(ids), before)
    with pytest.raises(TypeError, match="must return a qcourse.nn.Module"):
        twin.replace_linears(lambda name, lin: None)


def test_training_is_deterministic_and_learns():
    text = load_pydoc_text("train")[:20000]
    runs = []
    for _ in range(2):
        model = TransformerLM(TINY._replace(max_len=16), seed=0)
        hist = train_lm(model, text, steps=30, batch_size=8, lr=1e-2, warmup=5, progress=False)
        runs.append((model.state_dict(), hist["loss"]))
    (s1, l1), (s2, l2) = runs
    assert l1 == l2 and all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert l1[-1] < l1[0] - 1.0, "thirty steps must lower the loss"


def test_state_dict_round_trip_and_mismatch():
    a, b = TransformerLM(TINY, seed=1), TransformerLM(TINY, seed=2)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a.named_parameters(),
                                                              b.named_parameters(), strict=True))
    state = a.state_dict()
    state.pop("head.bias")
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        b.load_state_dict(state)


# --------------------------------------------------------------------------- the shipped model


def test_shipped_model_matches_its_record():
    trained = load_lm()
    t = trained.training
    assert trained.model.config == t.config and t == LMTraining()
    assert 2e5 < trained.model.num_parameters() < 1e6
    assert trained.meta["text_sha256"] == pydoc_text_digest() or pytest.skip(
        "this Python's pydoc_data text differs from the one the model was trained on")
    # the last probe was measured on the stored (float16-rounded) weights
    probe = lm_windows(load_pydoc_text("heldout")[:t.probe_bytes + 1], t.config.max_len)
    bpb = evaluate_lm(trained.model, probe).bits_per_byte
    assert bpb == trained.history["probe_heldout_bpb"][-1]
    full = evaluate_lm(trained.model, lm_windows(load_pydoc_text("heldout"), t.config.max_len))
    assert full.bits_per_byte == trained.history["heldout_bpb"][0]
    assert full.bits_per_byte < 3.0
    assert len(trained.history["train_loss"]) == t.steps


def test_short_run_repeats_the_shipped_training():
    """The first steps of the shipped training, re-run, give the losses the file recorded."""
    trained = load_lm()
    if trained.meta["text_sha256"] != pydoc_text_digest():
        pytest.skip("this Python's pydoc_data text differs from the one the model was trained on")
    t = trained.training
    model = TransformerLM(t.config, seed=t.seed)
    steps = 3  # inside the warm-up, the learning rate does not depend on the total steps
    assert steps < t.warmup
    hist = train_lm(model, load_pydoc_text("train"), steps=steps, batch_size=t.batch_size,
                    lr=t.lr, warmup=t.warmup, clip=t.clip, seed=t.seed, progress=False)
    np.testing.assert_allclose(hist["loss"], trained.history["train_loss"][:steps], rtol=1e-6)


def test_save_load_round_trip_is_byte_stable(tmp_path):
    model = TransformerLM(TINY, seed=3)
    from qcourse.nn import TrainedLM

    rec = TrainedLM(model, LMTraining(config=TINY, steps=1),
                    {"train_loss": np.array([1.0])}, {"python": "x"})
    save_lm(tmp_path / "a.npz", rec)
    save_lm(tmp_path / "b.npz", rec)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = load_lm(tmp_path / "a.npz")
    assert back.training == rec.training and back.meta == rec.meta
    for (n, p), (_, q) in zip(model.named_parameters(), back.model.named_parameters(),
                              strict=True):
        assert np.array_equal(p.astype(np.float16).astype(np.float32), q), n


@pytest.mark.skipif(os.environ.get("QCOURSE_RETRAIN_LM") != "1",
                    reason="the full training takes minutes: set QCOURSE_RETRAIN_LM=1")
def test_full_training_reproduces_the_shipped_file(tmp_path):
    from qcourse.data.make_lm import compare, main

    out = tmp_path / "lm.npz"
    assert main(["--out", str(out), "--quiet"]) == 0
    assert compare(out, Path(str(shipped_lm_path()))) == []
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(Path(str(shipped_lm_path())).read_bytes()).hexdigest()


def test_make_lm_short_run_and_check(tmp_path, capsys):
    from qcourse.data.make_lm import main

    out = tmp_path / "short.npz"
    assert main(["--steps", "2", "--out", str(out), "--quiet", "--check"]) == 1
    text = capsys.readouterr().out
    assert "differs from the shipped file" in text and "settings differ" in text
    assert load_lm(out).training.steps == 2
    trained = train_reference_lm(LMTraining(config=TINY._replace(max_len=16), steps=2,
                                            probe_every=1, probe_bytes=64), progress=False)
    assert trained.history["probe_steps"].tolist() == [0, 1, 2]
