"""imageproxy: a signed-URL image proxy daemon on Twisted."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/imageproxy/imageproxy"

__all__ = ["PROJECT_URL", "__version__"]
