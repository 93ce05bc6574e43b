"""Request and reply shapes. The type hints are the OpenAPI schema, so every field has a description."""
from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import bentoml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from core.config import TrainRequest
from core.labels import label_problem
from core.settings import settings
from service.errors import ApiError, describe, is_json, json_problem


class BodyTooLarge(Exception):
    """Raised by the size guard's receive wrapper when a body without Content-Length passes the limit."""


class BodyTimeout(ApiError):
    """Raised by the guard's receive wrapper when the next part of a body is later than REFIT_BODY_TIMEOUT."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stopped arriving: no part of it for {seconds:g} s "
                              "(REFIT_BODY_TIMEOUT); send the whole body, as its Content-Length says")


class ClientGone(ApiError):
    """Raised by the guard's receive wrapper when the client hangs up before its body is complete. 499 is
    nginx's status for it: nobody reads the reply, it is for the access log and the metrics."""

    def __init__(self):
        super().__init__(499, "the client closed the connection before the request body was complete")


# --- predict --------------------------------------------------------------------------------------------

class ScoredLabel(BaseModel):
    label: str = Field(description="Class name.")
    score: float = Field(description="Probability, 0..1.")


class Answer(BaseModel):
    """What the model said about one image: the fields /predict and /explain share."""

    label: str = Field(description='Best class, or "unknown" when its score is under the threshold. A '
                       "multi-label version: the first of `labels`, or \"unknown\" when `labels` is empty.")
    score: float = Field(description="Probability of the best class (of `label` when it is not \"unknown\").")
    top_k: list[ScoredLabel] = Field(description="The k most probable classes, best first.")
    version: str = Field(description="The model version that answered.")
    labels: Optional[list[ScoredLabel]] = Field(None, description="Multi-label versions only (absent for a "
                                                "single-label one): every label whose probability is at or over "
                                                "its threshold (the version's own, one per label, or the "
                                                "request's `threshold` for all), best first; empty: none of them.")

    @model_serializer(mode="wrap")
    def _without_absent_labels(self, handler):
        # A single-label version's reply keeps the shape it always had: no `labels` key at all.
        out = handler(self)
        if out.get("labels", ()) is None:
            del out["labels"]
        return out


class Prediction(Answer):
    prediction_id: str = Field(description="This answer's id: send it to POST /feedback to confirm or correct "
                               "the label (the image is kept for that only while the server captures, "
                               "REFIT_CAPTURE=1).")


# A number when sent; absent (None) is "not given". Stated as a number on the OpenAPI page: null is never sent.
Threshold = Annotated[Optional[float], WithJsonSchema({"type": "number", "minimum": 0.0, "maximum": 1.0})]


class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The defaults are part of the OpenAPI schema, so they are read when the class is made (a server's
    # REFIT_TOP_K and REFIT_THRESHOLD are set before it starts).
    top_k: int = Field(settings().top_k, ge=1, le=1000, description="How many classes to list per image.")
    # None: the request gave none, which a multi-label version must know (each label keeps its own threshold).
    threshold: Threshold = Field(None, ge=0.0, le=1.0, description='Best score under this answers '
                                       f'"unknown"; default REFIT_THRESHOLD ({settings().threshold:g}). A '
                                       "multi-label version: the threshold of every label, instead of each "
                                       "label's own (chosen on validation, in the model file).")


class Upload(BaseModel):
    name: str
    data: bytes


class SelfParsed(bentoml.IODescriptor):
    """An input that parses the HTTP request itself (`_parse`). A refusal (ApiError) is handed to the API
    function in its file field (`images`, or the field `file_field` names) instead of being raised: BentoML
    answers an exception raised here as a 500 and logs a traceback. `errors.answered`, around the API
    function, renders it."""

    file_field: ClassVar[str] = "images"

    @classmethod
    async def from_http_request(cls, request, serde):
        try:
            return await cls._parse(request)
        except ApiError as e:
            return cls.model_construct(**{cls.file_field: e})


async def read_multipart(request, *, field: str, fields: tuple[str, ...], max_files: int, other: str):
    """The multipart form of a predict-like request, with its errors as ApiError: not multipart (415;
    `other` names the route JSON clients use), over the size limit (413), malformed, or a form field other
    than `fields` (400)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, f"send multipart/form-data with image files in the field `{field}` "
                                f"(got {ctype or 'no content type'}){other}")
    try:
        form = await request.form(max_files=max_files + 1, max_fields=20)
    except BodyTooLarge:
        raise ApiError(413, f"request body is over the limit of {settings().max_request_mb:g} MB") from None
    except (MultiPartException, HTTPException) as e:
        detail = str(getattr(e, "detail", None) or getattr(e, "message", None) or e)
        if "too many files" in detail.lower():
            raise ApiError(400, f"too many images: the limit is {max_files} per request") from None
        raise ApiError(400, f"malformed multipart form: {detail}") from None
    unknown = sorted(set(form.keys()) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown form field(s) {unknown}; expected {', '.join(fields)}")
    return form


def form_options(form, model: type[BaseModel], keys: tuple[str, ...]):
    """The form's option fields validated by `model` (numbers arrive as text and are JSON-decoded when they
    can be); an ApiError naming each bad field."""
    options = {}
    for key in keys:
        if key in form:
            raw = form[key]
            try:
                options[key] = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                options[key] = raw
    try:
        return model.model_validate(options)
    except ValidationError as e:
        raise ApiError(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                          for x in e.errors())) from None


class PredictInput(SelfParsed):
    """multipart/form-data: one or more files in the field `images`, plus the options. Read here: file names
    are kept for error messages, uploads stay in memory (no temp files), and a text value in `images` is
    refused instead of being fetched as a URL."""

    images: list[Path] = Field(description="One or more image files (JPEG, PNG, WebP, BMP, GIF, TIFF).")
    top_k: int = PredictOptions.model_fields["top_k"]
    threshold: Threshold = PredictOptions.model_fields["threshold"]

    @classmethod
    async def _parse(cls, request):
        form = await read_multipart(request, field="images", fields=("images", "top_k", "threshold"),
                                    max_files=settings().max_images, other="; JSON clients use POST /predict_base64")
        files = form.getlist("images")
        if not files:
            raise ApiError(400, "no images: send one or more files in the multipart field `images`")
        if len(files) > settings().max_images:
            raise ApiError(400, f"{len(files)} images is over the limit of {settings().max_images} per request")
        uploads = []
        for i, f in enumerate(files):
            if not isinstance(f, UploadFile):
                raise ApiError(400, f"images[{i}] is a text value, not a file upload")
            uploads.append(Upload(name=f.filename or f"images[{i}]", data=await f.read()))
        opts = form_options(form, PredictOptions, ("top_k", "threshold"))
        # Already validated above; construct skips the file-path coercion BentoML applies to `images`.
        return cls.model_construct(images=uploads, top_k=opts.top_k, threshold=opts.threshold)


class Base64Image(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="The image file's bytes, base64-encoded (standard or URL-safe alphabet; "
                                  "line breaks and a `data:image/...;base64,` prefix are accepted).")
    name: Optional[str] = Field(None, description="A name to use in error messages (e.g. the file name).")


class Base64Request(PredictOptions):
    images: list[Base64Image] = Field(description="Images as base64 strings, with optional names.")


_DATA_URL = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)
_URL_SAFE = str.maketrans("-_", "+/")


def decode_base64(text: str) -> bytes:
    """Decode what clients actually send: `base64` wraps lines at 76 characters, browsers produce data:
    URLs, JWT-style clients the URL-safe alphabet without padding. Anything else is still refused
    (binascii.Error): characters outside both alphabets are never skipped."""
    text = text.strip()
    prefix = _DATA_URL.match(text)
    text = "".join(text[prefix.end() if prefix else 0:].split()).translate(_URL_SAFE)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class PredictBase64Input(SelfParsed):
    """application/json: `{"images": [{"data": "<base64>", "name": "a.jpg"}], "top_k": 5, "threshold": 0.0}`.
    Read here rather than by BentoML, which takes any content type as JSON (text/plain included) and
    answers a base64 error as a server error."""

    images: list[Base64Image] = Base64Request.model_fields["images"]
    top_k: int = PredictOptions.model_fields["top_k"]
    threshold: Threshold = PredictOptions.model_fields["threshold"]

    @classmethod
    async def _parse(cls, request):
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"send application/json (got {ctype or 'no content type'}): "
                                    '{"images": [{"data": "<base64>", "name": "a.jpg"}]}; '
                                    "multipart clients use POST /predict")
        try:
            body = await request.body()
        except BodyTooLarge:
            raise ApiError(413, f"request body is over the limit of {settings().max_request_mb:g} MB") from None
        try:
            req = Base64Request.model_validate_json(body)
        except ValidationError as e:
            if any(x["type"] == "json_invalid" for x in e.errors()):
                raise ApiError(400, f"body is not valid JSON: {e.errors()[0]['msg']}") from None
            raise ApiError(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                              for x in e.errors())) from None
        if not req.images:
            raise ApiError(400, "no images: send one or more base64 images in `images`")
        if len(req.images) > settings().max_images:
            raise ApiError(400, f"{len(req.images)} images is over the limit of {settings().max_images} per request")
        uploads = []
        for i, im in enumerate(req.images):
            name = im.name or f"images[{i}]"
            try:
                uploads.append(Upload(name=name, data=decode_base64(im.data)))
            except (binascii.Error, ValueError) as e:
                raise ApiError(400, f"{name}: not valid base64 ({e}); send the file's bytes base64-encoded "
                                        "(line breaks, a data: URL prefix and the URL-safe alphabet are "
                                        "accepted)") from None
        return cls.model_construct(images=uploads, top_k=req.top_k, threshold=req.threshold)


# --- explain -------------------------------------------------------------------------------------------

class ExplainInput(SelfParsed):
    """multipart/form-data: one image file in the field `image`, plus the options (the same limits and error
    shapes as /predict)."""

    file_field: ClassVar[str] = "image"

    image: Path = Field(description="One image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")
    label: Optional[str] = Field(None, description="The class to explain; default: the most probable one.")
    top_k: int = PredictOptions.model_fields["top_k"]
    threshold: Threshold = PredictOptions.model_fields["threshold"]

    @classmethod
    async def _parse(cls, request):
        form = await read_multipart(request, field="image", fields=("image", "label", "top_k", "threshold"),
                                    max_files=1, other="")
        files = form.getlist("image")
        if len(files) != 1:
            raise ApiError(400, f"send exactly one image file in the multipart field `image` (got {len(files)})")
        if not isinstance(files[0], UploadFile):
            raise ApiError(400, "image is a text value, not a file upload")
        # The label is a class name: taken as the text it is, never JSON-decoded (a class may be named "1").
        opts = form_options(form, PredictOptions, ("top_k", "threshold"))
        label = form.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip() or len(label) > 200):
            raise ApiError(400, "label: send the class name to explain as text (1 to 200 characters)")
        upload = Upload(name=files[0].filename or "image", data=await files[0].read())
        return cls.model_construct(image=upload, label=label, top_k=opts.top_k, threshold=opts.threshold)


class Crop(BaseModel):
    left: float = Field(description="Left edge of the crop the model saw, as a fraction of the image's width.")
    top: float = Field(description="Top edge, as a fraction of the image's height.")
    width: float = Field(description="Width, as a fraction of the image's width.")
    height: float = Field(description="Height, as a fraction of the image's height.")


class Point(BaseModel):
    x: float = Field(description="From the crop's left edge, as a fraction of its width.")
    y: float = Field(description="From the crop's top edge, as a fraction of its height.")


class Explanation(Answer):
    explained: str = Field(description="The class the heatmap is for (`label`, or the best class).")
    explained_score: float = Field(description="Its probability.")
    heatmap: list[list[float]] = Field(description="The class activation map at the model's feature-map "
                                       "resolution (rows top to bottom), scaled to 0..1; it covers the centre crop "
                                       "the model saw (`crop`).")
    overlay_png: str = Field(description="A PNG of the crop with the map (upsampled to it) blended over it in a "
                             "blue-to-red colour scale, base64-encoded.")
    peak: Point = Field(description="Where the upsampled map is highest, in the crop.")
    crop: Crop = Field(description="Where the crop lies in the uploaded (upright) image.")


# --- retrain --------------------------------------------------------------------------------------------

class RetrainFields(TrainRequest):
    """The CLI's training request, minus what only makes sense on the server's own disk."""

    @field_validator("weights")
    @classmethod
    def _no_local_files(cls, v):
        if v is not None:
            raise ValueError("weights is CLI only: the service does not read files named by a client")
        return v

    @field_validator("backbone", "note", mode="before")
    @classmethod
    def _text(cls, v):
        # Form values arrive as text and are JSON-decoded when they can be, so note=2024 becomes a number.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _retrain_body() -> dict:
    """The retrain routes' request body for the OpenAPI page. The routes read the request themselves
    (service/admission.py), so its shape is stated here: multipart/form-data with a `.zip` in `dataset` (one
    folder per class, optionally under train/ and val/), or JSON with `data_path` under the server's data
    root, or `dataset` naming a dataset of the store (in either shape); plus any training-request field."""
    schema = RetrainFields.model_json_schema()
    schema["properties"].pop("weights", None)  # CLI only
    data_path = {"type": "string", "description": "Instead of an upload: a dataset folder or .zip under the "
                                                  "server's data root (REFIT_DATA_ROOT), relative to it."}
    named = schema["properties"].pop("dataset")
    dataset = {"oneOf": [{"type": "string", "format": "binary"}, {"type": "string"}],
               "description": "The dataset as a .zip upload (one folder per class; it becomes a snapshot of the "
                              "dataset named by a second, text `dataset` value, else of `uploads`), or the name "
                              "of a dataset in the store (its newest snapshot, or `snapshot`)."}
    form = {**schema, "properties": {"dataset": dataset, "data_path": data_path, **schema["properties"]}}
    json_ = {**schema, "properties": {"dataset": named, "data_path": data_path, **schema["properties"]}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": json_}}}}


RETRAIN_BODY = _retrain_body()


class JsonBody(BaseModel):
    """An application/json body with exactly the fields the subclass declares, read and validated by `parse`
    (a route's dependency) rather than by the framework: BentoML took any media type as JSON (a multipart
    body without a boundary was a 500) and ignored unknown fields; FastAPI answers 422 where these routes
    have always answered 400."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    async def parse(cls, request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype and not is_json(ctype):
            shape = ", ".join(f'"{k}": ...' for k in cls.model_fields)
            raise ApiError(415, f"send application/json (got {ctype[:80]}): {{{shape}}}")
        try:
            body = await request.body()
        except BodyTooLarge:
            raise ApiError(413, f"request body is over the limit of {settings().max_request_mb:g} MB") from None
        try:
            return cls.model_validate_json(body or b"{}")
        except ValidationError as e:
            errors = e.errors(include_url=False)
            bad_json = json_problem(errors)
            raise ApiError(400, f"body is not valid JSON: {bad_json}" if bad_json
                           else describe(errors, cls.model_fields)) from None

    @classmethod
    def openapi(cls, name: str) -> dict:
        """The route's OpenAPI entry as it was when the route was a BentoML API `name`: the body's schema
        (which the page cannot see in a body read by a dependency), BentoML's name, tag and error replies."""
        def error(kind: str, what: str) -> dict:
            return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind}"}}},
                    "description": what}

        return {"operation_id": f"refit__{name}", "tags": ["Service APIs"], "openapi_extra": {
            "x-bentoml-name": name,
            "requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}},
            "responses": {"200": {"content": {"application/json": {"schema": {"additionalProperties": True,
                                                                               "type": "object"}}},
                                  "description": "Successful Response"},
                          "400": error("InvalidArgument", "Bad Request"), "404": error("NotFound", "Not Found"),
                          "500": error("InternalServerError", "Internal Server Error")}}}


class PromoteInput(JsonBody):
    """`{"version": "v0003", "reason": "..."}`."""

    version: str = Field(max_length=200, description="Version id, e.g. v0003.")
    reason: str = Field("", max_length=500, description="Why; kept in the promotion history.")


class RollbackInput(JsonBody):
    """`{"reason": "..."}`."""

    reason: str = Field("", max_length=500, description="Why; kept in the history.")


class CandidateGuard(BaseModel):
    """Clear the canary by itself when either rule is broken (each off when not given)."""

    model_config = ConfigDict(extra="forbid")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="Clear when the candidate's error rate "
                                         "is over this, after at least `min_requests` requests.")
    min_requests: int = Field(20, ge=1, le=1_000_000)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Clear when the candidate's feedback "
                                            "accuracy is under the promoted version's by more than this ...")
    min_labelled: int = Field(20, ge=1, le=1_000_000, description="... with at least this many labelled "
                              "predictions of each.")


class CandidateInput(JsonBody):
    """`{"version": "v0007", "mode": "shadow" | "canary", "percent": 0..100}`, and an optional `guard`."""

    version: str = Field(max_length=200, description="The version to try beside the promoted one.")
    mode: Literal["shadow", "canary"] = Field(description="shadow: the candidate also runs on `percent` % of "
                                              "requests, answers discarded; canary: it answers `percent` % of "
                                              "clients.")
    percent: float = Field(ge=0, le=100, allow_inf_nan=False)
    guard: CandidateGuard | None = None


# --- feedback ------------------------------------------------------------------------------------------

class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(max_length=64, description="The id a /predict answer carried.")
    label: Optional[str] = Field(None, min_length=1, max_length=200, description="The right label for that image "
                                 "(a correction, or the predicted one to confirm it): a single-label version's "
                                 "answer.")
    labels: Optional[list[str]] = Field(None, max_length=1000, description="A multi-label version's answer: every "
                                        "label the image has (an empty list: none of them), instead of `label`.")
    dataset: Optional[str] = Field(None, max_length=200, description="The dataset to add the image to; default: "
                                   "the dataset the answering version was trained on.")
    create: bool = Field(False, description="Start the dataset with this image when it does not exist yet; "
                         "without it an unknown dataset is refused (404), so a misspelt name cannot start one.")

    @field_validator("label")
    @classmethod
    def _label_rule(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem, label = label_problem(value)  # the one label rule: stored trimmed and in NFC
        if problem:
            raise ValueError(problem)
        return label

    @field_validator("labels")
    @classmethod
    def _labels_rule(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        out = []
        for value in values:
            problem, label = label_problem(value)
            if problem:
                raise ValueError(problem)
            out.append(label)
        return sorted(set(out))  # a set of labels: each once, in one order

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.label is None) == (self.labels is None):
            raise ValueError('send either "label" (a single-label version\'s prediction) or "labels" (a list, '
                             "for a multi-label version's)")
        return self
