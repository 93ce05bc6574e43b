"""One version as BentoML's model store lays it out: `models/refit/vNNNN/` with the model's files and
`model.yaml`, written here directly, byte for byte as BentoML 1.4's `bentoml.models.create` writes it.

Why not through BentoML: the core imports no BentoML (an import-linter contract), and the layout is all the
store needs of it. Why this exact layout: `bentoml models list/get/export/import` read these entries (BentoML's
local store is the cache of an S3 store, and `bentoml build` packs the promoted version from it), and
tests/test_versions.py and tests/test_store_contract.py check that they do.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from core.objects import StoreError, sha256_file

MODEL_NAME = "refit"
ENTRIES = f"models/{MODEL_NAME}/"  # where versions live, relative to the store's root (folder or prefix)
MODEL_YAML = "model.yaml"  # the entry's record; a version is listed once it is there
VERSION_RE = re.compile(r"^v(\d{4,})$")


def write_entry(dest: Path, version: str, files: dict[str, Path], metadata: dict, labels: dict,
                model_name: str = MODEL_NAME) -> Path:
    """The files (name in the entry -> source path) copied into `dest`, then `model.yaml`."""
    dest.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, dest / name)
    (dest / MODEL_YAML).write_text(model_yaml(version, metadata, labels, model_name), encoding="utf8")
    return dest


def model_yaml(version: str, metadata: dict, labels: dict, name: str = MODEL_NAME) -> str:
    """BentoML 1.4's ModelInfo of a model made by `bentoml.models.create`, in its key order, dumped as it dumps
    it (`yaml.safe_dump(..., sort_keys=False)`). BentoML's metadata takes basic types only: absent values
    (None) are left out, and numpy scalars and arrays become numbers and lists, as BentoML converts them."""
    import yaml  # BentoML's own dependency; model.yaml is plain YAML

    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("label keys and values must be strings")
    info = {
        "name": name, "version": version, "module": "", "labels": dict(labels), "options": {},
        "metadata": _plain(drop_none(metadata)),
        "context": {"framework_name": "", "framework_versions": {},
                    "bentoml_version": importlib.metadata.version("bentoml"),
                    "python_version": platform.python_version()},
        "signatures": {}, "api_version": "v1", "creation_time": datetime.now(timezone.utc).isoformat(),
    }
    return yaml.safe_dump(info, sort_keys=False)


def drop_none(obj):
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [drop_none(v) for v in obj if v is not None]
    return obj


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if type(obj) not in (str, int, float, bool) and hasattr(obj, "tolist"):  # numpy's, np.float64 a float too
        return _plain(obj.tolist())
    return obj


def metadata_of(record: bytes | str) -> dict:
    """The metadata of a model.yaml."""
    import yaml

    return (yaml.safe_load(record) or {}).get("metadata") or {}


def check_files(version: str, root: Path, meta: dict, where: str = "") -> Path:
    """Check the ONNX files in `root` against the checksums recorded at publish; returns the file to serve."""
    serving = root / meta.get("serving_file", "model.onnx")
    checks = {root / "model.onnx": meta.get("onnx_sha256"), serving: meta.get("serving_sha256")}
    for path, want in checks.items():
        if not path.is_file():
            raise StoreError(f"{version}: {path.name} is missing{where}")
        if want and sha256_file(path) != want:
            raise StoreError(f"{version}: checksum mismatch for {path.name} (file changed since publish){where}")
    return serving


def check_loadable(path: Path) -> None:
    """A version is only promoted when onnxruntime can open it."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime raises, the version is refused with it
        raise StoreError(f"{path} does not load in onnxruntime: {e}") from None
