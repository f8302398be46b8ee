"""Label formats in: label maps (PNG, TIFF), palette and colour-coded PNGs, class files, COCO
JSON; and TIFF images (16-bit, multi-channel), all on tiny files written here."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from cadsam.data import coco
from cadsam.data.coco import coco_image_size, coco_images, coco_labels, coco_mask
from cadsam.data.io import TIFF_PERCENTILES, read_image, rgb_array
from cadsam.data.labels import IGNORE, ClassTable, class_table, read_class_file, read_labels
from cadsam.errors import CadsamError

# pycocotools' decoder under numpy 2 (its own code, not cadsam's)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _table(count: int, ignore: int = 255, **kwargs) -> ClassTable:
    return ClassTable(tuple(f"c{i}" for i in range(count)), ignore, **kwargs)


def _pillow_shown(path) -> Image.Image:
    """The file as Pillow shows it: loaded (so its tags are read), then turned."""
    image = Image.open(path)
    image.load()
    return ImageOps.exif_transpose(image)


# ---- label maps ---------------------------------------------------------------------------


def test_palette_png_reads_as_its_indices_not_its_colours(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="L").convert("P")
    # colours unlike the indices: index 1 is drawn bright red, index 2 green
    image.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (253 * 3))
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    labels = read_labels(tmp_path / "p.png", _table(3))
    assert labels.dtype == np.int32
    assert labels.tolist() == indices.tolist()


def test_8_and_16_bit_png_label_maps_keep_their_values(tmp_path):
    eight = np.array([[0, 3], [7, 255]], dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "8.png")
    assert read_labels(tmp_path / "8.png", _table(8)).tolist() == [[0, 3], [7, IGNORE]]
    wide = np.array([[0, 256, 300], [1023, 65535, 9]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode in ("I;16", "I")  # Pillow: 16 bits, not 8
    labels = read_labels(tmp_path / "16.png", _table(1024, ignore=65535))
    assert labels.tolist() == [[0, 256, 300], [1023, IGNORE, 9]]


def test_tiff_label_maps_8_and_16_bit_and_whole_floats(tmp_path):
    wide = np.array([[0, 700, 2], [999, 1000, 1]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "l.tif", wide)
    labels = read_labels(tmp_path / "l.tif", _table(1000, ignore=1000))
    assert labels.tolist() == [[0, 700, 2], [999, IGNORE, 1]]
    tifffile.imwrite(tmp_path / "b.tiff", wide.astype(np.uint8) % 5)
    assert read_labels(tmp_path / "b.tiff", _table(5)).tolist() == (wide % 256 % 5).tolist()
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 2.0], [1.0, 255.0]], np.float32))
    assert read_labels(tmp_path / "f.tif", _table(3)).tolist() == [[0, 2], [1, IGNORE]]
    tifffile.imwrite(tmp_path / "g.tif", np.array([[0.0, 1.5]], np.float32))
    with pytest.raises(CadsamError, match=r"g\.tif has value 1\.5"):
        read_labels(tmp_path / "g.tif", _table(3))


def test_multi_channel_tiff_label_map_is_an_error(tmp_path):
    tifffile.imwrite(
        tmp_path / "m.tif",
        np.zeros((4, 5, 2), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    with pytest.raises(CadsamError, match=r"label map .*m\.tif has 2 channels"):
        read_labels(tmp_path / "m.tif", _table(3))


# each TIFF orientation (tag 274) as the shown array, by the TIFF 6.0 definitions of where the
# stored 0th row and 0th column go: e.g. 6, "RightTop", is the stored rows turned 90 degrees
# clockwise, and 5, "LeftTop", the transpose
SHOWN = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


def test_tiff_label_map_turns_by_its_orientation(tmp_path):
    values = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert SHOWN[6](values).tolist() == [[8, 4, 0], [9, 5, 1], [10, 6, 2], [11, 7, 3]]
    for turn, shown in SHOWN.items():
        tifffile.imwrite(tmp_path / "t.tif", values, extratags=[(274, "H", 1, turn, True)])
        assert read_labels(tmp_path / "t.tif", _table(12)).tolist() == shown(values).tolist()


def test_value_outside_the_table_names_file_and_value(tmp_path):
    Image.fromarray(np.array([[0, 1], [5, 255]], dtype=np.uint8)).save(tmp_path / "v.png")
    with pytest.raises(CadsamError) as caught:
        read_labels(tmp_path / "v.png", _table(3))
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "v.png") in message and "value 5" in message
    assert "0..2" in message and "ignore index 255" in message


def test_the_ignore_value_of_the_table_maps_to_ignore(tmp_path):
    values = np.array([[0, 4, 1], [4, 2, 0]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "i.png")
    labels = read_labels(tmp_path / "i.png", _table(3, ignore=4))
    assert labels.tolist() == np.where(values == 4, -1, values.astype(int)).tolist()
    with pytest.raises(CadsamError, match="value 4"):  # 4 is no class where 255 is ignored
        read_labels(tmp_path / "i.png", _table(3))


def test_grey_label_map_saved_as_rgb_reads_as_its_values(tmp_path):
    values = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "g.png")
    assert read_labels(tmp_path / "g.png", _table(3)).tolist() == [[0, 1], [2, IGNORE]]
    Image.fromarray(np.array([[[0, 0, 0], [9, 8, 7]]], np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(CadsamError, match=r"c\.png is in colour"):
        read_labels(tmp_path / "c.png", _table(3))


# ---- colour-coded masks and class files ---------------------------------------------------


COLOURED_YAML = """\
classes:
  - {name: background, colour: [0, 0, 0]}
  - {name: road, colour: [128, 64, 128]}
  - {name: car, colour: [128, 0, 128]}     # differs from road in green alone
  - {name: sky, colour: "#4682b4"}
ignore_colour: [255, 255, 255]
"""


def test_colour_coded_png_reads_by_the_class_file_colours(tmp_path):
    (tmp_path / "classes.yaml").write_text(COLOURED_YAML)
    table = read_class_file(tmp_path / "classes.yaml")
    assert table.colours[3] == (0x46, 0x82, 0xB4)
    palette = np.array(
        [[0, 0, 0], [128, 64, 128], [128, 0, 128], [70, 130, 180], [255, 255, 255]], np.uint8
    )
    expected = np.array([[0, 1, 2, 3], [4, 2, 1, 0], [3, 3, 2, 1]])
    Image.fromarray(palette[expected]).save(tmp_path / "m.png")
    labels = read_labels(tmp_path / "m.png", table)
    assert labels.tolist() == np.where(expected == 4, IGNORE, expected).tolist()
    rgba = np.dstack([palette[expected], np.full(expected.shape, 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")  # alpha dropped
    assert np.array_equal(read_labels(tmp_path / "a.png", table), labels)
    assert class_table(table.to_dict()) == table  # weights record it all


def test_unknown_colour_is_a_one_line_error_naming_file_and_colour(tmp_path):
    (tmp_path / "classes.yaml").write_text(COLOURED_YAML)
    table = read_class_file(tmp_path / "classes.yaml")
    pixels = np.zeros((3, 4, 3), np.uint8)
    pixels[2, 1] = (128, 64, 129)  # road's colour, one off in blue
    Image.fromarray(pixels).save(tmp_path / "u.png")
    with pytest.raises(CadsamError) as caught:
        read_labels(tmp_path / "u.png", table)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "u.png") in message and "[128, 64, 129]" in message
    assert "row 2, column 1" in message


def test_class_files_in_yaml_and_json_read_alike(tmp_path):
    (tmp_path / "c.yaml").write_text("classes: [background, road, car]\nignore_index: 11\n")
    record = {"classes": ["background", "road", "car"], "ignore_index": 11}
    (tmp_path / "c.json").write_text(json.dumps(record))
    from_yaml, from_json = (
        read_class_file(tmp_path / "c.yaml"),
        read_class_file(tmp_path / "c.json"),
    )
    assert from_yaml == from_json == ClassTable(("background", "road", "car"), 11)
    (tmp_path / "n.yaml").write_text("names: {0: a, 2: c, 1: b}\n")  # as YOLO data files have it
    assert read_class_file(tmp_path / "n.yaml").names == ("a", "b", "c")
    assert class_table(str(tmp_path / "c.json"), ignore_index=200).ignore_index == 200
    # 300 classes: the default ignore value 255 is a class, the one given is not
    with pytest.raises(CadsamError, match="classes: the ignore index 255 is class '255'"):
        class_table(300)
    assert class_table(300, ignore_index=65535).ignore_index == 65535
    (tmp_path / "many.yaml").write_text(f"classes: {list(range(300))}\n")
    assert read_class_file(tmp_path / "many.yaml", ignore_index=300).count == 300


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("ignore_index: 3\n", "has no 'classes:' list"),
        ("classes: []\n", "give 2 to 65535 classes, not 0"),
        ("classes: [a, b, c]\nignore_index: 1\n", "the ignore index 1 is class 'b'"),
        # a label file (8- or 16-bit) could not hold it, nor a predicted label map
        ("classes: [a, b]\nignore_index: -1\n", "ignore index must be 0 to 65535, a value"),
        ("classes: [a, b]\nignore_index: 65536\n", "not 65536"),
        ("classes: [a, b, a]\n", "class names repeat"),
        ("classes: {0: a, 2: b}\n", "number them 0..1"),
        ("classes: [a, b]\ncolours: [[0, 0, 0], [0, 0, 300]]\n", "a colour must be"),
        ("classes: [a, b]\ncolours: [[1, 2, 3], [1, 2, 3]]\n", "two classes share a colour"),
        ("classes: [a, b\n", "is not valid YAML"),
    ],
)
def test_class_file_errors_name_the_file(tmp_path, text, wanted):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(CadsamError) as caught:
        read_class_file(tmp_path / "bad.yaml")
    assert wanted in str(caught.value) and str(tmp_path / "bad.yaml") in str(caught.value)
    assert "\n" not in str(caught.value)


def test_json_class_file_errors(tmp_path):
    for name, record, wanted in [
        ("none.json", {"ignore_index": 3}, "has no 'classes:' list"),
        ("inside.json", {"classes": ["a", "b"], "ignore_index": 0}, "ignore index 0 is class"),
        ("repeat.json", {"classes": ["a", "a"]}, "class names repeat"),
    ]:
        (tmp_path / name).write_text(json.dumps(record))
        with pytest.raises(CadsamError, match=wanted) as caught:
            read_class_file(tmp_path / name)
        assert name in str(caught.value)
    (tmp_path / "broken.json").write_text('{"classes": ["a",')
    with pytest.raises(CadsamError, match=r"broken\.json is not valid JSON"):
        read_class_file(tmp_path / "broken.json")


# ---- COCO ---------------------------------------------------------------------------------

H, W = 8, 10
# a rectangle with corners on pixel corners: x 2..6, y 1..4 covers exactly the pixels of
# columns 2..5 and rows 1..3 (a pixel (row r, column c) is the square [c, c+1) x [r, r+1))
RECTANGLE = [2, 1, 6, 1, 6, 4, 2, 4]
RECTANGLE_PIXELS = (slice(1, 4), slice(2, 6))
# an uncompressed RLE counts runs down the columns (column-major), zeros first: rows 5..7 of
# column 8 are flat indices 8 * H + 5 .. 8 * H + 7
RLE_COUNTS = [8 * H + 5, 3, H * W - (8 * H + 8)]
RLE_PIXELS = (slice(5, 8), 8)


def _coco_file(tmp_path, annotations, name="coco.json", categories=None):
    record = {
        "images": [
            {"id": 1, "file_name": "train/a.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "annotations": annotations,
        "categories": categories
        or [{"id": 1, "name": "road"}, {"id": 2, "name": "car"}, {"id": 3, "name": "person"}],
    }
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return path


def _polygon(ann_id, category, polygon=RECTANGLE, image=1, crowd=0):
    return {"id": ann_id, "image_id": image, "category_id": category, "iscrowd": crowd,
            "segmentation": [polygon]}  # fmt: skip


def _rle(ann_id, category, counts, image=1, crowd=0):
    return {"id": ann_id, "image_id": image, "category_id": category, "iscrowd": crowd,
            "segmentation": {"size": [H, W], "counts": counts}}  # fmt: skip


BACKGROUND = ClassTable(("background", "road", "car", "person"))


def test_coco_polygon_and_rle_rasterise_to_the_hand_drawn_pixels(tmp_path):
    path = _coco_file(tmp_path, [_polygon(1, 1), _rle(2, 2, RLE_COUNTS)])
    expected = np.zeros((H, W), np.int32)
    expected[RECTANGLE_PIXELS] = 1
    expected[RLE_PIXELS] = 2
    labels = coco_labels(path, "a", BACKGROUND)
    assert labels.dtype == np.int32 and labels.shape == (H, W)
    assert np.array_equal(labels, expected)
    # inside the rectangle for sure, outside it for sure, and its area
    assert (labels[2, 3:5] == 1).all() and (labels[0] == 0).all() and (labels[:, 7] == 0).all()
    assert (labels == 1).sum() == (6 - 2) * (4 - 1)


def test_coco_compressed_rle_reads_as_the_mask_it_encodes(tmp_path):
    drawn = np.zeros((H, W), np.uint8)
    drawn[0:2, 0:3] = 1
    drawn[6, 1:9] = 1
    counts = mask_utils.encode(np.asfortranarray(drawn))["counts"].decode("ascii")
    path = _coco_file(tmp_path, [_rle(5, 3, counts)])
    assert np.array_equal(coco_labels(path, "a", BACKGROUND), drawn.astype(np.int32) * 3)


def test_coco_overlap_later_id_wins_and_crowds_are_ignored(tmp_path):
    left = [0, 0, 5, 0, 5, 8, 0, 8]  # columns 0..4
    right = [3, 0, 10, 0, 10, 8, 3, 8]  # columns 3..9
    crowd_rows = [0, 6, 10, 6, 10, 8, 0, 8]  # rows 6..7
    # listed out of id order: the id decides, not the list
    path = _coco_file(
        tmp_path,
        [_polygon(9, 1, left), _polygon(4, 2, right), _polygon(900, 3, crowd_rows, crowd=1)],
    )
    expected = np.zeros((H, W), np.int32)
    expected[:, 3:] = 2
    expected[:, :5] = 1  # id 9 over id 4
    labels = coco_labels(path, "a", BACKGROUND)
    assert np.array_equal(labels, expected)  # the crowd lies under both objects
    path = _coco_file(tmp_path, [_polygon(1, 1, left), _polygon(900, 3, crowd_rows, crowd=1)])
    expected = np.zeros((H, W), np.int32)
    expected[6:, :] = IGNORE
    expected[:, :5] = 1  # an object drawn over the crowd keeps its class
    assert np.array_equal(coco_labels(path, "a", BACKGROUND), expected)


def test_coco_unannotated_pixels_without_background_class_are_ignored(tmp_path):
    path = _coco_file(tmp_path, [_polygon(1, 2)])
    labels = coco_labels(path, "a", ClassTable(("road", "car", "person")))
    expected = np.full((H, W), IGNORE)
    expected[RECTANGLE_PIXELS] = 1
    assert np.array_equal(labels, expected)
    assert (coco_labels(path, "b", BACKGROUND) == 0).all()  # an image with no annotation


def test_coco_category_not_in_the_table_names_file_and_category(tmp_path):
    path = _coco_file(tmp_path, [_polygon(1, 3)])
    with pytest.raises(CadsamError, match=r"coco\.json: category 'person' is not in the class"):
        coco_labels(path, "a", ClassTable(("background", "road", "car")))


def test_coco_mask_for_one_named_category(tmp_path):
    path = _coco_file(tmp_path, [_polygon(1, 1), _rle(2, 2, RLE_COUNTS), _rle(3, 1, RLE_COUNTS)])
    expected = np.zeros((H, W), bool)
    expected[RECTANGLE_PIXELS] = True
    expected[RLE_PIXELS] = True
    road = coco_mask(path, "a", "road")
    assert road.dtype == bool and np.array_equal(road, expected)
    assert coco_mask(path, "a", "car").sum() == 3
    with pytest.raises(CadsamError, match=r"has no category 'bus': its categories are car, "):
        coco_mask(path, "a", "bus")


def test_coco_pairs_by_the_stem_of_file_name(tmp_path, capsys):
    path = _coco_file(tmp_path, [_polygon(1, 1)])
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / name)
    found = coco_images(images, path)
    assert {stem: image.name for stem, image in found.items()} == {"a": "a.png", "b": "b.png"}
    assert coco_image_size(path, "a") == (H, W) == read_image(found["a"]).shape[:2]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / "c.png")
    (images / "b.png").unlink()
    with pytest.raises(CadsamError) as caught:
        coco_images(images, path)
    message = str(caught.value)
    assert f"1 image(s) in {images} have no entry in {path}: c" in message
    assert f"1 image(s) of {path} are not in {images}: b" in message
    assert list(coco_images(images, path, skip_bad=True)) == ["a"]
    assert "cadsam: warning: skipped unpaired images:" in capsys.readouterr().err


def test_coco_file_is_parsed_once_until_it_changes(tmp_path, monkeypatch):
    path = _coco_file(tmp_path, [_polygon(1, 1)], name="once.json")
    loads = []
    real_load = json.load
    monkeypatch.setattr(coco.json, "load", lambda f: loads.append(1) or real_load(f))
    for stem in ("a", "b", "a"):
        coco_labels(path, stem, BACKGROUND)
    coco_mask(path, "a", "road")
    assert len(loads) == 1
    _coco_file(tmp_path, [_polygon(1, 2)], name="once.json")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert coco_labels(path, "a", BACKGROUND)[2, 3] == 2  # the new file, not the cached one
    assert len(loads) == 2


def test_coco_file_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(CadsamError, match=r"x\.json is no COCO file: it has no 'annotations'"):
        coco_labels(tmp_path / "x.json", "a", BACKGROUND)
    path = _coco_file(tmp_path, [_polygon(1, 1)], name="y.json")
    with pytest.raises(CadsamError, match=r"y\.json has no image named zzz"):
        coco_labels(path, "zzz", BACKGROUND)
    boxes = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]
    with pytest.raises(CadsamError, match="annotation 1 has no segmentation"):
        coco_labels(_coco_file(tmp_path, boxes, name="z.json"), "a", BACKGROUND)


# ---- TIFF images --------------------------------------------------------------------------


def test_16_bit_tiff_image_is_scaled_by_its_percentiles(tmp_path):
    values = np.random.default_rng(0).integers(0, 4000, (20, 30)).astype(np.uint16)
    values[0, 0], values[0, 1] = 65535, 0  # outliers the percentiles leave out
    tifffile.imwrite(tmp_path / "w.tif", values)
    low, high = np.percentile(values.astype(np.float64), TIFF_PERCENTILES)
    grey = np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    image = read_image(tmp_path / "w.tif")
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3)
    assert np.array_equal(image, np.stack([grey] * 3, -1))
    assert image[0, 0, 0] == 255 and image[0, 1, 0] == 0
    floats = values.astype(np.float32) / 7.0
    tifffile.imwrite(tmp_path / "f.tif", floats)
    assert np.abs(read_image(tmp_path / "f.tif").astype(int) - image).max() <= 1


@pytest.mark.parametrize(
    ("stored_as", "options"),
    [
        ("HWC", {"planarconfig": "contig"}),  # samples of each pixel together
        ("CHW", {"planarconfig": "separate"}),  # one plane a sample
        ("CHW", {}),  # one page a channel
        ("HWC", {}),  # read as 6 pages of 7 x 5: the shorter end axis is the channels
    ],
)
def test_five_channel_tiff_with_chosen_channels(tmp_path, stored_as, options):
    planes = np.random.default_rng(1).integers(0, 256, (5, 6, 7)).astype(np.uint8)
    stored = planes if stored_as == "CHW" else np.moveaxis(planes, 0, -1)
    tifffile.imwrite(tmp_path / "m.tif", stored, photometric="minisblack", **options)
    chosen = read_image(tmp_path / "m.tif", channels=(4, 0, 2))
    assert np.array_equal(chosen, np.stack([planes[4], planes[0], planes[2]], -1))
    assert np.array_equal(read_image(tmp_path / "m.tif"), np.moveaxis(planes[:3], 0, -1))
    assert np.array_equal(
        read_image(tmp_path / "m.tif", channels=(3,)), np.stack([planes[3]] * 3, -1)
    )
    with pytest.raises(
        CadsamError, match=r"m\.tif has 5 channel\(s\), 0..4: there is no channel 5"
    ):
        read_image(tmp_path / "m.tif", channels=(5, 0, 1))
    with pytest.raises(CadsamError, match="one or three channel numbers"):
        read_image(tmp_path / "m.tif", channels=(0, 1))


def test_wide_multi_channel_tiff_scales_the_chosen_channels_together(tmp_path):
    planes = np.random.default_rng(2).integers(0, 60000, (4, 5, 6)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", planes, photometric="minisblack", planarconfig="separate")
    chosen = np.stack([planes[3], planes[1], planes[0]], -1).astype(np.float64)
    low, high = np.percentile(chosen, TIFF_PERCENTILES)
    expected = np.clip(np.rint((chosen - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "s.tif", channels=(3, 1, 0)), expected)


def test_8_bit_tiff_reads_as_pillow_reads_it_turned_alike(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    for turn, shown in SHOWN.items():
        # compressed: Pillow 13 misreads an uncompressed single-strip TIFF turned by 5..8
        tifffile.imwrite(
            tmp_path / "r.tif", rgb, extratags=[(274, "H", 1, turn, True)], compression="zlib"
        )
        image = read_image(tmp_path / "r.tif")
        assert np.array_equal(image, shown(rgb)), turn
        assert np.array_equal(image, rgb_array(_pillow_shown(tmp_path / "r.tif"))), turn
    grey = rgb[..., 0]
    tifffile.imwrite(tmp_path / "g.tiff", grey)
    assert np.array_equal(read_image(tmp_path / "g.tiff"), np.stack([grey] * 3, -1))


def test_channels_choose_among_rgb_in_other_formats(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (3, 5, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(
        read_image(tmp_path / "c.png", channels=(1,)), np.stack([rgb[..., 1]] * 3, -1)
    )
    assert np.array_equal(read_image(tmp_path / "c.png", channels=(2, 1, 0)), rgb[..., ::-1])
    with pytest.raises(CadsamError, match="has 3 channel"):
        read_image(tmp_path / "c.png", channels=(3,))


def test_without_tifffile_8_bit_tiffs_read_and_wide_ones_name_the_extra(tmp_path, monkeypatch):
    rgb = np.random.default_rng(5).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "r.tif", rgb)
    tifffile.imwrite(tmp_path / "w.tif", np.arange(24, dtype=np.uint16).reshape(4, 6) * 1000)
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now fails
    assert np.array_equal(read_image(tmp_path / "r.tif"), rgb)
    with pytest.raises(
        CadsamError,
        match=r"w\.tif is a I;16\w* TIFF: reading it needs pip install 'cadsam\[labels\]'",
    ):
        read_image(tmp_path / "w.tif")
