"""How tests/data/masked_bn_v1.keras was made: run from the repository root with the layer code
of the commit that added fused BatchNormalization (issue 12 point 3): a converted
conv -> BN -> ReLU6 chain, a depthwise conv -> BN and a conv -> BN feeding an Add, some
channels pruned.

Kept for provenance only; the file is checked in and must keep loading."""

import keras
import numpy as np

import fineprune_tf as fp

keras.utils.set_random_seed(0)
inputs = keras.Input((6, 6, 2))
x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
x = keras.layers.BatchNormalization(name="conv_bn")(x)
x = keras.layers.ReLU(6.0, name="conv_relu")(x)
y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
y = keras.layers.BatchNormalization(name="dw_bn")(y)
x = keras.layers.Add(name="add")([x, y])
x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
outputs = keras.layers.Dense(2, name="out")(x)
stock = keras.Model(inputs, outputs)
rng = np.random.default_rng(0)
for bn in ("conv_bn", "dw_bn"):
    stock.get_layer(bn).set_weights(
        [
            rng.uniform(0.5, 1.5, 4),
            rng.normal(0, 0.5, 4),
            rng.normal(0, 0.5, 4),
            rng.uniform(0.5, 1.5, 4),
        ]
    )
model = fp.convert(stock)
model.get_layer("conv").prune([1])
model.get_layer("dw").prune([1, 2])
model.save("tests/data/masked_bn_v1.keras")
xin = rng.normal(size=(4, 6, 6, 2)).astype("float32")
np.savez("tests/data/masked_bn_v1_io.npz", x=xin, y=model.predict(xin, verbose=0))
