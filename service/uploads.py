"""Untrusted image uploads for the edit endpoints: multipart parsing in memory, and images and
masks decoded safely.

Parsing: Starlette's `MultiPartParser` (python-multipart underneath), driven here rather than
through FastAPI's form parameters, for two reasons. Starlette spools each uploaded file to a
temporary file on disk past 1 MiB (`MultiPartParser.spool_max_size`, a class attribute that
neither `Request.form()` nor FastAPI exposes); here it is raised to QDS_MAX_UPLOAD_BYTES on
the parser instance, and since the body limit middleware refuses any multipart body over that
size while it streams in, no upload ever rolls over to disk. And OpenAI's clients name the
image field `image` for one file and `image[]` for a list, which a form model cannot take as
one field.

Decoding (Pillow):
- the format is sniffed from the bytes (`Image.open(..., formats=PNG/JPEG/WEBP)`: Pillow's
  own signature checks), never taken from the file name or the part's content type;
- decompression bombs: `Image.open` reads only the header, so the pixel count is checked
  against QDS_MAX_UPLOAD_PIXELS before any pixel is decoded. Pillow's global
  `Image.MAX_IMAGE_PIXELS` (89.5 M, an error at twice that) is left alone: the setting cannot
  exceed it (service.settings), so ours is always the check that fires, and Pillow's own
  `DecompressionBombError` is answered the same way should the global be lowered;
- EXIF orientation is applied (`ImageOps.exif_transpose`), to the mask too, so a phone photo
  is edited the way it is displayed and a mask drawn over that display lines up;
- animated PNG / WebP: the first frame;
- the image to edit is flattened onto white if it has transparency.

Masks follow OpenAI: fully transparent pixels (alpha 0) mark the area to edit; the mask must
have an alpha channel (else 400 `invalid_mask_image_format`, as OpenAI answers) and the same
dimensions as the image (else 400). A mask without a single transparent pixel would change
nothing, so it is refused too.

Several images (`image[]`): OpenAI's GPT image models take up to 16 as references. A diffusion
img2img / inpainting pipeline edits exactly one init image and has no input for references, so
more than one is refused (400 naming the count) rather than silently using the first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps
from starlette.formparsers import MultiPartException, MultiPartParser

from service.exceptions import InvalidValue
from service.lora_form import form_lora, is_lora_field

if TYPE_CHECKING:
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
# OpenAI's own limit on images per edit, plus the mask: parsing stops beyond it.
MAX_FILES = 16 + 1
# Text fields of an edit request (OpenAI's, our extensions) with room for clients' extras.
MAX_FIELDS = 64


@dataclass
class EditForm:
    """The multipart body: text fields (each once; `lora` gathered into a list), image files
    in order, the mask."""

    fields: dict[str, Any]
    images: list[bytes]
    mask: bytes | None


@dataclass(frozen=True)
class EditImages:
    """Decoded, validated uploads: `image` RGB; `mask` "L", 255 where to edit, image-sized.
    Both already brought down to what the edit needs (`bound`), so no full-resolution
    upload is kept here or pickled to the engine; `input_size` is the upload's own size."""

    image: Image.Image
    mask: Image.Image | None
    input_size: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.input_size == (0, 0):
            object.__setattr__(self, "input_size", self.image.size)


async def read_edit_form(request: Request, max_upload_bytes: int) -> EditForm:
    """Parse a multipart/form-data edit request, every file kept in memory."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise InvalidValue(
            "image edits take multipart/form-data (files in `image` / `image[]` and `mask`, "
            f"the other fields as text parts); got {media_type or 'no content type'}",
            code="invalid_content_type",
        )
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=MAX_FILES, max_fields=MAX_FIELDS
    )
    # Never roll over to a temporary file: the body limit bounds every file by this.
    parser.spool_max_size = max_upload_bytes
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidValue(
            f"malformed multipart body: {exc.message}", code="invalid_multipart"
        ) from None
    try:
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        mask: bytes | None = None
        lora_parts: list[tuple[str, str]] = []
        for name, value in form.multi_items():
            if isinstance(value, str) and is_lora_field(name):
                lora_parts.append((name, value))  # repeated by design (service.lora_form)
                continue
            if isinstance(value, str):
                if name in (*IMAGE_FIELDS, MASK_FIELD):
                    raise InvalidValue(
                        f"{name} must be a file part (multipart with a filename), not text",
                        param=_base(name),
                    )
                if name in fields:
                    raise InvalidValue(f"{name} is given more than once", param=name)
                fields[name] = value
            elif name in IMAGE_FIELDS:
                images.append(await _read(value))
            elif name == MASK_FIELD:
                if mask is not None:
                    raise InvalidValue("mask is given more than once", param="mask")
                mask = await _read(value)
            else:
                raise InvalidValue(
                    f"unexpected file field {name!r}; files go in image / image[] and mask",
                    param=name,
                )
        if lora_parts:
            fields["lora"] = form_lora(lora_parts)
        return EditForm(fields, images, mask)
    finally:
        await form.close()


async def _read(upload: UploadFile) -> bytes:
    # In memory (see spool_max_size): a read of a BytesIO.
    return await upload.read()


def _base(name: str) -> str:
    return name.removesuffix("[]")


def decode_edit_images(
    form: EditForm,
    max_pixels: int,
    *,
    output_size: tuple[int, int] | None = None,
    fit_pixels: int | None = None,
) -> EditImages:
    """The image to edit and the mask, decoded and checked (CPU work: call it in a thread
    for large uploads), then brought down to what the edit needs: to `output_size` when the
    request names it (the pipeline resizes to it anyway), else to at most `fit_pixels`
    (aspect kept; the output is never larger than QDS_MAX_PIXELS). The full-resolution
    decode lives only inside this call."""
    if not form.images:
        raise InvalidValue(
            "image is required: the image to edit, as a file part named image (or image[])",
            param="image",
            code="missing_required_parameter",
        )
    if len(form.images) > 1:
        raise InvalidValue(
            f"got {len(form.images)} images; this server edits one image per request (a "
            "diffusion img2img / inpainting model takes one input image, no references)",
            param="image",
            code="too_many_images",
        )
    image = decode(form.images[0], "image", max_pixels)
    input_size = image.size
    target = bound(input_size, output_size, fit_pixels)
    mask = None
    if form.mask is not None:
        mask = edit_area(decode(form.mask, "mask", max_pixels), input_size)
        if mask.size != target:
            mask = mask.resize(target, Image.Resampling.NEAREST)  # stays 0 / 255
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return EditImages(image=flatten(image), mask=mask, input_size=input_size)


def bound(
    size: tuple[int, int], output_size: tuple[int, int] | None, fit_pixels: int | None
) -> tuple[int, int]:
    """The size an upload is kept at: the output size when known, else its own size scaled
    down (aspect kept) to at most `fit_pixels`; never larger than the upload."""
    width, height = size
    if output_size is not None and output_size[0] * output_size[1] < width * height:
        return output_size
    if fit_pixels and width * height > fit_pixels:
        scale = (fit_pixels / (width * height)) ** 0.5
        return max(1, int(width * scale)), max(1, int(height * scale))
    return size


def decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode an untrusted PNG / JPEG / WebP, refusing oversized ones before decoding pixels;
    EXIF orientation applied."""
    if not data:
        raise InvalidValue(f"{field} is an empty file", param=field, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, None, max_pixels) from None
    except Exception:  # UnidentifiedImageError, or a header Pillow could not parse
        raise InvalidValue(
            f"{field} is not a PNG, JPEG or WebP image (checked from its bytes, not its name "
            "or content type)",
            param=field,
            code="invalid_image_format",
        ) from None
    width, height = img.size
    if width * height > max_pixels:
        raise _too_many_pixels(field, (width, height), max_pixels)
    try:
        img.load()
        # A copy with the orientation applied (or the image itself when there is none).
        oriented = ImageOps.exif_transpose(img)
    except Exception as exc:  # truncated data, corrupt chunks, broken EXIF: the file's fault
        raise InvalidValue(
            f"{field} could not be decoded as {img.format}: {exc}",
            param=field,
            code="invalid_image",
        ) from None
    return oriented if oriented is not None else img


def _too_many_pixels(field: str, size: tuple[int, int] | None, max_pixels: int) -> InvalidValue:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "too many pixels"
    return InvalidValue(
        f"{field} has {what}; uploads may have at most QDS_MAX_UPLOAD_PIXELS={max_pixels}",
        param=field,
        code="image_too_large",
    )


def flatten(img: Image.Image) -> Image.Image:
    """RGB, transparent areas composited onto white (their hidden color is arbitrary)."""
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def edit_area(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (alpha 0 = edit here) as the pipelines' (white = repaint)."""
    if not mask.has_transparency_data:
        raise InvalidValue(
            f"Invalid mask image format - mask image missing alpha channel (mode {mask.mode}): "
            "the mask's fully transparent pixels (alpha 0) mark the area to edit; send an RGBA "
            "PNG",
            param="mask",
            code="invalid_mask_image_format",
        )
    if mask.size != image_size:
        raise InvalidValue(
            f"mask is {mask.size[0]}x{mask.size[1]} but image is {image_size[0]}x"
            f"{image_size[1]}; the mask must have the same dimensions as the image",
            param="mask",
            code="invalid_mask_image",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    area = alpha.point(lambda a: 255 if a == 0 else 0)
    if area.getbbox() is None:
        raise InvalidValue(
            "mask has no fully transparent pixel (alpha 0), so nothing would be edited; make "
            "the area to edit transparent",
            param="mask",
            code="invalid_mask_image",
        )
    return area
