"""What the instseg operator and its trainer agree on, in one place.

Standard library only: the operator's image has no torch, the trainer imports no kopf. The
operator builds the trainer's command line from the flags here and reads the phases; the
trainer finds its resource through the env names and writes the progress fields;
tests/test_contract.py checks the CRD schema against this module.
"""

from __future__ import annotations

# ---- the resource
GROUP = "instseg.io"
VERSION = "v1alpha1"
KIND = "InstanceSegTraining"
PLURAL = "instancesegtrainings"
API_VERSION = f"{GROUP}/{VERSION}"

# env the operator sets on the trainer container: the resource whose status.progress the
# trainer patches
ENV_NAME = "INSTSEG_RESOURCE_NAME"
ENV_NAMESPACE = "INSTSEG_RESOURCE_NAMESPACE"

# ---- status.phase and status.conditions
PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)
# Ready is the summary tools read (kstatus, Argo CD, Flux, `kubectl wait`); the others are
# the types Kubeflow's training jobs have, plus Scheduled
CONDITION_TYPES = (
    "Created", "Scheduled", "Running", "Restarting", "Succeeded", "Failed", "Suspended", "Ready",
)  # fmt: skip

# ---- the trainer's command line
TRAINER_MODULE = "instseg_trainer.cli"  # `python -m`; the `instseg` console script runs it
TRAINER_SCRIPT = "instseg"
# torchrun for several processes, rejoining a rendezvous whose host is replaced
LAUNCHER_MODULE = "instseg_trainer.launch"
TRAIN_COMMAND = "train"
TRAIN_DATA_FLAG = "--train-data-roots"
VAL_DATA_FLAG = "--val-data-roots"
OUTPUT_FLAG = "--output"
DEVICE_FLAG = "--device"
# spec.hyperparameters key → `instseg train` flag
HYPERPARAMETER_FLAGS = {
    "epochs": "--epochs",
    "batchSize": "--batch-size",
    "learningRate": "--learning-rate",
    "inputSize": "--input-size",
    "warmupIterations": "--warmup-iterations",
    "earlyStoppingPatience": "--early-stopping-patience",
    "seed": "--seed",
    "backboneWeights": "--backbone-weights",
    "weights": "--weights",
    "autoBatchSize": "--auto-batch-size",
    "tiling": "--tiling",
    "tileSize": "--tile-size",
}
# every other value of a template: spec.hyperparameters key (nested objects joined with ".")
# → the template path `instseg train --set PATH=VALUE` takes
SET_FLAG = "--set"
TEMPLATE_SETTINGS = {
    "momentum": "hyperparameters.momentum",
    "weightDecay": "hyperparameters.weight_decay",
    "warmupRatio": "hyperparameters.warmup_ratio",
    "plateauFactor": "hyperparameters.plateau_factor",
    "plateauPatience": "hyperparameters.plateau_patience",
    "minLearningRate": "hyperparameters.min_learning_rate",
    "gradClipNorm": "hyperparameters.grad_clip_norm",
    "emaEpochMomentum": "hyperparameters.ema_epoch_momentum",
    "earlyStoppingStart": "hyperparameters.early_stopping_start",
    "flipProbability": "hyperparameters.flip_probability",
    "model.fpnChannels": "model.fpn_channels",
    "model.anchorSizes": "model.anchor_sizes",
    "model.aspectRatios": "model.aspect_ratios",
    "model.dropPathRate": "model.drop_path_rate",  # ConvNeXt only
    "model.rpn.fgIouThresh": "model.rpn.fg_iou_thresh",
    "model.rpn.bgIouThresh": "model.rpn.bg_iou_thresh",
    "model.rpn.batchSizePerImage": "model.rpn.batch_size_per_image",
    "model.rpn.positiveFraction": "model.rpn.positive_fraction",
    "model.rpn.preNmsTopNTrain": "model.rpn.pre_nms_top_n_train",
    "model.rpn.postNmsTopNTrain": "model.rpn.post_nms_top_n_train",
    "model.rpn.preNmsTopNTest": "model.rpn.pre_nms_top_n_test",
    "model.rpn.postNmsTopNTest": "model.rpn.post_nms_top_n_test",
    "model.rpn.nmsThresh": "model.rpn.nms_thresh",
    "model.roi.fgIouThresh": "model.roi.fg_iou_thresh",
    "model.roi.bgIouThresh": "model.roi.bg_iou_thresh",
    "model.roi.batchSizePerImage": "model.roi.batch_size_per_image",
    "model.roi.positiveFraction": "model.roi.positive_fraction",
    "model.roi.representationSize": "model.roi.representation_size",
    "model.roi.scoreThresh": "model.roi.score_thresh",
    "model.roi.nmsThresh": "model.roi.nms_thresh",
    "model.roi.detectionsPerImg": "model.roi.detections_per_img",
    "model.maskHead.channels": "model.mask_head.channels",
    "model.maskHead.convs": "model.mask_head.convs",
}
# spec.export → what the trainer exports after training, into <output>/EXPORT_DIRECTORY
EXPORT_FLAG = "--export"  # comma-separated formats
EXPORT_PRECISION_FLAG = "--export-precision"
EXPORT_OPTIMIZE_FLAG = "--export-optimize"
EXPORT_DIRECTORY = "exported"
# the trainer's exit code for bad input (its data, its flags): no retry can fix it
EXIT_USER_ERROR = 2

# ---- progress: the trainer's events, and the status.progress fields they update
EVENT_KINDS = ("start", "iteration", "epoch", "validation", "final", "export", "batch_size")
# status.artifacts: one entry per exported model, written by the trainer
ARTIFACT_FIELDS = ("name", "path", "format", "precision", "sizeBytes", "valSegmMap")
PROGRESS_FIELDS = (
    "epoch", "totalEpochs", "epochText", "iteration", "loss", "learningRate",
    "imagesPerSecond", "etaSeconds", "bestCheckpoint", "metrics", "updatedAt", "batchSize",
)  # fmt: skip
PROGRESS_METRIC_FIELDS = (
    "segmMap", "segmMap50", "bboxMap", "bboxMap50", "fMeasure", "bestSegmMap", "bestBboxMap",
    "bestEpoch",
)  # fmt: skip
