"""hnq.redis_conn and the Sentinel settings: kombu's sentinel:// URLs read the way kombu reads
them, one-line errors for bad ones, the Celery options, the worker's channel patches on the
Sentinel transport, and the job store through a real sentinel (redis-server --sentinel)."""
from __future__ import annotations

import subprocess

import pytest
import redis

from hnq.errors import ConfigError
from hnq.redis_conn import SentinelOptions, client, parse_sentinel
from hnq.settings import CommonSettings, celery_config
from servers import free_port, wait_port


def test_parse_sentinel_url_reads_like_kombu():
    su = parse_sentinel("sentinel://u:p%40w@h1:26380/3;sentinel://h2;sentinel://h3:26400")
    assert su.nodes == [("h1", 26380), ("h2", 26379), ("h3", 26400)]
    assert (su.db, su.username, su.password) == (3, "u", "p@w")    # the first part's: the master's


@pytest.mark.parametrize("url,why", [
    ("sentinel://h1:x", "port is not a number"),
    ("sentinel://h1:26379;redis://h2:6379", "every part"),
    ("sentinel://h1:26379/zero", "is not a number"),
])
def test_bad_sentinel_urls_are_one_line_config_errors(url, why):
    with pytest.raises(ConfigError) as e:
        CommonSettings(broker_url=url, sentinel_master="m")
    assert why in str(e.value) and "\n" not in str(e.value) and "HARDNET_BROKER_URL" in str(e.value)


def test_sentinel_url_needs_the_master_name():
    with pytest.raises(ConfigError, match="HARDNET_SENTINEL_MASTER=.*needs the master's name"):
        CommonSettings(broker_url="sentinel://h1:26379")
    assert CommonSettings(broker_url="redis://h:6379/0").sentinel() is None   # not needed without Sentinel
    with pytest.raises(ValueError, match="HARDNET_SENTINEL_MASTER"):
        client("sentinel://h1:26379", None)


def test_celery_gets_master_name_and_sentinel_kwargs():
    s = CommonSettings(broker_url="sentinel://:pw@h1:26379;sentinel://h2:26379", sentinel_master="mymaster",
                       sentinel_password="spw", sentinel_tls=True)
    conf = celery_config(s)
    opts = conf["broker_transport_options"]
    assert opts["master_name"] == "mymaster" and opts["visibility_timeout"] == s.visibility_timeout
    assert opts["sentinel_kwargs"]["password"] == "spw" and opts["sentinel_kwargs"]["ssl"] is True
    assert conf["broker_use_ssl"]["ssl_cert_reqs"] == 2                   # ssl.CERT_REQUIRED
    plain = celery_config(CommonSettings(broker_url="redis://h:6379/0"))
    assert "master_name" not in plain["broker_transport_options"] and "broker_use_ssl" not in plain


def test_the_sentinel_transport_carries_the_gate_and_the_guard():
    from kombu import Connection
    from kombu.transport import redis as kredis

    from worker import transport

    transport.install(gate=lambda: True)
    chan = Connection("sentinel://127.0.0.1:1", transport_options={"master_name": "m"}).transport.Channel
    assert chan is transport.SafeSentinelChannel and issubclass(chan, kredis.SentinelChannel)
    assert chan.QoS is transport.GatedQoS and chan._brpop_read is transport.SafeChannel._brpop_read
    assert kredis.Transport.Channel is transport.SafeChannel


@pytest.fixture
def sentinel_pair(tmp_path):
    """One Redis and one sentinel watching it (enough to find the master)."""
    procs = []
    rport, sport = free_port(), free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--requirepass", "pw"], stdout=subprocess.DEVNULL))
    conf = tmp_path / "s.conf"
    conf.write_text(f"sentinel monitor mm 127.0.0.1 {rport} 1\nsentinel auth-pass mm pw\nrequirepass spw\n")
    procs.append(subprocess.Popen(["redis-server", str(conf), "--sentinel", "--port", str(sport),
                                   "--bind", "127.0.0.1", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
    try:
        wait_port(rport); wait_port(sport)
        yield rport, sport
    finally:
        for p in procs:
            p.kill(); p.wait(10)


def test_job_store_through_a_real_sentinel(sentinel_pair):
    from hnq.jobs.store import JobStore

    rport, sport = sentinel_pair
    s = CommonSettings(broker_url=f"sentinel://:pw@127.0.0.1:{sport}/2", sentinel_master="mm",
                       sentinel_password="spw")
    st = JobStore.from_settings(s)
    st.ping_fast(8.0)
    st.create("j1", model="hardnet68", dest=None)
    st.put_inputs("j1", 0, b"\x1f\x8b binary")
    assert st.get_inputs("j1", 0) == b"\x1f\x8b binary"        # the binary client: same master, same DB
    assert st.info("j1").state == "queued"
    direct = redis.Redis(port=rport, password="pw", db=2, decode_responses=True)
    assert direct.hget("hnq:job:{j1}", "state") == "queued"          # it is the master, DB 2 of the URL
    bad = JobStore.from_settings(CommonSettings(broker_url=f"sentinel://:pw@127.0.0.1:{sport}/2",
                                                sentinel_master="nosuch", sentinel_password="spw"))
    with pytest.raises(redis.ConnectionError, match="No master found for 'nosuch'"):
        bad.ping_fast(2.0)
