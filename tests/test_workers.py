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


def test_a_heap_the_caller_froze_stays_frozen(monkeypatch):
    # Not a comparison of freeze counts: a frozen object that another thread lets go of (a server thread of
    # an earlier test) leaves the count meanwhile. What matters is that frozen_heap never thaws the heap.
    thawed = []
    unfreeze = gc.unfreeze
    monkeypatch.setattr(gc, "unfreeze", lambda: thawed.append(1) or unfreeze())
    gc.freeze()
    try:
        with frozen_heap():
            pass
        assert thawed == [] and gc.get_freeze_count() > 0
        with_nothing_frozen = []
    finally:
        unfreeze()
    with frozen_heap():
        with_nothing_frozen.append(gc.get_freeze_count())
    assert with_nothing_frozen[0] > 0 and thawed == [1] and gc.get_freeze_count() == 0  # its own freeze, undone
