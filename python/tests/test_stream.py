"""`atmorep.Client` against real loaders: exactly-once epochs, bit-equality with the Rust
client (`atmorep loader pull --checksums`), resume, a loader restart mid-iteration, bf16, TLS
with a token, errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import atmorep
from conftest import FIXTURES, TOKEN, Server, atmorep_bin, request, run, to_toml

EPOCH = 32  # samples of an epoch of `request()` in the tiny store


def ids_of(batches):
    return [(int(e), int(i)) for b in batches for e, i in zip(b.sample_epochs, b.sample_ids)]


def assert_whole_epoch(ids, epoch, n):
    assert all(e == epoch for e, _ in ids), ids
    assert sorted(i for _, i in ids) == list(range(n)), ids


def test_datasets_info_and_statistics(server):
    client = atmorep.Client(server.endpoint)
    assert client.datasets() == ["tiny"]
    info = client.dataset_info("tiny")
    assert set(info["variables"]) == {"t", "z"}
    assert info["variables"]["z"]["levels"] == [850.0, 500.0]
    assert info["grid"]["nlat"] == 19 and info["grid"]["nlon"] == 36
    assert info["time"]["count"] == 40 and info["time"]["step_hours"] == 6.0
    assert sorted(info["statistics"]["global"]) == ["t", "z"]
    limits = info["limits"]
    assert limits["max_batch_size"] > 0 and limits["max_tokens"] > 0
    assert limits["max_batch_bytes"] > 0 and limits["max_window_bytes"] > 0
    assert limits["max_samples_per_epoch"] > 0 and limits["max_blur_sigma"] > 0
    coverage = info["statistics"]["global_coverage"]
    assert coverage["steps_read"] == coverage["store_steps"] == 40, coverage
    assert coverage["every_steps"] == 1 and sorted(coverage["variables"]) == ["t", "z"]
    stats = client.statistics("tiny", "t")
    assert set(stats) == {"level", "year", "month", "count", "mean", "std", "min", "max"}
    assert len(stats["mean"]) > 0 and isinstance(stats["mean"], np.ndarray)
    assert set(stats["level"].tolist()) == {850.0, 500.0}
    assert (stats["std"] > 0).all()


def test_an_epoch_arrives_exactly_once_with_the_documented_shapes(server):
    client = atmorep.Client([server.endpoint])
    batches = list(client.stream(request(end_epoch=1)))
    assert_whole_epoch(ids_of(batches), 0, EPOCH)
    assert batches[-1].end_of_stream and batches[-1].cursor_after == {"epoch": 1, "position": 0}
    b = batches[0]
    assert len(b) == 4 and b.sample_ids.dtype == np.uint64 and b.sample_epochs.dtype == np.uint64
    z, t = b.fields["z"], b.fields["t"]
    assert list(b.fields) == ["z", "t"]
    assert z.source.shape == (4, 2 * 2 * 3 * 6, 9) and z.source.dtype == np.float32
    assert t.source.shape == (4, 2 * 3 * 6, 9)
    assert z.token_info.shape == (4, 72, 8) and z.pe.shape == (4, 72, 8)
    m = int(z.masked_counts.sum())
    assert m > 0 and z.target.shape == (m, 9) and z.masked_indices.shape == (m,)
    assert z.masked_indices.dtype == np.int64 and (z.masked_indices < 72).all()
    assert t.target.shape == (0, 9) and t.masked_counts.tolist() == [0, 0, 0, 0]
    assert z.windows.shape == (4, 6) and (z.windows[:, 3:] == [2, 9, 18]).all()
    assert np.isfinite(z.source).all()


def test_arrays_borrow_the_clients_buffer(server):
    """No copy: the arrays are views over a buffer object owned by Rust, not numpy's own data."""
    batch = next(iter(atmorep.Client(server.endpoint).stream(request(end_epoch=1))))
    source = batch.fields["z"].source
    assert not source.flags.owndata and source.base is not None
    assert type(source.base).__name__ == "Buffer"
    # The array outlives the batch (the buffer is kept alive by the array).
    del batch
    assert np.isfinite(source).all()


def checksums(batch) -> list[int]:
    """`atmorep loader pull --checksums` of a batch, in numpy (src/pull.rs: batch_checksums)."""

    def wsum(bits) -> int:
        bits = np.ascontiguousarray(bits).reshape(-1).astype(np.uint64)
        weights = np.arange(1, len(bits) + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return int((bits * weights).sum(dtype=np.uint64))

    def f32_bits(array):
        if array.dtype == np.uint16:  # bf16 bits: the f32 the Rust client decoded them to
            return array.astype(np.uint32) << np.uint32(16)
        return array.view(np.uint32)

    sums = []
    for f in batch.fields.values():
        sums += [
            wsum(f32_bits(f.source)),
            wsum(f32_bits(f.target)),
            wsum(f.masked_indices.astype(np.uint32)),
            wsum(f32_bits(f.token_info)),
            wsum(f32_bits(f.pe)),
        ]
    sums.append(wsum(batch.sample_ids.astype(np.uint32)))
    return sums


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_values_are_bit_equal_to_the_rust_clients(server, tmp_path, dtype):
    req = request(end_epoch=1, dtype=dtype)
    path = tmp_path / "req.toml"
    path.write_text(to_toml(req))
    report = json.loads(
        run("loader", "pull", server.endpoint, "--request", str(path), "--checksums", "--json")
    )
    ours = [checksums(b) for b in atmorep.Client(server.endpoint).stream(path)]
    assert len(ours) == report["batches"] == EPOCH // 4
    assert ours == report["checksums"]


def test_bf16_arrives_as_uint16_bits(server):
    f32 = next(iter(atmorep.Client(server.endpoint).stream(request(end_epoch=1))))
    bf16 = next(iter(atmorep.Client(server.endpoint).stream(request(end_epoch=1, dtype="bf16"))))
    assert bf16.sample_ids.tolist() == f32.sample_ids.tolist()
    z16, z32 = bf16.fields["z"], f32.fields["z"]
    assert z16.dtype == "bfloat16" and z16.source.dtype == np.uint16
    assert z16.pe.dtype == np.uint16 and z16.target.dtype == np.uint16
    assert z16.token_info.dtype == np.float32  # token info is always f32 on the wire
    widened = (z16.source.astype(np.uint32) << np.uint32(16)).view(np.float32)
    np.testing.assert_allclose(widened, z32.source, rtol=2**-8, atol=1e-6)


def test_resume_from_a_mid_epoch_cursor_equals_the_uninterrupted_tail(server):
    client = atmorep.Client(server.endpoint)
    whole = list(client.stream(request(end_epoch=2)))
    cut = 3
    tail = list(client.stream(request(end_epoch=2), resume=whole[cut - 1].cursor_after))
    assert [checksums(b) for b in tail] == [checksums(b) for b in whole[cut:]]
    assert ids_of(tail) == ids_of(whole[cut:])
    # `resume` inside the request dict means the same.
    again = list(client.stream(request(end_epoch=2, resume=whole[cut - 1].cursor_after)))
    assert ids_of(again) == ids_of(tail)


def test_a_loader_killed_and_restarted_mid_iteration_loses_and_repeats_nothing(own_server):
    client = atmorep.Client(own_server.endpoint, retry_timeout=60)
    # Long enough that the kill finds most of it unsent (beyond the HTTP/2 windows).
    req = request(end_epoch=60)
    expected = ids_of(client.stream(req))
    stream = client.stream(req, prefetch=1)
    got = []
    for i, batch in enumerate(stream):
        got.extend(ids_of([batch]))
        if i == 1:
            own_server.kill9()
            time.sleep(0.5)
            own_server.restart()
    assert got == expected
    assert stream.stats()["reconnects"] >= 1


def test_tls_and_token_are_accepted(tls_server):
    endpoint = f"https://{tls_server.addr}"
    client = atmorep.Client(
        endpoint, token=TOKEN, ca=str(FIXTURES / "ca.pem"), tls_domain="loader.test"
    )
    assert client.datasets() == ["tiny"]
    assert_whole_epoch(ids_of(client.stream(request(end_epoch=1))), 0, EPOCH)
    # PEM text works as well as a path.
    pem = (FIXTURES / "ca.pem").read_text()
    assert atmorep.Client(endpoint, token=TOKEN, ca=pem, tls_domain="loader.test").datasets()


@pytest.mark.parametrize("token", ["guess", None])
def test_a_wrong_or_missing_token_is_refused(tls_server, token):
    client = atmorep.Client(
        f"https://{tls_server.addr}", token=token, ca=str(FIXTURES / "ca.pem"),
        tls_domain="loader.test",
    )
    with pytest.raises(atmorep.LoaderError) as err:
        client.datasets()
    assert err.value.code == "UNAUTHENTICATED"
    with pytest.raises(atmorep.LoaderError) as err:
        next(iter(client.stream(request(end_epoch=1))))
    assert err.value.code == "UNAUTHENTICATED"


BAD_REQUESTS = [
    ("unknown key", {"batch_sise": 4}, "batch_sise"),
    ("wrong type", {"batch_size": "four"}, "batch_size"),
    ("unknown field key", {"fields": [{"name": "t", "levels": [500], "pe_widht": 8}]}, "pe_widht"),
    ("unknown dtype", {"dtype": "f16"}, "dtype"),
    ("unsupported value", {"seed": object()}, "seed"),
    ("missing dataset", {"dataset": None}, "dataset"),
]


@pytest.mark.parametrize("name,change,names", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_a_bad_request_dict_is_a_value_error_naming_the_key_before_any_call(name, change, names):
    # Nothing listens on this endpoint: the error must come before any network call.
    client = atmorep.Client("127.0.0.1:1", retry_timeout=0.5)
    req = request(**change)
    with pytest.raises(ValueError, match=names):
        client.stream(req)
    with pytest.raises(ValueError, match=names):
        atmorep.load_request(req)


def test_a_bad_resume_cursor_is_a_value_error(server):
    client = atmorep.Client(server.endpoint)
    for resume, says in [({"epoch": 1}, "position"), ({"epoch": 0, "positon": 3}, "positon"),
                         ({"epoch": -1, "position": 0}, "epoch")]:
        with pytest.raises(ValueError, match=says):
            client.stream(request(), resume=resume)


SERVER_ERRORS = [
    ("unknown dataset", {"dataset": "nope"}, "NOT_FOUND", "nope"),
    ("zero batch size", {"batch_size": 0}, "INVALID_ARGUMENT", "batch_size"),
    ("rank beyond world", {"rank": 2, "world_size": 2}, "INVALID_ARGUMENT", "rank"),
]


@pytest.mark.parametrize("name,change,code,says", SERVER_ERRORS, ids=[r[0] for r in SERVER_ERRORS])
def test_a_request_the_server_refuses_is_a_loader_error_with_its_code(server, name, change, code, says):
    with pytest.raises(atmorep.LoaderError) as err:
        next(iter(atmorep.Client(server.endpoint).stream(request(**change))))
    assert err.value.code == code, err.value
    assert says in err.value.message, err.value.message
    with pytest.raises(atmorep.LoaderError) as err:
        atmorep.Client(server.endpoint).dataset_info("nope")
    assert err.value.code == "NOT_FOUND"


def test_no_server_is_a_clear_error_not_a_hang():
    client = atmorep.Client("127.0.0.1:1", connect_timeout=1, retry_timeout=2)
    started = time.monotonic()
    with pytest.raises(atmorep.LoaderError) as err:
        client.datasets()
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(atmorep.LoaderError) as err:
        next(iter(client.stream(request(end_epoch=1))))
    assert err.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 15


def test_bad_client_settings_are_value_errors():
    with pytest.raises(ValueError, match="endpoint"):
        atmorep.Client("")
    with pytest.raises(ValueError, match="endpoint"):
        atmorep.Client("http://[bad")
    with pytest.raises(ValueError, match="compression"):
        atmorep.Client("127.0.0.1:1", compression="lz4")
    with pytest.raises(ValueError, match="ca"):
        atmorep.Client("127.0.0.1:1", ca="/nonexistent/ca.pem")


def test_a_striped_stream_covers_the_epoch_once(server, own_server):
    client = atmorep.Client([server.endpoint, own_server.endpoint], stripe=True)
    assert_whole_epoch(ids_of(client.stream(request(end_epoch=1))), 0, EPOCH)


def test_load_request_fills_the_defaults(tmp_path):
    req = atmorep.load_request(request())
    assert req["world_size"] == 1 and req["dtype"] == "f32" and "end_epoch" not in req
    path = tmp_path / "r.toml"
    path.write_text(to_toml(request(end_epoch=3)))
    assert atmorep.load_request(str(path))["end_epoch"] == 3
    assert atmorep_bin().is_file()
