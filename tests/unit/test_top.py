"""`asyncproc top`'s pure parts: targets and histogram quantiles."""
import pytest

from asyncproc.tools import top


@pytest.mark.parametrize("target, url", [
    ("9090", "http://127.0.0.1:9090"),
    ("host:9100", "http://host:9100"),
    ("http://h:1/metrics", "http://h:1"),
    ("https://h/", "https://h"),
])
def test_target_forms(target, url):
    assert top.base_url(target) == url


def test_quantile_interpolates_like_promql():
    view = top.View("x")
    prev = top.parse('h_bucket{le="1"} 0\nh_bucket{le="2"} 0\nh_bucket{le="+Inf"} 0\n', 0)
    cur = top.parse('h_bucket{le="1"} 5\nh_bucket{le="2"} 10\nh_bucket{le="+Inf"} 10\n', 1)
    assert view.quantile(cur, prev, "h", 0.5) == 1.0
    assert view.quantile(cur, prev, "h", 0.75) == 1.5
    assert view.quantile(cur, None, "h", 0.5) is None
