"""One image file, read the same way on every path: the resident small-image cache, the torchvision file loader and
the tree check. (DALI decodes on its own; these rules follow what its decoder does, so both loaders see one image.)

- Which files count: the extensions below, on every path, and no hidden entry (a name starting with '.', such as
  macOS's `._x.jpg` AppleDouble files or `.ipynb_checkpoints/`).
- Orientation: the EXIF orientation tag is applied, as DALI's decoder does (torchvision's ImageFolder does not: a
  camera photo stored sideways would reach the model rotated or not depending on data.loader).
- 16-bit greyscale (PNG mode I;16 / I): scaled to 8 bits (v / 257), not clipped. PIL's convert("RGB") clips every
  value above 255 to white.
"""
from __future__ import annotations

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img):
    """A PIL image -> 8-bit RGB, orientation applied (see the module docstring). Forces the decode."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY:
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_rgb(path: str):
    """Decode `path` to an 8-bit RGB PIL image. Raises what PIL raises (OSError, UnidentifiedImageError, ...)."""
    from PIL import Image

    with open(path, "rb") as f:
        with Image.open(f) as img:
            return to_rgb(img)


DECODE_ERRORS = (OSError, ValueError, SyntaxError)   # PIL's UnidentifiedImageError is an OSError


def eval_resize(cfg_data) -> int:
    """The file loaders' eval resize (shorter side): data.resize, or image_size * 256/224 when it is 0 (the papers'
    256 for 224; 37 for 32), so the centre crop keeps the same share of the image at any size."""
    return int(cfg_data.resize) or int(round(cfg_data.image_size * 256 / 224))
