"""FST (feature shift tuning): the classifier is found from the graph, pushed off the
attacker's, kept at the attacker's norm, and a classifier-held backdoor is removed."""

import keras
import numpy as np
import pytest

from fineprune_tf import defenses, metrics, step_cache
from fineprune_tf.defenses.fst import FstSettings, classifier_layer, fst
from fineprune_tf.defenses.result import NotApplicable
from fineprune_tf.layers import MaskedConv2D
from tests.test_defenses import (
    blob_data,
    planted_backdoor_model,
    planted_data,
    trainable_model,
)

# The toy's clean margins are tiny (logits differ by ~0.02), so a larger rate than the default
# re-learns them within a few epochs.
FAST = FstSettings(learning_rate=0.5, max_epochs=10)


def small_norm_backdoor_model() -> keras.Model:
    """The planted backdoor (tests.test_defenses) with a classifier of norm ~4.
    The original's weight 100 makes ``alpha * <W, W_attacker>`` (up to 2,000) dwarf the
    cross-entropy, and FST's optimum there is ``-W_attacker``.  Here the backdoor channel is
    relu(16 x - 32) (silent on clean pixels <= 1, 32 on the trigger's 4) with weight 4."""
    model = planted_backdoor_model()
    conv, head = model.get_layer("conv"), model.get_layer("out")
    conv.kernel.assign(np.array([1.0, -1.0, 16.0, 0.5], np.float32).reshape(1, 1, 1, 4))
    conv.bias.assign(np.array([0.0, 1.0, -32.0, 0.0], np.float32))
    head.kernel.assign(np.array([[0, 1], [1, 0], [4, 0], [0, 0]], np.float32))
    head.bias.assign(np.zeros(2, np.float32))
    return model


def test_the_classifier_is_found_through_activation_and_dropout_layers():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="hidden")(inputs)
    logits = keras.layers.Dense(3, name="head")(hidden)
    dropped = keras.layers.Dropout(0.1)(logits)
    outputs = keras.layers.Softmax()(dropped)
    assert classifier_layer(keras.Model(inputs, outputs)).name == "head"
    assert classifier_layer(trainable_model()).name == "out"


def test_a_model_without_a_final_dense_classifier_is_refused_with_what_it_ends_in():
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Conv2D(3, 3)(inputs))
    with pytest.raises(ValueError, match="Received: GlobalAveragePooling2D 'gap'"):
        classifier_layer(keras.Model(inputs, outputs))
    two = keras.Model(inputs, [outputs, outputs])
    with pytest.raises(ValueError, match="2 outputs"):
        classifier_layer(two)


def test_fst_removes_a_backdoor_that_lives_in_the_classifier_and_fine_tuning_does_not():
    # The planted backdoor channel is silent on clean data, so clean cross-entropy gives its
    # classifier weight (100, to the target class) no gradient: fine-tuning keeps it.  FST
    # re-draws the classifier and its penalty pushes that weight against the attacker's sign.
    model = small_norm_backdoor_model()
    validation, backdoor = planted_data(400, seed=1)
    assert metrics.evaluate(model, validation, backdoor) == {
        "clean_acc": 1.0,
        "asr": 1.0,
        "robust_acc": 0.0,
    }
    defender = defenses.DefenderData(*validation, seed=0)
    attacker = model.get_layer("out").kernel.numpy()
    shifted = fst(model, defender, settings=FAST, evaluation=(validation, backdoor))
    tuned = defenses.fine_tune(
        model,
        defender,
        settings=defenses.FineTuneSettings(learning_rate=0.5, optimizer="sgd", max_epochs=10),
        evaluation=(validation, backdoor),
    )
    assert tuned.asr == 1.0 and tuned.model.get_layer("out").kernel.numpy()[2, 0] == 4.0
    kernel = shifted.model.get_layer("out").kernel.numpy()
    assert kernel[2, 0] < 0  # The backdoor channel now votes against the target class.
    assert shifted.asr == 0.0 and shifted.clean_acc >= 0.9
    # The norm projection: the new classifier has the attacker's norm.
    assert np.linalg.norm(kernel) == pytest.approx(np.linalg.norm(attacker), rel=1e-4)


def test_fst_leaves_a_plain_model_that_saves_and_the_input_model_alone(tmp_path):
    model = planted_backdoor_model()
    before = [w.copy() for w in model.get_weights()]
    validation, _ = planted_data(200, seed=2)
    result = defenses.run_defense("fst", model, defenses.DefenderData(*validation), seed=0)
    head = result.model.get_layer("out")
    assert head.kernel.regularizer is None and head.kernel.constraint is None
    assert result.details["classifier"] == "out" and result.details["alpha"] == 0.2
    path = tmp_path / "fst.keras"
    result.model.save(path)
    loaded = keras.models.load_model(path)
    x = validation[0][:16]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0))
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_fst_inside_the_step_cache_keeps_its_penalty_and_projection():
    # A cached trainer is a clone from the config, which would drop the variable's penalty
    # and constraint; such a fit must bypass the cache and give the uncached numbers.
    model = small_norm_backdoor_model()
    validation, backdoor = planted_data(300, seed=3)
    defender = defenses.DefenderData(*validation, seed=0)
    outside = fst(model, defender, settings=FAST)
    with step_cache.reuse_compiled_steps() as cache:
        defenses.fine_tune(model, defender, settings=defenses.FineTuneSettings(max_epochs=1))
        trainers = (cache.misses, cache.hits)
        assert trainers[0] >= 1  # the cache is active: fine-tuning took its trainers
        inside = fst(model, defender, settings=FAST)
        assert (cache.misses, cache.hits) == trainers  # FST neither built nor reused one
    for a, b in zip(outside.model.get_weights(), inside.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    predicted = metrics.predict_labels(inside.model, backdoor.x)
    assert np.mean(predicted == 0) == 0.0


def test_the_protocol_skips_fst_on_a_model_without_a_dense_classifier_and_says_why():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    features = MaskedConv2D(3, 3, activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    model = keras.Model(inputs, keras.layers.Softmax()(pooled))
    x, y = blob_data(120, seed=1)
    choice = defenses.auto_defend(
        model, defenses.DefenderData(x, y), candidates=("clp", "fst"), seed=0
    )
    assert choice.name == "clp"
    assert "Received: GlobalAveragePooling2D 'gap'" in choice.table["fst"]["not_applicable"]
    assert choice.table["fst"]["qualifies"] is False
    with pytest.raises(NotApplicable, match="no candidate defense applies"):
        defenses.auto_defend(model, defenses.DefenderData(x, y), candidates=("fst",))
