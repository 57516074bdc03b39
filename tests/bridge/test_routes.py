"""The routes file (core.routes): parsing, validation naming route and field, the choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from core import routes
from core.settings import Settings

SETTINGS = Settings(ray_address="ray://fallback:10001", vllm_url="http://vllm:8000/v1",
                    vllm_concurrency=8, queue="agent_jobs")


def sample() -> Dict[str, Any]:
    return {"routes": [
        {"name": "old", "queue": "old_jobs", "ray_address": "ray://old:10001",
         "match": {"default": True},
         "vllm": {"endpoints": [{"url": "http://{node_ip}:8000/v1", "concurrency": 4}],
                  "node_resource": "vllm"}},
        {"name": "extract", "queue": "extract_jobs",
         "match": {"metadata": {"task_type": "TASK_EXTRACTION"}},
         "vllm": {"endpoints": [{"url": "http://a:8000/v1"}, {"url": "http://b:8000/v1"}]}},
        {"name": "big", "queue": "big_jobs", "ray_address": "ray://new:10001",
         "match": {"models": ["big-model"]},
         "vllm": {"endpoints": [{"url": "http://big:8000/v1", "concurrency": 2}]}},
    ]}


def test_without_a_file_one_default_route_of_the_single_route_settings() -> None:
    loaded = routes.load(SETTINGS)
    (route,) = loaded.all
    assert route == routes.Route(
        name="default", queue="agent_jobs", ray_address="ray://fallback:10001",
        endpoints=(routes.Endpoint("http://vllm:8000/v1", 8),), default=True)
    assert loaded.pick("any-model", {"task_type": "X"}) is route
    assert loaded.named("") is route


def test_a_file_is_read_with_its_defaults_filled(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(sample()))
    loaded = routes.load(Settings(routes_file=str(path), ray_address="ray://fallback:10001",
                                  vllm_concurrency=8))
    assert [r.name for r in loaded] == ["old", "extract", "big"]
    extract = loaded.named("extract")
    assert extract.ray_address == "ray://fallback:10001"
    assert extract.endpoints == (routes.Endpoint("http://a:8000/v1", 8),
                                 routes.Endpoint("http://b:8000/v1", 8))
    assert loaded.named("old").node_resource == "vllm"
    assert loaded.default is loaded.named("old")


def test_the_first_route_naming_a_request_takes_it_else_the_default() -> None:
    loaded = routes.parse(sample(), SETTINGS)
    assert loaded.pick("big-model", {}).name == "big"
    assert loaded.pick("m", {"task_type": "TASK_EXTRACTION"}).name == "extract"
    assert loaded.pick("big-model", {"task_type": "TASK_EXTRACTION"}).name == "extract"
    assert loaded.pick("m", {"task_type": "OTHER"}).name == "old"


def test_without_a_default_a_request_no_route_names_is_refused_with_what_it_asked() -> None:
    data = sample()
    data["routes"] = data["routes"][1:]
    loaded = routes.parse(data, SETTINGS)
    with pytest.raises(routes.NoRoute, match="no route takes model 'small' with metadata "
                                             "task_type=OTHER"):
        loaded.pick("small", {"task_type": "OTHER"})
    with pytest.raises(routes.RoutesError, match="no route named 'default'"):
        loaded.named("")
    with pytest.raises(routes.RoutesError, match=r"no route named 'nope' \(routes: big, extract\)"):
        loaded.named("nope")


def change(edit: Callable[[Dict[str, Any]], Any]) -> Dict[str, Any]:
    data = sample()
    edit(data)
    return data


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(routes=[]), "non-empty list 'routes'"),
    (lambda d: d["routes"][0].update(name="Bad_Name"), "route 0: field 'name' must be a DNS label"),
    (lambda d: d["routes"][1].update(name="old"),
     "route 'old': field 'name': old is also route 'old'"),
    (lambda d: d["routes"][1].update(queue="old_jobs"),
     "route 'extract': field 'queue': old_jobs is also route 'old'"),
    (lambda d: d["routes"][1].pop("queue"), "route 'extract': field 'queue' is required"),
    (lambda d: d["routes"][1]["match"].update(default=True), "only one may be match.default"),
    (lambda d: d["routes"][2].update(match={}), "route 'big': field 'match' names no model"),
    (lambda d: d["routes"][2]["match"].update(models="big-model"), "'match.models' must be a list"),
    (lambda d: d["routes"][1]["match"].update(metadata={"task_type": 1}),
     "'match.metadata' must map keys to string values"),
    (lambda d: d["routes"][2]["vllm"].update(endpoints=[]), "'vllm.endpoints' must be a non-empty"),
    (lambda d: d["routes"][2]["vllm"]["endpoints"][0].update(url="big:8000"),
     "route 'big': field 'vllm.endpoints[0].url' must be an http"),
    (lambda d: d["routes"][2]["vllm"]["endpoints"][0].update(concurrency=0),
     "field 'vllm.endpoints[0].concurrency' must be an integer >= 1"),
    (lambda d: d["routes"][1]["vllm"]["endpoints"][1].update(url="http://a:8000/v1"),
     "route 'extract': field 'vllm.endpoints' lists one url twice"),
    (lambda d: d["routes"][0].update(ray_address=5),
     "route 'old': field 'ray_address' must be a str"),
])
def test_a_bad_file_is_refused_naming_the_route_and_field(edit, expected: str) -> None:
    with pytest.raises(routes.RoutesError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        routes.parse(change(edit), SETTINGS)


def test_an_unreadable_file_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text("{not json")
    with pytest.raises(routes.RoutesError, match=f"RAY_EXECUTOR_ROUTES_FILE {path}: "):
        routes.load(Settings(routes_file=str(path)))
    with pytest.raises(routes.RoutesError, match="RAY_EXECUTOR_ROUTES_FILE /nonexistent"):
        routes.load(Settings(routes_file="/nonexistent/routes.json"))
