"""EPIC-KITCHENS-100 action anticipation (tau_a = 1 s), the paper's main setting.

Seed hyper-parameters (CLAM supplement): AdamW, 50 epochs, lr 5e-4, batch 256, 32 s observation,
D = 1024, 4 processor layers. Choices (marked in DESIGN.md, overridable from the command line):
- the observation is sampled at 4 fps (128 frames, one every 0.25 s, RULSTM's step), so the last
  N = 16 act-tokens cover the final 4 s and the memory carries the 28 s before them;
- TSN RGB features (RULSTM LMDB, 1024-d); for flow / obj add the same {name: dim} entry to both
  model.modalities and data.modalities;
- the paths below are relative to the working directory: data/ek100/annotations holds the
  epic-kitchens-100-annotations CSVs plus RULSTM's actions.csv; EPIC_100_train.csv may be replaced
  by RULSTM's training.csv (--config.data.annotations.train=...);
- 5 warm-up epochs then cosine decay to 0, weight decay 0.05 on matrices, global-norm clipping at 1
  (QueryMamba, same authors, clips at 1 and warms up for 5 epochs);
- past (observed-frame) loss weight 1, no label smoothing.

    python train.py --config configs/ek100.py --workdir runs/ek100 --config.optimizer.lr=1e-4
"""

import ml_collections


def get_config():
  """The EK100 config; every field can be overridden with --config.<path>=<value>."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      modalities={"rgb": 1024},
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
      future_queries=1,
      predictor_layers=2,
      predictor_heads=8,
      heads={"verb": 97, "noun": 300, "action": 3806},
  ))

  annotations = "data/ek100/annotations"  # epic-kitchens-100-annotations + RULSTM actions.csv
  config.data = ml_collections.ConfigDict(dict(
      name="ek100",
      root="data/ek100/rulstm_features",  # <root>/rgb/data.mdb (RULSTM TSN LMDBs)
      annotations=dict(
          train=f"{annotations}/EPIC_100_train.csv",  # or RULSTM's training.csv
          validation=f"{annotations}/EPIC_100_validation.csv",
          actions=f"{annotations}/actions.csv",
          verb_classes=f"{annotations}/EPIC_100_verb_classes.csv",
          noun_classes=f"{annotations}/EPIC_100_noun_classes.csv"),
      modalities={"rgb": 1024},
      obs_seconds=32.0,
      fps=4.0,
      anticipation_seconds=1.0,
      batch_size=256,
      num_workers=8,
      seed=0,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-4, weight_decay=0.05, warmup_epochs=5.0, clip_norm=1.0, b1=0.9, b2=0.999))
  config.loss = ml_collections.ConfigDict(dict(
      weights={"verb": 1.0, "noun": 1.0, "action": 1.0}, past_loss_weight=1.0,
      label_smoothing=0.0))
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=50, log_every_steps=50, eval_every_epochs=1.0, checkpoint_every_epochs=1.0,
      keep=1,
      # NaN/Inf loss or gradient: "stop" (exit naming the step and batch) or "skip" the step.
      on_nonfinite="stop"))
  config.eval = ml_collections.ConfigDict(dict(
      split="validation", batch_size=256, best_metric="overall/action", best_mode="max",
      subsets_dir=annotations))  # EPIC_100_unseen_participant_ids_*, EPIC_100_tail_*
  return config
