"""A user's own dataset in the CoOp layout, written by the tests: tiny PNGs and a split_zhou_<name>.json."""
import json
import os

import numpy as np
from PIL import Image

FRUITS = ("apple", "banana", "cherry", "date")


def write_own_dataset(folder, name="MyFruits", classes=FRUITS, per_split=(3, 1, 2), image_dir="images", size=8):
    """``folder/<image_dir>/<class>/<split>_<i>.png`` (one colour per class, a little noise) and
    ``folder/split_zhou_<name>.json``; ``image_dir`` "" puts the class folders beside the split file.
    Returns the split dict as written."""
    rng = np.random.default_rng(0)
    root = os.path.join(folder, image_dir) if image_dir else folder
    split = {}
    for s, n in zip(("train", "val", "test"), per_split):
        split[s] = []
        for label, cname in enumerate(classes):
            for i in range(n):
                rel = f"{cname}/{s}_{i}.png"
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                colour = np.array([(60 * label) % 256, 255 - 50 * label, 40 + 30 * label], np.int16)
                pixels = np.clip(colour + rng.integers(-10, 10, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path)
                split[s].append([rel, label, cname])
    write_split(folder, name, split)
    return split


def write_split(folder, name, split):
    path = os.path.join(folder, f"split_zhou_{name}.json")
    with open(path, "w") as f:
        json.dump(split, f)
    return path
