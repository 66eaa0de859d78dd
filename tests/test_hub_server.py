"""The local Hub of tests/hub_server.py, through the real huggingface_hub client and SAELens only: what it stores, the
route each file takes (LFS or inline), and what it shows with and without the token."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import requests
import torch
from hub_server import HubServer, RecordedRequest, pointed_at
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

TOKEN = "hf_hubServerTestToken0123456789abcdef"
WEIGHTS = "blocks.2.hook_resid_post/wanda-0.25/sae_weights.safetensors"
CFG = "blocks.2.hook_resid_post/wanda-0.25/cfg.json"


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def folder(tmp_path):
    """A folder laid out as a published SAE repo: a card, and one SAE's cfg.json and weights."""
    root = tmp_path / "upload"
    sae_dir = root / "blocks.2.hook_resid_post" / "wanda-0.25"
    sae_dir.mkdir(parents=True)
    (sae_dir / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 16}))
    save_file({"W_enc": torch.arange(128, dtype=torch.float32).reshape(8, 16)}, sae_dir / "sae_weights.safetensors")
    (root / "README.md").write_text("---\nlibrary_name: saelens\n---\n# tiny SAEs\n")
    return root


def test_private_upload_takes_lfs_for_weights_and_downloads_back(hub, folder, tmp_path):
    weights = (folder / WEIGHTS).read_bytes()
    with pointed_at(hub, tmp_path / "hf_cache", token=TOKEN):
        api = HfApi()
        assert api.whoami()["name"] == "someone"
        api.create_repo("someone/saes", private=True)
        commit = api.upload_folder(repo_id="someone/saes", folder_path=str(folder), commit_message="add SAEs")
        downloaded = hf_hub_download("someone/saes", WEIGHTS)
        info = api.model_info("someone/saes")
        assert api.file_exists("someone/saes", CFG) and not api.file_exists("someone/saes", "missing.json")
        listed = api.list_repo_files("someone/saes")

    with open(downloaded, "rb") as f:
        assert f.read() == weights
    assert info.private and info.sha == commit.oid == hub.commits("someone/saes")[-1].oid
    assert sorted(s.rfilename for s in info.siblings) == sorted(listed) == [".gitattributes", "README.md", CFG, WEIGHTS]
    assert hub.is_private("someone/saes")
    assert hub.files("someone/saes")[WEIGHTS] == weights and hub.files("someone/saes")[CFG] == (folder / CFG).read_bytes()
    # The weights went through the LFS batch API and a PUT of their own, and the commit only named them.
    oid = hashlib.sha256(weights).hexdigest()
    assert RecordedRequest("POST", "/someone/saes.git/info/lfs/objects/batch", True) in hub.requests
    assert RecordedRequest("PUT", f"/someone/saes.git/info/lfs/objects/upload/{oid}", False) in hub.requests
    assert hub.commits("someone/saes")[-1].lfs_paths == {WEIGHTS}  # cfg.json and README.md were inline
    assert not any("xet" in request.path.lower() for request in hub.requests)


def test_gpt2_answers_as_the_repository_it_moved_to_and_is_not_the_users_own(hub, folder, tmp_path):
    """`gpt2` has no owner on the Hub: it is the old id of `openai-community/gpt2`, and create_repo("gpt2") makes the
    user's own `someone/gpt2`, here as on the Hub. Reads and writes through the old id reach the moved repository."""
    with pointed_at(hub, tmp_path / "hf_cache", token=TOKEN):
        api = HfApi()
        api.create_repo("openai-community/gpt2")
        hub.add_alias("gpt2", "openai-community/gpt2")
        assert api.create_repo("gpt2").repo_id == "someone/gpt2"
        for repo_id in ("gpt2", "someone/gpt2"):
            (folder / "README.md").write_text(f"# {repo_id}\n")
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder))
            assert commit.repo_url.repo_id == ("openai-community/gpt2" if repo_id == "gpt2" else repo_id)
        read = {repo_id: open(hf_hub_download(repo_id, "README.md")).read() for repo_id in ("gpt2", "someone/gpt2")}
        weights = hf_hub_download("gpt2", WEIGHTS)
        assert api.list_repo_files("gpt2") == api.list_repo_files("openai-community/gpt2") == api.list_repo_files("someone/gpt2")
    assert read == {"gpt2": "# gpt2\n", "someone/gpt2": "# someone/gpt2\n"}
    assert open(weights, "rb").read() == hub.files("openai-community/gpt2")[WEIGHTS] == (folder / WEIGHTS).read_bytes()
    assert any(r.path.startswith("/gpt2/resolve/") for r in hub.requests)  # asked for by the old id


def test_a_byte_range_gets_that_slice_and_one_outside_the_file_is_refused(hub, folder, tmp_path):
    """HfFileSystem (datasets' streaming) reads a file in byte ranges: each must come back as a 206 with exactly that
    slice and its Content-Range, an open-ended or suffix range included; one past the end is a 416; a header that is
    not one valid range is ignored (the whole file, 200)."""
    from huggingface_hub import HfFileSystem

    weights = (folder / WEIGHTS).read_bytes()
    with pointed_at(hub, tmp_path / "hf_cache", token=TOKEN):
        HfApi().create_repo("someone/saes")
        HfApi().upload_folder(repo_id="someone/saes", folder_path=str(folder))
        url = f"{hub.endpoint}/someone/saes/resolve/main/{WEIGHTS}"
        answers = {}
        for asked in ("bytes=0-9", "bytes=100-", "bytes=-16", f"bytes=5-{10 * len(weights)}", f"bytes={len(weights)}-", "bytes=10-5",
                      "bytes=0-1,4-5"):  # fmt: skip
            response = requests.get(url, headers={"Range": asked, "Authorization": f"Bearer {TOKEN}"}, timeout=10)
            answers[asked] = (response.status_code, response.content, response.headers.get("Content-Range"))
        opened = len(hub.requests)
        with HfFileSystem(endpoint=hub.endpoint, token=TOKEN).open(f"someone/saes/{WEIGHTS}", "rb", block_size=64) as f:
            f.seek(len(weights) - 40)
            tail = f.read()
    size = len(weights)
    assert answers["bytes=0-9"] == (206, weights[:10], f"bytes 0-9/{size}")
    assert answers["bytes=100-"] == (206, weights[100:], f"bytes 100-{size - 1}/{size}")
    assert answers["bytes=-16"] == (206, weights[-16:], f"bytes {size - 16}-{size - 1}/{size}")
    assert answers[f"bytes=5-{10 * size}"] == (206, weights[5:], f"bytes 5-{size - 1}/{size}")
    assert answers[f"bytes={size}-"][0] == 416 and answers[f"bytes={size}-"][2] == f"bytes */{size}"
    # not one valid range (a last byte before the first; several ranges): ignored, the whole file, as RFC 9110 allows
    assert answers["bytes=10-5"] == (200, weights, None) and answers["bytes=0-1,4-5"] == (200, weights, None)
    assert tail == weights[-40:]
    assert any(r.byte_range and r.path.endswith(WEIGHTS) for r in hub.requests[opened:])  # HfFileSystem asked for a range


def test_without_the_token_a_private_repo_does_not_exist_and_nothing_is_written(hub, folder, tmp_path):
    with pointed_at(hub, tmp_path / "owner_cache", token=TOKEN):
        HfApi().create_repo("someone/saes", private=True)
        HfApi().upload_folder(repo_id="someone/saes", folder_path=str(folder))
        HfApi().create_repo("someone/open", private=False)
        HfApi().upload_folder(repo_id="someone/open", folder_path=str(folder))

    with pointed_at(hub, tmp_path / "anonymous_cache"):
        api = HfApi()
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("someone/saes")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("someone/saes", CFG)
        assert not api.file_exists("someone/saes", CFG)
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files("someone/saes")
        # a public repo is readable by anyone
        assert not api.model_info("someone/open").private
        with open(hf_hub_download("someone/open", WEIGHTS), "rb") as f:
            assert f.read() == (folder / WEIGHTS).read_bytes()
        # writes are refused
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_repo("someone/other")
        assert refused.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError) as refused:
            api.upload_file(path_or_fileobj=b"{}", path_in_repo="new.json", repo_id="someone/open")
        assert refused.value.response.status_code == 401
    assert sorted(hub.commits("someone/open")[-1].files) == [".gitattributes", "README.md", CFG, WEIGHTS]

    with pointed_at(hub, tmp_path / "bad_token_cache", token="hf_notTheServersToken"):
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi().model_info("someone/open")
        assert refused.value.response.status_code == 401


def test_create_repo_conflicts_unless_exist_ok_and_pointed_at_restores_the_client(hub, tmp_path):
    def client_settings():
        return constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT")

    before = client_settings()
    with pointed_at(hub, tmp_path / "hf_cache", token=TOKEN):
        api = HfApi()
        url = api.create_repo("someone/saes")
        assert url.repo_id == "someone/saes"
        with pytest.raises(HfHubHTTPError) as conflict:
            api.create_repo("someone/saes")
        assert conflict.value.response.status_code == 409
        assert api.create_repo("someone/saes", exist_ok=True).repo_id == "someone/saes"
    assert not hub.is_private("someone/saes") and len(hub.commits("someone/saes")) == 1
    assert client_settings() == before


def test_sae_lens_from_pretrained_loads_an_uploaded_sae(hub, tmp_path):
    from sae_lens import SAE

    sae = SAE.from_dict(
        {"architecture": "standard", "d_in": 8, "d_sae": 16, "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "x"}}
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    sae.save_model(tmp_path / "sae")
    sae_id = "blocks.0.hook_resid_post/wanda-0.25"

    with pointed_at(hub, tmp_path / "upload_cache", token=TOKEN):
        HfApi().create_repo("someone/tiny-saes", private=True)
        HfApi().upload_folder(repo_id="someone/tiny-saes", folder_path=str(tmp_path / "sae"), path_in_repo=sae_id)
    # A fresh cache: SAELens must fetch both files from the hub, with the token it finds in HF_TOKEN.
    with pointed_at(hub, tmp_path / "load_cache", token=TOKEN):
        loaded = SAE.from_pretrained("someone/tiny-saes", sae_id)

    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    original = sae.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in original.items())
    resolved = [r for r in hub.requests if "/resolve/" in r.path]
    assert {r.path for r in resolved} >= {
        f"/someone/tiny-saes/resolve/main/{sae_id}/cfg.json",
        f"/someone/tiny-saes/resolve/main/{sae_id}/sae_weights.safetensors",
    }
    assert all(r.authorized for r in resolved)
