"""Image datasets for attribution: loading, stable sample ids, seeded splits and image saving.

Every dataset is an :class:`ImageDataset` of float32 images in [-1, 1] with unique sample ids that
survive subsetting and reloading, so attribution scores can always be traced back to the exact
training images they refer to.
"""

from diffattr.data._dataset import ImageDataset
from diffattr.data._folder import load_image_folder
from diffattr.data._images import image_grid, save_grid, save_pngs, to_uint8
from diffattr.data._loaders import load_dataset, load_digits, load_from_source
from diffattr.data._npz import load_npz
from diffattr.data._split import DatasetSplit, split_dataset

__all__ = [
    "DatasetSplit",
    "ImageDataset",
    "image_grid",
    "load_dataset",
    "load_digits",
    "load_from_source",
    "load_image_folder",
    "load_npz",
    "save_grid",
    "save_pngs",
    "split_dataset",
    "to_uint8",
]
