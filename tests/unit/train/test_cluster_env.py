"""The environment a run gives Ray Train (`lorafleet.train.cluster.start_ray` sets it before `ray.init`): lorafleet's
defaults, the embedded instance's extra settings, and the user's own values winning over them."""

from lorafleet.compat.ray import train_env


def test_train_settings_default_and_yield_to_the_environment(monkeypatch):
    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(name, raising=False)
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    # An instance this process starts: the controller's settings come through the environment (compat.ray item 10).
    assert train_env(embedded=True) == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                        "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
                                        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
    assert train_env(embedded=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
