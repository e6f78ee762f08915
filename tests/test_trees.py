"""The gradient-boosted-tree baseline: the impressions it reads are the neural models' targets, and
it learns from them (real LightGBM, real Parquet files)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from feedsr.data.batch import collate
from feedsr.data.config import batch_spec, ensure_dataset
from feedsr.data.reader import open_file, read_block, split_files
from feedsr.eval.trees import TreeConfig, fit_and_score, read_impressions
from feedsr.runtime.config import compose_config, to_config


def data_config(path, max_seq_len=64):
    return to_config(compose_config(["data=synthetic", f"data.path={path}", "data.generate=null",
                                     f"data.max_seq_len={max_seq_len}"])).data


@pytest.mark.parametrize("max_seq_len", [64, 5])
def test_impressions_are_the_target_impressions_the_models_see(synthetic_dir, max_seq_len):
    data = data_config(synthetic_dir, max_seq_len)
    spec = batch_spec(data, ensure_dataset(data))
    got = read_impressions(synthetic_dir, "valid", spec, max_seq_len)
    assert spec.read.dense  # the content embedding: numbers, after the context
    assert got.columns == ([f"ctx_{c}" for c in spec.read.context] + [f"dense_{c}" for c in spec.read.dense]
                           + [f"cat_{c}" for c in spec.read.categorical])
    # the same rows through the neural models' path: reader cut, collate, target mask
    expected_labels, expected_context, expected_dense, expected_true = [], [], [], []
    for path in split_files(synthetic_dir, "valid"):
        info = open_file(path, spec.read)
        for row_group in range(len(info.row_group_rows)):
            batch = collate(read_block(info, row_group, spec.read).truncate(max_seq_len), spec)
            expected_labels.append(batch.labels[batch.target_mask].numpy())
            expected_context.append(batch.context[batch.target_mask].numpy())
            expected_dense.append(batch.dense[batch.target_mask].numpy())
            expected_true.append(batch.true_probs[batch.target_mask].numpy())
    np.testing.assert_array_equal(got.labels, np.concatenate(expected_labels).astype(bool))
    c, e = len(spec.read.context), len(spec.read.dense)
    np.testing.assert_allclose(got.features[:, :c], np.concatenate(expected_context), rtol=1e-6)
    np.testing.assert_allclose(got.features[:, c:c + e], np.concatenate(expected_dense), rtol=1e-6)
    np.testing.assert_array_equal(got.true_probs, np.concatenate(expected_true))
    assert got.history.max() <= max_seq_len - 1 and (got.history >= 0).all()
    with_ids = read_impressions(synthetic_dir, "valid", spec, max_seq_len, ids=True)
    ids = [c for c in ("item_ids", "author_ids") if c in spec.id_table_sizes]
    assert ids and len(with_ids) == len(got)
    assert with_ids.columns[c + e:][:len(ids)] == ids
    assert not set(ids) & set(with_ids.categorical)  # thousands of levels: given as codes
    as_categories = read_impressions(synthetic_dir, "valid", spec, max_seq_len, ids=True, max_categories=10 ** 9)
    assert as_categories.categorical[:len(ids)] == ids
    np.testing.assert_array_equal(as_categories.features, with_ids.features)


def test_trees_learn_the_synthetic_tasks(synthetic_dir):
    data = data_config(synthetic_dir)
    spec = batch_spec(data, ensure_dataset(data))
    train = read_impressions(synthetic_dir, "train", spec, data.max_seq_len)
    valid = read_impressions(synthetic_dir, "valid", spec, data.max_seq_len)
    names = [t.name for t in spec.tasks]
    lines = []
    result = fit_and_score(train, valid, names, TreeConfig(threads=1, max_rounds=200), lines.append)
    assert len(lines) == len(names)
    for k, task in enumerate(names):
        m = result.metrics[task]
        assert m.count == len(valid) and m.oracle_auc is not None  # synthetic data knows the truth
        assert 0.5 < m.auc <= m.oracle_auc + 0.01, (task, m.auc, m.oracle_auc)
        assert ((result.preds[:, k] > 0) & (result.preds[:, k] < 1)).all()
        assert 1 <= result.rounds[task] <= 200
        assert sum(result.importance[task].values()) == pytest.approx(1.0)
    assert result.metrics["click"].auc > 0.55  # post quality and affinity are in the context features


def test_tree_config_refuses_bad_values():
    with pytest.raises(ValueError, match="bad value for num_leaves: 1"):
        TreeConfig(num_leaves=1)


def test_baseline_script_writes_its_figures(synthetic_dir, tmp_path):
    out = tmp_path / "trees.json"
    cmd = [sys.executable, "scripts/baseline_trees.py", "data=synthetic", f"data.path={synthetic_dir}",
           "data.generate=null", "data.max_seq_len=64", "--tasks", "click", "like", "--seeds", "0", "1",
           "--threads", "1", "--max-rounds", "50", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert set(result["runs"][0]["metrics"]) == {"click", "like"}
    by_history = result["runs"][0]["by_history"]
    assert sum(b["click"]["count"] for b in by_history.values()) == result["valid_impressions"]
    assert "AUC by history length: 0-9" in done.stdout
    assert "AUC" in done.stdout and "± " in done.stdout
    bad = subprocess.run(cmd[:5] + ["--tasks", "clicks"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown task(s) ['clicks']" in bad.stderr


def test_metrics_by_bucket_are_the_metrics_of_each_bucket():
    from feedsr.eval.metrics import metrics_by_bucket, task_metrics

    rng = np.random.default_rng(0)
    n = 3000
    preds = rng.random((n, 2))
    labels = rng.random((n, 2)) < preds
    true = np.full((n, 2), np.nan, np.float32)
    history = rng.integers(0, 60, n)
    got = metrics_by_bucket(["a", "b"], preds, labels, true, history, [0, 10, 50, 100, None])
    assert list(got) == ["0-9", "10-49", "50-99"]  # 100+ is empty: left out
    inside = (history >= 10) & (history < 50)
    expected = task_metrics("b", preds[inside, 1], labels[inside, 1], true[inside, 1])
    assert got["10-49"]["b"] == expected
    assert sum(m["a"].count for m in got.values()) == n
    with pytest.raises(ValueError, match="must increase"):
        metrics_by_bucket(["a"], preds, labels, true, history, [0, 10, 10])


def test_a_generated_dataset_without_the_configured_dense_features_is_refused(synthetic_dir, tmp_path):
    """data/synthetic generated before the content embedding existed: its dataset.json names no
    dense features, and the error says how to get them instead of failing on the first file."""
    import shutil

    from feedsr.data.schema import DataError

    old = tmp_path / "synthetic_old"
    shutil.copytree(synthetic_dir, old)
    meta = json.loads((old / "dataset.json").read_text())
    assert meta["dense"]  # today's data has them
    (old / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dense"}))
    data = to_config(compose_config(["data=synthetic", f"data.path={old}"])).data
    with pytest.raises(DataError, match=rf"{old}/dataset.json: the data has no dense feature\(s\) \['content_0'.*"
                                        rf"delete {old} and it is generated again"):
        ensure_dataset(data)
