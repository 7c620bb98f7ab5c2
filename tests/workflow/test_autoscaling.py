"""Autoscaling with Ray's fake multi-node provider: a GPU worker node appears when a task asks for a GPU the
cluster lacks, runs it, and is removed once idle. Same mechanism as the cloud YAMLs (node types with
min_workers 0, idle timeout), on one machine: fake nodes are extra raylets on 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# A head with no GPU and one autoscaling "fake-gpu" node type; idle_timeout_minutes 0.1 = 6 s.
FAKE_CLUSTER = {
    "cluster_name": "raydistill-fake",
    "max_workers": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "fake-gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}

DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    alive = lambda: [n for n in ray.nodes() if n["Alive"]]
    out = {"nodes_before": len(alive()), "gpus_before": ray.cluster_resources().get("GPU", 0)}

    @ray.remote(num_gpus=1, num_cpus=0)
    def where():
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.get_gpu_ids()

    t0 = time.monotonic()
    node_id, gpu_ids = ray.get(where.remote(), timeout=150)
    out.update(up_s=round(time.monotonic() - t0, 1), task_node=node_id, gpu_ids=gpu_ids,
               nodes_during=len(alive()), head_node=ray.get_runtime_context().get_node_id())
    t0 = time.monotonic()
    while len(alive()) > 1 and time.monotonic() - t0 < 150:
        time.sleep(1)
    out.update(down_s=round(time.monotonic() - t0, 1), nodes_after=len(alive()))
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_fake_gpu_node_scales_up_on_demand_and_down_when_idle(ray_head_factory):
    head = ray_head_factory(num_cpus=1, token_auth=False, include_dashboard=False, autoscaling_config=FAKE_CLUSTER)
    proc = subprocess.run([sys.executable, "-c", DRIVER, head.address], env=head.env, capture_output=True,
                          text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{head.log_tail()}"
    r = json.loads(lines[-1][len("RESULT "):])
    print("autoscaling:", r)
    assert r["nodes_before"] == 1 and r["gpus_before"] == 0
    # The task ran on a new node (not the head) that the autoscaler launched for its GPU request...
    assert r["nodes_during"] == 2
    assert r["task_node"] != r["head_node"]
    assert r["gpu_ids"] == [0]
    # ...and the node went away after the idle timeout.
    assert r["nodes_after"] == 1, r
