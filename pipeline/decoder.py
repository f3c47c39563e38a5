"""StreamDecoder: one per source; decodes with PyAV in a background thread into a bounded buffer.

The runner runs it as a Ray actor and pulls chunks of frames with `read()`. Frames leave the actor in one of two
forms (`decoder.output`), both no larger than an RGB frame at model input size, so no full-size RGB frame travels
through the object store (a 1080p RGB frame is 6.2 MB: docs/streaming-notes.md §2):
- `rgb`: scaled to model input size and converted to RGB by swscale (`to_ndarray(width, height, format="rgb24")`);
  the CPU workers' default, where the worker's core is the scarce one;
- `yuv420`: the decoder's own YUV 4:2:0 planes, untouched (swscale only scales frames of more than twice the
  model's pixels down to model size, and odd sizes to even ones). That skips swscale's conversion and resize, which
  cost more than the decoding itself (bench/RESULTS.md §3), and is half the bytes of RGB; the worker's GPU
  converts and resizes them (model/yuv.py). The GPU workers' default.

Backpressure (Roboflow's WAIT/LAZY vs DROP_OLDEST/EAGER: docs/streaming-notes.md §3):
- `block`: the decode thread waits while the buffer is full, so no frame is ever lost (files);
- `drop_oldest`: the buffer drops its oldest frame when full, and `read()` hands out only the newest frames
  (live sources); drops are counted.
Live sources reconnect with exponential backoff; the PyAV read timeout and a no-frame watchdog catch stalls (a
frozen camera, a dead HLS writer: FFmpeg alone would wait forever). A camera that refuses our credentials (401,
403) gets one `auth_failed` event and is tried again only every `auth_retry_s` (minutes): cameras lock an account
after a few failed logins. RTSP's transport comes from `sources.transports` (TCP, then UDP when only that is
offered); the one that worked is in the `started`/`recovered` event. An HLS playlist that turns out finished
(VOD) ends at its end like a file.

Hostile input: the header's frame size and codec are checked before anything is decoded (`DecoderConfig`
`max_pixels`, `allowed_codecs`); a packet the decoder rejects (corrupt data mid-file) is skipped and reported as a
`corrupt` event, and decoding goes on; a file that ends before the frame count its header states (truncated) is
reported the same way.

A source URL's password may be a `${NAME}` reference (docs/security.md): it is filled in from this process's
environment right before each open, so the URL with the password never leaves the decoder, and every event
built from a URL goes through `redact`.
"""
import errno
import socket
import threading
import time
from collections import deque
from urllib.parse import urlsplit

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

from model.image_size import get_resize_output_size
from pipeline.config import DecoderConfig, SourceConfig
from pipeline.frames import RGB, ChunkInfo, FrameFormat, FrameMeta
from pipeline.schema import Event
from pipeline.sources import MissingSecret, expand_secrets, open_options, parse_source_url, redact, transports

# A frame's colour matrix tag -> model/yuv.py's name; untagged video is BT.601, as swscale assumes.
_MATRICES = {Colorspace.ITU709: "bt709", Colorspace.BT2020: "bt2020"}


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


class StalledError(RuntimeError):
    """A live source delivered no frame for `watchdog_s`."""


class RefusedError(ValueError):
    """The input is well formed but not something we decode (codec, frame size)."""


# What a server answers to wrong or missing credentials (FFmpeg maps RTSP's status codes to HTTP's errors).
AUTH_ERRORS = (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError)


class StreamDecoder:
    def __init__(self, source: SourceConfig, size: dict[str, int], cfg: DecoderConfig, start_index: int = 0):
        self.source = source
        self.url = parse_source_url(source.url)
        self.size = size
        self.cfg = cfg
        self.start_index = start_index  # frames below this index are already in Redis (resume)
        self._block = source.backpressure == "block"
        self._yuv = cfg.output == "yuv420"
        self._buffer: deque[tuple[FrameMeta, FrameFormat, np.ndarray]] = deque()
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._dropped = 0
        self._done = False
        self._stop = threading.Event()
        self._next_sample_t: float | None = None
        self._transport: str | None = None  # the RTSP transport of the open connection
        # Index of the next decoded frame. It keeps counting across reconnects so entry IDs only grow; a file
        # restarts at 0 and skips what is already written, a live stream simply continues the numbering.
        self._index = start_index if self.url.live else 0
        self._thread = threading.Thread(target=self._run, name=f"decode-{source.id}", daemon=True)
        self._thread.start()

    # --- called by the runner (actor methods) ---

    def read(self, max_frames: int, wait_s: float = 0.5) -> tuple[ChunkInfo, np.ndarray]:
        """Up to `max_frames` buffered frames of one size, waiting up to `wait_s` for the first."""
        with self._cond:
            self._cond.wait_for(lambda: self._buffer or self._events or self._done, timeout=wait_s)
            if not self._block:
                # Eager consumption: only the newest frames are worth processing.
                while len(self._buffer) > max_frames:
                    self._buffer.popleft()
                    self._dropped += 1
            taken: list[tuple[FrameMeta, FrameFormat, np.ndarray]] = []
            while self._buffer and len(taken) < max_frames:
                _, fmt, array = self._buffer[0]
                if taken and (array.shape != taken[0][2].shape or fmt != taken[0][1]):
                    break  # a live stream changed resolution or colour space: one of each per chunk
                taken.append(self._buffer.popleft())
            events, self._events = self._events, []
            info = ChunkInfo(self.source.id, [m for m, _, _ in taken], taken[0][1] if taken else RGB, events,
                             self._dropped, finished=self._done and not self._buffer)
            self._cond.notify_all()  # a blocked decode thread has room again
        frames = np.stack([a for _, _, a in taken]) if taken else np.zeros((0, 0, 0, 3), np.uint8)
        return info, frames

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # --- the decode thread ---

    def _run(self) -> None:
        failures = 0
        opened_before = False
        auth_failed = False  # since the last successful open
        while not self._stop.is_set():
            try:
                with self._open() as container:
                    if not container.streams.video:
                        raise RefusedError("no video stream in this input")
                    stream = container.streams.video[0]
                    self._check(stream)
                    self._emit("recovered" if opened_before else "started", details=self._describe(stream))
                    opened_before, failures, auth_failed = True, 0, False
                    self._decode(container, stream)
                    # A live HLS playlist has no duration; a finished (VOD) one ends like a file.
                    finite = not self.url.live or container.duration is not None
                if finite:
                    break
                raise StalledError("live stream ended")
            except Exception as e:  # PyAV raises many types (FFmpegError, OSError, ValueError); all end here
                if self._stop.is_set():
                    break
                if not self.url.live or isinstance(e, RefusedError) or self._unplayable(e, opened_before):
                    self._emit("error", message=self._explain(e))  # it will not get better
                    break
                if isinstance(e, AUTH_ERRORS):
                    if not auth_failed:  # one event per streak: the retries are slow and say nothing new
                        self._emit("auth_failed", message=f"{self._explain(e)}; trying again every "
                                   f"{self.cfg.auth_retry_s:g} s", details={"retry_s": self.cfg.auth_retry_s})
                    auth_failed = True
                    self._stop.wait(self.cfg.auth_retry_s)
                    continue
                failures += 1
                delay = min(self.cfg.reconnect_initial_s * 2 ** (failures - 1), self.cfg.reconnect_max_s)
                self._emit("reconnecting", message=self._explain(e),
                           details={"attempt": failures, "delay_s": delay})
                self._stop.wait(delay)
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _unplayable(self, error: Exception, opened_before: bool) -> bool:
        """An HLS URL that never served a playable playlist (not a playlist, or segments FFmpeg may not open:
        `file://` ones) is refused like a file; once one has played, every failure is retried."""
        return self.url.hls and not opened_before and isinstance(error, av.error.InvalidDataError)

    def _open(self):
        """The opened container, over the first transport the server accepts (`sources.transports`); the one that
        worked last goes first, so a UDP-only camera is not asked for TCP at every reconnect."""
        target = self._target()
        order = transports(self.url, self.source.transport)
        *first, last = sorted(order, key=lambda transport: transport != self._transport)  # stable
        for transport in first:
            try:
                return self._open_with(target, transport)
            except OSError as e:
                if e.errno != errno.EPROTONOSUPPORT:  # what FFmpeg makes of 461 Unsupported Transport
                    raise
        return self._open_with(target, last)

    def _open_with(self, target: str, transport: str | None):
        container = av.open(target, options=open_options(self.url, transport, self.source.ca_file),
                            timeout=(self.cfg.open_timeout_s, self.cfg.read_timeout_s))
        self._transport = transport
        return container

    def _target(self) -> str:
        """What FFmpeg opens: the URL with its `${NAME}` references filled in from this node's environment."""
        try:
            return expand_secrets(self.url.target)
        except MissingSecret as e:  # set on this node or not, it will not change while the process runs
            raise RefusedError(f"{e} on the decoder's node ({socket.gethostname()})") from None

    def _check(self, stream) -> None:
        """Refuse, from the header alone, what we will not decode (raised before the first packet is read)."""
        codec = stream.codec_context.codec.canonical_name
        if codec not in self.cfg.allowed_codecs:
            raise RefusedError(f"video codec {codec!r} is not allowed (decoder.allowed_codecs: "
                               f"{', '.join(self.cfg.allowed_codecs)})")
        self._check_size(stream.width, stream.height)

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.cfg.max_pixels:
            raise RefusedError(f"frame size {width}x{height} exceeds decoder.max_pixels = {self.cfg.max_pixels}")

    def _explain(self, error: Exception) -> str:
        if isinstance(error, AUTH_ERRORS):
            return (f"authentication failed ({error.strerror}) at {self.source.url}: check the user name and "
                    f"password")
        if isinstance(error, av.error.ExitError):
            # PyAV's timeout interrupts FFmpeg, which reports it as "Immediate exit requested".
            return (f"timed out: no data within {self.cfg.open_timeout_s:g} s (open) / "
                    f"{self.cfg.read_timeout_s:g} s (read) from {self.source.url}")
        message = f"{type(error).__name__}: {error}"
        code = error.errno if isinstance(error, OSError) else None
        if code == errno.EPROTONOSUPPORT and self.url.scheme == "rtsp":
            offered = " or ".join(transports(self.url, self.source.transport)).upper()
            return f"{message} (the camera does not offer RTSP over {offered}; see the source's transport)"
        if code == errno.EIO:  # FFmpeg's answer to several network failures: say which it may be
            host = urlsplit(self.url.target).hostname
            if host is not None and not _resolves(host):
                return f"{message} (cannot resolve host {host!r})"
            if self.url.scheme in ("https", "rtsps"):
                return f"{message} (a TLS failure reads so too: is the server's certificate signed by ca_file?)"
        return message

    def _describe(self, stream) -> dict:
        rate = stream.average_rate
        return {"url": self.source.url, "width": stream.width, "height": stream.height,
                "fps": float(rate) if rate else None, "frames": stream.frames or None,
                "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
                "start_index": self.start_index, "codec": stream.codec_context.codec.canonical_name,
                "transport": self._transport}

    def _decode(self, container, stream) -> None:
        if not self.url.live:
            stream.thread_type = "AUTO"  # frame threading: ~5x faster, its extra delay only matters live
        self._next_sample_t = None  # a reconnected live stream restarts its timestamps
        last_frame = time.monotonic()
        bad = 0  # consecutive packets the decoder rejected
        for packet in container.demux(stream):
            started = time.perf_counter()
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as e:
                # Corrupt data: FFmpeg resynchronizes at the next good packet (the next keyframe for
                # inter frames), so skip this one rather than give up on the whole source.
                bad += 1
                if bad == 1:
                    self._emit("corrupt", message=f"skipping undecodable packets after frame {self._index - 1}: "
                               f"{e}", details={"after_frame_index": self._index - 1})
                continue
            bad = 0
            for frame in frames:
                # A stream may change resolution mid-way (live, or a crafted file): the limit holds per frame.
                self._check_size(frame.width, frame.height)
                last_frame = time.monotonic()
                if self._index >= self.start_index and self._sample(frame.time):
                    self._put(self._convert(frame, self._index, started))
                self._index += 1
                started = time.perf_counter()
                if self._stop.is_set():
                    return
            if self.url.live and time.monotonic() - last_frame > self.cfg.watchdog_s:
                raise StalledError(f"no frame for {self.cfg.watchdog_s:.0f} s")
        if not self.url.live and stream.frames and self._index < stream.frames:
            self._emit("corrupt", message=f"the file ended after {self._index} of the {stream.frames} frames its "
                       f"header states (truncated?)", details={"frames": self._index, "expected": stream.frames})

    def _sample(self, t: float | None) -> bool:
        """fps sampling on a fixed time grid, so 25 fps sampled at 10 fps gives 10 frames/s, not 8.3."""
        if self.source.fps is None or t is None:
            return True
        if self._next_sample_t is not None and t < self._next_sample_t - 1e-6:
            return False
        period = 1.0 / self.source.fps
        self._next_sample_t = t if self._next_sample_t is None else self._next_sample_t
        while self._next_sample_t <= t + 1e-6:
            self._next_sample_t += period
        return True

    def _convert(self, frame, index: int, started: float) -> tuple[FrameMeta, FrameFormat, np.ndarray]:
        fmt, array = self._yuv420(frame) if self._yuv else (RGB, self._rgb(frame))
        meta = FrameMeta(index, frame.time, time.time(), frame.width, frame.height,
                         (time.perf_counter() - started) * 1e3)
        return meta, fmt, array

    def _rgb(self, frame) -> np.ndarray:
        height, width = get_resize_output_size(frame.height, frame.width, self.size)
        return frame.to_ndarray(width=width, height=height, format="rgb24")  # swscale does the resize

    def _yuv420(self, frame) -> tuple[FrameFormat, np.ndarray]:
        """The frame's YUV 4:2:0 planes, through swscale only when they must change (see the module docstring)."""
        height, width = frame.height, frame.width
        model_height, model_width = get_resize_output_size(height, width, self.size)
        if height * width > 2 * model_height * model_width:  # then YUV at source size is more bytes than RGB
            height, width = model_height, model_width
        height, width = height - height % 2, width - width % 2  # 4:2:0 needs even sizes; the worker resizes
        # H.264/HEVC in 8 bits decode to yuv420p (yuvj420p when full range); other layouts go through swscale,
        # which keeps the matrix and gives limited range.
        native = frame.format.name in ("yuv420p", "yuvj420p") and (height, width) == (frame.height, frame.width)
        # A frame tagged full range (MJPEG's are) stays full range through swscale, as PyAV calls it; an untagged
        # yuvj* frame is full range by definition, but swscale makes it limited-range yuv420p.
        full_range = frame.color_range == ColorRange.JPEG or (native and frame.format.name == "yuvj420p")
        array = frame.to_ndarray() if native else frame.to_ndarray(width=width, height=height, format="yuv420p")
        return FrameFormat("yuv420p", _MATRICES.get(frame.colorspace, "bt601"), full_range), array

    def _put(self, item: tuple[FrameMeta, FrameFormat, np.ndarray]) -> None:
        with self._cond:
            if self._block:
                self._cond.wait_for(lambda: len(self._buffer) < self.cfg.buffer_size or self._stop.is_set())
            elif len(self._buffer) >= self.cfg.buffer_size:
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append(item)
            self._cond.notify_all()

    def _emit(self, type_: str, message: str = "", details: dict | None = None) -> None:
        with self._cond:
            # Camera URLs often carry a password, and FFmpeg's errors quote the URL.
            details = {k: redact(v) if isinstance(v, str) else v for k, v in (details or {}).items()}
            self._events.append(Event(type=type_, source_id=self.source.id, message=redact(message),
                                      details=details))
            self._cond.notify_all()
