"""docker/compose*.yaml: services, GPU pinning and node configs (no Docker engine needed)."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from fedmllm.config import node_identity

DOCKER = Path(__file__).parents[1] / "docker"
spec = importlib.util.spec_from_file_location("compose_gen", DOCKER / "compose_gen.py")
compose_gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compose_gen)


def node_config_of(command: list[str]) -> dict:
    """--node-config of a flower-supernode command, parsed like Flower does (data-dir as compose
    would fill it with FEDMLLM_PARTITION_DIR unset)."""
    from flwr.common.config import parse_config_args

    raw = command[command.index("--node-config") + 1].replace("${FEDMLLM_PARTITION_DIR:-}", "")
    return parse_config_args([raw])


def test_committed_files_are_the_generators_output_for_4_gpus():
    assert (DOCKER / "compose.yaml").read_text() == compose_gen.dump(compose_gen.compose(4), 4)
    assert (DOCKER / "compose.tls.yaml").read_text() == compose_gen.dump(compose_gen.compose_tls(4), 4, tls=True)


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_one_supernode_per_gpu_pinned_and_holding_its_partition(gpus):
    services = yaml.safe_load(compose_gen.dump(compose_gen.compose(gpus), gpus))["services"]
    assert set(services) == {"superlink", *(f"supernode-{i}" for i in range(gpus))}
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink" and "--disable-runtime-dependency-installation" in link
    assert link[link.index("--host") + 1] == "0.0.0.0"  # reachable from the SuperNode containers
    for i in range(gpus):
        node = services[f"supernode-{i}"]
        (device,) = node["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [str(i)], "capabilities": ["gpu"]}
        cmd = node["command"]
        assert cmd[0] == "flower-supernode"
        assert cmd[cmd.index("--superlink") + 1] == f"superlink:{compose_gen.PORT}"
        ident = node_identity(node_config_of(cmd))  # what the ClientApp will read
        assert (ident.partition_id, ident.num_partitions, ident.data_dir) == (i, gpus, None)
        assert node["depends_on"] == ["superlink"]
        targets = {
            v.rsplit(":", 2)[-2] if v.endswith((":ro", ":rw")) else v.rsplit(":", 1)[-1] for v in node["volumes"]
        }
        assert {"/data", "/cache"} <= targets  # data and model cache are volumes
        assert node["environment"]["FEDMLLM_CACHE"].startswith("/cache/")


def test_tls_override_verifies_the_superlink_and_authenticates_each_node():
    services = yaml.safe_load((DOCKER / "compose.tls.yaml").read_text())["services"]
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag, path in (
        ("--ssl-ca-certfile", "ca.pem"),
        ("--ssl-certfile", "server.pem"),
        ("--ssl-keyfile", "server.key"),
    ):
        assert link[link.index(flag) + 1] == f"/certs/{path}"
    keys = set()
    for i in range(4):
        cmd = services[f"supernode-{i}"]["command"]
        assert "--insecure" not in cmd and cmd[cmd.index("--root-certificates") + 1] == "/certs/ca.pem"
        keys.add(cmd[cmd.index("--auth-supernode-private-key") + 1])
        assert node_identity(node_config_of(cmd)).partition_id == i
        assert any(v.endswith(":/certs:ro") for v in services[f"supernode-{i}"]["volumes"])
    assert keys == {f"/certs/node-{i}.key" for i in range(4)}  # one key per node


def test_generator_rejects_zero_gpus(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compose_gen.main(["--gpus", "0", "--out", str(tmp_path)])
    assert "--gpus 0" in capsys.readouterr().err
