"""The `refit` command line.

    refit train ./photos [--strategy partial --epochs 8 ...] [--json]   # a progress bar on stderr
    refit train ./photos --device cuda   # on the GPU (auto, the default: the GPU when torch sees one)
    refit versions | refit promote v0003 | refit rollback
    refit predict cat.jpg [--version v0003] [--top-k 5]
    refit explain ant.jpg [--version v0003] [-o heatmap.png] [--label ants]   # where the model looked
    refit backbones
    refit dataset add bees ./photos [--label bee] | refit dataset list | refit dataset show bees
    refit train --dataset bees [--snapshot ID]   # train on a dataset of the store; the version records it
    refit worker                     # take retrain jobs from REFIT_QUEUE (redis://...), publish to REFIT_STORE
    refit project create acme | refit project list | refit project token acme
    refit --project acme train ./photos   # any command, on project acme (or REFIT_PROJECT=acme)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from core.backbones import list_backbones
from core.config import TrainRequest
from core.data import DatasetError
from core.dataset_sweep import sweep, sweep_local
from core.datasets import Datasets
from core.manifest import parse_labels
from core.preprocess import MAX_PIXELS, ImageError, preprocess
from core.progress_view import ProgressView
from core.projects import NAME_PATTERN, ProjectNameError, Registry, UnknownProject, check_name
from core.settings import settings
from core.store import Store, StoreError
from service.explain import NotExplainable, UnknownLabel, explain_upload
from service.model import ModelHolder, open_version
from training.errors import BackboneError, DeviceError, ExportError

# Whatever imports torch is imported by the command that needs it (train, predict, worker), not here: torch
# takes seconds to import, and `refit --help`, `refit versions` or `refit dataset list` never use it.


def _add_request_options(p: argparse.ArgumentParser) -> None:
    """Every TrainRequest field becomes a flag; pydantic validates the values, so CLI and HTTP agree."""
    for name, f in TrainRequest.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{f.description} (default: {default})")
        else:
            choices = None
            if typing.get_origin(f.annotation) is typing.Literal:
                choices = list(typing.get_args(f.annotation))
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices, metavar=None if choices
                           else name.upper(), help=f"{f.description} (default: {default})")


def _add_project_commands(sub) -> None:
    pj = sub.add_parser("project", help="projects of the store: create one (its token is shown once), list them, "
                        "issue a new token")
    psub = pj.add_subparsers(dest="project_command", required=True)
    psub.add_parser("create", help="create a project").add_argument("name")
    psub.add_parser("list", help="every project, default first").add_argument("--json", action="store_true")
    psub.add_parser("token", help="issue a new token; the old one stops working").add_argument("name")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refit", description="Transfer-learning image classifiers: train, "
                                 "version, promote, predict.")
    ap.add_argument("--project", default=None, help="the project to work on (default: REFIT_PROJECT, else "
                    f"'default'); a name matching {NAME_PATTERN}")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a pretrained backbone on a folder (or .zip) of class folders")
    t.add_argument("data", nargs="?", default=None, help="folder with one sub-folder per class (optionally "
                   "under train/ and val/), or a .zip; leave it out with --dataset")
    t.add_argument("--json", action="store_true", help="print one JSON summary as the last line of stdout")
    _add_request_options(t)
    sub.add_parser("versions", help="list versions, newest last").add_argument("--json", action="store_true")
    pr = sub.add_parser("promote", help="serve VERSION")
    pr.add_argument("version")
    pr.add_argument("--reason", default="")
    rb = sub.add_parser("rollback", help="go back to the previously promoted version")
    rb.add_argument("--reason", default="")
    pd = sub.add_parser("predict", help="classify images with a version's ONNX file")
    pd.add_argument("images", nargs="+")
    pd.add_argument("--version", default="promoted", help="version id, 'promoted' (default) or 'latest'")
    pd.add_argument("--top-k", type=int, default=3)
    pd.add_argument("--threshold", type=float, default=None, help="a single-label version answers \"unknown\" "
                    "under it; a multi-label one lists the labels over it (default: each label's own threshold)")
    pd.add_argument("--json", action="store_true")
    ex = sub.add_parser("explain", help="classify an image and show where the model looked: a class "
                        "activation map, as a PNG over the image's centre crop (-o) and as a small grid")
    ex.add_argument("image")
    ex.add_argument("--version", default="promoted", help="version id, 'promoted' (default) or 'latest'")
    ex.add_argument("-o", "--output", default=None, help="write the heatmap over the crop to this PNG file")
    ex.add_argument("--label", default=None, help="the class to explain (default: the most probable one)")
    ex.add_argument("--top-k", type=int, default=3)
    ex.add_argument("--json", action="store_true", help="print the answer as JSON (the grid included)")
    sub.add_parser("backbones", help="list backbone names")
    ds = sub.add_parser("dataset", help="datasets kept in the store: add images, list, show, sweep")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    da = dsub.add_parser("add", help="add images to a dataset (made by its first add); a new snapshot")
    da.add_argument("name", help="dataset name (letters, digits, '.', '_', '-')")
    da.add_argument("path", help="a folder of class folders (optionally under train/ and val/) or of images with "
                    "a labels.csv, a .zip of one, or with --label or --labels a folder of images or one image")
    dl = da.add_mutually_exclusive_group()
    dl.add_argument("--label", default=None, help="the class of every image in PATH")
    dl.add_argument("--labels", default=None, metavar="'A;B'",
                    help="the labels of every image in PATH, joined by ';' (a multi-label dataset; '' for none "
                    "of them)")
    da.add_argument("--json", action="store_true")
    dsub.add_parser("list", help="datasets with their newest snapshot").add_argument("--json", action="store_true")
    dshow = dsub.add_parser("show", help="classes, counts and snapshots (newest first) of a dataset")
    dshow.add_argument("name")
    dshow.add_argument("--json", action="store_true")
    dsub.add_parser("sweep", help="remove what killed adds left: temp files, and images no snapshot names "
                    "once older than REFIT_DATASET_BLOB_GRACE_SECONDS").add_argument("--json", action="store_true")
    _add_project_commands(sub)
    w = sub.add_parser("worker", help="run retrain jobs from the job queue (REFIT_QUEUE) against the shared store")
    w.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    w.add_argument("--name", default=None, help="worker name shown in job records (default: host-pid)")
    return ap


def cmd_train(args) -> int:
    from training.pipeline import train  # torch

    fields = {k: v for k, v in vars(args).items() if k in TrainRequest.model_fields}
    try:
        request = TrainRequest.model_validate(fields)
    except ValidationError as e:
        print("refit: invalid training options:", file=sys.stderr)
        for err in e.errors():
            print(f"  --{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    # The bar (or, when stderr is not a terminal, a line per phase) goes to stderr, so stdout keeps the log,
    # or with --json nothing but the summary.
    view = ProgressView(sys.stderr)
    try:
        result = train(request, args.data, store=_store(args), log=view.write_to(out), progress=view)
    finally:
        view.close()
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _store(args) -> Store:
    """The store as the chosen project (`--project`, REFIT_PROJECT); an unknown project is an error."""
    name = args.project or settings().project
    try:
        check_name(name)
    except ProjectNameError as e:
        raise StoreError(str(e)) from None
    store = Store(project=name)
    if not Registry(store.base).exists(name):
        raise UnknownProject(name)
    return store


def cmd_project(args) -> int:
    registry = Registry(Store().base)
    if args.project_command == "list":
        names = registry.names()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    check = check_name(args.name)
    if args.project_command == "token":
        print(registry.new_token(check))
        return 0
    token = registry.create(check)
    if token is None:
        print(f"project {check} exists already (`refit project token {check}` issues a new token)")
    else:
        print(f"created project {check}; its token, shown this once:\n{token}")
    return 0


def cmd_versions(args) -> int:
    store = _store(args)
    rows = store.list_info()
    problem = store.pointer_problem()
    if problem:  # the listing still works; what serving lacks goes to stderr, so --json stays one value
        print(f"refit: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    if not rows:
        print("no versions yet; run `refit train DATA`")
    for r in rows:
        acc = r.get("val_accuracy")
        lineage = r.get("lineage") or {}
        trained_on = f"  dataset {lineage['dataset']}@{lineage['snapshot']}" if lineage.get("dataset") else ""
        print(f"{'*' if r['promoted'] else ' '} {r['version']}  {r.get('created', ''):25s} "
              f"{r.get('strategy', '?'):18s} val_acc {acc if acc is None else f'{acc:.4f}'}  "
              f"classes {len(r.get('classes') or [])}{trained_on}")
    return 0


def cmd_dataset(args) -> int:
    datasets = Datasets(_store(args))
    if args.dataset_command == "list":
        return _dataset_list(datasets, args)
    if args.dataset_command == "show":
        return _dataset_show(datasets, args)
    if args.dataset_command == "sweep":
        removed = sweep(datasets.store)
        print(json.dumps(removed) if args.json else
              ", ".join(f"removed {len(v)} {k}" for k, v in removed.items()))
        return 0
    return _dataset_add(datasets, args)


def _dataset_list(datasets: Datasets, args) -> int:
    rows = datasets.list()
    if args.json:
        print(json.dumps(rows))
    for r in [] if args.json else rows:
        print(f"{r['dataset']:24s} snapshot {r['snapshot']}  {r['images']} images  {r['classes']} classes  "
              f"updated {r['updated']}")
    if not rows and not args.json:
        print("no datasets yet; run `refit dataset add NAME PATH`")
    return 0


def _dataset_show(datasets: Datasets, args) -> int:
    info = datasets.show(args.name)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['dataset']}: snapshot {info['snapshot']}, {info['images']} images"
          + (f"; multi-label, {info['negatives']} with none of the labels" if "negatives" in info else ""))
    for label, n in info["classes"].items():
        print(f"  {label:24s} {n}")
    print("snapshots, newest first:")
    for h in info["snapshots"]:
        print(f"  {h['snapshot']}  {h['at']}  {h['action']:8s} {h['images']} images")
    return 0


def _dataset_add(datasets: Datasets, args) -> int:
    sweep_local(datasets.store)  # what adds killed on this machine left; images need `refit dataset sweep`
    path = Path(args.path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    label = args.label if args.labels is None else _cli_labels(args.labels)
    if path.is_file() and path.suffix.lower() == ".zip":
        if label is not None:
            raise DatasetError("--label and --labels are for images; a .zip names its labels (one folder per class, "
                               "or a labels.csv)")
        reply = datasets.add_zip(args.name, path, source="cli")
    elif path.is_file():
        if label is None:
            raise DatasetError(f"{path.name}: one image needs --label (its class) or --labels (its labels, "
                               "joined by ';')")
        reply = datasets.add(args.name, [(path.name, path.read_bytes(), label)], source="cli",
                             kind="single_label" if isinstance(label, str) else "multi_label")
    else:
        reply = datasets.add_folder(args.name, path, label=label, source="cli")
    if args.json:
        print(json.dumps(reply))
    else:
        print(f"{reply['dataset']}: snapshot {reply['snapshot']}; added {len(reply['added'])}, skipped "
              f"{len(reply['skipped'])} (duplicates), refused {len(reply['refused'])}")
        for r in reply["refused"]:
            print(f"  refused {r['name']}: {r['error']}")
    return 0 if reply["added"] or reply["skipped"] else 2


def _cli_labels(text: str) -> list[str]:
    """--labels 'A;B' as a list (labels.csv's way of joining them, core.manifest); '' is none of the labels."""
    labels, why = parse_labels(text)
    if why:
        raise DatasetError(f"--labels {text!r}: {why}")
    return list(labels)


def cmd_predict(args) -> int:
    """The version opened and answered as serving opens and answers it (`service/model.py`): a multi-label
    version lists every label over its threshold."""
    store = _store(args)
    version = store.resolve(args.version)
    model = open_version(store, version, threads=os.cpu_count() or 1)
    results = []
    for img in args.images:
        probs = model.run(preprocess(img, model.contract)[None])[0]
        results.append({"image": img, **ModelHolder.answer(model, probs, args.top_k, args.threshold)})
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            shown = r["labels"] if "labels" in r else r["top_k"]
            print(f"{r['image']} ({version}): " + (", ".join(f"{t['label']} {t['score']:.3f}" for t in shown)
                                                   or "none of the labels"))
    return 0


def cmd_explain(args) -> int:
    """The service's numpy code (`service/explain.py`) on the version's ONNX file, opened as serving opens it."""
    image = Path(args.image)
    if not image.is_file():
        print(f"refit: error: {image}: no such file", file=sys.stderr)
        return 2
    store = _store(args)
    version = store.resolve(args.version)
    model = open_version(store, version, threads=os.cpu_count() or 1)
    try:
        found = explain_upload(model, image.name, image.read_bytes(), args.label, max_pixels=MAX_PIXELS)
    except (NotExplainable, UnknownLabel) as e:
        print(f"refit: error: {e}", file=sys.stderr)
        return 2
    # A multi-label version keeps each label's own threshold; a single-label one lists its best class.
    answer = ModelHolder.answer(model, found.pop("probs"), args.top_k, None if model.contract.multi_label else 0.0)
    png = found.pop("overlay_png")
    if args.output:
        Path(args.output).write_bytes(png)
    result = {"image": args.image, **answer, **found, "overlay": args.output}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.image} ({version}): " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in answer["top_k"]))
    peak = found["peak"]
    print(f"explained {found['explained']} ({found['explained_score']:.3f}); peak at {peak['x']:.0%} across, "
          f"{peak['y']:.0%} down the centre crop")
    for row in found["heatmap"]:
        print("  " + " ".join(f"{v:4.2f}" for v in row))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "versions":
            return cmd_versions(args)
        if args.command == "promote":
            e = _store(args).promote(args.version, actor="cli", reason=args.reason)
            if e.get("repaired"):
                print(f"repaired the promoted pointer: {e['repaired']['reason']}")
            print(f"promoted {e['version']} (was {e['previous']})")
            return 0
        if args.command == "rollback":
            e = _store(args).rollback(actor="cli", reason=args.reason)
            print(f"rolled back to {e['version']} (was {e['previous']})")
            return 0
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "worker":
            from training.worker import main as work  # torch and RQ: a worker imports torch once, up front

            return work(burst=args.burst, name=args.name)
        if args.command == "dataset":
            return cmd_dataset(args)
        if args.command == "project":
            return cmd_project(args)
        if args.command == "backbones":
            print("\n".join(list_backbones()))
            return 0
    except (DatasetError, StoreError, BackboneError, DeviceError, ImageError, ExportError, ProjectNameError) as e:
        print(f"refit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refit: interrupted; nothing was published", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
