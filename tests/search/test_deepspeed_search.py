"""A search whose candidates fine-tune on two DeepSpeed workers (gloo on CPU, ZeRO-2) in each
trial's placement group, on embedded Ray; the trial process is SIGKILLed after its epoch-1
checkpoint and continues on fresh workers from that checkpoint."""

import pytest
from mlflow.tracking import MlflowClient

from prunetune.search.config import ConfigError, parse_config
from prunetune.search.runner import run_search
from prunetune.search.tracking import ROLE_TAG

from .test_trial_restore import KillAfterFirstEpoch

EPOCHS = 2


def _raw(tmp_path, digits_search, **resources):
    raw = digits_search(tmp_path, "deepspeed", budget={"trials": 1, "concurrency": 1},
                        finetune={"epochs": EPOCHS, "batch_size": 64})
    raw["resources"] = {"cpu": 0.5, "trial_cpu": 0.5, "workers": 2, "deepspeed": {"zero_stage": 2}, **resources}
    return raw


@pytest.mark.slow
def test_candidate_fine_tunes_on_two_deepspeed_workers_and_survives_a_kill(ray_local, tmp_path, digits_search):
    raw = _raw(tmp_path, digits_search)
    raw["ray"]["max_failures"] = 1
    killer = KillAfterFirstEpoch()
    out = run_search(parse_config(raw), callbacks=[killer])
    assert len(killer.killed) == 1
    (rec,) = out.records
    assert rec["status"] == "finished" and rec["epoch"] == EPOCHS and rec["val_acc"] > 0.3, rec
    client = MlflowClient(raw["tracking"]["uri"])
    exp = client.get_experiment_by_name("deepspeed")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == "trial"]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.timestamp)]
    assert steps == [0, 1, 2], "restarted at epoch 2 from the epoch-1 checkpoint, not from scratch"


@pytest.mark.parametrize("resources, key", [
    ({"gpu": 2}, "resources.gpu"),
    ({"deepspeed": {"zero_stage": 4}}, "resources.deepspeed.zero_stage"),
    ({"deepspeed": {"backend": "nccl"}}, "resources.deepspeed.backend"),
    ({"workers": 3}, "finetune.batch_size"),
])
def test_bad_deepspeed_settings_name_their_key(tmp_path, digits_search, resources, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(_raw(tmp_path, digits_search, **resources))
