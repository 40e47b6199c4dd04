"""Streams one recorded video through a trained CLAM, frame by frame, as live video would arrive.

Usage:
  python stream.py --config configs/demo.py --workdir runs/demo [--video VIDEO_ID] [--checkpoint=last]
                   [--kernels=fused]

Restores a checkpoint as evaluate.py does, reads one video of config.eval.split (EK100 layout:
ek100 and the synthetic demo; default: the split's first video) at config.data.fps from its first
frame to the end of its last annotated segment, and runs the jit-compiled streaming step
(clam_jax.streaming; --kernels=fused: its fused Pallas kernels) on one frame at a time, its
state a fixed-size pytree whatever the video's length. Prints, for each annotated segment, the 5
most probable actions anticipated at its observation end (anticipation_seconds before it starts)
next to the true action, then the per-frame latency. Writes WORKDIR/stream/<video>.npz (times
(n,), probabilities/<head> (n, C): the anticipated distribution after every frame), <video>.json
(the segments and latency summary) and <video>.png (the probability of the upcoming action
over time, and the per-frame latency). Errors (no checkpoint, a model that does not match the
config, an unknown video, unreadable features) exit with status 1 and one line; --verbosity=1
adds the traceback.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np

from clam_jax import replay
from clam_jax import train_lib

_CONFIG, _WORKDIR, _CHECKPOINT = train_lib.define_saved_run_flags()
_VIDEO = flags.DEFINE_string("video", None, "A video id of config.eval.split (default: its first).")
_KERNELS = flags.DEFINE_enum(
    "kernels", "xla", replay.KERNELS,
    "xla: streaming.stream_step (any config); fused: the step in fused Pallas kernels "
    "(clam_jax/fused_streaming.py: the Mamba processor and a power-of-two number of memory "
    "tokens, as every config in configs/; 1.71x faster per frame than xla on an H100, EK100; off "
    "GPU it runs in Pallas interpret mode, slowly).")


def main(argv):
  result = train_lib.run_command(
      argv, lambda: replay.stream_video(_CONFIG.value, _WORKDIR.value, _VIDEO.value,
                                        _CHECKPOINT.value, _KERNELS.value),
      errors=train_lib.USER_ERRORS + (ValueError,))
  video, segments, latency = result["video_id"], result["segments"], result["latency_ms"]
  print(f"video {video}: {len(result['times'])} frames at {_CONFIG.value.data.fps:g} fps, "
        f"checkpoint step {result['step']}")
  for segment in segments:
    seen = (f"after frame {segment['frame'] + 1}: top-5 {segment['top5']}" if segment["frame"] >= 0
            else "before the first frame: no anticipation")
    print(f"  {segment['narration_id']} (starts {segment['start']:.2f} s, action "
          f"{segment['action']}) {seen}{'  HIT' if segment['hit'] else ''}")
  steady = latency[1:] if len(latency) > 1 else latency
  summary = dict(video_id=video, step=result["step"], frames=len(result["times"]),
                 hits=sum(s["hit"] for s in segments), segments=segments,
                 first_step_ms=float(latency[0]), median_step_ms=float(np.median(steady)),
                 p90_step_ms=float(np.percentile(steady, 90)))
  print(f"top-5 hits: {summary['hits']} of {len(segments)} segments; per frame: median "
        f"{summary['median_step_ms']:.3f} ms, p90 {summary['p90_step_ms']:.3f} ms (first, "
        f"compiling: {summary['first_step_ms']:.0f} ms)")
  out = os.path.join(_WORKDIR.value, "stream")
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, f"{video}.npz"), times=result["times"],
           **{f"probabilities/{head}": p for head, p in result["probabilities"].items()})
  with open(os.path.join(out, f"{video}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  replay.plot(result, _CONFIG.value.data.anticipation_seconds, os.path.join(out, f"{video}.png"))
  print(f"wrote {out}/{video}.npz, .json and .png")


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.parse_flags)
