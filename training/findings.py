"""What a version records about its data besides accuracy: likely label errors and train/val near-duplicates
(training/quality.py), and the drift reference the service compares its inputs with (core/drift.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from core.drift import REFERENCE_SIZE, build_reference, save_reference
from training.export import session
from training.heads import pooled
from training.quality import label_problems, multilabel_problems, near_duplicates, summary_lines
from training.registry import Backbone, get_module
from training.run import Run


def label_findings(run: Run, bb: Backbone, fingerprint: dict, log: Callable) -> tuple[dict, dict]:
    """Likely label errors and train/val near-duplicates, from the frozen pretrained features (cached by
    every strategy but `scratch`, whose random backbone says nothing about the images: it extracts them)."""
    source = bb if run.has_features else run.backbone(pretrained=True)
    tr, ty, va, vy = run.features(source)
    tr, va = pooled_features(source, tr), pooled_features(source, va)
    sha = {(f["split"], f["path"]): f["sha256"] for f in fingerprint["files"]}

    def files(items, split):
        rels = (p.relative_to(run.ds.root).as_posix() for p, _ in items)
        return [{"path": r, "sha256": sha.get((split, r)), "split": split} for r in rels]

    train_files, val_files = files(run.ds.train, "train"), files(run.ds.val, "val")
    find = multilabel_problems if run.multi_label else label_problems
    problems = find(np.concatenate([tr.numpy(), va.numpy()]), np.concatenate([ty.numpy(), vy.numpy()]),
                    run.ds.classes, train_files + val_files, seed=run.request.seed)
    duplicates = near_duplicates(tr.numpy(), va.numpy(), train_files, val_files)
    for line in summary_lines(problems, duplicates):
        log(line)
    return problems, duplicates


def pooled_features(bb: Backbone, x):
    """The pooled features (N, C) of cached head inputs (a multi-label RegionHead's are per region)."""
    return pooled(get_module(bb.model, bb.classifier), x)


def drift_reference(run: Run, bb: Backbone, strategy: str, onnx_path: Path, out: Path) -> dict:
    """The version's drift reference (core/drift.py), in the space of the file's `embedding` output:
    the cached features when the backbone stayed frozen and they were computed on the CPU (the same numbers),
    else the exported file run on the validation images and a sample of the training images."""
    if strategy == "feature_extraction" and run.device.type == "cpu":
        tr, _, va, _ = run.features(bb)
        train_emb, val_emb = pooled_features(bb, tr).numpy(), pooled_features(bb, va).numpy()
    else:
        sess = session(onnx_path)
        pick = np.sort(np.random.default_rng(run.request.seed).permutation(len(run.train_arrays))[:REFERENCE_SIZE])

        def emb(arrays):
            return np.concatenate([sess.run(["embedding"], {"input": arrays[i:i + 32]})[0]
                                   for i in range(0, len(arrays), 32)])

        train_emb, val_emb = emb(run.train_arrays[pick]), emb(run.val_arrays)
    # Multi-label: the reference's label shares are each label's share of the validation positives.
    labels = np.nonzero(run.val_labels)[1] if run.multi_label else run.val_labels
    ref = build_reference(train_emb, val_emb, labels, run.ds.classes, seed=run.request.seed)
    save_reference(ref, out)
    return {"file": out.name, "reference_embeddings": int(len(ref.embeddings)),
            "val_mean_distance": round(float(ref.val_distances.mean()), 4),
            "val_labels": {c: round(float(p), 4) for c, p in zip(ref.classes, ref.val_labels, strict=True)}}
