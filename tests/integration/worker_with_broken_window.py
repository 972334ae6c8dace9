"""``python -m tests.integration.worker_with_broken_window process <stage>``: the real
worker, except that its window work raises, which crashes its Faust app (a timer's
exception is the app's)."""

from ktel.cli import main
from processors.chain import Chain


def broken_window(self, *args, **kwargs):
    raise ValueError("a window broke")


Chain.on_window = broken_window  # type: ignore[method-assign]
main()
