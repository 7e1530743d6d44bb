"""The fault-injection test helpers, and examples of using them.

``support.chaos_api.ChaosApi`` is a flaky, rate-limited JSON API (``GET /items/<id>``);
``support.fault_proxy.FaultProxy`` sits between boto3 and the moto server and answers some requests with AWS-style
500/503/throttling errors instead of forwarding them.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from support.chaos_api import ChaosApi, _ArrivalBucket
from support.fault_proxy import FaultProxy
from support.servers import free_port, wait_http

SUPPORT = Path(__file__).resolve().parent / "support"


def get_item(api: ChaosApi | str, item_id: int, timeout: float = 1.0) -> dict[str, Any]:
    """What a client does: GET /items/<id> with urllib, 1 s timeout. Errors propagate as urllib raises them."""
    base = api if isinstance(api, str) else api.url
    with urllib.request.urlopen(f"{base}/items/{item_id}", timeout=timeout) as r:
        assert r.status == 200
        return json.loads(r.read())


def http_error(api: ChaosApi | str, item_id: int) -> urllib.error.HTTPError:
    """GET an item that must answer an HTTP error status: the HTTPError, its body read into ``.body`` (and closed:
    an HTTPError holds the connection open)."""
    with pytest.raises(urllib.error.HTTPError) as e:
        get_item(api, item_id)
    err = e.value
    err.body = err.read()
    err.close()
    return err


def status_code(api: ChaosApi, item_id: int) -> int:
    try:
        get_item(api, item_id)
        return 200
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def is_timeout(e: BaseException) -> bool:
    """urllib raises the socket timeout as is from reading the answer, wrapped in URLError when it hits earlier."""
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError))


def is_reset(e: BaseException) -> bool:
    # http.client.RemoteDisconnected (closed without an answer) is a ConnectionResetError too
    return isinstance(e, ConnectionResetError) or (
        isinstance(e, urllib.error.URLError) and isinstance(e.reason, ConnectionResetError))


# ---- ChaosApi -------------------------------------------------------------------------------------------------


def test_chaos_api_answers_items_and_404():
    with ChaosApi() as api:
        assert api.url.startswith("http://127.0.0.1:")
        assert get_item(api, 21) == {"id": 21, "value": 42}
        err = http_error(api, -1)
        assert err.code == 404 and json.loads(err.body) == {"error": "not found"}
        assert api.stats() == {"requests": 2, "ok": 1, "not_found": 1, "over_limit": 0, "faults": {},
                               "by_id": {21: 1, -1: 1}, "in_flight_max": 1}


@pytest.mark.parametrize("code", [429, 503, 500])
def test_chaos_api_fail_ids_http_errors_then_success(code: int):
    with ChaosApi(fail_ids={7: (str(code), 2)}, retry_after=0.5) as api:
        for _ in range(2):
            err = http_error(api, 7)
            assert err.code == code and "error" in json.loads(err.body)
            if code == 429:
                assert err.headers["Retry-After"] == "0.5"
        assert get_item(api, 7) == {"id": 7, "value": 14}
        assert get_item(api, 8) == {"id": 8, "value": 16}  # other ids are unaffected
        assert api.faults == {str(code): 2}
        assert (api.requests, api.ok, api.by_id[7], api.by_id[8]) == (4, 2, 3, 1)
        assert api.fail_ids_remaining() == {7: (str(code), 0)}


def test_chaos_api_fail_ids_timeout_then_success():
    with ChaosApi(fail_ids={3: ("timeout", 1)}, timeout_sleep=3.0) as api:
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:  # TimeoutError is socket.timeout; URLError is an OSError too
            get_item(api, 3, timeout=0.5)
        assert is_timeout(e.value), repr(e.value)
        assert 0.4 < time.monotonic() - t0 < 2.5
        assert get_item(api, 3) == {"id": 3, "value": 6}
        assert api.faults == {"timeout": 1} and api.ok == 1
    # stop() did not wait for the handler still sleeping on the first request


def test_chaos_api_fail_ids_reset_then_success():
    with ChaosApi(fail_ids={5: ("reset", 2)}) as api:
        for _ in range(2):
            with pytest.raises(OSError) as e:  # ConnectionResetError: [Errno 104] Connection reset by peer
                get_item(api, 5)
            assert is_reset(e.value), repr(e.value)
        assert get_item(api, 5) == {"id": 5, "value": 10}
        assert api.faults == {"reset": 2} and api.by_id[5] == 3


def test_chaos_api_random_faults_are_seeded_and_configurable():
    def statuses(api: ChaosApi) -> list[int]:
        return [status_code(api, i) for i in range(40)]

    with ChaosApi(rate_503=0.3, rate_500=0.2, seed=42) as a, ChaosApi(rate_503=0.3, rate_500=0.2, seed=42) as b:
        sa = statuses(a)
        assert sa == statuses(b)  # same seed, same sequence
        assert {200, 500, 503} == set(sa)
        assert a.faults["503"] == sa.count(503) and a.faults["500"] == sa.count(500) and a.ok == sa.count(200)
        a.configure(rate_503=1.0, rate_500=0.0)
        assert set(statuses(a)) == {503}
        a.configure(rate_503=0.0)
        assert set(statuses(a)) == {200}
        with pytest.raises(ValueError):
            a.configure(rate_429=1.5)
        with pytest.raises(TypeError):
            a.configure(rate_418=0.1)


def test_chaos_api_strict_rate_limit():
    with ChaosApi(max_per_second=5) as api:
        codes, retry_after = [], []
        for i in range(20):  # hammer: far faster than 5/s
            try:
                get_item(api, i)
                codes.append(200)
            except urllib.error.HTTPError as e:
                e.close()
                codes.append(e.code)
                retry_after.append(float(e.headers["Retry-After"]))
        assert codes[:5] == [200] * 5  # the bucket holds 5 tokens
        assert codes.count(429) >= 10 and set(codes) == {200, 429}
        assert api.over_limit == codes.count(429) and api.ok == codes.count(200) and not api.faults
        assert all(0 < r <= 0.2 for r in retry_after)  # one token refills in 1/5 s
        time.sleep(max(retry_after))
        assert get_item(api, 99) == {"id": 99, "value": 198}  # honouring Retry-After works


def test_chaos_api_bucket_capacity_is_configurable():
    with ChaosApi(max_per_second=5, burst=2) as api:
        codes = [status_code(api, i) for i in range(4)]  # at once: only the bucket's 2 tokens are there
        assert codes[:2] == [200, 200] and codes[2:].count(429) >= 1
        api.configure(burst=4)  # a new capacity refills the bucket
        assert [status_code(api, i) for i in range(4)] == [200] * 4
        with pytest.raises(ValueError):
            api.configure(burst=0.5)


def test_chaos_api_bucket_judges_requests_in_the_order_they_arrived_not_the_order_they_were_read():
    """A busy test machine wakes the API's threads late, and in any order: the bucket must not see paced requests
    bunched. So it takes their arrival from the kernel and judges them in that order."""
    bucket = _ArrivalBucket(rate=64, capacity=5, now=0.0)
    paced = [k / 64 for k in range(1, 11)]  # after the 5 of the burst, exactly the rate (exact in binary)
    assert [bucket.admit(0.0, now=0.0) for _ in range(5)] == [None] * 5
    assert [bucket.admit(t, now=0.3) for t in reversed(paced)] == [None] * 10  # read last first: all in time
    assert bucket.admit(5 / 64, now=0.3) is not None  # one more among them is over, whenever it is read
    late = _ArrivalBucket(rate=64, capacity=5, now=0.0)
    assert sum(late.admit(0.0, now=0.0) is None for _ in range(6)) == 5  # 6 at once: the bucket holds 5

    # End to end: 6 requests sent at least 100 ms apart (however late this thread wakes) to an API of 20/s with room
    # for 2, all judged together once the test lets go of the API's lock
    with ChaosApi(max_per_second=20, burst=2) as api:
        conns = [http.client.HTTPConnection("127.0.0.1", api.port, timeout=10) for _ in range(6)]
        for conn in conns:
            conn.connect()
        with api._lock:  # the API's threads read the requests but cannot judge them until it is let go
            for k, conn in enumerate(conns):
                time.sleep(0.1 if k else 0.0)
                conn.request("GET", f"/items/{k}")
            time.sleep(0.3)
        answers = [conn.getresponse() for conn in conns]
        codes = [answer.status for answer in answers]
        for answer, conn in zip(answers, conns):
            answer.read()
            conn.close()
        assert codes == [200] * 6 and api.over_limit == 0, (codes, api.arrivals())
        assert api.arrivals()[-1] - api.arrivals()[0] >= 0.45  # as sent, not as read


def test_chaos_api_faults_while_a_condition_holds():
    storm = threading.Event()
    storm.set()
    with ChaosApi(rate_503=1.0, faults_while=storm.is_set) as api:
        assert [status_code(api, i) for i in range(3)] == [503] * 3
        storm.clear()  # the storm ends exactly when the test says so
        assert [status_code(api, i) for i in range(3)] == [200] * 3
        assert api.faults == {"503": 3}


def test_chaos_api_records_when_requests_arrived():
    with ChaosApi(fail_ids={4: ("429", 1)}, retry_after=0.3) as api:
        t0 = time.monotonic()
        err = http_error(api, 4)
        time.sleep(float(err.headers["Retry-After"]))
        assert get_item(api, 4) == {"id": 4, "value": 8}
        get_item(api, 5)
        first, second = api.arrivals(4)
        assert t0 <= first and second - first >= 0.3
        assert api.arrivals() == [first, second, *api.arrivals(5)] and len(api.arrivals(5)) == 1


def test_chaos_api_concurrent_clients_counters():
    with ChaosApi(fail_ids={i: ("503", 1) for i in range(0, 100, 10)}) as api:
        results: list[int] = []
        lock = threading.Lock()

        def client(ids: range) -> None:
            for i in ids:
                code = status_code(api, i)
                with lock:
                    results.append(code)

        threads = [threading.Thread(target=client, args=(range(k, 100, 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(503) == 10 and results.count(200) == 90
        assert api.stats()["requests"] == 100 and api.ok == 90 and api.faults == {"503": 10}
        assert sum(api.by_id.values()) == 100


def test_chaos_api_stops_with_a_timeout_in_flight():
    api = ChaosApi(rate_timeout=1.0, timeout_sleep=60).start()
    seen: list[BaseException] = []

    def client() -> None:
        try:
            get_item(api, 1, timeout=120)
        except Exception as e:  # noqa: BLE001
            seen.append(e)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    api.stop()
    assert time.monotonic() - t0 < 2
    thread.join(5)
    assert not thread.is_alive()  # the client saw the connection close instead of waiting 60 s
    assert len(seen) == 1 and isinstance(seen[0], http.client.RemoteDisconnected), seen


def test_chaos_api_as_a_script():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "chaos_api.py"), "--port", str(port), "--fail-id", "3:503:1",
                             "--retry-after", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/items/1", 20, proc)
        assert http_error(f"http://127.0.0.1:{port}", 3).code == 503
        assert get_item(f"http://127.0.0.1:{port}", 3) == {"id": 3, "value": 6}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"serving on http://127.0.0.1:{port}" in out and "'faults': {'503': 1}" in out


def test_proxy_answers_502_when_the_upstream_is_down():
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:  # nothing listens there
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(proxy.url + "/some-bucket", timeout=5)
        e.value.close()
        assert e.value.code == 502
        assert proxy.stats() == {"requests": 1, "forwarded": 0, "injected": {}, "upstream_errors": 1,
                                 "responses_lost": 0}


# ---- FaultProxy in front of the moto server ------------------------------------------------------------------


def aws_client(service: str, endpoint: str, **retries: Any) -> Any:
    config = Config(retries=retries) if retries else None
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=config)


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint) as p:
        yield p


@pytest.fixture
def bucket(proxy: FaultProxy) -> str:
    name = f"faults-{os.urandom(4).hex()}"
    aws_client("s3", proxy.url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def table(proxy: FaultProxy) -> str:
    name = f"faults-{os.urandom(4).hex()}"
    ddb = aws_client("dynamodb", proxy.url)
    ddb.create_table(TableName=name, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST")
    return name


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard/adaptive backoff, 100x shorter: same retries, without seconds of sleeping per test."""
    from botocore.retries import standard

    delay = standard.ExponentialBackoff.delay_amount
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: delay(self, ctx) / 100)


@pytest.mark.aws
def test_proxy_forwards_s3(proxy: FaultProxy, bucket: str):
    s3 = aws_client("s3", proxy.url)
    sizes = {"empty": 0, "one": 1, "small": 1000, "mib": 1024 * 1024 + 1, "five-mb": 5 * 1024 * 1024}
    blobs = {key: os.urandom(n) for key, n in sizes.items()}
    for key, data in blobs.items():
        s3.put_object(Bucket=bucket, Key=f"data/{key}", Body=data)
    s3.upload_fileobj(io.BytesIO(blobs["five-mb"] * 2), bucket, "data/multipart")  # 10 MB: a multipart upload
    for key, data in blobs.items():
        assert s3.get_object(Bucket=bucket, Key=f"data/{key}")["Body"].read() == data
        assert s3.head_object(Bucket=bucket, Key=f"data/{key}")["ContentLength"] == len(data)  # HEAD: no body
    assert s3.get_object(Bucket=bucket, Key="data/multipart")["Body"].read() == blobs["five-mb"] * 2
    ranged = s3.get_object(Bucket=bucket, Key="data/small", Range="bytes=10-19")
    assert ranged["Body"].read() == blobs["small"][10:20] and ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted([f"data/{k}" for k in blobs] + ["data/multipart"])
    with pytest.raises(ClientError) as e:  # upstream errors pass through untouched
        s3.get_object(Bucket=bucket, Key="nope")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    s3.delete_object(Bucket=bucket, Key="data/one")
    assert proxy.injected == {} and proxy.forwarded == proxy.requests > 15
    # What boto3 1.43 sends for put_object over http: a plain Content-Length body (no chunking, no aws-chunked:
    # botocore only streams with trailing checksums over https), the CRC32 in a header, and Expect: 100-continue.
    put = next(r for r in proxy.history if r["method"] == "PUT" and r["path"].endswith("/data/five-mb"))
    headers = {k.lower(): v for k, v in put["headers"].items()}
    assert headers["content-length"] == str(5 * 1024 * 1024) and "transfer-encoding" not in headers
    assert headers["x-amz-checksum-crc32"] == base64.b64encode(zlib.crc32(blobs["five-mb"]).to_bytes(4, "big")).decode()
    assert headers["expect"] == "100-continue"


@pytest.mark.aws
def test_proxy_forwards_chunked_uploads(proxy: FaultProxy, bucket: str):
    """Bodies sent with Transfer-Encoding: chunked (plain, and aws-chunked with a trailing checksum, as boto3 does
    over https) reach moto as ordinary PUTs."""
    from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

    data = os.urandom(300_000)
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("PUT", f"/{bucket}/plain-chunked", body=iter([data[:1000], data[1000:]]), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()

    framed = AwsChunkedWrapper(io.BytesIO(data), checksum_cls=Crc32Checksum, checksum_name="x-amz-checksum-crc32",
                               chunk_size=64 * 1024).read()
    conn.request("PUT", f"/{bucket}/aws-chunked", body=framed, headers={
        "Transfer-Encoding": "chunked", "Content-Encoding": "aws-chunked",
        "X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "X-Amz-Trailer": "x-amz-checksum-crc32",
        "X-Amz-Decoded-Content-Length": str(len(data)), "x-amz-sdk-checksum-algorithm": "CRC32"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    conn.close()

    s3 = aws_client("s3", proxy.url)
    assert s3.get_object(Bucket=bucket, Key="plain-chunked")["Body"].read() == data
    got = s3.get_object(Bucket=bucket, Key="aws-chunked", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


@pytest.mark.aws
def test_proxy_forwards_dynamodb(proxy: FaultProxy, table: str):
    ddb = aws_client("dynamodb", proxy.url)
    ddb.put_item(TableName=table, Item={"pk": {"S": "job-1"}, "state": {"S": "pending"}, "n": {"N": "0"}})
    assert ddb.get_item(TableName=table, Key={"pk": {"S": "job-1"}}, ConsistentRead=True)["Item"]["state"] == {
        "S": "pending"}
    ddb.update_item(TableName=table, Key={"pk": {"S": "job-1"}}, UpdateExpression="SET #s = :r ADD n :one",
                    ConditionExpression="#s = :p", ExpressionAttributeNames={"#s": "state"},
                    ExpressionAttributeValues={":p": {"S": "pending"}, ":r": {"S": "running"}, ":one": {"N": "1"}})
    item = ddb.get_item(TableName=table, Key={"pk": {"S": "job-1"}})["Item"]
    assert item["state"] == {"S": "running"} and item["n"] == {"N": "1"}
    with pytest.raises(ddb.exceptions.ConditionalCheckFailedException):  # the same update again: condition fails
        ddb.update_item(TableName=table, Key={"pk": {"S": "job-1"}}, UpdateExpression="SET #s = :r",
                        ConditionExpression="#s = :p", ExpressionAttributeNames={"#s": "state"},
                        ExpressionAttributeValues={":p": {"S": "pending"}, ":r": {"S": "running"}})
    assert proxy.injected == {} and proxy.forwarded == proxy.requests


@pytest.mark.aws
def test_proxy_faults_are_survived_by_retrying_clients(proxy: FaultProxy, bucket: str, table: str,
                                                       fast_backoff: None):
    # Note botocore's retries={"max_attempts": 10} is 10 RETRIES (11 attempts); "total_max_attempts" counts all.
    proxy.configure(rate_503=0.3, seed=1)
    s3 = aws_client("s3", proxy.url, mode="standard", max_attempts=10)
    for i in range(50):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=f"v{i}".encode() * 100)
        assert s3.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == f"v{i}".encode() * 100
    assert proxy.injected["503"] > 10

    proxy.configure(rate_503=0.0, rate_500=0.1, rate_throttle=0.2)
    ddb = aws_client("dynamodb", proxy.url, mode="standard", max_attempts=10)
    for i in range(20):
        ddb.put_item(TableName=table, Item={"pk": {"S": f"p{i}"}, "v": {"N": str(i)}})
        assert ddb.get_item(TableName=table, Key={"pk": {"S": f"p{i}"}})["Item"]["v"] == {"N": str(i)}
    assert proxy.injected["500"] > 0 and proxy.injected["throttle"] > 0

    # "adaptive" = standard + a client-side rate limiter that only engages on THROTTLING codes (SlowDown,
    # ProvisionedThroughputExceededException, ...): it then drops a sequential client to ~0.5-2 requests/s, which
    # is what it is for, but makes tests crawl. 500s and DynamoDB's 503 ServiceUnavailable leave it alone.
    proxy.reset_counters()
    proxy.configure(rate_500=0.2, rate_503=0.1, rate_throttle=0.0)
    ddb = aws_client("dynamodb", proxy.url, mode="adaptive", max_attempts=8)
    for i in range(20):
        ddb.update_item(TableName=table, Key={"pk": {"S": f"p{i}"}}, UpdateExpression="ADD v :one",
                        ExpressionAttributeValues={":one": {"N": "1"}})
    assert all(ddb.get_item(TableName=table, Key={"pk": {"S": f"p{i}"}})["Item"]["v"] == {"N": str(i + 1)}
               for i in range(20))
    assert proxy.injected["500"] > 0 and proxy.injected["503"] > 0


@pytest.mark.aws
@pytest.mark.parametrize("kind, service, status, code", [
    ("500", "s3", 500, "InternalError"),
    ("503", "s3", 503, "SlowDown"),
    ("throttle", "s3", 503, "SlowDown"),
    ("500", "dynamodb", 500, "InternalServerError"),
    ("503", "dynamodb", 503, "ServiceUnavailable"),
    ("throttle", "dynamodb", 400, "ProvisionedThroughputExceededException"),
])
def test_proxy_fault_bodies_parse_as_aws_errors(proxy: FaultProxy, bucket: str, table: str, kind: str, service: str,
                                                status: int, code: str):
    proxy.reset_counters()
    proxy.configure(**{f"rate_{kind}": 1.0})
    # No retries, to see the first error. Careful: botocore's retries={"max_attempts": 1} means ONE RETRY (2 attempts);
    # total_max_attempts counts the first attempt too.
    client = aws_client(service, proxy.url, mode="standard", total_max_attempts=1)
    with pytest.raises(ClientError) as e:
        if service == "s3":
            client.put_object(Bucket=bucket, Key="k", Body=b"x" * 2000)
        else:
            client.put_item(TableName=table, Item={"pk": {"S": "x"}})
    err = e.value.response
    assert (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]) == (code, status)
    assert "injected" in err["Error"]["Message"]
    if code == "ProvisionedThroughputExceededException":  # the modeled exception class, too
        assert isinstance(e.value, client.exceptions.ProvisionedThroughputExceededException)
    assert proxy.injected == {kind: 1} and proxy.forwarded == 0


@pytest.mark.aws
def test_proxy_outage(proxy: FaultProxy, bucket: str, table: str):
    s3 = aws_client("s3", proxy.url, mode="standard", total_max_attempts=1)  # no retries
    ddb = aws_client("dynamodb", proxy.url, mode="standard", total_max_attempts=1)
    s3.put_object(Bucket=bucket, Key="k", Body=b"before")
    proxy.outage(1.0)
    for call in (lambda: s3.get_object(Bucket=bucket, Key="k"), lambda: s3.list_objects_v2(Bucket=bucket),
                 lambda: ddb.get_item(TableName=table, Key={"pk": {"S": "x"}})):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.injected["outage"] == 3
    time.sleep(1.05)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"before"

    # A client with retries rides out a short outage (real backoff here: ~0.5 s, then ~1 s, ... between attempts).
    patient = aws_client("s3", proxy.url, mode="adaptive", max_attempts=8)
    proxy.outage(0.5)
    assert patient.get_object(Bucket=bucket, Key="k")["Body"].read() == b"before"
    assert proxy.injected["outage"] >= 4
