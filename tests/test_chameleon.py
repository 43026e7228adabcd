"""Chameleon reservation and release.

Unit tests mock python-chi at its boundary with autospec'd objects (wrong calls fail); the end-to-end
tests run 00_reserve_node and 05_release_node through papermill, and `nanorepro reserve/release`,
against a fake OpenStack on 127.0.0.1 (tests/fake_openstack.py) with a real sshd as the node.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import sshd as sshd_helper
from fake_openstack import FakeCloud

from nanorepro.cloud import chameleon, remote
from nanorepro.cloud.node import NODE_FILE, NodeRecord
from nanorepro.errors import UserError

chi = pytest.importorskip("chi", reason="python-chi is part of the test environment (pip install -e '.[chameleon]')")
import chi.hardware  # noqa: E402
import chi.lease  # noqa: E402
import chi.server  # noqa: E402
from blazarclient.exception import BlazarClientException  # noqa: E402
from blazarclient.v1.hosts import ComputeHostClientManager  # noqa: E402
from blazarclient.v1.leases import LeaseClientManager  # noqa: E402
from chi import context as chi_context  # noqa: E402
from novaclient.v2.servers import ServerManager  # noqa: E402

# the real functions, to spec mocks from (a patched attribute is a mock already)
LIST_SITES, GET_SERVER_ID, GET_NODES = chi_context.list_sites, chi.server.get_server_id, chi.hardware.get_nodes

REPO = Path(__file__).resolve().parent.parent
CREDS = ("OS_ACCESS_TOKEN", "OS_APPLICATION_CREDENTIAL_ID", "OS_TOKEN", "OS_PASSWORD", "OS_PROJECT_NAME",
         "OS_PROJECT_ID", "OS_REGION_NAME", "OS_AUTH_TYPE")


# -- unit: the python-chi boundary ------------------------------------------------------------
@pytest.fixture
def blazar(monkeypatch):
    """chi.blazar() returning a client whose managers are autospec'd from blazarclient."""
    client = mock.Mock(spec=["lease", "host"])
    client.lease = mock.create_autospec(LeaseClientManager, instance=True)
    client.host = mock.create_autospec(ComputeHostClientManager, instance=True)
    monkeypatch.setattr(chi, "blazar", mock.create_autospec(chi.blazar, return_value=client))
    return client


@pytest.fixture
def nova(monkeypatch):
    client = mock.Mock(spec=["servers"])
    client.servers = mock.create_autospec(ServerManager, instance=True)
    monkeypatch.setattr(chi, "nova", mock.create_autospec(chi.nova, return_value=client))
    return client


def lease_dict(status: str, name: str = "l", **kw) -> dict:
    return {"id": "lease-1", "name": name, "status": status, "start_date": "2026-11-25T10:00:00.000000",
            "end_date": "2026-11-25T14:00:00.000000", "created_at": "2026-11-25 10:00:00",
            "reservations": [{"id": "res-1", "resource_type": "physical:host",
                              "resource_properties": '["==", "$node_type", "compute_gigaio"]'}], **kw}


def test_credentials_project_and_site_are_checked_before_anything_else(monkeypatch):
    for var in CREDS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="no Chameleon credentials") as e:
        chameleon.connect("CHI@UC")
    assert "unrestricted" in e.value.fix
    monkeypatch.setenv("OS_ACCESS_TOKEN", "t")
    with pytest.raises(UserError, match="no Chameleon project"):
        chameleon.connect("CHI@UC")
    monkeypatch.setenv("OS_PROJECT_NAME", "CHI-1")
    with pytest.raises(UserError, match="no Chameleon site"):
        chameleon.connect(None)


def test_an_unreachable_sites_list_or_unknown_site_is_a_user_error(monkeypatch):
    monkeypatch.setenv("OS_ACCESS_TOKEN", "t")
    monkeypatch.setenv("OS_PROJECT_NAME", "CHI-1")
    context = chi_context
    # chi.use_site() would only print this failure and carry on
    monkeypatch.setattr(context, "list_sites", mock.create_autospec(LIST_SITES, side_effect=OSError("down")))
    with pytest.raises(UserError, match="cannot fetch Chameleon's list of sites"):
        chameleon.connect("CHI@UC")
    monkeypatch.setattr(context, "list_sites", mock.create_autospec(
        LIST_SITES, return_value={"CHI@UC": {}, "CHI@TACC": {}, "KVM@TACC": {}}))
    with pytest.raises(UserError, match="unknown Chameleon site 'CHI@XX'") as e:
        chameleon.connect("CHI@XX")
    assert e.value.fix == "use one of: CHI@UC, CHI@TACC"


def test_wait_lease_treats_error_as_an_error_and_times_out(blazar):
    blazar.lease.get.side_effect = [lease_dict("PENDING"), lease_dict("STARTING"), lease_dict("ACTIVE")]
    assert chameleon.wait_lease(chi, "lease-1", timeout_s=5, poll=0)["status"] == "ACTIVE"
    blazar.lease.get.assert_called_with("lease-1")
    blazar.lease.get.side_effect = [lease_dict("PENDING"), lease_dict("ERROR")]
    with pytest.raises(UserError, match="went to ERROR instead of ACTIVE"):
        chameleon.wait_lease(chi, "lease-1", timeout_s=5, poll=0)
    blazar.lease.get.side_effect = None
    blazar.lease.get.return_value = lease_dict("PENDING")
    with pytest.raises(UserError, match="still PENDING after"):
        chameleon.wait_lease(chi, "lease-1", timeout_s=0.05, poll=0.01)


def test_create_lease_sends_the_node_type_and_keeps_blazars_refusal(blazar):
    blazar.lease.create.return_value = lease_dict("PENDING")
    assert chameleon.create_lease(chi, "l", "compute_gigaio", 3)["id"] == "lease-1"
    kwargs = blazar.lease.create.call_args.kwargs
    assert kwargs["name"] == "l" and kwargs["start"] == "now" and kwargs["events"] == []
    (res,) = kwargs["reservations"]
    assert res["resource_type"] == "physical:host" and json.loads(res["resource_properties"]) == \
        ["==", "$node_type", "compute_gigaio"]
    end = dt.datetime.strptime(kwargs["end"], "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)
    assert abs((end - dt.datetime.now(dt.timezone.utc)).total_seconds() - 3 * 3600) < 120
    blazar.lease.create.side_effect = BlazarClientException("ERROR: Not enough hosts available", code=409)
    with pytest.raises(UserError, match="refused the lease: ERROR: Not enough hosts") as e:
        chameleon.create_lease(chi, "l", "compute_gigaio", 3)
    assert "fewer lease_hours" in e.value.fix
    blazar.lease.create.side_effect = BlazarClientException("ERROR: Allocation exceeded: 3 SU over balance", code=403)
    with pytest.raises(UserError) as e:
        chameleon.create_lease(chi, "l", "compute_gigaio", 3)
    assert "recharge" in e.value.fix and "12 SU" in e.value.fix  # 3 h x compute_gigaio's 4 SU per hour


def test_find_lease_ignores_terminated_namesakes(blazar):
    blazar.lease.list.return_value = [lease_dict("TERMINATED", id="old"), lease_dict("ACTIVE", id="new"),
                                      lease_dict("ACTIVE", name="other", id="x")]
    assert chameleon.find_lease(chi, "l")["id"] == "new"
    blazar.lease.list.return_value.append(lease_dict("PENDING", id="twin"))
    with pytest.raises(UserError, match="2 live leases are named l"):
        chameleon.find_lease(chi, "l")


def test_server_build_failure_names_novas_fault(nova):
    nova.servers.get.side_effect = [mock.Mock(status="BUILD"),
                                    mock.Mock(status="ERROR", fault={"message": "No valid host was found."})]
    with pytest.raises(UserError, match="server s failed to build: No valid host was found."):
        chameleon.wait_server(chi, "srv-1", "s", timeout_s=5, poll=0)
    nova.servers.get.assert_called_with("srv-1")


def test_launch_server_uses_submits_idempotent_path_and_finds_the_id(monkeypatch, nova):
    server_cls = mock.create_autospec(chi.server.Server)
    server_cls.return_value.submit.return_value = None  # python-chi returns None when it creates
    ids = iter([None, "srv-9"])
    monkeypatch.setattr(chi.server, "Server", server_cls)
    monkeypatch.setattr(chi.server, "get_server_id", mock.create_autospec(GET_SERVER_ID,
                                                                          side_effect=lambda name: next(ids)))
    record = NodeRecord(server_name="s", reservation_id="res-1", image="CC-Ubuntu22.04-CUDA", key_name="k")
    assert chameleon.launch_server(chi, record, "sharednet1", poll=0, timeout_s=5) == "srv-9"
    server_cls.assert_called_once_with("s", reservation_id="res-1", image_name="CC-Ubuntu22.04-CUDA",
                                       key_name="k", network_name="sharednet1")
    # never show="widget" (raises outside IPython after creating); our own wait follows
    server_cls.return_value.submit.assert_called_once_with(wait_for_active=False, show=None, idempotent=True)
    # a second run finds the server by name and does not construct another
    monkeypatch.setattr(chi.server, "get_server_id", mock.create_autospec(GET_SERVER_ID,
                                                                          return_value="srv-9"))
    nova.servers.get.return_value = mock.Mock(status="ACTIVE")
    server_cls.reset_mock()
    assert chameleon.launch_server(chi, record, "sharednet1", poll=0, timeout_s=5) == "srv-9"
    server_cls.assert_not_called()


def nodes(*next_free: dt.datetime | None) -> list:
    out = []
    for when in next_free:
        node = mock.create_autospec(chi.hardware.Node, instance=True)
        node.reservable = True
        node.next_free_timeslot.return_value = (when or dt.datetime.now(dt.timezone.utc), None)
        out.append(node)
    return out


def test_node_type_choice_and_availability_messages(monkeypatch):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=30)
    by_type = {"compute_gigaio": nodes(later), "gpu_a100_pcie": nodes(None, later), "compute_liqid": nodes(None)}
    get_nodes = mock.create_autospec(chi.hardware.get_nodes, side_effect=lambda node_type: by_type[node_type])
    monkeypatch.setattr(chi.hardware, "get_nodes", get_nodes)
    monkeypatch.setattr(chi, "use_site", mock.create_autospec(chi.use_site))
    assert chameleon.choose_node_type(chi, "CHI@UC", "auto", 4) == "gpu_a100_pcie"  # gigaio is booked
    by_type["compute_gigaio"][0].next_free_timeslot.assert_called_with(minimum_hours=4)
    with pytest.raises(UserError) as e:
        chameleon.choose_node_type(chi, "CHI@UC", "compute_gigaio", 4)
    assert f"next free: compute_gigaio from {later:%Y-%m-%d %H:%M} UTC" in str(e.value)
    assert "site='CHI@TACC', node_type='compute_liqid' (1 free now)" in e.value.fix
    chi.use_site.assert_called_with("CHI@UC")  # the site is restored after looking elsewhere
    with pytest.raises(UserError, match="compute_liqid nodes are at CHI@TACC, not CHI@UC"):
        chameleon.choose_node_type(chi, "CHI@UC", "compute_liqid", 4)
    by_type["compute_skylake"] = nodes(None)  # the user's choice: it runs, its GPU checked after boot
    assert chameleon.choose_node_type(chi, "CHI@UC", "compute_skylake", 4) == "compute_skylake"


def test_lease_hours_are_bounded_and_local_reserves_nothing(capsys):
    assert chameleon.reserve("local") is None and chameleon.release("local") is None
    assert "nothing to reserve" in capsys.readouterr().out
    with pytest.raises(UserError, match="outside"):
        chameleon.reserve("chameleon", lease_hours=200)
    with pytest.raises(UserError, match="unknown target"):
        chameleon.reserve("aws")


def test_wait_for_ssh_reads_the_banner_and_gives_up_clearly():
    def serve(banner: bytes) -> int:
        srv = socket.create_server(("127.0.0.1", 0))

        def answer():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.sendall(banner)
                conn.close()
        threading.Thread(target=answer, daemon=True).start()
        return srv.getsockname()[1]

    chameleon.wait_for_ssh("127.0.0.1", serve(b"SSH-2.0-OpenSSH_9.2\r\n"), timeout_s=5, poll=0.01)
    with pytest.raises(UserError, match="not an SSH server"):
        chameleon.wait_for_ssh("127.0.0.1", serve(b"HTTP/1.1 400\r\n"), timeout_s=0.2, poll=0.05)
    with pytest.raises(UserError, match="does not answer SSH on port") as e:
        chameleon.wait_for_ssh("127.0.0.1", sshd_helper._free_port(), timeout_s=0.2, poll=0.05)
    assert "run this notebook again" in e.value.fix


def test_still_running_says_until_when_and_how_to_release(tmp_path):
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3, minutes=1)
    msg = chameleon.still_running(NodeRecord(lease_name="l", lease_id="id-1", site="CHI@UC",
                                              lease_end=end.isoformat()), tmp_path / "my results")
    assert "STILL RUNNING until" in msg and f"{end:%Y-%m-%d %H:%M} UTC" in msg and "(3.0 h more, about 3 SU)" in msg
    assert msg.index("notebooks/05_release_node.ipynb") < msg.index("python3 -m nanorepro release")  # 05 first
    assert f"&& python3 -m nanorepro release --results-dir '{tmp_path}/my results'`" in msg
    assert f"`cd {REPO} &&" in msg  # the hub installs nothing: the package runs from the project folder


# -- end to end: the fake cloud and a real sshd -----------------------------------------------
@pytest.fixture
def node_sshd(loopback_node):
    """The loopback "node", whose nvidia-smi shows one A100 (`bin_dir`: its stand-in tools, rewritable per test)."""
    return loopback_node


@pytest.fixture
def cloud():
    with FakeCloud() as c:
        yield c


@pytest.fixture
def chi_env(cloud, node_sshd, tmp_path, monkeypatch) -> dict[str, str]:
    """The environment of a hub-like session pointed at the fake cloud and the sshd 'node'."""
    for var in CREDS:
        monkeypatch.delenv(var, raising=False)
    env = {**cloud.env(), "OS_KEYPAIR_NAME": "tester-jupyter", "OS_KEYPAIR_PRIVATE_KEY": str(node_sshd.key_path),
           "OS_KEYPAIR_PUBLIC_KEY": str(node_sshd.pub_path), "NANOREPRO_CHI_POLL_S": "0.02",
           "NANOREPRO_SSH_POLL_S": "0.1", "NANOREPRO_SSH_PORT": str(node_sshd.port),
           "NANOREPRO_SSH_USER": node_sshd.user, "NANOREPRO_REMOTE_DIR": str(tmp_path / "node home"),
           "NANOREPRO_INSTALL_CMD": sshd_helper.cheap_install(), "USER": "tester"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # papermill's kernel inherits this process's environment
    return {**os.environ}


def papermill(name: str, out: Path, **params) -> Path:
    import papermill as pm

    pm.execute_notebook(str(REPO / "notebooks" / name), str(out), parameters=params, cwd=str(REPO),
                        progress_bar=False, kernel_name="python3")
    return out


def outputs(path: Path) -> str:
    """Everything the executed notebook printed, as it was saved."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_notebooks_on_target_local_reserve_and_release_nothing(tmp_path):
    nb = papermill("00_reserve_node.ipynb", tmp_path / "00.ipynb", results_dir=str(tmp_path / "r"))
    assert "nothing to reserve" in outputs(nb) and "nothing to install" in outputs(nb)
    nb = papermill("05_release_node.ipynb", tmp_path / "05.ipynb", results_dir=str(tmp_path / "r"))
    assert "nothing to release" in outputs(nb)
    assert not (tmp_path / "r" / NODE_FILE).exists()


def test_reserve_twice_then_release_through_the_notebooks(chi_env, cloud, node_sshd, tmp_path):
    results = tmp_path / "results"
    params = dict(target="chameleon", results_dir=str(results), site="CHI@UC", lease_hours=2)
    nb = papermill("00_reserve_node.ipynb", tmp_path / "00.ipynb", **params)
    text = outputs(nb)
    assert "This lease will cost 8 SU: 1 node x 2 h x 4 SU per node-hour (compute_gigaio's rate, Chameleon's " \
           "published rates" in text
    assert re.search(r"-> creating lease nanorepro-tester .*\n   done in [\d.]+ s", text)
    assert "node ready in" in text
    record = json.loads((results / NODE_FILE).read_text())
    assert record["status"] == "ready" and record["host"] == "127.0.0.1" and record["port"] == node_sshd.port
    assert record["node_type"] == "compute_gigaio" and record["site"] == "CHI@UC"
    assert record["key_path"] == str(node_sshd.key_path.resolve())
    assert node_sshd.key_path.read_text().splitlines()[1] not in (results / NODE_FILE).read_text()
    assert (results / "node" / "nvidia-smi.txt").is_file()
    assert json.loads((results / "node" / "env.json").read_text())["python"]
    # the cloud holds one lease, one server on its reservation, one floating IP bound to it
    live = cloud.live()
    assert [x["name"] for x in live["leases"]] == ["nanorepro-tester"] and live["leases"][0]["status"] == "ACTIVE"
    assert [s["reservation"] for s in live["servers"]] == [live["leases"][0]["reservations"][0]["id"]]
    assert len(live["fips"]) == 1 and live["fips"][0]["port_id"] == f"port-{live['servers'][0]['id']}"
    # the address was reserved in the lease (not taken from the on-demand pool after the boot)
    fip_res = [r for r in live["leases"][0]["reservations"] if r["resource_type"] == "virtual:floatingip"]
    assert len(fip_res) == 1 and f"reservation:{fip_res[0]['id']}" in live["fips"][0]["tags"]
    assert not any(m == "POST" and p.endswith("/floatingips") for m, p in cloud.requests)

    nb = papermill("00_reserve_node.ipynb", tmp_path / "00b.ipynb", **params)  # a re-run reuses everything
    text = outputs(nb)
    assert "reusing it" in text and "already has 127.0.0.1" in text and "will cost" not in text
    live = cloud.live()
    assert len(live["leases"]) == 1 and len(live["servers"]) == 1 and len(live["fips"]) == 1
    assert sum(1 for m, p in cloud.requests if m == "POST" and p.endswith("/leases")) == 1

    # a later mistake (a wrong image) still says plainly that the lease from before runs on
    done = cli(chi_env, "reserve", "--results-dir", str(results), "--image", "NoSuchImage", "--no-setup")
    assert done.returncode == 2 and "image 'NoSuchImage'" in done.stderr and "is STILL RUNNING until" in done.stderr

    # the stages' runner reaches the node from the record
    runner = remote.SSHRunner.from_state(results, workdir=results, out=lambda s: None)
    try:
        assert runner.run(["--version"], stage="version") == 0
    finally:
        runner.close()

    nb = papermill("05_release_node.ipynb", tmp_path / "05.ipynb", target="chameleon", results_dir=str(results))
    assert "nothing left" in outputs(nb)
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}
    assert json.loads((results / NODE_FILE).read_text())["status"] == "released"
    nb = papermill("05_release_node.ipynb", tmp_path / "05b.ipynb", target="chameleon", results_dir=str(results))
    assert "already released" in outputs(nb)
    with pytest.raises(UserError, match="was released"):
        remote.SSHRunner.from_state(results)


@pytest.mark.parametrize("failure", ["lease", "server"])
def test_a_failure_after_the_lease_exists_releases_everything(failure, chi_env, cloud, tmp_path):
    import papermill as pm

    if failure == "lease":
        cloud.lease_outcome = "ERROR"
    else:
        cloud.server_outcome = "ERROR"
    results = tmp_path / "results"
    with pytest.raises(pm.PapermillExecutionError) as e:
        papermill("00_reserve_node.ipynb", tmp_path / "00.ipynb", target="chameleon", results_dir=str(results),
                  site="CHI@UC", lease_hours=2)
    message = e.value.evalue
    assert ("went to ERROR instead of ACTIVE" if failure == "lease" else "failed to build: No valid host") in message
    assert "were released: nothing is left running" in message
    assert sum(1 for m, p in cloud.requests if m == "POST" and p.endswith("/leases")) == 1
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}
    assert json.loads((results / NODE_FILE).read_text())["status"] == "released"


def test_keep_on_failure_says_the_lease_still_runs_and_how_to_release_it(chi_env, cloud, tmp_path):
    cloud.server_outcome = "ERROR"
    results = tmp_path / "my results"
    done = cli(chi_env, "reserve", "--results-dir", str(results), "--site", "CHI@UC", "--hours", "3",
               "--keep-on-failure")
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert "failed to build" in err and "is STILL RUNNING until" in err and "(3.0 h more, about 12 SU)" in err
    command = re.search(r"in a terminal: `([^`]+)`", err).group(1)
    assert len(cloud.live()["leases"]) == 1  # kept, as asked, and said so
    done = subprocess.run(command.replace("python3 -m nanorepro", f"{sys.executable} -m nanorepro", 1), shell=True,
                          env=chi_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


@pytest.fixture
def gpu_model(node_sshd):
    """Set what the node's nvidia-smi shows for this test; back to one A100 afterwards."""
    yield lambda **kw: sshd_helper.standins(node_sshd.bin_dir, **kw)
    sshd_helper.standins(node_sshd.bin_dir)


def test_a_node_without_an_a100_is_refused_before_any_install_and_released(chi_env, cloud, tmp_path, gpu_model):
    """node_type="auto" promises an A100: a node that shows another GPU is given back at once."""
    gpu_model(model="NVIDIA A30")
    done = cli(chi_env, "reserve", "--results-dir", str(tmp_path / "r"), "--site", "CHI@UC", "--hours", "2")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "node 0 (nanorepro-tester-0, server " in done.stderr and "has NVIDIA A30, not an A100" in done.stderr
    assert "were released: nothing is left running" in done.stderr
    assert "node_type one of compute_gigaio, gpu_a100_pcie, gpu_a100_nvlink" in done.stderr
    assert "installing" not in done.stdout  # refused before anything was installed
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}
    gpu_model(gpus=0)  # a composable node whose GPU went elsewhere: refused whatever the node type
    done = cli(chi_env, "reserve", "--results-dir", str(tmp_path / "r"), "--site", "CHI@UC", "--hours", "2",
               "--node-type", "compute_gigaio")
    assert done.returncode == 2 and "shows no NVIDIA GPU (nvidia-smi -L: No devices were found)" in done.stderr
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


def test_a_node_type_the_user_names_runs_with_the_gpu_it_has_on_record(chi_env, cloud, tmp_path, gpu_model):
    gpu_model(model="NVIDIA A30", gpus=1)
    results = tmp_path / "r"
    done = cli(chi_env, "reserve", "--results-dir", str(results), "--site", "CHI@UC", "--hours", "2",
               "--node-type", "compute_gigaio", "--no-setup")
    assert done.returncode == 0, done.stderr
    assert "1x NVIDIA A30: not an A100, the published figures were measured on one" in done.stdout
    record = json.loads((results / "chameleon_node.json").read_text())
    assert record["gpu_model"] == "NVIDIA A30" and record["nodes"][0]["gpu_models"] == ["NVIDIA A30"]
    assert cli(chi_env, "release", "--results-dir", str(results)).returncode == 0


def test_refused_lease_and_no_free_a100_are_clear_and_leave_nothing(chi_env, cloud, tmp_path):
    cloud.refuse_lease = "Not enough hosts available for the requested reservation"
    done = cli(chi_env, "reserve", "--results-dir", str(tmp_path / "a"), "--site", "CHI@UC", "--hours", "2")
    assert done.returncode == 2
    assert "Chameleon refused the lease: ERROR: Not enough hosts available" in done.stderr
    assert "fewer lease_hours" in done.stderr
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}
    cloud.refuse_lease = None
    cloud.booked = {"compute_gigaio", "gpu_a100_pcie"}
    cloud.requests.clear()
    done = cli(chi_env, "reserve", "--results-dir", str(tmp_path / "b"), "--site", "CHI@UC", "--hours", "2")
    assert done.returncode == 2
    assert "no A100 node (compute_gigaio, gpu_a100_pcie, gpu_a100_nvlink) is free at CHI@UC for 2 h; next free: " \
        "compute_gigaio from" in done.stderr
    assert "site='CHI@TACC', node_type='compute_liqid' (2 free now)" in done.stderr
    assert not any(m == "POST" and p.endswith("/leases") for m, p in cloud.requests)
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


def test_no_credentials_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    done = cli(env, "reserve", "--results-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("nanorepro: error: no Chameleon credentials") and done.stderr.count("\n") == 1


def test_whole_sequence_on_the_chameleon_target_gives_the_local_results(chi_env, cloud, node_sshd, tmp_path,
                                                                         shakespeare_path, tiktoken_offline,
                                                                         tiny_gpt2):
    """00 to 05 with target=chameleon against the fake cloud and the loopback sshd 'node', tiny settings."""
    results = tmp_path / "results"
    env = {**chi_env, "TIKTOKEN_CACHE_DIR": os.environ["TIKTOKEN_CACHE_DIR"], "HF_HUB_OFFLINE": "1",
           # the 'node' has no network either: it gets the BPE files the way a user would pass settings
           "NANOREPRO_REMOTE_ENV": f"TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']} HF_HUB_OFFLINE=1"}
    params = ["-p", "target", "chameleon", "-p", "results_dir", str(results), "-p", "char_preset", "tiny",
              "-p", "input_path", str(shakespeare_path), "-p", "model", str(tiny_gpt2),
              "-p", "finetune_max_iters", "2", "-p", "lease_hours", "1",
              # the CPU recipe on purpose: the default on a node is the A100 one (gpt2-xl), which this CPU "node" refuses
              "-p", "finetune_preset", "finetune-shakespeare-cpu"]
    r = subprocess.run([sys.executable, "-m", "nanorepro", "run-notebooks", *params], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rel in ["data/shakespeare_char/meta.json", "data/shakespeare_gpt2/meta.json", "runs/char/metrics.jsonl",
                "runs/char/config.json", "runs/char/env.json", "runs/char/samples.txt", "runs/finetune/metrics.jsonl",
                "runs/finetune/samples_before.txt", "loss_vs_iter.png", "loss_vs_time.png", "REPORT.md",
                "report.json", "stages.jsonl", "node/nvidia-smi.txt", "notebooks/05_release_node.ipynb"]:
        assert (results / rel).is_file(), rel
    assert not list(results.glob("runs/*/ckpt.pt"))  # checkpoints stay on the node
    # the node's run is the run this machine makes with the same settings: same losses at the same iterations
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "nanorepro", "prepare", "--input", str(shakespeare_path), "--encoding",
                    "char"], cwd=tmp_path, check=True, capture_output=True, env=env)
    subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "tiny", "--out-dir", str(local),
                    "--data_root=data", "--seed=1337"], cwd=tmp_path, check=True, capture_output=True, env=env)
    from nanorepro import metrics

    def curve(path):
        return [(e["iter"], e["val_loss"]) for e in metrics.of_kind(metrics.read(path), "eval")]

    assert curve(results / "runs/char/metrics.jsonl") == curve(local / "metrics.jsonl")
    live = cloud.live()
    assert not live["servers"] and not live["fips"] and all(l["status"] == "DELETED" for l in live["leases"]) \
        or not live["leases"]


# -- lease states, node types, project, floating IPs, failures that name the lease ----------------------
def test_lease_states_creating_is_waited_for_and_leaving_ones_are_not_reused(blazar):
    blazar.lease.get.side_effect = [lease_dict("CREATING"), lease_dict("PENDING"), lease_dict("ACTIVE")]
    assert chameleon.wait_lease(chi, "lease-1", timeout_s=5, poll=0)["status"] == "ACTIVE"
    blazar.lease.list.return_value = [lease_dict("DELETING", id="going"), lease_dict("TERMINATING", id="ending")]
    assert chameleon.find_lease(chi, "l") is None  # on their way out: a new lease is made
    blazar.lease.list.return_value.append(lease_dict("CREATING", id="new"))  # a lost create reply: found
    assert chameleon.find_lease(chi, "l")["id"] == "new"
    assert {"TERMINATING", "DELETING", "CREATING"} <= set(chameleon.LIVE)  # counted by "nothing left"
    blazar.lease.get.reset_mock()
    blazar.lease.get.side_effect = [lease_dict("PENDING"), lease_dict("DELETING")]  # deleted elsewhere meanwhile
    with pytest.raises(UserError, match="went to DELETING instead of ACTIVE"):
        chameleon.wait_lease(chi, "lease-1", timeout_s=900, poll=0)
    assert blazar.lease.get.call_count == 2  # at once: no third look, not the 15-minute timeout


def test_node_types_by_site(monkeypatch, capsys):
    """TACC's compute_gigaio nodes share two A100s and two A30s among six: never chosen for "auto" there,
    but a user who names it gets it, told that its GPU will be checked."""
    assert "compute_gigaio" not in [t for t, (sites, _) in chameleon.A100_NODE_TYPES.items() if "CHI@TACC" in sites]
    monkeypatch.setattr(chi.hardware, "get_nodes", mock.create_autospec(
        GET_NODES, side_effect=lambda node_type: nodes(None) if node_type in ("compute_gigaio", "compute_liqid")
        else []))
    assert chameleon.choose_node_type(chi, "CHI@TACC", "auto", 2) == "compute_liqid"
    assert chameleon.choose_node_type(chi, "CHI@TACC", "compute_gigaio", 2) == "compute_gigaio"
    assert "compute_gigaio at CHI@TACC is not one of the node types with a sure A100 here (compute_liqid)" \
        in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(chi.hardware, "get_nodes", mock.create_autospec(
        GET_NODES, side_effect=lambda node_type: calls.append(node_type) or
        (nodes(None) if node_type == "gpu_a100_nvlink" else [])))
    assert chameleon.choose_node_type(chi, "CHI@UC", "auto", 2) == "gpu_a100_nvlink"
    assert calls == ["compute_gigaio", "gpu_a100_pcie", "gpu_a100_nvlink"]


def hub_env(cloud, token: str) -> dict[str, str]:
    """What Chameleon's JupyterHub puts in a kernel's environment (jupyterhub-chameleon's openstack_rc):
    an OIDC access token, not an application credential."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return {**env, "OS_AUTH_URL": cloud.env()["OS_AUTH_URL"], "OS_AUTH_TYPE": "v3oidcaccesstoken",
            "OS_ACCESS_TOKEN": token, "OS_IDENTITY_PROVIDER": "chameleon", "OS_PROTOCOL": "openid",
            "OS_PROJECT_DOMAIN_NAME": "chameleon", "OS_PROJECT_NAME": "CHI-000000", "OS_INTERFACE": "public",
            "OS_IDENTITY_API_VERSION": "3", "OS_REGION_NAME": "CHI@UC",
            "CHI_RESOURCE_API_URL": cloud.env()["CHI_RESOURCE_API_URL"]}


@pytest.mark.slow  # by measurement: python-chi in processes of its own: ~9 s
def test_connect_through_the_hubs_oidc_token_scopes_the_project(cloud):
    """The hub's path through connect(): the access token traded at Keystone's federation endpoint, then a
    token scoped to the project connect() sets (the branch application credentials never take)."""
    code = "from nanorepro.cloud import chameleon\nchameleon.connect(None)\n"
    r = subprocess.run([sys.executable, "-c", code], env=hub_env(cloud, cloud.access_token), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "site CHI@UC, project CHI-000000" in r.stdout
    assert ("POST", "/uc:5000/v3/OS-FEDERATION/identity_providers/chameleon/protocols/openid/auth") in cloud.requests
    assert {"project": {"name": "CHI-000000", "domain": {"name": "chameleon"}}} in cloud.scopes
    code = ("from nanorepro import errors\nfrom nanorepro.cloud import chameleon\ntry:\n    chameleon.connect(None)\n"
            "except errors.UserError as e:\n    print(e.problem, '|', e.fix)\n")
    r = subprocess.run([sys.executable, "-c", code], env=hub_env(cloud, "an-expired-token"), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert "Chameleon at CHI@UC refused the credentials" in r.stdout and "restart your server" in r.stdout


def test_a_project_that_os_project_id_overrides_is_warned_about(chi_env, cloud, capsys, monkeypatch):
    monkeypatch.setenv("OS_PROJECT_ID", "proj-1")
    monkeypatch.setattr(chi_context, "RESOURCE_API_URL", chi_env["CHI_RESOURCE_API_URL"])  # read at import
    monkeypatch.setattr(chi_context, "_sites", {})  # its cache, restored afterwards
    chameleon.connect("CHI@UC", project="CHI-999999")
    out = capsys.readouterr().out
    assert "warning: OS_PROJECT_ID=proj-1 is set in this environment and decides the project charged, not " \
        "project='CHI-999999'" in out and "os.environ.pop('OS_PROJECT_ID')" in out
    chameleon.connect("CHI@UC")
    assert "warning" not in capsys.readouterr().out  # the hub's own project: nothing to say


def test_an_empty_floating_ip_pool_releases_the_fresh_node_and_says_so(chi_env, cloud, tmp_path):
    cloud.fip_reservable, cloud.fip_pool = False, 0  # no IP reserved in the lease, none left in the pool
    done = cli(chi_env, "reserve", "--results-dir", str(tmp_path / "r"), "--site", "CHI@UC", "--hours", "2",
               "--no-setup")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no floating IP could be had from CHI@UC's public pool" in done.stderr
    assert "were released: nothing is left running" in done.stderr
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}
    # asked with a floating IP (the site refused it), then without one
    assert sum(1 for m, p in cloud.requests if m == "POST" and p.endswith("/leases")) == 2
    assert "the site cannot reserve a floating IP in the lease" in done.stdout


def test_a_stage_failing_on_the_node_names_the_lease_and_how_to_release_it(tmp_path):
    from nanorepro.pipeline import Pipeline

    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    key = tmp_path / "key"
    key.write_text("not a key")
    key.chmod(0o600)
    (tmp_path / NODE_FILE).write_text(json.dumps({
        "host": "127.0.0.1", "port": sshd_helper._free_port(), "key_path": str(key), "site": "CHI@UC",
        "lease_name": "nanorepro-tester", "lease_id": "lease-1", "lease_end": end.isoformat(), "status": "ready"}))
    with pytest.raises(UserError) as e:
        Pipeline(tmp_path, "chameleon").prepare_data(encodings="char")
    assert "cannot reach" in e.value.problem and e.value.problem.count("STILL RUNNING") == 1
    assert f"lease nanorepro-tester (lease-1) at CHI@UC is STILL RUNNING until {end:%Y-%m-%d %H:%M} UTC" \
        in e.value.problem and f"nanorepro release --results-dir {tmp_path}" in e.value.problem


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("a bug"), OSError(28, "No space left")])
def test_any_failure_of_a_stage_on_the_node_names_the_running_lease(tmp_path, monkeypatch, capsys, error):
    """An interrupted kernel or a traceback in 01-04 still says what runs and how to release it."""
    from nanorepro.pipeline import Pipeline

    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    key = tmp_path / "key"
    key.write_text("not a key")
    key.chmod(0o600)
    (tmp_path / NODE_FILE).write_text(json.dumps({
        "host": "127.0.0.1", "port": 22, "key_path": str(key), "site": "CHI@UC", "lease_name": "nanorepro-tester",
        "lease_id": "lease-1", "lease_end": end.isoformat(), "status": "ready"}))

    def boom(*args, **kwargs):
        raise error
    pipe = Pipeline(tmp_path, "chameleon")
    monkeypatch.setattr(pipe.runner, "run", boom)  # the stage's job on the node
    with pytest.raises(type(error)) as e:
        pipe.prepare_data(encodings="char")
    note = f"lease nanorepro-tester (lease-1) at CHI@UC is STILL RUNNING until {end:%Y-%m-%d %H:%M} UTC"
    assert note in capsys.readouterr().out and any(note in n for n in e.value.__notes__)


# -- several nodes: one lease, N servers, one floating IP; release checks nothing is left; the estimate ---------
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_a_node_count_that_is_not_a_positive_whole_number_is_refused(bad):
    with pytest.raises(UserError, match=r"nodes=.* is not a positive whole number of nodes") as e:
        chameleon.reserve("local", nodes=bad)  # refused whatever the target, before anything else
    assert "nodes=1" in e.value.fix and "nodes=2" in e.value.fix


def test_ssh_ports_are_one_for_all_nodes_or_one_per_node(monkeypatch):
    monkeypatch.delenv("NANOREPRO_SSH_PORT", raising=False)
    assert chameleon._ssh_ports(3) == [22, 22, 22]
    monkeypatch.setenv("NANOREPRO_SSH_PORT", "2201,2202")
    assert chameleon._ssh_ports(2) == [2201, 2202]
    with pytest.raises(UserError, match=r"NANOREPRO_SSH_PORT='2201,2202' does not give one port for each of the 3"):
        chameleon.reserve("chameleon", nodes=3)  # before any connection


def test_node_type_choice_needs_that_many_free_nodes_of_one_type(monkeypatch):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=30)
    by_type = {"compute_gigaio": nodes(None), "gpu_a100_pcie": nodes(None, later), "gpu_a100_nvlink": nodes(None, None),
               "compute_liqid": nodes(None, None)}
    monkeypatch.setattr(chi.hardware, "get_nodes", mock.create_autospec(
        GET_NODES, side_effect=lambda node_type: by_type[node_type]))
    monkeypatch.setattr(chi, "use_site", mock.create_autospec(chi.use_site))
    assert chameleon.choose_node_type(chi, "CHI@UC", "auto", 4) == "compute_gigaio"  # one node: the first free
    assert chameleon.choose_node_type(chi, "CHI@UC", "auto", 4, nodes=2) == "gpu_a100_nvlink"  # two free together
    with pytest.raises(UserError) as e:
        chameleon.choose_node_type(chi, "CHI@UC", "gpu_a100_pcie", 4, nodes=2)
    # when two are free together: when the second frees up
    assert f"fewer than 2 A100 nodes of one type (gpu_a100_pcie) are free at CHI@UC for 4 h; next free: " \
        f"gpu_a100_pcie from {later:%Y-%m-%d %H:%M} UTC" in e.value.problem
    assert "or fewer nodes" in e.value.fix and "site='CHI@TACC', node_type='compute_liqid' (2 free now)" in e.value.fix
    with pytest.raises(UserError) as e:
        chameleon.choose_node_type(chi, "CHI@UC", "auto", 4, nodes=3)
    assert "fewer than 3 A100 nodes of one type (compute_gigaio, gpu_a100_pcie, gpu_a100_nvlink)" in e.value.problem
    assert "(CHI@UC: compute_gigaio has 1 in all, gpu_a100_pcie has 2 in all, gpu_a100_nvlink has 2 in all)" \
        in e.value.problem and "next free" not in e.value.problem


@pytest.fixture
def chi_here(chi_env, monkeypatch):
    """python-chi in this process pointed at the fake cloud (its resource API URL is read at import)."""
    for module in (chi_context, chi.hardware):
        monkeypatch.setattr(module, "RESOURCE_API_URL", chi_env["CHI_RESOURCE_API_URL"])
    monkeypatch.setattr(chi_context, "_sites", {})  # its cache, restored afterwards
    return chi_env


def posts(cloud, suffix: str) -> int:
    return sum(1 for m, p in cloud.requests if m == "POST" and p.endswith(suffix))


def test_two_nodes_one_lease_one_floating_ip_on_the_head_then_all_released_and_checked(
        chi_here, cloud, node_sshd, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    create, said = chameleon.create_lease, []

    def create_lease(*args, **kwargs):  # what had been said, and asked, when the lease is asked for
        said.append((capsys.readouterr().out, posts(cloud, "/leases")))
        return create(*args, **kwargs)
    monkeypatch.setattr(chameleon, "create_lease", create_lease)

    record = chameleon.reserve("chameleon", site="CHI@UC", nodes=2, lease_hours=2, state_dir=results)
    (before, leases_posted), = said
    assert leases_posted == 0 and "This lease will cost 64 SU: 2 nodes x 2 h x 16 SU per node-hour" in before
    assert "compute_gigaio at CHI@UC: 1 nodes, 1 free" in before  # one host: not enough for two
    out = capsys.readouterr().out
    assert "2 nodes ready in" in out and "2x gpu_a100_pcie (4x A100 PCIe each" in out
    record = record.to_dict()  # what reserve returns is what it wrote
    assert record == json.loads((results / NODE_FILE).read_text())
    live = cloud.live()
    (lease,) = live["leases"]
    (hosts,) = [r for r in lease["reservations"] if r["resource_type"] == "physical:host"]
    assert hosts["min"] == hosts["max"] == 2 and record["node_type"] == "gpu_a100_pcie"
    servers = {s["name"]: s for s in live["servers"]}
    assert sorted(servers) == ["nanorepro-tester-0", "nanorepro-tester-1"]
    assert {s["reservation"] for s in servers.values()} == {hosts["id"]}
    assert record["nodes"] == [{"name": name, "server_id": servers[name]["id"], "private_ip": "127.0.0.1",
                                "ssh_port": node_sshd.port, "gpu_models": ["NVIDIA A100-SXM4-80GB"],
                                "setup": None, "network": None}
                               for name in ("nanorepro-tester-0", "nanorepro-tester-1")]  # each node's GPUs checked
    head = servers["nanorepro-tester-0"]
    assert record["server_id"] == head["id"] and record["server_name"] == "nanorepro-tester-0"
    assert record["host"] == "127.0.0.1" and record["port"] == node_sshd.port and record["status"] == "ready"
    (fip,) = live["fips"]  # one address, on the head only
    assert fip["port_id"] == f"port-{head['id']}"

    # a re-run that asks for another node count is refused before anything changes, saying the lease runs
    with pytest.raises(UserError, match="holds 2 nodes, not the nodes=1 asked for. The lease nanorepro-tester") as e:
        chameleon.reserve("chameleon", site="CHI@UC", nodes=1, lease_hours=2, state_dir=results)
    assert "set nodes=2" in e.value.fix and posts(cloud, "/leases") == 1 and len(cloud.live()["servers"]) == 2

    capsys.readouterr()
    assert chameleon.release("chameleon", state_dir=results).status == "released"
    out = capsys.readouterr().out
    assert "deleting servers nanorepro-tester-0, nanorepro-tester-1" in out
    assert "nothing left: no server (2 deleted), floating IP or lease" in out
    assert "released in" in out and "and checked: no server, floating IP or lease of nanorepro-tester is left" in out
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


class Crash(BaseException):
    """The kernel dying: nothing in reserve() catches it."""


def test_a_crash_between_server_launches_still_releases_everything(chi_here, cloud, tmp_path, monkeypatch):
    results = tmp_path / "results"
    launch, launched = chameleon.launch_server, []

    def launch_server(*args, **kwargs):
        launched.append(launch(*args, **kwargs))
        if len(launched) == 2:  # Nova made the second server, the record never heard of it
            raise Crash
        return launched[-1]
    monkeypatch.setattr(chameleon, "launch_server", launch_server)
    with pytest.raises(Crash):
        chameleon.reserve("chameleon", site="CHI@UC", nodes=2, lease_hours=2, state_dir=results)
    record = json.loads((results / NODE_FILE).read_text())
    assert [n["server_id"] for n in record["nodes"]] == [launched[0], None] and record["status"] == "reserving"
    assert len(cloud.live()["servers"]) == 2 and len(cloud.live()["leases"]) == 1

    done = cli(chi_here, "release", "--results-dir", str(results))
    assert done.returncode == 0, done.stderr
    assert "nothing left" in done.stdout and "and checked" in done.stdout
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


def test_what_release_cannot_remove_is_named_with_the_command_that_does(chi_here, cloud, tmp_path, monkeypatch):
    results = tmp_path / "results"
    chameleon.reserve("chameleon", site="CHI@UC", nodes=2, lease_hours=2, state_dir=results)
    # the servers outlive the release (a stuck bare-metal cleanup): asked to go, they stay
    monkeypatch.setattr(chi.server, "delete_server", mock.create_autospec(chi.server.delete_server))
    monkeypatch.setattr(chameleon, "RELEASE_TIMEOUT_S", 0.3)
    server_ids = [s["id"] for s in cloud.live()["servers"]]
    with pytest.raises(UserError, match="still left at CHI@UC") as e:
        chameleon.release("chameleon", state_dir=results)
    for server_id in server_ids:
        assert f"`openstack server delete {server_id}`" in e.value.fix
    assert json.loads((results / NODE_FILE).read_text())["status"] != "released"


def test_a_lease_booked_ahead_is_picked_up_by_a_second_run_after_its_start(chi_here, cloud, tmp_path, monkeypatch,
                                                                           capsys):
    """Every A100 at CHI@UC is taken for two days: start="next_free" books the first window after that, says when
    and what it costs, and stops; a run before the start changes nothing; a run after it boots the node."""
    cloud.booked = {"compute_gigaio", "gpu_a100_pcie", "gpu_a100_nvlink"}
    results = tmp_path / "results"
    ask = dict(site="CHI@UC", lease_hours=2, state_dir=results, start="next_free")
    record = chameleon.reserve("chameleon", **ask)
    out = capsys.readouterr().out
    starts = dt.datetime.fromisoformat(record.lease_start)
    _, free_from = cloud.booking()
    assert record.status == "booked" and abs(starts.replace(tzinfo=None) - free_from) < dt.timedelta(minutes=2)
    assert f"is BOOKED: 1x compute_gigaio from {starts:%Y-%m-%d %H:%M} UTC to " in out and ", 8 SU." in out
    (lease,) = cloud.live()["leases"]
    assert lease["status"] in ("CREATING", "PENDING") and not cloud.live()["servers"]
    assert chameleon.setup_node("chameleon", results) is None  # 00's next cell: nothing to install yet

    assert chameleon.reserve("chameleon", **ask).status == "booked"  # before the start: the same booking
    assert "is BOOKED" in capsys.readouterr().out and len(cloud.live()["leases"]) == 1 and not cloud.live()["servers"]

    later = dt.timedelta(days=2, hours=1, minutes=5)  # after the start
    cloud.advance(later)
    monkeypatch.setattr(chameleon, "_utcnow", lambda: dt.datetime.now(dt.timezone.utc) + later)
    record = chameleon.reserve("chameleon", **ask)
    assert record.status == "ready" and record.lease_id == lease["id"]  # the booked lease, picked up
    assert "reusing it" in capsys.readouterr().out and len(cloud.live()["servers"]) == 1
    chameleon.release("chameleon", state_dir=results)
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


def test_a_lease_booked_ahead_by_00_is_picked_up_by_its_second_run_all(chi_env, cloud, node_sshd, tmp_path):
    """The notebooks as a user runs them: Run All of 00 with start="next_free" books the window that opens in
    one to two minutes (every A100 at CHI@UC is taken until 75 s after 00 first looks, a whole minute later
    at Blazar's) and stops before installing; Run All of 00 after the start picks the booked lease up, boots
    and installs. Real time passes: the clocks agree."""
    cloud.booked = {"compute_gigaio", "gpu_a100_pcie", "gpu_a100_nvlink"}
    cloud.booked_after_first_look = dt.timedelta(seconds=75)  # more than the minute that counts as "now"
    results = tmp_path / "results"
    params = dict(target="chameleon", results_dir=str(results), site="CHI@UC", lease_hours=2, start="next_free")
    text = outputs(papermill("00_reserve_node.ipynb", tmp_path / "00a.ipynb", **params))
    record = json.loads((results / NODE_FILE).read_text())
    starts = dt.datetime.fromisoformat(record["lease_start"])
    assert record["status"] == "booked" and f"is BOOKED: 1x compute_gigaio from {starts:%Y-%m-%d %H:%M} UTC" in text
    assert "nothing to install until it starts" in text and not cloud.live()["servers"]
    time.sleep(max(0.0, (starts - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 2)  # until it starts
    text = outputs(papermill("00_reserve_node.ipynb", tmp_path / "00b.ipynb", **params))
    record = json.loads((results / NODE_FILE).read_text())
    assert "reusing it" in text and "node ready in" in text and record["status"] == "ready"
    assert record["lease_start"] == starts.isoformat() and len(cloud.live()["servers"]) == 1
    papermill("05_release_node.ipynb", tmp_path / "05.ipynb", target="chameleon", results_dir=str(results))
    assert cloud.live() == {"leases": [], "servers": [], "fips": []}


def test_a_start_in_the_past_or_not_a_time_is_refused_before_anything(tmp_path):
    with pytest.raises(UserError, match="is in the past"):
        chameleon.reserve("chameleon", state_dir=tmp_path, start="2020-01-01T00:00")
    with pytest.raises(UserError, match="is not 'now', 'next_free' or an ISO time"):
        chameleon.reserve("chameleon", state_dir=tmp_path, start="tomorrow")


def test_blazar_refuses_more_hosts_than_the_site_has_free(chi_here, cloud):
    chi_mod, _ = chameleon.connect("CHI@UC")
    with pytest.raises(UserError, match="Chameleon refused the lease: .*Not enough hosts available") as e:
        chameleon.create_lease(chi_mod, "three", "gpu_a100_pcie", 2, nodes=3)  # the site has 2
    assert "fewer than 3 nodes are free" in e.value.fix and "fewer lease_hours or nodes" in e.value.fix
    assert chameleon.create_lease(chi_mod, "two", "gpu_a100_pcie", 2, nodes=2)["name"] == "two"
    with pytest.raises(UserError, match="Not enough hosts available"):  # both are held now
        chameleon.create_lease(chi_mod, "one-more", "gpu_a100_pcie", 2)
    assert [lease["name"] for lease in cloud.live()["leases"]] == ["two"]


def test_estimate_for_two_nodes_of_four_a100s_prints_tokens_days_and_service_units(tmp_path, monkeypatch, capsys):
    from nanorepro import cli as nanorepro_cli
    from nanorepro import config, memory
    from nanorepro.data import dataset

    monkeypatch.chdir(tmp_path)  # no prepared data here: GPT-2's vocabulary, as on the hub
    argv = ["estimate", "--preset", "train-gpt2", "--nodes", "2", "--gpus", "4", "--gpu", "A100"]
    assert nanorepro_cli.main(argv) == 0
    out = capsys.readouterr().out
    cfg = config.resolve("train-gpt2", {"parallel": "ddp"})
    shape = cfg.model_config(dataset.GPT2_VOCAB_SIZE)
    secs = memory.estimate_seconds(cfg, shape, "A100", 8, "bfloat16", nodes=2)
    tokens = cfg.max_iters * cfg.tokens_per_iter
    assert "estimated as parallel=ddp over 8 processes" in out and "ddp x8" in out
    assert f"on 8x A100 (2 nodes x 4; {memory.INTER_NODE_EFFICIENCY:.0%} of the one-node rate per GPU" in out
    assert f"throughput: ~{tokens / secs:,.0f} tokens/s" in out and f"in {secs / 86400:.2f} days" in out
    assert f"Chameleon: ~{secs / 3600 * 2 * 16:,.0f} SU ({secs / 3600:,.1f} h x 2 nodes x 16 SU per node-hour: " \
           "gpu_a100_pcie's rate, Chameleon's published rates" in out
    # the same eight GPUs on one node: no inter-node loss
    one_node = memory.estimate_seconds(cfg, shape, "A100", 8, "bfloat16")
    assert one_node / secs == pytest.approx(memory.INTER_NODE_EFFICIENCY)
