"""Video prediction: an annotated video and one JSON line per frame, from the CLI, with the same
detections as the predictor gives on the same decoded frames."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.cli import main
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.engine.predictor import Predictor
from maskrcnn.modeling.build import build_model
from tiny import tiny_train_config

av = pytest.importorskip("av")


def _encode(path: Path, frames, codec: str = "libx264", rate: int = 10, pix_fmt: str = "yuv420p",
            rotation: int | None = None) -> None:
    """Write the (H, W, 3) uint8 ``frames`` as a video."""
    frames = list(frames)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        for img in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in s.encode(None):
            out.mux(packet)


def _write_video(path: Path, frames: int, h: int, w: int, fps: int = 10) -> None:
    """A square and a disc moving across a dark background (lossless enough for the overlays to show)."""
    h, w = h + h % 2, w + w % 2
    yy, xx = np.mgrid[:h, :w]

    def frame(k):
        img = np.full((h, w, 3), 30, np.uint8)
        img[20:50, 10 + 3 * k:40 + 3 * k] = (230, 60, 60)
        img[(yy - 70) ** 2 + (xx - 90 + 2 * k) ** 2 <= 18 ** 2] = (60, 220, 90)
        return img

    _encode(path, (frame(k) for k in range(frames)), rate=fps)


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    cfg = tiny_train_config(root / "run", ["model.roi_heads.num_classes=2"])
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pth", build_model(cfg).state_dict(), cfg.to_dict(),
                    {"ids": [3, 7], "names": ["square", "disc"]}, 0)
    _write_video(root / "clip.mp4", 12, 120, 160)
    return root


def test_video_gives_an_annotated_video_and_a_json_line_per_frame(setup, capsys):
    out = setup / "out"
    assert main(["predict", str(setup / "clip.mp4"), "--weights", str(setup / "tiny.pth"), "--output", str(out),
                 "--score-thresh", "0.05", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "12 frames in" in printed and "frames/s" in printed
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(12))
    assert np.allclose([line["time"] for line in lines], np.arange(12) / 10)
    assert not list(out.glob("*.tmp.*"))

    # the same detections as the predictor on the frames PyAV decodes
    frames = _frames(setup / "clip.mp4")
    pred = Predictor(setup / "tiny.pth", "cpu")
    n_dets = 0
    for line, frame in zip(lines, frames):
        o = pred(frame)
        keep = (o["scores"] >= 0.05).tolist()
        want = [b for b, k in zip(o["boxes"].tolist(), keep) if k]
        got = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in line["detections"])]
        assert np.allclose(got, want, atol=1e-4)
        assert [d["category_id"] for d in line["detections"]] == [[3, 7][v - 1] for v, k in
                                                                   zip(o["labels"].tolist(), keep) if k]
        assert all(d["class_name"] in ("square", "disc") and "counts" in d["segmentation"] for d in line["detections"])
        n_dets += len(line["detections"])
    assert n_dets > 0, "nothing detected: the overlay comparison below would test nothing"

    # the annotated video: as many frames, of the source's size, showing the overlays
    drawn = _frames(out / "clip.mp4")
    assert len(drawn) == 12 and drawn[0].shape == frames[0].shape
    with av.open(str(out / "clip.mp4")) as c:
        assert c.streams.video[0].average_rate == 10
    changed = [np.abs(d.astype(int) - f.astype(int)).mean() for d, f in zip(drawn, frames)]
    with_dets = [c for c, line in zip(changed, lines) if line["detections"]]
    assert min(with_dets) > 1.0, "detections were drawn, but the frames look like the source"


def test_odd_sizes_max_frames_and_batches(setup):
    rng = np.random.default_rng(0)  # an odd-sized source (ffv1 takes odd sides)
    _encode(setup / "odd.mkv", (rng.integers(0, 255, (61, 75, 3), dtype=np.uint8) for _ in range(6)), "ffv1", 5,
            "yuv444p")
    out = setup / "odd_out"
    assert main(["predict", str(setup / "odd.mkv"), "--weights", str(setup / "tiny.pth"), "--output", str(out),
                 "--max-frames", "4", "--batch-size", "3", "--no-progress"]) == 0
    assert len((out / "odd.jsonl").read_text().splitlines()) == 4
    drawn = _frames(out / "odd.mp4")
    assert len(drawn) == 4 and drawn[0].shape == (62, 76, 3)  # H.264 needs even sides: one edge row/column added


def test_bad_videos_are_one_line_errors(setup, capsys):
    (setup / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (setup / "half.mp4").write_bytes((setup / "clip.mp4").read_bytes()[:200])
    for name, expected in [("junk.mp4", "cannot read video"), ("half.mp4", "cannot read video"), ("missing.mp4", "no such video")]:
        code = main(["predict", str(setup / name), "--weights", str(setup / "tiny.pth"), "--output",
                     str(setup / "bad_out"), "--no-progress"])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert expected in err, err
    assert not (setup / "bad_out").exists() or not list((setup / "bad_out").iterdir())


def test_missing_extra_names_the_pip_line(setup, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails
    code = main(["predict", str(setup / "clip.mp4"), "--weights", str(setup / "tiny.pth"), "--output",
                 str(setup / "noav")])
    err = capsys.readouterr().err
    assert code != 0 and 'pip install "maskrcnn[video]"' in err and "Traceback" not in err


def test_rotated_videos_are_predicted_upright(setup):
    """A phone video is stored sideways with a display rotation, as photos carry EXIF: frames are
    turned as a player shows them (FFmpeg's display matrix: counterclockwise degrees)."""
    img = np.full((40, 60, 3), 20, np.uint8)
    img[:10, :20] = 250  # a bright block at the stored frame's top-left
    _encode(setup / "phone.mp4", [img] * 3, rotation=90)
    out = setup / "phone_out"
    assert main(["predict", str(setup / "phone.mp4"), "--weights", str(setup / "tiny.pth"), "--output", str(out),
                 "--score-thresh", "1.0", "--no-progress"]) == 0
    frame = _frames(out / "phone.mp4")[0]
    assert frame.shape == (60, 40, 3)  # upright: 40 wide, 60 tall
    assert frame[50:60, :10].mean() > 200 and frame[:10, :10].mean() < 60  # top-left turned to bottom-left


def test_names_collisions_and_inputs_never_overwritten(setup, capsys):
    import shutil

    for folder in ("x", "y"):
        (setup / folder).mkdir(exist_ok=True)
        shutil.copy(setup / "clip.mp4", setup / folder / "clip.mp4")
    out = setup / "two"
    assert main(["predict", str(setup / "x" / "clip.mp4"), str(setup / "y" / "clip.mp4"), "--weights",
                 str(setup / "tiny.pth"), "--output", str(out), "--no-progress", "--max-frames", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x_clip.jsonl", "x_clip.mp4", "y_clip.jsonl", "y_clip.mp4"]
    # a glob finds videos too
    assert main(["predict", str(setup / "[xy]" / "*.mp4"), "--weights", str(setup / "tiny.pth"), "--output",
                 str(setup / "globbed"), "--no-progress", "--max-frames", "1"]) == 0
    assert len(list((setup / "globbed").glob("*.mp4"))) == 2
    # --output the input's folder: refused before any work, the input untouched
    before = (setup / "x" / "clip.mp4").read_bytes()
    code = main(["predict", str(setup / "x" / "clip.mp4"), "--weights", str(setup / "tiny.pth"), "--output",
                 str(setup / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "would overwrite the input" in err and (setup / "x" / "clip.mp4").read_bytes() == before
    # an image whose overlay would get its own name is refused too
    from PIL import Image

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(setup / "x" / "photo.png")
    before = (setup / "x" / "photo.png").read_bytes()
    code = main(["predict", str(setup / "x" / "photo.png"), "--weights", str(setup / "tiny.pth"), "--output",
                 str(setup / "x")])
    assert code != 0 and "would overwrite the input" in capsys.readouterr().err
    assert (setup / "x" / "photo.png").read_bytes() == before


def test_a_variable_rate_source_with_sound(setup):
    """Frames at irregular times (a phone's variable frame rate) and an audio track: the JSON keeps
    each frame's own time, the video is written at a constant rate (the source's average) with every
    frame once, and without the sound."""
    from fractions import Fraction

    path = setup / "vfr.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        video.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=16000)
        for k, t in enumerate([0, 100, 200, 400, 500, 900, 1000, 1300]):  # milliseconds
            img = np.full((120, 160, 3), 30, np.uint8)
            img[20:50, 10 + 5 * k:40 + 5 * k] = (230, 60, 60)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        tone = av.AudioFrame.from_ndarray((np.sin(np.arange(22400) / 10) * 0.3).astype(np.float32)[None],
                                          format="fltp", layout="mono")
        tone.sample_rate, tone.pts = 16000, 0
        for packet in [*sound.encode(tone), *sound.encode(None)]:
            out.mux(packet)
    with av.open(str(path)) as c:
        assert [st.type for st in c.streams] == ["video", "audio"]
        source_times = [f.time for f in c.decode(video=0)]
    assert len(set(np.round(np.diff(source_times), 3))) > 1, "the source should have irregular frame times"

    out = setup / "vfr_out"
    assert main(["predict", str(path), "--weights", str(setup / "tiny.pth"), "--output", str(out),
                 "--no-progress"]) == 0
    lines = [json.loads(line) for line in (out / "vfr.jsonl").read_text().splitlines()]
    assert np.allclose([line["time"] for line in lines], source_times)
    with av.open(str(out / "vfr.mp4")) as c:
        assert [st.type for st in c.streams] == ["video"]  # no sound
        assert c.streams.video[0].average_rate == 10
        written = [f.time for f in c.decode(video=0)]
    assert len(written) == len(source_times)
    assert np.allclose(np.diff(written), 0.1)  # one frame every 1/10 s: a constant rate


def test_a_stream_whose_frame_size_changes(setup, capsys):
    """Two H.264 transport streams of different sizes back to back (as a camera that switches
    resolution sends them): a warning, and a video of every frame at the first size."""
    def part(h: int, w: int) -> bytes:
        path = setup / f"part_{w}x{h}.ts"
        with av.open(str(path), "w", format="mpegts") as out:
            s = out.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for k in range(3):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 + 20 * k, np.uint8), format="rgb24")
                for packet in s.encode(frame):
                    out.mux(packet)
            for packet in s.encode(None):
                out.mux(packet)
        return path.read_bytes()

    (setup / "switch.ts").write_bytes(part(120, 160) + part(96, 128))
    assert [f.shape[:2] for f in _frames(setup / "switch.ts")] == [(120, 160)] * 3 + [(96, 128)] * 3
    out = setup / "switch_out"
    assert main(["predict", str(setup / "switch.ts"), "--weights", str(setup / "tiny.pth"), "--output", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the frame size changes at frame 3 (160x120 -> 128x96)" in err, err
    assert len((out / "switch.jsonl").read_text().splitlines()) == 6
    assert [f.shape[:2] for f in _frames(out / "switch.mp4")] == [(120, 160)] * 6


def test_ctrl_c_keeps_a_playable_video_and_the_lines_so_far(setup):
    import os
    import signal
    import subprocess
    import time

    _write_video(setup / "long.mp4", 400, 120, 160)
    out = setup / "long_out"
    proc = subprocess.Popen([sys.executable, "-m", "maskrcnn", "predict", str(setup / "long.mp4"), "--weights",
                             str(setup / "tiny.pth"), "--output", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    partial = out / "long.tmp.jsonl"
    deadline = time.time() + 120
    while not (partial.is_file() and len(partial.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stdout and "Traceback" not in stderr, (stdout, stderr)
    lines = (out / "long.jsonl").read_text().splitlines()
    drawn = _frames(out / "long.mp4")  # decodes: the file was closed properly
    assert 5 <= len(lines) < 400 and len(drawn) == len(lines)
    assert not list(out.glob("*.tmp.*"))
