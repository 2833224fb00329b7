"""The masked layers under Keras' own layer checks (as keras/src/layers/convolutional and
core/dense tests run them), on whichever backend KERAS_BACKEND selects.

``run_layer_test`` checks the config round trip, trainable and non-trainable weight counts,
symbolic and eager calls, ``compute_output_shape``, a training step and mixed precision.  The
variable save/load order is checked separately below.  ``keras.src.testing`` is private Keras;
tests may use it (the library does not).
"""

import keras
import numpy as np
from keras.src import testing

import fineprune_tf as fp


class MaskedLayerStandardTest(testing.TestCase):
    def test_masked_conv2d(self):
        for kwargs, output_shape, trainable in [
            ({"filters": 5, "kernel_size": 3, "activation": "relu"}, (2, 6, 6, 5), 2),
            (
                {
                    "filters": 4,
                    "kernel_size": 2,
                    "strides": 2,
                    "padding": "same",
                    "use_bias": False,
                },
                (2, 4, 4, 4),
                1,
            ),
            (
                {"filters": 3, "kernel_size": 3, "dilation_rate": 2, "activation": "tanh"},
                (2, 4, 4, 3),
                2,
            ),
        ]:
            self.run_layer_test(
                fp.MaskedConv2D,
                init_kwargs=kwargs,
                input_shape=(2, 8, 8, 3),
                expected_output_shape=output_shape,
                expected_num_trainable_weights=trainable,
                expected_num_non_trainable_weights=1,  # The mask.
                expected_num_non_trainable_variables=1,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=False,
            )

    def test_masked_conv_with_a_fused_batchnorm(self):
        bn = keras.saving.serialize_keras_object(keras.layers.BatchNormalization(name="bn"))
        for cls, kwargs, output_shape, trainable in [
            (fp.MaskedConv2D, {"filters": 5, "kernel_size": 3, "activation": "relu"}, 5, 4),
            (fp.MaskedConv2D, {"filters": 4, "kernel_size": 1, "use_bias": False}, 4, 3),
            (fp.layers.MaskedDepthwiseConv2D, {"kernel_size": 3, "activation": "relu6"}, 3, 4),
        ]:
            self.run_layer_test(
                cls,
                init_kwargs={**kwargs, "batch_normalization": bn},
                input_shape=(2, 8, 8, 3),
                expected_output_shape=(2, 6, 6, output_shape)
                if kwargs["kernel_size"] == 3
                else (2, 8, 8, output_shape),
                expected_num_trainable_weights=trainable,  # kernel[, bias], gamma, beta
                expected_num_non_trainable_weights=3,  # the mask, moving mean and variance
                expected_num_non_trainable_variables=3,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=False,
            )

    def test_masked_dense(self):
        for kwargs, trainable in [
            ({"units": 6, "activation": "relu"}, 2),
            ({"units": 3, "use_bias": False}, 1),
        ]:
            self.run_layer_test(
                fp.MaskedDense,
                init_kwargs=kwargs,
                input_shape=(2, 7),
                expected_output_shape=(2, kwargs["units"]),
                expected_num_trainable_weights=trainable,
                expected_num_non_trainable_weights=1,
                expected_num_non_trainable_variables=1,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=True,
            )  # Dense passes a Keras mask through.

    def test_every_masked_conv_kind(self):
        L = fp.layers
        for cls, kwargs, input_shape, output_shape, trainable in [
            (
                L.MaskedConv1D,
                {"filters": 4, "kernel_size": 3, "padding": "causal", "activation": "relu"},
                (2, 7, 3),
                (2, 7, 4),
                2,
            ),
            (
                L.MaskedConv2D,
                {"filters": 4, "kernel_size": 3, "groups": 2},
                (2, 6, 6, 4),
                (2, 4, 4, 4),
                2,
            ),
            (
                L.MaskedConv3D,
                {"filters": 2, "kernel_size": 2, "use_bias": False},
                (2, 3, 4, 4, 3),
                (2, 2, 3, 3, 2),
                1,
            ),
            (
                L.MaskedSeparableConv1D,
                {"filters": 5, "kernel_size": 3, "depth_multiplier": 2},
                (2, 7, 3),
                (2, 5, 5),
                3,
            ),
            (
                L.MaskedSeparableConv2D,
                {"filters": 5, "kernel_size": 3, "activation": "relu"},
                (2, 6, 6, 3),
                (2, 4, 4, 5),
                3,
            ),
            (
                L.MaskedDepthwiseConv1D,
                {"kernel_size": 3, "depth_multiplier": 2},
                (2, 7, 3),
                (2, 5, 6),
                2,
            ),
            (
                L.MaskedDepthwiseConv2D,
                {"kernel_size": 3, "padding": "same", "activation": "relu"},
                (2, 6, 6, 3),
                (2, 6, 6, 3),
                2,
            ),
        ]:
            self.run_layer_test(
                cls,
                init_kwargs=kwargs,
                input_shape=input_shape,
                expected_output_shape=output_shape,
                expected_num_trainable_weights=trainable,
                expected_num_non_trainable_weights=1,  # The mask.
                expected_num_non_trainable_variables=1,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=False,
            )

    def test_compute_output_shape_matches_the_call(self):
        conv = fp.MaskedConv2D(4, 3, strides=2, padding="valid")
        x = np.zeros((3, 9, 7, 2), "float32")
        self.assertEqual(conv.compute_output_shape(x.shape), tuple(conv(x).shape))
        dense = fp.MaskedDense(5)
        self.assertEqual(dense.compute_output_shape((None, 4)), (None, 5))

    def test_supports_jit(self):
        self.assertTrue(fp.MaskedConv2D(2, 1).supports_jit)
        self.assertTrue(fp.MaskedDense(2).supports_jit)


class VariableOrderTest(testing.TestCase):
    """Keras' variables first (as Conv2D/Dense save them), the mask at the next index."""

    def saved_store(self, layer):
        store = {}
        layer.save_own_variables(store)
        return {key: keras.ops.convert_to_numpy(value) for key, value in store.items()}

    def test_conv_with_bias_saves_kernel_bias_mask(self):
        layer = fp.MaskedConv2D(3, 2, bias_initializer="ones")
        layer.build((None, 5, 5, 2))
        layer.prune([1])
        store = self.saved_store(layer)
        self.assertEqual(sorted(store), ["0", "1", "2"])
        plain = {}
        keras.layers.Conv2D.save_own_variables(layer, plain)
        self.assertEqual(len(plain), 2)  # Keras' own part is unchanged ...
        np.testing.assert_array_equal(store["0"], keras.ops.convert_to_numpy(layer.kernel))
        np.testing.assert_array_equal(store["1"], np.ones(3))
        np.testing.assert_array_equal(store["2"], [1, 0, 1])  # ... and the mask follows it.

    def test_dense_without_bias_saves_kernel_mask_and_loads_symmetrically(self):
        layer = fp.MaskedDense(4, use_bias=False)
        layer.build((None, 3))
        layer.prune([0, 3])
        store = self.saved_store(layer)
        self.assertEqual(sorted(store), ["0", "1"])
        np.testing.assert_array_equal(store["1"], [0, 1, 1, 0])

        other = fp.MaskedDense(4, use_bias=False)
        other.build((None, 3))
        other.load_own_variables(store)
        np.testing.assert_array_equal(other.mask, [0, 1, 1, 0])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(other.kernel), store["0"])

    def test_a_store_with_the_wrong_count_is_refused(self):
        layer = fp.MaskedConv2D(2, 1)
        layer.build((None, 3, 3, 1))
        store = self.saved_store(layer)
        del store["2"]
        with self.assertRaisesRegex(ValueError, "expected 3 variables"):
            layer.load_own_variables(store)
