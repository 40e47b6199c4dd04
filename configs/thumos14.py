"""THUMOS'14 online action detection and anticipation (LSTR/TeSTra feature layout, 4 fps).

Seed hyper-parameters (CLAM supplement): AdamW, 40 epochs, lr 1e-4, whole videos as one batch.
Choices:
- features: TSN ResNet-50 RGB (2048) and BN-Inception flow (1024) at 4 steps per second, as
  LSTR/TeSTra release them; each projected to D and summed;
- one "action" head over the 22 columns of target_perframe (background, 20 actions, ambiguous);
  8 future queries = the anticipation horizons 0.25 .. 2 s;
- windows of 128 steps (32 s, the paper's EK100/Ego4D observation) ending every 8 steps (2 s) of
  the training videos, 32 per batch: the seed's "whole videos as one batch" does not say how a
  video is cut, and fixed windows keep one compiled shape (and the test-time windows);
- evaluation as LSTR's: every test frame scored as the last of its own 128-step window (the last
  act-token for detection, the future queries for anticipation), every 5 epochs as it scores
  every frame of the 213 test videos;
- 4 warm-up epochs then cosine decay, weight decay 0.05, clipping at 1.
The data fields are Thumos14Source's (clam_jax/data/thumos14.py, read by
clam_jax/data/pipeline.py). The metrics (train_lib.compute_metrics) are the per-frame mAP and
calibrated mAP of online detection and of anticipation at each horizon, as fractions.
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
      window=128,
      stride=8,
      future_steps=8,  # = model.future_queries
      batch_size=32,
      num_workers=4,
      seed=0,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=0.05, warmup_epochs=4.0, clip_norm=1.0, b1=0.9, b2=0.999))
  config.loss = ml_collections.ConfigDict(dict(
      weights={"action": 1.0}, past_loss_weight=1.0, label_smoothing=0.0))
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=40, log_every_steps=50, eval_every_epochs=5.0, checkpoint_every_epochs=1.0,
      keep=1,
      # NaN/Inf loss or gradient: "stop" (exit naming the step and batch) or "skip" the step.
      on_nonfinite="stop"))
  config.eval = ml_collections.ConfigDict(dict(
      split="test", batch_size=128, best_metric="map/detection", best_mode="max",
      subsets_dir=""))
  return config
