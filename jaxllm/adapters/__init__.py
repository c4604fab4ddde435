"""Per-request adapters on a shared base model: LoRA (lora.py) and prompt tuning (prompt.py)."""

from jaxllm.adapters.lora import LoraConfig, LoRARequest
from jaxllm.adapters.prompt import PromptAdapterRequest

__all__ = ["LoRARequest", "LoraConfig", "PromptAdapterRequest"]
