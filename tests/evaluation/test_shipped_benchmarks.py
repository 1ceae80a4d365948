"""The shipped LDS benchmarks open, reload their data, and reproduce their recorded results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffattr.evaluation import LDSBenchmark, lds_score
from diffattr.methods import pixel_cosine_scores

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["digits-mlp", "digits-lora"])
def test_pixel_cosine_reproduces_the_recorded_lds(name: str) -> None:
    benchmark = LDSBenchmark.open(BENCHMARKS / name)
    train = benchmark.train_data()
    recorded = json.loads((BENCHMARKS / "results" / f"lds-{name}.json").read_text())
    expected = {
        row["query_set"]: row["lds"]
        for row in recorded["results"]
        if row["label"] == "pixel cosine"
    }
    assert set(expected) == set(benchmark.queries)
    for query_set, queries in benchmark.queries.items():
        scores = pixel_cosine_scores(queries, train)
        result = lds_score(benchmark, scores, query_set, n_bootstrap=10)
        assert result.lds == pytest.approx(expected[query_set], abs=1e-12)


def test_the_lora_benchmark_fine_tunes_its_shipped_pretrained_model() -> None:
    benchmark = LDSBenchmark.open(BENCHMARKS / "digits-lora")
    assert benchmark.init is not None
    assert benchmark.base.model_spec.lora is not None
    assert benchmark.base.model_spec.without_lora() == benchmark.init.model_spec
    train = benchmark.train_data()
    assert train.prompts is not None
    assert set(train.labels.tolist()) == {5, 6, 7, 8, 9}
    assert all(q.prompts is not None for q in benchmark.queries.values())
