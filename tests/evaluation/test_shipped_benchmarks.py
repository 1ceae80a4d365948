"""The shipped LDS benchmarks open, reload their data, and reproduce their recorded results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffattr.evaluation import LDSBenchmark, lds_score
from diffattr.methods import pixel_cosine_scores

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["digits-mlp", "digits-lora", "digits-style"])
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
        # The reported part (all queries where there is no calibration split).
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


def test_the_style_benchmark_fine_tunes_a_style_with_two_seeds_and_a_calibration_split() -> None:
    benchmark = LDSBenchmark.open(BENCHMARKS / "digits-style")
    assert benchmark.init is not None
    assert benchmark.base.model_spec.without_lora() == benchmark.init.model_spec
    train = benchmark.train_data()
    assert train.source["style"] == "slant"
    assert all(p.startswith("a slanted handwritten ") for p in train.prompts)
    # The pretrained model saw the other half of the digits, upright, all ten classes.
    pretraining = benchmark.init.training_data()
    assert set(pretraining.labels.tolist()) == set(range(10))
    assert not set(pretraining.ids.tolist()) & set(train.ids.tolist())
    assert benchmark.config.model_seeds == 2
    assert benchmark.config.num_subsets >= 64
    for name, queries in benchmark.queries.items():
        calibration = benchmark.calibration_ids(name)
        assert len(calibration) == 30
        assert len(queries) - len(calibration) == 100
        assert benchmark.ground_truth(name).shape[1] == 2
