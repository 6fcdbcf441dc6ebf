"""The package's threads still running: leaks, after a load has ended or failed. The threads of
the lanes kept between loads (``loader.lanes``: the host backend's lanes are threads) are not
leaks and are left out; a load's own lanes that were not kept are counted."""

import threading

from gguf_gpu_lab.loader import lanes


def lab_threads() -> set[str]:
    kept = lanes.kept_threads()
    return {t.name for t in threading.enumerate() if t.name.startswith("gguf-lab") and t not in kept}
