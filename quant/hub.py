"""The official LTX-2.3 and LTX-2.5 files: where each lives on Hugging Face and which model folder it
belongs in, and fetching a missing one (only when the user opts in)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class OfficialFile:
    filename: str
    repo_id: str
    folder: str  # ComfyUI model folder name
    in_folder: bool = False  # the repository keeps it under a folder of that name (LTX-2.5's layout)

    @property
    def path_in_repo(self) -> str:
        return f"{self.folder}/{self.filename}" if self.in_folder else self.filename

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.path_in_repo}"


def _ltx25(filename: str, folder: str) -> OfficialFile:
    return OfficialFile(filename, "Lightricks/LTX-2.5", folder, in_folder=True)


OFFICIAL_FILES = (
    OfficialFile("ltx-2.3-22b-dev.safetensors", "Lightricks/LTX-2.3", "checkpoints"),
    OfficialFile("ltx-2.3-22b-distilled-1.1.safetensors", "Lightricks/LTX-2.3", "checkpoints"),
    OfficialFile("ltx-2.3-22b-distilled-lora-384-1.1.safetensors", "Lightricks/LTX-2.3", "loras"),
    OfficialFile("ltx-2.3-spatial-upscaler-x2-1.1.safetensors", "Lightricks/LTX-2.3", "latent_upscale_models"),
    OfficialFile("ltx-2.3-22b-dev-fp8.safetensors", "Lightricks/LTX-2.3-fp8", "checkpoints"),
    OfficialFile("ltx-2.3-22b-distilled-fp8.safetensors", "Lightricks/LTX-2.3-fp8", "checkpoints"),
    OfficialFile("ltx-2.3-22b-dev-nvfp4.safetensors", "Lightricks/LTX-2.3-nvfp4", "checkpoints"),
    OfficialFile("ltx-2.3-22b-distilled-nvfp4.safetensors", "Lightricks/LTX-2.3-nvfp4", "checkpoints"),
    # LTX-2.5: one file per component.
    _ltx25("ltx-2.5-22b-dev-transformer-bf16.safetensors", "diffusion_models"),
    _ltx25("ltx-2.5-22b-distilled-transformer-bf16.safetensors", "diffusion_models"),
    _ltx25("ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors", "diffusion_models"),
    _ltx25("ltx-2.5-22b-distilled-transformer-nvfp4.safetensors", "diffusion_models"),
    _ltx25("ltx-2.5-22b-distilled-lora-450-bf16.safetensors", "loras"),
    _ltx25("ltx-2.5-latent-spatial-upscaler-x2-bf16-1.0.safetensors", "latent_upscale_models"),
    _ltx25("ltx-2.5-latent-temporal-upscaler-x2-bf16-1.0.safetensors", "latent_upscale_models"),
    _ltx25("gemma4-12b-with-proj-ltx-2.5-bf16.safetensors", "text_encoders"),
    _ltx25("gemma4-12b-with-proj-ltx-2.5-comfy-int8-convrot.safetensors", "text_encoders"),
    _ltx25("ltx-2.5-video-vae-bf16.safetensors", "vae"),
    _ltx25("ltx-2.5-video-vae-conv-bf16.safetensors", "vae"),
    _ltx25("ltx-2.5-audio-vae-bf16.safetensors", "vae"),
)
# The transformers the loader offers to download.
TRANSFORMER_FOLDERS = ("checkpoints", "diffusion_models")
BY_NAME = {f.filename: f for f in OFFICIAL_FILES}


class MissingModelFile(FileNotFoundError):
    """An official file that is not on disk; the message says where to get it and where it goes."""


def missing_message(official: OfficialFile, folder_path: str) -> str:
    return (f"{official.filename} is not in your {official.folder} folder. Download it from {official.url} and "
            f"put it in {folder_path}, or enable 'download missing files' on the loader to fetch it.")


def fetch(official: OfficialFile, folder_path: str, allow_download: bool,
          progress: Callable[[int, int], None] | None = None) -> str:
    """Path of the official file in `folder_path`, downloading it there first if allowed.
    huggingface_hub resumes an interrupted download and writes through a temp file."""
    target = os.path.join(folder_path, official.filename)
    if os.path.exists(target):
        return target
    if not allow_download:
        raise MissingModelFile(missing_message(official, folder_path))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise MissingModelFile(missing_message(official, folder_path) + " (huggingface_hub is not installed)") from e
    if progress is not None:
        progress(0, 1)
    try:
        path = hf_hub_download(repo_id=official.repo_id, filename=official.path_in_repo, local_dir=folder_path)
    except Exception as e:  # offline, gated repo, no token: say what to do instead
        raise MissingModelFile(f"could not download {official.filename} ({type(e).__name__}: {e}). "
                               + missing_message(official, folder_path)) from e
    if os.path.abspath(path) != os.path.abspath(target):  # local_dir keeps the repository's folder: lift it out
        os.replace(path, target)
        if not os.listdir(os.path.dirname(path)):
            os.rmdir(os.path.dirname(path))
        path = target
    if progress is not None:
        progress(1, 1)
    return path
