"""The vLLM plugin (its own distribution, which cannot import the service) computes the protocol's
digest itself; it must be the service's, bit for bit."""

from __future__ import annotations

import random

from convstate_vllm.digest import token_digest as plugin_digest
from service.domain.prefix import token_digest


def test_the_plugin_digests_token_ids_as_the_service_does() -> None:
    rng = random.Random(16)
    for length in (0, 1, 2, 127, 128, 4096):
        ids = [rng.randrange(0, 2**32) for _ in range(length)]
        assert plugin_digest(ids) == token_digest(ids)
    assert plugin_digest([1, 2, 3]) == "a76f94d1118f3bcfe6d1006dda205ce7"
