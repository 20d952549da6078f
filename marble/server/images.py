"""Images in and out of HTTP: base64 and uploaded bytes to PIL, with size caps checked before decoding."""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from marble.request import RequestError
from marble.server.limits import LimitError, ServerLimits

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, what: str) -> bytes:
    """Plain base64 or a data: URL (A1111 clients send both)."""
    if not isinstance(text, str):
        raise RequestError(f"the {what} must be a base64 string")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"the {what} is not valid base64") from None
    if not data:
        raise RequestError(f"the {what} is empty")
    return data


def open_image(data: bytes, what: str, limits: ServerLimits) -> Image.Image:
    """Decode an uploaded image fully (so a truncated file fails here, not mid-generation).

    The pixel count is read from the header and checked before the pixels are decoded, so a small
    file that claims to be huge (a decompression bomb) costs nothing."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = image.size
        if w * h > limits.max_input_pixels:
            raise LimitError(f"the {what} is {w}x{h}; this server's limit is {limits.max_input_pixels} pixels")
        image.load()
    except RequestError:
        raise
    except Exception:  # any failure to decode untrusted bytes is the sender's (PIL raises many kinds)
        raise RequestError(f"the {what} is not a readable image ({', '.join(FORMATS)})") from None
    return image


def base64_image(text: str, what: str, limits: ServerLimits) -> Image.Image:
    return open_image(decode_base64(text, what), what, limits)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
