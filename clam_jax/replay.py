"""A recorded video through the streaming step, frame by frame, as a live camera would feed it.

    result = replay.stream_video(config, workdir, video_id=None, checkpoint="best")

The video's features (EK100 layout: ek100 and the synthetic demo) are read at config.data.fps from
its first frame to the end of its last annotated segment and fed one frame at a time to the
jit-compiled stream_step (clam_jax.streaming, weights prepared once in the compute dtype), or its
fused Pallas kernels (clam_jax.fused_streaming; kernels="fused"). The model sees the whole video
so far (its memory from frame 1), unlike evaluation's windows of obs_seconds; at each annotated
segment the anticipation read is the one made at the segment's observation end (start -
anticipation_seconds).
"""

import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from clam_jax import fused_streaming
from clam_jax import streaming
from clam_jax import train_lib
from clam_jax.data import pipeline

STREAMABLE = ("ek100", "synthetic")
KERNELS = ("xla", "fused")


def make_streamer(model_config, params, kernels="xla"):
  """The streaming step of one stream: (prepared weights, jitted step(prepared, state, frame) ->
  (state, out), state donated). kernels: "xla" (streaming.stream_step, any config) or "fused"
  (fused_streaming's Pallas kernels: batch 1, the configs check_fused_config accepts; off GPU
  they run in Pallas interpret mode, slowly). Raises ValueError naming an unknown kernels value or
  the config field the fused kernels do not support."""
  if kernels == "xla":
    return (streaming.prepare_stream_params(params, model_config, cast=True),
            jax.jit(streaming.make_stream_step(model_config), donate_argnums=1))
  if kernels == "fused":
    return (fused_streaming.prepare_fused_params(params, model_config),
            jax.jit(fused_streaming.make_fused_stream_step(model_config), donate_argnums=1))
  raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def stream_video(config, workdir, video_id=None, checkpoint="best", kernels="xla"):
  """Streams one video of config.eval.split through a checkpoint of workdir.

  video_id: a video of the split's annotations (default: the first); kernels: make_streamer's.
  Returns {"step": checkpoint step, "video_id", "times": (n,) float64 seconds of the frames,
  "probabilities": {head: (n, C) float32, the first future query's softmax after each frame},
  "segments": [{"narration_id", "start", "frame" (index of its observation end; -1: before the
  first frame), "action", "top5": the 5 most probable actions there, "hit"}], "latency_ms": (n,)
  per step, each blocked on (the first includes the compilation)}.
  Raises ValueError (data.name not streamable, unknown video_id, make_streamer's) and
  train_lib.load_checkpoint's errors.
  """
  if config.data.name not in STREAMABLE:
    raise ValueError(f"streaming a recorded video needs the EK100 layout, data.name in "
                     f"{STREAMABLE}; found {config.data.name!r}")
  train_lib.check_config(config)
  step, params = train_lib.load_checkpoint(config, workdir, checkpoint)
  source = pipeline.make_source(config.data, config.eval.split)
  ann = source.annotations
  videos = list(dict.fromkeys(ann.video_id))  # in annotation order
  video_id = videos[0] if video_id is None else video_id
  if video_id not in videos:
    raise ValueError(f"video {video_id!r} is not in the {config.eval.split} annotations "
                     f"({ann.path}); its videos: {', '.join(videos[:10])}"
                     f"{' ...' if len(videos) > 10 else ''}")
  rows = np.flatnonzero(ann.video_id == video_id)
  fps = config.data.fps
  times = np.arange(1, int(np.floor(ann.stop[rows].max() * fps)) + 1) / fps
  features, _ = source.video_features(video_id, times)

  # One stream on one device (the restored params are replicated over all local devices).
  params = jax.device_put(jax.device_get(params), jax.devices()[0])
  prepared, stream_step = make_streamer(config.model, params, kernels)
  state = streaming.init_stream_state(config.model, 1)
  probabilities = {head: [] for head in config.model.heads}
  latency = []
  for t in range(len(times)):
    frame = {name: x[t][None] for name, x in features.items()}
    start = time.perf_counter()
    state, out = stream_step(prepared, state, frame)
    future = jax.block_until_ready(out["future"])
    latency.append(1e3 * (time.perf_counter() - start))
    for head, logits in future.items():
      probabilities[head].append(np.asarray(jax.nn.softmax(logits[0, 0])))
  probabilities = {head: np.stack(p) for head, p in probabilities.items()}
  segments = []
  for row in rows:
    frame = int(np.floor((ann.start[row] - config.data.anticipation_seconds) * fps + 1e-6)) - 1
    top5 = (np.argsort(-probabilities["action"][frame])[:5].tolist() if frame >= 0 else [])
    segments.append(dict(narration_id=str(ann.narration_id[row]), start=float(ann.start[row]),
                         frame=frame, action=int(ann.action[row]), top5=top5,
                         hit=int(ann.action[row]) in top5))
  return dict(step=step, video_id=video_id, times=times, probabilities=probabilities,
              segments=segments, latency_ms=np.array(latency))


def plot(result, anticipation_seconds, path):
  """Writes a PNG of a stream_video result: after every frame t, the probability given to the
  action of the next segment starting at least anticipation_seconds later (what the model should
  anticipate then) and the top-1 probability, with each segment's start (dotted) and its
  observation-end read-out (green: in the top-5, red: not); below, the latency of every step."""
  times, probabilities = result["times"], result["probabilities"]["action"]
  segments = result["segments"]
  starts = np.array([s["start"] for s in segments])
  actions = np.array([s["action"] for s in segments])
  upcoming = np.searchsorted(starts, times + anticipation_seconds - 1e-6)
  ahead = upcoming < len(segments)
  target = np.full(len(times), np.nan)
  target[ahead] = probabilities[np.flatnonzero(ahead), actions[upcoming[ahead]]]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True,
                                    gridspec_kw=dict(height_ratios=(3, 1)))
  top.plot(times, target, label="p(next action)")
  top.plot(times, probabilities.max(axis=1), color="0.6", linewidth=0.8, label="top-1 p")
  for segment in segments:
    top.axvline(segment["start"], color="0.8", linestyle=":", linewidth=0.8)
    if segment["frame"] >= 0:
      t = times[segment["frame"]]
      top.plot(t, probabilities[segment["frame"], segment["action"]], "o",
               color="tab:green" if segment["hit"] else "tab:red", markersize=4)
  top.set(ylabel="probability", ylim=(0, 1),
          title=f"{result['video_id']}: {sum(s['hit'] for s in segments)} of {len(segments)} "
                f"segments anticipated in the top-5 (step {result['step']})")
  top.legend(fontsize="small", loc="upper right")
  bottom.semilogy(times, result["latency_ms"], linewidth=0.8)
  bottom.set(xlabel="video time (s)", ylabel="step (ms)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
