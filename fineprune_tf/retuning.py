"""Post-purification robustness: the retuning attack (Min, Qin, Zhang, Shen, Cheng, NeurIPS 2024,
"Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
arXiv 2410.09838).

After a defense, the attacker (or an unlucky user) fine-tunes the purified model for a few
steps on a small set mixing a handful of poisoned inputs into clean ones. A defense that only
hid the backdoor lets the ASR come back within those few steps; a model that never learnt the
backdoor does not pick it up from so few poisoned inputs. The paper's finding is that most
purifications (fine-tuning, pruning, ...) are "superficial" in this sense.

No code accompanies the paper (we found no repository through the search tools; the
paperswithnocode entry for 2410.09838 lists none), so this follows its description: the
retuning set is a small sample of the attacker's training data, a few of them triggered and
relabelled by the attack's policy, and the purified model is fine-tuned on it as a whole
(masks of pruned channels stay as the defense left them). The defaults (200 inputs of which
10 poisoned, 30 Adam steps of 32 at 1e-3) are our choice for this toolkit's small tasks, not
the paper's CIFAR-10 settings; pass others to match a study. The purified model is never
modified: a copy is re-tuned. Test data only reports.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from fineprune_tf import metrics, poison, step_cache

__all__ = ["retuning_attack", "retuning_set"]


def retuning_set(
    task_data, trigger, policy, samples: int = 200, poisoned: int = 10, seed: int = 0
) -> poison.Split:
    """``samples`` inputs of the attacker's training split, ``poisoned`` of them replaced by
    triggered copies with the policy's labels; shuffled. x float32 ``[samples, ...]``."""
    train = task_data.train
    if not 0 < samples <= len(train.y):
        raise ValueError(f"samples must be in [1, {len(train.y)}]. Received: samples={samples}")
    if not 0 <= poisoned <= samples:
        raise ValueError(f"poisoned must be in [0, samples]. Received: poisoned={poisoned}")
    rng = np.random.default_rng([seed, 3])
    chosen = np.sort(rng.choice(len(train.y), size=samples, replace=False))
    subset = poison.Split(np.asarray(train.x)[chosen], np.asarray(train.y)[chosen])
    copies, sources = poison.make_poisoned_copies(
        subset, trigger, policy, count=poisoned, seed=seed
    )
    keep = np.ones(samples, bool)
    keep[sources] = False
    x = np.concatenate([np.asarray(subset.x, np.float32)[keep], copies.x])
    y = np.concatenate([np.asarray(subset.y, np.int64)[keep], copies.y])
    order = rng.permutation(len(y))
    return poison.Split(x[order], y[order])


def retuning_attack(
    model: keras.Model,
    task_data,
    trigger,
    policy,
    *,
    steps: int = 30,
    samples: int = 200,
    poisoned: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    before: dict | None = None,
) -> dict:
    """Re-tunes a copy of ``model`` for ``steps`` steps on a small poisoned/clean mix and
    reports the ASR that comes back.

    Args:
      model: the purified model (not modified).
      task_data: a ``TaskData``; the retuning set comes from ``train`` (the attacker's data),
        the report from ``test``.
      trigger, policy: the attack's trigger and label policy.
      steps: optimizer steps (batches of ``batch_size``, cycling over the set).
      samples, poisoned: size of the retuning set and how many of it are poisoned.
      learning_rate, optimizer: the fine-tuning optimizer (``models.make_optimizer``).
      seed: fixes the set, its order and the optimizer's randomness.
      before: the model's ``metrics.evaluate`` numbers on the test split when the caller has
        them already (skips one evaluation); None measures them.

    Returns:
      ``{"before": {clean_acc, asr, robust_acc}, "after": {...}, "asr_recovered": after -
      before ASR, "steps", "samples", "poisoned", "learning_rate", "seconds"}`` on the test
      split; ``"model"`` is not included (the re-tuned copy is dropped).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1. Received: steps={steps}")
    start = time.perf_counter()
    retune = retuning_set(task_data, trigger, policy, samples, poisoned, seed)
    test = task_data.test
    backdoor = poison.backdoor_test_set(test, trigger, policy, seed=seed)
    if before is None:
        before = metrics.evaluate(model, (test.x, test.y), backdoor)
    x, y = _cycled_batches(retune, steps * batch_size, seed)
    # A fresh copy is re-tuned (masks are weights: pruned channels stay pruned).  No XLA: one
    # short fit does not repay its compilation (measured ~3x slower on 2 cores with Keras'
    # jit_compile="auto" than without).  Inside step_cache.reuse_compiled_steps() the copy is
    # a trainer compiled once per model structure (same numbers, no new trace).
    spec = step_cache.CompileSpec(optimizer, learning_rate, metrics=(), jit_compile=False)
    _, copy = step_cache.fit(
        model,
        spec,
        seed,
        x,
        y,
        shapes=(len(y), batch_size),
        fresh_copy=True,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    after = metrics.evaluate(copy, (test.x, test.y), backdoor)
    return {
        "before": before,
        "after": after,
        "asr_recovered": after["asr"] - before["asr"],
        "steps": steps,
        "samples": samples,
        "poisoned": poisoned,
        "learning_rate": learning_rate,
        "seconds": time.perf_counter() - start,
    }


def _cycled_batches(split: poison.Split, count: int, seed: int):
    """``count`` examples of ``split``: whole shuffled passes, one new permutation per pass
    (the order of a reshuffling data loader), as numpy ``(x, y)``."""
    rng = np.random.default_rng([seed, 5])
    passes = math.ceil(count / len(split.y))
    order = np.concatenate([rng.permutation(len(split.y)) for _ in range(passes)])[:count]
    return split.x[order], split.y[order]
