"""ray_init's runtime env: the job's env_vars win (no merge conflict), multicast-off defaults otherwise."""

from __future__ import annotations

import json

from ray.runtime_env import RuntimeEnv
from ray.runtime_env.runtime_env import _merge_runtime_env

from raydistill.stages.ray_init import JOB_CONFIG_VAR, MULTICAST_OFF, job_env_vars, worker_env


def _job(env_vars: dict[str, str] | None) -> str:
    runtime_env = {"working_dir": "."} | ({"env_vars": env_vars} if env_vars is not None else {})
    return json.dumps({"runtime_env": runtime_env, "metadata": {"job_submission_id": "x"}})


def test_defaults_outside_a_job_and_process_env_wins_over_defaults():
    env = worker_env({})
    assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF and env["TOKENIZERS_PARALLELISM"] == "false"
    assert worker_env({"TOKENIZERS_PARALLELISM": "true", "HF_HOME": "/h"}) == {
        **env, "TOKENIZERS_PARALLELISM": "true", "HF_HOME": "/h"}
    assert job_env_vars({}) == {} and job_env_vars({JOB_CONFIG_VAR: _job(None)}) == {}


def test_job_env_vars_win_and_merge_like_ray_without_conflict():
    job_vars = {"NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "true", "MY_FLAG": "1"}
    # What a driver started by `ray job submit` sees: the job config, and the job's variables already set.
    environ = {JOB_CONFIG_VAR: _job(job_vars), **job_vars}
    assert job_env_vars(environ) == job_vars
    ours = worker_env(environ)
    assert not set(ours) & set(job_vars)
    assert ours["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and ours["NVSHMEM_DISABLE_NVLS"] == "1"
    # Ray's own merge of the job's runtime env with the driver's (ray._private.worker.init) refuses overlaps.
    merged = _merge_runtime_env(RuntimeEnv(env_vars=job_vars), RuntimeEnv(env_vars=ours), override=False)
    assert merged is not None
    assert merged["env_vars"]["TOKENIZERS_PARALLELISM"] == "true"  # the job's value, not ours
    assert {k: merged["env_vars"][k] for k in MULTICAST_OFF} == MULTICAST_OFF
    # Before the fix the driver always sent its own values: Ray would have refused to start the job.
    assert _merge_runtime_env(RuntimeEnv(env_vars=job_vars), RuntimeEnv(env_vars=worker_env({})),
                              override=False) is None


def test_bad_job_config_is_no_env_vars():
    assert job_env_vars({JOB_CONFIG_VAR: "not json"}) == {}
