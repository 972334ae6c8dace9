"""The two rebalance holes processors/faust_app.py closes in Faust.

The SIGKILL test on the real broker (tests/integration/test_processing_stages.py)
is what found them; these pin down each fix on its own."""

import asyncio

from aiokafka import TopicPartition

from processors.faust_app import App, Consumer, FlowControl


def test_flow_control_clears_the_queues_only_when_it_resumes_from_suspended():
    async def run():
        app = App("ktel-test", broker="kafka://127.0.0.1:1")
        flow = app.flow_control  # suspended, as Faust's starts
        assert isinstance(flow, FlowControl)
        queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # as Faust makes a stream's
        queue.put_nowait("fetched before the rebalance")
        flow.resume()
        assert queue.empty()  # stale records go: they are fetched again from the committed offset
        queue.put_nowait("fetched after the seek")
        flow.resume()  # Faust's second resume at the end of a table recovery
        assert queue.qsize() == 1  # Faust's own FlowControlEvent drops this record for good
        flow.suspend()
        flow.resume()
        assert queue.empty()

    asyncio.run(run())


def test_partitions_without_a_committed_offset_are_sought_to_their_beginning():
    app = App("ktel-test", broker="kafka://127.0.0.1:1")
    changelog = app.Table("state", default=dict).changelog_topic.get_topic_name()
    app.topics.add(app.topic("ktel.raw"))  # as an agent subscribes at start
    asyncio.run(app.topics._update_indices())  # what the worker then does: ktel.raw is acked
    consumer = app.consumer
    assert isinstance(consumer, Consumer)
    committed = {
        TopicPartition("ktel.raw", 0): 17,
        TopicPartition("ktel.raw", 1): None,  # nothing committed yet
        TopicPartition("ktel.raw", 2): 0,  # aiokafka does not seek to 0 either
        TopicPartition(changelog, 1): None,  # recovery reads changelogs from its own offsets
        TopicPartition("ktel-test-__assignor-__leader", 0): None,  # Faust's own, never committed
    }
    sought: list[TopicPartition] = []

    class Thread:
        async def seek_to_committed(self):
            return committed

        async def seek_to_beginning(self, *tps):
            sought.extend(tps)
            return True

    consumer._thread = Thread()
    assert asyncio.run(consumer.seek_to_committed()) == committed
    assert sought == [TopicPartition("ktel.raw", 1), TopicPartition("ktel.raw", 2)]
