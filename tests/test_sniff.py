"""Tests for imgproxy.sniff: the content sniffer and its bomb guard."""

from __future__ import annotations

import csv
import hashlib
import re
import struct
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgproxy.errors import NotAnImage, TooLarge
from imgproxy.sniff import DEFAULT_FORMATS, FORMATS, Sniffed, Sniffer, SniffPolicy

CORPUS = Path(__file__).parent / "corpus"
with open(CORPUS / "MANIFEST.tsv", newline="") as _f:
    ROWS = list(csv.DictReader(_f, delimiter="\t"))


def _read(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def _ids(rows: list[dict[str, str]]) -> list[str]:
    return [row["filename"] for row in rows]


IMAGE_ROWS = [r for r in ROWS if r["class"] == "image"]
BROKEN_ROWS = [r for r in ROWS if r["class"] == "broken-image"]
NOT_IMAGE_ROWS = [r for r in ROWS if r["class"] == "not-image"]
RASTER_FILES = [
    r["filename"] for r in ROWS if r["class"] != "not-image" and r["true_kind"] != "svg"
]
CORPUS_DATA = {r["filename"]: _read(r["filename"]) for r in ROWS}

#: The manifest's true kind -> the sniffer's format name.
KIND_FORMAT = {"apng": "png", "cur": "ico"}
#: Images whose dimensions are not in the header within the window.
NO_DIMENSIONS = {
    "jpeg-progressive-sof-after-64k-app13.jpg",  # SOF at byte 65690, past max_window
    "svg-leading-comment.svg",
    "svg-xml-decl-illustrator.svg",
    "svg-with-script-and-handlers.svg",
    "svg-utf16le-bom.svg",
}
#: The manifest's true kind of a non-image -> the label of the refusal.
NOT_IMAGE_LABEL = {
    "html": "html",
    "xml": "xml",
    "pdf": "pdf",
    "js": "script",
    "json": "json",
    "text": "text",
    "mvg": "text",
    "zip": "archive",
    "gzip": "archive",
    "elf": "executable",
    "mp4": "video",
    "wav": "audio",
    "woff2": "font",
}

ALL = SniffPolicy(allow_svg=True)
DEFAULT = SniffPolicy()


def sniff(policy: SniffPolicy, data: bytes, chunk: int | None = None) -> Sniffed:
    """Feed ``data`` (whole, or in chunks of ``chunk`` bytes) and finish at EOF if needed."""
    sniffer = policy.sniffer()
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        result = sniffer.feed(data[i : i + step])
        if result is not None:
            return result
    return sniffer.finish()


def outcome(policy: SniffPolicy, chunks: Iterator[bytes]) -> Sniffed | tuple[str, str, str]:
    """The decision as a comparable value: the Sniffed, or the error's class, kind and reason."""
    sniffer = policy.sniffer()
    try:
        for piece in chunks:
            result = sniffer.feed(piece)
            assert len(sniffer._buf) <= policy.max_window
            if result is not None:
                return result
        return sniffer.finish()
    except (NotAnImage, TooLarge) as e:
        return (type(e).__name__, e.kind, e.reason)


def split(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """Cut ``data`` into pieces of the given sizes, cycling through them."""
    i = k = 0
    while i < len(data):
        size = sizes[k % len(sizes)] if sizes else len(data)
        yield data[i : i + size]
        i, k = i + size, k + 1


def manifest_dims(row: dict[str, str]) -> tuple[int, int]:
    match = re.search(r"(\d+)x(\d+)", row["decode_check"])
    assert match, row["filename"]
    return int(match.group(1)), int(match.group(2))


# --- the corpus ----------------------------------------------------------------------------------


def test_corpus_matches_manifest() -> None:
    """Every corpus file is in the manifest with its size and sha256, and nothing else is there."""
    on_disk = {p.name for p in CORPUS.iterdir()} - {"MANIFEST.tsv"}
    assert on_disk == set(CORPUS_DATA)
    for row in ROWS:
        data = CORPUS_DATA[row["filename"]]
        assert len(data) == int(row["bytes"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]


@pytest.mark.parametrize("row", IMAGE_ROWS, ids=_ids(IMAGE_ROWS))
def test_corpus_image_accepted(row: dict[str, str]) -> None:
    """Each real image is accepted with its format, canonical type and header dimensions."""
    result = sniff(ALL, CORPUS_DATA[row["filename"]])
    fmt = KIND_FORMAT.get(row["true_kind"], row["true_kind"])
    assert result.format == fmt
    assert result.content_type == FORMATS[fmt]
    if row["filename"] in NO_DIMENSIONS:
        assert (result.width, result.height) == (None, None)
    else:
        assert (result.width, result.height) == manifest_dims(row)


@pytest.mark.parametrize("row", BROKEN_ROWS, ids=_ids(BROKEN_ROWS))
def test_corpus_truncated_image_accepted(row: dict[str, str]) -> None:
    """A truncated image is still its format: the sniffer does not decode."""
    result = sniff(DEFAULT, CORPUS_DATA[row["filename"]])
    assert result.format == row["true_kind"]
    assert result.content_type == FORMATS[row["true_kind"]]


@pytest.mark.parametrize("policy", [DEFAULT, ALL], ids=["default", "allow-svg"])
@pytest.mark.parametrize("row", NOT_IMAGE_ROWS, ids=_ids(NOT_IMAGE_ROWS))
def test_corpus_not_image_refused(row: dict[str, str], policy: SniffPolicy) -> None:
    """Each non-image is refused as not-image with a label saying what it is."""
    with pytest.raises(NotAnImage) as info:
        sniff(policy, CORPUS_DATA[row["filename"]])
    assert info.value.kind == "not-image"
    assert info.value.status == 502
    assert info.value.reason == f"Not an image: {NOT_IMAGE_LABEL[row['true_kind']]}"


@pytest.mark.parametrize("name", sorted(CORPUS_DATA))
def test_corpus_chunking_does_not_change_decision(name: str) -> None:
    """Feeding a file in small or odd chunks gives the same decision as feeding it whole."""
    data = CORPUS_DATA[name]
    for policy in (DEFAULT, ALL):
        whole = outcome(policy, iter([data]))
        for sizes in ([7], [1, 31, 500], [4096]):
            assert outcome(policy, split(data, sizes)) == whole


@pytest.mark.parametrize("name", RASTER_FILES)
def test_corpus_short_prefix_keeps_format(name: str) -> None:
    """A raster image cut to 40 bytes (shorter than the window) is still sniffed as its format."""
    row = next(r for r in ROWS if r["filename"] == name)
    fmt = KIND_FORMAT.get(row["true_kind"], row["true_kind"])
    assert sniff(DEFAULT, CORPUS_DATA[name][:40]).format == fmt


def test_every_truncation_decides() -> None:
    """Every corpus file cut at any of its first 80 bytes yields a decision, never a crash."""
    for data in CORPUS_DATA.values():
        for cut in range(81):
            assert outcome(ALL, iter([data[:cut]])) is not None


# --- the decision --------------------------------------------------------------------------------


def test_formats_table() -> None:
    """FORMATS maps every format to its canonical type and the default allows all but SVG."""
    assert FORMATS["png"] == "image/png"  # APNG too
    assert FORMATS["ico"] == "image/x-icon"  # CUR too
    assert FORMATS["heic"] == "image/heic"
    assert FORMATS["svg"] == "image/svg+xml"
    assert DEFAULT_FORMATS == frozenset(FORMATS) - {"svg"}
    assert DEFAULT.formats == DEFAULT_FORMATS and not DEFAULT.allow_svg
    assert (DEFAULT.max_pixels, DEFAULT.window, DEFAULT.max_window) == (50_000_000, 512, 65536)


def test_format_outside_allowlist_refused() -> None:
    """A real image in a format left out of --formats is refused, naming the format."""
    policy = SniffPolicy(formats=frozenset({"jpeg", "png"}))
    assert sniff(policy, CORPUS_DATA["png-rgb-8bit.png"]).format == "png"
    for name, fmt in [("gif-87a.gif", "gif"), ("tiff-bigtiff-le.tif", "tiff")]:
        with pytest.raises(NotAnImage, match=f"^Image format not allowed: {fmt}$") as info:
            sniff(policy, CORPUS_DATA[name])
        assert info.value.kind == "not-image"


@pytest.mark.parametrize("name", [r["filename"] for r in ROWS if r["true_kind"] == "svg"])
def test_svg_only_with_allow_svg(name: str) -> None:
    """SVG (UTF-16 and scripted ones too) is refused by default and relayed with allow_svg."""
    with pytest.raises(NotAnImage, match="^Image format not allowed: svg$"):
        sniff(DEFAULT, CORPUS_DATA[name])
    assert sniff(ALL, CORPUS_DATA[name]).content_type == "image/svg+xml"


def test_html_with_inline_svg_refused_even_with_allow_svg() -> None:
    """An HTML page holding an inline <svg> is HTML, refused even when SVG is allowed."""
    data = b"<!doctype html><html><body><svg xmlns='http://www.w3.org/2000/svg'></svg>"
    with pytest.raises(NotAnImage, match="^Not an image: html$"):
        sniff(ALL, data)
    with pytest.raises(NotAnImage, match="^Not an image: html$"):
        sniff(ALL, b"<div><svg></svg></div>")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


@pytest.mark.parametrize(
    "data",
    [
        SVG,
        b"\xef\xbb\xbf \n" + SVG,
        b'<?xml version="1.0"?>\n<?xml-stylesheet href="a.css"?>\n<!-- c -->\n' + SVG,
        b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "svg11.dtd" [\n'
        b'<!ENTITY ns_svg "http://www.w3.org/2000/svg">\n]>\n' + SVG,
        b"\xfe\xff" + SVG.decode().encode("utf-16-be"),
        b"\xff\xfe" + SVG.decode().encode("utf-16-le"),
        SVG.decode().encode("utf-16-le"),
        b"<!--" + b"x" * 5000 + b"-->" + SVG,
    ],
    ids=[
        "bare",
        "utf8-bom",
        "prolog",
        "doctype-subset",
        "utf16be",
        "utf16le",
        "utf16-no-bom",
        "long",
    ],
)
def test_svg_prologs(data: bytes) -> None:
    """SVG is found after a BOM, XML declaration, processing instructions, comments and doctype."""
    assert sniff(ALL, data) == Sniffed("svg", "image/svg+xml")
    assert sniff(ALL, data, chunk=3) == Sniffed("svg", "image/svg+xml")


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b"<SVG></SVG>", "xml"),
        (b"<svgx/>", "xml"),
        (b"<rss version='2.0'>", "xml"),
        (b"<!DOCTYPE html><svg>", "html"),
        (b"<html><svg></svg>", "html"),
        (b"<!-- c --><script>alert(1)</script>", "html"),
        (b"<![CDATA[x]]>", "xml"),
        (b"<" + b" " * 600, "text"),
        (b"<!--" + b"x" * 70000 + b"--><svg/>", "xml"),
        (b"var x = 1;\n" + b" " * 200, "javascript"),
        (b"(function(){})()", "javascript"),
        (b"[1, 2, 3]", "json"),
        (b"#!/bin/sh\necho", "script"),
        (b"hello\x00\x01\x02world" * 20, "unknown"),
        (b"   \n\t ", "text"),
        (b"", "empty"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video"),
        (b"RIFF\x00\x00\x00\x00WEBPJUNK" + bytes(20), "unknown"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00isomM4A " + bytes(8), "video"),
    ],
)
def test_not_image_labels(data: bytes, label: str) -> None:
    """Non-images are refused with a short label of what they are, even with allow_svg."""
    with pytest.raises(NotAnImage) as info:
        sniff(ALL, data)
    assert info.value.reason == f"Not an image: {label}"


@pytest.mark.parametrize(
    ("major", "compatible", "fmt"),
    [
        (b"avif", [b"mif1", b"miaf"], "avif"),
        (b"avis", [b"msf1", b"iso8"], "avif"),
        (b"heic", [b"mif1"], "heic"),
        (b"mif1", [b"heic"], "heic"),
        (b"heix", [], "heic"),
        (b"msf1", [b"hevc"], "heic"),
        (b"isom", [b"avif"], "avif"),
        (b"isom", [b"iso2", b"mp41"], None),
        (b"qt  ", [], None),
    ],
)
def test_iso_bmff_brands(major: bytes, compatible: list[bytes], fmt: str | None) -> None:
    """The ftyp major and compatible brands decide AVIF, HEIC, or a refused video."""
    box = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    data = struct.pack(">I", len(box) + 8) + b"ftyp" + box + bytes(40)
    if fmt is None:
        with pytest.raises(NotAnImage, match="^Not an image: video$"):
            sniff(DEFAULT, data)
    else:
        assert sniff(DEFAULT, data) == Sniffed(fmt, FORMATS[fmt])


def test_polyglots() -> None:
    """Only the leading bytes count: GIF/JS and PNG+HTML are images, HTML is never one."""
    gif_js = b"GIF89a/*\x01\x00\x00\x00\x00" + b"*/=alert(document.domain);//" + b"\x3b"
    assert sniff(DEFAULT, gif_js) == Sniffed("gif", "image/gif", 0x2A2F, 1)
    png = CORPUS_DATA["png-rgb-8bit.png"]
    assert sniff(DEFAULT, png + b"<html><script>alert(1)</script></html>") == sniff(DEFAULT, png)
    html = b"<html><body>\x89PNG\r\n\x1a\n</body></html>"  # declared image/png upstream, say
    with pytest.raises(NotAnImage, match="^Not an image: html$"):
        sniff(DEFAULT, html)
    with pytest.raises(NotAnImage, match="^Not an image: archive$"):
        sniff(DEFAULT, b"PK\x03\x04" + CORPUS_DATA["jpeg-baseline-jfif.jpg"])


def test_short_body_decided_at_eof() -> None:
    """A body shorter than the window is decided by finish(), with what it holds."""
    sniffer = DEFAULT.sniffer()
    assert sniffer.feed(CORPUS_DATA["png-rgb-8bit.png"][:24]) is None
    assert sniffer.finish() == Sniffed("png", "image/png", 128, 128)
    small = CORPUS_DATA["jpeg-arithmetic-coding.jpg"]  # 188 bytes, whole file
    assert DEFAULT.sniffer().feed(small) == Sniffed("jpeg", "image/jpeg", 10, 10)
    assert sniff(DEFAULT, b"\xff\xd8\xff") == Sniffed("jpeg", "image/jpeg")


def test_decision_is_kept() -> None:
    """After a decision, feed() and finish() repeat it instead of sniffing again."""
    sniffer = DEFAULT.sniffer()
    first = sniffer.feed(CORPUS_DATA["gif-87a.gif"])
    assert first == Sniffed("gif", "image/gif", 100, 30)
    assert sniffer.feed(b"<html>") is first
    assert sniffer.finish() is first
    refused = DEFAULT.sniffer()
    with pytest.raises(NotAnImage):
        refused.feed(b"%PDF-1.7\n" + bytes(40))
    with pytest.raises(NotAnImage, match="pdf"):
        refused.finish()


# --- the bomb guard ------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">II5B", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 4


def _jpeg(width: int, height: int, app_size: int = 100) -> bytes:
    app = b"\xff\xe1" + struct.pack(">H", app_size + 2) + b"Exif\x00\x00" + bytes(app_size - 6)
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app + b"\xff\xfe\x00\x04hi" + b"\xff\xff" + sof + bytes(64)


def _webp_vp8x(width: int, height: int) -> bytes:
    chunk = b"VP8X" + struct.pack("<I", 10) + b"\x10\x00\x00\x00"
    chunk += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    chunk = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits) + bytes(20)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _webp_vp8(width: int, height: int) -> bytes:
    frame = b"\x90\x33\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(20)
    chunk = b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _bmp(width: int, height: int) -> bytes:
    return (
        b"BM" + struct.pack("<IIII", 0, 0, 54, 40) + struct.pack("<ii", width, -height) + bytes(28)
    )


def _tiff(width: int, height: int, order: str = "<", kind: int = 4, big: bool = False) -> bytes:
    mark = b"II" if order == "<" else b"MM"
    code = {3: "H", 4: "I", 16: "Q"}[kind]
    if big:
        head = mark + struct.pack(order + "HHHQ", 43, 8, 0, 16)
        entry = "HHQ" + code + "x" * (8 - struct.calcsize(code))
        body = struct.pack(order + "Q", 2)
    else:
        head = mark + struct.pack(order + "HI", 42, 8)
        entry = "HHI" + code + "x" * (4 - struct.calcsize(code))
        body = struct.pack(order + "H", 2)
    body += struct.pack(order + entry, 256, kind, 1, width)
    body += struct.pack(order + entry, 257, kind, 1, height)
    return head + body + bytes(8)


def _ico_png(width: int, height: int) -> bytes:
    png = _png(width, height)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return b"\x00\x00\x01\x00\x01\x00" + entry + png


def _avif(width: int, height: int) -> bytes:
    data = bytearray(CORPUS_DATA["avif-still.avif"])
    at = data.find(b"ispe") + 8
    data[at : at + 8] = struct.pack(">II", width, height)
    return bytes(data)


def _heic(width: int, height: int) -> bytes:
    data = bytearray(CORPUS_DATA["heic-mif1-major-brand.heic"])
    at = data.find(b"ispe") + 8
    data[at : at + 8] = struct.pack(">II", width, height)
    return bytes(data)


def _jxl(width: int, height: int) -> bytes:
    fields = [(0, 1), (3, 2), (height - 1, 30), (0, 3), (3, 2), (width - 1, 30)]
    bits = pos = 0
    for value, count in fields:  # JPEG XL packs bit fields least significant bit first
        bits |= value << pos
        pos += count
    return b"\xff\x0a" + bits.to_bytes((pos + 7) // 8, "little") + bytes(16)


def _gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + bytes(30)


BUILDERS = {
    "png": ("png", _png),
    "gif": ("gif", _gif),
    "jpeg": ("jpeg", _jpeg),
    "webp-vp8x": ("webp", _webp_vp8x),
    "webp-vp8l": ("webp", _webp_vp8l),
    "webp-vp8": ("webp", _webp_vp8),
    "bmp": ("bmp", _bmp),
    "tiff-le-long": ("tiff", _tiff),
    "tiff-be-short": ("tiff", lambda w, h: _tiff(w, h, ">", 3)),
    "bigtiff-long8": ("tiff", lambda w, h: _tiff(w, h, "<", 16, big=True)),
    "bigtiff-be": ("tiff", lambda w, h: _tiff(w, h, ">", 4, big=True)),
    "ico-png-entry": ("ico", _ico_png),
    "avif": ("avif", _avif),
    "heic": ("heic", _heic),
    "jxl": ("jxl", _jxl),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bomb_guard(name: str) -> None:
    """Header dimensions over max_pixels are refused; at the limit they are accepted."""
    fmt, build = BUILDERS[name]
    with pytest.raises(TooLarge) as info:
        sniff(DEFAULT, build(12000, 9000))
    assert info.value.kind == "too-many-pixels"
    assert info.value.reason == "Image too large: 12000x9000 pixels"
    assert info.value.status == 502
    at_limit = SniffPolicy(max_pixels=300 * 200)
    assert sniff(at_limit, build(300, 200), chunk=5) == Sniffed(fmt, FORMATS[fmt], 300, 200)
    with pytest.raises(TooLarge, match="^Image too large: 301x200 pixels$"):
        sniff(at_limit, build(301, 200), chunk=5)


def test_bomb_guard_configurable() -> None:
    """max_pixels is the exact bound: 128x128 passes at 16384 and fails at 16383."""
    png = CORPUS_DATA["png-rgb-8bit.png"]
    assert sniff(SniffPolicy(max_pixels=16384), png).width == 128
    with pytest.raises(TooLarge):
        sniff(SniffPolicy(max_pixels=16383), png)


def test_jpeg_sof_past_window_accepted_without_dimensions() -> None:
    """A JPEG whose SOF lies past max_window is accepted as JPEG with unknown dimensions."""
    huge = _jpeg(60000, 60000, app_size=65533)
    assert sniff(DEFAULT, huge) == Sniffed("jpeg", "image/jpeg")
    assert sniff(DEFAULT, huge, chunk=1000) == Sniffed("jpeg", "image/jpeg")
    big_exif = CORPUS_DATA["jpeg-big-exif-xmp-icc-sof-at-29k.jpg"]
    assert sniff(SniffPolicy(max_window=4096), big_exif) == Sniffed("jpeg", "image/jpeg")


def test_jpeg_sof_within_window_found_late() -> None:
    """A JPEG whose SOF comes after 60 KiB of metadata is still measured and guarded."""
    with pytest.raises(TooLarge):
        sniff(DEFAULT, _jpeg(60000, 60000, app_size=60000), chunk=4096)


# --- HEAD and options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("image/png", "image/png"),
        ("IMAGE/JPEG; charset=binary", "image/jpeg"),
        ("image/jpg", "image/jpeg"),
        ("image/apng", "image/png"),
        ("image/heif", "image/heic"),
        ("image/vnd.microsoft.icon", "image/x-icon"),
        ("image/webp", "image/webp"),
    ],
)
def test_head_judged_on_declared_type(declared: str, expected: str) -> None:
    """HEAD answers get the canonical type of the declared image type."""
    assert DEFAULT.judge_declared(declared) == expected


@pytest.mark.parametrize(
    "declared", [None, "", "application/octet-stream", "text/html", "image/x-unknown", "image/"]
)
def test_head_refuses_unknown_declared_type(declared: str | None) -> None:
    """HEAD answers without an image type are refused: there are no bytes to sniff."""
    with pytest.raises(NotAnImage, match="^Not an image: declared type$"):
        DEFAULT.judge_declared(declared)


def test_head_respects_allowlist() -> None:
    """HEAD applies --formats and --allow-svg to the declared type."""
    with pytest.raises(NotAnImage, match="^Image format not allowed: svg$"):
        DEFAULT.judge_declared("image/svg+xml")
    assert ALL.judge_declared("image/svg+xml") == "image/svg+xml"
    with pytest.raises(NotAnImage, match="^Image format not allowed: tiff$"):
        SniffPolicy(formats=frozenset({"png"})).judge_declared("image/tiff")


def test_parse_formats() -> None:
    """--formats takes names and aliases, case and spaces aside."""
    assert SniffPolicy.parse_formats("jpeg, PNG,,webp") == {"jpeg", "png", "webp"}
    assert SniffPolicy.parse_formats("jpg,tif,heif,apng,cur") == {
        "jpeg",
        "tiff",
        "heic",
        "png",
        "ico",
    }
    assert SniffPolicy.parse_formats(",".join(sorted(DEFAULT_FORMATS))) == DEFAULT_FORMATS


@pytest.mark.parametrize(
    ("text", "message"),
    [("jpeg,bogus", "'bogus'"), ("svg", "--allow-svg"), ("", "at least one"), (" , ", "at least")],
)
def test_parse_formats_errors(text: str, message: str) -> None:
    """--formats names the unknown format, points SVG to --allow-svg and wants one format."""
    with pytest.raises(ValueError, match=re.escape(message)):
        SniffPolicy.parse_formats(text)


@pytest.mark.parametrize(
    "changes",
    [
        {"window": 16},
        {"window": 1024, "max_window": 512},
        {"max_window": 1 << 21},
        {"max_pixels": 0},
        {"formats": frozenset({"svg"})},
        {"formats": frozenset({"jpeg", "gif2"})},
        {"formats": frozenset()},
    ],
)
def test_policy_validation(changes: dict[str, object]) -> None:
    """A policy with impossible windows, limits or formats is refused at construction."""
    with pytest.raises(ValueError):
        attrs.evolve(DEFAULT, **changes)


# --- robustness and bounds -----------------------------------------------------------------------

SMALL = SniffPolicy(window=64, max_window=2048, allow_svg=True)
HEADS = [data[:600] for data in CORPUS_DATA.values()]
chunk_sizes = st.lists(st.integers(min_value=1, max_value=700), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), sizes=chunk_sizes)
def test_random_bytes_never_crash(data: bytes, sizes: list[int]) -> None:
    """Random bytes in random chunks end in a decision or a refusal, never another error."""
    for policy in (DEFAULT, SMALL):
        result = outcome(policy, split(data, sizes))
        if isinstance(result, Sniffed):
            assert result.content_type == FORMATS[result.format]


@settings(max_examples=300, deadline=None)
@given(
    head=st.sampled_from(HEADS),
    edits=st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 600),
    sizes=chunk_sizes,
)
def test_mutated_headers_never_crash(
    head: bytes, edits: list[tuple[int, int]], cut: int, sizes: list[int]
) -> None:
    """Real headers with flipped bytes, cut anywhere, never crash the format parsers."""
    data = bytearray(head)
    for at, value in edits:
        if at < len(data):
            data[at] = value
    for policy in (DEFAULT, SMALL):
        outcome(policy, split(bytes(data[:cut]), sizes))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(CORPUS_DATA)), sizes=chunk_sizes)
def test_random_chunking_of_real_files(name: str, sizes: list[int]) -> None:
    """Any chunking of a real file gives the decision of feeding it whole."""
    data = CORPUS_DATA[name]
    for policy in (DEFAULT, ALL, SMALL):
        assert outcome(policy, split(data, sizes)) == outcome(policy, iter([data]))


@settings(max_examples=200, deadline=None)
@given(head=st.sampled_from(HEADS), tail=st.binary(min_size=0, max_size=64), sizes=chunk_sizes)
def test_decides_within_max_window(head: bytes, tail: bytes, sizes: list[int]) -> None:
    """Whatever the bytes, the sniffer has decided once max_window bytes are fed."""
    data = (head + tail) * (SMALL.max_window // max(len(head + tail), 1) + 1)
    sniffer = SMALL.sniffer()
    fed = 0
    try:
        for piece in split(data[: SMALL.max_window], sizes):
            fed += len(piece)
            if sniffer.feed(piece) is not None:
                return
    except (NotAnImage, TooLarge):
        return
    pytest.fail(f"undecided after {fed} bytes")


def _timed_trickle(policy: SniffPolicy, data: bytes) -> float:
    sniffer = policy.sniffer()
    start = time.perf_counter()
    try:
        for i in range(len(data)):
            if sniffer.feed(data[i : i + 1]) is not None:
                break
        else:
            sniffer.finish()
    except (NotAnImage, TooLarge):
        pass
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8" + b"\xff\xfe\x00\x02" * 16383 + b"\xff\xc0\x00\x0b\x08\x00\x01\x00\x01",
        b"\x00\x00\x00\x10ftypavif\x00\x00\x00\x00" + b"\x00\x00\x00\x08free" * 8190,
        b"<!--" + b"-" * 65000,
        b"\xff\xfe" + ("<!--" + "-" * 32000).encode("utf-16-le"),
        b"\x00\x00\x01\x00\xff\x0f"
        + b"\x10\x10\x00\x00\x01\x00\x20\x00\x10\x00\x00\x00\x00\x00\x01\x00" * 4095,
    ],
    ids=["jpeg-tiny-segments", "bmff-tiny-boxes", "svg-long-comment", "utf16-comment", "ico-dir"],
)
def test_bounded_time_on_byte_trickle(data: bytes) -> None:
    """Adversarial bodies fed one byte at a time are decided in linear, not quadratic, time."""
    assert len(data) <= ALL.max_window + 64
    assert _timed_trickle(ALL, data) < 3.0


def test_bounded_memory() -> None:
    """The sniffer holds at most max_window bytes, however the body is chunked."""
    data = _jpeg(10, 10, app_size=65400)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    big = data + bytes(4 << 20)
    tracemalloc.start()
    try:
        sniffer = DEFAULT.sniffer()
        result = None
        for piece in pieces:
            result = sniffer.feed(piece)
            assert len(sniffer._buf) <= DEFAULT.max_window
            if result is not None:
                break
        _, chunked_peak = tracemalloc.get_traced_memory()
        del sniffer
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        assert DEFAULT.sniffer().feed(big) == Sniffed("jpeg", "image/jpeg", 10, 10)
        whole_peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert result == Sniffed("jpeg", "image/jpeg", 10, 10)
    assert chunked_peak < 2 * DEFAULT.max_window
    assert whole_peak < 64 * 1024  # a large first chunk is looked at in place, not copied


def test_one_feed_decides_common_images() -> None:
    """A first chunk of a few KiB of JPEG or PNG is decided by one feed() call."""
    for name, size in [
        ("jpeg-baseline-jfif.jpg", 8192),
        ("jpeg-progressive-exif-first.jpg", 8192),
        ("jpeg-big-exif-xmp-icc-sof-at-29k.jpg", 32768),  # SOF at byte 29375
        ("png-palette-transparent.png", 8192),
    ]:
        assert DEFAULT.sniffer().feed(CORPUS_DATA[name][:size]) is not None


def test_sniffer_is_public() -> None:
    """policy.sniffer() builds a fresh Sniffer each time."""
    first, second = DEFAULT.sniffer(), DEFAULT.sniffer()
    assert isinstance(first, Sniffer) and first is not second
