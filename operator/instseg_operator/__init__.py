"""instseg operator: InstanceSegTraining resources → training Jobs, status, metrics.

This package never imports torch: the operator image has none.
"""

__version__ = "0.1.0"
