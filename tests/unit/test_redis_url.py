"""The redis+sentinel:// URL: what it names, what is wrong with a bad one, and that a log line hides its
password."""

from __future__ import annotations

import pytest

from common.redis_conn import redacted
from common.redis_url import SentinelUrl
from common.settings import GatewaySettings, SettingsError


def test_parses_sentinels_service_db_and_passwords() -> None:
    u = SentinelUrl.parse("redis+sentinel://mgpu:s%40cret@10.0.0.1:26379,[::1]:26380/mymaster/2"
                          "?sentinel_password=sp")
    assert u.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (u.service, u.db, u.username, u.password, u.sentinel_password) == ("mymaster", 2, "mgpu", "s@cret", "sp")
    assert SentinelUrl.parse("redis+sentinel://h:1/m").db == 0


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel://h/mymaster/0", "host:port"),
    ("redis+sentinel://h:26379/", "/<service name>"),
    ("redis+sentinel://h:26379/m/x", "/<service name>"),
    ("redis+sentinel://h:26379/m/0?tls=1", "unknown parameter"),
])
def test_a_bad_sentinel_url_says_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        SentinelUrl.parse(url)
    with pytest.raises(SettingsError, match="MGPU_REDIS_URL"):
        GatewaySettings.load(env={"MGPU_REDIS_URL": url})


def test_settings_accept_a_sentinel_url_and_redact_its_password() -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26379/mymaster/0"
    assert GatewaySettings.load(env={"MGPU_REDIS_URL": url}).redis_dsn == url
    assert "pw" not in redacted(url) and redacted(url).endswith("127.0.0.1:26379/mymaster/0")
