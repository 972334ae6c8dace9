"""``python -m tests.integration.worker_with_stale_metadata process <stage>``: the real
worker, except that its consumer's view of the cluster shows the stage's changelog
topic with 0 partitions, as the group leader's metadata does when it is behind the
brokers' (Faust then refuses the first table write with PartitionsMismatch)."""

from aiokafka.consumer.group_coordinator import BaseCoordinator

from ktel.cli import main

behind = BaseCoordinator._get_metadata_snapshot


def snapshot_behind(self):
    return {topic: 0 if topic.endswith("-changelog") else n for topic, n in behind(self).items()}


BaseCoordinator._get_metadata_snapshot = snapshot_behind  # type: ignore[method-assign]
main()
