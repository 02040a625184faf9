"""``python train_run.py OUT MODE`` (under ``mpiexec -n N`` or alone): a tiny detector trained on a
global batch of 4 scenes into OUT, 8 steps (MODE full), the first 4 of those 8 (half), or the rest of
a half run in OUT (resume). Rank 0 writes OUT/history.json and OUT/weights.npz."""
import json
import os
import sys

import numpy as np

from minifpn.models.detector import Detector, DetectorConfig
from minifpn.parallel import world
from minifpn.train import TrainConfig, train


class Stop(Exception):
    pass


def stop_at_4(iteration, path):
    if iteration == 4:
        raise Stop


out, mode = sys.argv[1], sys.argv[2]
detector = Detector(DetectorConfig(widths=(4, 8, 8, 16), channels=8, anchors_per_image=64))
config = TrainConfig(iterations=8, batch_size=4, lr=0.01, warmup=2, checkpoint_every=4,
                     scenes={"canvas": 64, "max_size": 40, "max_objects": 3})
try:
    history = train(detector, config, out, progress=False, log=lambda *_: None, resume=mode == "resume",
                    after_checkpoint=stop_at_4 if mode == "half" else None)
except Stop:
    history = None
if world().rank == 0 and history is not None:
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history, f)
    np.savez(os.path.join(out, "weights.npz"), **detector.state_dict())
