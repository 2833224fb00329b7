"""The compiled engine of a plan: the prefix pass and the per-step loop over one chunk."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import keras
import tensorflow as tf

from fineprune_tf import _keras_compat as compat
from fineprune_tf.curves.plan import _Plan
from fineprune_tf.graph import static_shape
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["cached_engines", "engine_for"]


class _Engine:
    """The tf.functions of a plan: the prefix pass and the per-step loop over one chunk."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        p = plan
        dtype = p.dtype
        self.maps = {id(t): tf.constant(p.pinfo[id(t)].channel_map) for t in p.t1}
        self.columns = {
            id(piece.tensor): tf.constant(piece.columns)
            for f in p.frontier_list
            for piece in f.pieces
            if piece.columns is not None
        }
        t1_specs = [tf.TensorSpec([None, *static_shape(t)], dtype) for t in p.t1]
        t0_specs = [tf.TensorSpec([1, *static_shape(t)], dtype) for t in p.t1]
        u_specs = [tf.TensorSpec([None, *f.u_shape], dtype) for f in p.frontier_list]
        const_specs = [tf.TensorSpec([None, *static_shape(t)], t.dtype) for t in p.rest_consts]
        x_spec = tf.TensorSpec([None, *static_shape(p.input)], p.input.dtype)
        a_shape = static_shape(p.layer_node.outputs[0])
        vector = tf.TensorSpec([None], tf.int32)

        # No AutoGraph: the traced code has no tensor-dependent Python control flow (the step
        # loop is an explicit tf.while_loop), and converting the Keras layers' code costs
        # seconds per trace.
        self.zeros = tf.function(
            self._zeros, autograph=False, input_signature=[tf.TensorSpec([1, *a_shape], dtype)]
        )
        self.prefix = tf.function(
            self._prefix,
            autograph=False,
            input_signature=[x_spec, tf.TensorSpec([p.channels], dtype), t0_specs],
        )
        self._run_specs = [
            u_specs,
            t1_specs,
            t0_specs,
            const_specs,
            vector,
            tf.TensorSpec([None], dtype),
            tf.TensorSpec([None, p.channels], dtype),
            vector,
            vector,
            vector,
        ]
        self._run_fns: dict[int, Any] = {}
        # Every engine traces its own graphs once (input signatures fix the types); tracing
        # them here, through get_concrete_function, keeps TF's retracing detector -- keyed on
        # the method's code, shared by all engines -- from warning "5 out of the last 5 calls".
        self.zeros.get_concrete_function()
        self.prefix.get_concrete_function()

    # -- helpers (traced)

    def _active(self, t: Any, active: tf.Tensor) -> tf.Tensor:
        """``active`` ``[R, C]`` spread over ``t``'s elements: ``[R, *shape(t)]`` (bool)."""
        info = self.plan.pinfo[id(t)]
        shape = static_shape(t)
        if info.channels_last:
            keep = tf.reshape(active, [-1, *([1] * (len(shape) - 1)), self.plan.channels])
        else:
            keep = tf.reshape(
                tf.gather(active, tf.reshape(self.maps[id(t)], [-1]), axis=1), [-1, *shape]
            )
        return keep > 0

    def _p_region(self, a: tf.Tensor) -> list[tf.Tensor]:
        p = self.plan
        values = {id(p.layer_node.outputs[0]): a}
        for node in p.p_nodes:
            for t, v in zip(node.outputs, node.run(values), strict=True):
                values[id(t)] = v
        return [values[id(t)] for t in p.t1]

    def _zeros(self, zeros: tf.Tensor) -> list[tf.Tensor]:
        return self._p_region(zeros)

    @staticmethod
    def _dense_pre(
        layer: Any, x: tf.Tensor, start: int | None = None, stop: int | None = None
    ) -> tf.Tensor:
        kernel = layer.kernel if start is None else layer.kernel[start:stop]
        return tf.matmul(x, tf.cast(kernel, x.dtype))

    @staticmethod
    def _bias(layer: Any, z: tf.Tensor) -> tf.Tensor:
        if getattr(layer, "bias", None) is None:
            return z
        return z + tf.cast(layer.bias, z.dtype)

    @staticmethod
    def _finish(layer: Any, z: tf.Tensor) -> tf.Tensor:
        if isinstance(layer, MaskedLayerMixin):
            return compat.masked_output(layer, z)
        return z if layer.activation is None else layer.activation(z)

    # -- the prefix pass

    def _prefix(self, x: tf.Tensor, active0: tf.Tensor, t0s: list[tf.Tensor]):
        """One batch: ``T1`` per-channel tensors, frontier pre-activations at the starting mask,
        constants, and which channels are non-zero per sample (``[n, C]`` bool)."""
        p = self.plan
        values = {id(p.input): x}
        for node in p.prefix_nodes:
            for t, v in zip(node.outputs, node.run(values), strict=True):
                values[id(t)] = v
        # The layer's mask is all ones during the run: this is the unmasked act(z).
        a = p.layer_node.run(values)[0]
        t1s = self._p_region(a)
        active = active0[None, :]
        u0s = []
        for frontier in p.frontier_list:
            layer = frontier.layer
            if frontier.kind == "conv":
                piece = frontier.pieces[0]
                i = p.t1_index[id(piece.tensor)]
                xin = tf.where(self._active(piece.tensor, active), t1s[i], t0s[i])
                z = self._bias(layer, layer.convolution_op(xin, layer.kernel))
            else:
                z = None
                for piece in frontier.pieces:
                    if piece.kind == "dyn":
                        continue
                    if piece.kind == "p":
                        i = p.t1_index[id(piece.tensor)]
                        xin = tf.where(self._active(piece.tensor, active), t1s[i], t0s[i])
                    else:
                        xin = values[id(piece.tensor)]
                    if len(frontier.pieces) == 1:
                        part = self._dense_pre(layer, xin)
                    else:
                        part = self._dense_pre(layer, xin, piece.start, piece.stop)
                    z = part if z is None else z + part
                z = self._bias(layer, z)
            u0s.append(z)
        consts = [values[id(t)] for t in p.rest_consts]
        nonzero = tf.reduce_any(tf.not_equal(a, 0), axis=list(range(1, len(a.shape) - 1)))
        return t1s, u0s, consts, nonzero

    # -- the steps

    def _update(self, us: list, t1s: list, t0s: list, channel: tf.Tensor, live: tf.Tensor) -> list:
        """Frontier pre-activations after removing ``channel`` (unchanged if ``live == 0``):
        each frontier applied to that channel's change alone, subtracted."""
        p = self.plan
        out = []
        for frontier, u in zip(p.frontier_list, us, strict=True):
            layer = frontier.layer
            for piece in frontier.pieces:
                if piece.kind != "p":
                    continue
                i = p.t1_index[id(piece.tensor)]
                if frontier.kind == "conv":
                    index = tf.reshape(channel, [1])
                    delta = (
                        tf.gather(t1s[i], index, axis=-1) - tf.gather(t0s[i], index, axis=-1)
                    ) * live  # [n, h, w, 1]
                    kernel = tf.gather(layer.kernel, index, axis=2)  # [kh, kw, 1, Cout]
                    u = u - layer.convolution_op(delta, tf.cast(kernel, delta.dtype))
                else:
                    columns = self.columns[id(piece.tensor)][channel]  # [S]
                    n = tf.shape(t1s[i])[0]
                    delta = (
                        tf.gather(tf.reshape(t1s[i], [n, -1]), columns, axis=1)
                        - tf.gather(tf.reshape(t0s[i], [1, -1]), columns, axis=1)
                    ) * live
                    kernel = tf.gather(layer.kernel[piece.start : piece.stop], columns)  # [S, D]
                    u = u - tf.matmul(delta, tf.cast(kernel, delta.dtype))  # [n, D]
            out.append(u)
        return out

    def _rest(
        self, rows: tf.Tensor, zs: list, t1s: list, t0s: list, active: tf.Tensor, consts: list
    ) -> tf.Tensor:
        """int32 arg-max predictions ``[R]`` of the samples ``rows`` under the masks
        ``active`` ``[R, C]``, given their frontier pre-activations ``zs`` (``[R, ...]``)."""
        p = self.plan
        values: dict[int, Any] = {}
        const_index = {id(t): i for i, t in enumerate(p.rest_consts)}
        frontier_index = {id(f.node): i for i, f in enumerate(p.frontier_list)}

        def value(t: Any) -> tf.Tensor:
            key = id(t)
            if key not in values:
                kind = p.kinds[key]
                if kind == "const":
                    values[key] = tf.gather(consts[const_index[key]], rows)
                elif kind == "p":
                    i = p.t1_index[key]
                    values[key] = tf.where(self._active(t, active), tf.gather(t1s[i], rows), t0s[i])
                else:
                    raise AssertionError(f"tensor {t.name} evaluated before its producer")
            return values[key]

        for node in p.rest_nodes:
            frontier = p.frontiers.get(id(node))
            if frontier is None:
                inputs = {id(t): value(t) for t in node.inputs}
                outputs = node.run(inputs)
            else:
                z = zs[frontier_index[id(node)]]
                for piece in frontier.pieces:
                    if piece.kind == "dyn":
                        z = z + self._dense_pre(
                            frontier.layer, value(piece.tensor), piece.start, piece.stop
                        )
                outputs = [self._finish(frontier.layer, z)]
            for t, v in zip(node.outputs, outputs, strict=True):
                values[id(t)] = v
        return tf.argmax(value(p.output), axis=-1, output_type=tf.int32)

    def run(self, group: int, *args) -> tf.Tensor:
        """:meth:`_run` with ``group`` steps per loop iteration (one trace per group size)."""
        fn = self._run_fns.get(group)
        if fn is None:
            fn = tf.function(
                functools.partial(self._run, group),
                autograph=False,
                input_signature=self._run_specs,
            )
            fn.get_concrete_function()  # see __init__: not counted as retracing
            self._run_fns[group] = fn
        return fn(*args)

    def _run(
        self, group: int, us, t1s, t0s, consts, channels, live, active, splits, rows, row_steps
    ):
        """All steps of one chunk in one graph, ``group`` steps per loop iteration.

        Step ``b`` predicts the samples ``rows[splits[b]:splits[b + 1]]`` (those it can
        change; ``row_steps`` gives each row's step) under mask ``active[b]`` ``[C]``; with
        frontier layers it first removes ``channels[b]`` (unless ``live[b] == 0``) from the
        running pre-activations.  Only those (``[n, ...]`` per frontier) stay alive from one
        step to the next, so memory does not grow with the number of steps.  The rows of a
        group's steps go through the layers after the frontier as one batch, which makes the
        matrix products larger and the loop shorter.  The number of steps must be a multiple of
        ``group`` (pad with no-op steps: ``live = 0`` and no rows).

        Returns the int32 predictions of every listed row, in order.
        """
        groups = tf.shape(channels)[0] // group
        labels = tf.TensorArray(tf.int32, size=groups, infer_shape=False, element_shape=[None])

        def body(g, us, labels):
            first = g * group
            parts: list[list[tf.Tensor]] = [[] for _ in us]
            for j in range(group):
                step = first + j
                if us:
                    us = self._update(us, t1s, t0s, channels[step], live[step])
                    selected = rows[splits[step] : splits[step + 1]]
                    for part, u in zip(parts, us, strict=True):
                        part.append(tf.gather(u, selected))
            lo, hi = splits[first], splits[first + group]
            zs = [tf.concat(part, 0) for part in parts]
            masks = tf.gather(active, row_steps[lo:hi])  # [R, C]
            labels = labels.write(g, self._rest(rows[lo:hi], zs, t1s, t0s, masks, consts))
            return g + 1, us, labels

        _, _, labels = tf.while_loop(
            lambda g, us, labels: g < groups, body, [tf.constant(0), list(us), labels]
        )
        return labels.concat()


#: model -> {(layer name, id(layer)): engine}.  Weakly keyed, so an entry lives exactly as long
#: as its model; nothing is stored on the model (it is not Keras state and never saved).  An
#: engine reads the layers' variables (weights, mask) when it runs, so changing them never
#: makes it stale; it holds no strong reference to the model (see ``_Plan.__init__``), which
#: would keep the key alive for ever.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model: keras.Model, layer: MaskedLayerMixin) -> _Engine:
    """The cached engine of (model, layer): tracing once makes repeated curves cheap."""
    cache = _ENGINES.setdefault(model, {})
    key = (layer.name, id(layer))
    if key not in cache:
        cache[key] = _Engine(_Plan(model, layer))
    return cache[key]


def cached_engines(model: keras.Model) -> int:
    """How many engines are cached for ``model`` (for tests and diagnostics)."""
    return len(_ENGINES.get(model, {}))
