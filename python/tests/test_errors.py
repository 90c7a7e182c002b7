"""Errors are Python exceptions of the right kind with the command line's messages."""

import pytest

import surfing_weights
from conftest import open_model


def test_a_bad_model_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        surfing_weights.StreamingModel(model_path=tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        surfing_weights.StreamingModel(model_path=tmp_path)
    with pytest.raises(ValueError):
        surfing_weights.WeightServer(tmp_path).start()


def test_bad_arguments_are_value_errors(model_dir, weight_server):
    cases = [
        dict(model_path=model_dir, eviction="fifo"),
        dict(model_path=model_dir, dtype="int8"),
        dict(model_path=model_dir, cache_size=2, vram_budget_mb=64),
        dict(model_path=model_dir, server=weight_server),
        dict(server=weight_server.address),
        dict(server="no port here", server_cert=weight_server.cert_pem),
        dict(server=[]),
        dict(server=[3]),
        dict(server=weight_server.address, server_cert="-----BEGIN CERTIFICATE-----\nnope\n"),
    ]
    for kwargs in cases:
        with pytest.raises(ValueError):
            surfing_weights.StreamingModel(**kwargs)
    with pytest.raises(ValueError, match="unknown weight dtype"):
        surfing_weights.WeightServer(model_dir, dtype="bf8")


def test_bad_encode_input_is_a_value_error(local_model):
    with pytest.raises(ValueError, match="prompts: none"):
        local_model.encode(["query"], prompt_name="query")
    with pytest.raises(ValueError, match="batch_size"):
        local_model.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="list of strings"):
        local_model.encode([1, 2])
    with pytest.raises(ValueError, match="does not exist"):
        local_model.warmup([99])


def test_a_refused_token_is_a_permission_error(model_dir):
    with surfing_weights.WeightServer(model_dir, token="right") as server:
        with pytest.raises(PermissionError, match="refused the token"):
            open_model(server=server, token="wrong")
        open_model(server=server, token="right", cache_size=1)


def test_a_server_that_does_not_answer_is_a_connection_error(model_dir, tmp_path):
    server = surfing_weights.WeightServer(model_dir)
    server.start()
    address = server.address
    pem = tmp_path / "server.pem"
    pem.write_text(server.cert_pem)
    server.stop()
    with pytest.raises(surfing_weights.WeightServerError) as raised:
        open_model(server=[address], server_cert=pem)
    assert isinstance(raised.value, ConnectionError)


def test_a_gpu_that_cannot_be_had_is_a_runtime_error(model_dir, monkeypatch):
    monkeypatch.setenv("SURF_ADAPTER", "no-such-adapter")
    with pytest.raises(RuntimeError, match="no GPU adapter found whose name contains `no-such-adapter`"):
        surfing_weights.StreamingModel(model_path=model_dir)
