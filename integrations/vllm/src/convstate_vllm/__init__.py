"""convstate-vllm: the `prompt_cache` extension of chat completions (convstate's
docs/backend-protocol.md) as a vLLM endpoint plugin.

vLLM loads it from the `vllm.endpoint_plugins` entry point when `VLLM_PLUGINS` names `convstate`. It
owns `GET /v1/models` (adding the extension's discovery object) and `POST /v1/chat/completions`
(verifying cache references and registering handles); generation, parsers, structured output and errors
stay vLLM's own, because the certified prompt token ids are handed to vLLM's chat handler through
`kv_transfer_params.prompt_token_ids`. Nothing in vLLM is patched.
"""

__version__ = "0.1.0"

# The vLLM versions whose plugin interface, chat handler and renderer this release was verified against.
SUPPORTED_VLLM = ">=0.32.0,<0.33"
