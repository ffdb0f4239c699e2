import gc

from asyncproc import runtime


def test_the_young_generation_is_collected_less_often_and_the_older_ones_as_before():
    before = gc.get_threshold()
    try:
        runtime.tune_gc()
        assert gc.get_threshold() == (runtime.GC_YOUNG_THRESHOLD, before[1], before[2])
        assert runtime.GC_YOUNG_THRESHOLD > before[0]
    finally:
        gc.set_threshold(*before)
