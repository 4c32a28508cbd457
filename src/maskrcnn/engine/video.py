"""Predict on a video file or a live stream: an annotated video and one JSON line per frame.

Frames are decoded with PyAV (FFmpeg; the optional extra ``video``), run through the predictor
``batch_size`` at a time, and drawn and encoded in a second thread while the model works on the
next frames (drawing and encoding cost about as much as a small model). The per-frame JSON is
written line by line (JSON Lines), so a stream of any length needs no more memory than a few
frames, and an interrupted run (Ctrl-C on a camera stream) leaves a playable video and the lines of
every frame it wrote. Sound is not copied.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maskrcnn._extras import require
from maskrcnn.data.transforms import BadImageError
from maskrcnn.engine.folder import KEYS
from maskrcnn.evaluation.coco_eval import instances_to_detections
from maskrcnn.visualize import draw_detections

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".gif")
PIP_LINE = 'pip install "maskrcnn[video]"'


def is_video(source: str | Path) -> bool:
    """A video file (by its suffix) or a stream address (``rtsp://``, ``http://``, ...)."""
    text = str(source)
    return "://" in text or Path(text).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoResult:
    """What ``predict_video`` wrote and how fast: the annotated video, the JSON lines, the frames
    done, the wall time, and whether it was interrupted."""
    video_path: Path
    json_path: Path
    frames: int
    seconds: float
    interrupted: bool = False

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _open(av, source: str):
    try:
        container = av.open(source, timeout=30.0 if "://" in source else None)
    except FileNotFoundError:
        raise BadImageError(f"no such video file: {source}") from None
    except av.FFmpegError as e:  # not a video, truncated header, unreachable stream
        raise BadImageError(f"cannot read video {source}: {e.strerror or e}") from None
    if not container.streams.video:
        container.close()
        raise BadImageError(f"{source} has no video stream")
    return container


def _frame_rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0 or rate > 1000:  # some streams and GIFs carry no usable rate
        return Fraction(25)
    return Fraction(rate).limit_denominator(1001)


def _even(arr: np.ndarray) -> np.ndarray:
    """H.264 with 4:2:0 colour needs even sides: an odd side gets its last row/column repeated."""
    h, w = arr.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return arr
    return np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _frame_line(k: int, t: float | None, sel: dict, class_map) -> str:
    return json.dumps({"frame": k, "time": None if t is None else round(t, 6),
                       "detections": instances_to_detections(sel, class_map)})


def _upright(frame) -> np.ndarray:
    """The frame's RGB pixels as shown: turned by the stream's display rotation (phones record
    sideways and tag the video, as they tag photos with EXIF)."""
    arr = frame.to_ndarray(format="rgb24")
    turns = int(round(getattr(frame, "rotation", 0) / 90)) % 4  # counterclockwise, FFmpeg's display matrix
    return np.ascontiguousarray(np.rot90(arr, turns)) if turns else arr


def predict_video(predictor, source: str | Path, out_dir: Path, score_thresh: float = 0.5, batch_size: int = 1,
                  progress: bool = True, max_frames: int | None = None, name: str | None = None) -> VideoResult:
    """``out_dir/<name>.mp4`` (the frames with the detections drawn, upright, H.264 at the source's
    average frame rate) and ``out_dir/<name>.jsonl`` (per frame: ``frame`` from 0, ``time`` in
    seconds from the source's timestamps, and the ``detections`` as COCO results with
    ``class_name``, in upright frame pixels) for a video file or stream address. ``name``: the
    source's file name without suffix by default. ``max_frames`` stops after that many frames (for
    a camera that never ends)."""
    av = require("av", "video prediction", PIP_LINE)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    source = str(source)
    name = name or Path(source.split("://", 1)[-1].split("?", 1)[0]).stem or "stream"
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, json_path = out_dir / f"{name}.mp4", out_dir / f"{name}.jsonl"
    container = _open(av, source)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg decodes with its own threads
    rate = _frame_rate(stream)
    announced = stream.frames or 0  # from the container's header; 0 when unknown (streams)
    total = announced or None
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    class_map = predictor.class_map

    # written under temporary names and renamed at the end, so an existing result is replaced whole
    tmp_video, tmp_json = video_path.with_suffix(".tmp.mp4"), json_path.with_suffix(".tmp.jsonl")
    output = av.open(str(tmp_video), "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    ostream = None
    lines = tmp_json.open("w")

    def write(image: np.ndarray, sel: dict, k: int, t: float | None) -> None:
        nonlocal ostream
        arr = _even(np.asarray(draw_detections(image, sel, class_map)))
        if ostream is None:  # sized by the first frame (a stream's size is known once it is decoded)
            ostream = output.add_stream(codec, rate=rate)
            ostream.width, ostream.height = arr.shape[1], arr.shape[0]
            ostream.pix_fmt = "yuv420p"
            if codec == "libx264":
                ostream.options = {"crf": "20", "preset": "veryfast"}
        frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
        for packet in ostream.encode(frame):
            output.mux(packet)
        lines.write(_frame_line(k, t, sel, class_map) + "\n")

    done = 0
    interrupted = False
    start = time.perf_counter()
    no_bar = not progress or not sys.stderr.isatty()
    try:
        with ThreadPoolExecutor(1) as writer, \
                tqdm(total=total, desc="predicting", unit="frame", disable=no_bar, leave=False) as bar:
            writing: deque[Future] = deque()

            def run(batch: list) -> None:
                nonlocal done
                outputs = predictor.predict([arr for _, _, arr in batch])
                for (k, t, arr), out in zip(batch, outputs):
                    keep = out["scores"] >= score_thresh
                    sel = {key: out[key][keep] for key in KEYS if key in out}
                    writing.append(writer.submit(write, arr, sel, k, t))
                    done += 1
                    bar.update(1)
                while len(writing) > 2:  # bounded: drawn frames do not pile up
                    writing.popleft().result()

            batch: list = []
            size, resized = None, False
            try:
                for k, frame in enumerate(container.decode(stream)):
                    if max_frames is not None and k >= max_frames:
                        break
                    arr = _upright(frame)
                    if size is None:
                        size = arr.shape[:2]
                    elif arr.shape[:2] != size and not resized:  # the encoder scales to the first size
                        resized = True
                        print(f"{source}: the frame size changes at frame {k} ({size[1]}x{size[0]} -> "
                              f"{arr.shape[1]}x{arr.shape[0]}); the video is written at the first size (the "
                              "JSON lines keep each frame's own pixels)", file=sys.stderr)
                    batch.append((k, frame.time, arr))
                    if len(batch) == batch_size:
                        run(batch)
                        batch = []
            except av.FFmpegError as e:  # a corrupt stretch or a dropped stream: keep what was done
                print(f"{source}: decoding stopped after frame {done + len(batch)}: {e.strerror or e}",
                      file=sys.stderr)
            except KeyboardInterrupt:
                interrupted = True
                batch = []
            if batch:
                run(batch)
            for future in writing:
                future.result()
    except KeyboardInterrupt:  # a second Ctrl-C while finishing: still close the files below
        interrupted = True
    finally:
        container.close()
        if ostream is not None:
            for packet in ostream.encode(None):  # flush the encoder's delayed frames
                output.mux(packet)
        output.close()
        lines.close()
    expected = announced if max_frames is None else min(announced, max_frames)
    if not interrupted and announced and done < expected:
        print(f"{source}: {done} of the {expected} frames its header announces could be decoded (truncated or "
              "damaged file?)", file=sys.stderr)
    if done == 0:
        tmp_video.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        raise BadImageError(f"{source}: no frame could be decoded")
    os.replace(tmp_video, video_path)
    os.replace(tmp_json, json_path)
    return VideoResult(video_path, json_path, done, time.perf_counter() - start, interrupted)
