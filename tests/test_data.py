"""Dataset readers (CoOp layouts), transforms and the synthetic dataset."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from drople_fast.training.data import (
    CLIP_MEAN,
    ImageDataset,
    canonical_name,
    eval_transform,
    get_dataset,
    load_split_json_dataset,
    train_transform,
    write_synthetic_coop_dataset,
)
from drople_fast.training.data.catalog import SPLIT_JSON_DATASETS


def _png(path, value=128, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _write_split_json_dataset(root, name, classes=("cat", "dog", "bird"), per_split=(2, 1, 1)):
    """Tiny split-JSON dataset in the CoOp folders of ``name``; returns the split dict."""
    dataset_dir, image_dir, split_file = SPLIT_JSON_DATASETS[name]
    img_root = os.path.join(root, dataset_dir, image_dir)
    split = {}
    for s, n in zip(("train", "val", "test"), per_split):
        split[s] = []
        for label, cname in enumerate(classes):
            for i in range(n):
                rel = f"{cname}/{s}_{i}.jpg"
                _png(os.path.join(img_root, rel), value=40 * label)
                split[s].append([rel, label, cname])
    with open(os.path.join(root, dataset_dir, split_file), "w") as f:
        json.dump(split, f)
    return split


@pytest.mark.parametrize("name", ["Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "DTD", "EuroSAT", "UCF101", "SUN397", "Food101"])
def test_split_json_layouts(tmp_path, name):
    split = _write_split_json_dataset(str(tmp_path), name)
    ds = get_dataset(name, str(tmp_path))
    assert ds.classnames == ["cat", "dog", "bird"]
    assert [len(ds.train), len(ds.val), len(ds.test)] == [6, 3, 3]
    dataset_dir, image_dir, _ = SPLIT_JSON_DATASETS[name]
    expected = os.path.join(str(tmp_path), dataset_dir, image_dir, split["train"][0][0])
    assert ds.train[0].path == expected and ds.train[0].label == 0 and ds.train[0].classname == "cat"
    image, label = ImageDataset(ds.split("test"))[2]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8) and label == 2
    assert image.mean().item() == pytest.approx(80 / 255, abs=0.01)  # bird images are value 80


def test_names_case_insensitive(tmp_path):
    _write_split_json_dataset(str(tmp_path), "OxfordPets")
    a = get_dataset("oxford_pets", str(tmp_path))
    b = get_dataset("OxfordPets", str(tmp_path))
    assert a.train == b.train and a.name == b.name == "OxfordPets"
    assert canonical_name("DescribableTextures") == "DTD"
    assert canonical_name("imagenet-sketch") == "ImageNetSketch"
    assert canonical_name("caltech-101") == "Caltech101"


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*Caltech101.*ImageNetR"):
        get_dataset("mnist", str(tmp_path))


def test_missing_root_split_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("dtd", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="dtd"):
        get_dataset("dtd", str(tmp_path))
    os.makedirs(tmp_path / "dtd" / "images")
    with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json"):
        get_dataset("dtd", str(tmp_path))
    split = _write_split_json_dataset(str(tmp_path), "DTD")
    victim = tmp_path / "dtd" / "images" / split["val"][1][0]
    os.remove(victim)
    with pytest.raises(FileNotFoundError, match=str(victim)):
        get_dataset("dtd", str(tmp_path))
    # without the up-front check the error comes when the image is read
    ds = get_dataset("dtd", str(tmp_path), check_images=False)
    with pytest.raises(FileNotFoundError, match=str(victim)):
        ImageDataset(ds.split("val"))[1]


def test_invalid_json_and_bad_entries(tmp_path):
    _write_split_json_dataset(str(tmp_path), "EuroSAT")
    path = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="split_zhou_EuroSAT.json is not valid JSON"):
        get_dataset("eurosat", str(tmp_path))
    bad = dict(good, train=good["train"] + [["cat/train_0.jpg", "0", "cat"]])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"train\[6\]"):
        get_dataset("eurosat", str(tmp_path))
    path.write_text(json.dumps({"train": good["train"], "val": good["val"]}))
    with pytest.raises(ValueError, match="missing split 'test'"):
        get_dataset("eurosat", str(tmp_path))


def test_inconsistent_labels(tmp_path):
    split = _write_split_json_dataset(str(tmp_path), "UCF101")
    path = tmp_path / "ucf101" / "split_zhou_UCF101.json"
    two_names = json.loads(json.dumps(split))
    two_names["test"][0][2] = "kitten"  # label 0 is "cat" elsewhere
    path.write_text(json.dumps(two_names))
    with pytest.raises(ValueError, match="label 0 has two class names 'cat' and 'kitten'"):
        get_dataset("ucf101", str(tmp_path))
    two_labels = json.loads(json.dumps(split))
    two_labels["test"][0][1] = 1  # "cat" with label 1 (and label 1 is "dog")
    path.write_text(json.dumps(two_labels))
    with pytest.raises(ValueError, match="two"):
        get_dataset("ucf101", str(tmp_path))
    gap = {s: [[p, 2 * y, c] for p, y, c in items] for s, items in split.items()}
    path.write_text(json.dumps(gap))
    with pytest.raises(ValueError, match="no gaps"):
        get_dataset("ucf101", str(tmp_path))


def test_fgvc_aircraft(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    os.makedirs(d / "images")
    (d / "variants.txt").write_text("707-320\nA300B4\nBoeing 717\n")
    lines = {"train": ["0001 707-320", "0002 Boeing 717"], "val": ["0003 A300B4"], "test": ["0004 Boeing 717", "0005 707-320"]}
    for split, rows in lines.items():
        (d / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            _png(str(d / "images" / (row.split(" ")[0] + ".jpg")))
    ds = get_dataset("FGVCAircraft", str(tmp_path))
    assert ds.classnames == ["707-320", "A300B4", "Boeing 717"]
    assert [(os.path.basename(r.path), r.label, r.classname) for r in ds.train] == [
        ("0001.jpg", 0, "707-320"), ("0002.jpg", 2, "Boeing 717")]
    (d / "images_variant_test.txt").write_text("0004 Boeing 747\n")
    with pytest.raises(ValueError, match="'Boeing 747' is not in"):
        get_dataset("fgvc_aircraft", str(tmp_path))


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}


def _write_classnames(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{w} {n}\n" for w, n in WNIDS.items()))


def test_imagenet_and_variants(tmp_path):
    root = tmp_path
    _write_classnames(str(root / "imagenet" / "classnames.txt"))
    for split, n in (("train", 3), ("val", 2)):
        for w in WNIDS:
            for i in range(n):
                _png(str(root / "imagenet" / "images" / split / w / f"{w}_{i}.JPEG"))
    ds = get_dataset("imagenet", str(root))
    assert ds.classnames == list(WNIDS.values())
    assert len(ds.train) == 12 and len(ds.test) == 8 and ds.val == []
    assert {r.label for r in ds.train if "n01484850" in r.path} == {2}

    # ImageNet-V2: folders named by integer label; names by line order
    for label in (0, 3):
        _png(str(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg"))
    v2 = get_dataset("ImageNetV2", str(root))  # falls back to imagenet/classnames.txt
    assert v2.classnames == list(WNIDS.values())
    assert [(r.label, r.classname) for r in v2.test] == [(0, "tench"), (3, "tiger shark")]
    assert v2.train == [] and v2.val == []

    # ImageNet-A/-R: a subset of wnids, relabelled 0..k-1 over the sorted folders
    for d, sub in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        for w in ("n01491361", "n01443537"):
            _png(str(root / d / sub / w / "x.jpg"))
        (root / d / sub / "README.txt").write_text("not a class")
        _write_classnames(str(root / d / "classnames.txt"))
    for name in ("ImageNet-A", "imagenet_r"):
        sub = get_dataset(name, str(root))
        assert sub.classnames == ["goldfish", "tiger shark"]
        assert [r.label for r in sub.test] == [0, 1]

    # ImageNet-Sketch with an unknown wnid folder
    _png(str(root / "imagenet-sketch" / "images" / "n01440764" / "s.png"))
    assert get_dataset("imagenet-sketch", str(root)).classnames == ["tench"]
    _png(str(root / "imagenet-sketch" / "images" / "n99999999" / "s.png"))
    with pytest.raises(ValueError, match="n99999999"):
        get_dataset("ImageNetSketch", str(root))


def test_imagenet_missing_classnames(tmp_path):
    os.makedirs(tmp_path / "imagenet" / "images" / "train")
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        get_dataset("ImageNet", str(tmp_path))
    os.makedirs(tmp_path / "imagenet-rendition" / "imagenet-r")
    with pytest.raises(FileNotFoundError, match="imagenet-rendition.*classnames.txt"):
        get_dataset("ImageNetR", str(tmp_path))


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    from drople_fast.training.data import Record

    with pytest.raises(ValueError, match="bad.png is not a readable image"):
        ImageDataset([Record(str(bad), 0, "x")])[0]


def test_synthetic_dataset(tmp_path):
    import time

    t = time.time()
    path = write_synthetic_coop_dataset(str(tmp_path), num_classes=12, images_per_class=25, image_size=32, seed=3)
    assert time.time() - t < 10
    ds = get_dataset("synthetic", str(tmp_path))
    assert path == str(tmp_path / "synthetic")
    assert len(ds.classnames) == 12 and len(set(ds.classnames)) == 12
    assert ds.classnames[:2] == ["red circle", "green square"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 300
    for split in (ds.train, ds.val, ds.test):  # every class in every split
        assert {r.label for r in split} == set(range(12))
    x, y = ImageDataset(ds.split("train"))[0]
    assert x.shape == (3, 32, 32)

    # deterministic from the seed, different for another seed
    again = write_synthetic_coop_dataset(str(tmp_path / "b"), num_classes=12, images_per_class=25, seed=3)
    other = write_synthetic_coop_dataset(str(tmp_path / "c"), num_classes=12, images_per_class=25, seed=4)
    rel = "images/red_circle/0000.png"
    a_bytes = open(os.path.join(path, rel), "rb").read()
    assert a_bytes == open(os.path.join(again, rel), "rb").read()
    assert a_bytes != open(os.path.join(other, rel), "rb").read()

    # a custom name is read by the generic reader
    custom = write_synthetic_coop_dataset(str(tmp_path), name="my_shapes", num_classes=3, images_per_class=3)
    assert os.path.isfile(os.path.join(custom, "split_zhou_MyShapes.json"))
    assert load_split_json_dataset(custom, image_dir="images").classnames == ["red circle", "green square", "blue triangle"]


def test_synthetic_is_learnable(tmp_path):
    """A nearest-centroid classifier on per-channel intensity quantiles (no
    learning beyond class means) must beat chance by far on held-out images."""
    write_synthetic_coop_dataset(str(tmp_path), num_classes=8, images_per_class=30, seed=0)
    ds = get_dataset("synthetic", str(tmp_path))

    def feats(records):
        x = torch.stack([ImageDataset([r])[0][0] for r in records])
        sorted_px = x.flatten(2).sort(dim=2).values[:, :, ::16]  # per-channel intensity histogram
        return sorted_px.flatten(1)

    xtr, ytr = feats(ds.train), torch.tensor([r.label for r in ds.train])
    xte, yte = feats(ds.test), torch.tensor([r.label for r in ds.test])
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(8)])
    pred = torch.cdist(xte, centroids).argmin(1)
    assert (pred == yte).float().mean().item() > 0.6  # chance is 0.125


def test_invalid_synthetic_args(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        write_synthetic_coop_dataset(str(tmp_path), num_classes=65)
    with pytest.raises(ValueError, match="images_per_class"):
        write_synthetic_coop_dataset(str(tmp_path), images_per_class=2)


def test_transforms():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    torch.manual_seed(0)
    x = train_transform(32)(image)
    assert x.shape == (3, 32, 32)
    e = eval_transform(32)
    y = e(image)
    assert y.shape == (3, 32, 32)
    assert torch.equal(y, e(image))  # eval is deterministic
    gray = Image.fromarray(np.full((10, 10), 0, np.uint8), mode="L")
    z = e(gray)  # converted to RGB; black maps to -mean/std
    assert z.shape == (3, 32, 32)
    assert z[0, 0, 0].item() == pytest.approx(-CLIP_MEAN[0] / 0.26862954, abs=1e-4)
    torch.manual_seed(1)
    a = train_transform(32)(image)
    torch.manual_seed(2)
    b = train_transform(32)(image)
    assert not torch.equal(a, b)  # training transform is random
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)


# --------------------------------------------------------------------------
# a dataset of your own (CoOp layout, any name)

from drople_fast.training.data.catalog import (CustomDataset, DATASET_TEMPLATES, DEFAULT_TEMPLATE,  # noqa: E402
                                               custom_dataset, find_split_file, read_custom, split_file_name,
                                               template_of)
from own_data import FRUITS, write_own_dataset, write_split  # noqa: E402


def _own(folder, name="MyFruits", **kw):
    return CustomDataset(name, str(folder), f"split_zhou_{name}.json", **kw)


@pytest.mark.parametrize("image_dir", ["images", ""])
def test_own_dataset_reads_with_class_names_from_the_split(tmp_path, image_dir):
    split = write_own_dataset(str(tmp_path), image_dir=image_dir)
    assert find_split_file(str(tmp_path)) == "split_zhou_MyFruits.json"
    assert split_file_name("x/split_zhou_MyFruits.json") == "MyFruits" and split_file_name("fruits.json") == "fruits"
    spec = _own(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'MyFruits'.*--dataset-dir"):
        canonical_name("MyFruits")  # outside the scope it is not known
    with custom_dataset(spec):
        assert canonical_name("MyFruits") == "MyFruits"
        ds = get_dataset("MyFruits", str(tmp_path / "not-used"))
    assert ds.name == "MyFruits" and ds.classnames == list(FRUITS)
    assert [len(ds.train), len(ds.val), len(ds.test)] == [12, 4, 8]
    expected = os.path.join(str(tmp_path), image_dir, split["test"][3][0]) if image_dir else \
        os.path.join(str(tmp_path), split["test"][3][0])
    assert ds.test[3].path == expected and ds.test[3].label == 1
    assert os.path.isfile(ds.test[3].path)


def test_own_dataset_name_shadows_a_known_one_only_in_scope(tmp_path):
    write_own_dataset(str(tmp_path), name="DTD")
    spec = _own(tmp_path, name="DTD", template="a close-up of {}.")
    assert template_of("DTD") == DATASET_TEMPLATES["DTD"] == "{} texture."
    with custom_dataset(spec):
        assert template_of("DTD") == "a close-up of {}."  # never DTD's texture template for your data
        assert get_dataset("DTD", str(tmp_path / "nowhere")).classnames == list(FRUITS)
    with custom_dataset(_own(tmp_path, name="DTD")):
        assert template_of("DTD") == DEFAULT_TEMPLATE
    assert canonical_name("dtd") == "DTD" and template_of("OxfordPets") == "a photo of a {}, a type of pet."


def test_own_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no split_zhou"):
        find_split_file(str(tmp_path))
    split = write_own_dataset(str(tmp_path))
    write_split(str(tmp_path), "Other", split)
    with pytest.raises(FileNotFoundError, match=r"2 split files \(split_zhou_MyFruits.json, split_zhou_Other.json\)"):
        find_split_file(str(tmp_path))
    split_path = str(tmp_path / "split_zhou_MyFruits.json")

    def fails(data, exc, pattern):
        write_split(str(tmp_path), "MyFruits", data)
        with pytest.raises(exc, match=pattern):
            read_custom(_own(tmp_path))

    victim = split["test"][0][0]
    fails(dict(split, test=split["test"] + [["apple/nowhere.png", 0, "apple"]]), FileNotFoundError,
          "nowhere.png")
    out_of_range = dict(split, test=split["test"] + [[victim, 7, "fig"]])
    fails(out_of_range, ValueError, rf"{split_path}: labels must be 0..K-1.*label 7 \(class 'fig'\)")
    fails(dict(split, val=split["val"] + [[victim, -1, "fig"]]), ValueError, "label -1 \\(class 'fig'\\) is out of range")
    fails(dict(split, test=split["test"] + [split["test"][0]]), ValueError,
          f"image .*{victim} is listed twice in split 'test'")
    fails(dict(split, train=split["train"] + [split["test"][0]]), ValueError,
          f"image .*{victim} is listed in splits 'train' and 'test'")
    fails(dict(split, train=split["train"] + [["../escape.png", 0, "apple"]]), ValueError, "leaves the image folder")
    write_split(str(tmp_path), "MyFruits", split)
    assert read_custom(_own(tmp_path)).num_classes == 4


def test_known_datasets_refuse_duplicates(tmp_path):
    # the same check guards the known split-file datasets
    split = _write_split_json_dataset(str(tmp_path), "EuroSAT")
    path = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    path.write_text(json.dumps(dict(split, train=split["train"] + [split["test"][0]])))
    with pytest.raises(ValueError, match="listed in splits 'train' and 'test'"):
        get_dataset("EuroSAT", str(tmp_path))


def test_unreadable_image_is_named_with_its_class(tmp_path):
    from drople_fast.training.data.datasets import check_readable

    split = write_own_dataset(str(tmp_path))
    ds = read_custom(_own(tmp_path))
    check_readable(ds.train)  # all fine
    (tmp_path / "images" / split["train"][4][0]).write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"banana/train_1.png \(class 'banana'\) is not a readable image"):
        check_readable(ds.train)
