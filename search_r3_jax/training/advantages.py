"""Advantage estimators for stage 2, registered by name (`rl.advantage`).

Each maps the rewards of Q queries x G rollouts, shaped [Q, G], to one
advantage per rollout of the same shape. They are written once for numpy and
jax arrays alike: the stage-2 loop calls them on the host, where the
rewards are.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from search_r3_jax.training.registry import Registry

ADVANTAGES = Registry("advantage estimator")
register = ADVANTAGES.register
get = ADVANTAGES.get


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


@register("grpo")
def group_normalized(rewards, eps: float = 1e-6):
  """GRPO: each reward minus its group's mean, over the group's standard
  deviation (population, + eps; a group of equal rewards gets 0)."""
  xp = _xp(rewards)
  r = rewards.astype(xp.float64 if xp is np else xp.float32)
  return (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)


@register("dr_grpo")
def group_centered(rewards, eps: float = 1e-6):
  """Dr. GRPO: each reward minus its group's mean, not divided by the
  spread (a group with a small spread is not blown up)."""
  del eps  # shared signature
  xp = _xp(rewards)
  r = rewards.astype(xp.float64 if xp is np else xp.float32)
  return r - r.mean(1, keepdims=True)
