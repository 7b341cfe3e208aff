"""The keyless pattern Microsoft documents, against the gateway: the `openai` SDK's AzureOpenAI client
with `azure_ad_token_provider`, over HTTPS trusting the test CA. Driven by tests/tests/openai_sdk.rs,
which serves the gateway and the Entra ID stand-in and mints the token this provider hands out.

Prints one JSON line per call: {"status", "content" or "error", "remaining_requests"}.
"""

import json
import os

import httpx
import openai
from openai import AzureOpenAI

provided = []


def token_provider():
    # What azure.identity.get_bearer_token_provider returns: a callable giving a fresh token.
    provided.append(1)
    return os.environ["ENTRA_TOKEN"]


client = AzureOpenAI(
    azure_endpoint=os.environ["GATEWAY_URL"],
    azure_ad_token_provider=token_provider,
    api_version="2024-10-21",
    http_client=httpx.Client(verify=os.environ["CA_FILE"]),
    # The gateway's 429 must reach this script, not be retried away.
    max_retries=0,
)

for _ in range(int(os.environ["CALLS"])):
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Hello from the SDK"}],
            max_tokens=20,
        )
        completion = raw.parse()
        print(json.dumps({
            "status": raw.status_code,
            "content": completion.choices[0].message.content,
            "remaining_requests": raw.headers.get("x-ratelimit-remaining-requests"),
            "http_version": raw.http_response.http_version,
        }))
    except openai.APIStatusError as e:
        print(json.dumps({"status": e.status_code, "error": e.message}))

print(json.dumps({"tokens_provided": len(provided)}))
