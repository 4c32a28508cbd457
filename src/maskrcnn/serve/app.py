"""The HTTP service of ``maskrcnn serve`` (FastAPI; the optional extra ``serve``).

- ``POST /predict``: one or several images (multipart form field ``image``, repeated; or one image
  as the raw body with an ``image/*`` content type) -> per image its size and detections in COCO
  results form (``bbox`` x, y, w, h in pixels, ``score``, ``category_id``, ``class_name``,
  ``segmentation`` as COCO RLE or polygons, ``keypoints``). Query: ``score_thresh`` (0-1),
  ``mask_format`` (``rle``, ``polygon`` or ``none``).
- ``GET /health``, ``GET /model`` (classes, model and serving settings), ``GET /`` (the web page),
  ``GET /openapi.json``.

Every error is JSON ``{"error": "..."}`` with a 4xx status for what the client sent (413 too
large, 415 not an image, 422 a wrong field or option, 503 queue full, 504 timeout); a failure of
the model is a 500 for the requests of that call only, and the service goes on.
"""

# no "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request, Query)
# at run time, and those types are imported inside create_app (the extra is optional)
import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path

import numpy as np

from maskrcnn._extras import require
from maskrcnn.data.transforms import BadImageError, ImageTooLarge, load_image
from maskrcnn.evaluation.coco_eval import instances_to_detections
from maskrcnn.serve.batcher import Batcher, QueueFull
from maskrcnn.structures.contours import mask_to_polygons

PIP_LINE = 'pip install "maskrcnn[serve]"'
MASK_FORMATS = ("rle", "polygon", "none")


@dataclass
class ServeSettings:
    """Limits and defaults of the service (``maskrcnn serve --help`` explains each)."""
    score_thresh: float = 0.5
    max_batch: int = 4
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000  # per request, all its images together
    max_files: int = 16

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# A body up to this many times the limit is read and dropped before the 413 is sent: clients that
# send the whole body before reading the answer (urllib, requests) otherwise hit a closed
# connection mid-upload and report a broken pipe instead of the 413 (seen in CI on 2026-12-07).
# Larger bodies are answered at once and the connection closed, as nginx does after its lingering time.
DRAIN_FACTOR = 4


async def _discard(receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most about ``budget`` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large(limit: int, limit_mb: float, size: int | None = None, name: str = "the upload") -> ApiError:
    """The 413 for an upload over the limit, in one wording wherever the limit is found crossed; sizes
    in bytes, since a body one byte over would otherwise read "1.0 MB, more than the 1 MB allowed"."""
    told = f" is {size:,} bytes," if size is not None else " is"
    return ApiError(413, f"{name}{told} more than the {limit_mb:g} MiB ({limit:,} bytes) allowed")


class BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is refused with 413, by its
    Content-Length, and while it streams in otherwise (a chunked upload declares no length). A body
    of up to ``DRAIN_FACTOR`` times the limit is read to its end first (and dropped), so that the
    client is listening when the answer comes."""

    def __init__(self, app, limit: int, limit_mb: float) -> None:
        self.app, self.limit, self.limit_mb = app, limit, limit_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            if int(length) <= self.limit * DRAIN_FACTOR:
                await _discard(receive, int(length))
            from starlette.responses import JSONResponse  # the encoding of the app's other errors

            error = _too_large(self.limit, self.limit_mb, int(length))
            return await JSONResponse({"error": str(error)}, status_code=error.status)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # raised where the endpoint reads: an ApiError, answered as one
                    if message.get("more_body", False):
                        await _discard(receive, self.limit * (DRAIN_FACTOR - 1))
                    raise _too_large(self.limit, self.limit_mb)
            return message

        await self.app(scope, counted, send)


def _detections(out: dict, score_thresh: float, mask_format: str, class_map) -> list[dict]:
    """One image's model output -> COCO-style detection dicts (runs on a request thread)."""
    keep = out["scores"] >= score_thresh
    sel = {k: v[keep] for k, v in out.items() if k in ("boxes", "scores", "labels", "keypoints")}
    masks = out.get("masks")
    if masks is not None and mask_format == "rle":
        sel["masks"] = masks[keep]
    results = instances_to_detections(sel, class_map)
    polygon_masks = masks[keep] if masks is not None and mask_format == "polygon" else None
    for k, r in enumerate(results):
        if polygon_masks is not None:
            m = polygon_masks[k, 0] if polygon_masks.dim() == 4 else polygon_masks[k]
            m = (m >= 0.5 if m.is_floating_point() else m.bool()).numpy()
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            r["segmentation"] = [] if not len(rows) else mask_to_polygons(
                m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], offset=(int(cols[0]), int(rows[0])))
    return results


def model_summary(predictor, weights: str, runtime: str | None) -> dict:
    """What ``GET /model`` reports: the classes and the settings that shape the detections."""
    cm = predictor.class_map
    summary = {"weights": Path(weights).name, "runtime": runtime or "torch", "device": str(predictor.device),
               "classes": [{"id": cm.category_id(k + 1), "name": cm.name(k + 1)} for k in range(cm.num_classes)],
               "keypoints": list(cm.keypoint_names or [])}
    cfg = getattr(predictor, "cfg", None)
    if cfg is not None:
        m = cfg.model
        trunk = ("ResNeXt" if m.backbone.groups > 1 else "ResNet") + f"-{m.backbone.depth}"
        summary["model"] = {
            "architecture": ("Cascade " if m.cascade.enabled else "") + f"{trunk}-{m.architecture}",
            "masks": bool(m.mask_on), "keypoints": bool(m.keypoint_on), "precision": m.precision,
            "input_min_size": m.input.min_size_test, "input_max_size": m.input.max_size_test,
            "model_score_thresh": m.roi_heads.score_thresh, "detections_per_image": m.roi_heads.detections_per_image}
    return summary


def create_app(predictor, weights: str = "model", runtime: str | None = None,
               settings: ServeSettings | None = None):
    """The FastAPI application serving ``predictor`` (a :class:`~maskrcnn.engine.predictor.Predictor`)."""
    fastapi = require("fastapi", "maskrcnn serve", PIP_LINE)
    require("multipart", "maskrcnn serve (form uploads)", PIP_LINE)
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    s = settings or ServeSettings()
    summary = model_summary(predictor, weights, runtime)
    summary["serving"] = asdict(s)

    def run_model(images: list) -> list[dict]:
        outputs = predictor.predict(images)
        return [{k: v.cpu() for k, v in out.items() if hasattr(v, "cpu")} for out in outputs]

    batcher = Batcher(run_model, s.max_batch, s.max_wait_ms / 1000, s.max_queue, s.timeout_s)

    @asynccontextmanager
    async def lifespan(app):
        import torch

        await run_in_threadpool(run_model, [torch.zeros((3, 64, 64), dtype=torch.uint8)])  # warm up
        await batcher.start()
        yield
        await batcher.stop()

    # no /docs: Swagger UI loads from a CDN, blank on a machine offline; the schema is at /openapi.json
    app = FastAPI(title="maskrcnn", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.redirect_slashes = False  # POST /predict/ is a 404 JSON, not a redirect that drops the body
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                 for err in e.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    app.add_middleware(BodyLimit, limit=s.max_upload_bytes, limit_mb=s.max_upload_mb)

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=s.max_files, max_fields=s.max_files)
            except HTTPException as e:
                if "Too many files" in str(e.detail):
                    raise ApiError(413, f"more than {s.max_files} files in one request") from None
                raise ApiError(e.status_code if e.status_code < 500 else 400,
                               f"cannot read the form: {e.detail}") from None
            except ClientDisconnect:
                raise ApiError(400, "the client disconnected during the upload") from None
            values = form.getlist("image")
            files = [v for v in values if isinstance(v, UploadFile)]
            if not files:
                if values:
                    raise ApiError(422, "the form field 'image' must be a file upload (a part with a filename), "
                                        "not text")
                sent = ", ".join(f"'{k}'" for k in form.keys()) or "nothing"
                raise ApiError(422, f"send the image in a form field named 'image' (got {sent})")
            out = []
            for k, f in enumerate(files):
                data = await f.read(s.max_upload_bytes + 1)
                if len(data) > s.max_upload_bytes:
                    raise _too_large(s.max_upload_bytes, s.max_upload_mb, name=f.filename or "the upload")
                out.append((f.filename or f"image{k}", data))
            return out
        if ctype.startswith("image/") or ctype.startswith("application/octet-stream"):
            data = bytearray()
            try:
                async for chunk in request.stream():
                    data += chunk
            except ClientDisconnect:
                raise ApiError(400, "the client disconnected during the upload") from None
            if not data:
                raise ApiError(422, "the request body is empty: send an image")
            return [("body", bytes(data))]
        raise ApiError(415, f"send images as multipart/form-data (field 'image') or as the body with an image/* "
                       f"content type, not {ctype or 'no content type'}")

    def decode(files: list[tuple[str, bytes]]) -> list:
        """The request's images; ``max_pixels`` bounds all of them together (a request of many
        large images costs as much as one huge one)."""
        images, left = [], s.max_pixels
        for name, data in files:
            try:
                image = load_image(BytesIO(data), name=name, max_pixels=left)
            except ImageTooLarge as e:
                if left < s.max_pixels:
                    raise ApiError(413, f"the request's images have more than the {s.max_pixels:,} pixels allowed "
                                        f"in all ({name} does not fit)") from None
                raise ApiError(413, str(e)) from None
            except BadImageError as e:
                raise ApiError(415, str(e)) from None
            left -= int(image.shape[1]) * int(image.shape[2])
            images.append(image)
        return images

    @app.post("/predict")
    async def predict(request: Request, score_thresh: float | None = Query(None, ge=0, le=1),
                      mask_format: str = Query("rle", pattern="^(rle|polygon|none)$")):
        start = time.perf_counter()
        files = await uploads(request)
        images = await run_in_threadpool(decode, files)
        try:
            outputs = await asyncio.gather(*(batcher.submit(im, tuple(im.shape)) for im in images))
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; try again shortly") from None
        except TimeoutError as e:
            raise ApiError(504, f"the model did not answer in time: {e}") from None
        thresh = s.score_thresh if score_thresh is None else score_thresh
        results = []
        for (name, _), im, out in zip(files, images, outputs):
            dets = await run_in_threadpool(_detections, out, thresh, mask_format, predictor.class_map)
            results.append({"file_name": name, "width": int(im.shape[2]), "height": int(im.shape[1]),
                            "detections": dets})
        return {"images": results, "score_thresh": thresh, "mask_format": mask_format,
                "time_ms": round((time.perf_counter() - start) * 1000, 1)}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "queued": batcher.queued, "batches": batcher.batches, "images": batcher.items}

    @app.get("/model")
    async def model():
        return summary

    page = resources.files("maskrcnn.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    del fastapi
    return app
