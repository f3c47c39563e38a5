"""Source URLs: which schemes are allowed, which are live, and how PyAV opens each kind.

Only the schemes below reach FFmpeg. FFmpeg itself understands many more protocols (`concat:`, `subfile:`,
`data:`, `pipe:` ...), some of which read arbitrary local files or run devices, so the allow-list is the guard.

A network URL's user name and password may be `${NAME}` references to environment variables, which only the
decoder fills in, when it opens the stream (`expand_secrets`): so no configuration, control message or event
holds a camera's password (docs/security.md).
"""
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

# Files and HTTP(S) are finite: every frame is processed (`block` policy). RTSP, MPEG-TS over UDP/TCP and HLS
# playlists (an HTTP(S) URL whose path ends in `.m3u8`) are live: the newest frame matters more than completeness
# (`drop_oldest`), and a lost connection is retried. A playlist that turns out finished (VOD, `#EXT-X-ENDLIST`)
# ends at its end like a file (pipeline/decoder.py).
FILE_SCHEMES = ("file", "http", "https")
LIVE_SCHEMES = ("rtsp", "rtsps", "udp", "tcp")
ALLOWED_SCHEMES = FILE_SCHEMES + LIVE_SCHEMES
HLS_SUFFIX = ".m3u8"
# A URL's user info runs from `://` to the last `@` before the path, query or fragment, as FFmpeg splits it.
_CREDENTIALS = re.compile(r"(?<=://)[^/?#\s\"']*@")
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REFERENCE_RULE = ("a ${NAME} reference (NAME: letters, digits, _) may only stand for a network URL's user or "
                   "password")


class MissingSecret(LookupError):
    """A `${NAME}` reference names an environment variable that is not set."""


@dataclass(frozen=True)
class SourceUrl:
    scheme: str  # one of ALLOWED_SCHEMES; "file" for plain paths
    target: str  # what av.open receives: a local path or the URL itself

    @property
    def hls(self) -> bool:
        return self.scheme in ("http", "https") and urlsplit(self.target).path.lower().endswith(HLS_SUFFIX)

    @property
    def live(self) -> bool:
        return self.scheme in LIVE_SCHEMES or self.hls


def parse_source_url(url: str) -> SourceUrl:
    """Classify `url` (a path, `file://` URL or network URL); raise ValueError naming a disallowed scheme."""
    if not url or not url.strip():
        raise ValueError("source URL is empty")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A one-letter scheme is a Windows drive ("C:\\video.mp4"), not a protocol.
    if scheme == "" or len(scheme) == 1:
        _check_references("", url)
        return SourceUrl("file", str(Path(url).expanduser()))
    if scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"source URL scheme {scheme!r} is not allowed (allowed: {', '.join(ALLOWED_SCHEMES)})")
    if scheme == "file":
        _check_references("", url)
        return SourceUrl("file", parts.path)
    _check_references(*split_userinfo(url)[1:])
    if not parts.hostname:
        raise ValueError(f"source URL {redact(url)!r} has no host")
    return SourceUrl(scheme, url)


def split_userinfo(url: str) -> tuple[str, str, str]:
    """`scheme://user:pass@host/path` -> (`scheme://`, `user:pass`, `@host/path`); the user info is "" when the
    URL has none (or is no URL). The three parts always join back into `url`."""
    head, separator, rest = url.partition("://")
    if not separator:
        return url, "", ""
    authority = re.match(r"[^/?#]*", rest).group()
    userinfo = authority.rpartition("@")[0]
    return head + separator, userinfo, rest[len(userinfo):]


def _check_references(userinfo: str, rest: str) -> None:
    """References only in the user info, and only well-formed ones: a value never decides where we connect."""
    if "${" in rest or "${" in _REFERENCE.sub("", userinfo):
        raise ValueError(_REFERENCE_RULE)


def expand_secrets(url: str, env: Mapping[str, str] | None = None) -> str:
    """`url` with each `${NAME}` of its user info replaced by the environment variable NAME, percent-encoded so
    that the value stays the user or password whatever characters it holds (FFmpeg decodes it). Only the decoder
    calls this, as it opens the stream: the result never leaves that process."""
    env = os.environ if env is None else env
    head, userinfo, rest = split_userinfo(url)

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in env:
            raise MissingSecret(f"environment variable {name} (named in the source URL) is not set")
        return quote(env[name], safe="")

    return head + _REFERENCE.sub(value, userinfo) + rest


def inline_password(url: str) -> bool:
    """Whether `url` writes out a password, rather than none or only `${NAME}` references."""
    password = split_userinfo(url)[1].partition(":")[2]
    return bool(_REFERENCE.sub("", password))


# The protocols FFmpeg may use for each scheme, nested opens included: an HTTP redirect to `file:///etc/passwd`,
# or a playlist naming `concat:`/`file:` entries, is refused by FFmpeg itself ("not on whitelist").
PROTOCOL_WHITELIST = {"file": "file", "http": "http,tcp", "https": "https,tls,tcp", "rtsp": "rtsp,rtp,tcp,udp",
                      "rtsps": "rtsps,rtsp,rtp,tls,tcp,udp", "udp": "udp", "tcp": "tcp"}


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***` (rtsp://user:pass@cam → rtsp://***@cam).
    Everything that reaches a message, an event or a log goes through this: FFmpeg quotes URLs in its errors."""
    return _CREDENTIALS.sub("***@", text)


def transports(source: SourceUrl, setting: str) -> tuple[str | None, ...]:
    """The RTSP lower transports to try, in order, for a source's `transport` setting (None: not RTSP).

    `auto` tries TCP, then UDP when the server answers that it does not offer TCP (461 Unsupported Transport, which
    FFmpeg reports at once as "Protocol not supported"). TCP first because it loses no packets and passes NATs and
    firewalls; FFmpeg's own order, UDP first, finds no packets behind a NAT and waits for its timeout before it
    falls back, which our read timeout cuts short (docs/streaming-notes.md §7). RTSPS carries the media in its TLS
    connection: TCP only."""
    if source.scheme == "rtsps":
        return ("tcp",)
    if source.scheme != "rtsp":
        return (None,)
    return ("tcp", "udp") if setting == "auto" else (setting,)


def open_options(source: SourceUrl, transport: str | None = None, ca_file: str | None = None) -> dict[str, str]:
    """FFmpeg demuxer/protocol options for one kind of source (passed as `av.open(..., options=...)`): `transport`
    is one of `transports(source, ...)`, `ca_file` the CA certificates a TLS server is verified against (None:
    the system's)."""
    options = {"protocol_whitelist": PROTOCOL_WHITELIST[source.scheme]}
    if source.scheme in ("https", "rtsps"):
        options["tls_verify"] = "1"  # FFmpeg's default is to accept any certificate
        if ca_file:
            options["ca_file"] = ca_file
    if transport is not None:
        # The SDP names the codec; 1 s of stream is enough for the size and frame rate (FFmpeg's 5 s default made
        # every open and reconnect ~2 s slower: docs/streaming-notes.md §7).
        options.update({"rtsp_transport": transport, "analyzeduration": "1000000"})
    elif source.live and not source.hls:
        # Live MPEG-TS: start decoding at once instead of buffering seconds of stream to probe it.
        options.update({"fflags": "nobuffer", "analyzeduration": "1000000", "probesize": "500000"})
    return options
