"""COCO dataset reading: formats, class map, crowd, empty images, EXIF, flip, and every bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import ClassMap, CocoDataset, DatasetError, polygon_self_intersects
from maskrcnn.data.transforms import hflip
from tiny import uncompressed_rle
from maskrcnn.structures.masks import PolygonMasks


def _write_image(path, w=64, h=48, color=(200, 30, 30)):
    Image.new("RGB", (w, h), color).save(path)


def _rle(mask, compressed=True):
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}
    return uncompressed_rle(mask)


@pytest.fixture
def coco(tmp_path):
    """Three images (one without annotations), categories with non-contiguous ids, all formats."""
    for name in ("a.png", "b.png", "c.png"):
        _write_image(tmp_path / name)
    m = np.zeros((48, 64), dtype=bool)
    m[10:20, 30:50] = True
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64},
                   {"id": 2, "file_name": "b.png", "height": 48, "width": 64},
                   {"id": 7, "file_name": "c.png", "height": 48, "width": 64}],
        "categories": [{"id": 12, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 40, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 12, "bbox": [5, 5, 20, 10], "iscrowd": 0,
             "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
            {"id": 2, "image_id": 1, "category_id": 40, "bbox": [50, 30, 30, 30], "iscrowd": 0,  # crosses the border
             "segmentation": [[50, 30, 63, 30, 63, 47, 50, 47]]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [30, 10, 20, 10], "iscrowd": 0, "segmentation": _rle(m)},
            {"id": 4, "image_id": 2, "category_id": 12, "bbox": [30, 10, 20, 10], "iscrowd": 0,
             "segmentation": _rle(m, compressed=False)},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 1, "segmentation": _rle(m)},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def test_reads_polygons_rle_crowd_and_maps_categories(coco):
    path, _ = coco
    ds = CocoDataset(path, path.parent)
    assert ds.class_map.ids == [3, 12, 40] and ds.class_map.names == ["dog", "cat", "bird"]
    assert len(ds) == 3 and not ds.report
    img, t = ds[0]
    assert img.shape == (3, 48, 64) and img.dtype == torch.uint8
    assert t["labels"].tolist() == [2, 3]  # cat -> 2, bird -> 3
    torch.testing.assert_close(t["boxes"], torch.tensor([[5.0, 5, 25, 15], [50, 30, 64, 48]]))  # clipped
    assert isinstance(t["masks"], PolygonMasks) and t["crowd_boxes"].shape == (0, 4)
    img, t = ds[1]
    assert t["labels"].tolist() == [1, 2] and t["masks"].shape == (2, 48, 64)  # RLE -> bitmaps
    assert t["masks"][0].sum() == 200 and torch.equal(t["masks"][0], t["masks"][1])  # compressed == uncompressed
    torch.testing.assert_close(t["crowd_boxes"], torch.tensor([[0.0, 0, 10, 10]]))
    _, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    # training may drop images without annotations; a validation set keeps them
    assert len(CocoDataset(path, path.parent, train=True, keep_empty=False)) == 2
    assert len(CocoDataset(path, path.parent, train=False, keep_empty=False)) == 3
    assert CocoDataset(path, path.parent, mask_format="bitmap")[0][1]["masks"].shape == (2, 48, 64)


def test_class_map_round_trip_and_errors():
    cm = ClassMap([40, 3], ["bird", "dog"])
    assert cm.ids == [3, 40] and cm.label(40) == 2 and cm.category_id(1) == 3 and cm.name(2) == "bird"
    assert ClassMap.from_dict(cm.to_dict()) == cm and cm != ClassMap([3, 40], ["dog", "cat"])
    with pytest.raises(ValueError, match="unique ids"):
        ClassMap([1, 1], ["a", "b"])


def test_exif_orientation_is_honoured(tmp_path):
    # a 40x20 (WxH) JPEG stored sideways with orientation 6 ("rotate 90 clockwise to view")
    img = Image.new("RGB", (20, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 10))  # red band at the top of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    data = {"images": [{"id": 1, "file_name": "rot.jpg", "height": 20, "width": 40}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    (tmp_path / "a.json").write_text(json.dumps(data))
    image, _ = CocoDataset(tmp_path / "a.json", tmp_path)[0]
    assert image.shape == (3, 20, 40)
    assert image[0, :, -5:].float().mean() > 200  # the red band is now on the right


def test_flip_moves_boxes_masks_and_keypoints_together(coco):
    path, _ = coco
    ds = CocoDataset(path, path.parent, mask_format="bitmap")
    img, t = ds[1]
    t["keypoints"] = torch.tensor([[[35.0, 12.0, 2.0], [45.0, 15.0, 2.0]]]).repeat(2, 1, 1)
    fimg, ft = hflip(img, t, flip_map=[1, 0])
    assert torch.equal(fimg, img.flip(-1))
    torch.testing.assert_close(ft["boxes"][0], torch.tensor([14.0, 10, 34, 20]))
    ys, xs = torch.nonzero(ft["masks"][0], as_tuple=True)
    assert xs.min() == 14 and xs.max() == 33
    assert ft["keypoints"][0, 0].tolist() == [64 - 45.0, 15.0, 2.0]  # swapped and mirrored
    # with a seed, training samples flip reproducibly
    train = CocoDataset(path, path.parent, train=True, flip_prob=1.0)
    _, a = train[(0, 5)]
    _, b = train[(0, 5)]
    assert torch.equal(a["boxes"], b["boxes"]) and a["boxes"][0, 0] == 64 - 25 and a["seed"] == 5


def test_self_intersection_detection():
    assert polygon_self_intersects(np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=float))  # a bow tie
    assert not polygon_self_intersects(np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float))
    assert not polygon_self_intersects(np.array([[0, 0], [10, 0], [5, 8]], dtype=float))


BAD = [
    (lambda d: d["annotations"].append({"id": 9, "image_id": 99, "category_id": 12, "bbox": [1, 1, 5, 5],
                                        "segmentation": [[1, 1, 6, 1, 6, 6]]}), "annotation 9: unknown image_id 99"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5],
                                        "segmentation": [[1, 1, 6, 1, 6, 6]]}), "annotation 9: unknown category_id 5"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [1, 1, 0, 5],
                                        "segmentation": [[1, 1, 6, 1, 6, 6]]}), "annotation 9: box .* has no area"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [100, 100, 5, 5],
                                        "segmentation": [[1, 1, 6, 1, 6, 6]]}), "annotation 9: box .* lies outside"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [1, 1, 5, 5],
                                        "segmentation": [[1, 1, 6, 1, 11, 1]]}), "annotation 9: no polygon with 3"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [1, 1, 5, 5],
                                        "segmentation": [[1, 1, 6, 1]]}), "annotation 9: no polygon with 3"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [1, 1, 5, 5],
                                        "segmentation": {"size": [10, 10], "counts": "abc"}}), "RLE size"),
    (lambda d: d["images"].append({"id": 8, "file_name": "missing.png", "height": 48, "width": 64}),
     "image 8: file not found"),
    (lambda d: d["images"].append({"id": 1, "file_name": "c.png", "height": 48, "width": 64}),
     r"image id 1 is used by 2 images \['a.png', 'c.png'\]: all left out with the 2 annotations"),
]


@pytest.mark.parametrize("corrupt,message", BAD)
def test_bad_annotations_are_skipped_and_reported_or_raised(coco, corrupt, message):
    path, data = coco
    corrupt(data)
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        ds = CocoDataset(path, path.parent)
    assert len(ds.report) == 1 and __import__("re").search(message, ds.report[0]), ds.report
    with pytest.raises(DatasetError, match=message):
        CocoDataset(path, path.parent, on_bad_sample="error")


def test_skipped_samples_file_lists_each_problem_once(coco, tmp_path):
    from maskrcnn.data.coco import SKIPPED_FILE, write_skipped

    path, data = coco
    BAD[1][0](data)  # an unknown category id
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="list all of them in skipped_samples.txt"):
        ds = CocoDataset(path, path.parent)
    write_skipped([ds, None, ds], tmp_path)  # the same file for training and validation
    lines = (tmp_path / SKIPPED_FILE).read_text().splitlines()
    assert lines == [f"{path}: annotation 9: unknown category_id 5"]


def test_self_intersecting_polygon_is_kept_and_reported(coco):
    path, data = coco
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 12, "bbox": [0, 0, 10, 10],
                                "segmentation": [[0, 0, 10, 10, 10, 0, 0, 10]]})
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        ds = CocoDataset(path, path.parent, on_bad_sample="error")
    assert any("self-intersecting" in r for r in ds.report)
    assert ds[0][1]["labels"].numel() == 3


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"images": [], "categories": [{"id": 1}]}', "no usable images"),
    ('{"images": [{"id": 1}], "categories": []}', "no categories"),
    ('{"categories": [{"id": 1}]}', "missing or malformed 'images'"),
    ('{"images": [], "categories": [{"id": "x"}]}', "integer 'id'"),
])
def test_malformed_files_are_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CocoDataset(path, tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        CocoDataset(tmp_path / "none.json", tmp_path)


def test_corrupt_image_is_replaced_and_reported_or_raised(coco):
    """In training the next image stands in (batches stay full); evaluation skips it (tests/engine/test_evaluate.py)."""
    path, _ = coco
    (path.parent / "a.png").write_bytes(b"this is not a png")
    ds = CocoDataset(path, path.parent, train=True)
    with pytest.warns(UserWarning, match=r"cannot decode image .*a.png: .*; using the next image"):
        img, t = ds[0]
    assert t["image_id"] == 2
    with pytest.raises(ValueError, match="cannot decode image"):
        CocoDataset(path, path.parent, on_bad_sample="error")[0]
    # an image whose size disagrees with the annotations
    _write_image(path.parent / "b.png", w=10, h=10)
    with pytest.raises(ValueError, match=r"is 10x10 \(WxH\) but the annotations say 64x48"):
        CocoDataset(path, path.parent, on_bad_sample="error")[1]


def test_training_stops_when_most_images_cannot_be_used(coco):
    # e.g. every image entry with width and height swapped (a new-user trial: training went on with the
    # one square image left, a console line for each of the others, and exited 0)
    path, data = coco
    ds = CocoDataset(path, path.parent, train=True)
    (path.parent / "a.png").write_bytes(b"this is not a png")
    with pytest.warns(UserWarning, match="using the next image"):
        assert ds[0][1]["image_id"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an image found unusable is not read (nor told) again
        assert ds[0][1]["image_id"] == 2
    for im in data["images"]:
        im["width"], im["height"] = im["height"], im["width"]
    path.write_text(json.dumps(data))
    swapped = CocoDataset(path, path.parent, train=True)
    with pytest.raises(DatasetError, match=r"2 of its 3 images cannot be used, e.g. .*is 64x48 \(WxH\) but the "
                                           r"annotations say 48x64.*width and height"), pytest.warns(UserWarning):
        swapped[0]


def test_duplicate_image_id_leaves_out_both_images_and_their_annotations(coco):
    path, data = coco
    _write_image(path.parent / "d.png")
    data["images"].append({"id": 2, "file_name": "d.png", "height": 48, "width": 64})
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        ds = CocoDataset(path, path.parent)
    assert "image id 2" in ds.report[0] and "'b.png', 'd.png'" in ds.report[0]
    assert [r.image_id for r in ds.records] == [1, 7]  # image 1 and the empty image 7 stay as they were
    assert [ds.target(i)["labels"].numel() for i in range(2)] == [2, 0]
    with pytest.raises(DatasetError, match=r"instances.json: image id 2 is used by 2 images"):
        CocoDataset(path, path.parent, on_bad_sample="error")


@pytest.mark.parametrize("drop", [lambda d: d.pop("annotations"), lambda d: d["annotations"].clear()])
def test_training_set_without_annotations_is_an_error_but_a_test_split_is_not(coco, drop):
    path, data = coco
    drop(data)
    path.write_text(json.dumps(data))
    for keep_empty in (True, False):
        with pytest.raises(DatasetError, match=r"instances.json: no annotations .*nothing to learn from"):
            CocoDataset(path, path.parent, train=True, keep_empty=keep_empty)
    ds = CocoDataset(path, path.parent, train=False)  # predicting on an unlabelled split
    assert len(ds) == 3 and all(ds.target(i)["boxes"].shape == (0, 4) for i in range(3))


def test_training_set_whose_annotations_are_all_unusable_is_an_error(coco):
    path, data = coco
    data["annotations"] = [dict(a, iscrowd=1) for a in data["annotations"]]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"none of its 5 annotations can be trained on \(all are crowd regions\)"):
        CocoDataset(path, path.parent, train=True)
    data["annotations"] = [dict(a, iscrowd=0, bbox=[0, 0, 0, 0]) for a in data["annotations"]]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"none of its 5 annotations can be trained on \(5 problems: .*no area"):
        CocoDataset(path, path.parent, train=True)
