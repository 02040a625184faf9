"""Checkpoints written before the config lost its unused ``extra`` field still load."""
import json

import numpy as np

from minifpn.models.detector import Detector, DetectorConfig
from minifpn.train import TrainConfig, detector_from_checkpoint, train


def test_a_checkpoint_with_the_old_extra_field_loads_with_the_same_weights(tmp_path):
    det = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4, anchors_per_image=8))
    train(det, TrainConfig(iterations=2, batch_size=1, checkpoint_every=2), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    meta["detector_config"]["extra"] = {}  # what every checkpoint before 2026-12 carried
    arrays["meta"] = np.array(json.dumps(meta))
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    loaded, ckpt = detector_from_checkpoint(str(old))
    assert ckpt["meta"]["detector_config"]["extra"] == {}
    assert loaded.config == det.config
    for (name, a), (_, b) in zip(det.state_dict().items(), loaded.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
