"""Opening a user's image file the same way for every command (demo, visualize, chat, train's dataset, evaluation):
`load_image` decodes it whole (a truncated file fails here, named), turns an EXIF-rotated photo upright (as
transformers' `load_image`) and keeps its mode, which `MSLlavaImageProcessor` converts itself (16-bit greyscale
scaled, alpha on white) better than `convert("RGB")` would. `display_rgb` is that 8-bit RGB picture, for drawing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps

from .image_processing_ms_llava import MSLlavaImageProcessor

_DECODING = threading.Lock()  # held while PIL's module-wide LOAD_TRUNCATED_IMAGES is switched off


def decode_image(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """The image in `source` (a path or a binary file), decoded and upright; PIL's own exceptions for callers that name
    the file themselves (the training set's loader names the record too)."""
    with Image.open(source) as opened, _DECODING:
        # lmms-eval sets LOAD_TRUNCATED_IMAGES when it is imported, which would let a cut-off file through as an
        # image with a grey band: decoded strictly here, the flag restored after
        tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            opened.load()  # decodes everything now: a truncated file fails here
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
        ImageOps.exif_transpose(opened, in_place=True)  # upright; the mode is kept
        return opened  # loaded, so usable after the file is closed


def load_image(source: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """`decode_image`, with what a file can cause as a `ValueError` naming it (`name`, default the path): missing, a
    folder, not an image, truncated or damaged, over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`)."""
    is_path = isinstance(source, (str, os.PathLike))
    name = (str(source) if is_path else getattr(source, "name", "<image bytes>")) if name is None else name
    if is_path:
        path = Path(source).expanduser()
        if path.is_dir():
            raise ValueError(f"{name} is a folder, not an image file")
        if not path.is_file():
            raise ValueError(f"image file not found: {name}")
        source = path
    try:
        return decode_image(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # the warning, when made an error
        raise ValueError(
            f"{name} is too large to decode safely ({error}). If you trust the file, raise "
            "PIL.Image.MAX_IMAGE_PIXELS, or scale the image down first"
        ) from error
    except Image.UnidentifiedImageError as error:
        raise ValueError(f"{name} is not an image file that PIL can read ({error})") from error
    except MemoryError:
        raise
    except PermissionError as error:
        raise ValueError(f"cannot read image {name}: permission denied ({error})") from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError ... for a damaged file
        raise ValueError(
            f"cannot read image {name}: the file is truncated or damaged ({type(error).__name__}: {error})"
        ) from error


def display_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB picture `MSLlavaImageProcessor` makes of `image` before padding and resizing (16-bit and float
    greyscale scaled to 8 bits, alpha composited on white), for drawing: `image.convert("RGB")` would clip 16-bit
    values to white and drop the alpha."""
    pixels = MSLlavaImageProcessor().process_image(image, do_convert_rgb=True)  # (3, height, width) uint8
    return Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")
