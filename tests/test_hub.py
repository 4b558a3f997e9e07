"""Flows on the Hugging Face hub's conventions: from_pretrained (a folder or a hub id, offline from the cache),
save_pretrained, push_to_hub, and aps.load of the same."""
import pytest
import torch

import aps
from aps.checkpoint import save_checkpoint
from aps.config import TrainConfig
from aps.errors import ApsError
from aps.problems import mcgdiff_problem
from aps.tasks import MixtureTask

Y = torch.tensor([[0.4], [-1.1]])


@pytest.fixture
def checkpoint(tmp_path):
    """A small vector-flow checkpoint folder (untrained weights, randomised so that a load is visible)."""
    task = MixtureTask(mcgdiff_problem(2, 1, seed=0))
    cfg = TrainConfig(mcgdiff="2,1,0", flow_layers=1, flow_hidden=8, flow_blocks=1)
    torch.manual_seed(0)
    flow = task.make_flow(cfg)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "run"
    folder.mkdir()
    task.save(folder)
    save_checkpoint(folder, flow, task.config(), cfg.to_groups(), step=7)
    (folder / "README.md").write_text("---\nlibrary_name: aps\n---\n# a card\n")
    return folder


def same_samples(a, b):
    xa, la = aps.load(a).sample(Y, 16, seed=3)
    xb, lb = aps.load(b).sample(Y, 16, seed=3)
    torch.testing.assert_close(xa, xb)
    torch.testing.assert_close(la, lb)


def test_from_pretrained_and_save_pretrained_round_trip(checkpoint, tmp_path):
    flow = aps.ConditionalFlow.from_pretrained(checkpoint)
    assert not flow.training and flow.meta["step"] == 7 and flow.meta["train"]["flow"]["flow_layers"] == 1
    flow.save_pretrained(tmp_path / "copy")
    for name in ("flow.safetensors", "config.json", "problem.safetensors", "README.md"):
        assert (tmp_path / "copy" / name).is_file(), name
    same_samples(checkpoint, tmp_path / "copy")
    from aps.flows import ConditionalGlow

    with pytest.raises(ApsError, match="not a ConditionalGlow"):
        ConditionalGlow.from_pretrained(checkpoint)


def test_load_by_hub_id_from_the_offline_cache(checkpoint, offline_hub):
    """What a user gets after one download: the flow and aps.load by its hub id, with no network."""
    offline_hub(aps.ConditionalFlow.from_pretrained(checkpoint), "someone/aps-mcgdiff-d2")
    flow = aps.ConditionalFlow.from_pretrained("someone/aps-mcgdiff-d2")
    reference = aps.ConditionalFlow.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(), reference.state_dict().values()))
    same_samples(checkpoint, "someone/aps-mcgdiff-d2")
    with pytest.raises(ApsError, match="not found: someone/not-there"):
        aps.load("someone/not-there")


def test_push_to_hub_uploads_the_checkpoint_folder(checkpoint, monkeypatch):
    from huggingface_hub import HfApi

    seen = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        seen["repo"] = (repo_id, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kw):
        from pathlib import Path

        seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        seen["loads"] = aps.load(folder_path).sample(Y, 4, seed=1)[0]  # the uploaded folder is a working checkpoint
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert aps.ConditionalFlow.from_pretrained(checkpoint).push_to_hub("someone/aps-d2", private=True) == "commit"
    assert seen["repo"] == ("someone/aps-d2", True, True)
    assert seen["files"] == ["README.md", "config.json", "flow.safetensors", "problem.safetensors"]
    torch.testing.assert_close(seen["loads"], aps.load(checkpoint).sample(Y, 4, seed=1)[0])
