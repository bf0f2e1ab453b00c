"""Which GDAL driver may open an upload: decided by its first bytes, never by its name.

The first bytes decide the one GDAL driver allowed to open the file: TIFF/BigTIFF → ``GTiff``, PNG →
``PNG``, JPEG → ``JPEG``. Anything else (VRT XML, HTML, an empty file, ...) is refused with
:class:`UnsupportedMediaType` naming what it looks like, so a VRT named ``.tif`` can never make GDAL read
another file. In addition, an upload *named* ``.tif`` must hold a TIFF (:func:`drivers_for_name`,
:func:`allowed_driver`); a name without a raster extension leaves the choice to the content.

Pure code over bytes: nothing here opens a file or imports rasterio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from gateway.errors import CorruptRaster, UnsupportedMediaType

SNIFF_BYTES: Final = 512
"""How many leading bytes of a file :func:`sniff_driver` needs."""

Driver = Literal["GTiff", "PNG", "JPEG"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_FORMAT_NAMES = {"GTiff": "a TIFF", "PNG": "a PNG", "JPEG": "a JPEG"}


def drivers_for_name(file_name: str | None) -> tuple[str, ...] | None:
    """The drivers a file *named* ``file_name`` may be opened with: its extension's format, if any.

    ``scene.tif`` must hold a TIFF (a PNG, VRT or HTML page named ``.tif`` is refused); a name without
    a raster extension leaves the choice to the content.
    """
    suffix = Path(file_name or "").suffix.lower()
    return {
        ".tif": ("GTiff",),
        ".tiff": ("GTiff",),
        ".png": ("PNG",),
        ".jpg": ("JPEG",),
        ".jpeg": ("JPEG",),
    }.get(suffix)


def sniff_driver(head: bytes) -> Driver:
    """The one GDAL driver allowed to open a file starting with ``head`` (its first bytes).

    Raises:
        UnsupportedMediaType: not TIFF, PNG or JPEG; the detail names what the bytes look like.
        CorruptRaster: a TIFF header too short to hold a directory offset.
    """
    if head[:4] in _TIFF_MAGIC:
        if len(head) < 8:
            raise CorruptRaster("The file ends inside its TIFF header; it is truncated.")
        return "GTiff"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    raise UnsupportedMediaType(
        f"The file is {describe_bytes(head)}, not a GeoTIFF, PNG or JPEG image. "
        "Upload the image file itself.",
        looks_like=describe_bytes(head),
    )


def allowed_driver(head: bytes, drivers: tuple[str, ...] | None) -> Driver:
    """:func:`sniff_driver`, refusing content that contradicts the formats the upload's name allows.

    Args:
        head: the file's first :data:`SNIFF_BYTES` bytes.
        drivers: the formats the name allows (:func:`drivers_for_name`); ``None`` accepts any of them.

    Raises:
        UnsupportedMediaType: not TIFF, PNG or JPEG, or not the format ``drivers`` allows.
        CorruptRaster: a TIFF header too short to hold a directory offset.
    """
    driver = sniff_driver(head)
    if drivers is not None and driver not in drivers:
        raise UnsupportedMediaType(
            f"The file is named as {' or '.join(_FORMAT_NAMES.get(d, d) for d in drivers)} "
            f"but its content is {describe_bytes(head)}; rename it or upload the right file.",
            looks_like=describe_bytes(head),
        )
    return driver


def describe_bytes(head: bytes) -> str:
    """A short human description of a file's first bytes, for error messages."""
    if not head:
        return "empty (0 bytes)"
    if head[:4] in _TIFF_MAGIC:
        return "a TIFF image"
    if head.startswith(_PNG_MAGIC):
        return "a PNG image"
    if head.startswith(_JPEG_MAGIC):
        return "a JPEG image"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<vrtdataset") or (text.startswith(b"<?xml") and b"<vrtdataset" in text):
        return "a GDAL VRT (XML that references other files)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page (perhaps an error page saved instead of the image)"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "an XML document"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"GIF8", "a GIF image"),
        (b"BM", "a BMP image"),
        (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
        (b"\xffO\xffQ", "a JPEG 2000 codestream"),
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"\x89HDF", "an HDF5 file"),
        (b"CDF\x01", "a netCDF file"),
        (b"CDF\x02", "a netCDF file"),
        (b"NITF", "a NITF file"),
        (b"\x00\x00\x01\x00", "a Windows icon"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image (not supported; save it as PNG or GeoTIFF)"
    if head[4:8] == b"ftyp":
        return "an ISO media file (HEIC/AVIF/MP4)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised binary data (starting {head[:8].hex(' ')})"
    return "plain text"
