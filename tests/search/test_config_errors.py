"""Every bad-config path: exit code 2, one message naming the key, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunetune.search.cli import main
from prunetune.search.config import ConfigError, load_config

GOOD = {
    "name": "t",
    "model": {"name": "cifar:resnet8"},
    "data": {"name": "digits", "image_size": 16},
}


def write(tmp_path: Path, cfg) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def with_(**patch):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for dotted, value in patch.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def test_good_config_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.budget.trials == 12 and cfg.objectives[0].metric == "val_acc"


BAD = [
    (with_(colour="blue"), "colour: unknown key"),
    (with_(budget__trails=3), "budget.trails: unknown key"),
    (with_(budget__trials="many"), "budget.trials"),
    (with_(budget__concurrency=0), "budget.concurrency"),
    (with_(space__channel_ratio={"low": 0.0}), "space.channel_ratio.low"),
    (with_(space__channel_ratio={"high": 1.5}), "space.channel_ratio.high"),
    (with_(space__channel_ratio={"low": 0.8, "high": 0.5}), "space.channel_ratio"),
    (with_(space__importance="magic"), "space.importance"),
    (with_(model__name="cifar:resnet21"), "model.name"),
    (with_(model__name="torchvision:not_a_net"), "model.name"),
    (with_(model__name="torchvision:shufflenet_v2_x1_0"), "the engine finds nothing to prune"),
    (with_(parent__checkpoint="missing.pt"), "parent.checkpoint"),
    (with_(data={"name": "fashion-mnist", "root": "no/such/dir"}), "data.root"),
    (with_(data={"name": "fashion-mnist"}), "data.root"),
    (with_(data={"name": "mnist-3d"}), "data.name"),
    (with_(sampler={"name": "cmaes"}), "sampler.name"),
    (with_(objectives=[{"metric": "val_acc", "mode": "max"}]), "objectives"),
    (with_(name="has space"), "name"),
    ({"name": "t", "data": {"name": "digits"}}, "model: required key is missing"),
    (with_(policy={"name": "obd"}), "policy.name: unknown policy 'obd'; registered: allatonce"),
    (with_(policy={"name": ["sap", "sap"]}), "policy.name"),
    (with_(policy={"params": {"sap": {"q": 2.0}}}), "policy: params.sap: not among the policies searched"),
    (with_(policy={"name": "sap", "params": {"sap": {"q": 0.2}}}), "params.sap.q: Value error, q must be greater than p"),
    (with_(policy={"name": "sap", "params": {"sap": {"warmup": 3}}}), "params.sap.warmup: unknown key"),
    (with_(policy={"name": "sap", "search": {"sap.zeta": None}}), "search.sap.zeta: sap has no hyperparameter 'zeta'"),
    (with_(policy={"name": "sap", "search": {"joint.x": None}}), "search.joint.x: policy 'joint' is not among"),
    (with_(policy={"name": "sap", "search": {"sap.beta": {"low": 0.5, "high": 1.5}}}), "search.sap.beta: sap.beta"),
    (with_(policy={"name": "sap", "search": {"sap.scope": None}}), "search.sap.scope: has no default range"),
    (with_(policy={"search": {"distill.alpha": None}}), "search.distill.alpha"),
    (with_(policy={"search": {"distill.weight": {"low": 0.5}}}), "search.distill.weight"),
    (with_(constraints={"max_macs": -1}), "constraints.max_macs"),
    (with_(constraints={"max_flops": 1}), "constraints.max_flops: unknown key"),
    (with_(constraints={"max_latency_ms": 2.0}, cost={"latency": False}), "constraints.max_latency_ms: needs cost.latency"),
]


@pytest.mark.parametrize("cfg,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(tmp_path, monkeypatch, capsys, cfg, key):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, cfg)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value)
    assert main(["search", str(path)]) == 2
    assert key in capsys.readouterr().out.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"], "nothing may be written"


@pytest.mark.parametrize("text,needle", [("name: [unclosed", "not valid YAML"), ("- a list", "must be a YAML mapping")])
def test_unreadable_yaml(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    assert main(["search", str(tmp_path / "nope.yaml")]) == 2


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    cfg = load_config(write(tmp_path, with_(parent__checkpoint="w.pt")))
    assert cfg.parent.checkpoint == tmp_path / "w.pt"


def test_cli_subprocess_exit_code_and_no_side_effects(tmp_path):
    """As a user runs it: a fresh process, bad config -> exit 2, no Ray, no MLflow, no files."""
    path = write(tmp_path, with_(space__channel_ratio={"low": 1.5}))
    proc = subprocess.run([sys.executable, "-m", "prunetune.search.cli", "search", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "space.channel_ratio.low" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]
