"""Proxy URLs: encode, sign, decode and verify, in the camo and go-camo formats.

* camo hex path:   ``/<hex HMAC-SHA1(key, url)>/<hex(url)>``
* camo query:      ``/<hex digest>?url=<percent-encoded url>``
* go-camo base64:  ``/<base64url digest>/<base64url url>`` (padding optional)

An extension after the encoded URL (``/<digest>/<url>.png``) is ignored. Several keys may verify
(rotation); the first signs. Digests are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import quote

from imgproxy.errors import BadRequest, BadSignature

_HEX_DIGEST_LEN = 40  # SHA-1
_B64_DIGEST_LEN = 27  # 20 bytes, unpadded base64url
_HEX_CHARS = frozenset(b"0123456789abcdefABCDEF")
_MAX_URL = 8192
_VERIFIED_MAX = 4096


class Signer:
    """HMAC-SHA1 over the target URL with a list of keys: ``keys[0]`` signs, all verify."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        # Keyed HMAC objects are built once; each use copies one (cheaper than re-keying).
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha1) for key in keys)
        # Proxy paths already verified with these keys (popular images repeat); bounded.
        self.verified: dict[tuple[bytes, bytes | None], bytes] = {}

    def digest(self, url: bytes) -> bytes:
        """The raw signing digest of ``url`` with the first key."""
        mac = self._macs[0].copy()
        mac.update(url)
        return mac.digest()

    def verify(self, url: bytes, digest: bytes) -> bool:
        """True when ``digest`` is the HMAC of ``url`` under any key (constant-time compare)."""
        ok = False
        for base in self._macs:
            mac = base.copy()
            mac.update(url)
            ok |= hmac.compare_digest(mac.digest(), digest)
        return ok

    def hex_path(self, url: bytes) -> str:
        """The camo hex-path form."""
        return f"/{self.digest(url).hex()}/{url.hex()}"

    def query_path(self, url: bytes) -> str:
        """The camo query form."""
        return f"/{self.digest(url).hex()}?url={quote(url, safe='')}"

    def base64_path(self, url: bytes) -> str:
        """The go-camo base64url form."""
        return f"/{_b64(self.digest(url))}/{_b64(url)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def _is_hex(text: bytes) -> bool:
    return bool(text) and _HEX_CHARS.issuperset(text)


def is_proxy_path(path: bytes, has_url_query: bool) -> bool:
    """Whether ``path`` has the shape of a proxy route (else it is an unknown route: 404)."""
    parts = path.split(b"/")
    if len(parts) == 3 and parts[0] == b"" and parts[1] and parts[2]:
        return True
    return has_url_query and len(parts) in (2, 3) and parts[0] == b"" and bool(parts[1]) and (
        len(parts) == 2 or parts[2] == b""
    )


def decode(path: bytes, query_url: bytes | None, signer: Signer) -> bytes:
    """Decode and verify a proxy path, returning the target URL (not yet validated as a URL).

    :raises BadRequest: the path or its encoding is malformed.
    :raises BadSignature: the digest does not match under any key.
    """
    known = signer.verified.get((path, query_url))
    if known is not None:
        return known
    url = _decode(path, query_url, signer)
    if len(signer.verified) >= _VERIFIED_MAX:
        signer.verified.clear()
    signer.verified[(path, query_url)] = url
    return url


def _decode(path: bytes, query_url: bytes | None, signer: Signer) -> bytes:
    parts = path.split(b"/")
    if len(parts) == 3 and parts[2]:
        encoded = parts[2].split(b".", 1)[0]
        digest_text = parts[1]
        if len(digest_text) == _HEX_DIGEST_LEN and _is_hex(digest_text) and _is_hex(encoded):
            if len(encoded) % 2:
                raise BadRequest("Bad Request: odd-length hex URL")
            url = bytes.fromhex(encoded.decode("ascii"))
            digest = bytes.fromhex(digest_text.decode("ascii"))
        else:
            try:
                digest = _unb64(digest_text.rstrip(b"="))
                url = _unb64(encoded.rstrip(b"="))
            except (binascii.Error, ValueError):
                raise BadRequest("Bad Request: undecodable proxy path") from None
            if len(digest) != 20:
                raise BadRequest("Bad Request: bad digest length")
    elif query_url is not None:
        digest_text = parts[1].split(b".", 1)[0]
        if len(digest_text) != _HEX_DIGEST_LEN or not _is_hex(digest_text):
            raise BadRequest("Bad Request: bad digest")
        digest = bytes.fromhex(digest_text.decode("ascii"))
        url = query_url
    else:
        raise BadRequest("Bad Request: malformed proxy path")
    if not url or len(url) > _MAX_URL:
        raise BadRequest("Bad Request: empty or overlong URL")
    if not signer.verify(url, digest):
        raise BadSignature()
    return url
