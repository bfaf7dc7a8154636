"""The table of malformed and unusual inputs (issue 14), shared by `anonymize` (tests/test_inputs.py) and the
worker against a real broker (tests/integration/test_inputs_kafka.py).

Every row is generated here from one base picture with a face (grace_hopper.jpg, scaled down), so that a
published frame can be checked for what matters: the face is masked (never the raw pixels) and the frame is
upright and the same picture (orientation applied). Each row documents its outcome for both entry points:
`Published(frames)` (that many frames published), `Failed(reason)` (a dropped frame: summary `errors` with
side `input`, or a dead letter with that `dlq-reason`), `Skipped(reason)` (anonymize's `skipped`); `kafka` is
None for rows that exist only on a file system (links, folders, outputs).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from veilstream.decoding.images import Frame

BASE_SIZE = (320, 240)  # width, height: small enough to keep the table fast, large enough to find the face


@dataclass(frozen=True)
class Published:
    frames: int = 1


@dataclass(frozen=True)
class Failed:
    reason: str
    published_before: int = 0  # frames of a multi-frame file published before the broken one


@dataclass(frozen=True)
class Skipped:
    reason: str


Outcome = Published | Failed | Skipped


@dataclass(frozen=True)
class Case:
    """One input. `name` is its file name; `make` writes it under a folder (bytes, or links and folders)."""

    name: str
    make: Callable[[Path], None]
    cli: Outcome
    kafka: Outcome | None
    content_type: str | None = None  # the content-type header of its Kafka message (None: sniffed)
    reference: Callable[[Frame], Frame] | None = None  # the upright decoded picture, from the base (default: it)
    blocked_output: bool = False  # the test puts a folder where its output goes: an error on the output side
    steps: bool = False  # frame i of a multi-frame input is the base brightened by i steps

    def data(self, folder: Path) -> bytes:
        """Make the input under `folder` and return its bytes (for a Kafka message)."""
        self.make(folder)
        return (folder / self.name).read_bytes()

    def expected(self, base: Frame, index: int | None) -> Frame:
        """What frame `index` of this input looks like once decoded and upright, before anonymization."""
        picture = _brighter(base, index or 0) if self.steps else base
        return self.reference(picture) if self.reference else picture


def published_problem(pixels: Frame, boxes: list[tuple[float, float, float, float]], expected: Frame) -> str | None:
    """What is wrong with a published frame, or None: it must be the expected upright picture outside the faces,
    and every face box must be masked (the test config's anonymizer fills it with 128): never raw pixels."""
    if pixels.shape != expected.shape:
        return f"shape {pixels.shape}, the upright input is {expected.shape}"
    if not boxes:
        return "no face was found, so nothing was anonymized"
    outside = np.ones(pixels.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in boxes:
        left, top, right, bottom = round(x1), round(y1), round(x2), round(y2)
        width, height = right - left, bottom - top
        inner = pixels[top + height // 4 : bottom - height // 4, left + width // 4 : right - width // 4]
        if inner.size == 0 or inner.std() > 8 or abs(float(inner.mean()) - 128) > 8:
            return (
                f"face box {(left, top, right, bottom)} is not masked (mean {inner.mean():.0f}, std {inner.std():.1f})"
            )
        margin_x, margin_y = width // 4, height // 4
        outside[max(0, top - margin_y) : bottom + margin_y, max(0, left - margin_x) : right + margin_x] = False
    if outside.mean() < 0.2:
        return f"the face boxes {boxes} cover nearly the whole frame"
    difference = np.abs(grey(pixels)[..., 0].astype(int) - grey(expected)[..., 0].astype(int))[outside].mean()
    if difference > 16:
        return f"differs from the upright input by {difference:.1f} grey levels outside the faces"
    return None


def base_frame(media: Path) -> Frame:
    """Grace Hopper's portrait, small and off-centre on a smooth random background (no symmetry, so a frame
    published the wrong way round shows)."""
    bgr = cv2.imread(str(media / "grace_hopper.jpg"))
    assert bgr is not None
    portrait = cv2.cvtColor(cv2.resize(bgr, (120, 140), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    coarse = np.random.default_rng(14).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    frame = cv2.resize(coarse, BASE_SIZE, interpolation=cv2.INTER_CUBIC)
    frame[60:200, 180:300] = portrait
    return np.ascontiguousarray(frame)


def grey(frame: Frame) -> Frame:
    value = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(np.repeat(value[:, :, None], 3, axis=2))


# Stored pixels for each EXIF orientation, such that turning them upright gives the base picture back.
_STORED: dict[int, Callable[[Frame], Frame]] = {
    1: lambda f: f,
    2: lambda f: f[:, ::-1],
    3: lambda f: f[::-1, ::-1],
    4: lambda f: f[::-1],
    5: lambda f: f.swapaxes(0, 1),
    6: lambda f: np.rot90(f, k=1),
    7: lambda f: np.rot90(f, k=-1)[::-1],
    8: lambda f: np.rot90(f, k=-1),
}


def _pil(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` (the pixels are not there)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _patched(data: bytes, offset: int, fields: bytes) -> bytes:
    return data[:offset] + fields + data[offset + len(fields) :]


def _brighter(base: Frame, steps: int) -> Frame:
    brighter: Frame = np.clip(base.astype(int) + 12 * steps, 0, 255).astype(np.uint8)
    return brighter


def _frames(base: Frame, count: int) -> list[Image.Image]:
    """`count` different frames of the base picture (brightness steps), each with the face."""
    return [Image.fromarray(_brighter(base, i)) for i in range(count)]


def _video(path: Path, frames: list[Frame], size: tuple[int, int] = BASE_SIZE) -> None:
    """An MJPG .avi of `frames` (none: a valid container with no frame)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5.0, size)
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _many_frames_gif(count: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i % 256, i // 256 * 40, 7)) for i in range(count)]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _animation(base: Frame, fmt: str, count: int, **options: object) -> bytes:
    frames = _frames(base, count)
    return _pil(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


def _file(name: str, build: Callable[[], bytes]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_bytes(build())

    return make


def _nothing(folder: Path) -> None:
    """For a row whose path another row creates."""


def _folder_with_image(name: str, data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).mkdir()
        (folder / name / "inner.jpg").write_bytes(data)

    return make


def _links(*pairs: tuple[str, str]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        for name, target in pairs:
            (folder / name).symlink_to(target)

    return make


def cases(base: Frame) -> list[Case]:
    """The table (see the module docstring)."""
    rgb = Image.fromarray(base)
    jpeg = _pil(rgb, "JPEG", quality=92)
    png = _pil(rgb, "PNG")
    grey16 = (cv2.cvtColor(base, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257).astype(np.uint16)
    rgb16 = cv2.imencode(".png", cv2.cvtColor(base, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)[1].tobytes()
    png_grey16 = cv2.imencode(".png", grey16)[1].tobytes()

    huge_page = Image.new("1", (8000, 6000))  # 48 Mpx on page 2, a few kB deflated
    corrupt_video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20
    clip = [np.asarray(frame) for frame in _frames(base, 3)]
    multiple, unknown = Failed("multiple_frames"), Failed("unknown_format")

    def cut(data: bytes, keep: float = 0.6) -> Callable[[], bytes]:
        return lambda: data[: int(len(data) * keep)]

    def image(
        name: str,
        build: Callable[[], bytes],
        kafka: Outcome = Published(),
        content_type: str | None = None,
        reference: Callable[[Frame], Frame] | None = None,
    ) -> Case:
        return Case(name, _file(name, build), Published(), kafka, content_type, reference)

    def failed(name: str, build: Callable[[], bytes], reason: str) -> Case:
        return Case(name, _file(name, build), Failed(reason), Failed(reason))

    table = [
        # Formats, colour models and depths: published, face masked.
        image("plain.jpg", lambda: jpeg),
        image("plain.png", lambda: png),
        image("plain.webp", lambda: _pil(rgb, "WEBP", quality=92)),
        image("plain.bmp", lambda: _pil(rgb, "BMP")),
        image("plain.tif", lambda: _pil(rgb, "TIFF")),
        image("plain-lzw.tiff", lambda: _pil(rgb, "TIFF", compression="tiff_lzw")),
        image("still.gif", lambda: _pil(rgb, "GIF")),
        image("progressive.jpg", lambda: _pil(rgb, "JPEG", quality=92, progressive=True)),
        image("grey.jpg", lambda: _pil(rgb.convert("L"), "JPEG", quality=92), reference=grey),
        image("grey16.png", lambda: png_grey16, reference=grey),
        image("rgb16.png", lambda: rgb16),
        image("grey16.tif", lambda: _pil(Image.fromarray(grey16), "TIFF"), reference=grey),
        image("cmyk.jpg", lambda: _pil(rgb.convert("CMYK"), "JPEG", quality=92)),
        image("cmyk.tif", lambda: _pil(rgb.convert("CMYK"), "TIFF")),
        image("alpha.png", lambda: _pil(rgb.convert("RGBA"), "PNG")),
        image("grey-alpha.png", lambda: _pil(rgb.convert("LA"), "PNG"), reference=grey),
        image("alpha.webp", lambda: _pil(rgb.convert("RGBA"), "WEBP", lossless=True)),
        image("palette.png", lambda: _pil(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        image("palette.bmp", lambda: _pil(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "BMP")),
        image("trailer.jpg", lambda: jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(512)),  # a motion photo's tail
        # EXIF orientation: turned upright before detection, published upright.
        *(image(f"exif-{o}.jpg", _oriented(base, o, "JPEG", quality=92, exif=_exif(o))) for o in range(1, 9)),
        image("exif-6.png", _oriented(base, 6, "PNG", exif=_exif(6))),
        image("exif-8.webp", _oriented(base, 8, "WEBP", lossless=True, exif=_exif(8))),
        image("exif-5.tif", _oriented(base, 5, "TIFF", tiffinfo={0x0112: 5})),
        image("exif-9.jpg", lambda: _pil(rgb, "JPEG", quality=92, exif=_exif(9))),  # out of range: as stored
        # Several frames: each a frame of its own from files; one frame per Kafka message.
        Case(
            "animated.gif",
            _file("animated.gif", lambda: _animation(base, "GIF", 3)),
            Published(3),
            multiple,
            steps=True,
        ),
        Case("pages.tif", _file("pages.tif", lambda: _animation(base, "TIFF", 3)), Published(3), multiple, steps=True),
        Case(
            "animated.webp",
            _file("animated.webp", lambda: _animation(base, "WEBP", 2, lossless=True)),
            Published(2),
            multiple,
            steps=True,
        ),
        # A message's declared type must match its bytes; a file's bytes decide, whatever its name.
        image("png-named.jpg", lambda: png, Failed("content_type_mismatch"), content_type="image/jpeg"),
        image("heic-declared.jpg", lambda: jpeg, Failed("bad_header"), content_type="image/heic"),
        image("bmp-declared.bmp", lambda: _pil(rgb, "BMP"), content_type="image/bmp"),
        image("tiff-declared.tif", lambda: _pil(rgb, "TIFF"), content_type="image/tiff"),
        # Truncated files of each format.
        failed("truncated.jpg", cut(jpeg), "truncated"),
        failed("truncated-progressive.jpg", cut(_pil(rgb, "JPEG", quality=92, progressive=True)), "truncated"),
        failed("truncated.png", cut(png), "truncated"),
        failed("truncated.webp", cut(_pil(rgb, "WEBP", quality=92)), "truncated"),
        failed("truncated.bmp", cut(_pil(rgb, "BMP")), "truncated"),
        failed("truncated.tif", cut(_pil(rgb, "TIFF")), "truncated"),
        failed("truncated.gif", cut(_pil(rgb, "GIF")), "truncated"),
        Case(
            "truncated-animated.gif",
            _file("truncated-animated.gif", cut(_animation(base, "GIF", 3), 0.9)),
            Failed("truncated", published_before=2),
            multiple,
            steps=True,
        ),
        # Not images at all, or lying about their size.
        failed("empty.jpg", lambda: b"", "empty"),
        failed("text.jpg", lambda: b"this is not an image\n" * 20, "unknown_format"),
        failed("random.png", lambda: np.random.default_rng(7).bytes(4000), "unknown_format"),
        failed("wrong-magic.jpg", lambda: b"\x00\x00\x00\x00" + jpeg[4:], "unknown_format"),
        failed("bomb.png", lambda: _png_declaring(50_000, 50_000), "decompression_bomb"),
        failed("huge.png", lambda: _png_declaring(9000, 9000), "too_large"),
        failed(
            "bomb.gif", lambda: _patched(_pil(rgb, "GIF"), 6, struct.pack("<HH", 65535, 65535)), "decompression_bomb"
        ),
        failed(
            "bomb.bmp", lambda: _patched(_pil(rgb, "BMP"), 18, struct.pack("<ii", 60_000, 60_000)), "decompression_bomb"
        ),
        failed("huge-page.tif", lambda: _pil(rgb, "TIFF", save_all=True, append_images=[huge_page]), "too_large"),
        failed("many-frames.gif", lambda: _many_frames_gif(1001), "too_many_frames"),
        failed("zero-width.png", lambda: _png_declaring(0, 240), "corrupt_header"),
        failed("zero-width.bmp", lambda: _patched(_pil(rgb, "BMP"), 18, struct.pack("<i", 0)), "corrupt_header"),
        failed("one-pixel.png", lambda: _pil(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        failed("sliver.png", lambda: _pil(rgb.resize((1, 240)), "PNG"), "too_small"),
        failed(
            "float.tif", lambda: _pil(Image.fromarray(grey16.astype(np.float32)), "TIFF"), "unsupported_pixel_format"
        ),
        # Videos, read frame by frame from files. A message is one image, so a video file is not a frame.
        Case("corrupt.mp4", _file("corrupt.mp4", lambda: corrupt_video), Failed("unreadable_video"), unknown),
        Case("no-frames.avi", lambda folder: _video(folder / "no-frames.avi", []), Failed("empty_video"), unknown),
        Case("clip.avi", lambda folder: _video(folder / "clip.avi", clip), Published(3), unknown, steps=True),
        # Paths that are not inputs, or whose output is in the way (files only).
        Case("notes.txt", _file("notes.txt", lambda: b"not an input\n"), Skipped("unsupported_type"), None),
        Case("folder.jpg", _folder_with_image("folder.jpg", jpeg), Skipped("directory"), None),
        Case("folder.jpg/inner.jpg", _nothing, Published(), None),
        Case("broken-link.jpg", _links(("broken-link.jpg", "missing.jpg")), Skipped("broken_link"), None),
        Case(
            "loop-a.jpg",
            _links(("loop-a.jpg", "loop-b.jpg"), ("loop-b.jpg", "loop-a.jpg")),
            Skipped("symlink_loop"),
            None,
        ),
        Case("loop-b.jpg", _nothing, Skipped("symlink_loop"), None),
        Case("blocked-output.png", _file("blocked-output.png", lambda: png), Published(), None, blocked_output=True),
    ]
    return table


def _oriented(base: Frame, orientation: int, fmt: str, **options: object) -> Callable[[], bytes]:
    """The base picture stored turned, with the orientation tag that turns it upright again."""
    return lambda: _pil(Image.fromarray(np.ascontiguousarray(_STORED[orientation](base))), fmt, **options)
