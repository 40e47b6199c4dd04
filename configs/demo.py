"""The embedded demo: a tiny CLAM on the synthetic EK100-layout dataset, a few minutes on a CPU.

    python train.py --config configs/demo.py --workdir runs/demo
    python evaluate.py --config configs/demo.py --workdir runs/demo

The dataset (clam_jax/data/synthetic.py: 48 training and 16 validation videos, 1344 + 448 action
segments, 64-d "rgb" features, 7 verbs, 42 nouns, 42 actions) is generated into WORKDIR/data on the
first run, or wherever --config.data.root points. Each episode is a recipe card (the cue, 3-4 s),
then 5 steps whose items (1 of 8 each) only the card announces, then a fixed finale. For step j
the card ends at least 1.5 j - 1 s and starts at most 3.5 j + 3.5 s before the observation ends,
so the 18 s window (2 fps, 36 frames) always holds it while the last num_act_tokens = 4
act-tokens (2 s) miss it from step 2 on: the card must travel through the processor's state or
the CLAM memory. synthetic.json in the data folder holds the Bayes-optimal class-mean top-5 recall
with and without the card; benchmarks/memory_ablation.py trains this config with the memory on
and off.
"""

import ml_collections


def get_config():
  """The demo config (same fields as configs/ek100.py, small sizes)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      modalities={"rgb": 64},
      d_model=64,
      dropout=0.1,
      dtype="float32",
      processor="mamba",
      processor_layers=2,
      ssm=dict(d_state=16, d_conv=4, expand=2),
      memory=True,
      memory_tokens=8,
      memory_layers=1,
      memory_heads=4,
      memory_feature_map="identity",
      memory_normalize=False,
      gate_temperature=16.0,
      scan_impl="auto",
      num_act_tokens=4,
      act_token_selection="fifo",
      type_embeddings=True,
      future_queries=1,
      predictor_layers=1,
      predictor_heads=4,
      heads={"verb": 7, "noun": 42, "action": 42},
  ))

  config.data = ml_collections.ConfigDict(dict(
      name="synthetic",
      root="",  # empty: WORKDIR/data
      modalities={"rgb": 64},
      obs_seconds=18.0,
      fps=2.0,
      anticipation_seconds=1.0,
      batch_size=32,
      num_workers=0,
      seed=0,
      synthetic=dict(num_videos=64, num_validation_videos=16, num_recipes=1, steps_per_episode=5,
                     step_variants=8, cue_seconds=(3.0, 4.0), feature_dim=64, noise_std=0.5,
                     seed=0),
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-3, weight_decay=0.05, warmup_epochs=1.0, clip_norm=1.0, b1=0.9, b2=0.999))
  config.loss = ml_collections.ConfigDict(dict(
      weights={"verb": 1.0, "noun": 1.0, "action": 1.0}, past_loss_weight=1.0,
      label_smoothing=0.0))
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=12, log_every_steps=10, eval_every_epochs=6.0, checkpoint_every_epochs=6.0,
      keep=1,
      # NaN/Inf loss or gradient: "stop" (exit naming the step and batch) or "skip" the step.
      on_nonfinite="stop"))
  config.eval = ml_collections.ConfigDict(dict(
      split="validation", batch_size=64, best_metric="overall/action", best_mode="max",
      subsets_dir=""))
  return config
