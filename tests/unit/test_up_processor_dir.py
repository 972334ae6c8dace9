"""`ktel up` keeps its worker's on-disk table copies with its own Kafka."""

from __future__ import annotations

from ktel import config
from ktel.up import Stack


def test_the_worker_of_ktel_up_keeps_its_tables_under_the_stacks_data_dir(tmp_path):
    cfg = config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=tmp_path))
    env = Stack(cfg).child_env()
    # Not process.data_dir's default, shared by every stack on the machine: a copy of
    # another stack's changelog would not match this stack's Kafka.
    assert env["KTEL_PROCESS__DATA_DIR"] == str(tmp_path / "processor")
