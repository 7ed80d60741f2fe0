"""The API's short-lived lookup cache: answers kept for the ttl, misses never kept, forgetting at once."""

import time

from cloudml_os.cache import TtlCache


def test_an_answer_is_kept_for_the_ttl_and_a_miss_is_never_kept():
    cache, loads = TtlCache(ttl=0.2), []

    def load(value):
        def loader():
            loads.append(value)
            return value
        return loader

    assert cache.get("token", load("t1")) == "t1"
    assert cache.get("token", load("t2")) == "t1" and loads == ["t1"]
    time.sleep(0.25)
    assert cache.get("token", load("t2")) == "t2"
    assert cache.get("unknown", load(None)) is None and cache.get("unknown", load(None)) is None
    assert loads == ["t1", "t2", None, None]
    cache.forget("token")
    assert cache.get("token", load("t3")) == "t3"
    cache.clear()
    assert cache.get("token", load("t4")) == "t4"
