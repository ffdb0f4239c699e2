import gc

from asyncproc import runtime


def test_the_young_generation_is_collected_less_often_and_the_older_ones_as_before():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)   # CPython's default for the young one (another test may have tuned it)
        runtime.tune_gc()
        assert gc.get_threshold() == (runtime.GC_YOUNG_THRESHOLD, 11, 12)
        assert runtime.GC_YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)
