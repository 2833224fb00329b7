"""FST: Feature Shift Tuning (Min, Qin, Shen, Cheng; NeurIPS 2023).

Vanilla fine-tuning on a little clean data leaves the backdoor when its features stay
entangled with the clean ones: the classifier keeps reading the same directions.  FST
re-initialises the final linear classifier and fine-tunes the whole network while pushing the
new classifier *away* from the attacker's:

    loss = CE(f(x), y) + alpha * <W, W_attacker>        (sum of the element-wise product)
    W <- W * ||W_attacker|| / ||W||                       (after every step)

so the features must shift for the new classifier to read them.  The penalty is not
scale-free: at most ``alpha * ||W_attacker||^2``, so a classifier of large norm lets it dwarf
the cross-entropy, and the optimum tends to ``-W_attacker`` (``tests/test_defenses_fst.py``).

Followed from the authors' code (AISafety-HKUST/stable_backdoor_purification,
``fine_tune/fst.py``): the classifier's kernel and bias re-drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; the penalty and the norm projection above; SGD with
momentum 0.9, cosine decay, learning rate 0.01 (their README's command); ``alpha`` 0.2, their
code's default (the README's CIFAR-10 example uses 0.1).

Departures, each for a reason:
- Training length: the authors train 10 epochs of 2% of CIFAR-10 (1,000 images, batch 128: 80
  steps).  Our defenders hold 80-600 examples, so 10 epochs would be 10-50 steps; FST runs
  instead under the library's clean-data stopping rule (``FineTuneSettings``' ``converge``:
  until the clean training loss plateaus, cap 30 epochs, keep the latest checkpoint within 1
  point of the best clean holdout accuracy), at the library's batch of 64.  Seen before this
  was fixed: five prototype runs on speech seed 0's test split (alpha 0.1/0.2, lr 0.003/0.01,
  batch 32/64/128: ASR .056-.244); the best of them (batch 32) was not adopted, the library's
  batch and stopping rule were kept.  The other seeds and tasks are unseen checks.
- If every checkpoint is 5 points below the start, ``converge`` keeps the starting weights; for
  FST the start already has the re-drawn classifier, so such a run stays a broken model, which
  the clean holdout then shows (the protocol does not choose it).
- The penalty and the projection are a variable regularizer and constraint on the classifier's
  kernel (Keras applies both inside ``fit``); both are removed afterwards, so the defended
  model saves and serves like any other.
- The classifier is found from the graph (the last Dense layer before the output, through
  activation / dropout layers), not by a ``--linear_name`` flag.
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from fineprune_tf import _keras_compat
from fineprune_tf.defenses.fine_tuning import FineTuneSettings, fine_tune_in_place, tuned_result
from fineprune_tf.defenses.guard import DefenderData
from fineprune_tf.defenses.result import (
    DefenseResult,
    NotApplicable,
    clone,
)

__all__ = ["FstSettings", "fst", "classifier_layer"]

# Layers that pass the classifier's logits through unchanged in shape (walked over to find it).
_PASS_THROUGH = (keras.layers.Activation, keras.layers.Softmax, keras.layers.Dropout)


@dataclasses.dataclass(frozen=True)
class FstSettings:
    """FST's defaults (the module docstring says where each comes from).

    Attributes:
      alpha: weight of the inner-product penalty ``<W, W_attacker>``.
      learning_rate: SGD's initial rate (momentum 0.9, cosine decay to 0).
      max_epochs, batch_size: the ``converge`` rule's cap and the batch.
    """

    alpha: float = 0.2
    learning_rate: float = 0.01
    max_epochs: int = 30
    batch_size: int = 64

    def validate(self) -> None:
        if self.alpha < 0 or self.learning_rate <= 0:
            raise ValueError(
                f"alpha must be >= 0 and learning_rate > 0, received: alpha={self.alpha}, "
                f"learning_rate={self.learning_rate}"
            )

    def fine_tune_settings(self, seed: int) -> FineTuneSettings:
        return FineTuneSettings(
            learning_rate=self.learning_rate,
            optimizer="sgd",
            max_epochs=self.max_epochs,
            batch_size=self.batch_size,
            seed=seed,
        )


class _ShiftPenalty(keras.regularizers.Regularizer):
    """``alpha * sum(W * W_attacker)``: lowest when the new classifier points away."""

    def __init__(self, alpha: float, attacker_kernel: np.ndarray):
        self.alpha = float(alpha)
        self.attacker_kernel = keras.ops.convert_to_tensor(attacker_kernel)

    def __call__(self, kernel):
        return self.alpha * keras.ops.sum(kernel * self.attacker_kernel)


class _NormProjection(keras.constraints.Constraint):
    """Rescales the kernel to the attacker's kernel's Frobenius norm after each step."""

    def __init__(self, norm: float):
        self.norm = float(norm)

    def __call__(self, kernel):
        return kernel * (self.norm / keras.ops.maximum(keras.ops.norm(kernel), 1e-12))


def classifier_layer(model: keras.Model) -> keras.layers.Dense:
    """The final linear classifier: the Dense layer whose output reaches the model's single
    output through activation, softmax or dropout layers only.

    Raises:
      NotApplicable (a ValueError): the model has several outputs, or its output is not
        produced that way.
    """
    if len(model.outputs) != 1:
        raise NotApplicable(
            f"FST re-initialises one linear classifier; the model has {len(model.outputs)} outputs"
        )
    layer = _keras_compat.producing_operation(model.outputs[0])
    while isinstance(layer, _PASS_THROUGH):
        layer = _keras_compat.producing_operation(layer.input)
    if not isinstance(layer, keras.layers.Dense) or len(layer.kernel.shape) != 2:
        raise NotApplicable(
            "FST needs a Dense classifier at the model's output (through activation or "
            f"dropout layers). Received: {type(layer).__name__} {layer.name!r}"
        )
    return layer


def fst(
    model: keras.Model,
    defender: DefenderData | tuple,
    *,
    settings: FstSettings | None = None,
    seed: int = 0,
    evaluation=None,
) -> DefenseResult:
    """Feature Shift Tuning on the defender's clean data (module docstring); masks are held.

    ``defender``: a DefenderData, or an ``(x, y)`` pair of clean data (split 80/20 into fit and
    holdout, as the other defenses do).

    Returns a DefenseResult named ``"fst"``; ``details`` holds the classifier's name, the
    penalty, and the fine-tuning run (epochs, chosen epoch, why).
    """
    settings = settings or FstSettings()
    settings.validate()
    defender = DefenderData.coerce(defender, seed=seed)
    start = time.perf_counter()
    defended = clone(model)
    head = classifier_layer(defended)
    attacker_kernel = keras.ops.convert_to_numpy(head.kernel)
    bound = 1.0 / math.sqrt(attacker_kernel.shape[0])
    rng = np.random.default_rng(seed)
    head.kernel.assign(rng.uniform(-bound, bound, attacker_kernel.shape).astype("float32"))
    if head.bias is not None:
        head.bias.assign(rng.uniform(-bound, bound, tuple(head.bias.shape)).astype("float32"))
    head.kernel.regularizer = _ShiftPenalty(settings.alpha, attacker_kernel)
    head.kernel.constraint = _NormProjection(float(np.linalg.norm(attacker_kernel)))
    try:
        tuned = fine_tune_in_place(defended, defender, settings.fine_tune_settings(seed))
    finally:
        head.kernel.regularizer = None
        head.kernel.constraint = None
    details = {
        "classifier": head.name,
        "alpha": settings.alpha,
        "fine_tuning": tuned,
        "why": tuned["why"],
    }
    return tuned_result("fst", defended, start, defender, tuned, details, evaluation)
