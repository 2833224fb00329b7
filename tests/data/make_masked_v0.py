"""How tests/data/masked_v0.keras was made: run from the repository root with the layer code of
commit a035e0f (before issue 13 point 5), whose save_own_variables wrote (kernel, bias, mask).

Kept for provenance only; the file is checked in and must keep loading."""

import keras
import numpy as np

import fineprune_tf as fp

keras.utils.set_random_seed(0)
inputs = keras.Input((6, 6, 2))
x = fp.MaskedConv2D(4, 3, activation="relu", name="conv")(inputs)
x = fp.MaskedConv2D(3, 1, use_bias=False, name="conv_nobias")(x)
x = keras.layers.Flatten()(x)
x = fp.MaskedDense(5, activation="relu", name="dense")(x)
outputs = keras.layers.Dense(2, name="out")(x)
model = keras.Model(inputs, outputs)
model.get_layer("conv").prune([1])
model.get_layer("conv_nobias").prune([0, 2])
model.get_layer("dense").prune([3])
model.save("tests/data/masked_v0.keras")
xin = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
np.savez("tests/data/masked_v0_io.npz", x=xin, y=model.predict(xin, verbose=0))
print(model.predict(xin, verbose=0))
