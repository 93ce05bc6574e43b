"""Where Refit writes. REFIT_HOME is the root of everything; BentoML's store lives inside it."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path(__file__).resolve().parent.parent / "models"


def refit_home() -> Path:
    """The root folder for versions, the promoted pointer and job state (env REFIT_HOME, default ./models)."""
    home = Path(os.environ.get("REFIT_HOME") or DEFAULT_HOME).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    # BentoML's task database lives in BENTOML_HOME, which the server's supervisor may have resolved before
    # this import moves it (serving a bento: the container sets BENTOML_HOME=/home/bentoml/), while its
    # workers inherit the moved one: the supervisor would create the table in one file and the workers
    # look in another ("no such table: result"). Pin the file to the home BentoML started with.
    if "BENTOML_RESULT_STORE" not in os.environ:
        bentoml_home = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
        os.environ["BENTOML_RESULT_STORE"] = os.path.join(bentoml_home, "task_result.db")
    # BentoML resolves its home lazily on first use, so pointing it here before any store call is enough:
    # `BENTOML_HOME=$REFIT_HOME bentoml models list` then shows Refit's versions.
    os.environ["BENTOML_HOME"] = str(home)
    return home


refit_home()
