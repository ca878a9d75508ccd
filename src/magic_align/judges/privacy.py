"""What may leave the machine, and in what form.

Three rules (private by default: docs/method.md section 11.3, docs/judges.md "Privacy"):

1. Every image sent to an HTTP judge is downscaled and re-encoded as a PNG built from its pixels alone, so no
   EXIF, ICC profile, text chunk or file name travels with it.
2. An HTTP judge whose `base_url` is not a loopback address (this includes the default OpenAI API) is refused
   unless `judge.allow_remote = true`.
3. Only synthetic images go to an HTTP judge unless `judge.send_real_images = true`. Judges that run in this
   process (hf, rules, human) never send anything, so they may grade real images.
"""

from __future__ import annotations

import base64
import ipaddress
from urllib.parse import urlsplit

from PIL import Image

from magic_align.config import JudgeConfig
from magic_align.data.images import encode_png
from magic_align.errors import MagicError

OPENAI_API_URL = "https://api.openai.com/v1"
# Backends that call an HTTP endpoint; the others grade in this process.
SENDING_BACKENDS = ("openai",)


class PrivacyError(MagicError, ValueError):
    """An image or endpoint that the configuration does not allow; the message says which setting allows it."""


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(base_url: str, allow_remote: bool) -> None:
    """Refuse a non-loopback endpoint unless the configuration allows remote judges."""
    if allow_remote or is_loopback_url(base_url):
        return
    raise PrivacyError(
        f"judge.base_url = {base_url!r} is not a loopback address: images would leave this machine. "
        "Set judge.allow_remote = true to allow a remote judge (only synthetic images are sent unless "
        "judge.send_real_images = true), or point judge.base_url at a local server such as "
        "http://127.0.0.1:8000/v1."
    )


def sends_images(cfg: JudgeConfig) -> bool:
    """Whether the configured judge sends images over HTTP (an ensemble does if any member does)."""
    if cfg.backend == "ensemble":
        return any(member.split(":", 1)[0] in SENDING_BACKENDS for member in cfg.members)
    return cfg.backend in SENDING_BACKENDS


def may_send(sample_is_synthetic: bool, cfg: JudgeConfig) -> bool:
    return sample_is_synthetic or cfg.send_real_images or not sends_images(cfg)


def check_may_send(sample_is_synthetic: bool, cfg: JudgeConfig) -> None:
    """Raise PrivacyError for a real (patient-derived) image bound for an HTTP judge without permission."""
    if not may_send(sample_is_synthetic, cfg):
        raise PrivacyError(
            f"refusing to send a real image to the {cfg.backend} judge: only synthetic images are sent by default. "
            "Set judge.send_real_images = true if the images may be shared with that endpoint."
        )


# ------------------------------------------------------------------------------------------- images
def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """RGB copy whose longest side is at most `max_side` (never upscaled)."""
    rgb = image.convert("RGB")
    longest = max(rgb.size)
    if longest <= max_side:
        return rgb
    scale = max_side / longest
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.LANCZOS)


def prepare_image(image: Image.Image, max_side: int) -> bytes:
    """The bytes sent to a judge: downscaled to `max_side`, a PNG of the pixels only (no metadata)."""
    return encode_png(downscale(image, max_side))


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
