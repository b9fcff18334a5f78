"""Datasets in the CoOp layout, few-shot sampling, transforms and synthetic data."""
from .catalog import CROSS_DATASET_TARGETS, DATASET_TEMPLATES, DG_TARGETS, canonical_name, dataset_names, get_dataset
from .datasets import DatasetSplits, ImageDataset, Record, TrainImageDataset, load_image, load_split_json_dataset
from .sampling import (
    base_novel_labels,
    few_shot_split,
    long_tail_counts,
    long_tail_subsample,
    sample_few_shot,
    subsample_classes,
)
from .synthetic import write_synthetic_coop_dataset
from .transforms import AUGMENTATIONS, CLEAN_TEACHER, CLIP_MEAN, CLIP_STD, eval_transform, train_transform, train_views

__all__ = [
    "CROSS_DATASET_TARGETS",
    "DATASET_TEMPLATES",
    "DG_TARGETS",
    "DatasetSplits",
    "ImageDataset",
    "Record",
    "TrainImageDataset",
    "canonical_name",
    "dataset_names",
    "get_dataset",
    "load_image",
    "load_split_json_dataset",
    "base_novel_labels",
    "few_shot_split",
    "long_tail_counts",
    "long_tail_subsample",
    "sample_few_shot",
    "subsample_classes",
    "write_synthetic_coop_dataset",
    "AUGMENTATIONS",
    "CLEAN_TEACHER",
    "CLIP_MEAN",
    "CLIP_STD",
    "eval_transform",
    "train_transform",
    "train_views",
]
