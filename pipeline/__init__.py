"""The streaming system around `model`: Ray actors, batching, Redis Streams, the `cdetr` command line.

Data flow, one module per stage:
    sources.py     which URLs are allowed, which are live, how FFmpeg opens them
    decoder.py     StreamDecoder actor per source: PyAV decode, swscale to model size (or the YUV planes for GPU
                   workers), backpressure, reconnect
    batcher.py     batches across sources (size, timeout from the first frame, frames per source)
    placement.py   which node serves each source: its decoder next to its workers, worker count from streams
    worker.py      DetectorWorker actor: the model, once; detections (+ panoptic) as FrameResults
    sink.py        Redis Streams writer: explicit entry IDs (idempotent), eos, events
    subscriber.py  reading FrameResults back, plainly or with a consumer group
    runner.py      the job that drives them all, with the control stream; its parts:
      source_state.py  one source's state machine: what is read, pending, written (the exactly-once rules)
      scheduling.py    what to read from which source, which worker gets a batch (pure functions)
Around them: config.py (one pydantic model), schema.py and wire.py (the wire format: messages; stream keys and
entry IDs), frames.py (what travels with decoded frames), metrics.py, redis_server.py (the embedded default),
render.py, detect.py, sample_video.py, demo.py, submit.py (`cdetr submit`), run_command.py (`cdetr run`) and
cli.py.
"""
