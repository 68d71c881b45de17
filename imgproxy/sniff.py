"""Decide from the first bytes of a body whether it is an allowed image, without decoding it.

The relay feeds the upstream body to a :class:`Sniffer` chunk by chunk and sends the client's
headers only once the sniffer has decided. The decision rests on the bytes alone: the declared
``Content-Type`` is not trusted (a real PNG declared ``application/octet-stream`` is relayed as
``image/png``; HTML declared ``image/png`` is refused). Only HEAD requests, which have no body, are
judged on the declared type (:meth:`SniffPolicy.judge_declared`).

Besides the format, the sniffer reads the pixel dimensions where the header holds them within the
sniff window and refuses images over ``max_pixels`` (a decompression-bomb guard that never decodes).
Formats whose dimensions may lie further in (JPEG after large metadata, ISO-BMFF ``ispe``, TIFF IFD,
ICO entries, the JPEG XL container) may look up to ``max_window`` bytes; when the dimensions are not
found by then the format is still certain and the image is accepted with unknown dimensions.

Decisions of note: APNG is served as ``image/png`` (browsers animate it under that type) and is the
``png`` format; CUR is the ``ico`` format (``image/x-icon``); BigTIFF is ``tiff``; the AVIF
sequence brand ``avis`` is ``avif``; every HEIF brand (``heic``, ``heix``, ``mif1``, ...) is
``heic`` (``image/heic``); other ISO-BMFF files (``isom``, ``mp42``, ``qt``) are refused as video.
SVG, also in UTF-16, is relayed only with ``allow_svg`` (the relay adds a sandboxing CSP); an HTML
page holding an inline ``<svg>`` is HTML and refused.
"""

from __future__ import annotations

import copy
import re
import struct
from collections.abc import Callable
from typing import Final, Union

import attrs

from imgproxy.errors import NotAnImage, TooLarge

FORMATS: Final[dict[str, str]] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
    "heic": "image/heic",
    "jxl": "image/jxl",
    "bmp": "image/bmp",
    "ico": "image/x-icon",
    "tiff": "image/tiff",
    "svg": "image/svg+xml",
}

DEFAULT_FORMATS: Final[frozenset[str]] = frozenset(f for f in FORMATS if f != "svg")

#: Other names users write for a format in ``--formats``.
_ALIASES: Final[dict[str, str]] = {
    "jpg": "jpeg",
    "apng": "png",
    "heif": "heic",
    "cur": "ico",
    "tif": "tiff",
}

#: Declared media types (lower case, without parameters) a HEAD response may carry.
_DECLARED: Final[dict[str, str]] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/png": "png",
    "image/x-png": "png",
    "image/apng": "png",
    "image/vnd.mozilla.apng": "png",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/heic": "heic",
    "image/heif": "heic",
    "image/heic-sequence": "heic",
    "image/heif-sequence": "heic",
    "image/jxl": "jxl",
    "image/bmp": "bmp",
    "image/x-bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/x-icon": "ico",
    "image/vnd.microsoft.icon": "ico",
    "image/tiff": "tiff",
    "image/svg+xml": "svg",
}

_MIN_WINDOW: Final = 32
_MAX_WINDOW: Final = 1 << 20


@attrs.frozen
class Sniffed:
    """What the bytes are: the format, the ``Content-Type`` to send, and the pixel dimensions
    when the header holds them within the window (``None`` when unknown)."""

    format: str
    content_type: str
    width: int | None = None
    height: int | None = None


def _check_formats(_policy: object, _attribute: object, value: frozenset[str]) -> None:
    if "svg" in value:
        raise ValueError("svg is enabled with --allow-svg, not --formats")
    unknown = sorted(value - DEFAULT_FORMATS)
    if unknown:
        known = ", ".join(sorted(DEFAULT_FORMATS))
        raise ValueError(f"unknown image format {unknown[0]!r} (known: {known})")
    if not value:
        raise ValueError("--formats must name at least one image format")


def _check_windows(policy: SniffPolicy, _attribute: object, value: int) -> None:
    if not _MIN_WINDOW <= policy.window <= value <= _MAX_WINDOW:
        raise ValueError(
            f"need {_MIN_WINDOW} <= window <= max_window <= {_MAX_WINDOW},"
            f" got window={policy.window} max_window={value}"
        )


def _positive(_policy: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class SniffPolicy:
    """Which images are relayed: the allowed raster ``formats``, whether SVG is (``allow_svg``),
    the pixel limit of the bomb guard, and the sniff windows in bytes."""

    formats: frozenset[str] = attrs.field(default=DEFAULT_FORMATS, validator=_check_formats)
    allow_svg: bool = False
    max_pixels: int = attrs.field(default=50_000_000, validator=_positive)
    window: int = 512
    max_window: int = attrs.field(default=65536, validator=_check_windows)

    def sniffer(self) -> Sniffer:
        """A fresh sniffer for one response body."""
        return Sniffer(self)

    def allows(self, fmt: str) -> bool:
        """Whether the format (a key of :data:`FORMATS`) may be relayed."""
        return self.allow_svg if fmt == "svg" else fmt in self.formats

    def judge_declared(self, content_type: str | None) -> str:
        """The canonical type to send for a body-less (HEAD) response declared ``content_type``.

        Without bytes the declared type is all there is: a missing, ``application/octet-stream``
        or non-image type is refused, though a GET of the same URL may be relayed after sniffing.

        :raises NotAnImage: the declared type is not an allowed image format.
        """
        media = (content_type or "").split(";", 1)[0].strip().lower()
        fmt = _DECLARED.get(media)
        if fmt is None:
            raise NotAnImage("Not an image: declared type")
        if not self.allows(fmt):
            raise NotAnImage(f"Image format not allowed: {fmt}")
        return FORMATS[fmt]

    @classmethod
    def parse_formats(cls, text: str) -> frozenset[str]:
        """Parse a ``--formats`` value such as ``"jpeg,png,webp"`` (aliases ``jpg``, ``apng``,
        ``heif``, ``cur``, ``tif`` accepted).

        :raises ValueError: naming an unknown format, ``svg`` (use ``--allow-svg``), or none.
        """
        names = [name.strip().lower() for name in text.split(",")]
        result = frozenset(_ALIASES.get(name, name) for name in names if name)
        _check_formats(cls, None, result)
        return result


_Buf = Union[bytes, bytearray]
_Dims = Union[tuple[int, int], None]
_DimsParser = Callable[[_Buf], _Dims]


def _found(fmt: str, dims: _Dims = None) -> Sniffed:
    if dims is None:
        return Sniffed(fmt, FORMATS[fmt])
    return Sniffed(fmt, FORMATS[fmt], dims[0], dims[1])


class _Stage:
    """One step of the decision. ``step`` looks at ``b[:n]`` and returns the decision, the next
    stage, or the total byte count it needs to go on; with ``final`` (no more bytes will come)
    it must not ask for more."""

    limit: int

    def step(self, b: _Buf, n: int, final: bool) -> Sniffed | _Stage | int:
        raise NotImplementedError


_Step = Union[Sniffed, _Stage, int]


class Sniffer:
    """Sniffs one body: :meth:`feed` the chunks until it returns a :class:`Sniffed` (stop
    feeding then) or raises; call :meth:`finish` at EOF when it has not decided yet.

    It keeps at most ``policy.max_window`` bytes, and looks at a first chunk in place.
    """

    def __init__(self, policy: SniffPolicy) -> None:
        self._policy = policy
        self._buf = bytearray()
        self._stage: _Stage = _Identify(policy)
        self._want = 0
        self._outcome: Sniffed | NotAnImage | TooLarge | None = None

    def feed(self, data: bytes) -> Sniffed | None:
        """Look at the next chunk.

        :returns: the decision, or ``None`` while more bytes are needed.
        :raises NotAnImage: the bytes are not an allowed image (``kind`` ``not-image``).
        :raises TooLarge: the header declares more than ``max_pixels`` (``too-many-pixels``).
        """
        if self._outcome is not None:
            return self._replay()
        if not data:
            return None
        buf = self._buf
        if buf:
            room = self._policy.max_window - len(buf)
            if room > 0:
                buf += data if len(data) <= room else data[:room]
            if len(buf) < self._want:
                return None
            return self._advance(buf, False)
        result = self._advance(data, False)
        if result is None:
            buf += data if len(data) <= self._policy.max_window else data[: self._policy.max_window]
        return result

    def finish(self) -> Sniffed:
        """Decide at EOF on what was seen.

        :raises NotAnImage: the body is not an allowed image (or is empty).
        :raises TooLarge: the header declares more than ``max_pixels``.
        """
        if self._outcome is not None:
            return self._replay()
        result = self._advance(self._buf, True)
        assert result is not None  # a final step always decides
        return result

    def _replay(self) -> Sniffed:
        if isinstance(self._outcome, Sniffed):
            return self._outcome
        assert self._outcome is not None
        raise copy.copy(self._outcome)

    def _advance(self, b: _Buf, eof: bool) -> Sniffed | None:
        try:
            result = self._run(b, eof)
        except (NotAnImage, TooLarge) as e:
            # Keep a copy without the traceback: the raised one's frames reference this sniffer
            # (and its caller), which would make a reference cycle.
            self._outcome = copy.copy(e).with_traceback(None)
            raise
        if result is not None:
            self._outcome = result
        return result

    def _run(self, b: _Buf, eof: bool) -> Sniffed | None:
        force = False
        while True:
            stage = self._stage
            n = min(len(b), stage.limit)
            final = eof or force or n >= stage.limit
            r: _Step = stage.step(b, n, final)
            if isinstance(r, _Stage):
                self._stage, force = r, False
            elif isinstance(r, Sniffed):
                return self._check_pixels(r)
            elif final:
                raise NotAnImage("Not an image: undecided")
            elif r > stage.limit or r <= n:
                force = True
            else:
                self._want = r
                return None

    def _check_pixels(self, s: Sniffed) -> Sniffed:
        if s.width is not None and s.height is not None:
            if s.width * s.height > self._policy.max_pixels:
                raise TooLarge(
                    f"Image too large: {s.width}x{s.height} pixels", kind="too-many-pixels"
                )
        return s


def _admit(policy: SniffPolicy, fmt: str, stage: _Stage) -> _Stage:
    if not policy.allows(fmt):
        raise NotAnImage(f"Image format not allowed: {fmt}")
    return stage


_PNG_SIG: Final = b"\x89PNG\r\n\x1a\n"
_JXL_SIG: Final = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"mif2", b"msf1"}
)
_RIFF_LABELS: Final = {b"WAVE": "audio", b"AVI ": "video"}
_NOT_IMAGE_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"%PDF-", "pdf"),
    (b"PK\x03\x04", "archive"),
    (b"PK\x05\x06", "archive"),
    (b"\x1f\x8b", "archive"),
    (b"BZh", "archive"),
    (b"\xfd7zXZ\x00", "archive"),
    (b"7z\xbc\xaf\x27\x1c", "archive"),
    (b"Rar!\x1a\x07", "archive"),
    (b"\x28\xb5\x2f\xfd", "archive"),
    (b"\x7fELF", "executable"),
    (b"MZ", "executable"),
    (b"\xfe\xed\xfa\xce", "executable"),
    (b"\xfe\xed\xfa\xcf", "executable"),
    (b"\xce\xfa\xed\xfe", "executable"),
    (b"\xcf\xfa\xed\xfe", "executable"),
    (b"\xca\xfe\xba\xbe", "executable"),
    (b"\x00asm", "executable"),
    (b"wOFF", "font"),
    (b"wOF2", "font"),
    (b"OTTO", "font"),
    (b"\x00\x01\x00\x00\x00", "font"),
    (b"ID3", "audio"),
    (b"OggS", "audio"),
    (b"fLaC", "audio"),
    (b"\x1a\x45\xdf\xa3", "video"),
)


class _Identify(_Stage):
    """The magic numbers, on the first 32 bytes (fewer at EOF)."""

    def __init__(self, policy: SniffPolicy) -> None:
        self.policy = policy
        self.limit = policy.window

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        if n < _MIN_WINDOW and not final:
            return _MIN_WINDOW
        if n == 0:
            raise NotAnImage("Not an image: empty")
        head = bytes(b[: min(n, _MIN_WINDOW)])
        policy, window, wide = self.policy, self.policy.window, self.policy.max_window
        if head.startswith(b"\xff\xd8\xff"):
            return _admit(policy, "jpeg", _Jpeg(wide))
        if head.startswith(_PNG_SIG):
            return _admit(policy, "png", _Header("png", 24, _png_dims, window))
        if head.startswith((b"GIF87a", b"GIF89a")):
            return _admit(policy, "gif", _Header("gif", 10, _gif_dims, window))
        if head.startswith(b"RIFF"):
            form = head[8:12]
            if form == b"WEBP" and head[12:16] in (b"VP8 ", b"VP8L", b"VP8X"):
                return _admit(policy, "webp", _Header("webp", 30, _webp_dims, window))
            raise NotAnImage(f"Not an image: {_RIFF_LABELS.get(form, 'unknown')}")
        if head[4:8] == b"ftyp":
            return _Ftyp(policy)
        if head.startswith(b"\xff\x0a"):
            return _admit(policy, "jxl", _JxlCodestream(0, None, window))
        if head.startswith(_JXL_SIG):
            return _admit(policy, "jxl", _JxlContainer(wide))
        if head[:4] in (b"II*\x00", b"MM\x00*") or head[:8] in (
            b"II+\x00\x08\x00\x00\x00",
            b"MM\x00+\x00\x08\x00\x00",
        ):
            return _admit(policy, "tiff", _Tiff(wide))
        if head.startswith(b"BM") and len(head) >= 18:
            if struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
                return _admit(policy, "bmp", _Header("bmp", 26, _bmp_dims, window))
        if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and _ico_plausible(head):
            return _admit(policy, "ico", _Ico(wide))
        for magic, label in _NOT_IMAGE_MAGIC:
            if head.startswith(magic):
                raise NotAnImage(f"Not an image: {label}")
        return _Text(policy)


class _Header(_Stage):
    """A format whose dimensions sit at a fixed place in the first ``need`` bytes."""

    def __init__(self, fmt: str, need: int, parse: _DimsParser, limit: int) -> None:
        self.fmt, self.need, self.parse, self.limit = fmt, need, parse, limit

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        if n < self.need:
            return _found(self.fmt) if final else self.need
        return _found(self.fmt, self.parse(b))


def _png_dims(b: _Buf) -> _Dims:
    if b[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", b, 16)


def _gif_dims(b: _Buf) -> _Dims:
    return struct.unpack_from("<HH", b, 6)


def _webp_dims(b: _Buf) -> _Dims:
    chunk = b[12:16]
    if chunk == b"VP8 ":
        if b[23:26] != b"\x9d\x01\x2a":
            return None
        w, h = struct.unpack_from("<HH", b, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if b[20] != 0x2F:
            return None
        bits = struct.unpack_from("<I", b, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    w = int.from_bytes(b[24:27], "little") + 1
    return w, int.from_bytes(b[27:30], "little") + 1


def _bmp_dims(b: _Buf) -> _Dims:
    if struct.unpack_from("<I", b, 14)[0] == 12:
        return struct.unpack_from("<HH", b, 18)
    w, h = struct.unpack_from("<ii", b, 18)
    return abs(w), abs(h)


def _ico_plausible(head: bytes) -> bool:
    """ICO/CUR's magic is weak: ask for a directory entry that points past the directory."""
    if len(head) < 22:
        return False
    count, size, offset = struct.unpack_from("<H8xII", head, 4)
    return bool(count > 0 and size > 0 and offset >= 6 + 16 * count)


class _Ico(_Stage):
    """ICO/CUR: the largest directory entry; an entry stored as PNG by its IHDR (the directory
    says at most 256 pixels, the PNG can say more)."""

    fmt = "ico"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        count: int = struct.unpack_from("<H", b, 4)[0]
        end = 6 + 16 * count
        if n < end and not final:
            return end
        entries = range(6, min(end, n - 15), 16)
        offsets = [struct.unpack_from("<I", b, e + 12)[0] for e in entries]
        need = max((o + 24 for o in offsets if o + 24 <= self.limit), default=0)
        if n < need and not final:
            return need
        best: _Dims = None
        for e, offset in zip(entries, offsets, strict=True):
            dims = (b[e] or 256, b[e + 1] or 256)
            if offset + 24 <= n and b[offset : offset + 8] == _PNG_SIG:
                dims = _png_dims(b[offset : offset + 24]) or dims
            if best is None or dims[0] * dims[1] > best[0] * best[1]:
                best = dims
        return _found(self.fmt, best)


_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class _Jpeg(_Stage):
    """JPEG: walk the marker segments to the SOF, resuming where the last step stopped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pos = 2

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        pos = self.pos
        while pos + 4 <= n:
            if b[pos] != 0xFF:
                return _found("jpeg")
            marker = b[pos + 1]
            if marker == 0xFF:
                pos += 1
            elif marker in _SOF_MARKERS:
                if pos + 9 > n:
                    break
                h, w = struct.unpack_from(">HH", b, pos + 5)
                return _found("jpeg", (w, h))
            elif 0xD0 <= marker <= 0xD8 or marker == 0x01:
                pos += 2
            elif marker in (0x00, 0xD9, 0xDA):
                return _found("jpeg")  # no frame header before the scan: not ours to judge
            else:
                length = struct.unpack_from(">H", b, pos + 2)[0]
                if length < 2:
                    return _found("jpeg")
                pos += 2 + length
        self.pos = pos
        if final:
            return _found("jpeg")
        return pos + 4 if pos + 4 > n else pos + 9


class _Ftyp(_Stage):
    """ISO-BMFF: the major and compatible brands of the ``ftyp`` box choose AVIF, HEIC or no."""

    def __init__(self, policy: SniffPolicy) -> None:
        self.policy = policy
        self.limit = policy.max_window

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        size: int = struct.unpack_from(">I", b, 0)[0]
        if size < 16 or size > 4096 or size % 4:
            raise NotAnImage("Not an image: unknown")
        if n < size and not final:
            return size
        brands = {bytes(b[i : i + 4]) for i in range(16, min(size, n) - 3, 4)}
        brands.add(bytes(b[8:12]))
        if brands & _AVIF_BRANDS:
            fmt = "avif"
        elif brands & _HEIF_BRANDS:
            fmt = "heic"
        else:
            raise NotAnImage("Not an image: video")
        return _admit(self.policy, fmt, _Bmff(fmt, size, self.limit))



def _box_header(b: _Buf, pos: int, n: int) -> tuple[int, bytes, int] | int:
    """An ISO-BMFF box header at ``pos``: (size, type, header length), or the number of bytes
    needed when it is not all in yet."""
    if pos + 8 > n:
        return pos + 8
    size, kind = struct.unpack_from(">I4s", b, pos)
    if size == 1:
        if pos + 16 > n:
            return pos + 16
        return struct.unpack_from(">Q", b, pos + 8)[0], kind, 16
    return (1 << 62 if size == 0 else size), kind, 8  # size 0: to the end of the file

class _Bmff(_Stage):
    """AVIF/HEIC: walk ``meta``/``iprp``/``ipco`` for the ``ispe`` properties and take the
    largest (the primary image, or a grid's full size)."""

    def __init__(self, fmt: str, pos: int, limit: int) -> None:
        self.fmt, self.pos, self.limit = fmt, pos, limit
        self.ipco_end: int | None = None
        self.best: _Dims = None

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        pos = self.pos
        while True:
            if self.ipco_end is not None and pos >= self.ipco_end:
                return _found(self.fmt, self.best)
            box = _box_header(b, pos, n)
            if isinstance(box, int):
                need = box
                break
            size, kind, header = box
            if size < header:
                return _found(self.fmt, self.best)
            if kind == b"meta":
                pos += header + 4  # a full box: version and flags
                continue
            if kind == b"iprp":
                pos += header
                continue
            if kind == b"ipco":
                self.ipco_end = pos + size
                pos += header
                continue
            if kind == b"ispe" and size >= header + 12:
                need = pos + header + 12
                if need > n:
                    break
                dims = struct.unpack_from(">II", b, pos + header + 4)
                if self.best is None or dims[0] * dims[1] > self.best[0] * self.best[1]:
                    self.best = dims
            pos += size
        self.pos = pos
        return _found(self.fmt, self.best) if final else need


_JXL_U32_BITS: Final = (9, 13, 18, 30)
_JXL_RATIOS: Final = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))


def _jxl_dims(data: bytes) -> _Dims:
    """The SizeHeader right after the ``FF 0A`` codestream signature (bits read LSB first)."""
    bits, avail, pos = int.from_bytes(data, "little"), 8 * len(data), 0

    def read(count: int) -> int:
        nonlocal pos
        if pos + count > avail:
            raise IndexError
        value = (bits >> pos) & ((1 << count) - 1)
        pos += count
        return value

    try:
        small = read(1)
        height = (read(5) + 1) * 8 if small else read(_JXL_U32_BITS[read(2)]) + 1
        ratio = read(3)
        if ratio:
            num, den = _JXL_RATIOS[ratio - 1]
            return height * num // den, height
        width = (read(5) + 1) * 8 if small else read(_JXL_U32_BITS[read(2)]) + 1
    except IndexError:
        return None
    return width, height


class _JxlCodestream(_Stage):
    """JPEG XL codestream at ``start`` (up to ``end``, the end of its box, if any)."""

    def __init__(self, start: int, end: int | None, limit: int) -> None:
        self.start, self.end, self.limit = start, end, limit

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        stop = self.start + 11  # signature and the longest SizeHeader
        if self.end is not None:
            stop = min(stop, self.end)
        if n < stop and not final:
            return stop
        data = bytes(b[self.start : min(stop, n)])
        return _found("jxl", _jxl_dims(data[2:]) if data[:2] == b"\xff\x0a" else None)


class _JxlContainer(_Stage):
    """JPEG XL container: boxes up to the first ``jxlc`` or ``jxlp`` holding the codestream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pos = len(_JXL_SIG)

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        pos = self.pos
        while True:
            box = _box_header(b, pos, n)
            if isinstance(box, int):
                need = box
                break
            size, kind, header = box
            if size < header:
                return _found("jxl")
            if kind == b"jxlc":
                return _JxlCodestream(pos + header, pos + size, self.limit)
            if kind == b"jxlp":
                return _JxlCodestream(pos + header + 4, pos + size, self.limit)
            pos += size
        self.pos = pos
        return _found("jxl") if final else need


class _Tiff(_Stage):
    """TIFF and BigTIFF: ImageWidth and ImageLength in the first IFD (tags sorted, so among the
    first entries)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        order = "<" if b[0] == 0x49 else ">"
        big = b[2] == 0x2B or b[3] == 0x2B
        header, count_fmt, entry, value_at = (16, "Q", 20, 12) if big else (8, "H", 12, 8)
        count_size = 8 if big else 2
        if n < header:
            return _found("tiff") if final else header
        offset: int = struct.unpack_from(order + ("Q" if big else "I"), b, 8 if big else 4)[0]
        first = offset + count_size
        if offset < header:
            return _found("tiff")
        if n < first:
            return _found("tiff") if final else first
        count = min(int(struct.unpack_from(order + count_fmt, b, offset)[0]), 16)
        if n < first + count * entry:
            if not final:
                return first + count * entry
            count = (n - first) // entry
        dims: dict[int, int] = {}
        for q in range(first, first + count * entry, entry):
            tag, kind = struct.unpack_from(order + "HH", b, q)
            if tag > 257:
                break
            code = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if tag >= 256 and code is not None:
                dims[tag] = struct.unpack_from(order + code, b, q + value_at)[0]
        if 256 in dims and 257 in dims:
            return _found("tiff", (dims[256], dims[257]))
        return _found("tiff")


_WS: Final = re.compile(rb"[ \t\r\n\x0c]*")
_NAME: Final = re.compile(rb"[A-Za-z_:][-A-Za-z0-9._:]*")
_JS_START: Final = re.compile(
    rb"(?:function\b|var\s|let\s|const\s|import\b|export\b|async\s|class\s|//|/\*"
    rb"|\(\s*function|\(\s*\(|!function|['\"]use strict['\"]|window\.|document\.)"
)
_HTML_TAGS: Final = frozenset(
    b"html head body script iframe h1 div font table a style title b br p meta link"
    b" span img form object embed base".split()
)
# Bytes found in text: tab, LF, FF, CR, ESC, printable ASCII and anything >= 0x80.
_TEXT_BYTES: Final = bytes({7, 8, 9, 10, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F})
_TEXT_SAMPLE: Final = 128


class _Text(_Stage):
    """Text: SVG when the root element is ``<svg`` after an optional BOM, XML declaration,
    comments, processing instructions and doctype; otherwise a label for the refusal."""

    def __init__(self, policy: SniffPolicy) -> None:
        self.policy = policy
        # Looking past the window only helps an SVG with a long prolog, and only if SVG is allowed.
        self.limit = policy.max_window if policy.allow_svg else policy.window

    def step(self, b: _Buf, n: int, final: bool) -> _Step:
        if b.startswith(b"\xef\xbb\xbf"):
            text, start, end = b, 3, n
        elif b.startswith((b"\xff\xfe", b"\xfe\xff", b"<\x00", b"\x00<")):
            codec = "utf-16-be" if b[0] in (0x00, 0xFE) else "utf-16-le"
            start = 2 if b[0] in (0xFE, 0xFF) else 0
            raw = bytes(b[start : n - (n - start) % 2])
            text = raw.decode(codec, "replace").encode("utf-8", "replace")
            start, end = 0, len(text)
        else:
            text, start, end = b, 0, n
        label = _label(text, start, end, final)
        if label is None:
            return min(self.limit, max(2 * n, n + 64))
        if label != "svg":
            raise NotAnImage(f"Not an image: {label}")
        if not self.policy.allow_svg:
            raise NotAnImage("Image format not allowed: svg")
        return _found("svg")


def _label(t: _Buf, p: int, end: int, final: bool) -> str | None:
    """What ``t[p:end]`` is: ``svg``, ``html``, ``xml``, ``json``, ... or ``None`` if undecided."""
    p = _skip_ws(t, p, end)
    if p >= end:
        return "text" if final else None
    if t[p] == 0x3C:  # "<"
        return _markup(t, p, end, final)
    if t.startswith(b"#!", p):
        return "script"
    if t[p] in b"{[":
        return "json"
    if end - p < _TEXT_SAMPLE and not final:
        return None
    sample = bytes(t[p : min(end, p + _TEXT_SAMPLE)])
    if sample.translate(None, _TEXT_BYTES):
        return "unknown"
    return "javascript" if _JS_START.match(sample) else "text"


def _skip_ws(t: _Buf, p: int, end: int) -> int:
    match = _WS.match(t, p, end)
    return match.end() if match else p


def _markup(t: _Buf, p: int, end: int, final: bool) -> str | None:
    """Skip the XML prolog and name the root element's document kind."""
    undecided = "xml" if final else None
    while True:
        p = _skip_ws(t, p, end)
        if p >= end:
            return undecided
        if t.startswith(b"<?", p):
            close = t.find(b"?>", p + 2, end)
            if close < 0:
                return undecided
            p = close + 2
        elif t.startswith(b"<!--", p):
            close = t.find(b"-->", p + 4, end)
            if close < 0:
                return undecided
            p = close + 3
        elif t.startswith(b"<!", p):
            if p + 9 > end:
                return undecided
            if bytes(t[p + 2 : p + 9]).upper() != b"DOCTYPE":
                return "xml"
            q = _skip_ws(t, p + 9, end)
            if q >= end:
                return undecided
            name = _NAME.match(t, q, end)
            if name is None:
                return "xml"
            if name.end() >= end:
                return undecided
            if name.group().lower() == b"html":
                return "html"
            close = t.find(b">", name.end(), end)
            subset = t.find(b"[", name.end(), end)
            if subset >= 0 and (close < 0 or subset < close):
                subset_end = t.find(b"]", subset, end)
                close = -1 if subset_end < 0 else t.find(b">", subset_end, end)
            if close < 0:
                return undecided
            p = close + 1
        else:
            name = _NAME.match(t, p + 1, end)
            if name is None:
                return "text" if p + 1 < end else undecided
            if name.end() >= end:
                return undecided
            tag = name.group()
            if tag == b"svg" and t[name.end()] in b" \t\r\n/>":
                return "svg"
            return "html" if tag.lower() in _HTML_TAGS else "xml"
