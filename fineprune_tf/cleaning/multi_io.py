"""Cleaning a model with several inputs or outputs: which output the defense reads, the shapes
the data must have, and the one-input, one-output view the run works on
(:class:`fineprune_tf.model_io.PackedView`), mapped back to the whole model before it is saved.

The output read is ``--model_output`` when given; else the one output an ``.npz`` labels as
``y_<output name>``; else the only classification head.  Several candidates are refused with
one line naming them.
"""

from __future__ import annotations

import dataclasses
import os

import keras

from fineprune_tf import model_io
from fineprune_tf.cleaning.inputs import check_model, choose_output
from fineprune_tf.data.user import UserData

__all__ = ["ModelSignature", "model_signature"]


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What the cleaning run needs to know about the user's (converted) model.

    Attributes:
      input_shape: ``(H, W, C)`` for one input, ``{input name: shape}`` for several.
      classes: classes of the output read; output: its name (None: the model has one output).
      view: the packed view (None for a model with one input and one output).
    """

    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]
    classes: int
    output: str | None
    view: model_io.PackedView | None

    def model(self, model: keras.Model) -> keras.Model:
        """The model the defenses run on: the view, or ``model`` itself."""
        return model if self.view is None else self.view.view

    def packed(self, data: UserData | None) -> UserData | None:
        """``data`` with its inputs packed for the view (unchanged without one)."""
        if data is None or self.view is None:
            return data
        return dataclasses.replace(data, x=self.view.pack(data.x))

    def restored(self, defended: keras.Model) -> keras.Model:
        """The whole model carrying ``defended``'s (a defended view's) weights and masks."""
        return defended if self.view is None else self.view.restore(defended)


def model_signature(
    model: keras.Model, requested: str | None, clean_data: str | os.PathLike
) -> ModelSignature:
    """The signature of the converted ``model`` (see :class:`ModelSignature`); ``requested``:
    the user's ``--model_output``."""
    output = choose_output(model, requested, clean_data)
    input_shape, classes = check_model(model, output)
    view = None if model_io.is_single_io(model) else model_io.PackedView(model, output)
    return ModelSignature(input_shape, classes, output, view)
