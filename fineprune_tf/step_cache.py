"""One compiled Keras training step per model structure, reused across fits.

Every clean fine-tuning of a defense (fine-tuning, fine-pruning, FMP's tuning, one run per
candidate learning rate) and every retuning attack used to compile a freshly cloned model and
fit it, so Keras traced a new ``train_function`` (and ``test_function``) each time: about half
of a short fine-tune's seconds on 2 cores went to tracing (``results/leaderboard_speed.md``).
The defended models of one task share their structure (pruning lives in mask *variables*), so
one compiled model can do all of them:

>>> with step_cache.reuse_compiled_steps():
...     training.fit(model_a, x, y, ...)   # builds and traces a trainer for this structure
...     training.fit(model_b, x, y, ...)   # same structure: assigns, fits, copies back

A :class:`Trainer` is a clone of the model compiled once with exactly the optimizer, loss and
metrics the caller asked for (:class:`CompileSpec`, learning rate and schedule length
included).  Before each fit it takes the caller's model state by assignment -- every variable
of ``model.variables``: weights, masks, BN statistics and the dropout seed states -- and resets
the optimizer's variables to their initial values (step 0, zero moments, the initial rate);
afterwards it gives the variables back.  The traced graph is the one a fresh compile would
trace, so the result is the same bit for bit (``tests/test_step_cache.py`` checks weights,
seed states and histories after several epochs with dropout, a cosine schedule, a partial
last batch and the ``converge`` callback).

Why the rate is part of the key rather than a variable: a cosine schedule whose initial rate
and length are variables computes the same formula, but Grappler folds the constant version
differently (measured: the last steps' rates differ in the last bit, and the weights follow),
so one trainer per rate keeps the numbers identical.  The defenses use two rates and one
schedule length per task, so a task still traces two fine-tuning steps instead of six per
attacked model.

The statistics pass (``stats.collect``: the mean activations the pruning defense orders
channels by) is reused the same way (:class:`StatsPass`, :func:`collect_stats`): one clone per
structure with its traced :class:`~fineprune_tf.stats.StatsCollector`, the caller's variables
assigned in before each pass.  Building a collector per defended model traced a new
``tf.function`` each time, and TensorFlow warned about frequent retracing in every leaderboard
run.

Outside :func:`reuse_compiled_steps` nothing is cached (each fit compiles its model as
before).  A model that cannot be cloned from its config (a subclassed model), one fitted under
a ``tf.distribute`` strategy, one with a regularizer or constraint set on a variable (not in
its config: FST's), and a *fresh copy* (the retuning attack's) of a model with an
unseeded random layer (whose fresh seed cannot be reproduced) are fitted the old way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import recipes, stats

__all__ = [
    "CompileSpec",
    "StatsPass",
    "StepCache",
    "Trainer",
    "active",
    "collect_stats",
    "fit",
    "reuse_compiled_steps",
]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """How a model is compiled for a fit (sparse-label classification).

    Attributes:
      optimizer: ``recipes.make_optimizer`` name (``"adam"``, ``"sgd"``, ``"rmsprop"``).
      learning_rate: the (initial) rate.
      decay_steps: cosine decay to 0 over this many steps; None: a constant rate.
      metrics: compiled metrics (names).
      jit_compile: Keras' ``compile(jit_compile=...)``.
    """

    optimizer: str
    learning_rate: float
    decay_steps: int | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    jit_compile: bool | str = "auto"

    def compile(self, model: keras.Model) -> None:
        """Compiles ``model`` with a fresh optimizer (the uncached path)."""
        model.compile(
            optimizer=recipes.make_optimizer(self.optimizer, self.learning_rate, self.decay_steps),
            loss="sparse_categorical_crossentropy",
            metrics=list(self.metrics) or None,
            jit_compile=self.jit_compile,
        )

    def key(self) -> tuple:
        return dataclasses.astuple(self)


def _config_key(model: keras.Model) -> str | None:
    try:
        config = model.get_config()
    except NotImplementedError:
        return None
    if isinstance(config, dict):  # The model's own name does not shape its step.
        config = {k: v for k, v in config.items() if k != "name"}
    return json.dumps([type(model).__name__, config], sort_keys=True, default=repr)


def _layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def _unseeded_random_layer(model: keras.Model) -> bool:
    """A layer with a ``seed`` argument left None (its fresh clone draws a new seed)."""
    return any(
        "seed" in (config := layer.get_config()) and config["seed"] is None
        for layer in _layers(model)
    )


def _variable_terms(model: keras.Model) -> bool:
    """A trainable variable carries a regularizer or constraint (FST sets them on a kernel for
    one fit): a clone from the config would not carry it, so such a fit is not cached."""
    return any(
        v.regularizer is not None or v.constraint is not None for v in model.trainable_variables
    )


def _seed_states(model: keras.Model) -> list[bool]:
    """Per entry of ``model.variables``: is it a random layer's seed state (not a weight)?"""
    weights = {id(w) for w in model.weights}
    return [id(v) not in weights for v in model.variables]


class Trainer:
    """A compiled clone of one model structure that fits other models of that structure.

    Args:
      model: any model of the structure (its config is cloned; its values are not read).
      spec: the compile settings (every fit of this trainer uses them).
    """

    def __init__(self, model: keras.Model, spec: CompileSpec):
        self.model = keras.models.clone_model(model)
        self.spec = spec
        spec.compile(self.model)
        optimizer = self.model.optimizer
        optimizer.build(self.model.trainable_variables)
        self._optimizer_start = [np.array(v.numpy()) for v in optimizer.variables]
        # A fresh clone's seed states (None for the weights): what the retuning attack's copy
        # would start from.
        self._fresh_seed_states = [
            np.array(v.numpy()) if is_seed else None
            for v, is_seed in zip(self.model.variables, _seed_states(self.model), strict=True)
        ]
        self.fits = 0

    def _load(self, model: keras.Model, fresh_seed_states: bool) -> None:
        _load_variables(self.model, model, self._fresh_seed_states if fresh_seed_states else None)
        optimizer = self.model.optimizer
        for variable, start in zip(optimizer.variables, self._optimizer_start, strict=True):
            variable.assign(start)  # step count 0, zero moments, the initial rate

    def _store(self, model: keras.Model) -> None:
        for target, source in zip(model.variables, self.model.variables, strict=True):
            target.assign(source.value)

    def fit(
        self,
        model: keras.Model,
        seed: int,
        *args: Any,
        copy_back: bool = True,
        fresh_seed_states: bool = False,
        **kwargs: Any,
    ) -> keras.callbacks.History:
        """``model.fit(*args, **kwargs)`` compiled with this trainer's spec, run on it.

        ``copy_back=False`` leaves ``model`` untouched (the trained state stays in
        ``self.model``); ``fresh_seed_states`` starts the random layers from a fresh clone's
        seeds instead of ``model``'s.
        """
        self._load(model, fresh_seed_states)
        keras.utils.set_random_seed(seed)
        self.fits += 1
        try:
            return self.model.fit(*args, **kwargs)
        finally:
            if copy_back:
                self._store(model)


def _load_variables(
    target: keras.Model, source: keras.Model, replacements: list | None = None
) -> None:
    """Assigns every variable of ``source`` into ``target`` (same structure), except where
    ``replacements`` (one entry per variable, None: keep the source's) gives another value."""
    mine, theirs = target.variables, source.variables
    if [tuple(v.shape) for v in mine] != [tuple(v.shape) for v in theirs]:
        raise ValueError(f"model {source.name} does not have this clone's structure")
    replacements = replacements or [None] * len(mine)
    for into, value, other in zip(mine, theirs, replacements, strict=True):
        into.assign(value.value if other is None else other)


class StatsPass:
    """A clone of one model structure with its statistics pass traced once.

    Args:
      model: any model of the structure (its config is cloned; its values are not read).
      layer_names: the masked layers to measure (None: every one).
      jit_compile: as :class:`~fineprune_tf.stats.StatsCollector`'s, resolved from the
        caller's model (the clone is never compiled).
    """

    def __init__(self, model: keras.Model, layer_names: tuple[str, ...] | None, jit_compile: bool):
        self.model = keras.models.clone_model(model)
        self.collector = stats.StatsCollector(self.model, layer_names, jit_compile=jit_compile)
        self.passes = 0

    def collect(self, model: keras.Model, data, batch_size: int) -> dict[str, stats.ChannelStats]:
        """``stats.collect(model, data, ...)``, run on the clone holding ``model``'s values
        (weights, masks, BN statistics); ``model`` is not modified."""
        _load_variables(self.model, model)
        self.passes += 1
        return self.collector.collect(data, batch_size)


class StepCache:
    """Trainers by (model structure, compile structure, data shapes) and statistics passes by
    (model structure, layers), least recently used first out beyond ``max_entries`` each."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._trainers: collections.OrderedDict[tuple, Trainer] = collections.OrderedDict()
        self._stats_passes: collections.OrderedDict[tuple, StatsPass] = collections.OrderedDict()
        self.hits = self.misses = 0

    def stats_pass(
        self, model: keras.Model, layer_names: tuple[str, ...] | None, jit_compile: bool
    ) -> StatsPass | None:
        """The statistics pass for ``model``'s structure (built on a miss), or None when the
        model cannot be cloned from its config."""
        config = _config_key(model)
        if config is None:
            return None
        return self._get(
            self._stats_passes,
            (config, layer_names, jit_compile),
            lambda: StatsPass(model, layer_names, jit_compile),
        )

    def trainer(self, model: keras.Model, spec: CompileSpec, shapes: tuple = ()) -> Trainer | None:
        """The trainer for ``model``'s structure (built on a miss), or None when the model
        cannot be cloned from its config.  ``shapes`` (example and batch counts) is part of the
        key: the traced step's concrete functions depend on the batch shapes it has seen."""
        config = _config_key(model)
        if config is None:
            return None
        return self._get(
            self._trainers, (config, spec.key(), tuple(shapes)), lambda: Trainer(model, spec)
        )

    def _get(self, store: collections.OrderedDict, key: tuple, build):
        """``store[key]``, built on a miss (None when the clone cannot be built), least
        recently used dropped beyond ``max_entries``."""
        if key in store:
            self.hits += 1
            store.move_to_end(key)
            return store[key]
        try:
            built = build()
        except (ValueError, TypeError, NotImplementedError):
            return None
        self.misses += 1
        store[key] = built
        while len(store) > self.max_entries:
            store.popitem(last=False)
        return built

    def clear(self) -> None:
        self._trainers.clear()
        self._stats_passes.clear()


_ACTIVE: list[StepCache] = []


def active() -> StepCache | None:
    """The innermost :func:`reuse_compiled_steps` cache, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def reuse_compiled_steps(max_entries: int = 32) -> Iterator[StepCache]:
    """Within the block, :func:`fit` (hence ``training.fit`` and the retuning attack) reuses
    one compiled trainer per model structure.

    ``max_entries``: trainers kept (least recently used dropped first).  The leaderboard visits
    each task once per seed and keeps per task two fine-tuning trainers (two candidate rates),
    one retuning trainer and one per attack's training: ~7, ~21 for its three tasks, so 32
    keeps every task's trainers from one seed to the next (each is a small model clone with its
    optimizer slots, a few MB for these tasks)."""
    cache = StepCache(max_entries)
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)
        cache.clear()


def fit(
    model: keras.Model,
    spec: CompileSpec,
    seed: int,
    *args: Any,
    shapes: tuple = (),
    fresh_copy: bool = False,
    **kwargs: Any,
) -> tuple[keras.callbacks.History, keras.Model]:
    """Seeds, compiles ``model`` with ``spec`` and fits it, through the active cache if any.

    ``fresh_copy``: train a copy of ``model`` instead (``model`` is not modified; the copy's
    random layers start from fresh seeds, like ``keras.models.clone_model``'s).

    Returns ``(history, trained)``: ``trained`` is ``model``, or the copy (which, from the
    cache, is the trainer's own model: read it before the next fit).
    """
    cache = active()
    trainer = None
    # Under a distribution strategy the model's variables are the strategy's: fit it itself.
    if (
        cache is not None
        and not tf.distribute.has_strategy()
        and not (fresh_copy and _unseeded_random_layer(model))
        and not _variable_terms(model)
    ):
        trainer = cache.trainer(model, spec, shapes)
    if trainer is None:
        if fresh_copy:
            copy = keras.models.clone_model(model)
            copy.set_weights(model.get_weights())
            model = copy
        keras.utils.set_random_seed(seed)
        spec.compile(model)
        return model.fit(*args, **kwargs), model
    history = trainer.fit(
        model, seed, *args, copy_back=not fresh_copy, fresh_seed_states=fresh_copy, **kwargs
    )
    return history, trainer.model if fresh_copy else model


def collect_stats(
    model: keras.Model,
    data,
    layer_names: list[str] | tuple[str, ...] | None = None,
    batch_size: int = 128,
) -> dict[str, stats.ChannelStats]:
    """:func:`fineprune_tf.stats.collect`, through the active cache's :class:`StatsPass` for
    ``model``'s structure when there is one (same numbers: the same graph on the same values).
    Without a cache, under a ``tf.distribute`` strategy, or for a model that cannot be cloned
    from its config, a one-shot collector as before."""
    cache = active()
    if cache is not None and not tf.distribute.has_strategy():
        names = None if layer_names is None else tuple(layer_names)
        stats_pass = cache.stats_pass(model, names, stats.default_jit_compile(model))
        if stats_pass is not None:
            return stats_pass.collect(model, data, batch_size)
    return stats.collect(model, data, layer_names=layer_names, batch_size=batch_size)
