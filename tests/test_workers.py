import gc
import os

from palm.data.workers import frozen_heap


def test_a_process_forked_in_a_frozen_heap_keeps_it_frozen_and_the_parent_gets_it_back():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what it inherited stays out of its collector's reach
            gc.collect()
            os.write(write, b"1" if gc.get_freeze_count() > 0 else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"
    assert gc.get_freeze_count() == 0


def test_a_heap_the_caller_froze_stays_frozen():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
