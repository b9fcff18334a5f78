"""Image transforms: CoOp/open_clip-style preprocessing with OpenAI CLIP statistics.

Training augmentations (``TrainConfig.augment``):

* ``"patch"`` (the release's, default): the student sees the release's per-patch RandAugment
  (:mod:`.patch_augment`) of the resized, centre-cropped image, and the frozen teacher the same
  image without it, i.e. exactly the evaluation preprocessing
  (release/data/meta_dataset.py:70-92: both start from ``Resize(224, bicubic)`` +
  ``CenterCrop(224)``, no random crop, no flip; :201-208 returns (clean, augmented) and
  release/models/drople.py:825,848-851 feeds the clean one to the teacher, and :869 the augmented one to the
  student). The teacher's image is then deterministic per training image, which is what lets
  :mod:`drople_fast.training.teacher_cache` compute its features once.
* ``"none"``: the clean image for both (the release without ``--patch_aug_config``, :93).
* ``"randaugment"`` / ``"crop_flip"``: this project's former augmentation, RandomResizedCrop +
  flip (+ torchvision RandAugment), one image for student and teacher.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .patch_augment import PatchRandAugment

# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def train_transform(
    image_size: int = 224,
    randaugment: bool = True,
    num_ops: int = 2,
    magnitude: int = 9,
    crop_scale: Tuple[float, float] = (0.08, 1.0),
):
    """RandomResizedCrop (CoOp's default scale) + flip + RandAugment + normalise: the
    ``"randaugment"`` / ``"crop_flip"`` augmentations (this project's former default).

    RandAugment runs on the cropped PIL image, before the tensor conversion.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    ops = [
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if randaugment:
        ops.append(T.RandAugment(num_ops=num_ops, magnitude=magnitude))
    ops += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(ops)


AUGMENTATIONS = ("patch", "none", "randaugment", "crop_flip")
# augmentations whose teacher image is the clean (evaluation) image, not the student's
CLEAN_TEACHER = ("patch", "none")


def resize_center_crop(image_size: int):
    """PIL -> PIL: RGB, short side to ``image_size`` (bicubic), centre crop (release/data/meta_dataset.py:72-73)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose([T.Lambda(_to_rgb), T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size)])


def normalize_uint8(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 -> normalised float32, bit for bit ``ToTensor()`` + ``Normalize`` of the same pixels."""
    return TF.normalize(image.to(torch.float32).div(255), CLIP_MEAN, CLIP_STD)


class PatchTrainViews:
    """PIL image -> (student, teacher): the release's patch-augmented view (or, with ``augment=False``,
    the clean one) and the clean view, equal to :func:`eval_transform`'s output. Both share one resize
    and crop; the clean view costs one extra normalisation."""

    def __init__(self, image_size: int = 224, augment: bool = True):
        self.geometry = resize_center_crop(image_size)
        self.augment = PatchRandAugment() if augment else None

    def __call__(self, image):
        clean = TF.pil_to_tensor(self.geometry(image))
        teacher = normalize_uint8(clean)
        return (normalize_uint8(self.augment(clean)) if self.augment is not None else teacher), teacher


class SameImageViews:
    """PIL image -> (student, teacher) with one image for both: the former augmentations, whose
    teacher saw the student's (randomly cropped, flipped, augmented) image."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        x = self.transform(image)
        return x, x


def train_views(augment: str, image_size: int, crop_scale: Tuple[float, float] = (0.08, 1.0)) -> Callable:
    """The training transform for ``augment`` (one of :data:`AUGMENTATIONS`): PIL image ->
    (student image, teacher image), both normalised float32 (C, H, W). For :data:`CLEAN_TEACHER`
    the teacher's image is the clean one (release/data/meta_dataset.py:200-208 returns
    ``[img_1 clean, img_2 augmented, label]``), otherwise it is the student's."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; expected one of {list(AUGMENTATIONS)}")
    if augment in CLEAN_TEACHER:
        return PatchTrainViews(image_size, augment=augment == "patch")
    return SameImageViews(train_transform(image_size, randaugment=augment == "randaugment", crop_scale=crop_scale))


def eval_transform(image_size: int = 224):
    """Resize the short side to ``image_size``, centre crop, normalise (CLIP's preprocess)."""
    return T.Compose([resize_center_crop(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
