"""`asyncproc sim`'s hostile modes, seen from a plain HTTP client."""
import requests

from tests.harness import Sim


def test_hostile_modes_are_chosen_per_request_and_counted():
    sim = Sim()
    try:
        url = sim.url + "/v1/completions"
        answer = requests.post(url, json={"prompt": "x", "x_sim": {"hostile": "long"}}, timeout=5)
        assert answer.status_code == 200 and answer.json()["object"] == "text_completion"
        answer = requests.post(url, json={"prompt": "x", "x_sim": {"hostile": "huge", "bytes": 300000}}, timeout=5)
        assert answer.status_code == 200 and len(answer.content) == 300000
        try:
            requests.post(url, json={"prompt": "x", "x_sim": {"hostile": "short"}}, timeout=5)
            raise AssertionError("a body shorter than its Content-Length was accepted")
        except requests.exceptions.ChunkedEncodingError:
            pass
        scripted = {"prompt": "x", "x_sim": {"key": "s", "script": ["long", 503]}}
        assert requests.post(url, json=scripted, timeout=5).status_code == 200
        assert requests.post(url, json=scripted, timeout=5).status_code == 503
        answer = requests.post(url, json={"prompt": "x", "x_sim": {"hostile": "slowish"}}, timeout=5)
        assert answer.status_code == 400 and "unknown hostile mode 'slowish'" in answer.text
        by_status = sim.stats()["by_status"]
        assert by_status["hostile-long"] == 2 and by_status["hostile-huge"] == 1
        assert by_status["hostile-short"] == 1 and by_status["503"] == 1
    finally:
        sim.stop()
