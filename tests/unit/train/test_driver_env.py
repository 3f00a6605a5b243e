"""The environment the driver gives Ray Train: lorafleet's defaults, and the user's own values winning over them."""

from lorafleet.train.driver import train_env


def test_train_settings_default_and_yield_to_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
