"""twistd plugin: ``twistd -n imageproxy``. Imports nothing until twistd needs it."""

from twisted.application.service import ServiceMaker

imageproxy = ServiceMaker(
    "imageproxy",
    "imgproxy.tap",
    "Signed-URL image proxy: streams images with backpressure, SSRF-safe, rate-limited per origin.",
    "imageproxy",
)
