"""``maskrcnn serve`` under load, and video prediction's frames per second.

    python benchmarks/serve.py --checkpoint outputs/demo/train/model_final.pth [--requests 200] [--concurrency 8]

Serve: starts ``maskrcnn serve`` on loopback with the checkpoint (``--threads`` torch threads), then
sends ``--requests`` POST /predict requests (the shapes validation images of the checkpoint's data,
PNG, RLE masks) from ``--concurrency`` client threads, once per ``--max-batch`` setting; prints errors,
throughput, p50/p95 latency and images per model call. A sequential run (concurrency 1) gives the
latency of one request alone.

Video: a clip of moving shapes (``--frames`` frames at the model's input size) through ``maskrcnn
predict clip.mp4``: frames/s with decoding, model, drawing and encoding, against the model alone on
the same frames.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, name: str, data: bytes) -> tuple[int, float]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - start


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def serve_load(checkpoint: str, images: list[tuple[str, bytes]], requests: int, concurrency: int, max_batch: int,
               threads: int) -> dict:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "maskrcnn", "serve", "--weights", checkpoint, "--port", str(port),
                             "--device", "cpu", "--max-batch", str(max_batch), "--queue", str(4 * concurrency)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                _get(f"{base}/health")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start: " + proc.stderr.read().decode())
                time.sleep(0.3)
        for k in range(3):  # warm up
            _post(f"{base}/predict", *images[k % len(images)])
        before = _get(f"{base}/health")
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(lambda k: _post(f"{base}/predict", *images[k % len(images)]), range(requests)))
        wall = time.perf_counter() - start
        after = _get(f"{base}/health")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(t for _, t in out)
    calls = after["batches"] - before["batches"]
    return {"errors": sum(s != 200 for s, _ in out), "req_per_s": requests / wall,
            "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[max(int(0.95 * len(lat)) - 1, 0)],
            "images_per_call": (after["images"] - before["images"]) / max(calls, 1)}


def video_fps(checkpoint: str, frames: int, size: int, threads: int) -> dict:
    import av
    import numpy as np
    import torch

    from maskrcnn.cli import main
    from maskrcnn.data.shapes import draw_image
    from maskrcnn.engine.predictor import Predictor

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    scene, _ = draw_image(rng, (size, 2 * size), 8, 16.0, 44.0, 0.4)
    clip = tmp / "clip.mp4"
    with av.open(str(clip), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for k in range(frames):  # the camera pans across a wide scene
            x = int(k * size / frames)
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, x:x + size]),
                                                              format="rgb24")):
                out.mux(packet)
        for packet in s.encode(None):
            out.mux(packet)
    with av.open(str(clip)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    pred = Predictor(checkpoint, "cpu")
    pred(decoded[0])
    start = time.perf_counter()
    for f in decoded:
        pred(f)
    model_only = len(decoded) / (time.perf_counter() - start)
    start = time.perf_counter()
    main(["predict", str(clip), "--weights", checkpoint, "--output", str(tmp / "out"), "--no-progress"])
    whole = frames / (time.perf_counter() - start)
    lines = (tmp / "out" / "clip.jsonl").read_text().splitlines()
    dets = sum(len(json.loads(line)["detections"]) for line in lines)
    return {"frames": frames, "size": size, "whole_fps": whole, "model_only_fps": model_only,
            "detections_per_frame": dets / len(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--skip-video", action="store_true")
    args = ap.parse_args()

    import torch

    from maskrcnn.config import Config, merge

    cfg = merge(Config(), torch.load(args.checkpoint, map_location="cpu", weights_only=False)["config"])
    folder = Path(cfg.data.shapes_dir) / "val"
    if not folder.is_dir():
        sys.exit(f"{folder} (the checkpoint's shapes validation images) not found: run from the folder it was "
                 "trained in")
    images = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.png"))[:50]]
    print(f"serve: {args.checkpoint}, {len(images)} validation images ({cfg.model.input.min_size_test} px), "
          f"{args.threads} torch threads, {args.requests} requests")
    rows = [("sequential", 1, 1)] + [(f"concurrency {args.concurrency}", args.concurrency, b) for b in (1, 4)]
    for label, conc, batch in rows:
        r = serve_load(args.checkpoint, images, args.requests if conc > 1 else 50, conc, batch, args.threads)
        print(f"  {label:>15}, max batch {batch}: errors {r['errors']}, {r['req_per_s']:.1f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, {r['images_per_call']:.2f} images per model call")
    if not args.skip_video:
        v = video_fps(args.checkpoint, args.frames, cfg.model.input.min_size_test, args.threads)
        print(f"video: {v['frames']} frames of {v['size']}x{v['size']}, {v['detections_per_frame']:.1f} detections "
              f"per frame: predict {v['whole_fps']:.1f} frames/s (decode, model, draw, encode); the model alone "
              f"{v['model_only_fps']:.1f} frames/s")


if __name__ == "__main__":
    main()
