"""labelme and YOLO segmentation to COCO: hand-made files with known answers, then the loader."""

import json

import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.importers import from_labelme, from_voc, from_yolo


def _labelme(folder, name, shapes, size=(40, 30)):
    Image.new("RGB", size).save(folder / f"{name}.png")
    (folder / f"{name}.json").write_text(json.dumps({"imagePath": f"{name}.png", "imageWidth": size[0],
                                                     "imageHeight": size[1], "shapes": shapes}))


def test_labelme_shapes_groups_and_what_is_not_an_instance(tmp_path):
    _labelme(tmp_path, "a", [
        {"label": "dog", "shape_type": "polygon", "points": [[1, 1], [11, 1], [11, 6]]},
        {"label": "cat", "shape_type": "rectangle", "points": [[20, 10], [10, 2]]},  # corners in any order
        {"label": "cat", "shape_type": "polygon", "points": [[30, 20], [35, 20], [35, 25]], "group_id": 7},
        {"label": "cat", "shape_type": "polygon", "points": [[30, 26], [35, 26], [35, 29]], "group_id": 7},
        {"label": "cat", "shape_type": "line", "points": [[0, 0], [5, 5]]},
    ])
    _labelme(tmp_path, "b", [{"label": "cat", "shape_type": "circle", "points": [[20, 15], [25, 15]]}])
    coco, problems = from_labelme(tmp_path)
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]  # sorted, ids 1 and 2
    anns = coco["annotations"]
    assert [(a["image_id"], a["category_id"], len(a["segmentation"])) for a in anns] == \
        [(1, 2, 1), (1, 1, 1), (1, 1, 2), (2, 1, 1)]  # the two parts of group 7 are one cat
    assert anns[0]["bbox"] == [1, 1, 10, 5] and anns[0]["area"] == pytest.approx(25.0)  # triangle 10 x 5 / 2
    assert anns[1]["segmentation"] == [[10, 2, 20, 2, 20, 10, 10, 10]] and anns[1]["area"] == pytest.approx(80.0)
    assert anns[3]["bbox"] == pytest.approx([15, 10, 10, 10])  # the circle of radius 5 around (20, 15)
    assert anns[3]["area"] == pytest.approx(3.14159 * 25, rel=0.01)
    assert len(problems) == 1 and "shape 4 (line" in problems[0]
    with pytest.raises(ValueError, match=r"labels \['dog'\] are not among the classes"):
        from_labelme(tmp_path, ["cat"])


def test_yolo_segmentation_to_pixels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data.yaml").write_text("names: {0: person, 1: car}\n")
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (50, 50)).save(tmp_path / "images" / "empty.png")  # no label file: no objects
    (tmp_path / "labels" / "a.txt").write_text(
        "1 0.1 0.2 0.5 0.2 0.5 0.8\n"  # a car polygon
        "0 0.5 0.5 0.2 0.4\n"          # a box: its rectangle
        "5 0.1 0.1 0.2 0.2 0.3 0.3\n"  # class 5 of 2
        "0 0.1 0.1 0.2\n")             # 3 numbers
    coco, problems = from_yolo(tmp_path)
    assert [c["name"] for c in coco["categories"]] == ["person", "car"]
    assert [i["file_name"] for i in coco["images"]] == ["a.jpg", "empty.png"]
    car, person = coco["annotations"]
    assert car["category_id"] == 2 and car["segmentation"] == [[pytest.approx(v) for v in (20, 20, 100, 20, 100, 80)]]
    assert person["category_id"] == 1 and person["bbox"] == pytest.approx([80, 30, 40, 40])
    assert len(problems) == 2 and "class 5 is not one of 0..1" in problems[0] and "3 coordinates" in problems[1]
    assert len(problems.notes) == 1 and "a box, not a polygon" in problems.notes[0]  # converted, with a note


def test_yolo_splits_clipping_and_float_classes(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (100, 80)).save(tmp_path / "images" / split / f"{split}.jpg")
    (tmp_path / "labels" / "train" / "train.txt").write_text("0.0 1.5 0.1 0.5 -0.2 0.5 0.5\n")
    # one JSON of both splits would put the validation images into training
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'val'\]: convert each"):
        from_yolo(tmp_path, ["thing"])
    coco, problems = from_yolo(tmp_path, ["thing"], split="train")
    assert [i["file_name"] for i in coco["images"]] == ["train.jpg"] and not problems
    # outside 0-1: clipped to the image, and said; "0.0" is class 0
    assert coco["annotations"][0]["segmentation"] == [[100.0, 8.0, 50.0, 0.0, 50.0, 40.0]]
    assert "clipped" in problems.notes[0]


def test_convert_data_command_writes_a_file_the_loader_trains_on(tmp_path, capsys):
    src = tmp_path / "labelme"
    src.mkdir()
    _labelme(src, "a", [{"label": "dog", "shape_type": "polygon", "points": [[1, 1], [21, 1], [21, 16]]}])
    out = tmp_path / "coco.json"
    assert main(["convert-data", "labelme", str(src), "--output", str(out)]) == 0
    assert f"wrote {out}: 1 images, 1 instances, 1 classes (dog)" in capsys.readouterr().out
    dataset = CocoDataset(out, src, train=True)
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and target["labels"].tolist() == [1]
    assert main(["convert-data", "yolo", str(tmp_path / "nowhere"), "--output", str(out)]) == 1


def _voc(root, stem, objects, index, with_mask=True):
    import numpy as np

    for d in ("Annotations", "JPEGImages", "SegmentationObject"):
        (root / d).mkdir(exist_ok=True)
    xml = "".join(f"<object><name>{n}</name><difficult>{int(dif)}</difficult></object>" for n, dif in objects)
    (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.jpg</filename>{xml}</annotation>")
    Image.new("RGB", index.shape[::-1]).save(root / "JPEGImages" / f"{stem}.jpg")
    if with_mask:
        png = Image.fromarray(np.asarray(index, dtype=np.uint8), mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
        png.save(root / "SegmentationObject" / f"{stem}.png")


def test_voc_instance_masks_difficult_and_images_without_masks(tmp_path, capsys):
    import numpy as np

    index = np.zeros((20, 30), dtype=np.uint8)
    index[2:8, 3:13] = 1      # the dog: 6 x 10 px
    index[10:15, 20:25] = 2   # the difficult person: 5 x 5
    index[8, :] = 255         # VOC's uncertain border belongs to no object
    _voc(tmp_path, "2008_000001", [("dog", False), ("person", True)], index)
    _voc(tmp_path, "2008_000002", [("cat", False)], index, with_mask=False)  # a detection-only image
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2008_000001\n2008_000002\n")
    coco, problems = from_voc(tmp_path, "train")
    assert len(coco["categories"]) == 20 and coco["categories"][11]["name"] == "dog"  # VOC's order, ids 1..20
    assert coco["images"] == [{"id": 1, "file_name": "2008_000001.jpg", "height": 20, "width": 30}]
    dog, person = coco["annotations"]
    assert dog["category_id"] == 12 and dog["bbox"] == [3, 2, 10, 6] and dog["area"] == 60 and dog["iscrowd"] == 0
    assert person["category_id"] == 15 and person["area"] == 25 and person["iscrowd"] == 1
    assert problems == ["1 of 2 images have no SegmentationObject mask and were left out"]
    out = tmp_path / "voc.json"
    assert main(["convert-data", "voc", str(tmp_path), "--split", "train", "--output", str(out)]) == 0
    dataset = CocoDataset(out, tmp_path / "JPEGImages", train=True)
    image, target = dataset[0]
    assert target["labels"].tolist() == [12] and target["crowd_boxes"].shape == (1, 4)
    assert int(target["masks"][0].sum()) == 60
