"""fineprune_tf: backdoor attacks and pruning-based defenses (Fine-Pruning, RAID 2018) for Keras 3."""

from fineprune_tf import layers, ops, stats
from fineprune_tf.layers import MaskedConv2D, MaskedDense

__version__ = "0.1.0"
__all__ = ["MaskedConv2D", "MaskedDense", "layers", "ops", "stats"]
