"""A trial whose worker process dies mid fine-tune (SIGKILL, a real fault on embedded Ray) is
restarted by Ray Tune from its last epoch checkpoint: it continues its fine-tune and its MLflow
run, and MLflow holds it once, finished. A tampered checkpoint is refused without running it."""

import os
import pickle
import signal

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from prunetune.search.config import parse_config
from prunetune.search.runner import run_search
from prunetune.search.tracking import ROLE_TAG
from prunetune.search.trial_checkpoint import STATE_FILE, CheckpointError, read_checkpoint

EPOCHS = 3


class KillAfterFirstEpoch(tune.Callback):
    """SIGKILL the process of the first trial whose fine-tune epoch-1 checkpoint Tune has
    registered (killing at the result itself would beat the checkpoint's registration)."""

    def __init__(self):
        self.killed: dict[str, int] = {}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not self.killed and trial.last_result.get("epoch") == 1:
            self.killed[trial.trial_id] = trial.last_result["pid"]
            os.kill(trial.last_result["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_killed_trial_resumes_from_its_epoch_checkpoint(ray_local, tmp_path, digits_search):
    raw = digits_search(tmp_path, "restore", budget={"trials": 2, "concurrency": 2},
                        finetune={"epochs": EPOCHS, "batch_size": 64})
    raw["ray"]["max_failures"] = 1
    # A storage URI (as s3:// or gs:// would be) goes to Tune unchanged; here the local pyarrow
    # filesystem, so the checkpoint is written and read back through the URI path.
    raw["ray"]["storage_path"] = f"file://{tmp_path / 'uri_results'}"
    killer = KillAfterFirstEpoch()
    out = run_search(parse_config(raw), callbacks=[killer])
    assert len(killer.killed) == 1, "the fault was injected"
    assert out.storage.startswith("file://") and list((tmp_path / "uri_results").glob("restore-*/*/checkpoint_*"))
    (victim,) = killer.killed
    assert all(r["status"] == "finished" for r in out.records), out.records

    client = MlflowClient(raw["tracking"]["uri"])
    exp = client.get_experiment_by_name("restore")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == "trial"]
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["prunetune.trial_id"], []).append(r)
    assert sorted(by_trial) == sorted(r["trial_id"] for r in out.records)
    assert all(len(v) == 1 and v[0].info.status == "FINISHED" for v in by_trial.values()), by_trial
    history = client.get_metric_history(by_trial[victim][0].info.run_id, "val_acc")
    steps = sorted({m.step for m in history})
    assert steps == list(range(EPOCHS + 1)), "pre-fine-tune (0) and every epoch are in the restored run"
    # Restarted from epoch 1, not from scratch: epoch 0 (pruning) and epoch 1 were logged once.
    # (An epoch the dead process had half-logged would repeat; it finished none after epoch 1.)
    assert [m.step for m in sorted(history, key=lambda m: m.timestamp)] == [0, 1, 2, 3], history
    victim_rec = next(r for r in out.records if r["trial_id"] == victim)
    assert victim_rec["epoch"] == EPOCHS and "test_acc" in victim_rec


class Payload:
    """Unpickling this runs code: it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path):
    from prunetune.search.trial_checkpoint import TrialProgress, write_checkpoint
    from prunetune.spaces import PruningVector, SubnetSpec
    import torch

    net = torch.nn.Linear(3, 2)
    spec = SubnetSpec(parent_id="p", parent_hash="h", vector=PruningVector(), widths={}, removed_blocks=[],
                      resolution=8, in_channels=3, native_resolution=8)
    ckpt = write_checkpoint(tmp_path / "ckpt", TrialProgress("run", 1, {"macs": 1.0}), spec, net,
                            {"epoch": 1, "optimizer": {"state": {}, "param_groups": []}})
    progress, got_spec, weights, state = read_checkpoint(ckpt)   # the honest one reads back
    assert progress.epoch == 1 and state["epoch"] == 1 and set(weights) == {"weight", "bias"}

    marker = tmp_path / "pwned"
    with open(ckpt / STATE_FILE, "wb") as f:
        pickle.dump({"epoch": 1, "optimizer": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match=STATE_FILE) as err:
        read_checkpoint(ckpt)
    assert "refused" in str(err.value)
    assert not marker.exists(), "the payload ran"
