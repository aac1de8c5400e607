"""Settings that are seconds or rates must be finite: STATUS shows them as
JSON, which has no NaN or Infinity (clients refuse a reply holding one),
and an infinite timeout or rate is no timeout or rate at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipcd.settings import SettingsError, load_settings


@pytest.mark.parametrize("name", ["idle_timeout", "send_timeout", "rate_limit", "worker_timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_seconds_or_rate_setting_that_is_not_finite_is_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match="finite number"):
        load_settings({name: value})


def test_a_config_file_with_a_toml_inf_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ipcd.toml"
    config.write_text("[ipcd]\nidle-timeout = inf\n")  # TOML has inf and nan literals
    with pytest.raises(SettingsError, match=r"idle-timeout = inf: must be a finite number"):
        load_settings({}, config)


def test_finite_settings_still_load() -> None:
    settings = load_settings({"idle_timeout": "0", "rate_limit": "250.5", "send_timeout": "1e6"})
    assert (settings.idle_timeout, settings.rate_limit, settings.send_timeout) == (0.0, 250.5, 1e6)
