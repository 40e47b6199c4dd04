"""The CLAM model: output shapes of every variant, act-token selection, input errors, it learns."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clam_jax.model import CLAM, check_config, select_act_tokens
from helpers import MODALITIES, model_config


def _inputs(rng, b, t, modalities=MODALITIES):
  features = {name: rng.standard_normal((b, t, dim)).astype(np.float32)
              for name, dim in modalities.items()}
  return features, np.ones((b, t), bool)


def _abstract_outputs(config, b, t):
  """(param shapes, output shapes) of the model on a (b, t) window, by tracing only."""
  model = CLAM(config)
  features, mask = _inputs(np.random.default_rng(), b, t, dict(config.modalities))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             features, mask)
  outputs = jax.eval_shape(
      lambda v: model.apply(v, features, mask, train=True, rngs={"dropout": jax.random.key(1)}),
      variables)
  return variables["params"], outputs


@pytest.mark.parametrize("overrides, t", [
    (dict(), 9),
    (dict(memory=False), 9),
    (dict(type_embeddings=False), 3),
    (dict(act_token_selection="uniform", future_queries=1), 13),
    (dict(heads={"action": 13}, modalities={"obj": 5}, processor="gru"), 2),
])
def test_output_shapes(overrides, t):
  config = model_config(**overrides)
  params, outputs = _abstract_outputs(config, 2, t)
  assert set(outputs) == {"future", "past"}
  for head, classes in config.heads.items():
    assert outputs["future"][head].shape == (2, config.future_queries, classes)
    assert outputs["past"][head].shape == (2, t, classes)
    assert outputs["future"][head].dtype == outputs["past"][head].dtype == jnp.float32
  assert ("memory" in params) == config.memory
  assert ("act_type" in params["predictor"]) == config.type_embeddings
  assert ("memory_type" in params["predictor"]) == (config.type_embeddings and config.memory)
  assert set(params) >= {f"projections_{m}" for m in config.modalities}
  if config.memory:
    assert params["memory"]["queries"].shape == (4, 32)


def test_bfloat16_compute_float32_params_and_logits():
  params, outputs = _abstract_outputs(model_config(dtype="bfloat16"), 2, 6)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}


def test_fifo_keeps_the_last_tokens_and_pads_short_windows():
  tokens = np.random.default_rng().standard_normal((2, 7, 3)).astype(np.float32)
  mask = np.arange(7)[None] >= np.array([[0], [4]])
  selected, selected_mask = select_act_tokens(tokens, mask, 4, "fifo")
  np.testing.assert_array_equal(selected, tokens[:, 3:])
  np.testing.assert_array_equal(selected_mask, [[1, 1, 1, 1], [0, 1, 1, 1]])
  selected, selected_mask = select_act_tokens(tokens[:, :2], mask[:, :2], 4, "fifo")
  np.testing.assert_array_equal(selected[:, 2:], tokens[:, :2])
  np.testing.assert_array_equal(selected[:, :2], 0)
  np.testing.assert_array_equal(selected_mask, [[0, 0, 1, 1], [0, 0, 0, 0]])


def test_uniform_spreads_over_the_real_frames_of_each_window():
  n_real = np.array([12, 6, 3])
  tokens = np.random.default_rng().standard_normal((3, 12, 2)).astype(np.float32)
  mask = np.arange(12)[None] >= 12 - n_real[:, None]
  selected, selected_mask = select_act_tokens(tokens, mask, 4, "uniform")
  # 12 real: every third frame ending with the last; 6 real (left-padded by 6): frames
  # 6 + floor((j + 1) * 6 / 4) - 1; 3 real (< 4 tokens): the last 4 frames, as fifo.
  np.testing.assert_array_equal(selected[0], tokens[0, [2, 5, 8, 11]])
  np.testing.assert_array_equal(selected[1], tokens[1, [6, 8, 9, 11]])
  np.testing.assert_array_equal(selected[2], tokens[2, [8, 9, 10, 11]])
  np.testing.assert_array_equal(selected_mask, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
  # Left padding does not move the choice: window 1 unpadded selects the same frames.
  unpadded, _ = select_act_tokens(tokens[1:2, 6:], mask[1:2, 6:], 4, "uniform")
  np.testing.assert_array_equal(unpadded[0], selected[1])


@pytest.mark.parametrize("change, message", [
    (lambda f, m: ({"rgb": f["rgb"][..., :12], "flow": f["flow"]}, m),
     "modality 'rgb' has feature dim 12, config.model.modalities.rgb expects 20"),
    (lambda f, m: ({"rgb": f["rgb"]}, m), "modalities \\['flow', 'rgb'\\], found \\['rgb'\\]"),
    (lambda f, m: ({"rgb": f["rgb"][0], "flow": f["flow"][0]}, m), "'flow'\\] must have rank 3"),
    (lambda f, m: (f, m[:, 1:]), "mask must be bool of shape \\(B, T\\) = \\(2, 5\\)"),
    (lambda f, m: (f, m.astype(np.float32)), "mask must be bool.*float32"),
    (lambda f, m: ({k: x[:0] for k, x in f.items()}, m[:0]),
     r"'flow'\] must hold B >= 1 windows or streams, found shape \(0, 5, 6\)"),
])
def test_input_errors_say_what_was_expected(change, message):
  features, mask = change(*_inputs(np.random.default_rng(), 2, 5))
  model = CLAM(model_config())
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), features, mask)


def test_config_error_names_the_field():
  features, mask = _inputs(np.random.default_rng(), 1, 3)
  model = CLAM(model_config(act_token_selection="random"))
  with pytest.raises(ValueError, match="act_token_selection.*'random'"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), features, mask)


def test_learns_a_cue_many_frames_back():
  # The label is shown (as a class embedding in noise) only at frame 3 of 12; the predictor sees
  # the last 3 act-tokens, so the answer must travel 8 frames through the processor or the memory.
  # (GRU and no dropout: the cheapest config to compile; the others differ in parts tested apart.)
  classes, t, cue, batch, steps = 5, 12, 3, 32, 300
  config = model_config(modalities={"rgb": 8}, heads={"action": classes}, future_queries=1,
                   num_act_tokens=3, processor="gru", dropout=0.0)
  model = CLAM(config)
  embeddings = jax.random.normal(jax.random.key(0), (classes, 8))
  tx = optax.adam(3e-3)

  def sample(key):
    label_key, noise_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (batch,), 0, classes)
    cue_frame = (jnp.arange(t) == cue)[None, :, None] * 3 * embeddings[labels][:, None]
    x = jax.random.normal(noise_key, (batch, t, 8)) + cue_frame
    return {"rgb": x}, jnp.ones((batch, t), bool), labels

  def loss_fn(params, key):
    features, mask, labels = sample(key)
    logits = model.apply({"params": params}, features, mask, train=True)["future"]["action"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], labels).mean()

  def train_step(carry, key):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def train(key):
    init_key, data_key, steps_key = jax.random.split(key, 3)
    features, mask, _ = sample(data_key)
    params = model.init(init_key, features, mask, train=False)["params"]
    keys = jax.random.split(steps_key, steps)
    return jax.lax.scan(train_step, (params, tx.init(params)), keys)[1]

  losses = np.asarray(train(jax.random.key(1)))
  assert np.all(np.isfinite(losses))
  assert losses[:10].mean() > 0.8 * np.log(classes)
  assert losses[-25:].mean() < 0.2 * np.log(classes), losses[::25]




@functools.cache
def _kernel_test_model(scan_impl):
  """(model, jitted forward(params, features, mask), jitted (params, features, mask, weights) ->
  (d sum(outputs * weights) / d params["memory"], outputs)) of a tiny model whose memory runs
  scan_impl; DK = 12, which the kernels pad to 16. Only the memory's gradients are taken: all of
  them pass through the scan's backward, and the processor's backward would double the compile."""
  model = CLAM(model_config(processor="gru", d_model=24, dropout=0.0, memory_layers=1,
                       heads={"action": 13}, scan_impl=scan_impl))
  apply = lambda params, features, mask: model.apply({"params": params}, features, mask,
                                                     train=False)

  def loss(memory_params, params, features, mask, weights):
    out = apply({**params, "memory": memory_params}, features, mask)
    return sum(jnp.vdot(o, w) for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(weights))), out

  return model, jax.jit(apply), jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("scan_impl, check_grads", [("recurrent", True), ("chunked", False)])
def test_memory_kernels_give_the_reference_outputs(scan_impl, check_grads):
  # The Pallas kernels run in interpret mode here. 70 steps are a chunk of 64 and a ragged rest;
  # row 1 is left-padded by 23 frames, where the kernels must leave the state as it was.
  rng = np.random.default_rng()
  features, mask = _inputs(rng, 2, 70)
  mask[1, :23] = False
  model, _, reference = _kernel_test_model("reference")
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), features,
                          mask)["params"]
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
  weights = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                         jax.eval_shape(_kernel_test_model("reference")[1], params, features, mask))
  ref_grads, ref = reference(params["memory"], params, features, mask, weights)
  _, forward, grads = _kernel_test_model(scan_impl)
  if check_grads:
    out_grads, out = grads(params["memory"], params, features, mask, weights)
    pairs = [(out, ref), (out_grads, ref_grads)]
  else:
    pairs = [(forward(params, features, mask), ref)]
  for out, ref in pairs:
    # Some gradients are 0 in exact arithmetic (attention key biases): a tolerance relative to
    # the largest value of the tree keeps their rounding noise from failing the test.
    scale = max(np.abs(r).max() for r in jax.tree.leaves(ref))
    for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, r, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("overrides,message", [
    (dict(processor="transformer"), r"config.model.processor: expected one of .*'transformer'"),
    (dict(memory_feature_map="relu"), r"config.model.memory_feature_map: expected one of"),
])
def test_check_config_names_processor_and_memory_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    check_config(model_config(**overrides))
