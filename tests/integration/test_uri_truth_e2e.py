"""Issue 19, items 6 and 7, through the real system (real redis-server, moto's S3 server behind a
counting proxy, a real `hardnet worker`, the real CLI):

* an S3 key holding ``token=`` / ``sig=`` is labelled, recorded and tagged under its own name;
* an object of a bucket outside HARDNET_SOURCE_BUCKETS gets a ``forbidden`` record and no request
  for it reaches S3 (counted at the proxy);
* a job whose URIs carry credentials (presigned / user:password@ http URLs) loses its stored
  inputs when it ends; a job without credentials keeps them.
"""
from __future__ import annotations

import json

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes, read_jsonl
from faultproxy import FaultProxy
from servers import LoopbackWeb, s3_env, without_proxies

pytestmark = pytest.mark.slow

SIG = "Zm9vYmFyc2VjcmV0c2lnbmF0dXJl"
PASSWORD = "pa55-w0rd-secret"


@pytest.fixture(scope="module")
def fleet(redis_server, moto_server, tmp_path_factory):
    import boto3

    tmp = tmp_path_factory.mktemp("truth")
    moto_server.reset()
    s3 = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    body = image_bytes(7)
    web = LoopbackWeb(lambda path: (200, body))
    proxy = FaultProxy(moto_server.url).start()
    redis_server.flush()
    env = without_proxies(base_env(
        redis_server.url, HARDNET_SOURCE_BUCKETS="src", HARDNET_ALLOW_HTTP="true",
        HARDNET_HTTP_ALLOW_HOSTS="127.0.0.1", HARDNET_ALLOW_PRIVATE_NETWORKS="true",
        HARDNET_FILE_ROOTS=str(tmp), HARDNET_STATE_DIR=str(tmp / "state"), **s3_env(proxy.url)))
    w = Worker(env, "truth", tmp)
    try:
        w.wait_ready()
        yield {"env": env, "s3": s3, "proxy": proxy, "web": web, "tmp": tmp, "worker": w}
    finally:
        w.stop()
        proxy.stop()
        web.stop()


def test_keys_with_token_and_sig_keep_their_names_and_a_foreign_bucket_is_not_fetched(fleet):
    s3, proxy, env, tmp = fleet["s3"], fleet["proxy"], fleet["env"], fleet["tmp"]
    for b in ("src", "secret", "out"):
        s3.create_bucket(Bucket=b)
    # two keys that the old redaction turned into one URI (s3://src/x&token=***), and a sig= key
    keys = ["x&token=5/a.jpg", "x&token=6/a.jpg", "p/y?sig=abc&X-Amz-Signature=zz.jpg"]
    for i, k in enumerate(keys):
        s3.put_object(Bucket="src", Key=k, Body=image_bytes(20 + i))
    s3.put_object(Bucket="secret", Key="c.jpg", Body=image_bytes(30))
    uris = [f"s3://src/{k}" for k in keys] + ["s3://secret/c.jpg"]
    listing = tmp / "uris.txt"
    listing.write_text("".join(u + "\n" for u in uris))

    # every request for the bucket "secret" (path-style: /secret/...) is counted, and forwarded
    proxy.set_fault("slow", delay=0.0, path="/secret")
    try:
        rc, s = cli_json(["submit", "--from-file", str(listing), "--out", "s3://out/run/", "--tag",
                          "--wait", "--timeout", "240", "--json"], env, timeout=300)
        secret_requests = proxy.stats()["by_mode"].get("slow", 0)
    finally:
        proxy.clear()
    assert rc == 3, s      # done_with_errors: the forbidden record
    assert s["state"] == "done_with_errors" and s["succeeded"] == 3 and s["failed"] == 1, s
    recs = read_jsonl(cli(["results", s["job_id"]], env).stdout)
    by_uri = {r["uri"]: r for r in recs}
    assert sorted(by_uri) == sorted(uris), "each record names its object exactly"
    for k in keys:
        r = by_uri[f"s3://src/{k}"]
        assert r["status"] == "ok" and "tag_error" not in r, r
        tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket="src", Key=k)["TagSet"]}
        assert tags["hardnet:label"] and tags["hardnet:model"].startswith("hardnet39ds"), (k, tags)
    bad = by_uri["s3://secret/c.jpg"]
    assert bad["status"] == "error" and bad["error"]["code"] == "forbidden", bad
    assert "HARDNET_SOURCE_BUCKETS" in bad["error"]["message"]
    assert secret_requests == 0, f"{secret_requests} requests reached the bucket outside the allow-list"
    assert s3.get_object_tagging(Bucket="secret", Key="c.jpg")["TagSet"] == []
    # nothing like the old mangled name exists anywhere in the job's outputs
    listed = s3.list_objects_v2(Bucket="out", Prefix=f"run/{s['job_id']}/")["Contents"]
    text = "".join(s3.get_object(Bucket="out", Key=o["Key"])["Body"].read().decode("utf-8", "replace")
                   for o in listed if o["Key"].endswith((".jsonl", ".json")))
    assert "token=***" not in text and "sig=***" not in text
    # no credentials in these URIs: the stored inputs stay (resume can re-label a lost part)
    assert any("/inputs/chunk-" in o["Key"] for o in listed)


def test_stored_inputs_with_credentials_are_deleted_when_the_job_ends(fleet):
    env, web, tmp = fleet["env"], fleet["web"], fleet["tmp"]
    uris = [f"{web.url}/img/presigned-{i}.jpg?X-Amz-Credential=AKIA{SIG}&X-Amz-Signature={SIG}{i}"
            for i in range(3)] + [f"http://alice:{PASSWORD}@127.0.0.1:{web.port}/img/pw.jpg"]
    out = tmp / "out-creds"
    rc, s = cli_json(["submit", "--from-file", "-", "--out", str(out), "--chunk-size", "2", "--wait",
                      "--timeout", "240", "--json"], env, timeout=300, stdin="\n".join(uris) + "\n")
    assert rc == 0 and s["succeeded"] == 4, s
    job = out / s["job_id"]
    assert (job / "manifest.json").exists() and (job / "job.json").exists()
    assert sorted(p.name for p in job.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert not (job / "inputs").exists() or list((job / "inputs").iterdir()) == [], \
        "the stored inputs (and their marker) must be gone once the job ended"
    everything = "".join(p.read_text(errors="replace") for p in job.rglob("*") if p.is_file())
    assert SIG not in everything and PASSWORD not in everything
    recs = [json.loads(x) for p in sorted(job.glob("part-*")) for x in p.read_text().splitlines()]
    assert sorted(r["uri"] for r in recs) == sorted(
        [f"{web.url}/img/presigned-{i}.jpg?X-Amz-Credential=***&X-Amz-Signature=***" for i in range(3)]
        + [f"http://alice:***@127.0.0.1:{web.port}/img/pw.jpg"])
    assert "stored inputs of 2 chunk(s) deleted" in fleet["worker"].log()

    # the same kind of job without credentials keeps its inputs
    plain = tmp / "out-plain"
    rc, s2 = cli_json(["submit", "--from-file", "-", "--out", str(plain), "--wait", "--timeout", "240",
                       "--json"], env, timeout=300, stdin=f"{web.url}/img/plain.jpg?size=2\n")
    assert rc == 0, s2
    assert [p.name for p in (plain / s2["job_id"] / "inputs").iterdir()] == ["chunk-00000.jsonl.gz"]
