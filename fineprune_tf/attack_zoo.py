"""The field's poisoning attacks by name: one registry to loop tasks x attacks x seeds over.

>>> poisoning = attack_zoo.make("wanet", task_data, poison_rate=0.1, seed=0)
>>> result = attack_zoo.train(poisoning, task_data, seed=0)      # an attacks.AttackResult

=========  ===========================================  =====================================
name       trigger                                      label policy
=========  ===========================================  =====================================
badnets    the paper's per-task trigger (sunglasses,    the paper's per-task policy
           speech noise, post-it, MNIST pattern)        (``poison.default_attack``)
blended    :class:`~fineprune_tf.triggers.Blended`      all-to-one, target 0
sig        :class:`~fineprune_tf.triggers.SIG`          clean-label, target 0
wanet      :class:`~fineprune_tf.triggers.WaNet`        all-to-one, target 0 (+ noise mode)
=========  ===========================================  =====================================

``poison_rate`` is the number of poisoned copies added to the attacker's training split as a
fraction of its size (the toolkit's attacker *adds* data, §2.2). It is capped at the inputs
the policy may poison: SIG poisons only the target class, so at most ``1/K`` of a balanced
set (10 % on mnist and speech, 33 % on traffic, 2.5 % on the 40-identity face set); the
recipe records the ``effective_rate``. The new attacks use BackdoorBench's all-to-one target
0 on every task; BadNets keeps the paper's policy per task (untargeted on traffic, all-to-all
on speech), so its ASR is the paper's measure for that task.

Speech (standardised 32x13 MFCC maps, rows = time frames, columns = coefficients) gets every
attack as a feature-space analogue: Blended mixes a fixed noise key in feature units; SIG
runs its sinusoid along *time* (a periodic modulation of every coefficient, like a tremolo)
rather than across the 13 coefficients; WaNet warps time (a local tempo change) and the
coefficient axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fineprune_tf import poison, triggers

__all__ = ["NAMES", "Poisoning", "make", "train", "from_dict"]

NAMES: tuple[str, ...] = ("badnets", "blended", "sig", "wanet")


@dataclasses.dataclass(frozen=True)
class Poisoning:
    """One attack on one task, ready for :func:`fineprune_tf.attacks.baseline`.

    Attributes:
      name: a :data:`NAMES` entry.
      task: the task it was made for.
      trigger, policy: the trigger and label policy.
      count: poisoned copies for the *full* training split (the attack scales it to the
        attacker's share of it); ``poison_rate``: the rate asked for; ``effective_rate``:
        ``count / len(train)`` after the cap.
      epochs: attack-specific training epochs (``None``: the task's default).
    """

    name: str
    task: str
    trigger: triggers.Trigger
    policy: poison.LabelPolicy
    count: int
    poison_rate: float
    effective_rate: float
    epochs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the trigger and policy as ``{"class", "config"}``."""
        return {
            "name": self.name,
            "task": self.task,
            "trigger": triggers.to_dict(self.trigger),
            "policy": poison.policy_to_dict(self.policy),
            "count": self.count,
            "poison_rate": self.poison_rate,
            "effective_rate": self.effective_rate,
            "epochs": self.epochs,
        }


def from_dict(data: dict[str, Any]) -> Poisoning:
    """Inverse of :meth:`Poisoning.to_dict`."""
    values = dict(data)
    values["trigger"] = triggers.from_dict(values["trigger"])
    values["policy"] = poison.policy_from_dict(values["policy"])
    return Poisoning(**values)


def _trigger(name: str, task: str, seed: int) -> triggers.Trigger:
    speech = task == "speech"  # standardised, unbounded features
    if name == "blended":
        if speech:
            return triggers.Blended(alpha=0.2, seed=seed, pattern_range=(-2.0, 2.0), clip=None)
        return triggers.Blended(alpha=0.2, seed=seed)
    if name == "sig":
        if speech:
            return triggers.SIG(delta=1.0, frequency=4.0, axis="rows", clip=None)
        return triggers.SIG()
    if name == "wanet":
        return triggers.WaNet(seed=seed)
    raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(NAMES)}")


def make(
    name: str, task_data, poison_rate: float = 0.1, seed: int = 0, epochs: int | None = None
) -> Poisoning:
    """The attack ``name`` on ``task_data`` at ``poison_rate`` (a fraction in ``(0, 1]``).

    ``epochs`` lets the attacker train longer than the task's default (she controls
    training, §2.2); ``None`` keeps the default, as every measured row in attacks.md does.
    """
    if name not in NAMES:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(NAMES)}")
    if not 0.0 < poison_rate <= 1.0:
        raise ValueError(f"poison_rate must be in (0, 1]. Received: poison_rate={poison_rate!r}")
    task = task_data.task
    train_y = np.asarray(task_data.train.y)
    if name == "badnets":
        trigger, policy, _ = poison.default_attack(task, task_data, seed=seed)
    else:
        trigger = _trigger(name, task, seed)
        policy = poison.CleanLabel(0) if name == "sig" else poison.AllToOne(0)
    eligible = int(policy.eligible(train_y).sum())
    count = min(int(round(poison_rate * len(train_y))), eligible)
    if count < 1:
        raise ValueError(
            f"{name} on {task}: poison_rate={poison_rate} poisons no input "
            f"({eligible} eligible of {len(train_y)})"
        )
    return Poisoning(
        name, task, trigger, policy, count, float(poison_rate), count / len(train_y), epochs
    )


def train(poisoning: Poisoning, task_data, seed: int = 0, settings=None):
    """Trains the task's network on ``poisoning``; returns an ``attacks.AttackResult``.

    ``settings`` (``attacks.AttackSettings``) override the defaults; their ``seed`` is
    replaced by ``seed`` and their ``epochs`` (when unset) by the poisoning's.
    """
    from fineprune_tf import attacks  # keeps this module importable without TensorFlow

    settings = dataclasses.replace(settings or attacks.AttackSettings(), seed=seed)
    if settings.epochs is None and poisoning.epochs is not None:
        settings = dataclasses.replace(settings, epochs=poisoning.epochs)
    result = attacks.baseline(
        task_data, poisoning.trigger, poisoning.policy, poisoning.count, settings=settings
    )
    result.attack = poisoning.name
    result.report["poisoning"] = poisoning.to_dict()
    return result
