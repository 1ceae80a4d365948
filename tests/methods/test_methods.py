"""Every registered method against one contract, and the kernel/TracIn formulas against numpy."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from diffattr.errors import (
    ConfigError,
    DataError,
    StoreCorruptError,
    StoreMismatchError,
    UnknownMethodError,
)
from diffattr.features import FeatureStore, OutputConfig
from diffattr.methods import (
    DAS,
    DTRAK,
    EKFAC,
    KFAC,
    METHODS,
    SIGN_CONVENTION,
    TRAK,
    AttributionMethod,
    DASConfig,
    DTRAKConfig,
    GradCos,
    GradDot,
    GradSimConfig,
    InfluenceConfig,
    KernelConfig,
    ReTrac,
    Scores,
    TracIn,
    TracInConfig,
    TRAKConfig,
    fit_kernel,
    get_method,
)
from diffattr.models import default_scheduler_config

from .helpers import BASE, BASE64, DATASETS, PLAN, PROJECTION, StoreFactory, features_of


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> StoreFactory:
    return StoreFactory(tmp_path_factory.mktemp("method-stores"))


def assert_scores_close(got: np.ndarray, expected: np.ndarray) -> None:
    # Scores are stored as float32.
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------------- the contract


class MethodContract:
    """What every attribution method must do; subclasses say which method via :meth:`make`."""

    def make(self) -> AttributionMethod:
        raise NotImplementedError

    @pytest.fixture
    def setup(self, stores: StoreFactory) -> dict:
        method = self.make()
        features = method.features(BASE)
        return {
            "method": method,
            "features": features,
            "train": stores(features, "train"),
            "query": stores(features, "query"),
        }

    @pytest.fixture
    def scores(self, setup: dict) -> Scores:
        return setup["method"].fit(setup["train"]).score(setup["query"])

    def test_is_registered(self) -> None:
        method = self.make()
        assert METHODS[method.name] is type(method)
        assert get_method(method.name) is type(method)

    def test_features_keep_plan_and_projection(self) -> None:
        features = self.make().features(BASE)
        assert features.plan == BASE.plan
        assert features.projection == BASE.projection
        assert features.dtype == BASE.dtype

    def test_score_shape_and_ids(self, setup: dict, scores: Scores) -> None:
        assert scores.values.shape == (setup["query"].n, setup["train"].n)
        assert scores.values.dtype == np.float32
        assert np.isfinite(scores.values).all()
        np.testing.assert_array_equal(scores.query_ids, setup["query"].ids)
        np.testing.assert_array_equal(scores.train_ids, setup["train"].ids)
        assert scores.method == setup["method"].name
        assert scores.settings["checkpoints"] == ["checkpoint-0"]
        assert scores.settings["features"] == setup["train"].settings["features"]
        assert np.abs(scores.values).max() > 0

    def test_deterministic(self, setup: dict, scores: Scores) -> None:
        again = self.make().fit(setup["train"]).score(setup["query"])
        np.testing.assert_array_equal(again.values, scores.values)
        # Refitting the same instance gives the same result too.
        refit = setup["method"].fit(setup["train"]).score(setup["query"])
        np.testing.assert_array_equal(refit.values, scores.values)

    def test_save_load_round_trip(self, scores: Scores, tmp_path: Path) -> None:
        scores.save(tmp_path / "scores")
        loaded = Scores.load(tmp_path / "scores")
        np.testing.assert_array_equal(loaded.values, scores.values)
        np.testing.assert_array_equal(loaded.query_ids, scores.query_ids)
        np.testing.assert_array_equal(loaded.train_ids, scores.train_ids)
        assert loaded.method == scores.method
        assert loaded.settings == scores.settings

    def test_corrupted_scores_file_is_detected(self, scores: Scores, tmp_path: Path) -> None:
        directory = scores.save(tmp_path / "scores")
        data = bytearray((directory / "scores.npy").read_bytes())
        data[-3] ^= 0x40  # a bit of the last score
        (directory / "scores.npy").write_bytes(bytes(data))
        with pytest.raises(StoreCorruptError):
            Scores.load(directory)

    def test_score_before_fit_is_config_error(self, setup: dict) -> None:
        with pytest.raises(ConfigError, match="fit"):
            self.make().score(setup["query"])

    def test_query_with_other_plan_seed_is_refused(self, setup: dict, stores: StoreFactory) -> None:
        other = replace(setup["features"], plan=replace(PLAN, seed=PLAN.seed + 1))
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError):
            method.score(stores(other, "query"))

    def test_query_with_other_projection_is_refused(
        self, setup: dict, stores: StoreFactory
    ) -> None:
        other = replace(setup["features"], projection=replace(PROJECTION, seed=PROJECTION.seed + 1))
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError):
            method.score(stores(other, "query"))

    def test_query_from_other_checkpoint_is_refused(
        self, setup: dict, stores: StoreFactory
    ) -> None:
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError, match="model_id"):
            method.score(stores(setup["features"], "query", checkpoint=1))

    def test_store_with_wrong_output_kind_is_refused(
        self, setup: dict, stores: StoreFactory
    ) -> None:
        kind = "mean" if setup["features"].output.kind == "loss" else "loss"
        wrong = replace(setup["features"], output=OutputConfig(kind=kind))
        with pytest.raises(StoreMismatchError, match="output"):
            self.make().fit(stores(wrong, "train"))
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError):
            method.score(stores(wrong, "query"))

    def test_query_store_count_must_match_checkpoints(self, setup: dict) -> None:
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError):
            method.score([setup["query"], setup["query"]])

    def test_fit_needs_a_store(self) -> None:
        with pytest.raises(ConfigError):
            self.make().fit([])

    def test_top_k_orders_proponents_and_opponents(self, scores: Scores) -> None:
        for row, query_id in enumerate(scores.query_ids):
            values = dict(zip(scores.train_ids.tolist(), scores.values[row].tolist(), strict=True))
            proponents, opponents = scores.top_k(int(query_id), k=4)
            assert len(proponents) == len(opponents) == 4
            top = [values[int(i)] for i in proponents]
            bottom = [values[int(i)] for i in opponents]
            assert top == sorted(top, reverse=True)
            assert bottom == sorted(bottom)
            ordered = np.sort(scores.values[row])
            np.testing.assert_array_equal(top, ordered[::-1][:4])
            np.testing.assert_array_equal(bottom, ordered[:4])
        everything, _ = scores.top_k(int(scores.query_ids[0]), k=1000)
        assert sorted(everything.tolist()) == sorted(scores.train_ids.tolist())

    def test_top_k_of_unknown_query_is_data_error(self, scores: Scores) -> None:
        with pytest.raises(DataError, match="123456"):
            scores.top_k(123456)


class TestDAS(MethodContract):
    def make(self) -> AttributionMethod:
        return DAS()


class TestDASOutputProjection(MethodContract):
    def make(self) -> AttributionMethod:
        return DAS(DASConfig(output="output_projection", num_directions=3))


class TestTRAK(MethodContract):
    def make(self) -> AttributionMethod:
        return TRAK()


class TestDTRAK(MethodContract):
    def make(self) -> AttributionMethod:
        return DTRAK()


class TestTracIn(MethodContract):
    def make(self) -> AttributionMethod:
        return TracIn()


class TestReTrac(MethodContract):
    def make(self) -> AttributionMethod:
        return ReTrac()


class TestGradDot(MethodContract):
    def make(self) -> AttributionMethod:
        return GradDot()


class TestGradCos(MethodContract):
    def make(self) -> AttributionMethod:
        return GradCos()


class CurvatureContract(MethodContract):
    """Methods that featurise with the model: their stores come from their own featurizer."""

    @pytest.fixture
    def setup(self, stores: StoreFactory) -> dict:
        method = self.make()
        features = method.features(BASE)
        featurize = method.featurizer(
            stores.model(0),
            default_scheduler_config(),
            DATASETS["train"],
            features,
            stores.root / "curvature-runs",
            model_id="checkpoint-0",
            batch_size=4,
            chunk_size=8,
            progress=False,
        )
        return {
            "method": method,
            "features": features,
            "train": featurize(DATASETS["train"], "train"),
            "query": featurize(DATASETS["query"], "query"),
        }

    def test_features_keep_plan_and_projection(self) -> None:
        features = self.make().features(BASE)
        assert features.plan == BASE.plan
        assert (features.projection.dim, features.projection.seed) == (16, 2)
        assert features.projection.kind == "kronecker"
        assert features.dtype == BASE.dtype

    def test_query_with_other_projection_is_refused(
        self, setup: dict, stores: StoreFactory
    ) -> None:
        projection = setup["features"].projection
        other = replace(setup["features"], projection=replace(projection, dim=12))
        method = setup["method"].fit(setup["train"])
        with pytest.raises(StoreMismatchError):
            method.score(stores(other, "query"))

    def test_engine_features_are_refused(self, stores: StoreFactory) -> None:
        # Random Kronecker features with the right output are not preconditioned.
        features = self.make().features(BASE)
        with pytest.raises(StoreMismatchError, match="preconditioned"):
            self.make().fit(stores(features, "train"))


class TestKFAC(CurvatureContract):
    def make(self) -> AttributionMethod:
        return KFAC(InfluenceConfig(route="projected"))


class TestEKFAC(CurvatureContract):
    def make(self) -> AttributionMethod:
        return EKFAC()


class TestDASWithCurvature(CurvatureContract):
    def make(self) -> AttributionMethod:
        return DAS(DASConfig(curvature="ekfac"))


def test_every_registered_method_has_a_contract_test() -> None:
    contracts = [*MethodContract.__subclasses__(), *CurvatureContract.__subclasses__()]
    covered = {cls().make().name for cls in contracts if cls is not CurvatureContract}
    # Journey-TRAK and unlearning need the model itself, not stores: their own test files
    # (test_journey.py, test_unlearn.py) cover them.
    own_tests = {"journey-trak", "unlearn"}
    gradient = {n for n, cls in METHODS.items() if issubclass(cls, AttributionMethod)}
    assert own_tests <= gradient
    assert covered == gradient - own_tests


def test_retrac_refuses_unnormalised_features(stores: StoreFactory) -> None:
    tracin_train = stores(TracIn().features(BASE), "train")
    assert tracin_train.settings["features"]["normalize"] is False
    with pytest.raises(StoreMismatchError, match="normalize"):
        ReTrac().fit(tracin_train)


def test_backends_give_the_same_scores_and_are_never_mixed(stores: StoreFactory) -> None:
    kronecker = replace(BASE, projection=replace(PROJECTION, kind="kronecker"), backend="vmap")
    factored = replace(kronecker, backend="factored")
    by_vmap = DAS().fit(stores(kronecker, "train")).score(stores(kronecker, "query"))
    method = DAS().fit(stores(factored, "train"))
    assert_scores_close(method.score(stores(factored, "query")).values, by_vmap.values)
    with pytest.raises(StoreMismatchError, match="features"):
        method.score(stores(kronecker, "query"))


def test_method_rejects_config_of_another_method() -> None:
    with pytest.raises(ConfigError):
        DAS(TRAKConfig())


def test_fit_refuses_checkpoints_with_different_training_ids(stores: StoreFactory) -> None:
    features = TRAK().features(BASE)
    first = stores(features, "train", checkpoint=0)
    subset = DATASETS["train"].select(DATASETS["train"].ids[:-1])
    other = stores(features, "train", checkpoint=1, dataset=subset)
    with pytest.raises(StoreMismatchError):
        TRAK().fit([first, other])


def test_ensemble_refuses_query_stores_with_different_ids(stores: StoreFactory) -> None:
    # Each checkpoint's query store must hold the same queries in the same rows; otherwise the
    # average mixes the scores of different queries.
    features = TRAK().features(BASE)
    query = DATASETS["query"]
    permuted = query.select(query.ids[::-1])
    method = TRAK().fit([stores(features, "train", checkpoint=c) for c in (0, 1)])
    with pytest.raises(StoreMismatchError):
        method.score(
            [
                stores(features, "query", checkpoint=0),
                stores(features, "query", checkpoint=1, dataset=permuted),
            ]
        )


def test_settings_survive_save_and_load_with_tuple_config(
    stores: StoreFactory, tmp_path: Path
) -> None:
    method = TracIn(TracInConfig(learning_rates=(0.5, 2.0)))
    features = method.features(BASE)
    train = [stores(features, "train", checkpoint=c) for c in (0, 1)]
    query = [stores(features, "query", checkpoint=c) for c in (0, 1)]
    scores = method.fit(train).score(query)
    loaded = Scores.load(scores.save(tmp_path / "scores"))
    assert loaded.settings == scores.settings


# ---------------------------------------------------------------------- Scores


def test_scores_with_nan_or_inf_are_data_error() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(DataError, match="NaN"):
            Scores(values=np.array([[1.0, bad]]), query_ids=[1], train_ids=[2, 3], method="x")


def test_scores_of_wrong_shape_or_repeated_ids_are_data_error() -> None:
    with pytest.raises(DataError):
        Scores(values=np.zeros((2, 2)), query_ids=[1], train_ids=[2, 3], method="x")
    with pytest.raises(DataError):
        Scores(values=np.zeros((1, 2)), query_ids=[1], train_ids=[2, 2], method="x")


def test_saved_scores_record_the_sign_convention(tmp_path: Path) -> None:
    scores = Scores(values=np.ones((1, 2)), query_ids=[1], train_ids=[2, 3], method="x")
    meta = json.loads((scores.save(tmp_path) / "scores.json").read_text())
    assert meta["sign_convention"] == SIGN_CONVENTION


# ---------------------------------------------------------------------- numerical oracles


def kernel_scores(train: np.ndarray, query: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """phi_q^T (Phi^T Phi + lambda I)^-1 phi_i, lambda = damping * trace(Phi^T Phi) / k."""
    phi, q = train[:, 0], query[:, 0]
    gram = phi.T @ phi
    k = gram.shape[0]
    lam = damping * np.trace(gram) / k
    return q @ np.linalg.solve(gram + lam * np.eye(k), phi.T), lam


@pytest.mark.parametrize("damping", [1e-2, 1.0])
@pytest.mark.parametrize(
    ("method_cls", "config_cls"), [(TRAK, TRAKConfig), (DTRAK, DTRAKConfig)], ids=["trak", "dtrak"]
)
def test_kernel_scores_equal_dense_formula(
    stores: StoreFactory, method_cls: type, config_cls: type, damping: float
) -> None:
    method = method_cls(config_cls(damping=damping))
    features = method.features(BASE64)
    train, query = stores(features, "train"), stores(features, "query")
    scores = method.fit(train).score(query)
    expected, lam = kernel_scores(features_of(train), features_of(query), damping)
    assert_scores_close(scores.values, expected)
    assert scores.settings["lambda"] == [pytest.approx(lam, rel=1e-10)]
    gram = features_of(train)[:, 0].T @ features_of(train)[:, 0]
    assert scores.settings["mean_eigenvalue"] == [
        pytest.approx(np.trace(gram) / PROJECTION.dim, rel=1e-10)
    ]
    assert scores.settings["config"]["damping"] == damping


@pytest.mark.parametrize("transform", ["squared", "signed_square"])
@pytest.mark.parametrize("method_cls", [TRAK, DTRAK], ids=["trak", "dtrak"])
def test_kernel_transforms_apply_to_the_linear_scores(
    stores: StoreFactory, method_cls: type, transform: str
) -> None:
    method = method_cls(method_cls.config_cls(transform=transform))
    features = method.features(BASE64)
    train, query = stores(features, "train"), stores(features, "query")
    linear, _ = kernel_scores(features_of(train), features_of(query), 1e-2)
    expected = linear**2 if transform == "squared" else np.sign(linear) * linear**2
    assert_scores_close(method.fit(train).score(query).values, expected)
    assert (expected < 0).any() == (transform == "signed_square")


def test_fit_kernel_lambda_and_leverage(stores: StoreFactory) -> None:
    features = features_of(stores(DAS().features(BASE64), "train"))
    kernel = fit_kernel(features, 0.05)
    phi = features[:, 0]
    gram = phi.T @ phi
    assert kernel.lam == pytest.approx(0.05 * np.trace(gram) / phi.shape[1], rel=1e-12)
    assert kernel.mean_eigenvalue == pytest.approx(np.trace(gram) / phi.shape[1], rel=1e-12)
    solved = kernel.solve(phi.T)
    np.testing.assert_allclose(
        solved, np.linalg.solve(gram + kernel.lam * np.eye(len(gram)), phi.T), rtol=1e-8
    )
    leverage = np.einsum("ik,ki->i", phi, solved)
    assert (leverage >= 0).all()
    assert (leverage < 1).all()


def test_fit_kernel_singular_without_damping_is_config_error() -> None:
    features = np.zeros((4, 1, 3))
    features[:, 0, 0] = 1.0  # rank 1 of 3
    with pytest.raises(ConfigError, match="damping"):
        fit_kernel(features, 0.0)


def dot(train: FeatureStore, query: FeatureStore) -> np.ndarray:
    q = features_of(query).reshape(query.n, -1)
    return q @ features_of(train).reshape(train.n, -1).T


def test_tracin_sums_learning_rate_weighted_dots_over_checkpoints(stores: StoreFactory) -> None:
    method = TracIn(TracInConfig(learning_rates=(0.5, 2.0)))
    features = method.features(BASE64)
    train = [stores(features, "train", checkpoint=c) for c in (0, 1)]
    query = [stores(features, "query", checkpoint=c) for c in (0, 1)]
    scores = method.fit(train).score(query)
    expected = 0.5 * dot(train[0], query[0]) + 2.0 * dot(train[1], query[1])
    assert_scores_close(scores.values, expected)
    assert scores.settings["checkpoints"] == ["checkpoint-0", "checkpoint-1"]
    # Without learning rates: a plain sum.
    plain = TracIn().fit(train).score(query)
    assert_scores_close(plain.values, dot(train[0], query[0]) + dot(train[1], query[1]))


@pytest.mark.parametrize("rates", [(1.0,), (1.0, 2.0, 3.0)])
def test_tracin_with_wrong_number_of_learning_rates_is_config_error(
    stores: StoreFactory, rates: tuple[float, ...]
) -> None:
    method = TracIn(TracInConfig(learning_rates=rates))
    features = method.features(BASE64)
    train = [stores(features, "train", checkpoint=c) for c in (0, 1)]
    query = [stores(features, "query", checkpoint=c) for c in (0, 1)]
    with pytest.raises(ConfigError, match="learning rates"):
        method.fit(train).score(query)


def test_retrac_and_grad_dot_are_dots_of_their_features(stores: StoreFactory) -> None:
    for method in (ReTrac(), GradDot()):
        features = method.features(BASE64)
        train, query = stores(features, "train"), stores(features, "query")
        assert_scores_close(method.fit(train).score(query).values, dot(train, query))


def test_grad_cos_is_cosine_of_features(stores: StoreFactory) -> None:
    method = GradCos()
    features = method.features(BASE64)
    train, query = stores(features, "train"), stores(features, "query")
    phi = features_of(train)[:, 0]
    q = features_of(query)[:, 0]
    expected = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        phi / np.linalg.norm(phi, axis=1, keepdims=True)
    ).T
    scores = method.fit(train).score(query).values
    assert_scores_close(scores, expected)
    assert np.abs(scores).max() <= 1 + 1e-6


@pytest.mark.parametrize(
    "method",
    [DAS(), TRAK(), DAS(DASConfig(output="output_projection", num_directions=3))],
    ids=["das", "trak", "das-projection3"],
)
def test_ensemble_is_mean_of_single_checkpoint_scores(
    stores: StoreFactory, method: AttributionMethod
) -> None:
    features = method.features(BASE64)
    train = [stores(features, "train", checkpoint=c) for c in (0, 1)]
    query = [stores(features, "query", checkpoint=c) for c in (0, 1)]
    single = [
        type(method)(method.config).fit(t).score(q).values.astype(np.float64)
        for t, q in zip(train, query, strict=True)
    ]
    ensemble = method.fit(train).score(query)
    assert_scores_close(ensemble.values, (single[0] + single[1]) / 2)
    assert len(ensemble.settings["lambda"]) == 2
    with pytest.raises(StoreMismatchError):
        method.score(query[::-1])  # each checkpoint's queries with its own training features


def das_parts(
    train: FeatureStore, query: FeatureStore, damping: float
) -> tuple[np.ndarray, np.ndarray]:
    """Linear kernel scores (q, N) and leverages h_ii (N,) of r = 1 features."""
    linear, lam = kernel_scores(features_of(train), features_of(query), damping)
    phi = features_of(train)[:, 0]
    solved = np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T)
    return linear, np.einsum("ik,ki->i", phi, solved)


@pytest.mark.parametrize("transform", ["squared", "linear", "signed_square"])
def test_das_without_leverage_or_residual_is_trak_formula(
    stores: StoreFactory, transform: str
) -> None:
    method = DAS(DASConfig(leverage=False, residual="none", transform=transform))
    features = method.features(BASE64)
    assert features.normalize is True
    assert features.output.kind == "mean"
    train, query = stores(features, "train"), stores(features, "query")
    linear, _ = das_parts(train, query, 1e-2)
    expected = {
        "squared": linear**2,
        "linear": linear,
        "signed_square": np.sign(linear) * linear**2,
    }[transform]
    assert_scores_close(method.fit(train).score(query).values, expected)


def test_das_rms_residual_with_leverage(stores: StoreFactory) -> None:
    method = DAS(DASConfig(residual="rms"))
    features = method.features(BASE64)
    train, query = stores(features, "train"), stores(features, "query")
    linear, leverage = das_parts(train, query, 1e-2)
    assert ((leverage >= 0) & (leverage < 1)).all()
    losses = np.asarray(train.array("losses"), dtype=np.float64)
    weight = np.sqrt(losses.mean(axis=1)) / (1 - leverage)
    assert_scores_close(method.fit(train).score(query).values, (linear * weight) ** 2)


def test_das_reference_residual(stores: StoreFactory) -> None:
    method = DAS(DASConfig(residual="reference", leverage=False, transform="linear"))
    features = method.features(BASE64)
    train, query = stores(features, "train"), stores(features, "query")
    linear, _ = das_parts(train, query, 1e-2)
    root = np.sqrt(np.asarray(train.array("losses"), dtype=np.float64))
    weight = (root / np.linalg.norm(root, axis=1, keepdims=True)).mean(axis=1)
    assert_scores_close(method.fit(train).score(query).values, linear * weight)


@pytest.mark.parametrize("normalize", [True, False])
def test_das_signed_residual(stores: StoreFactory, normalize: bool) -> None:
    method = DAS(DASConfig(transform="linear", residual="signed"))
    features = method.features(replace(BASE64, normalize=normalize))
    train, query = stores(features, "train"), stores(features, "query")
    linear, leverage = das_parts(train, query, 1e-2)
    residuals = np.asarray(train.array("residuals"), dtype=np.float64)[..., 0]  # (N, K)
    if normalize:
        residuals = residuals / np.asarray(train.array("grad_norms"), dtype=np.float64)
    weight = residuals.mean(axis=1) / (1 - leverage)
    assert_scores_close(method.fit(train).score(query).values, linear * weight)


def test_das_residual_default_is_rms_with_one_output_and_signed_with_several() -> None:
    assert DASConfig().residual == "rms"
    assert DASConfig(output="output_projection", num_directions=1).residual == "rms"
    assert DASConfig(output="output_projection", num_directions=3).residual == "signed"
    assert DASConfig(residual="none").residual == "none"


def test_das_output_projection_formula(stores: StoreFactory) -> None:
    damping = 1e-2
    method = DAS(DASConfig(output="output_projection", num_directions=3, damping=damping))
    features = method.features(BASE64)
    assert features.output.num_outputs == 3
    train, query = stores(features, "train"), stores(features, "query")
    jac, jac_q = features_of(train), features_of(query)  # (N, 3, k), (q, 3, k)
    k = jac.shape[-1]
    gram = np.einsum("irk,irl->kl", jac, jac)
    lam = damping * np.trace(gram) / k
    kernel = gram + lam * np.eye(k)
    residuals = np.asarray(train.array("residuals"), dtype=np.float64)  # (N, K, 3)
    norms = np.asarray(train.array("grad_norms"), dtype=np.float64)  # (N, K)
    rho = (residuals / norms[..., None]).mean(axis=1)  # (N, 3)
    expected = np.empty((len(jac_q), len(jac)))
    for i, j_i in enumerate(jac):
        solved = np.linalg.solve(kernel, j_i.T)  # (k, 3) = K^-1 J_i^T
        leverage = j_i @ solved  # (3, 3)
        eigenvalues = np.linalg.eigvalsh((leverage + leverage.T) / 2)
        assert (eigenvalues >= -1e-12).all()
        assert (eigenvalues < 1).all()
        direction = solved @ np.linalg.solve(np.eye(3) - leverage, rho[i])  # (k,)
        change = jac_q @ direction  # (q, 3)
        expected[:, i] = (change**2).sum(axis=1)
    scores = method.fit(train).score(query)
    assert_scores_close(scores.values, expected)
    assert scores.settings["lambda"] == [pytest.approx(lam, rel=1e-10)]


# ---------------------------------------------------------------------- registry and configs


def test_registry() -> None:
    assert get_method("das") is DAS
    assert set(METHODS) == {
        "das",
        "dtrak",
        "trak",
        "tracin",
        "retrac",
        "grad-dot",
        "grad-cos",
        "kfac",
        "ekfac",
        "nda",
        "pixel-cos",
        "random",
        "journey-trak",
        "unlearn",
    }
    for name, cls in METHODS.items():
        assert cls.name == name
        assert get_method(name) is cls


def test_unknown_method_lists_the_names() -> None:
    with pytest.raises(UnknownMethodError) as info:
        get_method("influence-magic")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "influence-magic" in message
    for name in METHODS:
        assert name in message


@pytest.mark.parametrize(
    "changes",
    [
        {"residual": "rms", "output": "output_projection", "num_directions": 3},
        {"residual": "reference", "output": "output_projection", "num_directions": 2},
        {"residual": "none", "output": "output_projection", "num_directions": 2},
        {"transform": "linear", "output": "output_projection", "num_directions": 3},
        {"transform": "signed_square", "output": "output_projection", "num_directions": 3},
        {"damping": -1e-3},
        {"damping": float("nan")},
        {"transform": "cubed"},
        {"residual": "bogus"},
        {"output": "loss"},
    ],
)
def test_invalid_das_config_is_config_error(changes: dict) -> None:
    with pytest.raises(ConfigError):
        DASConfig(**changes)


def test_das_config_with_one_direction_allows_every_form() -> None:
    config = DASConfig(output="output_projection", num_directions=1, residual="rms")
    assert config.transform == "squared"
    DASConfig(output="output_projection", num_directions=1, transform="linear")


@pytest.mark.parametrize("config_cls", [KernelConfig, TRAKConfig, DTRAKConfig])
@pytest.mark.parametrize("changes", [{"damping": -1.0}, {"transform": "cubed"}])
def test_invalid_kernel_config_is_config_error(config_cls: type, changes: dict) -> None:
    with pytest.raises(ConfigError):
        config_cls(**changes)


@pytest.mark.parametrize("rates", [(-1.0,), (float("nan"),), (float("inf"), 1.0)])
def test_invalid_learning_rates_are_config_error(rates: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError):
        TracInConfig(learning_rates=rates)


def test_gradient_similarity_takes_its_own_config() -> None:
    assert GradDot(GradSimConfig()).features(BASE).output.kind == "loss"
    with pytest.raises(ConfigError):
        GradCos(TracInConfig())
