"""Metric functions of clip_jax.eval.metrics against independent numpy / scikit-learn code.

Sections follow the modules of the package: classification, neighbours, retrieval,
tip_adapter, linear_probe. Pure jittable functions run with and without jit (chex variants).
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from clip_jax.eval import metrics as M
from clip_jax.eval import schema


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ classification


class PureClassificationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_prompt_ensembling_matches_numpy(self):
        rng = np.random.default_rng(0)
        emb = rng.normal(size=(7, 5, 12)).astype(np.float32) * rng.uniform(0.5, 3, size=(7, 5, 1))
        got = self.variant(M.zero_shot_classifier)(emb)
        chex.assert_shape(got, (7, 12))
        chex.assert_type(got, jnp.float32)
        want = np.empty((7, 12))
        for c in range(7):
            per_template = [e / np.linalg.norm(e) for e in emb[c].astype(np.float64)]
            mean = np.mean(per_template, axis=0)
            want[c] = mean / np.linalg.norm(mean)
        chex.assert_trees_all_close(got, want, atol=1e-6)
        # Normalising each template first matters: it differs from averaging raw embeddings.
        raw = emb.mean(1)
        assert not np.allclose(got, _unit(raw), atol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_shot_logits_match_numpy(self):
        rng = np.random.default_rng(4)
        images = rng.normal(size=(10, 6)).astype(np.float32) * 3
        classifier = _unit(rng.normal(size=(4, 6))).astype(np.float32)
        got = self.variant(M.zero_shot_logits)(images, classifier)
        want = 100 * _unit(images.astype(np.float64)) @ classifier.astype(np.float64).T
        chex.assert_shape(got, (10, 4))
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)


def _numpy_scores(logits, labels):
    n, c = logits.shape
    top1 = top5 = 0
    per_class_hits, per_class_n = np.zeros(c), np.zeros(c)
    for i in range(n):
        order = sorted(range(c), key=lambda j: -logits[i, j])
        top1 += order[0] == labels[i]
        top5 += labels[i] in order[:5]
        per_class_n[labels[i]] += 1
        per_class_hits[labels[i]] += order[0] == labels[i]
    present = per_class_n > 0
    return top1 / n, top5 / n, np.mean(per_class_hits[present] / per_class_n[present])


def test_zero_shot_accuracy_and_per_class_recall_match_numpy():
    rng = np.random.default_rng(1)
    c, t, d, n = 9, 4, 16, 120
    text = rng.normal(size=(c, t, d)).astype(np.float32)
    classifier = M.zero_shot_classifier(text)
    labels = rng.integers(0, c - 1, size=n)  # class c-1 never occurs
    labels[:30] = 0  # unbalanced classes
    images = np.asarray(classifier)[labels] + rng.normal(size=(n, d)).astype(np.float32) * 0.9
    logits = np.asarray(M.zero_shot_logits(images, classifier))
    chex.assert_trees_all_close(
        logits,
        100 * _unit(images.astype(np.float64)) @ np.asarray(classifier, np.float64).T,
        rtol=1e-4,
        atol=1e-3,
    )
    got = M.classification_metrics(logits, labels, k=(1, 5))
    top1, top5, mpcr = _numpy_scores(logits, labels)
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)
    assert got["mean_per_class_recall"] == pytest.approx(mpcr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn notes that a never-seen class is predicted
        assert got["mean_per_class_recall"] == pytest.approx(
            balanced_accuracy_score(labels, logits.argmax(1))
        )
    assert got["num_examples"] == n
    assert 0 < got["top1"] < got["top5"] < 1


def test_classification_metrics_mask_and_few_classes():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [5.0, 0.0]])
    labels = np.array([1, 1, 1, 0])
    mask = np.array([True, True, True, False])  # last row is padding
    got = M.classification_metrics(logits, labels, k=(1, 5), mask=mask)
    assert got["top1"] == pytest.approx(2 / 3)
    assert got["top5"] == 1.0  # k > number of classes: everything is in the top k
    assert got["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert got["num_examples"] == 3


def test_classification_metrics_rejects_label_out_of_range():
    with pytest.raises(ValueError, match=r"label 7 is outside 0\.\.2"):
        M.classification_metrics(np.zeros((2, 3)), np.array([0, 7]))


def test_rank_classes_matches_numpy_argsort():
    rng = np.random.default_rng(6)
    images = _unit(rng.normal(size=(50, 8))).astype(np.float32)
    classifier = _unit(rng.normal(size=(7, 8))).astype(np.float32)
    want = np.argsort(-(images.astype(np.float64) @ classifier.T), axis=1, kind="stable")
    chex.assert_trees_all_equal(M.rank_classes(images, classifier, 3, query_block=16), want[:, :3])
    # k larger than the number of classes ranks every class.
    chex.assert_trees_all_equal(M.rank_classes(images, classifier, 10), want)


# ------------------------------------------------------------------ neighbours


def test_pad_rows():
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    chex.assert_trees_all_equal(M.pad_rows(x, 4), np.r_[x, np.zeros((1, 2), np.int32)])
    assert M.pad_rows(x, 3) is x
    chex.assert_shape(M.pad_rows(x[:0], 5), (5, 2))  # at least one block


class TopkOverKeysTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_running_top_k_matches_numpy(self):
        rng = np.random.default_rng(7)
        queries = rng.normal(size=(5, 4)).astype(np.float32)
        keys = rng.normal(size=(12, 4)).astype(np.float32)  # 3 blocks of 4; the last 2 rows pad
        fn = self.variant(M.topk_over_keys, static_argnames=("k", "key_block"))
        vals, idx = fn(queries, keys, np.int32(10), k=3, key_block=4)
        sims = queries.astype(np.float64) @ keys[:10].astype(np.float64).T
        want = np.argsort(-sims, axis=1, kind="stable")[:, :3]
        chex.assert_trees_all_equal(idx, want)
        chex.assert_trees_all_close(vals, np.take_along_axis(sims, want, axis=1), atol=1e-5)
        # Fewer keys than k: the missing slots are -inf / -1.
        vals, idx = fn(queries, keys, np.int32(2), k=3, key_block=4)
        assert np.all(np.asarray(idx)[:, 2] == -1) and np.all(np.isneginf(np.asarray(vals)[:, 2]))


# ------------------------------------------------------------------ retrieval


def _brute_force_recall(img, txt, t2i, ks):
    """Rank-based reference: a loop over queries, full similarity rows, numpy argsort."""
    img, txt = _unit(img.astype(np.float64)), _unit(txt.astype(np.float64))
    n, m = len(img), len(txt)
    out = {}
    i2t_rank = []
    for i in range(n):
        captions = [j for j in range(m) if t2i[j] == i]
        if not captions:
            continue
        order = list(np.argsort(-(txt @ img[i]), kind="stable"))
        i2t_rank.append(min(order.index(j) for j in captions))
    t2i_rank = []
    for j in range(m):
        order = list(np.argsort(-(img @ txt[j]), kind="stable"))
        t2i_rank.append(order.index(t2i[j]))
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(np.array(i2t_rank) < k))
        out[f"t2i_R@{k}"] = float(np.mean(np.array(t2i_rank) < k))
    return out


def _caption_data(seed, n=37, d=16, noise=1.6):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d)).astype(np.float32)
    counts = rng.integers(1, 6, size=n)  # 1..5 captions per image
    counts[3] = 0  # one image without a caption
    t2i = np.repeat(np.arange(n), counts)
    rng.shuffle(t2i)
    txt = img[t2i] + rng.normal(size=(len(t2i), d)).astype(np.float32) * noise
    return img, txt, t2i


def test_retrieval_recall_matches_brute_force_with_several_captions():
    img, txt, t2i = _caption_data(0)
    ks = (1, 5, 10)
    want = _brute_force_recall(img, txt, t2i, ks)
    got = M.retrieval_recall(img, txt, t2i, ks, query_block=8, key_block=16)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["num_images"] == len(img) - 1
    assert got["num_texts"] == len(txt)
    assert 0 < got["i2t_R@1"] < got["i2t_R@10"] <= 1  # the data is neither trivial nor hopeless


def test_blockwise_retrieval_equals_dense():
    img, txt, t2i = _caption_data(1, n=45)
    ks = (1, 2, 5, 10)
    dense = M.retrieval_recall(
        img, txt, t2i, ks, query_block=10_000, key_block=10_000
    )  # one block each
    for qb, kb in [(7, 5), (16, 64), (45, 3)]:
        blocked = M.retrieval_recall(img, txt, t2i, ks, query_block=qb, key_block=kb)
        chex.assert_trees_all_equal(blocked, dense)
    # Identical neighbour lists, not only identical recalls.
    a = M.ranked_neighbours(_unit(txt), _unit(img), 10, query_block=6, key_block=4)
    b = np.argsort(-(_unit(txt) @ _unit(img).T), axis=1, kind="stable")[:, :10]
    chex.assert_trees_all_equal(a, b)


def test_blockwise_retrieval_on_the_mesh_gives_the_same_numbers():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    img, txt, t2i = _caption_data(2)
    single = M.retrieval_recall(img, txt, t2i, query_block=8, key_block=16)
    sharded = M.retrieval_recall(img, txt, t2i, query_block=8, key_block=16, mesh=mesh)
    chex.assert_trees_all_equal(sharded, single)


def test_retrieval_with_fewer_keys_than_k():
    img = np.eye(3, 4, dtype=np.float32)
    txt = img[[0, 1, 2, 2]]
    got = M.retrieval_recall(img, txt, np.array([0, 1, 2, 2]), ks=(1, 10))
    assert got["i2t_R@1"] == 1.0 and got["t2i_R@10"] == 1.0
    idx = M.ranked_neighbours(img, img, 5)
    assert (idx[:, 3:] == -1).all()


def test_block_kernel_memory_does_not_grow_with_captions():
    """Compiled temp memory of the block function is the same for 1k and 64k captions."""
    q = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    temps = {}
    for m in (1024, 65536):
        keys = jax.ShapeDtypeStruct((m, 32), jnp.float32)
        compiled = M.topk_over_keys.lower(q, keys, jnp.int32(m), k=10, key_block=256).compile()
        temps[m] = compiled.memory_analysis().temp_size_in_bytes
    dense_bytes = 128 * 65536 * 4  # one dense [queries, captions] float32 block
    assert abs(temps[65536] - temps[1024]) <= 0.01 * temps[1024], temps
    assert temps[65536] < dense_bytes / 10, temps


def test_retrieval_rejects_bad_caption_index():
    img, txt = np.ones((3, 4)), np.ones((2, 4))
    with pytest.raises(
        ValueError, match=r"text_to_image holds 5; expected image indices in 0\.\.2"
    ):
        M.retrieval_recall(img, txt, np.array([0, 5]))
    with pytest.raises(ValueError, match="one per caption"):
        M.retrieval_recall(img, txt, np.array([0]))


# ------------------------------------------------------------------ Tip-Adapter


def _tip_data(seed, c=6, d=24, shots=4, n=90):
    rng = np.random.default_rng(seed)
    centers = _unit(rng.normal(size=(c, d)))
    clip_weights = _unit(centers + rng.normal(size=(c, d)) * 0.8).astype(np.float32)
    cache_y = np.repeat(np.arange(c), shots)
    cache_x = (centers[cache_y] + rng.normal(size=(len(cache_y), d)) * 0.5).astype(np.float32)
    y = rng.integers(0, c, size=n)
    x = (centers[y] + rng.normal(size=(n, d)) * 0.5).astype(np.float32)
    return x, y, cache_x, cache_y, clip_weights


class TipAdapterLogitsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_tip_adapter_logits_match_formula(self):
        x, _, cache_x, cache_y, w = _tip_data(0)
        keys, values = M.build_cache(cache_x, cache_y, 6)
        got = self.variant(M.tip_adapter_logits)(x, keys, values, w, 1.7, 5.5)
        f = _unit(x.astype(np.float64))
        ck = _unit(cache_x.astype(np.float64))
        onehot = np.eye(6)[cache_y]
        affinity = f @ ck.T
        want = 100.0 * f @ w.astype(np.float64).T + 1.7 * np.exp(-5.5 * (1.0 - affinity)) @ onehot
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-3)
        chex.assert_trees_all_equal(values, onehot)
        # The predictions are its row-wise argmax, whatever the chunking.
        pred = M.tip_adapter_predict(x, keys, values, w, 1.7, 5.5, chunk=16)
        chex.assert_trees_all_equal(pred, want.argmax(1))


def test_tip_adapter_search_matches_numpy_grid():
    x, y, cache_x, cache_y, w = _tip_data(1)
    keys, values = M.build_cache(cache_x, cache_y, 6)
    alphas = np.array([0.0, 0.5, 1.0, 3.0, 10.0], np.float32)
    betas = np.array([0.5, 2.0, 6.0], np.float32)
    got = M.tip_adapter_search(x, y, keys, values, w, alphas=alphas, betas=betas)
    f, ck, onehot = (
        _unit(x.astype(np.float64)),
        _unit(cache_x.astype(np.float64)),
        np.eye(6)[cache_y],
    )
    best = (-1.0, None, None)
    for b in betas:
        for a in alphas:
            logits = 100 * f @ w.T + a * np.exp(-b * (1 - f @ ck.T)) @ onehot
            acc = np.mean(logits.argmax(1) == y)
            if acc > best[0] + 1e-12:
                best = (acc, a, b)
    assert got["val_top1"] == pytest.approx(best[0])
    assert (got["alpha"], got["beta"]) == pytest.approx((best[1], best[2]))
    assert got["zero_shot_val_top1"] == pytest.approx(np.mean((f @ w.T).argmax(1) == y))


def test_sample_k_shot():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    idx = M.sample_k_shot(labels, 2, seed=3)
    assert len(idx) == 6 and np.all(np.bincount(labels[idx]) == 2)
    chex.assert_trees_all_equal(idx, M.sample_k_shot(labels, 2, seed=3))
    with pytest.raises(
        ValueError, match="class 1 has 3 training examples; 4-shot needs at least 4"
    ):
        M.sample_k_shot(labels, 4)


def test_default_tip_grid_is_the_papers():
    alphas, betas = M.default_tip_grid()
    assert len(alphas) == 20 and len(betas) == 200
    assert alphas[0] == pytest.approx(0.1) and betas[0] == pytest.approx(0.1)
    assert betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)


# ------------------------------------------------------------------ linear probe


def _probe_data(seed, n=400, d=12, c=4, noise=1.5):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ w + rng.normal(size=(n, c)) * noise, axis=1)
    return x, y


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_logistic_regression_matches_sklearn(c):
    x, y = _probe_data(0)
    w, b = M.fit_logistic_regression(x, y, 4, c)
    sk = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x.astype(np.float64), y)
    ours = x.astype(np.float64) @ w + b
    ours = np.exp(ours - ours.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    chex.assert_trees_all_close(ours, sk.predict_proba(x), atol=2e-3)
    assert np.mean(ours.argmax(1) == sk.predict(x)) >= 0.99


def test_linear_probe_protocol_matches_sklearn_sweep():
    x, y = _probe_data(1, n=700)
    tr, va, te = np.arange(0, 400), np.arange(400, 550), np.arange(550, 700)
    cs = (1e-4, 1e-2, 1.0, 100.0)
    got = M.linear_probe(x[tr], y[tr], x[va], y[va], x[te], y[te], c_values=cs)

    val_acc = {}
    for c in cs:
        model = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x[tr], y[tr])
        val_acc[c] = model.score(x[va], y[va])
    best = max(sorted(cs), key=lambda c: (val_acc[c], -c))
    final = LogisticRegression(C=best, max_iter=5000, tol=1e-8).fit(
        x[np.r_[tr, va]], y[np.r_[tr, va]]
    )
    assert got["best_C"] == best
    assert got["val_top1"] == pytest.approx(val_acc[best])
    assert abs(got["top1"] - final.score(x[te], y[te])) <= 1 / len(te) + 1e-9
    assert got["num_train"] == 400 and got["num_val"] == 150 and got["num_test"] == 150
    assert set(got["val_top1_by_C"]) == {f"{c:.6g}" for c in cs}


def test_linear_probe_refine_and_carved_validation():
    x, y = _probe_data(2, n=300)
    got = M.linear_probe(
        x[:240], y[:240], None, None, x[240:], y[240:], c_values=(1e-3, 1.0, 1e3), refine_steps=1
    )
    assert got["num_train"] == 192 and got["num_val"] == 48
    assert len(got["val_top1_by_C"]) >= 4  # the refinement tried midpoints
    assert got["top1"] > 0.5


def test_logistic_regression_chunked_equals_one_chunk():
    x, y = _probe_data(3, n=250)
    w1, b1 = M.fit_logistic_regression(x, y, 4, 1.0)
    w2, b2 = M.fit_logistic_regression(x, y, 4, 1.0, chunk=64)  # 4 chunks, the last one padded
    chex.assert_trees_all_close((w1, b1), (w2, b2), atol=2e-3)


def test_default_c_values_are_the_papers_and_the_configs():
    chex.assert_trees_all_close(M.DEFAULT_C_VALUES, tuple(np.logspace(-6, 6, 13)), rtol=1e-12)
    assert schema.config_schema().linear_probe.c_values == M.DEFAULT_C_VALUES
