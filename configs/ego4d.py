"""Ego4D long-term action anticipation (fho_lta): predict the next Z = 20 actions (verb, noun).

Seed hyper-parameters (CLAM supplement): AdamW, 15 epochs, lr 1e-4, batch 128, 32 s observation.
Choices, following QueryMamba (same authors, configs/ego4d/QueryMAMBA.yaml and its train script):
- features: the VideoMAE-L verb and noun models' clip features concatenated (2 x 1024 = 2048), one
  step per 16 frames at 30 fps (0.533 s), so 32 s = 60 steps;
- 20 future queries, one per future action; verb (117) and noun (521) heads of the v2 taxonomy
  (read the sizes from fho_lta_taxonomy.json: v1 has 115 / 478);
- bfloat16, gradient clipping at 1, 2 warm-up epochs then cosine decay;
- past loss on the observed steps' action labels, weight 1.
The data fields are Ego4dLtaSource's (clam_jax/data/ego4d.py, read by clam_jax/data/pipeline.py).
The metric (train_lib.compute_metrics) is edit distance @ Z for verb, noun and action
(clam_jax.metrics.ego4d_lta_metrics) of each future query's most probable class, lower is better.
"""

import ml_collections


def get_config():
  """The Ego4D LTA config (fields as configs/ek100.py)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      modalities={"videomae": 2048},
      d_model=1024,
      dropout=0.1,
      dtype="bfloat16",
      processor="mamba",
      processor_layers=4,
      ssm=dict(d_state=16, d_conv=4, expand=2),
      memory=True,
      memory_tokens=16,
      memory_layers=2,
      memory_heads=8,
      memory_feature_map="identity",
      memory_normalize=False,
      gate_temperature=16.0,
      scan_impl="auto",
      num_act_tokens=16,
      act_token_selection="fifo",
      type_embeddings=True,
      future_queries=20,
      predictor_layers=2,
      predictor_heads=8,
      heads={"verb": 117, "noun": 521},
  ))

  root = "data/ego4d"
  config.data = ml_collections.ConfigDict(dict(
      name="ego4d",
      annotation_dir=f"{root}/annotations",  # fho_lta_{train,val}.json, fho_lta_taxonomy.json
      feature_dirs=(f"{root}/videomae_vitl_ego4d_verb_clips",
                    f"{root}/videomae_vitl_ego4d_noun_clips"),
      modalities={"videomae": 2048},
      window=60,  # 32 s of 16-frame steps at 30 fps
      frame_stride=16,
      num_observed=8,
      num_future=20,
      batch_size=128,
      num_workers=8,
      seed=0,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=0.05, warmup_epochs=2.0, clip_norm=1.0, b1=0.9, b2=0.999))
  config.loss = ml_collections.ConfigDict(dict(
      weights={"verb": 1.0, "noun": 1.0}, past_loss_weight=1.0, label_smoothing=0.0))
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=15, log_every_steps=50, eval_every_epochs=1.0, checkpoint_every_epochs=1.0,
      keep=1,
      # NaN/Inf loss or gradient: "stop" (exit naming the step and batch) or "skip" the step.
      on_nonfinite="stop"))
  config.eval = ml_collections.ConfigDict(dict(
      split="val", batch_size=128, best_metric="edit_distance/action", best_mode="min",
      subsets_dir=""))
  return config
