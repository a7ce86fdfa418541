"""instseg trainer: Mask R-CNN instance segmentation with OTX's supervised recipe."""

__version__ = "0.1.0"
