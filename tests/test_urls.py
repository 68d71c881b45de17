"""Proxy URL formats: signing, decoding and verification."""

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgproxy.__main__ import main
from imgproxy.errors import BadRequest, BadSignature
from imgproxy.urls import Signer, decode, is_proxy_path

KEY = b"0x24FEEDFACEDEADBEEFCAFE"
URL = b"http://images.example.com/cat.jpg?size=large&x=%20y"


def camo_digest(key: bytes, url: bytes) -> str:
    return hmac.new(key, url, hashlib.sha1).hexdigest()


def split(path: str) -> tuple[bytes, bytes | None]:
    path_part, _, query = path.partition("?")
    from urllib.parse import parse_qs

    url = parse_qs(query).get("url", [None])[0] if query else None
    return path_part.encode(), url.encode() if url else None


@pytest.mark.parametrize("form", ["hex_path", "query_path", "base64_path"])
def test_round_trip(form):
    """Every format decodes back to the signed URL."""
    signer = Signer((KEY,))
    path, query = split(getattr(signer, form)(URL))
    assert is_proxy_path(path, query is not None)
    assert decode(path, query, signer) == URL


def test_hex_path_matches_camo():
    """The hex form is exactly camo's: hex HMAC-SHA1 digest, then hex URL."""
    signer = Signer((KEY,))
    assert signer.hex_path(URL) == f"/{camo_digest(KEY, URL)}/{URL.hex()}"


def test_base64_matches_go_camo():
    """The base64 form is go-camo's: unpadded base64url digest and URL."""
    digest = hmac.new(KEY, URL, hashlib.sha1).digest()
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    assert Signer((KEY,)).base64_path(URL) == f"/{b64(digest)}/{b64(URL)}"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".anything"])
def test_extension_ignored(suffix):
    """An extension after the encoded URL is ignored in both path forms."""
    signer = Signer((KEY,))
    for form in (signer.hex_path, signer.base64_path):
        path = (form(URL) + suffix).encode()
        assert decode(path, None, signer) == URL


def test_padded_base64_accepted():
    """go-camo URLs with '=' padding also decode."""
    signer = Signer((KEY,))
    digest = base64.urlsafe_b64encode(signer.digest(URL)).decode()
    path = f"/{digest}/{base64.urlsafe_b64encode(URL).decode()}".encode()
    assert decode(path, None, signer) == URL


def test_uppercase_hex_accepted():
    """Hex digests and URLs are case-insensitive."""
    signer = Signer((KEY,))
    assert decode(signer.hex_path(URL).upper().encode(), None, signer) == URL


def test_bad_signature():
    """A digest made with another key is refused with BadSignature."""
    path, _ = split(Signer((b"other",)).hex_path(URL))
    with pytest.raises(BadSignature):
        decode(path, None, Signer((KEY,)))


def test_tampered_url():
    """Changing one byte of the URL breaks the signature."""
    signer = Signer((KEY,))
    digest = camo_digest(KEY, URL)
    with pytest.raises(BadSignature):
        decode(f"/{digest}/{(URL + b'x').hex()}".encode(), None, signer)


def test_rotation_first_signs_all_verify():
    """With several keys the first signs and every key verifies."""
    new, old = b"new-key", b"old-key"
    signer = Signer((new, old))
    assert signer.hex_path(URL) == Signer((new,)).hex_path(URL)
    old_path = Signer((old,)).hex_path(URL).encode()
    assert decode(old_path, None, signer) == URL
    with pytest.raises(BadSignature):
        decode(old_path, None, Signer((new,)))


@pytest.mark.parametrize(
    "path",
    [
        b"/" + b"a" * 40 + b"/zz",  # not hex, not base64 of a 20-byte digest
        b"/" + b"a" * 40 + b"/abc",  # odd-length hex
        b"/!!!!/@@@@",  # undecodable
        b"/" + b"A" * 10 + b"/aGVsbG8",  # base64 digest of the wrong length
    ],
)
def test_malformed_paths(path):
    """Undecodable proxy paths are BadRequest."""
    with pytest.raises(BadRequest):
        decode(path, None, Signer((KEY,)))


def test_query_form_requires_hex_digest():
    """The ?url= form needs a 40-hex-digit digest."""
    with pytest.raises(BadRequest):
        decode(b"/nothex", URL, Signer((KEY,)))


@pytest.mark.parametrize(
    "path,query,expected",
    [
        (b"/a/b", False, True),
        (b"/a", True, True),
        (b"/a/", True, True),
        (b"/a", False, False),
        (b"/", False, False),
        (b"/a/b/c", False, False),
        (b"/favicon.ico", False, False),
    ],
)
def test_route_shapes(path, query, expected):
    """Only the proxy shapes are proxy routes; the rest is an unknown route."""
    assert is_proxy_path(path, query) is expected


def test_sign_command(tmp_path, capsys):
    """`python -m imgproxy sign` prints the three forms with the file's first key."""
    key_file = tmp_path / "keys"
    key_file.write_bytes(KEY + b"\nold\n")
    assert main(["sign", "--key-file", str(key_file), "--base", "https://img.test/",
                 URL.decode()]) == 0
    out = capsys.readouterr().out
    signer = Signer((KEY,))
    assert f"https://img.test{signer.hex_path(URL)}" in out
    assert f"https://img.test{signer.query_path(URL)}" in out
    assert f"https://img.test{signer.base64_path(URL)}" in out


def test_sign_command_without_key(monkeypatch, capsys):
    """Without any key the sign command fails with a one-line message."""
    monkeypatch.delenv("IMAGEPROXY_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["sign", "http://example.com/a.png"])
    assert e.value.code == 2
    assert "--key-file" in capsys.readouterr().err


def test_verified_paths_memoised_and_bounded():
    """Verified paths are remembered (bounded); refused ones never are."""
    from imgproxy import urls

    signer = Signer((KEY,))
    for i in range(urls._VERIFIED_MAX + 10):
        target = URL + b"&n=%d" % i
        assert decode(signer.hex_path(target).encode(), None, signer) == target
    assert 0 < len(signer.verified) <= urls._VERIFIED_MAX
    forged = Signer((b"other",)).hex_path(URL).encode()
    with pytest.raises(BadSignature):
        decode(forged, None, signer)
    assert (forged, None) not in signer.verified


@settings(max_examples=500, deadline=None)
@given(path=st.binary(max_size=200), query=st.one_of(st.none(), st.binary(max_size=100)))
def test_decode_never_crashes(path, query):
    """Any path and query either decode to a URL or raise a client error, never anything else."""
    from imgproxy.errors import ProxyError

    try:
        decode(b"/" + path, query, Signer((KEY,)))
    except ProxyError as e:
        assert e.status in (400, 403)


@settings(max_examples=200, deadline=None)
@given(url=st.binary(min_size=1, max_size=300))
def test_any_signed_target_round_trips(url):
    """Whatever bytes are signed, every format decodes them back exactly."""
    signer = Signer((KEY,))
    for form in ("hex_path", "base64_path"):
        assert decode(getattr(signer, form)(url).encode(), None, signer) == url
