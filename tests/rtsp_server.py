"""A test RTSP camera: GStreamer's RTSP server (gst-rtsp-server, through PyGObject) on loopback.

Runs under Debian's /usr/bin/python3 (the virtualenv has no `gi`; `make system-deps` installs the packages), as its
own process, so that a test can kill it (a camera reboot), SIGSTOP it (a stall) and start it again at another
resolution. It serves `rtsp://127.0.0.1:PORT/cam`: a live test pattern (a moving ball) encoded by x264 without
B-frames, one encoder per client. A live source paces itself and never ends; a looped file would have to be
seeked at each end inside the server's media pipeline, and B-frames are what cameras do not send. Not shared: a
shared media answers 503 to a client that comes back right after another one left (the TCP attempt of
`transport: auto` on a UDP-only camera), while it is torn down.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 [--size 320x180] [--fps 10] [--protocols tcp|udp|all]
        [--auth basic|digest --user NAME] [--cert server.crt --key server.key]

The password is read from the environment variable RTSP_PASSWORD (never from the command line, which `ps` shows).
The tests and bench/bench_rtsp.py drive it from the virtualenv through `RtspCamera` (this module imports `gi`
only when it runs as the server).
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with PyGObject (python3-gi)


class RtspCamera:
    """One test camera process on a loopback port: start it, kill it (a reboot), pause and resume it (a stall),
    start it again at another size. `url` has no credentials; `url_with(user, password)` adds them."""

    def __init__(self, port: int, size: str = "320x180", fps: int = 10, protocols: str = "all",
                 auth: str | None = None, password: str | None = None, tls: tuple[Path, Path] | None = None):
        self.port, self.size, self.fps, self.protocols = port, size, fps, protocols
        self.auth, self.password, self.tls = auth, password, tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rtsps' if self.tls else 'rtsp'}://127.0.0.1:{self.port}/cam"

    def url_with(self, user: str, password: str) -> str:
        return self.url.replace("://", f"://{user}:{password}@", 1)

    def start(self, size: str | None = None, timeout: float = 20.0) -> "RtspCamera":
        self.size = size or self.size
        args = [SYSTEM_PYTHON, __file__, "--port", str(self.port), "--size", self.size, "--fps", str(self.fps),
                "--protocols", self.protocols]
        if self.auth:
            args += ["--auth", self.auth]
        if self.tls:
            args += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        env = {**os.environ, "RTSP_PASSWORD": self.password or ""}
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):  # a killed server's port is free again at once (SO_REUSEADDR)
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the RTSP server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """Power off: SIGKILL, no RTSP TEARDOWN."""
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the server (under SYSTEM_PYTHON) ---


def parse_args(transports, methods) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", default="320x180", help="WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--protocols", choices=sorted(transports), default="all", help="lower transports offered")
    parser.add_argument("--auth", choices=sorted(methods), help="require this authentication (RTSP_PASSWORD)")
    parser.add_argument("--user", default="viewer")
    parser.add_argument("--cert", help="server certificate (PEM): serve RTSPS")
    parser.add_argument("--key", help="the certificate's private key (PEM)")
    return parser.parse_args()


def launch_line(size: str, fps: int) -> str:
    width, height = size.split("x")
    return (f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast bframes=0 key-int-max={fps} ! "
            f"rtph264pay name=pay0 pt=96 config-interval=1 )")


def make_auth(args: argparse.Namespace, Gio, GstRtsp, GstRtspServer):
    auth = GstRtspServer.RTSPAuth()
    if args.cert:
        auth.set_tls_certificate(Gio.TlsCertificate.new_from_files(args.cert, args.key))
    if args.auth:
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        password = os.environ["RTSP_PASSWORD"]
        if args.auth == "basic":
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, password), token)
        else:
            auth.add_digest(args.user, password, token)
        auth.set_supported_methods({"basic": GstRtsp.RTSPAuthMethod.BASIC,
                                    "digest": GstRtsp.RTSPAuthMethod.DIGEST}[args.auth])
    else:
        # Without credentials every client is an anonymous viewer.
        anonymous = GstRtspServer.RTSPToken()
        anonymous.set_string("media.factory.role", "viewer")
        auth.set_default_token(anonymous)
    return auth


def main() -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtsp", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import Gio, GLib, Gst, GstRtsp, GstRtspServer

    transports = {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP,
                  "all": GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP}
    args = parse_args(transports, ("basic", "digest"))
    Gst.init(None)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args.size, args.fps))
    factory.set_shared(False)
    factory.set_protocols(transports[args.protocols])
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_role("viewer")
    permissions.add_permission_for_role("viewer", "media.factory.access", True)
    permissions.add_permission_for_role("viewer", "media.factory.construct", True)
    factory.set_permissions(permissions)

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.set_auth(make_auth(args, Gio, GstRtsp, GstRtspServer))
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {args.port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
