"""`prunetune prune` / `prunetune verify` as a user runs them (in-process `main`)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from prunetune.search.cli import main

FAST = ["--repeats", "3", "--batch", "2"]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "resnet20"
    rc = main(["prune", "cifar:resnet20", "--out", str(out), "--channel-ratio", "0.5",
               "--drop-blocks", "1", "--resolution", "24", *FAST])
    assert rc == 0
    return out


def test_prune_writes_spec_weights_exports_and_cost(pruned_dir, capsys):
    names = {p.name for p in pruned_dir.iterdir()}
    assert {"subnet.json", "weights.safetensors", "model.ts", "model.onnx", "cost.json"} <= names
    spec = json.loads((pruned_dir / "subnet.json").read_text())
    assert spec["resolution"] == 24 and len(spec["removed_blocks"]) == 3
    cost = json.loads((pruned_dir / "cost.json").read_text())
    assert cost["subnet"]["macs"] < 0.5 * cost["parent"]["macs"]
    assert cost["subnet"]["latency_ms"] > 0


def test_verify_passes_then_fails_on_tampered_weights(pruned_dir, tmp_path, capsys):
    assert main(["verify", str(pruned_dir)]) == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in pruned_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    weights = load_file(str(bad / "weights.safetensors"))
    weights["fc.weight"] = weights["fc.weight"] + 0.1
    save_file(weights, str(bad / "weights.safetensors"))
    assert main(["verify", str(bad)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_vector_file_and_lstm(tmp_path):
    vec = tmp_path / "v.yaml"
    vec.write_text(yaml.safe_dump({"channels": {"lstm": 0.25}}))
    out = tmp_path / "lstm"
    assert main(["prune", "text:lstm", "--out", str(out), "--vector", str(vec), *FAST]) == 0
    assert json.loads((out / "subnet.json").read_text())["groups"] == {"lstm": 16}
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("args,message", [
    (["cifar:resnet20", "--channel-ratio", "1.5"], "--channel-ratio"),
    (["no.such.module:fn", "--channel-ratio", "0.5"], "MODEL 'no.such.module:fn'"),
    (["cifar:resnet20", "--resolution", "0"], "resolution"),
    (["torchvision:shufflenet_v2_x1_0", "--channel-ratio", "0.5", "--input-size", "64"], "no channel group"),
    (["cifar:resnet20", "--head-ratio", "0.5"], "no attention module"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["prune", *args, "--out", str(out), *FAST]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists()


def test_bad_vector_names_the_key(tmp_path, capsys):
    vec = tmp_path / "v.yaml"
    vec.write_text(yaml.safe_dump({"channels": {"layer9": 0.5}}))
    assert main(["prune", "cifar:resnet20", "--out", str(tmp_path / "o"), "--vector", str(vec), *FAST]) == 2
    assert "channels.layer9" in capsys.readouterr().out


def test_verify_rejects_a_folder_without_a_spec(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert torch.__version__  # imported for the rebuild path; nothing else to check
