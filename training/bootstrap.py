"""The first start: on an empty store, publish and promote the pretrained backbone with its ImageNet head, so a
fresh service answers at once; replicas starting together on one store publish one version between them."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Callable

import numpy as np
import torch

from core.scratch import run_folder
from core.store import Store, age_seconds, now_iso
from training.artifacts import publish_version
from training.export import CAM_FILE, export_onnx, verify_parity
from training.registry import create_backbone

BOOTSTRAP_CLAIM = "bootstrap.json"
BOOTSTRAP_STALE_SECONDS = 900  # a bootstrap takes a minute or two; a claim this old belongs to a dead one
BOOTSTRAP_WAIT_SECONDS = 300


def bootstrap_imagenet(store: Store | None = None, log: Callable = print) -> str | None:
    """On an empty store, publish and promote the pretrained backbone with its 1000-class ImageNet head,
    so a fresh service answers at once. Returns the new version, or None when versions already exist:
    those are left as they are, promoted or not (choosing one to serve is a decision, not a default)."""
    store = store or Store()
    with open(store.home / ".bootstrap.lock", "a") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # several workers may start together; one bootstraps
        if store.versions() or not _claim_bootstrap(store, log):
            return None
        try:
            version = _bootstrap_version(store)
        except BaseException:
            store.delete_record(BOOTSTRAP_CLAIM)  # the next start tries again, without waiting out a stale claim
            raise
        store.promote(version, actor="bootstrap", reason="first start: pretrained ImageNet model")
        store.put_record(BOOTSTRAP_CLAIM, {**(store.record(BOOTSTRAP_CLAIM)[0] or {}), "done": version})
        log(f"bootstrapped {version}: efficientnet_lite0 with its ImageNet head")
        return version


def _bootstrap_version(store: Store) -> str:
    """Publish the pretrained backbone with its ImageNet head; returns the version."""
    bb = create_backbone("efficientnet_lite0", num_classes=None, pretrained=True)
    contract = bb.contract.with_classes(bb.imagenet_classes)
    with run_folder(store.home, "bootstrap") as tmp:
        path = export_onnx(bb.model, contract, tmp / "model.onnx", classifier=bb.classifier)
        rng = np.random.default_rng(0)
        arrays = rng.standard_normal((4, 3, contract.input_size, contract.input_size)).astype(np.float32)
        with torch.no_grad():
            probs = torch.softmax(bb.model(torch.from_numpy(arrays)), 1).numpy()
        parity = verify_parity(path, probs, arrays)
        (tmp / "metrics.json").write_text(json.dumps({"parity": parity, "strategy": "pretrained",
                                                      "note": "ImageNet-1k head, no customer data"}))
        (tmp / "config.json").write_text(json.dumps({"backbone": "efficientnet_lite0", "strategy": "pretrained"}))
        files = {n: tmp / n for n in ("model.onnx", "metrics.json", "config.json", CAM_FILE) if (tmp / n).is_file()}
        version = publish_version(store, files, contract,
                           {"strategy": "pretrained", "backbone": "efficientnet_lite0", "parent": None,
                            "classes": ["<imagenet-1k>"], "val_accuracy": None, "actor": "bootstrap",
                            "parity_max_abs_diff": parity["max_abs_prob_diff"]})
    return version


def _claim_bootstrap(store: Store, log: Callable) -> bool:
    """Whether this process bootstraps the store. The flock above is per machine (REFIT_HOME); replicas on
    one shared store claim `bootstrap.json` with a conditional write, as seeding from the bento claims its
    version id: one wins; the others wait for its version (up to BOOTSTRAP_WAIT_SECONDS) and publish
    nothing. A claim that is done (its versions since deleted) or older than BOOTSTRAP_STALE_SECONDS (its
    bootstrap died) is taken over by the next one, over the state read."""
    deadline, told = time.monotonic() + BOOTSTRAP_WAIT_SECONDS, False
    while not store.versions():
        claim, tag = store.record(BOOTSTRAP_CLAIM)
        mine = {"at": now_iso(), "host": socket.gethostname(), "pid": os.getpid()}
        if tag is None:
            if store.put_record(BOOTSTRAP_CLAIM, mine, create_only=True):
                return True
        elif claim is None or claim.get("done") or age_seconds(claim.get("at")) > BOOTSTRAP_STALE_SECONDS \
                or _claimant_dead(claim):
            if store.put_record(BOOTSTRAP_CLAIM, mine, if_tag=tag):
                return True
        elif not told:
            log(f"another process is bootstrapping {store.describe()} (since {claim.get('at')}, "
                f"{claim.get('host')} pid {claim.get('pid')}); waiting for its version")
            told = True
        if time.monotonic() > deadline:
            log(f"no version in {store.describe()} after {BOOTSTRAP_WAIT_SECONDS} s; starting without one")
            return False
        time.sleep(1)
    return False


def _claimant_dead(claim: dict) -> bool:
    """Whether a claim was made on this host by a process that is gone (Ctrl-C'd hard, kill -9, OOM): its
    bootstrap will never finish, and waiting out BOOTSTRAP_STALE_SECONDS would leave every start until then
    serving nothing. Our own pid counts as gone: we hold no claim while asking, so it is a dead earlier
    container's that had our hostname and pid. A claim from another host, or from a live process here
    (another REFIT_HOME on the same store), is kept."""
    pid = claim.get("pid")
    if claim.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False
