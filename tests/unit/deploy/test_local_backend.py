"""The local backend against the in-memory admin API (``tests.support.fakes.FakeAdmin``)."""

import pytest

from deploy.local.server_backend import LocalBackend, loaded_versions
from deploy.ports import BackendError, RolloutBackend
from tests.support.fakes import AdminError, FakeAdmin


@pytest.fixture
def env():
    admin = FakeAdmin()
    admin.load("iris", 1)
    admin.set_traffic("iris", {1: 100})
    admin.calls.clear()
    b = LocalBackend(admin, now=lambda: 42.0, admin_errors=(AdminError, OSError))
    return b, admin


def test_is_a_rollout_backend(env):
    assert isinstance(env[0], RolloutBackend)


def test_read_reports_weights_loaded_and_samples(env):
    b, admin = env
    admin.serve("iris", 1, 10, errors=1)
    w = b.read("iris")
    assert w.error is None and dict(w.weights) == {1: 100} and w.loaded == {1}
    assert w.samples[1].requests == 10 and w.samples[1].server_errors == 1
    assert w.samples[1].at == 42.0


def test_unreachable_server_is_a_world_error_not_an_exception(env):
    b, admin = env
    admin.down = True
    w = b.read("iris")
    assert w.samples is None and "refused" in w.error


def test_writes_are_idempotent(env):
    b, admin = env
    b.ensure_loaded("iris", 2)
    b.ensure_loaded("iris", 2)
    b.set_weights("iris", {2: 10, 1: 90})
    b.set_weights("iris", {1: 90, 2: 10})
    assert admin.calls == [("load", "iris", 2), ("set_traffic", "iris", {1: 90, 2: 10})]


def test_promote_routes_everything_and_keeps_the_old_champion_loaded(env):
    b, admin = env
    b.ensure_loaded("iris", 2)
    b.promote("iris", 2)
    assert admin.weights["iris"] == {1: 0, 2: 100}
    assert admin.loaded["iris"] == {1, 2}
    b.retire("iris", 1)
    assert admin.loaded["iris"] == {2}
    b.retire("iris", 1)  # again: nothing to do


def test_rollback_restores_champion_and_unloads_candidate(env):
    b, admin = env
    b.ensure_loaded("iris", 2)
    b.set_weights("iris", {2: 50, 1: 50})
    b.rollback("iris", 1, 2)
    assert admin.weights["iris"] == {1: 100} and admin.loaded["iris"] == {1}
    b.rollback("iris", 1, 2)  # idempotent


def test_admin_errors_become_backend_errors_with_cause(env):
    b, _ = env
    with pytest.raises(BackendError) as e:
        b.set_weights("iris", {7: 100})  # not loaded: the server refuses
    assert isinstance(e.value.__cause__, AdminError)
    with pytest.raises(BackendError, match="still takes traffic"):
        b.retire("iris", 1)


@pytest.mark.parametrize(
    "listing, want",
    [
        ({"iris": ["1", "2"]}, {1, 2}),
        ({"iris": {"versions": [1, 2]}}, {1, 2}),
        ([{"name": "iris", "version": "1"}, {"name": "iris", "version": "2"},
          {"name": "x", "version": "9"}], {1, 2}),
        ({"models": [{"name": "iris", "versions": [{"version": "3"}]}]}, {3}),
        ({"iris": ["1", "latest"]}, {1}),  # not a version number: not one of ours
        ({"other": ["1"]}, set()),
        ([], set()),
    ],
)
def test_loaded_versions_shapes(listing, want):
    assert loaded_versions(listing, "iris") == want


def test_unknown_model_routes_nothing_rather_than_erroring(env):
    b, admin = env
    w = b.read("fresh")
    assert w.error is None and dict(w.weights) == {} and w.loaded == frozenset()
    b.ensure_loaded("fresh", 1)
    b.set_weights("fresh", {1: 100})
    assert admin.weights["fresh"] == {1: 100}


def test_server_client_errors_are_translated_by_default():
    from serving.client import AdminError as ServerAdminError

    class Refusing(FakeAdmin):
        def load(self, m, v):
            raise ServerAdminError(500, "disk full")

    b = LocalBackend(Refusing())  # default error types
    with pytest.raises(BackendError, match="disk full") as e:
        b.ensure_loaded("iris", 1)
    assert isinstance(e.value.__cause__, ServerAdminError)
