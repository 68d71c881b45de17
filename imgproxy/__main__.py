"""``python -m imgproxy sign URL``: print the proxy URL of ``URL`` in every format.

The key comes from the same sources as the daemon's: ``--key-file``, ``$IMAGEPROXY_KEY`` or the
systemd credential. Integrators use it to check their own signers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imgproxy.config import ConfigError, load_keys
from imgproxy.urls import Signer


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m imgproxy")
    commands = parser.add_subparsers(dest="command", required=True)
    sign = commands.add_parser("sign", help="print the signed proxy URLs of a target URL")
    sign.add_argument("url", help="absolute http(s) URL of the image")
    sign.add_argument("--key-file", help="HMAC key file (first line signs)")
    sign.add_argument("--base", default="", help="proxy base URL, e.g. https://img.example.com")
    args = parser.parse_args(argv)
    try:
        _, keys = load_keys(args.key_file, os.environ)
    except ConfigError as e:
        parser.exit(2, f"imageproxy: {e}\n")
    signer = Signer(keys)
    url = args.url.encode("utf-8")
    base = args.base.rstrip("/")
    sys.stdout.write(
        f"camo hex:     {base}{signer.hex_path(url)}\n"
        f"camo query:   {base}{signer.query_path(url)}\n"
        f"go-camo b64:  {base}{signer.base64_path(url)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
