import pytest

from distrain.env import detect
from distrain.env.slurm import port_for_job
from distrain.errors import ConfigError


def test_single_process_by_default():
    info = detect({})
    assert (info.rank, info.world_size, info.source) == (0, 1, "single") and not info.distributed


def test_torchrun_variables():
    info = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert (info.master_addr, info.master_port, info.source) == ("10.0.0.1", 1234, "torchelastic")


def test_slurm_srun_task_per_worker():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    info = detect(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (5, 1, 8, 4)
    assert info.master_addr == "gpu07" and info.master_port == port_for_job("4242") and info.source == "slurm"


def test_torchrun_inside_slurm_wins():
    env = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert detect(env).source == "torchelastic"


def test_batch_script_without_srun_is_single():
    assert detect({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


@pytest.mark.parametrize("env, key", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_JOB_NODELIST": "n1"}, "SLURM_NTASKS"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
      "SLURM_LOCALID": "0"}, "SLURM_JOB_NODELIST"),
])
def test_half_set_environments_name_the_variable(env, key):
    with pytest.raises(ConfigError) as info:
        detect(env)
    assert key in str(info.value)


def test_job_port_is_stable_and_in_range():
    assert port_for_job("123") == port_for_job("123") and 20000 <= port_for_job("98765432101") < 40000
