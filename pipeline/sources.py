"""Source URLs: which schemes are allowed, which are live, and how PyAV opens each kind.

Only the schemes below reach FFmpeg. FFmpeg itself understands many more protocols (`concat:`, `subfile:`,
`data:`, `pipe:` ...), some of which read arbitrary local files or run devices, so the allow-list is the guard.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Files and HTTP(S) are finite: every frame is processed (`block` policy). RTSP and MPEG-TS over UDP/TCP are live:
# the newest frame matters more than completeness (`drop_oldest`), and a lost connection is retried.
FILE_SCHEMES = ("file", "http", "https")
LIVE_SCHEMES = ("rtsp", "rtsps", "udp", "tcp")
ALLOWED_SCHEMES = FILE_SCHEMES + LIVE_SCHEMES
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass(frozen=True)
class SourceUrl:
    scheme: str  # one of ALLOWED_SCHEMES; "file" for plain paths
    target: str  # what av.open receives: a local path or the URL itself

    @property
    def live(self) -> bool:
        return self.scheme in LIVE_SCHEMES


def parse_source_url(url: str) -> SourceUrl:
    """Classify `url` (a path, `file://` URL or network URL); raise ValueError naming a disallowed scheme."""
    if not url or not url.strip():
        raise ValueError("source URL is empty")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A one-letter scheme is a Windows drive ("C:\\video.mp4"), not a protocol.
    if scheme == "" or len(scheme) == 1:
        return SourceUrl("file", str(Path(url).expanduser()))
    if scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"source URL scheme {scheme!r} is not allowed (allowed: {', '.join(ALLOWED_SCHEMES)})")
    if scheme == "file":
        return SourceUrl("file", parts.path)
    if not parts.hostname:
        raise ValueError(f"source URL {url!r} has no host")
    return SourceUrl(scheme, url)


# The protocols FFmpeg may use for each scheme, nested opens included: an HTTP redirect to `file:///etc/passwd`,
# or a playlist naming `concat:`/`file:` entries, is refused by FFmpeg itself ("not on whitelist").
PROTOCOL_WHITELIST = {"file": "file", "http": "http,tcp", "https": "https,tls,tcp", "rtsp": "rtsp,rtp,tcp,udp",
                      "rtsps": "rtsps,rtsp,rtp,tls,tcp,udp", "udp": "udp", "tcp": "tcp"}


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***` (rtsp://user:pass@cam → rtsp://***@cam).
    Everything that reaches a message, an event or a log goes through this: FFmpeg quotes URLs in its errors."""
    return _CREDENTIALS.sub("***@", text)


def open_options(source: SourceUrl) -> dict[str, str]:
    """FFmpeg demuxer/protocol options for one kind of source (passed as `av.open(..., options=...)`)."""
    options = {"protocol_whitelist": PROTOCOL_WHITELIST[source.scheme]}
    if source.scheme in ("rtsp", "rtsps"):
        # TCP interleaving: UDP RTP loses packets and times out on reconnect (DeepStream select-rtp-protocol=4).
        options["rtsp_transport"] = "tcp"
    elif source.live:
        # Live MPEG-TS: start decoding at once instead of buffering seconds of stream to probe it.
        options.update({"fflags": "nobuffer", "analyzeduration": "1000000", "probesize": "500000"})
    return options
