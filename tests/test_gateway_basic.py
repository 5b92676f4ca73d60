from __future__ import annotations

import openai

from distillguard.serve import StackThread


def test_chat_completion_through_gateway_with_openai_client(
    stack: StackThread, account_key: tuple[str, str]
) -> None:
    _, key = account_key
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    out = client.chat.completions.create(
        model="demo-chat-1", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20)
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens <= 20
