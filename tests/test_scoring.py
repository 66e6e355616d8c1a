"""Batch inference (`pipeline predict MODEL DATA_SET --out OUT`): a Parquet data set of several files, an image
folder and a bucket, scored by the local engine and by Ray Data actors; refused inputs; failures midway.

Two models are trained in this process and registered in the session's SQLite store: the circles classifier
(a table model: columns x0, x1) and a small MNIST MLP (an image model: grayscale 28x28). The main cases run
through the command line as a user would; the rest call `score_data_set` in this process, on the session's
local Ray (ray_local) where they need Ray, so that Ray starts once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyarrow import fs

from pipeline import load_model
from pipeline.config import load_config
from pipeline.errors import BadInput
from pipeline.predict import predict_files
from pipeline.scoring import Scored, ScoringOptions, score_data_set
from pipeline.scoring_inputs import DataSet, find_data_set
from pipeline.serving import InputError
from pipeline.train import run_training
from tests.helpers import CONF_DIR, free_port, run_cli, start_s3, stop_group, tiny

CIRCLES, DIGITS = "scoring_circles@champion", "scoring_mlp@champion"
FILE_ROWS = (120, 80, 100)  # a Parquet data set of several files, of unequal sizes


@pytest.fixture(scope="module")
def models(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The two models, trained for seconds in this process and registered as champions."""
    storage = tmp_path_factory.mktemp("scoring-models")
    circles = ["name=scoring_circles", "scaling.num_workers=0", "train.epochs=2", "data.num_samples=300", f"data.root={storage}",
               f"storage_path={storage}"]  # fmt: skip
    digits = tiny(data_root, storage, "name=scoring_mlp", "scaling.num_workers=0", "model.hidden=[32]")
    for conf, overrides in (("circles_classifier.yaml", circles), ("mnist_mlp.yaml", digits)):
        result = run_training(load_config(CONF_DIR / conf, overrides))
        assert result.registration is not None and result.registration["alias"] == "champion"


@pytest.fixture(scope="module")
def points(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """points/part-{0,1,2}.parquet: an id, the features and a `label` column (a labelled set, as users have)."""
    folder = tmp_path_factory.mktemp("points")
    rng = np.random.default_rng(0)
    start = 0
    for i, rows in enumerate(FILE_ROWS):
        ids = [f"p{n:04d}" for n in range(start, start + rows)]
        table = pa.table({"id": ids, "x0": rng.uniform(-1.5, 1.5, rows), "x1": rng.uniform(-1.5, 1.5, rows), "label": ["?"] * rows})
        pq.write_table(table, folder / f"part-{i}.parquet")
        start += rows
    (folder / "_SUCCESS").write_text("")  # what Spark leaves beside its files: skipped
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder with a subfolder: 8-bit grayscale PNGs, and a few RGB and 16-bit ones (read as training does)."""
    folder = tmp_path_factory.mktemp("digits")
    (folder / "more").mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        image = (
            Image.fromarray(pixels.astype(np.uint16) * 257)
            if i % 10 == 3
            else Image.fromarray(pixels).convert("RGB" if i % 10 == 7 else "L")
        )
        image.save(folder / ("more" if i % 2 else ".") / f"digit{i:02d}.png")
    return folder


def _scored_table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out)  # a folder of parts: pyarrow reads them in name order


def _env() -> dict[str, str]:
    return dict(os.environ)  # MLFLOW_TRACKING_URI: the session's store (conftest)


# ---------------------------------------------------------------------------------------------------
# The main cases, through the command line


@pytest.mark.ray
def test_a_parquet_data_set_is_scored_row_for_row_with_its_ids_by_both_engines(models: None, points: Path, tmp_path: Path) -> None:
    local = run_cli("predict", CIRCLES, str(points), "--out", str(tmp_path / "local"), "--engine", "local", env=_env())
    assert local.returncode == 0, local.stderr
    ray = run_cli("predict", CIRCLES, f"{points}/*.parquet", "--out", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2",
                  "--batch-size", "64", env=_env())  # fmt: skip
    assert ray.returncode == 0, ray.stderr
    assert "300 rows in 1 Parquet file, model scoring_circles/1, engine ray, 2 actors" in ray.stdout
    assert "Traceback" not in ray.stderr and "Warning" not in ray.stderr

    inputs = pd.concat([pd.read_parquet(path) for path in sorted(points.glob("*.parquet"))], ignore_index=True)
    expected = load_model(CIRCLES).predict_table(inputs)
    for out in (tmp_path / "local", tmp_path / "ray"):
        scored = _scored_table(out)
        assert list(scored.columns) == ["id", "input_label", "class_index", "label", "probability"]  # the input's columns first
        assert scored["id"].tolist() == inputs["id"].tolist()  # every row once, in the files' order
        assert (scored["input_label"] == "?").all()  # a column named like a prediction is kept beside it
        assert scored["class_index"].tolist() == expected["class_index"].tolist()
        assert scored["label"].tolist() == expected["label"].tolist()
        # Equal to float32 rounding: a batch's rows go through the network together, and BLAS sums by batch shape.
        np.testing.assert_allclose(scored["probability"], expected["probability"], rtol=1e-6)
        metadata = pq.read_schema(next(out.glob("part-*.parquet"))).metadata
        assert metadata[b"pipeline.model"] == b"scoring_circles/1" and metadata[b"pipeline.model_ref"] == CIRCLES.encode()
    assert not list(tmp_path.glob(".*")), "no temporary folder is left beside OUT"


@pytest.mark.ray
def test_an_image_folder_is_scored_as_pipeline_predict_reads_each_file(models: None, digits: Path, tmp_path: Path) -> None:
    done = run_cli("predict", DIGITS, str(digits), "--out", str(tmp_path / "out"), "--engine", "ray", "--batch-size", "16", env=_env())
    assert done.returncode == 0, done.stderr
    scored = _scored_table(tmp_path / "out")
    files = sorted(str(path) for path in digits.rglob("*.png"))
    assert list(scored.columns) == ["path", "class_index", "label", "probability"]
    assert scored["path"].tolist() == files
    expected = predict_files(load_model(DIGITS), files)  # the files path: one image per file, read as training read them
    assert scored["class_index"].tolist() == expected["class_index"].tolist()
    np.testing.assert_allclose(scored["probability"], expected["probability"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Refused before any work: exit 2, nothing written


def test_bad_inputs_are_refused_naming_file_column_or_shape_and_nothing_is_written(
    models: None, points: Path, digits: Path, tmp_path: Path
) -> None:
    (tmp_path / "no_x1").mkdir()
    pq.write_table(pa.table({"id": [1], "x0": [0.5]}), tmp_path / "no_x1" / "a.parquet")
    (tmp_path / "big").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    cases = [
        (CIRCLES, str(tmp_path / "no_x1"), "no_x1/a.parquet: lacks the feature columns ['x1'] (it has ['id', 'x0'])"),
        (DIGITS, str(tmp_path / "big"), "big/a.png: images of shape (1, 32, 32): this model takes uint8 images"),
        (CIRCLES, str(tmp_path / "empty"), "empty: no Parquet files and no images"),
        (CIRCLES, f"{points}/*.csv", "*.csv: matches no file"),
        (DIGITS, str(points), "Parquet files, and this model takes images"),
        ("no_such_model@champion", str(points), "no registered model 'no_such_model'"),
        ("scoring_circles@best", str(points), "has no alias or version 'best'; aliases: champion (version 1)"),
    ]
    import ray  # imported only: whether a refusal started it

    ray_was_up = ray.is_initialized()  # the session's ray_local, where a Ray test ran before this one
    for ref, data, message in cases:
        with pytest.raises(BadInput) as refused:
            score_data_set(ref, _found(data), str(tmp_path / "out"), ScoringOptions(engine="ray"))
        assert message in str(refused.value), (data, str(refused.value))
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert ray.is_initialized() == ray_was_up, "every refusal came before Ray was started"
    taken = run_cli("predict", CIRCLES, str(points), "--out", str(tmp_path / "taken"), env=_env())
    assert taken.returncode == 2 and "--out" in taken.stderr and "already exists" in taken.stderr and "Traceback" not in taken.stderr
    no_out = run_cli("predict", CIRCLES, str(points), env=_env())
    assert no_out.returncode == 2 and "give --out FOLDER" in no_out.stderr
    files = run_cli("predict", CIRCLES, str(next(points.glob("*.parquet"))), "--engine", "ray", env=_env())
    assert files.returncode == 2 and "--engine ray: for a data set" in files.stderr


def _found(text: str) -> DataSet:
    """The data set `text` names; find_data_set's own refusals (nothing there, no match) raise here, as in the CLI."""
    found = find_data_set([text])
    assert found is not None
    return found


def test_a_data_set_is_a_folder_a_glob_or_a_uri_and_files_stay_files(points: Path, digits: Path) -> None:
    parquet = find_data_set([str(points)])
    assert parquet is not None and parquet.kind == "table" and [Path(p).name for p in parquet.paths] == ["part-0.parquet", "part-1.parquet",
                                                                                                           "part-2.parquet"]  # fmt: skip
    images = find_data_set([f"{digits}/**/*.png"])
    assert images is not None and images.kind == "images" and len(images.paths) == 40
    only_top = find_data_set([f"{digits}/*.png"])  # `*` stays within one folder, as in a shell
    assert only_top is not None and len(only_top.paths) == 20
    assert find_data_set([str(next(points.glob("*.parquet"))), "digit.png"]) is None  # files: predict.py's path, as before
    with pytest.raises(InputError, match=r"a data set .* is scored alone"):
        find_data_set([str(points), str(digits)])


# ---------------------------------------------------------------------------------------------------
# Failures midway: no OUT, no temporary folder


def _damaged_in_the_middle(tmp_path: Path, digits: Path) -> Path:
    folder = tmp_path / "damaged"
    folder.mkdir()
    for path in sorted(digits.rglob("*.png"))[:30]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "digit15.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a PNG")  # the first image is fine
    return folder


def test_a_file_damaged_in_the_middle_fails_the_local_engine_leaving_no_out(
    models: None, digits: Path, points: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=r"damaged/digit15.png: not an image that can be read"):
        score_data_set(
            DIGITS, _found(str(_damaged_in_the_middle(tmp_path, digits))), str(tmp_path / "out"), ScoringOptions("local", batch_size=8)
        )
    # A Parquet file whose footer is sound and whose first data page is not: only reading it shows that.
    (tmp_path / "pages").mkdir()
    for path in sorted(points.glob("*.parquet")):
        (tmp_path / "pages" / path.name).write_bytes(path.read_bytes())
    damaged = tmp_path / "pages" / "part-1.parquet"
    data = bytearray(damaged.read_bytes())
    offset = pq.read_metadata(damaged).row_group(0).column(1).data_page_offset
    data[offset : offset + 12] = b"\xff" * 12
    damaged.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"pages/part-1.parquet: damaged, it cannot be read to its end"):
        score_data_set(CIRCLES, _found(str(tmp_path / "pages")), str(tmp_path / "out"), ScoringOptions("local", batch_size=50))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "pages"], "no OUT, no temporary folder"


@pytest.mark.ray
def test_on_ray_a_damaged_file_or_a_bad_row_midway_exits_2_naming_it_and_leaves_no_out(
    models: None, ray_local, digits: Path, points: Path, tmp_path: Path
) -> None:
    folder = _damaged_in_the_middle(tmp_path, digits)
    done = run_cli("predict", DIGITS, str(folder), "--out", str(tmp_path / "out"), "--engine", "ray", "--batch-size", "4", env=_env())
    assert done.returncode == 2 and f"{folder}/digit15.png: not an image that can be read" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "nan").mkdir()
    table = pq.read_table(sorted(points.glob("*.parquet"))[0])
    x0 = table.column("x0").to_numpy().copy()
    x0[57] = np.nan
    pq.write_table(table.set_column(1, "x0", pa.array(x0)), tmp_path / "nan" / "a.parquet")
    with pytest.raises(InputError, match=r"the row with id='p0057', input_label='\?' holds a NaN"):  # named by its id, not its batch
        score_data_set(CIRCLES, _found(str(tmp_path / "nan")), str(tmp_path / "out"), ScoringOptions("ray", batch_size=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "nan"], "no OUT, no temporary folder"


# ---------------------------------------------------------------------------------------------------
# An object store: the same data set in an S3 bucket (moto's S3 server on 127.0.0.1)


@pytest.mark.ray
def test_a_data_set_in_a_bucket_is_scored_as_the_same_files_on_disk(
    models: None, ray_local, points: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server = start_s3(port, "data")
    try:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
                            "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        with pytest.raises(InputError, match=r"s3://data/: no Parquet files and no images .* \(found: nothing\)"):
            find_data_set(["s3://data/"])  # the bucket is empty yet
        s3, _ = fs.FileSystem.from_uri("s3://data/points/")
        for path in sorted(points.glob("*.parquet")):
            fs.copy_files(str(path), f"data/points/{path.name}", destination_filesystem=s3)
        found = _found("s3://data/points/*.parquet")
        assert found.paths == ("data/points/part-0.parquet", "data/points/part-1.parquet", "data/points/part-2.parquet")
        scored = score_data_set(CIRCLES, found, str(tmp_path / "out"), ScoringOptions("ray", batch_size=64))
    finally:
        stop_group(server)
    assert isinstance(scored, Scored) and scored.rows == sum(FILE_ROWS) and scored.engine == "ray"
    from_disk = score_data_set(CIRCLES, _found(str(points)), str(tmp_path / "disk"), ScoringOptions("local"))
    assert from_disk.rows == scored.rows
    on_disk, in_bucket = _scored_table(tmp_path / "disk"), _scored_table(tmp_path / "out")
    assert in_bucket["id"].tolist() == on_disk["id"].tolist()
    assert in_bucket["class_index"].tolist() == on_disk["class_index"].tolist()
