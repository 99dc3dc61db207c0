"""Weights: the real loading code on a tiny layout, check, and download without a network."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

from musetalk_rt.errors import UserError
from musetalk_rt.testing import write_tiny_layout
from musetalk_rt.weights import LAYOUT, check, download, load_models


def test_real_loader_on_tiny_layout_matches_random_tiny(tmp_path):
    write_tiny_layout(tmp_path, seed=0, legacy_vae_keys=True, vae_bin=True)
    real = load_models("real", tmp_path)
    assert real.kind == "real" and real.fingerprint.startswith("real-")
    assert not any(p.is_meta for p in real.unet.parameters())
    torch.manual_seed(0)
    from musetalk_rt.modeling import UNET_TINY_CONFIG, build_unet

    ref = build_unet(UNET_TINY_CONFIG)
    for (k, a), (_, b) in zip(
        ref.state_dict().items(), real.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def test_missing_file_names_file_and_fix(tmp_path):
    write_tiny_layout(tmp_path)
    (tmp_path / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(UserError) as exc:
        load_models("real", tmp_path)
    assert "unet.pth" in str(exc.value) and "weights download" in str(exc.value)
    rows = {r.path: r.status for r in check(tmp_path)}
    assert rows["musetalkV15/unet.pth"] == "missing"


def test_truncated_file_is_reported_corrupt(tmp_path):
    write_tiny_layout(tmp_path)
    p = tmp_path / "musetalkV15" / "unet.pth"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    rows = {r.path: r for r in check(tmp_path)}
    assert rows["musetalkV15/unet.pth"].status == "corrupt"
    assert "weights download" in rows["musetalkV15/unet.pth"].detail


def test_pickled_code_is_refused(tmp_path):
    write_tiny_layout(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "musetalkV15" / "unet.pth")
    with pytest.raises(UserError, match="corrupt"):
        load_models("real", tmp_path)


def test_download_fetches_exact_files_falls_back_and_locks(tmp_path):
    hub = write_tiny_layout(tmp_path / "hub", vae_bin=True)
    calls = []
    repo_dirs = {
        "TMElyralab/MuseTalk": hub,
        "stabilityai/sd-vae-ft-mse": hub / "sd-vae",
        "openai/whisper-tiny": hub / "whisper",
    }

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        src = repo_dirs[repo_id] / filename
        if not src.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return str(dst)

    models = tmp_path / "models"
    results = download(models, downloader=fake_download, log=lambda _: None)
    assert all(r.status == "ok" for r in results)
    assert ("TMElyralab/MuseTalk", "musetalkV15/unet.pth") in calls
    assert ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors") in calls
    assert ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.bin") in calls  # fallback
    assert (models / "musetalkV15" / "unet.pth").is_file()
    lock = json.loads((models / "weights.lock.json").read_text())
    assert len(lock["files"]) == len(LAYOUT)
    # A second run downloads nothing (resumable/idempotent) and deep check passes.
    calls.clear()
    download(models, downloader=fake_download, log=lambda _: None)
    assert calls == []
    assert all(r.status == "ok" for r in check(models, deep=True))
    # Corruption after download is caught by the deep check.
    cfg = models / "whisper" / "preprocessor_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert {r.path: r.status for r in check(models, deep=True)}[
        "whisper/preprocessor_config.json"
    ] == "corrupt"


def test_a_config_the_model_refuses_and_a_bad_preprocessor_are_corrupt(tmp_path):
    """A config that parses but has a key the model does not take, or a whisper preprocessor
    config that is not one, is "corrupt" with the fix, not an internal error."""
    write_tiny_layout(tmp_path)
    unet_cfg = tmp_path / "musetalkV15" / "musetalk.json"
    good = unet_cfg.read_text()
    unet_cfg.write_text(json.dumps({"foo": 1}))
    status = {r.path: r for r in check(tmp_path)}
    assert status["musetalkV15/musetalk.json"].status == "corrupt"
    assert "weights download" in status["musetalkV15/musetalk.json"].detail
    with pytest.raises(UserError, match="not a valid unet config"):
        load_models("real", tmp_path)
    unet_cfg.write_text(good)
    pre = tmp_path / "whisper" / "preprocessor_config.json"
    pre.write_text('{"feature_size": "eighty"}')
    status = {r.path: r for r in check(tmp_path)}
    assert status["whisper/preprocessor_config.json"].status == "corrupt"
    with pytest.raises(UserError, match="preprocessor"):
        load_models("real", tmp_path)


def test_deep_check_without_a_lock_says_unverified(tmp_path):
    """--deep promises hashes compared: a file the lock does not list is "unverified"."""
    write_tiny_layout(tmp_path)
    assert all(r.status == "ok" for r in check(tmp_path))
    deep = check(tmp_path, deep=True)
    assert {r.status for r in deep} == {"unverified"}
    assert "weights.lock.json" in deep[0].detail


def test_download_over_a_corrupt_present_file_says_it_was_there(tmp_path):
    write_tiny_layout(tmp_path)
    (tmp_path / "musetalkV15" / "musetalk.json").write_text(json.dumps({"foo": 1}))

    def never(**_):
        raise AssertionError("nothing is missing: nothing to fetch")

    with pytest.raises(UserError, match="was already there and is corrupt"):
        download(tmp_path, downloader=never, log=lambda _: None)


def test_download_network_error_is_one_clear_line(tmp_path):
    def offline(**_):
        raise ConnectionError("no route to host")

    with pytest.raises(UserError) as exc:
        download(tmp_path, downloader=offline, log=lambda _: None)
    assert "could not download" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown weights kind"):
        load_models("huge")
