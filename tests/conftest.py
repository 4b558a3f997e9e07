import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors, many ops: one torch thread is faster than two fighting over a shared CPU (a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64():
    """Run a test in float64 (closed-form checks), restoring the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """A Hugging Face hub cache in tmp_path with the hub offline and sockets closed: returns put(model, hub_id), which
    saves `model` (anything with save_pretrained) as the cached snapshot of hub_id, so it loads by its id without a
    network; any attempt to connect fails the test."""
    import socket

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    def put(model, hub_id: str):
        rev = "0" * 40
        repo = cache / ("models--" + hub_id.replace("/", "--"))
        model.save_pretrained(repo / "snapshots" / rev)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(rev)

    return put
