"""Property tests of the input contract (serving.Predictor, predict.predict_files, images.read_pixels).

Whatever array, image file or table a user hands a model, the answer is the one the model gives on the
same uint8 pixels or finite features, or an InputError that names what the model takes (and the file or
row at fault). Never another exception, never an answer for an input outside the contract.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline.config import load_config
from pipeline.data.store import materialize
from pipeline.images import ImageError, to_pixels
from pipeline.models import model_for
from pipeline.predict import predict_files
from pipeline.serving import InputError, Predictor, build_predictor
from tests.helpers import CONF_DIR

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "float32", "float64", "bool")
FEATURES = ("x0", "x1")  # the circles model's columns
seeds = st.integers(0, 2**32 - 1)  # pixels from a seeded generator: whole images are too big to draw value by value


def _predictor(conf: str, *overrides: str) -> Predictor:
    """The conf's network with deterministic random weights (no training: the contract is about inputs)."""
    cfg = load_config(CONF_DIR / conf, ["data.download=false", *overrides])
    spec = materialize(cfg.data, cfg.seed)
    torch.manual_seed(0)
    return build_predictor(cfg, spec, model_for(cfg, spec).state_dict())


@pytest.fixture(scope="module")
def image_models(data_root: Path) -> dict[str, Predictor]:
    return {
        "mnist": _predictor("mnist_mlp.yaml", f"data.root={data_root}"),  # 1 channel, 28x28, never resized
        "cifar": _predictor("cifar10_resnet18.yaml", f"data.root={data_root}", "model.name=cnn"),  # 3 channels, 32x32
    }


@pytest.fixture(scope="module")
def circles(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return _predictor("circles_classifier.yaml", f"data.root={tmp_path_factory.mktemp('circles')}", "data.num_samples=200")


# ---------------------------------------------------------------------------------------------------
# 1. Arrays for image models


def accepted_shape(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> bool:
    """The contract's layouts, written out apart from serving.py: (N,C,H,W), (N,H,W,C), (N,H,W) for one
    channel, or any of them without N."""
    c, h, w = input_shape
    layouts = [(c, h, w), (h, w, c)] + ([(h, w)] if c == 1 else [])
    return any(shape == layout or shape[1:] == layout for layout in layouts)


def as_layout(nchw: np.ndarray, layout: str, single: bool) -> np.ndarray:
    """A uint8 NCHW batch in another accepted layout; `single`: its one image without N."""
    x = {"NCHW": nchw, "NHWC": nchw.transpose(0, 2, 3, 1), "NHW": nchw[:, 0]}[layout]
    return x[0] if single else x


def cast(x: np.ndarray, dtype: str, rng: np.random.Generator, non_finite: bool) -> np.ndarray:
    """Pixels as `dtype`, the way a user might hold them (0-255 or 0-1 floats), with NaN/inf if asked."""
    if dtype == "bool":
        return x > 127
    if dtype.startswith("float"):
        x = (x / 255.0 if rng.random() < 0.5 else x).astype(dtype)
        if non_finite and x.size:
            x.flat[rng.integers(0, x.size, size=3)] = rng.choice([np.nan, np.inf, -np.inf], size=3)
        return x
    return x.astype(dtype)


def memory(x: np.ndarray, fortran: bool, read_only: bool) -> np.ndarray:
    """The same values in the memory a caller may hand over: column-major, or a read-only view."""
    x = np.asfortranarray(x) if fortran else x.copy()
    x.setflags(write=not read_only)
    return x


def assert_names_the_images_contract(err: InputError, predictor: Predictor) -> None:
    c, h, w = predictor.input_shape
    assert "uint8" in str(err) and f"(N, {c}, {h}, {w})" in str(err) and f"(N, {h}, {w}, {c})" in str(err), str(err)


@st.composite
def layout_arrays(draw: st.DrawFn, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(x, the uint8 NCHW batch it stands for): an accepted layout, in any dtype and memory order."""
    c, h, w = input_shape
    rng = np.random.default_rng(draw(seeds))
    nchw = rng.integers(0, 256, size=(draw(st.integers(0, 3)), c, h, w), dtype=np.uint8)
    layout = draw(st.sampled_from(["NCHW", "NHWC", "NHW"] if c == 1 else ["NCHW", "NHWC"]))
    single = len(nchw) == 1 and draw(st.booleans())
    x = cast(as_layout(nchw, layout, single), draw(st.sampled_from(DTYPES)), rng, draw(st.booleans()))
    return memory(x, draw(st.booleans()), draw(st.booleans())), nchw


@st.composite
def near_shapes(draw: st.DrawFn, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A layout with one size changed, or an axis added or dropped: the mistakes users make."""
    c, h, w = input_shape
    shape = list(draw(st.sampled_from([(c, h, w), (h, w, c), (h, w), (c, w, h)])))
    if draw(st.booleans()):
        shape.insert(0, draw(st.integers(0, 3)))
    edit = draw(st.sampled_from(["size", "add", "drop"]))
    if edit == "size":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 40))
    elif edit == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    else:
        del shape[draw(st.integers(0, len(shape) - 1))]
    return tuple(shape)


@st.composite
def off_contract_arrays(draw: st.DrawFn, input_shape: tuple[int, ...]) -> np.ndarray:
    """Any dtype in a shape no layout accepts: random ranks 0-5 of small sizes, or near misses."""
    small = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)
    shape = draw((small | near_shapes(input_shape)).filter(lambda s: not accepted_shape(s, input_shape)))
    rng = np.random.default_rng(draw(seeds))
    x = cast(rng.integers(0, 256, size=shape, dtype=np.uint8), draw(st.sampled_from(DTYPES)), rng, draw(st.booleans()))
    return memory(x, draw(st.booleans()), draw(st.booleans()))


@pytest.mark.parametrize("name", ["mnist", "cifar"])
@SETTINGS
@given(data=st.data())
def test_an_array_in_an_accepted_layout_is_answered_as_its_uint8_nchw_batch_or_refused_for_its_dtype(
    image_models: dict[str, Predictor], name: str, data: st.DataObject
) -> None:
    predictor = image_models[name]
    x, nchw = data.draw(layout_arrays(predictor.input_shape))
    event(f"dtype {x.dtype}")
    if x.dtype != np.uint8:
        with pytest.raises(InputError) as refused:
            predictor.predict_table(x)
        assert f"dtype {x.dtype}" in str(refused.value)
        assert_names_the_images_contract(refused.value, predictor)
        return
    answer = predictor.predict_table(x)
    expected = predictor.predict_table(nchw)
    assert len(answer) == len(nchw) and answer.equals(expected), (x.shape, answer, expected)


@pytest.mark.parametrize("name", ["mnist", "cifar"])
@SETTINGS
@given(data=st.data())
def test_an_array_in_any_other_shape_is_refused_naming_the_layouts(
    image_models: dict[str, Predictor], name: str, data: st.DataObject
) -> None:
    predictor = image_models[name]
    x = data.draw(off_contract_arrays(predictor.input_shape))
    with pytest.raises(InputError) as refused:
        predictor.predict_table(x)
    assert_names_the_images_contract(refused.value, predictor)


def test_nested_lists_of_uneven_length_are_refused_naming_the_layouts(image_models: dict[str, Predictor]) -> None:
    predictor = image_models["mnist"]
    with pytest.raises(InputError) as refused:
        predictor.predict_table([np.zeros((28, 28), np.uint8), np.zeros((28, 27), np.uint8)])
    assert_names_the_images_contract(refused.value, predictor)


# ---------------------------------------------------------------------------------------------------
# 2. Image files


MODES = ("L", "RGB", "RGBA", "P", "LA", "I;16", "1")


def picture(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random Pillow image of `mode`, `size` (height, width)."""
    h, w = size
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, size=(h, w)).astype(bool))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    if mode == "P":
        image = Image.frombytes("P", (w, h), rng.integers(0, 256, size=h * w, dtype=np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
        return image
    bands = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,)}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(h, w, *bands), dtype=np.uint8))


def trained_pixels(image: Image.Image, channels: int) -> np.ndarray:
    """uint8 (C, H, W) as training's data was: Pillow's conversion of the 8-bit picture; 16 bits by /257."""
    if image.mode == "I;16":
        image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decoded(path: Path, fmt: str, mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """The picture a file holds: PNG keeps it exactly; a JPEG holds what it decodes to."""
    if fmt != "jpg":
        return picture(mode, size, np.random.default_rng(seed))
    with Image.open(path) as image:
        return image.copy()


@st.composite
def image_files(draw: st.DrawFn, input_shape: tuple[int, ...]) -> tuple[str, str, tuple[int, int], int]:
    """(mode, format, (height, width), seed): mostly the model's own size, sometimes any other."""
    mode = draw(st.sampled_from(MODES))
    own = (input_shape[1], input_shape[2])
    size = draw(st.sampled_from([own] * 5 + [None]))
    size = size or draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
    fmt = draw(st.sampled_from(["png", "jpg"])) if mode in ("L", "RGB") else "png"  # JPEG holds only 8-bit L and RGB
    return mode, fmt, size, draw(seeds)


@pytest.mark.parametrize("name", ["mnist", "cifar"])
@SETTINGS
@given(data=st.data())
def test_image_files_are_answered_as_their_trained_pixels_or_refused_naming_file_and_shapes(
    image_models: dict[str, Predictor], name: str, data: st.DataObject
) -> None:
    predictor = image_models[name]
    c, h, w = predictor.input_shape
    files = data.draw(st.lists(image_files(predictor.input_shape), min_size=1, max_size=3))
    with tempfile.TemporaryDirectory() as folder:
        paths: list[str] = []
        expected: list[np.ndarray] = []  # the pixels training would have made of each file of the model's size
        wrong: list[Path] = []  # files of another size
        for i, (mode, fmt, size, seed) in enumerate(files):
            path = Path(folder) / f"{i}-{mode.replace(';', '')}.{fmt}"
            picture(mode, size, np.random.default_rng(seed)).save(path)
            paths.append(str(path))
            if size == (h, w):
                expected.append(trained_pixels(decoded(path, fmt, mode, size, seed), c))
            else:
                wrong.append(path)
        event("a file of another size: refused" if wrong else "answered")
        if wrong:  # the model was trained on h x w and resizes nothing (data.image_size unset)
            with pytest.raises(InputError) as refused:
                predict_files(predictor, paths)
            assert str(wrong[0]) in str(refused.value)
            assert_names_the_images_contract(refused.value, predictor)
            return
        answer = predict_files(predictor, paths)
    reference = predictor.predict_table(np.stack(expected))
    assert answer["input"].tolist() == paths
    assert answer["class_index"].tolist() == reference["class_index"].tolist(), files
    np.testing.assert_allclose(answer["probability"], reference["probability"], rtol=1e-5)


@SETTINGS
@given(data=st.data())
def test_damaged_image_files_are_answered_or_refused_naming_the_file(image_models: dict[str, Predictor], data: st.DataObject) -> None:
    predictor = image_models["mnist"]
    mode, fmt, size, seed = data.draw(image_files(predictor.input_shape))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"damaged.{fmt}"
        picture(mode, size, np.random.default_rng(seed)).save(path)
        path.write_bytes(damage(path.read_bytes(), data))
        try:
            answer = predict_files(predictor, [str(path)])
        except InputError as err:
            assert str(path) in str(err)
            event("refused")
        else:
            assert len(answer) == 1
            event("answered")


def test_an_array_file_whose_header_claims_a_huge_shape_is_refused_not_allocated(circles: Predictor, tmp_path: Path) -> None:
    path = tmp_path / "points.npy"
    np.save(path, np.zeros((3, 2)))
    huge = b"(100000000000000, 2), }"  # 1.6 PB of float64, in a header of the same length
    path.write_bytes(path.read_bytes().replace(b"(3, 2), }".ljust(len(huge)), huge))
    with pytest.raises(InputError, match=r"points\.npy"):
        predict_files(circles, [str(path)])


def test_an_image_file_that_claims_a_decompression_bomb_size_is_refused_naming_the_file(
    image_models: dict[str, Predictor], tmp_path: Path
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (28, 28)).save(path)
    content = bytearray(path.read_bytes())
    header = struct.pack(">II", 30000, 30000) + bytes(content[24:29])  # IHDR: width, height, then depth, colour, ...
    content[16:33] = header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(content))
    with pytest.raises(InputError, match=r"bomb\.png"):
        predict_files(image_models["mnist"], [str(path)])


@pytest.mark.parametrize("mode", ["La", "LAB"])  # TIFF holds these; Pillow converts neither to grayscale
def test_an_image_mode_pillow_cannot_convert_is_an_image_error_naming_the_mode(mode: str) -> None:
    with pytest.raises(ImageError, match=mode):
        to_pixels(Image.new(mode, (4, 4)), 1)


# ---------------------------------------------------------------------------------------------------
# 3. Feature tables and arrays (the circles model: columns x0, x1)


SPECIAL = (np.nan, np.inf, -np.inf)
finite_values = st.floats(-1e6, 1e6, allow_nan=False)


def column_values(draw: st.DrawFn, kind: str, rows: int) -> pd.Series:
    """A column of `kind`: float64 (maybe NaN, inf or beyond float32), float32, int64, nullable Int64, bool, text."""
    if kind in ("float64", "float32"):
        specials = SPECIAL + ((1e300, -1e300) if kind == "float64" else ())
        values = draw(st.lists(finite_values | finite_values | st.sampled_from(specials), min_size=rows, max_size=rows))
        return pd.Series(values, dtype=kind)
    if kind == "Int64":
        values = draw(st.lists(st.one_of(st.integers(-1000, 1000), st.none()), min_size=rows, max_size=rows))
        return pd.Series(values, dtype="Int64")
    if kind == "int64":
        return pd.Series(draw(st.lists(st.integers(-(2**40), 2**40), min_size=rows, max_size=rows)), dtype="int64")
    if kind == "bool":
        return pd.Series(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=bool)
    return pd.Series(draw(st.lists(st.sampled_from(["a", "b", "1.5x"]), min_size=rows, max_size=rows)), dtype=object)


@st.composite
def feature_tables(draw: st.DrawFn, file_safe: bool = False) -> pd.DataFrame:
    """Mostly x0 and x1 among other columns, in any order; sometimes one missing or twice (not in files:
    Parquet refuses that); mostly number columns, some text or bool."""
    rows = draw(st.integers(0, 5))
    extra = draw(st.lists(st.sampled_from(["y", "x2"] if file_safe else ["y", "x2", *FEATURES]), max_size=2, unique=file_safe))
    names = draw(st.permutations([*draw(st.sampled_from([FEATURES] * 4 + [FEATURES[:1], FEATURES[1:]])), *extra]))
    number_kinds = ["float64", "float32", "int64", "Int64"]
    kinds = st.sampled_from(number_kinds * 4 + ["bool", "text"])
    columns = [column_values(draw, draw(kinds), rows) for _ in names]
    table = pd.concat(columns, axis=1) if columns else pd.DataFrame(index=range(rows))
    table.columns = names
    return table


def is_number_dtype(dtype: object) -> bool:
    """Integers and floats of NumPy, pandas or Arrow; text (object, str, Arrow string) and bool are not."""
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def problems(table: pd.DataFrame) -> list[str]:
    """What the contract says is wrong with `table` for x0, x1: words the InputError must name (one of them)."""
    names = list(table.columns)
    missing = [c for c in FEATURES if c not in names]
    if missing:
        return missing
    twice = [c for c in FEATURES if names.count(c) > 1]
    if twice:
        return twice
    # a header-only CSV reads as empty text columns: nothing in them is wrong
    not_numbers = [c for c in FEATURES if len(table) and not is_number_dtype(table[c].dtype)]
    if not_numbers:
        return not_numbers
    values = table[list(FEATURES)].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)).all(axis=1)
    return [f"row {int(np.argmax(bad))} "] if bad.any() else []


def features_of(table: pd.DataFrame) -> np.ndarray:
    return table[list(FEATURES)].to_numpy(dtype=np.float32)


@SETTINGS
@given(feature_tables())
def test_a_table_is_answered_from_its_feature_columns_or_refused_naming_the_columns_or_row(circles: Predictor, table: pd.DataFrame) -> None:
    wrong = problems(table)
    event(f"refused for {wrong[0].strip()}" if wrong else "answered")
    if wrong:
        with pytest.raises(InputError) as refused:
            circles.predict_table(table)
        assert any(word in str(refused.value) for word in wrong), (wrong, str(refused.value))
        return
    answer = circles.predict_table(table)
    assert len(answer) == len(table) and answer.equals(circles.predict_table(features_of(table)))


@SETTINGS
@given(feature_tables(file_safe=True), st.sampled_from([".csv", ".parquet"]))
def test_a_table_file_is_answered_or_refused_naming_the_file(circles: Predictor, table: pd.DataFrame, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"points{suffix}"
        table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path, index=False)
        try:  # what the file holds, as pandas reads it
            as_read = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        except pd.errors.EmptyDataError:  # no columns, no rows: an empty CSV file, refused as such
            as_read = None
        wrong = problems(as_read) if as_read is not None else [str(path)]
        event("answered" if not wrong else "an empty file: refused" if as_read is None else f"refused for {wrong[0].strip()}")
        if wrong:
            with pytest.raises(InputError) as refused:
                predict_files(circles, [str(path)])
            assert str(path) in str(refused.value) and any(word in str(refused.value) for word in wrong), str(refused.value)
            return
        answer = predict_files(circles, [str(path)])
    assert answer["input"].tolist() == [f"{path}:{row}" for row in range(len(table))]
    assert answer.drop(columns="input").equals(circles.predict_table(features_of(as_read)))


def damage(content: bytes, data: st.DataObject) -> bytes:
    """A truncated download, or a few flipped bytes."""
    damaged = bytearray(content)
    if not damaged or data.draw(st.booleans()):
        return bytes(damaged[: data.draw(st.integers(0, len(damaged)))])
    for at in data.draw(st.lists(st.integers(0, len(damaged) - 1), min_size=1, max_size=4)):
        damaged[at] ^= data.draw(st.integers(1, 255))
    return bytes(damaged)


@SETTINGS
@given(data=st.data(), suffix=st.sampled_from([".npy", ".csv", ".parquet"]))
def test_damaged_array_and_table_files_are_answered_or_refused_naming_the_file(
    circles: Predictor, data: st.DataObject, suffix: str
) -> None:
    rows = np.random.default_rng(data.draw(seeds)).normal(size=(data.draw(st.integers(0, 4)), 2))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"points{suffix}"
        table = pd.DataFrame(rows, columns=list(FEATURES))
        np.save(path, rows) if suffix == ".npy" else table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
        path.write_bytes(damage(path.read_bytes(), data))
        try:
            answer = predict_files(circles, [str(path)])
        except InputError as err:
            assert str(path) in str(err)
            event(f"{suffix} refused")
        else:
            event(f"{suffix} answered")
            assert len(answer) <= max(len(rows), 1) or suffix == ".csv"  # a flipped newline in a CSV may add a row


@st.composite
def feature_arrays(draw: st.DrawFn) -> np.ndarray:
    """(N, 2) or one row (2,), or any other small shape; any dtype (complex too), maybe NaN, inf or 1e300."""
    shape = draw(st.sampled_from([(2,)]) | st.tuples(st.integers(0, 5), st.just(2)) | hnp.array_shapes(min_dims=0, max_dims=4, max_side=4))
    dtype = draw(st.sampled_from([*DTYPES, "complex64"]))
    elements = {"bool": st.booleans(), "complex64": st.complex_numbers(max_magnitude=1e3, width=64)}.get(dtype)
    if elements is None and dtype.startswith("float"):
        itemsize = np.dtype(dtype).itemsize
        width: Literal[16, 32, 64] = 16 if itemsize == 2 else 32 if itemsize == 4 else 64
        big = (1e300,) if dtype == "float64" else ()
        elements = st.floats(-1e3, 1e3, width=width) | st.sampled_from(SPECIAL + big)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@SETTINGS
@given(feature_arrays())
def test_a_feature_array_is_answered_as_its_table_or_refused_naming_the_shape_dtype_or_row(circles: Predictor, x: np.ndarray) -> None:
    rows = x.reshape(1, 2) if x.shape == (2,) else x
    takes = rows.ndim == 2 and rows.shape[1] == 2 and (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating))
    event("answered" if takes else "refused for its shape or dtype")
    if not takes:
        with pytest.raises(InputError, match=r"\(N, 2\) finite numbers"):
            circles.predict_table(x)
        return
    values = rows.astype(np.float64)
    bad = ~(np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)).all(axis=1)
    if bad.any():
        with pytest.raises(InputError, match=f"row {int(np.argmax(bad))} "):
            circles.predict_table(x)
        return
    answer = circles.predict_table(x)
    as_table = circles.predict_table(pd.DataFrame(rows, columns=list(FEATURES)))
    # int64 -> float32 directly, or through float64 as a table's mixed columns go: the last bit may differ
    assert answer["class_index"].tolist() == as_table["class_index"].tolist()
    np.testing.assert_allclose(answer["probability"], as_table["probability"], rtol=1e-5)


def test_an_input_whose_output_overflows_is_refused_not_answered_with_nan(circles: Predictor) -> None:
    # Finite float32 features near the type's limit: the network's own arithmetic overflows.
    with pytest.raises(InputError, match=r"row 0: the model's output is not finite for this input"):
        circles.predict_table(np.array([[3e38, -3e38], [0.1, 0.2]], dtype=np.float32))
