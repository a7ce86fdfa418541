"""`instseg` command line: templates, train, eval, predict, sample-data."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from instseg_contract import EXIT_USER_ERROR

from instseg_trainer import __version__
from instseg_trainer.errors import InstsegError
from instseg_trainer.logs import configure_logging, log_failure, logs_json

TEMPLATE_STARTS = {"imagenet": "ImageNet backbone", "coco": "COCO Mask R-CNN"}
# `instseg sample-data --format`: COCO, and instance formats Datumaro writes and reads back
SAMPLE_FORMATS = ("coco", "voc_instance_segmentation", "cityscapes", "label_me", "cvat", "datumaro")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _paths(text: str) -> list[Path]:
    """`a,b` → [a, b]: several dataset roots in one flag, as OTX takes them."""
    paths = [Path(part.strip()) for part in text.split(",") if part.strip()]
    if not paths:
        raise argparse.ArgumentTypeError(f"expected comma-separated paths, got {text!r}")
    return paths


def _add_roots_arg(p: argparse.ArgumentParser, flag: str, what: str, required: bool = True) -> None:
    p.add_argument(
        flag,
        required=required,
        type=_paths,
        action="extend",
        metavar="ROOT[,ROOT...]",
        help=f"dataset root(s) {what}: COCO (any layout, or its .json) or any format Datumaro "
        "detects; several (comma-separated, or the flag repeated) are merged and must declare "
        "the same categories",
    )


def _yes_no(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not true or false")


def _setting(text: str) -> tuple[str, object]:
    """`PATH=VALUE` → (path, value), the value read as JSON (numbers such as 1e-05, true,
    lists; what the operator writes), else as YAML (bare words, [a, b])."""
    import json

    import yaml

    path, equals, value = text.partition("=")
    if not equals or not path.strip():
        raise argparse.ArgumentTypeError(
            f"'{text}' is not PATH=VALUE (e.g. hyperparameters.momentum=0.95)"
        )
    try:
        return path.strip(), json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return path.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"'{text}': the value is not readable: {e}") from e


def _formats(text: str) -> list[str]:
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in ("onnx", "openvino")]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"{text!r}: formats are onnx and openvino")
    return list(dict.fromkeys(formats))


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as the CLI's other failures: one JSON line when stderr is not a terminal."""

    def error(self, message: str) -> NoReturn:
        if not logs_json():
            super().error(message)
        log_failure(f"{self.prog}: error: {message}")
        sys.exit(2)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        help="DataLoader worker processes; 0 loads in the main process (default: 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="instseg",
        description="Train, evaluate and run Mask R-CNN instance-segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"instseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_templates(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_optimize(sub)
    _add_sample_data(sub)
    return parser


def _add_templates(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "templates",
        help="list the model templates with measured complexity",
        description="List the three Mask R-CNN templates with their input size and their "
        "measured GFLOPs, parameters and size, beside the figures OTX publishes.",
    )
    p.add_argument("--no-measure", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=cmd_templates)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a template on a dataset (COCO, or any instance format Datumaro reads)",
        description="Train TEMPLATE on a dataset: COCO in any layout, or any instance format "
        "Datumaro detects. Resumes when OUTPUT already holds last.pt.",
    )
    p.add_argument("template", help="template name or OTX id (see `instseg templates`)")
    _add_roots_arg(p, "--train-data-roots", "for training (subset train)")
    _add_roots_arg(
        p,
        "--val-data-roots",
        "for validation (subset val; default: 20%% of train, fixed seed)",
        required=False,
    )
    p.add_argument("--output", type=Path, default=Path("outputs"), help="default: ./outputs")
    _add_recipe_args(p)
    p.add_argument(
        "--seed", type=int, default=0, help="random seed of weights, order and flips (default: 0)"
    )
    p.add_argument(
        "--backbone-weights",
        help="imagenet (torchvision download), none (random init) or PATH to a state dict; "
        "default: the template's (imagenet)",
    )
    p.add_argument(
        "--weights", metavar="CHECKPOINT|coco",
        help="start from an instseg checkpoint (other classes too: class-incremental), or from "
        "torchvision's COCO Mask R-CNN ('coco', or its .pth file; ResNet50 only); default: "
        "the template's start (`instseg templates`)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="require OUTPUT/last.pt and continue from it"
    )
    p.add_argument(
        "--stop-after-iterations",
        type=_positive_int,
        help="save a resumable checkpoint and stop after N iterations in total",
    )
    p.add_argument("--log-interval", type=_positive_int, default=10, help="iterations per report")
    _add_export_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_train)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """`train`'s changes to the template's recipe."""
    p.add_argument("--epochs", type=_positive_int, help="override the template's epochs")
    p.add_argument("--batch-size", type=_positive_int, help="images per GPU/process and step")
    p.add_argument("--learning-rate", type=_positive_float, help="base learning rate")
    p.add_argument("--input-size", type=_positive_int, help="longer image side (multiple of 32)")
    p.add_argument("--warmup-iterations", type=int, help="linear warmup length")
    p.add_argument("--early-stopping-patience", type=int, help="validations without gain; 0=off")
    p.add_argument(
        "--tiling", choices=("off", "on", "auto"), default="off",
        help="train on tiles of large images (small objects), predict through tiles: on, or "
        "auto (only when the objects are small for the images); default: off",
    )  # fmt: skip
    p.add_argument(
        "--tile-size", type=_positive_int,
        help="tile side in the images' pixels (default: from the objects' sizes, as OTX)",
    )  # fmt: skip
    p.add_argument(
        "--auto-batch-size", nargs="?", const=True, default=False, type=_yes_no,
        metavar="true|false",
        help="on a GPU, the largest batch its memory allows (learning rate scaled by the "
        "square root of the ratio, as OTX); a no-op on CPU",
    )  # fmt: skip
    p.add_argument(
        "--set", type=_setting, action="append", metavar="PATH=VALUE",
        help="any value of the template, by its path (repeatable), e.g. "
        "hyperparameters.momentum=0.95, model.rpn.nms_thresh=0.6, "
        "model.anchor_sizes=[16,32,64,128,256]; an unknown path lists the known ones",
    )  # fmt: skip


def _add_export_args(p: argparse.ArgumentParser) -> None:
    """`train`'s export after training (spec.export)."""
    p.add_argument(
        "--export", type=_formats, metavar="FORMAT[,FORMAT]",
        help="after training, export best.pt (onnx, openvino) into OUTPUT/exported, each model "
        "scored on the val set",
    )  # fmt: skip
    p.add_argument(
        "--export-precision", choices=("fp32", "fp16"), default="fp32",
        help="precision of the exported OpenVINO model (default: fp32)",
    )  # fmt: skip
    p.add_argument(
        "--export-optimize", action="store_true",
        help="also an INT8 OpenVINO model (instseg optimize) among the exports",
    )  # fmt: skip


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a COCO dataset",
        description="Score a checkpoint on a COCO subset: segm and bbox mAP, per-class AP and "
        "the F-measure; writes metrics.json, predictions.json and ground_truth.json to OUTPUT.",
    )
    p.add_argument(
        "--weights", required=True, type=Path,
        help="best.pt or last.pt, or an exported model.onnx / model.xml",
    )  # fmt: skip
    _add_roots_arg(p, "--data-roots", "to score on")
    p.add_argument("--subset", help="subset name when the root has several (default: test, val)")
    p.add_argument("--output", type=Path, default=Path("eval"), help="default: ./eval")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help="default: the training's batch size, so that images are padded as in its "
        "validation and the numbers match it exactly",
    )
    _add_runtime_args(p)
    p.set_defaults(func=cmd_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run a checkpoint on images; write overlays",
        description="Run a checkpoint on an image or a directory of images; writes an overlay "
        "PNG per image and all detections as COCO results (predictions.json) to OUTPUT.",
    )
    p.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="best.pt or last.pt, or an exported model.onnx / model.xml",
    )
    p.add_argument("--input", required=True, type=Path, help="an image or a directory of images")
    p.add_argument(
        "--output", type=Path, default=Path("predictions"), help="default: ./predictions"
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        help="draw detections scoring above this (default: the F-measure-best threshold "
        "found on validation)",
    )
    p.add_argument("--batch-size", type=_positive_int, help="default: the training's")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_predict)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or OpenVINO IR",
        description="Export a checkpoint as ONNX (opset 17, dynamic image size) or OpenVINO "
        "IR, with a metadata file beside it (<model>.json: classes and category ids, input "
        "size, normalisation, score threshold, what the graph holds). `instseg eval` and "
        "`instseg predict` take the exported model as --weights.",
    )
    p.add_argument("--weights", required=True, type=Path, help="best.pt (or last.pt)")
    p.add_argument("--format", choices=("onnx", "openvino"), required=True, help="onnx or openvino")
    p.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32",
        help="fp32 (default) or fp16 (OpenVINO: weights compressed to fp16)",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("exported"), help="default: ./exported")
    p.set_defaults(func=cmd_export)


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize",
        help="quantize an exported OpenVINO model to INT8 (NNCF)",
        description="Post-training INT8 quantization with NNCF: calibrated on the train "
        "subset of --data-roots, with accuracy control on the val subset (layers go back to "
        "float until segm mAP drops by at most --max-drop). Writes model_int8.xml and its "
        "metadata to OUTPUT.",
    )
    p.add_argument("--weights", required=True, type=Path, help="model_fp32.xml from export")
    _add_roots_arg(p, "--data-roots", "to calibrate on (subset train) and validate on")
    p.add_argument(
        "--val-data-roots", type=_paths, action="extend", metavar="ROOT[,ROOT...]",
        help="validate on these COCO root(s) (subset val) instead",
    )  # fmt: skip
    p.add_argument(
        "--subset-size", type=_positive_int, default=300,
        help="calibration images (default: 300, or all if fewer)",
    )  # fmt: skip
    p.add_argument(
        "--max-drop", type=float, default=0.01,
        help="largest segm mAP drop allowed, absolute (default: 0.01, one AP point)",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("exported"), help="default: ./exported")
    p.set_defaults(func=cmd_optimize)


def _add_sample_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-data",
        help="write the synthetic sample dataset (COCO, or another instance format)",
        description="Write a small deterministic synthetic COCO dataset (filled shapes on a "
        "noisy background; polygon, RLE and crowd annotations) with subsets train and val; "
        "with --format, the same images and instances (as masks) in another format.",
    )
    p.add_argument("directory", type=Path, help="the dataset root to write")
    p.add_argument(
        "--train-images", type=_positive_int, default=96, help="images in train (default: 96)"
    )
    p.add_argument(
        "--val-images", type=_positive_int, default=24, help="images in val (default: 24)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)"
    )
    p.add_argument(
        "--format", default="coco", choices=SAMPLE_FORMATS,
        help="the dataset's format (default: coco; the others through Datumaro)",
    )  # fmt: skip
    p.set_defaults(func=cmd_sample_data)


def cmd_templates(args: argparse.Namespace) -> int:
    from instseg_trainer.templates import all_templates

    rows = [("Template", "OTX id", "Input", "Start", "GFLOPs (OTX)", "Params M", "Size MB (OTX)")]
    for t in all_templates():
        if args.no_measure:
            gflops, params, size = "-", "-", "-"
        else:
            from instseg_trainer.models.complexity import measure_complexity

            c = measure_complexity(t)
            gflops, params, size = (
                f"{c['gflops']:.2f}",
                f"{c['parameters'] / 1e6:.2f}",
                (f"{c['size_mb']:.1f}"),
            )
        rows.append(
            (
                t.name,
                t.otx_id,
                str(t.input_size),
                TEMPLATE_STARTS[t.start],
                f"{gflops} ({t.published['gflops']})",
                params,
                f"{size} ({t.published['size_mb']})",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if not args.no_measure:
        print(
            "\nMeasured: torch FLOP counter (2 x multiply-adds) at the input size, "
            "box head on the test-time proposals, mask head on 100 detections; "
            "size = fp32 parameters. In brackets: the figures OTX publishes for its templates."
        )
    print(
        "Start: what a training loads without --weights or --backbone-weights. COCO: "
        "torchvision's COCO Mask R-CNN (downloaded once; offline, --weights FILE), its class "
        "layers kept for classes named as COCO's."
    )
    for t in all_templates():
        if t.published.get("note"):
            print(f"{t.name}: {t.published['note']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from instseg_trainer.engine.checkpoint import LAST
    from instseg_trainer.engine.trainer import TrainConfig, check_output_dir, train
    from instseg_trainer.reporting.kubernetes_status import KubernetesStatusReporter
    from instseg_trainer.reporting.reporters import make_reporters
    from instseg_trainer.templates import get_template

    recipe = get_template(args.template)
    template = recipe.with_overrides(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        input_size=args.input_size,
        warmup_iterations=args.warmup_iterations,
        early_stopping_patience=args.early_stopping_patience,
    )
    template = template.with_settings(dict(args.set or []))
    _log_changed_settings(recipe, template)
    if args.resume and not (args.output / LAST).is_file():
        raise InstsegError(f"--resume: '{args.output / LAST}' does not exist; nothing to resume")
    config = TrainConfig(
        template=template,
        train_roots=args.train_data_roots,
        val_roots=args.val_data_roots,
        output=args.output,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        backbone_weights=args.backbone_weights,
        init_weights=args.weights,
        auto_batch_size=args.auto_batch_size,
        tiling=args.tiling,
        tile_size=args.tile_size,
        resume=args.resume,
        stop_after_iterations=args.stop_after_iterations,
        log_interval=args.log_interval,
    )
    is_main = int(os.environ.get("RANK", "0")) == 0
    reporter = make_reporters(check_output_dir(args.output)) if is_main else None
    if is_main and (kubernetes := KubernetesStatusReporter.from_environment()):
        reporter.reporters.append(kubernetes)
    try:
        final = train(config, reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if final.status == "interrupted":  # 128 + the signal, as a shell reports a killed process
        return 128 + (final.stop_signal or signal.SIGTERM)
    if is_main and args.export and final.best_checkpoint:
        _export_trained(args, Path(final.best_checkpoint))
    return 0


def _log_changed_settings(recipe, template) -> None:
    ours, theirs = template.settings(), recipe.settings()
    changed = [f"{path}={value!r} (template: {theirs[path]!r})"
               for path, value in ours.items() if value != theirs[path]]  # fmt: skip
    if changed:
        logging.getLogger("instseg").info("recipe changed: %s", ", ".join(changed))


def _export_trained(args: argparse.Namespace, best: Path) -> None:
    from instseg_trainer.export.after_training import export_after_training
    from instseg_trainer.reporting.events import Exported
    from instseg_trainer.reporting.kubernetes_status import KubernetesStatusReporter
    from instseg_trainer.reporting.reporters import make_reporters

    artifacts = export_after_training(
        best, args.export, args.export_precision, args.export_optimize,
        args.train_data_roots, args.val_data_roots,
    )  # fmt: skip
    reporter = make_reporters(args.output)
    if kubernetes := KubernetesStatusReporter.from_environment():
        reporter.reporters.append(kubernetes)
    reporter.report(Exported(artifacts=artifacts))
    reporter.close()


def _print_metrics(metrics: dict) -> None:
    for task in ("segm", "bbox"):
        m = metrics[task]
        print(f"{task:5s} mAP {m['map']:.4f}  mAP50 {m['map50']:.4f}  mAP75 {m['map75']:.4f}")
    for name, ap in metrics["segm"]["per_class"].items():
        print(f"  segm AP {name}: {'-' if ap is None else f'{ap:.4f}'}")
    f = metrics["f_measure"].get("at_threshold") or metrics["f_measure"]["best"]
    print(f"F-measure {f['f_measure']:.4f} at confidence threshold {f['threshold']:.3f}")


def cmd_eval(args: argparse.Namespace) -> int:
    from instseg_trainer.engine.trainer import check_output_dir
    from instseg_trainer.evaluation.inference import evaluate_dataset, load_model

    check_output_dir(args.output)  # before the work, not after it
    trained = load_model(args.weights, args.device)
    metrics = evaluate_dataset(
        trained, args.data_roots, args.output, args.subset, args.batch_size, args.workers
    )
    _print_metrics(metrics)
    print(f"wrote {args.output}/metrics.json, predictions.json, ground_truth.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from instseg_trainer.engine.trainer import check_output_dir
    from instseg_trainer.evaluation.inference import load_model, predict_images

    check_output_dir(args.output)
    trained = load_model(args.weights, args.device)
    summary = predict_images(
        trained, args.input, args.output, args.score_threshold, args.batch_size, args.workers
    )
    print(
        f"{summary['images']} image(s), {summary['drawn']} detection(s) scoring above "
        f"{summary['threshold']:.3f}; overlays and predictions.json in {summary['output']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from instseg_trainer.export.exporter import export_model

    exported = export_model(args.weights, args.format, args.precision, args.output)
    print(
        f"exported {exported.format} {exported.precision}: {exported.model} "
        f"({exported.size_bytes / 2**20:.1f} MiB), metadata {exported.metadata}"
    )
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from instseg_trainer.export.optimize import optimize_model

    done = optimize_model(
        args.weights, args.data_roots, args.val_data_roots or args.data_roots, args.output,
        args.subset_size, args.max_drop,
    )  # fmt: skip
    print(
        f"INT8 model {done.model} ({done.size_bytes / 2**20:.1f} MiB), calibrated on "
        f"{done.calibration_images} train images: val segm mAP {done.int8_map:.4f} "
        f"(fp32 {done.float_map:.4f}, drop {done.drop:+.4f}; allowed {args.max_drop})"
    )
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from instseg_trainer.sample_data import write_sample_dataset

    with tempfile.TemporaryDirectory(prefix="instseg-sample-") as staging:
        coco = args.directory if args.format == "coco" else Path(staging)
        summary = write_sample_dataset(
            coco, num_train=args.train_images, num_val=args.val_images, seed=args.seed
        )
        if args.format != "coco":
            from instseg_trainer.data.formats import export_coco_as

            export_coco_as(coco, args.directory, args.format)
    for subset in ("train", "val"):
        s = summary[subset]
        print(
            f"{subset}: {s['images']} images, {s['objects']} objects "
            f"({s['polygons']} polygons, {s['rle']} RLE), {s['crowd']} crowd, "
            f"{s['empty_images']} empty"
        )
    print(f"wrote {args.directory}")
    return 0


def user_message(error: InstsegError) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises
    those with the worker's traceback prepended, and the user needs only the last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except InstsegError as e:
        log_failure(f"instseg {args.command}: error: {user_message(e)}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        log_failure(f"instseg {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
