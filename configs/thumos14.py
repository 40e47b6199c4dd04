"""THUMOS'14 online action detection and anticipation (LSTR/TeSTra feature layout, 4 fps).

Seed hyper-parameters (CLAM supplement): AdamW, 40 epochs, lr 1e-4, whole videos as one batch.
Choices:
- features: TSN ResNet-50 RGB (2048) and BN-Inception flow (1024) at 4 steps per second, as
  LSTR/TeSTra release them; each projected to D and summed;
- one "action" head over the 22 columns of target_perframe (background, 20 actions, ambiguous);
  8 future queries = the anticipation horizons 0.25 .. 2 s;
- "whole videos as one batch" read as one whole video (window None) per step, batch_size 1;
- 4 warm-up epochs then cosine decay, weight decay 0.05, clipping at 1.
The data fields are Thumos14Source's (clam_jax/data/thumos14.py). The training pipeline
(clam_jax/data/pipeline.py) does not read THUMOS yet: train.py stops with a one-line error naming
data.name. The metrics are per-frame mAP and anticipation mAP (clam_jax.metrics).
"""

import ml_collections


def get_config():
  """The THUMOS'14 config (fields as configs/ek100.py)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      modalities={"rgb": 2048, "flow": 1024},
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
      future_queries=8,
      predictor_layers=2,
      predictor_heads=8,
      heads={"action": 22},
  ))

  root = "data/thumos14"
  config.data = ml_collections.ConfigDict(dict(
      name="thumos14",
      root=root,  # rgb_kinetics_resnet50/, flow_kinetics_bninception/, target_perframe/
      data_info=f"{root}/data_info.json",
      modalities={"rgb": 2048, "flow": 1024},
      window=ml_collections.FieldReference(None, field_type=int),  # None: whole videos
      future_steps=8,
      batch_size=1,
      num_workers=4,
      seed=0,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=0.05, warmup_epochs=4.0, clip_norm=1.0, b1=0.9, b2=0.999))
  config.loss = ml_collections.ConfigDict(dict(
      weights={"action": 1.0}, past_loss_weight=1.0, label_smoothing=0.0))
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=40, log_every_steps=50, eval_every_epochs=1.0, checkpoint_every_epochs=1.0,
      keep=1,
      # NaN/Inf loss or gradient: "stop" (exit naming the step and batch) or "skip" the step.
      on_nonfinite="stop"))
  config.eval = ml_collections.ConfigDict(dict(
      split="test", batch_size=1, best_metric="map/detection", best_mode="max",
      subsets_dir=""))
  return config
