"""Image transforms: CoOp/open_clip-style preprocessing with OpenAI CLIP statistics."""
from __future__ import annotations

from typing import Tuple

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

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
    """RandomResizedCrop (CoOp's default scale) + flip + RandAugment + normalise.

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


def eval_transform(image_size: int = 224):
    """Resize the short side to ``image_size``, centre crop, normalise (CLIP's preprocess)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
