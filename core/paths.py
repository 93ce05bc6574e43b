"""Where Refit writes. REFIT_HOME is the root of everything; BentoML's store lives inside it."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path(__file__).resolve().parent.parent / "models"


def refit_home() -> Path:
    """The root folder for versions, the promoted pointer and job state (env REFIT_HOME, default ./models)."""
    home = Path(os.environ.get("REFIT_HOME") or DEFAULT_HOME).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    # BentoML resolves its home lazily on first use, so pointing it here before any store call is enough:
    # `BENTOML_HOME=$REFIT_HOME bentoml models list` then shows Refit's versions.
    os.environ["BENTOML_HOME"] = str(home)
    return home


refit_home()
