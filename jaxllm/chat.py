"""Conversations in OpenAI's message format, rendered with the model's chat template.

One place for `LLM.chat`, the `jaxllm chat` / `generate` commands and the server's
/v1/chat/completions. A message is {"role": ..., "content": ...}; content is a string or a list of
parts of which only {"type": "text", "text": ...} is served (there is no image or audio input). The
rendered prompt is returned as text and token ids together: the template writes the special tokens
itself (BOS included), so the text is tokenized without adding them again.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


def _content(message: dict, index: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"message {index}: only text parts ({{'type': 'text', 'text': ...}}) are served, got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def check_conversation(messages: Any) -> list[dict]:
    """`messages` as a list of {"role", "content"} dicts with text content; ValueError naming the bad
    message otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages, got {messages!r:.100}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.100}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        out.append({**message, "content": _content(message, i)})
    return out


def is_conversation(value: Any) -> bool:
    """One conversation (a list of message dicts), as opposed to a list of conversations."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict)


def render(tokenizer, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
           continue_final_message: bool = False, tools: list | None = None,
           chat_template_kwargs: dict | None = None) -> dict:  # fmt: skip
    """The prompt of a conversation: {"prompt": text, "prompt_token_ids": ids}, a prompt `LLM.generate`
    takes. `chat_template` overrides the model's; ValueError when there is neither."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer: this LLM was made with skip_tokenizer_init=True")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template: pass chat_template=..., or use generate() with a plain prompt")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
    kwargs = dict(chat_template_kwargs or {})
    text = tokenizer.apply_chat_template(check_conversation(messages), chat_template=chat_template, tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, tokenize=False,
                                         **kwargs)  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"prompt": text, "prompt_token_ids": list(ids)}
