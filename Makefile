# `make demo` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# redis-server (tests and the embedded default), ffmpeg (live sources in tests), openssl (TLS test
# certificates) and GStreamer's RTSP server with the elements of the test camera (tests/rtsp_server.py, run by
# Debian's python3 with PyGObject; glib-networking gives it TLS for RTSPS) come from Debian.
RTSP_CHECK := import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import Gio, Gst, GstRtspServer; \
	Gst.init(None); assert all(map(Gst.ElementFactory.find, ("videotestsrc", "x264enc", "rtph264pay"))); \
	assert Gio.TlsBackend.get_default().supports_tls()
system-deps:
	@command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && command -v openssl >/dev/null && \
		/usr/bin/python3 -c '$(RTSP_CHECK)' 2>/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server ffmpeg openssl \
			python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
			gstreamer1.0-plugins-ugly glib-networking; }

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

demo: $(STAMP) system-deps
	RAY_AUTH_MODE=disabled $(BIN)/python -m pipeline.demo

clean:
	rm -rf $(VENV) .pytest_cache
