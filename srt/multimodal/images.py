"""Reading a request's images: ``data:`` URIs and bare base64 always, local files only under
``--allowed-local-media-path``, never the network (the server may well be offline, and a
fetch on a client's behalf is a way into the server's network)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from srt.runtime.generate_request import InvalidRequestError

_MAX_PIXELS = 8192 * 8192  # a decompression bomb is refused before it is decoded


def load_image(source: str, allowed_local_media_path: str | None, param: str) -> Image.Image:
    """The RGB image ``source`` names: a ``data:image/...;base64,`` URI, bare base64, a ``file://``
    URL or a path (under the allowed folder); InvalidRequestError names ``param`` otherwise."""
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidRequestError(f"{param}: a data: URI must be base64 (data:image/png;base64,...)", param=param)
        return _decode(_b64(payload, param), param)
    scheme = urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        raise InvalidRequestError(
            f"{param}: this server does not fetch images from the network; send the image as a data: URI (base64)", param=param
        )
    if scheme == "file" or os.path.isabs(source):
        return _decode(_read_local(unquote(urlparse(source).path) if scheme == "file" else source, allowed_local_media_path, param), param)
    if scheme:
        raise InvalidRequestError(f"{param}: unsupported image URL scheme {scheme!r}", param=param)
    return _decode(_b64(source, param), param)


def image_hash(image: Image.Image) -> int:
    """A 63-bit hash of the decoded pixels: the same picture is the same key whatever file it came in."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=8)
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def _b64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"{param}: the image is not valid base64 ({e})", param=param) from e


def _read_local(path: str, allowed: str | None, param: str) -> bytes:
    if allowed is None:
        raise InvalidRequestError(f"{param}: local image files are off (start the server with --allowed-local-media-path)", param=param)
    root = os.path.realpath(allowed)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise InvalidRequestError(f"{param}: {path} is outside --allowed-local-media-path", param=param)
    try:
        with open(real, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidRequestError(f"{param}: cannot read {path}: {e.strerror}", param=param) from e


def _decode(data: bytes, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidRequestError(f"{param}: the image cannot be decoded ({e})", param=param) from e
    if image.width * image.height > _MAX_PIXELS:
        raise InvalidRequestError(f"{param}: the image has {image.width}x{image.height} pixels, more than allowed", param=param)
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # a truncated file fails only when decoded
        raise InvalidRequestError(f"{param}: the image cannot be decoded ({e})", param=param) from e
