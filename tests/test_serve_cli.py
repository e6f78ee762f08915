"""``python -m feedsr.serve score`` on a trained checkpoint: the scores are the model's own, and bad
request files are refused by name."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, compose, tiny_overrides
from feedsr.data.batch import collate
from feedsr.data.reader import ReadSpec, open_file, read_block, split_files
from feedsr.eval.trained import load_trained
from feedsr.train.trainer import run

ROWS = 12


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_cli")
    overrides = tiny_overrides(synthetic_dir, root, "run") + ["trainer.max_steps=30", "trainer.checkpoint_every=30",
                                                              "optimizer.lr=0.01"]
    return run(compose(overrides)).run_dir


def valid_rows(synthetic_dir: Path) -> pa.Table:
    return pq.read_table(split_files(synthetic_dir, "valid")[0]).slice(0, ROWS)


def requests_from(rows: pa.Table, spec) -> pa.Table:
    """Per row: the history is every impression but the last; the candidates are the last
    impression (first) and two more made-up posts."""
    lists = [c for c in rows.column_names if pa.types.is_list(rows.schema.field(c).type)]
    rng = np.random.default_rng(0)
    columns = {"member_id": rows["member_id"]}
    for name in lists:
        columns[name] = pa.array([v[:-1] for v in rows[name].to_pylist()], type=rows.schema.field(name).type)
    columns["request_time"] = pa.array([v[-1] for v in rows["timestamps"].to_pylist()], pa.int64())
    numbers = [f"dense_{c}" for c in spec.read.dense] + [f"ctx_{c}" for c in spec.read.context]
    for name in spec.id_features + ["positions"] + numbers:
        last = [v[-1] for v in rows[name].to_pylist()]
        other = (rng.integers(0, 5, (len(last), 2)) if name not in numbers
                 else rng.random((len(last), 2)).astype(np.float32))
        columns[f"cand_{name}"] = pa.array([[x, *o] for x, o in zip(last, other.tolist())],
                                           type=rows.schema.field(name).type)
    table = pa.table(columns)
    return table.replace_schema_metadata(rows.schema.metadata)


def score_cli(checkpoint: Path, requests: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feedsr.serve", "score", "--checkpoint", str(checkpoint),
                           "--requests", str(requests), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True)


def test_cli_scores_are_the_models_own(trained_run, synthetic_dir, tmp_path):
    trained = load_trained(trained_run)
    rows = valid_rows(synthetic_dir)
    path = tmp_path / "requests.parquet"
    pq.write_table(requests_from(rows, trained.spec), path, row_group_size=5)  # 3 row groups
    done = score_cli(trained_run, path, tmp_path / "scores.parquet", "--batch-requests", "4")
    assert done.returncode == 0, done.stderr
    scores = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    assert scores["request"] == [r for r in range(ROWS) for _ in range(3)]
    assert scores["candidate"] == [0, 1, 2] * ROWS
    assert scores["member_id"] == [m for m in rows["member_id"].to_pylist() for _ in range(3)]
    # the first candidate is the row's last impression: its score is the model's forward on the row
    spec = trained.spec
    assert spec.read.dense and trained.model.dense_norm is not None  # the post token has dense features
    expected = forward_last(trained, rows, tmp_path / "rows.parquet")
    for k, task in enumerate(t.name for t in spec.tasks):
        got = np.array(scores[f"p_{task}"]).reshape(ROWS, 3)
        np.testing.assert_allclose(got[:, 0], expected[:, k], rtol=1e-4, atol=1e-6, err_msg=task)
        assert np.ptp(got[:, 0]) > 0  # a trained model: scores differ between members
    # the other methods give the same scores
    again = score_cli(trained_run, path, tmp_path / "masked.parquet", "--method", "masked")
    assert again.returncode == 0, again.stderr
    masked = pq.read_table(tmp_path / "masked.parquet")
    for task in (t.name for t in spec.tasks):
        np.testing.assert_allclose(masked[f"p_{task}"].to_numpy(), np.array(scores[f"p_{task}"]), rtol=1e-4, atol=1e-6)


def doubled(rows: pa.Table) -> pa.Table:
    """Each row's impressions twice, the copy an hour after the last: histories longer than the
    trained windows (63 impressions)."""
    columns = {}
    for name in rows.column_names:
        field = rows.schema.field(name)
        if not pa.types.is_list(field.type):
            columns[name] = rows[name]
            continue
        lists = rows[name].to_pylist()
        if name == "timestamps":
            lists = [v + [t - v[0] + v[-1] + 3600 for t in v] for v in lists]
        else:
            lists = [v + v for v in lists]
        columns[name] = pa.array(lists, field.type)
    return pa.table(columns).replace_schema_metadata(rows.schema.metadata)


def forward_last(trained, rows: pa.Table, path: Path, keep: int | None = None) -> np.ndarray:
    """The model's own forward on each row (its last ``keep`` impressions): the last impression's
    probabilities."""
    spec = trained.spec
    read = ReadSpec(spec.read.action_names, spec.read.categorical, spec.read.context, dense=spec.read.dense)
    pq.write_table(rows, path)
    block = read_block(open_file(path, read), 0, read)
    if keep is not None:
        block = block.truncate(keep)
    with torch.no_grad():
        logits = trained.model(collate(block, spec))
    return logits[torch.from_numpy(block.offsets[1:] - 1)].sigmoid().numpy()


def test_max_history_serves_histories_longer_than_trained(trained_run, synthetic_dir, tmp_path):
    from feedsr.serve.scorer import max_history

    trained = load_trained(trained_run)
    rows = doubled(valid_rows(synthetic_dir))
    lengths = [len(v) for v in rows["timestamps"].to_pylist()]
    assert max(lengths) > 64  # longer than the windows the model was trained on
    path = tmp_path / "requests.parquet"
    pq.write_table(requests_from(rows, trained.spec), path)
    tasks = [f"p_{t.name}" for t in trained.spec.tasks]

    def first_candidates(out: Path) -> np.ndarray:
        table = pq.read_table(out)
        return np.stack([table[t].to_numpy().reshape(ROWS, 3)[:, 0] for t in tasks], axis=1)

    assert score_cli(trained_run, path, tmp_path / "long.parquet", "--max-history", "1000").returncode == 0
    assert score_cli(trained_run, path, tmp_path / "cut.parquet").returncode == 0
    assert score_cli(trained_run, path, tmp_path / "short.parquet", "--max-history", "10").returncode == 0
    # RoPE: the whole history is served; by default (and with a shorter limit) the newest impressions
    full = forward_last(trained, rows, tmp_path / "rows.parquet")
    np.testing.assert_allclose(first_candidates(tmp_path / "long.parquet"), full, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first_candidates(tmp_path / "cut.parquet"),
                               forward_last(trained, rows, tmp_path / "rows.parquet", 64), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first_candidates(tmp_path / "short.parquet"),
                               forward_last(trained, rows, tmp_path / "rows.parquet", 11), rtol=1e-4, atol=1e-6)
    assert np.abs(first_candidates(tmp_path / "cut.parquet") - full).max() > 1e-4  # the limit matters
    # learned absolute positions stop at max_seq_len: a longer history is refused
    assert max_history(trained.model, 63, 1000) == 1000
    positions = torch.nn.Embedding(64, 1)
    trained.model.abs_positions = positions
    with pytest.raises(ValueError, match="learned positions for 64 tokens"):
        max_history(trained.model, 63, 64)
    assert max_history(trained.model, 63, 63) == 63 and max_history(trained.model, 63) == 63
    done = subprocess.run([sys.executable, "-m", "feedsr.serve", "score", "--exported", str(tmp_path), "--requests",
                           str(path), "--out", str(tmp_path / "x.parquet"), "--max-history", "5"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "--max-history goes to `export`" in done.stderr


def broken(table: pa.Table, how: str) -> pa.Table:
    if how == "missing":
        return table.drop_columns(["cand_author_ids"])
    if how == "early":
        times = table["request_time"].to_numpy().copy()
        times[7] = 0
        return table.set_column(table.schema.get_field_index("request_time"), "request_time", pa.array(times))
    if how == "uneven":
        lists = table["cand_positions"].to_pylist()
        lists[4] = lists[4][:2]
        return table.set_column(table.schema.get_field_index("cand_positions"), "cand_positions",
                                pa.array(lists, table.schema.field("cand_positions").type))
    if how == "no_dense":
        return table.drop_columns(["cand_dense_content_3"])
    if how in ("nan_dense", "inf_dense"):
        lists = table["cand_dense_content_5"].to_pylist()
        lists[6][2] = float("nan") if how == "nan_dense" else float("-inf")
        return table.set_column(table.schema.get_field_index("cand_dense_content_5"), "cand_dense_content_5",
                                pa.array(lists, table.schema.field("cand_dense_content_5").type))
    if how == "negative":
        lists = table["cand_author_ids"].to_pylist()
        lists[9][1] = -3
        return table.set_column(table.schema.get_field_index("cand_author_ids"), "cand_author_ids",
                                pa.array(lists, table.schema.field("cand_author_ids").type))
    raise ValueError(how)


@pytest.mark.parametrize("how,message", [
    ("missing", r"missing column 'cand_author_ids'"),
    ("early", r"row 7 \(of the file\): column 'request_time' \(0\) is before the history's last impression"),
    ("uneven", r"row 4 \(of the file\): column 'cand_positions' has 2 candidates but 'cand_\w+' has 3"),
    ("negative", r"row 9 \(of the file\): column 'cand_author_ids' has a negative id"),
    ("nan_dense", r"row 6 \(of the file\): column 'cand_dense_content_5' has a non-finite value"),
])
def test_bad_requests_are_refused_by_file_row_and_column(trained_run, synthetic_dir, tmp_path, how, message):
    trained = load_trained(trained_run)
    path = tmp_path / "bad.parquet"
    pq.write_table(broken(requests_from(valid_rows(synthetic_dir), trained.spec), how), path)
    done = score_cli(trained_run, path, tmp_path / "scores.parquet")
    assert done.returncode != 0
    assert str(path) in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "scores.parquet").exists()


def test_bad_dense_values_are_refused_by_column(trained_run, synthetic_dir, tmp_path):
    """Read in process (the reader of the CLI, which the test above runs): a request without a
    candidate dense column, a non-finite candidate value, and a history without a dense column."""
    from feedsr.data.schema import DataError
    from feedsr.serve.requests import read_requests

    trained = load_trained(trained_run)
    table = requests_from(valid_rows(synthetic_dir), trained.spec)
    path = tmp_path / "bad.parquet"
    pq.write_table(broken(table, "no_dense"), path)
    with pytest.raises(DataError, match=rf"{path}: missing column 'cand_dense_content_3' \(expected list<a float"):
        list(read_requests(path, trained.spec, 63))
    pq.write_table(broken(table, "inf_dense"), path)
    with pytest.raises(DataError, match=r"row 6 \(of the file\): column 'cand_dense_content_5' has a non-finite"):
        list(read_requests(path, trained.spec, 63))
    pq.write_table(table.drop_columns(["dense_content_0"]), path)
    with pytest.raises(DataError, match=r"missing column 'dense_content_0'"):
        list(read_requests(path, trained.spec, 63))


def test_a_candidates_dense_features_move_its_score(trained_run, synthetic_dir, tmp_path):
    """The trained model reads the candidates' dense features (the content embedding): changing
    one candidate's moves its scores, and only its."""
    from feedsr.serve.requests import read_requests
    from feedsr.serve.scorer import CandidateScorer

    trained = load_trained(trained_run)
    path = tmp_path / "requests.parquet"
    pq.write_table(requests_from(valid_rows(synthetic_dir), trained.spec), path)
    (requests,) = read_requests(path, trained.spec, 63)
    scorer, candidates = CandidateScorer(trained.model, trained.spec), requests.candidates
    base = scorer.score(requests.history, candidates)
    for name in (f"dense_{c}" for c in trained.spec.read.dense):
        assert candidates.values[name].dtype == np.float32
        values = {k: v.copy() for k, v in candidates.values.items()}
        values[name][4] += 1.5
        changed = scorer.score(requests.history, dataclasses.replace(candidates, values=values))
        others = [i for i in range(len(base)) if i != 4]
        torch.testing.assert_close(changed[others], base[others], rtol=0, atol=0)
        assert (changed[4] - base[4]).abs().max() > 1e-5, name


def test_a_checkpoint_that_is_not_one_is_refused(tmp_path):
    done = score_cli(tmp_path / "nothing", tmp_path / "r.parquet", tmp_path / "s.parquet")
    assert done.returncode != 0 and "neither a complete checkpoint nor a run directory" in done.stderr


def test_loaded_model_scores_without_its_dataset(trained_run, synthetic_dir):
    """The loader sizes the tables from the run's record; given the dataset it checks them."""
    from feedsr.data.config import ensure_dataset

    alone, checked = load_trained(trained_run), load_trained(trained_run, meta=ensure_dataset(
        load_trained(trained_run).config.data))
    assert dict(alone.spec.id_table_sizes) == dict(checked.spec.id_table_sizes)
    for (name, a), (_, b) in zip(alone.model.state_dict().items(), checked.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not alone.model.training


# ------------------------------------------------------------------ calibration


def test_isotonic_fit_pools_violators_and_ties():
    from feedsr.eval.calibration import CLIP, isotonic

    x, y = isotonic(np.array([0.4, 0.1, 0.3, 0.2, 0.3]), np.array([1, 1, 0, 0, 1]))
    # sorted: 0.1->1, 0.2->0, (0.3: 0 and 1 pooled as a tie) ->0.5, 0.4->1; 1 > 0 violates: 0.1..0.2 pool to 0.5,
    # then 0.5 >= 0.5 pools with the tie: one block 0.1..0.3 at 2/4, then 0.4 at 1
    np.testing.assert_allclose(x, [0.1, 0.3, 0.4, 0.4])
    np.testing.assert_allclose(y, [0.5, 0.5, 1 - CLIP, 1 - CLIP])
    rng = np.random.default_rng(0)
    preds = rng.random(5000)
    labels = rng.random(5000) < preds ** 2  # miscalibrated on purpose
    x, y = isotonic(preds, labels)
    assert (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()
    fitted = np.interp(preds, x, y)
    assert fitted.mean() == pytest.approx(labels.mean(), abs=1e-6)  # isotonic fits keep the base rate
    np.testing.assert_allclose(fitted, np.interp(preds, x, y))
    assert np.abs(fitted - preds ** 2).mean() < 0.05  # it recovers the true map


def test_calibrate_then_score_and_evaluate_with_it(trained_run, synthetic_dir, tmp_path):
    from feedsr.eval.calibration import Calibration

    path = tmp_path / "calibration.json"
    done = subprocess.run([sys.executable, "-m", "feedsr.serve", "calibrate", "--checkpoint", str(trained_run),
                           "--out", str(path)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calibration = Calibration.load(path)
    assert calibration.fitted_on["split"] == "valid" and calibration.fitted_on["impressions"] > 1000
    # scores with the calibration are the calibrated scores
    trained = load_trained(trained_run)
    requests = tmp_path / "requests.parquet"
    pq.write_table(requests_from(valid_rows(synthetic_dir), trained.spec), requests)
    assert score_cli(trained_run, requests, tmp_path / "raw.parquet").returncode == 0
    done = score_cli(trained_run, requests, tmp_path / "cal.parquet", "--calibration", str(path))
    assert done.returncode == 0, done.stderr
    tasks = [t.name for t in trained.spec.tasks]
    raw, cal = pq.read_table(tmp_path / "raw.parquet"), pq.read_table(tmp_path / "cal.parquet")
    raw_p = np.column_stack([raw[f"p_{t}"].to_numpy() for t in tasks]).astype(np.float64)
    cal_p = np.column_stack([cal[f"p_{t}"].to_numpy() for t in tasks])
    np.testing.assert_allclose(cal_p, calibration.apply(raw_p, tasks), rtol=1e-5, atol=1e-6)
    for k in range(len(tasks)):  # monotone: the ranking is kept (up to new ties)
        assert (np.diff(cal_p[np.argsort(raw_p[:, k], kind="stable"), k]) >= 0).all()
    # evaluate.py reports both; on the split it was fitted on the calibration ratio becomes 1
    out = tmp_path / "valid.json"
    done = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(trained_run), "--split",
                           "valid", "--calibration", str(path), "--out", str(out), "--history-buckets", "0", "10",
                           "30"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    # by history length: the targets of each bucket, counted here from the Parquet rows
    table = pa.concat_tables([pq.read_table(f, columns=["item_ids", "num_targets"])
                              for f in split_files(synthetic_dir, "valid")])
    lengths, num_targets = pc.list_value_length(table["item_ids"]).to_numpy(), table["num_targets"].to_numpy()
    index = np.concatenate([np.arange(n - t, n) for n, t in zip(lengths, num_targets)])
    expected = {"0-9": (index < 10).sum(), "10-29": ((index >= 10) & (index < 30)).sum(), "30+": (index >= 30).sum()}
    assert {b: m["click"]["count"] for b, m in report["by_history"].items()} == {
        b: int(n) for b, n in expected.items() if n}
    assert "AUC by history length: 0-9" in done.stdout
    for task in tasks:
        before, after = report["metrics"][task], report["calibrated"][task]
        assert after["calibration"] == pytest.approx(1.0, abs=1e-3)
        assert after["ne"] <= before["ne"] + 1e-9
    # a calibration without one of the model's tasks is refused by name
    record = json.loads(path.read_text())
    del record["tasks"]["like"]
    path.write_text(json.dumps(record))
    done = score_cli(trained_run, requests, tmp_path / "bad.parquet", "--calibration", str(path))
    assert done.returncode != 0 and "no map for task(s) ['like']" in done.stderr and str(path) in done.stderr


# ------------------------------------------------------------------ export


def run_bench(trained_run: Path, out: Path, *extra) -> dict:
    done = subprocess.run([sys.executable, "scripts/bench_serve.py", "--checkpoint", str(trained_run), "--history",
                           "100", "--candidates", "1", "5", "--threads", "1", "--repeats", "3", "--one-by-one-max",
                           "3", "--one-by-one-repeats", "1", "--json", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_bench_serve_measures_every_method_on_a_checkpoint(trained_run, tmp_path):
    (table,) = run_bench(trained_run, tmp_path / "bench.json")["tables"]
    rows = {(r["method"], r["candidates"]): r for r in table["rows"]}
    methods = ["one_by_one", "masked", "kv", "kv_cached", "kv_update"]
    assert sorted(rows) == sorted((m, n) for m in methods for n in (1, 5))
    for row in rows.values():
        assert row["max_abs_diff"] < 1e-5 and row["p99_ms"] >= row["p50_ms"] > 0 and row["gflop"] > 0
    assert rows["one_by_one", 5]["note"] == "timed on 3 of 5 candidates, x1.66667: extrapolated"
    # one by one runs the history once per candidate, the KV path once per request
    assert rows["one_by_one", 5]["gflop"] > 4 * rows["kv", 5]["gflop"]
    assert rows["kv_cached", 5]["gflop"] < rows["kv", 5]["gflop"] / 2  # the history is not encoded again
    assert table["matmul_peak_gflop_per_s"] > 0


# ------------------------------------------------------------------ export


def varied_requests(trained, synthetic_dir: Path) -> pa.Table:
    """Requests whose histories take every length from a doubled row (longer than trained, up to
    127) down to 1 impression (padded inside the exported runner), with 1..3 candidates."""
    table = requests_from(doubled(valid_rows(synthetic_dir)), trained.spec)
    lists = [c for c in table.column_names if pa.types.is_list(table.schema.field(c).type)]
    cut = {c: [v[:max(1, len(v) * (ROWS - 1 - i) // (ROWS - 1))] if not c.startswith("cand_") else v[:1 + i % 3]
               for i, v in enumerate(table[c].to_pylist())] for c in lists}
    for c in lists:
        table = table.set_column(table.schema.get_field_index(c), c, pa.array(cut[c], table.schema.field(c).type))
    lengths = [len(v) for v in cut["timestamps"]]
    assert min(lengths) == 1 and max(lengths) > 63
    return table


@pytest.fixture(scope="module")
def learned_time_run(synthetic_dir, tmp_path_factory) -> Path:
    """A run with SIREN-RoPE rotations (model.rope=learned_time): its rotation depends on time;
    and with the context's quantile bins (model.context_bins), fitted edges in its programs."""
    root = tmp_path_factory.mktemp("serve_cli_time")
    overrides = tiny_overrides(synthetic_dir, root, "time") + [
        "trainer.max_steps=10", "trainer.checkpoint_every=10", "optimizer.lr=0.01", "model.rope=learned_time",
        "model.context_bins=4"]
    return run(compose(overrides)).run_dir


@pytest.fixture(scope="module")
def attnmvp_run(synthetic_dir, tmp_path_factory) -> Path:
    """A run of the non-interleaved backbone (model.backbone=attnmvp), with time-aware RoPE."""
    root = tmp_path_factory.mktemp("serve_cli_attnmvp")
    overrides = tiny_overrides(synthetic_dir, root, "attnmvp") + [
        "trainer.max_steps=10", "trainer.checkpoint_every=10", "optimizer.lr=0.01", "model.backbone=attnmvp",
        "model.rope=time"]
    return run(compose(overrides)).run_dir


@pytest.mark.parametrize("run_fixture", ["trained_run", "learned_time_run", "attnmvp_run"])
def test_traced_programs_score_like_the_eager_model(run_fixture, synthetic_dir, tmp_path, request):
    """The export path without compiling: the programs as ``torch.export`` traces them (dynamic
    history length and candidate count), run by the exported runner on the request file's
    histories and candidates, dense features included, score like the eager scorer (for the
    learned time rotations and the attnmvp backbone too)."""
    from feedsr.serve.__main__ import sliced
    from feedsr.serve.export import export_meta, trace
    from feedsr.serve.exported import CANDIDATE_PROGRAM, HISTORY_PROGRAM, ExportedScorer
    from feedsr.serve.requests import read_requests
    from feedsr.serve.scorer import CandidateScorer

    trained = load_trained(request.getfixturevalue(run_fixture))
    if run_fixture == "learned_time_run":  # trained away from its start (plain RoPE), bins fitted
        assert trained.model.time_rotation.siren[-1].weight.abs().max() > 0
        edges = trained.model.context_bins.edges
        assert not torch.allclose(edges, torch.linspace(-3.0, 3.0, edges.shape[1]).expand_as(edges))
    programs = {name: p.module() for name, p in trace(trained, 127).items()}
    meta = export_meta(trained, 127)
    assert meta["dense"] == list(trained.spec.read.dense) and meta["dense"]
    runner = ExportedScorer.of_programs(meta, programs[HISTORY_PROGRAM], programs[CANDIDATE_PROGRAM])
    path = tmp_path / "requests.parquet"
    pq.write_table(varied_requests(trained, synthetic_dir), path)
    (requests,) = read_requests(path, runner.spec, 127)
    eager = CandidateScorer(trained.model, trained.spec)
    for i in range(ROWS):
        part = sliced(requests, i, i + 1)
        got = runner.score(runner.encode(part.history.values), part.candidates.values,
                           int(part.candidates.request_times[0]))
        want = eager.score(part.history, part.candidates).double().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"request {i}")
    # the candidates' dense features reach the traced program's scores
    part = sliced(requests, 4, 5)  # 1 + 4 % 3 = 2 candidates
    cache = runner.encode(part.history.values)
    values = dict(part.candidates.values)
    base = runner.score(cache, values, int(part.candidates.request_times[0]))
    values["dense_content_2"] = values["dense_content_2"] + 1.5
    moved = np.abs(runner.score(cache, values, int(part.candidates.request_times[0])) - base).max(axis=1)
    assert len(moved) == 2 and (moved > 1e-6).all(), moved


@pytest.mark.slow  # AOTInductor compiles two programs: minutes on 2 cores
@pytest.mark.parametrize("run_fixture,backbone,tokens", [("trained_run", "interleaved", 2),
                                                         ("attnmvp_run", "attnmvp", 1)])
def test_exported_programs_score_like_the_eager_model(run_fixture, backbone, tokens, synthetic_dir, tmp_path,
                                                      request):
    trained_run = request.getfixturevalue(run_fixture)
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "feedsr.serve", "export", "--checkpoint", str(trained_run),
                           "--out", str(out), "--max-history", "127"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "export.json").read_text())
    assert (meta["layers"], meta["max_history"], meta["trained_max_history"]) == (1, 127, 63)
    assert (meta["backbone"], meta["tokens_per_impression"]) == (backbone, tokens)
    trained = load_trained(trained_run)
    assert meta["dense"] == list(trained.spec.read.dense) and meta["dense"]  # the programs take dense features
    requests = tmp_path / "requests.parquet"
    pq.write_table(varied_requests(trained, synthetic_dir), requests)
    eager, exported = tmp_path / "eager.parquet", tmp_path / "exported.parquet"
    assert score_cli(trained_run, requests, eager, "--max-history", "127").returncode == 0
    done = subprocess.run([sys.executable, "-m", "feedsr.serve", "score", "--exported", str(out), "--requests",
                           str(requests), "--out", str(exported)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = pq.read_table(eager), pq.read_table(exported)
    assert a.column_names == b.column_names and a.num_rows == b.num_rows == sum(1 + i % 3 for i in range(ROWS))
    for name in a.column_names:
        np.testing.assert_allclose(b[name].to_numpy(), a[name].to_numpy(), rtol=0, atol=1e-5, err_msg=name)
    # the exported scorer runs without the model code
    check = ("import sys; from feedsr.serve.exported import ExportedScorer; "
             f"ExportedScorer({str(out)!r}); assert not [m for m in sys.modules if m.startswith('feedsr.model')]")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the benchmark's exported rows score like the eager model too
    (bench,) = run_bench(trained_run, tmp_path / "bench.json", "--exported", str(out))["tables"]
    exported_rows = [r for r in bench["rows"] if r["method"].startswith("exported")]
    assert len(exported_rows) == 4 and all(r["max_abs_diff"] < 1e-5 for r in exported_rows)
