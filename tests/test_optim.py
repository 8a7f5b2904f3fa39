"""train/optim.py: one optimizer object per distinct setting, updating as optax built by hand does."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from satsynth_jax.train import optim


def _section(**kw):
  t = dict(optimizer="adamw", lr=1e-3, schedule="poly", num_steps=100, warmup_steps=10, weight_decay=1e-2,
           grad_clip=1.0)
  return ml_collections.ConfigDict({**t, **kw})


def test_equal_settings_give_the_same_objects():
  tx, schedule = optim.make_optimizer(_section())
  assert optim.make_optimizer(_section()) == (tx, schedule)  # another ConfigDict, equal values
  assert optim.make_optimizer(_section(lr=2e-3))[0] is not tx
  assert optim.learning_rate_schedule(_section()) is schedule


def test_updates_match_optax_built_by_hand():
  t = _section()
  schedule = optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps),
                                   optax.polynomial_schedule(t.lr, 0.0, power=0.9,
                                                             transition_steps=t.num_steps - t.warmup_steps)],
                                  [t.warmup_steps])
  plain = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                      optax.adamw(schedule, weight_decay=t.weight_decay,
                                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  ours, ours_schedule = optim.make_optimizer(t)
  params = {"kernel": jnp.ones((3, 2)), "bias": jnp.full((2,), 0.5)}
  grads = {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.array([1.0, -2.0])}
  states = [plain.init(params), ours.init(params)]
  for _ in range(12):  # through the warm-up into the decay
    (u_plain, states[0]), (u_ours, states[1]) = plain.update(grads, states[0], params), ours.update(
        grads, states[1], params)
    jax.tree.map(np.testing.assert_array_equal, u_ours, u_plain)
  for step in (0, 5, 10, 60, 100):
    assert ours_schedule(step) == schedule(step)
