"""service/uploads.py without a server: multipart kept in memory, formats sniffed from bytes,
pixel limits checked before decoding, EXIF orientation, OpenAI's mask rules, and the resolve
step's edit branch (sizes, strength defaults)."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image, ImageFile
from starlette import formparsers
from starlette.requests import Request

from pipelines.edit import EditRequest
from pipelines.loader import ModelDefaults
from service.exceptions import InvalidValue
from service.processor import ImageParams, resolve
from service.settings import ServiceSettings
from service.uploads import (
    EditForm,
    EditImages,
    decode,
    decode_edit_images,
    read_edit_form,
)

LIMIT = 4096 * 4096


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgba_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """Opaque everywhere, transparent (alpha 0) inside `box`: OpenAI's 'edit here'."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny (invalid) IDAT: what a
    decompression bomb looks like to a parser that reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def refused(fn: Any, *args: Any) -> InvalidValue:
    with pytest.raises(InvalidValue) as info:
        fn(*args)
    return info.value


# -- formats ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode(fmt: str) -> None:
    img = decode(encode(Image.new("RGB", (20, 10), (200, 10, 10)), fmt), "image", LIMIT)
    assert img.size == (20, 10)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_other_formats_are_refused_from_their_bytes(fmt: str) -> None:
    err = refused(decode, encode(Image.new("RGB", (16, 16)), fmt), "image", LIMIT)
    assert (err.param, err.code) == ("image", "invalid_image_format")
    assert "not a PNG, JPEG or WebP image" in err.message


def test_text_and_empty_files_are_refused() -> None:
    assert refused(decode, b"%PDF-1.7 not an image", "image", LIMIT).code == (
        "invalid_image_format"
    )
    assert refused(decode, b"", "mask", LIMIT).param == "mask"


def test_truncated_png_is_a_400_naming_the_field() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    err = refused(decode, data[: len(data) // 2], "image", LIMIT)
    assert (err.param, err.code) == ("image", "invalid_image")
    assert "could not be decoded as PNG" in err.message


# -- decompression bombs ------------------------------------------------------------------
def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch) -> None:
    decoded: list[Any] = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original(self)
    )
    # 5000 x 5000 = 25 M pixels: under Pillow's own limit (89.5 M), over ours.
    err = refused(decode, png_header_only(5000, 5000), "image", LIMIT)
    assert (err.param, err.code) == ("image", "image_too_large")
    assert "5000x5000 = 25000000 pixels" in err.message
    assert f"QDS_MAX_UPLOAD_PIXELS={LIMIT}" in err.message
    assert decoded == []


def test_pillows_own_bomb_error_is_answered_the_same_way() -> None:
    # 20000 x 20000 = 400 M: Pillow refuses it inside Image.open (over 2 x MAX_IMAGE_PIXELS).
    err = refused(decode, png_header_only(20000, 20000), "image", LIMIT)
    assert err.code == "image_too_large"


def test_setting_cannot_exceed_pillows_limit() -> None:
    assert ServiceSettings.model_fields["max_upload_pixels"].metadata  # le is set
    assert ServiceSettings(max_upload_pixels=Image.MAX_IMAGE_PIXELS).max_upload_pixels
    with pytest.raises(ValueError, match="max_upload_pixels"):
        ServiceSettings(max_upload_pixels=Image.MAX_IMAGE_PIXELS + 1)


# -- EXIF, flattening -----------------------------------------------------------------------
def exif_rotated_jpeg() -> bytes:
    """Stored 40x20, red on the left; EXIF orientation 6: displayed rotated 90 deg clockwise
    (20x40, red on top)."""
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((220, 30, 30), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied() -> None:
    img = decode(exif_rotated_jpeg(), "image", LIMIT).convert("RGB")
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 180 and top[1] < 80 and min(bottom) > 200  # type: ignore[index]


def test_mask_is_compared_with_the_image_as_displayed() -> None:
    # A mask drawn over the displayed (20x40) image lines up with the rotated JPEG.
    mask = encode(rgba_mask((20, 40), (0, 0, 20, 20)))
    out = decode_edit_images(EditForm({}, [exif_rotated_jpeg()], mask), LIMIT)
    assert out.image.size == out.mask.size == (20, 40)  # type: ignore[union-attr]


def test_transparent_input_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (8, 8), (10, 200, 10, 0))
    img.paste((10, 20, 200, 255), (0, 0, 4, 8))
    out = decode_edit_images(EditForm({}, [encode(img)], None), LIMIT).image
    assert out.mode == "RGB"
    assert out.getpixel((6, 4)) == (255, 255, 255) and out.getpixel((1, 4)) == (10, 20, 200)


# -- masks (OpenAI's rules) -----------------------------------------------------------------
IMAGE = encode(Image.new("RGB", (32, 32), (255, 255, 255)))


def test_transparent_mask_pixels_become_the_area_to_repaint() -> None:
    mask = encode(rgba_mask((32, 32), (0, 0, 11, 32)))
    area = decode_edit_images(EditForm({}, [IMAGE], mask), LIMIT).mask
    assert area is not None and area.mode == "L"
    assert area.getpixel((5, 5)) == 255 and area.getpixel((20, 5)) == 0
    assert area.getbbox() == (0, 0, 11, 32)


def test_half_transparent_pixels_are_kept() -> None:
    # OpenAI: "fully transparent areas (alpha zero)"; alpha 1..255 is not edited.
    mask = rgba_mask((32, 32), (0, 0, 8, 32))
    mask.paste((0, 0, 0, 128), (8, 0, 16, 32))
    area = decode_edit_images(EditForm({}, [IMAGE], encode(mask)), LIMIT).mask
    assert area is not None and area.getbbox() == (0, 0, 8, 32)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_alpha_carrying_modes_work(mode: str) -> None:
    if mode == "LA":
        mask = Image.new("LA", (32, 32), (0, 255))
        mask.paste((0, 0), (0, 0, 10, 32))
        data = encode(mask)
    else:  # palette with a transparent index (tRNS)
        mask = Image.new("P", (32, 32), 1)
        mask.putpalette([0, 0, 0, 255, 255, 255])
        mask.paste(0, (0, 0, 10, 32))
        data = encode(mask, transparency=0)
    area = decode_edit_images(EditForm({}, [IMAGE], data), LIMIT).mask
    assert area is not None and area.getbbox() == (0, 0, 10, 32)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_mask_without_alpha_is_refused_as_openai_does(fmt: str) -> None:
    mask = encode(Image.new("RGB", (32, 32), (0, 0, 0)), fmt)
    err = refused(decode_edit_images, EditForm({}, [IMAGE], mask), LIMIT)
    assert (err.param, err.code) == ("mask", "invalid_mask_image_format")
    assert err.message.startswith("Invalid mask image format - mask image missing alpha channel")


def test_mask_of_another_size_is_refused() -> None:
    mask = encode(rgba_mask((64, 32), (0, 0, 8, 8)))
    err = refused(decode_edit_images, EditForm({}, [IMAGE], mask), LIMIT)
    assert (err.param, err.code) == ("mask", "invalid_mask_image")
    assert "mask is 64x32 but image is 32x32" in err.message


def test_fully_opaque_mask_is_refused() -> None:
    mask = encode(Image.new("RGBA", (32, 32), (0, 0, 0, 255)))
    err = refused(decode_edit_images, EditForm({}, [IMAGE], mask), LIMIT)
    assert err.param == "mask" and "no fully transparent pixel" in err.message


def test_image_count() -> None:
    err = refused(decode_edit_images, EditForm({}, [], None), LIMIT)
    assert (err.param, err.code) == ("image", "missing_required_parameter")
    err = refused(decode_edit_images, EditForm({}, [IMAGE, IMAGE, IMAGE], None), LIMIT)
    assert (err.param, err.code) == ("image", "too_many_images")
    assert "got 3 images" in err.message


# -- multipart parsing ----------------------------------------------------------------------
def request_for(files: Any = None, data: Any = None, content_type: str | None = None) -> Request:
    built = httpx.Request("POST", "http://x/v1/images/edits", files=files, data=data)
    body = built.read()
    headers = dict(built.headers)
    if content_type is not None:
        headers["content-type"] = content_type
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/edits",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def parse(request: Request, limit: int = 32 * 2**20) -> EditForm:
    return asyncio.run(read_edit_form(request, limit))


class RecordingSpool(formparsers.SpooledTemporaryFile):  # type: ignore[misc]
    rollovers = 0

    def rollover(self) -> None:
        RecordingSpool.rollovers += 1
        super().rollover()


def test_uploads_stay_in_memory_past_starlettes_spool_size(monkeypatch) -> None:
    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", RecordingSpool)
    RecordingSpool.rollovers = 0
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB: Starlette would spool it to disk at 1 MiB
    form = parse(request_for(files={"image": ("a.png", big)}, data={"prompt": "p"}))
    assert form.images == [big] and form.fields == {"prompt": "p"}
    assert RecordingSpool.rollovers == 0

    # The control: Starlette's own default does write it to a temporary file. (Its default,
    # set here: importing litserve, as the peer benchmark's tests do, raises the class-wide
    # spool size to sys.maxsize for the whole process.)
    monkeypatch.setattr(formparsers.MultiPartParser, "spool_max_size", 1024 * 1024)

    async def default_parser() -> None:
        req = request_for(files={"image": ("a.png", big)})
        form = await formparsers.MultiPartParser(req.headers, req.stream()).parse()
        await form.close()

    asyncio.run(default_parser())
    assert RecordingSpool.rollovers == 1


def test_image_and_image_array_fields_and_the_mask() -> None:
    files = [("image[]", ("a.png", b"A")), ("image[]", ("b.png", b"B")), ("mask", ("m", b"M"))]
    form = parse(request_for(files=files, data={"prompt": "p", "n": "2"}))
    assert form.images == [b"A", b"B"] and form.mask == b"M"
    assert form.fields == {"prompt": "p", "n": "2"}


@pytest.mark.parametrize(
    ("files", "data", "param", "text"),
    [
        (
            {"mask": ("m", b"M")},
            {"image": "https://x/y.png", "prompt": "p"},
            "image",
            "must be a file part",
        ),
        ({"markup": ("x.svg", b"<svg/>")}, {"prompt": "p"}, "markup", "unexpected file field"),
        (
            [("mask", ("m", b"1")), ("mask", ("m", b"2"))],
            {"prompt": "p"},
            "mask",
            "more than once",
        ),
        ({"image": ("a", b"A")}, {"prompt": ["a", "b"]}, "prompt", "more than once"),
    ],
)
def test_field_errors(files: Any, data: Any, param: str, text: str) -> None:
    with pytest.raises(InvalidValue, match=text) as info:
        parse(request_for(files=files, data=data))
    assert info.value.param == param


def test_not_multipart_and_malformed_bodies() -> None:
    with pytest.raises(InvalidValue, match="take multipart/form-data") as info:
        parse(request_for(data={"prompt": "p"}))
    assert info.value.code == "invalid_content_type"
    with pytest.raises(InvalidValue, match="malformed multipart body") as info:
        parse(request_for(files={"image": ("a", b"A")}, content_type="multipart/form-data"))
    assert info.value.code == "invalid_multipart"


def test_too_many_files_stop_the_parser() -> None:
    files = [("image[]", (f"{i}.png", b"x")) for i in range(18)]
    with pytest.raises(InvalidValue, match="Too many files"):
        parse(request_for(files=files))


# -- the resolve step's edit branch -------------------------------------------------------
DEFAULTS = ModelDefaults(size=32, steps=12, guidance=3.5, size_multiple=16)


def edit_params(size: tuple[int, int], mask: bool = False, **kw: Any) -> ImageParams:
    img = Image.new("RGB", size)
    area = Image.new("L", size, 255) if mask else None
    return ImageParams(prompt="p", seed=1, edit=EditImages(img, area), **kw)


def test_resolve_edit_size_and_strength() -> None:
    settings = ServiceSettings(max_pixels=256 * 256)
    r = resolve(edit_params((1000, 750)), settings, DEFAULTS)
    assert isinstance(r, EditRequest) and r.kind == "img2img"
    # The input's size scaled to fit 65536 pixels, multiples of 16 (not the model's 32x32).
    assert (r.width, r.height) == (288, 208) and r.strength == 0.6
    assert r.image is not None and r.image.size == (1000, 750)
    inpaint = resolve(edit_params((64, 48), mask=True), settings, DEFAULTS)
    assert (inpaint.width, inpaint.height, inpaint.strength) == (64, 48, 1.0)  # type: ignore[union-attr]
    # A lone side: the other follows the input's aspect ratio.
    lone = resolve(edit_params((64, 32), width=128), settings, DEFAULTS)
    assert (lone.width, lone.height) == (128, 64)
    given = resolve(edit_params((64, 32), width=32, height=32, strength=0.3), settings, DEFAULTS)
    assert (given.width, given.height, given.strength) == (32, 32, 0.3)  # type: ignore[union-attr]


def test_resolve_edit_size_rules_are_the_generation_rules() -> None:
    settings = ServiceSettings(max_pixels=64 * 64)
    err = refused(
        resolve,
        edit_params((64, 32), width=40, height=32, size_field="size"),
        settings,
        DEFAULTS,
    )
    assert (err.param, err.code) == ("size", "invalid_size")
    err = refused(
        resolve, edit_params((64, 32), width=128, height=128, size_field="size"), settings, DEFAULTS
    )
    assert (err.param, err.code) == ("size", "size_too_large")
